//! `SG_HITS`, the per-entry hit counters, mapped into our address space
//! (the map is `BPF_F_MMAPABLE`): reading 2M counters is a memory scan,
//! not 2M syscalls. The stats reader reads it; the sync zeroes a rule id's
//! counter when it gives the id to a new prefix.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{
    maps::{Map, MapData},
    Ebpf,
};
use smtpguard_common::{map_names, MAX_RULE_IDS};

use super::KernelError;

/// The mapping; shared by [`super::Stats`] and [`super::MapSync`].
pub(crate) struct HitsMapping {
    _map: MapData,
    base: NonNull<u64>,
}

// SAFETY: the mapping lives as long as the struct; every access is an
// atomic load or store of an aligned u64, as the kernel's are atomic adds.
unsafe impl Send for HitsMapping {}
// SAFETY: as for Send.
unsafe impl Sync for HitsMapping {}

impl HitsMapping {
    const LEN: usize = MAX_RULE_IDS as usize * size_of::<u64>();

    pub(crate) fn take_from(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        match ebpf.take_map(map_names::HITS) {
            Some(Map::Array(data)) => {
                Self::new(data).ok_or(KernelError::MissingMap(map_names::HITS))
            }
            _ => Err(KernelError::MissingMap(map_names::HITS)),
        }
    }

    fn new(map: MapData) -> Option<Self> {
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

    /// Hits of `rule_id` (0 out of range).
    pub(crate) fn get(&self, rule_id: u32) -> u64 {
        self.slice()
            .get(rule_id as usize)
            .map(|v| v.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Starts `rule_id`'s count again from zero (the id has a new prefix).
    pub(crate) fn reset(&self, rule_id: u32) {
        if let Some(v) = self.slice().get(rule_id as usize) {
            v.store(0, Ordering::Relaxed);
        }
    }

    /// Every id with hits, as `(rule_id, hits)`.
    pub(crate) fn nonzero(&self) -> Vec<(u32, u64)> {
        self.slice()
            .iter()
            .enumerate()
            .filter_map(|(id, v)| {
                let v = v.load(Ordering::Relaxed);
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
