//! The daemon: starts every part from the configuration, runs until
//! SIGINT/SIGTERM, reloads on SIGHUP. See [`run`].
//!
//! Start order matters: everything that can refuse the configuration
//! (TLS files, list files, the hand-off, the listen addresses, the control
//! socket) is checked before the XDP program is attached, and the lists are
//! in the kernel maps before the program sees a packet.
//!
//! - [`startup`]: the steps before the runtime (configuration, lists, XDP);
//! - [`state`]: the shared [`Daemon`] and the one path by which lists change;
//! - [`control`]: the answers to the control socket;
//! - [`snapshot`]: one reading of every counter, which `stats`
//!   ([`control`]), the Prometheus text ([`prometheus`]) and the periodic
//!   log line ([`report`]) render.

pub mod check;
pub mod control;
pub mod defence;
pub mod fleet;
pub mod mode_state;
mod notify;
pub mod paths;
pub mod prometheus;
pub mod rate_limit;
pub mod report;
pub mod settings;
pub mod snapshot;
pub mod startup;
pub mod state;

use std::{io::Write as _, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use state::{Daemon, KernelWrite};

use crate::{
    config::Config,
    front_door::{self, AccessCheck, ServerContext},
    kernel::pump_kernel_log,
    logging,
    policy::RuleOrigin,
    smtp::handoff::Delivery,
    tls::{self, LoadedTls},
};

/// Runs the daemon in the foreground with the configuration file at
/// `config_path` ([`startup::DEFAULT_CONFIG_PATH`] when `None`), until
/// SIGINT or SIGTERM. Errors name what could not be started and where.
pub async fn run(config_path: Option<PathBuf>) -> Result<()> {
    let config_path =
        Some(config_path.unwrap_or_else(|| PathBuf::from(startup::DEFAULT_CONFIG_PATH)));
    let config = startup::load_config(config_path.as_deref())?;
    logging::init(config.logging.format, config.logging.level);
    let fd_limit = crate::fds::raise_limit()?;
    if fd_limit.soft != fd_limit.soft_before {
        tracing::info!(
            from = fd_limit.soft_before,
            to = fd_limit.soft,
            "raised the file-descriptor limit (RLIMIT_NOFILE) to the hard limit"
        );
    }
    let tls = load_tls(&config)?;
    startup::sweep_list_temps(&config);
    let mut policy = startup::load_policy(&config)?;
    let fleet_cache = fleet::load_cache(&config, &mut policy);
    startup::warn_about_delivery(&config);
    let delivery = Delivery::new(
        &settings::delivery(&config.delivery),
        &config.server.hostname,
    )?;
    let listeners = front_door::bind(&config.server.listen)?;
    let control_listener = crate::control::bind(&config.control.socket)?;
    let metrics_listener = config
        .metrics
        .listen
        .map(crate::metrics::bind)
        .transpose()?;
    // Sessions must leave the reserve free: checked with every listener
    // open, before XDP is attached (the reserve covers the program's maps).
    let open_fds = crate::fds::open_now().unwrap_or(0);
    let max_sessions_by_fds =
        crate::fds::session_cap(config.server.max_connections, fd_limit.soft, open_fds)?;
    if let Some(cap) = max_sessions_by_fds {
        tracing::info!(
            sessions = cap.get(),
            fd_limit = fd_limit.soft,
            "server.max_connections is unlimited: the file descriptors allow this many sessions"
        );
    }
    let started = startup::start_kernel(&config, &policy)?;
    let (kernel, attachments, kernel_log, rate_limiter, list_load) = match started {
        Some(s) => (
            Some(s.kernel),
            s.attachments,
            s.log,
            s.rate_limiter,
            Some(s.list_load),
        ),
        None => (None, Vec::new(), None, None, None),
    };

    let daemon = Arc::new(Daemon::new(
        config.clone(),
        config_path,
        policy,
        kernel,
        attachments,
    ));
    // The start's load counts: `smtpguard_list_last_load_*` is there from
    // the first scrape, not only after a reload.
    if let Some(took) = list_load {
        daemon.record_list_load(took);
    }
    // Drop events name the entry's prefix and source, not the kernel's
    // rule id. Never waits for the kernel lock: a list change holding it
    // must not stall the log (the id is then shown as unknown).
    {
        let daemon = Arc::downgrade(&daemon);
        logging::set_rule_origin(move |id| {
            let daemon = daemon.upgrade()?;
            let prefix = {
                let kernel = daemon.kernel.try_lock().ok()?;
                kernel.as_ref()?.sync.prefix_of(id)?
            };
            let source = match daemon.policy().origin(prefix) {
                Some(RuleOrigin::Entry(e)) => e.source.to_string(),
                Some(RuleOrigin::Protected(_)) => "protected".to_owned(),
                None => "-".to_owned(),
            };
            Some((prefix.to_string(), source))
        });
    }
    daemon.set_certificate_not_after(
        tls.as_ref()
            .map(|t| t.certificate.not_after_unix.max(0) as u64),
    );
    let access: Arc<dyn AccessCheck> = {
        let daemon = Arc::clone(&daemon);
        Arc::new(move |ip| daemon.access(ip))
    };
    let mut front_door_settings = settings::front_door(&config.server, &config.tls);
    front_door_settings.max_sessions_by_fds = max_sessions_by_fds;
    let defence = Arc::new(defence::DaemonDefence::new(
        &daemon,
        defence::load_pass_cache(&config),
    ));
    daemon.set_defence({
        let defence = Arc::downgrade(&defence);
        Box::new(move || defence.upgrade().map(|d| d.snapshot()).unwrap_or_default())
    });
    let mut ctx = ServerContext::new(
        front_door_settings,
        tls.as_ref().map(|t| Arc::clone(&t.server_config)),
        access,
        delivery,
    )
    .with_screening(defence.screening(&config));
    if let Some(dnsbl) = &config.dnsbl {
        ctx = ctx.with_dnsbl(dnsbl_gate(dnsbl, &daemon)?);
    }
    daemon.set_server(ctx.handle());

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let server_task = tasks.spawn(front_door::run(listeners, ctx, shutdown.clone()));
    let handler = Arc::new(control::Handler {
        daemon: Arc::clone(&daemon),
    });
    tasks.spawn({
        let shutdown = shutdown.clone();
        async move {
            if let Err(e) = crate::control::run(control_listener, handler, shutdown).await {
                tracing::error!(error = %logging::one_line(&e), "control socket failed");
            }
        }
    });
    let kernel_log_task = kernel_log.map(|log| tokio::spawn(pump_kernel_log(log)));
    // Over-limit clients are ban violations; the stream is bounded (see
    // rate_limit::EVENT_QUEUE).
    if let Some(events) = rate_limiter.and_then(|l| rate_limit::spawn(l, &tasks, shutdown.clone()))
    {
        tasks.spawn(ban_over_limit_clients(
            events,
            Arc::clone(&defence),
            shutdown.clone(),
        ));
    }
    if let (Some(interval), true) = (config.logging.stats_interval, daemon.counters().is_some()) {
        tasks.spawn(report::log_counters(
            Arc::clone(&daemon),
            interval,
            shutdown.clone(),
        ));
    }
    tasks.spawn(expire_entries(Arc::clone(&daemon), shutdown.clone()));
    if defence.pass_cache.is_some() {
        tasks.spawn(save_pass_cache(Arc::clone(&defence), shutdown.clone()));
    }
    fleet::start(&daemon, fleet_cache, &tasks, &shutdown);
    if let Some(listener) = metrics_listener {
        let render: crate::metrics::Render = {
            let daemon = Arc::clone(&daemon);
            Arc::new(move || prometheus::render(&snapshot::Snapshot::collect(&daemon)))
        };
        tasks.spawn(crate::metrics::serve(listener, render, shutdown.clone()));
    }
    tasks.close();

    let expiry = tls.as_ref().map(|t| {
        format!(
            "certificate {} valid until {}",
            t.certificate.subject,
            crate::time::utc(t.certificate.not_after_unix)
        )
    });
    let summary = report::Summary::new(&daemon, expiry.as_deref());
    match config.logging.format {
        // Not println!: a closed stdout (a pipe whose reader left) must
        // not take the daemon down.
        crate::config::LogFormat::Text => {
            let _ = writeln!(std::io::stdout(), "{}", summary.text());
        }
        crate::config::LogFormat::Json => summary.log(),
    }
    notify::ready("filtering: lists in the kernel, listeners bound");

    wait_for_signals(&daemon, &shutdown, server_task).await?;
    tasks.wait().await;
    if let Some(task) = kernel_log_task {
        task.abort();
    }
    // Detach XDP and remove its pins now, whoever still holds the daemon.
    if let Some(mut kernel) = daemon.kernel.lock().expect("kernel lock").take() {
        kernel.filter.detach_all();
    }
    tracing::info!("smtpguard stopped; XDP detached");
    Ok(())
}

/// The DNSBL step: the engine on the configured resolver; clients on a
/// permit list skip it.
fn dnsbl_gate(
    config: &crate::dnsbl::DnsblConfig,
    daemon: &Arc<Daemon>,
) -> Result<front_door::dnsbl_gate::DnsblGate> {
    let engine = crate::dnsbl::Dnsbl::new(config.clone()).context("[dnsbl]")?;
    let skip: front_door::dnsbl_gate::SkipCheck = {
        let daemon = Arc::downgrade(daemon);
        Arc::new(move |ip| {
            // Any permit entry covering the client, whatever else decides
            // (a protected range, say): one LPM per source.
            daemon.upgrade().is_some_and(|d| {
                d.policy().sources().any(|(_, lists)| {
                    lists
                        .list(crate::policy::ListKind::Permit)
                        .table()
                        .lpm(ip)
                        .is_some()
                })
            })
        })
    };
    tracing::info!(
        sites = config.sites.len(),
        threshold = config.threshold,
        action = config.action.as_str(),
        "DNSBL scoring before the greeting"
    );
    Ok(front_door::dnsbl_gate::DnsblGate::new(engine, skip))
}

/// TLS files, when TLS is on; refuses to start on any problem with them.
fn load_tls(config: &Config) -> Result<Option<LoadedTls>> {
    let Some(files) = config.tls.active_files() else {
        return Ok(None);
    };
    let loaded = tls::load(
        &files.certificate,
        &files.private_key,
        files.ca_certificate.as_deref(),
    )?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    Ok(Some(loaded))
}

/// Until SIGINT/SIGTERM (or the server ending on its own); SIGHUP reloads.
async fn wait_for_signals(
    daemon: &Arc<Daemon>,
    shutdown: &CancellationToken,
    mut server_task: tokio::task::JoinHandle<()>,
) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => {
                let daemon = Arc::clone(daemon);
                match tokio::task::spawn_blocking(move || daemon.reload()).await {
                    Ok(Ok(summary)) => tracing::info!("SIGHUP: reloaded: {summary}"),
                    Ok(Err(e)) => tracing::error!(error = %logging::one_line(&e), "SIGHUP: reload refused, the running configuration stays"),
                    Err(e) => tracing::error!("SIGHUP: reload failed: {e}"),
                }
            }
            _ = &mut server_task => {
                tracing::error!("the SMTP server stopped on its own; shutting down");
                break;
            }
        }
    }
    notify::stopping();
    shutdown.cancel();
    if !server_task.is_finished() {
        let _ = server_task.await;
    }
    Ok(())
}

/// Turns the XDP rate limit's over-limit events into ban violations. An
/// event of the shared overflow bucket (the bucket table was full) names
/// only the first new client of that minute, not an offender: no
/// violation.
async fn ban_over_limit_clients(
    mut events: rate_limit::RateLimitEvents,
    defence: Arc<defence::DaemonDefence>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.stream.recv() => e,
        };
        let Some(event) = event else { return };
        if !event.overflow {
            defence.violation_of(event.client, crate::policy::bans::Violation::RateLimit);
        }
    }
}

/// Writes the pass cache every [`defence::PASS_CACHE_SAVE_INTERVAL`] when
/// it changed, and once more at shutdown.
async fn save_pass_cache(defence: Arc<defence::DaemonDefence>, shutdown: CancellationToken) {
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(defence::PASS_CACHE_SAVE_INTERVAL) => false,
        };
        let d = Arc::clone(&defence);
        let _ = tokio::task::spawn_blocking(move || d.save_pass_cache(false)).await;
        if stop {
            return;
        }
    }
}

/// Removes temporary entries when they expire: it sleeps until the next
/// expiry (stored rounded up to the second, so never early), and at most a
/// second, so entries added meanwhile are seen; an entry is lifted well
/// within a second of its expiry.
async fn expire_entries(daemon: Arc<Daemon>, shutdown: CancellationToken) {
    loop {
        let next = {
            let policy = daemon.policy();
            policy.next_expiry()
        };
        let now = std::time::SystemTime::now();
        let wait = next
            .map(|t| t.duration_since(now).unwrap_or_default())
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let due = next.is_some_and(|t| t <= std::time::SystemTime::now());
        if due {
            let daemon = Arc::clone(&daemon);
            let result = tokio::task::spawn_blocking(move || {
                daemon.expire_entries(std::time::SystemTime::now())
            })
            .await;
            if let Ok(Err(e)) = result {
                tracing::error!(error = %logging::one_line(&e), "expiring temporary entries failed");
                // Not again at once: the entry is still due.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
