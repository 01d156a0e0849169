//! smtpguard: guards the SMTP port of a Linux mail gateway.
//!
//! Two layers (see README.md for the picture):
//! - the kernel fast path, an XDP program that drops SYNs from denied
//!   sources ([`kernel`] loads it and owns its maps);
//! - the SMTP front door ([`smtp`], [`front_door`]) that terminates what gets
//!   through: connection cap, inactivity timeout, STARTTLS, hand-off to the
//!   MTA or the Maildir spool.
//!
//! [`policy`] holds the permit/deny lists and the verdict both layers share,
//! [`config`] the validated configuration, [`tls`] the certificate loading,
//! [`time`] the dates written in headers, lists and messages.
//! [`daemon`] starts and wires everything and owns the one path by which
//! lists change; [`control`] is the operator's control socket and
//! [`cli`] the command line (daemon and controller in one binary);
//! [`logging`] and [`metrics`] are what the operator watches; [`accept`]
//! is the accept loop every listener runs; [`fds`] the file-descriptor
//! budget it and the daemon keep.

pub mod accept;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dnsbl;
pub mod fds;
pub mod files;
pub mod fleet;
pub mod front_door;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod smtp;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod time;
pub mod tls;
