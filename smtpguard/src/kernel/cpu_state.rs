//! Each CPU's record of the XDP program (`SG_CPU`, see
//! `smtpguard_common::CpuState`): its outcome counters, its pending hits and
//! its drop-log window. One map read (one syscall) returns every CPU's
//! record; the counters ([`super::Stats`]) and the hit counters
//! ([`super::hits`]) both read it.

use aya::{
    maps::{MapData, PerCpuArray},
    Ebpf,
};
use smtpguard_common::{map_names, CpuState};

use super::KernelError;

/// The per-CPU map, shared by the readers.
pub(crate) struct CpuStates {
    map: PerCpuArray<MapData, CpuState>,
}

impl CpuStates {
    pub(crate) fn take_from(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        let map = ebpf
            .take_map(map_names::CPU_STATE)
            .and_then(|m| PerCpuArray::try_from(m).ok())
            .ok_or(KernelError::MissingMap(map_names::CPU_STATE))?;
        Ok(CpuStates { map })
    }

    /// Every possible CPU's record, in CPU order; empty if the map cannot
    /// be read (never, for element 0 of a loaded map).
    pub(crate) fn read(&self) -> Vec<CpuState> {
        self.map
            .get(&0, 0)
            .map(|values| values.iter().copied().collect())
            .unwrap_or_default()
    }
}
