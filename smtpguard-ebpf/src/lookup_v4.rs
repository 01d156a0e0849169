//! The IPv4 lookup in the compiled table (`smtpguard_common::ipv4_table`):
//! one load for a source covered by a prefix of /24 or shorter; for one
//! inside a /24 that holds longer prefixes, two dependent loads (entry,
//! compact group) when that /24 has at most eight runs, else three (entry,
//! group, leaf). The trie it replaces visited one node per branching bit.
//! For lists that leave most /16s uniform, one load from the per-/16
//! summary comes first: it settles most sources without touching the
//! 64 MiB first level, whose TLB and cache misses dominate scattered
//! sources.

use aya_ebpf::maps::Array;
use smtpguard_common::{
    ipv4_table::{entry, CompactGroup, Group, COMPACT, GROUP_INDEX},
    RuntimeConfig,
};

use crate::maps::{
    SG_GROUPS4_A, SG_GROUPS4_B, SG_LEAVES4_A, SG_LEAVES4_B, SG_TBL16_4_A, SG_TBL16_4_B, SG_TBL24_A,
    SG_TBL24_B,
};
use crate::runs::{leaf_index, line_entry};

/// The entry of the most specific prefix covering `addr` (as loaded from
/// the packet: network byte order in memory) in the generation in force:
/// a permit or deny entry with its rule id, or `NONE` when no entry covers
/// it.
#[inline(always)]
pub fn lookup_v4(cfg: &RuntimeConfig, addr: u32) -> u32 {
    let a = u32::from_be(addr);
    let summary = cfg.v4_summary != 0;
    // One call site per generation, so that each sees constant maps: the
    // verifier inlines an array lookup only when the map is known, and a
    // map picked at run time costs a helper call per load.
    let e = if cfg.active_generation == 0 {
        lookup_in(
            &SG_TBL16_4_A,
            &SG_TBL24_A,
            &SG_GROUPS4_A,
            &SG_LEAVES4_A,
            summary,
            a,
        )
    } else {
        lookup_in(
            &SG_TBL16_4_B,
            &SG_TBL24_B,
            &SG_GROUPS4_B,
            &SG_LEAVES4_B,
            summary,
            a,
        )
    };
    // A failed map lookup (never, for an index inside the table) is no entry.
    e.unwrap_or(entry::NONE)
}

/// The entry for host-order address `a` in one generation's maps; with
/// `summary`, the per-/16 summary first.
#[inline(always)]
fn lookup_in(
    tbl16: &Array<[u32; 16]>,
    tbl: &Array<[u32; 16]>,
    groups: &Array<Group>,
    leaves: &Array<[u32; 16]>,
    summary: bool,
    a: u32,
) -> Option<u32> {
    if summary {
        let s = line_entry(tbl16, a >> 16)?;
        if s >> entry::KIND_SHIFT != entry::GROUP {
            return Some(s);
        }
    }
    let e = line_entry(tbl, a >> 8)?;
    if e >> entry::KIND_SHIFT != entry::GROUP {
        return Some(e);
    }
    let group: &Group = groups.get(e & GROUP_INDEX)?;
    if e & COMPACT != 0 {
        return Some(CompactGroup::from_group(group).entry_of(a));
    }
    line_entry(leaves, leaf_index(group, a & 0xff))
}
