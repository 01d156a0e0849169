//! The SMTP front door on loopback, in a network namespace of its own (its
//! sockets and TIME_WAITs die with it): the smtpguard daemon beside a
//! private Postfix and HAProxy in front of Postfix, driven by the tokio
//! clients of [`super::smtp_client`].
//!
//! Servers, all on 127.0.0.1 of the namespace:
//! - `:2525` smtpguard, Maildir spool, STARTTLS offered;
//! - `:2526` smtpguard relaying to Postfix with PROXY v2;
//! - `:2527` HAProxy (TCP mode, `send-proxy-v2`) in front of Postfix;
//! - `:2528` a fresh smtpguard (spool) for each idle-memory figure;
//! - `:10025` Postfix smtpd (STARTTLS offered), `:10026` its PROXY v2 smtpd.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Instant};

use anyhow::{Context as _, Result};
use tokio::runtime::Runtime;

use super::{
    daemon::{self, Daemon},
    haproxy::HaProxy,
    report::{bytes, thousands, Figure, Measured, Row},
    smtp_client::{self, Certs, Work},
    stats::{median_of_rounds, Round, Sample},
    why, Settings, TempDir,
};
use smtpguard_tests::{
    netns::{unique_tag, Netns},
    postfix::{self, Postfix},
};

/// Postfix's smtpd ports on 127.0.0.1: plain (STARTTLS offered), and
/// behind a PROXY v2 header (for smtpguard and HAProxy).
const POSTFIX_PLAIN: u16 = 10025;
const POSTFIX_PROXIED: u16 = 10026;
const SPOOL: &str = "127.0.0.1:2525";
const RELAY: &str = "127.0.0.1:2526";
const HAPROXY: &str = "127.0.0.1:2527";
/// A fresh smtpguard for each memory figure (a process never gives freed
/// heap back, so a second figure from the same one would be flattered).
const MEMORY: &str = "127.0.0.1:2528";

/// Concurrent clients for connection and handshake rates.
const RATE_CLIENTS: usize = 50;
/// Concurrent clients for message throughput.
const MESSAGE_CLIENTS: usize = 50;

/// Runs the section in a namespace of its own.
pub fn run(settings: &Settings) -> Result<Vec<Row>> {
    let ns = Netns::new("fd", &unique_tag());
    // Everything below (servers, runtime threads) inherits the namespace.
    ns.enter(|| in_namespace(settings))
}

fn daemon_config(dir: &Path, listen: &str, certs: &Certs, upstream: Option<SocketAddr>) -> String {
    let d = dir.display();
    let delivery = match upstream {
        Some(up) => format!("upstream = \"{up}\"\nupstream_protocol = \"proxy-v2\""),
        None => format!("spool_dir = \"{d}/spool\"\naccept_domains = [\"example.com\"]"),
    };
    format!(
        r#"
[server]
hostname = "gw.bench.example"
listen = ["{listen}"]
max_connections = "unlimited"
idle_timeout = "10m"
[tls]
mode = "optional"
certificate = "{chain}"
private_key = "{key}"
[policy]
deny_list = "{d}/deny.list"
permit_list = "{d}/permit.list"
[delivery]
{delivery}
[control]
socket = "{d}/control.sock"
[screening]
greet_wait = "0s"
"#,
        chain = certs.chain.display(),
        key = certs.key.display(),
    )
}

/// The servers of the section; a peer that would not start is kept as its error.
struct Servers {
    /// The spool daemon on `SPOOL`, running while this lives.
    _spool: Daemon,
    relay: Result<Daemon, String>,
    postfix: Result<Postfix, String>,
    haproxy: Result<HaProxy, String>,
    certs: Certs,
    _dirs: Vec<TempDir>,
}

/// The bench's Postfix's plain smtpd (it always has one).
fn plain(pf: &Postfix) -> SocketAddr {
    pf.plain().expect("the bench's Postfix has a plain smtpd")
}

impl Servers {
    fn start(settings: &Settings) -> Result<Servers> {
        let certs = Certs::new();
        let limit = settings.postfix_idle_connections + RATE_CLIENTS + 50;
        let postfix = Postfix::start(postfix::Options {
            netns: None,
            port: POSTFIX_PROXIED,
            plain_port: Some(POSTFIX_PLAIN),
            xclient_port: None,
            tls: Some(postfix::Tls {
                chain: &certs.chain,
                key: &certs.key,
            }),
            process_limit: Some(limit),
        });
        let spool_dir = TempDir::try_new("spool")?;
        let spool = Daemon::start(
            None,
            spool_dir.path(),
            &daemon_config(spool_dir.path(), SPOOL, &certs, None),
        )?;
        let relay_dir = TempDir::try_new("relay")?;
        let relay = match &postfix {
            Ok(pf) => why(Daemon::start(
                None,
                relay_dir.path(),
                &daemon_config(relay_dir.path(), RELAY, &certs, Some(pf.proxied())),
            )),
            Err(e) => Err(format!("needs Postfix: {e}")),
        };
        let haproxy = match &postfix {
            Ok(pf) => why(HaProxy::start(HAPROXY.parse()?, pf.proxied())),
            Err(e) => Err(format!("needs Postfix: {e}")),
        };
        Ok(Servers {
            _spool: spool,
            relay,
            postfix,
            haproxy,
            certs,
            _dirs: vec![spool_dir, relay_dir],
        })
    }
}

fn in_namespace(settings: &Settings) -> Result<Vec<Row>> {
    let servers = Servers::start(settings)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    eprintln!("bench:   connection rate");
    rows.push(connection_rate(settings, &rt, &servers));
    eprintln!("bench:   idle connections");
    rows.extend(idle_memory(settings, &rt, &servers));
    eprintln!("bench:   STARTTLS handshakes");
    rows.push(handshake_rate(settings, &rt, &servers));
    eprintln!("bench:   message throughput");
    rows.extend(message_rate(settings, &rt, &servers));
    Ok(rows)
}

/// A rate contender: `work` against `addr`, or the reason it cannot run.
fn rate_round<'a>(
    rt: &'a Runtime,
    settings: &'a Settings,
    clients: usize,
    target: Result<SocketAddr, String>,
    work: impl Fn(SocketAddr) -> Work + 'a,
) -> Round<'a, String> {
    Box::new(move || {
        let addr = target.clone()?;
        why(rt.block_on(smtp_client::rate(
            clients,
            settings.rate_seconds,
            work(addr),
        )))
    })
}

fn per_second(s: &Result<Sample, String>, unit: &str) -> Measured {
    s.as_ref()
        .map(|s| Figure::rate(s, unit))
        .map_err(Clone::clone)
}

fn addr_of<T>(peer: &Result<T, String>, addr: SocketAddr) -> Result<SocketAddr, String> {
    peer.as_ref().map(|_| addr).map_err(Clone::clone)
}

fn greet_work(addr: SocketAddr) -> Work {
    Arc::new(move |_| Box::pin(smtp_client::greet_and_quit(addr)))
}

fn connection_rate(settings: &Settings, rt: &Runtime, s: &Servers) -> Row {
    let pf_plain = s.postfix.as_ref().map(plain).map_err(Clone::clone);
    let samples = median_of_rounds(
        settings.rate_rounds,
        vec![
            rate_round(
                rt,
                settings,
                RATE_CLIENTS,
                Ok(SPOOL.parse().unwrap()),
                greet_work,
            ),
            rate_round(rt, settings, RATE_CLIENTS, pf_plain, greet_work),
            rate_round(
                rt,
                settings,
                RATE_CLIENTS,
                addr_of(&s.haproxy, HAPROXY.parse().unwrap()),
                greet_work,
            ),
        ],
    );
    Row::new(
        format!("connections accepted, greeted (220) and closed after QUIT, {RATE_CLIENTS} concurrent clients"),
        per_second(&samples[0], "conn"),
        vec![
            ("Postfix smtpd".into(), per_second(&samples[1], "conn")),
            ("HAProxy (TCP, PROXY v2) → Postfix".into(), per_second(&samples[2], "conn")),
        ],
        "report",
    )
}

fn handshake_rate(settings: &Settings, rt: &Runtime, s: &Servers) -> Row {
    let connector = s.certs.connector.clone();
    let work = move |addr: SocketAddr| -> Work {
        let connector = connector.clone();
        Arc::new(move |_| {
            let connector = connector.clone();
            Box::pin(async move { smtp_client::starttls(addr, &connector).await.map(|_| 1) })
        })
    };
    let pf_plain = s.postfix.as_ref().map(plain).map_err(Clone::clone);
    let samples = median_of_rounds(
        settings.rate_rounds,
        vec![
            rate_round(
                rt,
                settings,
                RATE_CLIENTS,
                Ok(SPOOL.parse().unwrap()),
                work.clone(),
            ),
            rate_round(rt, settings, RATE_CLIENTS, pf_plain, work),
        ],
    );
    Row::new(
        format!(
            "STARTTLS handshakes (connect, EHLO, STARTTLS, full TLS 1.3 handshake, ECDSA P-256), {RATE_CLIENTS} concurrent clients"
        ),
        per_second(&samples[0], "handshakes"),
        vec![(
            "Postfix smtpd (smtpd_tls_security_level = may)".into(),
            per_second(&samples[1], "handshakes"),
        )],
        "report",
    )
}

fn message_rate(settings: &Settings, rt: &Runtime, s: &Servers) -> Vec<Row> {
    let message = Arc::new(smtp_client::message_10k());
    let work = move |addr: SocketAddr| -> Work {
        let message = Arc::clone(&message);
        Arc::new(move |deadline: Instant| {
            Box::pin(smtp_client::send_messages(
                addr,
                Arc::clone(&message),
                deadline,
            ))
        })
    };
    let pf_plain = s.postfix.as_ref().map(plain).map_err(Clone::clone);
    let samples = median_of_rounds(
        settings.rate_rounds,
        vec![
            rate_round(
                rt,
                settings,
                MESSAGE_CLIENTS,
                Ok(SPOOL.parse().unwrap()),
                work.clone(),
            ),
            rate_round(
                rt,
                settings,
                MESSAGE_CLIENTS,
                addr_of(&s.relay, RELAY.parse().unwrap()),
                work.clone(),
            ),
            rate_round(rt, settings, MESSAGE_CLIENTS, pf_plain, work),
        ],
    );
    let postfix = || {
        vec![(
            "straight to Postfix".to_string(),
            per_second(&samples[2], "msg"),
        )]
    };
    vec![
        Row::new(
            format!("10 KB messages into smtpguard's Maildir spool (fsync before 250), {MESSAGE_CLIENTS} concurrent sessions"),
            per_second(&samples[0], "msg"),
            postfix(),
            "report",
        ),
        Row::new(
            format!("10 KB messages through smtpguard (PROXY v2) to Postfix, {MESSAGE_CLIENTS} concurrent sessions"),
            per_second(&samples[1], "msg"),
            postfix(),
            "report",
        ),
    ]
}

/// Memory of `count` idle sessions to `addr`: the server's memory before
/// and after, from `memory` (which may sum several processes), divided by
/// `count`.
fn idle_cost(
    rt: &Runtime,
    addr: SocketAddr,
    count: usize,
    tls: Option<&Certs>,
    memory: impl Fn() -> Result<u64>,
) -> Result<f64> {
    // Warm up: the first sessions grow pools that later ones reuse.
    drop(rt.block_on(smtp_client::open_many(
        addr,
        20,
        20,
        tls.map(|c| c.connector.clone()),
    ))?);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before = memory()?;
    let held = rt
        .block_on(smtp_client::open_many(
            addr,
            count,
            100,
            tls.map(|c| c.connector.clone()),
        ))
        .with_context(|| format!("opening {count} sessions to {addr}"))?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = memory()?;
    drop(held);
    Ok(after.saturating_sub(before) as f64 / count as f64)
}

fn idle_memory(settings: &Settings, rt: &Runtime, s: &Servers) -> Vec<Row> {
    let ours = |tls: bool| -> Measured {
        why((|| {
            let dir = TempDir::try_new("memory")?;
            let fresh = Daemon::start(
                None,
                dir.path(),
                &daemon_config(dir.path(), MEMORY, &s.certs, None),
            )?;
            let pid = fresh.pid();
            idle_cost(
                rt,
                MEMORY.parse().unwrap(),
                settings.idle_connections,
                tls.then_some(&s.certs),
                || daemon::rss_bytes(pid),
            )
        })())
        .map(|b| {
            Figure::new(
                b,
                format!(
                    "{} per connection (RSS delta / {})",
                    bytes(b),
                    thousands(settings.idle_connections)
                ),
            )
        })
    };
    // Postfix: one smtpd per session, so the whole processes are the cost.
    let postfix = |tls: bool| -> [Measured; 2] {
        let Ok(pf) = &s.postfix else {
            let e = s.postfix.as_ref().err().cloned().unwrap_or_default();
            return [Err(e.clone()), Err(e)];
        };
        let n = settings
            .postfix_idle_connections
            .min(pf.process_limit.expect("Servers::start sets it") - 10);
        let sum = |f: fn(u32) -> Result<u64>| -> Result<u64> {
            Ok(pf
                .smtpd_pids()
                .into_iter()
                .filter_map(|p| f(p.unsigned_abs()).ok())
                .sum())
        };
        let run = |f: fn(u32) -> Result<u64>| -> Result<f64> {
            if !pf.wait_idle(std::time::Duration::from_secs(15)) {
                anyhow::bail!("Postfix smtpd processes did not go idle");
            }
            // Processes exist only while sessions do: measure the total.
            let held = rt.block_on(smtp_client::open_many(
                plain(pf),
                n,
                50,
                tls.then(|| s.certs.connector.clone()),
            ))?;
            std::thread::sleep(std::time::Duration::from_millis(500));
            let total = sum(f)?;
            drop(held);
            Ok(total as f64 / n as f64)
        };
        let label = |b: f64, what: &str| {
            Figure::new(
                b,
                format!(
                    "{} per connection ({what} of {} smtpd / {n})",
                    bytes(b),
                    thousands(n)
                ),
            )
        };
        [
            why(run(daemon::rss_bytes)).map(|b| label(b, "RSS sum")),
            why(run(daemon::pss_bytes)).map(|b| label(b, "PSS sum")),
        ]
    };
    let mut rows = Vec::new();
    for tls in [false, true] {
        let kind = if tls {
            "TLS established (after STARTTLS)"
        } else {
            "plaintext, greeted"
        };
        let [rss, pss] = postfix(tls);
        rows.push(Row::new(
            format!("memory per idle connection, {kind}"),
            ours(tls),
            vec![
                ("Postfix smtpd, RSS".into(), rss),
                ("Postfix smtpd, PSS".into(), pss),
            ],
            "report",
        ));
    }
    rows
}
