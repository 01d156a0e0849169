//! The ruleset in force, [`Policy`]: mode, enforcement, both lists, and the
//! verdict for a source address, in userspace ([`Policy::decide`],
//! [`Policy::explain`]) and compiled for the kernel LPM tries ([`Policy::compile`]).
//!
//! The verdict: the most specific entry covering the address decides,
//! across both lists (longest-prefix match); an identical prefix on both
//! lists is a deny; no entry at all leaves it to the [`PolicyMode`].
//! IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use smtpguard_common::{Action, MAX_PREFIXES_PER_FAMILY, MAX_RULE_IDS};

use super::list::{AccessList, FamilyCounts, ListEntry};
use super::protect::{Protected, ProtectedRange};
use super::source::{SourceLists, SourceName};
use super::{AddressFamily, ListKind};

/// Why a policy operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A list was handed in as the other one.
    #[error("the {found} was given where the {expected} belongs")]
    WrongList {
        /// The list expected in that place.
        expected: ListKind,
        /// The list given.
        found: ListKind,
    },
    /// More distinct prefixes of one family than the kernel tables take
    /// (`MAX_PREFIXES_PER_FAMILY`; IPv6 may run out of nodes sooner, which
    /// `kernel::ipv6_table::check_fits` finds).
    #[error(
        "{count} distinct {family} prefixes on the deny and permit lists of all sources exceed \
         the kernel table capacity of {max}; nothing was changed: aggregate the lists or drop \
         a source"
    )]
    TooManyPrefixes {
        /// The family.
        family: AddressFamily,
        /// Distinct prefixes after merging both lists.
        count: usize,
        /// `MAX_PREFIXES_PER_FAMILY`.
        max: u32,
    },
    /// More rules than hit counters (rule ids must stay below `MAX_RULE_IDS`).
    #[error("{count} rules need more ids than the {max} hit counters of the kernel provide (ids 1 to {})", .max - 1)]
    TooManyRules {
        /// Distinct prefixes of both families.
        count: usize,
        /// `MAX_RULE_IDS`.
        max: u32,
    },
}

/// What happens to a source that no entry covers.
///
/// Serialised as `accept-all-except-deny` / `deny-all-except-permit`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyMode {
    /// "Accept all, except the deny list": unlisted sources pass.
    #[default]
    AcceptAllExceptDeny,
    /// "Deny all, except the permit list": unlisted sources are dropped.
    DenyAllExceptPermit,
}

impl PolicyMode {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::AcceptAllExceptDeny => "accept-all-except-deny",
            PolicyMode::DenyAllExceptPermit => "deny-all-except-permit",
        }
    }
}

impl fmt::Display for PolicyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyMode {
    type Err = String;

    /// Accepts the configuration names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "accept-all-except-deny" => Ok(PolicyMode::AcceptAllExceptDeny),
            "deny-all-except-permit" => Ok(PolicyMode::DenyAllExceptPermit),
            _ => Err(format!(
                "unknown mode \"{s}\" (expected accept-all-except-deny or deny-all-except-permit)"
            )),
        }
    }
}

impl From<PolicyMode> for smtpguard_common::Mode {
    fn from(mode: PolicyMode) -> Self {
        match mode {
            PolicyMode::AcceptAllExceptDeny => smtpguard_common::Mode::AcceptAllExceptDeny,
            PolicyMode::DenyAllExceptPermit => smtpguard_common::Mode::DenyAllExceptPermit,
        }
    }
}

/// Whether verdicts are carried out.
///
/// Serialised as `enforce` / `monitor` / `off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// Drop what the policy denies.
    #[default]
    Enforce,
    /// Count and log what would be dropped; drop nothing.
    Monitor,
    /// Judge nothing, drop nothing.
    Off,
}

impl Enforcement {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Enforce => "enforce",
            Enforcement::Monitor => "monitor",
            Enforcement::Off => "off",
        }
    }
}

impl fmt::Display for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Enforcement {
    type Err = String;

    /// Accepts the configuration names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" => Ok(Enforcement::Enforce),
            "monitor" => Ok(Enforcement::Monitor),
            "off" => Ok(Enforcement::Off),
            _ => Err(format!(
                "unknown enforcement \"{s}\" (expected enforce, monitor or off)"
            )),
        }
    }
}

impl From<Enforcement> for smtpguard_common::Enforcement {
    fn from(e: Enforcement) -> Self {
        match e {
            Enforcement::Enforce => smtpguard_common::Enforcement::Enforce,
            Enforcement::Monitor => smtpguard_common::Enforcement::Monitor,
            Enforcement::Off => smtpguard_common::Enforcement::Off,
        }
    }
}

/// The outcome of the policy for one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The source may connect.
    Permit,
    /// The source is refused (dropped, under [`Enforcement::Enforce`]).
    Deny,
}

impl From<Verdict> for Action {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Permit => Action::Permit,
            Verdict::Deny => Action::Deny,
        }
    }
}

/// Why the verdict is what it is. Mirrors the kernel's verdict counters
/// (`DROP_DENY_LIST`, `DROP_NOT_PERMITTED`, `PASS_PERMITTED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The most specific matching entry is on the deny list (or both lists
    /// hold the same most specific prefix).
    DenyList,
    /// Deny-all mode and no entry matches.
    NotPermitted,
    /// The most specific matching entry is on the permit list.
    Permitted,
    /// Accept-all mode and no entry matches.
    DefaultAccept,
    /// The address is in a protected range (loopback, a listen address,
    /// a relay network, `policy.protected`): never refused.
    Protected,
}

impl Reason {
    /// The verdict this reason leads to.
    pub fn verdict(self) -> Verdict {
        match self {
            Reason::DenyList | Reason::NotPermitted => Verdict::Deny,
            Reason::Permitted | Reason::DefaultAccept | Reason::Protected => Verdict::Permit,
        }
    }
}

/// How the policy judges one address, for operators (`smtpguard explain`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The address judged, after IPv4-mapped normalisation.
    pub address: IpAddr,
    /// The mode in force.
    pub mode: PolicyMode,
    /// The enforcement in force.
    pub enforcement: Enforcement,
    /// The most specific deny-list entry of any source covering the
    /// address (the first source in order on a tie).
    pub deny_match: Option<ListEntry>,
    /// The source of `deny_match`.
    pub deny_source: Option<SourceName>,
    /// The most specific permit-list entry of any source covering the
    /// address.
    pub permit_match: Option<ListEntry>,
    /// The source of `permit_match`.
    pub permit_source: Option<SourceName>,
    /// The protected range holding the address, which decides before any
    /// entry.
    pub protected: Option<ProtectedRange>,
    /// The most specific entry of each source and list covering the
    /// address, other than the deciding one: what the verdict overrode.
    pub overridden: Vec<SourcedEntry>,
    /// The outcome.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
}

impl Explanation {
    /// Whether a connection from the address is actually refused: a deny
    /// verdict under [`Enforcement::Enforce`].
    pub fn refused(&self) -> bool {
        self.verdict == Verdict::Deny && self.enforcement == Enforcement::Enforce
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Verdict::Permit => "permit",
            Verdict::Deny => "deny",
        };
        write!(f, "{}: {verdict}", self.address)?;
        let entry = |f: &mut fmt::Formatter<'_>, list: &str, e: &ListEntry| {
            write!(f, "{list} entry {}", e.prefix)?;
            if let Some(c) = &e.comment {
                write!(f, " ({c})")?;
            }
            Ok(())
        };
        match (self.reason, &self.deny_match, &self.permit_match) {
            (Reason::DenyList, Some(d), p) => {
                f.write_str(", ")?;
                entry(f, "deny list", d)?;
                match p {
                    Some(p) if p.prefix == d.prefix => {
                        f.write_str(", also on the permit list: deny wins")?
                    }
                    Some(p) => write!(f, " is more specific than permit list entry {}", p.prefix)?,
                    None => {}
                }
            }
            (Reason::Permitted, d, Some(p)) => {
                f.write_str(", ")?;
                entry(f, "permit list", p)?;
                if let Some(d) = d {
                    write!(f, " is more specific than deny list entry {}", d.prefix)?;
                }
            }
            (Reason::NotPermitted, ..) => write!(f, ", on no list; mode {}", self.mode)?,
            (Reason::Protected, ..) => {
                if let Some(r) = &self.protected {
                    write!(f, ", protected range {r}")?;
                }
            }
            (Reason::DefaultAccept, ..) => write!(f, ", on no list; mode {}", self.mode)?,
            _ => {}
        }
        if self.enforcement != Enforcement::Enforce {
            write!(f, " (enforcement {}: nothing is dropped)", self.enforcement)?;
        }
        Ok(())
    }
}

/// One entry of the kernel LPM tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompiledRule {
    /// Canonical prefix (host bits zero); its family picks the trie.
    pub prefix: IpNet,
    /// Permit or deny.
    pub action: Action,
}

/// Mode, enforcement, the named sources (each a deny and a permit list)
/// and the protected ranges.
///
/// The verdict merges every source: the longest prefix on any source's
/// lists wins, deny wins a tie. Where several sources hold the same
/// prefix on the same list, the kernel holds one rule (the action is the
/// same); the source first in [`SourceName`] order (`local`, then by name)
/// is the one named as deciding, the others as overridden, and each entry
/// keeps its own comment and expiry (when one expires, the other still
/// holds the prefix).
#[derive(Clone, Debug)]
pub struct Policy {
    mode: PolicyMode,
    enforcement: Enforcement,
    /// Always holds `local`.
    sources: BTreeMap<SourceName, SourceLists>,
    protected: Protected,
}

/// A list entry with the source and list it is on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourcedEntry {
    /// The source.
    pub source: SourceName,
    /// The list.
    pub list: ListKind,
    /// The entry.
    pub entry: ListEntry,
}

/// What a kernel rule stands for ([`Policy::origin`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleOrigin {
    /// A list entry (the first source in order holding the prefix on the
    /// rule's list).
    Entry(SourcedEntry),
    /// A protected range, or an entry inside one that the kernel holds as
    /// a permit.
    Protected(ProtectedRange),
}

impl Policy {
    /// A policy with empty lists and no protected ranges.
    pub fn new(mode: PolicyMode, enforcement: Enforcement) -> Self {
        Self {
            mode,
            enforcement,
            sources: BTreeMap::from([(SourceName::local(), SourceLists::default())]),
            protected: Protected::default(),
        }
    }

    /// A policy whose `local` source is these lists.
    ///
    /// # Errors
    ///
    /// [`PolicyError::WrongList`] if `deny` is not a deny list or `permit`
    /// not a permit list.
    pub fn with_lists(
        mode: PolicyMode,
        enforcement: Enforcement,
        deny: AccessList,
        permit: AccessList,
    ) -> Result<Self, PolicyError> {
        let mut policy = Self::new(mode, enforcement);
        policy.insert_source(SourceName::local(), deny, permit)?;
        Ok(policy)
    }

    /// Adds (or replaces) a whole source, loaded now.
    ///
    /// # Errors
    ///
    /// [`PolicyError::WrongList`] if `deny` is not a deny list or `permit`
    /// not a permit list.
    pub fn insert_source(
        &mut self,
        name: SourceName,
        deny: AccessList,
        permit: AccessList,
    ) -> Result<(), PolicyError> {
        for (expected, list) in [(ListKind::Deny, &deny), (ListKind::Permit, &permit)] {
            if list.kind() != expected {
                return Err(PolicyError::WrongList {
                    expected,
                    found: list.kind(),
                });
            }
        }
        self.sources.insert(name, SourceLists::new(deny, permit));
        Ok(())
    }

    /// The mode.
    pub fn mode(&self) -> PolicyMode {
        self.mode
    }

    /// Switches the mode; both lists stay as they are.
    pub fn set_mode(&mut self, mode: PolicyMode) {
        self.mode = mode;
    }

    /// The enforcement.
    pub fn enforcement(&self) -> Enforcement {
        self.enforcement
    }

    /// Sets the enforcement.
    pub fn set_enforcement(&mut self, enforcement: Enforcement) {
        self.enforcement = enforcement;
    }

    /// The protected ranges.
    pub fn protected(&self) -> &Protected {
        &self.protected
    }

    /// Replaces the protected ranges.
    pub fn set_protected(&mut self, protected: Protected) {
        self.protected = protected;
    }

    /// One of the lists of the `local` source.
    pub fn list(&self, kind: ListKind) -> &AccessList {
        self.sources[&SourceName::local()].list(kind)
    }

    /// One of the lists of the `local` source, to change it.
    pub fn list_mut(&mut self, kind: ListKind) -> &mut AccessList {
        self.source_mut(&SourceName::local()).list_mut(kind)
    }

    /// A source, if it exists.
    pub fn source(&self, name: &SourceName) -> Option<&SourceLists> {
        self.sources.get(name)
    }

    /// A source, to change it; created empty if it does not exist yet.
    pub fn source_mut(&mut self, name: &SourceName) -> &mut SourceLists {
        self.sources.entry(name.clone()).or_default()
    }

    /// Every source, `local` first, then by name.
    pub fn sources(&self) -> impl Iterator<Item = (&SourceName, &SourceLists)> {
        self.sources.iter()
    }

    /// Entries of one list over all sources, by family (a prefix held by
    /// two sources counts twice).
    pub fn total_len(&self, kind: ListKind) -> FamilyCounts {
        self.sources.values().fold(FamilyCounts::default(), |n, s| {
            let m = s.list(kind).len();
            FamilyCounts {
                v4: n.v4 + m.v4,
                v6: n.v6 + m.v6,
            }
        })
    }

    /// Every entry of every source covering `prefix` or inside it, on
    /// `kind`'s list (for the warnings of a CLI change); at most `max`.
    pub fn related(&self, kind: ListKind, prefix: IpNet, max: usize) -> Vec<SourcedEntry> {
        let mut found = Vec::new();
        for (name, source) in &self.sources {
            let list = source.list(kind);
            let hits = list
                .table()
                .cover(&prefix)
                .into_iter()
                .map(|(p, _)| p)
                .chain(
                    list.table()
                        .inside(&prefix, max + 1)
                        .into_iter()
                        .map(|(p, _)| p)
                        .filter(|p| *p != prefix),
                );
            for p in hits {
                if found.len() == max {
                    return found;
                }
                if let Some(entry) = list.get(p) {
                    found.push(SourcedEntry {
                        source: name.clone(),
                        list: kind,
                        entry,
                    });
                }
            }
        }
        found
    }

    /// The list whose rule the kernel holds for exactly `prefix`, over all
    /// sources: deny when any source has it on its deny list (deny wins on
    /// the identical prefix, as in [`Policy::compile`]), else permit when
    /// any has it on its permit list; `None` when on neither. Hit counters
    /// are per kernel rule, so this is also the list an entry's hits are
    /// counted for.
    pub fn list_holding(&self, prefix: IpNet) -> Option<ListKind> {
        [ListKind::Deny, ListKind::Permit]
            .into_iter()
            .find(|&kind| {
                self.sources
                    .values()
                    .any(|s| s.list(kind).get(prefix).is_some())
            })
    }

    /// The kernel's action for exactly `prefix`, as [`Policy::compile`]
    /// makes it: [`Policy::list_holding`], except that rules inside
    /// protected ranges, and the protected ranges themselves, permit.
    pub fn rule_action(&self, prefix: IpNet) -> Option<Action> {
        if self.protected.is_rule(prefix) {
            return Some(Action::Permit);
        }
        let list = self.list_holding(prefix)?;
        if list == ListKind::Deny && self.protected.contains(prefix) {
            return Some(Action::Permit);
        }
        Some(list.into())
    }

    /// What the kernel rule for exactly `prefix` stands for: the entry and
    /// its source, or the protected range that made it a permit. `None`
    /// when no rule has that prefix. (The kernel sync maps a rule id to its
    /// prefix; with this, logs can name the prefix and the source.)
    pub fn origin(&self, prefix: IpNet) -> Option<RuleOrigin> {
        let action = self.rule_action(prefix)?;
        let list = self.list_holding(prefix);
        let protected = || {
            self.protected
                .covering(prefix.network())
                .filter(|r| r.prefix.contains(&prefix))
                .map(RuleOrigin::Protected)
        };
        match (action, list) {
            (Action::Permit, Some(ListKind::Deny)) | (Action::Permit, None) => protected(),
            (_, Some(list)) => self.sources.iter().find_map(|(name, s)| {
                s.list(list).get(prefix).map(|entry| {
                    RuleOrigin::Entry(SourcedEntry {
                        source: name.clone(),
                        list,
                        entry,
                    })
                })
            }),
            _ => None,
        }
    }

    /// Removes the due temporary entries of every source; returns them with
    /// their source and list.
    pub fn expire(&mut self, now: SystemTime) -> Vec<(SourceName, ListKind, ListEntry)> {
        let mut removed = Vec::new();
        for (name, source) in &mut self.sources {
            for kind in [ListKind::Deny, ListKind::Permit] {
                if source.list(kind).next_expiry().is_some_and(|t| t <= now) {
                    removed.extend(
                        source
                            .list_mut(kind)
                            .expire(now)
                            .into_iter()
                            .map(|e| (name.clone(), kind, e)),
                    );
                }
            }
        }
        removed
    }

    /// The lists (by source) holding entries due at `now`: those
    /// [`Policy::expire`] would change.
    pub fn due_lists(&self, now: SystemTime) -> Vec<(SourceName, ListKind)> {
        let mut due = Vec::new();
        for (name, source) in &self.sources {
            for kind in [ListKind::Deny, ListKind::Permit] {
                if source.list(kind).next_expiry().is_some_and(|t| t <= now) {
                    due.push((name.clone(), kind));
                }
            }
        }
        due
    }

    /// The earliest expiry of any entry, to schedule [`Policy::expire`].
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.sources
            .values()
            .flat_map(|s| [ListKind::Deny, ListKind::Permit].map(|k| s.list(k).next_expiry()))
            .flatten()
            .min()
    }

    /// The verdict for a source address, without allocating: the protected
    /// ranges, then two LPM lookups (one per list) per source in tries of
    /// the address's family. This is the per-connection check of the SMTP
    /// front door.
    pub fn decide(&self, addr: IpAddr) -> Reason {
        let addr = addr.to_canonical();
        if self.protected.covering(addr).is_some() {
            return Reason::Protected;
        }
        let (mut deny, mut permit) = (None, None);
        for source in self.sources.values() {
            let len = |kind| {
                source
                    .list(kind)
                    .table()
                    .lpm(addr)
                    .map(|(p, _)| p.prefix_len())
            };
            deny = deny.max(len(ListKind::Deny));
            permit = permit.max(len(ListKind::Permit));
        }
        self.reason(deny, permit)
    }

    /// Both matches are prefixes of the same address, so their lengths
    /// order them by specificity.
    fn reason(&self, deny_len: Option<u8>, permit_len: Option<u8>) -> Reason {
        match (deny_len, permit_len) {
            (Some(d), Some(p)) if p > d => Reason::Permitted,
            (Some(_), _) => Reason::DenyList,
            (None, Some(_)) => Reason::Permitted,
            (None, None) => match self.mode {
                PolicyMode::AcceptAllExceptDeny => Reason::DefaultAccept,
                PolicyMode::DenyAllExceptPermit => Reason::NotPermitted,
            },
        }
    }

    /// [`Policy::decide`] with its working: the most specific entry of
    /// each list over all sources (with comment, expiry and source), the
    /// entries of the other sources and lists that it overrode, the
    /// protected range if any, mode and enforcement.
    pub fn explain(&self, addr: IpAddr) -> Explanation {
        let address = addr.to_canonical();
        let mut matches: Vec<SourcedEntry> = Vec::new();
        for (name, source) in &self.sources {
            for list in [ListKind::Deny, ListKind::Permit] {
                if let Some(entry) = source.list(list).longest_match(address) {
                    matches.push(SourcedEntry {
                        source: name.clone(),
                        list,
                        entry,
                    });
                }
            }
        }
        // The first of the longest, in source order.
        let best = |list: ListKind| {
            matches
                .iter()
                .filter(|m| m.list == list)
                .fold(None::<&SourcedEntry>, |best, m| match best {
                    Some(b) if b.entry.prefix.prefix_len() >= m.entry.prefix.prefix_len() => {
                        Some(b)
                    }
                    _ => Some(m),
                })
                .cloned()
        };
        let (deny, permit) = (best(ListKind::Deny), best(ListKind::Permit));
        let protected = self.protected.covering(address);
        let reason = if protected.is_some() {
            Reason::Protected
        } else {
            self.reason(
                deny.as_ref().map(|e| e.entry.prefix.prefix_len()),
                permit.as_ref().map(|e| e.entry.prefix.prefix_len()),
            )
        };
        let deciding = match reason {
            Reason::DenyList => deny.as_ref(),
            Reason::Permitted => permit.as_ref(),
            _ => None,
        };
        let overridden = matches
            .iter()
            .filter(|m| Some(*m) != deciding)
            .cloned()
            .collect();
        Explanation {
            address,
            mode: self.mode,
            enforcement: self.enforcement,
            deny_source: deny.as_ref().map(|e| e.source.clone()),
            permit_source: permit.as_ref().map(|e| e.source.clone()),
            deny_match: deny.map(|e| e.entry),
            permit_match: permit.map(|e| e.entry),
            protected,
            overridden,
            verdict: reason.verdict(),
            reason,
        }
    }

    /// The rules for the kernel LPM tries: every source's lists merged,
    /// one rule per distinct prefix, deny where a prefix is on both lists
    /// (so the kernel's single longest-prefix lookup reaches the verdict
    /// of [`Policy::decide`]; the mode is the kernel's default for a miss).
    /// Each protected range adds a permit rule, and deny rules inside one
    /// become permits (see [`Protected`]).
    ///
    /// Rules are sorted by prefix (IPv4 first). Rule ids (hit counters) are
    /// the kernel sync's business: it keeps them stable across changes.
    ///
    /// # Errors
    ///
    /// [`PolicyError::TooManyPrefixes`] if a family exceeds the trie
    /// capacity (`MAX_PREFIXES_PER_FAMILY`), [`PolicyError::TooManyRules`]
    /// if the ids would exceed the hit-counter array (`MAX_RULE_IDS`).
    pub fn compile(&self) -> Result<Vec<CompiledRule>, PolicyError> {
        let mut merged: Vec<(IpNet, ListKind)> = Vec::new();
        for source in self.sources.values() {
            for kind in [ListKind::Deny, ListKind::Permit] {
                merged.extend(source.list(kind).table().iter().map(|(p, _)| (p, kind)));
            }
        }
        merged.extend(
            self.protected
                .rule_prefixes()
                .map(|p| (p, ListKind::Permit)),
        );
        // ListKind orders Deny before Permit: dedup keeps the deny entry.
        merged.sort_unstable();
        merged.dedup_by_key(|(p, _)| *p);

        let v4 = merged
            .iter()
            .filter(|(p, _)| matches!(p, IpNet::V4(_)))
            .count();
        for (family, count) in [
            (AddressFamily::Ipv4, v4),
            (AddressFamily::Ipv6, merged.len() - v4),
        ] {
            if count > MAX_PREFIXES_PER_FAMILY as usize {
                return Err(PolicyError::TooManyPrefixes {
                    family,
                    count,
                    max: MAX_PREFIXES_PER_FAMILY,
                });
            }
        }
        if merged.len() >= MAX_RULE_IDS as usize {
            return Err(PolicyError::TooManyRules {
                count: merged.len(),
                max: MAX_RULE_IDS,
            });
        }
        Ok(merged
            .into_iter()
            .map(|(prefix, list)| CompiledRule {
                prefix,
                action: if list == ListKind::Deny && self.protected.contains(prefix) {
                    Action::Permit
                } else {
                    list.into()
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::table::PrefixTable;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(mode: PolicyMode, deny: &[&str], permit: &[&str]) -> Policy {
        let mut p = Policy::new(mode, Enforcement::Enforce);
        p.list_mut(ListKind::Deny)
            .add(deny.iter().map(|s| net(s)), Some("deny entry"), None)
            .unwrap();
        p.list_mut(ListKind::Permit)
            .add(permit.iter().map(|s| net(s)), None, None)
            .unwrap();
        p
    }

    #[test]
    fn longest_prefix_wins_both_ways() {
        let p = policy(
            PolicyMode::AcceptAllExceptDeny,
            &["192.0.2.0/24", "198.51.100.7/32", "2001:db8:1::/48"],
            &["192.0.2.7/32", "198.51.100.0/16", "2001:db8::/32"],
        );
        // A permitted /32 inside a denied /24 passes.
        assert_eq!(p.decide(ip("192.0.2.7")), Reason::Permitted);
        assert_eq!(p.decide(ip("192.0.2.8")), Reason::DenyList);
        // A denied /32 inside a permitted /16 is dropped.
        assert_eq!(p.decide(ip("198.51.100.7")), Reason::DenyList);
        assert_eq!(p.decide(ip("198.51.1.1")), Reason::Permitted);
        assert_eq!(p.decide(ip("2001:db8:1::25")), Reason::DenyList);
        assert_eq!(p.decide(ip("2001:db8:2::25")), Reason::Permitted);
        assert_eq!(p.decide(ip("203.0.113.1")), Reason::DefaultAccept);
        // File order does not matter: the same lists added the other way round.
        let mut q = Policy::new(PolicyMode::AcceptAllExceptDeny, Enforcement::Enforce);
        q.list_mut(ListKind::Permit)
            .add([net("192.0.2.7/32")], None, None)
            .unwrap();
        q.list_mut(ListKind::Deny)
            .add([net("192.0.2.0/24")], None, None)
            .unwrap();
        assert_eq!(q.decide(ip("192.0.2.7")), Reason::Permitted);
    }

    #[test]
    fn identical_prefix_on_both_lists_is_denied() {
        let p = policy(
            PolicyMode::AcceptAllExceptDeny,
            &["192.0.2.0/24"],
            &["192.0.2.0/24"],
        );
        let e = p.explain(ip("192.0.2.1"));
        assert_eq!((e.verdict, e.reason), (Verdict::Deny, Reason::DenyList));
        assert_eq!(e.deny_match.unwrap().prefix, net("192.0.2.0/24"));
        assert_eq!(e.permit_match.unwrap().prefix, net("192.0.2.0/24"));
    }

    #[test]
    fn mode_decides_only_unlisted_sources_and_keeps_the_lists() {
        let mut p = policy(
            PolicyMode::AcceptAllExceptDeny,
            &["192.0.2.0/24"],
            &["198.51.100.0/24"],
        );
        assert_eq!(p.decide(ip("203.0.113.9")), Reason::DefaultAccept);
        p.set_mode(PolicyMode::DenyAllExceptPermit);
        assert_eq!(p.decide(ip("203.0.113.9")), Reason::NotPermitted);
        assert_eq!(p.decide(ip("198.51.100.9")), Reason::Permitted);
        assert_eq!(p.decide(ip("192.0.2.9")), Reason::DenyList);
        assert_eq!(p.list(ListKind::Deny).len().total(), 1);
        assert_eq!(p.list(ListKind::Permit).len().total(), 1);
        p.set_mode(PolicyMode::AcceptAllExceptDeny);
        assert_eq!(p.decide(ip("192.0.2.9")), Reason::DenyList);
    }

    #[test]
    fn ipv4_mapped_addresses_are_judged_as_ipv4() {
        let p = policy(
            PolicyMode::DenyAllExceptPermit,
            &["192.0.2.0/24", "::/8"],
            &["::ffff:198.51.100.0/120"],
        );
        let e = p.explain(ip("::ffff:198.51.100.20"));
        assert_eq!(e.address, ip("198.51.100.20"));
        assert_eq!(e.reason, Reason::Permitted);
        assert_eq!(e.permit_match.unwrap().prefix, net("198.51.100.0/24"));
        // ::/8 covers the mapped range as IPv6 text, but mapped sources are IPv4.
        assert_eq!(p.decide(ip("::ffff:192.0.2.1")), Reason::DenyList);
        assert_eq!(p.decide(ip("::ffff:203.0.113.1")), Reason::NotPermitted);
        assert_eq!(p.decide(ip("::1")), Reason::DenyList);
    }

    #[test]
    fn explanation_names_entries_and_comments() {
        let mut p = policy(
            PolicyMode::AcceptAllExceptDeny,
            &["192.0.2.0/24"],
            &["192.0.2.7/32"],
        );
        assert_eq!(
            p.explain(ip("192.0.2.7")).to_string(),
            "192.0.2.7: permit, permit list entry 192.0.2.7/32 is more specific than deny list entry 192.0.2.0/24"
        );
        let e = p.explain(ip("192.0.2.8"));
        assert!(e.refused());
        assert_eq!(
            e.to_string(),
            "192.0.2.8: deny, deny list entry 192.0.2.0/24 (deny entry)"
        );
        p.set_enforcement(Enforcement::Monitor);
        let e = p.explain(ip("203.0.113.5"));
        assert!(!e.refused());
        assert_eq!(e.to_string(), "203.0.113.5: permit, on no list; mode accept-all-except-deny (enforcement monitor: nothing is dropped)");
        let e = p.explain(ip("192.0.2.9"));
        assert_eq!(e.verdict, Verdict::Deny);
        assert!(!e.refused(), "monitor refuses nothing");
    }

    #[test]
    fn policy_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Policy>();
        shareable::<Explanation>();
    }

    #[test]
    fn with_lists_checks_which_list_is_which() {
        let err = Policy::with_lists(
            PolicyMode::default(),
            Enforcement::default(),
            AccessList::new(ListKind::Permit),
            AccessList::new(ListKind::Permit),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the permit list was given where the deny list belongs"
        );
    }

    #[test]
    fn names_and_kernel_values() {
        assert_eq!(
            "deny-all-except-permit".parse::<PolicyMode>(),
            Ok(PolicyMode::DenyAllExceptPermit)
        );
        assert_eq!(PolicyMode::default().to_string(), "accept-all-except-deny");
        assert_eq!("monitor".parse::<Enforcement>(), Ok(Enforcement::Monitor));
        assert!("block".parse::<Enforcement>().is_err());
        assert_eq!(
            smtpguard_common::Mode::from(PolicyMode::DenyAllExceptPermit) as u32,
            1
        );
        assert_eq!(
            smtpguard_common::Enforcement::from(Enforcement::Off) as u32,
            2
        );
        assert_eq!(Action::from(Verdict::Deny) as u32, 2);
        assert_eq!(Action::from(Reason::Permitted.verdict()) as u32, 1);
    }

    #[test]
    fn compile_merges_identical_prefixes_deny_wins_with_ids_from_one() {
        let p = policy(
            PolicyMode::AcceptAllExceptDeny,
            &["192.0.2.0/24", "2001:db8::/32", "198.51.100.7/32"],
            &[
                "192.0.2.0/24",
                "198.51.100.0/24",
                "2001:db8::/32",
                "2001:db8:1::/48",
            ],
        );
        let rules = p.compile().unwrap();
        let got: Vec<(String, u32)> = rules
            .iter()
            .map(|r| (r.prefix.to_string(), r.action as u32))
            .collect();
        assert_eq!(
            got,
            [
                ("192.0.2.0/24".to_string(), 2),
                ("198.51.100.0/24".to_string(), 1),
                ("198.51.100.7/32".to_string(), 2),
                ("2001:db8::/32".to_string(), 2),
                ("2001:db8:1::/48".to_string(), 1),
            ]
        );
        assert_eq!(p.compile().unwrap(), rules, "same lists, same rules");
    }

    /// What the XDP program does with the compiled rules: one LPM lookup in
    /// the trie of the (mapped-normalised) family, the mode on a miss.
    fn kernel_verdict(tries: &PrefixTable<Action>, mode: PolicyMode, addr: IpAddr) -> Verdict {
        match tries.lpm(addr.to_canonical()) {
            Some((_, Action::Deny)) => Verdict::Deny,
            Some((_, Action::Permit)) => Verdict::Permit,
            None => match mode {
                PolicyMode::AcceptAllExceptDeny => Verdict::Permit,
                PolicyMode::DenyAllExceptPermit => Verdict::Deny,
            },
        }
    }

    /// Naive reference: scan every entry of a list, keep the longest match.
    fn naive_longest(list: &[IpNet], addr: IpAddr) -> Option<IpNet> {
        list.iter()
            .filter(|p| p.contains(&addr))
            .max_by_key(|p| p.prefix_len())
            .copied()
    }

    fn naive_reason(mode: PolicyMode, deny: &[IpNet], permit: &[IpNet], addr: IpAddr) -> Reason {
        let addr = match addr {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        let d = naive_longest(deny, addr).map(|p| p.prefix_len());
        let p = naive_longest(permit, addr).map(|p| p.prefix_len());
        match (d, p) {
            (None, None) if mode == PolicyMode::AcceptAllExceptDeny => Reason::DefaultAccept,
            (None, None) => Reason::NotPermitted,
            (Some(d), Some(p)) if d >= p => Reason::DenyList,
            (Some(_), None) => Reason::DenyList,
            _ => Reason::Permitted,
        }
    }

    /// Random prefixes inside a small base so that lists nest and overlap.
    fn random_prefix(rng: &mut StdRng) -> IpNet {
        if rng.random_bool(0.7) {
            let addr = Ipv4Addr::from(0xC633_0000u32 | (rng.random::<u32>() & 0xFFFF)); // 198.51.0.0/16
            IpNet::V4(
                ipnet::Ipv4Net::new(addr, rng.random_range(12..=32))
                    .unwrap()
                    .trunc(),
            )
        } else {
            let low = rng.random::<u128>() & 0xFFFF_FFFF;
            let addr =
                Ipv6Addr::from((0x2001_0db8u128 << 96) | (low << 64) | rng.random::<u16>() as u128);
            IpNet::V6(
                ipnet::Ipv6Net::new(addr, rng.random_range(24..=128))
                    .unwrap()
                    .trunc(),
            )
        }
    }

    fn random_address(rng: &mut StdRng) -> IpAddr {
        match rng.random_range(0..10) {
            0..=5 => IpAddr::V4(Ipv4Addr::from(
                0xC633_0000u32 | (rng.random::<u32>() & 0xFFFF),
            )),
            6 => IpAddr::V4(Ipv4Addr::from(rng.random::<u32>())),
            7 => IpAddr::V6(
                Ipv4Addr::from(0xC633_0000u32 | (rng.random::<u32>() & 0xFFFF)).to_ipv6_mapped(),
            ),
            _ => {
                let low = rng.random::<u128>() & 0xFFFF_FFFF;
                let bits = if rng.random_bool(0.5) {
                    rng.random::<u16>() as u128
                } else {
                    rng.random::<u64>() as u128
                };
                IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | (low << 64) | bits))
            }
        }
    }

    #[test]
    fn random_lists_agree_with_naive_longest_prefix_and_the_kernel_rules() {
        let seed = rand::rng().random::<u64>();
        let mut rng = StdRng::seed_from_u64(seed);
        for round in 0..5 {
            let deny: Vec<IpNet> = (0..rng.random_range(0..300))
                .map(|_| random_prefix(&mut rng))
                .collect();
            let mut permit: Vec<IpNet> = (0..rng.random_range(0..300))
                .map(|_| random_prefix(&mut rng))
                .collect();
            // Some identical prefixes on both lists.
            permit.extend(deny.iter().take(20).copied());
            let mode = if round % 2 == 0 {
                PolicyMode::AcceptAllExceptDeny
            } else {
                PolicyMode::DenyAllExceptPermit
            };
            let mut p = Policy::new(mode, Enforcement::Enforce);
            p.list_mut(ListKind::Deny)
                .add(deny.iter().copied(), None, None)
                .unwrap();
            p.list_mut(ListKind::Permit)
                .add(permit.iter().copied(), None, None)
                .unwrap();
            let mut tries = PrefixTable::new();
            for rule in p.compile().unwrap() {
                assert!(
                    tries.insert(rule.prefix, rule.action).is_none(),
                    "one rule per prefix"
                );
            }
            for _ in 0..10_000 {
                let addr = random_address(&mut rng);
                let want = naive_reason(mode, &deny, &permit, addr);
                let explained = p.explain(addr);
                assert_eq!(explained.reason, want, "seed {seed}, round {round}, {addr}");
                assert_eq!(p.decide(addr), want, "seed {seed}, {addr}");
                assert_eq!(
                    explained.deny_match.map(|e| e.prefix),
                    naive_longest(&deny, explained.address),
                    "seed {seed}, {addr}"
                );
                assert_eq!(
                    explained.permit_match.map(|e| e.prefix),
                    naive_longest(&permit, explained.address),
                    "seed {seed}, {addr}"
                );
                assert_eq!(
                    kernel_verdict(&tries, mode, addr),
                    want.verdict(),
                    "seed {seed}, {addr}"
                );
            }
        }
    }

    fn source(name: &str) -> SourceName {
        SourceName::new(name).unwrap()
    }

    #[test]
    fn sources_merge_longest_prefix_and_name_who_decided() {
        let mut p = policy(PolicyMode::AcceptAllExceptDeny, &["192.0.2.0/24"], &[]);
        let ipsum = source("ipsum");
        p.source_mut(&ipsum)
            .list_mut(ListKind::Deny)
            .add([net("192.0.2.0/24"), net("198.51.100.0/24")], None, None)
            .unwrap();
        p.list_mut(ListKind::Permit)
            .add([net("198.51.100.7/32")], None, None)
            .unwrap();
        // The same prefix in two sources: one rule; local is named.
        let e = p.explain(ip("192.0.2.1"));
        assert_eq!(e.reason, Reason::DenyList);
        assert_eq!(e.deny_source, Some(SourceName::local()));
        assert_eq!(e.overridden.len(), 1);
        assert_eq!(e.overridden[0].source, ipsum);
        // A local permit overrides an imported deny, and says so.
        let e = p.explain(ip("198.51.100.7"));
        assert_eq!(e.reason, Reason::Permitted);
        assert_eq!(e.permit_source, Some(SourceName::local()));
        assert_eq!(
            (e.overridden[0].source.as_str(), e.overridden[0].list),
            ("ipsum", ListKind::Deny)
        );
        let rules = p.compile().unwrap();
        assert_eq!(rules.len(), 3, "{rules:?}");
        assert_eq!(
            p.origin(net("192.0.2.0/24")),
            Some(RuleOrigin::Entry(SourcedEntry {
                source: SourceName::local(),
                list: ListKind::Deny,
                entry: p.list(ListKind::Deny).get(net("192.0.2.0/24")).unwrap(),
            }))
        );
        // Removing it from local leaves ipsum's: the rule stays a deny.
        p.list_mut(ListKind::Deny).remove([net("192.0.2.0/24")]);
        assert_eq!(p.rule_action(net("192.0.2.0/24")), Some(Action::Deny));
        assert_eq!(p.explain(ip("192.0.2.1")).deny_source, Some(ipsum));
        assert_eq!(p.total_len(ListKind::Deny).total(), 2);
    }

    #[test]
    fn related_entries_cover_and_nest_across_sources() {
        let mut p = policy(PolicyMode::AcceptAllExceptDeny, &["192.0.2.0/24"], &[]);
        p.source_mut(&source("ipsum"))
            .list_mut(ListKind::Deny)
            .add([net("192.0.2.7/32"), net("198.51.100.1/32")], None, None)
            .unwrap();
        let names = |found: Vec<SourcedEntry>| -> Vec<String> {
            found
                .iter()
                .map(|e| format!("{} {}", e.source, e.entry.prefix))
                .collect()
        };
        assert_eq!(
            names(p.related(ListKind::Deny, net("192.0.0.0/16"), 10)),
            ["local 192.0.2.0/24", "ipsum 192.0.2.7/32"]
        );
        assert_eq!(
            names(p.related(ListKind::Deny, net("192.0.2.7/32"), 10)),
            ["local 192.0.2.0/24", "ipsum 192.0.2.7/32"]
        );
        assert_eq!(
            names(p.related(ListKind::Deny, net("192.0.0.0/16"), 1)).len(),
            1
        );
        assert!(p
            .related(ListKind::Permit, net("192.0.0.0/16"), 10)
            .is_empty());
    }

    #[test]
    fn protected_ranges_are_never_denied_by_either_path() {
        use crate::policy::{Protected, ProtectedKind, ProtectedRange};
        let mut p = policy(
            PolicyMode::DenyAllExceptPermit,
            &["0.0.0.0/0", "127.0.0.0/8", "127.0.0.1/32", "192.0.2.0/24"],
            &[],
        );
        p.set_protected(Protected::new(Protected::loopback().into_iter().chain([
            ProtectedRange {
                prefix: net("192.0.2.25/32"),
                kind: ProtectedKind::ListenAddress,
            },
        ])));
        let mut tries = PrefixTable::new();
        for rule in p.compile().unwrap() {
            assert_eq!(p.rule_action(rule.prefix), Some(rule.action), "{rule:?}");
            tries.insert(rule.prefix, rule.action);
        }
        for (addr, want) in [
            ("127.0.0.1", Verdict::Permit),
            ("127.9.9.9", Verdict::Permit),
            ("::1", Verdict::Permit),
            ("192.0.2.25", Verdict::Permit),
            ("192.0.2.26", Verdict::Deny),
            ("198.51.100.1", Verdict::Deny),
            ("2001:db8::1", Verdict::Deny),
        ] {
            let addr = ip(addr);
            assert_eq!(p.decide(addr).verdict(), want, "{addr}");
            assert_eq!(kernel_verdict(&tries, p.mode(), addr), want, "{addr}");
        }
        let e = p.explain(ip("127.0.0.1"));
        assert_eq!(e.reason, Reason::Protected);
        assert_eq!(e.overridden.len(), 1, "the /32 deny entry");
        assert!(matches!(
            p.origin(net("127.0.0.1/32")),
            Some(RuleOrigin::Protected(r)) if r.kind == ProtectedKind::Loopback
        ));
    }

    #[test]
    fn a_million_entries_are_fine() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut p = Policy::new(PolicyMode::AcceptAllExceptDeny, Enforcement::Enforce);
        let v4: Vec<IpNet> = (0..600_000u32)
            .map(|i| {
                IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0A00_0000 + i * 8), 29).unwrap())
            })
            .collect();
        let v6: Vec<IpNet> = (0..400_000u128)
            .map(|i| {
                IpNet::V6(
                    ipnet::Ipv6Net::new(Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 64)), 64)
                        .unwrap(),
                )
            })
            .collect();
        let started = std::time::Instant::now();
        p.list_mut(ListKind::Deny)
            .add(v4.iter().copied(), None, None)
            .unwrap();
        p.list_mut(ListKind::Deny)
            .add(v6.iter().copied(), None, None)
            .unwrap();
        p.list_mut(ListKind::Permit)
            .add([net("10.0.0.8/32")], None, None)
            .unwrap();
        let built = started.elapsed();
        assert_eq!(p.list(ListKind::Deny).len().total(), 1_000_000);
        let started = std::time::Instant::now();
        let mut denied = 0;
        for _ in 0..200_000 {
            let i = rng.random_range(0..1_200_000u32);
            if p.decide(IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i * 8 + 3))) == Reason::DenyList {
                denied += 1;
            }
        }
        let looked_up = started.elapsed();
        assert!((90_000..110_000).contains(&denied), "{denied}");
        assert_eq!(p.decide(ip("10.0.0.8")), Reason::Permitted);
        assert_eq!(p.decide(ip("2001:db8:0:3::1")), Reason::DenyList);
        let rules = p.compile().unwrap();
        assert_eq!(rules.len(), 1_000_001);
        eprintln!("1M entries: built in {built:?}, 200k lookups in {looked_up:?}");
    }
}
