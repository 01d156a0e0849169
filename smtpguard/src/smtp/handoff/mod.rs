//! Hand-off of accepted mail: to the upstream MTA (with the real client
//! address by PROXY protocol v2 or XCLIENT) or into a Maildir spool.
//!
//! One [`Delivery`] per daemon (from the configuration); one
//! [`DeliverySession`] per SMTP session, made through [`HandoffFactory`]
//! for the front door's connection driver, which calls it through
//! [`Handoff`] on the session's events:
//! - `Event::NeedDecision(Step::Mail{..})` → [`DeliverySession::mail`]
//! - `Event::NeedDecision(Step::Rcpt{..})` → [`DeliverySession::rcpt`]
//! - `Event::Message{..}` → [`DeliverySession::message`]
//! - session end → [`DeliverySession::close`]
//!
//! Every method returns the [`Reply`] to give the client (passed to
//! `Session::decide`). A message is acknowledged with 2xx only once it is
//! safe: fsync'd in the spool, or accepted by the upstream's final reply.
//!
//! Both modes prepend a `Received:` trace header (RFC 5321 §4.4) to each
//! message; its shape is described in `received.rs`: `from <helo>
//! ([ip])`, `by <our host> (smtpguard)`, `with ESMTP|ESMTPS|SMTP|SMTPS`,
//! `id <queue id>`, TLS version and cipher in a comment, `for <rcpt>` when
//! there is exactly one recipient, and an RFC 5322 date in UTC.
//!
//! # Upstream mode (`delivery.upstream` set)
//!
//! [`DeliverySession::rcpt_policy`] is [`AskDriver`], so every MAIL and
//! RCPT comes here and is relayed; the upstream's reply is the client's
//! reply (normalised to carry an enhanced code, [`Reply::normalized`]).
//!
//! * The first MAIL of a session connects (within `upstream_timeout`) and
//!   sends the PROXY v2 header (`proxy-v2`, before anything else), or does
//!   the Postfix XCLIENT exchange after EHLO (`xclient`: `ADDR`, `PORT`,
//!   `NAME=[UNAVAILABLE]`, `HELO`, `PROTO`, xtext-encoded, then EHLO
//!   again), or neither (`none`); reads the 220 greeting; EHLOs with our
//!   host name (HELO if EHLO is refused). Later MAILs of the session reuse
//!   the connection; if a transaction is still open upstream (the client
//!   sent RSET, or the previous transaction failed) RSET goes first. If the
//!   reused connection turns out to be dead (the upstream closed it while
//!   the client idled), one new connection is tried at once.
//! * MAIL carries `SIZE=` / `BODY=` only when the upstream offers `SIZE` /
//!   `8BITMIME`.
//! * The message: `DATA`, `354`, our `Received:` then the body dot-stuffed
//!   (RFC 5321 §4.5.2), `.`; the reply to the final dot is returned, so
//!   the client gets its 250 only after the upstream's. Anything the
//!   upstream sends between its `354` and our final dot (a `250` in the
//!   same write as the `354`, say) is not an answer to the message: the
//!   client gets `451 4.3.0`, the message is not acknowledged, and the
//!   upstream connection is dropped (as for extra replies after RCPT).
//! * Every upstream reply is awaited at most `upstream_timeout` and may be
//!   at most 64 KiB long. UpstreamConnection refused, timeout, a 421, a non-220
//!   greeting, garbage, a lost connection, XCLIENT not offered: the client
//!   gets `451 4.4.1` (temporary: it keeps the message and retries), the
//!   upstream connection is dropped, and the next MAIL reconnects. Each
//!   such failure is logged (warn) with the session id and the step.
//! * A loop (the upstream leads back to smtpguard, which the
//!   configuration check could not see, e.g. through NAT): a session whose
//!   client address and port are the local end of one of this delivery's
//!   open upstream connections gets `451 4.4.6` at MAIL (RFC 3463 X.4.6,
//!   routing loop detected), logged as an error, and opens no upstream
//!   connection of its own, so the cascade stops at the second hop.
//! * [`DeliverySession::close`] sends QUIT and waits at most 5 s (or the
//!   upstream timeout, if shorter) for the answer.
//!
//! # Spool mode (`delivery.upstream` absent)
//!
//! [`DeliverySession::rcpt_policy`] is [`DomainPolicy`]: recipients in
//! `accept_domains` (or `<postmaster>`) from anyone, any recipient from
//! clients in `relay_networks` (checked by [`Delivery::session`]), otherwise
//! `550 5.7.1`.
//!
//! Each message becomes one file in the Maildir `spool_dir`: written to
//! `tmp/`, fsync'd, renamed into `new/`, `new/` fsync'd, and only then
//! `250 2.0.0 Ok: queued as <id>`. Any I/O error: `451 4.3.0`, nothing
//! left behind. File names follow the Maildir convention
//! `<unix seconds>.<id>.<host>`, where `<id>` =
//! `M<microseconds>P<pid>Q<counter>R<16 hex digits random>` is also the
//! queue id in the reply, the `Received:` header and the log.
//!
//! Maildir has no envelope, so the file starts with it, as header fields
//! above our `Received:`:
//!
//! ```text
//! Return-Path: <sender@example.org>          (the MAIL FROM path; <> for bounces)
//! X-Smtpguard-Rcpt: <bob@example.com>        (one per accepted RCPT TO, in order)
//! X-Smtpguard-Rcpt: <carol@example.com>
//! Received: from mail.example.org ([192.0.2.10]) by mx.example.com
//!         (smtpguard) with ESMTP id M...; Sun, 29 Nov 2026 09:43:48 +0000
//! <the message exactly as received: CRLF line ends, not dot-stuffed>
//! ```
//!
//! Everything above the first `Received:` line is written by smtpguard
//! and can be trusted; fields further down came from the client (which can
//! write its own `X-Smtpguard-Rcpt:` there, so tools must stop at the
//! first `Received:`). To re-inject a spooled message, e.g.:
//! `sendmail -i -f <Return-Path> <each X-Smtpguard-Rcpt> < file`, after
//! removing the `Return-Path:` and `X-Smtpguard-Rcpt:` lines (they list
//! every recipient, Bcc included). `-i` matters: the file is not
//! dot-stuffed, so a line that is a lone `.` (`..` from the client) is
//! stored as `.`, and sendmail without `-i` stops reading there
//! (`tests/tests/postfix_handoff.rs` re-injects such a message into
//! Postfix and compares). A message is at most
//! `max_message_size` plus these few lines.
//!
//! Logged per message (info): session id, queue id, size in bytes,
//! number of recipients; never addresses or content.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::smtp::{
    AskDriver, EnhancedCode, Envelope, ForwardPath, MailParams, RcptDecision, RcptPolicy, Reply,
    ReversePath, TlsInfo,
};

mod factory;
mod proxy;
mod received;
mod relay;
mod settings;
mod spool;
mod upstream;

#[cfg(test)]
mod tests;

pub use factory::{Handoff, HandoffFactory};
pub use relay::DomainPolicy;
pub use settings::{DeliverySettings, SpoolSettings, UpstreamProtocol, UpstreamSettings};
use spool::{Maildir, QueueId};
use upstream::{OwnConnections, UpstreamConnection, UpstreamError};

/// What the hand-off knows about the client, for PROXY/XCLIENT and the
/// `Received:` trace header (RFC 5321 §4.4).
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// The client's address; IPv4-mapped IPv6 already normalised to IPv4.
    pub peer: SocketAddr,
    /// Our address the client connected to.
    pub local: SocketAddr,
    /// The EHLO/HELO name, once given.
    pub helo: Option<String>,
    /// Whether EHLO (not HELO) was used: `ESMTP` vs `SMTP` in `Received:` (RFC 3848 `with`).
    pub esmtp: bool,
    /// TLS version and cipher, once STARTTLS completed.
    pub tls: Option<TlsInfo>,
    /// Unique session id for logs and queue ids.
    pub session_id: String,
}

/// Where accepted mail goes; built once from [`DeliverySettings`].
///
/// Cheap to clone (one shared allocation).
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

struct Inner {
    /// Ours: `Received: ... by <hostname>`, the upstream EHLO.
    hostname: String,
    target: Target,
    /// Upstream mode: the local addresses of our open upstream
    /// connections, to recognise a session that is one of them (a loop).
    own: Arc<OwnConnections>,
}

enum Target {
    Upstream(UpstreamSettings),
    Spool {
        maildir: Arc<Maildir>,
        accept_domains: Vec<String>,
        relay_networks: Vec<IpNet>,
    },
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Delivery");
        d.field("hostname", &self.inner.hostname);
        match &self.inner.target {
            Target::Upstream(u) => d.field("upstream", u),
            Target::Spool { maildir, .. } => d.field("spool", &maildir.dir()),
        };
        d.finish_non_exhaustive()
    }
}

impl Delivery {
    /// Builds the delivery. `hostname` is ours (for `Received:` and the
    /// upstream EHLO). Spool mode creates the Maildir (`tmp/`, `new/`,
    /// `cur/`) if missing; errors name the directory.
    pub fn new(settings: &DeliverySettings, hostname: &str) -> Result<Delivery, HandoffError> {
        let target = match settings {
            DeliverySettings::Upstream(u) => Target::Upstream(u.clone()),
            DeliverySettings::Spool(s) => Target::Spool {
                maildir: Arc::new(Maildir::open(&s.dir, hostname)?),
                accept_domains: s.accept_domains.clone(),
                relay_networks: s.relay_networks.clone(),
            },
        };
        Ok(Delivery {
            inner: Arc::new(Inner {
                hostname: hostname.to_string(),
                target,
                own: Arc::default(),
            }),
        })
    }

    /// Per-session state for a session from `client`, which may relay
    /// (send to any domain) in spool mode when its address is in
    /// `relay_networks`.
    pub fn session(&self, client: IpAddr) -> DeliverySession {
        DeliverySession {
            delivery: self.clone(),
            relay_allowed: self.relay_allowed(client),
            upstream: None,
            txn_open: false,
        }
    }

    /// Whether a client at `ip` may relay: spool mode, `ip` inside one of
    /// `relay_networks` (an IPv4-mapped IPv6 address is matched as IPv4).
    /// Always false in upstream mode, where the upstream MTA decides.
    fn relay_allowed(&self, ip: IpAddr) -> bool {
        match &self.inner.target {
            Target::Upstream(_) => false,
            Target::Spool { relay_networks, .. } => {
                let ip = ip.to_canonical();
                relay_networks.iter().any(|n| n.contains(&ip))
            }
        }
    }

    /// Whether this is upstream mode (every MAIL/RCPT is relayed).
    #[cfg(test)]
    fn is_upstream(&self) -> bool {
        matches!(self.inner.target, Target::Upstream(_))
    }
}

/// One SMTP session's hand-off state (an upstream connection, if any).
///
/// Cancel-safe: if a future returned by one of its methods is dropped
/// before it completes, the upstream connection it was using is dropped
/// with it and the next MAIL reconnects.
pub struct DeliverySession {
    delivery: Delivery,
    relay_allowed: bool,
    /// Upstream mode: the connection, once a MAIL made one and while it is
    /// healthy.
    upstream: Option<UpstreamConnection>,
    /// MAIL was sent on `upstream` and no RSET or final reply to DATA has
    /// ended that transaction since.
    txn_open: bool,
}

impl fmt::Debug for DeliverySession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliverySession")
            .field("delivery", &self.delivery)
            .field("relay_allowed", &self.relay_allowed)
            .field("connected", &self.upstream.is_some())
            .field("txn_open", &self.txn_open)
            .finish()
    }
}

/// `2.1.0` (MAIL), `2.1.5` (RCPT), `2.0.0` (message): what a 2xx from the
/// upstream without an enhanced code gets.
const MAIL_OK: EnhancedCode = EnhancedCode(2, 1, 0);
const RCPT_OK: EnhancedCode = EnhancedCode(2, 1, 5);
const DATA_OK: EnhancedCode = EnhancedCode(2, 0, 0);

impl DeliverySession {
    /// The RCPT policy the `Session` should use: in upstream mode every
    /// MAIL/RCPT is asked of the driver (and so of the upstream); in spool
    /// mode `accept_domains`/`relay_networks` decide.
    pub fn rcpt_policy(&self) -> Box<dyn RcptPolicy> {
        match &self.delivery.inner.target {
            Target::Upstream(_) => Box::new(AskDriver),
            Target::Spool { accept_domains, .. } => {
                Box::new(DomainPolicy::new(accept_domains, self.relay_allowed))
            }
        }
    }

    /// MAIL FROM (upstream mode): connects if needed (PROXY v2 header or
    /// XCLIENT, EHLO), resets an open upstream transaction, relays MAIL.
    /// Unreachable/failing upstream: `451 4.4.1`.
    ///
    /// In spool mode (where the session's policy does not ask) this just
    /// accepts: `250 2.1.0`.
    pub async fn mail(
        &mut self,
        client: &ClientInfo,
        from: &ReversePath,
        params: &MailParams,
    ) -> Reply {
        let delivery = self.delivery.clone();
        let Target::Upstream(cfg) = &delivery.inner.target else {
            return Reply::sender_ok();
        };
        if delivery.inner.own.contains(client.peer) {
            tracing::error!(
                session = %client.session_id,
                upstream = %cfg.address,
                client = %client.peer,
                "mail loop: this session comes from our own upstream connection \
                 (delivery.upstream leads back to smtpguard); answering 451 4.4.6"
            );
            return Reply::mail_loop();
        }
        if let Some(mut conn) = self.upstream.take() {
            let reset_first = std::mem::replace(&mut self.txn_open, false);
            match mail_on(&mut conn, reset_first, from, params).await {
                Ok(r) => return self.mail_sent(conn, r),
                Err(e @ UpstreamError::Timeout(_)) => {
                    return upstream_failed(client, cfg, "MAIL", &e);
                }
                Err(e) => tracing::debug!(
                    session = %client.session_id,
                    upstream = %cfg.address,
                    error = %Chain(&e),
                    "reused upstream connection failed; reconnecting"
                ),
            }
        }
        let mut conn = match UpstreamConnection::open(
            cfg,
            &delivery.inner.hostname,
            client,
            &delivery.inner.own,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return upstream_failed(client, cfg, "connect", &e),
        };
        tracing::debug!(
            session = %client.session_id,
            upstream = %conn.address(),
            protocol = ?cfg.protocol,
            extensions = ?conn.extensions(),
            "connected to upstream"
        );
        match conn.mail(from, params).await {
            Ok(r) => self.mail_sent(conn, r),
            Err(e) => upstream_failed(client, cfg, "MAIL", &e),
        }
    }

    fn mail_sent(&mut self, conn: UpstreamConnection, r: Reply) -> Reply {
        self.upstream = Some(conn);
        // Even a refused MAIL is followed by RSET next time: harmless, and
        // the upstream's idea of the state is then certain.
        self.txn_open = true;
        r.normalized(MAIL_OK)
    }

    /// RCPT TO (upstream mode): relays it, returns the upstream's reply.
    ///
    /// In spool mode this applies the [`DomainPolicy`] (the session does
    /// that itself; this is for a driver that asks anyway).
    pub async fn rcpt(&mut self, client: &ClientInfo, to: &ForwardPath) -> Reply {
        let delivery = self.delivery.clone();
        let cfg = match &delivery.inner.target {
            Target::Upstream(cfg) => cfg,
            Target::Spool { .. } => {
                let envelope = Envelope {
                    reverse_path: ReversePath::Null,
                    forward_paths: Vec::new(),
                    body: None,
                    declared_size: None,
                };
                return match self.rcpt_policy().rcpt(to, &envelope) {
                    RcptDecision::Reject(r) => r,
                    RcptDecision::Accept | RcptDecision::Ask => Reply::recipient_ok(),
                };
            }
        };
        let Some(mut conn) = self.upstream.take() else {
            return no_connection(client, cfg, "RCPT");
        };
        match conn.command(&format!("RCPT TO:{to}"), "RCPT").await {
            Ok(r) => {
                self.upstream = Some(conn);
                r.normalized(RCPT_OK)
            }
            Err(e) => {
                self.txn_open = false;
                upstream_failed(client, cfg, "RCPT", &e)
            }
        }
    }

    /// The message (`data`: unstuffed, CRLF line ends, no final dot):
    /// prepends `Received:`, then spools it (fsync file and directory, then
    /// `250 2.0.0 Ok: queued as <id>`) or relays DATA upstream (dot-stuffed)
    /// and returns the upstream's final reply.
    pub async fn message(
        &mut self,
        client: &ClientInfo,
        envelope: &Envelope,
        data: &[u8],
    ) -> Reply {
        let delivery = self.delivery.clone();
        let id = QueueId::new();
        let received = received::received_header(
            client,
            &delivery.inner.hostname,
            &id.unique,
            &envelope.forward_paths,
            SystemTime::now(),
        );
        match &delivery.inner.target {
            Target::Spool { maildir, .. } => {
                spool_message(maildir, client, envelope, &id, received, data).await
            }
            Target::Upstream(cfg) => {
                self.upstream_message(cfg, client, envelope, &id, &received, data)
                    .await
            }
        }
    }

    async fn upstream_message(
        &mut self,
        cfg: &UpstreamSettings,
        client: &ClientInfo,
        envelope: &Envelope,
        id: &QueueId,
        received: &str,
        data: &[u8],
    ) -> Reply {
        let Some(mut conn) = self.upstream.take() else {
            return no_connection(client, cfg, "DATA");
        };
        let r = match conn.command("DATA", "DATA").await {
            Ok(r) => r,
            Err(e) => {
                self.txn_open = false;
                return upstream_failed(client, cfg, "DATA", &e);
            }
        };
        if r.code != 354 {
            if r.is_negative() {
                // e.g. 554 no valid recipients: the upstream's answer.
                // The transaction stays open there: RSET before next MAIL.
                self.upstream = Some(conn);
                return r.normalized(DATA_OK);
            }
            self.txn_open = false;
            let e = UpstreamError::Unexpected {
                stage: "DATA",
                reply: r.to_string().trim_end().to_string(),
            };
            return upstream_failed(client, cfg, "DATA", &e);
        }
        self.txn_open = false;
        let r = match conn.send_message(received.as_bytes(), data).await {
            Ok(r) => r,
            Err(e @ UpstreamError::Unsolicited { .. }) => {
                // e.g. `354` and `250` in one write: whatever the upstream
                // finally says about the message, it was not asked in
                // order. Not acknowledged; the client retries later.
                tracing::warn!(
                    session = %client.session_id,
                    upstream = %cfg.address,
                    error = %Chain(&e),
                    "upstream replied before the end of data; answering 451 4.3.0"
                );
                return Reply::local_error();
            }
            Err(e) => return upstream_failed(client, cfg, "end of data", &e),
        };
        if r.code == 421 || !(200..=599).contains(&r.code) || r.class() == 3 {
            let e = UpstreamError::Unexpected {
                stage: "end of data",
                reply: r.to_string().trim_end().to_string(),
            };
            return upstream_failed(client, cfg, "end of data", &e);
        }
        self.upstream = Some(conn);
        let first_line = r.lines.first().cloned().unwrap_or_default();
        if r.is_positive() {
            tracing::info!(
                session = %client.session_id,
                queue_id = %id.unique,
                size = data.len(),
                recipients = envelope.forward_paths.len(),
                upstream = %cfg.address,
                upstream_reply = %format_args!("{} {}", r.code, first_line),
                "message relayed to upstream"
            );
        } else {
            tracing::info!(
                session = %client.session_id,
                queue_id = %id.unique,
                size = data.len(),
                recipients = envelope.forward_paths.len(),
                upstream = %cfg.address,
                upstream_reply = %format_args!("{} {}", r.code, first_line),
                "message refused by upstream"
            );
        }
        r.normalized(DATA_OK)
    }

    /// The open upstream connection as `local -> remote` (for `smtpguard
    /// sessions`); `None` in spool mode or when not connected.
    pub fn upstream(&self) -> Option<String> {
        let conn = self.upstream.as_ref()?;
        let local = conn
            .local_address()
            .map_or_else(|| "?".to_owned(), |a| a.to_string());
        Some(format!("{local} -> {}", conn.address()))
    }

    /// The session is over: QUIT the upstream connection, if any.
    pub async fn close(&mut self) {
        self.txn_open = false;
        if let (Some(conn), Target::Upstream(cfg)) =
            (self.upstream.take(), &self.delivery.inner.target)
        {
            conn.quit(upstream::QUIT_WAIT.min(cfg.timeout)).await;
        }
    }
}

/// RSET (when a transaction is open) then MAIL on an existing connection.
async fn mail_on(
    conn: &mut UpstreamConnection,
    reset_first: bool,
    from: &ReversePath,
    params: &MailParams,
) -> Result<Reply, UpstreamError> {
    if reset_first {
        let r = conn.command("RSET", "RSET").await?;
        if r.code != 250 {
            return Err(UpstreamError::Unexpected {
                stage: "RSET",
                reply: r.to_string().trim_end().to_string(),
            });
        }
    }
    conn.mail(from, params).await
}

/// Log an upstream failure; the client's answer is `451 4.4.1`.
fn upstream_failed(
    client: &ClientInfo,
    cfg: &UpstreamSettings,
    step: &'static str,
    e: &UpstreamError,
) -> Reply {
    tracing::warn!(
        session = %client.session_id,
        upstream = %cfg.address,
        step,
        kind = e.kind(),
        error = %Chain(e),
        "upstream hand-off failed; answering 451 4.4.1"
    );
    Reply::upstream_unavailable()
}

/// An error and its causes, `: `-separated, for one log field (the
/// messages never repeat their cause, so this is how it gets logged).
struct Chain<'a>(&'a dyn std::error::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// RCPT or DATA with no upstream connection (an earlier step failed).
fn no_connection(client: &ClientInfo, cfg: &UpstreamSettings, step: &'static str) -> Reply {
    tracing::warn!(
        session = %client.session_id,
        upstream = %cfg.address,
        step,
        "no upstream connection (an earlier step failed); answering 451 4.4.1"
    );
    Reply::upstream_unavailable()
}

/// Writes the message into the Maildir without blocking the runtime's
/// worker threads: `block_in_place` on a multi-threaded runtime (no copy
/// of the message), otherwise a copy handed to `spawn_blocking`.
async fn spool_message(
    maildir: &Arc<Maildir>,
    client: &ClientInfo,
    envelope: &Envelope,
    id: &QueueId,
    received: String,
    data: &[u8],
) -> Reply {
    let mut head = String::with_capacity(received.len() + 64 * (1 + envelope.forward_paths.len()));
    head.push_str(&format!("Return-Path: {}\r\n", envelope.reverse_path));
    for rcpt in &envelope.forward_paths {
        head.push_str(&format!("X-Smtpguard-Rcpt: {rcpt}\r\n"));
    }
    head.push_str(&received);
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let result = if multi_thread {
        tokio::task::block_in_place(|| maildir.deliver(id, &[head.as_bytes(), data]))
    } else {
        let (md, id2, data) = (Arc::clone(maildir), id.clone(), data.to_vec());
        tokio::task::spawn_blocking(move || md.deliver(&id2, &[head.as_bytes(), &data]))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("spool task failed: {e}"))))
    };
    match result {
        Ok(_) => {
            tracing::info!(
                session = %client.session_id,
                queue_id = %id.unique,
                size = data.len(),
                recipients = envelope.forward_paths.len(),
                "message spooled"
            );
            Reply::queued(&id.unique)
        }
        Err(e) => {
            tracing::error!(
                session = %client.session_id,
                queue_id = %id.unique,
                dir = %maildir.dir().display(),
                error = %e,
                "spool write failed; answering 451 4.3.0"
            );
            Reply::local_error()
        }
    }
}

/// Errors building a [`Delivery`].
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The spool directory cannot be created or is not writable.
    #[error("spool directory {path}: cannot create or write it")]
    Spool {
        /// The directory.
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}
