//! Time to the `220` greeting for a permitted client while a SYN flood
//! from denied sources hits the gateway, beside the same figure without
//! the flood, in the same run: the daemon (release build) with native XDP
//! on the gateway's veth, as in `tests/tests/end_to_end.rs`, which prints
//! the same pair. Goal: at most 2× (the flood must not reach the door).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    daemon::Daemon,
    report::{Figure, Row},
    sender::{self, Macs, PacketSocket},
    stats::Sample,
    Settings, TempDir,
};
use smtpguard_tests::netns::{Topology, GW_V4};

/// The gateway's SMTP port in this section.
const PORT: u16 = 2525;
/// The permitted client whose greetings are timed.
const CLIENT: &str = "198.51.100.10";

/// Greeting times in milliseconds, one connection after another.
fn greetings(topo: &Topology, count: usize) -> Result<Vec<f64>> {
    let dst: SocketAddr = format!("{GW_V4}:{PORT}").parse().unwrap();
    (0..count)
        .map(|_| {
            let started = Instant::now();
            let greeting = topo
                .net
                .connect_from(CLIENT, dst, Duration::from_secs(3))
                .context("permitted client")?;
            anyhow::ensure!(greeting.starts_with("220 "), "no greeting: {greeting:?}");
            Ok(started.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
}

/// The section's one row.
pub fn run(settings: &Settings) -> Result<Vec<Row>> {
    let count = if settings.quick { 200 } else { 1000 };
    let topo = Topology::new();
    topo.add_client(CLIENT);
    let dir = TempDir::try_new("greeting")?;
    let config = smtpguard::testing::config_text(
        dir.path(),
        format!("{GW_V4}:{PORT}").parse().unwrap(),
        &[
            ("server", "max_connections = 1000\n"),
            ("xdp", &super::screening::xdp_native(&topo.gw_if)),
            ("logging", "stats_interval = \"0s\"\n"),
        ],
    );
    let mut daemon = Daemon::start(Some(&topo.gw), dir.path(), &config)?;
    daemon.cli_ok(&["deny", "add", "203.0.113.0/24"])?;

    let quiet = Sample::of(greetings(&topo, count)?);
    let macs = Macs::net_to_gw(&topo)?;
    let gw: Ipv4Addr = GW_V4.parse().unwrap();
    let frames: Vec<Vec<u8>> = (0..254u16)
        .map(|i| {
            sender::syn_frame(
                macs,
                Ipv4Addr::new(203, 0, 113, (i + 1) as u8),
                gw,
                1024 + i,
                PORT,
                u32::from(i),
            )
        })
        .collect();
    let stop = AtomicBool::new(false);
    let (flooded, sent) = std::thread::scope(|s| -> Result<(Vec<f64>, usize)> {
        let flood = s.spawn(|| {
            topo.net.enter(|| -> std::io::Result<usize> {
                let socket = PacketSocket::sender(&topo.net_if)?;
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    sent += socket.send_cycle(&frames, 16_384)?;
                }
                Ok(sent)
            })
        });
        std::thread::sleep(Duration::from_millis(200));
        let measured = greetings(&topo, count);
        stop.store(true, Ordering::Relaxed);
        let sent = flood.join().expect("flood thread").context("flooding")?;
        Ok((measured?, sent))
    })?;
    daemon.stop();
    let flooded = Sample::of(flooded);
    let what = format!(
        "time to the 220 greeting for a permitted client (median of {count}) while denied sources flood SYNs \
         ({} SYNs sent meanwhile), native XDP",
        super::report::thousands(sent)
    );
    Ok(vec![Row::new(
        what,
        Ok(Figure::sample(&flooded, "ms", 2)),
        vec![(
            "the same without the flood".into(),
            Ok(Figure::sample(&quiet, "ms", 2)),
        )],
        "≤ 2×",
    )])
}
