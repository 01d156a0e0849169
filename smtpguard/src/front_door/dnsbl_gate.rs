//! The DNSBL step of the front door ([`crate::dnsbl`]): the lookup starts
//! when the session task starts (right after accept), the greeting waits
//! for it (at most the DNSBL `timeout`), then `action` applies to a listed
//! client (score ≥ threshold):
//!
//! * `ignore`: logged only;
//! * `enforce`: the session goes on, but MAIL gets `250` without reaching
//!   the hand-off and every RCPT gets `554 5.7.1 ... blocked using SITES`
//!   (sender and recipient logged, as postscreen does), so nothing is
//!   accepted;
//! * `drop`: `521 5.7.1 <host> Service unavailable; client [IP] blocked
//!   using SITES` instead of the greeting (RFC 7504 §3: 521 in the
//!   greeting: this host accepts no mail from the client), then close.
//!
//! Clients on a permit list skip DNSBL entirely ([`DnsblGate::skip`]).
//! Logs, postscreen-style: `DNSBL rank 3 for [203.0.113.9]:41234`.
//!
//! #16's greet-wait phase is meant to take over the await: [`DnsblGate::start`]
//! returns the lookup, [`DnsblGate::judge`] logs and counts a
//! [`Verdict`] (whose `is_listed`/`is_allow_listed` feed bans and the pass
//! cache) and says what to do.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::dnsbl::{Action, Dnsbl, Verdict};
use crate::smtp::handoff::{ClientInfo, Handoff};
use crate::smtp::{
    AskDriver, EnhancedCode, Envelope, ForwardPath, MailParams, RcptPolicy, Reply, ReversePath,
};

/// Longest time for the 521 of `drop` to be written.
const DROP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a client skips DNSBL (the daemon: it is on a permit list).
pub type SkipCheck = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// Counters of the DNSBL step, since start.
#[derive(Debug, Default)]
pub struct GateStats {
    /// Clients whose score reached the threshold.
    pub listed: AtomicU64,
    /// Clients with a negative score.
    pub allow_listed: AtomicU64,
    /// Listed clients dropped with 521 (`action = "drop"`).
    pub dropped: AtomicU64,
    /// Listed clients whose recipients were refused (`action = "enforce"`).
    pub enforced: AtomicU64,
    /// Clients that skipped DNSBL (permit list).
    pub skipped: AtomicU64,
}

/// A plain copy of [`GateStats`], the engine's cache size and its
/// per-site counters.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct GateSnapshot {
    /// See [`GateStats`].
    pub listed: u64,
    /// See [`GateStats`].
    pub allow_listed: u64,
    /// See [`GateStats`].
    pub dropped: u64,
    /// See [`GateStats`].
    pub enforced: u64,
    /// See [`GateStats`].
    pub skipped: u64,
    /// Cached answers held now (a gauge).
    pub cache_entries: u64,
    /// Per-site counters, in configuration order.
    pub sites: Vec<crate::dnsbl::SiteSnapshot>,
}

/// The DNSBL engine plus what the front door needs around it.
#[derive(Clone)]
pub struct DnsblGate {
    /// The engine (config, cache, per-site counters).
    pub dnsbl: Dnsbl,
    /// Clients for which DNSBL is not asked at all.
    pub skip: SkipCheck,
    /// Counters.
    pub stats: Arc<GateStats>,
}

/// Where a session's DNSBL verdict comes from.
pub(crate) enum DnsblStage {
    /// Ask now (the client skipped the greet wait).
    Ask,
    /// Asked during the greet wait: the verdict, `None` if the client
    /// skips DNSBL.
    Done(Option<Verdict>),
}

/// What to do with the session after the DNSBL verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Greet as usual.
    Proceed,
    /// Greet, then refuse every recipient with this reply.
    Enforce(Reply),
    /// Send this reply instead of the greeting and close.
    Drop(Reply),
}

impl DnsblGate {
    /// A gate over `dnsbl`; `skip` picks the clients that are not asked.
    pub fn new(dnsbl: Dnsbl, skip: SkipCheck) -> DnsblGate {
        DnsblGate {
            dnsbl,
            skip,
            stats: Arc::default(),
        }
    }

    /// The lookup for `client`, or `None` when it skips DNSBL. Bounded by
    /// the DNSBL `timeout`.
    pub fn start(&self, client: IpAddr) -> Option<impl Future<Output = Verdict> + Send + 'static> {
        if (self.skip)(client) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.dnsbl.lookup(client))
    }

    /// Logs and counts `verdict` for `peer` and says what `action` makes
    /// of it.
    pub fn judge(&self, verdict: &Verdict, peer: SocketAddr, host: &str) -> Decision {
        let config = self.dnsbl.config();
        let ip = peer.ip();
        if verdict.is_allow_listed() {
            self.stats.allow_listed.fetch_add(1, Ordering::Relaxed);
        }
        // The common case, a score of 0, builds no strings.
        if verdict.score == 0 {
            return Decision::Proceed;
        }
        let sites = verdict.matching_sites();
        let outcomes: Vec<String> = verdict
            .sites
            .iter()
            .map(|s| format!("{}={}", s.name, s.outcome.as_str()))
            .collect();
        let outcomes = outcomes.join(",");
        if !verdict.is_listed() {
            tracing::info!(client = %ip, score = verdict.score, %sites, %outcomes,
                "DNSBL rank {} for [{ip}]:{}", verdict.score, peer.port());
            return Decision::Proceed;
        }
        self.stats.listed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(client = %ip, score = verdict.score, threshold = verdict.threshold,
            %sites, %outcomes, action = config.action.as_str(),
            "DNSBL rank {} for [{ip}]:{}", verdict.score, peer.port());
        let text = format!("Service unavailable; client [{ip}] blocked using {sites}");
        match config.action {
            Action::Ignore => Decision::Proceed,
            Action::Enforce => {
                self.stats.enforced.fetch_add(1, Ordering::Relaxed);
                Decision::Enforce(Reply::new(554, Some(EnhancedCode(5, 7, 1)), text))
            }
            Action::Drop => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                Decision::Drop(Reply::new(
                    521,
                    Some(EnhancedCode(5, 7, 1)),
                    format!("{host} {text}"),
                ))
            }
        }
    }

    /// A plain copy of the counters.
    pub fn snapshot(&self) -> GateSnapshot {
        let s = &self.stats;
        GateSnapshot {
            listed: s.listed.load(Ordering::Relaxed),
            allow_listed: s.allow_listed.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            enforced: s.enforced.load(Ordering::Relaxed),
            skipped: s.skipped.load(Ordering::Relaxed),
            cache_entries: self.dnsbl.cache_len() as u64,
            sites: self.dnsbl.snapshot(),
        }
    }
}

/// Sends `reply` (the 521 of `drop`) and closes, within a bound.
pub async fn send_and_close<IO: AsyncWrite + Unpin>(io: &mut IO, reply: &Reply) {
    let _ = tokio::time::timeout(DROP_WRITE_TIMEOUT, async {
        io.write_all(&reply.to_bytes()).await?;
        io.shutdown().await
    })
    .await;
}

/// The session's hand-off, or, for a client listed under `enforce`, a
/// stand-in that refuses every recipient and never reaches the real one.
pub struct Gated<H> {
    inner: H,
    /// The refusal for every RCPT; `None`: pass everything through.
    refusal: Option<Reply>,
    /// The last MAIL FROM, for the log of refused recipients.
    from: Option<String>,
}

impl<H> Gated<H> {
    /// `refusal`: from [`Decision::Enforce`], or `None`.
    pub fn new(inner: H, refusal: Option<Reply>) -> Gated<H> {
        Gated {
            inner,
            refusal,
            from: None,
        }
    }
}

impl<H: Handoff> Handoff for Gated<H> {
    fn rcpt_policy(&self) -> Box<dyn RcptPolicy> {
        match self.refusal {
            Some(_) => Box::new(AskDriver),
            None => self.inner.rcpt_policy(),
        }
    }

    async fn mail(
        &mut self,
        client: &ClientInfo,
        from: &ReversePath,
        params: &MailParams,
    ) -> Reply {
        if self.refusal.is_some() {
            self.from = Some(from.to_string());
            return Reply::sender_ok();
        }
        self.inner.mail(client, from, params).await
    }

    async fn rcpt(&mut self, client: &ClientInfo, to: &ForwardPath) -> Reply {
        match &self.refusal {
            Some(refusal) => {
                tracing::info!(client = %client.peer.ip(), helo = client.helo.as_deref().unwrap_or("-"),
                    from = self.from.as_deref().unwrap_or("-"), to = %to,
                    "DNSBL enforce: recipient refused");
                refusal.clone()
            }
            None => self.inner.rcpt(client, to).await,
        }
    }

    async fn message(&mut self, client: &ClientInfo, envelope: &Envelope, data: &[u8]) -> Reply {
        match &self.refusal {
            // Unreachable (no recipient is ever accepted), but never 250.
            Some(refusal) => refusal.clone(),
            None => self.inner.message(client, envelope, data).await,
        }
    }

    async fn close(&mut self) {
        self.inner.close().await;
    }

    fn upstream(&self) -> Option<String> {
        self.inner.upstream()
    }
}
