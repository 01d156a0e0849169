//! The per-entry hit counters: `SG_HITS` mapped into our address space
//! (the map is `BPF_F_MMAPABLE`: reading 2M counters is a memory scan, not
//! 2M syscalls) plus each CPU's not yet flushed pending record (in `SG_CPU`).
//! The stats reader reads them; the sync starts a rule id's count from zero
//! when it gives the id to a new prefix.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use aya::{
    maps::{Map, MapData},
    Ebpf,
};
use smtpguard_common::{map_names, HitPending, MAX_RULE_IDS};

use super::{cpu_state::CpuStates, KernelError};

/// The mapping; shared by [`super::Stats`] and [`super::MapSync`].
pub(crate) struct HitsMapping {
    _map: MapData,
    base: NonNull<u64>,
    /// Each CPU's record, whose `pending` holds its hits not yet added to
    /// `SG_HITS` (see `HitPending`).
    cpus: Arc<CpuStates>,
    /// Hits of a rule id's previous prefix still pending on some CPU when
    /// the id was given to a new prefix: they will be flushed into the new
    /// prefix's counter, so they are subtracted from it.
    stale: Mutex<HashMap<u32, u64>>,
}

// SAFETY: the mapping lives as long as the struct; every access is an
// atomic load or store of an aligned u64, as the kernel's are atomic adds.
unsafe impl Send for HitsMapping {}
// SAFETY: as for Send.
unsafe impl Sync for HitsMapping {}

impl HitsMapping {
    const LEN: usize = MAX_RULE_IDS as usize * size_of::<u64>();

    pub(crate) fn take_from(ebpf: &mut Ebpf, cpus: Arc<CpuStates>) -> Result<Self, KernelError> {
        match ebpf.take_map(map_names::HITS) {
            Some(Map::Array(data)) => {
                Self::new(data, cpus).ok_or(KernelError::MissingMap(map_names::HITS))
            }
            _ => Err(KernelError::MissingMap(map_names::HITS)),
        }
    }

    fn new(map: MapData, cpus: Arc<CpuStates>) -> Option<Self> {
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF array fd, shared, whole length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
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
            cpus,
            stale: Mutex::new(HashMap::new()),
        })
    }

    fn slice(&self) -> &[AtomicU64] {
        // SAFETY: LEN bytes mapped at base, page aligned; the kernel updates
        // them with atomic adds, so they are read and written as atomics.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().cast::<AtomicU64>(),
                MAX_RULE_IDS as usize,
            )
        }
    }

    /// Each CPU's pending record (none if the map cannot be read).
    fn pending(&self) -> Vec<HitPending> {
        self.cpus.read().iter().map(|cpu| cpu.pending).collect()
    }

    /// Pending hits of `rule_id`, summed over CPUs.
    fn pending_of(&self, rule_id: u32) -> u64 {
        self.pending()
            .iter()
            .filter(|p| p.rule_id == rule_id && rule_id != 0)
            .map(|p| p.count)
            .sum()
    }

    fn stale(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u64>> {
        self.stale.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hits of `rule_id` (0 out of range), pending ones included.
    pub(crate) fn get(&self, rule_id: u32) -> u64 {
        // SG_HITS first, then the pending records: the program replaces a
        // pending record before it adds it to SG_HITS, so this order may
        // miss a flush for a moment but never counts one twice.
        let flushed = self
            .slice()
            .get(rule_id as usize)
            .map(|v| v.load(Ordering::Relaxed))
            .unwrap_or(0);
        let total = flushed + self.pending_of(rule_id);
        total.saturating_sub(self.stale().get(&rule_id).copied().unwrap_or(0))
    }

    /// Starts `rule_id`'s count again from zero (the id has a new prefix).
    pub(crate) fn reset(&self, rule_id: u32) {
        self.reset_all(&[rule_id]);
    }

    /// [`HitsMapping::reset`] for many ids with one read of the pending
    /// records: loading a million-entry list must not cost a bpf() call
    /// per entry.
    pub(crate) fn reset_all(&self, rule_ids: &[u32]) {
        if rule_ids.is_empty() {
            return;
        }
        let mut pending: HashMap<u32, u64> = HashMap::new();
        for p in self.pending() {
            if p.rule_id != 0 && p.count != 0 {
                *pending.entry(p.rule_id).or_insert(0) += p.count;
            }
        }
        let slice = self.slice();
        let mut stale = self.stale();
        for &rule_id in rule_ids {
            if let Some(v) = slice.get(rule_id as usize) {
                v.store(0, Ordering::Relaxed);
            }
            match pending.get(&rule_id) {
                Some(&n) => {
                    stale.insert(rule_id, n);
                }
                // Usually empty: a first load need not hash a million ids.
                None if !stale.is_empty() => {
                    stale.remove(&rule_id);
                }
                None => {}
            }
        }
    }

    /// Every id with hits, as `(rule_id, hits)`, ascending by id.
    pub(crate) fn nonzero(&self) -> Vec<(u32, u64)> {
        let mut all: BTreeMap<u32, u64> = self
            .slice()
            .iter()
            .enumerate()
            .filter_map(|(id, v)| {
                let v = v.load(Ordering::Relaxed);
                (v != 0).then_some((id as u32, v))
            })
            .collect();
        for p in self.pending() {
            if p.rule_id != 0 && p.count != 0 {
                *all.entry(p.rule_id).or_insert(0) += p.count;
            }
        }
        let stale = self.stale();
        all.into_iter()
            .map(|(id, n)| (id, n.saturating_sub(stale.get(&id).copied().unwrap_or(0))))
            .filter(|(_, n)| *n != 0)
            .collect()
    }
}

impl Drop for HitsMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), Self::LEN) };
    }
}
