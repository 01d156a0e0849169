//! What the daemon tells the operator: the startup summary and the
//! periodic XDP counter line.

use std::{collections::HashMap, fmt::Write as _, sync::Arc, time::Duration};

use smtpguard_common::counter;
use tokio_util::sync::CancellationToken;

use ipnet::IpNet;

use super::{snapshot::Snapshot, state::Daemon};
use crate::{
    config::{Delivery, TlsMode, UpstreamProtocol},
    kernel::CounterSnapshot,
    policy::{ListKind, SourceName},
};

/// The one summary printed at start: interfaces and XDP mode, ports, list
/// sizes, TLS, where mail goes, where the control socket is.
pub fn summary(daemon: &Daemon, tls_expiry: Option<&str>) -> String {
    let config = daemon.config();
    let policy = daemon.policy();
    let mut out = String::new();
    let _ = writeln!(out, "smtpguard {} running", env!("CARGO_PKG_VERSION"));
    let config_source = daemon
        .config_path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "embedded development default".into());
    let _ = writeln!(out, "  config:      {config_source}");
    let xdp = if daemon.attachments.is_empty() {
        "off (the front door applies the lists)".to_string()
    } else {
        daemon
            .attachments
            .iter()
            .map(|a| format!("{} ({} mode)", a.interface, a.mode))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "  XDP:         {xdp}");
    let listen: Vec<String> = config.server.listen.iter().map(|a| a.to_string()).collect();
    let ports: Vec<String> = config.server.ports().iter().map(u16::to_string).collect();
    let _ = writeln!(
        out,
        "  listening:   {} (guarded ports: {})",
        listen.join(", "),
        ports.join(", ")
    );
    for kind in [ListKind::Deny, ListKind::Permit] {
        let n = policy.total_len(kind);
        let path = super::paths::list_path(&config, &SourceName::local(), kind);
        let _ = writeln!(
            out,
            "  {:<12} {} entries (IPv4 {}, IPv6 {}) from {}",
            format!("{kind}:"),
            n.total(),
            n.v4,
            n.v6,
            path.display()
        );
    }
    let _ = writeln!(
        out,
        "  policy:      {}, {}",
        policy.mode(),
        policy.enforcement()
    );
    let limit = config
        .server
        .max_connections
        .map(|n| format!("at most {n} simultaneous connections"))
        .unwrap_or_else(|| "no connection limit".into());
    let _ = writeln!(
        out,
        "  limits:      {limit}, idle timeout {}, sessions up to {}",
        humantime::format_duration(config.server.idle_timeout),
        humantime::format_duration(config.server.max_session_duration)
    );
    let tls = match config.tls.mode {
        TlsMode::Off => "off".to_string(),
        TlsMode::Optional => format!(
            "STARTTLS offered{}",
            tls_expiry.map(|e| format!(", {e}")).unwrap_or_default()
        ),
        TlsMode::Required => format!(
            "STARTTLS required{}",
            tls_expiry.map(|e| format!(", {e}")).unwrap_or_default()
        ),
    };
    let _ = writeln!(out, "  TLS:         {tls}");
    let _ = writeln!(out, "  mail:        {}", delivery_line(&config));
    let _ = write!(out, "  control:     {}", config.control.socket.display());
    out
}

/// Logs the XDP counters every `interval`, only when they changed: SYNs,
/// drops per reason, passes, unparsed packets, and the entries with the
/// most hits in that interval. A view of [`Snapshot`], as `stats` is.
pub async fn log_counters(daemon: Arc<Daemon>, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<CounterSnapshot> = None;
    let mut last_hits: HashMap<IpNet, u64> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let snapshot = Snapshot::collect(&daemon);
        let Some(now) = snapshot.xdp else {
            return;
        };
        let delta = last.map(|l| now.since(&l)).unwrap_or(now);
        last = Some(now);
        let mut top: Vec<(IpNet, u64)> = snapshot
            .entry_hits
            .iter()
            .map(|e| {
                let before = last_hits.get(&e.prefix).copied().unwrap_or(0);
                (e.prefix, e.hits.saturating_sub(before))
            })
            .filter(|(_, d)| *d > 0)
            .collect();
        last_hits = snapshot
            .entry_hits
            .iter()
            .map(|e| (e.prefix, e.hits))
            .collect();
        if delta.get(counter::PACKETS) == 0 {
            continue;
        }
        top.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        let top: Vec<String> = top
            .iter()
            .take(5)
            .map(|(prefix, n)| format!("{prefix}={n}"))
            .collect();
        let unparsed = delta.get(counter::PASS_MALFORMED)
            + delta.get(counter::PASS_VLAN_DEPTH)
            + delta.get(counter::PASS_IPV6_CHAIN)
            + delta.get(counter::PASS_FRAGMENT)
            + delta.get(counter::PASS_ESP);
        tracing::info!(
            interval_s = interval.as_secs(),
            syn = delta.get(counter::SYN),
            dropped_deny_list = delta.get(counter::DROP_DENY_LIST),
            dropped_not_permitted = delta.get(counter::DROP_NOT_PERMITTED),
            would_drop = delta.get(counter::WOULD_DROP),
            passed = delta.get(counter::PASSED),
            unparsed,
            log_suppressed = delta.get(counter::LOG_SUPPRESSED),
            top = %top.join(" "),
            "xdp counters"
        );
    }
}

/// Where mail goes, in words: `relayed to 127.0.0.1:10025 with PROXY
/// protocol v2` or `spooled to /var/spool/smtpguard (Maildir)`.
pub fn delivery_line(config: &crate::config::Config) -> String {
    match &config.delivery {
        Delivery::Upstream(u) => {
            let how = match u.protocol {
                UpstreamProtocol::ProxyV2 => "PROXY protocol v2",
                UpstreamProtocol::Xclient => "XCLIENT",
                UpstreamProtocol::None => "plain SMTP",
            };
            format!("relayed to {} with {how}", u.address)
        }
        Delivery::Spool(s) => format!("spooled to {} (Maildir)", s.dir.display()),
    }
}
