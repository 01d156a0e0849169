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
use smtpguard_common::{
    slot, HitPending, LogWindow, Rule, RuntimeConfig, MAX_PREFIXES_PER_FAMILY, MAX_RULE_IDS,
};

/// Runtime configuration (mode, ports, active generation); one element.
#[map]
pub static SG_CONFIG: Array<RuntimeConfig> = Array::with_max_entries(1, 0);

/// IPv4 permit/deny entries, generation A.
#[map]
pub static SG_RULES4_A: LpmTrie<[u8; 4], Rule> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

/// IPv4 permit/deny entries, generation B.
#[map]
pub static SG_RULES4_B: LpmTrie<[u8; 4], Rule> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

/// IPv6 permit/deny entries, generation A.
#[map]
pub static SG_RULES6_A: LpmTrie<[u8; 16], Rule> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

/// IPv6 permit/deny entries, generation B.
#[map]
pub static SG_RULES6_B: LpmTrie<[u8; 16], Rule> =
    LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

/// Outcome counters (see `smtpguard_common::slot`), per CPU so that
/// counting never contends: one increment per packet.
#[map]
pub static SG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(slot::SLOT_COUNT, 0);

/// Hits per list entry, indexed by rule id. Shared (not per CPU): a per-CPU
/// array of 2M counters would cost 16 MiB per CPU. Written only when a CPU
/// flushes its `SG_HIT_PENDING`. Mmapable, so userspace reads all of it
/// without a syscall per entry.
#[map]
pub static SG_HITS: Array<u64> = Array::with_max_entries(MAX_RULE_IDS, BPF_F_MMAPABLE);

/// Each CPU's hits not yet in `SG_HITS` (16 bytes per CPU).
#[map]
pub static SG_HIT_PENDING: PerCpuArray<HitPending> = PerCpuArray::with_max_entries(1, 0);

/// Drop-event rate limiter state of each CPU; one element.
#[map]
pub static SG_LOG_WINDOW: PerCpuArray<LogWindow> = PerCpuArray::with_max_entries(1, 0);
