//! Screening and automatic bans (#16), the daemon (release build) with
//! native XDP on the gateway's veth:
//!
//! - time to the `220` for a client in the pass cache (`greet_wait` on),
//!   beside the same with `greet_wait` off: the cache must cost nothing;
//! - ban-to-first-drop: from an early talk (the violation, `ban_after =
//!   1`) to the first SYN of the same client that XDP drops, beside the
//!   time from the violation to the violating session's close (its greet
//!   wait, then `554` for its now banned address). Goal: the ban is in the
//!   kernel before the violating session is closed.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use smtpguard_tests::netns::{Netns, Topology, GW_V4};

use super::{
    daemon::Daemon,
    report::{Figure, Row},
    stats::Sample,
    Settings, TempDir,
};

/// The gateway's SMTP port in this section.
const PORT: u16 = 2525;
/// The client whose greetings are timed.
const CLIENT: &str = "198.51.100.10";

fn config(dir: &std::path::Path, interface: &str, screening: &str) -> String {
    smtpguard::testing::config_text(
        dir,
        dst(),
        &[
            ("xdp", &xdp_native(interface)),
            ("logging", "stats_interval = \"0s\"\n"),
            ("screening", &format!("{screening}\n")),
            ("bans", "ban_after = 1\nban_for = \"1h\"\n"),
        ],
    )
}

/// The `[xdp]` lines of the bench daemons: native mode on `interface`,
/// drop logging off.
pub fn xdp_native(interface: &str) -> String {
    format!("interfaces = [\"{interface}\"]\nmode = \"native\"\nlog_rate_per_second = 0\n")
}

fn dst() -> SocketAddr {
    format!("{GW_V4}:{PORT}").parse().unwrap()
}

/// Greeting times in milliseconds, one connection after another.
fn greetings(topo: &Topology, count: usize) -> Result<Vec<f64>> {
    (0..count)
        .map(|_| {
            let started = Instant::now();
            let greeting = topo
                .net
                .connect_from(CLIENT, dst(), Duration::from_secs(10))
                .context("client")?;
            anyhow::ensure!(greeting.starts_with("220 "), "no greeting: {greeting:?}");
            Ok(started.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
}

/// A connection from `src` in `ns`, or the error (`TimedOut`: the SYN was
/// dropped).
fn connect(ns: &Netns, src: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    ns.enter(|| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(src.parse().unwrap(), 0).into())?;
        socket.connect_timeout(&dst().into(), timeout)?;
        Ok(socket.into())
    })
}

/// One round: `talker` talks early; returns (ms to the first dropped SYN,
/// ms to the violating session's close).
fn ban_round(topo: &Topology, talker: &str) -> Result<(f64, f64)> {
    let mut violating = connect(&topo.net, talker, Duration::from_secs(2))?;
    violating.set_read_timeout(Some(Duration::from_secs(10)))?;
    // The 220- line says the wait began; the talk is then a PREGREET.
    let mut line = [0u8; 128];
    let _ = violating.read(&mut line).context("the 220- line")?;
    let t0 = Instant::now();
    violating.write_all(b"EHLO early.example\r\n")?;
    // New SYNs until one is dropped: its send time is the first drop.
    let deadline = t0 + Duration::from_secs(10);
    let first_drop = loop {
        anyhow::ensure!(Instant::now() < deadline, "no SYN of {talker} was dropped");
        let sent = Instant::now();
        match connect(&topo.net, talker, Duration::from_millis(200)) {
            Ok(conn) => drop(conn),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break sent,
            Err(e) => return Err(e).context("probe"),
        }
    };
    let mut rest = Vec::new();
    let _ = violating.read_to_end(&mut rest);
    let closed = Instant::now();
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    Ok((ms(first_drop), ms(closed)))
}

/// The section's rows.
pub fn run(settings: &Settings) -> Result<Vec<Row>> {
    let count = if settings.quick { 100 } else { 500 };
    let rounds = if settings.quick { 5 } else { 20 };
    let topo = Topology::new();
    topo.add_client(CLIENT);
    let talkers: Vec<String> = (1..=rounds).map(|i| format!("203.0.113.{i}")).collect();
    for t in &talkers {
        topo.add_client(t);
    }

    // Greet wait off.
    let dir = TempDir::try_new("screening-off")?;
    let mut daemon = Daemon::start(
        Some(&topo.gw),
        dir.path(),
        &config(dir.path(), &topo.gw_if, "greet_wait = \"0s\""),
    )?;
    let off = Sample::of(greetings(&topo, count).context("greet_wait off")?);
    daemon.stop();

    // Greet wait on; the client passes once, then is in the cache.
    let dir = TempDir::try_new("screening-on")?;
    let mut daemon = Daemon::start(
        Some(&topo.gw),
        dir.path(),
        &config(
            dir.path(),
            &topo.gw_if,
            "greet_wait = \"1s\"\ngreet_action = \"ignore\"",
        ),
    )?;
    // It passes once: reads the whole greeting before it says anything.
    let mut first = connect(&topo.net, CLIENT, Duration::from_secs(2))?;
    first.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut greeting = Vec::new();
    while !greeting.windows(6).any(|w| w == b"\r\n220 ") {
        let mut buf = [0u8; 256];
        let n = first.read(&mut buf).context("the first greeting")?;
        anyhow::ensure!(
            n > 0,
            "no greeting: {:?}",
            String::from_utf8_lossy(&greeting)
        );
        greeting.extend_from_slice(&buf[..n]);
    }
    first.write_all(b"QUIT\r\n")?;
    drop(first);
    let cached = Sample::of(greetings(&topo, count).context("in the pass cache")?);

    let mut to_drop = Vec::new();
    let mut to_close = Vec::new();
    for t in &talkers {
        let (drop_ms, close_ms) =
            ban_round(&topo, t).with_context(|| format!("ban round of {t}"))?;
        to_drop.push(drop_ms);
        to_close.push(close_ms);
    }
    daemon.stop();

    Ok(vec![
        Row::new(
            format!(
                "time to the 220 greeting for a client in the pass cache, greet_wait 1s (median of {count}), native XDP"
            ),
            Ok(Figure::sample(&cached, "ms", 2)),
            vec![(
                "greet_wait off".into(),
                Ok(Figure::sample(&off, "ms", 2)),
            )],
            "≈ 1×",
        ),
        Row::new(
            format!(
                "ban-to-first-drop: from an early talk (ban_after 1) to the first SYN of the client XDP drops \
                 (median of {rounds} clients; probe SYNs back to back)"
            ),
            Ok(Figure::sample(&Sample::of(to_drop), "ms", 1)),
            vec![(
                "the violating session's close (greet_wait 1s, then 554 to its banned address)".into(),
                Ok(Figure::sample(&Sample::of(to_close), "ms", 1)),
            )],
            "< 1×",
        ),
    ])
}
