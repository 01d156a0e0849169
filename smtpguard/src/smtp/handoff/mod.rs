//! Hand-off of accepted mail: to the upstream MTA (with the real client
//! address by PROXY protocol v2 or XCLIENT) or into a Maildir spool.
//!
//! One [`Delivery`] per daemon (from the configuration); one
//! [`DeliverySession`] per SMTP session, created by the connection driver
//! (`smtp/conn.rs`), which calls it on the session's events:
//! - `Event::NeedDecision(Step::Mail{..})` → [`DeliverySession::mail`]
//! - `Event::NeedDecision(Step::Rcpt{..})` → [`DeliverySession::rcpt`]
//! - `Event::Message{..}` → [`DeliverySession::message`]
//! - session end → [`DeliverySession::close`]
//!
//! Every method returns the [`Reply`] to give the client (passed to
//! `Session::decide`). A message is acknowledged with 2xx only once it is
//! safe: fsync'd in the spool, or accepted by the upstream's final reply.

use std::net::SocketAddr;

mod proxy;
mod received;

use crate::smtp::{Envelope, ForwardPath, MailParams, RcptPolicy, Reply, ReversePath, TlsInfo};

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

/// Where accepted mail goes; built once from `config::Delivery`.
#[derive(Clone)]
pub struct Delivery {
    _private: (),
}

impl Delivery {
    /// Builds the delivery from the configuration. `hostname` is ours (for
    /// `Received:` and the upstream EHLO). Spool mode creates the Maildir
    /// (`tmp/`, `new/`, `cur/`) if missing; errors name the directory.
    pub fn from_config(
        config: &crate::config::Delivery,
        hostname: &str,
    ) -> Result<Delivery, HandoffError> {
        let _ = (config, hostname);
        unimplemented!("written by the hand-off engineer")
    }

    /// Per-session state. `relay_allowed`: the client is in
    /// `relay_networks` (spool mode relay rules).
    pub fn session(&self, relay_allowed: bool) -> DeliverySession {
        let _ = relay_allowed;
        unimplemented!("written by the hand-off engineer")
    }
}

/// One SMTP session's hand-off state (an upstream connection, if any).
pub struct DeliverySession {
    _private: (),
}

impl DeliverySession {
    /// The RCPT policy the `Session` should use: in upstream mode every
    /// MAIL/RCPT is asked of the driver (and so of the upstream); in spool
    /// mode `accept_domains`/`relay_networks` decide.
    pub fn rcpt_policy(&self) -> Box<dyn RcptPolicy> {
        unimplemented!("written by the hand-off engineer")
    }

    /// MAIL FROM (upstream mode): connects if needed (PROXY v2 header or
    /// XCLIENT, EHLO), resets an open upstream transaction, relays MAIL.
    /// Unreachable/failing upstream: `451 4.4.1`.
    pub async fn mail(
        &mut self,
        client: &ClientInfo,
        from: &ReversePath,
        params: &MailParams,
    ) -> Reply {
        let _ = (client, from, params);
        unimplemented!("written by the hand-off engineer")
    }

    /// RCPT TO (upstream mode): relays it, returns the upstream's reply.
    pub async fn rcpt(&mut self, client: &ClientInfo, to: &ForwardPath) -> Reply {
        let _ = (client, to);
        unimplemented!("written by the hand-off engineer")
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
        let _ = (client, envelope, data);
        unimplemented!("written by the hand-off engineer")
    }

    /// The session is over: QUIT the upstream connection, if any.
    pub async fn close(&mut self) {
        unimplemented!("written by the hand-off engineer")
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
