//! The operator's control socket: how `smtpguard deny add ...` and the
//! other CLI commands reach the running daemon.
//!
//! - [`proto`]: the typed requests and replies (plain data, JSON on the
//!   wire);
//! - [`server`]: the daemon's side, a Unix socket (mode 0600, root and the
//!   daemon's own uid only, checked with SO_PEERCRED) that hands each
//!   request to a [`ControlHandler`] the daemon implements;
//! - [`client`]: the CLI's side;
//! - [`render`]: the CLI's human-readable output.
//!
//! # Framing
//!
//! Newline-delimited JSON: each request and each reply is one line of
//! compact JSON (JSON escapes line breaks inside strings, so a whole list
//! file fits in one line) of at most [`MAX_FRAME_BYTES`] bytes. A
//! connection carries any number of request/reply pairs in turn; the CLI
//! uses one per connection. For debugging, as root:
//!
//! ```text
//! echo '{"op":"status"}' | socat - UNIX-CONNECT:/run/smtpguard/control.sock
//! ```
//!
//! This module depends on no other part of smtpguard except the shared
//! accept loop ([`crate::accept`]) and the policy's mode and enforcement
//! (their serde names are the wire names), so the daemon, config and
//! front-door code can change freely behind the [`ControlHandler`] the
//! daemon implements.

pub mod client;
pub mod proto;
pub mod render;
pub mod server;

pub use client::{Client, ClientError};
pub use proto::{Request, Response};
pub use server::{
    bind, run, serve, ClientWaiting, ControlError, ControlHandler, ControlListener, PeerInfo,
};

/// The control socket's path when the configuration does not say
/// (`control.socket`).
pub const DEFAULT_SOCKET: &str = "/run/smtpguard/control.sock";

/// The longest Unix socket path Linux accepts, in bytes: `sun_path` is 108
/// bytes including the terminating NUL (unix(7)). `control.socket` is
/// checked against it when the configuration is read.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// The largest request or reply, in bytes of JSON (64 MiB): room for
/// importing a list file of several megabytes sent whole, with JSON
/// escaping.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
