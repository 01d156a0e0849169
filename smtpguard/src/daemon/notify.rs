//! systemd readiness for `Type=notify` units (sd_notify(3)), through the
//! `sd-notify` crate: a no-op when `NOTIFY_SOCKET` is unset (not started by
//! systemd), and a failure to notify is logged, never fatal.
//!
//! - `READY=1` once the lists are in the kernel, XDP is attached and every
//!   listener is bound;
//! - `RELOADING=1` (with `MONOTONIC_USEC`, as systemd 253+ wants) when a
//!   reload starts, `READY=1` when it ends, whether it applied or not;
//! - `STOPPING=1` when shutdown begins.

use sd_notify::NotifyState;

/// `READY=1` and a status line (`systemctl status` shows it).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` + `MONOTONIC_USEC`.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
