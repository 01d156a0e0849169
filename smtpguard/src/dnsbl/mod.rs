//! DNSBL and DNSWL scoring (RFC 5782), postscreen-style: every configured
//! list is asked about the client in parallel, the weights of the lists
//! that list it add up to a score, and a score at or above `threshold` is
//! a listing ([`Verdict`]). A leaf: it knows DNS, not SMTP.
//!
//! * Queries: A records of the reversed address under each zone
//!   ([`query_name`]), through hickory-resolver (the system resolver or an
//!   explicit one). Each is bounded by `timeout`; an answer that comes
//!   later does not count.
//! * Replies: RFC 5782 §2.1: an A record in 127.0.0.0/8 lists the client
//!   (filtered by the site's [`ReplyFilter`], if any); NXDOMAIN (or no A
//!   record) does not. `127.255.255.254` and `127.255.255.255` are the
//!   list refusing to answer (Spamhaus: a public resolver, or too many
//!   queries): an error, logged as such, never a listing. A reply outside
//!   127.0.0.0/8 is an error too.
//! * Sites on the same zone (postscreen's usual
//!   `zen.spamhaus.org=127.0.0.[10..11]*8, zen.spamhaus.org=127.0.0.[4..7]*6`)
//!   share one query: queries, the cache and their counters are per zone;
//!   each site applies its own filter and weight to the zone's answer.
//! * Cache: per (zone, client), for the answer's DNS TTL (the SOA's
//!   negative TTL for NXDOMAIN), at most `cache_ttl`, at most
//!   `max_cache_entries` entries. Errors and timeouts are not cached.
//! * At most one query in flight per (zone, client): a connection that
//!   arrives while one is under way waits for the same answer. At most
//!   `max_queries_in_flight` queries in flight overall; one over the cap
//!   waits for a slot within its `timeout`.
//!
//! Counters per zone ([`ZoneStats`]) and hits per site feed `stats` and
//! `/metrics` ([`SiteSnapshot`]).

pub mod config;
mod query;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::Resolver;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use config::{Action, DnsblConfig, ReplyFilter, ResolverSetting, Site};
pub use query::query_name;

/// Errors of the DNSBL module.
#[derive(Debug, thiserror::Error)]
pub enum DnsblError {
    /// A `[dnsbl]` key has a value that cannot be used. `key` is within
    /// `[dnsbl]` (`timeout`, `sites[2] (zen.spamhaus.org)`).
    #[error("dnsbl.{key} {problem}")]
    Invalid {
        /// The key, sites as `sites[i] (zone)`.
        key: String,
        /// The rest of the sentence.
        problem: String,
    },
    /// The resolver could not be set up (e.g. /etc/resolv.conf unreadable).
    #[error("cannot set up the DNS resolver")]
    Resolver(#[source] NetError),
}

/// What one site said about one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Listed: the replies that passed the filter.
    Listed(Vec<Ipv4Addr>),
    /// Answers came, but none passed the filter.
    Filtered(Vec<Ipv4Addr>),
    /// NXDOMAIN or no A record: not listed.
    NotListed,
    /// The list refused to answer (`127.255.255.254`/`.255`): an error.
    Refused(Ipv4Addr),
    /// A reply outside 127.0.0.0/8 (a wildcard, a hijacking resolver).
    BadReply(Ipv4Addr),
    /// SERVFAIL (or another error code).
    ServFail,
    /// No answer within `timeout`.
    Timeout,
    /// Any other failure (network error, REFUSED, ...).
    Failed(String),
}

impl Outcome {
    /// A short word for logs: `listed`, `filtered`, `not_listed`,
    /// `refused`, `bad_reply`, `servfail`, `timeout`, `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Listed(_) => "listed",
            Outcome::Filtered(_) => "filtered",
            Outcome::NotListed => "not_listed",
            Outcome::Refused(_) => "refused",
            Outcome::BadReply(_) => "bad_reply",
            Outcome::ServFail => "servfail",
            Outcome::Timeout => "timeout",
            Outcome::Failed(_) => "error",
        }
    }

    /// Whether this is a failure to get an answer (not cached, counted as
    /// an error or timeout).
    pub fn is_error(&self) -> bool {
        matches!(
            self,
            Outcome::Refused(_)
                | Outcome::BadReply(_)
                | Outcome::ServFail
                | Outcome::Timeout
                | Outcome::Failed(_)
        )
    }
}

/// One site's part in a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteResult {
    /// The site's name.
    pub name: String,
    /// Its weight (added to the score when `outcome` is `Listed`).
    pub weight: i32,
    /// What it said.
    pub outcome: Outcome,
    /// Whether the answer came from the cache (or a query another
    /// connection had already started: `false` then).
    pub cached: bool,
}

/// The DNSBL verdict on one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The sum of the weights of the sites that list the client.
    pub score: i32,
    /// The threshold in force.
    pub threshold: i32,
    /// Every site, in configuration order.
    pub sites: Vec<SiteResult>,
}

impl Verdict {
    /// Score ≥ threshold: `action` applies, and it is a violation for
    /// automatic bans.
    pub fn is_listed(&self) -> bool {
        self.score >= self.threshold
    }

    /// Score < 0 (allow lists outweigh block lists): a candidate for the
    /// pass cache.
    pub fn is_allow_listed(&self) -> bool {
        self.score < 0
    }

    /// The names of the sites that list the client (positive weight) or
    /// allow-list it (negative), comma-separated; `-` for none.
    pub fn matching_sites(&self) -> String {
        let names: Vec<&str> = self
            .sites
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Listed(_)))
            .map(|s| s.name.as_str())
            .collect();
        if names.is_empty() {
            "-".to_owned()
        } else {
            names.join(",")
        }
    }
}

/// Query counters of one zone, since start.
#[derive(Debug, Default)]
pub struct ZoneStats {
    /// Queries sent (cache misses that were not joined to one in flight).
    pub lookups: AtomicU64,
    /// Answers taken from the cache.
    pub cache_hits: AtomicU64,
    /// Queries that got no answer within `timeout`.
    pub timeouts: AtomicU64,
    /// Queries that failed otherwise (SERVFAIL, 127.255.255.254/255, bad
    /// replies, network errors).
    pub errors: AtomicU64,
    /// NXDOMAIN (not listed) answers to queries.
    pub nxdomain: AtomicU64,
    /// Sum of the query latencies (answered or not), microseconds.
    pub latency_us_sum: AtomicU64,
}

/// A plain copy of one site's counters, for `stats` and `/metrics`: its
/// hits, and the counters of its zone (the same for every site on that
/// zone).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SiteSnapshot {
    /// The site's name.
    pub name: String,
    /// Its zone.
    pub zone: String,
    /// See [`ZoneStats`].
    pub lookups: u64,
    /// Verdicts in which this site listed the client (fresh and cached
    /// answers alike).
    pub hits: u64,
    /// See [`ZoneStats`].
    pub cache_hits: u64,
    /// See [`ZoneStats`].
    pub timeouts: u64,
    /// See [`ZoneStats`].
    pub errors: u64,
    /// See [`ZoneStats`].
    pub nxdomain: u64,
    /// Sum of query latencies in seconds (count: `lookups`).
    pub latency_seconds_sum: f64,
}

/// Slack past `timeout` before a waiting connection stops waiting for a
/// query that should have ended by itself.
const SAFETY_MARGIN: Duration = Duration::from_millis(100);

type Key = (usize, IpAddr);
type Pending = Shared<BoxFuture<'static, Outcome>>;

/// The cache and the queries in flight, under one lock so an answer moves
/// from one to the other atomically.
#[derive(Default)]
struct State {
    cache: HashMap<Key, (Outcome, Instant)>,
    in_flight: HashMap<Key, Pending>,
}

struct Inner {
    config: DnsblConfig,
    resolver: Resolver<TokioRuntimeProvider>,
    state: Mutex<State>,
    slots: Arc<Semaphore>,
    /// The distinct zones of the sites, in first-seen order.
    zones: Vec<String>,
    /// For each site, the index of its zone in `zones`.
    site_zone: Vec<usize>,
    /// Per zone.
    zone_stats: Vec<ZoneStats>,
    /// Per site.
    hits: Vec<AtomicU64>,
}

/// The DNSBL engine: cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct Dnsbl {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dnsbl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dnsbl")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Dnsbl {
    /// Sets up the resolver. Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`DnsblError::Resolver`] when `resolver = "system"` and the system
    /// configuration cannot be read.
    pub fn new(config: DnsblConfig) -> Result<Dnsbl, DnsblError> {
        let mut builder = match config.resolver {
            ResolverSetting::System => Resolver::builder_tokio().map_err(DnsblError::Resolver)?,
            ResolverSetting::Address(addr) => {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut server.connections {
                    c.port = addr.port();
                }
                Resolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![server]),
                    TokioRuntimeProvider::default(),
                )
            }
        };
        let opts = builder.options_mut();
        // Our own cache, with our bounds; names are always absolute.
        opts.cache_size = 0;
        opts.ndots = 0;
        opts.timeout = config.timeout;
        opts.attempts = 1;
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        let resolver = builder.build().map_err(DnsblError::Resolver)?;
        let mut zones: Vec<String> = Vec::new();
        let site_zone = config
            .sites
            .iter()
            .map(|site| match zones.iter().position(|z| *z == site.zone) {
                Some(i) => i,
                None => {
                    zones.push(site.zone.clone());
                    zones.len() - 1
                }
            })
            .collect();
        let zone_stats = zones.iter().map(|_| ZoneStats::default()).collect();
        let hits = config.sites.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Dnsbl {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(config.max_queries_in_flight)),
                config,
                resolver,
                state: Mutex::new(State::default()),
                zones,
                site_zone,
                zone_stats,
                hits,
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &DnsblConfig {
        &self.inner.config
    }

    /// Asks every site about `client` in parallel (cache first) and sums
    /// the weights of those that list it. Resolves within `timeout` of the
    /// call, plus at most 100 ms (a site that has not answered by then
    /// counts as not listing);
    /// never fails: errors are in the per-site outcomes. Must be polled
    /// within a tokio runtime.
    pub fn lookup(
        &self,
        client: IpAddr,
    ) -> impl std::future::Future<Output = Verdict> + Send + 'static {
        let client = client.to_canonical();
        let this = self.clone();
        async move {
            let started = Instant::now();
            let deadline = started + this.inner.config.timeout;
            let asks = (0..this.inner.zones.len()).map(|z| this.ask(z, client, deadline));
            let answers = futures::future::join_all(asks).await;
            let inner = &this.inner;
            let mut score = 0i32;
            let sites = inner
                .config
                .sites
                .iter()
                .enumerate()
                .map(|(i, site)| {
                    let (answer, cached) = &answers[inner.site_zone[i]];
                    let outcome = filtered(site, answer);
                    let cached = *cached;
                    if matches!(outcome, Outcome::Listed(_)) {
                        inner.hits[i].fetch_add(1, Ordering::Relaxed);
                        score = score.saturating_add(site.weight);
                    }
                    SiteResult {
                        name: site.name.clone(),
                        weight: site.weight,
                        outcome,
                        cached,
                    }
                })
                .collect();
            Verdict {
                score,
                threshold: inner.config.threshold,
                sites,
            }
        }
    }

    /// One zone's answer (unfiltered): from the cache, from a query in
    /// flight, or from a new query; and whether it came from the cache.
    async fn ask(&self, zone: usize, client: IpAddr, deadline: Instant) -> (Outcome, bool) {
        let stats = &self.inner.zone_stats[zone];
        let key = (zone, client);
        let pending = {
            let mut state = self.inner.state.lock().expect("dnsbl lock");
            let now = Instant::now();
            match state.cache.get(&key) {
                Some((outcome, until)) if *until > now => {
                    stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return (outcome.clone(), true);
                }
                Some(_) => {
                    state.cache.remove(&key);
                }
                None => {}
            }
            match state.in_flight.get(&key) {
                Some(pending) => pending.clone(),
                None => {
                    let this = self.clone();
                    // A task of its own, so the query finishes (and is
                    // cached) even when every connection waiting for it
                    // has gone.
                    let task = tokio::spawn(async move { this.query(zone, client).await });
                    let pending: Pending = async move {
                        task.await
                            .unwrap_or_else(|e| Outcome::Failed(format!("query task: {e}")))
                    }
                    .boxed()
                    .shared();
                    state.in_flight.insert(key, pending.clone());
                    pending
                }
            }
        };
        // The query ends by its own deadline (`timeout` after it started,
        // no later than ours); this bound is only a safety net.
        match tokio::time::timeout_at(deadline + SAFETY_MARGIN, pending).await {
            Ok(outcome) => (outcome, false),
            Err(_) => (Outcome::Timeout, false),
        }
    }

    /// Sends one query (under the global cap, within `timeout`), counts
    /// it, caches a definite answer, and clears the in-flight entry. The
    /// answer is unfiltered: each site filters it ([`filtered`]).
    async fn query(&self, zone_index: usize, client: IpAddr) -> Outcome {
        let inner = &self.inner;
        let zone = &inner.zones[zone_index];
        let stats = &inner.zone_stats[zone_index];
        let name = query_name(client, zone);
        let started = Instant::now();
        let deadline = started + inner.config.timeout;
        let answer = tokio::time::timeout_at(deadline, async {
            let _slot = inner.slots.acquire().await.expect("never closed");
            stats.lookups.fetch_add(1, Ordering::Relaxed);
            inner.resolver.lookup(name.as_str(), RecordType::A).await
        })
        .await;
        let elapsed = started.elapsed();
        stats
            .latency_us_sum
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        let (outcome, ttl) = match answer {
            Err(_) => (Outcome::Timeout, None),
            Ok(Ok(lookup)) => {
                let replies: Vec<Ipv4Addr> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect();
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                (judge(replies), Some(ttl))
            }
            Ok(Err(e)) => classify(&e),
        };
        match &outcome {
            Outcome::NotListed => {
                stats.nxdomain.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Timeout => {
                stats.timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%zone, query = %name, timeout = ?inner.config.timeout, "DNSBL query timed out: not counted");
            }
            Outcome::Refused(code) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%zone, query = %name, reply = %code,
                    "DNSBL refused the query (127.255.255.254: queries through a public resolver; .255: too many queries): not counted as a listing; use a local recursive resolver");
            }
            Outcome::BadReply(code) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%zone, query = %name, reply = %code,
                    "DNSBL reply outside 127.0.0.0/8 (wildcard or hijacking resolver?): not counted");
            }
            Outcome::ServFail | Outcome::Failed(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                let error = match &outcome {
                    Outcome::Failed(e) => e.as_str(),
                    _ => "SERVFAIL",
                };
                tracing::warn!(%zone, query = %name, %error, "DNSBL query failed: not counted");
            }
            Outcome::Listed(_) | Outcome::Filtered(_) => {}
        }
        let mut state = inner.state.lock().expect("dnsbl lock");
        state.in_flight.remove(&(zone_index, client));
        let ttl = ttl.map(|t| t.min(inner.config.cache_ttl));
        if let (false, Some(ttl)) = (outcome.is_error(), ttl) {
            if !ttl.is_zero() {
                let now = Instant::now();
                if state.cache.len() >= inner.config.max_cache_entries {
                    state.cache.retain(|_, (_, until)| *until > now);
                }
                if state.cache.len() >= inner.config.max_cache_entries {
                    // Still full of live entries: make room with any one.
                    if let Some(victim) = state.cache.keys().next().copied() {
                        state.cache.remove(&victim);
                    }
                }
                state
                    .cache
                    .insert((zone_index, client), (outcome.clone(), now + ttl));
            }
        }
        outcome
    }

    /// Cached answers held now.
    pub fn cache_len(&self) -> usize {
        self.inner.state.lock().expect("dnsbl lock").cache.len()
    }

    /// The counters of every site, in configuration order.
    pub fn snapshot(&self) -> Vec<SiteSnapshot> {
        self.inner
            .config
            .sites
            .iter()
            .enumerate()
            .map(|(i, site)| {
                (
                    site,
                    &self.inner.zone_stats[self.inner.site_zone[i]],
                    &self.inner.hits[i],
                )
            })
            .map(|(site, s, hits)| SiteSnapshot {
                name: site.name.clone(),
                zone: site.zone.clone(),
                lookups: s.lookups.load(Ordering::Relaxed),
                hits: hits.load(Ordering::Relaxed),
                cache_hits: s.cache_hits.load(Ordering::Relaxed),
                timeouts: s.timeouts.load(Ordering::Relaxed),
                errors: s.errors.load(Ordering::Relaxed),
                nxdomain: s.nxdomain.load(Ordering::Relaxed),
                latency_seconds_sum: Duration::from_micros(
                    s.latency_us_sum.load(Ordering::Relaxed),
                )
                .as_secs_f64(),
            })
            .collect()
    }
}

/// The zone's answer, from its A records `replies` (RFC 5782 §2.1),
/// before any site's filter.
fn judge(replies: Vec<Ipv4Addr>) -> Outcome {
    if replies.is_empty() {
        return Outcome::NotListed;
    }
    if let Some(&code) = replies
        .iter()
        .find(|r| matches!(r.octets(), [127, 255, 255, 254 | 255]))
    {
        return Outcome::Refused(code);
    }
    if let Some(&bad) = replies.iter().find(|r| r.octets()[0] != 127) {
        return Outcome::BadReply(bad);
    }
    Outcome::Listed(replies)
}

/// What the zone's `answer` means for `site`: its filter applied to a
/// listing; anything else as it is.
fn filtered(site: &Site, answer: &Outcome) -> Outcome {
    match (answer, &site.filter) {
        (Outcome::Listed(replies), Some(f)) => {
            let matching: Vec<Ipv4Addr> =
                replies.iter().copied().filter(|r| f.matches(*r)).collect();
            if matching.is_empty() {
                Outcome::Filtered(replies.clone())
            } else {
                Outcome::Listed(matching)
            }
        }
        _ => answer.clone(),
    }
}

/// An error of the resolver as an outcome, with the negative TTL to
/// cache it for (NXDOMAIN and NODATA only).
fn classify(e: &NetError) -> (Outcome, Option<Duration>) {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::NXDomain | ResponseCode::NoError => (
                Outcome::NotListed,
                // No SOA: no negative TTL; cache briefly rather than not at all.
                Some(Duration::from_secs(no.negative_ttl.unwrap_or(60).into())),
            ),
            ResponseCode::ServFail => (Outcome::ServFail, None),
            _ => (Outcome::Failed(e.to_string()), None),
        },
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => (Outcome::ServFail, None),
        NetError::Timeout => (Outcome::Timeout, None),
        _ => (Outcome::Failed(e.to_string()), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(filter: Option<&str>) -> Site {
        Site {
            zone: "dnsbl.test".into(),
            filter: filter.map(|f| ReplyFilter::parse(f).unwrap()),
            weight: 1,
            name: "t".into(),
        }
    }

    #[test]
    fn rfc5782_replies() {
        let a = |d| Ipv4Addr::new(127, 0, 0, d);
        let judge = |site: Site, replies| filtered(&site, &judge(replies));
        assert_eq!(judge(site(None), vec![a(2)]), Outcome::Listed(vec![a(2)]));
        assert_eq!(judge(site(None), vec![]), Outcome::NotListed);
        let refused = Ipv4Addr::new(127, 255, 255, 254);
        assert_eq!(
            judge(site(None), vec![a(2), refused]),
            Outcome::Refused(refused)
        );
        let f = Some("127.0.0.[2..3]");
        assert_eq!(judge(site(f), vec![a(4)]), Outcome::Filtered(vec![a(4)]));
        assert_eq!(
            judge(site(f), vec![a(4), a(3)]),
            Outcome::Listed(vec![a(3)])
        );
        let wild = Ipv4Addr::new(192, 0, 2, 1);
        assert_eq!(judge(site(None), vec![wild]), Outcome::BadReply(wild));
    }
}
