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

use std::collections::BTreeSet;

// foldhash: a million-entry list is hashed several times per load; SipHash
// was most of the load time. Seeded per process, so crafted lists cannot
// aim at collisions.
use foldhash::{HashMap, HashMapExt};

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
    KernelError,
};

/// Errors while writing the maps.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A trie is full (or the kernel is out of memory); the old list stays in force.
    #[error("kernel {family} list is full after {written} of {wanted} prefixes; the previous list stays in force")]
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
    /// The IPv4 table holds fewer prefixes than the list; the old list stays in force.
    #[error("kernel IPv4 list is full after {written} of {wanted} prefixes; the previous list stays in force")]
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
    /// The IPv6 table could not be written; the IPv6 list in force stays.
    #[error("writing the kernel IPv6 table; the previous IPv6 list stays in force")]
    Ipv6(#[source] Ipv6TableError),
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Installed {
    action: Action,
    rule_id: u32,
}

/// Owner of the runtime record (`SG_CONFIG`), the IPv4 table and the IPv6
/// table. See the module docs.
pub struct MapSync {
    config_map: Array<MapData, RuntimeConfig>,
    v4: Ipv4Table,
    v6: Ipv6Table,
    /// The record last written to `SG_CONFIG`.
    runtime: RuntimeConfig,
    /// What the active generation holds, so applies can be diffs.
    installed: HashMap<IpNet, Installed>,
    /// Rule id of every prefix ever given one and still installed; ids
    /// stay stable across applies so hit counters keep their meaning.
    ids: RuleIds,
    /// Hit counters: an id handed to a new prefix starts from zero.
    hits: Arc<HitsMapping>,
    /// Whether the record carries the precomputed verdicts
    /// (`smtpguard_common::outcome`); see [`MapSync::set_precomputed_verdicts`].
    precomputed: bool,
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
            installed: HashMap::new(),
            ids: RuleIds::default(),
            hits,
            precomputed: true,
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

    /// With `false`, the record goes to the kernel without its precomputed
    /// verdicts, so the program works out every verdict in full, as it did
    /// before they existed. The verdicts are the same either way; the
    /// oracle test checks that they are, and the bench measures what the
    /// precomputed ones save. Takes effect at once. The daemon never turns
    /// them off.
    pub fn set_precomputed_verdicts(&mut self, on: bool) -> Result<(), SyncError> {
        self.precomputed = on;
        self.write_runtime()
    }

    fn write_runtime(&mut self) -> Result<(), SyncError> {
        self.runtime = self.runtime.with_outcomes();
        if !self.precomputed {
            self.runtime.outcome_v4 = [0; 4];
            self.runtime.outcome_v6 = [0; 4];
        }
        self.config_map
            .set(0, self.runtime, 0)
            .map_err(|source| SyncError::Map {
                map: map_names::CONFIG,
                source,
            })
    }

    /// Prefixes in force: (IPv4, IPv6).
    pub fn len(&self) -> (usize, usize) {
        let v4 = self
            .installed
            .keys()
            .filter(|n| matches!(n, IpNet::V4(_)))
            .count();
        (v4, self.installed.len() - v4)
    }

    /// Whether no prefix is in force.
    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    /// How full the kernel IPv6 table is.
    pub fn ipv6_usage(&self) -> super::ipv6_table::Usage {
        self.v6.usage()
    }

    /// The prefix behind a rule id, for reporting hit counters.
    pub fn prefix_of(&self, rule_id: u32) -> Option<IpNet> {
        self.ids.prefix_of(rule_id)
    }

    /// Makes the kernel hold exactly `rules` (canonical prefixes, one action
    /// each). On error nothing changed for `Atomic`; for `Incremental` the
    /// entries written so far stay (each is a complete, valid entry).
    pub fn apply(
        &mut self,
        rules: &[(IpNet, Action)],
        how: ApplyHow,
    ) -> Result<ApplyReport, SyncError> {
        if rules.len() >= MAX_RULE_IDS as usize {
            return Err(SyncError::TooManyRules(rules.len()));
        }
        // Sized up front: growing a 1M-entry map rehashes it twenty times.
        let mut wanted: HashMap<IpNet, Action> = HashMap::with_capacity(rules.len());
        wanted.extend(rules.iter().map(|(n, a)| (n.trunc(), *a)));
        let mut report = ApplyReport::default();
        for (net, action) in &wanted {
            match self.installed.get(net) {
                None => report.added += 1,
                Some(i) if i.action != *action => report.changed += 1,
                Some(_) => {}
            }
        }
        report.removed = self
            .installed
            .keys()
            .filter(|n| !wanted.contains_key(n))
            .count();
        report.total = wanted.len();
        match how {
            ApplyHow::Incremental => self.apply_incremental(&wanted)?,
            ApplyHow::Atomic => self.apply_atomic(&wanted)?,
        }
        Ok(report)
    }

    fn apply_incremental(&mut self, wanted: &HashMap<IpNet, Action>) -> Result<(), SyncError> {
        let mut changes: Vec<(IpNet, Option<Action>)> = self
            .installed
            .keys()
            .filter(|n| !wanted.contains_key(n))
            .map(|n| (*n, None))
            .collect();
        changes.extend(
            wanted
                .iter()
                .filter(|(net, action)| self.installed.get(net).map(|i| i.action) != Some(**action))
                .map(|(net, action)| (*net, Some(*action))),
        );
        self.update(&changes).map(|_| ())
    }

    /// Changes single prefixes in the live tries: `Some(action)` installs or
    /// changes one, `None` removes it. Costs one map write per change,
    /// whatever the list size: this is the path of `smtpguard deny add`.
    /// On error the changes before the failing one stay applied.
    pub fn update(
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
            match action {
                None => {
                    if self.installed.remove(&net).is_some() {
                        self.set_v4(net4, None).map_err(|e| e.into_sync(0, 1))?;
                        self.ids.release(&net);
                        report.removed += 1;
                    }
                }
                Some(action) => {
                    let previous = self.installed.get(&net).map(|i| i.action);
                    if previous == Some(*action) {
                        continue;
                    }
                    if self.installed.len() + 1 >= MAX_RULE_IDS as usize && previous.is_none() {
                        return Err(SyncError::TooManyRules(self.installed.len() + 1));
                    }
                    let (rule_id, fresh) = self.ids.assign(net);
                    if fresh {
                        self.hits.reset(rule_id);
                    }
                    self.set_v4(net4, Some((*action, rule_id)))
                        .map_err(|e| e.into_sync(written, changes.len()))?;
                    self.installed.insert(
                        net,
                        Installed {
                            action: *action,
                            rule_id,
                        },
                    );
                    if previous.is_some() {
                        report.changed += 1;
                    } else {
                        report.added += 1;
                    }
                }
            }
        }
        report.total = self.installed.len();
        Ok(report)
    }

    /// The IPv6 part of `changes`, all at once: one compile and switch of
    /// the IPv6 table. On error nothing of it is applied.
    fn update_v6(
        &mut self,
        changes: &[(IpNet, Option<Action>)],
        report: &mut ApplyReport,
    ) -> Result<(), SyncError> {
        // Last change of a prefix wins, as when applied one by one.
        let mut wanted: HashMap<IpNet, Option<Action>> = HashMap::new();
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
            .filter(|(n, a)| a.is_some() && !self.installed.contains_key(n))
            .count();
        if added > 0 && self.installed.len() + added >= MAX_RULE_IDS as usize {
            return Err(SyncError::TooManyRules(self.installed.len() + added));
        }
        let mut fresh = Vec::new();
        let mut assigned = HashMap::new();
        for (net, action) in &wanted {
            if let Some(action) = action {
                let (rule_id, is_fresh) = self.ids.assign(*net);
                if is_fresh {
                    fresh.push((*net, rule_id));
                }
                assigned.insert(*net, (*action, rule_id));
            }
        }
        let mut list: Vec<(ipnet::Ipv6Net, Rule)> = self
            .installed
            .iter()
            .filter(|(net, _)| !wanted.contains_key(net))
            .filter_map(|(net, i)| match net {
                IpNet::V6(n) => Some((*n, rule(i.action, i.rule_id))),
                IpNet::V4(_) => None,
            })
            .collect();
        list.extend(assigned.iter().filter_map(|(net, (action, id))| match net {
            IpNet::V6(n) => Some((*n, rule(*action, *id))),
            IpNet::V4(_) => None,
        }));
        if let Err(e) = self.v6.write(&list) {
            for (net, _) in &fresh {
                self.ids.release(net);
            }
            return Err(SyncError::Ipv6(e));
        }
        let fresh_ids: Vec<u32> = fresh.iter().map(|(_, id)| *id).collect();
        self.hits.reset_all(&fresh_ids);
        for (net, action) in wanted {
            match action {
                None => {
                    self.installed.remove(&net);
                    self.ids.release(&net);
                    report.removed += 1;
                }
                Some(_) => {
                    let (action, rule_id) = assigned[&net];
                    let previous = self.installed.insert(net, Installed { action, rule_id });
                    if previous.is_some() {
                        report.changed += 1;
                    } else {
                        report.added += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_atomic(&mut self, wanted: &HashMap<IpNet, Action>) -> Result<(), SyncError> {
        let active = self.runtime.active_generation as usize;
        let next = 1 - active;
        let mut ids = self.ids.clone();
        let mut installed = HashMap::with_capacity(wanted.len());
        ids.retain(|n| wanted.contains_key(n));
        ids.reserve(wanted.len());
        let mut v4_rules = Vec::new();
        let mut v6_rules = Vec::new();
        // Hit counters of newly given ids restart only once the new list
        // is in force: a failed apply leaves every counter as it was.
        let mut fresh = Vec::new();
        for (net, action) in wanted {
            let (rule_id, is_fresh) = ids.assign(*net);
            if is_fresh {
                fresh.push(rule_id);
            }
            match net {
                IpNet::V4(n) => v4_rules.push(Ipv4Rule {
                    prefix: *n,
                    entry: leaf_entry(*action, rule_id),
                }),
                IpNet::V6(n) => v6_rules.push((*n, rule(*action, rule_id))),
            }
            installed.insert(
                *net,
                Installed {
                    action: *action,
                    rule_id,
                },
            );
        }
        if let Err(e) = self.v4.prepare(&v4_rules) {
            return Err(match e {
                Ipv4TableError::TooManyPrefixes { count, max } => SyncError::Ipv4Full {
                    written: max,
                    wanted: count,
                },
                e => SyncError::Ipv4Table(e),
            });
        }
        // IPv6 switches first, on its own; a packet is of one family, so
        // none sees half of the old and half of the new list.
        let old_v6 = self.installed_v6();
        if let Err(e) = self.v6.write(&v6_rules) {
            self.v4.abandon();
            return Err(SyncError::Ipv6(e));
        }
        // The IPv4 switch: one write of the config record.
        self.runtime.active_generation = next as u32;
        if let Err(e) = self.write_runtime() {
            self.runtime.active_generation = active as u32;
            self.v4.abandon();
            // Best effort: the IPv6 list in force goes back as well.
            let _ = self.v6.write(&old_v6);
            return Err(e);
        }
        self.v4.switched();
        self.hits.reset_all(&fresh);
        self.installed = installed;
        self.ids = ids;
        Ok(())
    }

    /// The IPv6 entries in force, as the IPv6 table takes them.
    fn installed_v6(&self) -> Vec<(ipnet::Ipv6Net, Rule)> {
        self.installed
            .iter()
            .filter_map(|(net, i)| match net {
                IpNet::V6(n) => Some((*n, rule(i.action, i.rule_id))),
                IpNet::V4(_) => None,
            })
            .collect()
    }

    /// One IPv4 change in place; when the table has no free slot for it,
    /// the whole list (with the change) goes into the other generation,
    /// which compacts the table.
    fn set_v4(&mut self, net: ipnet::Ipv4Net, rule: Option<(Action, u32)>) -> Result<(), OneError> {
        match self.v4.set(net, rule.map(|(a, id)| leaf_entry(a, id))) {
            Ok(()) => Ok(()),
            Err(Ipv4TableError::OutOfSlots) => {
                let mut wanted: HashMap<IpNet, Action> =
                    self.installed.iter().map(|(n, i)| (*n, i.action)).collect();
                match rule {
                    Some((action, _)) => wanted.insert(IpNet::V4(net), action),
                    None => wanted.remove(&IpNet::V4(net)),
                };
                self.apply_atomic(&wanted).map_err(OneError::Sync)
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

/// Rule-id allocator: stable ids per prefix, freed ids reused.
#[derive(Clone, Debug, Default)]
struct RuleIds {
    by_prefix: HashMap<IpNet, u32>,
    /// Index = rule id; `None` = free. Index 0 is never used.
    by_id: Vec<Option<IpNet>>,
    free: Vec<u32>,
}

impl RuleIds {
    /// The id of `net`, giving it a free one if it has none; `true` when
    /// the id is newly given (its hit counter must start from zero).
    fn assign(&mut self, net: IpNet) -> (u32, bool) {
        if let Some(id) = self.by_prefix.get(&net) {
            return (*id, false);
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                if self.by_id.is_empty() {
                    self.by_id.push(None);
                }
                self.by_id.push(None);
                (self.by_id.len() - 1) as u32
            }
        };
        self.by_id[id as usize] = Some(net);
        self.by_prefix.insert(net, id);
        (id, true)
    }

    /// Room for `total` prefixes without growing on the way.
    fn reserve(&mut self, total: usize) {
        self.by_prefix
            .reserve(total.saturating_sub(self.by_prefix.len()));
        self.by_id.reserve(total.saturating_sub(self.by_id.len()));
    }

    fn release(&mut self, net: &IpNet) {
        if let Some(id) = self.by_prefix.remove(net) {
            self.by_id[id as usize] = None;
            self.free.push(id);
        }
    }

    fn retain(&mut self, keep: impl Fn(&IpNet) -> bool) {
        let gone: Vec<IpNet> = self
            .by_prefix
            .keys()
            .filter(|n| !keep(n))
            .copied()
            .collect();
        for net in gone {
            self.release(&net);
        }
    }

    fn prefix_of(&self, id: u32) -> Option<IpNet> {
        self.by_id.get(id as usize).copied().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ids_start_at_one_and_are_reused() {
        let mut ids = RuleIds::default();
        let a: IpNet = "192.0.2.0/24".parse().unwrap();
        let b: IpNet = "2001:db8::/32".parse().unwrap();
        assert_eq!(ids.assign(a), (1, true));
        assert_eq!(ids.assign(b), (2, true));
        assert_eq!(ids.assign(a), (1, false));
        ids.release(&a);
        assert_eq!(ids.prefix_of(1), None);
        let c: IpNet = "198.51.100.0/24".parse().unwrap();
        assert_eq!(ids.assign(c), (1, true));
        assert_eq!(ids.prefix_of(1), Some(c));
        assert_eq!(ids.prefix_of(2), Some(b));
    }
}
