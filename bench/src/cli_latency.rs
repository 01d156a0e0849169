//! From a list change returning to the first dropped SYN: the daemon with
//! native XDP on the gateway's veth and the flood's list loaded, then
//! `smtpguard deny add ADDR`; the same with an nftables set holding the
//! same list and `nft add element`.
//!
//! How "dropped" is seen: from `net`, a SYN every 50 µs from ADDR, each
//! with its own sequence number; a packet socket in `net` collects the
//! gateway's SYN-ACKs. The first SYN never answered (all later ones
//! unanswered too) is the first dropped; its send time is compared with
//! the moment the command returned.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use super::{
    daemon::Daemon,
    lists::{self, List},
    nft::{self, Hook},
    report::{Figure, Measured, Row},
    sender::{self, Macs, PacketSocket},
    why, Settings, TempDir,
};
use smtpguard_tests::netns::{Topology, GW_V4};

/// The gateway's SMTP port in this section.
const PORT: u16 = 2525;
/// The address added to the deny list: on no list before.
const SOURCE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
/// One SYN per this interval.
const INTERVAL: Duration = Duration::from_micros(50);
/// SYNs keep coming this long before and after the command.
const MARGIN: Duration = Duration::from_millis(150);

/// What one probe saw.
struct Probe {
    /// How long the command took.
    command: Duration,
    /// Send time of the first dropped SYN minus the command's return
    /// (negative: already dropped before it returned), seconds.
    first_drop: f64,
}

/// Floods `SOURCE`'s SYNs while `change` runs; see the module docs.
fn probe(topo: &Topology, macs: Macs, change: impl FnOnce() -> Result<()>) -> Result<Probe> {
    let stop_sending = AtomicBool::new(false);
    let stop_receiving = AtomicBool::new(false);
    let gw: Ipv4Addr = GW_V4.parse().unwrap();
    std::thread::scope(|s| -> Result<Probe> {
        // Whatever happens below (an error, a panic), the threads stop,
        // or the scope would wait for them forever.
        let _stop = StopOnDrop([&stop_sending, &stop_receiving]);
        let receiver = s.spawn(|| {
            topo.net.enter(|| -> Result<Vec<u32>> {
                let sock = PacketSocket::receiver(&topo.net_if, Duration::from_millis(10))?;
                let mut answered = Vec::new();
                let mut buf = vec![0u8; 2048];
                while !stop_receiving.load(Ordering::Relaxed) {
                    if let Some(n) = sock.recv(&mut buf)? {
                        if let Some(ack) = syn_ack_from(&buf[..n], gw) {
                            answered.push(ack.wrapping_sub(1));
                        }
                    }
                }
                Ok(answered)
            })
        });
        let sender = s.spawn(|| {
            topo.net.enter(|| -> Result<Vec<Instant>> {
                let sock = PacketSocket::sender(&topo.net_if)?;
                let mut sent = Vec::new();
                let start = Instant::now();
                while !stop_sending.load(Ordering::Relaxed) {
                    let i = sent.len() as u32;
                    let frame =
                        sender::syn_frame(macs, SOURCE, gw, 1024 + (i % 60_000) as u16, PORT, i);
                    sent.push(Instant::now());
                    sock.send(&frame)?;
                    let next = start + INTERVAL * (i + 1);
                    while Instant::now() < next {
                        std::hint::spin_loop();
                    }
                }
                Ok(sent)
            })
        });
        std::thread::sleep(MARGIN);
        let called = Instant::now();
        let changed = change();
        let returned = Instant::now();
        std::thread::sleep(MARGIN);
        stop_sending.store(true, Ordering::Relaxed);
        let sent = sender.join().expect("sender thread");
        std::thread::sleep(Duration::from_millis(50));
        stop_receiving.store(true, Ordering::Relaxed);
        let answered = receiver.join().expect("receiver thread")?;
        changed?;
        let sent = sent?;
        let last_answered = answered
            .iter()
            .copied()
            .filter(|i| (*i as usize) < sent.len())
            .max()
            .context("no SYN was answered, before or after the change")?
            as usize;
        if sent[last_answered] < called - MARGIN / 2 {
            bail!("SYNs went unanswered long before the change");
        }
        let Some(first_dropped) = sent.get(last_answered + 1) else {
            bail!("no SYN was dropped after the change");
        };
        let first_drop = if *first_dropped >= returned {
            (*first_dropped - returned).as_secs_f64()
        } else {
            -(returned - *first_dropped).as_secs_f64()
        };
        Ok(Probe {
            command: returned - called,
            first_drop,
        })
    })
}

/// Raises its flags when dropped.
struct StopOnDrop<'a>([&'a AtomicBool; 2]);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        for flag in self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// The acknowledgement number of a SYN-ACK from `gw`'s SMTP port.
fn syn_ack_from(frame: &[u8], gw: Ipv4Addr) -> Option<u32> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        return None;
    };
    let Some(TransportSlice::Tcp(tcp)) = p.transport else {
        return None;
    };
    (ip.header().source_addr() == gw && tcp.source_port() == PORT && tcp.syn() && tcp.ack())
        .then(|| tcp.acknowledgment_number())
}

fn daemon_config(dir: &std::path::Path, interface: &str) -> String {
    let d = dir.display();
    format!(
        r#"
[server]
hostname = "gw.bench.example"
listen = ["{GW_V4}:{PORT}"]
[policy]
deny_list = "{d}/deny.list"
permit_list = "{d}/permit.list"
[xdp]
interfaces = ["{interface}"]
mode = "native"
[delivery]
spool_dir = "{d}/spool"
[control]
socket = "{d}/control.sock"
[logging]
level = "warn"
[screening]
greet_wait = "0s"
"#
    )
}

fn with_smtpguard(topo: &Topology, macs: Macs, list: &List) -> Result<Probe> {
    let dir = TempDir::try_new("cli")?;
    let text: String = list.prefixes.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(dir.path().join("deny.list"), text)?;
    let daemon = Daemon::start(
        Some(&topo.gw),
        dir.path(),
        &daemon_config(dir.path(), &topo.gw_if),
    )?;
    let source = SOURCE.to_string();
    probe(topo, macs, || daemon.cli_ok(&["deny", "add", &source]))
}

fn with_nft(topo: &Topology, macs: Macs, list: &List) -> Result<Probe> {
    nft::available()?;
    nft::load(
        &topo.gw,
        &nft::table_script(list, Hook::InetPrerouting, "", Some(PORT)),
    )?;
    let _listener = topo
        .gw
        .enter(|| std::net::TcpListener::bind((GW_V4, PORT)))?;
    let element = format!("{{ {SOURCE} }}");
    let result = probe(topo, macs, || {
        nft::command(
            &topo.gw,
            &["add", "element", "inet", nft::TABLE, "deny", &element],
        )
        .map(|_| ())
    });
    let _ = nft::command(&topo.gw, &["delete", "table", "inet", nft::TABLE]);
    result
}

/// Runs the section.
pub fn run(settings: &Settings) -> Result<Vec<Row>> {
    let list = lists::generated_v4(settings.flood_prefixes);
    let topo = Topology::new();
    let macs = Macs::net_to_gw(&topo)?;
    let ours = why(with_smtpguard(&topo, macs, &list));
    let nft = why(with_nft(&topo, macs, &list));
    let command = |p: &Result<Probe, String>| -> Measured {
        p.as_ref()
            .map(|p| {
                let ms = p.command.as_secs_f64() * 1e3;
                Figure::new(ms, format!("{ms:.1} ms"))
            })
            .map_err(Clone::clone)
    };
    let first = |p: &Result<Probe, String>| -> Measured {
        p.as_ref()
            .map(|p| {
                let ms = p.first_drop * 1e3;
                let when = if ms <= 0.0 {
                    "before it returned"
                } else {
                    "after it returned"
                };
                // A signed offset has no meaningful ratio.
                Figure::new(f64::NAN, format!("{ms:+.2} ms ({when})"))
            })
            .map_err(Clone::clone)
    };
    let baseline = "nft add element (inet prerouting set, same list)".to_string();
    Ok(vec![
        Row::new(
            format!(
                "`deny add` of one address with {} listed: time until the command returns",
                list.label
            ),
            command(&ours),
            vec![(baseline.clone(), command(&nft))],
            "report",
        ),
        Row::new(
            format!(
                "first dropped SYN relative to the command returning (a SYN every {} µs)",
                INTERVAL.as_micros()
            ),
            first(&ours),
            vec![(baseline, first(&nft))],
            "≤ 0: in force when the command returns",
        ),
    ])
}
