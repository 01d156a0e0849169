//! The Prometheus view of a [`Snapshot`]: the text format (version 0.0.4)
//! that `GET /metrics` serves ([`crate::metrics`] is the endpoint).
//!
//! Names follow the Prometheus conventions: a `smtpguard_` prefix, base
//! units, `_total` on counters, labels for the reason
//! (`smtpguard_xdp_dropped_total{reason="deny_list"}`). The XDP series and
//! their labels come from the counter names of
//! [`smtpguard_common::COUNTER_NAMES`].

use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::snapshot::Snapshot;
use crate::{
    front_door::{Rejection, Stage},
    kernel::CounterSnapshot,
    policy::ListKind,
};

/// How many entries get a per-entry hit series (the top ones by hits).
pub const TOP_ENTRIES: usize = 20;

type Labels = Vec<(String, String)>;

/// Registers `metric` under `name`. The encoder ends every help text with a
/// period of its own, so one at the end of `help` is dropped.
fn register(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: impl prometheus_client::registry::Metric,
) {
    registry.register(name, help.strip_suffix('.').unwrap_or(help), metric);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    register(registry, name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    register(registry, name, help, g);
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
    register(registry, name, help, family);
}

/// Screening per verdict, violations per kind, bans per event.
fn defence_series(r: &mut Registry, d: &crate::front_door::screening::DefenceSnapshot) {
    let verdicts: Vec<(String, u64)> = d
        .screening
        .named()
        .iter()
        .map(|(n, v)| (n.trim_start_matches("screening_").to_string(), *v))
        .collect();
    labelled(
        r,
        "smtpguard_screening",
        "Clients screened before the greeting, by verdict (pregreet, pass_new, pass_old, ...).",
        "verdict",
        &verdicts,
    );
    gauge(
        r,
        "smtpguard_screening_waiting",
        "Clients in the greet wait now.",
        d.screening.waiting as i64,
    );
    let violations: Vec<(String, u64)> = d
        .violations
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    labelled(
        r,
        "smtpguard_violations",
        "Violations reported towards automatic bans, by kind.",
        "kind",
        &violations,
    );
    let bans = [
        ("added".to_string(), d.bans_added),
        ("expired".to_string(), d.bans_expired),
        ("refused_full".to_string(), d.bans_refused_full),
        ("failed".to_string(), d.bans_failed),
        ("exempt".to_string(), d.violations_exempt),
    ];
    labelled(
        r,
        "smtpguard_bans",
        "Automatic bans, by event (exempt: violations of protected or permitted addresses).",
        "event",
        &bans,
    );
    gauge(
        r,
        "smtpguard_bans_in_force",
        "Automatic bans in force (entries of the auto deny list).",
        d.bans_in_force as i64,
    );
    gauge(
        r,
        "smtpguard_pass_cache_entries",
        "Clients in the pass cache.",
        d.pass_cache_entries as i64,
    );
}

/// The XDP counters, sorted into series by their names: `syn_v4` is
/// `smtpguard_xdp_syn{family="ipv4"}`, `drop_<reason>` is
/// `smtpguard_xdp_dropped{reason}`, `pass_<reason>` is
/// `smtpguard_xdp_passed{reason}`; `would_drop` passes, so it is a pass
/// reason as well as its own series. Sums (`syn`, `passed`), the per-family
/// drops and `log_suppressed` are not exported.
#[derive(Default)]
struct XdpSeries {
    packets: u64,
    would_drop: u64,
    syn: Vec<(String, u64)>,
    dropped: Vec<(String, u64)>,
    passed: Vec<(String, u64)>,
}

impl XdpSeries {
    fn of(counters: &CounterSnapshot) -> XdpSeries {
        let mut series = XdpSeries::default();
        for (name, value) in counters.named() {
            if name == "packets" {
                series.packets = value;
            } else if name == "would_drop" {
                series.would_drop = value;
                series.passed.push((name.to_string(), value));
            } else if let Some(family) = name.strip_prefix("syn_") {
                series.syn.push((format!("ip{family}"), value));
            } else if let Some(reason) = name.strip_prefix("drop_") {
                if !matches!(reason, "v4" | "v6") {
                    series.dropped.push((reason.to_string(), value));
                }
            } else if let Some(reason) = name.strip_prefix("pass_") {
                series.passed.push((reason.to_string(), value));
            }
        }
        series
    }
}

/// The exposition text for `snapshot`.
pub fn render(snapshot: &Snapshot) -> String {
    let mut r = Registry::default();
    if let Some(c) = &snapshot.xdp {
        let xdp = XdpSeries::of(c);
        counter(
            &mut r,
            "smtpguard_xdp_packets",
            "Packets the XDP program saw.",
            xdp.packets,
        );
        labelled(
            &mut r,
            "smtpguard_xdp_syn",
            "New-connection SYNs to the guarded ports.",
            "family",
            &xdp.syn,
        );
        labelled(
            &mut r,
            "smtpguard_xdp_dropped",
            "SYNs dropped, by reason.",
            "reason",
            &xdp.dropped,
        );
        counter(
            &mut r,
            "smtpguard_xdp_would_drop",
            "Monitor mode: SYNs that would have been dropped.",
            xdp.would_drop,
        );
        labelled(
            &mut r,
            "smtpguard_xdp_passed",
            "Packets passed, by reason.",
            "reason",
            &xdp.passed,
        );
        let family = Family::<Labels, Counter>::default();
        for e in snapshot.entry_hits.iter().take(TOP_ENTRIES) {
            family
                .get_or_create(&vec![
                    ("list".into(), e.list.as_str().into()),
                    ("prefix".into(), e.prefix.to_string()),
                ])
                .inc_by(e.hits);
        }
        register(
            &mut r,
            "smtpguard_xdp_entry_hits",
            "SYNs matched per list entry (top entries).",
            family,
        );
    }
    if let Some(m) = &snapshot.front_door {
        counter(
            &mut r,
            "smtpguard_connections_accepted_at_socket",
            "TCP connections accepted at the socket, whatever happened next.",
            m.accepted_at_socket,
        );
        counter(
            &mut r,
            "smtpguard_connections_greeted",
            "Sessions whose 220 greeting was written.",
            m.greeted,
        );
        let by_stage = |stage: Stage| -> Vec<(String, u64)> {
            Rejection::ALL
                .iter()
                .filter(|r| r.stage() == stage)
                .map(|r| (r.as_str().to_string(), m.rejected(*r)))
                .collect()
        };
        labelled(
            &mut r,
            "smtpguard_connections_refused",
            "Connections refused on accept, before any greeting, by reason.",
            "reason",
            &by_stage(Stage::Refused),
        );
        labelled(
            &mut r,
            "smtpguard_sessions_closed",
            "Sessions cut off with 421, by reason.",
            "reason",
            &by_stage(Stage::Closed),
        );
        labelled(
            &mut r,
            "smtpguard_commands_refused",
            "Commands refused while the session went on, by reason.",
            "reason",
            &by_stage(Stage::Replied),
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
    if let Some(d) = &snapshot.defence {
        defence_series(&mut r, d);
    }
    if let Some(d) = &snapshot.dnsbl {
        dnsbl(&mut r, d);
    }
    let family = Family::<Labels, Gauge>::default();
    for kind in [ListKind::Deny, ListKind::Permit] {
        let n = snapshot.entries(kind);
        for (fam, count) in [("ipv4", n.v4), ("ipv6", n.v6)] {
            family
                .get_or_create(&vec![
                    ("list".into(), kind.as_str().into()),
                    ("family".into(), fam.into()),
                ])
                .set(count as i64);
        }
    }
    register(
        &mut r,
        "smtpguard_list_entries",
        "Entries on each list.",
        family,
    );
    if let Some(u) = &snapshot.ipv6_table {
        ipv6_table(&mut r, u);
    }
    if let Some(load) = snapshot.last_list_load {
        gauge(
            &mut r,
            "smtpguard_list_last_load_timestamp_seconds",
            "When the lists were last loaded into the kernel (Unix time).",
            load.at_unix_secs as i64,
        );
        let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        g.set(load.duration_secs);
        register(
            &mut r,
            "smtpguard_list_last_load_duration_seconds",
            "How long the last list load took.",
            g,
        );
    }
    let mut out = String::new();
    let _ = prometheus_text::encode(&mut out, &r);
    out
}

/// How full the kernel IPv6 table is: what the list in force uses and
/// what a generation holds, for an alert before a change is refused.
fn ipv6_table(r: &mut Registry, u: &crate::kernel::ipv6_table::Usage) {
    for (name, help, value) in [
        (
            "smtpguard_kernel_ipv6_nodes",
            "Nodes of the kernel IPv6 table the list in force uses.",
            u.nodes,
        ),
        (
            "smtpguard_kernel_ipv6_nodes_max",
            "Nodes one generation of the kernel IPv6 table holds.",
            u.nodes_max,
        ),
        (
            "smtpguard_kernel_ipv6_leaves",
            "Leaves of the kernel IPv6 table the list in force uses.",
            u.leaves,
        ),
        (
            "smtpguard_kernel_ipv6_leaves_max",
            "Leaves one generation of the kernel IPv6 table holds.",
            u.leaves_max,
        ),
    ] {
        gauge(r, name, help, value as i64);
    }
}

/// The DNSBL series: verdicts and actions, then one series per site
/// (`site` label: the site's name).
fn dnsbl(r: &mut Registry, d: &crate::front_door::dnsbl_gate::GateSnapshot) {
    labelled(
        r,
        "smtpguard_dnsbl_verdicts",
        "DNSBL verdicts: clients at or over the threshold, and with a negative score.",
        "verdict",
        &[
            ("listed".into(), d.listed),
            ("allow_listed".into(), d.allow_listed),
        ],
    );
    labelled(
        r,
        "smtpguard_dnsbl_actions",
        "Listed clients dropped (521) or refused recipients (enforce).",
        "action",
        &[("drop".into(), d.dropped), ("enforce".into(), d.enforced)],
    );
    counter(
        r,
        "smtpguard_dnsbl_skipped",
        "Clients on a permit list, not asked about.",
        d.skipped,
    );
    gauge(
        r,
        "smtpguard_dnsbl_cache_entries",
        "Cached DNSBL answers.",
        d.cache_entries as i64,
    );
    let per_site = |pick: fn(&crate::dnsbl::SiteSnapshot) -> u64| -> Vec<(String, u64)> {
        d.sites.iter().map(|s| (s.name.clone(), pick(s))).collect()
    };
    for (name, help, pick) in [
        (
            "smtpguard_dnsbl_lookups",
            "DNS queries sent, per site.",
            (|s| s.lookups) as fn(&crate::dnsbl::SiteSnapshot) -> u64,
        ),
        ("smtpguard_dnsbl_hits", "Clients listed, per site.", |s| {
            s.hits
        }),
        (
            "smtpguard_dnsbl_cache_hits",
            "Answers taken from the cache, per site.",
            |s| s.cache_hits,
        ),
        (
            "smtpguard_dnsbl_timeouts",
            "Queries unanswered within the timeout, per site.",
            |s| s.timeouts,
        ),
        (
            "smtpguard_dnsbl_errors",
            "Queries that failed (SERVFAIL, 127.255.255.254/255, bad replies), per site.",
            |s| s.errors,
        ),
        (
            "smtpguard_dnsbl_nxdomain",
            "NXDOMAIN (not listed) answers, per site.",
            |s| s.nxdomain,
        ),
    ] {
        labelled(r, name, help, "site", &per_site(pick));
    }
    let family = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    for s in &d.sites {
        family
            .get_or_create(&vec![("site".into(), s.name.clone())])
            .inc_by(s.latency_seconds_sum);
    }
    register(
        r,
        "smtpguard_dnsbl_query_seconds",
        "Sum of DNS query latencies, per site (count: smtpguard_dnsbl_lookups_total).",
        family,
    );
}

#[cfg(test)]
mod tests {
    use smtpguard_common::{counter, COUNTER_COUNT};

    use super::*;

    #[test]
    fn dnsbl_series_per_site() {
        let site = |name: &str, lookups| crate::dnsbl::SiteSnapshot {
            name: name.into(),
            zone: format!("{name}.test"),
            lookups,
            hits: 2,
            cache_hits: 3,
            timeouts: 4,
            errors: 5,
            nxdomain: 6,
            latency_seconds_sum: 0.5,
        };
        let snapshot = Snapshot {
            xdp: None,
            entry_hits: Vec::new(),
            front_door: None,
            deny_entries: Default::default(),
            permit_entries: Default::default(),
            last_list_load: None,
            defence: None,
            dnsbl: Some(crate::front_door::dnsbl_gate::GateSnapshot {
                listed: 7,
                dropped: 7,
                cache_entries: 9,
                sites: vec![site("zen", 11), site("dnswl", 12)],
                ..Default::default()
            }),
            ipv6_table: Some(crate::kernel::ipv6_table::Usage {
                prefixes: 3,
                nodes: 12,
                nodes_max: 262_144,
                leaves: 40,
                leaves_max: 1_048_576,
            }),
        };
        let text = render(&snapshot);
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("# HELP") && l.ends_with("..")),
            "{text}"
        );
        for line in [
            "smtpguard_dnsbl_verdicts_total{verdict=\"listed\"} 7",
            "smtpguard_dnsbl_actions_total{action=\"drop\"} 7",
            "smtpguard_dnsbl_cache_entries 9",
            "smtpguard_kernel_ipv6_nodes 12",
            "smtpguard_kernel_ipv6_nodes_max 262144",
            "smtpguard_kernel_ipv6_leaves 40",
            "smtpguard_kernel_ipv6_leaves_max 1048576",
            "smtpguard_dnsbl_lookups_total{site=\"zen\"} 11",
            "smtpguard_dnsbl_lookups_total{site=\"dnswl\"} 12",
            "smtpguard_dnsbl_timeouts_total{site=\"zen\"} 4",
            "smtpguard_dnsbl_errors_total{site=\"zen\"} 5",
            "smtpguard_dnsbl_cache_hits_total{site=\"zen\"} 3",
            "smtpguard_dnsbl_query_seconds_total{site=\"zen\"} 0.5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn xdp_series_come_from_the_counter_names() {
        let mut values = [0u64; COUNTER_COUNT as usize];
        for (i, v) in values.iter_mut().enumerate() {
            *v = 100 + i as u64;
        }
        let xdp = XdpSeries::of(&CounterSnapshot(values));
        let get = |list: &[(String, u64)], label: &str| {
            list.iter().find(|(l, _)| l == label).map(|(_, v)| *v)
        };
        assert_eq!(xdp.packets, 100 + counter::PACKETS as u64);
        assert_eq!(xdp.would_drop, 100 + counter::WOULD_DROP as u64);
        assert_eq!(get(&xdp.syn, "ipv4"), Some(100 + counter::SYN_V4 as u64));
        assert_eq!(get(&xdp.syn, "ipv6"), Some(100 + counter::SYN_V6 as u64));
        assert_eq!(xdp.syn.len(), 2);
        let dropped: Vec<&str> = xdp.dropped.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(dropped, ["deny_list", "not_permitted", "rate_limit"]);
        let passed: Vec<&str> = xdp.passed.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            passed,
            [
                "would_drop",
                "not_ip",
                "not_tcp",
                "other_port",
                "not_syn",
                "permitted",
                "malformed",
                "vlan_depth",
                "ipv6_chain",
                "fragment",
                "filter_off",
                "esp",
            ]
        );
        assert_eq!(
            get(&xdp.passed, "esp"),
            Some(100 + counter::PASS_ESP as u64)
        );
    }
}
