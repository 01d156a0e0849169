//! The access check made on every accepted connection, before any byte
//! is sent: the daemon's lists as the front door asks them.

use std::net::IpAddr;

use super::counters::Rejection;

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
