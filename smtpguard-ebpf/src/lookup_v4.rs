//! The IPv4 lookup in the compiled table (`smtpguard_common::ipv4_table`):
//! one load for a source covered by a prefix of /24 or shorter, three
//! dependent loads (entry, group, leaf) for one inside a /24 that holds
//! longer prefixes. The trie it replaces visited one node per branching bit.

use aya_ebpf::maps::Array;
use smtpguard_common::{
    ipv4_table::{entry, Group},
    Rule, RuntimeConfig,
};

use crate::maps::{SG_GROUPS4_A, SG_GROUPS4_B, SG_LEAVES4_A, SG_LEAVES4_B, SG_TBL24_A, SG_TBL24_B};

/// The most specific rule covering `addr` (as loaded from the packet:
/// network byte order in memory) in the generation in force, or `None`
/// when no entry covers it.
#[inline(always)]
pub fn lookup_v4(cfg: &RuntimeConfig, addr: u32) -> Option<Rule> {
    let a = u32::from_be(addr);
    // One call site per generation, so that each sees constant maps: the
    // verifier inlines an array lookup only when the map is known, and a
    // map picked at run time costs a helper call per load.
    let e = if cfg.active_generation == 0 {
        lookup_in(&SG_TBL24_A, &SG_GROUPS4_A, &SG_LEAVES4_A, a)?
    } else {
        lookup_in(&SG_TBL24_B, &SG_GROUPS4_B, &SG_LEAVES4_B, a)?
    };
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

/// The entry for host-order address `a` in one generation's maps.
#[inline(always)]
fn lookup_in(
    tbl: &Array<[u32; 16]>,
    groups: &Array<Group>,
    leaves: &Array<[u32; 16]>,
    a: u32,
) -> Option<u32> {
    let e = line_entry(tbl, a >> 8)?;
    if e >> entry::KIND_SHIFT != entry::GROUP {
        return Some(e);
    }
    let group: &Group = groups.get(e & entry::PAYLOAD)?;
    let host = a & 0xff;
    let word = (host >> 6) as usize & 3;
    let bits = group.bitmap[word] << (63 - (host & 63));
    let leaf = group
        .base
        .wrapping_add(group.rank[word] as u32)
        .wrapping_add(popcount(bits))
        .wrapping_sub(1);
    line_entry(leaves, leaf)
}

/// Entry `index` of an array of 16-entry lines.
#[inline(always)]
fn line_entry(lines: &Array<[u32; 16]>, index: u32) -> Option<u32> {
    let line = lines.get(index >> 4)?;
    Some(line[(index & 15) as usize])
}

/// BPF has no popcount instruction: the SWAR count (Hacker's Delight 5-2).
#[inline(always)]
fn popcount(mut x: u64) -> u32 {
    x -= (x >> 1) & 0x5555_5555_5555_5555;
    x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}
