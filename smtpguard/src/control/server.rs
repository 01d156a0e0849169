//! The daemon's side of the control socket: binding it safely, checking who
//! connects, framing, and handing each [`Request`] to a [`ControlHandler`].
//!
//! Call [`bind`] at startup (so a second daemon, a bad path or missing
//! permissions fail before anything else is started), then [`run`] it until
//! shutdown; [`serve`] does both.

use std::{
    fs,
    future::Future,
    io,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    },
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt, SinkExt, StreamExt};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::{
    socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr},
    stat::{fchmod, Mode},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};
use tokio_util::{
    codec::{Framed, LinesCodec, LinesCodecError},
    sync::CancellationToken,
    task::TaskTracker,
};
use tracing::{debug, info, warn};

use super::{
    proto::{Request, Response},
    MAX_FRAME_BYTES, MAX_SOCKET_PATH_BYTES,
};
use crate::accept::accept_loop;

/// How long a connected client may take to send a complete request (or
/// the next one) before the connection is closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this many control connections are served at once (more wait
/// in the listen backlog), so that operators' commands fit in the
/// file descriptors the daemon keeps in reserve ([`crate::fds::RESERVE`]).
pub const MAX_CONNECTIONS: usize = 32;

/// On shutdown, how long requests being handled may take to finish before
/// their connections are cut.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the daemon does with control requests. The daemon implements it;
/// the server calls [`handle`](ControlHandler::handle) once per request,
/// from a task per connection, so calls may run concurrently.
///
/// The peer has already been checked (root or the daemon's own uid) when
/// `handle` is called.
pub trait ControlHandler: Send + Sync + 'static {
    /// Carries out `request` and says how it went. Failures are
    /// [`Response::Error`] (see [`Response::error`]); a panic is caught and
    /// answered with an error too, but the daemon should not rely on that.
    ///
    /// `client` tells whether the client is still connected: a handler
    /// that makes a change should ask it once the change's turn has come
    /// and make none if the client has gone (it gave up waiting and may
    /// have reported failure).
    fn handle(
        &self,
        request: Request,
        peer: PeerInfo,
        client: ClientWaiting,
    ) -> impl Future<Output = Response> + Send;
}

/// Whether the client of a request is still there to get the reply.
///
/// A client that was killed or gave up has closed its end: its socket
/// then polls as hung up (`POLLHUP`; a client that only shut down its
/// writing side still waits for the reply and is not taken as gone). Holds
/// a duplicate of the connection's descriptor, so it may be asked from any
/// thread for as long as the request runs.
#[derive(Debug)]
pub struct ClientWaiting {
    /// `None` when the descriptor could not be duplicated (out of
    /// descriptors): the client is then taken as present.
    fd: Option<OwnedFd>,
}

impl ClientWaiting {
    /// Watches the client on the other end of `stream`.
    pub fn of(stream: &impl AsFd) -> ClientWaiting {
        ClientWaiting {
            fd: stream.as_fd().try_clone_to_owned().ok(),
        }
    }

    /// A client that is never taken as gone (for callers with no
    /// connection).
    pub fn always() -> ClientWaiting {
        ClientWaiting { fd: None }
    }

    /// Whether the client has closed its end of the connection (asked
    /// without waiting).
    pub fn has_left(&self) -> bool {
        let Some(fd) = &self.fd else {
            return false;
        };
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::empty())];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            _ => false,
        }
    }
}

/// Who is on the other end of a control connection (SO_PEERCRED: the
/// credentials of the process at the time it connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's effective user id.
    pub uid: u32,
    /// The peer's effective group id.
    pub gid: u32,
    /// The peer's process id, when the kernel reports it (it does on
    /// Linux; `None` if the peer is in another PID namespace).
    pub pid: Option<i32>,
}

/// The control socket could not be set up.
///
/// Messages are one line and name the path; an underlying I/O error is the
/// [`source`](std::error::Error::source) (print the chain with `{:#}`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Something answers on the socket path: a daemon is running.
    #[error("another smtpguard daemon is running (control socket {} answers)", path.display())]
    AnotherDaemon {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket; it is left alone.
    #[error("{} exists and is not a socket; not replacing it with the control socket", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The path does not fit in a Unix socket address.
    #[error(
        "control socket path {} is longer than {MAX_SOCKET_PATH_BYTES} bytes",
        path.display()
    )]
    PathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// A system call failed; `action` says which step.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// The step, e.g. `"bind the control socket"`.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ControlError + 'a {
    move |source| ControlError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A bound, listening control socket, not yet serving. Dropping it closes
/// the socket and removes the socket file.
#[derive(Debug)]
pub struct ControlListener {
    listener: std::os::unix::net::UnixListener,
    file: SocketFile,
    max_frame_bytes: usize,
}

impl ControlListener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Changes the largest request accepted, in bytes (default
    /// [`MAX_FRAME_BYTES`]); larger requests get an error reply. Replies
    /// larger than this are replaced by an error too.
    pub fn set_max_frame_bytes(&mut self, bytes: usize) {
        self.max_frame_bytes = bytes;
    }
}

/// The socket file we created, identified by device and inode so that we
/// never remove a file another process has put there since.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                match fs::remove_file(&self.path) {
                    Ok(()) => debug!(path = %self.path.display(), "removed the control socket"),
                    Err(e) => warn!(
                        path = %self.path.display(),
                        "cannot remove the control socket: {e}"
                    ),
                }
            }
        }
    }
}

/// Creates the control socket at `path`, mode 0600, listening.
///
/// The parent directory is created (mode 0755) if missing. A socket file
/// left by a crashed daemon (connecting is refused) is replaced; one that
/// answers means another daemon is running, and is an error. A path that
/// exists and is not a socket is never removed.
///
/// The socket's mode is set on the socket before `bind(2)` creates the file
/// (Linux applies it, less the umask, to the new file), so there is no
/// moment when the file is more open than 0600; it is checked afterwards.
///
/// Does not need a Tokio runtime; [`run`] does.
///
/// # Errors
///
/// [`ControlError::AnotherDaemon`], [`ControlError::NotASocket`],
/// [`ControlError::PathTooLong`], or [`ControlError::Io`] naming the step
/// that failed (typically permissions on the directory).
pub fn bind(path: &Path) -> Result<ControlListener, ControlError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
        return Err(ControlError::PathTooLong {
            path: path.to_owned(),
        });
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io_err("create the directory of the control socket", path))?;
    }
    remove_if_stale(path)?;

    let fd: OwnedFd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| io_err("create the control socket", path)(e.into()))?;
    fchmod(&fd, Mode::S_IRUSR | Mode::S_IWUSR)
        .map_err(|e| io_err("set the mode of the control socket", path)(e.into()))?;
    let addr =
        UnixAddr::new(path).map_err(|e| io_err("bind the control socket", path)(e.into()))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| match e {
        nix::errno::Errno::EADDRINUSE => ControlError::AnotherDaemon {
            path: path.to_owned(),
        },
        e => io_err("bind the control socket", path)(e.into()),
    })?;
    let meta = fs::symlink_metadata(path).map_err(io_err("check the new control socket", path))?;
    // From here on, dropping `file` removes what we created.
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if meta.permissions().mode() & 0o177 != 0 {
        // Only if the kernel ignored the mode set before bind.
        warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "control socket created with a wider mode than 0600; narrowing it"
        );
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(io_err("set the mode of the control socket", path))?;
    }
    socket::listen(&fd, Backlog::new(64).expect("64 is a valid backlog"))
        .map_err(|e| io_err("listen on the control socket", path)(e.into()))?;
    Ok(ControlListener {
        listener: std::os::unix::net::UnixListener::from(fd),
        file,
        max_frame_bytes: MAX_FRAME_BYTES,
    })
}

/// If a socket file is at `path`, removes it when nothing answers on it.
fn remove_if_stale(path: &Path) -> Result<(), ControlError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("check the existing control socket", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlError::AnotherDaemon {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove the stale control socket", path)(e)),
            }
            info!(path = %path.display(), "replaced a stale control socket (no daemon answered on it)");
            Ok(())
        }
        Err(e) => Err(io_err("check the existing control socket", path)(e)),
    }
}

/// [`bind`]s `path` and [`run`]s the socket until `shutdown` is cancelled.
///
/// # Errors
///
/// As [`bind`] and [`run`].
pub async fn serve<H: ControlHandler>(
    path: &Path,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    run(bind(path)?, handler, shutdown).await
}

/// Serves control connections until `shutdown` is cancelled, then removes
/// the socket file, lets requests being handled finish (at most
/// [`SHUTDOWN_GRACE`]) and returns.
///
/// Each connection is checked with SO_PEERCRED: only root and the daemon's
/// own effective uid are served; anyone else gets one error reply
/// (`permission denied: uid N is not root`) and is disconnected. A
/// connection may send several requests, one after the other; each gets one
/// reply. A request that is not valid JSON gets an error reply and the
/// connection goes on; one that is too large or not UTF-8 gets an error
/// reply and the connection is closed. Nothing a client sends affects other
/// clients. Failures of `accept(2)` are logged and retried, with the
/// back-off of [`crate::accept`].
///
/// Must be called within a Tokio runtime.
///
/// # Errors
///
/// [`ControlError::Io`] if the socket cannot be registered with the
/// runtime.
pub async fn run<H: ControlHandler>(
    listener: ControlListener,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    let ControlListener {
        listener,
        file,
        max_frame_bytes,
    } = listener;
    let listener =
        UnixListener::from_std(listener).map_err(io_err("serve the control socket", &file.path))?;
    let own_uid = nix::unistd::geteuid().as_raw();
    info!(path = %file.path.display(), "control socket ready");
    let connections = TaskTracker::new();
    // Cuts off the requests still running when the shutdown grace is over.
    let cut = CancellationToken::new();
    // Out of descriptors, a connection accepted on the loop's spare is
    // served all the same: the operator must be able to get in.
    let cap = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    accept_loop(
        &listener,
        "control socket",
        Some(cap),
        &shutdown,
        |accepted| {
            let permit = accepted.permit;
            let connection = connection(
                accepted.stream,
                Arc::clone(&handler),
                own_uid,
                max_frame_bytes,
                shutdown.clone(),
            );
            let cut = cut.clone();
            connections.spawn(async move {
                tokio::select! {
                    () = cut.cancelled() => {}
                    () = connection => {}
                }
                drop(permit);
            });
        },
    )
    .await;
    // New clients now get "no such file" rather than a hang.
    drop(file);
    drop(listener);
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        warn!(
            "control requests still running {}s after shutdown; cutting them off",
            SHUTDOWN_GRACE.as_secs()
        );
        cut.cancel();
        connections.wait().await;
    }
    Ok(())
}

type Conn = Framed<UnixStream, LinesCodec>;

/// One connection: check the peer, then read requests and answer them
/// until EOF, an idle timeout, a framing error or shutdown.
async fn connection<H: ControlHandler>(
    stream: UnixStream,
    handler: Arc<H>,
    own_uid: u32,
    max_frame_bytes: usize,
    shutdown: CancellationToken,
) {
    let peer = match stream.peer_cred() {
        Ok(cred) => PeerInfo {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        },
        Err(e) => {
            warn!("control connection: cannot read the peer's credentials: {e}");
            return;
        }
    };
    let mut conn = Framed::new(stream, LinesCodec::new_with_max_length(max_frame_bytes));
    if peer.uid != 0 && peer.uid != own_uid {
        warn!(
            uid = peer.uid,
            pid = peer.pid,
            "control connection refused: not root"
        );
        let message = if own_uid == 0 {
            format!("permission denied: uid {} is not root", peer.uid)
        } else {
            format!(
                "permission denied: uid {} is neither root nor the daemon's uid {own_uid}",
                peer.uid
            )
        };
        let _ = send(&mut conn, &Response::Error(message), max_frame_bytes).await;
        close(conn, max_frame_bytes).await;
        return;
    }
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            next = tokio::time::timeout(REQUEST_TIMEOUT, conn.next()) => next,
        };
        let line = match next {
            Err(_) => {
                debug!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "control connection idle; closing"
                );
                break;
            }
            Ok(None) => break,
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(e))) => {
                let message = match e {
                    LinesCodecError::MaxLineLengthExceeded => {
                        format!("request too large (the limit is {max_frame_bytes} bytes)")
                    }
                    LinesCodecError::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
                        "malformed request: not UTF-8".to_owned()
                    }
                    LinesCodecError::Io(e) => {
                        debug!(uid = peer.uid, pid = peer.pid, "control connection: {e}");
                        return;
                    }
                };
                warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "control request refused: {message}"
                );
                let _ = send(&mut conn, &Response::Error(message), max_frame_bytes).await;
                close(conn, max_frame_bytes).await;
                return;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let request: Request = match serde_json::from_str(&line) {
            Ok(request) => request,
            Err(e) => {
                warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "malformed control request: {e}"
                );
                let reply = Response::error(format_args!("malformed request: {e}"));
                if send(&mut conn, &reply, max_frame_bytes).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let op = request.op();
        debug!(uid = peer.uid, pid = peer.pid, op, "control request");
        let client = ClientWaiting::of(conn.get_ref());
        let reply = AssertUnwindSafe(handler.handle(request, peer, client))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                warn!(op, "control handler panicked");
                Response::error(format_args!(
                    "internal error while handling {op} (see the daemon's log)"
                ))
            });
        if let Err(e) = send(&mut conn, &reply, max_frame_bytes).await {
            debug!(
                uid = peer.uid,
                pid = peer.pid,
                op,
                "control reply not delivered: {e}"
            );
            break;
        }
    }
}

/// Writes one reply line. A reply too large for the client to accept is
/// replaced by an error saying so.
async fn send(
    conn: &mut Conn,
    reply: &Response,
    max_frame_bytes: usize,
) -> Result<(), LinesCodecError> {
    let mut line = serde_json::to_string(reply).expect("replies serialize");
    if line.len() > max_frame_bytes {
        warn!(
            kind = reply.kind(),
            bytes = line.len(),
            "control reply too large; sending an error instead"
        );
        line = serde_json::to_string(&Response::error(format_args!(
            "reply too large ({} bytes; the limit is {max_frame_bytes} bytes)",
            line.len()
        )))
        .expect("replies serialize");
    }
    conn.send(line).await
}

/// Ends a connection after an error reply: stops writing, then reads what
/// the client may still be sending (briefly, and at most about one frame)
/// so that closing does not turn into a reset that destroys the reply
/// before the client has read it.
async fn close(conn: Conn, max_frame_bytes: usize) {
    let mut stream = conn.into_inner();
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        while total <= max_frame_bytes.saturating_add(buf.len()) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}
