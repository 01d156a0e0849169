//! The steps both compiled lookups share (`smtpguard_common::ipv4_table`
//! and `ipv6_table`): entries stored 16 to an array element, and a node of
//! 256 entries stored as runs (`Group`), found by a popcount.

use aya_ebpf::maps::Array;
use smtpguard_common::{
    ipv4_table::{entry, Group},
    Rule,
};

/// The rule an entry carries: `PERMIT`/`DENY` with its rule id; `NONE`
/// (and a `GROUP` left unresolved) is no rule.
#[inline(always)]
pub fn rule_of(e: u32) -> Option<Rule> {
    let kind = e >> entry::KIND_SHIFT;
    if kind == entry::PERMIT || kind == entry::DENY {
        Some(Rule {
            action: kind,
            rule_id: e & entry::PAYLOAD,
        })
    } else {
        None
    }
}

/// Entry `index` of an array of 16-entry lines.
#[inline(always)]
pub fn line_entry(lines: &Array<[u32; 16]>, index: u32) -> Option<u32> {
    let line = lines.get(index >> 4)?;
    Some(line[(index & 15) as usize])
}

/// The leaf index of unit `unit` (0..=255: a host of a /24, or the next
/// octet of an IPv6 address) in `group`: its base, plus the runs that
/// start at or before `unit`, minus one.
#[inline(always)]
pub fn leaf_index(group: &Group, unit: u32) -> u32 {
    let word = (unit >> 6) as usize & 3;
    let bits = group.bitmap[word] << (63 - (unit & 63));
    group
        .base
        .wrapping_add(group.rank[word] as u32)
        .wrapping_add(popcount(bits))
        .wrapping_sub(1)
}

/// BPF has no popcount instruction: the SWAR count (Hacker's Delight 5-2).
#[inline(always)]
fn popcount(mut x: u64) -> u32 {
    x -= (x >> 1) & 0x5555_5555_5555_5555;
    x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}
