//! Helpers for smtpguard's privileged integration tests: frame builders
//! ([`packet`]) and network-namespace scaffolding that cleans up after
//! itself ([`netns`]).

pub mod bench;
pub mod netns;
pub mod packet;

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
