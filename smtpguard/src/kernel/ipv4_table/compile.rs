//! The IPv4 compiler, sans IO: a merged permit/deny rule set in, the
//! table of `smtpguard_common::ipv4_table` out (first level, its per-/16
//! summary, groups, leaves), plus the pieces the writer reuses for
//! single-entry changes.
//!
//! Prefixes are nested or disjoint, so one sweep over them sorted by
//! start (shortest first) paints every address with its longest match
//! in time linear in the output.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use smtpguard_common::{
    ipv4_table::{entry, CompactGroup, Group, COMPACT, COMPACT_RUNS, GROUP_INDEX},
    Action,
};

/// 2^24: the /24s in the first level.
pub const TBL24_ENTRIES: usize = 1 << 24;

/// 2^16: the /16s in the first level's summary.
pub const TBL16_ENTRIES: usize = 1 << 16;

/// The summary entry of a /16 whose /24s differ: "look in `TBL24`".
pub const LOOK_IN_TBL24: u32 = entry::pack(entry::GROUP, 0);

/// One rule of the merged set: a canonical prefix and its packed entry
/// (`entry::PERMIT`/`DENY` and the rule id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Rule {
    /// Canonical prefix (host bits zero).
    pub prefix: Ipv4Net,
    /// Packed entry, see [`leaf_entry`].
    pub entry: u32,
}

/// The packed entry of a rule.
pub fn leaf_entry(action: Action, rule_id: u32) -> u32 {
    entry::pack(action as u32, rule_id)
}

/// A compiled generation: what the writer copies into the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// One entry per /16 ([`TBL16_ENTRIES`]), see [`summarize`].
    pub tbl16: Vec<u32>,
    /// One entry per /24 ([`TBL24_ENTRIES`]).
    pub tbl24: Vec<u32>,
    /// Groups, indexed by `payload & GROUP_INDEX` of `GROUP` entries;
    /// compact ones (`COMPACT` set in the entry) hold a [`CompactGroup`].
    pub groups: Vec<Group>,
    /// Leaves of the bitmap groups, indexed from their `base`.
    pub leaves: Vec<u32>,
}

/// Compiles a rule set. Each prefix is truncated to canonical form; the
/// same prefix given twice keeps the deny (deny wins a tie), else the
/// smaller entry, so the output depends only on the set, never on the
/// order it is given in. Capacity is the caller's business.
pub fn compile(rules: &[Ipv4Rule]) -> Compiled {
    compile_normalized(&normalize(rules))
}

/// [`compile`] for rules [`normalize`] already gave: sorting 1M rules
/// twice was a fifth of a full load.
pub fn compile_normalized(rules: &[Ipv4Rule]) -> Compiled {
    let mut tbl24 = vec![entry::NONE; TBL24_ENTRIES];
    let (groups, leaves) = compile_into(rules, &mut tbl24);
    let mut tbl16 = vec![entry::NONE; TBL16_ENTRIES];
    summarize(&tbl24, &mut tbl16);
    Compiled {
        tbl16,
        tbl24,
        groups,
        leaves,
    }
}

/// [`compile_normalized`] with the first level written into `tbl24`
/// (every one of its [`TBL24_ENTRIES`] entries), groups and leaves
/// returned. The writer passes the mapped map itself: a 64 MiB buffer to
/// fill and then copy was a fifth of a million-prefix load.
///
/// # Panics
///
/// If `tbl24` does not hold exactly [`TBL24_ENTRIES`] entries.
pub fn compile_into(rules: &[Ipv4Rule], tbl24: &mut [u32]) -> (Vec<Group>, Vec<u32>) {
    assert_eq!(tbl24.len(), TBL24_ENTRIES, "first-level length");
    let (short, long): (Vec<Ipv4Rule>, Vec<Ipv4Rule>) = rules
        .iter()
        .copied()
        .partition(|r| r.prefix.prefix_len() <= 24);
    let spans: Vec<Span> = short.iter().map(span24).collect();
    sweep(&spans, 0, TBL24_ENTRIES as u32, entry::NONE, |lo, hi, v| {
        tbl24[lo as usize..hi as usize].fill(v)
    });
    let mut groups = Vec::new();
    let mut leaves = Vec::new();
    for chunk in long.chunk_by(|a, b| slash24(&a.prefix) == slash24(&b.prefix)) {
        let index = slash24(&chunk[0].prefix) as usize;
        let mut built = BuiltGroup::new(tbl24[index], chunk);
        if !built.compact {
            built.group.base = leaves.len() as u32;
            leaves.append(&mut built.leaves);
        }
        tbl24[index] = built.entry(groups.len() as u32);
        groups.push(built.group);
    }
    (groups, leaves)
}

/// The summary entry of one /16 from its 256 first-level entries: the
/// entry they all hold when that is the same plain entry (none, permit or
/// deny with one rule id), else [`LOOK_IN_TBL24`].
pub fn summary_entry(slash16: &[u32]) -> u32 {
    let first = slash16[0];
    if first >> entry::KIND_SHIFT != entry::GROUP && slash16.iter().all(|&e| e == first) {
        first
    } else {
        LOOK_IN_TBL24
    }
}

/// Writes the per-/16 summary of `tbl24` into `tbl16`; returns how many
/// /16s it settles (uniform ones).
///
/// # Panics
///
/// If the slices are not [`TBL24_ENTRIES`] and [`TBL16_ENTRIES`] long.
pub fn summarize(tbl24: &[u32], tbl16: &mut [u32]) -> usize {
    assert_eq!(tbl24.len(), TBL24_ENTRIES, "first-level length");
    assert_eq!(tbl16.len(), TBL16_ENTRIES, "summary length");
    let mut settled = 0;
    for (s, slash16) in tbl16.iter_mut().zip(tbl24.chunks_exact(256)) {
        *s = summary_entry(slash16);
        settled += usize::from(*s != LOOK_IN_TBL24);
    }
    settled
}

/// Whether the program should read the summary first, for a table whose
/// summary settles `settled` /16s: when at least half of them are settled.
/// A source in a settled /16 then costs one load from 256 KiB that stay in
/// cache, instead of a TLB and cache miss in the 64 MiB first level; the
/// others pay one cached load more. Lists of a few thousand prefixes
/// settle nearly every /16; a million scattered ones settle few.
pub fn summary_pays(settled: usize) -> bool {
    settled * 2 >= TBL16_ENTRIES
}

/// Sorted by prefix, one rule per prefix (deny first on a tie).
pub fn normalize(rules: &[Ipv4Rule]) -> Vec<Ipv4Rule> {
    let mut rules: Vec<Ipv4Rule> = rules
        .iter()
        .map(|r| Ipv4Rule {
            prefix: r.prefix.trunc(),
            entry: r.entry,
        })
        .collect();
    // Deny (kind 2) sorts before permit (kind 1) by the reversed kind.
    rules.sort_unstable_by_key(|r| {
        (
            r.prefix,
            std::cmp::Reverse(r.entry >> entry::KIND_SHIFT),
            r.entry,
        )
    });
    rules.dedup_by_key(|r| r.prefix);
    rules
}

/// The /24 (index into the first level) a prefix of /24 or longer is in.
pub fn slash24(prefix: &Ipv4Net) -> u32 {
    u32::from(prefix.network()) >> 8
}

/// A prefix as a range of units (/24s or hosts): `[start, start + size)`.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    /// First unit.
    pub start: u32,
    /// Units covered.
    pub size: u32,
    /// Its entry.
    pub entry: u32,
}

/// A prefix of /24 or shorter as a range of /24s.
pub fn span24(rule: &Ipv4Rule) -> Span {
    Span {
        start: slash24(&rule.prefix),
        size: 1 << (24 - rule.prefix.prefix_len()),
        entry: rule.entry,
    }
}

/// A prefix longer than /24 as a range of hosts inside its /24.
fn span_host(rule: &Ipv4Rule) -> Span {
    Span {
        start: u32::from(rule.prefix.network()) & 0xff,
        size: 1 << (32 - rule.prefix.prefix_len()),
        entry: rule.entry,
    }
}

/// Paints `[lo, hi)`: calls `paint(from, to, entry)` for consecutive
/// segments, each with the entry of its longest covering span, `default`
/// where none covers. `spans` lie inside `[lo, hi)`, nested or disjoint,
/// sorted by start then by size, largest first.
pub fn sweep(spans: &[Span], lo: u32, hi: u32, default: u32, mut paint: impl FnMut(u32, u32, u32)) {
    let mut stack: Vec<(u32, u32)> = Vec::new();
    let mut pos = lo;
    let mut fill = |target: u32, stack: &mut Vec<(u32, u32)>, pos: &mut u32| {
        while *pos < target {
            while stack.last().is_some_and(|&(end, _)| end <= *pos) {
                stack.pop();
            }
            let (end, value) = stack.last().copied().unwrap_or((hi, default));
            let to = end.min(target);
            paint(*pos, to, value);
            *pos = to;
        }
    };
    for span in spans {
        fill(span.start, &mut stack, &mut pos);
        stack.push((span.start + span.size, span.entry));
    }
    fill(hi, &mut stack, &mut pos);
}

/// The group of one /24: `base_entry` is the /24's own verdict (from the
/// prefixes of /24 or shorter), `long` the longer prefixes inside it,
/// sorted. Returns the group (with `base` 0) and its leaves.
pub fn build_group(base_entry: u32, long: &[Ipv4Rule]) -> (Group, Vec<u32>) {
    let spans: Vec<Span> = long.iter().map(span_host).collect();
    let mut group = Group::default();
    let mut leaves: Vec<u32> = Vec::new();
    sweep(&spans, 0, 256, base_entry, |lo, _hi, v| {
        if leaves.last() != Some(&v) {
            group.bitmap[(lo / 64) as usize] |= 1 << (lo % 64);
            leaves.push(v);
        }
    });
    let mut rank = 0u32;
    for w in 0..4 {
        group.rank[w] = rank as u8;
        rank += group.bitmap[w].count_ones();
    }
    (group, leaves)
}

/// A /24's group as stored in `GROUPS4`: compact (runs inline, no
/// leaves) when it has at most [`COMPACT_RUNS`] runs, else the bitmap
/// form with its leaves (`group.base` is set when the leaves are placed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltGroup {
    /// The `GROUPS4` element.
    pub group: Group,
    /// The leaves of the bitmap form; empty when compact.
    pub leaves: Vec<u32>,
    /// Whether `group` is a [`CompactGroup`].
    pub compact: bool,
}

impl BuiltGroup {
    /// The group of one /24 (see [`build_group`]), compact where it fits.
    pub fn new(base_entry: u32, long: &[Ipv4Rule]) -> Self {
        let (group, leaves) = build_group(base_entry, long);
        match compact_form(&group, &leaves) {
            Some(compact) => BuiltGroup {
                group: compact.into_group(),
                leaves: Vec::new(),
                compact: true,
            },
            None => BuiltGroup {
                group,
                leaves,
                compact: false,
            },
        }
    }

    /// The `TBL24` entry of this group in slot `slot`.
    pub fn entry(&self, slot: u32) -> u32 {
        let flag = if self.compact { COMPACT } else { 0 };
        entry::pack(entry::GROUP, slot | flag)
    }
}

/// The compact form of a bitmap group and its leaves, when it has at most
/// [`COMPACT_RUNS`] runs.
fn compact_form(group: &Group, leaves: &[u32]) -> Option<CompactGroup> {
    if leaves.len() > COMPACT_RUNS {
        return None;
    }
    // The set bits in order: a million-prefix load builds most of its
    // groups here.
    let starts = (0..4u32).flat_map(|w| {
        let mut bits = group.bitmap[w as usize];
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                w * 64 + bit
            })
        })
    });
    let mut compact = CompactGroup::default();
    for (i, (start, leaf)) in starts.zip(leaves).enumerate() {
        compact.starts[i] = start as u8;
        compact.entries[i] = *leaf;
    }
    // The slots after the last run repeat it.
    let last = leaves.len() - 1;
    for i in leaves.len()..COMPACT_RUNS {
        compact.starts[i] = compact.starts[last];
        compact.entries[i] = compact.entries[last];
    }
    Some(compact)
}

/// The entry for `addr` in a compiled table: the lookup of the XDP
/// program with the summary read first, in userspace (for tests and the
/// writer's checks).
pub fn lookup(
    tbl16: &[u32],
    tbl24: &[u32],
    groups: &[Group],
    leaves: &[u32],
    addr: Ipv4Addr,
) -> u32 {
    let a = u32::from(addr);
    let s = tbl16[(a >> 16) as usize];
    if s >> entry::KIND_SHIFT != entry::GROUP {
        return s;
    }
    let e = tbl24[(a >> 8) as usize];
    if e >> entry::KIND_SHIFT != entry::GROUP {
        return e;
    }
    let group = &groups[(e & GROUP_INDEX) as usize];
    let host = a & 0xff;
    if e & COMPACT != 0 {
        return CompactGroup::from_group(group).entry_of(host);
    }
    let word = (host >> 6) as usize;
    let below = (group.bitmap[word] << (63 - (host & 63))).count_ones();
    leaves[(group.base + group.rank[word] as u32 + below - 1) as usize]
}

/// An entry as the kernel's `(action, rule id)`, `None` for no match.
pub fn decode(e: u32) -> Option<(Action, u32)> {
    match e >> entry::KIND_SHIFT {
        entry::PERMIT => Some((Action::Permit, e & entry::PAYLOAD)),
        entry::DENY => Some((Action::Deny, e & entry::PAYLOAD)),
        _ => None,
    }
}

impl Compiled {
    /// [`lookup`] in this table, decoded.
    pub fn lookup(&self, addr: Ipv4Addr) -> Option<(Action, u32)> {
        decode(lookup(
            &self.tbl16,
            &self.tbl24,
            &self.groups,
            &self.leaves,
            addr,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(p: &str, action: Action, id: u32) -> Ipv4Rule {
        Ipv4Rule {
            prefix: p.parse().unwrap(),
            entry: leaf_entry(action, id),
        }
    }

    /// The definition: the longest prefix covering the address decides.
    fn reference(rules: &[Ipv4Rule], addr: Ipv4Addr) -> Option<(Action, u32)> {
        normalize(rules)
            .iter()
            .filter(|r| r.prefix.contains(&addr))
            .max_by_key(|r| r.prefix.prefix_len())
            .and_then(|r| decode(r.entry))
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn nested_prefixes_down_to_slash_32() {
        let rules = [
            rule("0.0.0.0/0", Action::Permit, 1),
            rule("198.51.0.0/16", Action::Deny, 2),
            rule("198.51.100.0/24", Action::Permit, 3),
            rule("198.51.100.128/25", Action::Deny, 4),
            rule("198.51.100.200/32", Action::Permit, 5),
            rule("198.51.100.0/31", Action::Deny, 6),
        ];
        let c = compile(&rules);
        let want = [
            ("192.0.2.1", 1),
            ("198.51.99.255", 2),
            ("198.51.100.0", 6),
            ("198.51.100.1", 6),
            ("198.51.100.2", 3),
            ("198.51.100.127", 3),
            ("198.51.100.128", 4),
            ("198.51.100.199", 4),
            ("198.51.100.200", 5),
            ("198.51.100.201", 4),
            ("198.51.100.255", 4),
            ("198.51.101.0", 2),
        ];
        for (a, id) in want {
            assert_eq!(c.lookup(ip(a)).map(|(_, i)| i), Some(id), "{a}");
        }
        assert_eq!(c.groups.len(), 1);
        // Runs: /31 deny, /24 permit, /25 deny, /32 permit, /25 deny: five,
        // so the group is compact and needs no leaves.
        assert!(c.leaves.is_empty());
        let e = c.tbl24[(u32::from(ip("198.51.100.0")) >> 8) as usize];
        assert_ne!(e & COMPACT, 0);
        let compact = CompactGroup::from_group(&c.groups[0]);
        assert_eq!(compact.starts, [0, 2, 128, 200, 201, 201, 201, 201]);
    }

    #[test]
    fn deny_wins_a_tie_and_no_rule_is_none() {
        let rules = [
            rule("203.0.113.0/24", Action::Permit, 7),
            rule("203.0.113.0/24", Action::Deny, 8),
            rule("203.0.113.9/32", Action::Permit, 9),
            rule("203.0.113.9/32", Action::Deny, 10),
        ];
        let c = compile(&rules);
        assert_eq!(c.lookup(ip("203.0.113.1")), Some((Action::Deny, 8)));
        assert_eq!(c.lookup(ip("203.0.113.9")), Some((Action::Deny, 10)));
        assert_eq!(c.lookup(ip("192.0.2.1")), None);
        assert_eq!(compile(&[]).lookup(ip("192.0.2.1")), None);
    }

    #[test]
    fn eight_runs_are_compact_and_nine_are_not() {
        // Each /32 away from the /24's edges adds two runs to the one there.
        let hosts = |n: u32| -> Vec<Ipv4Rule> {
            (0..n)
                .map(|i| rule(&format!("192.0.2.{}/32", 10 + 20 * i), Action::Deny, i + 1))
                .collect()
        };
        // Three /32s: seven runs; a fourth at host 255 makes eight.
        let mut eight = hosts(3);
        eight.push(rule("192.0.2.255/32", Action::Deny, 9));
        let nine = hosts(4);
        for (rules, runs, compact) in [(&eight, 8, true), (&nine, 9, false)] {
            let c = compile(rules);
            let e = c.tbl24[(u32::from(ip("192.0.2.0")) >> 8) as usize];
            assert_eq!(e & COMPACT != 0, compact, "{runs} runs");
            assert_eq!(c.leaves.len(), if compact { 0 } else { runs });
            for h in 0..256u32 {
                let a = Ipv4Addr::from(u32::from(ip("192.0.2.0")) + h);
                assert_eq!(c.lookup(a), reference(rules, a), "{a}");
            }
        }
    }

    #[test]
    fn a_full_group_of_slash_32s_fits_the_rank_bytes() {
        let rules: Vec<Ipv4Rule> = (0..256)
            .map(|h| rule(&format!("192.0.2.{h}/32"), Action::Deny, h + 1))
            .collect();
        let c = compile(&rules);
        assert_eq!(c.groups[0].rank, [0, 64, 128, 192]);
        for h in 0..256u32 {
            let a = Ipv4Addr::from(u32::from(ip("192.0.2.0")) + h);
            assert_eq!(c.lookup(a), Some((Action::Deny, h + 1)));
        }
    }

    #[test]
    fn the_summary_settles_uniform_slash_16s_only() {
        let rules = [
            rule("198.16.0.0/14", Action::Deny, 1),
            rule("198.17.5.0/24", Action::Permit, 2),
            rule("198.18.7.9/32", Action::Permit, 3),
        ];
        let c = compile(&rules);
        let at = |a: &str| c.tbl16[(u32::from(ip(a)) >> 16) as usize];
        assert_eq!(at("198.16.0.0"), leaf_entry(Action::Deny, 1));
        assert_eq!(at("198.19.255.255"), leaf_entry(Action::Deny, 1));
        assert_eq!(at("198.17.0.0"), LOOK_IN_TBL24, "a /24 inside");
        assert_eq!(at("198.18.0.0"), LOOK_IN_TBL24, "a group inside");
        assert_eq!(at("198.20.0.0"), entry::NONE);
        let mut tbl16 = vec![0; TBL16_ENTRIES];
        assert_eq!(summarize(&c.tbl24, &mut tbl16), TBL16_ENTRIES - 2);
        assert_eq!(tbl16, c.tbl16);
        assert!(summary_pays(TBL16_ENTRIES / 2));
        assert!(!summary_pays(TBL16_ENTRIES / 2 - 1));
        assert_eq!(c.lookup(ip("198.17.5.1")), Some((Action::Permit, 2)));
        assert_eq!(c.lookup(ip("198.17.6.1")), Some((Action::Deny, 1)));
    }

    /// Prefixes inside 198.18.0.0/22 (so they nest), some anywhere, /0 now and then.
    fn arb_rule() -> impl Strategy<Value = Ipv4Rule> {
        (any::<u32>(), 0u8..=32, any::<bool>(), 1u32..64, 0u8..10).prop_map(
            |(bits, len, deny, id, wide)| {
                let base = if wide == 0 {
                    bits
                } else {
                    u32::from(ip("198.18.0.0")) | (bits & 0x3ff)
                };
                let len = if wide == 0 { len } else { len.max(20) };
                let action = if deny { Action::Deny } else { Action::Permit };
                Ipv4Rule {
                    prefix: Ipv4Net::new(base.into(), len).unwrap().trunc(),
                    entry: leaf_entry(action, id),
                }
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn lookup_equals_longest_prefix_match(
            rules in proptest::collection::vec(arb_rule(), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 64),
        ) {
            let c = compile(&rules);
            let mut addrs: Vec<Ipv4Addr> = probes.iter().map(|&b| {
                Ipv4Addr::from(u32::from(ip("198.18.0.0")) | (b & 0x3ff))
            }).collect();
            for r in &rules {
                let first = u32::from(r.prefix.network());
                let last = u32::from(r.prefix.broadcast());
                addrs.extend([first.wrapping_sub(1), first, last, last.wrapping_add(1)].map(Ipv4Addr::from));
            }
            for a in addrs {
                prop_assert_eq!(c.lookup(a), reference(&rules, a), "{}", a);
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
