//! The SMTP front door: listeners, the checks made on accept, the
//! connection caps, one task per session, kicks and shutdown.
//!
//! On each accepted connection, before any byte is sent (connection control
//! comes before relay rules):
//!
//! 0. a connection the accept loop could only take on its spare descriptor
//!    (the process is out of file descriptors) gets `421 4.3.2` and is
//!    closed;
//! 1. the client address (IPv4-mapped IPv6 normalised to IPv4) is checked
//!    against the access lists ([`AccessCheck`]); denied:
//!    `554 5.7.1 <ip> Access denied`, then close;
//! 2. the simultaneous-connection cap (`max_connections`) and the optional
//!    per-client cap (`max_connections_per_client`: per IPv4 address, per IPv6 prefix); over either:
//!    `421 4.7.0 <host> Error: too many connections...`, then close (with
//!    `max_connections` unlimited, the cap is what the file descriptors
//!    allow, and over it the reply is `421 4.3.2`);
//! 3. only then a session task starts; with `[dnsbl]`, it first awaits the
//!    DNSBL verdict ([`dnsbl_gate`]: at most the DNSBL `timeout`; a listed
//!    client may get `521 5.7.1` and close instead of a greeting); then
//!    [`connection`], the driver, sends the `220` greeting.
//!
//! A session holds a slot (a semaphore permit plus its registry entry) that
//! is released by a guard on every way out of the task, panics included; a
//! rejected connection never takes one.
//!
//! * [`access`]: the access check asked on every accept;
//! * [`connection`]: the tokio driver of one session (deadlines, STARTTLS,
//!   hand-off calls);
//! * `registry`: open sessions, their ids and kick tokens, the `Slot`
//!   guard;
//! * [`counters`]: [`Metrics`] and why clients were refused ([`Rejection`]).
//!
//! The daemon builds a [`ServerContext`], keeps its [`ServerHandle`] (kicks,
//! metrics), [`bind`]s the listeners and awaits [`run`] with a shutdown
//! token.

pub mod access;
pub mod connection;
pub mod counters;
pub mod dnsbl_gate;
mod registry;
pub mod screening;

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use access::{Access, AccessCheck, AllowAll, DenyReason};
pub use counters::{ClientCounts, Metrics, MetricsSnapshot, Rejection, Stage, MAX_TRACKED_CLIENTS};
use dnsbl_gate::DnsblStage;
use registry::Sessions;
pub use registry::{Live, LiveDetail, SessionState};
use screening::{Admission, GreetAction, Screening, Violation, WaitOutcome};

use connection::{ConnContext, ConnSettings, Stop};

use crate::accept;
use crate::smtp::handoff::{ClientInfo, HandoffFactory};
use crate::smtp::{Reply, TlsMode};

/// Pending connections the kernel queues per listener (listen(2) backlog).
pub const LISTEN_BACKLOG: u32 = 1024;

// ----- settings -------------------------------------------------------------

/// The server's limits and timeouts (the daemon builds them from
/// `[server]` and `[tls]`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Simultaneous sessions; `None` = no limit.
    pub max_connections: Option<NonZeroUsize>,
    /// Simultaneous sessions per client (an IPv4 address, or an IPv6
    /// prefix of `per_client_ipv6_prefix` bits); `None` = no limit.
    pub max_connections_per_client: Option<NonZeroUsize>,
    /// Prefix length (bits, 1–128) grouping IPv6 clients for
    /// `max_connections_per_client`.
    pub per_client_ipv6_prefix: u8,
    /// Simultaneous sessions the process's file descriptors allow (see
    /// [`crate::fds`]), when `max_connections` is unlimited; over it:
    /// `421 4.3.2`. `None`: no such cap.
    pub max_sessions_by_fds: Option<NonZeroUsize>,
    /// After the shutdown signal, how long sessions may go on before they
    /// get `421 4.3.2` and are closed.
    pub shutdown_grace: Duration,
    /// Per-connection limits and the session parameters.
    pub conn: ConnSettings,
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
/// while old connections linger in TIME_WAIT). An IPv6 wildcard (`[::]:P`)
/// is dual-stack when no IPv4 address in `listen` uses port P, so
/// `listen = ["[::]:25"]` alone serves IPv4 clients too (they arrive as
/// `::ffff:a.b.c.d` and are judged as IPv4); every other IPv6 socket is
/// `IPV6_V6ONLY`, so `0.0.0.0:25` and `[::]:25` can both be bound. Must be
/// called within a tokio runtime.
///
/// # Errors
///
/// [`ServerError::Listen`] naming the first address that failed.
pub fn bind(listen: &[SocketAddr]) -> Result<Vec<TcpListener>, ServerError> {
    listen
        .iter()
        .map(|&addr| {
            bind_one(addr, is_dual_stack(addr, listen))
                .map_err(|source| ServerError::Listen { addr, source })
        })
        .collect()
}

/// Whether `addr` (an entry of `listen`) is bound dual-stack: an IPv6
/// wildcard with no IPv4 listener on its port to collide with.
pub fn is_dual_stack(addr: SocketAddr, listen: &[SocketAddr]) -> bool {
    addr.is_ipv6()
        && addr.ip().is_unspecified()
        && !listen
            .iter()
            .any(|l| l.is_ipv4() && l.port() == addr.port())
}

fn bind_one(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let socket = TcpSocket::new_v6()?;
            let v6_only = !dual_stack;
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &v6_only)?;
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
    /// Open sessions, for kicks and the per-client cap; shared with
    /// [`ServerHandle`].
    sessions: Arc<Sessions>,
    /// Counters; shared with [`ServerHandle`].
    metrics: Arc<Metrics>,
    /// Cancelled when the shutdown grace is over: the remaining sessions
    /// get `421 4.3.2` and close.
    stop_sessions: CancellationToken,
    /// The greet delay, PREGREET, the pass cache and the violation
    /// reports; `None`: none of them (tests, benches).
    screening: Option<Screening>,
    /// DNSBL scoring before the greeting; `None` without `[dnsbl]`.
    dnsbl: Option<dnsbl_gate::DnsblGate>,
}

impl<H: HandoffFactory> ServerContext<H> {
    /// `tls`: the rustls configuration from [`crate::tls::load`] when
    /// `tls.mode` is not off (ignored when it is). `access`: the daemon's
    /// access lists. `handoffs`: usually
    /// [`Delivery`](crate::smtp::handoff::Delivery).
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
                    .or(settings.max_sessions_by_fds)
                    .map(|n| Arc::new(Semaphore::new(n.get()))),
                settings,
                tls: Arc::new(std::sync::RwLock::new(tls)),
                access,
                handoffs,
                sessions: Arc::new(Sessions::new()),
                metrics: Arc::new(Metrics::default()),
                stop_sessions: CancellationToken::new(),
                screening: None,
                dnsbl: None,
            }),
        }
    }

    /// Screens clients before their greeting and reports violations
    /// ([`screening`]). Call before [`ServerContext::handle`].
    pub fn with_screening(mut self, screening: Screening) -> ServerContext<H> {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.screening = Some(screening);
        }
        self
    }

    /// Adds the DNSBL step before the greeting. Call before [`run`].
    ///
    /// # Panics
    ///
    /// When called after [`run`] started with this context.
    pub fn with_dnsbl(mut self, gate: dnsbl_gate::DnsblGate) -> ServerContext<H> {
        Arc::get_mut(&mut self.shared)
            .expect("with_dnsbl before run")
            .dnsbl = Some(gate);
        self
    }

    /// A handle for the daemon: kicks and metrics, usable while [`run`]
    /// runs and after.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            sessions: Arc::clone(&self.shared.sessions),
            metrics: Arc::clone(&self.shared.metrics),
            tls: Arc::clone(&self.shared.tls),
            dnsbl: self.shared.dnsbl.clone(),
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
    /// The DNSBL step, for its counters; `None` without `[dnsbl]`.
    dnsbl: Option<dnsbl_gate::DnsblGate>,
}

impl ServerHandle {
    /// Ends every open session whose client address matches `pred`
    /// (normalised addresses) with `421 4.7.1 ... your address was
    /// denied`; for when an address is newly denied and
    /// `close_denied_sessions` is on. Returns how many sessions were told
    /// (each as soon as it is not in the middle of a hand-off).
    pub fn kick(&self, pred: impl Fn(IpAddr) -> bool) -> usize {
        self.sessions.kick(pred)
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

    /// The DNSBL step (verdict counters, per-site counters); `None`
    /// without `[dnsbl]`.
    pub fn dnsbl(&self) -> Option<&dnsbl_gate::DnsblGate> {
        self.dnsbl.as_ref()
    }

    /// Open sessions per client address.
    pub fn open_by_client(&self) -> BTreeMap<IpAddr, usize> {
        self.sessions.open_by_client()
    }

    /// Every open session, oldest first.
    pub fn sessions(&self) -> Vec<Arc<Live>> {
        self.sessions.list()
    }

    /// Ends every open session `pred` picks with `421 4.7.0 ... session
    /// ended by the operator` (`smtpguard kick`), each as soon as it is not
    /// in the middle of a hand-off; returns those told, by session id.
    pub fn kick_by_operator(&self, pred: impl Fn(&Live) -> bool) -> Vec<Arc<Live>> {
        self.sessions.kick_by_operator(pred)
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

/// Accepts on one listener with the shared loop ([`crate::accept`]: back-off
/// on resource errors) and admits each connection. No cap here: the cap is
/// checked after accept, so a client over it gets `421 4.7.0`, not silence.
async fn accept_loop<H: HandoffFactory>(
    listener: TcpListener,
    shared: Arc<Shared<H>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    accept::accept_loop(&listener, "SMTP", None, &shutdown, |a| {
        admit(&shared, &tracker, a.stream, a.peer, a.out_of_fds)
    })
    .await;
}

/// The checks on accept, in order, then the session task.
fn admit<H: HandoffFactory>(
    shared: &Arc<Shared<H>>,
    tracker: &TaskTracker,
    stream: TcpStream,
    peer: SocketAddr,
    out_of_fds: bool,
) {
    let accepted_at = Instant::now();
    let peer = normalize(peer);
    let ip = peer.ip();
    let metrics = &shared.metrics;
    metrics.accepted(ip);
    let host = &shared.settings.conn.session.hostname;

    // 0. Accepted on the spare descriptor: nothing else can be opened.
    // The one refusal for "no descriptors left", whichever check finds it.
    let out_of_resources = |stream| {
        let reply = Reply::out_of_resources(host);
        refuse(
            metrics,
            stream,
            ip,
            Rejection::FileDescriptors,
            None,
            &reply,
        )
    };
    if out_of_fds {
        return out_of_resources(stream);
    }

    // 1. Access lists.
    match shared.access.check(ip) {
        Access::Allow => {}
        Access::WouldDeny { reason, entry } => {
            metrics.would_deny();
            tracing::info!(
                client = %ip,
                reason = Rejection::from(reason).as_str(),
                entry = entry.as_deref().unwrap_or("-"),
                "would deny (monitor mode): let in"
            );
        }
        Access::Deny { reason, entry } => {
            let reply = Reply::access_denied(ip);
            return refuse(metrics, stream, ip, reason.into(), entry.as_deref(), &reply);
        }
    }

    // 2. The greet wait, without a slot (see `screening`).
    let no_wait = |stream| {
        open_session(
            shared,
            tracker,
            stream,
            peer,
            accepted_at,
            AfterWait::none(),
        )
    };
    let Some(screening) = &shared.screening else {
        return no_wait(stream);
    };
    let guard = match screening.admit(peer) {
        Admission::Skip => {
            return no_wait(stream);
        }
        Admission::Full => return screening.refuse_full(&stream, peer, host),
        Admission::Wait(guard) => guard,
    };
    // A full server refuses now rather than after a `220-` line.
    if shared
        .slots
        .as_ref()
        .is_some_and(|s| s.available_permits() == 0)
    {
        drop(guard);
        return no_wait(stream);
    }
    let shared = Arc::clone(shared);
    let sessions = tracker.clone();
    let span = tracing::info_span!("screening", client = %ip);
    tracker.spawn(
        async move {
            let Some(screening) = &shared.screening else {
                return;
            };
            let host = shared.settings.conn.session.hostname.clone();
            // DNSBL asks during the wait, so a good client waits no
            // longer than greet_wait (or the DNSBL timeout).
            let lookup = shared.dnsbl.as_ref().and_then(|g| g.start(ip));
            let dnsbl = async move {
                match lookup {
                    Some(lookup) => Some(lookup.await),
                    None => None,
                }
            };
            let (outcome, verdict) = screening
                .pregreet(&stream, peer, &host, &shared.stop_sessions, dnsbl)
                .await;
            drop(guard);
            let enforce = match outcome {
                WaitOutcome::Passed => {
                    // PASS NEW only for a client no DNSBL listed.
                    if !verdict.as_ref().is_some_and(|v| v.is_listed()) {
                        screening.pass_new(peer);
                    }
                    false
                }
                WaitOutcome::Pregreet => screening.settings.greet_action == GreetAction::Enforce,
                WaitOutcome::Dropped | WaitOutcome::Gone => return,
            };
            let banner_open = screening.settings.greet_banner.is_some();
            // A ban (or any deny) made during the wait applies now.
            if let Access::Deny { reason, entry } = shared.access.check(ip) {
                let metrics = &shared.metrics;
                // After a `220-` line only the end of that greeting and
                // then an unsolicited 421 are valid (RFC 5321 4.2.1, 3.8).
                let reply = if banner_open {
                    end_banner(&stream, &host);
                    Reply::kicked(&host)
                } else {
                    Reply::access_denied(ip)
                };
                return refuse(metrics, stream, ip, reason.into(), entry.as_deref(), &reply);
            }
            let after = AfterWait {
                enforce,
                banner_open,
                dnsbl: DnsblStage::Done(verdict),
            };
            open_session(&shared, &sessions, stream, peer, accepted_at, after);
        }
        .instrument(span),
    );
}

/// What the greet wait leaves for the session.
struct AfterWait {
    /// It talked early under `greet_action = "enforce"`: `554 5.5.1` to
    /// every command.
    enforce: bool,
    /// A `220-` line was sent: a refusal first ends that greeting.
    banner_open: bool,
    /// The DNSBL verdict, if asked during the wait.
    dnsbl: DnsblStage,
}

impl AfterWait {
    /// No wait happened.
    fn none() -> AfterWait {
        AfterWait {
            enforce: false,
            banner_open: false,
            dnsbl: DnsblStage::Ask,
        }
    }
}

/// The connection caps, then the session task: the SMTP session, or with
/// `enforce` the engine that answers `554 5.5.1` to an early talker.
fn open_session<H: HandoffFactory>(
    shared: &Arc<Shared<H>>,
    tracker: &TaskTracker,
    stream: TcpStream,
    peer: SocketAddr,
    accepted_at: Instant,
    after: AfterWait,
) {
    let AfterWait {
        enforce,
        banner_open,
        dnsbl,
    } = after;
    let ip = peer.ip();
    let metrics = &shared.metrics;
    let host = &shared.settings.conn.session.hostname;
    // Every refusal here is a 421; after a `220-` line it follows the end
    // of that greeting, so the client reads two well-formed replies.
    let refuse = |stream: TcpStream, reason, entry, reply: &Reply| {
        if banner_open {
            end_banner(&stream, host);
        }
        refuse(metrics, stream, ip, reason, entry, reply)
    };
    let out_of_resources = |stream| {
        let reply = Reply::out_of_resources(host);
        refuse(stream, Rejection::FileDescriptors, None, &reply)
    };

    let permit = match &shared.slots {
        None => None,
        Some(slots) => match Arc::clone(slots).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) if shared.settings.max_connections.is_none() => {
                // The cap is the file descriptors', not the operator's.
                return out_of_resources(stream);
            }
            Err(_) => {
                let reply = Reply::too_many_connections(host);
                return refuse(stream, Rejection::ConnectionCap, None, &reply);
            }
        },
    };
    let cap = shared.settings.max_connections_per_client;
    let local = stream.local_addr().map(normalize).unwrap_or(peer);
    let group = registry::client_group(ip, shared.settings.per_client_ipv6_prefix);
    let Some(slot) = shared
        .sessions
        .register(peer, local, group, cap, permit, metrics)
    else {
        let reply = Reply::too_many_connections_from(host, &registry::display_group(group));
        return refuse(stream, Rejection::PerClientCap, None, &reply);
    };

    // 4. The session (its first event is the greeting).
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
            let connection = ConnContext {
                settings: &shared.settings.conn,
                tls: tls.as_ref(),
                metrics: &shared.metrics,
                client,
                stop: Stop {
                    kick: slot.kick.clone(),
                    operator_kick: slot.operator_kick.clone(),
                    shutdown: shared.stop_sessions.clone(),
                },
                accepted_at,
                live: Arc::clone(&slot.live),
            };
            let session = async {
                let mut stream = stream;
                let verdict = match dnsbl {
                    DnsblStage::Done(verdict) => verdict,
                    DnsblStage::Ask => match shared.dnsbl.as_ref().and_then(|g| g.start(ip)) {
                        Some(lookup) => Some(lookup.await),
                        None => None,
                    },
                };
                let mut refusal = None;
                if let (Some(gate), Some(verdict)) = (&shared.dnsbl, &verdict) {
                    let host = &shared.settings.conn.session.hostname;
                    let decision = gate.judge(verdict, peer, host);
                    // A listing acted on (not `ignore`) counts towards a ban.
                    if !matches!(decision, dnsbl_gate::Decision::Proceed) {
                        if let Some(screening) = &shared.screening {
                            screening.defence.violation(ip, Violation::Dnsbl);
                        }
                    }
                    match decision {
                        dnsbl_gate::Decision::Proceed => {}
                        dnsbl_gate::Decision::Enforce(reply) => refusal = Some(reply),
                        dnsbl_gate::Decision::Drop(reply) => {
                            if banner_open {
                                end_banner(&stream, host);
                            }
                            dnsbl_gate::send_and_close(&mut stream, &reply).await;
                            return None;
                        }
                    }
                }
                if enforce {
                    let limits = screening::enforce::EnforceLimits {
                        host: shared.settings.conn.session.hostname.clone(),
                        idle_timeout: shared.settings.conn.idle_timeout,
                        session_deadline: accepted_at + shared.settings.conn.max_session_duration,
                        max_errors: shared.settings.conn.session.max_errors.max(1),
                        write_timeout: shared.settings.conn.write_timeout,
                    };
                    let stop = connection.stop.clone();
                    let live = Arc::clone(&connection.live);
                    return Some(screening::enforce::serve(stream, peer, limits, stop, live).await);
                }
                let handoff = dnsbl_gate::Gated::new(shared.handoffs.session(ip), refusal);
                Some(connection::serve(stream, connection, handoff).await)
            };
            match AssertUnwindSafe(session).catch_unwind().await {
                Ok(Some(end)) => {
                    log_summary(&slot.live, end.as_str());
                    report_violations(&shared, ip, end, &slot.live, enforce);
                }
                Ok(None) => log_summary(&slot.live, "dnsbl_drop"),
                Err(panic) => {
                    log_summary(&slot.live, "panic");
                    shared.metrics.session_panicked();
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

/// Tells the daemon what the session did wrong: the error cap (not for an
/// enforced early talker, already reported), relay attempts.
fn report_violations<H>(
    shared: &Shared<H>,
    ip: IpAddr,
    end: connection::End,
    live: &Live,
    enforce: bool,
) {
    let Some(screening) = &shared.screening else {
        return;
    };
    if end == connection::End::TooManyErrors && !enforce {
        screening.defence.violation(ip, Violation::ProtocolErrors);
    }
    if live.detail().relay_denied > 0 {
        screening.defence.violation(ip, Violation::RelayAttempt);
    }
}

/// The one line per session (key=value, like Postfix's and postscreen's,
/// for grep and fail2ban): `session end client=IP port=N helo=NAME
/// tls=VERSION from=<PATH> rcpts=N msgs=N errors=N bytes_in=N bytes_out=N
/// result=WHY duration=SECONDS`. `-` for what the session never had;
/// `from` is the reverse path of the last message accepted; `rcpts` and
/// `msgs` count accepted ones; `errors` the 4xx/5xx replies to the
/// client's commands (not the 421 of a kick, shutdown or timeout); bytes are
/// bytes of SMTP (after TLS decryption, before encryption); `duration` is
/// in seconds with millisecond precision; `result` is
/// [`End::as_str`](connection::End::as_str), `dnsbl_drop` or `panic`.
fn log_summary(live: &Live, result: &str) {
    let d = live.detail();
    let duration = live.since.elapsed().unwrap_or_default().as_secs_f64();
    tracing::info!(
        client = %live.peer.ip(),
        port = live.peer.port(),
        helo = %d.helo.as_deref().unwrap_or("-"),
        tls = %d.tls.as_ref().map_or("-", |t| t.version.as_str()),
        from = %d.from.as_deref().unwrap_or("-"),
        rcpts = d.rcpts,
        msgs = d.msgs,
        errors = d.errors,
        bytes_in = live.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
        bytes_out = live.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
        result = %result,
        duration = %format_args!("{duration:.3}"),
        "session end"
    );
}

/// Sends the refusal and closes, without taking a slot. The reply fits in
/// a fresh socket's send buffer, so a non-blocking write suffices and the
/// accept loop never waits for the client.
/// Ends a greeting begun with a `220-` line (`screening.greet_banner`)
/// before a refusal, best effort like the refusal itself.
fn end_banner(stream: &TcpStream, host: &str) {
    let _ = stream.try_write(&Reply::greeting(host).to_bytes());
}

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
}
