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

/// Accepts connections on `listener` and greets each, until `stop` (at
/// most a minute).
fn greeter(listener: TcpListener, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    greeter_for(listener, stop, Duration::from_secs(60))
}

/// As [`greeter`], for at most `limit`.
fn greeter_for(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> thread::JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let deadline = Instant::now() + limit;
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
    let bpffs = PrivateBpffs::mount();
    let pin_dir = bpffs.pin_dir();

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

/// A bpffs mounted on a fresh directory under /tmp for one test (`ip netns
/// exec` remounts /sys, hiding /sys/fs/bpf), unmounted and removed on drop.
struct PrivateBpffs {
    path: String,
}

impl PrivateBpffs {
    fn mount() -> PrivateBpffs {
        let path = format!("/tmp/sgt-bpffs-{}", smtpguard_tests::netns::unique_tag());
        std::fs::create_dir_all(&path).unwrap();
        let guard = PrivateBpffs { path };
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", &guard.path])
            .status()
            .unwrap();
        assert!(status.success(), "mount bpffs on {}", guard.path);
        guard
    }

    /// Where the daemon would pin its links (`/sys/fs/bpf/smtpguard`).
    fn pin_dir(&self) -> String {
        format!("{}/smtpguard", self.path)
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The id of the XDP program attached to `interface`, if any.
fn attached_program(ns: &Netns, interface: &str) -> Option<u32> {
    let details = ns.link_details(interface);
    let (_, rest) = details.split_once("prog/xdp id ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A pinned bpf_link as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PinnedXdp {
    link: u32,
    program: u32,
}

/// Every pin in `pin_dir`, with the link and program behind it (`None`
/// when it is not a readable bpf_link).
fn pins(pin_dir: &str) -> Vec<(String, Option<PinnedXdp>)> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    entries
        .map(|entry| {
            let path = entry.unwrap().path();
            let pinned = aya::programs::links::PinnedLink::from_pin(&path)
                .ok()
                .and_then(|pinned| aya::programs::links::FdLink::from(pinned).info().ok())
                .map(|info| PinnedXdp {
                    link: info.id(),
                    program: info.program_id(),
                });
            (path.display().to_string(), pinned)
        })
        .collect()
}

/// Asserts that exactly one XDP program is attached to the gateway's
/// interface and that the one pin in `pin_dir` is the link holding it.
fn one_filter_attached_and_pinned(topo: &Topology, pin_dir: &str, when: &str) -> PinnedXdp {
    let attached = topo.gw.xdp_programs(&topo.gw_if);
    let program = attached_program(&topo.gw, &topo.gw_if);
    let pins = pins(pin_dir);
    match &pins[..] {
        [(_, Some(pinned))] if attached == 1 && Some(pinned.program) == program => *pinned,
        _ => panic!("{when}: {attached} XDP programs attached ({program:?}), pins {pins:?}"),
    }
}

/// What strace does at the chosen bpf() call.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL on entering it: a crash at that step.
    Kill,
    /// It fails with EIO without running: a kernel refusing that step.
    Fail,
}

/// A restart (the next run taking over the pinned link) with a fault
/// injected by strace at its 1st, 2nd, ... bpf() call, until a run no
/// longer reaches the call (a SIGKILL: until a run completes). After every
/// run the interface has exactly one XDP program, the pin holds it through
/// the same bpf_link as before (the filter was never detached), a SYN from
/// a denied source is dropped and a permitted client is greeted; a run
/// that failed left the program as it was. `first` and `restart` are the
/// attach modes of the crashed first run and of the restarts.
fn restart_with_a_fault_at_every_bpf_call(first: &str, restart: &str, fault: Fault) {
    require_root();
    const PERMITTED: &str = "198.51.100.10";
    const DENIED: &str = "203.0.113.9";
    const DENY: &str = "203.0.113.0/24";
    let topo = Topology::new();
    topo.add_client(PERMITTED);
    topo.add_client(DENIED);
    let bpffs = PrivateBpffs::mount();
    let pin_dir = bpffs.pin_dir();
    let scratch = smtpguard::testing::TempDir::new("restart-faults");
    let trace = scratch.join("strace.log");
    let helper = env!("CARGO_BIN_EXE_attach-and-crash");
    let port = PORT.to_string();
    let args = |mode: &str| [&pin_dir, &topo.gw_if, &port, DENY, mode].map(|s| s.to_string());

    let mut first_run = topo.gw.command(helper);
    first_run
        .args(args(first))
        .stdout(std::process::Stdio::piped());
    let out = smtpguard_tests::run_bounded(first_run, Duration::from_secs(60)).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("attached"),
        "{out:?}"
    );
    let mut current = one_filter_attached_and_pinned(&topo, &pin_dir, "after the first run");
    let link = current.link;

    let stop = Arc::new(AtomicBool::new(false));
    let listener = topo.gw.enter(|| TcpListener::bind((GW_V4, PORT))).unwrap();
    let greeter = greeter_for(listener, stop.clone(), Duration::from_secs(900));
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop_greeter = Stop(stop);

    let inject = match fault {
        Fault::Kill => "signal=SIGKILL",
        Fault::Fail => "error=EIO",
    };
    let (mut faults, mut swaps) = (0, 0);
    let mut done = false;
    for n in 1..=2000 {
        let _ = std::fs::remove_file(&trace);
        let mut cmd = topo.gw.command("strace");
        cmd.args(["-f", "-qq", "-e", "trace=bpf", "-e"])
            .arg(format!("inject=bpf:{inject}:when={n}"))
            .arg("-o")
            .arg(&trace)
            .arg(helper)
            .args(args(restart))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let out = smtpguard_tests::run_bounded(cmd, Duration::from_secs(60)).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let completed = stdout.starts_with("attached");
        let reached = match fault {
            Fault::Kill => !completed,
            Fault::Fail => std::fs::read_to_string(&trace)
                .unwrap_or_default()
                .contains("(INJECTED)"),
        };
        let when = format!("restart with {fault:?} at its bpf() call {n}");
        assert!(
            connect_from(&topo.net, DENIED, Duration::from_millis(300)).is_err(),
            "{when}: a SYN from the denied {DENIED} went through"
        );
        let greeting = connect_from(&topo.net, PERMITTED, Duration::from_secs(5));
        assert!(
            greeting.as_ref().is_ok_and(|g| g.starts_with("220 ")),
            "{when}: the permitted {PERMITTED} got {greeting:?}"
        );
        let now = one_filter_attached_and_pinned(&topo, &pin_dir, &when);
        assert_eq!(
            now.link, link,
            "{when}: the pinned link was replaced, so the filter was detached in between"
        );
        if completed {
            assert!(stdout.contains("replaced"), "{when}: {stdout}");
            assert_ne!(
                now.program, current.program,
                "{when}: the program was not swapped"
            );
            swaps += 1;
        } else {
            assert_eq!(now, current, "{when}: a failed restart changed the filter");
        }
        current = now;
        if !reached {
            done = true;
            break;
        }
        faults += 1;
        if completed && matches!(fault, Fault::Kill) {
            done = true;
            break;
        }
    }
    drop(stop_greeter);
    greeter.join().unwrap();
    assert!(done, "the restart kept reaching new bpf() calls");
    assert!(faults > 0 && swaps > 0, "{faults} faults, {swaps} swaps");
    eprintln!(
        "restart ({first} -> {restart}): {fault:?} at each of its {faults} bpf() calls; {swaps} runs completed"
    );
}

/// Issue #14 item 1: a restart that dies at any step leaves the old or the
/// new program attached and pinned, never neither.
#[test]
fn restart_killed_at_any_bpf_call_leaves_the_filter_in_force() {
    restart_with_a_fault_at_every_bpf_call("native", "native", Fault::Kill);
}

/// As above when the restart asks for another attach mode than the pinned
/// link has: it keeps the link (and its mode) rather than detach it.
#[test]
fn restart_in_another_mode_killed_at_any_bpf_call_leaves_the_filter_in_force() {
    restart_with_a_fault_at_every_bpf_call("native", "skb", Fault::Kill);
}

/// A restart whose bpf() calls fail one at a time (LINK_UPDATE included)
/// never detaches the filter, and one that fails changes nothing.
#[test]
fn restart_failing_at_any_bpf_call_keeps_the_old_filter() {
    restart_with_a_fault_at_every_bpf_call("native", "native", Fault::Fail);
}

/// A pinned link whose interface was removed holds nothing: the next start
/// on the interface of the same name deletes that pin and attaches afresh.
#[test]
fn a_pin_whose_interface_is_gone_is_replaced_by_a_fresh_attach() {
    require_root();
    let tag = smtpguard_tests::netns::unique_tag();
    let ns = Netns::new("dead", &tag);
    let interface = format!("sgd{tag}");
    let peer = format!("sgd{tag}p");
    // A veth pair inside the namespace (no module beyond the veth the
    // other tests use); deleting one end deletes both.
    let add = || {
        ns.ip(&[
            "link", "add", &interface, "type", "veth", "peer", "name", &peer,
        ]);
        ns.ip(&["link", "set", &interface, "up"]);
    };
    add();
    let bpffs = PrivateBpffs::mount();
    let pin_dir = bpffs.pin_dir();
    let mut crashed = ns.command(env!("CARGO_BIN_EXE_attach-and-crash"));
    crashed
        .args([&pin_dir, &interface, "2525", "203.0.113.0/24", "skb"])
        .stdout(std::process::Stdio::piped());
    let out = smtpguard_tests::run_bounded(crashed, Duration::from_secs(60)).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("attached skb"),
        "{out:?}"
    );
    ns.ip(&["link", "del", &interface]);
    add();
    assert_eq!(ns.xdp_programs(&interface), 0);
    let dead = pins(&pin_dir);
    assert_eq!(dead.len(), 1, "the dead link's pin: {dead:?}");

    let (mut filter, _sync, _stats) = XdpFilter::load().unwrap();
    let attachment = ns
        .enter(|| filter.attach_pinned(&interface, AttachMode::Skb, std::path::Path::new(&pin_dir)))
        .unwrap();
    assert!(!attachment.replaced_pinned, "{attachment:?}");
    let program = attached_program(&ns, &interface);
    let now = pins(&pin_dir);
    assert!(
        ns.xdp_programs(&interface) == 1
            && matches!(&now[..], [(_, Some(p))] if Some(p.program) == program && Some(p) != dead[0].1.as_ref()),
        "attached {program:?}, pins {now:?}, before {dead:?}"
    );
    drop(filter);
    assert_eq!(ns.xdp_programs(&interface), 0, "detached at a clean stop");
}
