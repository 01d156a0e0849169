//! The kernel fast path from userspace: loading and attaching the XDP
//! program ([`loader`]), the one owner of its list and config maps
//! ([`sync`], with the IPv6 structure in [`ipv6_table`]), and reading its
//! counters ([`stats`]). [`Kernel`] holds the
//! three for the daemon; [`KernelError`] is what loading them can go wrong
//! with, for every submodule.

mod cpu_state;
mod hits;
pub mod ipv4_table;
pub mod ipv6_table;
pub mod loader;
pub mod rate_limit;
mod rule_book;
pub mod stats;
pub mod sync;
pub mod xdp_holder;

use std::path::PathBuf;

use aya::programs::ProgramError;
use ipnet::IpNet;

pub use loader::{
    pump_kernel_log, AttachMode, AttachedMode, Attachment, KernelLog, PinState, XdpFilter,
};
pub use rate_limit::{OverLimit, RateLimitSettings, RateLimiter};
pub use stats::{CounterSnapshot, Stats};
pub use sync::{ApplyHow, ApplyReport, MapSync, SyncError};

/// The XDP object built by `cargo xtask build`, embedded at compile time
/// (see `build.rs`). Empty when the crate was built without it.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smtpguard.bpf.o"));

/// Errors from loading or attaching the XDP program.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// This binary was built without the eBPF object.
    #[error("this smtpguard binary was built without its XDP program; build it with `cargo xtask build`")]
    NoObject,
    /// The kernel or aya rejected the object (verifier, BTF, map creation).
    #[error(
        "loading the XDP program into the kernel failed (needs root or CAP_BPF+CAP_NET_ADMIN)"
    )]
    Load(#[source] aya::EbpfError),
    /// The object has no program of this name.
    #[error("XDP object has no program {0}")]
    MissingProgram(&'static str),
    /// A map the program must have is missing or has the wrong type.
    #[error("XDP object has no usable map {0}")]
    MissingMap(&'static str),
    /// A `BPF_F_MMAPABLE` map could not be mapped into memory.
    #[error("cannot map the kernel map {map} into memory")]
    MapMemory {
        /// Map name.
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The runtime configuration record could not be zeroed at load.
    #[error("cannot write the initial XDP runtime configuration")]
    InitialConfig(#[source] SyncError),
    /// The verifier or the attach call failed.
    #[error("XDP program: {what}")]
    Program {
        /// What was being done, e.g. `attaching to eth0 in native mode`.
        what: String,
        #[source]
        source: ProgramError,
    },
    /// A link pinned by an earlier run could not be moved to this program;
    /// the program behind it, if any, stays attached.
    #[error("cannot {step} the pinned XDP link {}; any program it holds stays attached (remove the pin to detach it)", path.display())]
    PinnedLink {
        /// The step that failed, e.g. `open`.
        step: &'static str,
        /// The pin.
        path: PathBuf,
        /// What aya reported (a pin, link or program error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another XDP program holds the interface's hook, so this one cannot
    /// attach (the kernel takes one program per interface and mode, and
    /// native and skb mode exclude each other).
    #[error("another XDP program holds {interface}: {holder}; smtpguard needs the interface's XDP hook: detach that program (`xdp-loader unload {interface} --all` for libxdp programs such as xdp-filter, else `ip link set dev {interface} xdp off` or `xdpgeneric off`), or attach smtpguard to another interface")]
    Occupied {
        /// The interface.
        interface: String,
        /// The program on it.
        holder: Box<xdp_holder::XdpHolder>,
        /// The attach call's error (EBUSY or EEXIST).
        #[source]
        source: ProgramError,
    },
    /// The bpffs directory for pinned links cannot be made.
    #[error("cannot create the bpffs directory {path} for pinned XDP links (is bpffs mounted on /sys/fs/bpf?)")]
    Pin {
        /// The directory.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The loaded XDP program and the owners of its maps, as the daemon holds
/// them.
pub struct Kernel {
    /// The program; dropping it detaches it.
    pub filter: XdpFilter,
    /// The one writer of the tries and the runtime config.
    pub sync: MapSync,
    /// Counter reader.
    pub stats: Stats,
}

impl Kernel {
    /// Loads the embedded program into the kernel, not attached yet (see
    /// [`XdpFilter::load`]): fill the lists through [`Kernel::sync`], then
    /// attach with [`Kernel::filter`].
    ///
    /// # Errors
    ///
    /// [`KernelError::NoObject`] without an embedded object, else as
    /// [`XdpFilter::load`].
    pub fn load() -> Result<Kernel, KernelError> {
        Self::load_with_rate_table(smtpguard_common::rate::DEFAULT_TABLE_SIZE)
    }

    /// As [`Kernel::load`], with room for `table_size` clients in the SYN
    /// rate limiter (see [`XdpFilter::load_with_rate_table`]).
    ///
    /// # Errors
    ///
    /// As [`Kernel::load`].
    pub fn load_with_rate_table(table_size: u32) -> Result<Kernel, KernelError> {
        let (filter, sync, stats) = XdpFilter::load_with_rate_table(table_size)?;
        Ok(Kernel {
            filter,
            sync,
            stats,
        })
    }

    /// Hits of every installed rule that has any, by its prefix.
    pub fn hits_by_prefix(&self) -> Vec<(IpNet, u64)> {
        self.stats
            .all_hits()
            .into_iter()
            .filter_map(|(id, n)| self.sync.prefix_of(id).map(|p| (p, n)))
            .collect()
    }
}

/// For the table compilers' property tests: the output depends only on the
/// set of rules, so the same rules shuffled, or each given twice, compile
/// to the same tables.
#[cfg(test)]
pub(crate) fn depends_only_on_the_set<R: Copy, C: PartialEq>(
    rules: &[R],
    shuffled: &[R],
    compile: impl Fn(&[R]) -> C,
) -> bool {
    let doubled: Vec<R> = rules.iter().chain(rules).copied().collect();
    let c = compile(rules);
    c == compile(shuffled) && c == compile(&doubled)
}
