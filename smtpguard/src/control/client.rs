//! The CLI's side of the control socket: one connection per request.

use std::{
    io,
    path::{Path, PathBuf},
};

use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};

use super::{
    proto::{one_line, Request, Response},
    MAX_FRAME_BYTES,
};

/// A client of the daemon's control socket.
///
/// Each [`request`](Client::request) opens a new connection, so a client
/// outlives daemon restarts (`stats --watch`). There is no timeout: an
/// import or reload takes as long as it takes, and the operator can
/// interrupt the CLI.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
}

/// A request that could not be made, or that the daemon refused.
///
/// Every message is one line and, where a connection was involved, names
/// the socket path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting failed: no daemon, or no permission.
    #[error("cannot reach the daemon at {}: {}", path.display(), connect_reason(error))]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error from `connect(2)`.
        error: io::Error,
    },
    /// The connection failed after it was made.
    #[error("lost the connection to the daemon at {}: {}", path.display(), io_text(error))]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The daemon closed the connection without a reply.
    #[error("the daemon at {} closed the connection without replying", path.display())]
    NoReply {
        /// The socket path.
        path: PathBuf,
    },
    /// The request is larger than the daemon accepts; it was not sent.
    #[error("request too large to send ({bytes} bytes; the limit is {limit} bytes)")]
    TooLarge {
        /// The request's size in bytes, as JSON.
        bytes: usize,
        /// The limit in bytes ([`MAX_FRAME_BYTES`]).
        limit: usize,
    },
    /// The reply could not be read (not JSON, unknown kind, too large).
    #[error("unreadable reply from the daemon at {}: {detail}", path.display())]
    BadReply {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The daemon answered [`Response::Error`]: its message (kept to one
    /// line).
    #[error("{0}")]
    Daemon(String),
    /// The daemon answered with a reply of the wrong kind.
    #[error("unexpected {got} reply to {op} from the daemon")]
    Unexpected {
        /// The request's `op`.
        op: &'static str,
        /// The reply's kind.
        got: &'static str,
    },
}

/// Why `connect(2)` failed, for an operator.
fn connect_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused (is smtpguard running?)".into(),
        io::ErrorKind::NotFound => "no such socket (is smtpguard running?)".into(),
        io::ErrorKind::PermissionDenied => {
            "permission denied (the control socket is for root)".into()
        }
        _ => io_text(e),
    }
}

/// An I/O error as one lower-case phrase without "(os error N)".
pub(crate) fn io_text(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => &text[..],
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

impl Client {
    /// A client of the socket at `path`. Nothing is connected yet.
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client { path: path.into() }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `request` and returns the daemon's reply as it is, including
    /// [`Response::Error`].
    ///
    /// # Errors
    ///
    /// Anything but a reply: [`ClientError::Connect`],
    /// [`ClientError::TooLarge`], [`ClientError::Io`],
    /// [`ClientError::NoReply`], [`ClientError::BadReply`].
    pub async fn request(&self, request: &Request) -> Result<Response, ClientError> {
        let line = serde_json::to_string(request).expect("requests serialize");
        if line.len() > MAX_FRAME_BYTES {
            return Err(ClientError::TooLarge {
                bytes: line.len(),
                limit: MAX_FRAME_BYTES,
            });
        }
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|error| ClientError::Connect {
                    path: self.path.clone(),
                    error,
                })?;
        let mut conn = Framed::new(stream, LinesCodec::new_with_max_length(MAX_FRAME_BYTES));
        // A refusing daemon replies and closes without reading, so a failed
        // write may still be followed by a reply worth showing.
        let sent = conn.send(line).await;
        match conn.next().await {
            Some(Ok(line)) => serde_json::from_str(&line).map_err(|e| ClientError::BadReply {
                path: self.path.clone(),
                detail: e.to_string(),
            }),
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => Err(ClientError::BadReply {
                path: self.path.clone(),
                detail: format!("longer than {MAX_FRAME_BYTES} bytes"),
            }),
            Some(Err(LinesCodecError::Io(error))) => Err(self.io(match sent {
                Err(LinesCodecError::Io(sending)) => sending,
                _ => error,
            })),
            None => Err(match sent {
                Err(LinesCodecError::Io(error)) => self.io(error),
                _ => ClientError::NoReply {
                    path: self.path.clone(),
                },
            }),
        }
    }

    /// Sends `request`; a [`Response::Error`] becomes
    /// [`ClientError::Daemon`].
    ///
    /// # Errors
    ///
    /// As [`Client::request`], plus [`ClientError::Daemon`].
    pub async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        match self.request(request).await? {
            Response::Error(message) => Err(ClientError::Daemon(one_line(&message))),
            reply => Ok(reply),
        }
    }

    fn io(&self, error: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_read_as_one_lower_case_phrase() {
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_text(&e), "connection refused");
        assert_eq!(
            connect_reason(&e),
            "connection refused (is smtpguard running?)"
        );
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(io_text(&e), "no such file or directory");
        let e = io::Error::other("Custom trouble");
        assert_eq!(io_text(&e), "custom trouble");
    }

    #[test]
    fn errors_name_the_socket() {
        let e = ClientError::Connect {
            path: "/run/smtpguard/control.sock".into(),
            error: io::Error::from_raw_os_error(libc::ECONNREFUSED),
        };
        assert_eq!(
            e.to_string(),
            "cannot reach the daemon at /run/smtpguard/control.sock: connection refused (is smtpguard running?)"
        );
    }
}
