//! IPv6 longest-prefix match: binary search on prefix lengths over one
//! hash map of entries and markers (see `smtpguard_common::V6Key`). At most
//! 8 hash probes whatever the list, where the LPM trie visits a node per
//! branching bit (up to 128).

use smtpguard_common::{Rule, V6Key};

use crate::maps::{SG_GEN6, SG_LENS6, SG_RULES6_A, SG_RULES6_B};

/// Probes needed for 129 lengths (`ceil(log2(130))`).
const MAX_PROBES: usize = 8;

/// The rule of the longest entry covering `addr` (the packet's four words),
/// or `None`.
#[inline(always)]
pub fn lookup(addr: &[u32; 4]) -> Option<Rule> {
    let generation = *SG_GEN6.get(0)? & 1;
    let lengths = SG_LENS6.get(generation)?;
    let table = if generation == 0 {
        &SG_RULES6_A
    } else {
        &SG_RULES6_B
    };
    let mut lo: i32 = 0;
    let mut hi: i32 = lengths.count as i32 - 1;
    let mut best = None;
    for _ in 0..MAX_PROBES {
        if lo > hi {
            break;
        }
        let mid = (lo + hi) >> 1;
        let len = *lengths.lengths.get(mid as usize)? as u32;
        let key = V6Key {
            prefix_len: len,
            addr: masked(addr, len),
        };
        // SAFETY: the value is copied out at once.
        match unsafe { table.get(&key) } {
            Some(rule) => {
                best = Some(*rule);
                lo = mid + 1;
            }
            None => hi = mid - 1,
        }
    }
    // A marker that no entry covers has action 0: no match.
    best.filter(|r| r.action != 0)
}

/// `addr` with all bits after the first `len` cleared.
#[inline(always)]
fn masked(addr: &[u32; 4], len: u32) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let start = i as u32 * 32;
        out[i] = if len >= start + 32 {
            addr[i]
        } else if len <= start {
            0
        } else {
            // Network byte order: the first bits are the high bits of the
            // big-endian word.
            addr[i] & (u32::MAX << (start + 32 - len)).to_be()
        };
        i += 1;
    }
    out
}
