//! The gateway side: one task that keeps the `fleet` source equal to the
//! fleet keys in etcd, and the writes the daemon makes for the CLI.
//!
//! 1. The daemon starts from the local files and the cache file (see
//!    [`super::cache`]), so it filters before etcd answers.
//! 2. A full read, in pages at one revision R, replaces the `fleet` source
//!    in one atomic kernel switch; the cache is written.
//! 3. A watch from R+1 (progress notifications, `require_leader`) applies
//!    each response (one or more whole revisions) as it comes: single
//!    prefixes as single kernel updates, a feed's generation switch as one
//!    atomic switch.
//! 4. On any error: reconnect with exponential backoff and jitter and
//!    resume from the last applied revision + 1; a compacted revision
//!    means a full read again (step 2), never a half-applied list.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use etcd_client::{
    Client, DeleteOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    cache, client,
    keys::{entry_key, gateway_key, parse_key, FleetKey},
    state::{Change, Effect, FleetState},
    value::EntryValue,
    FleetError, FleetTarget,
};
use crate::{
    config::FleetConfig,
    logging::one_line,
    policy::{ListEntry, ListKind},
};

/// Keys read per page of a full read (about 1.5 MB of 150-byte entries,
/// well under gRPC's 4 MiB).
const PAGE_KEYS: i64 = 10_000;
/// The largest watch response accepted: one revision can hold a large
/// transaction.
const MAX_WATCH_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
/// At most this many operations per transaction (etcd's default
/// `--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;
/// First and longest reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The gateway status key's lease.
const STATUS_TTL_SECS: i64 = 20;
/// How often the cache and the status key are brought up to date, and
/// progress is asked for.
const TICK: Duration = Duration::from_millis(200);
/// Write the cache at most this often (a whole-list write).
const CACHE_EVERY: Duration = Duration::from_secs(2);
/// Ask etcd for progress (store revision) this often, for the lag.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Renew the status lease this often.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
/// A write waits this long for its own watch to apply it.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What `status` shows about the fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// The etcd endpoints.
    pub endpoints: Vec<String>,
    /// The key prefix.
    pub prefix: String,
    /// Whether the watch is running.
    pub connected: bool,
    /// The last revision applied to the kernel (0: only the cache or nothing).
    pub applied_revision: i64,
    /// The store's revision as last heard (progress or events).
    pub store_revision: i64,
    /// Seconds since etcd was last heard from; `None`: never.
    pub last_heard_secs_ago: Option<u64>,
    /// The last error, while disconnected.
    pub last_error: Option<String>,
    /// Entries of the fleet's own lists, and of the feeds in force.
    pub entries: usize,
    /// Entries of bulk feeds in force.
    pub feed_entries: usize,
    /// Full reads since the start (1 + compactions and failed resumes).
    pub full_reads: u64,
    /// How long the last full read took, paged read plus atomic switch
    /// (kernel and policy), milliseconds.
    pub last_full_read_ms: Option<u64>,
}

/// A gateway's status key's value (`<prefix>gateways/<host>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GatewayStatus {
    /// The last revision that changed a list, applied here.
    pub revision: i64,
    /// Entries in force from the fleet.
    pub entries: usize,
    /// smtpguard's version.
    pub version: String,
}

/// A committed write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The revision of the write's last transaction.
    pub revision: i64,
    /// Keys that existed before (updated by an add, removed by a remove).
    pub existed: usize,
}

/// The fleet connection of one gateway.
pub struct Fleet {
    config: FleetConfig,
    host: String,
    status: Mutex<(FleetStatus, Option<Instant>)>,
    /// The last applied revision; writers wait on it.
    applied: watch::Sender<i64>,
    /// The client of the running watch, for writes.
    client: tokio::sync::Mutex<Option<Client>>,
    /// The cache read at the start, taken by [`Fleet::run`].
    cached: Mutex<Option<FleetState>>,
}

impl Fleet {
    /// A fleet connection for this host, starting from `cached`.
    pub fn new(config: FleetConfig, host: String, cached: Option<FleetState>) -> Arc<Fleet> {
        let status = FleetStatus {
            endpoints: config.endpoints.clone(),
            prefix: config.prefix.clone(),
            applied_revision: cached.as_ref().map_or(0, |c| c.revision),
            ..FleetStatus::default()
        };
        Arc::new(Fleet {
            config,
            host,
            status: Mutex::new((status, None)),
            applied: watch::channel(0).0,
            client: tokio::sync::Mutex::new(None),
            cached: Mutex::new(cached),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// The status now.
    pub fn status(&self) -> FleetStatus {
        let guard = self.status.lock().expect("fleet status");
        let mut status = guard.0.clone();
        status.last_heard_secs_ago = guard.1.map(|t| t.elapsed().as_secs());
        status
    }

    fn set_status(&self, f: impl FnOnce(&mut FleetStatus)) {
        f(&mut self.status.lock().expect("fleet status").0);
    }

    fn heard(&self, store_revision: i64) {
        let mut guard = self.status.lock().expect("fleet status");
        guard.0.store_revision = guard.0.store_revision.max(store_revision);
        guard.1 = Some(Instant::now());
    }

    /// Keeps the `fleet` source in `target` equal to etcd until
    /// `shutdown`; reconnects on every error.
    pub async fn run(self: Arc<Self>, target: Arc<dyn FleetTarget>, shutdown: CancellationToken) {
        let mut state = self
            .cached
            .lock()
            .expect("fleet cache")
            .take()
            .unwrap_or_default();
        let mut need_full = true;
        let mut backoff = BACKOFF_MIN;
        loop {
            let connected_at = Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => {
                    // The last applied lists, for the next start.
                    if state.revision > 0 {
                        save_cache(&self.config, &state).await;
                    }
                    return;
                }
                r = self.session(&mut state, &mut need_full, &target, &shutdown) => r,
            };
            *self.client.lock().await = None;
            let error = match result {
                Ok(()) => return,
                Err(e) => e,
            };
            if matches!(error, FleetError::Compacted { .. } | FleetError::Apply(_)) {
                need_full = true;
            }
            let message = one_line(&error);
            tracing::warn!(error = %message, resume_from = state.revision + 1, full_read = need_full,
                "fleet: etcd connection lost; the lists in force stay, reconnecting");
            self.set_status(|s| {
                s.connected = false;
                s.last_error = Some(message);
            });
            if connected_at.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            // Full jitter over the upper half, so gateways do not reconnect in step.
            let jittered = backoff / 2 + (backoff / 2).mul_f64(random_fraction());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(jittered) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(
        &self,
        state: &mut FleetState,
        need_full: &mut bool,
        target: &Arc<dyn FleetTarget>,
        shutdown: &CancellationToken,
    ) -> Result<(), FleetError> {
        let site = self.config.prefix.clone();
        let mut client = client::connect(&self.config).await?;
        if *need_full {
            let started = Instant::now();
            let fresh = full_read(&mut client, &site).await?;
            let (deny, permit) = fresh.lists(SystemTime::now());
            call(target, move |t| t.switch(deny, permit)).await?;
            *state = fresh;
            *need_full = false;
            let took = started.elapsed().as_millis() as u64;
            self.set_status(|s| {
                s.full_reads += 1;
                s.last_full_read_ms = Some(took);
            });
            save_cache(&self.config, state).await;
            tracing::info!(
                revision = state.revision,
                entries = state.counts().0,
                feed_entries = state.counts().1,
                "fleet: lists read and switched into the kernel"
            );
        }
        self.applied.send_replace(state.revision);
        self.heard(state.revision);
        let (direct, feeds) = state.counts();
        self.set_status(|s| {
            s.connected = true;
            s.last_error = None;
            s.applied_revision = state.revision;
            s.entries = direct + feeds;
            s.feed_entries = feeds;
        });
        *self.client.lock().await = Some(client.clone());

        let lease = client
            .lease_grant(STATUS_TTL_SECS, None)
            .await
            .map_err(|e| FleetError::Etcd("granting the status lease", e))?
            .id();
        let (mut keeper, mut keepalive_replies) = client
            .lease_keep_alive(lease)
            .await
            .map_err(|e| FleetError::Etcd("keeping the status lease alive", e))?;
        let status_key = gateway_key(&site, &self.host);
        let mut lists_revision = state.revision;
        let mut reported = None;

        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(state.revision + 1)
            .with_progress_notify();
        let mut stream = client
            .watch_client()
            .max_decoding_message_size(MAX_WATCH_MESSAGE_BYTES)
            .watch(site.clone(), Some(options))
            .await
            .map_err(|e| FleetError::Etcd("starting the watch", e))?;
        let mut cache_dirty = false;
        let mut last_cache = Instant::now();
        let mut saving = None;
        let mut last_progress = Instant::now();
        let mut last_keepalive = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = client.lease_revoke(lease).await;
                    return Ok(());
                }
                message = stream.message() => {
                    let response = message
                        .map_err(|e| FleetError::Etcd("watching", e))?
                        .ok_or(FleetError::WatchEnded)?;
                    if response.canceled() {
                        if response.compact_revision() > 0 {
                            return Err(FleetError::Compacted { revision: response.compact_revision() });
                        }
                        return Err(FleetError::WatchCanceled(response.cancel_reason().to_owned()));
                    }
                    let header_revision = response.header().map_or(0, |h| h.revision());
                    self.heard(header_revision);
                    if response.events().is_empty() {
                        // A progress notification: everything up to it was sent.
                        if !response.created() && header_revision > state.revision {
                            state.revision = header_revision;
                            self.applied.send_replace(state.revision);
                        }
                        continue;
                    }
                    let mut effect = Effect::default();
                    let mut last = state.revision;
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        last = last.max(kv.mod_revision());
                        let change = match event.event_type() {
                            EventType::Put => Change::Put { key: kv.key().to_vec(), value: kv.value().to_vec() },
                            EventType::Delete => Change::Delete { key: kv.key().to_vec() },
                        };
                        if !matches!(parse_key(&site, kv.key()), Ok(FleetKey::Gateway(_))) {
                            lists_revision = lists_revision.max(kv.mod_revision());
                        }
                        match state.apply(&site, &change) {
                            Ok(e) => effect.merge(e),
                            Err(e) => tracing::warn!(revision = kv.mod_revision(), error = %one_line(&e), "fleet: change skipped"),
                        }
                    }
                    self.apply(state, effect, target).await?;
                    state.revision = last;
                    cache_dirty = true;
                    self.applied.send_replace(state.revision);
                    let (direct, feeds) = state.counts();
                    self.set_status(|s| {
                        s.applied_revision = state.revision;
                        s.entries = direct + feeds;
                        s.feed_entries = feeds;
                    });
                }
                _ = tick.tick() => {
                    if reported != Some(lists_revision) {
                        let value = serde_json::to_string(&GatewayStatus {
                            revision: lists_revision,
                            entries: state.counts().0 + state.counts().1,
                            version: env!("CARGO_PKG_VERSION").to_owned(),
                        }).expect("status serialises");
                        client.put(status_key.clone(), value, Some(PutOptions::new().with_lease(lease)))
                            .await
                            .map_err(|e| FleetError::Etcd("writing the gateway status", e))?;
                        reported = Some(lists_revision);
                    }
                    // In the background, one at a time: a large cache must not
                    // hold up the watch.
                    let idle = saving.as_ref().is_none_or(|h: &tokio::task::JoinHandle<()>| h.is_finished());
                    if cache_dirty && idle && last_cache.elapsed() >= CACHE_EVERY {
                        let (config, snapshot) = (self.config.clone(), state.clone());
                        saving = Some(tokio::spawn(async move { save_cache(&config, &snapshot).await }));
                        cache_dirty = false;
                        last_cache = Instant::now();
                    }
                    if last_progress.elapsed() >= PROGRESS_EVERY {
                        stream.request_progress().await.map_err(|e| FleetError::Etcd("asking for watch progress", e))?;
                        last_progress = Instant::now();
                    }
                    if last_keepalive.elapsed() >= KEEPALIVE_EVERY {
                        keeper.keep_alive().await.map_err(|e| FleetError::Etcd("keeping the status lease alive", e))?;
                        last_keepalive = Instant::now();
                    }
                }
                reply = keepalive_replies.message() => {
                    match reply {
                        Ok(Some(r)) if r.ttl() > 0 => {}
                        Ok(_) => return Err(FleetError::WatchCanceled("the status lease expired".into())),
                        Err(e) => return Err(FleetError::Etcd("keeping the status lease alive", e)),
                    }
                }
            }
        }
    }

    /// Brings the kernel in line with `effect`.
    async fn apply(
        &self,
        state: &FleetState,
        effect: Effect,
        target: &Arc<dyn FleetTarget>,
    ) -> Result<(), FleetError> {
        if effect.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now();
        if effect.everything {
            let (deny, permit) = state.lists(now);
            let (d, p) = (deny.len().total(), permit.len().total());
            call(target, move |t| t.switch(deny, permit)).await?;
            tracing::info!(
                revision = state.revision,
                deny = d,
                permit = p,
                "fleet: a feed switched generation; the fleet source was switched whole"
            );
            return Ok(());
        }
        let changes: Vec<(ListKind, IpNet, Option<ListEntry>)> = effect
            .prefixes
            .into_iter()
            .map(|(kind, prefix)| (kind, prefix, state.effective(kind, prefix, now)))
            .collect();
        call(target, move |t| t.update(changes)).await
    }

    /// A client for a write: the watch's, or a new connection.
    async fn write_client(&self) -> Result<Client, FleetError> {
        if let Some(c) = self.client.lock().await.as_ref() {
            return Ok(c.clone());
        }
        client::connect(&self.config).await
    }

    /// Writes entries (one key each) in transactions of at most 128
    /// operations. A put of the same value is idempotent, so a
    /// transaction whose acknowledgement was lost is simply sent again.
    ///
    /// # Errors
    ///
    /// [`FleetError`] when etcd cannot be reached or refuses (a read-only
    /// user); transactions before the failing one stay committed (each
    /// is whole), which the reply says.
    pub async fn put_entries(
        &self,
        kind: ListKind,
        prefixes: &[IpNet],
        value: &EntryValue,
    ) -> Result<Written, FleetError> {
        let json = value.to_json();
        let ops: Vec<TxnOp> = prefixes
            .iter()
            .map(|p| {
                TxnOp::put(
                    entry_key(&self.config.prefix, kind, *p),
                    json.clone(),
                    Some(PutOptions::new().with_prev_key()),
                )
            })
            .collect();
        self.transact(ops).await
    }

    /// Deletes entries, as [`Fleet::put_entries`] writes them.
    ///
    /// # Errors
    ///
    /// As [`Fleet::put_entries`].
    pub async fn delete_entries(
        &self,
        kind: ListKind,
        prefixes: &[IpNet],
    ) -> Result<Written, FleetError> {
        let ops: Vec<TxnOp> = prefixes
            .iter()
            .map(|p| {
                TxnOp::delete(
                    entry_key(&self.config.prefix, kind, *p),
                    Some(DeleteOptions::new()),
                )
            })
            .collect();
        self.transact(ops).await
    }

    /// The hook for shared bans (#16's automatic bans with
    /// `fleet.share_bans`): writes one deny entry whose expiry is in its
    /// value, and returns its revision without waiting for the watch.
    ///
    /// # Errors
    ///
    /// As [`Fleet::put_entries`].
    pub async fn share_ban(
        &self,
        prefix: IpNet,
        expires_at: SystemTime,
        comment: &str,
    ) -> Result<i64, FleetError> {
        let value = EntryValue {
            comment: Some(comment.to_owned()),
            expires_at: Some(expires_at),
            added_by: Some(format!("{}/auto", self.host)),
            added_at: Some(SystemTime::now()),
        };
        Ok(self
            .put_entries(ListKind::Deny, &[prefix], &value)
            .await?
            .revision)
    }

    async fn transact(&self, ops: Vec<TxnOp>) -> Result<Written, FleetError> {
        let mut client = self.write_client().await?;
        let mut written = Written {
            revision: 0,
            existed: 0,
        };
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn = Txn::new().and_then(chunk.to_vec());
            // Retried once on failure: the client may have sent it to a dead
            // member; a repeated put or delete leaves the same keys.
            let response = match tokio::time::timeout(
                client::REQUEST_TIMEOUT,
                client.txn(txn.clone()),
            )
            .await
            {
                Ok(Ok(r)) => r,
                _ => {
                    client = client::connect(&self.config).await?;
                    tokio::time::timeout(client::REQUEST_TIMEOUT, client.txn(txn))
                        .await
                        .map_err(|_| FleetError::Timeout("writing"))?
                        .map_err(|e| FleetError::Etcd("writing", e))?
                }
            };
            written.revision = response.header().map_or(0, |h| h.revision());
            for op in response.op_responses() {
                match op {
                    TxnOpResponse::Put(p) if p.prev_key().is_some() => written.existed += 1,
                    TxnOpResponse::Delete(d) => written.existed += d.deleted() as usize,
                    _ => {}
                }
            }
        }
        Ok(written)
    }

    /// Waits until this gateway's watch has applied `revision`.
    ///
    /// # Errors
    ///
    /// [`FleetError::NotApplied`] after [`APPLY_TIMEOUT`].
    pub async fn wait_applied(&self, revision: i64) -> Result<(), FleetError> {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(APPLY_TIMEOUT, rx.wait_for(|r| *r >= revision))
            .await
            .map_err(|_| FleetError::NotApplied { revision })?
            .map_err(|_| FleetError::NotApplied { revision })?;
        Ok(())
    }

    /// Waits until every gateway's status key shows `revision`; returns
    /// the gateways that did, or the ones that did not by `timeout`.
    ///
    /// # Errors
    ///
    /// [`FleetError`] when etcd cannot be read.
    pub async fn wait_fleet(
        &self,
        revision: i64,
        timeout: Duration,
    ) -> Result<Result<Vec<String>, Vec<String>>, FleetError> {
        let mut client = self.write_client().await?;
        let prefix = gateway_key(&self.config.prefix, "");
        let deadline = Instant::now() + timeout;
        loop {
            let response = client
                .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| FleetError::Etcd("reading the gateways' status", e))?;
            let mut done = Vec::new();
            let mut behind = Vec::new();
            for kv in response.kvs() {
                let host = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                match serde_json::from_slice::<GatewayStatus>(kv.value()) {
                    Ok(s) if s.revision >= revision => done.push(host),
                    _ => behind.push(host),
                }
            }
            if behind.is_empty() {
                return Ok(Ok(done));
            }
            if Instant::now() >= deadline {
                return Ok(Err(behind));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads every key under `site` in pages, all at the revision of the
/// first page.
async fn full_read(client: &mut Client, site: &str) -> Result<FleetState, FleetError> {
    let end = prefix_end(site.as_bytes());
    let mut state = FleetState::new();
    let mut start = site.as_bytes().to_vec();
    let mut revision = 0;
    let mut kv = client.kv_client();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE_KEYS);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut response = tokio::time::timeout(
            client::REQUEST_TIMEOUT * 4,
            kv.get(start.clone(), Some(options)),
        )
        .await
        .map_err(|_| FleetError::Timeout("reading the lists"))?
        .map_err(|e| FleetError::Etcd("reading the lists", e))?;
        if revision == 0 {
            revision = response.header().map_or(0, |h| h.revision());
        }
        let more = response.more();
        let kvs = response.take_kvs();
        let Some(last) = kvs.last() else { break };
        start = last.key().to_vec();
        start.push(0);
        for kv in kvs {
            let (key, value) = kv.into_key_value();
            if let Err(e) = state.apply(site, &Change::Put { key, value }) {
                tracing::warn!(revision, error = %one_line(&e), "fleet: entry skipped");
            }
        }
        if !more {
            break;
        }
    }
    state.revision = revision;
    Ok(state)
}

/// A number in [0, 1) that differs between processes and calls (the
/// standard library's per-process random hash keys), for jitter.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The end of the key range of every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

async fn call(
    target: &Arc<dyn FleetTarget>,
    f: impl FnOnce(&dyn FleetTarget) -> Result<(), super::BoxError> + Send + 'static,
) -> Result<(), FleetError> {
    let target = Arc::clone(target);
    tokio::task::spawn_blocking(move || f(&*target))
        .await
        .map_err(|e| FleetError::Apply(Box::new(e)))?
        .map_err(FleetError::Apply)
}

async fn save_cache(config: &FleetConfig, state: &FleetState) {
    let (path, site, state) = (
        config.cache_file.clone(),
        config.prefix.clone(),
        state.clone(),
    );
    let result = tokio::task::spawn_blocking(move || cache::save(&path, &site, &state)).await;
    if let Ok(Err(e)) = result {
        tracing::warn!(error = %one_line(&e), "fleet: the cache file could not be written; the lists in force are unchanged");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
    }
}
