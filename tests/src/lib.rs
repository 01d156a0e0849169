//! Helpers for smtpguard's privileged integration tests: frame builders
//! ([`packet`]) and a raw frame sender for floods ([`flood`]),
//! network-namespace scaffolding that cleans up after itself ([`netns`]),
//! the three-way lookup oracle ([`oracle`]), a private Postfix ([`postfix`]),
//! the frozen LPM-trie program ([`trie_reference`]), and bounded waiting
//! ([`wait_for`], [`run_bounded`]).

pub mod etcd;
pub mod flood;
pub mod netns;
pub mod oracle;
pub mod packet;
pub mod postfix;
pub mod trie_reference;

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

/// Fails the calling test with a clear message unless running as root:
/// these tests load BPF programs and create namespaces. Never skips.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the kernel tests need root (BPF, network namespaces); run `sudo cargo xtask test`"
    );
}

/// Polls `ok` every 50 ms for up to `limit`; whether it held.
pub fn wait_for(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `cmd` to completion, killing it after `limit`.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Result<Output, String> {
    let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} took longer than {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
    child.wait_with_output().map_err(|e| e.to_string())
}
