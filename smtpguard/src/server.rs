//! The SMTP front door's server: listeners, the checks made on accept,
//! the connection caps, one task per session, kicks and shutdown.
//!
//! On each accepted connection, before any byte is sent (connection control
//! comes before relay rules):
//!
//! 1. the client address (IPv4-mapped IPv6 normalised to IPv4) is checked
//!    against the access lists ([`AccessCheck`]); denied:
//!    `554 5.7.1 <ip> Access denied`, then close;
//! 2. the simultaneous-connection cap (`max_connections`) and the optional
//!    per-address cap (`max_connections_per_client`); over either:
//!    `421 4.7.0 <host> Error: too many connections...`, then close;
//! 3. only then a session task starts ([`crate::smtp::conn`]) and sends the
//!    `220` greeting.
//!
//! A session holds a slot (a semaphore permit plus its registry entry) that
//! is released by a guard on every way out of the task, panics included; a
//! rejected connection never takes one.
//!
//! The daemon builds a [`ServerContext`], keeps its [`ServerHandle`] (kicks,
//! metrics), [`bind`]s the listeners and awaits [`run`] with a shutdown
//! token.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{ServerConfig, TlsConfig, TlsMode};
use crate::smtp::conn::{self, ConnSettings, Connection, HandoffFactory, Stop};
use crate::smtp::handoff::ClientInfo;
use crate::smtp::{EnhancedCode, Reply, SessionParams};

/// Pending connections the kernel queues per listener (listen(2) backlog).
pub const LISTEN_BACKLOG: u32 = 1024;

/// At most this many client addresses get their own accept counters in
/// [`Metrics`]; later ones are only counted in `clients_untracked`.
pub const MAX_TRACKED_CLIENTS: usize = 4096;

/// First pause after a failed accept (e.g. out of file descriptors);
/// doubles up to [`ACCEPT_BACKOFF_MAX`] while accepts keep failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(2);

// ----- access check ---------------------------------------------------------

/// The daemon's access lists, as the front door asks them: one call per
/// accepted connection, before anything is sent. Must be fast and must not
/// block (it runs on the accept loop).
pub trait AccessCheck: Send + Sync {
    /// The verdict for `client` (already normalised: never IPv4-mapped IPv6).
    fn check(&self, client: IpAddr) -> Access;
}

/// The verdict of an [`AccessCheck`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Let the client in.
    Allow,
    /// Refuse with `554 5.7.1 <ip> Access denied` and close.
    Deny {
        /// Which list decided.
        reason: DenyReason,
        /// The matching list entry (e.g. `192.0.2.0/24`), for the log.
        entry: Option<String>,
    },
    /// Monitor mode: the policy would deny; the client is let in and the
    /// verdict logged and counted (`would_deny`).
    WouldDeny {
        /// Which list would decide.
        reason: DenyReason,
        /// The matching list entry, for the log.
        entry: Option<String>,
    },
}

/// Why the access lists deny a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The address is on the deny list.
    DenyList,
    /// Deny-all-except-permit mode and the address is not on the permit list.
    NotPermitted,
}

impl From<DenyReason> for Rejection {
    fn from(r: DenyReason) -> Rejection {
        match r {
            DenyReason::DenyList => Rejection::DenyList,
            DenyReason::NotPermitted => Rejection::NotPermitted,
        }
    }
}

/// Lets everyone in (enforcement off, tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl AccessCheck for AllowAll {
    fn check(&self, _: IpAddr) -> Access {
        Access::Allow
    }
}

impl<F> AccessCheck for F
where
    F: Fn(IpAddr) -> Access + Send + Sync,
{
    fn check(&self, client: IpAddr) -> Access {
        self(client)
    }
}

// ----- settings -------------------------------------------------------------

/// The server's limits and timeouts.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Simultaneous sessions; `None` = no limit.
    pub max_connections: Option<NonZeroUsize>,
    /// Simultaneous sessions per client address; `None` = no limit.
    pub max_connections_per_client: Option<NonZeroUsize>,
    /// After the shutdown signal, how long sessions may go on before they
    /// get `421 4.3.2` and are closed.
    pub shutdown_grace: Duration,
    /// Per-connection limits and the session parameters.
    pub conn: ConnSettings,
}

impl Settings {
    /// From `[server]` and `[tls]`. Writes get `idle_timeout` as their
    /// deadline too.
    pub fn from_config(server: &ServerConfig, tls: &TlsConfig) -> Settings {
        Settings {
            max_connections: server.max_connections,
            max_connections_per_client: server.max_connections_per_client,
            shutdown_grace: server.shutdown_grace,
            conn: ConnSettings {
                session: SessionParams {
                    hostname: server.hostname.clone(),
                    tls_mode: tls.mode,
                    tls_available: false,
                    max_message_size: usize::try_from(server.max_message_size_bytes)
                        .unwrap_or(usize::MAX),
                    max_recipients: usize::try_from(server.max_recipients).unwrap_or(usize::MAX),
                    max_errors: server.max_errors,
                    bare_lf: server.bare_lf,
                },
                idle_timeout: server.idle_timeout,
                handshake_timeout: tls.handshake_timeout,
                max_session_duration: server.max_session_duration,
                write_timeout: server.idle_timeout,
            },
        }
    }
}

// ----- listeners ------------------------------------------------------------

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listening socket could not be created, bound or put to listen.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address from `server.listen`.
        addr: SocketAddr,
        /// Why (e.g. "Address already in use").
        #[source]
        source: io::Error,
    },
}

/// Creates one listening socket per address, with `SO_REUSEADDR` (restart
/// while old connections linger in TIME_WAIT) and, on IPv6 sockets,
/// `IPV6_V6ONLY` (so `0.0.0.0:25` and `[::]:25` can both be bound). Must be
/// called within a tokio runtime.
///
/// # Errors
///
/// [`ServerError::Listen`] naming the first address that failed.
pub fn bind(listen: &[SocketAddr]) -> Result<Vec<TcpListener>, ServerError> {
    listen
        .iter()
        .map(|&addr| bind_one(addr).map_err(|source| ServerError::Listen { addr, source }))
        .collect()
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let socket = TcpSocket::new_v6()?;
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
            socket
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The address with an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, as
/// dual-stack sockets report IPv4 clients) turned into plain IPv4.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

// ----- metrics ----------------------------------------------------------------

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
    /// The operator denied the address while the session was open
    /// (`421 4.7.1`).
    Kicked,
}

impl Rejection {
    /// Every reason, in the order of [`Metrics`]' counters.
    pub const ALL: [Rejection; 10] = [
        Rejection::DenyList,
        Rejection::NotPermitted,
        Rejection::ConnectionCap,
        Rejection::PerClientCap,
        Rejection::IdleTimeout,
        Rejection::SessionTimeout,
        Rejection::TlsRequired,
        Rejection::TooManyErrors,
        Rejection::HttpRequest,
        Rejection::Kicked,
    ];

    /// The name in logs (`reason=`) and in [`MetricsSnapshot::rejected`].
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::DenyList => "deny_list",
            Rejection::NotPermitted => "not_permitted",
            Rejection::ConnectionCap => "connection_cap",
            Rejection::PerClientCap => "per_client_cap",
            Rejection::IdleTimeout => "idle_timeout",
            Rejection::SessionTimeout => "session_timeout",
            Rejection::TlsRequired => "tls_required",
            Rejection::TooManyErrors => "too_many_errors",
            Rejection::HttpRequest => "http_request",
            Rejection::Kicked => "kicked",
        }
    }
}

/// The front door's counters, updated lock-free (except the per-address
/// map). Read them with [`Metrics::snapshot`].
#[derive(Debug, Default)]
pub struct Metrics {
    /// TCP connections accepted (whatever happened next).
    connections_accepted: AtomicU64,
    /// Connections that passed the checks and got a session.
    sessions_started: AtomicU64,
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
    /// TCP connections accepted (whatever happened next).
    pub connections_accepted: u64,
    /// Connections that passed the checks and were greeted.
    pub sessions_started: u64,
    /// Sessions open now.
    pub open_connections: usize,
    /// Rejections by reason ([`Rejection::as_str`]); every reason present.
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
        self.rejected.get(reason.as_str()).copied().unwrap_or(0)
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
            connections_accepted: get(&self.connections_accepted),
            sessions_started: get(&self.sessions_started),
            open_connections: self.open_connections(),
            rejected: Rejection::ALL
                .iter()
                .map(|r| (r.as_str(), get(&self.rejected[*r as usize])))
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

    fn accepted(&self, ip: IpAddr) {
        relaxed_add(&self.connections_accepted);
        self.client(ip, |c| c.accepted += 1);
    }

    fn rejected_on_accept(&self, ip: IpAddr, reason: Rejection) {
        self.reject(reason);
        let mut clients = self.lock_clients();
        if let Some(c) = clients.get_mut(&ip) {
            c.rejected += 1;
        }
    }
}

// ----- sessions registry ------------------------------------------------------

/// Open sessions: who they are (for kicks and the per-address cap).
struct Sessions {
    /// Makes session ids unique across restarts: the start time in hex.
    id_prefix: String,
    /// Next session number.
    next_id: AtomicU64,
    /// The open sessions and per-address counts, changed together.
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Session number → client address and its kick token.
    open: HashMap<u64, (IpAddr, CancellationToken)>,
    /// Open sessions per client address (entries never hold 0).
    per_client: HashMap<IpAddr, usize>,
}

impl Sessions {
    fn new() -> Sessions {
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

    /// Registers a session from `client` unless that would exceed `cap`
    /// sessions for the address.
    fn register(
        self: &Arc<Self>,
        client: IpAddr,
        cap: Option<NonZeroUsize>,
        permit: Option<OwnedSemaphorePermit>,
        metrics: &Arc<Metrics>,
    ) -> Option<Slot> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kick = CancellationToken::new();
        {
            let mut reg = self.lock();
            let n = reg.per_client.entry(client).or_insert(0);
            if cap.is_some_and(|cap| *n >= cap.get()) {
                if *n == 0 {
                    reg.per_client.remove(&client);
                }
                return None;
            }
            *n += 1;
            reg.open.insert(id, (client, kick.clone()));
        }
        metrics.open.fetch_add(1, Ordering::SeqCst);
        Some(Slot {
            sessions: Arc::clone(self),
            metrics: Arc::clone(metrics),
            id,
            session_id: format!("{}{id:06X}", self.id_prefix),
            client,
            kick,
            _permit: permit,
        })
    }

    fn unregister(&self, id: u64, client: IpAddr) {
        let mut reg = self.lock();
        reg.open.remove(&id);
        if let Some(n) = reg.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                reg.per_client.remove(&client);
            }
        }
    }
}

/// A session's hold on the server: the global permit, its registry entry
/// (per-address count, kick token) and the open-connections gauge. All are
/// released when it is dropped, however the session task ends.
struct Slot {
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    id: u64,
    session_id: String,
    client: IpAddr,
    kick: CancellationToken,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.sessions.unregister(self.id, self.client);
        self.metrics.open.fetch_sub(1, Ordering::SeqCst);
    }
}

// ----- server -------------------------------------------------------------------

/// Everything [`run`] needs, built once by the daemon.
pub struct ServerContext<H> {
    shared: Arc<Shared<H>>,
}

/// State shared by the accept loops and every session task.
struct Shared<H> {
    /// Limits and timeouts (from `[server]` and `[tls]`).
    settings: Settings,
    /// STARTTLS; `None` when TLS is off or no certificate is loaded (then
    /// STARTTLS is not advertised).
    tls: Arc<std::sync::RwLock<Option<TlsAcceptor>>>,
    /// The access lists, asked on every accept before anything is sent.
    access: Arc<dyn AccessCheck>,
    /// Makes each session's hand-off (Maildir spool or upstream MTA).
    handoffs: H,
    /// The global cap: a session holds one permit for its life (inside its
    /// [`Slot`]); `None` when `max_connections` is unlimited.
    slots: Option<Arc<Semaphore>>,
    /// Open sessions, for kicks and the per-address cap; shared with
    /// [`ServerHandle`].
    sessions: Arc<Sessions>,
    /// Counters; shared with [`ServerHandle`].
    metrics: Arc<Metrics>,
    /// Cancelled when the shutdown grace is over: the remaining sessions
    /// get `421 4.3.2` and close.
    stop_sessions: CancellationToken,
}

impl<H: HandoffFactory> ServerContext<H> {
    /// `tls`: the rustls configuration from [`crate::tls::load`] when
    /// `tls.mode` is not off (ignored when it is). `access`: the daemon's
    /// access lists. `handoffs`: usually
    /// [`DeliveryHandoff`](crate::smtp::conn::DeliveryHandoff).
    pub fn new(
        settings: Settings,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
        access: Arc<dyn AccessCheck>,
        handoffs: H,
    ) -> ServerContext<H> {
        let tls_mode = settings.conn.session.tls_mode;
        let tls = match tls_mode {
            TlsMode::Off => None,
            TlsMode::Optional | TlsMode::Required => tls.map(TlsAcceptor::from),
        };
        if tls_mode == TlsMode::Required && tls.is_none() {
            tracing::warn!("TLS is required but no certificate is loaded: no mail can be sent");
        }
        ServerContext {
            shared: Arc::new(Shared {
                slots: settings
                    .max_connections
                    .map(|n| Arc::new(Semaphore::new(n.get()))),
                settings,
                tls: Arc::new(std::sync::RwLock::new(tls)),
                access,
                handoffs,
                sessions: Arc::new(Sessions::new()),
                metrics: Arc::new(Metrics::default()),
                stop_sessions: CancellationToken::new(),
            }),
        }
    }

    /// A handle for the daemon: kicks and metrics, usable while [`run`]
    /// runs and after.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            sessions: Arc::clone(&self.shared.sessions),
            metrics: Arc::clone(&self.shared.metrics),
            tls: Arc::clone(&self.shared.tls),
        }
    }
}

/// The daemon's handle on a running server.
#[derive(Clone)]
pub struct ServerHandle {
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    /// The STARTTLS acceptor new sessions get; swapped by a reload.
    tls: Arc<std::sync::RwLock<Option<TlsAcceptor>>>,
}

impl ServerHandle {
    /// Ends every open session whose client address matches `pred`
    /// (normalised addresses) with `421 4.7.1 ... your address was
    /// denied`; for when an address is newly denied and
    /// `close_denied_sessions` is on. Returns how many sessions were told
    /// (each as soon as it is not in the middle of a hand-off).
    pub fn kick(&self, pred: impl Fn(IpAddr) -> bool) -> usize {
        let reg = self.sessions.lock();
        let mut n = 0;
        for (client, kick) in reg.open.values() {
            if pred(*client) && !kick.is_cancelled() {
                kick.cancel();
                n += 1;
            }
        }
        n
    }

    /// Replaces the certificate and key for sessions that start from now
    /// on (a reload); open sessions keep theirs. `None` stops offering
    /// STARTTLS.
    pub fn set_tls(&self, config: Option<Arc<tokio_rustls::rustls::ServerConfig>>) {
        *self.tls.write().expect("tls lock") = config.map(TlsAcceptor::from);
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Open sessions per client address.
    pub fn open_by_client(&self) -> BTreeMap<IpAddr, usize> {
        let reg = self.sessions.lock();
        reg.per_client.iter().map(|(ip, n)| (*ip, *n)).collect()
    }
}

/// Serves SMTP on `listeners` until `shutdown` is cancelled; then stops
/// accepting at once, lets sessions run for `shutdown_grace`, gives the
/// remaining ones `421 4.3.2` and returns when every task has finished.
/// (Catching SIGTERM and cancelling the token is the caller's job.)
pub async fn run<H: HandoffFactory>(
    listeners: Vec<TcpListener>,
    ctx: ServerContext<H>,
    shutdown: CancellationToken,
) {
    let shared = ctx.shared;
    let tracker = TaskTracker::new();
    for listener in listeners {
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "accepting SMTP connections");
        }
        tracker.spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            tracker.clone(),
            shutdown.clone(),
        ));
    }
    tracker.close();
    shutdown.cancelled().await;
    let grace = shared.settings.shutdown_grace;
    tracing::info!(
        open = shared.metrics.open_connections(),
        ?grace,
        "shutting down: no new connections"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::info!(
            open = shared.metrics.open_connections(),
            "shutdown grace over: closing the remaining sessions"
        );
        shared.stop_sessions.cancel();
        tracker.wait().await;
    }
    tracing::info!("SMTP server stopped");
}

async fn accept_loop<H: HandoffFactory>(
    listener: TcpListener,
    shared: Arc<Shared<H>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                admit(&shared, &tracker, stream, peer);
            }
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(error = %e, "accept: connection failed before it was accepted");
            }
            Err(e) => {
                tracing::warn!(error = %e, pause = ?backoff, "accept failed; pausing");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Errors of one pending connection that accept(2) reports (see its
/// man page): retry at once. Anything else (EMFILE, ENOBUFS...) backs off.
fn is_per_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ENETDOWN
                | libc::EPERM
        )
    )
}

/// The checks on accept, in order, then the session task.
fn admit<H: HandoffFactory>(
    shared: &Arc<Shared<H>>,
    tracker: &TaskTracker,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let accepted_at = Instant::now();
    let peer = normalize(peer);
    let ip = peer.ip();
    let metrics = &shared.metrics;
    metrics.accepted(ip);
    let host = &shared.settings.conn.session.hostname;

    // 1. Access lists.
    match shared.access.check(ip) {
        Access::Allow => {}
        Access::WouldDeny { reason, entry } => {
            relaxed_add(&metrics.would_deny);
            tracing::info!(
                client = %ip,
                reason = Rejection::from(reason).as_str(),
                entry = entry.as_deref().unwrap_or("-"),
                "would deny (monitor mode): let in"
            );
        }
        Access::Deny { reason, entry } => {
            let reply = Reply::new(
                554,
                Some(EnhancedCode(5, 7, 1)),
                format!("{ip} Access denied"),
            );
            return refuse(metrics, stream, ip, reason.into(), entry.as_deref(), &reply);
        }
    }

    // 2. Connection caps.
    let permit = match &shared.slots {
        None => None,
        Some(slots) => match Arc::clone(slots).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let reply = Reply::new(
                    421,
                    Some(EnhancedCode(4, 7, 0)),
                    format!("{host} Error: too many connections, try again later"),
                );
                return refuse(metrics, stream, ip, Rejection::ConnectionCap, None, &reply);
            }
        },
    };
    let cap = shared.settings.max_connections_per_client;
    let Some(slot) = shared.sessions.register(ip, cap, permit, metrics) else {
        let reply = Reply::new(
            421,
            Some(EnhancedCode(4, 7, 0)),
            format!("{host} Error: too many connections from {ip}, try again later"),
        );
        return refuse(metrics, stream, ip, Rejection::PerClientCap, None, &reply);
    };

    // 3. The session (its first event is the greeting).
    relaxed_add(&metrics.sessions_started);
    let local = stream.local_addr().map(normalize).unwrap_or(peer);
    let _ = stream.set_nodelay(true);
    let span = tracing::info_span!("smtp", session = %slot.session_id, client = %ip);
    let shared = Arc::clone(shared);
    tracker.spawn(
        async move {
            tracing::info!(%local, "session started");
            let client = ClientInfo {
                peer,
                local,
                helo: None,
                esmtp: false,
                tls: None,
                session_id: slot.session_id.clone(),
            };
            // The acceptor of this moment: a reload swaps it for new sessions only.
            let tls = shared.tls.read().expect("tls lock").clone();
            let connection = Connection {
                settings: &shared.settings.conn,
                tls: tls.as_ref(),
                metrics: &shared.metrics,
                client,
                stop: Stop {
                    kick: slot.kick.clone(),
                    shutdown: shared.stop_sessions.clone(),
                },
                accepted_at,
            };
            let session = async {
                let handoff = shared.handoffs.session(ip);
                conn::serve(stream, connection, handoff).await
            };
            match AssertUnwindSafe(session).catch_unwind().await {
                Ok(end) => tracing::info!(?end, "session ended"),
                Err(panic) => {
                    relaxed_add(&shared.metrics.panics);
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(panic = %what, "session task panicked; connection dropped");
                }
            }
            drop(slot);
        }
        .instrument(span),
    );
}

/// Sends the refusal and closes, without taking a slot. The reply fits in
/// a fresh socket's send buffer, so a non-blocking write suffices and the
/// accept loop never waits for the client.
fn refuse(
    metrics: &Metrics,
    stream: TcpStream,
    ip: IpAddr,
    reason: Rejection,
    entry: Option<&str>,
    reply: &Reply,
) {
    metrics.rejected_on_accept(ip, reason);
    tracing::info!(
        client = %ip,
        reason = reason.as_str(),
        entry = entry.unwrap_or("-"),
        "connection refused"
    );
    if let Err(e) = stream.try_write(&reply.to_bytes()) {
        tracing::debug!(client = %ip, error = %e, "could not send the refusal");
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn ipv4_mapped_addresses_are_normalised() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:2525".parse().unwrap();
        assert_eq!(normalize(mapped), "192.0.2.7:2525".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::7]:25".parse().unwrap();
        assert_eq!(normalize(v6), v6);
    }

    #[tokio::test]
    async fn bind_errors_name_the_address_and_v6_is_v6_only() {
        let first = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
        let taken = first[0].local_addr().unwrap();
        // SO_REUSEADDR does not allow two listeners on one port.
        let err = bind(&[taken]).unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            chain.starts_with(&format!("cannot listen on {taken}: Address already in use")),
            "{chain}"
        );

        let Ok(v6) = bind(&["[::1]:0".parse().unwrap()]) else {
            return; // no IPv6 on this machine
        };
        let fd = v6[0].as_fd();
        let only = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::Ipv6V6Only);
        assert_eq!(only, Ok(true));
        let reuse = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::ReuseAddr);
        assert_eq!(reuse, Ok(true));
    }

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
        assert_eq!(json["rejected"]["deny_list"], 1);
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
        assert_eq!(snap.connections_accepted, MAX_TRACKED_CLIENTS as u64 + 10);
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
        let take = |ip| {
            let permit = Arc::clone(&slots).try_acquire_owned().ok()?;
            sessions.register(ip, cap, Some(permit), &metrics)
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
        };
        assert_eq!(handle.kick(|ip| ip == a), 1);
        assert!(first.kick.is_cancelled() && !second.kick.is_cancelled());
        assert_eq!(handle.kick(|ip| ip == a), 0, "already kicked");

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
