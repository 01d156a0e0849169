//! `cargo xtask bench`: smtpguard's figures beside baselines measured the
//! same way in the same run (see `src/main.rs`). Its own crate, so the
//! privileged test helpers (`smtpguard-tests`: namespaces, frames) are
//! used as they are, not reshaped for it. Sections:
//!
//! - [`kernel`]: ns per packet through `BPF_PROG_TEST_RUN`, a batch of
//!   distinct sources, live-frames packets per second, list load time and
//!   kernel memory; beside a bare `XDP_DROP` program and xdp-filter.
//! - [`flood`]: SYNs from a packet socket over a veth: drops per second and
//!   CPU per drop, XDP (native, skb) beside nftables and no filter.
//! - [`cli_latency`]: from `smtpguard deny add` returning to the first
//!   dropped SYN, beside `nft add element`.
//! - [`front_door`]: the daemon's SMTP front door beside Postfix and HAProxy.
//! - [`rate_limit`]: the per-client SYN rate limiter's cost, on versus off.
//! - [`dnsbl`]: time to the greeting with DNSBL on, cached and off; lookups
//!   per second against a local DNS server.
//!
//! Nothing here is a pass/fail timer: figures are reported, with ratios.

pub mod cli_latency;
pub mod daemon;
pub mod dnsbl;
pub mod fleet;
pub mod flood;
pub mod front_door;
pub mod greeting;
pub mod haproxy;
pub mod kernel;
pub mod lists;
pub mod nft;
pub mod programs;
pub mod rate_limit;
pub mod report;
pub mod screening;
pub mod sender;
pub mod smtp_client;
pub mod stats;

use std::path::{Path, PathBuf};

pub use smtpguard::testing::TempDir;

/// How much of everything to do: `--quick` or the full run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `--quick`.
    pub quick: bool,
    /// Rounds per figure (median and spread are over these).
    pub rounds: usize,
    /// `BPF_PROG_TEST_RUN` repeat per round for one frame.
    pub repeat: u32,
    /// IPv4 list sizes for the kernel figures.
    pub v4_sizes: Vec<usize>,
    /// Distinct frames in the batch figure.
    pub batch: usize,
    /// Frames per live-frames round.
    pub live_repeat: u32,
    /// Prefixes on the list during the flood and the CLI latency test.
    pub flood_prefixes: usize,
    /// SYNs per flood round.
    pub flood_packets: usize,
    /// Rounds per flood configuration.
    pub flood_rounds: usize,
    /// Seconds per front-door rate round.
    pub rate_seconds: f64,
    /// Rounds per front-door rate figure.
    pub rate_rounds: usize,
    /// Idle connections held open to smtpguard for the memory figure.
    pub idle_connections: usize,
    /// Idle connections held open to Postfix (one smtpd process each).
    pub postfix_idle_connections: usize,
}

impl Settings {
    /// The settings for `--quick` (under 2 minutes) or the full run.
    pub fn new(quick: bool) -> Settings {
        if quick {
            Settings {
                quick,
                rounds: 5,
                repeat: 200_000,
                v4_sizes: vec![1, 100_000],
                batch: 10_000,
                live_repeat: 1_000_000,
                flood_prefixes: 10_000,
                flood_packets: 200_000,
                flood_rounds: 1,
                rate_seconds: 2.0,
                rate_rounds: 1,
                idle_connections: 1_000,
                postfix_idle_connections: 100,
            }
        } else {
            Settings {
                quick,
                rounds: 9,
                repeat: 1_000_000,
                v4_sizes: vec![1, 1_000, 100_000, 1_000_000],
                batch: 10_000,
                live_repeat: 2_000_000,
                flood_prefixes: 100_000,
                flood_packets: 1_000_000,
                flood_rounds: 3,
                rate_seconds: 4.0,
                rate_rounds: 3,
                idle_connections: 10_000,
                postfix_idle_connections: 1_000,
            }
        }
    }
}

/// The smtpguard binary under test: `SMTPGUARD_BIN` (xtask sets it to the
/// release build), else `target/release/smtpguard`.
pub fn smtpguard_binary() -> PathBuf {
    std::env::var_os("SMTPGUARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/smtpguard")
        })
}

/// The bench's XDP_DROP baseline object (`smtpguard-ebpf`'s
/// `bench-drop-all`, kept out of the production object):
/// `SMTPGUARD_BENCH_OBJECT` (xtask sets it), else where xtask builds it.
pub fn drop_all_object() -> PathBuf {
    std::env::var_os("SMTPGUARD_BENCH_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpf/bpfel-unknown-none/release/bench-drop-all")
        })
}

/// Raises this process's open-file limit to `want`, or, where the hard
/// limit may not rise (a container without CAP_SYS_RESOURCE), to the hard
/// limit; children inherit it. The front door holds 10,000 connections on
/// each side (client and server are different processes). Returns the
/// soft limit now in force.
pub fn raise_nofile_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: plain setrlimit/getrlimit with a valid struct.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// A `Result` with the error as text, for a row's "not measured: why".
pub fn why<T>(r: anyhow::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{e:#}"))
}
