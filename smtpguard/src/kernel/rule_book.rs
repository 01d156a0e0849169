//! What the kernel holds, prefix by prefix, with each prefix's stable rule
//! id: the book [`super::MapSync`] diffs new lists against.
//!
//! Kept in prefix order (a `BTreeMap`): a whole list, sorted once, is
//! diffed against the book in one merge of two sorted sequences, and the
//! new book is bulk-built from it. Hash maps cost two or three random
//! memory accesses per prefix per pass (a map per pass: the wanted set,
//! the installed set, the ids); with a million prefixes that was over half
//! of a load. Single changes (`smtpguard deny add`) cost O(log n).
//!
//! Rule ids: index into the hit counters, 1 and up (0 is never given). A
//! prefix keeps its id while it stays installed; an id freed by a prefix
//! taken out is given to the next new one.

use std::collections::BTreeMap;

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use smtpguard_common::{Action, MAX_RULE_IDS};

/// One installed prefix: its action and rule id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Installed {
    pub action: Action,
    pub rule_id: u32,
}

/// The installed prefixes and the rule-id allocator. See the module docs.
#[derive(Debug, Default)]
pub(super) struct RuleBook {
    by_prefix: BTreeMap<IpNet, Installed>,
    /// Index = rule id; `None` = free. Index 0 is never used.
    by_id: Vec<Option<IpNet>>,
    /// Freed ids, the next to give last.
    free: Vec<u32>,
}

/// A whole new list with its rule ids, worked out without changing the
/// book ([`RuleBook::plan`]); [`RuleBook::commit`] makes it the book.
#[derive(Debug)]
pub(super) struct Plan {
    /// The new list, sorted by prefix, one entry per prefix.
    pub entries: Vec<(IpNet, Installed)>,
    /// Ids newly given, with their prefixes: their hit counters must start
    /// from zero once the list is in force.
    pub fresh: Vec<(u32, IpNet)>,
    /// Prefixes new to the book.
    pub added: usize,
    /// Prefixes whose action changes.
    pub changed: usize,
    /// Prefixes taken out.
    pub removed: usize,
    /// Ids of the prefixes taken out.
    freed: Vec<u32>,
    /// The free list afterwards.
    free: Vec<u32>,
}

/// `rules` as the book takes them: canonical prefixes (host bits zero),
/// sorted, one entry per prefix (the last one given wins).
///
/// # Panics
///
/// With [`MAX_RULE_IDS`] or more rules (the caller refuses those).
pub(super) fn canonical(rules: &[(IpNet, Action)]) -> Vec<(IpNet, Action)> {
    assert!(rules.len() < MAX_RULE_IDS as usize, "too many rules");
    // IPv4, nearly all of a big list, is sorted as packed integers
    // (address, length, position given, deny bit): several times cheaper
    // than comparing tuples, and the position keeps equal prefixes in the
    // order given. IPv6 takes a stable sort.
    let mut v4: Vec<u64> = Vec::with_capacity(rules.len());
    let mut v6: Vec<(IpNet, Action)> = Vec::new();
    for (position, (net, action)) in rules.iter().enumerate() {
        match net.trunc() {
            IpNet::V4(n) => v4.push(
                u64::from(n.addr().to_bits()) << ADDR_SHIFT
                    | u64::from(n.prefix_len()) << LEN_SHIFT
                    | (position as u64) << 1
                    | u64::from(*action == Action::Deny),
            ),
            n => v6.push((n, *action)),
        }
    }
    v4.sort_unstable();
    v6.sort_by_key(|r| r.0);
    let mut out: Vec<(IpNet, Action)> = Vec::with_capacity(v4.len() + v6.len());
    out.extend(v4.iter().map(|&key| {
        let addr = Ipv4Addr::from_bits((key >> ADDR_SHIFT) as u32);
        let len = ((key >> LEN_SHIFT) & 0x3f) as u8;
        let net = Ipv4Net::new(addr, len).expect("a length of at most 32");
        let action = if key & 1 == 1 {
            Action::Deny
        } else {
            Action::Permit
        };
        (IpNet::V4(net), action)
    }));
    out.extend(v6);
    // `later` is dropped into the kept `earlier`, which takes its action.
    out.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            earlier.1 = later.1;
        }
        same
    });
    out
}

/// Where a packed IPv4 key of [`canonical`] holds the prefix length (6
/// bits, above 21 bits of position and the deny bit) and the address.
const LEN_SHIFT: u32 = 22;
const ADDR_SHIFT: u32 = LEN_SHIFT + 6;

/// The smallest IPv6 prefix: every IPv4 prefix sorts before it.
fn first_v6() -> IpNet {
    IpNet::V6(Ipv6Net::default())
}

impl RuleBook {
    /// The entry of `net` (canonical).
    pub fn get(&self, net: &IpNet) -> Option<Installed> {
        self.by_prefix.get(net).copied()
    }

    /// Prefixes in the book: (IPv4, IPv6).
    pub fn len(&self) -> (usize, usize) {
        let v6 = self.by_prefix.range(first_v6()..).count();
        (self.by_prefix.len() - v6, v6)
    }

    /// Prefixes in the book, both families.
    pub fn total(&self) -> usize {
        self.by_prefix.len()
    }

    /// Whether the book is empty.
    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// Every entry, sorted by prefix.
    pub fn iter(&self) -> impl Iterator<Item = (&IpNet, &Installed)> {
        self.by_prefix.iter()
    }

    /// The IPv6 entries, sorted by prefix.
    pub fn iter_v6(&self) -> impl Iterator<Item = (&IpNet, &Installed)> {
        self.by_prefix.range(first_v6()..)
    }

    /// The prefix behind a rule id.
    pub fn prefix_of(&self, rule_id: u32) -> Option<IpNet> {
        self.by_id.get(rule_id as usize).copied().flatten()
    }

    /// The book made `wanted` ([`canonical`]), without changing it: one
    /// merge of the two sorted lists. Kept prefixes keep their ids; new
    /// ones get freed ids (those `wanted` frees first), then ids past the
    /// highest given.
    pub fn plan(&self, wanted: &[(IpNet, Action)]) -> Plan {
        let mut entries = Vec::with_capacity(wanted.len());
        let mut freed = Vec::new();
        let (mut added, mut changed) = (0, 0);
        let mut old = self.by_prefix.iter().peekable();
        for &(net, action) in wanted {
            while let Some((_, gone)) = old.next_if(|(o, _)| **o < net) {
                freed.push(gone.rule_id);
            }
            // 0: given below, once every freed id is known.
            let rule_id = match old.next_if(|(o, _)| **o == net) {
                Some((_, kept)) => {
                    changed += usize::from(kept.action != action);
                    kept.rule_id
                }
                None => {
                    added += 1;
                    0
                }
            };
            entries.push((net, Installed { action, rule_id }));
        }
        freed.extend(old.map(|(_, gone)| gone.rule_id));
        let mut free = self.free.clone();
        free.extend(&freed);
        let mut next = self.by_id.len().max(1) as u32;
        let mut fresh = Vec::with_capacity(added);
        if added > 0 {
            for (net, i) in entries.iter_mut().filter(|(_, i)| i.rule_id == 0) {
                i.rule_id = free.pop().unwrap_or_else(|| {
                    next += 1;
                    next - 1
                });
                fresh.push((i.rule_id, *net));
            }
        }
        Plan {
            entries,
            fresh,
            added,
            changed,
            removed: freed.len(),
            freed,
            free,
        }
    }

    /// Makes a [`RuleBook::plan`] of this book the book.
    pub fn commit(&mut self, plan: Plan) {
        for id in plan.freed {
            self.by_id[id as usize] = None;
        }
        for (id, net) in plan.fresh {
            let id = id as usize;
            if self.by_id.len() <= id {
                self.by_id.resize(id + 1, None);
            }
            self.by_id[id] = Some(net);
        }
        self.free = plan.free;
        // Sorted input: a linear bulk build.
        self.by_prefix = plan.entries.into_iter().collect();
    }

    /// Installs `net` (canonical) with `action`, or changes its action.
    /// Returns its rule id and `true` when the id is newly given (its hit
    /// counter must start from zero).
    pub fn set(&mut self, net: IpNet, action: Action) -> (u32, bool) {
        if let Some(i) = self.by_prefix.get_mut(&net) {
            i.action = action;
            return (i.rule_id, false);
        }
        let rule_id = match self.free.pop() {
            Some(id) => id,
            None => {
                if self.by_id.is_empty() {
                    self.by_id.push(None);
                }
                self.by_id.push(None);
                (self.by_id.len() - 1) as u32
            }
        };
        self.by_id[rule_id as usize] = Some(net);
        self.by_prefix.insert(net, Installed { action, rule_id });
        (rule_id, true)
    }

    /// Takes `net` out; its id is freed. Returns what it was.
    pub fn remove(&mut self, net: &IpNet) -> Option<Installed> {
        let gone = self.by_prefix.remove(net)?;
        self.by_id[gone.rule_id as usize] = None;
        self.free.push(gone.rule_id);
        Some(gone)
    }

    /// Undoes [`RuleBook::set`] or [`RuleBook::remove`] of `net`: puts back
    /// `before`, what [`RuleBook::get`] gave before the change, with its id.
    pub fn put_back(&mut self, net: IpNet, before: Option<Installed>) {
        match (self.get(&net), before) {
            (Some(_), None) => {
                self.remove(&net);
            }
            (Some(_), Some(b)) => {
                self.by_prefix.insert(net, b);
            }
            (None, Some(b)) => {
                self.free.retain(|&id| id != b.rule_id);
                self.by_id[b.rule_id as usize] = Some(net);
                self.by_prefix.insert(net, b);
            }
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ids_start_at_one_and_are_reused() {
        let mut book = RuleBook::default();
        let (a, b, c) = (
            net("192.0.2.0/24"),
            net("2001:db8::/32"),
            net("198.51.100.0/24"),
        );
        assert_eq!(book.set(a, Action::Deny), (1, true));
        assert_eq!(book.set(b, Action::Deny), (2, true));
        assert_eq!(book.set(a, Action::Permit), (1, false));
        book.remove(&a);
        assert_eq!(book.prefix_of(1), None);
        assert_eq!(book.set(c, Action::Deny), (1, true));
        assert_eq!(book.prefix_of(1), Some(c));
        assert_eq!(book.prefix_of(2), Some(b));
        assert_eq!(book.len(), (1, 1));
    }

    #[test]
    fn canonical_sorts_truncates_and_keeps_the_last() {
        let rules = [
            (net("198.51.100.7/24"), Action::Deny),
            (net("2001:db8::/32"), Action::Deny),
            (net("192.0.2.0/24"), Action::Permit),
            (net("198.51.100.0/24"), Action::Permit),
        ];
        assert_eq!(
            canonical(&rules),
            vec![
                (net("192.0.2.0/24"), Action::Permit),
                (net("198.51.100.0/24"), Action::Permit),
                (net("2001:db8::/32"), Action::Deny),
            ]
        );
        let twice = [
            (net("203.0.113.0/24"), Action::Permit),
            (net("0.0.0.0/0"), Action::Deny),
            (net("203.0.113.9/24"), Action::Deny),
            (net("255.255.255.255/32"), Action::Permit),
            (net("2001:db8::1/32"), Action::Permit),
            (net("2001:db8::/32"), Action::Deny),
        ];
        assert_eq!(
            canonical(&twice),
            vec![
                (net("0.0.0.0/0"), Action::Deny),
                (net("203.0.113.0/24"), Action::Deny),
                (net("255.255.255.255/32"), Action::Permit),
                (net("2001:db8::/32"), Action::Deny),
            ]
        );
    }

    #[test]
    fn a_plan_keeps_ids_reuses_freed_ones_and_changes_nothing_until_committed() {
        let mut book = RuleBook::default();
        let (a, b, c, d) = (
            net("192.0.2.0/24"),
            net("198.51.100.0/24"),
            net("203.0.113.0/24"),
            net("2001:db8::/32"),
        );
        let first = book.plan(&canonical(&[(a, Action::Deny), (b, Action::Deny)]));
        assert_eq!((first.added, first.changed, first.removed), (2, 0, 0));
        book.commit(first);
        let id_b = book.get(&b).unwrap().rule_id;
        let id_a = book.get(&a).unwrap().rule_id;
        let plan = book.plan(&canonical(&[
            (b, Action::Permit),
            (c, Action::Deny),
            (d, Action::Deny),
        ]));
        assert_eq!((plan.added, plan.changed, plan.removed), (2, 1, 1));
        assert_eq!(
            book.get(&a).map(|i| i.rule_id),
            Some(id_a),
            "not yet committed"
        );
        book.commit(plan);
        assert_eq!(
            book.get(&b),
            Some(Installed {
                action: Action::Permit,
                rule_id: id_b
            })
        );
        assert_eq!(book.get(&a), None);
        let mut new_ids = [book.get(&c).unwrap().rule_id, book.get(&d).unwrap().rule_id];
        new_ids.sort();
        assert_eq!(new_ids, [id_a, 3], "the freed id, then the next");
        assert!(book.prefix_of(id_a).is_some());
        assert_eq!(book.len(), (2, 1));
    }

    #[test]
    fn put_back_undoes_set_and_remove() {
        let mut book = RuleBook::default();
        let (a, b) = (net("192.0.2.0/24"), net("198.51.100.0/24"));
        book.set(a, Action::Deny);
        let before = book.get(&b);
        book.set(b, Action::Deny);
        book.put_back(b, before);
        assert_eq!(book.get(&b), None);
        let before = book.get(&a);
        book.remove(&a);
        book.put_back(a, before);
        assert_eq!(book.get(&a), before);
        assert_eq!(book.prefix_of(1), Some(a));
        assert_eq!(book.set(b, Action::Deny).0, 2, "id 1 is not free");
    }
}
