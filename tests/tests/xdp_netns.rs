//! The XDP program attached to a real veth in a network namespace, native
//! and skb mode: denied clients' connect() times out, permitted ones get the
//! greeting, and the counters agree with what was sent.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use smtpguard::kernel::{loader::AttachedMode, ApplyHow, AttachMode, XdpFilter};
use smtpguard_common::{counter, Action, Enforcement, Mode};
use smtpguard_tests::{
    netns::{Netns, Topology, GW_V4, GW_V6},
    require_root,
};

const PORT: u16 = 2525;

/// Accepts connections on `listener` and greets each, until `stop`.
fn greeter(listener: TcpListener, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(b"220 gw.example.com ESMTP test\r\n");
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

/// Connects from `src` to the gateway's port, in the right family.
fn connect_from(ns: &Netns, src: &str, timeout: Duration) -> std::io::Result<String> {
    let dst: SocketAddr = if src.contains(':') {
        format!("[{GW_V6}]:{PORT}")
    } else {
        format!("{GW_V4}:{PORT}")
    }
    .parse()
    .unwrap();
    ns.connect_from(src, dst, timeout)
}

fn scenario(mode: AttachMode, want_mode: AttachedMode) {
    require_root();
    let topo = Topology::new();
    let clients = [
        ("198.51.100.10", true),
        ("203.0.113.9", false),
        ("203.0.113.77", true), // permitted exception inside the denied /24
        ("203.0.113.200", false),
        ("2001:db8:1::10", true),
        ("2001:db8:bad::9", false),
    ];
    for (addr, _) in &clients {
        topo.add_client(addr);
    }
    let (mut filter, mut sync, stats) = XdpFilter::load().expect("load XDP program");
    let rules: Vec<(IpNet, Action)> = [
        ("203.0.113.0/24", Action::Deny),
        ("203.0.113.77/32", Action::Permit),
        ("2001:db8:bad::/48", Action::Deny),
    ]
    .iter()
    .map(|(n, a)| (n.parse().unwrap(), *a))
    .collect();
    sync.apply(&rules, ApplyHow::Atomic).unwrap();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[PORT], 0)
        .unwrap();
    let attachment = topo
        .gw
        .enter(|| filter.attach(&topo.gw_if, mode))
        .expect("attach XDP");
    assert_eq!(attachment.mode, want_mode);

    let stop = Arc::new(AtomicBool::new(false));
    let l4 = topo.gw.enter(|| TcpListener::bind((GW_V4, PORT))).unwrap();
    let l6 = topo
        .gw
        .enter(|| TcpListener::bind(format!("[{GW_V6}]:{PORT}")))
        .unwrap();
    let threads = [greeter(l4, stop.clone()), greeter(l6, stop.clone())];

    let before = stats.counters();
    let mut failures = Vec::new();
    // Shorter than the initial SYN retransmission timeout (1 s): exactly one
    // SYN per attempt, so the counters can be compared exactly.
    let timeout = Duration::from_millis(600);
    for (addr, permitted) in &clients {
        let result = connect_from(&topo.net, addr, timeout);
        match (permitted, &result) {
            (true, Ok(greeting)) if greeting.starts_with("220 ") => {}
            (false, Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {}
            _ => failures.push(format!("{addr}: permitted={permitted}, got {result:?}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let delta = stats.counters().since(&before);
    assert!(failures.is_empty(), "{mode:?}: {}", failures.join("; "));
    let denied_v4 = clients
        .iter()
        .filter(|(a, p)| !p && !a.contains(':'))
        .count() as u64;
    let denied_v6 = clients
        .iter()
        .filter(|(a, p)| !p && a.contains(':'))
        .count() as u64;
    assert_eq!(
        delta.get(counter::SYN),
        clients.len() as u64,
        "SYNs seen: {delta:?}"
    );
    assert_eq!(delta.get(counter::DROP_DENY_LIST), denied_v4 + denied_v6);
    assert_eq!(delta.get(counter::DROP_V4), denied_v4);
    assert_eq!(delta.get(counter::DROP_V6), denied_v6);
    assert_eq!(
        delta.get(counter::PASS_PERMITTED),
        clients.len() as u64 - denied_v4 - denied_v6
    );
    assert_eq!(
        delta.get(counter::PACKETS),
        delta.dropped() + delta.get(counter::PASSED),
        "every packet has exactly one verdict"
    );
    drop(filter);
}

#[test]
fn native_mode_on_veth() {
    scenario(AttachMode::Native, AttachedMode::Native);
}

#[test]
fn skb_mode_on_veth() {
    scenario(AttachMode::Skb, AttachedMode::Skb);
}

#[test]
fn attach_to_a_missing_interface_names_it() {
    require_root();
    let (mut filter, _sync, _stats) = XdpFilter::load().unwrap();
    let err = filter
        .attach("sgt-nonexist0", AttachMode::Auto)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "XDP program: no interface named sgt-nonexist0"
    );
}

/// A daemon that dies leaves its pinned link (and so its filter) in place;
/// the next start swaps its own program in behind the same link: the filter
/// is never missing and never attached twice. A clean stop removes it all.
#[test]
fn restart_replaces_the_pinned_program_atomically() {
    require_root();
    let topo = Topology::new();
    topo.add_client("198.51.100.10");
    topo.add_client("203.0.113.9");
    // A private bpffs: `ip netns exec` remounts /sys, hiding /sys/fs/bpf.
    let bpffs = format!("/tmp/sgt-bpffs-{}", smtpguard_tests::netns::unique_tag());
    std::fs::create_dir_all(&bpffs).unwrap();
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Unmount(bpffs.clone());
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", &bpffs])
        .status()
        .unwrap();
    assert!(status.success(), "mount bpffs on {bpffs}");
    let pin_dir = format!("{bpffs}/smtpguard");

    // First "daemon": denies 203.0.113.0/24, then crashes.
    let out = topo
        .gw
        .command(env!("CARGO_BIN_EXE_attach-and-crash"))
        .args([&pin_dir, &topo.gw_if, &PORT.to_string(), "203.0.113.0/24"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("attached"),
        "{out:?}"
    );
    let pins: Vec<_> = std::fs::read_dir(&pin_dir).unwrap().collect();
    assert_eq!(pins.len(), 1, "one pinned link left by the crashed run");

    let stop = Arc::new(AtomicBool::new(false));
    let listener = topo.gw.enter(|| TcpListener::bind((GW_V4, PORT))).unwrap();
    let greeter = greeter(listener, stop.clone());
    let short = Duration::from_millis(600);
    // The crashed run's filter is still in force.
    assert!(connect_from(&topo.net, "203.0.113.9", short).is_err());

    // Second "daemon": denies 198.51.100.0/24 instead, and takes over the link.
    let (mut filter, mut sync, _stats) = XdpFilter::load().unwrap();
    sync.apply(
        &[("198.51.100.0/24".parse().unwrap(), Action::Deny)],
        ApplyHow::Atomic,
    )
    .unwrap();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[PORT], 0)
        .unwrap();
    let attachment = topo
        .gw
        .enter(|| {
            filter.attach_pinned(
                &topo.gw_if,
                AttachMode::Native,
                std::path::Path::new(&pin_dir),
            )
        })
        .unwrap();
    assert!(attachment.replaced_pinned, "{attachment:?}");
    assert_eq!(
        topo.gw.xdp_programs(&topo.gw_if),
        1,
        "exactly one XDP program"
    );
    assert!(
        connect_from(&topo.net, "203.0.113.9", short).is_ok(),
        "old list gone"
    );
    assert!(
        connect_from(&topo.net, "198.51.100.10", short).is_err(),
        "new list in force"
    );

    // A clean stop detaches and unpins.
    drop(filter);
    stop.store(true, Ordering::Relaxed);
    greeter.join().unwrap();
    assert_eq!(
        topo.gw.xdp_programs(&topo.gw_if),
        0,
        "still attached after a clean stop"
    );
    assert!(
        !std::path::Path::new(&pin_dir).exists(),
        "pins (or their directory) left behind"
    );
}
