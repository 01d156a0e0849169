//! Every map of the program, declared in one place.
//!
//! The static names are the map names userspace opens; they must equal the
//! constants in `smtpguard_common::map_names` (a userspace test checks the
//! object file against them).

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use smtpguard_common::ipv4_table::{
    Group, LEAF_LINES, MAX_GROUPS, TBL16_LINES as TBL16_LINES4, TBL24_LINES,
};
use smtpguard_common::ipv6_table::{
    LEAF_LINES as LEAF_LINES6, MAX_GROUPS as MAX_GROUPS6, TBL16_LINES,
};
use smtpguard_common::rate::{RateBucket, RateKey, DEFAULT_TABLE_SIZE, EVENT_RING_BYTES};
use smtpguard_common::{CpuState, RuntimeConfig, MAX_RULE_IDS};

/// Runtime configuration (mode, ports, active generation): a global in a
/// data section of its own, which aya loads as a one-element array map
/// named after the section (`smtpguard_common::map_names::CONFIG`). The program reads its fields
/// at a constant address, with no map lookup on every packet. Mutable and
/// exported, so that the compiler never takes its zeroed initial value for
/// a constant: userspace rewrites it at any time.
#[no_mangle]
#[link_section = ".data.sgcfg"]
pub static mut SG_CONFIG: RuntimeConfig = RuntimeConfig::zeroed();

/// The runtime configuration in force (see [`SG_CONFIG`]).
#[inline(always)]
pub fn config() -> &'static RuntimeConfig {
    // SAFETY: only userspace writes the record (one map update, as with
    // any array map); the program only reads it.
    unsafe { &*core::ptr::addr_of!(SG_CONFIG) }
}

/// The compiled IPv4 lookup (see `smtpguard_common::ipv4_table`), one set
/// per generation. Mmapable: userspace writes a whole generation as memory.
#[map]
pub static SG_TBL24_A: Array<[u32; 16]> = Array::with_max_entries(TBL24_LINES, BPF_F_MMAPABLE);

/// `SG_TBL24_A`'s twin, generation B.
#[map]
pub static SG_TBL24_B: Array<[u32; 16]> = Array::with_max_entries(TBL24_LINES, BPF_F_MMAPABLE);

/// The per-/16 summary of `SG_TBL24_A` (read first while
/// `RuntimeConfig::v4_summary` is set), generation A.
#[map]
pub static SG_TBL16_4_A: Array<[u32; 16]> = Array::with_max_entries(TBL16_LINES4, BPF_F_MMAPABLE);

/// `SG_TBL16_4_A`'s twin, generation B.
#[map]
pub static SG_TBL16_4_B: Array<[u32; 16]> = Array::with_max_entries(TBL16_LINES4, BPF_F_MMAPABLE);

/// IPv4 groups (/24s holding longer prefixes), generation A.
#[map]
pub static SG_GROUPS4_A: Array<Group> = Array::with_max_entries(MAX_GROUPS, BPF_F_MMAPABLE);

/// IPv4 groups, generation B.
#[map]
pub static SG_GROUPS4_B: Array<Group> = Array::with_max_entries(MAX_GROUPS, BPF_F_MMAPABLE);

/// IPv4 group leaves, generation A.
#[map]
pub static SG_LEAVES4_A: Array<[u32; 16]> = Array::with_max_entries(LEAF_LINES, BPF_F_MMAPABLE);

/// IPv4 group leaves, generation B.
#[map]
pub static SG_LEAVES4_B: Array<[u32; 16]> = Array::with_max_entries(LEAF_LINES, BPF_F_MMAPABLE);

/// The compiled IPv6 lookup's first level (see
/// `smtpguard_common::ipv6_table`), IPv6 generation A. Mmapable, like the
/// IPv4 table.
#[map]
pub static SG_TBL16_6_A: Array<[u32; 16]> = Array::with_max_entries(TBL16_LINES, BPF_F_MMAPABLE);

/// `SG_TBL16_6_A`'s twin, IPv6 generation B.
#[map]
pub static SG_TBL16_6_B: Array<[u32; 16]> = Array::with_max_entries(TBL16_LINES, BPF_F_MMAPABLE);

/// IPv6 nodes (8 address bits each), IPv6 generation A.
#[map]
pub static SG_GROUPS6_A: Array<Group> = Array::with_max_entries(MAX_GROUPS6, BPF_F_MMAPABLE);

/// IPv6 nodes, IPv6 generation B.
#[map]
pub static SG_GROUPS6_B: Array<Group> = Array::with_max_entries(MAX_GROUPS6, BPF_F_MMAPABLE);

/// IPv6 node leaves, IPv6 generation A.
#[map]
pub static SG_LEAVES6_A: Array<[u32; 16]> = Array::with_max_entries(LEAF_LINES6, BPF_F_MMAPABLE);

/// IPv6 node leaves, IPv6 generation B.
#[map]
pub static SG_LEAVES6_B: Array<[u32; 16]> = Array::with_max_entries(LEAF_LINES6, BPF_F_MMAPABLE);

/// The IPv6 generation in force (0: A, 1: B); one element. IPv6 switches
/// on its own, so that a single-entry change can be a whole-table switch.
#[map]
pub static SG_GEN6: Array<u32> = Array::with_max_entries(1, 0);

/// Each CPU's outcome counters, pending hits and drop-log window (see
/// `smtpguard_common::CpuState`): one lookup finds all three, and counting
/// never contends. One element.
#[map]
pub static SG_CPU: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

/// Hits per list entry, indexed by rule id. Shared (not per CPU): a per-CPU
/// array of 2M counters would cost 16 MiB per CPU. Written only when a CPU
/// flushes its pending record (`CpuState::pending`). Mmapable, so userspace reads all of it
/// without a syscall per entry.
#[map]
pub static SG_HITS: Array<u64> = Array::with_max_entries(MAX_RULE_IDS, BPF_F_MMAPABLE);

/// One token bucket per client (see `smtpguard_common::rate`). A plain,
/// preallocated hash: nothing is ever evicted by the kernel, so a flood of
/// new sources cannot push a known client's bucket out (a fresh bucket
/// would be a free pass). Sized at load from `rate_limit.table_size`
/// (this is the default); the daemon deletes buckets that are full again.
#[map]
pub static SG_RATE: HashMap<RateKey, RateBucket> = HashMap::with_max_entries(DEFAULT_TABLE_SIZE, 0);

/// The bucket every new client shares while `SG_RATE` is full; one element.
#[map]
pub static SG_RATE_OVF: Array<RateBucket> = Array::with_max_entries(1, 0);

/// "Client over the limit" events for the daemon, at most one per bucket
/// per minute.
#[map]
pub static SG_RATE_EV: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);
