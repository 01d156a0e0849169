//! The daemon's shared state and the one place where the lists change.
//!
//! Every change (CLI add/remove/import/mode, expiry, reload) goes through
//! [`Daemon::change_policy`]: compute the new policy on a copy, write the
//! kernel, write the list file, and only then make the copy the policy in
//! force. A failure at any step undoes the steps before it, so nothing is
//! half-applied: the kernel, the files and the front door always agree.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;

use crate::{
    config::Config,
    front_door::{screening::DefenceSnapshot, Access, DenyReason, ServerHandle},
    kernel::{ApplyHow, Attachment, CounterSnapshot, Kernel, SyncError},
    policy::{
        AccessList, Enforcement, ListError, ListKind, Policy, PolicyError, Reason, RuleOrigin,
        SourceName, Verdict,
    },
    tls::TlsError,
};

use super::{
    mode_state::{self, ModeState, ModeStateError},
    paths::{list_path, state_path},
};

/// Why a change of the lists, the mode or the configuration was refused.
/// Whatever the step, nothing was changed: the steps before it are undone.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A list refused the change (a bad comment, ...).
    #[error(transparent)]
    List(#[from] ListError),
    /// The merged lists do not fit the kernel.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Mode, ports or log rate could not be written into the XDP program.
    #[error("writing the XDP runtime configuration")]
    KernelRuntime(#[source] Box<SyncError>),
    /// The whole lists could not be loaded into the XDP program.
    #[error("loading the lists into the kernel; the previous lists stay in force")]
    KernelLists(#[source] Box<SyncError>),
    /// A dry run found that the lists after the change would not fit the
    /// kernel IPv6 table; the real change would be refused.
    #[error("a dry run of importing {file}: the import would be refused, and change nothing")]
    WouldNotFit {
        /// The file imported, as the client named it.
        file: String,
        #[source]
        source: Box<crate::kernel::ipv6_table::Ipv6TableError>,
    },
    /// Single prefixes could not be written into the XDP program.
    #[error("updating the kernel lists; nothing was changed")]
    KernelUpdate(#[source] Box<SyncError>),
    /// A list file was edited since the daemon read it; it is never
    /// silently overwritten.
    #[error(
        "saving the list; nothing was changed: {} changed on disk since smtpguard read it; \
         run `smtpguard reload` to load it (or fix what reload reports) before changing the \
         {list} of source {source_name} from the CLI",
        path.display()
    )]
    ChangedOnDisk {
        /// The source.
        source_name: SourceName,
        /// The list.
        list: ListKind,
        /// Its file.
        path: PathBuf,
    },
    /// A list file could not be written.
    #[error("saving the list; nothing was changed")]
    Save(#[source] ListError),
    /// The mode could not be saved in the state file.
    #[error("saving the mode; nothing was changed")]
    SaveMode(#[source] Box<ModeStateError>),
    /// Reload: the configuration or a list file could not be read.
    #[error(transparent)]
    Startup(Box<super::startup::StartupError>),
    /// A reload that could not read or check the configuration, the
    /// certificates or the lists (the wrapped `Startup`, `Config` or `Tls`).
    #[error("reload refused; the configuration and the lists in force stay")]
    ReloadRefused(#[source] Box<DaemonError>),
    /// Reload: the configuration file could not be read.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Reload: the certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The client that asked for the change went away (gave up, was
    /// killed, timed out) while the change waited its turn; it is not
    /// made, so a client that reported failure has changed nothing.
    #[error("the client went away before the change could be made; nothing was changed")]
    Abandoned,
}

impl From<super::startup::StartupError> for DaemonError {
    fn from(e: super::startup::StartupError) -> Self {
        DaemonError::Startup(Box::new(e))
    }
}

type Result<T, E = DaemonError> = std::result::Result<T, E>;

/// Reads the screening and ban counters (the daemon's defence).
pub type DefenceReader = Box<dyn Fn() -> DefenceSnapshot + Send + Sync>;

/// State shared by the front door, the control socket and the timers.
pub struct Daemon {
    /// The configuration in force; replaced whole by a reload.
    config: RwLock<Arc<Config>>,
    /// Where the configuration came from (`None`: the embedded default);
    /// a reload reads it again.
    pub config_path: Option<PathBuf>,
    /// Lists and mode. Readers (one per connection) clone the `Arc` and
    /// never wait for a change; changes build a new `Policy` and swap it in.
    policy: RwLock<Arc<Policy>>,
    /// Serialises changes, so two CLI calls cannot interleave their steps.
    changes: Mutex<()>,
    /// The XDP side; `None` when XDP is off (the front door still judges).
    pub kernel: Mutex<Option<Kernel>>,
    /// Interfaces the program is attached to, for status.
    pub attachments: Vec<Attachment>,
    /// For uptime in status.
    pub started: Instant,
    /// The running SMTP server (kicks, metrics); set once it is built.
    server: OnceLock<ServerHandle>,
    /// The TLS certificate's expiry (Unix seconds), for status.
    certificate_not_after: RwLock<Option<u64>>,
    /// When the lists last went into the kernel whole, for metrics.
    last_list_load: Mutex<Option<ListLoad>>,
    /// Modification time and size of each list file as last read or
    /// written by us: a file edited by hand since then is never silently
    /// overwritten by a CLI change.
    on_disk: Mutex<std::collections::HashMap<PathBuf, Option<(SystemTime, u64)>>>,
    /// Reads the screening and ban counters; set once the front door is
    /// built.
    defence: OnceLock<DefenceReader>,
    /// Bans of the `auto` source that expired since the start (count).
    pub bans_expired: std::sync::atomic::AtomicU64,
    /// The fleet connection (#19), when `[fleet]` is configured.
    fleet: OnceLock<Arc<crate::fleet::Fleet>>,
}

/// What a change must write to disk, besides the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Persist {
    /// One list of one source: its file.
    List(SourceName, ListKind),
    /// The mode and enforcement: the state file.
    Mode,
}

/// When the lists last went into the kernel whole, and how long it took.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ListLoad {
    /// Unix time of the load, seconds.
    pub at_unix_secs: u64,
    /// Its duration, seconds.
    pub duration_secs: f64,
}

impl ListLoad {
    /// A load that ended now after `took`.
    pub fn now(took: Duration) -> ListLoad {
        ListLoad {
            at_unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            duration_secs: took.as_secs_f64(),
        }
    }
}

/// What a policy change must write into the kernel.
pub enum KernelWrite {
    /// Only these prefixes (both lists are consulted for each).
    Prefixes(Vec<IpNet>),
    /// The whole merged set, switched in atomically.
    Everything,
}

/// What a list change did, for the CLI's reply.
#[derive(Clone, Debug, Default)]
pub struct ChangeReport {
    /// Prefixes added to the list.
    pub added: usize,
    /// Prefixes removed from the list.
    pub removed: usize,
    /// Prefixes that were already there (or were not there, for removal).
    pub unchanged: usize,
    /// Entries (deny + permit, prefixes) in force afterwards.
    pub list_size: usize,
    /// Open sessions closed because their address is now denied.
    pub sessions_closed: usize,
}

impl Daemon {
    /// Wraps the started pieces.
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        policy: Policy,
        kernel: Option<Kernel>,
        attachments: Vec<Attachment>,
    ) -> Daemon {
        let daemon = Daemon {
            config: RwLock::new(Arc::new(config)),
            config_path,
            policy: RwLock::new(Arc::new(policy)),
            changes: Mutex::new(()),
            kernel: Mutex::new(kernel),
            attachments,
            started: Instant::now(),
            server: OnceLock::new(),
            certificate_not_after: RwLock::new(None),
            last_list_load: Mutex::new(None),
            on_disk: Mutex::new(std::collections::HashMap::new()),
            defence: OnceLock::new(),
            bans_expired: std::sync::atomic::AtomicU64::new(0),
            fleet: OnceLock::new(),
        };
        daemon.remember_all_on_disk();
        daemon
    }

    fn fingerprint(path: &std::path::Path) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// Records the list file as we now know it.
    fn remember_on_disk(&self, path: &std::path::Path) {
        self.on_disk
            .lock()
            .expect("disk lock")
            .insert(path.to_path_buf(), Self::fingerprint(path));
    }

    /// Records every list file of every source of the policy in force.
    fn remember_all_on_disk(&self) {
        let config = self.config();
        let policy = self.policy();
        for (source, _) in policy.sources() {
            for kind in [ListKind::Deny, ListKind::Permit] {
                self.remember_on_disk(&list_path(&config, source, kind));
            }
        }
    }

    /// Refuses to overwrite a list file someone changed since we read it.
    fn check_unchanged_on_disk(
        &self,
        source: &SourceName,
        kind: ListKind,
        path: &std::path::Path,
    ) -> Result<()> {
        let known = self
            .on_disk
            .lock()
            .expect("disk lock")
            .get(path)
            .copied()
            .flatten();
        let now = Self::fingerprint(path);
        if now.is_some() && now != known {
            return Err(DaemonError::ChangedOnDisk {
                source_name: source.clone(),
                list: kind,
                path: path.to_path_buf(),
            });
        }
        Ok(())
    }

    /// When the lists were last loaded into the kernel whole, and how long
    /// that took.
    pub fn last_list_load(&self) -> Option<ListLoad> {
        *self.last_list_load.lock().expect("load lock")
    }

    /// Records a whole-list load into the kernel that took `took`.
    pub fn record_list_load(&self, took: Duration) {
        *self.last_list_load.lock().expect("load lock") = Some(ListLoad::now(took));
    }

    /// Records the fleet connection (once, at the start).
    pub fn set_fleet(&self, fleet: Arc<crate::fleet::Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    /// The fleet connection, when `[fleet]` is configured.
    pub fn fleet(&self) -> Option<&Arc<crate::fleet::Fleet>> {
        self.fleet.get()
    }

    /// Records the running server's handle (once).
    pub fn set_server(&self, handle: ServerHandle) {
        let _ = self.server.set(handle);
    }

    /// The running server, once started.
    pub fn server(&self) -> Option<&ServerHandle> {
        self.server.get()
    }

    /// Records how to read the screening and ban counters (once).
    pub fn set_defence(&self, reader: DefenceReader) {
        let _ = self.defence.set(reader);
    }

    /// The screening and ban counters, once the front door is built.
    pub fn defence_snapshot(&self) -> Option<DefenceSnapshot> {
        self.defence.get().map(|read| read())
    }

    /// Records the certificate expiry shown by status.
    pub fn set_certificate_not_after(&self, unix_seconds: Option<u64>) {
        *self.certificate_not_after.write().expect("cert lock") = unix_seconds;
    }

    /// The certificate expiry (Unix seconds), when TLS is on.
    pub fn certificate_not_after(&self) -> Option<u64> {
        *self.certificate_not_after.read().expect("cert lock")
    }

    /// The front door's view of the lists for `client`.
    pub fn access(&self, client: IpAddr) -> Access {
        let policy = self.policy();
        // The common case, a permitted client, without building the
        // explanation.
        if policy.decide(client).verdict() == Verdict::Permit {
            return Access::Allow;
        }
        let explanation = policy.explain(client);
        if explanation.verdict != Verdict::Deny || explanation.enforcement == Enforcement::Off {
            return Access::Allow;
        }
        let (reason, entry) = match explanation.reason {
            Reason::DenyList => (
                DenyReason::DenyList,
                explanation.deny_match.map(|e| e.prefix.to_string()),
            ),
            _ => (DenyReason::NotPermitted, None),
        };
        if explanation.enforcement == Enforcement::Monitor {
            Access::WouldDeny { reason, entry }
        } else {
            Access::Deny { reason, entry }
        }
    }

    /// With `close_denied_sessions` on, ends the open sessions whose
    /// address the lists now refuse (`421 4.7.1`). Returns how many.
    pub fn close_denied_sessions(&self) -> usize {
        if !self.config().server.close_denied_sessions {
            return 0;
        }
        let Some(server) = self.server() else {
            return 0;
        };
        let closed = server.kick(|ip| matches!(self.access(ip), Access::Deny { .. }));
        if closed > 0 {
            tracing::info!(
                sessions = closed,
                "closed open sessions from addresses that are now denied"
            );
        }
        closed
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    /// Replaces the configuration (reload).
    pub fn set_config(&self, config: Config) {
        *self.config.write().expect("config lock") = Arc::new(config);
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().expect("policy lock").clone()
    }

    /// XDP counters, when XDP is on.
    pub fn counters(&self) -> Option<CounterSnapshot> {
        self.kernel
            .lock()
            .expect("kernel lock")
            .as_ref()
            .map(|k| k.stats.counters())
    }

    /// Hit counts of the entries with hits, by prefix; empty without XDP.
    pub fn hits_by_prefix(&self) -> BTreeMap<IpNet, u64> {
        let guard = self.kernel.lock().expect("kernel lock");
        guard
            .as_ref()
            .map(|kernel| kernel.hits_by_prefix().into_iter().collect())
            .unwrap_or_default()
    }

    /// What the kernel rule `rule_id` (as in a drop event or a hit
    /// counter) stands for: its prefix, and the list entry with its source
    /// (or the protected range) behind it. `None` without XDP, for an
    /// unused id, or for a rule being removed right now.
    pub fn rule_origin(&self, rule_id: u32) -> Option<(IpNet, RuleOrigin)> {
        let prefix = self
            .kernel
            .lock()
            .expect("kernel lock")
            .as_ref()?
            .sync
            .prefix_of(rule_id)?;
        Some((prefix, self.policy().origin(prefix)?))
    }

    /// Applies `change` to a copy of the policy, then the kernel, then the
    /// files of the lists named in `touched`; makes it the policy in force
    /// only if every step worked. `change` says what the kernel must be
    /// told: the prefixes it touched (single CLI changes, expiry: one map
    /// write each) or everything (imports, reloads: one atomic switch).
    pub fn change_policy<T>(
        &self,
        touched: &[Persist],
        change: impl FnOnce(&mut Policy) -> Result<(T, KernelWrite)>,
    ) -> Result<T> {
        self.change_policy_for(&|| true, touched, change)
    }

    /// [`Daemon::change_policy`] on behalf of a client that may give up
    /// waiting (a control request): `still_wanted` is asked once the
    /// change's turn has come (the change lock is held), before anything
    /// is changed.
    ///
    /// # Errors
    ///
    /// [`DaemonError::Abandoned`] when `still_wanted` says no; nothing is
    /// changed. Otherwise as [`Daemon::change_policy`].
    pub fn change_policy_for<T>(
        &self,
        still_wanted: &dyn Fn() -> bool,
        touched: &[Persist],
        change: impl FnOnce(&mut Policy) -> Result<(T, KernelWrite)>,
    ) -> Result<T> {
        let serial = self.changes.lock().expect("changes lock");
        if !still_wanted() {
            return Err(DaemonError::Abandoned);
        }
        self.change_policy_locked(&serial, touched, change)
    }

    /// [`Daemon::change_policy`] for a caller that already holds the
    /// change lock (reload reads the files under it, so a list change
    /// cannot slip in between its read and its swap and be lost).
    fn change_policy_locked<T>(
        &self,
        _serial: &std::sync::MutexGuard<'_, ()>,
        touched: &[Persist],
        change: impl FnOnce(&mut Policy) -> Result<(T, KernelWrite)>,
    ) -> Result<T> {
        let old = self.policy();
        let mut new = (*old).clone();
        let (outcome, write) = change(&mut new)?;

        // Kernel first: if it cannot hold the new lists, nothing else moves.
        let undo_kernel = self.write_kernel(&old, &new, &write)?;

        let config = self.config();
        let mut saved: Vec<(&Persist, PathBuf)> = Vec::new();
        for persist in touched {
            let (path, result) = match persist {
                Persist::List(source, kind) => {
                    let path = list_path(&config, source, *kind);
                    let result =
                        self.check_unchanged_on_disk(source, *kind, &path)
                            .and_then(|()| {
                                let list = new.source(source).map(|s| s.list(*kind));
                                match list {
                                    Some(list) => list.save(&path).map_err(DaemonError::Save),
                                    None => Ok(()),
                                }
                            });
                    (path, result)
                }
                Persist::Mode => {
                    let path = state_path(&config);
                    let result = mode_state::save(&path, Some(mode_state_of(&new)))
                        .map_err(|e| DaemonError::SaveMode(Box::new(e)));
                    (path, result)
                }
            };
            if let Err(e) = result {
                // Put back the files already rewritten and the kernel.
                for (persist, path) in saved {
                    restore(&old, persist, &path);
                }
                if undo_kernel {
                    let _ = self.write_kernel(&new, &old, &write);
                }
                return Err(e);
            }
            self.remember_on_disk(&path);
            saved.push((persist, path));
        }
        *self.policy.write().expect("policy lock") = Arc::new(new);
        Ok(outcome)
    }

    /// Makes the kernel hold `new`'s rules; `true` if there is a kernel
    /// side (so a later failure must undo it).
    fn write_kernel(&self, old: &Policy, new: &Policy, write: &KernelWrite) -> Result<bool> {
        let mut guard = self.kernel.lock().expect("kernel lock");
        let Some(kernel) = guard.as_mut() else {
            return Ok(false);
        };
        let sync = &mut kernel.sync;
        sync.set_runtime(
            new.mode().into(),
            new.enforcement().into(),
            &self.config().server.ports(),
            self.config().xdp.log_rate_per_second,
        )
        .map_err(|e| DaemonError::KernelRuntime(Box::new(e)))?;
        sync.set_rate_limit(&super::settings::rate_limit(&self.config().rate_limit))
            .map_err(|e| DaemonError::KernelRuntime(Box::new(e)))?;
        match write {
            KernelWrite::Everything => {
                let started = Instant::now();
                let rules = super::startup::kernel_rules(new)?;
                sync.apply(&rules, ApplyHow::Atomic)
                    .map_err(|e| DaemonError::KernelLists(Box::new(e)))?;
                drop(guard);
                self.record_list_load(started.elapsed());
            }
            KernelWrite::Prefixes(prefixes) => {
                let changes: Vec<_> = prefixes.iter().map(|p| (*p, new.rule_action(*p))).collect();
                if let Err(e) = sync.update(&changes) {
                    // Restore the prefixes written before the failure.
                    let restore: Vec<_> =
                        prefixes.iter().map(|p| (*p, old.rule_action(*p))).collect();
                    let _ = sync.update(&restore);
                    return Err(DaemonError::KernelUpdate(Box::new(e)));
                }
            }
        }
        Ok(true)
    }

    /// Re-reads the configuration file, the certificates and the list files
    /// (SIGHUP, `smtpguard reload`). Everything is read and checked first;
    /// a bad file leaves the running configuration untouched. Lists, mode
    /// and certificates apply without dropping sessions; settings that
    /// need a restart (listen addresses, interfaces, limits, delivery, dnsbl,
    /// control socket) are named in the returned summary.
    pub fn reload(&self) -> Result<String> {
        self.reload_for(&|| true)
    }

    /// [`Daemon::reload`] on behalf of a client that may give up waiting
    /// (see [`Daemon::change_policy_for`]).
    ///
    /// The configuration and the certificates are read and checked before
    /// the change lock is taken: a slow, huge or hostile certificate file
    /// fails or finishes without holding up list changes. Only the list
    /// files are read under the lock, so that no list change slips in
    /// between their reading and the swap and is lost.
    ///
    /// # Errors
    ///
    /// A [`DaemonError`] naming the file or step; nothing is changed.
    pub fn reload_for(&self, still_wanted: &dyn Fn() -> bool) -> Result<String> {
        super::notify::reloading();
        let result = self.reload_checked(still_wanted).map_err(|e| match e {
            DaemonError::Startup(_) | DaemonError::Config(_) | DaemonError::Tls(_) => {
                DaemonError::ReloadRefused(Box::new(e))
            }
            other => other,
        });
        super::notify::ready("filtering: reload done");
        result
    }

    fn reload_checked(&self, still_wanted: &dyn Fn() -> bool) -> Result<String> {
        let config = super::startup::load_config(self.config_path.as_deref())?;
        let running = self.config();
        // Sections the running server, listeners, XDP attachments and
        // control socket were built from keep their running values until a
        // restart: changing only some of them (e.g. the XDP port set without
        // the listeners) would leave a port unguarded. Name what differs.
        let mut restart = Vec::new();
        let mut config = config;
        if running.server != config.server {
            restart.push("[server]");
            config.server = running.server.clone();
        }
        if running.xdp.interfaces != config.xdp.interfaces || running.xdp.mode != config.xdp.mode {
            restart.push("xdp.interfaces/xdp.mode");
            config.xdp.interfaces = running.xdp.interfaces.clone();
            config.xdp.mode = running.xdp.mode;
        }
        if running.rate_limit.table_size != config.rate_limit.table_size {
            // The bucket table is sized when the program loads.
            restart.push("rate_limit.table_size");
            config.rate_limit.table_size = running.rate_limit.table_size;
        }
        if running.delivery != config.delivery {
            restart.push("[delivery]");
            config.delivery = running.delivery.clone();
        }
        if running.control != config.control {
            restart.push("[control]");
            config.control = running.control.clone();
        }
        if running.tls.mode != config.tls.mode {
            restart.push("tls.mode");
            config.tls.mode = running.tls.mode;
        }
        if running.dnsbl != config.dnsbl {
            restart.push("[dnsbl]");
            config.dnsbl = running.dnsbl.clone();
        }
        if running.logging != config.logging || running.metrics != config.metrics {
            restart.push("[logging]/[metrics]");
            config.logging = running.logging.clone();
            config.metrics = running.metrics.clone();
        }
        if running.screening != config.screening || running.bans != config.bans {
            restart.push("[screening]/[bans]");
            config.screening = running.screening.clone();
            config.bans = running.bans.clone();
        }
        // With the running TLS mode: a mode change waits for the restart.
        let tls = match config.tls.active_files() {
            Some(f) => Some(crate::tls::load(
                &f.certificate,
                &f.private_key,
                f.ca_certificate.as_deref(),
            )?),
            None => None,
        };
        let serial = self.changes.lock().expect("changes lock");
        if !still_wanted() {
            return Err(DaemonError::Abandoned);
        }
        let mut policy = super::startup::load_policy(&config)?;
        crate::fleet::carry_over(&self.policy(), &mut policy);
        // The configuration in force now: another reload may have run
        // while this one read its files.
        let old = self.config();
        let live = self.policy();
        let mode_note =
            if (live.mode(), live.enforcement()) != (policy.mode(), policy.enforcement()) {
                format!(
                    " (was {}, {} until now: no state file, so the configured mode applies)",
                    live.mode(),
                    live.enforcement()
                )
            } else {
                String::new()
            };
        self.set_config(config.clone());
        if let Err(e) = self.change_policy_locked(&serial, &[], |p| {
            *p = policy;
            Ok(((), KernelWrite::Everything))
        }) {
            self.set_config((*old).clone());
            return Err(e);
        }
        self.remember_all_on_disk();
        drop(serial);
        if let Some(server) = self.server() {
            server.set_tls(tls.as_ref().map(|t| Arc::clone(&t.server_config)));
        }
        self.set_certificate_not_after(
            tls.as_ref()
                .map(|t| t.certificate.not_after_unix.max(0) as u64),
        );
        let policy = self.policy();
        let sources: Vec<String> = policy
            .sources()
            .map(|(name, s)| format!("{name} {}", s.len().total()))
            .collect();
        let mut summary = format!(
            "lists reloaded (deny {}, permit {}; sources: {}), mode {}, {}{mode_note}",
            policy.total_len(ListKind::Deny).total(),
            policy.total_len(ListKind::Permit).total(),
            sources.join(", "),
            policy.mode(),
            policy.enforcement()
        );
        if tls.is_some() {
            summary.push_str(", certificates reloaded");
        }
        if !restart.is_empty() {
            summary.push_str(&format!(
                "; not applied until a restart (the running values stay in force): {}",
                restart.join(", ")
            ));
        }
        tracing::info!("{summary}");
        self.close_denied_sessions();
        Ok(summary)
    }

    /// Expires temporary entries whose time has come; logs each.
    pub fn expire_entries(&self, now: SystemTime) -> Result<usize> {
        let due = self.policy().due_lists(now);
        // The fleet source has no list file: its entries expire from their
        // values, and the fleet cache keeps them.
        let touched: Vec<Persist> = due
            .into_iter()
            .filter(|(source, _)| source.as_str() != crate::fleet::SOURCE)
            .map(|(source, kind)| Persist::List(source, kind))
            .collect();
        let expired = self.change_policy(&touched, |p| {
            let expired = p.expire(now);
            let prefixes = expired.iter().map(|(_, _, e)| e.prefix).collect();
            Ok((expired, KernelWrite::Prefixes(prefixes)))
        })?;
        if !expired.is_empty() {
            self.close_denied_sessions();
        }
        let auto = SourceName::auto();
        let bans = expired
            .iter()
            .filter(|(s, k, _)| *s == auto && *k == ListKind::Deny)
            .count();
        self.bans_expired
            .fetch_add(bans as u64, std::sync::atomic::Ordering::Relaxed);
        for (source, kind, entry) in &expired {
            tracing::info!(source = %source, list = %kind, prefix = %entry.prefix, comment = entry.comment.as_deref().unwrap_or(""),
                "temporary entry expired and was removed");
        }
        Ok(expired.len())
    }
}

/// The state file's contents for `policy`.
fn mode_state_of(policy: &Policy) -> ModeState {
    ModeState {
        mode: policy.mode(),
        enforcement: policy.enforcement(),
    }
}

/// Puts back what a failed change already wrote for `persist` (best
/// effort: the error being reported is the first one).
fn restore(old: &Policy, persist: &Persist, path: &std::path::Path) {
    match persist {
        Persist::List(source, kind) => {
            let empty = AccessList::new(*kind);
            let list = old.source(source).map_or(&empty, |s| s.list(*kind));
            let _ = list.save(path);
        }
        Persist::Mode => {
            let _ = mode_state::save(path, Some(mode_state_of(old)));
        }
    }
}
