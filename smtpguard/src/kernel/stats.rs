//! Reads the XDP program's verdict counters and per-entry hit counters.

use std::sync::Arc;

use aya::{
    maps::{MapData, PerCpuArray},
    Ebpf,
};
use smtpguard_common::{counter, map_names, COUNTER_COUNT, COUNTER_NAMES};

use super::{hits::HitsMapping, KernelError};

/// Totals of every verdict counter over all CPUs, indexed like
/// `smtpguard_common::counter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterSnapshot(pub [u64; COUNTER_COUNT as usize]);

impl CounterSnapshot {
    /// The value of counter `index` (a `smtpguard_common::counter` constant).
    pub fn get(&self, index: u32) -> u64 {
        self.0[index as usize]
    }

    /// `(name, value)` pairs in index order, names from `COUNTER_NAMES`.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        COUNTER_NAMES.iter().copied().zip(self.0.iter().copied())
    }

    /// Counter-wise `self - earlier` (counters only grow; saturates if the
    /// program was reloaded in between).
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        let mut out = [0; COUNTER_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.0[i].saturating_sub(earlier.0[i]);
        }
        CounterSnapshot(out)
    }

    /// SYNs dropped, both reasons.
    pub fn dropped(&self) -> u64 {
        self.get(counter::DROP_DENY_LIST) + self.get(counter::DROP_NOT_PERMITTED)
    }
}

/// How many whole reads [`Stats::counters`] makes at most while looking for
/// two that agree.
pub const SNAPSHOT_TRIES: usize = 16;

/// Reader of `SG_COUNTERS` and `SG_HITS`.
pub struct Stats {
    counters: PerCpuArray<MapData, u64>,
    hits: Arc<HitsMapping>,
}

impl Stats {
    pub(crate) fn take_from(ebpf: &mut Ebpf, hits: Arc<HitsMapping>) -> Result<Self, KernelError> {
        let counters = ebpf
            .take_map(map_names::COUNTERS)
            .and_then(|m| PerCpuArray::try_from(m).ok())
            .ok_or(KernelError::MissingMap(map_names::COUNTERS))?;
        Ok(Stats { counters, hits })
    }

    /// Sums every counter over all CPUs, as one snapshot that does not tear.
    ///
    /// Each counter is a separate map element, so a packet judged while they
    /// are read one by one could be counted in `packets` but not yet in its
    /// verdict. The counters are therefore read whole until two reads in a
    /// row agree: no counter moved between them, so the second is the state
    /// at one instant (the XDP program runs without preemption, in
    /// nanoseconds, against the microseconds of a read). Under a steady flood
    /// no two reads may agree; after [`SNAPSHOT_TRIES`] reads the last one
    /// is returned, and the totals of such a read may be off by the few
    /// packets judged while it ran.
    pub fn counters(&self) -> CounterSnapshot {
        let mut last = self.read_counters();
        for _ in 1..SNAPSHOT_TRIES {
            let next = self.read_counters();
            if next == last {
                break;
            }
            last = next;
        }
        last
    }

    fn read_counters(&self) -> CounterSnapshot {
        let mut out = [0u64; COUNTER_COUNT as usize];
        for (index, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(index as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        CounterSnapshot(out)
    }

    /// Hits of one rule id (0 for ids out of range).
    pub fn hits(&self, rule_id: u32) -> u64 {
        self.hits.get(rule_id)
    }

    /// Every rule id with a non-zero hit count, as `(rule_id, hits)`.
    pub fn all_hits(&self) -> Vec<(u32, u64)> {
        self.hits.nonzero()
    }
}
