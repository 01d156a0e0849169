//! The `fleet` source (#19): one set of lists for many gateways, kept in
//! etcd and watched into every gateway's kernel maps.
//!
//! [`keys`] is the key layout, [`value`] an entry's JSON, [`state`] the
//! keys as known at one revision (sans-IO), [`cache`] the cache file,
//! [`client`] the connection and [`sync`] the watch loop and writes. The
//! daemon implements [`FleetTarget`] (the one path that changes the
//! lists) and wires [`Fleet::run`].

pub mod cache;
pub mod client;
pub mod keys;
pub mod state;
pub mod sync;
pub mod value;

use std::path::PathBuf;

use ipnet::IpNet;

pub use cache::CacheError;
pub use state::{Change, Effect, FleetState};
pub use sync::{Fleet, FleetStatus, GatewayStatus, Written};
pub use value::EntryValue;

use crate::policy::{AccessList, ListEntry, ListKind, Policy, SourceName};

/// A boxed error from the daemon's side of [`FleetTarget`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The name of the source the fleet fills.
pub const SOURCE: &str = "fleet";

/// The `fleet` source's name.
pub fn source_name() -> SourceName {
    SourceName::new(SOURCE).expect("\"fleet\" is a valid source name")
}

/// The `fleet` source of `old`, carried into a freshly loaded policy
/// (a reload re-reads the list files; the fleet source has none).
pub fn carry_over(old: &Policy, new: &mut Policy) {
    if let Some(lists) = old.source(&source_name()) {
        let _ = new.insert_source(
            source_name(),
            lists.list(ListKind::Deny).clone(),
            lists.list(ListKind::Permit).clone(),
        );
    }
}

/// Where the fleet's lists go: the daemon's one path for list changes.
/// Both calls block (kernel writes); they run off the async threads.
pub trait FleetTarget: Send + Sync + 'static {
    /// Makes the `fleet` source exactly these lists, in one atomic
    /// kernel switch.
    ///
    /// # Errors
    ///
    /// When the kernel refuses; the previous lists stay in force.
    fn switch(&self, deny: AccessList, permit: AccessList) -> Result<(), BoxError>;

    /// Sets these entries of the `fleet` source (`None`: no entry).
    ///
    /// # Errors
    ///
    /// When the kernel refuses; nothing is changed.
    fn update(&self, changes: Vec<(ListKind, IpNet, Option<ListEntry>)>) -> Result<(), BoxError>;
}

/// Why the fleet could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A TLS or password file could not be read.
    #[error("reading {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// etcd did not answer in time.
    #[error("etcd did not answer in time while {0}")]
    Timeout(&'static str),
    /// etcd refused or the connection failed.
    #[error("etcd failed while {0}")]
    Etcd(&'static str, #[source] etcd_client::Error),
    /// The watch's revision was compacted: a full read is needed.
    #[error(
        "the watched revision was compacted (oldest kept: {revision}); reading everything again"
    )]
    Compacted {
        /// The oldest revision etcd keeps.
        revision: i64,
    },
    /// etcd cancelled the watch.
    #[error("etcd cancelled the watch: {0}")]
    WatchCanceled(String),
    /// The watch stream ended.
    #[error("the watch stream ended")]
    WatchEnded,
    /// The lists could not be applied to this gateway.
    #[error("applying the fleet lists to this gateway")]
    Apply(#[source] BoxError),
    /// A committed write was not seen by this gateway's watch in time.
    #[error("the change was committed to etcd at revision {revision} but this gateway's watch has not applied it yet (etcd connection down?)")]
    NotApplied {
        /// The write's revision.
        revision: i64,
    },
}
