//! The XDP program attached to a real veth in a network namespace, native
//! and skb mode: denied clients' connect() times out, permitted ones get the
//! greeting, and the counters agree with what was sent.

use std::{
    io::{Read, Write},
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
use socket2::{Domain, Socket, Type};

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

/// Connects from `src` to the gateway inside `ns`; `Ok(greeting)` or the error.
fn connect_from(ns: &Netns, src: &str, timeout: Duration) -> std::io::Result<String> {
    ns.enter(|| {
        let src: std::net::IpAddr = src.parse().unwrap();
        let dst: SocketAddr = if src.is_ipv4() {
            format!("{GW_V4}:{PORT}").parse().unwrap()
        } else {
            format!("[{GW_V6}]:{PORT}").parse().unwrap()
        };
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(src, 0).into())?;
        socket.connect_timeout(&dst.into(), timeout)?;
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
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
