//! The IPv6 lookup structure of the XDP program, from userspace: a list
//! compiled into entries and markers for binary search on prefix lengths
//! (see `smtpguard_common::V6Key`), written into the inactive IPv6
//! generation, then switched to with one store.
//!
//! Every change, a single `deny add` as much as a whole list, goes through
//! the same path: compile the whole IPv6 list (a sort and one pass), write
//! only the difference against what the inactive generation holds (after
//! a single change that is a handful of entries, unless the set of prefix
//! lengths changed), switch. The program never sees a half-written table.

use std::collections::HashMap;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};
use ipnet::Ipv6Net;
use smtpguard_common::{Rule, V6Key, V6Lengths};

/// Errors while writing the IPv6 maps.
#[derive(Debug, thiserror::Error)]
pub enum Ipv6TableError {
    /// The inactive hash map is full (or the kernel is out of memory); the
    /// generation in force is untouched.
    #[error("kernel IPv6 table is full after {written} of {wanted} entries and markers")]
    Full {
        /// Entries written in this pass before the failure.
        written: usize,
        /// Entries the pass had to write.
        wanted: usize,
        #[source]
        source: MapError,
    },
    /// Any other map operation failed.
    #[error("updating kernel map {map}")]
    Map {
        /// Map name.
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// A compiled IPv6 list: what one generation must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Entries and markers with their values.
    pub entries: HashMap<V6Key, Rule>,
    /// Distinct prefix lengths of the list, ascending.
    pub lengths: Vec<u8>,
}

/// Compiles `(prefix, rule)` pairs (canonical prefixes, one rule each) into
/// entries and markers. The output depends only on the set, not its order.
pub fn compile(rules: &[(Ipv6Net, Rule)]) -> Compiled {
    let mut lengths: Vec<u8> = rules.iter().map(|(n, _)| n.prefix_len()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    // (address, length) -> Some(rule) for entries, None for markers.
    let mut keys: HashMap<(u128, u8), Option<Rule>> = HashMap::with_capacity(rules.len() * 2);
    for (net, rule) in rules {
        let addr = u128::from(net.network());
        keys.insert(
            (mask(addr, net.prefix_len()), net.prefix_len()),
            Some(*rule),
        );
    }
    for (net, _) in rules {
        let addr = u128::from(net.network());
        let target = net.prefix_len();
        // The probes a search for `net` makes before it reaches `target`:
        // each shorter one must hit (a marker) so the search goes longer.
        let (mut lo, mut hi) = (0i32, lengths.len() as i32 - 1);
        while lo <= hi {
            let mid = (lo + hi) >> 1;
            let len = lengths[mid as usize];
            if len == target {
                break;
            }
            if len < target {
                keys.entry((mask(addr, len), len)).or_insert(None);
                lo = mid + 1;
            } else {
                hi = mid - 1;
            }
        }
    }
    // A marker's value is the longest entry that covers it. In (address,
    // length) order a covering prefix comes before everything it covers,
    // so a stack of the open entries gives it in one pass.
    let mut sorted: Vec<((u128, u8), Option<Rule>)> = keys.into_iter().collect();
    sorted.sort_unstable_by_key(|(k, _)| *k);
    let mut open: Vec<(u128, u8, Rule)> = Vec::new();
    let mut entries = HashMap::with_capacity(sorted.len());
    for ((addr, len), rule) in sorted {
        while let Some(&(top, top_len, _)) = open.last() {
            if top_len <= len && mask(addr, top_len) == top {
                break;
            }
            open.pop();
        }
        let value = match rule {
            Some(rule) => {
                open.push((addr, len, rule));
                rule
            }
            None => open.last().map(|&(_, _, r)| r).unwrap_or(Rule {
                action: 0,
                rule_id: 0,
            }),
        };
        entries.insert(key(addr, len), value);
    }
    Compiled { entries, lengths }
}

/// `addr` with all bits after the first `len` cleared.
fn mask(addr: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        128.. => addr,
        _ => addr & (u128::MAX << (128 - u32::from(len))),
    }
}

/// The map key of `(addr, len)` (see [`V6Key::addr`]).
pub fn key(addr: u128, len: u8) -> V6Key {
    let octets = addr.to_be_bytes();
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    V6Key {
        prefix_len: u32::from(len),
        addr: words,
    }
}

/// Longest-prefix match over a compiled table, exactly as the XDP program
/// searches it (for tests and the oracle).
pub fn search(table: &Compiled, addr: u128) -> Option<Rule> {
    let (mut lo, mut hi) = (0i32, table.lengths.len() as i32 - 1);
    let mut best = None;
    while lo <= hi {
        let mid = (lo + hi) >> 1;
        let len = table.lengths[mid as usize];
        match table.entries.get(&key(mask(addr, len), len)) {
            Some(rule) => {
                best = Some(*rule);
                lo = mid + 1;
            }
            None => hi = mid - 1,
        }
    }
    best.filter(|r| r.action != 0)
}

type Table = BpfHashMap<MapData, V6Key, Rule>;

/// Owner of the IPv6 maps: `SG_RULES6_A`/`_B`, `SG_LENS6`, `SG_GEN6`.
pub struct Ipv6Table {
    tables: [Table; 2],
    lengths: Array<MapData, V6Lengths>,
    generation: Array<MapData, u32>,
    /// What each generation holds, so a write is a diff.
    held: [HashMap<V6Key, Rule>; 2],
    /// The generation in force.
    active: usize,
}

impl Ipv6Table {
    /// Takes the maps; both generations start empty, A in force.
    pub(crate) fn new(
        tables: [Table; 2],
        lengths: Array<MapData, V6Lengths>,
        generation: Array<MapData, u32>,
    ) -> Self {
        Ipv6Table {
            tables,
            lengths,
            generation,
            held: [HashMap::new(), HashMap::new()],
            active: 0,
        }
    }

    /// Makes the program use exactly `rules`: compile, write the inactive
    /// generation, switch. On error the generation in force is untouched
    /// (and nothing changed for the program).
    pub fn write(&mut self, rules: &[(Ipv6Net, Rule)]) -> Result<(), Ipv6TableError> {
        let compiled = compile(rules);
        let next = 1 - self.active;
        let stale: Vec<V6Key> = self.held[next]
            .keys()
            .filter(|k| !compiled.entries.contains_key(k))
            .copied()
            .collect();
        let changed: Vec<(V6Key, Rule)> = compiled
            .entries
            .iter()
            .filter(|(k, v)| self.held[next].get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect();
        // Removals first: room for the new entries in a full map.
        for k in stale {
            match self.tables[next].remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(Ipv6TableError::Map {
                        map: "SG_RULES6",
                        source,
                    })
                }
            }
            self.held[next].remove(&k);
        }
        let wanted = changed.len();
        for (written, (k, v)) in changed.into_iter().enumerate() {
            self.tables[next]
                .insert(k, v, 0)
                .map_err(|source| Ipv6TableError::Full {
                    written,
                    wanted,
                    source,
                })?;
            self.held[next].insert(k, v);
        }
        let mut lengths = V6Lengths::empty();
        lengths.count = compiled.lengths.len() as u32;
        lengths.lengths[..compiled.lengths.len()].copy_from_slice(&compiled.lengths);
        self.lengths
            .set(next as u32, lengths, 0)
            .map_err(|source| Ipv6TableError::Map {
                map: "SG_LENS6",
                source,
            })?;
        // The switch: one aligned 4-byte store.
        self.generation
            .set(0, next as u32, 0)
            .map_err(|source| Ipv6TableError::Map {
                map: "SG_GEN6",
                source,
            })?;
        self.active = next;
        // A packet that read the old generation may still be searching it;
        // XDP runs inside an RCU read section of a few microseconds, so a
        // short pause lets it finish before the next write reuses it.
        std::thread::sleep(std::time::Duration::from_millis(2));
        Ok(())
    }

    /// Entries and markers in force.
    pub fn len(&self) -> usize {
        self.held[self.active].len()
    }

    /// Whether no entry is in force.
    pub fn is_empty(&self) -> bool {
        self.held[self.active].is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: u32, rule_id: u32) -> Rule {
        Rule { action, rule_id }
    }

    fn set(list: &[(&str, u32)]) -> Vec<(Ipv6Net, Rule)> {
        list.iter()
            .enumerate()
            .map(|(i, (n, a))| (n.parse().unwrap(), rule(*a, i as u32 + 1)))
            .collect()
    }

    /// Longest-prefix match by brute force.
    fn naive(rules: &[(Ipv6Net, Rule)], addr: u128) -> Option<Rule> {
        rules
            .iter()
            .filter(|(n, _)| mask(addr, n.prefix_len()) == u128::from(n.network()))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, r)| *r)
    }

    #[test]
    fn search_matches_brute_force_on_nested_prefixes() {
        let rules = set(&[
            ("::/0", 2),
            ("2001:db8::/32", 1),
            ("2001:db8:bad::/48", 2),
            ("2001:db8:bad::77/128", 1),
            ("2001:db8:bad:1::/64", 1),
            ("2001:db8:bad:1:8000::/65", 2),
            ("2001:db8:ff00::/40", 2),
            ("3fff::/20", 2),
        ]);
        let table = compile(&rules);
        let probes = [
            "::1",
            "2001:db8::1",
            "2001:db8:bad::1",
            "2001:db8:bad::77",
            "2001:db8:bad::76",
            "2001:db8:bad:1::1",
            "2001:db8:bad:1:8000::1",
            "2001:db8:bad:1:7fff::1",
            "2001:db8:ff00::1",
            "2001:db8:feff::1",
            "3fff:fff::1",
            "3fff:1000::",
        ];
        for p in probes {
            let addr = u128::from(p.parse::<std::net::Ipv6Addr>().unwrap());
            assert_eq!(search(&table, addr), naive(&rules, addr), "{p}");
        }
    }

    #[test]
    fn output_depends_only_on_the_set() {
        let mut rules = set(&[
            ("2001:db8::/32", 1),
            ("2001:db8:bad::/48", 2),
            ("2001:db8:bad::77/128", 1),
            ("3fff::/20", 2),
        ]);
        let first = compile(&rules);
        rules.reverse();
        assert_eq!(compile(&rules), first);
    }

    #[test]
    fn an_uncovered_marker_is_no_match() {
        let addr = |a: &str| u128::from(a.parse::<std::net::Ipv6Addr>().unwrap());
        // Lengths 32 and 128: the /128 needs a marker at /32, which no
        // entry covers.
        let table = compile(&set(&[("2001:db8::/32", 2), ("3fff::1/128", 2)]));
        let marker = key(mask(addr("3fff::1"), 32), 32);
        assert_eq!(table.entries.get(&marker), Some(&rule(0, 0)));
        assert_eq!(search(&table, addr("3fff::2")), None);
        assert_eq!(search(&table, addr("3fff::1")), Some(rule(2, 2)));
    }
}
