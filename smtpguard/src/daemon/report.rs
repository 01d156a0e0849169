//! What the daemon tells the operator: the startup summary and the
//! periodic XDP counter line.

use std::{collections::HashMap, fmt::Write as _, sync::Arc, time::Duration};

use smtpguard_common::counter;
use tokio_util::sync::CancellationToken;

use ipnet::IpNet;

use super::{snapshot::Snapshot, state::Daemon};
use crate::{
    config::{Delivery, TlsMode, UpstreamProtocol},
    front_door,
    kernel::CounterSnapshot,
    policy::{ListKind, SourceName},
};

/// The one summary given at start: interfaces and XDP mode, ports, list
/// sizes, TLS, where mail goes, where the control socket is. Printed as
/// lines of text ([`Summary::text`]), or logged as one event with a field
/// each ([`Summary::log`]) when the log is JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The configuration file.
    pub config: String,
    /// Interfaces with their XDP mode, or why there are none.
    pub xdp: String,
    /// The SMTP listeners, comma-separated.
    pub listen: String,
    /// The ports XDP guards, comma-separated.
    pub guarded_ports: String,
    /// `N entries (IPv4 N, IPv6 N) from PATH`.
    pub deny_list: String,
    /// As `deny_list`.
    pub permit_list: String,
    /// Mode and enforcement.
    pub policy: String,
    /// Connection cap, idle timeout, session length.
    pub limits: String,
    /// TLS mode and the certificate's expiry.
    pub tls: String,
    /// Where mail goes.
    pub mail: String,
    /// The control socket.
    pub control: String,
}

impl Summary {
    /// Reads the running daemon's settings.
    pub fn new(daemon: &Daemon, tls_expiry: Option<&str>) -> Summary {
        let config = daemon.config();
        let policy = daemon.policy();
        let xdp = if daemon.attachments.is_empty() {
            "off (the front door applies the lists)".to_string()
        } else {
            daemon
                .attachments
                .iter()
                .map(|a| format!("{} ({} mode, pinned: {})", a.interface, a.mode, a.pin))
                .collect::<Vec<_>>()
                .join(", ")
                + &rate_limit_note(&config.rate_limit)
        };
        let listen: Vec<String> = config
            .server
            .listen
            .iter()
            .map(
                |&a| match front_door::is_dual_stack(a, &config.server.listen) {
                    true => format!("{a} (IPv4 and IPv6)"),
                    false => a.to_string(),
                },
            )
            .collect();
        let ports: Vec<String> = config.server.ports().iter().map(u16::to_string).collect();
        let list = |kind: ListKind| {
            let n = policy.total_len(kind);
            let path = super::paths::list_path(&config, &SourceName::local(), kind);
            format!(
                "{} (IPv4 {}, IPv6 {}) from {}",
                crate::policy::entries(n.total()),
                n.v4,
                n.v6,
                path.display()
            )
        };
        let limit = config
            .server
            .max_connections
            .map(|n| format!("at most {n} simultaneous connections"))
            .unwrap_or_else(|| "no connection limit".into());
        let expiry = tls_expiry.map(|e| format!(", {e}")).unwrap_or_default();
        let tls = match config.tls.mode {
            TlsMode::Off => "off".to_string(),
            TlsMode::Optional => format!("STARTTLS offered{expiry}"),
            TlsMode::Required => format!("STARTTLS required{expiry}"),
        };
        Summary {
            config: daemon
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "embedded development default".into()),
            xdp,
            listen: listen.join(", "),
            guarded_ports: ports.join(", "),
            deny_list: list(ListKind::Deny),
            permit_list: list(ListKind::Permit),
            policy: format!("{}, {}", policy.mode(), policy.enforcement()),
            limits: format!(
                "{limit}, idle timeout {}, sessions up to {}",
                humantime::format_duration(config.server.idle_timeout),
                humantime::format_duration(config.server.max_session_duration)
            ),
            tls,
            mail: delivery_line(&config),
            control: config.control.socket.display().to_string(),
        }
    }

    /// The text form: a heading and one line per setting.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "smtpguard {} running", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(out, "  config:      {}", self.config);
        let _ = writeln!(out, "  XDP:         {}", self.xdp);
        let _ = writeln!(
            out,
            "  listening:   {} (guarded ports: {})",
            self.listen, self.guarded_ports
        );
        let _ = writeln!(out, "  deny list:   {}", self.deny_list);
        let _ = writeln!(out, "  permit list: {}", self.permit_list);
        let _ = writeln!(out, "  policy:      {}", self.policy);
        let _ = writeln!(out, "  limits:      {}", self.limits);
        let _ = writeln!(out, "  TLS:         {}", self.tls);
        let _ = writeln!(out, "  mail:        {}", self.mail);
        let _ = write!(out, "  control:     {}", self.control);
        out
    }

    /// The event form: `smtpguard running` with a field per setting.
    pub fn log(&self) {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %self.config,
            xdp = %self.xdp,
            listen = %self.listen,
            guarded_ports = %self.guarded_ports,
            deny_list = %self.deny_list,
            permit_list = %self.permit_list,
            policy = %self.policy,
            limits = %self.limits,
            tls = %self.tls,
            mail = %self.mail,
            control = %self.control,
            "smtpguard running"
        );
    }
}

/// Logs the XDP counters every `interval`, only when a drop or a refusal
/// changed (traffic that merely passed is not news): SYNs, drops per
/// reason, passes, unparsed packets, front-door refusals, and the entries
/// with the most hits in that interval. A view of [`Snapshot`], as `stats` is.
pub async fn log_counters(daemon: Arc<Daemon>, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<CounterSnapshot> = None;
    let mut last_hits: HashMap<IpNet, u64> = HashMap::new();
    let mut last_refused = 0;
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
        // Refusals by the front door (lists, caps, timeouts...) since the
        // last line.
        let refused_total = snapshot
            .front_door
            .as_ref()
            .map_or(0, |f| f.rejected.values().sum::<u64>() + f.would_deny);
        let refused = refused_total.saturating_sub(last_refused);
        last_refused = refused_total;
        // Only a drop or a refusal is news; passing traffic is not.
        let dropped = delta.dropped() + delta.get(counter::WOULD_DROP);
        if dropped == 0 && refused == 0 {
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
            dropped_rate_limit = delta.get(counter::DROP_RATE_LIMIT),
            would_drop = delta.get(counter::WOULD_DROP),
            passed = delta.get(counter::PASSED),
            unparsed,
            log_suppressed = delta.get(counter::LOG_SUPPRESSED),
            refused,
            top = %top.join(" "),
            "xdp counters"
        );
    }
}

/// `; SYN rate limit 60/min per client (IPv6 per /64, permitted exempt)`,
/// or nothing when the limit is off.
fn rate_limit_note(r: &crate::config::RateLimitConfig) -> String {
    if r.syns_per_minute == 0 {
        return String::new();
    }
    let exempt = if r.exempt_permitted {
        ", permitted exempt"
    } else {
        ""
    };
    format!(
        "; SYN rate limit {}/min per client (IPv6 per /{}{exempt})",
        r.syns_per_minute, r.ipv6_prefix
    )
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
