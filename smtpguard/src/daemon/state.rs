//! The daemon's shared state and the one place where the lists change.
//!
//! Every change (CLI add/remove/import/mode, expiry, reload) goes through
//! [`Daemon::change_policy`]: compute the new policy on a copy, write the
//! kernel, write the list file, and only then make the copy the policy in
//! force. A failure at any step undoes the steps before it, so nothing is
//! half-applied: the kernel, the files and the front door always agree.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result};
use ipnet::IpNet;
use smtpguard_common::Action;

use crate::{
    config::Config,
    kernel::{ApplyHow, Attachment, CounterSnapshot, MapSync, Stats, XdpFilter},
    policy::{ListKind, Policy, Reason},
};

/// The loaded XDP program and the owners of its maps.
pub struct Kernel {
    /// The program; dropping it detaches it.
    pub filter: XdpFilter,
    /// The one writer of the tries and the runtime config.
    pub sync: MapSync,
    /// Counter reader.
    pub stats: Stats,
}

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
        Daemon {
            config: RwLock::new(Arc::new(config)),
            config_path,
            policy: RwLock::new(Arc::new(policy)),
            changes: Mutex::new(()),
            kernel: Mutex::new(kernel),
            attachments,
            started: Instant::now(),
        }
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

    /// The verdict for a client address (IPv4-mapped addresses count as IPv4).
    pub fn decide(&self, addr: IpAddr) -> Reason {
        self.policy().decide(addr)
    }

    /// XDP counters, when XDP is on.
    pub fn counters(&self) -> Option<CounterSnapshot> {
        self.kernel
            .lock()
            .expect("kernel lock")
            .as_ref()
            .map(|k| k.stats.counters())
    }

    /// Applies `change` to a copy of the policy, then the kernel, then the
    /// files of the lists named in `touched`; makes it the policy in force
    /// only if every step worked. `change` says what the kernel must be
    /// told: the prefixes it touched (single CLI changes, expiry: one map
    /// write each) or everything (imports, reloads: one atomic switch).
    pub fn change_policy<T>(
        &self,
        touched: &[ListKind],
        change: impl FnOnce(&mut Policy) -> Result<(T, KernelWrite)>,
    ) -> Result<T> {
        let _serial = self.changes.lock().expect("changes lock");
        let old = self.policy();
        let mut new = (*old).clone();
        let (outcome, write) = change(&mut new)?;

        // Kernel first: if it cannot hold the new lists, nothing else moves.
        let undo_kernel = self.write_kernel(&old, &new, &write)?;

        let config = self.config();
        let mut saved: Vec<(ListKind, PathBuf)> = Vec::new();
        for &kind in touched {
            let path = list_path(&config, kind);
            if let Err(e) = new.list(kind).save(&path) {
                // Put back the files already rewritten and the kernel.
                for (kind, path) in saved {
                    let _ = old.list(kind).save(&path);
                }
                if undo_kernel {
                    let _ = self.write_kernel(&new, &old, &write);
                }
                return Err(anyhow::Error::new(e).context("saving the list; nothing was changed"));
            }
            saved.push((kind, path));
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
        .context("writing the XDP runtime configuration")?;
        match write {
            KernelWrite::Everything => {
                let rules: Vec<(IpNet, Action)> = new
                    .compile()?
                    .into_iter()
                    .map(|r| (r.prefix, r.action))
                    .collect();
                sync.apply(&rules, ApplyHow::Atomic).context(
                    "loading the lists into the kernel; the previous lists stay in force",
                )?;
            }
            KernelWrite::Prefixes(prefixes) => {
                let changes: Vec<_> = prefixes
                    .iter()
                    .map(|p| (*p, merged_action(new, p)))
                    .collect();
                if let Err(e) = sync.update(&changes) {
                    // Restore the prefixes written before the failure.
                    let restore: Vec<_> = prefixes
                        .iter()
                        .map(|p| (*p, merged_action(old, p)))
                        .collect();
                    let _ = sync.update(&restore);
                    return Err(anyhow::Error::new(e)
                        .context("updating the kernel lists; nothing was changed"));
                }
            }
        }
        Ok(true)
    }

    /// Expires temporary entries whose time has come; logs each.
    pub fn expire_entries(&self, now: SystemTime) -> Result<usize> {
        let touched = [ListKind::Deny, ListKind::Permit];
        let expired = self.change_policy(&touched, |p| {
            let expired = p.expire(now);
            let prefixes = expired.iter().map(|(_, e)| e.prefix).collect();
            Ok((expired, KernelWrite::Prefixes(prefixes)))
        })?;
        for (kind, entry) in &expired {
            tracing::info!(list = %kind, prefix = %entry.prefix, comment = entry.comment.as_deref().unwrap_or(""),
                "temporary entry expired and was removed");
        }
        Ok(expired.len())
    }
}

/// The file a list lives in.
pub fn list_path(config: &Config, kind: ListKind) -> PathBuf {
    match kind {
        ListKind::Deny => config.policy.deny_list.clone(),
        ListKind::Permit => config.policy.permit_list.clone(),
    }
}

/// The kernel's action for `prefix` under `policy`: deny if on the deny
/// list (deny wins on the identical prefix), permit if on the permit list.
fn merged_action(policy: &Policy, prefix: &IpNet) -> Option<Action> {
    if policy.list(ListKind::Deny).get(*prefix).is_some() {
        Some(Action::Deny)
    } else if policy.list(ListKind::Permit).get(*prefix).is_some() {
        Some(Action::Permit)
    } else {
        None
    }
}
