//! Test support shared by smtpguard's unit tests, its integration tests,
//! the privileged `tests` crate and the bench, so none keeps its own copy
//! (as aya's `test-helpers`). Built for smtpguard's own unit tests and,
//! elsewhere, behind the `test-support` cargo feature; never in the daemon.
//!
//! - [`TempDir`]: a unique directory removed on drop;
//! - [`TestCa`], [`TestPki`]: certificates made with rcgen at run time;
//! - [`bounded`]: a test future that may not hang the suite;
//! - [`TestDaemon`]: the real daemon binary on loopback, without XDP;
//! - [`client`]: SMTP client steps from chosen loopback addresses;
//! - [`dns`]: a real DNS server (hickory-server) serving test DNSBL zones
//!   (feature `test-support` only).

pub mod client;
mod daemon;
#[cfg(feature = "test-support")]
pub mod dns;
mod pki;
mod tempdir;

use std::{future::Future, time::Duration};

pub use daemon::{config_text, free_port, TestDaemon};
pub use pki::{TestCa, TestPki};
pub use tempdir::TempDir;

/// Runs `test` to completion, failing the test if it takes longer than
/// `limit`, so a bug cannot hang the suite.
///
/// The limit is on tokio's clock: in a test with paused time
/// (`start_paused`) it bounds virtual time, which tokio advances whenever
/// every task waits on a timer.
///
/// # Panics
///
/// When `limit` passes first.
pub async fn bounded<T>(limit: Duration, test: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, test)
        .await
        .unwrap_or_else(|_| panic!("test took longer than {limit:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bounded_returns_the_value_in_time() {
        assert_eq!(bounded(Duration::from_secs(1), async { 7 }).await, 7);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "test took longer than 1s")]
    async fn bounded_fails_a_test_that_hangs() {
        bounded(Duration::from_secs(1), std::future::pending::<()>()).await;
    }
}
