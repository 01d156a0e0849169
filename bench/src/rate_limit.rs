//! The per-client SYN rate limiter's cost in the XDP program (#16):
//! `BPF_PROG_TEST_RUN` on one loaded program whose limiter is switched on
//! and off between measurements, so both figures see the same maps, list
//! and caches. Rows: a denied SYN (the limiter must cost it nothing: it is
//! charged only after a pass verdict), a passing SYN from one flooding
//! source (after the first `syns_per_minute`, each is over the limit), and
//! passing SYNs from scattered new sources (each one a new bucket).

use std::{cell::RefCell, net::IpAddr};

use anyhow::{Context as _, Result};
use smtpguard::kernel::{ApplyHow, MapSync, RateLimitSettings, RateLimiter, XdpFilter};
use smtpguard_common::{Enforcement, Mode};
use smtpguard_tests::packet::{self, ethertype, V4Opts};

use super::{
    lists,
    programs::{expect_verdict, memlock_by_name_since, open_map_ids, PacketProgram},
    report::{bytes, Figure, Measured, Row},
    stats::{median_of_rounds, Round, Sample},
    Settings,
};

const PORT: u16 = 25;
const DROP: u32 = 1;
const PASS: u32 = 2;
/// The packaged configuration's `rate_limit.syns_per_minute`.
const LIMIT: u32 = 60;

struct Loaded {
    filter: XdpFilter,
    sync: MapSync,
    limiter: RateLimiter,
}

impl Loaded {
    /// Turns the limiter on (at [`LIMIT`]) or off; with `forget`, every
    /// bucket is deleted first, so each source is a new client again.
    fn limiter(&mut self, on: bool, forget: bool) -> Result<()> {
        if forget {
            self.limiter.sweep(u64::MAX)?;
        }
        let settings = RateLimitSettings {
            syns_per_minute: if on { LIMIT } else { 0 },
            ipv6_prefix: 64,
            exempt_permitted: true,
        };
        self.sync.set_rate_limit(&settings)?;
        Ok(())
    }
}

fn frame_v4(src: std::net::Ipv4Addr) -> Vec<u8> {
    let ip = packet::ipv4(
        src,
        packet::DST_V4,
        6,
        &packet::syn(PORT),
        &V4Opts::default(),
    );
    packet::ethernet(ethertype::IPV4, &[], &ip)
}

/// Runs the section.
pub fn run(settings: &Settings) -> Result<Vec<Row>> {
    let list = lists::generated_v4(if settings.quick { 100_000 } else { 1_000_000 });
    let before = open_map_ids();
    let (mut filter, mut sync, _stats) =
        XdpFilter::load().context("loading smtpguard's XDP program")?;
    let memory = memlock_by_name_since(&before);
    let limiter = filter
        .take_rate_limiter()
        .context("the rate limiter's maps")?;
    sync.apply(&list.rules(), ApplyHow::Atomic)
        .context("loading the list")?;
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[PORT], 0)?;
    let loaded = RefCell::new(Loaded {
        filter,
        sync,
        limiter,
    });
    let IpAddr::V4(denied) = list.denied else {
        anyhow::bail!("an IPv4 list has an IPv4 denied source")
    };
    let IpAddr::V4(permitted) = list.permitted else {
        anyhow::bail!("an IPv4 list has an IPv4 permitted source")
    };
    let denied = frame_v4(denied);
    let flood = frame_v4(permitted);
    // The random half of the distinct batch: sources no entry covers.
    let scattered: Vec<Vec<u8>> = lists::distinct_sources_v4(&list, settings.batch)
        .into_iter()
        .skip(1)
        .step_by(2)
        .map(frame_v4)
        .collect();
    {
        let mut l = loaded.borrow_mut();
        l.limiter(true, true)?;
        let got = l.filter.run(&denied, 1)?.0;
        expect_verdict("smtpguard, limiter on", "denied IPv4 SYN", got, DROP)?;
        let got = l.filter.run(&flood, 1)?.0;
        expect_verdict("smtpguard, limiter on", "first SYN of a client", got, PASS)?;
    }

    let repeat = settings.repeat;
    let one_frame = |frame: &Vec<u8>, on: bool| -> Round<'_, String> {
        let loaded = &loaded;
        let frame = frame.clone();
        Box::new(move || {
            let mut l = loaded.borrow_mut();
            l.limiter(on, false).map_err(|e| format!("{e:#}"))?;
            let (_, ns) = l.filter.run(&frame, repeat).map_err(|e| format!("{e:#}"))?;
            Ok(ns as f64)
        })
    };
    let batch = |on: bool| -> Round<'_, String> {
        let (loaded, frames) = (&loaded, &scattered);
        Box::new(move || {
            let mut l = loaded.borrow_mut();
            l.limiter(on, true).map_err(|e| format!("{e:#}"))?;
            let mut total = 0u64;
            for f in frames {
                let (verdict, ns) = l.filter.run(f, 1).map_err(|e| format!("{e:#}"))?;
                if verdict != PASS {
                    return Err("a scattered source was not passed".into());
                }
                total += ns;
            }
            Ok(total as f64 / frames.len() as f64)
        })
    };
    let rounds = settings.rounds;
    let pair = |what: String, samples: Vec<Result<Sample, String>>, goal: &str| {
        let fig = |s: &Result<Sample, String>| -> Measured {
            s.as_ref()
                .map(|s| Figure::sample(s, "ns", 1))
                .map_err(Clone::clone)
        };
        Row::new(
            what,
            fig(&samples[0]),
            vec![("limiter off".to_string(), fig(&samples[1]))],
            goal,
        )
    };
    let label = &list.label;
    let denied_row = pair(
        format!(
            "rate limiter on ({LIMIT}/min): denied IPv4 SYN, {label} (ns/packet, one frame repeated)"
        ),
        median_of_rounds(
            rounds,
            vec![one_frame(&denied, true), one_frame(&denied, false)],
        ),
        "≤ 1.1× limiter off",
    );
    let flood_row = pair(
        format!(
            "rate limiter on ({LIMIT}/min): SYNs from one unlisted source, {label}: over the \
             limit after the first {LIMIT}, dropped as rate_limit (off: passed) (ns/packet, \
             one frame repeated)"
        ),
        median_of_rounds(
            rounds,
            vec![one_frame(&flood, true), one_frame(&flood, false)],
        ),
        "report",
    );
    let scattered_row = pair(
        format!(
            "rate limiter on ({LIMIT}/min): {} passing SYNs from different unlisted sources, \
             each a new bucket, {label}, each run once (ns/packet)",
            super::report::thousands(scattered.len())
        ),
        median_of_rounds(rounds, vec![batch(true), batch(false)]),
        "report",
    );
    let of = |name: &str| memory.get(name).copied().unwrap_or(0);
    let (table, ring, overflow) = (of("SG_RATE"), of("SG_RATE_EV"), of("SG_RATE_OVF"));
    let table_size = loaded.borrow().limiter.table_size();
    let memory_row = Row::new(
        format!(
            "kernel memory of the rate limiter at the default table_size ({} clients, \
             preallocated hash)",
            super::report::thousands(table_size as usize)
        ),
        Ok(Figure::new(
            (table + ring + overflow) as f64,
            format!(
                "{} (bucket table {}, {:.0} bytes per client; event ring {}; overflow bucket {})",
                bytes((table + ring + overflow) as f64),
                bytes(table as f64),
                table as f64 / f64::from(table_size),
                bytes(ring as f64),
                bytes(overflow as f64)
            ),
        )),
        Vec::new(),
        "report",
    );
    Ok(vec![denied_row, flood_row, scattered_row, memory_row])
}
