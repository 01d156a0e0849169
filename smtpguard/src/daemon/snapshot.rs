//! One reading of everything the daemon counts, taken at once: the XDP
//! counters and per-entry hits, the front door's counters, the list sizes
//! and the last list load. `smtpguard stats` (the control reply), the
//! Prometheus endpoint and the periodic log line are views of this value,
//! so they always agree.

use ipnet::IpNet;

use super::state::{Daemon, ListLoad};
use crate::{
    front_door::MetricsSnapshot,
    kernel::{ipv6_table::Usage as Ipv6Usage, CounterSnapshot},
    policy::{FamilyCounts, ListKind},
};

/// The daemon's counters at one moment. Plain data: collecting it takes
/// the locks once, rendering it takes none.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The XDP program's verdict counters (packets); `None` without XDP.
    pub xdp: Option<CounterSnapshot>,
    /// Hits of the list entries that have any, most hits first (ties in
    /// prefix order); empty without XDP.
    pub entry_hits: Vec<EntryHits>,
    /// The front door's counters; `None` until it runs.
    pub front_door: Option<MetricsSnapshot>,
    /// Entries on the deny list, by family.
    pub deny_entries: FamilyCounts,
    /// Entries on the permit list, by family.
    pub permit_entries: FamilyCounts,
    /// The last whole-list load into the kernel, if any.
    pub last_list_load: Option<ListLoad>,
    /// Screening and automatic bans; `None` until the front door runs.
    pub defence: Option<crate::front_door::screening::DefenceSnapshot>,
    /// DNSBL counters; `None` without `[dnsbl]`.
    pub dnsbl: Option<crate::front_door::dnsbl_gate::GateSnapshot>,
    /// How full the kernel IPv6 table is; `None` without XDP.
    pub ipv6_table: Option<Ipv6Usage>,
}

/// One list entry's hit counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryHits {
    /// The list the kernel rule stands for ([`crate::policy::Policy::list_holding`]).
    pub list: ListKind,
    /// The entry, canonical.
    pub prefix: IpNet,
    /// SYNs it decided since it was installed (count).
    pub hits: u64,
}

impl Snapshot {
    /// Reads every counter of `daemon`: the kernel's under one hold of its
    /// lock, then the front door's, then the policy in force.
    pub fn collect(daemon: &Daemon) -> Snapshot {
        let (xdp, hits, ipv6_table) = {
            let guard = daemon.kernel.lock().expect("kernel lock");
            match guard.as_ref() {
                Some(kernel) => (
                    Some(kernel.stats.counters()),
                    kernel.hits_by_prefix(),
                    Some(kernel.sync.ipv6_usage()),
                ),
                None => (None, Vec::new(), None),
            }
        };
        let policy = daemon.policy();
        // A prefix on no list is one being removed right now: not shown.
        let mut entry_hits: Vec<EntryHits> = hits
            .into_iter()
            .filter_map(|(prefix, hits)| {
                policy
                    .list_holding(prefix)
                    .map(|list| EntryHits { list, prefix, hits })
            })
            .collect();
        entry_hits.sort_by(|a, b| b.hits.cmp(&a.hits).then(a.prefix.cmp(&b.prefix)));
        Snapshot {
            xdp,
            entry_hits,
            front_door: daemon.server().map(|s| s.metrics().snapshot()),
            deny_entries: policy.total_len(ListKind::Deny),
            permit_entries: policy.total_len(ListKind::Permit),
            last_list_load: daemon.last_list_load(),
            defence: daemon.defence_snapshot(),
            dnsbl: daemon
                .server()
                .and_then(|s| s.dnsbl())
                .map(|g| g.snapshot()),
            ipv6_table,
        }
    }

    /// The size of one list, by family.
    pub fn entries(&self, kind: ListKind) -> FamilyCounts {
        match kind {
            ListKind::Deny => self.deny_entries,
            ListKind::Permit => self.permit_entries,
        }
    }
}
