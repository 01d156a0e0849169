//! Open sessions: session ids, the per-client counts behind
//! `max_connections_per_client` (per IPv4 address, per IPv6 prefix), kick
//! tokens, what each session is doing ([`Live`], for `smtpguard sessions`
//! and the summary line), and the [`Slot`] guard that gives all of it back
//! (and the global permit) on every way out of a session task.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use ipnet::IpNet;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::counters::Metrics;
use crate::smtp::TlsInfo;

/// Where a session is, as `smtpguard sessions` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SessionState {
    /// Greeted, no HELO/EHLO yet.
    #[default]
    Greeting,
    /// Reading commands after HELO/EHLO.
    Command,
    /// Reading the message after `354`.
    Data,
    /// In the TLS handshake after STARTTLS.
    TlsHandshake,
    /// Waiting for the hand-off (MAIL, RCPT or the message at the MTA or
    /// the spool).
    Handoff,
    /// Saying goodbye.
    Closing,
}

impl SessionState {
    /// `greeting`, `command`, `data`, `tls_handshake`, `handoff`, `closing`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Greeting => "greeting",
            SessionState::Command => "command",
            SessionState::Data => "data",
            SessionState::TlsHandshake => "tls_handshake",
            SessionState::Handoff => "handoff",
            SessionState::Closing => "closing",
        }
    }
}

/// What one session is doing, kept current by its driver and read by
/// `smtpguard sessions` and the session summary line.
#[derive(Debug)]
pub struct Live {
    /// The session id (as in logs and `Received:` headers).
    pub session_id: String,
    /// The client's address and port (normalised).
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// When the connection was accepted.
    pub since: SystemTime,
    /// Bytes read from the client (after TLS decryption).
    pub bytes_in: AtomicU64,
    /// Bytes of replies written to the client (before TLS encryption).
    pub bytes_out: AtomicU64,
    detail: Mutex<LiveDetail>,
}

/// The parts of [`Live`] that change together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveDetail {
    /// Where the session is.
    pub state: SessionState,
    /// The HELO/EHLO name, once given.
    pub helo: Option<String>,
    /// TLS version and cipher, after STARTTLS.
    pub tls: Option<TlsInfo>,
    /// The upstream connection (`local -> remote`), while one is open.
    pub upstream: Option<String>,
    /// The reverse path of the last message accepted, as written
    /// (`<a@example.com>`, `<>`).
    pub from: Option<String>,
    /// Recipients of the messages accepted.
    pub rcpts: u64,
    /// Messages accepted (2xx after DATA).
    pub msgs: u64,
    /// Error replies (4xx and 5xx) sent.
    pub errors: u64,
    /// RCPTs refused as relay attempts (`550 5.7.1 Relay access denied`),
    /// a violation towards an automatic ban.
    pub relay_denied: u64,
}

impl Live {
    /// A session from `peer` to `local` accepted now.
    pub fn new(session_id: String, peer: SocketAddr, local: SocketAddr) -> Live {
        Live {
            session_id,
            peer,
            local,
            since: SystemTime::now(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            detail: Mutex::new(LiveDetail::default()),
        }
    }

    /// Changes the detail under its lock.
    pub fn update(&self, f: impl FnOnce(&mut LiveDetail)) {
        f(&mut self.detail.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// A copy of the detail.
    pub fn detail(&self) -> LiveDetail {
        self.detail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Default for Live {
    /// An anonymous session (for drivers run without a registry, in tests).
    fn default() -> Live {
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        Live::new(String::new(), any, any)
    }
}

/// Open sessions: who they are (for kicks and the per-client cap).
pub(super) struct Sessions {
    /// Makes session ids unique across restarts: the start time in hex.
    id_prefix: String,
    /// Next session number.
    next_id: AtomicU64,
    /// The open sessions and per-client counts, changed together.
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Session number → the session.
    open: HashMap<u64, Entry>,
    /// Open sessions per client group ([`client_group`]; entries never
    /// hold 0).
    per_client: HashMap<IpNet, usize>,
}

/// What `max_connections_per_client` counts as one client: an IPv4 address
/// (a /32), or the IPv6 prefix of `ipv6_prefix` bits (1–128) holding the
/// address, since one IPv6 host usually holds a whole /64.
pub(super) fn client_group(client: IpAddr, ipv6_prefix: u8) -> IpNet {
    let bits = match client {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => ipv6_prefix.clamp(1, 128),
    };
    IpNet::new(client, bits)
        .expect("prefix length within the family")
        .trunc()
}

/// A client group as replies and logs show it: the address for a single
/// address, the prefix otherwise.
pub(super) fn display_group(group: IpNet) -> String {
    if group.prefix_len() == group.max_prefix_len() {
        group.addr().to_string()
    } else {
        group.to_string()
    }
}

impl Sessions {
    pub(super) fn new() -> Sessions {
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Sessions {
            id_prefix: format!("{started:X}"),
            next_id: AtomicU64::new(1),
            inner: Mutex::new(Registry::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session from `peer` (normalised) to `local` unless
    /// that would exceed `cap` sessions for its `group` ([`client_group`]).
    pub(super) fn register(
        self: &Arc<Self>,
        peer: SocketAddr,
        local: SocketAddr,
        group: IpNet,
        cap: Option<NonZeroUsize>,
        permit: Option<OwnedSemaphorePermit>,
        metrics: &Arc<Metrics>,
    ) -> Option<Slot> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kick = CancellationToken::new();
        let operator_kick = CancellationToken::new();
        let session_id = format!("{}{id:06X}", self.id_prefix);
        let live = Arc::new(Live::new(session_id.clone(), peer, local));
        {
            let mut reg = self.lock();
            let n = reg.per_client.entry(group).or_insert(0);
            if cap.is_some_and(|cap| *n >= cap.get()) {
                if *n == 0 {
                    reg.per_client.remove(&group);
                }
                return None;
            }
            *n += 1;
            reg.open.insert(
                id,
                Entry {
                    kick: kick.clone(),
                    operator_kick: operator_kick.clone(),
                    live: Arc::clone(&live),
                },
            );
        }
        metrics.session_opened();
        Some(Slot {
            sessions: Arc::clone(self),
            metrics: Arc::clone(metrics),
            id,
            session_id,
            group,
            kick,
            operator_kick,
            live,
            _permit: permit,
        })
    }

    /// Cancels the kick token of every open session whose client matches
    /// `pred`; returns how many were not kicked before.
    pub(super) fn kick(&self, pred: impl Fn(IpAddr) -> bool) -> usize {
        let reg = self.lock();
        let mut n = 0;
        for e in reg.open.values() {
            if pred(e.live.peer.ip()) && !e.kick.is_cancelled() {
                e.kick.cancel();
                n += 1;
            }
        }
        n
    }

    /// Ends every open session `pred` picks with the operator's `421
    /// 4.7.0`; returns those it told (not those already told).
    pub(super) fn kick_by_operator(&self, pred: impl Fn(&Live) -> bool) -> Vec<Arc<Live>> {
        let reg = self.lock();
        let mut kicked: Vec<Arc<Live>> = reg
            .open
            .values()
            .filter(|e| pred(&e.live) && !e.operator_kick.is_cancelled())
            .map(|e| {
                e.operator_kick.cancel();
                Arc::clone(&e.live)
            })
            .collect();
        kicked.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        kicked
    }

    /// Every open session, oldest first.
    pub(super) fn list(&self) -> Vec<Arc<Live>> {
        let reg = self.lock();
        let mut open: Vec<(u64, Arc<Live>)> = reg
            .open
            .iter()
            .map(|(id, e)| (*id, Arc::clone(&e.live)))
            .collect();
        open.sort_by_key(|(id, _)| *id);
        open.into_iter().map(|(_, live)| live).collect()
    }

    /// Open sessions per client address.
    pub(super) fn open_by_client(&self) -> BTreeMap<IpAddr, usize> {
        let reg = self.lock();
        let mut by_client = BTreeMap::new();
        for e in reg.open.values() {
            *by_client.entry(e.live.peer.ip()).or_insert(0) += 1;
        }
        by_client
    }

    fn unregister(&self, id: u64, group: IpNet) {
        let mut reg = self.lock();
        reg.open.remove(&id);
        if let Some(n) = reg.per_client.get_mut(&group) {
            *n -= 1;
            if *n == 0 {
                reg.per_client.remove(&group);
            }
        }
    }
}

/// One open session in the registry.
struct Entry {
    /// Cancelled when its address is newly denied (`421 4.7.1`).
    kick: CancellationToken,
    /// Cancelled by `smtpguard kick` (`421 4.7.0`).
    operator_kick: CancellationToken,
    /// What it is doing.
    live: Arc<Live>,
}

/// A session's hold on the server: the global permit, its registry entry
/// (per-client count, kick token) and the open-connections gauge. All are
/// released when it is dropped, however the session task ends.
pub(super) struct Slot {
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    id: u64,
    /// The id in logs, queue ids and `Received:` headers.
    pub(super) session_id: String,
    /// The [`client_group`] whose count this slot holds.
    group: IpNet,
    /// Cancelled by [`Sessions::kick`].
    pub(super) kick: CancellationToken,
    /// Cancelled by [`Sessions::kick_by_operator`].
    pub(super) operator_kick: CancellationToken,
    /// What the session is doing, kept current by its driver.
    pub(super) live: Arc<Live>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.sessions.unregister(self.id, self.group);
        self.metrics.session_closed();
    }
}

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::front_door::ServerHandle;

    /// IPv6 clients count per prefix: two addresses of one /64 share the
    /// cap, another /64 has its own; IPv4 counts per address.
    #[test]
    fn ipv6_clients_share_the_cap_per_prefix() {
        let sessions = Arc::new(Sessions::new());
        let metrics = Arc::new(Metrics::default());
        let cap = NonZeroUsize::new(2);
        let take = |ip: &str, bits| {
            let ip: IpAddr = ip.parse().unwrap();
            let peer = SocketAddr::new(ip, 40000);
            let local = SocketAddr::new(ip, 25);
            sessions.register(peer, local, client_group(ip, bits), cap, None, &metrics)
        };
        let _a = take("2001:db8:1:1::1", 64).unwrap();
        let b = take("2001:db8:1:1::2", 64).unwrap();
        assert!(
            take("2001:db8:1:1:ffff::3", 64).is_none(),
            "third in the /64"
        );
        let _c = take("2001:db8:1:2::1", 64).expect("another /64");
        drop(b);
        let _d = take("2001:db8:1:1::4", 64).expect("a slot of the /64 freed");
        assert!(take("2001:db8:1:1::5", 64).is_none());
        let _f = take("192.0.2.1", 64).unwrap();
        let _g = take("192.0.2.2", 64).expect("IPv4 counts per address");
        assert_eq!(
            display_group(client_group("2001:db8:1:1::9".parse().unwrap(), 64)),
            "2001:db8:1:1::/64"
        );
        assert_eq!(
            display_group(client_group("192.0.2.9".parse().unwrap(), 64)),
            "192.0.2.9"
        );
    }

    /// The registry: per-address cap, kicks, and release of everything
    /// (permit, count, gauge) when a slot is dropped, also by a panic.
    #[test]
    fn slots_are_released_on_every_exit() {
        let sessions = Arc::new(Sessions::new());
        let metrics = Arc::new(Metrics::default());
        let slots = Arc::new(Semaphore::new(2));
        let a = IpAddr::from([192, 0, 2, 1]);
        let b = IpAddr::from([192, 0, 2, 2]);
        let cap = NonZeroUsize::new(1);
        let local = SocketAddr::from(([192, 0, 2, 100], 25));
        let take = |ip| {
            let permit = Arc::clone(&slots).try_acquire_owned().ok()?;
            sessions.register(
                SocketAddr::new(ip, 40000),
                local,
                client_group(ip, 64),
                cap,
                Some(permit),
                &metrics,
            )
        };
        let first = take(a).unwrap();
        assert!(take(a).is_none(), "per-address cap");
        assert_eq!(
            slots.available_permits(),
            1,
            "the refused one took no permit"
        );
        let second = take(b).unwrap();
        assert!(take(b).is_none() && take(a).is_none());
        assert_ne!(first.session_id, second.session_id);
        assert_eq!(metrics.open_connections(), 2);

        let handle = ServerHandle {
            sessions: Arc::clone(&sessions),
            metrics: Arc::clone(&metrics),
            tls: Arc::default(),
            dnsbl: None,
        };
        assert_eq!(handle.kick(|ip| ip == a), 1);
        assert!(first.kick.is_cancelled() && !second.kick.is_cancelled());
        assert_eq!(handle.kick(|ip| ip == a), 0, "already kicked");
        let by_operator = sessions.kick_by_operator(|l| l.peer.ip() == b);
        assert_eq!(by_operator.len(), 1);
        assert_eq!(by_operator[0].session_id, second.session_id);
        assert!(second.operator_kick.is_cancelled() && !first.operator_kick.is_cancelled());
        assert!(sessions.kick_by_operator(|l| l.peer.ip() == b).is_empty());
        assert_eq!(sessions.list().len(), 2);

        let panicked = std::panic::catch_unwind(AssertUnwindSafe(move || {
            let _held = second;
            panic!("session bug");
        }));
        assert!(panicked.is_err());
        drop(first);
        assert_eq!(metrics.open_connections(), 0);
        assert_eq!(slots.available_permits(), 2);
        assert!(handle.open_by_client().is_empty());
        assert!(sessions.lock().open.is_empty());
    }
}
