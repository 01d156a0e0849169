//! The kernel fast path without a network: `BPF_PROG_TEST_RUN` on built
//! frames, per list. For each list the same prefixes go into smtpguard's
//! maps, into the frozen LPM-trie program (`trie-reference`, the program
//! before #13, so the gain is measured in the same run), into xdp-filter's
//! hash maps (as exact addresses: it has no prefixes) and, for the load
//! figures, into an nftables interval set.
//!
//! Figures per list: ns/packet for each test frame (one frame repeated: the
//! lookup path is cache-hot), ns/packet over a batch of distinct sources
//! (each frame run once: colder), packets per second in live-frames mode,
//! and the time and kernel memory to load the list.

use std::time::Instant;

use anyhow::{Context as _, Result};
use smtpguard::kernel::{ApplyHow, MapSync, XdpFilter};
use smtpguard_common::{Enforcement, Mode};
use smtpguard_tests::trie_reference::TrieReference;

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
/// The production default of `xdp.log_rate_per_second`.
const DEFAULT_LOG_RATE: u32 = 10;

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

/// The lists of this run: the IPv4 sizes, then the IPv6 bogons; with
/// `true`, every row, with `false` only the denied-SYN rows.
fn all_lists(settings: &Settings) -> Vec<(Result<List>, bool)> {
    let mut out: Vec<(Result<List>, bool)> = settings
        .v4_sizes
        .iter()
        .map(|&n| (Ok(lists::generated_v4(n)), true))
        .collect();
    if !settings.v4_sizes.contains(&1_000_000) {
        // --quick still shows the headline figure of #13.
        out.push((Ok(lists::generated_v4(1_000_000)), false));
    }
    out.push((lists::fullbogons_v6(), true));
    out
}

/// Runs the section.
pub fn run(settings: &Settings) -> Result<KernelRows> {
    let mut drop_all = programs::drop_all().context("loading the XDP_DROP baseline")?;
    let mut rows = KernelRows::default();
    for (list, every_row) in all_lists(settings) {
        let list = list?;
        eprintln!("bench:   list: {}", list.label);
        one_list(settings, &list, every_row, &mut drop_all, &mut rows)?;
    }
    Ok(rows)
}

/// smtpguard loaded with `list`, enforcing on port 25.
struct Loaded {
    filter: XdpFilter,
    sync: MapSync,
    seconds: f64,
    /// bytes_memlock of each map the load created, by name.
    memory: std::collections::BTreeMap<String, u64>,
    /// Whether the list is IPv6 (which maps hold it).
    v6: bool,
}

/// Whether a map holds the list, by name: the lookup table of the list's
/// family (preallocated arrays, one set per generation) and the per-entry
/// hit counters. The other family's table, the rate limiter and the log
/// ring are reported beside it.
fn is_list_map(name: &str, v6: bool) -> bool {
    use smtpguard_common::map_names::{
        GROUPS4, GROUPS6, HITS, LEAVES4, LEAVES6, TBL16_V4, TBL16_V6, TBL24,
    };
    let table: &[[&str; 2]] = if v6 {
        &[TBL16_V6, GROUPS6, LEAVES6]
    } else {
        &[TBL16_V4, TBL24, GROUPS4, LEAVES4]
    };
    name == HITS || table.iter().any(|n| n.contains(&name))
}

impl Loaded {
    /// bytes_memlock of the list maps: (generation A, generation B, the
    /// hit counters both share).
    fn list_memory(&self) -> (u64, u64, u64) {
        let of = |pick: &dyn Fn(&str) -> bool| {
            self.memory
                .iter()
                .filter(|(n, _)| is_list_map(n, self.v6) && pick(n))
                .map(|(_, m)| m)
                .sum()
        };
        (
            of(&|n| n.ends_with("_A")),
            of(&|n| n.ends_with("_B")),
            of(&|n| n == smtpguard_common::map_names::HITS),
        )
    }

    /// The other maps, whatever the list size: `(total, "NAME size, ...")`.
    fn fixed_memory(&self) -> (u64, String) {
        let fixed: Vec<(&String, &u64)> = self
            .memory
            .iter()
            .filter(|(n, m)| !is_list_map(n, self.v6) && **m >= 64 * 1024)
            .collect();
        let total = self
            .memory
            .iter()
            .filter(|(n, _)| !is_list_map(n, self.v6))
            .map(|(_, m)| m)
            .sum();
        let named = fixed
            .iter()
            .map(|(n, m)| format!("{n} {}", bytes(**m as f64)))
            .collect::<Vec<_>>()
            .join(", ");
        (total, named)
    }

    fn log_rate(&mut self, rate: u32) -> Result<()> {
        self.sync.set_runtime(
            Mode::AcceptAllExceptDeny,
            Enforcement::Enforce,
            &[PORT],
            rate,
        )?;
        Ok(())
    }
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
        sync,
        seconds,
        memory: programs::memlock_by_name_since(&before),
        v6: list.denied.is_ipv6(),
    })
}

/// The frozen LPM-trie program with `list`, enforcing on port 25.
fn load_reference(list: &List) -> Result<TrieReference> {
    let rules = list.rules();
    let mut reference = std::panic::catch_unwind(|| TrieReference::load(&rules))
        .map_err(|_| anyhow::anyhow!("loading the trie-reference program failed (see stderr)"))?;
    reference.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, PORT, 0);
    Ok(reference)
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
    every_row: bool,
    drop_all: &mut AyaProgram,
    rows: &mut KernelRows,
) -> Result<()> {
    let mut ours = load_smtpguard(list)?;
    let mut old = load_reference(list).map_err(|e| format!("{e:#}"));
    let mut peer = if every_row {
        load_peer(list).map_err(|e| format!("{e:#}"))
    } else {
        Err("left out of --quick's 1M list".to_string())
    };
    let frames = frames(list);
    for f in &frames {
        let (got, _) = ours.filter.run(&f.bytes, 1)?;
        programs::expect_verdict("smtpguard", f.what, got, f.verdict)?;
        if let Ok(old) = &mut old {
            let (got, _) = PacketProgram::run(old, &f.bytes, 1)?;
            programs::expect_verdict("trie-reference", f.what, got, f.verdict)?;
        }
    }
    let mut c = Contenders {
        ours: &mut ours.filter,
        drop_all,
        old: &mut old,
        peer: &mut peer,
    };
    let shown = if every_row { &frames[..] } else { &frames[..1] };
    for f in shown {
        rows.per_packet
            .push(single_frame(settings, list, f, Variant::Plain, &mut c));
    }
    // The same denied SYN with drop logging at the production default:
    // the flood path as production runs it (nearly every event suppressed).
    ours.log_rate(DEFAULT_LOG_RATE)?;
    if let Ok(old) = &mut old {
        old.set_runtime(
            Mode::AcceptAllExceptDeny,
            Enforcement::Enforce,
            PORT,
            DEFAULT_LOG_RATE,
        );
    }
    let mut c = Contenders {
        ours: &mut ours.filter,
        drop_all,
        old: &mut old,
        peer: &mut peer,
    };
    rows.per_packet.push(single_frame(
        settings,
        list,
        &frames[0],
        Variant::Logging(DEFAULT_LOG_RATE),
        &mut c,
    ));
    ours.log_rate(0)?;
    if let Ok(old) = &mut old {
        old.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, PORT, 0);
    }
    let mut c = Contenders {
        ours: &mut ours.filter,
        drop_all,
        old: &mut old,
        peer: &mut peer,
    };
    if every_row {
        if !list.is_v6() {
            rows.per_packet.push(distinct_batch(settings, list, &mut c));
        }
        rows.per_packet
            .push(live_frames(settings, list, &frames[0], &mut c));
    }
    if list.prefixes.len() >= 100_000 {
        rows.sync.extend(load_rows(list, &ours, &peer, every_row));
    }
    Ok(())
}

/// The programs every per-packet row measures, in row order.
struct Contenders<'a> {
    ours: &'a mut XdpFilter,
    drop_all: &'a mut AyaProgram,
    old: &'a mut Result<TrieReference, String>,
    peer: &'a mut Peer,
}

/// xdp-filter, or why it is not there.
type Peer = Result<(XdpFilterPeer, f64, u64), String>;

/// The four contenders for one measurement, in row order.
fn contenders<'a>(
    c: &'a mut Contenders<'_>,
    mut measure: impl FnMut(&mut dyn PacketProgram) -> Result<f64> + Clone + 'a,
) -> Vec<Round<'a, String>> {
    let mut m1 = measure.clone();
    let mut m2 = measure.clone();
    let mut m3 = measure.clone();
    let Contenders {
        ours,
        drop_all,
        old,
        peer,
    } = c;
    vec![
        Box::new(move || why(m1(&mut **ours))),
        Box::new(move || why(m2(&mut **drop_all))),
        Box::new(move || match &mut **old {
            Ok(o) => why(m3(o)),
            Err(e) => Err(e.clone()),
        }),
        Box::new(move || match &mut **peer {
            Ok((p, _, _)) => why(measure(&mut p.program)),
            Err(e) => Err(e.clone()),
        }),
    ]
}

/// Names of the baselines, in the order of [`contenders`] after smtpguard.
const BASELINES: [&str; 3] = [
    "XDP_DROP only",
    "old trie program (trie-reference)",
    "xdp-filter (exact addresses)",
];

fn ns_figure(s: &Result<Sample, String>) -> Measured {
    s.as_ref()
        .map(|s| Figure::sample(s, "ns", 1))
        .map_err(Clone::clone)
}

/// The row for `samples` (smtpguard first), with `to_figure` per sample.
/// `notes`: smtpguard's, then one per baseline.
fn row(
    what: String,
    samples: Vec<Result<Sample, String>>,
    to_figure: impl Fn(&Result<Sample, String>) -> Measured,
    notes: [Option<String>; 4],
    goal: &str,
) -> Row {
    let [ours_note, baseline_notes @ ..] = notes;
    let noted = |fig: Measured, note: Option<String>| match note {
        Some(n) => fig.map(|f| f.note(n)),
        None => fig,
    };
    let baselines = BASELINES
        .iter()
        .zip(&samples[1..])
        .zip(baseline_notes)
        .map(|((name, s), note)| (name.to_string(), noted(to_figure(s), note)))
        .collect();
    Row::new(
        what,
        noted(to_figure(&samples[0]), ours_note),
        baselines,
        goal,
    )
}

/// The calling thread's CPU time (user and system), nanoseconds: precise
/// (the scheduler's own clock), and blind to time slices other processes
/// took while the thread waited.
fn thread_cpu_ns() -> Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .context("clock_gettime(CLOCK_THREAD_CPUTIME_ID)")?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// How a per-packet row's setup differs from the plain one.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// Drop logging off.
    Plain,
    /// Drop logging on at this rate (for smtpguard and the old trie
    /// program) instead of off.
    Logging(u32),
}

/// One frame repeated, in `variant`'s setup (already applied).
fn single_frame(
    settings: &Settings,
    list: &List,
    frame: &TestFrame,
    variant: Variant,
    c: &mut Contenders<'_>,
) -> Row {
    let bytes = &frame.bytes;
    // The verdict xdp-filter gives may differ (it filters every port).
    let peer_note = match &mut *c.peer {
        Ok((p, _, _)) => match p.program.run(bytes, 1) {
            Ok((v, _)) if v != frame.verdict => {
                Some(if v == DROP { "drops it" } else { "passes it" }.to_string())
            }
            _ => None,
        },
        Err(_) => None,
    };
    let repeat = settings.repeat;
    // This thread's CPU time over the whole call: the kernel's mean is whole
    // nanoseconds, and wall time would count other processes' time slices.
    let measure = move |p: &mut dyn PacketProgram| -> Result<f64> {
        let started = thread_cpu_ns()?;
        p.run(bytes, repeat)?;
        Ok((thread_cpu_ns()? - started) as f64 / f64::from(repeat))
    };
    // Warm up every contender once before the rounds.
    for mut round in contenders(c, measure) {
        let _ = round();
    }
    let samples = median_of_rounds(settings.rounds, contenders(c, measure));
    // The kernel's own mean (whole nanoseconds, truncated) of one more
    // call each, beside the figure: the same runs by the kernel's clock.
    let kernel_mean =
        move |p: &mut dyn PacketProgram| -> Result<f64> { Ok(p.run(bytes, repeat)?.1 as f64) };
    let mut notes: [Option<String>; 4] = Default::default();
    for (note, mut call) in notes.iter_mut().zip(contenders(c, kernel_mean)) {
        if let Ok(ns) = call() {
            *note = Some(format!("kernel's mean {ns:.0} ns"));
        }
    }
    if let Some(p) = peer_note {
        notes[3] = Some(match notes[3].take() {
            Some(k) => format!("{k}; {p}"),
            None => p,
        });
    }
    let million = list.prefixes.len() >= 1_000_000;
    let goal = match (frame.what, variant) {
        ("denied IPv4 SYN", Variant::Plain) if million => "≤ 1.5× XDP_DROP only",
        ("denied IPv4 SYN", Variant::Logging(_)) if million => "≤ 1.6× XDP_DROP only",
        ("denied IPv6 SYN behind 2 extension headers", Variant::Plain) => "≤ 2× XDP_DROP only",
        _ => "report",
    };
    let logging = match variant {
        Variant::Plain => String::new(),
        Variant::Logging(rate) => {
            format!(", drop logging at {rate}/s per CPU (production default)")
        }
    };
    row(
        format!(
            "{}, {}{logging} (ns/packet, one frame repeated)",
            frame.what, list.label
        ),
        samples,
        ns_figure,
        notes,
        goal,
    )
}

fn distinct_batch(settings: &Settings, list: &List, c: &mut Contenders<'_>) -> Row {
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
    let samples = median_of_rounds(settings.rounds, contenders(c, measure));
    let goal = if list.prefixes.len() >= 1_000_000 {
        "≤ 4× XDP_DROP only; ≥ 3× faster than xdp-filter (ratio ≤ 0.33)"
    } else {
        "report"
    };
    row(
        format!(
            "distinct batch: {} SYNs from different sources (half denied), {}, each run once (ns/packet)",
            super::report::thousands(frames.len()),
            list.label
        ),
        samples,
        ns_figure,
        [None, None, None, None],
        goal,
    )
}

fn live_frames(settings: &Settings, list: &List, frame: &TestFrame, c: &mut Contenders<'_>) -> Row {
    let bytes = &frame.bytes;
    let repeat = settings.live_repeat;
    let measure =
        move |p: &mut dyn PacketProgram| -> Result<f64> { Ok(p.run_live(bytes, repeat)? as f64) };
    let samples = median_of_rounds(settings.rounds, contenders(c, measure));
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
        [None, None, None, None],
        if frame.what == "denied IPv4 SYN" && list.prefixes.len() >= 1_000_000 {
            "≥ 0.7× XDP_DROP only's packets/s"
        } else {
            "report"
        },
    )
}

fn load_rows(list: &List, ours: &Loaded, peer: &Peer, every_row: bool) -> Vec<Row> {
    let million = list.prefixes.len() >= 1_000_000;
    let nft_time: Result<std::time::Duration, String> = if every_row {
        why(nft::available().and_then(|()| nft::load_time(list)))
    } else {
        Err("left out of --quick's 1M list".into())
    };
    let nft_time: Measured = nft_time.map(|d| {
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
    let (list_a, list_b, hits) = ours.list_memory();
    let list_total = list_a + list_b + hits;
    let family = if ours.v6 { "IPv6" } else { "IPv4" };
    let (fixed, fixed_named) = ours.fixed_memory();
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
            if million { "< 1 s" } else { "report" },
        ),
        Row::new(
            format!(
                "kernel memory for {} (bytes_memlock of the {family} table, both \
                 generations, and the hit counters)",
                list.label
            ),
            Ok(Figure::new(
                list_total as f64,
                format!(
                    "{} ({family} table generation A {}, B {}, preallocated whatever \
                     the list; hit counters {}); besides, the other maps: {} ({fixed_named})",
                    bytes(list_total as f64),
                    bytes(list_a as f64),
                    bytes(list_b as f64),
                    bytes(hits as f64),
                    bytes(fixed as f64)
                ),
            )),
            vec![
                ("xdp-filter map".into(), peer_mem),
                (
                    "nftables interval set".into(),
                    Err("the kernel does not report a set's memory".into()),
                ),
            ],
            if million {
                "≤ 256 MiB, both generations"
            } else {
                "report"
            },
        ),
    ]
}
