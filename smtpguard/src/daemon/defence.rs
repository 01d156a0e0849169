//! The daemon's side of screening and automatic bans: the front door's
//! [`Defence`] (who is permitted, what a violation leads to), the pass
//! cache's file, and the counters for `stats` and `/metrics`.
//!
//! A ban is a deny entry of the `auto` source with an expiry, written by
//! the one list-change path ([`Daemon::change_policy`]: kernel, then
//! `sources/auto.deny.list`), so it is in the kernel within milliseconds,
//! persists across restarts, shows in `deny list --source auto`, expires
//! like `deny add --for` and can be lifted with `deny remove --source
//! auto`. The comment says why (`reason=pregreet ban=2`). Protected ranges
//! and permitted addresses are never banned.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;

use super::{paths, state::Daemon, KernelWrite};
use crate::{
    config::{BansConfig, Config, GreetAction as ConfigGreetAction},
    front_door::screening::{
        Defence, DefenceSnapshot, GreetAction, PassCache, Screening, ScreeningCounters,
        ScreeningSettings,
    },
    logging,
    policy::{
        bans::{bans_in_comment, BanBook, BanDecision, BanPolicy, Violation},
        ListKind, Reason, SourceName,
    },
};

use super::state::Persist;

/// How often the pass cache is written when it changed.
pub const PASS_CACHE_SAVE_INTERVAL: Duration = Duration::from_secs(60);

/// Ban counters (since the start).
#[derive(Debug, Default)]
struct BanCounters {
    violations: [AtomicU64; 5],
    exempt: AtomicU64,
    added: AtomicU64,
    refused_full: AtomicU64,
    failed: AtomicU64,
}

const KINDS: [Violation; 5] = [
    Violation::Pregreet,
    Violation::ProtocolErrors,
    Violation::RelayAttempt,
    Violation::RateLimit,
    Violation::Dnsbl,
];

/// The daemon's [`Defence`].
pub struct DaemonDefence {
    daemon: Weak<Daemon>,
    /// `None` when `bans.ban_after` is 0.
    book: Option<Arc<Mutex<BanBook>>>,
    counters: Arc<BanCounters>,
    /// The front door's screening counters.
    pub screening: Arc<ScreeningCounters>,
    /// The pass cache and its file; `None` without one.
    pub pass_cache: Option<(Arc<PassCache>, PathBuf)>,
}

/// The pass cache file: `pass-cache.txt` beside `state.toml`.
pub fn pass_cache_path(config: &Config) -> PathBuf {
    paths::state_path(config).with_file_name("pass-cache.txt")
}

/// The ban rules of `[bans]`; `None` when bans are off.
pub fn ban_policy(bans: &BansConfig) -> Option<BanPolicy> {
    Some(BanPolicy {
        ban_after: bans.ban_after?,
        window: bans.window,
        ban_for: bans.ban_for,
        growth: bans.growth,
        max_ban_for: bans.max_ban_for,
        max_entries: bans.max_entries,
    })
}

/// Reads the pass cache for a start. A bad file is not fatal (it only
/// costs returning clients one wait): a warning names the file and line
/// and the cache starts empty; the next save replaces the file.
pub fn load_pass_cache(config: &Config) -> Option<(Arc<PassCache>, PathBuf)> {
    let ttl = config.screening.pass_cache_ttl?;
    config.screening.greet_wait?;
    let path = pass_cache_path(config);
    let max = config.screening.pass_cache_max_entries;
    let cache = match PassCache::load(&path, ttl, max, SystemTime::now()) {
        Ok(cache) => {
            tracing::info!(path = %path.display(), clients = cache.len(), "pass cache loaded");
            cache
        }
        Err(e) => {
            tracing::warn!(error = %logging::one_line(&e),
                "the pass cache cannot be read; starting with an empty one (the file is replaced at the next save)");
            PassCache::new(ttl, max)
        }
    };
    Some((Arc::new(cache), path))
}

impl DaemonDefence {
    /// The defence of `daemon` under its configuration, with the pass
    /// cache from [`load_pass_cache`].
    pub fn new(
        daemon: &Arc<Daemon>,
        pass_cache: Option<(Arc<PassCache>, PathBuf)>,
    ) -> DaemonDefence {
        let config = daemon.config();
        let book = ban_policy(&config.bans).map(|p| {
            let mut book = BanBook::new(p);
            remember_bans(&mut book, daemon);
            Arc::new(Mutex::new(book))
        });
        DaemonDefence {
            daemon: Arc::downgrade(daemon),
            book,
            counters: Arc::new(BanCounters::default()),
            screening: Arc::new(ScreeningCounters::default()),
            pass_cache,
        }
    }

    /// The front door's [`Screening`] from `config` and this defence.
    pub fn screening(self: &Arc<Self>, config: &Config) -> Screening {
        let s = &config.screening;
        Screening {
            settings: ScreeningSettings {
                greet_wait: s.greet_wait,
                greet_action: match s.greet_action {
                    ConfigGreetAction::Ignore => GreetAction::Ignore,
                    ConfigGreetAction::Enforce => GreetAction::Enforce,
                    ConfigGreetAction::Drop => GreetAction::Drop,
                },
                greet_banner: s.greet_banner.clone(),
                max_waiting: s.max_waiting,
            },
            pass_cache: self.pass_cache.as_ref().map(|(c, _)| Arc::clone(c)),
            defence: Arc::clone(self) as Arc<dyn Defence>,
            counters: Arc::clone(&self.screening),
        }
    }

    /// Writes the pass cache if it changed (`force`: in any case); logs a
    /// failure.
    pub fn save_pass_cache(&self, force: bool) {
        let Some((cache, path)) = &self.pass_cache else {
            return;
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = cache.save(path, SystemTime::now(), force) {
            tracing::warn!(error = %logging::one_line(&e), "saving the pass cache failed; trying again later");
        }
    }

    /// A reading of the counters.
    pub fn snapshot(&self) -> DefenceSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (bans_expired, bans_in_force) = match self.daemon.upgrade() {
            Some(d) => (r(&d.bans_expired), bans_in_force(&d) as u64),
            None => (0, 0),
        };
        DefenceSnapshot {
            screening: self.screening.snapshot(),
            violations: KINDS
                .iter()
                .zip(&self.counters.violations)
                .map(|(k, c)| (k.as_str(), r(c)))
                .collect(),
            violations_exempt: r(&self.counters.exempt),
            bans_added: r(&self.counters.added),
            bans_refused_full: r(&self.counters.refused_full),
            bans_failed: r(&self.counters.failed),
            bans_expired,
            bans_in_force,
            pass_cache_entries: self.pass_cache.as_ref().map_or(0, |(c, _)| c.len() as u64),
        }
    }
}

/// Seeds `book` with the bans in force (the `auto` deny list, whose
/// comments say `ban=N`), so that a repeat offender's next ban after a
/// restart grows from its last one rather than starting over.
fn remember_bans(book: &mut BanBook, daemon: &Daemon) {
    let policy = daemon.policy();
    let Some(auto) = policy.source(&SourceName::auto()) else {
        return;
    };
    let now = Instant::now();
    for entry in auto.list(ListKind::Deny).entries() {
        if let Some(bans) = entry.comment.as_deref().and_then(bans_in_comment) {
            book.remember_ban(entry.prefix, bans, now);
        }
    }
}

/// Entries of the `auto` deny list now.
fn bans_in_force(daemon: &Daemon) -> usize {
    daemon
        .policy()
        .source(&SourceName::auto())
        .map_or(0, |s| s.list(ListKind::Deny).len().total())
}

impl Defence for DaemonDefence {
    fn permitted(&self, client: IpAddr) -> bool {
        let Some(daemon) = self.daemon.upgrade() else {
            return false;
        };
        let policy = daemon.policy();
        match policy.decide(client) {
            Reason::Permitted => true,
            // A protected range hides whether a permit entry matches too.
            Reason::Protected => policy.explain(client).permit_match.is_some(),
            _ => false,
        }
    }

    fn violation(&self, client: IpAddr, violation: Violation) {
        self.violation_of(IpNet::from(client.to_canonical()), violation);
    }
}

impl DaemonDefence {
    /// Counts a violation of `client`, an address as a host prefix or the
    /// IPv6 group the XDP rate limit counts as one client, and bans the
    /// whole prefix when the `[bans]` rules say so. Protected ranges and
    /// permit entries (judged at the prefix's first address) are exempt.
    pub fn violation_of(&self, client: IpNet, violation: Violation) {
        let Some(daemon) = self.daemon.upgrade() else {
            return;
        };
        let index = KINDS.iter().position(|k| *k == violation).unwrap_or(0);
        self.counters.violations[index].fetch_add(1, Ordering::Relaxed);
        let reason = daemon.policy().decide(client.network());
        if matches!(reason, Reason::Protected | Reason::Permitted) {
            self.counters.exempt.fetch_add(1, Ordering::Relaxed);
            tracing::info!(client = %client, violation = %violation.as_str(), exempt = ?reason,
                "violation of a protected or permitted address: never banned");
            return;
        }
        let Some(book) = &self.book else {
            return;
        };
        // A ban in force: the client's sessions still closing and its
        // queued rate-limit events are no new violations (nor a second,
        // longer ban). A ban lifted by hand is not in force.
        let auto = daemon
            .policy()
            .source(&SourceName::auto())
            .is_some_and(|s| s.list(ListKind::Deny).get(client.trunc()).is_some());
        if auto {
            tracing::info!(client = %client, violation = %violation.as_str(),
                "violation of a client banned already: counted, no new ban");
            return;
        }
        let in_force = bans_in_force(&daemon);
        let decided = Instant::now();
        let decision = book
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record_prefix(client, decided, in_force);
        match decision {
            BanDecision::Counted { strikes } => {
                tracing::info!(client = %client, violation = %violation.as_str(), strikes, "violation counted");
            }
            BanDecision::Pending => {
                tracing::info!(client = %client, violation = %violation.as_str(),
                    "violation counted; the client's ban is being written");
            }
            BanDecision::RefusedFull => {
                self.counters.refused_full.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %client, violation = %violation.as_str(), bans = in_force,
                    "ban refused: bans.max_entries bans are in force");
            }
            BanDecision::Ban {
                prefix,
                duration,
                repeats,
            } => {
                let book = Arc::clone(book);
                let apply = move |daemon: Arc<Daemon>, added: &AtomicU64, failed: &AtomicU64| {
                    match ban(&daemon, prefix, duration, repeats, violation) {
                        Ok(()) => {
                            book.lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .ban_written(prefix, decided);
                            added.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => {
                            tracing::error!(prefix = %prefix, error = %logging::one_line(&e),
                                retry_after_s = crate::policy::bans::BAN_RETRY_AFTER.as_secs(),
                                "the ban could not be written; the client's next violation after retry_after_s tries again");
                            // The strikes stay: without them a client
                            // whose ban failed would start over
                            // (BAN_RETRY_AFTER spaces the retries).
                            book.lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .ban_failed(prefix, decided, Instant::now());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                };
                // The list change writes the kernel and a file: off the
                // async workers when there are any.
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        let counters = Arc::clone(&self.counters);
                        rt.spawn_blocking(move || {
                            apply(daemon, &counters.added, &counters.failed);
                        });
                    }
                    Err(_) => apply(daemon, &self.counters.added, &self.counters.failed),
                }
            }
        }
    }
}

/// Writes one ban: a deny entry of `auto` expiring after `duration`.
fn ban(
    daemon: &Daemon,
    prefix: IpNet,
    duration: Duration,
    repeats: u32,
    violation: Violation,
) -> Result<(), super::state::DaemonError> {
    let auto = SourceName::auto();
    let comment = format!("reason={} ban={}", violation.as_str(), repeats + 1);
    let expires = SystemTime::now() + duration;
    let touched = [Persist::List(auto.clone(), ListKind::Deny)];
    daemon.change_policy(&touched, |p| {
        let outcome = p.source_mut(&auto).list_mut(ListKind::Deny).add(
            vec![prefix],
            Some(&comment),
            Some(expires),
        )?;
        Ok((outcome, KernelWrite::Prefixes(vec![prefix])))
    })?;
    tracing::info!(
        "BAN {prefix} for {} reason={}",
        humantime::format_duration(duration),
        violation.as_str()
    );
    daemon.close_denied_sessions();
    share_with_fleet(daemon, prefix, expires, comment);
    Ok(())
}

/// With `fleet.share_bans`, writes the ban to the fleet's deny list too
/// (its expiry in the value), so every gateway drops the client in XDP.
/// In the background: the local ban is already in force, and a fleet that
/// cannot be reached only costs the other gateways the ban (logged).
fn share_with_fleet(daemon: &Daemon, prefix: IpNet, expires: SystemTime, comment: String) {
    let Some(fleet) = daemon.fleet().filter(|f| f.config().share_bans) else {
        return;
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let fleet = Arc::clone(fleet);
    rt.spawn(async move {
        match fleet.share_ban(prefix, expires, &comment).await {
            Ok(revision) => {
                tracing::info!(%prefix, revision, "BAN {prefix} shared with the fleet");
            }
            Err(e) => {
                tracing::warn!(%prefix, error = %logging::one_line(&e),
                    "the ban could not be shared with the fleet; it holds on this gateway");
            }
        }
    });
}
