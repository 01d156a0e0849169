//! The optional Prometheus endpoint (`metrics.listen`): `GET /metrics` in
//! the Prometheus text format (version 0.0.4), built at each scrape from
//! the same counters `smtpguard stats` shows, so the two always agree.
//!
//! Names follow the Prometheus conventions: a `smtpguard_` prefix, base
//! units, `_total` on counters, labels for the reason
//! (`smtpguard_xdp_dropped_total{reason="deny_list"}`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use smtpguard_common::counter;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

use crate::{daemon::Daemon, policy::ListKind};

/// How many entries get a per-entry hit series (the top ones by hits).
pub const TOP_ENTRIES: usize = 20;

type Labels = Vec<(String, String)>;

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn labelled(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[(String, u64)],
) {
    let family = Family::<Labels, Counter>::default();
    for (value, n) in values {
        family
            .get_or_create(&vec![(label.to_string(), value.clone())])
            .inc_by(*n);
    }
    registry.register(name, help, family);
}

/// The exposition text for the daemon's current state.
pub fn render(daemon: &Daemon) -> String {
    let mut r = Registry::default();
    if let Some(c) = daemon.counters() {
        counter(
            &mut r,
            "smtpguard_xdp_packets",
            "Packets the XDP program saw.",
            c.get(counter::PACKETS),
        );
        let syn = [
            ("ipv4".to_string(), c.get(counter::SYN_V4)),
            ("ipv6".to_string(), c.get(counter::SYN_V6)),
        ];
        labelled(
            &mut r,
            "smtpguard_xdp_syn",
            "New-connection SYNs to the guarded ports.",
            "family",
            &syn,
        );
        let dropped = [
            ("deny_list".to_string(), c.get(counter::DROP_DENY_LIST)),
            (
                "not_permitted".to_string(),
                c.get(counter::DROP_NOT_PERMITTED),
            ),
        ];
        labelled(
            &mut r,
            "smtpguard_xdp_dropped",
            "SYNs dropped, by reason.",
            "reason",
            &dropped,
        );
        counter(
            &mut r,
            "smtpguard_xdp_would_drop",
            "Monitor mode: SYNs that would have been dropped.",
            c.get(counter::WOULD_DROP),
        );
        let passed: Vec<(String, u64)> = [
            ("not_ip", counter::PASS_NOT_IP),
            ("not_tcp", counter::PASS_NOT_TCP),
            ("other_port", counter::PASS_OTHER_PORT),
            ("not_syn", counter::PASS_NOT_SYN),
            ("permitted", counter::PASS_PERMITTED),
            ("malformed", counter::PASS_MALFORMED),
            ("vlan_depth", counter::PASS_VLAN_DEPTH),
            ("ipv6_chain", counter::PASS_IPV6_CHAIN),
            ("fragment", counter::PASS_FRAGMENT),
            ("filter_off", counter::PASS_FILTER_OFF),
            ("esp", counter::PASS_ESP),
            ("would_drop", counter::WOULD_DROP),
        ]
        .iter()
        .map(|(name, index)| (name.to_string(), c.get(*index)))
        .collect();
        labelled(
            &mut r,
            "smtpguard_xdp_passed",
            "Packets passed, by reason.",
            "reason",
            &passed,
        );
        let mut hits: Vec<_> = daemon.hits_by_prefix().into_iter().collect();
        hits.sort_by_key(|e| std::cmp::Reverse(e.1));
        let family = Family::<Labels, Counter>::default();
        let policy = daemon.policy();
        for (prefix, n) in hits.into_iter().take(TOP_ENTRIES) {
            let list = if policy.list(ListKind::Deny).get(prefix).is_some() {
                "deny"
            } else {
                "permit"
            };
            family
                .get_or_create(&vec![
                    ("list".into(), list.into()),
                    ("prefix".into(), prefix.to_string()),
                ])
                .inc_by(n);
        }
        r.register(
            "smtpguard_xdp_entry_hits",
            "SYNs matched per list entry (top entries).",
            family,
        );
    }
    if let Some(server) = daemon.server() {
        let m = server.metrics().snapshot();
        counter(
            &mut r,
            "smtpguard_connections_accepted",
            "TCP connections accepted by the front door.",
            m.connections_accepted,
        );
        let rejected: Vec<(String, u64)> = m
            .rejected
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        labelled(
            &mut r,
            "smtpguard_connections_rejected",
            "Connections refused, by reason.",
            "reason",
            &rejected,
        );
        gauge(
            &mut r,
            "smtpguard_connections_open",
            "Sessions open now.",
            m.open_connections as i64,
        );
        let tls = [
            ("ok".to_string(), m.tls_handshakes_ok),
            ("failed".to_string(), m.tls_handshakes_failed),
        ];
        labelled(
            &mut r,
            "smtpguard_tls_handshakes",
            "STARTTLS handshakes, by result.",
            "result",
            &tls,
        );
        counter(
            &mut r,
            "smtpguard_messages_accepted",
            "Messages acknowledged with 250 (spooled or accepted upstream).",
            m.messages_accepted,
        );
        counter(
            &mut r,
            "smtpguard_handoff_failures",
            "Hand-offs that failed on our side (451).",
            m.handoff_failures,
        );
    }
    let policy = daemon.policy();
    let family = Family::<Labels, Gauge>::default();
    for kind in [ListKind::Deny, ListKind::Permit] {
        let n = policy.list(kind).len();
        for (fam, count) in [("ipv4", n.v4), ("ipv6", n.v6)] {
            family
                .get_or_create(&vec![
                    ("list".into(), kind.as_str().into()),
                    ("family".into(), fam.into()),
                ])
                .set(count as i64);
        }
    }
    r.register("smtpguard_list_entries", "Entries on each list.", family);
    if let Some((at, seconds)) = daemon.last_list_load() {
        gauge(
            &mut r,
            "smtpguard_list_last_load_timestamp_seconds",
            "When the lists were last loaded into the kernel (Unix time).",
            at as i64,
        );
        let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        g.set(seconds);
        r.register(
            "smtpguard_list_last_load_duration_seconds",
            "How long the last list load took.",
            g,
        );
    }
    let mut out = String::new();
    let _ = prometheus_text::encode(&mut out, &r);
    out
}

/// Serves `GET /metrics` on `address` until `shutdown`.
pub async fn serve(address: SocketAddr, daemon: Arc<Daemon>, shutdown: CancellationToken) {
    let listener = match TcpListener::bind(address).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%address, error = %e, "cannot listen for metrics; the endpoint is off");
            return;
        }
    };
    tracing::info!(%address, "serving Prometheus metrics on /metrics");
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
        };
        let daemon = Arc::clone(&daemon);
        tokio::spawn(async move {
            // One small request per connection, read with a deadline and a bound.
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let (status, content_type, body) = if request.starts_with("GET /metrics ") {
                let body = tokio::task::spawn_blocking(move || render(&daemon))
                    .await
                    .unwrap_or_default();
                ("200 OK", prometheus_text::CONTENT_TYPE, body)
            } else {
                (
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    "only GET /metrics is served\n".to_string(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
