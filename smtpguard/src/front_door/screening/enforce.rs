//! `greet_action = "enforce"`: what an early talker gets after its
//! greeting. Like postscreen's built-in SMTP engine, it never accepts mail:
//! every command but QUIT gets `554 5.5.1 Protocol error` (QUIT: `221
//! 2.0.0 Bye`), and each RCPT is logged with the sender, as postscreen
//! does (`NOQUEUE: reject: RCPT from [203.0.113.9]:41234: 554 5.5.1
//! Protocol error; from=<a@example.net>, to=<b@example.com>`). It is
//! bounded like a session: `max_errors` replies (then `421 4.7.0`), a
//! deadline per line (`421 4.4.2`) and a session deadline.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::front_door::connection::{End, Stop};
use crate::front_door::registry::Live;
use crate::smtp::{EnhancedCode, Reply};

/// Longest command line read (RFC 5321 §4.5.3.1.4: 512 octets with CRLF);
/// longer ones are cut and answered all the same.
const MAX_LINE: usize = 512;

/// The limits of an enforced session.
pub(crate) struct EnforceLimits {
    /// Our host name, for the greeting and the closing replies.
    pub host: String,
    /// Deadline per line.
    pub idle_timeout: Duration,
    /// Deadline for the whole session.
    pub session_deadline: Instant,
    /// Replies before `421 4.7.0` and close.
    pub max_errors: u32,
    /// Longest write of one reply.
    pub write_timeout: Duration,
}

fn protocol_error() -> Reply {
    Reply::new(554, Some(EnhancedCode(5, 5, 1)), "Protocol error")
}

/// Greets `stream` (ending a `220-` line if one was sent), then answers
/// every command with `554 5.5.1` until QUIT, a limit or a stop.
pub(crate) async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    limits: EnforceLimits,
    stop: Stop,
    live: Arc<Live>,
) -> End {
    let mut conn = Enforced {
        peer,
        limits,
        live,
        from: None,
        errors: 0,
    };
    let greeting = Reply::greeting(&conn.limits.host);
    if let Err(end) = conn.send(&mut stream, &greeting).await {
        return end;
    }
    let mut buf = Vec::with_capacity(MAX_LINE);
    loop {
        let deadline =
            (Instant::now() + conn.limits.idle_timeout).min(conn.limits.session_deadline);
        let line = tokio::select! {
            biased;
            _ = stop.kick.cancelled() => return conn.close(&mut stream, End::Kicked, Reply::kicked(&conn.limits.host)).await,
            _ = stop.operator_kick.cancelled() => return conn.close(&mut stream, End::KickedByOperator, Reply::kicked_by_operator(&conn.limits.host)).await,
            _ = stop.shutdown.cancelled() => return conn.close(&mut stream, End::Shutdown, Reply::shutting_down(&conn.limits.host)).await,
            line = timeout_at(deadline, read_line(&mut stream, &mut buf)) => line,
        };
        let line = match line {
            Err(_) => {
                let end = if Instant::now() >= conn.limits.session_deadline {
                    End::SessionTimeout
                } else {
                    End::IdleTimeout
                };
                return conn
                    .close(&mut stream, end, Reply::timeout(&conn.limits.host))
                    .await;
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return End::ClientGone,
            Ok(Err(e)) => return End::Io(e.kind()),
        };
        conn.live
            .bytes_in
            .fetch_add(line.len() as u64, Ordering::Relaxed);
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let upper = text.to_ascii_uppercase();
        if upper == "QUIT" {
            let _ = conn.send(&mut stream, &Reply::bye()).await;
            return End::Quit;
        }
        if upper.starts_with("MAIL FROM:") {
            conn.from = Some(path_of(&text["MAIL FROM:".len()..]));
        } else if upper.starts_with("RCPT TO:") {
            let to = path_of(&text["RCPT TO:".len()..]);
            tracing::info!(
                "NOQUEUE: reject: RCPT from [{}]:{}: 554 5.5.1 Protocol error; from={}, to={}",
                conn.peer.ip(),
                conn.peer.port(),
                conn.from.as_deref().unwrap_or("<>"),
                to
            );
        }
        conn.errors += 1;
        conn.live.update(|l| l.errors += 1);
        if conn.errors >= conn.limits.max_errors {
            let reply = Reply::too_many_errors(&conn.limits.host);
            let _ = conn.send(&mut stream, &protocol_error()).await;
            return conn.close(&mut stream, End::TooManyErrors, reply).await;
        }
        if let Err(end) = conn.send(&mut stream, &protocol_error()).await {
            return end;
        }
    }
}

struct Enforced {
    peer: SocketAddr,
    limits: EnforceLimits,
    live: Arc<Live>,
    /// The reverse path of the last MAIL, as written.
    from: Option<String>,
    errors: u32,
}

impl Enforced {
    async fn send(&self, stream: &mut TcpStream, reply: &Reply) -> Result<(), End> {
        let bytes = reply.to_bytes();
        let deadline = Instant::now() + self.limits.write_timeout;
        match timeout_at(deadline, stream.write_all(&bytes)).await {
            Ok(Ok(())) => {
                self.live
                    .bytes_out
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => Err(End::Io(e.kind())),
            Err(_) => Err(End::WriteTimeout),
        }
    }

    async fn close(&self, stream: &mut TcpStream, end: End, reply: Reply) -> End {
        let _ = self.send(stream, &reply).await;
        let _ = timeout_at(Instant::now() + Duration::from_secs(1), stream.shutdown()).await;
        end
    }
}

/// `<a@example.com>` out of `<a@example.com> SIZE=10` (or the first word).
fn path_of(args: &str) -> String {
    args.split_whitespace().next().unwrap_or("<>").to_owned()
}

/// The next line (up to LF), at most [`MAX_LINE`] bytes of it kept; `None`
/// at end of stream.
async fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Vec<u8>>> {
    buf.clear();
    let mut byte = [0u8; 1];
    loop {
        // One byte at a time: this engine serves few clients and never
        // reads past the line it answers.
        if stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        if buf.len() < MAX_LINE {
            buf.push(byte[0]);
        }
        if byte[0] == b'\n' {
            return Ok(Some(buf.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_taken_as_written() {
        assert_eq!(path_of("<a@example.net> SIZE=10"), "<a@example.net>");
        assert_eq!(path_of(""), "<>");
        assert_eq!(protocol_error().to_bytes(), b"554 5.5.1 Protocol error\r\n");
    }
}
