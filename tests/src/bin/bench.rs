//! `cargo xtask bench`: smtpguard's figures beside baselines measured the
//! same way in the same run. Prints a markdown table and writes it to
//! `bench/RESULTS.md`. Nothing here is a pass/fail timer.
//!
//! Usage: `bench [--quick] [--out PATH]`.

use std::{fmt::Write as _, time::Instant};

use aya::{
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use ipnet::{IpNet, Ipv4Net};
use rand::{rngs::StdRng, Rng, SeedableRng};
use smtpguard::kernel::{embedded_object, ApplyHow, XdpFilter};
use smtpguard_common::{Action, Enforcement, Mode};
use smtpguard_tests::{packet, require_root};

/// One row of the results table.
struct Row {
    what: String,
    ours: String,
    baseline: String,
    ratio: String,
    goal: String,
}

/// Median and spread of per-packet nanoseconds over rounds.
struct Sample {
    median: f64,
    min: f64,
    max: f64,
}

impl Sample {
    fn of(mut v: Vec<f64>) -> Sample {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Sample {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    fn show(&self) -> String {
        format!("{:.1} ns ({:.1}–{:.1})", self.median, self.min, self.max)
    }
}

struct Settings {
    repeat: u32,
    rounds: usize,
    sizes: Vec<usize>,
}

/// Per-packet time of `run` (which returns the kernel's mean ns per run), over rounds.
fn measure(settings: &Settings, mut run: impl FnMut(u32) -> u64) -> Sample {
    run(1000); // warm up
    Sample::of(
        (0..settings.rounds)
            .map(|_| run(settings.repeat) as f64)
            .collect(),
    )
}

/// `n` IPv4 prefixes, seeded: 70% /32, 25% /24, 5% /12–/22, outside the
/// documentation ranges the bench packets come from.
fn generated_prefixes(n: usize) -> Vec<(IpNet, Action)> {
    let mut rng = StdRng::seed_from_u64(0x5347);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let addr: u32 = rng.random();
        let first = (addr >> 24) as u8;
        // Keep clear of 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24.
        if matches!(first, 192 | 198 | 203) {
            continue;
        }
        let roll: u32 = rng.random_range(0..100);
        let len = match roll {
            0..70 => 32,
            70..95 => 24,
            _ => rng.random_range(12..=22),
        };
        let net = Ipv4Net::new(addr.into(), len).unwrap().trunc();
        out.push((IpNet::V4(net), Action::Deny));
    }
    out
}

fn main() {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out_path = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "bench/RESULTS.md".into());
    let settings = if quick {
        Settings {
            repeat: 200_000,
            rounds: 5,
            sizes: vec![1, 100_000],
        }
    } else {
        Settings {
            repeat: 1_000_000,
            rounds: 9,
            sizes: vec![1, 1_000, 100_000, 1_000_000],
        }
    };

    let mut rows = Vec::new();
    kernel_per_packet(&settings, &mut rows);

    let mut table = String::new();
    writeln!(table, "| what | smtpguard | baseline | ratio | goal |").unwrap();
    writeln!(table, "|---|---|---|---|---|").unwrap();
    for r in &rows {
        writeln!(
            table,
            "| {} | {} | {} | {} | {} |",
            r.what, r.ours, r.baseline, r.ratio, r.goal
        )
        .unwrap();
    }
    println!("{table}");
    let report = format!(
        "# smtpguard bench results\n\n{}\n\nMachine: {}, kernel {}, {} CPUs. Mode: {}.\n\n\
         Per-packet figures are the kernel's own mean over `repeat` runs of one frame \
         (BPF_PROG_TEST_RUN), median of {} rounds with min–max; a single repeated frame \
         is cache-hot and flatters a trie.\n\n{table}",
        now_utc(),
        cpu_model(),
        kernel_release(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        if quick { "--quick" } else { "full" },
        settings.rounds,
    );
    if let Some(dir) = std::path::Path::new(&out_path).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out_path, report).unwrap();
    eprintln!("bench: wrote {out_path}");
}

/// ns/packet through BPF_PROG_TEST_RUN at several list sizes, beside a
/// program that only returns XDP_DROP.
fn kernel_per_packet(settings: &Settings, rows: &mut Vec<Row>) {
    let mut baseline_obj = Ebpf::load(embedded_object()).expect("load object for the baseline");
    let baseline: &mut Xdp = baseline_obj
        .program_mut("smtpguard_drop_all")
        .expect("baseline program in the object")
        .try_into()
        .unwrap();
    baseline.load().unwrap();

    let frames = [
        ("denied IPv4 SYN", packet::syn_v4("203.0.113.9", 25)),
        ("permitted IPv4 SYN", packet::syn_v4("198.51.100.5", 25)),
        (
            "non-SMTP TCP (port 443)",
            packet::syn_v4("198.51.100.5", 443),
        ),
    ];
    let base: Vec<Sample> = frames
        .iter()
        .map(|(_, frame)| {
            measure(settings, |repeat| {
                let mut opts = TestRunOptions::new();
                opts.data_in = Some(frame);
                opts.repeat = repeat;
                baseline.test_run(opts).unwrap().duration.as_nanos() as u64
            })
        })
        .collect();

    for &size in &settings.sizes {
        let (mut filter, mut sync, _stats) = XdpFilter::load().expect("load XDP program");
        let mut rules = generated_prefixes(size.saturating_sub(1));
        rules.push(("203.0.113.0/24".parse().unwrap(), Action::Deny));
        let started = Instant::now();
        sync.apply(&rules, ApplyHow::Atomic).expect("load list");
        let load_time = started.elapsed();
        sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &[25], 0)
            .unwrap();
        for ((name, frame), base) in frames.iter().zip(&base) {
            let want = if name.starts_with("denied") { 1 } else { 2 };
            assert_eq!(
                filter.test_run(frame).unwrap(),
                want,
                "{name}: wrong verdict"
            );
            let ours = measure(settings, |repeat| {
                filter.test_run_repeat(frame, repeat).unwrap().1
            });
            rows.push(Row {
                what: format!("{name}, {size} IPv4 prefixes (ns/packet)"),
                ours: ours.show(),
                baseline: format!("XDP_DROP only: {}", base.show()),
                ratio: format!("{:.2}×", ours.median / base.median),
                goal: if *name == "denied IPv4 SYN" && size == 1_000_000 {
                    "≤ 1.5×".into()
                } else {
                    "report".into()
                },
            });
        }
        rows.push(Row {
            what: format!("load {size} IPv4 prefixes into the kernel (atomic)"),
            ours: format!("{:.2} s", load_time.as_secs_f64()),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: if size == 1_000_000 {
                "< 5 s".into()
            } else {
                "report".into()
            },
        });
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
