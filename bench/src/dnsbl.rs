//! DNSBL (#17) on loopback in a namespace of its own: the release daemon
//! asking a real DNS server (hickory-server, `smtpguard::testing::dns`) in
//! the bench process. Time to the `220` for an unlisted client with
//! DNSBL on (every client new: a query per connection) and cached, beside
//! DNSBL off; and how many lookups per second the daemon sustains (each
//! connection from a new address, so each one a query).

use std::{
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use anyhow::{Context as _, Result};
use smtpguard::testing::client::{connect_from, reply};
use smtpguard::testing::dns::TestDns;
use smtpguard_tests::netns::{unique_tag, Netns};

use super::{
    daemon::Daemon,
    report::{Figure, Row},
    stats::Sample,
    Settings, TempDir,
};

const WITH: &str = "127.0.0.1:2525";
const WITHOUT: &str = "127.0.0.1:2526";
/// Threads opening connections for the lookup rate.
const RATE_THREADS: usize = 16;

/// Runs the section in a namespace of its own.
pub fn run(settings: &Settings) -> Result<Vec<Row>> {
    let ns = Netns::new("dnsbl", &unique_tag());
    ns.enter(|| in_namespace(settings))
}

fn config(dir: &Path, listen: &str, dnsbl: Option<SocketAddr>) -> String {
    let table = dnsbl.map(|resolver| {
        format!(
            "sites = [\"dnsbl.test*2\", \"dnswl.test=127.0.[0..255].[1..3]*-1\"]\n\
             threshold = 2\naction = \"drop\"\nresolver = \"{resolver}\"\n"
        )
    });
    let mut tables = vec![
        ("server", "max_connections = \"unlimited\"\n"),
        ("logging", "stats_interval = \"0s\"\n"),
    ];
    tables.extend(table.as_deref().map(|t| ("dnsbl", t)));
    // No greet wait (config_text's default): it would hide DNSBL's own cost.
    smtpguard::testing::config_text(dir, listen.parse().expect("a listen address"), &tables)
}

/// The i-th client address: 127.1.0.1 onwards (last octet 1–250), never
/// listed; distinct for i below 12.5 million.
fn client(i: usize) -> String {
    let (high, low) = (i / 250, 1 + i % 250);
    format!("127.{}.{}.{low}", 1 + high / 256 % 200, high % 256)
}

/// Milliseconds from connect to the end of the `220` line.
fn greet(src: &str, to: SocketAddr) -> Result<f64> {
    let started = Instant::now();
    let mut stream = connect_from(src, to);
    let got = reply(&mut stream);
    anyhow::ensure!(got.starts_with("220 "), "no greeting for {src}: {got:?}");
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

fn in_namespace(settings: &Settings) -> Result<Vec<Row>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _rt = rt.enter();
    let dns = TestDns::start();
    dns.zone("dnsbl.test", 300, &[]);
    dns.zone("dnswl.test", 300, &[]);
    let dir_with = TempDir::try_new("bench-dnsbl")?;
    let dir_without = TempDir::try_new("bench-nodnsbl")?;
    let mut with = Daemon::start(
        None,
        dir_with.path(),
        &config(dir_with.path(), WITH, Some(dns.addr())),
    )?;
    let mut without = Daemon::start(
        None,
        dir_without.path(),
        &config(dir_without.path(), WITHOUT, None),
    )?;
    let (with_addr, without_addr): (SocketAddr, SocketAddr) = (WITH.parse()?, WITHOUT.parse()?);

    let count = if settings.quick { 300 } else { 2000 };
    let off = (0..count)
        .map(|i| greet(&client(i), without_addr))
        .collect::<Result<Vec<_>>>()?;
    let on = (0..count)
        .map(|i| greet(&client(i), with_addr))
        .collect::<Result<Vec<_>>>()?;
    // Every one of those is cached now.
    let cached = (0..count)
        .map(|i| greet(&client(i), with_addr))
        .collect::<Result<Vec<_>>>()?;
    let queries_after_cached = dns.queries("dnsbl.test");

    // Lookups per second: new addresses from several threads at once.
    let rate = |to: SocketAddr, base: usize| -> Result<f64> {
        let total = if settings.quick { 2000 } else { 10_000 };
        let next = AtomicUsize::new(0);
        let started = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let workers: Vec<_> = (0..RATE_THREADS)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= total {
                                return Ok(());
                            }
                            greet(&client(base + i), to)?;
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().expect("rate thread")?;
            }
            Ok(())
        })?;
        Ok(total as f64 / started.elapsed().as_secs_f64())
    };
    let rounds = settings.rate_rounds.max(1);
    let mut on_rates = Vec::new();
    let mut off_rates = Vec::new();
    for round in 0..rounds {
        let base = 100_000 + round * 20_000;
        on_rates.push(rate(with_addr, base)?);
        off_rates.push(rate(without_addr, base)?);
    }
    let stats = with.cli(&["stats"])?;
    let stats = String::from_utf8_lossy(&stats.stdout).into_owned();
    let lookups = stats
        .lines()
        .find(|l| l.starts_with("dnsbl.dnsbl.test.lookups"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<u64>().ok())
        .context("dnsbl.dnsbl.test.lookups in stats")?;
    with.stop();
    without.stop();

    let off = Sample::of(off);
    let off_figure = || Ok(Figure::sample(&off, "ms", 3));
    Ok(vec![
        Row::new(
            format!("time to 220 for an unlisted client, DNSBL on (2 sites, each connection a new client: 2 queries), median of {count}"),
            Ok(Figure::sample(&Sample::of(on), "ms", 3)),
            vec![("DNSBL off".into(), off_figure())],
            "≤ greet_wait",
        ),
        Row::new(
            format!("time to 220 for an unlisted client, DNSBL on, answer cached ({queries_after_cached} queries for {count} clients × 2 visits), median of {count}"),
            Ok(Figure::sample(&Sample::of(cached), "ms", 3)),
            vec![("DNSBL off".into(), off_figure())],
            "≤ 1× off",
        ),
        Row::new(
            format!("connections with a DNSBL lookup each ({RATE_THREADS} client threads, new address each; {lookups} queries per site in all)"),
            Ok(Figure::rate(&Sample::of(on_rates), "lookups")),
            vec![("DNSBL off, same connections".into(), Ok(Figure::rate(&Sample::of(off_rates), "conn")))],
            "report",
        ),
    ])
}
