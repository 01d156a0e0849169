//! The lookup oracle: one policy judged three ways (the production XDP
//! program, the frozen `trie-reference` program with its kernel LPM tries,
//! and userspace [`Policy::decide`]), address by address, verdict and rule
//! id. `tests/lookup_oracle.rs` uses it for IPv4; the IPv6 cases reuse it
//! with IPv6 lists and addresses.

use std::{collections::HashMap, net::IpAddr};

use ipnet::IpNet;
use smtpguard::{
    kernel::{ApplyHow, MapSync, Stats, XdpFilter},
    policy::{Enforcement, ListKind, Policy, PolicyMode, Reason},
};
use smtpguard_common::{counter, Action, Rule, COUNTER_NAMES};

/// The counters that say what became of a judged SYN: exactly one moves.
const VERDICT_COUNTERS: [u32; 5] = [
    counter::DROP_DENY_LIST,
    counter::DROP_NOT_PERMITTED,
    counter::WOULD_DROP,
    counter::PASS_PERMITTED,
    counter::PASS_FILTER_OFF,
];

use crate::{packet, trie_reference::TrieReference};

/// XDP_DROP.
pub const XDP_DROP: u32 = 1;
/// XDP_PASS.
pub const XDP_PASS: u32 = 2;
/// The guarded port of the crafted SYNs.
pub const PORT: u16 = 25;

/// The production program and the trie reference, loaded with one policy.
pub struct Oracle {
    filter: XdpFilter,
    sync: MapSync,
    stats: Stats,
    trie: TrieReference,
    policy: Policy,
    /// Rule id of each prefix, as the sync gave them.
    ids: HashMap<IpNet, u32>,
    /// The highest rule id given so far.
    max_id: u32,
    /// Checks made; every [`COUNTER_CHECK_EVERY`]th also checks the counters.
    checks: u64,
}

/// How often [`Oracle::check`] also checks which counter the packet went
/// to (a counter read is a few hundred syscalls).
pub const COUNTER_CHECK_EVERY: u64 = 256;

impl Oracle {
    /// Loads both programs and installs `policy` in both (the production
    /// one through the atomic whole-list path).
    pub fn new(policy: Policy) -> Self {
        let (filter, mut sync, stats) = XdpFilter::load().expect("load the XDP program");
        let rules: Vec<(IpNet, Action)> = policy
            .compile()
            .expect("policy compiles")
            .into_iter()
            .map(|r| (r.prefix, r.action))
            .collect();
        sync.apply(&rules, ApplyHow::Atomic).expect("apply");
        let mut ids = HashMap::with_capacity(rules.len());
        for id in 1..=rules.len() as u32 + 1 {
            if let Some(p) = sync.prefix_of(id) {
                ids.insert(p, id);
            }
        }
        assert_eq!(ids.len(), rules.len(), "every rule has an id");
        let with_ids: Vec<(IpNet, Action, u32)> =
            rules.iter().map(|(p, a)| (*p, *a, ids[p])).collect();
        let mut trie = TrieReference::empty();
        install(&mut trie, &with_ids);
        let mut oracle = Oracle {
            filter,
            sync,
            stats,
            trie,
            policy,
            max_id: ids.values().copied().max().unwrap_or(0),
            checks: 0,
            ids,
        };
        oracle.configure(oracle.policy.mode(), oracle.policy.enforcement());
        oracle
    }

    /// Switches mode and enforcement in both programs and the policy.
    pub fn configure(&mut self, mode: PolicyMode, enforcement: Enforcement) {
        self.policy.set_mode(mode);
        self.policy.set_enforcement(enforcement);
        self.sync
            .set_runtime(self.policy.mode().into(), enforcement.into(), &[PORT], 0)
            .expect("runtime");
        self.trie.set_runtime_record(self.sync.runtime());
    }

    /// Writes the same rules again through the atomic path, so the
    /// production program switches to its other generation.
    pub fn reapply(&mut self) {
        let rules: Vec<(IpNet, Action)> = self
            .policy
            .compile()
            .expect("policy compiles")
            .into_iter()
            .map(|r| (r.prefix, r.action))
            .collect();
        let before = self.sync.runtime().active_generation;
        self.sync.apply(&rules, ApplyHow::Atomic).expect("apply");
        assert_ne!(self.sync.runtime().active_generation, before, "switched");
        for (p, id) in &self.ids {
            assert_eq!(self.sync.prefix_of(*id), Some(*p), "ids stay stable");
        }
    }

    /// Puts `prefix` on `list` (`Some`) or off both lists (`None`) in the
    /// policy, and makes the same single-prefix change live in both
    /// programs (the production one through `MapSync::update`, the path of
    /// `smtpguard deny add`, expiry and `remove`).
    pub fn change(&mut self, prefix: IpNet, list: Option<ListKind>) {
        for kind in [ListKind::Deny, ListKind::Permit] {
            self.policy.list_mut(kind).remove([prefix]);
        }
        if let Some(kind) = list {
            self.policy
                .list_mut(kind)
                .add([prefix], None, None)
                .expect("add");
        }
        let action = self.policy.list_holding(prefix).map(Action::from);
        self.sync.update(&[(prefix, action)]).expect("update");
        match action {
            None => {
                if let Some(id) = self.ids.remove(&prefix) {
                    self.trie.remove(prefix);
                    assert_eq!(self.sync.prefix_of(id), None, "id released");
                }
            }
            Some(action) => {
                let id = match self.ids.get(&prefix) {
                    Some(id) => *id,
                    None => {
                        // A new id is a freed one or one past the highest given.
                        let id = (1..=self.max_id + 1)
                            .find(|id| self.sync.prefix_of(*id) == Some(prefix))
                            .expect("the new prefix has an id");
                        self.max_id = self.max_id.max(id);
                        self.ids.insert(prefix, id);
                        id
                    }
                };
                install(&mut self.trie, &[(prefix, action, id)]);
            }
        }
    }

    /// Whether the program reads the IPv4 summary first for the list in
    /// force (`RuntimeConfig::v4_summary`).
    pub fn reads_summary(&self) -> bool {
        self.sync.runtime().v4_summary != 0
    }

    /// The policy judged.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Judges `addr` three ways and panics with all three on a
    /// disagreement: the XDP action and the rule whose hit counter moved.
    pub fn check(&mut self, addr: IpAddr) {
        let frame = match addr {
            IpAddr::V4(a) => packet::syn_v4(&a.to_string(), PORT),
            IpAddr::V6(a) => packet::syn_v6(&a.to_string(), PORT),
        };
        let explanation = self.policy.explain(addr);
        let rule = match explanation.reason {
            Reason::DenyList => explanation.deny_match.as_ref().map(|e| e.prefix),
            Reason::Permitted => explanation.permit_match.as_ref().map(|e| e.prefix),
            _ => None,
        }
        .map(|p| self.ids[&p]);
        let judged = self.policy.enforcement() != Enforcement::Off;
        let want = if explanation.refused() {
            XDP_DROP
        } else {
            XDP_PASS
        };
        let before = rule.map(|id| (self.stats.hits(id), self.trie.hits(id)));
        self.checks += 1;
        let counted = self
            .checks
            .is_multiple_of(COUNTER_CHECK_EVERY)
            .then(|| self.stats.counters());
        let new = self.filter.test_run(&frame).expect("test run");
        if let Some(earlier) = counted {
            // Exactly one verdict counter moves, and it is this one.
            let reason = match (self.policy.enforcement(), explanation.reason) {
                (Enforcement::Off, _) => counter::PASS_FILTER_OFF,
                (Enforcement::Monitor, Reason::DenyList | Reason::NotPermitted) => {
                    counter::WOULD_DROP
                }
                (_, Reason::DenyList) => counter::DROP_DENY_LIST,
                (_, Reason::NotPermitted) => counter::DROP_NOT_PERMITTED,
                _ => counter::PASS_PERMITTED,
            };
            let moved = self.stats.counters().since(&earlier);
            let verdicts: Vec<(&str, u64)> = moved
                .named()
                .enumerate()
                .filter(|(i, (_, n))| *n != 0 && VERDICT_COUNTERS.contains(&(*i as u32)))
                .map(|(_, named)| named)
                .collect();
            assert_eq!(
                verdicts,
                vec![(COUNTER_NAMES[reason as usize], 1)],
                "{addr}: counted as {verdicts:?}\n{explanation}"
            );
        }
        let old = self.trie.run(&frame, 1).expect("test run").0;
        assert!(
            new == want && old == want,
            "{addr}: policy {want}, compiled {new}, trie {old}\n{explanation}"
        );
        if let (Some(id), Some((new_hits, old_hits)), true) = (rule, before, judged) {
            assert_eq!(
                (self.stats.hits(id), self.trie.hits(id)),
                (new_hits + 1, old_hits + 1),
                "{addr}: rule {id} ({:?}) not hit in both programs\n{explanation}",
                self.sync.prefix_of(id)
            );
        }
    }
}

/// Writes `rules` (prefix, action, rule id) into the reference's tries.
fn install(trie: &mut TrieReference, rules: &[(IpNet, Action, u32)]) {
    for (net, action, rule_id) in rules {
        let rule = Rule {
            action: *action as u32,
            rule_id: *rule_id,
        };
        trie.insert(*net, rule);
    }
}
