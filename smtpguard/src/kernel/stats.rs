//! Reads the XDP program's verdict counters and per-entry hit counters.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::{
    maps::{Map, MapData, PerCpuArray},
    Ebpf,
};
use smtpguard_common::{counter, map_names, COUNTER_COUNT, COUNTER_NAMES, MAX_RULE_IDS};

use super::loader::KernelError;

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

/// Reader of `SG_COUNTERS` and `SG_HITS`.
pub struct Stats {
    counters: PerCpuArray<MapData, u64>,
    hits: HitsMapping,
}

impl Stats {
    pub(crate) fn take_from(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        let counters = ebpf
            .take_map(map_names::COUNTERS)
            .and_then(|m| PerCpuArray::try_from(m).ok())
            .ok_or(KernelError::Map(map_names::COUNTERS))?;
        let hits = match ebpf.take_map(map_names::HITS) {
            Some(Map::Array(data)) => {
                HitsMapping::new(data).ok_or(KernelError::Map(map_names::HITS))?
            }
            _ => return Err(KernelError::Map(map_names::HITS)),
        };
        Ok(Stats { counters, hits })
    }

    /// Sums every counter over all CPUs.
    pub fn counters(&self) -> CounterSnapshot {
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

/// `SG_HITS` mapped into our address space (the map is `BPF_F_MMAPABLE`):
/// reading 2M counters is a memory scan, not 2M syscalls.
struct HitsMapping {
    _map: MapData,
    base: NonNull<u64>,
}

// SAFETY: the mapping is read-only from here and lives as long as the struct.
unsafe impl Send for HitsMapping {}
unsafe impl Sync for HitsMapping {}

impl HitsMapping {
    const LEN: usize = MAX_RULE_IDS as usize * std::mem::size_of::<u64>();

    fn new(map: MapData) -> Option<Self> {
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF array fd read-only, shared, whole length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(HitsMapping {
            _map: map,
            base: NonNull::new(ptr.cast())?,
        })
    }

    fn slice(&self) -> &[u64] {
        // SAFETY: LEN bytes mapped at base, u64-aligned (page aligned).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), MAX_RULE_IDS as usize) }
    }

    fn get(&self, rule_id: u32) -> u64 {
        self.slice()
            .get(rule_id as usize)
            // The kernel adds atomically; a volatile read sees its writes.
            .map(|v| unsafe { std::ptr::read_volatile(v) })
            .unwrap_or(0)
    }

    fn nonzero(&self) -> Vec<(u32, u64)> {
        self.slice()
            .iter()
            .enumerate()
            .filter_map(|(id, v)| {
                let v = unsafe { std::ptr::read_volatile(v) };
                (v != 0).then_some((id as u32, v))
            })
            .collect()
    }
}

impl Drop for HitsMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), Self::LEN) };
    }
}
