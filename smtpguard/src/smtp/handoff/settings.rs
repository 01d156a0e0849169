//! Where accepted mail goes, as the hand-off needs it: plain values the
//! daemon builds from `[delivery]` (no file format here).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

/// The delivery mode, one per daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliverySettings {
    /// Each session is relayed to an upstream MTA.
    Upstream(UpstreamSettings),
    /// Messages are written to a Maildir spool.
    Spool(SpoolSettings),
}

/// Relaying sessions to an upstream MTA.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    /// The MTA's SMTP address.
    pub address: SocketAddr,
    /// How the MTA learns the real client address.
    pub protocol: UpstreamProtocol,
    /// Longest wait for the connection, and for each reply and write.
    pub timeout: Duration,
}

/// How the upstream MTA learns the real client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// A HAProxy PROXY protocol version 2 header before SMTP.
    ProxyV2,
    /// The Postfix XCLIENT command after EHLO.
    Xclient,
    /// Plain SMTP: the MTA sees smtpguard's address as the client.
    None,
}

/// Writing messages to a Maildir spool.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolSettings {
    /// The Maildir (`tmp/`, `new/`, `cur/` inside; created if missing).
    pub dir: PathBuf,
    /// Recipient domains accepted from any client (compared without case).
    pub accept_domains: Vec<String>,
    /// Clients in these networks may send to any domain.
    pub relay_networks: Vec<IpNet>,
}
