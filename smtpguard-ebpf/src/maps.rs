//! Every map of the program, declared in one place.
//!
//! The static names are the map names userspace opens; they must equal the
//! constants in `smtpguard_common::map_names` (a userspace test checks the
//! object file against them).

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray},
};
use smtpguard_common::ipv4_table::{Group, LEAF_LINES, MAX_GROUPS, TBL24_LINES};
use smtpguard_common::{
    LogWindow, Rule, RuntimeConfig, COUNTER_COUNT, MAX_PREFIXES_PER_FAMILY, MAX_RULE_IDS,
};

/// Runtime configuration (mode, ports, active generation); one element.
#[map]
pub static SG_CONFIG: Array<RuntimeConfig> = Array::with_max_entries(1, 0);

/// The compiled IPv4 lookup (see `smtpguard_common::ipv4_table`), one set
/// per generation. Mmapable: userspace writes a whole generation as memory.
#[map]
pub static SG_TBL24_A: Array<[u32; 16]> = Array::with_max_entries(TBL24_LINES, BPF_F_MMAPABLE);

/// `SG_TBL24_A`'s twin, generation B.
#[map]
pub static SG_TBL24_B: Array<[u32; 16]> = Array::with_max_entries(TBL24_LINES, BPF_F_MMAPABLE);

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

/// IPv6 permit/deny entries, generation A.
#[map]
pub static SG_RULES6_A: LpmTrie<[u8; 16], Rule> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

/// IPv6 permit/deny entries, generation B.
#[map]
pub static SG_RULES6_B: LpmTrie<[u8; 16], Rule> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

/// Verdict counters, per CPU so that counting never contends.
#[map]
pub static SG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Hits per list entry, indexed by rule id. Shared (not per CPU): a per-CPU
/// array of 2M counters would cost 16 MiB per CPU. Mmapable, so userspace
/// reads all of it without a syscall per entry.
#[map]
pub static SG_HITS: Array<u64> = Array::with_max_entries(MAX_RULE_IDS, BPF_F_MMAPABLE);

/// Drop-event rate limiter state; one element.
#[map]
pub static SG_LOG_WINDOW: Array<LogWindow> = Array::with_max_entries(1, 0);
