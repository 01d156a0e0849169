//! The kernel fast path without a network: `BPF_PROG_TEST_RUN` on built
//! frames, per list. For each list the same prefixes go into smtpguard's
//! tries, into xdp-filter's hash maps (as exact addresses: it has no
//! prefixes) and, for the load figures, into an nftables interval set.
//!
//! Figures per list: ns/packet for each test frame (one frame repeated: the
//! lookup path is cache-hot), ns/packet over a batch of distinct sources
//! (each frame run once: colder), packets per second in live-frames mode,
//! and the time and kernel memory to load the list.

use std::time::Instant;

use anyhow::{Context as _, Result};
use smtpguard::kernel::{ApplyHow, MapSync, XdpFilter};
use smtpguard_common::{Enforcement, Mode};

use super::{
    lists::{self, List},
    nft,
    programs::{self, AyaProgram, PacketProgram, XdpFilterPeer},
    report::{bytes, Figure, Measured, Row},
    stats::{median_of_rounds, Round, Sample},
    why, Settings,
};
use smtpguard_tests::packet::{self, ethertype, Ext, V4Opts};

/// The guarded SMTP port in the test frames.
const PORT: u16 = 25;
/// `XDP_DROP`, `XDP_PASS`.
const DROP: u32 = 1;
const PASS: u32 = 2;

/// The kernel section's rows, by the table section they go in.
#[derive(Default)]
pub struct KernelRows {
    /// ns/packet for single frames, the distinct batch, live frames.
    pub per_packet: Vec<Row>,
    /// Load time and memory of the lists.
    pub sync: Vec<Row>,
}

/// A test frame and the verdict smtpguard must give it.
struct TestFrame {
    what: &'static str,
    bytes: Vec<u8>,
    verdict: u32,
}

fn frames(list: &List) -> Vec<TestFrame> {
    let syn = packet::syn(PORT);
    match (list.denied, list.permitted) {
        (std::net::IpAddr::V4(denied), std::net::IpAddr::V4(permitted)) => {
            let ip = |src, payload: &[u8]| {
                packet::ipv4(src, packet::DST_V4, 6, payload, &V4Opts::default())
            };
            vec![
                TestFrame {
                    what: "denied IPv4 SYN",
                    bytes: packet::ethernet(ethertype::IPV4, &[], &ip(denied, &syn)),
                    verdict: DROP,
                },
                TestFrame {
                    what: "permitted IPv4 SYN",
                    bytes: packet::ethernet(ethertype::IPV4, &[], &ip(permitted, &syn)),
                    verdict: PASS,
                },
                TestFrame {
                    what: "non-SMTP TCP SYN (port 443) from a denied source",
                    bytes: packet::ethernet(ethertype::IPV4, &[], &ip(denied, &packet::syn(443))),
                    verdict: PASS,
                },
                TestFrame {
                    what: "VLAN-tagged denied IPv4 SYN",
                    bytes: packet::ethernet(ethertype::IPV4, &[ethertype::VLAN], &ip(denied, &syn)),
                    verdict: DROP,
                },
            ]
        }
        (std::net::IpAddr::V6(denied), std::net::IpAddr::V6(permitted)) => {
            let exts = [Ext::HopByHop, Ext::DestOpts];
            let ip = |src| packet::ipv6(src, packet::DST_V6, &exts, 6, &syn);
            vec![
                TestFrame {
                    what: "denied IPv6 SYN behind 2 extension headers",
                    bytes: packet::ethernet(ethertype::IPV6, &[], &ip(denied)),
                    verdict: DROP,
                },
                TestFrame {
                    what: "permitted IPv6 SYN behind 2 extension headers",
                    bytes: packet::ethernet(ethertype::IPV6, &[], &ip(permitted)),
                    verdict: PASS,
                },
            ]
        }
        _ => unreachable!("a list's sources are of one family"),
    }
}

/// The lists of this run: the IPv4 sizes, then the IPv6 bogons.
fn all_lists(settings: &Settings) -> Vec<Result<List>> {
    let mut out: Vec<Result<List>> = settings
        .v4_sizes
        .iter()
        .map(|&n| Ok(lists::generated_v4(n)))
        .collect();
    out.push(lists::fullbogons_v6());
    out
}

/// Runs the section.
pub fn run(settings: &Settings) -> Result<KernelRows> {
    let mut drop_all = programs::drop_all().context("loading the XDP_DROP baseline")?;
    let mut rows = KernelRows::default();
    for list in all_lists(settings) {
        let list = list?;
        eprintln!("bench:   list: {}", list.label);
        one_list(settings, &list, &mut drop_all, &mut rows)?;
    }
    Ok(rows)
}

/// smtpguard loaded with `list`, enforcing on port 25.
struct Loaded {
    filter: XdpFilter,
    _sync: MapSync,
    seconds: f64,
    /// bytes_memlock of the LPM tries (both generations).
    memory: u64,
    /// bytes_memlock of the program's other maps, whatever the list size
    /// (hit counters, verdict counters, config).
    fixed: u64,
}

fn load_smtpguard(list: &List) -> Result<Loaded> {
    let before = programs::open_map_ids();
    let (filter, mut sync, _stats) =
        XdpFilter::load().context("loading smtpguard's XDP program")?;
    let started = Instant::now();
    sync.apply(&list.rules(), ApplyHow::Atomic)
        .context("loading the list")?;
    let seconds = started.elapsed().as_secs_f64();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[PORT], 0)?;
    Ok(Loaded {
        filter,
        _sync: sync,
        seconds,
        memory: programs::memlock_since(&before, Some(programs::MAP_TYPE_LPM_TRIE)),
        fixed: programs::memlock_since(&before, None)
            - programs::memlock_since(&before, Some(programs::MAP_TYPE_LPM_TRIE)),
    })
}

/// xdp-filter with the list's exact addresses, its load time and memory.
fn load_peer(list: &List) -> Result<(XdpFilterPeer, f64, u64)> {
    let before = programs::open_map_ids();
    let addrs = list.exact_addresses();
    let started = Instant::now();
    let peer = XdpFilterPeer::load(&addrs)?;
    let seconds = started.elapsed().as_secs_f64();
    let memory = programs::memlock_since(&before, Some(programs::MAP_TYPE_PERCPU_HASH));
    Ok((peer, seconds, memory))
}

fn one_list(
    settings: &Settings,
    list: &List,
    drop_all: &mut AyaProgram,
    rows: &mut KernelRows,
) -> Result<()> {
    let mut ours = load_smtpguard(list)?;
    let mut peer = load_peer(list).map_err(|e| format!("{e:#}"));
    let frames = frames(list);
    for f in &frames {
        let (got, _) = ours.filter.run(&f.bytes, 1)?;
        programs::expect_verdict("smtpguard", f.what, got, f.verdict)?;
    }
    for f in &frames {
        rows.per_packet.push(single_frame(
            settings,
            list,
            f,
            &mut ours.filter,
            drop_all,
            &mut peer,
        ));
    }
    if !list.is_v6() {
        rows.per_packet.push(distinct_batch(
            settings,
            list,
            &mut ours.filter,
            drop_all,
            &mut peer,
        ));
    }
    rows.per_packet.push(live_frames(
        settings,
        list,
        &frames[0],
        &mut ours.filter,
        drop_all,
        &mut peer,
    ));
    if list.prefixes.len() >= 100_000 {
        rows.sync.extend(load_rows(list, &ours, &peer));
    }
    Ok(())
}

/// xdp-filter, or why it is not there.
type Peer = Result<(XdpFilterPeer, f64, u64), String>;

/// The three contenders for one measurement, in row order.
fn contenders<'a>(
    ours: &'a mut XdpFilter,
    drop_all: &'a mut AyaProgram,
    peer: &'a mut Peer,
    mut measure: impl FnMut(&mut dyn PacketProgram) -> Result<f64> + Clone + 'a,
) -> Vec<Round<'a, String>> {
    let mut m1 = measure.clone();
    let mut m2 = measure.clone();
    vec![
        Box::new(move || why(m1(ours))),
        Box::new(move || why(m2(drop_all))),
        Box::new(move || match peer {
            Ok((p, _, _)) => why(measure(&mut p.program)),
            Err(e) => Err(e.clone()),
        }),
    ]
}

/// Names of the baselines, in the order of [`contenders`] after smtpguard.
const BASELINES: [&str; 2] = ["XDP_DROP only", "xdp-filter (exact addresses)"];

fn ns_figure(s: &Result<Sample, String>) -> Measured {
    s.as_ref()
        .map(|s| Figure::sample(s, "ns", 1))
        .map_err(Clone::clone)
}

/// The row for `samples` (smtpguard first), with `to_figure` per sample.
fn row(
    what: String,
    samples: Vec<Result<Sample, String>>,
    to_figure: impl Fn(&Result<Sample, String>) -> Measured,
    notes: [Option<String>; 2],
    goal: &str,
) -> Row {
    let baselines = BASELINES
        .iter()
        .zip(&samples[1..])
        .zip(notes)
        .map(|((name, s), note)| {
            let fig = to_figure(s);
            let fig = match note {
                Some(n) => fig.map(|f| f.note(n)),
                None => fig,
            };
            (name.to_string(), fig)
        })
        .collect();
    Row::new(what, to_figure(&samples[0]), baselines, goal)
}

fn single_frame(
    settings: &Settings,
    list: &List,
    frame: &TestFrame,
    ours: &mut XdpFilter,
    drop_all: &mut AyaProgram,
    peer: &mut Peer,
) -> Row {
    let bytes = &frame.bytes;
    // The verdict xdp-filter gives may differ (it filters every port).
    let peer_note = match peer {
        Ok((p, _, _)) => match p.program.run(bytes, 1) {
            Ok((v, _)) if v != frame.verdict => {
                Some(if v == DROP { "drops it" } else { "passes it" }.to_string())
            }
            _ => None,
        },
        Err(_) => None,
    };
    let repeat = settings.repeat;
    let measure =
        move |p: &mut dyn PacketProgram| -> Result<f64> { Ok(p.run(bytes, repeat)?.1 as f64) };
    // Warm up every contender once before the rounds.
    for mut c in contenders(ours, drop_all, peer, measure) {
        let _ = c();
    }
    let samples = median_of_rounds(settings.rounds, contenders(ours, drop_all, peer, measure));
    let goal = if frame.what == "denied IPv4 SYN" && list.prefixes.len() >= 1_000_000 {
        "≤ 1.5× XDP_DROP only"
    } else {
        "report"
    };
    row(
        format!(
            "{}, {} (ns/packet, one frame repeated)",
            frame.what, list.label
        ),
        samples,
        ns_figure,
        [None, peer_note],
        goal,
    )
}

fn distinct_batch(
    settings: &Settings,
    list: &List,
    ours: &mut XdpFilter,
    drop_all: &mut AyaProgram,
    peer: &mut Peer,
) -> Row {
    let frames: Vec<Vec<u8>> = lists::distinct_sources_v4(list, settings.batch)
        .into_iter()
        .map(|src| {
            let ip = packet::ipv4(
                src,
                packet::DST_V4,
                6,
                &packet::syn(PORT),
                &V4Opts::default(),
            );
            packet::ethernet(ethertype::IPV4, &[], &ip)
        })
        .collect();
    let frames = &frames;
    let measure = move |p: &mut dyn PacketProgram| -> Result<f64> {
        let mut total = 0u64;
        for f in frames {
            total += p.run(f, 1)?.1;
        }
        Ok(total as f64 / frames.len() as f64)
    };
    let samples = median_of_rounds(settings.rounds, contenders(ours, drop_all, peer, measure));
    row(
        format!(
            "distinct batch: {} SYNs from different sources (half denied), {}, each run once (ns/packet)",
            super::report::thousands(frames.len()),
            list.label
        ),
        samples,
        ns_figure,
        [None, None],
        "report",
    )
}

fn live_frames(
    settings: &Settings,
    list: &List,
    frame: &TestFrame,
    ours: &mut XdpFilter,
    drop_all: &mut AyaProgram,
    peer: &mut Peer,
) -> Row {
    let bytes = &frame.bytes;
    let repeat = settings.live_repeat;
    let measure =
        move |p: &mut dyn PacketProgram| -> Result<f64> { Ok(p.run_live(bytes, repeat)? as f64) };
    let samples = median_of_rounds(settings.rounds, contenders(ours, drop_all, peer, measure));
    // Packets per second on one CPU from ns per frame: higher is better.
    let pps = |s: &Result<Sample, String>| {
        s.as_ref()
            .map(|s| {
                Figure::rate(&s.map_decreasing(|ns| 1e9 / ns), "packets")
                    .note(format!("{:.1} ns/frame", s.median))
            })
            .map_err(Clone::clone)
    };
    row(
        format!(
            "live frames (BPF_F_TEST_XDP_LIVE_FRAMES, batches of {}): {}, {} (packets/s on one CPU)",
            programs::LIVE_BATCH,
            frame.what,
            list.label
        ),
        samples,
        pps,
        [None, None],
        "report",
    )
}

fn load_rows(list: &List, ours: &Loaded, peer: &Peer) -> Vec<Row> {
    let million = list.prefixes.len() >= 1_000_000;
    let nft_time: Measured = why(nft::available().and_then(|()| nft::load_time(list))).map(|d| {
        Figure::new(
            d.as_secs_f64(),
            format!("{:.2} s (nft -f, auto-merge)", d.as_secs_f64()),
        )
    });
    let exact = super::report::thousands(list.exact_addresses().len());
    let peer_time: Measured = peer
        .as_ref()
        .map(|(_, s, _)| Figure::new(*s, format!("{s:.2} s ({exact} exact addresses)")))
        .map_err(Clone::clone);
    let peer_mem: Measured = peer
        .as_ref()
        .map(|(_, _, m)| Figure::new(*m as f64, bytes(*m as f64)))
        .map_err(Clone::clone);
    vec![
        Row::new(
            format!(
                "load {} into the kernel (atomic switch of generations)",
                list.label
            ),
            Ok(Figure::new(ours.seconds, format!("{:.2} s", ours.seconds))),
            vec![
                ("xdp-filter map".into(), peer_time),
                ("nftables interval set".into(), nft_time),
            ],
            if million { "< 5 s" } else { "report" },
        ),
        Row::new(
            format!(
                "kernel memory for {} (bytes_memlock of the list maps)",
                list.label
            ),
            Ok(Figure::new(
                ours.memory as f64,
                format!(
                    "{} in the tries (+ {} fixed: hit counters, counters, config)",
                    bytes(ours.memory as f64),
                    bytes(ours.fixed as f64)
                ),
            )),
            vec![
                ("xdp-filter map".into(), peer_mem),
                (
                    "nftables interval set".into(),
                    Err("the kernel does not report a set's memory".into()),
                ),
            ],
            "report",
        ),
    ]
}
