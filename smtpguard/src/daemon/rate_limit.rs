//! The daemon's side of the XDP SYN rate limit: logs each "client over the
//! limit" event postscreen-style (`RATE LIMIT [203.0.113.9] over 30
//! SYN/min`), counts them, hands them on as a bounded stream (a rate-limit
//! violation for the automatic bans of the `auto` source), and forgets
//! buckets that are full again.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::kernel::{
    rate_limit::{RateSweeper, SWEEP_INTERVAL},
    OverLimit, RateLimiter,
};
use crate::logging;

/// How many events wait for the stream's reader at most; more are logged
/// and counted but not queued, so a flood of distinct sources cannot grow
/// the queue.
pub const EVENT_QUEUE: usize = 1024;

/// The running rate-limit tasks' outputs.
pub struct RateLimitEvents {
    /// Every event, in order, while the reader keeps up (see [`EVENT_QUEUE`]).
    pub stream: mpsc::Receiver<OverLimit>,
    /// Events received from the kernel since the start.
    pub received: Arc<AtomicU64>,
    /// Events not queued because the stream's reader fell behind.
    pub not_queued: Arc<AtomicU64>,
}

/// Starts the event reader and the sweeper on `tasks`; both end with
/// `shutdown`.
pub fn spawn(
    limiter: RateLimiter,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Option<RateLimitEvents> {
    let (mut events, sweeper) = match limiter.into_parts() {
        Ok(parts) => parts,
        Err(e) => {
            tracing::warn!(error = %logging::one_line(&e),
                "the SYN rate limit's events cannot be read: over-limit clients are dropped but not logged");
            return None;
        }
    };
    let (tx, stream) = mpsc::channel(EVENT_QUEUE);
    let received = Arc::new(AtomicU64::new(0));
    let not_queued = Arc::new(AtomicU64::new(0));
    tasks.spawn({
        let (received, not_queued, shutdown) = (
            Arc::clone(&received),
            Arc::clone(&not_queued),
            shutdown.clone(),
        );
        async move {
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = events.next() => e,
                };
                match event {
                    Ok(e) => {
                        let total = received.fetch_add(1, Ordering::Relaxed) + 1;
                        tracing::info!(client = %e.client, limit = e.limit,
                            overflow = e.overflow, events_total = total, "{e}");
                        if tx.try_send(e).is_err() {
                            not_queued.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %logging::one_line(&e),
                            "reading the SYN rate limit's events failed; no more are logged");
                        return;
                    }
                }
            }
        }
    });
    tasks.spawn(sweep(sweeper, shutdown));
    Some(RateLimitEvents {
        stream,
        received,
        not_queued,
    })
}

/// Every [`SWEEP_INTERVAL`], deletes the buckets that are full again (on a
/// blocking thread: a full table is one syscall per entry).
async fn sweep(sweeper: RateSweeper, shutdown: CancellationToken) {
    let mut sweeper = Some(sweeper);
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(mut s) = sweeper.take() else { return };
        let Ok((s, result)) = tokio::task::spawn_blocking(move || {
            let r = s.sweep();
            (s, r)
        })
        .await
        else {
            return;
        };
        match result {
            Ok(0) => {}
            Ok(n) => tracing::debug!(buckets = n, "forgot idle SYN rate-limit buckets"),
            Err(e) => {
                tracing::warn!(error = %logging::one_line(&e), "sweeping the SYN rate-limit table")
            }
        }
        sweeper = Some(s);
    }
}
