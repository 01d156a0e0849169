//! The tokio connection driver: runs one [`Session`] over a TCP stream,
//! switching to TLS on STARTTLS (RFC 3207), under the inactivity, session
//! and write deadlines, and hands MAIL, RCPT and messages to a [`Handoff`].
//!
//! It follows the [driver protocol](crate::smtp#the-driver-protocol). The
//! front door's checks (access lists, connection caps) happen before a
//! connection gets here; see [`super`].
//!
//! # Deadlines
//!
//! * **Inactivity** (`idle_timeout`): a deadline per line. It starts when
//!   the driver waits for input after the last complete line and only a
//!   complete line (an LF consumed by the session, in the command phase or
//!   in DATA) removes it; bytes without an LF do not move it, so a client
//!   trickling one byte at a time is cut off after `idle_timeout` like a
//!   silent one. Time we spend (hand-off, our writes) never counts against
//!   the client. Expiry: `421 4.4.2 <host> Error: timeout exceeded`.
//! * **Session** (`max_session_duration`): from the accept; checked while
//!   waiting for input. Expiry: the same 421.
//! * **TLS handshake**: the smaller of `handshake_timeout` and
//!   `idle_timeout`; expiry just closes (nothing can be said in plaintext).
//! * **Writes** (`write_timeout`): each flush of replies must complete in
//!   time, so a client that never reads cannot hold a slot.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::counters::{Metrics, Rejection};
use super::registry::{Live, SessionState};
use crate::smtp::handoff::{ClientInfo, Handoff};
use crate::smtp::{
    CloseReason, EnhancedCode, Envelope, Event, Phase, Reply, Session, SessionParams, Step, TlsInfo,
};

/// Bytes asked of the socket per read. The driver reads again only once
/// the session has consumed everything, so this bounds its input buffer.
pub const READ_CHUNK: usize = 4096;

/// Longest time for the last words once the session is closing (the
/// closing reply, TLS close_notify), capped so a client that does not read
/// cannot delay the end of the session, or of a shutdown, by a full
/// `write_timeout`.
pub const FAREWELL_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-connection limits; the same for every session of a server.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    /// The session's parameters. `tls_available` is ignored: the driver
    /// sets it from whether it was given a [`TlsAcceptor`].
    pub session: SessionParams,
    /// Longest wait for a complete line from the client (see the module
    /// docs for what counts).
    pub idle_timeout: Duration,
    /// Longest TLS handshake; the smaller of this and `idle_timeout` applies.
    pub handshake_timeout: Duration,
    /// Longest session, from the accept.
    pub max_session_duration: Duration,
    /// Longest time one flush of replies may take.
    pub write_timeout: Duration,
}

/// How the server asks a session to end early. Checked while the driver
/// waits for the client (reading, writing, TLS handshake), not during a
/// hand-off call, which is left to finish.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// The operator denied the client's address: `421 4.7.1`.
    pub kick: CancellationToken,
    /// The operator ended the session (`smtpguard kick`): `421 4.7.0`.
    pub operator_kick: CancellationToken,
    /// The daemon's shutdown grace is over: `421 4.3.2`.
    pub shutdown: CancellationToken,
}

impl Stop {
    /// Resolves when either token is cancelled; a kick wins if both are.
    async fn fired(&self) -> End {
        tokio::select! {
            biased;
            _ = self.kick.cancelled() => End::Kicked,
            _ = self.operator_kick.cancelled() => End::KickedByOperator,
            _ = self.shutdown.cancelled() => End::Shutdown,
        }
    }
}

/// What one connection needs besides the socket and the hand-off.
pub struct ConnContext<'a> {
    /// Limits and timeouts.
    pub settings: &'a ConnSettings,
    /// STARTTLS; `None` when TLS is off or no certificate is loaded.
    pub tls: Option<&'a TlsAcceptor>,
    /// Counters to update.
    pub metrics: &'a Metrics,
    /// The client (normalised addresses, session id); `helo`, `esmtp` and
    /// `tls` are kept current by the driver.
    pub client: ClientInfo,
    /// Early-end signals.
    pub stop: Stop,
    /// When the connection was accepted (start of `max_session_duration`).
    pub accepted_at: Instant,
    /// What the session is doing, kept current here for `smtpguard
    /// sessions` and the summary line.
    pub live: std::sync::Arc<Live>,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent QUIT (`221`).
    Quit,
    /// The client closed the connection.
    ClientGone,
    /// `idle_timeout` expired (`421 4.4.2`).
    IdleTimeout,
    /// `max_session_duration` expired (`421 4.4.2`).
    SessionTimeout,
    /// The error cap was reached (`421 4.7.0`).
    TooManyErrors,
    /// The client spoke HTTP (`421 4.7.0`).
    HttpRequest,
    /// The hand-off (or the RCPT policy) answered `421`, which closes the
    /// session.
    HandoffClosed,
    /// The TLS handshake failed or timed out.
    TlsFailed,
    /// Its address was newly denied (`421 4.7.1`, unless it came
    /// mid-write or mid-handshake).
    Kicked,
    /// Ended by `smtpguard kick` (`421 4.7.0`, unless it came mid-write or
    /// mid-handshake).
    KickedByOperator,
    /// Daemon shutdown (`421 4.3.2`, unless it came mid-write or
    /// mid-handshake).
    Shutdown,
    /// A flush of replies did not complete within `write_timeout`.
    WriteTimeout,
    /// A socket error (e.g. connection reset).
    Io(io::ErrorKind),
    /// The session and the driver disagree (a bug); logged as an error.
    Internal,
}

impl End {
    /// The name in the session summary line (`result=`): `quit`,
    /// `client_gone`, `idle_timeout`, `session_timeout`, `too_many_errors`,
    /// `http_request`, `handoff_closed`, `tls_failed`, `denied`, `kicked`,
    /// `shutdown`, `write_timeout`, `io_error`, `internal`.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Quit => "quit",
            End::ClientGone => "client_gone",
            End::IdleTimeout => "idle_timeout",
            End::SessionTimeout => "session_timeout",
            End::TooManyErrors => "too_many_errors",
            End::HttpRequest => "http_request",
            End::HandoffClosed => "handoff_closed",
            End::TlsFailed => "tls_failed",
            End::Kicked => "denied",
            End::KickedByOperator => "kicked",
            End::Shutdown => "shutdown",
            End::WriteTimeout => "write_timeout",
            End::Io(_) => "io_error",
            End::Internal => "internal",
        }
    }
}

impl From<CloseReason> for End {
    fn from(reason: CloseReason) -> End {
        match reason {
            CloseReason::Quit => End::Quit,
            CloseReason::TooManyErrors => End::TooManyErrors,
            CloseReason::HttpRequest => End::HttpRequest,
            CloseReason::ClosingReply => End::HandoffClosed,
            // The driver asked for these and has recorded its End first.
            CloseReason::Timeout => End::IdleTimeout,
            CloseReason::Shutdown => End::Shutdown,
            CloseReason::Kicked => End::Kicked,
        }
    }
}

/// Runs one SMTP session over `io` to its end: greeting, commands,
/// STARTTLS, hand-offs, deadlines. Calls [`Handoff::close`] at the end and
/// returns why the connection ended. Never panics by itself; the caller
/// guards against panics of the hand-off.
pub async fn serve<IO, H>(io: IO, conn: ConnContext<'_>, handoff: H) -> End
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    H: Handoff,
{
    let mut params = conn.settings.session.clone();
    params.tls_available = conn.tls.is_some();
    let session = Session::new(params, handoff.rcpt_policy());
    let mut d = Driver {
        session_deadline: conn.accepted_at + conn.settings.max_session_duration,
        conn,
        session,
        handoff,
        out: Vec::new(),
        inbuf: InBuf::new(),
        line_deadline: None,
        end: None,
        greeted: false,
    };
    let mut stream = Stream::Plain(io);
    // Every exit is an `Err` (the loop has no other way out).
    let Err(end) = d.drive(&mut stream).await;
    drop(stream);
    d.handoff.close().await;
    end
}

/// The connection's state besides the stream.
struct Driver<'a, H> {
    conn: ConnContext<'a>,
    session: Session,
    handoff: H,
    /// Replies not yet written.
    out: Vec<u8>,
    /// Bytes read, not yet consumed by the session.
    inbuf: InBuf,
    /// Deadline for the current line; `None` until we next wait for input
    /// after a complete line.
    line_deadline: Option<Instant>,
    session_deadline: Instant,
    /// Why the session is closing, once known.
    end: Option<End>,
    /// Whether a flush has written the greeting (the session's first reply).
    greeted: bool,
}

impl<H: Handoff> Driver<'_, H> {
    async fn drive<IO>(&mut self, stream: &mut Stream<IO>) -> Result<std::convert::Infallible, End>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        loop {
            // 1. Act on every queued event, in order.
            while let Some(event) = self.session.next_event() {
                match event {
                    Event::Reply(reply) => {
                        self.observe(&reply);
                        reply.write_to(&mut self.out);
                    }
                    Event::NeedDecision(step) => {
                        self.flush(stream).await?;
                        let reply = self.decide_step(step).await;
                        self.decide(reply)?;
                    }
                    Event::Message { envelope, data } => {
                        self.flush(stream).await?;
                        let reply = self.deliver(&envelope, data).await;
                        self.decide(reply)?;
                    }
                    Event::StartTls => {
                        self.flush(stream).await?;
                        // CVE-2011-0411: nothing read in plaintext survives.
                        self.inbuf.clear();
                        self.start_tls(stream).await?;
                    }
                    Event::Close(reason) => {
                        self.closing(End::from(reason));
                        self.flush(stream).await?;
                        // TLS close_notify and FIN.
                        let _ =
                            timeout_at(Instant::now() + FAREWELL_TIMEOUT, stream.shutdown()).await;
                        return Err(self.end.unwrap_or(End::Internal));
                    }
                }
            }
            self.flush(stream).await?;
            // 2. Feed what is buffered until it is all consumed.
            if !self.inbuf.is_empty() {
                let pending = self.inbuf.pending();
                let n = self.session.feed(pending);
                if pending[..n].contains(&b'\n') {
                    self.line_deadline = None;
                }
                self.inbuf.consume(n);
                if n > 0 || self.session.has_events() {
                    continue;
                }
                tracing::error!(phase = ?self.session.phase(), "session consumed nothing");
                return Err(End::Internal);
            }
            // 3. Only then read more.
            self.read(stream).await?;
        }
    }

    /// Waits for input under the line and session deadlines and the stop
    /// signals. A deadline or a stop queues the session's 421 and Close.
    async fn read<IO>(&mut self, stream: &mut Stream<IO>) -> Result<(), End>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let line_deadline = *self
            .line_deadline
            .get_or_insert_with(|| Instant::now() + self.conn.settings.idle_timeout);
        let deadline = line_deadline.min(self.session_deadline);
        self.refresh_live();
        let outcome = tokio::select! {
            biased;
            why = self.conn.stop.fired() => Err(why),
            read = timeout_at(deadline, self.inbuf.read_from(stream)) => Ok(read),
        };
        match outcome {
            Err(why) => {
                self.closing(why);
                match why {
                    End::Kicked => self.session.kicked(),
                    End::KickedByOperator => self.session.kicked_by_operator(),
                    _ => self.session.shutdown(),
                }
                Ok(())
            }
            Ok(Err(_elapsed)) => {
                let why = if Instant::now() >= self.session_deadline {
                    End::SessionTimeout
                } else {
                    End::IdleTimeout
                };
                self.closing(why);
                self.session.timeout();
                Ok(())
            }
            Ok(Ok(Ok(0))) => Err(End::ClientGone),
            Ok(Ok(Ok(n))) => {
                self.conn
                    .live
                    .bytes_in
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(End::Io(e.kind())),
        }
    }

    /// Writes the pending replies under the write deadline
    /// ([`FAREWELL_TIMEOUT`] at most once the session is closing). While the
    /// session is still open a stop signal aborts a write that is stuck (a
    /// client that does not read would never get the 421 anyway).
    async fn flush<IO>(&mut self, stream: &mut Stream<IO>) -> Result<(), End>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if self.out.is_empty() {
            return Ok(());
        }
        let stoppable = !self.session.is_closed();
        let limit = match stoppable {
            true => self.conn.settings.write_timeout,
            false => self.conn.settings.write_timeout.min(FAREWELL_TIMEOUT),
        };
        let deadline = Instant::now() + limit;
        let out = &self.out;
        let write = timeout_at(deadline, async {
            stream.write_all(out).await?;
            stream.flush().await
        });
        // The write is polled first: a stop only aborts a write that is stuck.
        let result = tokio::select! {
            biased;
            r = write => Ok(r),
            why = self.conn.stop.fired(), if stoppable => Err(why),
        };
        let result = match result {
            Ok(r) => r,
            Err(why) => {
                self.closing(why);
                return Err(why);
            }
        };
        let first_write_greets = !self.greeted && self.out.starts_with(b"220");
        let written = self.out.len() as u64;
        self.out.clear();
        if matches!(result, Ok(Ok(()))) {
            self.conn
                .live
                .bytes_out
                .fetch_add(written, Ordering::Relaxed);
        }
        match result {
            Ok(Ok(())) => {
                if first_write_greets {
                    self.greeted = true;
                    self.conn.metrics.greeted();
                }
                Ok(())
            }
            Ok(Err(e)) => Err(End::Io(e.kind())),
            Err(_elapsed) => Err(End::WriteTimeout),
        }
    }

    fn decide(&mut self, reply: Reply) -> Result<(), End> {
        self.session.decide(reply).map_err(|e| {
            tracing::error!(error = %e, "driver bug");
            End::Internal
        })
    }

    async fn decide_step(&mut self, step: Step) -> Reply {
        self.refresh_client();
        self.conn.live.update(|l| l.state = SessionState::Handoff);
        let client = &self.conn.client;
        let reply = match &step {
            Step::Mail {
                reverse_path,
                params,
            } => self.handoff.mail(client, reverse_path, params).await,
            Step::Rcpt { forward_path } => self.handoff.rcpt(client, forward_path).await,
        };
        let upstream = self.handoff.upstream();
        self.conn.live.update(|l| l.upstream = upstream);
        if is_handoff_failure(&reply) {
            self.conn.metrics.handoff_failure();
            tracing::warn!(reply = %reply.to_string().trim_end(), "hand-off failed");
        }
        reply
    }

    async fn deliver(&mut self, envelope: &Envelope, data: Vec<u8>) -> Reply {
        self.refresh_client();
        self.conn.live.update(|l| l.state = SessionState::Handoff);
        let reply = self
            .handoff
            .message(&self.conn.client, envelope, &data)
            .await;
        let size = data.len();
        drop(data);
        let metrics = self.conn.metrics;
        let text = reply.to_string();
        let text = text.trim_end();
        let upstream = self.handoff.upstream();
        self.conn.live.update(|l| {
            l.upstream = upstream;
            if reply.is_positive() {
                l.msgs += 1;
                l.rcpts += envelope.forward_paths.len() as u64;
                l.from = Some(envelope.reverse_path.to_string());
            }
        });
        if reply.is_positive() {
            metrics.message_accepted();
            tracing::info!(
                from = %envelope.reverse_path,
                rcpts = envelope.forward_paths.len(),
                size,
                reply = text,
                "message accepted"
            );
        } else {
            if is_handoff_failure(&reply) {
                metrics.handoff_failure();
            }
            tracing::warn!(
                from = %envelope.reverse_path,
                rcpts = envelope.forward_paths.len(),
                size,
                reply = text,
                "message not accepted"
            );
        }
        reply
    }

    /// STARTTLS: handshake on the raw stream, then tell the session.
    async fn start_tls<IO>(&mut self, stream: &mut Stream<IO>) -> Result<(), End>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (Some(acceptor), Stream::Plain(_)) = (self.conn.tls, &*stream) else {
            tracing::error!("STARTTLS without an acceptor or on a TLS stream");
            return Err(End::Internal);
        };
        let Stream::Plain(io) = std::mem::replace(stream, Stream::Gone) else {
            unreachable!("checked above");
        };
        let settings = self.conn.settings;
        let limit = settings.handshake_timeout.min(settings.idle_timeout);
        self.conn
            .live
            .update(|l| l.state = SessionState::TlsHandshake);
        let handshake = timeout_at(Instant::now() + limit, acceptor.accept(io));
        let result = tokio::select! {
            biased;
            why = self.conn.stop.fired() => Err(why),
            r = handshake => Ok(r),
        };
        let result = match result {
            Ok(r) => r,
            Err(why) => {
                self.closing(why);
                return Err(why);
            }
        };
        let tls = match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.conn.metrics.tls_handshake(false);
                tracing::info!(error = %e, "TLS handshake failed");
                return Err(End::TlsFailed);
            }
            Err(_elapsed) => {
                self.conn.metrics.tls_handshake(false);
                tracing::info!(timeout = ?limit, "TLS handshake timed out");
                return Err(End::TlsFailed);
            }
        };
        let info = tls_info(tls.get_ref().1);
        tracing::debug!(version = %info.version, cipher = %info.cipher, "TLS established");
        self.conn.metrics.tls_handshake(true);
        *stream = Stream::Tls(Box::new(tls));
        self.line_deadline = None;
        self.session.tls_established(info).map_err(|e| {
            tracing::error!(error = %e, "driver bug");
            End::Internal
        })
    }

    /// Notes replies that refuse something, for logs and counters.
    fn observe(&self, reply: &Reply) {
        // Replies to the client's commands; not the 421 of a close the
        // server decided (kick, shutdown, timeout), which is no fault of
        // the client's (fail2ban counts these).
        if reply.code >= 400 && self.end.is_none() {
            self.conn.live.update(|l| l.errors += 1);
        }
        if reply.code == 550 && *reply == Reply::relay_denied() {
            self.conn.live.update(|l| l.relay_denied += 1);
        }
        if reply.code == 530 {
            self.conn.metrics.reject(Rejection::TlsRequired);
            tracing::info!(
                client = %self.conn.client.peer.ip(),
                reason = Rejection::TlsRequired.as_str(),
                "command refused before STARTTLS"
            );
        }
    }

    /// Records why the session ends (the first reason wins: when the
    /// driver asked the session to close, it has already said why, e.g.
    /// which deadline expired) and logs and counts it when it is a
    /// rejection.
    fn closing(&mut self, why: End) {
        if self.end.is_some() {
            return;
        }
        self.end = Some(why);
        let rejection = match why {
            End::IdleTimeout => Rejection::IdleTimeout,
            End::SessionTimeout => Rejection::SessionTimeout,
            End::TooManyErrors => Rejection::TooManyErrors,
            End::HttpRequest => Rejection::HttpRequest,
            End::Kicked => Rejection::Denied,
            End::KickedByOperator => Rejection::Kicked,
            _ => return,
        };
        self.conn.metrics.reject(rejection);
        tracing::info!(
            client = %self.conn.client.peer.ip(),
            reason = rejection.as_str(),
            "closing session"
        );
    }

    /// Copies where the session is into [`Live`] (before each wait for the
    /// client).
    fn refresh_live(&self) {
        let state = match self.session.phase() {
            Phase::Command if self.session.helo().is_none() => SessionState::Greeting,
            Phase::Command => SessionState::Command,
            Phase::Data => SessionState::Data,
            Phase::AwaitingTls => SessionState::TlsHandshake,
            Phase::AwaitingDecision => SessionState::Handoff,
            Phase::Closed => SessionState::Closing,
        };
        let helo = self.session.helo().map(|h| h.name.clone());
        let tls = self.session.tls().cloned();
        self.conn.live.update(|l| {
            l.state = state;
            l.helo = helo;
            l.tls = tls;
        });
    }

    fn refresh_client(&mut self) {
        let client = &mut self.conn.client;
        let helo = self.session.helo();
        client.helo = helo.map(|h| h.name.clone());
        client.esmtp = helo.is_some_and(|h| h.extended);
        client.tls = self.session.tls().cloned();
    }
}

/// The hand-off's own failure replies (spool write or upstream
/// unreachable), as opposed to a verdict relayed from the upstream MTA.
fn is_handoff_failure(reply: &Reply) -> bool {
    reply.code == 451
        && matches!(
            reply.enhanced,
            Some(EnhancedCode(4, 3, 0)) | Some(EnhancedCode(4, 4, 1))
        )
}

/// Version and cipher suite names as in `TLSv1.3`, `TLS13_AES_256_GCM_SHA384`.
fn tls_info(conn: &tokio_rustls::rustls::ServerConnection) -> TlsInfo {
    use tokio_rustls::rustls::ProtocolVersion;
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "unknown".to_string());
    TlsInfo { version, cipher }
}

/// Input read from the client, not yet consumed by the session: a fixed
/// [`READ_CHUNK`]-byte buffer, refilled only once empty.
struct InBuf {
    buf: Box<[u8; READ_CHUNK]>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new() -> Self {
        InBuf {
            buf: Box::new([0; READ_CHUNK]),
            start: 0,
            end: 0,
        }
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
    }
    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
    /// One read into the (empty) buffer; `Ok(0)` at end of stream.
    async fn read_from<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> io::Result<usize> {
        debug_assert!(self.is_empty());
        let n = stream.read(&mut self.buf[..]).await?;
        self.start = 0;
        self.end = n;
        Ok(n)
    }
}

/// The client connection: plaintext until STARTTLS, then TLS.
enum Stream<IO> {
    Plain(IO),
    Tls(Box<TlsStream<IO>>),
    /// Only while the handshake owns the socket.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection handed to TLS")
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

    use super::*;
    use crate::smtp::{AcceptAll, AskDriver, ForwardPath, MailParams, RcptPolicy, ReversePath};

    /// A scripted hand-off that records what it is asked.
    #[derive(Default)]
    struct Script {
        ask: bool,
        message_reply: Option<Reply>,
        seen: Arc<Mutex<Vec<String>>>,
        closed: Arc<AtomicBool>,
    }

    impl Handoff for Script {
        fn rcpt_policy(&self) -> Box<dyn RcptPolicy> {
            if self.ask {
                Box::new(AskDriver)
            } else {
                Box::new(AcceptAll)
            }
        }
        async fn mail(&mut self, c: &ClientInfo, from: &ReversePath, _: &MailParams) -> Reply {
            let line = format!("MAIL {from} helo={:?} esmtp={}", c.helo, c.esmtp);
            self.seen.lock().unwrap().push(line);
            Reply::new(250, None, "upstream ok")
        }
        async fn rcpt(&mut self, _: &ClientInfo, to: &ForwardPath) -> Reply {
            self.seen.lock().unwrap().push(format!("RCPT {to}"));
            match to.to_string().as_str() {
                "<down@example.com>" => Reply::upstream_unavailable(),
                _ => Reply::recipient_ok(),
            }
        }
        async fn message(&mut self, c: &ClientInfo, e: &Envelope, data: &[u8]) -> Reply {
            let line = format!("MESSAGE {} {} {}", c.session_id, e.reverse_path, data.len());
            self.seen.lock().unwrap().push(line);
            self.message_reply
                .clone()
                .unwrap_or_else(|| Reply::queued("Q1"))
        }
        async fn close(&mut self) {
            self.closed.store(true, Ordering::SeqCst);
        }
    }

    fn settings() -> ConnSettings {
        ConnSettings {
            session: SessionParams::new("mx.example.com"),
            idle_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            max_session_duration: Duration::from_secs(60),
            write_timeout: Duration::from_millis(300),
        }
    }

    fn connection<'a>(
        settings: &'a ConnSettings,
        metrics: &'a Metrics,
        stop: Stop,
    ) -> ConnContext<'a> {
        let peer: SocketAddr = "192.0.2.1:4321".parse().unwrap();
        ConnContext {
            settings,
            tls: None,
            metrics,
            client: ClientInfo {
                peer,
                local: "192.0.2.25:25".parse().unwrap(),
                helo: None,
                esmtp: false,
                tls: None,
                session_id: "S1".into(),
            },
            stop,
            live: Arc::default(),
            accepted_at: Instant::now(),
        }
    }

    /// Reads replies until the server closes; returns every line.
    async fn read_all(client: DuplexStream) -> Vec<String> {
        let mut lines = Vec::new();
        let mut r = BufReader::new(client);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return lines;
            }
            lines.push(line.trim_end().to_string());
        }
    }

    #[tokio::test]
    async fn pipelined_commands_and_decisions() {
        let (settings, metrics) = (settings(), Metrics::default());
        let script = Script {
            ask: true,
            ..Script::default()
        };
        let (seen, closed) = (script.seen.clone(), script.closed.clone());
        let (server, mut client) = tokio::io::duplex(64 * 1024);
        let conn = connection(&settings, &metrics, Stop::default());
        let input = "EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\n\
                     RCPT TO:<b@example.com>\r\nRCPT TO:<down@example.com>\r\nDATA\r\n\
                     hello\r\n.\r\nQUIT\r\n";
        client.write_all(input.as_bytes()).await.unwrap();
        let (end, lines) = tokio::join!(serve(server, conn, script), read_all(client));
        assert_eq!(end, End::Quit);
        let codes: Vec<&str> = lines.iter().map(|l| &l[..l.len().min(9)]).collect();
        assert_eq!(
            codes,
            [
                "220 mx.ex",
                "250-mx.ex",
                "250-PIPEL",
                "250-SIZE ",
                "250-ENHAN",
                "250 8BITM",
                "250 2.1.0",
                "250 2.1.5",
                "451 4.4.1",
                "354 End d",
                "250 2.0.0",
                "221 2.0.0"
            ]
        );
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "MAIL <a@example.org> helo=Some(\"client.example.org\") esmtp=true",
                "RCPT <b@example.com>",
                "RCPT <down@example.com>",
                "MESSAGE S1 <a@example.org> 7",
            ]
        );
        assert!(closed.load(Ordering::SeqCst), "Handoff::close called");
        let snap = metrics.snapshot();
        assert_eq!((snap.messages_accepted, snap.handoff_failures), (1, 1));
    }

    #[tokio::test]
    async fn a_421_from_the_handoff_closes() {
        let (settings, metrics) = (settings(), Metrics::default());
        let script = Script {
            message_reply: Some(Reply::new(421, None, "upstream going away")),
            ..Script::default()
        };
        let (server, mut client) = tokio::io::duplex(64 * 1024);
        let conn = connection(&settings, &metrics, Stop::default());
        let input =
            "HELO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n\
                     DATA\r\nx\r\n.\r\nNOOP\r\n";
        client.write_all(input.as_bytes()).await.unwrap();
        let (end, lines) = tokio::join!(serve(server, conn, script), read_all(client));
        assert_eq!(end, End::HandoffClosed);
        assert_eq!(lines.last().unwrap(), "421 4.0.0 upstream going away");
        assert_eq!(metrics.snapshot().messages_accepted, 0);
    }

    /// A client that never reads cannot hold the connection past the write
    /// deadline; a kick ends a stuck write at once.
    #[tokio::test(start_paused = true)]
    async fn stuck_writes() {
        let (settings, metrics) = (settings(), Metrics::default());
        // 16 bytes of buffer: the greeting does not fit.
        let (server, _client) = tokio::io::duplex(16);
        let conn = connection(&settings, &metrics, Stop::default());
        let started = Instant::now();
        let end = serve(server, conn, Script::default()).await;
        assert_eq!(end, End::WriteTimeout);
        assert!(started.elapsed() < Duration::from_secs(2));

        let mut settings = settings;
        settings.write_timeout = Duration::from_secs(3600);
        let stop = Stop::default();
        let (server, _client) = tokio::io::duplex(16);
        let conn = connection(&settings, &metrics, stop.clone());
        let kick = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stop.kick.cancel();
        };
        let (end, ()) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(serve(server, conn, Script::default()), kick)
        })
        .await
        .expect("kick did not end the stuck write");
        assert_eq!(end, End::Kicked);
        assert_eq!(metrics.snapshot().rejected(Rejection::Denied), 1);
    }

    /// A client that says STARTTLS and then never starts the handshake is
    /// cut at the smaller of `handshake_timeout` and `idle_timeout`, on
    /// tokio's paused clock (exact, and instant).
    #[tokio::test(start_paused = true)]
    async fn handshake_deadline() {
        let pki = crate::testing::TestPki::new("conn test CA", &["mx.example.com"]);
        let loaded = crate::tls::load(&pki.certificate, &pki.private_key, None).unwrap();
        let acceptor = TlsAcceptor::from(loaded.server_config);
        let metrics = Metrics::default();
        // Says STARTTLS, then nothing: (how it ended, after how long, replies).
        let stall = |settings: ConnSettings| {
            let (acceptor, metrics) = (&acceptor, &metrics);
            async move {
                let mut conn = connection(&settings, metrics, Stop::default());
                conn.tls = Some(acceptor);
                let (server, mut client) = tokio::io::duplex(64 * 1024);
                client
                    .write_all(b"EHLO client.example.org\r\nSTARTTLS\r\n")
                    .await
                    .unwrap();
                let started = Instant::now();
                let (end, lines) =
                    tokio::join!(serve(server, conn, Script::default()), read_all(client));
                (end, started.elapsed(), lines)
            }
        };
        let mut settings = settings();
        settings.session.tls_mode = crate::smtp::TlsMode::Optional;

        settings.handshake_timeout = Duration::from_secs(2);
        let (end, after, lines) = stall(settings.clone()).await;
        assert_eq!(end, End::TlsFailed);
        assert_eq!(after, Duration::from_secs(2));
        assert_eq!(lines.last().unwrap(), "220 2.0.0 Ready to start TLS");
        assert_eq!(metrics.snapshot().tls_handshakes_failed, 1);

        // The idle timeout is the smaller: it applies.
        settings.handshake_timeout = Duration::from_secs(30);
        let (end, after, _) = stall(settings.clone()).await;
        assert_eq!(end, End::TlsFailed);
        assert_eq!(after, settings.idle_timeout);
    }

    /// Only a complete line moves the inactivity deadline. Paused time: the
    /// client's sleeps and the deadline are tokio's virtual clock, so the
    /// test is instant and its timings exact.
    #[tokio::test(start_paused = true)]
    async fn deadline_is_per_line() {
        let mut settings = settings();
        settings.idle_timeout = Duration::from_millis(300);
        let metrics = Metrics::default();
        let (server, client) = tokio::io::duplex(1024);
        let conn = connection(&settings, &metrics, Stop::default());
        let (read, mut write) = tokio::io::split(client);
        let started = Instant::now();
        let client = async {
            // Full lines every 100 ms for 600 ms: twice the timeout, fine.
            for _ in 0..6 {
                write.write_all(b"NOOP\r\n").await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Then a byte every 100 ms, never an LF.
            for _ in 0..20 {
                if write.write_all(b"N").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let reader = async {
            let mut lines = Vec::new();
            let mut r = BufReader::new(read);
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                lines.push((std::mem::take(&mut line), started.elapsed()));
            }
            lines
        };
        let (end, (), lines) = tokio::join!(serve(server, conn, Script::default()), client, reader);
        assert_eq!(end, End::IdleTimeout);
        let noops = lines.iter().filter(|(l, _)| l.starts_with("250")).count();
        assert_eq!(noops, 6);
        let (last, at) = lines.last().unwrap();
        assert_eq!(last, "421 4.4.2 mx.example.com Error: timeout exceeded\r\n");
        assert!(
            *at < Duration::from_millis(600 + 300 + 250),
            "the trickle was cut after {at:?}"
        );
    }
}
