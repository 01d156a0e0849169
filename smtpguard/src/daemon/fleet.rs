//! The daemon's side of the fleet source (#19): the `fleet` source goes
//! through [`Daemon::change_policy`] like every other list change (kernel
//! first, atomic switch for whole lists), its persistence is the fleet
//! cache file (never a list file), and CLI changes of `--source fleet`
//! are written to etcd and answered once this gateway's watch applied them.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;

use super::state::{Daemon, DaemonError, KernelWrite};
use crate::{
    config::Config,
    fleet::{self, BoxError, EntryValue, Fleet, FleetError, FleetState, FleetTarget},
    logging::one_line,
    policy::{AccessList, ListEntry, ListKind, Policy},
};

/// Above this many prefixes in one watch response, the whole source is
/// switched at once instead of prefix by prefix.
const MAX_SINGLE_UPDATES: usize = 4096;
/// `--wait-fleet`: how long to wait for every gateway.
pub const WAIT_FLEET_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the cache file into the `fleet` source of `policy` before the
/// kernel is loaded, so the gateway filters with the last fleet lists
/// before etcd answers. A missing or bad cache file only warns.
pub fn load_cache(config: &Config, policy: &mut Policy) -> Option<FleetState> {
    let fleet = config.fleet.as_ref()?;
    match fleet::cache::load(&fleet.cache_file, &fleet.prefix) {
        Ok(Some(state)) => {
            let (deny, permit) = state.lists(SystemTime::now());
            tracing::info!(path = %fleet.cache_file.display(), revision = state.revision,
                deny = deny.len().total(), permit = permit.len().total(),
                "fleet: lists from the cache file are in force until etcd answers");
            // Kinds are right by construction.
            let _ = policy.insert_source(fleet::source_name(), deny, permit);
            Some(state)
        }
        Ok(None) => {
            tracing::info!(path = %fleet.cache_file.display(), "fleet: no cache file yet; the fleet source starts empty");
            None
        }
        Err(e) => {
            tracing::warn!(error = %one_line(&e), "fleet: the cache file is ignored; the fleet source starts empty");
            None
        }
    }
}

/// `config check` for `[fleet]`, offline: the TLS and password files can
/// be read, and the cache file (if there is one) is a cache of this prefix.
/// One line per problem, naming the key and the file.
pub fn check_files(fleet: &crate::config::FleetConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let mut files: Vec<(&str, &std::path::Path)> = Vec::new();
    if let Some(tls) = &fleet.tls {
        files.push(("fleet.ca", &tls.ca));
        if let Some((cert, key)) = &tls.identity {
            files.push(("fleet.cert", cert));
            files.push(("fleet.key", key));
        }
    }
    if let Some(auth) = &fleet.auth {
        files.push(("fleet.password_file", &auth.password_file));
    }
    for (key, path) in files {
        if let Err(e) = std::fs::read(path) {
            problems.push(format!("{key}: cannot read {}: {e}", path.display()));
        }
    }
    if let Err(e) = fleet::cache::load(&fleet.cache_file, &fleet.prefix) {
        problems.push(format!("fleet.cache_file: {}", one_line(&e)));
    }
    problems
}

/// Starts the fleet sync task, if `[fleet]` is configured.
pub fn start(
    daemon: &Arc<Daemon>,
    cached: Option<FleetState>,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    let config = daemon.config();
    let Some(fleet_config) = config.fleet.clone() else {
        return;
    };
    let host = fleet_config
        .gateway_name
        .clone()
        .unwrap_or_else(|| config.server.hostname.clone());
    let fleet = Fleet::new(fleet_config, host, cached);
    daemon.set_fleet(Arc::clone(&fleet));
    let target: Arc<dyn FleetTarget> = Arc::new(Target(Arc::downgrade(daemon)));
    tasks.spawn(fleet.run(target, shutdown.clone()));
}

struct Target(std::sync::Weak<Daemon>);

impl Target {
    fn daemon(&self) -> Result<Arc<Daemon>, BoxError> {
        self.0
            .upgrade()
            .ok_or_else(|| "the daemon is stopping".into())
    }
}

impl FleetTarget for Target {
    fn switch(&self, deny: AccessList, permit: AccessList) -> Result<(), BoxError> {
        let daemon = self.daemon()?;
        daemon.change_policy(&[], |p| {
            p.insert_source(fleet::source_name(), deny, permit)?;
            Ok(((), KernelWrite::Everything))
        })?;
        daemon.close_denied_sessions();
        Ok(())
    }

    fn update(&self, changes: Vec<(ListKind, IpNet, Option<ListEntry>)>) -> Result<(), BoxError> {
        let daemon = self.daemon()?;
        let source = fleet::source_name();
        let many = changes.len() > MAX_SINGLE_UPDATES;
        daemon.change_policy(&[], |p| {
            let lists = p.source_mut(&source);
            let mut prefixes = Vec::with_capacity(changes.len());
            for (kind, prefix, entry) in changes {
                let list = lists.list_mut(kind);
                list.remove([prefix]);
                if let Some(e) = entry {
                    list.add([prefix], e.comment.as_deref(), e.expires)
                        .map_err(DaemonError::List)?;
                }
                prefixes.push(prefix);
            }
            let write = if many {
                KernelWrite::Everything
            } else {
                KernelWrite::Prefixes(prefixes)
            };
            Ok(((), write))
        })?;
        daemon.close_denied_sessions();
        Ok(())
    }
}

/// A CLI change of `--source fleet`.
pub struct FleetChange {
    /// The list.
    pub kind: ListKind,
    /// The prefixes.
    pub prefixes: Vec<IpNet>,
    /// Add (with this value) or remove (`None`).
    pub value: Option<EntryValue>,
    /// Wait for every gateway's status to show the change.
    pub wait_fleet: bool,
}

/// What a CLI change of `--source fleet` did.
pub struct FleetChanged {
    /// The write.
    pub written: fleet::Written,
    /// Warnings for the reply (gateways that did not confirm).
    pub warnings: Vec<String>,
}

/// Why a CLI change of `--source fleet` failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetChangeError {
    /// `[fleet]` is not configured.
    #[error(
        "source \"fleet\" is reserved for lists shared by a fleet of gateways and needs [fleet] \
         in the configuration (etcd endpoints and prefix); nothing was changed"
    )]
    NotConfigured,
    /// etcd could not be written; nothing was changed.
    #[error(
        "writing to the fleet failed; nothing was changed (entries in other sources still work)"
    )]
    Write(#[source] FleetError),
    /// Written, but this gateway's watch did not apply it in time.
    #[error("the change is in the fleet but not yet in force on this gateway")]
    NotApplied(#[source] FleetError),
}

/// Writes a CLI change to etcd and waits until this gateway applied it
/// (and with `wait_fleet`, every gateway). Runs on a blocking thread.
///
/// # Errors
///
/// [`FleetChangeError`].
pub fn change(
    daemon: &Daemon,
    runtime: &tokio::runtime::Handle,
    change: FleetChange,
) -> Result<FleetChanged, FleetChangeError> {
    let fleet = daemon.fleet().ok_or(FleetChangeError::NotConfigured)?;
    runtime.block_on(async move {
        let written = match &change.value {
            Some(value) => {
                fleet
                    .put_entries(change.kind, &change.prefixes, value)
                    .await
            }
            None => fleet.delete_entries(change.kind, &change.prefixes).await,
        }
        .map_err(FleetChangeError::Write)?;
        fleet
            .wait_applied(written.revision)
            .await
            .map_err(FleetChangeError::NotApplied)?;
        let mut warnings = Vec::new();
        if change.wait_fleet {
            match fleet.wait_fleet(written.revision, WAIT_FLEET_TIMEOUT).await {
                Ok(Ok(_)) => {}
                Ok(Err(behind)) => warnings.push(format!(
                    "in force here; after {}s these gateways had not applied revision {}: {}",
                    WAIT_FLEET_TIMEOUT.as_secs(),
                    written.revision,
                    behind.join(", ")
                )),
                Err(e) => warnings.push(format!(
                    "in force here; the other gateways' status could not be read: {}",
                    one_line(&e)
                )),
            }
        }
        Ok(FleetChanged { written, warnings })
    })
}
