//! The per-client SYN rate limit in XDP (#16), with exact counts: on a
//! real veth pair in network namespaces (a burst from one source, a
//! permitted source, IPv6 /64 grouping, events to userspace), and through
//! BPF_PROG_TEST_RUN where the kernel's path is all that matters (a full
//! table, denied SYNs never charged, the sweeper, monitor mode).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::IpNet;
use smtpguard::kernel::{
    rate_limit::{monotonic_ns, Gcra},
    ApplyHow, AttachMode, MapSync, OverLimit, RateLimitSettings, RateLimiter, Stats, XdpFilter,
};
use smtpguard_common::{counter, Action, Enforcement, Mode};
use smtpguard_tests::{
    flood::{syn_frame_v4, syn_frame_v6, FrameSender},
    netns::{Topology, GW_V4, GW_V6},
    packet, require_root, wait_for,
};

const PORT: u16 = 2525;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn rules(set: &[(&str, Action)]) -> Vec<(IpNet, Action)> {
    set.iter().map(|(n, a)| (n.parse().unwrap(), *a)).collect()
}

fn limit(syns_per_minute: u32) -> RateLimitSettings {
    RateLimitSettings {
        syns_per_minute,
        ipv6_prefix: 64,
        exempt_permitted: true,
    }
}

/// Loads the program with a bucket table of `table_size` clients.
fn load(table_size: u32) -> (XdpFilter, MapSync, Stats, RateLimiter) {
    require_root();
    let (mut filter, sync, stats) =
        XdpFilter::load_with_rate_table(table_size).expect("load the embedded XDP program");
    let limiter = filter.take_rate_limiter().expect("rate limiter maps");
    (filter, sync, stats, limiter)
}

/// Every event the ring buffer holds now.
fn drain(limiter: &mut RateLimiter) -> Vec<OverLimit> {
    std::iter::from_fn(|| limiter.try_next()).collect()
}

#[test]
fn a_burst_passes_exactly_the_limit_and_the_rest_dies_in_xdp_native() {
    burst(AttachMode::Native);
}

#[test]
fn a_burst_passes_exactly_the_limit_and_the_rest_dies_in_xdp_skb() {
    burst(AttachMode::Skb);
}

/// K SYNs in a burst from each of several clients over a veth, XDP
/// attached in `mode`: exact counts per verdict, buckets and events.
fn burst(mode: AttachMode) {
    const LIMIT: u32 = 5;
    const K: u32 = 12;
    let (mut filter, mut sync, stats, mut limiter) = load(1024);
    let topo = Topology::new();
    sync.apply(
        &rules(&[
            ("203.0.113.0/24", Action::Deny),
            ("203.0.113.77/32", Action::Permit),
        ]),
        ApplyHow::Atomic,
    )
    .unwrap();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[PORT], 10)
        .unwrap();
    sync.set_rate_limit(&limit(LIMIT)).unwrap();
    topo.gw
        .enter(|| filter.attach(&topo.gw_if, mode))
        .expect("attach XDP");
    let macs = (topo.net.mac(&topo.net_if), topo.gw.mac(&topo.gw_if));
    let gw4: Ipv4Addr = GW_V4.parse().unwrap();
    let gw6: Ipv6Addr = GW_V6.parse().unwrap();
    let v4 = |src: &str, sport| syn_frame_v4(macs, src.parse().unwrap(), gw4, sport, PORT);
    let v6 = |src: &str, sport| syn_frame_v6(macs, src.parse().unwrap(), gw6, sport, PORT);
    let mut frames = Vec::new();
    for i in 0..K as u16 {
        // One flooding client; a permitted one (exempt); two hosts of one
        // /64 taking turns (one bucket); a denied one (never charged).
        frames.push(v4("198.51.100.10", 1000 + i));
        frames.push(v4("203.0.113.77", 1000 + i));
        let host = if i % 2 == 0 {
            "2001:db8:1::10"
        } else {
            "2001:db8:1::20"
        };
        frames.push(v6(host, 1000 + i));
        frames.push(v4("203.0.113.9", 1000 + i));
    }
    // Another /64 of the same /48: a bucket of its own.
    for i in 0..3 {
        frames.push(v6("2001:db8:1:1::10", 2000 + i));
    }

    let before = stats.counters();
    let sender = topo
        .net
        .enter(|| FrameSender::open(&topo.net_if))
        .expect("AF_PACKET socket");
    for frame in &frames {
        let mut tries = 0;
        while !sender.send(frame).expect("send a SYN") {
            tries += 1;
            assert!(tries < 1000, "the veth queue never drained");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let syns = frames.len() as u64;
    let settled = wait_for(Duration::from_secs(10), || {
        stats.counters().since(&before).get(counter::SYN) >= syns
    });
    let delta = stats.counters().since(&before);
    assert!(
        settled,
        "only {} of {syns} SYNs reached XDP",
        delta.get(counter::SYN)
    );
    let over = u64::from(K - LIMIT);
    assert_eq!(delta.get(counter::SYN), syns, "{delta:?}");
    assert_eq!(
        delta.get(counter::DROP_RATE_LIMIT),
        2 * over,
        "K - limit from the IPv4 client and from the shared /64: {delta:?}"
    );
    assert_eq!(delta.get(counter::DROP_DENY_LIST), u64::from(K));
    assert_eq!(
        delta.get(counter::PASS_PERMITTED),
        2 * u64::from(LIMIT) + u64::from(K) + 3,
        "limit + limit + the exempt client + the other /64"
    );
    assert_eq!(delta.get(counter::DROP_V4), u64::from(K) + over);
    assert_eq!(delta.get(counter::DROP_V6), over);
    assert_eq!(
        delta.get(counter::PACKETS),
        delta.dropped() + delta.get(counter::PASSED),
        "every packet has exactly one verdict"
    );

    // Buckets: the IPv4 client and the two /64s; none for the permitted
    // or the denied source.
    let clients: Vec<IpAddr> = limiter.buckets().into_iter().map(|(a, _)| a).collect();
    let want: Vec<IpAddr> = ["198.51.100.10", "2001:db8:1::", "2001:db8:1:1::"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(clients, want);

    // One event per bucket that went over (the first drop of its minute).
    let mut events = Vec::new();
    wait_for(Duration::from_secs(5), || {
        events.extend(drain(&mut limiter));
        events.len() >= 2
    });
    events.extend(drain(&mut limiter));
    let mut lines: Vec<String> = events.iter().map(ToString::to_string).collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "RATE LIMIT [198.51.100.10] over 5 SYN/min",
            "RATE LIMIT [2001:db8:1::]/64 over 5 SYN/min",
        ]
    );
    assert!(events.iter().all(|e| !e.overflow && e.limit == LIMIT));
    drop(filter);
}

/// Runs `frame` once through the program; returns the XDP action.
fn run(filter: &mut XdpFilter, frame: &[u8]) -> u32 {
    filter.test_run(frame).expect("BPF_PROG_TEST_RUN")
}

fn syn4(src: &str) -> Vec<u8> {
    packet::syn_v4(src, PORT)
}

fn syn6(src: &str) -> Vec<u8> {
    packet::syn_v6(src, PORT)
}

#[test]
fn a_full_table_charges_new_clients_to_one_shared_bucket_and_keeps_known_ones() {
    let (mut filter, mut sync, stats, mut limiter) = load(2);
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[PORT], 0)
        .unwrap();
    sync.set_rate_limit(&limit(3)).unwrap();
    let before = stats.counters();
    // A and B fill the table.
    assert_eq!(run(&mut filter, &syn4("198.51.100.1")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn4("198.51.100.2")), XDP_PASS);
    assert_eq!(limiter.buckets().len(), 2);
    // C and D are new while it is full: they share one bucket of 3.
    let shared: Vec<u32> = [
        "198.51.100.3",
        "198.51.100.4",
        "198.51.100.3",
        "198.51.100.4",
    ]
    .iter()
    .map(|s| run(&mut filter, &syn4(s)))
    .collect();
    assert_eq!(shared, [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]);
    // A keeps its own bucket: two more pass (3 in all), the next drops.
    assert_eq!(run(&mut filter, &syn4("198.51.100.1")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn4("198.51.100.1")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn4("198.51.100.1")), XDP_DROP);
    assert_eq!(limiter.buckets().len(), 2, "nobody was evicted");
    let events = drain(&mut limiter);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events[0].overflow, "the first drop was the shared bucket's");
    assert_eq!(events[0].client.to_string(), "198.51.100.4/32");
    assert!(!events[1].overflow);
    assert_eq!(events[1].client.to_string(), "198.51.100.1/32");
    // More drops in the same minute send no more events.
    assert_eq!(run(&mut filter, &syn4("198.51.100.1")), XDP_DROP);
    assert_eq!(run(&mut filter, &syn4("198.51.100.3")), XDP_DROP);
    assert!(drain(&mut limiter).is_empty());

    // A minute later every bucket is full again: the sweeper forgets them
    // and C gets a bucket of its own.
    let later = monotonic_ns() + 61_000_000_000;
    assert_eq!(limiter.sweep(later).unwrap(), 2);
    assert!(limiter.buckets().is_empty());
    let own: Vec<u32> = (0..4)
        .map(|_| run(&mut filter, &syn4("198.51.100.3")))
        .collect();
    assert_eq!(own, [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]);
    let delta = stats.counters().since(&before);
    assert_eq!(delta.get(counter::DROP_RATE_LIMIT), 5);
    assert_eq!(delta.get(counter::PASS_PERMITTED), 10);
}

#[test]
fn denied_syns_never_reach_a_bucket_and_permitted_ones_only_when_configured() {
    let (mut filter, mut sync, stats, limiter) = load(64);
    sync.apply(
        &rules(&[
            ("203.0.113.0/24", Action::Deny),
            ("198.51.100.0/24", Action::Permit),
        ]),
        ApplyHow::Atomic,
    )
    .unwrap();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[PORT], 0)
        .unwrap();
    sync.set_rate_limit(&limit(1)).unwrap();
    let before = stats.counters();
    for _ in 0..5 {
        assert_eq!(run(&mut filter, &syn4("203.0.113.9")), XDP_DROP);
        assert_eq!(run(&mut filter, &syn4("198.51.100.9")), XDP_PASS);
    }
    assert!(limiter.buckets().is_empty(), "{:?}", limiter.buckets());
    let delta = stats.counters().since(&before);
    assert_eq!(delta.get(counter::DROP_DENY_LIST), 5);
    assert_eq!(delta.get(counter::DROP_RATE_LIMIT), 0);

    // exempt_permitted = false: the permitted client is limited too.
    sync.set_rate_limit(&RateLimitSettings {
        exempt_permitted: false,
        ..limit(1)
    })
    .unwrap();
    assert_eq!(run(&mut filter, &syn4("198.51.100.9")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn4("198.51.100.9")), XDP_DROP);
    // Off again: nothing is charged.
    sync.set_rate_limit(&limit(0)).unwrap();
    assert_eq!(run(&mut filter, &syn4("192.0.2.50")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn4("192.0.2.50")), XDP_PASS);
    assert_eq!(limiter.buckets().len(), 1);
}

#[test]
fn ipv4_mapped_sources_share_the_ipv4_bucket_and_ipv6_groups_follow_the_prefix() {
    let (mut filter, mut sync, _stats, limiter) = load(64);
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[PORT], 0)
        .unwrap();
    sync.set_rate_limit(&RateLimitSettings {
        ipv6_prefix: 48,
        ..limit(2)
    })
    .unwrap();
    assert_eq!(run(&mut filter, &syn4("198.51.100.7")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn6("::ffff:198.51.100.7")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn4("198.51.100.7")), XDP_DROP);
    // /48 grouping: two /64s of one /48 share.
    assert_eq!(run(&mut filter, &syn6("2001:db8:5:1::1")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn6("2001:db8:5:2::1")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn6("2001:db8:5:3::1")), XDP_DROP);
    assert_eq!(run(&mut filter, &syn6("2001:db8:6::1")), XDP_PASS);
    let clients: Vec<String> = limiter
        .buckets()
        .iter()
        .map(|(a, _)| a.to_string())
        .collect();
    assert_eq!(clients, ["198.51.100.7", "2001:db8:5::", "2001:db8:6::"]);
}

#[test]
fn the_kernel_bucket_follows_the_gcra_oracle() {
    let (mut filter, mut sync, _stats, limiter) = load(64);
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[PORT], 0)
        .unwrap();
    for syns_per_minute in [1u32, 7, 600] {
        sync.set_rate_limit(&limit(syns_per_minute)).unwrap();
        let src = format!("192.0.2.{}", syns_per_minute % 250);
        let gcra = Gcra::new(syns_per_minute);
        let start = monotonic_ns();
        let mut oracle_tat = None;
        let mut passed = 0;
        for _ in 0..syns_per_minute + 3 {
            let (ok, tat) = gcra.charge(oracle_tat, start);
            oracle_tat = Some(tat);
            let got = run(&mut filter, &syn4(&src));
            assert_eq!(got == XDP_PASS, ok, "limit {syns_per_minute}");
            passed += ok as u32;
        }
        assert_eq!(passed, syns_per_minute);
        let end = monotonic_ns();
        let (_, bucket) = limiter
            .buckets()
            .into_iter()
            .find(|(a, _)| a.to_string() == src)
            .expect("bucket");
        // tat = (the kernel's clock at the first SYN) + limit * interval;
        // the coarse clock lags CLOCK_MONOTONIC by at most a tick.
        let first = bucket.tat_ns - u64::from(syns_per_minute) * gcra.interval_ns;
        assert!(
            first + 20_000_000 >= start && first <= end,
            "limit {syns_per_minute}: first SYN at {first}, test ran {start}..{end}"
        );
    }
}

#[test]
fn monitor_mode_counts_would_drop_and_passes() {
    let (mut filter, mut sync, stats, _limiter) = load(64);
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Monitor, &[PORT], 0)
        .unwrap();
    sync.set_rate_limit(&limit(1)).unwrap();
    let before = stats.counters();
    assert_eq!(run(&mut filter, &syn4("198.51.100.8")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn4("198.51.100.8")), XDP_PASS);
    let delta = stats.counters().since(&before);
    assert_eq!(delta.get(counter::WOULD_DROP), 1);
    assert_eq!(delta.get(counter::DROP_RATE_LIMIT), 0);
}

#[test]
fn the_async_reader_yields_events_and_the_sweeper_forgets_full_buckets() {
    let (mut filter, mut sync, _stats, limiter) = load(64);
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[PORT], 0)
        .unwrap();
    sync.set_rate_limit(&limit(1)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut events, mut sweeper) = runtime.block_on(async { limiter.into_parts() }).unwrap();
    assert_eq!(run(&mut filter, &syn6("2001:db8:7::1")), XDP_PASS);
    assert_eq!(run(&mut filter, &syn6("2001:db8:7::2")), XDP_DROP);
    let event = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), events.next()).await })
        .expect("an event within 10 s")
        .expect("read the event");
    assert_eq!(
        event.to_string(),
        "RATE LIMIT [2001:db8:7::]/64 over 1 SYN/min"
    );
    // Not full yet (60 s per token): the sweeper keeps the bucket.
    assert_eq!(sweeper.sweep().unwrap(), 0);
    assert_eq!(run(&mut filter, &syn6("2001:db8:7::3")), XDP_DROP);
}

/// The daemon binary under test (`SMTPGUARD_BIN`, else the debug build).
fn smtpguard_bin() -> std::path::PathBuf {
    std::env::var_os("SMTPGUARD_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/smtpguard")
        })
}

#[test]
fn the_daemon_logs_rate_limit_events_counts_drops_and_reload_applies_the_limit() {
    use smtpguard::testing::{config_text, TempDir};
    use std::process::{Child, Command, Stdio};

    /// SIGTERM on drop, so the daemon detaches XDP and removes its pins;
    /// SIGKILL if it has not exited after 10 s.
    struct Stop(Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = wait_for(Duration::from_secs(10), || {
                matches!(self.0.try_wait(), Ok(Some(_)))
            });
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    require_root();
    let topo = Topology::new();
    let dir = TempDir::new("ratelimit-daemon");
    let listen: std::net::SocketAddr = format!("{GW_V4}:{PORT}").parse().unwrap();
    let write_config = |syns: u32, table: u32| {
        let xdp = format!("interfaces = [\"{}\"]\nmode = \"native\"\n", topo.gw_if);
        let rate = format!("syns_per_minute = {syns}\ntable_size = {table}\n");
        // One event per client and minute: a ban after the first.
        let bans = "ban_after = 1\nban_for = \"1h\"\n";
        let text = config_text(
            dir.path(),
            listen,
            &[
                ("xdp", xdp.as_str()),
                ("rate_limit", rate.as_str()),
                ("bans", bans),
            ],
        );
        dir.write("smtpguard.toml", text)
    };
    let config = write_config(3, 1024);
    let log_path = dir.join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let bin = smtpguard_bin();
    let _daemon = Stop(
        topo.gw
            .command(&bin.to_string_lossy())
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start smtpguard"),
    );
    let socket = dir.join("control.sock");
    let cli = |args: &[&str]| {
        let mut cmd: Command = topo.gw.command(&bin.to_string_lossy());
        cmd.arg("--socket").arg(&socket).args(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        smtpguard_tests::run_bounded(cmd, Duration::from_secs(60)).expect("run the CLI")
    };
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(30), || cli(&["status"])
            .status
            .success()),
        "the daemon did not come up:\n{}",
        log_text()
    );
    assert!(
        log_text().contains("SYN rate limit 3/min per client (IPv6 per /64, permitted exempt)"),
        "the start summary names the limit:\n{}",
        log_text()
    );
    let stat = |name: &str| -> u64 {
        let out = cli(&["--json", "stats"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
        v.pointer(&format!("/xdp/{name}"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| panic!("no xdp.{name} in {v}"))
    };

    let macs = (topo.net.mac(&topo.net_if), topo.gw.mac(&topo.gw_if));
    let gw4: Ipv4Addr = GW_V4.parse().unwrap();
    let sender = topo
        .net
        .enter(|| FrameSender::open(&topo.net_if))
        .expect("AF_PACKET socket");
    let send = |src: &str, n: u16| {
        for i in 0..n {
            let frame = syn_frame_v4(macs, src.parse().unwrap(), gw4, 3000 + i, PORT);
            while !sender.send(&frame).expect("send a SYN") {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    // 4, not more: the 4th SYN's event bans the client, and a 5th could
    // meet the ban instead of the limit (the kernel's count over many
    // SYNs is the other tests' job).
    send("198.51.100.10", 4);
    assert!(
        wait_for(Duration::from_secs(10), || stat("drop_rate_limit") == 1),
        "drop_rate_limit = {}, log:\n{}",
        stat("drop_rate_limit"),
        log_text()
    );
    assert!(
        wait_for(Duration::from_secs(10), || log_text()
            .contains("RATE LIMIT [198.51.100.10] over 3 SYN/min")),
        "no RATE LIMIT line:\n{}",
        log_text()
    );

    for line in log_text()
        .lines()
        .filter(|l| l.contains("RATE LIMIT") || l.contains("reason=rate_limit"))
    {
        eprintln!("daemon: {line}");
    }

    // reload: a new limit applies at once; a new table size waits.
    write_config(10, 2048);
    let out = cli(&["reload"]);
    let reply =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{reply}");
    assert!(reply.contains("rate_limit.table_size"), "{reply}");
    // 11, not 12: the 11th SYN's event bans the client, and a 12th could
    // meet the ban instead of the limit.
    send("198.51.100.20", 11);
    assert!(
        wait_for(Duration::from_secs(10), || stat("drop_rate_limit") == 1 + 1),
        "after reload: drop_rate_limit = {}",
        stat("drop_rate_limit")
    );

    // Over the limit is a ban violation: both clients are banned in `auto`
    // with the reason, and the next SYN dies on the ban, not the limit.
    let auto =
        || String::from_utf8_lossy(&cli(&["deny", "list", "--source", "auto"]).stdout).into_owned();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let l = auto();
            l.contains("198.51.100.10/32") && l.contains("198.51.100.20/32")
        }),
        "no bans in auto:\n{}\nlog:\n{}",
        auto(),
        log_text()
    );
    assert!(auto().contains("reason=rate_limit"), "{}", auto());
    let denied = stat("drop_deny_list");
    send("198.51.100.10", 1);
    assert!(
        wait_for(Duration::from_secs(10), || stat("drop_deny_list")
            == denied + 1),
        "the banned client's SYN: drop_deny_list = {} (was {denied})",
        stat("drop_deny_list")
    );
    assert_eq!(stat("drop_rate_limit"), 2);
}
