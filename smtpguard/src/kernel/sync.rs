//! The one owner of the XDP program's list and configuration maps.
//!
//! Lists reach the kernel as a set of `(prefix, action)` pairs (the policy
//! module merges the permit and deny lists into it). IPv4 goes to the
//! compiled table ([`super::ipv4_table`]), IPv6 to its compiled trie
//! ([`super::ipv6_table`]). Two ways to apply:
//! - [`ApplyHow::Incremental`]: only the differences are written to the
//!   active generation, entry by entry (each single update is atomic).
//! - [`ApplyHow::Atomic`]: the whole set is written into the inactive
//!   generation, then one write of the config record switches the program
//!   over. The program never sees half of the old and half of the new list;
//!   if the inactive generation runs out of space the old list stays in force.
//!
//! Keys are canonical (host bits zero): the kernel stores whatever prefix
//! bits it is given, so `10.9.9.9/8` would alias `10.0.0.0/8`.
//!
//! IPv6 has its own structure and generation ([`Ipv6Table`]): every IPv6
//! change, single or whole-list, is compiled and switched to at once.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    maps::{Array, MapData, MapError},
    Ebpf,
};
use ipnet::IpNet;
use smtpguard_common::{
    map_names, Action, Enforcement, Mode, Rule, RuntimeConfig, MAX_PORTS, MAX_RULE_IDS,
};

use std::sync::Arc;

use super::{
    hits::HitsMapping,
    ipv4_table::{
        compile::{leaf_entry, Ipv4Rule},
        writer::{Ipv4Table, Ipv4TableError},
    },
    ipv6_table::{Ipv6Table, Ipv6TableError},
    rate_limit::RateLimitSettings,
    rule_book::{self, RuleBook},
    KernelError,
};

/// Errors while writing the maps.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A trie is full (or the kernel is out of memory); the old list stays
    /// in force (the errors that wrap this say so where it matters).
    #[error("kernel {family} list is full after {written} of {wanted} prefixes")]
    Full {
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// Prefixes written before the failure.
        written: usize,
        /// Prefixes that needed to fit.
        wanted: usize,
        #[source]
        source: MapError,
    },
    /// The IPv4 table holds fewer prefixes than the list; the old list
    /// stays in force (the errors that wrap this say so where it matters).
    #[error("kernel IPv4 list is full after {written} of {wanted} prefixes")]
    Ipv4Full {
        /// Prefixes that fit (the capacity), or were written before the failure.
        written: usize,
        /// Prefixes that needed to fit.
        wanted: usize,
    },
    /// The IPv4 table could not take a change.
    #[error("updating the kernel IPv4 table")]
    Ipv4Table(#[source] Ipv4TableError),
    /// More than [`MAX_RULE_IDS`] distinct prefixes.
    #[error("too many prefixes: {0} (at most {max})", max = MAX_RULE_IDS - 1)]
    TooManyRules(usize),
    /// The IPv6 table could not be written; the IPv6 list in force stays
    /// (the errors that wrap this say so where it matters).
    #[error(transparent)]
    Ipv6(Ipv6TableError),
    /// More ports than the program watches.
    #[error("at most {MAX_PORTS} SMTP ports can be guarded, got {0}")]
    TooManyPorts(usize),
    /// Any other map operation failed.
    #[error("updating kernel map {map}")]
    Map {
        /// Map name.
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// How [`MapSync::apply`] writes a new set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyHow {
    /// Write only the differences into the live tries.
    Incremental,
    /// Build the new set in the inactive generation, then switch.
    Atomic,
}

/// What an apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Prefixes newly in the kernel.
    pub added: usize,
    /// Prefixes whose action changed.
    pub changed: usize,
    /// Prefixes taken out.
    pub removed: usize,
    /// Prefixes in force afterwards.
    pub total: usize,
}

/// Owner of the runtime record (`SG_CONFIG`), the IPv4 table and the IPv6
/// table. See the module docs.
pub struct MapSync {
    config_map: Array<MapData, RuntimeConfig>,
    v4: Ipv4Table,
    v6: Ipv6Table,
    /// The record last written to `SG_CONFIG`.
    runtime: RuntimeConfig,
    /// What the active generation holds, so applies can be diffs, with
    /// the rule ids: stable across applies so hit counters keep their
    /// meaning.
    installed: RuleBook,
    /// Hit counters: an id handed to a new prefix starts from zero.
    hits: Arc<HitsMapping>,
}

impl MapSync {
    pub(crate) fn take_from(
        ebpf: &mut Ebpf,
        hits: Arc<HitsMapping>,
        capacity: u32,
    ) -> Result<Self, KernelError> {
        fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
        where
            T: TryFrom<aya::maps::Map>,
        {
            ebpf.take_map(name)
                .and_then(|m| T::try_from(m).ok())
                .ok_or(KernelError::MissingMap(name))
        }
        let mut sync = MapSync {
            config_map: take(ebpf, map_names::CONFIG)?,
            v4: Ipv4Table::take_from(ebpf, 0, capacity as usize)?,
            v6: Ipv6Table::take_from(ebpf, capacity as usize)?,
            runtime: RuntimeConfig::zeroed(),
            installed: RuleBook::default(),
            hits,
        };
        sync.write_runtime().map_err(KernelError::InitialConfig)?;
        Ok(sync)
    }

    /// Sets mode, enforcement, guarded ports (host byte order) and the drop
    /// log rate (events per second). Takes effect on the next packet.
    pub fn set_runtime(
        &mut self,
        mode: Mode,
        enforcement: Enforcement,
        ports: &[u16],
        log_rate_per_sec: u32,
    ) -> Result<(), SyncError> {
        let ports: BTreeSet<u16> = ports.iter().copied().collect();
        if ports.len() > MAX_PORTS {
            return Err(SyncError::TooManyPorts(ports.len()));
        }
        self.runtime.mode = mode as u32;
        self.runtime.enforcement = enforcement as u32;
        self.runtime.port_count = ports.len() as u32;
        self.runtime.ports = [0; MAX_PORTS];
        for (slot, port) in self.runtime.ports.iter_mut().zip(&ports) {
            *slot = port.to_be();
        }
        self.runtime.log_rate_per_sec = log_rate_per_sec;
        self.write_runtime()
    }

    /// Sets the per-client SYN rate limit. Takes effect on the next packet;
    /// buckets already in the table keep their state.
    pub fn set_rate_limit(&mut self, settings: &RateLimitSettings) -> Result<(), SyncError> {
        settings.write_into(&mut self.runtime);
        self.write_runtime()
    }

    /// The record currently in force.
    pub fn runtime(&self) -> RuntimeConfig {
        self.runtime
    }

    fn write_runtime(&mut self) -> Result<(), SyncError> {
        self.config_map
            .set(0, self.runtime, 0)
            .map_err(|source| SyncError::Map {
                map: map_names::CONFIG,
                source,
            })
    }

    /// Prefixes in force: (IPv4, IPv6).
    pub fn len(&self) -> (usize, usize) {
        self.installed.len()
    }

    /// Whether no prefix is in force.
    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    /// Takes every free IPv4 group slot (see `Ipv4Table::use_up_slots`), so
    /// that the next single change needing one falls back to writing the
    /// whole list into the other generation (tests).
    #[cfg(any(test, feature = "test-support"))]
    pub fn use_up_ipv4_slots(&mut self) {
        self.v4.use_up_slots();
    }

    /// How full the kernel IPv6 table is.
    pub fn ipv6_usage(&self) -> super::ipv6_table::Usage {
        self.v6.usage()
    }

    /// The prefix behind a rule id, for reporting hit counters.
    pub fn prefix_of(&self, rule_id: u32) -> Option<IpNet> {
        self.installed.prefix_of(rule_id)
    }

    /// Makes the kernel hold exactly `rules`. Prefixes are truncated to
    /// canonical form; a prefix given twice takes its last action. On
    /// error nothing changed for `Atomic`; for `Incremental` the entries
    /// written so far stay (each is a complete, valid entry).
    pub fn apply(
        &mut self,
        rules: &[(IpNet, Action)],
        how: ApplyHow,
    ) -> Result<ApplyReport, SyncError> {
        if rules.len() >= MAX_RULE_IDS as usize {
            return Err(SyncError::TooManyRules(rules.len()));
        }
        // Sorted once: the diff against the book is a merge, and the
        // IPv4 compiler takes the order as it is.
        let wanted = rule_book::canonical(rules);
        match how {
            ApplyHow::Incremental => self.apply_incremental(&wanted),
            ApplyHow::Atomic => self.apply_atomic(&wanted),
        }
    }

    /// `wanted`: sorted, one entry per prefix ([`rule_book::canonical`]).
    fn apply_incremental(&mut self, wanted: &[(IpNet, Action)]) -> Result<ApplyReport, SyncError> {
        // Removals first: they make room for the additions.
        let mut changes: Vec<(IpNet, Option<Action>)> = Vec::new();
        let mut set = Vec::new();
        let mut old = self.installed.iter().peekable();
        for &(net, action) in wanted {
            while let Some((gone, _)) = old.next_if(|(o, _)| **o < net) {
                changes.push((*gone, None));
            }
            match old.next_if(|(o, _)| **o == net) {
                Some((_, i)) if i.action == action => {}
                _ => set.push((net, Some(action))),
            }
        }
        changes.extend(old.map(|(gone, _)| (*gone, None)));
        changes.extend(set);
        self.update(&changes)
    }

    /// Changes single prefixes in the live tries: `Some(action)` installs or
    /// changes one, `None` removes it. Costs one map write per change,
    /// whatever the list size: this is the path of `smtpguard deny add`.
    /// On error the changes before the failing one stay applied.
    pub fn update(
        &mut self,
        changes: &[(IpNet, Option<Action>)],
    ) -> Result<ApplyReport, SyncError> {
        let result = self.update_each(changes);
        // After a failure too: the changes before it stay in force.
        self.follow_summary();
        result
    }

    /// [`MapSync::update`] without the summary flag.
    fn update_each(
        &mut self,
        changes: &[(IpNet, Option<Action>)],
    ) -> Result<ApplyReport, SyncError> {
        let mut report = ApplyReport::default();
        self.update_v6(changes, &mut report)?;
        for (written, (net, action)) in changes.iter().enumerate() {
            let IpNet::V4(net4) = net.trunc() else {
                continue;
            };
            let net = IpNet::V4(net4);
            let before = self.installed.get(&net);
            // The book takes the change first (a table rebuild is written
            // from it) and gives it back if the kernel does not.
            match action {
                None => {
                    if self.installed.remove(&net).is_none() {
                        continue;
                    }
                    if let Err(e) = self.set_v4(net4, None) {
                        self.installed.put_back(net, before);
                        return Err(e.into_sync(0, 1));
                    }
                    report.removed += 1;
                }
                Some(action) => {
                    if before.map(|i| i.action) == Some(*action) {
                        continue;
                    }
                    let total = self.installed.total();
                    if before.is_none() && total + 1 >= MAX_RULE_IDS as usize {
                        return Err(SyncError::TooManyRules(total + 1));
                    }
                    let (rule_id, fresh) = self.installed.set(net, *action);
                    if fresh {
                        self.hits.reset(rule_id);
                    }
                    if let Err(e) = self.set_v4(net4, Some((*action, rule_id))) {
                        self.installed.put_back(net, before);
                        return Err(e.into_sync(written, changes.len()));
                    }
                    if before.is_some() {
                        report.changed += 1;
                    } else {
                        report.added += 1;
                    }
                }
            }
        }
        report.total = self.installed.total();
        Ok(report)
    }

    /// Single changes can settle or unsettle many /16s of the IPv4
    /// summary: the flag that says whether the program reads it first
    /// follows. Best effort: the flag only changes the speed of a lookup,
    /// never its verdict, so a failed write (the old flag stays) is no
    /// reason to report the changes, which are in force, as failed.
    fn follow_summary(&mut self) {
        let pays = u32::from(self.v4.summary_pays());
        if pays != self.runtime.v4_summary {
            self.runtime.v4_summary = pays;
            if self.write_runtime().is_err() {
                self.runtime.v4_summary = 1 - pays;
            }
        }
    }

    /// The IPv6 part of `changes`, all at once: one compile and switch of
    /// the IPv6 table. On error nothing of it is applied.
    fn update_v6(
        &mut self,
        changes: &[(IpNet, Option<Action>)],
        report: &mut ApplyReport,
    ) -> Result<(), SyncError> {
        // Last change of a prefix wins, as when applied one by one.
        let mut wanted: BTreeMap<IpNet, Option<Action>> = BTreeMap::new();
        for (net, action) in changes {
            let net = net.trunc();
            if matches!(net, IpNet::V6(_)) {
                wanted.insert(net, *action);
            }
        }
        wanted.retain(|net, action| self.installed.get(net).map(|i| i.action) != *action);
        if wanted.is_empty() {
            return Ok(());
        }
        let added = wanted
            .iter()
            .filter(|(n, a)| a.is_some() && self.installed.get(n).is_none())
            .count();
        let total = self.installed.total();
        if added > 0 && total + added >= MAX_RULE_IDS as usize {
            return Err(SyncError::TooManyRules(total + added));
        }
        // Into the book first (the IPv6 list is written from it), given
        // back on error.
        let mut before = Vec::with_capacity(wanted.len());
        let mut fresh = Vec::new();
        for (net, action) in &wanted {
            before.push((*net, self.installed.get(net)));
            match action {
                Some(action) => {
                    let (rule_id, is_fresh) = self.installed.set(*net, *action);
                    if is_fresh {
                        fresh.push(rule_id);
                    }
                }
                None => {
                    self.installed.remove(net);
                }
            }
        }
        if let Err(e) = self.v6.write(&self.installed_v6()) {
            for (net, b) in before.into_iter().rev() {
                self.installed.put_back(net, b);
            }
            return Err(SyncError::Ipv6(e));
        }
        self.hits.reset_all(&fresh);
        for (net, b) in before {
            match (b, wanted[&net]) {
                (_, None) => report.removed += 1,
                (Some(_), Some(_)) => report.changed += 1,
                (None, Some(_)) => report.added += 1,
            }
        }
        Ok(())
    }

    /// `wanted`: sorted, one entry per prefix ([`rule_book::canonical`]).
    fn apply_atomic(&mut self, wanted: &[(IpNet, Action)]) -> Result<ApplyReport, SyncError> {
        let active = self.runtime.active_generation as usize;
        let next = 1 - active;
        // The book is changed only once the new list is in force.
        let plan = self.installed.plan(wanted);
        // In prefix order, as the IPv4 compiler sorts them: its sort finds
        // them sorted.
        let mut v4_rules = Vec::with_capacity(plan.entries.len());
        let mut v6_rules = Vec::new();
        for (net, i) in &plan.entries {
            match net {
                IpNet::V4(n) => v4_rules.push(Ipv4Rule {
                    prefix: *n,
                    entry: leaf_entry(i.action, i.rule_id),
                }),
                IpNet::V6(n) => v6_rules.push((*n, rule(i.action, i.rule_id))),
            }
        }
        let summary = match self.v4.prepare(&v4_rules) {
            Ok(summary) => summary,
            Err(Ipv4TableError::TooManyPrefixes { count, max }) => {
                return Err(SyncError::Ipv4Full {
                    written: max,
                    wanted: count,
                })
            }
            Err(e) => return Err(SyncError::Ipv4Table(e)),
        };
        // IPv6 switches first, on its own; a packet is of one family, so
        // none sees half of the old and half of the new list.
        let old_v6 = self.installed_v6();
        if let Err(e) = self.v6.write(&v6_rules) {
            self.v4.abandon();
            return Err(SyncError::Ipv6(e));
        }
        // The IPv4 switch: one write of the config record. A packet that
        // sees the new generation with the old summary flag (or the other
        // way round) still gets the right verdict: each generation's
        // summary is exact, the flag only says whether to read it.
        let old_summary = self.runtime.v4_summary;
        self.runtime.active_generation = next as u32;
        self.runtime.v4_summary = u32::from(summary);
        if let Err(e) = self.write_runtime() {
            self.runtime.active_generation = active as u32;
            self.runtime.v4_summary = old_summary;
            self.v4.abandon();
            // Best effort: the IPv6 list in force goes back as well.
            let _ = self.v6.write(&old_v6);
            return Err(e);
        }
        self.v4.switched();
        // Hit counters of newly given ids restart only once the new list
        // is in force: a failed apply leaves every counter as it was.
        let fresh: Vec<u32> = plan.fresh.iter().map(|(id, _)| *id).collect();
        self.hits.reset_all(&fresh);
        let report = ApplyReport {
            added: plan.added,
            changed: plan.changed,
            removed: plan.removed,
            total: plan.entries.len(),
        };
        self.installed.commit(plan);
        Ok(report)
    }

    /// The IPv6 entries in force, as the IPv6 table takes them.
    fn installed_v6(&self) -> Vec<(ipnet::Ipv6Net, Rule)> {
        self.installed
            .iter_v6()
            .filter_map(|(net, i)| match net {
                IpNet::V6(n) => Some((*n, rule(i.action, i.rule_id))),
                IpNet::V4(_) => None,
            })
            .collect()
    }

    /// One IPv4 change in place, already in the book; when the table has
    /// no free slot for it, the whole book goes into the other generation,
    /// which compacts the table.
    fn set_v4(&mut self, net: ipnet::Ipv4Net, rule: Option<(Action, u32)>) -> Result<(), OneError> {
        match self.v4.set(net, rule.map(|(a, id)| leaf_entry(a, id))) {
            Ok(()) => Ok(()),
            Err(Ipv4TableError::OutOfSlots) => {
                let wanted: Vec<(IpNet, Action)> =
                    self.installed.iter().map(|(n, i)| (*n, i.action)).collect();
                self.apply_atomic(&wanted)
                    .map(|_| ())
                    .map_err(OneError::Sync)
            }
            Err(Ipv4TableError::TooManyPrefixes { .. }) => Err(OneError::Full),
        }
    }
}

/// Why a single IPv4 change failed.
enum OneError {
    /// The IPv4 table is at its capacity.
    Full,
    /// The rebuild it fell back to failed.
    Sync(SyncError),
}

impl OneError {
    fn into_sync(self, written: usize, wanted: usize) -> SyncError {
        match self {
            OneError::Full => SyncError::Ipv4Full { written, wanted },
            OneError::Sync(e) => e,
        }
    }
}

fn rule(action: Action, rule_id: u32) -> Rule {
    Rule {
        action: action as u32,
        rule_id,
    }
}
