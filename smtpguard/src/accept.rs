//! The one accept loop every listener runs: the SMTP front door, the
//! control socket and the metrics endpoint.
//!
//! accept(2) fails in two ways. Errors of one pending connection (the
//! client reset it before we took it, ...) are retried at once: the next
//! connection is fine. Errors of the process or the system (out of file
//! descriptors, buffers, memory) are not cured by retrying at once, so the
//! loop pauses, from [`BACKOFF_MIN`] doubling up to [`BACKOFF_MAX`] while
//! they last, instead of spinning. An optional [`Semaphore`] caps open
//! connections: its permit is taken *before* accepting (so clients beyond
//! the cap wait in the listen backlog) and handed to the connection, which
//! frees it on every exit path by dropping it.
//!
//! Running out of file descriptors (EMFILE, ENFILE) is met first with the
//! loop's spare descriptor ([`crate::fds::Spare`]): it is closed, the
//! waiting client is accepted on the freed slot and handed over marked
//! [`Accepted::out_of_fds`] (the SMTP front door answers `421 4.3.2` and
//! closes; the control socket serves it, so the operator can still get
//! in), and the spare is taken back as soon as a descriptor is free. Only
//! when no spare is held does the loop pause.

use std::{future::Future, io, sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::fds::{self, Spare};

/// First pause after a failed accept (e.g. out of file descriptors).
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest pause between failed accepts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A listening socket the loop accepts from.
pub trait Listener: Send + Sync {
    /// The connected stream.
    type Stream: Send + 'static;
    /// The peer's address.
    type Addr: Send + 'static;

    /// Accepts one connection (cancel-safe, as Tokio's listeners are).
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        tokio::net::UnixListener::accept(self)
    }
}

/// One accepted connection.
#[derive(Debug)]
pub struct Accepted<S, A> {
    /// The stream.
    pub stream: S,
    /// Who connected.
    pub peer: A,
    /// The connection's place under the cap, when there is one; hold it
    /// for the connection's life.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Accepted on the loop's spare descriptor because the process is out
    /// of descriptors: answer briefly and close (or serve it if it is
    /// vital, like the control socket); the spare comes back once a
    /// descriptor is free.
    pub out_of_fds: bool,
}

/// Accepts on `listener` until `shutdown` is cancelled, and hands each
/// connection to `accepted`, which runs on the loop: it must not block
/// (spawn the connection's work). With `cap`, at most as many connections
/// as it has permits are open at once.
///
/// `what` names the listener in log lines (`"control socket"`).
pub async fn accept_loop<L: Listener>(
    listener: &L,
    what: &'static str,
    cap: Option<Arc<Semaphore>>,
    shutdown: &CancellationToken,
    mut accepted: impl FnMut(Accepted<L::Stream, L::Addr>),
) {
    let mut backoff = BACKOFF_MIN;
    let mut spare = Spare::new();
    loop {
        spare.refill();
        let permit = match &cap {
            Some(cap) => tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                permit = Arc::clone(cap).acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    // Closed: nobody may connect any more.
                    Err(_) => return,
                },
            },
            None => None,
        };
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match result {
            Ok((stream, peer)) => {
                backoff = BACKOFF_MIN;
                accepted(Accepted {
                    stream,
                    peer,
                    permit,
                    out_of_fds: false,
                });
            }
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(listener = what, error = %e, "accept: connection failed before it was accepted");
            }
            Err(e) if fds::is_exhaustion(&e) && spare.release() => {
                // The spare's slot takes the waiting client, who is told.
                let retried = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    r = listener.accept() => r,
                };
                match retried {
                    Ok((stream, peer)) => {
                        tracing::warn!(listener = what, error = %e,
                            "accept: out of file descriptors; answered a client on the spare descriptor");
                        accepted(Accepted {
                            stream,
                            peer,
                            permit,
                            out_of_fds: true,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(listener = what, error = %e, "accept failed on the spare descriptor");
                    }
                }
                spare.refill();
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, pause = ?backoff, "accept failed; pausing");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// [`accept_loop`] that serves each connection with `serve` in its own
/// task on `tracker` (holding its permit under `cap` until it ends).
pub async fn serve_each<L, F, Fut>(
    listener: &L,
    what: &'static str,
    cap: Option<Arc<Semaphore>>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    mut serve: F,
) where
    L: Listener,
    F: FnMut(L::Stream, L::Addr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_loop(listener, what, cap, shutdown, |a| {
        if a.out_of_fds {
            // Closed at once: the descriptor goes back to the spare.
            return;
        }
        let connection = serve(a.stream, a.peer);
        let permit = a.permit;
        tracker.spawn(async move {
            connection.await;
            drop(permit);
        });
    })
    .await;
}

/// Errors of one pending connection that accept(2) reports (see its man
/// page): retry at once. Anything else (EMFILE, ENOBUFS...) backs off.
pub fn is_per_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ENETDOWN
                | libc::EPERM
        )
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A listener that replays scripted results, then waits forever.
    struct Scripted(Mutex<Vec<io::Result<((), ())>>>);

    impl Listener for Scripted {
        type Stream = ();
        type Addr = ();

        fn accept(&self) -> impl Future<Output = io::Result<((), ())>> + Send {
            let next = self.0.lock().unwrap().pop();
            async move {
                match next {
                    Some(r) => r,
                    None => std::future::pending().await,
                }
            }
        }
    }

    fn scripted(mut results: Vec<io::Result<((), ())>>) -> Scripted {
        results.reverse();
        Scripted(Mutex::new(results))
    }

    #[tokio::test(start_paused = true)]
    async fn resource_errors_back_off_and_connection_errors_do_not() {
        let listener = scripted(vec![
            Err(io::Error::from(io::ErrorKind::ConnectionAborted)),
            Ok(((), ())),
            Err(io::Error::from_raw_os_error(libc::ENOBUFS)),
            Err(io::Error::from_raw_os_error(libc::ENOBUFS)),
            Ok(((), ())),
        ]);
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let mut at = Vec::new();
        let run = accept_loop(&listener, "test", None, &shutdown, |_| {
            at.push(started.elapsed());
        });
        tokio::select! {
            _ = run => unreachable!("runs until shutdown"),
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        // The reset cost nothing; the two resource errors (not descriptors:
        // no spare helps) paused 50 ms, then 100 ms.
        assert_eq!(at, [Duration::ZERO, Duration::from_millis(150)]);
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_descriptors_the_spare_takes_the_client_at_once() {
        let listener = scripted(vec![
            Err(io::Error::from_raw_os_error(libc::EMFILE)),
            Ok(((), ())),
            Ok(((), ())),
        ]);
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let mut got = Vec::new();
        let run = accept_loop(&listener, "test", None, &shutdown, |a| {
            got.push((started.elapsed(), a.out_of_fds));
        });
        tokio::select! {
            _ = run => unreachable!("runs until shutdown"),
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        // No pause: the waiting client was accepted on the spare and
        // marked; the next one is served normally.
        assert_eq!(got, [(Duration::ZERO, true), (Duration::ZERO, false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_holds_accepts_until_a_connection_ends() {
        let listener = scripted(vec![Ok(((), ())), Ok(((), ()))]);
        let shutdown = CancellationToken::new();
        let cap = Arc::new(Semaphore::new(1));
        let mut permits = Vec::new();
        let run = accept_loop(&listener, "test", Some(Arc::clone(&cap)), &shutdown, |a| {
            permits.push(a.permit.expect("capped"));
        });
        tokio::select! {
            _ = run => unreachable!("runs until shutdown"),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        // The first connection holds the only permit: the second waits.
        assert_eq!(permits.len(), 1);
        assert_eq!(listener.0.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_loop_during_a_pause() {
        let listener = scripted(vec![Err(io::Error::from_raw_os_error(libc::ENFILE))]);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        accept_loop(&listener, "test", None, &shutdown, |_| {}).await;
    }
}
