//! The IPv6 lookup structure of the XDP program, from userspace: the
//! multibit trie of `smtpguard_common::ipv6_table` (a 16-bit first level,
//! then one node of 256 entries as runs per further octet), compiled from
//! the merged list and written into the inactive IPv6 generation, then
//! switched to with one store into `SG_GEN6`.
//!
//! Every change, a single `deny add` as much as a whole list, goes through
//! the same path: [`compile`] the whole IPv6 list (a sort and one pass per
//! level, time linear in the output), copy it into the inactive
//! generation's maps through `mmap` (the maps are `BPF_F_MMAPABLE`: the
//! 256 KiB first level, then only the nodes and leaves the list uses;
//! whatever lies beyond them is stale and unreachable), switch. The program
//! never sees a half-written table.
//!
//! The maps are preallocated, so capacity is counted in nodes and leaves
//! (bounds in `smtpguard_common::ipv6_table`): a list that needs more is
//! refused whole with [`Ipv6TableError::Full`] before anything is written.

use std::{
    net::Ipv6Addr,
    sync::atomic::{fence, Ordering},
    time::Duration,
};

use aya::{
    maps::{Array, MapData, MapError},
    Ebpf,
};
use ipnet::Ipv6Net;
use smtpguard_common::{
    ipv6_table::{entry, Group, MAX_GROUPS, MAX_LEAVES, MAX_LEVELS},
    map_names, Rule,
};

use super::{
    ipv4_table::{
        compile::{sweep, Span},
        writer::Region,
    },
    KernelError,
};

/// 2^16: the /16s in the first level.
pub const TBL16_ENTRIES: usize = 1 << 16;

/// How long the generation switched away from stays untouched: XDP runs
/// inside an RCU read section of a few microseconds, so after this no
/// packet can still be reading it.
const GRACE: Duration = Duration::from_millis(2);

/// Errors while writing the IPv6 maps. On any of them the generation in
/// force is untouched and no switch happened.
#[derive(Debug, thiserror::Error)]
pub enum Ipv6TableError {
    /// More IPv6 prefixes than the table was given room for (only tests
    /// load a capacity below the policy's own limit).
    #[error("{count} IPv6 prefixes exceed the kernel table capacity of {max}")]
    TooManyPrefixes {
        /// Distinct prefixes wanted.
        count: usize,
        /// The capacity.
        max: usize,
    },
    /// The list needs more nodes or leaves than the maps hold.
    #[error(
        "kernel IPv6 table too small: the IPv6 entries of all sources, merged, need \
         {}{needed} {part}, a generation holds {max}; aggregate or shorten them (a prefix longer than /16 \
         takes up to one node and its leaves per octet past the second)",
        if *.exact { "" } else { "more than " }
    )]
    Full {
        /// `nodes` or `leaves`.
        part: &'static str,
        /// How many the whole list needs (`exact`), or a number it needs
        /// more than: counting stops at [`COUNT_PAST_LIMIT`] times the limit.
        needed: usize,
        /// Whether `needed` is the whole list's need.
        exact: bool,
        /// What the maps hold of it.
        max: usize,
    },
    /// The generation switch failed.
    #[error("updating kernel map {map}")]
    Map {
        /// Map name.
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// How full the IPv6 table is ([`Ipv6Table::usage`]): shown by `stats`
/// and `/metrics`, so that an operator sees a list coming close to what
/// the table holds before a change is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// IPv6 prefixes in force (count).
    pub prefixes: usize,
    /// Nodes the list in force uses (count).
    pub nodes: usize,
    /// Nodes a generation holds.
    pub nodes_max: usize,
    /// Leaves the list in force uses (count).
    pub leaves: usize,
    /// Leaves a generation holds.
    pub leaves_max: usize,
}

/// How many nodes and leaves a compiled list may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Nodes (`GROUPS6` elements).
    pub groups: usize,
    /// Leaves (`LEAVES6` entries).
    pub leaves: usize,
}

impl Limits {
    /// What the kernel maps hold.
    pub const KERNEL: Limits = Limits {
        groups: MAX_GROUPS as usize,
        leaves: MAX_LEAVES as usize,
    };
}

/// A compiled IPv6 list: what one generation must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// One entry per /16 ([`TBL16_ENTRIES`]).
    pub tbl16: Vec<u32>,
    /// Nodes, indexed by the payload of `GROUP` entries.
    pub groups: Vec<Group>,
    /// Leaves, indexed from the nodes' `base`.
    pub leaves: Vec<u32>,
}

/// One prefix of the normalized list.
#[derive(Clone, Copy, Debug)]
struct Prefix {
    /// The network as a number (host bits zero).
    net: u128,
    len: u8,
    /// Packed entry (`entry::PERMIT`/`DENY`, rule id).
    entry: u32,
}

/// Sorted by (network, length), one rule per prefix: deny wins a tie,
/// else the smaller entry, so the output depends only on the set.
fn normalize(rules: &[(Ipv6Net, Rule)]) -> Vec<Prefix> {
    let mut out: Vec<Prefix> = rules
        .iter()
        .map(|(net, rule)| {
            let net = net.trunc();
            Prefix {
                net: u128::from(net.network()),
                len: net.prefix_len(),
                entry: entry::pack(rule.action, rule.rule_id),
            }
        })
        .collect();
    out.sort_unstable_by_key(|p| {
        (
            p.net,
            p.len,
            std::cmp::Reverse(p.entry >> entry::KIND_SHIFT),
            p.entry,
        )
    });
    out.dedup_by_key(|p| (p.net, p.len));
    out
}

/// Compiles `(prefix, rule)` pairs with no limit on the output (tests and
/// measurements; the writer uses [`compile_within`]).
pub fn compile(rules: &[(Ipv6Net, Rule)]) -> Compiled {
    let unlimited = Limits {
        groups: usize::MAX,
        leaves: usize::MAX,
    };
    compile_within(rules, unlimited).expect("no limit")
}

/// Compiles `(prefix, rule)` pairs (`rule.action` 1 permit or 2 deny).
/// Prefixes are truncated to canonical form; the same prefix twice keeps
/// the deny. The output depends only on the set, never on its order.
///
/// # Errors
///
/// [`Ipv6TableError::Full`] when the output would exceed `limits`, with
/// what the whole list needs (a hopeless list costs no more memory than the
/// limits: past them, the nodes and leaves are counted, not stored).
pub fn compile_within(
    rules: &[(Ipv6Net, Rule)],
    limits: Limits,
) -> Result<Compiled, Ipv6TableError> {
    compile_normalized(normalize(rules), limits)
}

/// Whether the IPv6 prefixes of `rules` (merged prefixes and actions, as
/// [`super::MapSync::apply`] takes them) fit the kernel table: the capacity
/// check a write makes, in userspace only, for `config check`, the start
/// and dry runs, before anything is written. A list that fits gives the
/// [`Usage`] it would have in force.
///
/// # Errors
///
/// [`Ipv6TableError::Full`] or [`Ipv6TableError::TooManyPrefixes`], as a
/// write of the same list would give.
pub fn check_fits(
    rules: &[(ipnet::IpNet, smtpguard_common::Action)],
) -> Result<Usage, Ipv6TableError> {
    let v6: Vec<(Ipv6Net, Rule)> = rules
        .iter()
        .filter_map(|(net, action)| match net {
            ipnet::IpNet::V6(n) => Some((*n, *action)),
            ipnet::IpNet::V4(_) => None,
        })
        .zip(1u32..)
        // Any distinct rule ids: runs split where the real ones would.
        .map(|((net, action), rule_id)| {
            (
                net,
                Rule {
                    action: action as u32,
                    rule_id,
                },
            )
        })
        .collect();
    let capacity = smtpguard_common::MAX_PREFIXES_PER_FAMILY as usize;
    if v6.len() > capacity {
        return Err(Ipv6TableError::TooManyPrefixes {
            count: v6.len(),
            max: capacity,
        });
    }
    let compiled = compile_within(&v6, Limits::KERNEL)?;
    Ok(Usage {
        prefixes: v6.len(),
        nodes: compiled.groups.len(),
        nodes_max: Limits::KERNEL.groups,
        leaves: compiled.leaves.len(),
        leaves_max: Limits::KERNEL.leaves,
    })
}

/// [`compile_within`] of a [`normalize`]d list.
fn compile_normalized(prefixes: Vec<Prefix>, limits: Limits) -> Result<Compiled, Ipv6TableError> {
    let (short, long): (Vec<Prefix>, Vec<Prefix>) = prefixes.into_iter().partition(|p| p.len <= 16);
    let mut tbl16 = vec![entry::NONE; TBL16_ENTRIES];
    let spans: Vec<Span> = short
        .iter()
        .map(|p| Span {
            start: (p.net >> 112) as u32,
            size: 1 << (16 - p.len),
            entry: p.entry,
        })
        .collect();
    sweep(&spans, 0, TBL16_ENTRIES as u32, entry::NONE, |lo, hi, v| {
        tbl16[lo as usize..hi as usize].fill(v)
    });
    let mut builder = Builder {
        groups: Vec::new(),
        leaves: Vec::new(),
        limits,
        needed: Limits {
            groups: 0,
            leaves: 0,
        },
        stopped: false,
    };
    for chunk in long.chunk_by(|a, b| a.net >> 112 == b.net >> 112) {
        let x = (chunk[0].net >> 112) as usize;
        tbl16[x] = builder.node(16, tbl16[x], chunk);
    }
    if builder.over() {
        return Err(builder.full());
    }
    Ok(Compiled {
        tbl16,
        groups: builder.groups,
        leaves: builder.leaves,
    })
}

/// Past a limit, the compiler goes on counting until the list is known to
/// need this many times what the table holds, then stops: a hopeless list
/// (a million scattered /128s needs 14 million nodes) is refused in about
/// the time a list that fits takes to compile.
pub const COUNT_PAST_LIMIT: usize = 4;

/// The nodes and leaves built so far.
struct Builder {
    groups: Vec<Group>,
    leaves: Vec<u32>,
    limits: Limits,
    /// Nodes and leaves the list needs, counted on past the limits: once
    /// either is over, nothing more is stored (a hopeless list costs no
    /// more memory than the limits) but the counting goes on, so that the
    /// error can say how much the list needs.
    needed: Limits,
    /// The counting stopped ([`Builder::hopeless`]): `needed` is a lower
    /// bound.
    stopped: bool,
}

impl Builder {
    /// Whether the output is past a limit (and no longer stored).
    fn over(&self) -> bool {
        self.needed.groups > self.limits.groups || self.needed.leaves > self.limits.leaves
    }

    /// Whether the counting has gone far enough past a limit to stop.
    fn hopeless(&self) -> bool {
        self.needed.groups > self.limits.groups.saturating_mul(COUNT_PAST_LIMIT)
            || self.needed.leaves > self.limits.leaves.saturating_mul(COUNT_PAST_LIMIT)
    }

    /// The error for a list past a limit, naming the part that is.
    fn full(&self) -> Ipv6TableError {
        let exact = !self.stopped;
        if self.needed.groups > self.limits.groups {
            Ipv6TableError::Full {
                part: "nodes",
                needed: self.needed.groups,
                exact,
                max: self.limits.groups,
            }
        } else {
            Ipv6TableError::Full {
                part: "leaves",
                needed: self.needed.leaves,
                exact,
                max: self.limits.leaves,
            }
        }
    }
}

impl Builder {
    /// Builds the node of the 8 bits after `depth` (16, 24, ..., 120) for
    /// `prefixes` (sorted, longer than `depth`, all under this node), where
    /// `default` is the verdict of the shorter prefixes covering the node.
    /// Children first, so a node's leaves (which include its children's
    /// `GROUP` entries) are contiguous. Returns the node's `GROUP` entry.
    fn node(&mut self, depth: u8, default: u32, prefixes: &[Prefix]) -> u32 {
        if self.hopeless() {
            self.stopped = true;
            return entry::NONE;
        }
        let shift = 120 - u32::from(depth);
        let child = |p: &Prefix| ((p.net >> shift) & 0xff) as u32;
        let (short, long): (Vec<Prefix>, Vec<Prefix>) =
            prefixes.iter().partition(|p| p.len <= depth + 8);
        let spans: Vec<Span> = short
            .iter()
            .map(|p| Span {
                start: child(p),
                size: 1 << (depth + 8 - p.len),
                entry: p.entry,
            })
            .collect();
        let mut children = [entry::NONE; 256];
        sweep(&spans, 0, 256, default, |lo, hi, v| {
            children[lo as usize..hi as usize].fill(v)
        });
        for chunk in long.chunk_by(|a, b| child(a) == child(b)) {
            let c = child(&chunk[0]) as usize;
            children[c] = self.node(depth + 8, children[c], chunk);
        }
        let index = self.needed.groups as u32;
        let mut group = Group {
            base: self.needed.leaves as u32,
            ..Group::default()
        };
        let mut runs = Vec::new();
        for (c, &e) in children.iter().enumerate() {
            if c == 0 || children[c - 1] != e {
                group.bitmap[c / 64] |= 1 << (c % 64);
                runs.push(e);
            }
        }
        self.needed.groups += 1;
        self.needed.leaves += runs.len();
        if self.over() {
            return entry::pack(entry::GROUP, index);
        }
        self.leaves.extend(runs);
        let mut rank = 0u32;
        for w in 0..4 {
            group.rank[w] = rank as u8;
            rank += group.bitmap[w].count_ones();
        }
        self.groups.push(group);
        entry::pack(entry::GROUP, index)
    }
}

/// The entry for `addr` in a compiled table, found exactly as the XDP
/// program finds it (for tests and the oracle); decode with [`decode`].
pub fn lookup(tbl16: &[u32], groups: &[Group], leaves: &[u32], addr: Ipv6Addr) -> u32 {
    let a = u128::from(addr);
    let mut e = tbl16[(a >> 112) as usize];
    for level in 0..MAX_LEVELS {
        if e >> entry::KIND_SHIFT != entry::GROUP {
            return e;
        }
        let group = &groups[(e & entry::PAYLOAD) as usize];
        let b = ((a >> (104 - 8 * level)) & 0xff) as u32;
        let word = (b >> 6) as usize;
        let below = (group.bitmap[word] << (63 - (b & 63))).count_ones();
        e = leaves[(group.base + u32::from(group.rank[word]) + below - 1) as usize];
    }
    e
}

/// An entry as the kernel's [`Rule`]; `None` for no match (and for a
/// `GROUP` entry, which the program never takes as a verdict).
pub fn decode(e: u32) -> Option<Rule> {
    let action = e >> entry::KIND_SHIFT;
    (action == entry::PERMIT || action == entry::DENY).then_some(Rule {
        action,
        rule_id: e & entry::PAYLOAD,
    })
}

impl Compiled {
    /// [`lookup`] in this table, decoded.
    pub fn lookup(&self, addr: Ipv6Addr) -> Option<Rule> {
        decode(lookup(&self.tbl16, &self.groups, &self.leaves, addr))
    }
}

/// One IPv6 generation's three maps.
struct Generation {
    tbl16: Region<u32>,
    groups: Region<Group>,
    leaves: Region<u32>,
}

/// Owner of the IPv6 maps: `SG_TBL16_6_*`, `SG_GROUPS6_*`, `SG_LEAVES6_*`
/// (mapped) and `SG_GEN6`.
pub struct Ipv6Table {
    generations: [Generation; 2],
    /// `SG_GEN6`; `None` for a table on the heap (tests).
    generation: Option<Array<MapData, u32>>,
    /// The generation in force.
    active: usize,
    /// Prefixes in force.
    prefixes: usize,
    /// Nodes and leaves the generation in force uses.
    used: Limits,
    /// Most prefixes a list may hold.
    capacity: usize,
    /// Nodes and leaves one generation holds.
    limits: Limits,
}

impl Ipv6Table {
    /// Maps both generations and takes `SG_GEN6`; both generations start
    /// empty (the kernel zeroes arrays: every entry `NONE`), A in force.
    /// `capacity` is the most IPv6 prefixes a list may hold.
    pub(crate) fn take_from(ebpf: &mut Ebpf, capacity: usize) -> Result<Self, KernelError> {
        let mut take = |i: usize| -> Result<Generation, KernelError> {
            Ok(Generation {
                tbl16: Region::map(ebpf, map_names::TBL16_V6[i], TBL16_ENTRIES)?,
                groups: Region::map(ebpf, map_names::GROUPS6[i], MAX_GROUPS as usize)?,
                leaves: Region::map(ebpf, map_names::LEAVES6[i], MAX_LEAVES as usize)?,
            })
        };
        let generations = [take(0)?, take(1)?];
        let generation = ebpf
            .take_map(map_names::GENERATION_V6)
            .and_then(|m| Array::try_from(m).ok())
            .ok_or(KernelError::MissingMap(map_names::GENERATION_V6))?;
        Ok(Ipv6Table {
            generations,
            generation: Some(generation),
            active: 0,
            prefixes: 0,
            used: Limits {
                groups: 0,
                leaves: 0,
            },
            capacity,
            limits: Limits::KERNEL,
        })
    }

    /// A table on the heap holding `limits`, for tests.
    pub fn in_memory(capacity: usize, limits: Limits) -> Self {
        let heap = || Generation {
            tbl16: Region::heap(TBL16_ENTRIES),
            groups: Region::heap(limits.groups),
            leaves: Region::heap(limits.leaves),
        };
        Ipv6Table {
            generations: [heap(), heap()],
            generation: None,
            active: 0,
            prefixes: 0,
            used: Limits {
                groups: 0,
                leaves: 0,
            },
            capacity,
            limits,
        }
    }

    /// Makes the program use exactly `rules`: compile, write the inactive
    /// generation, switch. In force when this returns.
    ///
    /// # Errors
    ///
    /// [`Ipv6TableError::TooManyPrefixes`], [`Ipv6TableError::Full`] (both
    /// before anything is written), [`Ipv6TableError::Map`] if the switch
    /// fails; in every case the generation in force is untouched.
    pub fn write(&mut self, rules: &[(Ipv6Net, Rule)]) -> Result<(), Ipv6TableError> {
        let prefixes = normalize(rules);
        let count = prefixes.len();
        if count > self.capacity {
            return Err(Ipv6TableError::TooManyPrefixes {
                count,
                max: self.capacity,
            });
        }
        let compiled = compile_normalized(prefixes, self.limits)?;
        let next = 1 - self.active;
        let target = &mut self.generations[next];
        target.tbl16.slice_mut().copy_from_slice(&compiled.tbl16);
        target.groups.slice_mut()[..compiled.groups.len()].copy_from_slice(&compiled.groups);
        target.leaves.slice_mut()[..compiled.leaves.len()].copy_from_slice(&compiled.leaves);
        fence(Ordering::Release);
        // The switch: one aligned 4-byte store.
        if let Some(generation) = &mut self.generation {
            generation
                .set(0, next as u32, 0)
                .map_err(|source| Ipv6TableError::Map {
                    map: map_names::GENERATION_V6,
                    source,
                })?;
        }
        self.active = next;
        self.prefixes = count;
        self.used = Limits {
            groups: compiled.groups.len(),
            leaves: compiled.leaves.len(),
        };
        // A packet that read the old generation may still be searching it;
        // the next write reuses it only after the grace period.
        std::thread::sleep(GRACE);
        Ok(())
    }

    /// The entry the generation in force holds for `addr`, as the XDP
    /// program reads it (decode with [`decode`]).
    pub fn lookup(&self, addr: Ipv6Addr) -> u32 {
        let g = &self.generations[self.active];
        lookup(g.tbl16.slice(), g.groups.slice(), g.leaves.slice(), addr)
    }

    /// Prefixes in force.
    pub fn len(&self) -> usize {
        self.prefixes
    }

    /// How full the generation in force is: what it uses of each part and
    /// what a generation holds (the error of a list that does not fit
    /// names the same parts).
    pub fn usage(&self) -> Usage {
        Usage {
            prefixes: self.prefixes,
            nodes: self.used.groups,
            nodes_max: self.limits.groups,
            leaves: self.used.leaves,
            leaves_max: self.limits.leaves,
        }
    }

    /// Whether no prefix is in force.
    pub fn is_empty(&self) -> bool {
        self.prefixes == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(action: u32, rule_id: u32) -> Rule {
        Rule { action, rule_id }
    }

    fn set(list: &[(&str, u32)]) -> Vec<(Ipv6Net, Rule)> {
        list.iter()
            .enumerate()
            .map(|(i, (n, a))| (n.parse().unwrap(), rule(*a, i as u32 + 1)))
            .collect()
    }

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// The definition: the longest prefix covering the address decides,
    /// deny winning a tie.
    fn naive(rules: &[(Ipv6Net, Rule)], addr: Ipv6Addr) -> Option<Rule> {
        rules
            .iter()
            .filter(|(n, _)| n.trunc().contains(&addr))
            .max_by_key(|(n, r)| (n.prefix_len(), r.action, std::cmp::Reverse(r.rule_id)))
            .map(|(_, r)| *r)
    }

    /// First, last, one before and one after each prefix.
    fn boundaries(rules: &[(Ipv6Net, Rule)]) -> Vec<Ipv6Addr> {
        rules
            .iter()
            .flat_map(|(n, _)| {
                let first = u128::from(n.trunc().network());
                let last = u128::from(n.trunc().broadcast());
                [first.wrapping_sub(1), first, last, last.wrapping_add(1)].map(Ipv6Addr::from)
            })
            .collect()
    }

    #[test]
    fn nested_prefixes_at_every_kind_of_length() {
        let rules = set(&[
            ("::/0", 1),
            ("2000::/3", 2),
            ("2001:db8::/17", 1),
            ("2001:db8::/23", 2),
            ("2001:db8::/32", 1),
            ("2001:db8::/33", 2),
            ("2001:db8:bad::/47", 1),
            ("2001:db8:bad::/48", 2),
            ("2001:db8:bad:1::/64", 1),
            ("2001:db8:bad:1:8000::/65", 2),
            ("2001:db8:bad:1::76/127", 1),
            ("2001:db8:bad:1::77/128", 2),
            ("2001:db8:bad:1::ffff/128", 1),
            ("3fff::/20", 2),
        ]);
        let c = compile(&rules);
        let mut addrs = boundaries(&rules);
        addrs.extend(["::1", "2001:db8:bad:1::78", "2001:db8:bad:1:7fff::1"].map(ip));
        for a in addrs {
            assert_eq!(c.lookup(a), naive(&rules, a), "{a}");
        }
        // 2001::/16 -> /24 -> /32 -> /40 -> /48 (for the /64 and the /65)
        // -> /56 -> ... -> /120: every octet of 2001:db8:bad:1::77 has a node.
        assert_eq!(c.lookup(ip("2001:db8:bad:1::77")), Some(rule(2, 12)));
        assert_eq!(c.lookup(ip("2001:db8:bad:1::76")), Some(rule(1, 11)));
        assert_eq!(c.lookup(ip("2001:db8:bad:1::75")), Some(rule(1, 9)));
    }

    #[test]
    fn deny_wins_a_tie_and_no_rule_is_none() {
        let rules = vec![
            ("2001:db8::/48".parse().unwrap(), rule(1, 7)),
            ("2001:db8::/48".parse().unwrap(), rule(2, 8)),
            ("2001:db8::9/128".parse().unwrap(), rule(2, 10)),
            ("2001:db8::9/128".parse().unwrap(), rule(1, 9)),
        ];
        let c = compile(&rules);
        assert_eq!(c.lookup(ip("2001:db8::1")), Some(rule(2, 8)));
        assert_eq!(c.lookup(ip("2001:db8::9")), Some(rule(2, 10)));
        assert_eq!(c.lookup(ip("2001:db9::1")), None);
        assert_eq!(compile(&[]).lookup(ip("2001:db8::1")), None);
        assert!(compile(&[]).groups.is_empty());
    }

    #[test]
    fn a_slash_128_takes_fourteen_nodes_and_a_slash_48_four() {
        let c = compile(&set(&[("2001:db8::1/128", 2)]));
        assert_eq!(c.groups.len(), MAX_LEVELS as usize);
        let c = compile(&set(&[("2001:db8:bad::/48", 2)]));
        assert_eq!(c.groups.len(), 4);
        let c = compile(&set(&[("2001:db8::/16", 2), ("2001:db8::/32", 2)]));
        assert_eq!(c.groups.len(), 2);
    }

    #[test]
    fn a_hopeless_list_is_counted_only_so_far() {
        let limits = Limits {
            groups: 20,
            leaves: 1000,
        };
        // 100 /128s in /16s of their own: 1,400 nodes, far past 4 x 20.
        let scattered: Vec<(Ipv6Net, Rule)> = (0..100u128)
            .map(|i| {
                let a = (0x2001_u128 + i) << 112 | 1;
                (Ipv6Net::new(Ipv6Addr::from(a), 128).unwrap(), rule(2, 1))
            })
            .collect();
        let err = compile_within(&scattered, limits).unwrap_err();
        let Ipv6TableError::Full {
            part: "nodes",
            needed,
            exact: false,
            max: 20,
        } = err
        else {
            panic!("{err}");
        };
        assert!(
            (COUNT_PAST_LIMIT * 20..COUNT_PAST_LIMIT * 20 + 15).contains(&needed),
            "{needed}"
        );
        assert_eq!(
            err.to_string(),
            format!("kernel IPv6 table too small: the IPv6 entries of all sources, merged, need more than {needed} nodes, a generation holds 20; aggregate or shorten them (a prefix longer than /16 takes up to one node and its leaves per octet past the second)")
        );
    }

    #[test]
    fn a_list_over_the_limits_is_refused_and_nothing_changes() {
        let limits = Limits {
            groups: 20,
            leaves: 200,
        };
        let mut table = Ipv6Table::in_memory(100, limits);
        let first = set(&[("2001:db8:bad::/48", 2)]);
        table.write(&first).unwrap();
        // Four nodes (the octets 0d, b8, 0b, ad), each of three runs: none,
        // the child, none.
        let in_force = Usage {
            prefixes: 1,
            nodes: 4,
            nodes_max: 20,
            leaves: 12,
            leaves_max: 200,
        };
        assert_eq!(table.usage(), in_force);
        // Two /128s on different /16s: 28 nodes.
        let too_deep = set(&[("2001:db8::1/128", 2), ("3fff::1/128", 2)]);
        let err = table.write(&too_deep).unwrap_err();
        assert!(
            matches!(
                err,
                Ipv6TableError::Full {
                    part: "nodes",
                    needed: 28,
                    exact: true,
                    max: 20
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "kernel IPv6 table too small: the IPv6 entries of all sources, merged, need 28 nodes, a generation holds 20; aggregate or shorten them (a prefix longer than /16 takes up to one node and its leaves per octet past the second)"
        );
        assert_eq!(table.len(), 1);
        assert_eq!(table.usage(), in_force, "a refused list changes no usage");
        assert_eq!(
            decode(table.lookup(ip("2001:db8:bad::1"))),
            Some(rule(2, 1))
        );
        assert_eq!(decode(table.lookup(ip("2001:db8::1"))), None);
        // Leaves: many /128s under one /120 node need few nodes but many runs.
        let wide: Vec<(Ipv6Net, Rule)> = (0..100u32)
            .map(|i| {
                let a = u128::from(ip("2001:db8::")) | u128::from(i * 2);
                (
                    Ipv6Net::new(Ipv6Addr::from(a), 128).unwrap(),
                    rule(2, i + 1),
                )
            })
            .collect();
        let err = table.write(&wide).unwrap_err();
        assert!(
            matches!(err, Ipv6TableError::Full { part: "leaves", .. }),
            "{err}"
        );
        assert_eq!(
            decode(table.lookup(ip("2001:db8:bad::1"))),
            Some(rule(2, 1))
        );
        // Prefix capacity.
        let mut small = Ipv6Table::in_memory(1, limits);
        let err = small.write(&set(&[("2001:db8::/32", 2), ("3fff::/20", 2)]));
        assert!(matches!(
            err,
            Err(Ipv6TableError::TooManyPrefixes { count: 2, max: 1 })
        ));
        // A list that fits goes in, whatever came before.
        table.write(&set(&[("2001:db8::1/128", 1)])).unwrap();
        assert_eq!(decode(table.lookup(ip("2001:db8::1"))), Some(rule(1, 1)));
        assert_eq!(decode(table.lookup(ip("2001:db8:bad::1"))), None);
    }

    #[test]
    fn the_guaranteed_count_of_slash_128s_fits() {
        // The worst case per prefix: /128s on distinct /16s, no sharing.
        let n = smtpguard_common::ipv6_table::GUARANTEED_PREFIXES as usize;
        let rules: Vec<(Ipv6Net, Rule)> = (0..n)
            .map(|i| {
                let a = ((i as u128) << 112) | (i as u128 * 0x9e37_79b9_7f4a_7c15);
                (
                    Ipv6Net::new(Ipv6Addr::from(a), 128).unwrap(),
                    rule(2, i as u32 + 1),
                )
            })
            .collect();
        let c = compile_within(&rules, Limits::KERNEL).unwrap();
        assert_eq!(c.groups.len(), n * MAX_LEVELS as usize);
    }

    /// Prefixes under 2001:db8::/32 with few distinct bit patterns, so they
    /// nest, at every length 0..=128; now and then anywhere.
    fn arb_rule() -> impl Strategy<Value = (Ipv6Net, Rule)> {
        (any::<u128>(), 0u8..=128, any::<bool>(), 1u32..64, 0u8..10).prop_map(
            |(bits, len, deny, id, wide)| {
                let base = if wide == 0 {
                    bits
                } else {
                    // Bits that spread over every octet, two values each.
                    u128::from(ip("2001:db8::"))
                        | (bits & 0x0000_0000_8080_8080_8181_8181_8181_8181)
                };
                let net = Ipv6Net::new(Ipv6Addr::from(base), len).unwrap().trunc();
                (net, rule(if deny { 2 } else { 1 }, id))
            },
        )
    }

    #[test]
    fn check_fits_refuses_what_a_write_would_refuse() {
        use smtpguard_common::Action as A;
        // 30,000 /128s in distinct /48s: ten nodes each of their own.
        let deep: Vec<(ipnet::IpNet, A)> = (0..30_000u32)
            .map(|i| (format!("2001:db8:{i:x}::1/128").parse().unwrap(), A::Deny))
            .collect();
        assert!(
            matches!(
                check_fits(&deep),
                Err(Ipv6TableError::Full { part: "nodes", .. })
            ),
            "{:?}",
            check_fits(&deep)
        );
        // IPv4 entries take no room here; a short IPv6 list fits, and
        // its usage is what it needs: ten nodes per /128, four at /40 and
        // one each at /16, /24 and /32 shared; leaves as the compiler
        // makes them.
        let mut fine = deep[..1000].to_vec();
        fine.push(("192.0.2.0/24".parse().unwrap(), A::Permit));
        let usage = check_fits(&fine).unwrap();
        let v6: Vec<(Ipv6Net, Rule)> = fine
            .iter()
            .filter_map(|(net, _)| match net {
                ipnet::IpNet::V6(n) => Some(*n),
                ipnet::IpNet::V4(_) => None,
            })
            .zip(1u32..)
            .map(|(net, rule_id)| (net, Rule { action: 2, rule_id }))
            .collect();
        let leaves = compile_within(&v6, Limits::KERNEL).unwrap().leaves.len();
        assert_eq!(
            (usage.prefixes, usage.nodes, usage.leaves),
            (1000, 10_007, leaves)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn lookup_equals_longest_prefix_match(
            rules in proptest::collection::vec(arb_rule(), 0..40),
            probes in proptest::collection::vec(any::<u128>(), 64),
        ) {
            let c = compile(&rules);
            let mut addrs = boundaries(&rules);
            addrs.extend(probes.iter().map(|&b| {
                Ipv6Addr::from(u128::from(ip("2001:db8::")) | (b & 0x0000_0000_8080_8080_8181_8181_8181_8181))
            }));
            addrs.extend(probes.iter().map(|&b| Ipv6Addr::from(b)));
            for a in addrs {
                prop_assert_eq!(c.lookup(a), naive(&rules, a), "{}", a);
            }
        }

        #[test]
        fn output_depends_only_on_the_set(
            (rules, shuffled) in proptest::collection::vec(arb_rule(), 0..40)
                .prop_flat_map(|r| (Just(r.clone()), Just(r).prop_shuffle())),
        ) {
            prop_assert!(crate::kernel::depends_only_on_the_set(&rules, &shuffled, compile));
        }
    }
}
