//! A SYN flood over a veth pair: from the `net` namespace, a packet socket
//! sends a fixed number of SYNs from denied sources to the gateway's SMTP
//! port; in `gw`, one filter at a time drops them, with a listener behind.
//! Figures: SYNs dropped per second (from the filter's own counter) and CPU
//! per SYN (the sender thread, which with tick accounting also carries the
//! softirq receive path it triggers, plus any deferred `ksoftirqd` time).
//!
//! On a veth every frame is an skb before any hook sees it, so native XDP
//! has no head start on nftables here; the live-frames figure of the
//! kernel section is the one that shows the XDP path itself.

use std::{
    cell::RefCell,
    net::{Ipv4Addr, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use aya::programs::XdpMode;
use smtpguard::kernel::{ApplyHow, AttachMode, MapSync, Stats, XdpFilter};
use smtpguard_common::{Enforcement, Mode};

use super::{
    lists::{self, List},
    nft::{self, Hook},
    programs::XdpFilterPeer,
    report::{thousands, Figure, Measured, Row},
    sender::{self, Macs, PacketSocket},
    stats::{median_of_rounds, Round, Sample},
    why, Settings,
};
use smtpguard_tests::netns::{Topology, GW_V4};

/// The gateway's SMTP port in this section.
const PORT: u16 = 2525;
/// The production default of `xdp.log_rate_per_second`.
const DEFAULT_LOG_RATE: u32 = 10;

/// What filters the flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Guard {
    /// smtpguard's program, native or skb mode, with drop logging at this
    /// many events per second per CPU (0: off).
    Smtpguard(AttachMode, u32),
    /// xdp-filter's program (aya-loaded), native mode.
    XdpFilter,
    /// An nftables drop rule on the same list.
    Nft(Hook),
    /// Nothing: the listener handles every SYN.
    None,
}

impl Guard {
    fn label(self) -> String {
        match self {
            Guard::Smtpguard(AttachMode::Native, 0) => "smtpguard native XDP".into(),
            Guard::Smtpguard(AttachMode::Native, rate) => {
                format!(
                    "smtpguard native XDP, drop logging at {rate}/s per CPU (production default)"
                )
            }
            Guard::Smtpguard(_, 0) => "smtpguard skb-mode XDP".into(),
            Guard::Smtpguard(_, rate) => {
                format!("smtpguard skb-mode XDP, drop logging at {rate}/s per CPU")
            }
            Guard::XdpFilter => "xdp-filter native XDP (exact addresses)".into(),
            Guard::Nft(hook) => hook.label().into(),
            Guard::None => "no filter (listener; SYNs handled)".into(),
        }
    }
}

/// One round's outcome.
#[derive(Clone, Copy, Debug)]
struct Outcome {
    /// Dropped (or, without a filter, handled) per second.
    per_second: f64,
    /// CPU nanoseconds per packet.
    cpu_ns: f64,
}

/// A filter in force on the gateway's interface until dropped.
enum Active {
    /// Program and maps stay alive (and attached) as long as this value.
    Smtpguard {
        _filter: Box<XdpFilter>,
        _sync: Box<MapSync>,
        stats: Stats,
    },
    XdpFilter(XdpFilterPeer),
    Nft(Hook),
    None,
}

struct Bed {
    topo: Topology,
    frames: Vec<Vec<u8>>,
    list: List,
    packets: usize,
}

impl Bed {
    fn new(settings: &Settings) -> Result<Bed> {
        let topo = Topology::new();
        // A default route, so SYN-ACKs to the flood's sources leave as on
        // a real gateway, and no reverse-path filter.
        topo.gw.ip(&["route", "add", "default", "via", "192.0.2.2"]);
        let out = topo
            .gw
            .command("sysctl")
            .args(["-qw", "net.ipv4.conf.all.rp_filter=0"])
            .status()?;
        if !out.success() {
            bail!("sysctl rp_filter in the gateway namespace failed");
        }
        let macs = Macs::net_to_gw(&topo)?;
        let list = lists::generated_v4(settings.flood_prefixes);
        // 1,024 frames from denied sources (network addresses of prefixes)
        // and different source ports, cycled.
        let gw: Ipv4Addr = GW_V4.parse().unwrap();
        let frames = list
            .prefixes
            .iter()
            .cycle()
            .take(1024)
            .enumerate()
            .map(|(i, p)| match p.network() {
                std::net::IpAddr::V4(src) => {
                    sender::syn_frame(macs, src, gw, 1024 + i as u16, PORT, i as u32)
                }
                std::net::IpAddr::V6(_) => unreachable!("IPv4 list"),
            })
            .collect();
        Ok(Bed {
            topo,
            frames,
            list,
            packets: settings.flood_packets,
        })
    }

    fn activate(&self, guard: Guard) -> Result<Active> {
        let gw_if = self.topo.gw_if.as_str();
        Ok(match guard {
            Guard::Smtpguard(mode, log_rate) => {
                let (mut xdp, mut sync, stats) = XdpFilter::load()?;
                sync.apply(&self.list.rules(), ApplyHow::Atomic)?;
                sync.set_runtime(
                    Mode::AcceptAllExceptDeny,
                    Enforcement::Enforce,
                    &[PORT],
                    log_rate,
                )?;
                self.topo.gw.enter(|| xdp.attach(gw_if, mode))?;
                Active::Smtpguard {
                    _filter: Box::new(xdp),
                    _sync: Box::new(sync),
                    stats,
                }
            }
            Guard::XdpFilter => {
                let mut peer = XdpFilterPeer::load(&self.list.exact_addresses())?;
                self.topo
                    .gw
                    .enter(|| peer.program.attach(gw_if, XdpMode::Driver))?;
                Active::XdpFilter(peer)
            }
            Guard::Nft(hook) => {
                nft::available()?;
                nft::load(
                    &self.topo.gw,
                    &nft::table_script(&self.list, hook, gw_if, Some(PORT)),
                )?;
                Active::Nft(hook)
            }
            Guard::None => Active::None,
        })
    }

    fn dropped(&self, active: &Active) -> Result<Option<u64>> {
        Ok(match active {
            Active::Smtpguard { stats, .. } => Some(stats.counters().dropped()),
            Active::XdpFilter(peer) => Some(peer.dropped()?),
            Active::Nft(hook) => Some(nft::dropped(&self.topo.gw, *hook)?),
            Active::None => None,
        })
    }

    fn deactivate(&self, active: Active) {
        if let Active::Nft(hook) = active {
            let family = match hook {
                Hook::NetdevIngress => "netdev",
                Hook::InetPrerouting => "inet",
            };
            let _ = nft::command(&self.topo.gw, &["delete", "table", family, nft::TABLE]);
        }
        // XDP programs detach when their last reference goes.
    }

    /// Sends the flood once through `active`.
    fn round(&self, active: &Active) -> Result<Outcome> {
        let before = self.dropped(active)?;
        let soft_before = sender::ksoftirqd_cpu_seconds();
        let (sent, seconds, cpu) = std::thread::scope(|s| {
            s.spawn(|| {
                self.topo.net.enter(|| -> Result<(usize, f64, f64)> {
                    let sock = PacketSocket::sender(&self.topo.net_if)?;
                    let cpu0 = sender::thread_cpu_seconds();
                    let t0 = Instant::now();
                    let sent = sock.send_cycle(&self.frames, self.packets)?;
                    let seconds = t0.elapsed().as_secs_f64();
                    Ok((sent, seconds, sender::thread_cpu_seconds() - cpu0))
                })
            })
            .join()
            .expect("sender thread")
        })?;
        let cpu = cpu + (sender::ksoftirqd_cpu_seconds() - soft_before);
        let handled = match (before, self.dropped(active)?) {
            (Some(b), Some(a)) => a - b,
            _ => sent as u64,
        };
        if handled < sent as u64 * 9 / 10 {
            bail!("only {handled} of {sent} SYNs were dropped");
        }
        Ok(Outcome {
            per_second: handled as f64 / seconds,
            cpu_ns: cpu * 1e9 / handled as f64,
        })
    }
}

/// Accepts and closes connections on a listener until dropped.
struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Acceptor {
    fn spawn(listener: TcpListener) -> Result<Acceptor> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => drop(conn),
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    }
                }
            })
        };
        Ok(Acceptor {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the section.
pub fn run(settings: &Settings) -> Result<Vec<Row>> {
    let bed = Bed::new(settings)?;
    // A listener behind the filters, accepting and closing.
    let listener = bed
        .topo
        .gw
        .enter(|| TcpListener::bind((GW_V4, PORT)))
        .context("listening on the gateway")?;
    let acceptor = Acceptor::spawn(listener)?;
    // smtpguard first (logging off, then at the production default).
    let ours = 3;
    let filters = [
        Guard::Smtpguard(AttachMode::Native, 0),
        Guard::Smtpguard(AttachMode::Skb, 0),
        Guard::Smtpguard(AttachMode::Native, DEFAULT_LOG_RATE),
        Guard::Nft(Hook::NetdevIngress),
        Guard::Nft(Hook::InetPrerouting),
        Guard::XdpFilter,
        Guard::None,
    ];
    let mut results: Vec<Result<Sample2, String>> = Vec::new();
    for guard in filters {
        eprintln!("bench:   flood through {}", guard.label());
        results.push(why(measure(&bed, guard, settings.flood_rounds)));
    }
    drop(acceptor);
    let what = |metric: &str, mode: &str| {
        format!(
            "flood: {} SYNs from denied sources over a veth, {} on the list, {mode}: {metric}",
            thousands(bed.packets),
            bed.list.label
        )
    };
    let figure_of = |r: &Result<Sample2, String>, rate: bool| -> Measured {
        r.as_ref()
            .map(|s| {
                if rate {
                    Figure::rate(&s.rate, "")
                } else {
                    Figure::sample(&s.cpu, "ns", 0)
                }
            })
            .map_err(Clone::clone)
    };
    let mut rows = Vec::new();
    for (i, mode) in filters[..ours].iter().map(|f| f.label()).enumerate() {
        for (rate, metric) in [
            (true, "SYNs dropped per second"),
            (false, "CPU per SYN (sender + softirq)"),
        ] {
            let baselines = filters[ours..]
                .iter()
                .zip(&results[ours..])
                .map(|(f, r)| (f.label(), figure_of(r, rate)))
                .collect();
            rows.push(Row::new(
                what(metric, &mode),
                figure_of(&results[i], rate),
                baselines,
                "report",
            ));
        }
    }
    Ok(rows)
}

/// Medians of both figures of a configuration.
#[derive(Clone, Copy, Debug)]
struct Sample2 {
    rate: Sample,
    cpu: Sample,
}

/// Sets `guard` up, floods `rounds` times, takes it down.
fn measure(bed: &Bed, guard: Guard, rounds: usize) -> Result<Sample2> {
    let active = bed.activate(guard)?;
    // The rate goes through the median helper; the CPU figure of the same
    // rounds is collected beside it.
    let cpu = RefCell::new(Vec::new());
    let rate = {
        let contender: Round<'_, String> = Box::new(|| {
            let o = why(bed.round(&active))?;
            cpu.borrow_mut().push(o.cpu_ns);
            Ok(o.per_second)
        });
        median_of_rounds(rounds, vec![contender])
    };
    bed.deactivate(active);
    let rate = rate
        .into_iter()
        .next()
        .expect("one contender")
        .map_err(anyhow::Error::msg)?;
    Ok(Sample2 {
        rate,
        cpu: Sample::of(cpu.into_inner()),
    })
}
