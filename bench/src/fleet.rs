//! The fleet source (#19) against a private etcd (Debian's etcd-server,
//! single member on loopback or in the gateway's namespace):
//!
//! - change to kernel on another gateway: an etcd put by the bench, until
//!   the gateway's `check` refuses the address (the kernel is written
//!   before the policy swaps, so a refusal means both are in force), p50
//!   and p99 over the rounds;
//! - fan-out: 10 and 100 simulated gateways (smtpguard's own `Fleet`
//!   watch loop, each applying to a `Policy`), time until the last has a
//!   change, p50 and p99;
//! - full resync: the gateway's own measure of its paged read plus the
//!   atomic switch (kernel and policy) at 120k and 1M entries, after a
//!   restart;
//! - catch-up: the gateway stopped (SIGSTOP) while 10k changes are
//!   written, then resumed: time until it has applied the last.

use std::{
    net::Ipv4Addr,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ipnet::IpNet;
use smtpguard::{
    config::FleetConfig,
    control::{
        client::Client,
        proto::{Admission, Request, Response},
    },
    fleet::{BoxError, Fleet, FleetTarget},
    policy::{AccessList, Enforcement, ListEntry, ListKind, Policy, PolicyMode},
};
use smtpguard_tests::{
    etcd::Etcd,
    netns::{Topology, GW_V4},
};

use super::{
    daemon::Daemon,
    report::{Figure, Row},
    why, Settings, TempDir,
};

const PREFIX: &str = "/smtpguard/v1/bench/";

/// The fleet rows.
///
/// # Errors
///
/// Never as a whole: each row carries its own failure.
pub fn run(settings: &Settings) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    rows.extend(gateway_rows(settings).unwrap_or_else(|e| {
        vec![Row::new(
            "fleet: change to kernel on another gateway",
            Err(format!("{e:#}")),
            Vec::new(),
            "report",
        )]
    }));
    for watchers in [10, 100] {
        let r = why(fan_out(settings, watchers));
        rows.push(Row::new(
            format!("fleet: fan-out to {watchers} simulated gateways, put → the last applied it (p50; p99)"),
            r,
            Vec::new(),
            "report",
        ));
    }
    Ok(rows)
}

fn entry_key(prefix: IpNet) -> String {
    format!("{PREFIX}lists/deny/{prefix}")
}

fn nth(i: u32) -> IpNet {
    IpNet::new(Ipv4Addr::from(0x0a00_0000 + i).into(), 32).unwrap()
}

fn p50_p99(mut ms: Vec<f64>) -> Figure {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Figure::new(
        at(0.5),
        format!(
            "{:.2} ms; p99 {:.2} ms ({} changes)",
            at(0.5),
            at(0.99),
            ms.len()
        ),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn etcd_client(endpoints: &[String]) -> Result<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(30));
    Ok(etcd_client::Client::connect(endpoints, Some(options)).await?)
}

/// Writes `n` deny entries from `first` in transactions of 128.
async fn write_entries(c: &mut etcd_client::Client, first: u32, n: u32) -> Result<i64> {
    let mut ops = Vec::with_capacity(128);
    let mut revision = 0;
    for i in first..first + n {
        ops.push(etcd_client::TxnOp::put(entry_key(nth(i)), "{}", None));
        if ops.len() == 128 || i + 1 == first + n {
            let r = c
                .txn(etcd_client::Txn::new().and_then(std::mem::take(&mut ops)))
                .await?;
            revision = r.header().map_or(0, |h| h.revision());
        }
    }
    Ok(revision)
}

async fn refused(client: &Client, addr: Ipv4Addr) -> Result<bool> {
    match client
        .request(&Request::Check {
            addresses: vec![addr.to_string()],
        })
        .await?
    {
        Response::Checked(c) => Ok(c.results[0].verdict == Admission::Refuse),
        other => bail!("unexpected reply {other:?}"),
    }
}

async fn fleet_status(client: &Client) -> Result<smtpguard::control::proto::FleetView> {
    match client.request(&Request::Status).await? {
        Response::Status(s) => s.fleet.map(|f| *f).context("the gateway has no [fleet]"),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// Rows 1, 3 and 4: one gateway with native XDP in a namespace, etcd in
/// the same namespace.
fn gateway_rows(settings: &Settings) -> Result<Vec<Row>> {
    let topo = Topology::new();
    let etcd = Etcd::single_in(topo.gw.name(), "127.0.0.1");
    let endpoints = etcd.endpoints();
    let dir = TempDir::new("bench-fleet");
    let config = |d: &TempDir| {
        let listen = format!("{GW_V4}:2525").parse().unwrap();
        smtpguard::testing::config_text(
            d.path(),
            listen,
            &[
                ("xdp", &format!("interfaces = [\"{}\"]\nmode = \"native\"\n", topo.gw_if)),
                (
                    "fleet",
                    &format!(
                        "endpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\ncache_file = \"{}\"\ngateway_name = \"b\"\n",
                        endpoints[0],
                        d.join("fleet.cache").display()
                    ),
                ),
            ],
        )
    };
    let mut daemon = Daemon::start(Some(&topo.gw), dir.path(), &config(&dir))?;
    let control = Client::new(dir.join("control.sock"));
    // One thread, entered into the namespace: every socket it makes is there.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();

    // 1. Change to kernel on another gateway.
    let changes = if settings.quick { 50 } else { 300 };
    let latencies = topo.gw.enter(|| {
        rt.block_on(async {
            let mut c = etcd_client(&endpoints).await?;
            let mut ms = Vec::new();
            for i in 0..changes {
                let prefix = nth(1_000_000 + i);
                let addr = match prefix.addr() {
                    std::net::IpAddr::V4(a) => a,
                    _ => unreachable!(),
                };
                let started = Instant::now();
                c.put(entry_key(prefix), "{}", None).await?;
                loop {
                    if refused(&control, addr).await? {
                        break;
                    }
                    if started.elapsed() > Duration::from_secs(10) {
                        bail!("{prefix} not in force after 10 s");
                    }
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                ms.push(started.elapsed().as_secs_f64() * 1e3);
            }
            Ok(ms)
        })
    });
    rows.push(Row::new(
        "fleet: etcd put → in force on a gateway (kernel, then policy; XDP native), p50; p99",
        why(latencies).map(p50_p99),
        Vec::new(),
        "report",
    ));

    // 4. Catch-up after 10k changes while stopped.
    let catch_up = topo.gw.enter(|| {
        rt.block_on(async {
            let mut c = etcd_client(&endpoints).await?;
            let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
            let written = write_entries(&mut c, 2_000_000, 10_000).await;
            let resumed = Instant::now();
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
            let revision = written?;
            loop {
                if fleet_status(&control).await?.applied_revision >= revision {
                    return Ok(resumed.elapsed().as_secs_f64() * 1e3);
                }
                if resumed.elapsed() > Duration::from_secs(120) {
                    bail!("not caught up after 120 s");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    });
    rows.push(Row::new(
        "fleet: catch-up after 10k changes while the gateway was stopped (SIGSTOP), resume → last applied",
        why(catch_up).map(|ms| Figure::new(ms, format!("{ms:.0} ms"))),
        Vec::new(),
        "report",
    ));

    // 3. Full resync at 120k and 1M: the gateway's own measure after a restart.
    let sizes: &[u32] = if settings.quick {
        &[120_000]
    } else {
        &[120_000, 1_000_000]
    };
    let mut have = 10_000 + changes;
    for &size in sizes {
        let result = (|| -> Result<Figure> {
            let add = size.saturating_sub(have);
            topo.gw.enter(|| {
                rt.block_on(async {
                    let mut c = etcd_client(&endpoints).await?;
                    write_entries(&mut c, 3_000_000 + have, add).await
                })
            })?;
            have += add;
            daemon.stop();
            daemon = Daemon::start(Some(&topo.gw), dir.path(), &config(&dir))?;
            let started = Instant::now();
            loop {
                let s = rt.block_on(fleet_status(&control))?;
                if let (Some(ms), true) = (s.last_full_read_ms, s.entries as u32 >= have) {
                    return Ok(Figure::new(
                        ms as f64,
                        format!("{ms} ms ({} entries)", s.entries),
                    ));
                }
                if started.elapsed() > Duration::from_secs(300) {
                    bail!("no full read after 300 s: {s:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })();
        rows.push(Row::new(
            format!(
                "fleet: full resync of {}k entries, paged read + atomic kernel switch",
                size / 1000
            ),
            why(result),
            Vec::new(),
            "report",
        ));
    }
    daemon.stop();
    Ok(rows)
}

/// A simulated gateway: applies to a policy and says when.
struct Watcher {
    id: usize,
    policy: Mutex<Policy>,
    applied: mpsc::Sender<(usize, Instant)>,
}

impl FleetTarget for Watcher {
    fn switch(&self, deny: AccessList, permit: AccessList) -> Result<(), BoxError> {
        self.policy
            .lock()
            .unwrap()
            .insert_source(smtpguard::fleet::source_name(), deny, permit)?;
        // The first read: the watcher is connected.
        let _ = self.applied.send((self.id, Instant::now()));
        Ok(())
    }

    fn update(&self, changes: Vec<(ListKind, IpNet, Option<ListEntry>)>) -> Result<(), BoxError> {
        let mut policy = self.policy.lock().unwrap();
        let lists = policy.source_mut(&smtpguard::fleet::source_name());
        for (kind, prefix, entry) in changes {
            let list = lists.list_mut(kind);
            list.remove([prefix]);
            if let Some(e) = entry {
                list.add([prefix], e.comment.as_deref(), e.expires)?;
            }
        }
        let _ = self.applied.send((self.id, Instant::now()));
        Ok(())
    }
}

fn fan_out(settings: &Settings, watchers: usize) -> Result<Figure> {
    let etcd = Etcd::single();
    let endpoints = etcd.endpoints();
    let dir = TempDir::new("bench-fanout");
    let rt = runtime();
    let (tx, rx) = mpsc::channel();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = scopeguard(shutdown.clone());
    for id in 0..watchers {
        let config = FleetConfig {
            endpoints: endpoints.clone(),
            prefix: PREFIX.to_owned(),
            cache_file: dir.join(format!("w{id}.cache")),
            tls: None,
            auth: None,
            gateway_name: Some(format!("w{id}")),
            share_bans: false,
        };
        let fleet = Fleet::new(config, format!("w{id}"), None);
        let target: Arc<dyn FleetTarget> = Arc::new(Watcher {
            id,
            policy: Mutex::new(Policy::new(
                PolicyMode::AcceptAllExceptDeny,
                Enforcement::Enforce,
            )),
            applied: tx.clone(),
        });
        rt.spawn(fleet.run(target, shutdown.clone()));
    }
    let rounds = if settings.quick { 20 } else { 100 };
    let ms = rt.block_on(async {
        let mut c = etcd_client(&endpoints).await?;
        // Every watcher has read the lists (its first switch) and watches.
        let mut ready = vec![false; watchers];
        let mut left = watchers;
        let deadline = Instant::now() + Duration::from_secs(120);
        while left > 0 {
            let remaining = deadline
                .checked_duration_since(Instant::now())
                .context("timed out")?;
            let (id, _) = tokio::task::block_in_place(|| rx.recv_timeout(remaining))
                .map_err(|_| anyhow::anyhow!("{left} of {watchers} watchers never connected"))?;
            if !ready[id] {
                ready[id] = true;
                left -= 1;
            }
        }
        let mut ms = Vec::new();
        for round in 1..=rounds {
            while rx.try_recv().is_ok() {}
            let started = Instant::now();
            c.put(entry_key(nth(round)), "{}", None).await?;
            let limit = Duration::from_secs(10);
            let mut seen = vec![false; watchers];
            let mut last = started;
            let mut left = watchers;
            while left > 0 {
                let remaining = limit.checked_sub(started.elapsed()).context("timed out")?;
                let (id, at) =
                    tokio::task::block_in_place(|| rx.recv_timeout(remaining)).map_err(|_| {
                        anyhow::anyhow!("{left} of {watchers} watchers did not apply round {round}")
                    })?;
                if !seen[id] {
                    seen[id] = true;
                    left -= 1;
                    last = last.max(at);
                }
            }
            ms.push((last - started).as_secs_f64() * 1e3);
        }
        Ok::<_, anyhow::Error>(ms)
    })?;
    Ok(p50_p99(ms))
}

/// Cancels the token on drop, so the watchers stop whatever happens.
struct CancelOnDrop(tokio_util::sync::CancellationToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn scopeguard(token: tokio_util::sync::CancellationToken) -> CancelOnDrop {
    CancelOnDrop(token)
}
