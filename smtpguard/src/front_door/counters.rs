//! The front door's counters: why clients were refused or cut off
//! ([`Rejection`]), the lock-free [`Metrics`] the accept loop and the
//! connection driver update, and the [`MetricsSnapshot`] that `stats`,
//! `/metrics` and the log line read.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;

/// At most this many client addresses get their own accept counters in
/// [`Metrics`]; later ones are only counted in `clients_untracked`.
pub const MAX_TRACKED_CLIENTS: usize = 4096;

/// Why the front door refused or cut off a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// On accept: the address is on the deny list (`554 5.7.1`).
    DenyList,
    /// On accept: not on the permit list in deny-all mode (`554 5.7.1`).
    NotPermitted,
    /// On accept: `max_connections` reached (`421 4.7.0`).
    ConnectionCap,
    /// On accept: `max_connections_per_client` reached (`421 4.7.0`).
    PerClientCap,
    /// On accept: out of file descriptors, or every session they allow is
    /// taken (`421 4.3.2`).
    FileDescriptors,
    /// No complete line within `idle_timeout` (`421 4.4.2`).
    IdleTimeout,
    /// `max_session_duration` reached (`421 4.4.2`).
    SessionTimeout,
    /// A command before STARTTLS with TLS required (`530 5.7.0`; the
    /// session goes on).
    TlsRequired,
    /// The session's error cap (`421 4.7.0`).
    TooManyErrors,
    /// An HTTP request on the SMTP port (`421 4.7.0`).
    HttpRequest,
    /// The address was newly denied while the session was open
    /// (`close_denied_sessions`; `421 4.7.1`).
    Denied,
    /// The operator closed the session (`smtpguard kick`; `421 4.7.0`).
    Kicked,
}

impl Rejection {
    /// Every reason, in the order of [`Metrics`]' counters.
    pub const ALL: [Rejection; 12] = [
        Rejection::DenyList,
        Rejection::NotPermitted,
        Rejection::ConnectionCap,
        Rejection::PerClientCap,
        Rejection::FileDescriptors,
        Rejection::IdleTimeout,
        Rejection::SessionTimeout,
        Rejection::TlsRequired,
        Rejection::TooManyErrors,
        Rejection::HttpRequest,
        Rejection::Denied,
        Rejection::Kicked,
    ];

    /// When it happens, which decides the counter's name.
    pub fn stage(self) -> Stage {
        match self {
            Rejection::DenyList
            | Rejection::NotPermitted
            | Rejection::ConnectionCap
            | Rejection::PerClientCap
            | Rejection::FileDescriptors => Stage::Refused,
            Rejection::IdleTimeout
            | Rejection::SessionTimeout
            | Rejection::TooManyErrors
            | Rejection::HttpRequest
            | Rejection::Denied
            | Rejection::Kicked => Stage::Closed,
            Rejection::TlsRequired => Stage::Replied,
        }
    }

    /// The counter's name in `stats` and in [`MetricsSnapshot::rejected`]:
    /// the stage, then the reason (`refused_deny_list`,
    /// `closed_idle_timeout`, `replied_tls_required`).
    pub fn counter_name(self) -> &'static str {
        match self {
            Rejection::DenyList => "refused_deny_list",
            Rejection::NotPermitted => "refused_not_permitted",
            Rejection::ConnectionCap => "refused_connection_cap",
            Rejection::PerClientCap => "refused_per_client_cap",
            Rejection::FileDescriptors => "refused_file_descriptors",
            Rejection::IdleTimeout => "closed_idle_timeout",
            Rejection::SessionTimeout => "closed_session_timeout",
            Rejection::TlsRequired => "replied_tls_required",
            Rejection::TooManyErrors => "closed_too_many_errors",
            Rejection::HttpRequest => "closed_http_request",
            Rejection::Denied => "closed_denied",
            Rejection::Kicked => "closed_kicked",
        }
    }

    /// The reason in logs (`reason=`) and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::DenyList => "deny_list",
            Rejection::NotPermitted => "not_permitted",
            Rejection::ConnectionCap => "connection_cap",
            Rejection::PerClientCap => "per_client_cap",
            Rejection::FileDescriptors => "file_descriptors",
            Rejection::IdleTimeout => "idle_timeout",
            Rejection::SessionTimeout => "session_timeout",
            Rejection::TlsRequired => "tls_required",
            Rejection::TooManyErrors => "too_many_errors",
            Rejection::HttpRequest => "http_request",
            Rejection::Denied => "denied",
            Rejection::Kicked => "kicked",
        }
    }
}

/// When a [`Rejection`] happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// On accept, before any greeting: the client got one reply and was
    /// closed.
    Refused,
    /// In a session: the client got `421` and was closed.
    Closed,
    /// A command was refused; the session goes on.
    Replied,
}

/// The front door's counters, updated lock-free (except the per-address
/// map). Read them with [`Metrics::snapshot`].
#[derive(Debug, Default)]
pub struct Metrics {
    /// TCP connections accepted at the socket (whatever happened next).
    accepted_at_socket: AtomicU64,
    /// Sessions whose `220` greeting was written.
    greeted: AtomicU64,
    /// Sessions open now (the gauge; 0 once every client has left).
    open: AtomicUsize,
    /// Per [`Rejection`], indexed like [`Rejection::ALL`].
    rejected: [AtomicU64; Rejection::ALL.len()],
    /// Monitor mode: connections the policy would have denied.
    would_deny: AtomicU64,
    tls_ok: AtomicU64,
    tls_failed: AtomicU64,
    messages_accepted: AtomicU64,
    /// Hand-off calls answered with the hand-off's own failure
    /// (`451 4.3.0` spool/local error, `451 4.4.1` upstream unreachable).
    handoff_failures: AtomicU64,
    /// Session tasks that panicked (their slots were released).
    panics: AtomicU64,
    /// Accept counters per client address, at most [`MAX_TRACKED_CLIENTS`].
    clients: Mutex<HashMap<IpAddr, ClientCounts>>,
    /// Accepts from addresses that did not fit in `clients`.
    clients_untracked: AtomicU64,
}

/// Per-address counters in [`MetricsSnapshot::clients`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClientCounts {
    /// TCP connections accepted from the address.
    pub accepted: u64,
    /// Of those, refused on accept (access lists, caps).
    pub rejected: u64,
}

/// A point-in-time copy of [`Metrics`], for the status command, the
/// statistics log line and the metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// TCP connections accepted at the socket, whatever happened next:
    /// refused on accept, greeted, or gone before the greeting.
    pub accepted_at_socket: u64,
    /// Sessions whose `220` greeting was written.
    pub greeted: u64,
    /// Sessions open now.
    pub open_connections: usize,
    /// Refusals, cut-offs and refused commands by
    /// [`Rejection::counter_name`]; every reason present.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Monitor mode: connections let in that the policy would deny.
    pub would_deny: u64,
    /// STARTTLS handshakes completed.
    pub tls_handshakes_ok: u64,
    /// STARTTLS handshakes failed or timed out (including clients that
    /// reset the connection mid-handshake).
    pub tls_handshakes_failed: u64,
    /// Messages the hand-off accepted (2xx sent to the client).
    pub messages_accepted: u64,
    /// Hand-off calls that failed on our side (`451 4.3.0` / `451 4.4.1`).
    pub handoff_failures: u64,
    /// Session tasks that panicked.
    pub session_panics: u64,
    /// Accept counters by (normalised) client address.
    pub clients: BTreeMap<IpAddr, ClientCounts>,
    /// Accepts from addresses beyond [`MAX_TRACKED_CLIENTS`].
    pub clients_untracked: u64,
}

impl MetricsSnapshot {
    /// The count for one reason.
    pub fn rejected(&self, reason: Rejection) -> u64 {
        self.rejected
            .get(reason.counter_name())
            .copied()
            .unwrap_or(0)
    }
}

fn relaxed_add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Sessions open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            accepted_at_socket: get(&self.accepted_at_socket),
            greeted: get(&self.greeted),
            open_connections: self.open_connections(),
            rejected: Rejection::ALL
                .iter()
                .map(|r| (r.counter_name(), get(&self.rejected[*r as usize])))
                .collect(),
            would_deny: get(&self.would_deny),
            tls_handshakes_ok: get(&self.tls_ok),
            tls_handshakes_failed: get(&self.tls_failed),
            messages_accepted: get(&self.messages_accepted),
            handoff_failures: get(&self.handoff_failures),
            session_panics: get(&self.panics),
            clients: self
                .lock_clients()
                .iter()
                .map(|(ip, c)| (*ip, *c))
                .collect(),
            clients_untracked: get(&self.clients_untracked),
        }
    }

    pub(super) fn session_opened(&self) {
        self.open.fetch_add(1, Ordering::SeqCst);
    }
    pub(super) fn session_closed(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
    pub(super) fn greeted(&self) {
        relaxed_add(&self.greeted);
    }
    pub(super) fn session_panicked(&self) {
        relaxed_add(&self.panics);
    }
    pub(super) fn would_deny(&self) {
        relaxed_add(&self.would_deny);
    }
    pub(crate) fn reject(&self, reason: Rejection) {
        relaxed_add(&self.rejected[reason as usize]);
    }
    pub(crate) fn tls_handshake(&self, ok: bool) {
        relaxed_add(if ok { &self.tls_ok } else { &self.tls_failed });
    }
    pub(crate) fn message_accepted(&self) {
        relaxed_add(&self.messages_accepted);
    }
    pub(crate) fn handoff_failure(&self) {
        relaxed_add(&self.handoff_failures);
    }

    fn lock_clients(&self) -> MutexGuard<'_, HashMap<IpAddr, ClientCounts>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn client(&self, ip: IpAddr, update: impl FnOnce(&mut ClientCounts)) {
        let mut clients = self.lock_clients();
        let len = clients.len();
        match clients.get_mut(&ip) {
            Some(c) => update(c),
            None if len < MAX_TRACKED_CLIENTS => update(clients.entry(ip).or_default()),
            None => relaxed_add(&self.clients_untracked),
        }
    }

    pub(super) fn accepted(&self, ip: IpAddr) {
        relaxed_add(&self.accepted_at_socket);
        self.client(ip, |c| c.accepted += 1);
    }

    pub(super) fn rejected_on_accept(&self, ip: IpAddr, reason: Rejection) {
        self.reject(reason);
        let mut clients = self.lock_clients();
        if let Some(c) = clients.get_mut(&ip) {
            c.rejected += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn rejection_names_and_counters_line_up() {
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        let m = Metrics::default();
        m.reject(Rejection::Kicked);
        m.accepted(IpAddr::from(Ipv4Addr::LOCALHOST));
        m.rejected_on_accept(IpAddr::from(Ipv4Addr::LOCALHOST), Rejection::DenyList);
        let snap = m.snapshot();
        assert_eq!(snap.rejected.len(), Rejection::ALL.len());
        assert_eq!(snap.rejected(Rejection::Kicked), 1);
        let json = serde_json::to_value(&snap).unwrap();
        assert_eq!(json["rejected"]["refused_deny_list"], 1);
        assert_eq!(json["rejected"]["closed_kicked"], 1);
        assert_eq!(json["clients"]["127.0.0.1"]["accepted"], 1);
        assert_eq!(json["clients"]["127.0.0.1"]["rejected"], 1);
    }

    #[test]
    fn per_address_counters_are_bounded() {
        let m = Metrics::default();
        for i in 0..MAX_TRACKED_CLIENTS as u32 + 10 {
            m.accepted(IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i)));
        }
        let snap = m.snapshot();
        assert_eq!(snap.clients.len(), MAX_TRACKED_CLIENTS);
        assert_eq!(snap.clients_untracked, 10);
        assert_eq!(snap.accepted_at_socket, MAX_TRACKED_CLIENTS as u64 + 10);
    }
}
