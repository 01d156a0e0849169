//! The kernel fast path from userspace: loading and attaching the XDP
//! program ([`loader`]), the one owner of its list and config maps
//! ([`sync`]), and reading its counters ([`stats`]).

mod hits;
pub mod loader;
pub mod stats;
pub mod sync;

pub use loader::{
    pump_kernel_log, AttachMode, AttachedMode, Attachment, KernelError, KernelLog, XdpFilter,
};
pub use stats::{CounterSnapshot, Stats};
pub use sync::{ApplyHow, ApplyReport, MapSync, SyncError};

/// The XDP object built by `cargo xtask build`, embedded at compile time
/// (see `build.rs`). Empty when the crate was built without it.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smtpguard.bpf.o"));
