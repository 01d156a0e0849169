//! The IPv6 lookup in the compiled trie (`smtpguard_common::ipv6_table`):
//! one load of the first level for a source covered by a prefix of /16 or
//! shorter, then three dependent loads (entry, node, leaf) per octet until
//! the entry is a verdict: a /48 entry takes four nodes, a /128 at most
//! fourteen. Array maps only; the binary search on lengths it replaces made
//! up to 8 hash probes of 20-25 ns each.

use aya_ebpf::maps::Array;
use smtpguard_common::ipv6_table::{entry, Group, MAX_LEVELS};

use crate::maps::{
    SG_GEN6, SG_GROUPS6_A, SG_GROUPS6_B, SG_LEAVES6_A, SG_LEAVES6_B, SG_TBL16_6_A, SG_TBL16_6_B,
};
use crate::runs::{leaf_index, line_entry};

/// The longest entry covering `addr` (the packet's four words, network
/// byte order in memory) in the IPv6 generation in force: a permit or deny
/// entry with its rule id, or `NONE`.
#[inline(always)]
pub fn lookup(addr: &[u32; 4]) -> u32 {
    let Some(generation) = SG_GEN6.get(0) else {
        return entry::NONE;
    };
    let generation = *generation & 1;
    // The address as a 128-bit number in two host-order halves.
    let hi = (u64::from(u32::from_be(addr[0])) << 32) | u64::from(u32::from_be(addr[1]));
    let lo = (u64::from(u32::from_be(addr[2])) << 32) | u64::from(u32::from_be(addr[3]));
    // One call site per generation, so that each sees constant maps: the
    // verifier inlines an array lookup only when the map is known.
    let e = if generation == 0 {
        lookup_in(&SG_TBL16_6_A, &SG_GROUPS6_A, &SG_LEAVES6_A, hi, lo)
    } else {
        lookup_in(&SG_TBL16_6_B, &SG_GROUPS6_B, &SG_LEAVES6_B, hi, lo)
    };
    // A failed map lookup (never, for an index inside the table) is no entry.
    e.unwrap_or(entry::NONE)
}

/// The entry for the address `hi:lo` (host order) in one generation's maps.
#[inline(always)]
fn lookup_in(
    tbl: &Array<[u32; 16]>,
    groups: &Array<Group>,
    leaves: &Array<[u32; 16]>,
    hi: u64,
    lo: u64,
) -> Option<u32> {
    let mut e = line_entry(tbl, (hi >> 48) as u32)?;
    // The octets after the first two, the next one always in the top 8 bits.
    let mut rest_hi = (hi << 16) | (lo >> 48);
    let mut rest_lo = lo << 16;
    for _ in 0..MAX_LEVELS {
        if e >> entry::KIND_SHIFT != entry::GROUP {
            return Some(e);
        }
        let group: &Group = groups.get(e & entry::PAYLOAD)?;
        let b = (rest_hi >> 56) as u32;
        rest_hi = (rest_hi << 8) | (rest_lo >> 56);
        rest_lo <<= 8;
        e = line_entry(leaves, leaf_index(group, b))?;
    }
    // The compiler never nests nodes deeper than the address; a group
    // here is no verdict.
    Some(e)
}
