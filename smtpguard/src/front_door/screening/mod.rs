//! Screening before the greeting, postscreen's way: the greet delay,
//! early-talker detection (PREGREET) and the pass cache.
//!
//! After the access check and before a session takes a slot, a client
//! that is neither permitted (a permit entry) nor in the [`PassCache`]
//! waits `greet_wait` for its `220`; with a `greet_banner` it first gets
//! `220-HOST BANNER` at once, and the session's own greeting ends that
//! reply after the wait (postscreen's multi-line trick). Any byte it sends
//! before then is PREGREET, logged like postscreen
//! (`PREGREET 11 after 0.21 from [203.0.113.9]:41234: EHLO x\r\n`),
//! reported to the [`Defence`] as a [`Violation::Pregreet`] at once (so a
//! ban is in the kernel before the session ends) and handled per
//! [`GreetAction`]. A client that waited quietly passes (`PASS NEW`) and
//! goes into the pass cache; one found there skips the wait (`PASS OLD`).
//!
//! Detection peeks (`MSG_PEEK`) and consumes nothing, so with `ignore` the
//! session reads the early bytes as usual. Waiting clients hold no slot of
//! `max_connections`; at most `max_waiting` wait at once, and one more gets
//! `421 4.3.2 ... All screening slots are busy` and is closed.
//!
//! Other tests may run during the wait (DNSBL, #17): [`pregreet`] takes
//! them as futures and returns their verdicts with its own.

pub mod enforce;
pub mod pass_cache;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::policy::bans::Violation;
pub use pass_cache::{PassCache, PassCacheError};

/// Bytes of early talk looked at for the log line.
const PEEK_BYTES: usize = 256;
/// Longest time for the `220-` line or the refusal to be written.
const WRITE_LIMIT: Duration = Duration::from_secs(10);

/// What happens to a client that talked before the greeting
/// (postscreen_greet_action).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreetAction {
    /// Log and count; then serve it as any other client.
    Ignore,
    /// Greet, then answer every command with `554 5.5.1 Protocol error`
    /// (QUIT with `221`), logging sender and recipients ([`enforce`]).
    Enforce,
    /// `521 5.5.1 Protocol error` and close, at once.
    Drop,
}

/// The screening settings (the daemon builds them from `[screening]`).
#[derive(Debug, Clone)]
pub struct ScreeningSettings {
    /// The greet delay; `None`: no screening at all.
    pub greet_wait: Option<Duration>,
    /// What happens to an early talker.
    pub greet_action: GreetAction,
    /// Text of the `220-` line sent before the wait; `None`: none.
    pub greet_banner: Option<String>,
    /// Clients in the wait at once.
    pub max_waiting: usize,
}

/// What the front door asks of the daemon, and tells it, while screening.
/// Must be fast and must not block (called on the accept loop and in
/// session tasks).
pub trait Defence: Send + Sync {
    /// Whether `client` is on a permit list (it skips the wait).
    fn permitted(&self, client: IpAddr) -> bool;
    /// `client` committed `violation`; the daemon may ban it.
    fn violation(&self, client: IpAddr, violation: Violation);
}

/// No permit lists, no bans (tests, benches).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDefence;

impl Defence for NoDefence {
    fn permitted(&self, _: IpAddr) -> bool {
        false
    }
    fn violation(&self, _: IpAddr, _: Violation) {}
}

/// Screening counters, per test and verdict.
#[derive(Debug, Default)]
pub struct ScreeningCounters {
    waiting: AtomicUsize,
    pregreet: AtomicU64,
    pregreet_dropped: AtomicU64,
    pregreet_enforced: AtomicU64,
    pass_new: AtomicU64,
    pass_old: AtomicU64,
    skipped_permitted: AtomicU64,
    refused_waiting_cap: AtomicU64,
    gone_while_waiting: AtomicU64,
}

/// [`ScreeningCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ScreeningSnapshot {
    /// Clients in the greet wait now (gauge).
    pub waiting: usize,
    /// Clients that talked before the greeting.
    pub pregreet: u64,
    /// Of those, closed with `521` (`greet_action = "drop"`).
    pub pregreet_dropped: u64,
    /// Of those, answered `554` to every command (`"enforce"`).
    pub pregreet_enforced: u64,
    /// Clients that waited quietly (`PASS NEW`).
    pub pass_new: u64,
    /// Clients found in the pass cache, that skipped the wait (`PASS OLD`).
    pub pass_old: u64,
    /// Permitted clients, that skipped the wait.
    pub skipped_permitted: u64,
    /// Clients refused because `max_waiting` were waiting (`421 4.3.2`).
    pub refused_waiting_cap: u64,
    /// Clients that closed the connection during the wait.
    pub gone_while_waiting: u64,
}

impl ScreeningSnapshot {
    /// Every counter by its name in `stats` and `/metrics`
    /// (`screening_pregreet`, ...), the gauge `waiting` apart.
    pub fn named(&self) -> [(&'static str, u64); 8] {
        [
            ("screening_pregreet", self.pregreet),
            ("screening_pregreet_dropped", self.pregreet_dropped),
            ("screening_pregreet_enforced", self.pregreet_enforced),
            ("screening_pass_new", self.pass_new),
            ("screening_pass_old", self.pass_old),
            ("screening_skipped_permitted", self.skipped_permitted),
            ("screening_refused_waiting_cap", self.refused_waiting_cap),
            ("screening_gone_while_waiting", self.gone_while_waiting),
        ]
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl ScreeningCounters {
    /// A reading of every counter.
    pub fn snapshot(&self) -> ScreeningSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ScreeningSnapshot {
            waiting: self.waiting.load(Ordering::Relaxed),
            pregreet: r(&self.pregreet),
            pregreet_dropped: r(&self.pregreet_dropped),
            pregreet_enforced: r(&self.pregreet_enforced),
            pass_new: r(&self.pass_new),
            pass_old: r(&self.pass_old),
            skipped_permitted: r(&self.skipped_permitted),
            refused_waiting_cap: r(&self.refused_waiting_cap),
            gone_while_waiting: r(&self.gone_while_waiting),
        }
    }
}

/// The screening and ban counters at one moment: the front door's, and
/// the daemon's violations and bans (collected by the daemon, rendered by
/// `stats` and `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DefenceSnapshot {
    /// The front door's screening counters.
    pub screening: ScreeningSnapshot,
    /// Violations reported, by kind (`pregreet`, `protocol_errors`, ...).
    pub violations: BTreeMap<&'static str, u64>,
    /// Violations of protected or permitted addresses (never banned).
    pub violations_exempt: u64,
    /// Bans written.
    pub bans_added: u64,
    /// Bans due but refused: `bans.max_entries` in force.
    pub bans_refused_full: u64,
    /// Bans due that could not be written (see the log).
    pub bans_failed: u64,
    /// Bans that expired.
    pub bans_expired: u64,
    /// Bans in force (entries of the `auto` deny list).
    pub bans_in_force: u64,
    /// Clients in the pass cache.
    pub pass_cache_entries: u64,
}

impl DefenceSnapshot {
    /// The counters by their names in `stats` (`bans_added`,
    /// `violations_pregreet`, `screening_pass_new`, ...); gauges apart.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .screening
            .named()
            .iter()
            .map(|(n, v)| (n.to_string(), *v))
            .collect();
        out.extend(
            self.violations
                .iter()
                .map(|(k, v)| (format!("violations_{k}"), *v)),
        );
        out.push(("violations_exempt".into(), self.violations_exempt));
        out.push(("bans_added".into(), self.bans_added));
        out.push(("bans_refused_full".into(), self.bans_refused_full));
        out.push(("bans_failed".into(), self.bans_failed));
        out.push(("bans_expired".into(), self.bans_expired));
        out
    }

    /// The gauges by name: `screening_waiting`, `bans_in_force`,
    /// `pass_cache_entries`.
    pub fn gauges(&self) -> [(&'static str, u64); 3] {
        [
            ("screening_waiting", self.screening.waiting as u64),
            ("bans_in_force", self.bans_in_force),
            ("pass_cache_entries", self.pass_cache_entries),
        ]
    }
}

/// The screening state of a server: settings, the waiting cap, the pass
/// cache, the daemon's [`Defence`] and the counters.
pub struct Screening {
    /// The settings.
    pub settings: ScreeningSettings,
    /// Who skips the wait for having passed before; `None`: no cache.
    pub pass_cache: Option<Arc<PassCache>>,
    /// The daemon's side: permit lists, bans.
    pub defence: Arc<dyn Defence>,
    /// The counters.
    pub counters: Arc<ScreeningCounters>,
}

/// What to do with a client on accept.
pub(crate) enum Admission {
    /// Serve it now (screening off, permitted, or in the pass cache).
    Skip,
    /// It must wait; the guard holds its place among `max_waiting`.
    Wait(WaitingGuard),
    /// `max_waiting` clients are waiting: refuse it.
    Full,
}

/// One place among `max_waiting`, given back on drop.
pub(crate) struct WaitingGuard {
    counters: Arc<ScreeningCounters>,
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How the wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Quiet until the end: go on to the greeting.
    Passed,
    /// It talked early; go on per [`GreetAction`] (not `Drop`: that one
    /// was closed here).
    Pregreet,
    /// It talked early and was closed (`521`).
    Dropped,
    /// It closed the connection, or the server is shutting down.
    Gone,
}

impl Screening {
    /// Decides on accept whether `peer` waits.
    pub(crate) fn admit(&self, peer: SocketAddr) -> Admission {
        if self.settings.greet_wait.is_none() {
            return Admission::Skip;
        }
        let ip = peer.ip();
        if self.defence.permitted(ip) {
            bump(&self.counters.skipped_permitted);
            return Admission::Skip;
        }
        if let Some(cache) = &self.pass_cache {
            if cache.fresh(ip, SystemTime::now()).is_some() {
                bump(&self.counters.pass_old);
                tracing::info!("PASS OLD [{ip}]:{}", peer.port());
                return Admission::Skip;
            }
        }
        let waiting = &self.counters.waiting;
        let taken = waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < self.settings.max_waiting).then_some(n + 1)
        });
        match taken {
            Ok(_) => Admission::Wait(WaitingGuard {
                counters: Arc::clone(&self.counters),
            }),
            Err(_) => {
                bump(&self.counters.refused_waiting_cap);
                Admission::Full
            }
        }
    }

    /// Runs the greet wait on `stream` (see the module docs): the `220-`
    /// line, the wait, PREGREET detection and its log line, the violation
    /// report, `521` for `drop`, `PASS NEW` and the pass cache. `others`
    /// are tests run during the wait (DNSBL); their results come back once
    /// the wait is over (they may end sooner or hold the client longer).
    pub async fn pregreet<T, F>(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        host: &str,
        shutdown: &CancellationToken,
        others: F,
    ) -> (WaitOutcome, T)
    where
        F: Future<Output = T>,
    {
        let wait = self.settings.greet_wait.unwrap_or_default();
        let (outcome, others) =
            tokio::join!(self.watch(stream, peer, host, wait, shutdown), others);
        (outcome, others)
    }

    async fn watch(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        host: &str,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> WaitOutcome {
        let started = Instant::now();
        let deadline = started + wait;
        if let Some(banner) = &self.settings.greet_banner {
            let line = format!("220-{host} {banner}\r\n");
            if write_all(stream, line.as_bytes()).await.is_err() {
                bump(&self.counters.gone_while_waiting);
                return WaitOutcome::Gone;
            }
        }
        let mut talked = false;
        let mut buf = [0u8; PEEK_BYTES];
        loop {
            // Peeking consumes nothing (the session reads it all later)
            // and, unlike a read, can be dropped by the select at any time.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return WaitOutcome::Gone,
                _ = tokio::time::sleep_until(deadline) => break,
                peeked = stream.peek(&mut buf), if !talked => match peeked {
                    Ok(0) | Err(_) => {
                        bump(&self.counters.gone_while_waiting);
                        return WaitOutcome::Gone;
                    }
                    Ok(n) => {
                        talked = true;
                        self.early_talk(peer, &buf[..n], started.elapsed());
                        if self.settings.greet_action == GreetAction::Drop {
                            bump(&self.counters.pregreet_dropped);
                            // After a `220-` line the greeting must end
                            // before another code (RFC 5321 4.2.1); the 521
                            // then answers the early command.
                            let mut reply = String::new();
                            if self.settings.greet_banner.is_some() {
                                reply = format!("220 {host} ESMTP smtpguard\r\n");
                            }
                            reply.push_str("521 5.5.1 Protocol error\r\n");
                            let _ = write_all(stream, reply.as_bytes()).await;
                            return WaitOutcome::Dropped;
                        }
                    }
                },
            }
        }
        if talked {
            if self.settings.greet_action == GreetAction::Enforce {
                bump(&self.counters.pregreet_enforced);
            }
            return WaitOutcome::Pregreet;
        }
        WaitOutcome::Passed
    }

    /// A client that waited quietly and that no other test (DNSBL) failed:
    /// `PASS NEW`, and the pass cache remembers it.
    pub(crate) fn pass_new(&self, peer: SocketAddr) {
        bump(&self.counters.pass_new);
        tracing::info!("PASS NEW [{}]:{}", peer.ip(), peer.port());
        if let Some(cache) = &self.pass_cache {
            cache.record(peer.ip(), SystemTime::now());
        }
    }

    /// Logs, counts and reports an early talker.
    fn early_talk(&self, peer: SocketAddr, bytes: &[u8], after: Duration) {
        bump(&self.counters.pregreet);
        tracing::info!(
            "PREGREET {} after {:.2} from [{}]:{}: {}",
            bytes.len(),
            after.as_secs_f64(),
            peer.ip(),
            peer.port(),
            printable(first_line(bytes))
        );
        self.defence.violation(peer.ip(), Violation::Pregreet);
    }

    /// `421 4.3.2` for a client over `max_waiting`, without waiting for it.
    pub(crate) fn refuse_full(&self, stream: &TcpStream, peer: SocketAddr, host: &str) {
        tracing::info!(
            client = %peer.ip(),
            reason = "waiting_cap",
            "connection refused: screening.max_waiting clients are waiting"
        );
        let reply = format!("421 4.3.2 {host} All screening slots are busy, try again later\r\n");
        let _ = stream.try_write(reply.as_bytes());
    }
}

/// The bytes up to and including the first LF.
fn first_line(bytes: &[u8]) -> &[u8] {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => &bytes[..=i],
        None => bytes,
    }
}

/// Bytes as postscreen logs them: printable ASCII as is, CR and LF as
/// `\r` and `\n`, anything else as `\xHH`.
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// Writes all of `bytes` on a socket shared by reference, within
/// [`WRITE_LIMIT`].
async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + WRITE_LIMIT;
    while !bytes.is_empty() {
        tokio::time::timeout_at(deadline, stream.writable())
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_talk_is_logged_like_postscreen() {
        assert_eq!(
            printable(first_line(b"EHLO x\r\nMAIL FROM:<a@b>\r\n")),
            "EHLO x\\r\\n"
        );
        assert_eq!(printable(b"\x16\x03\x01"), "\\x16\\x03\\x01");
    }
}
