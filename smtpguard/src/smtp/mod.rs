//! The SMTP front door: a sans-IO server session and typed replies.
//!
//! This module does no I/O and reads no clock. [`Session`] takes the bytes
//! the client sent and produces [`Event`]s: replies to write, decisions to
//! make, a message to hand off, TLS to start, the connection to close.
//! The front door's connection driver (sockets, timeouts, TLS) and
//! [`handoff`] (upstream MTA or Maildir spool) sit on top.
//!
//! * [`reply`] — [`Reply`]/[`EnhancedCode`], the wire format, constructors
//!   for every reply used, a parser for upstream replies.
//! * [`command`] — verbs, paths ([`ReversePath`], [`ForwardPath`],
//!   [`Mailbox`]), MAIL parameters.
//! * [`data`] — bounded line framing and the DATA decoder (dot-unstuffing,
//!   bare LF/CR policy, size limit).
//! * [`vocabulary`] — the session's parameters, events, envelope, TLS info.
//! * [`rcpt_policy`] — what the session asks before accepting MAIL/RCPT.
//! * [`session`] — the state machine.
//!
//! # The driver protocol
//!
//! ```text
//! let mut s = Session::new(params, Box::new(policy));   // queues the 220 greeting
//! let mut inbuf = Vec::new();                            // bytes read, not yet consumed
//! loop {
//!     // 1. Act on every queued event, in order.
//!     while let Some(ev) = s.next_event() {
//!         match ev {
//!             Event::Reply(r)        => out.extend(r.to_bytes()),
//!             Event::NeedDecision(step) => {
//!                 // upstream mode: send MAIL/RCPT upstream, relay its reply
//!                 let reply = handoff.step(step).await;   // (flush `out` first if slow)
//!                 s.decide(reply)?;
//!             }
//!             Event::Message { envelope, data } => {
//!                 // spool: write + fsync, then Reply::queued(id); upstream: DATA,
//!                 // dot-stuffed body, relay the reply to the final dot.
//!                 // On failure: Reply::local_error() / upstream_unavailable().
//!                 let reply = handoff.deliver(envelope, data).await;
//!                 s.decide(reply)?;
//!             }
//!             Event::StartTls => {
//!                 write_and_flush(&out);
//!                 inbuf.clear();                 // CVE-2011-0411: never carry
//!                                                // plaintext across STARTTLS
//!                 let tls = handshake(raw_socket).await?;    // on error: just close
//!                 s.tls_established(TlsInfo { version, cipher })?;
//!             }
//!             Event::Close(reason) => { write_and_flush(&out); return close(reason); }
//!         }
//!     }
//!     write_and_flush(&out);
//!     // 2. Feed what is buffered; `feed` may consume only part of it
//!     //    (it stops after a line that needs a decision, and when too many
//!     //    events are undrained), so go round again until it is all consumed.
//!     if !inbuf.is_empty() {
//!         let n = s.feed(&inbuf);
//!         inbuf.drain(..n);
//!         if n > 0 || s.has_events() { continue; }
//!     }
//!     // 3. Only then read more, under the driver's timeout
//!     //    (`s.phase()` says whether we are in DATA).
//!     match timeout(read(&mut inbuf)).await {
//!         Err(_elapsed) => s.timeout(),          // queues 421 4.4.2 + Close
//!         Ok(0) => return close(),               // client went away
//!         Ok(_) => {}
//!     }
//! }
//! ```
//!
//! Rules the driver must keep:
//!
//! * Write the replies in event order. Flushing once per loop (after all
//!   events of a feed) gives RFC 2920 PIPELINING for free.
//! * Answer every [`Event::NeedDecision`] and [`Event::Message`] with exactly
//!   one [`Session::decide`] before feeding again; the session consumes no
//!   input while it waits, so pipelined commands stay in `inbuf`. The 2xx
//!   for a message is sent only when the message is safe.
//! * On [`Event::StartTls`], drop every plaintext byte already read (the
//!   session also discards whatever it is fed until `tls_established`), do
//!   not wrap a buffered reader that holds bytes into the TLS stream, and
//!   continue with the TLS stream. The client must EHLO again.
//! * After [`Event::Close`], close; the session ignores further input. Its
//!   [`CloseReason`] says why (for logs and counters).
//! * [`Session::shutdown`] / [`Session::kicked`] / [`Session::timeout`] may be
//!   called in any phase; they queue a 421 and Close.
//! * Pre-greeting input (early talkers), per-session duration caps, rate
//!   limits, the client's IP address and Received headers are the driver's
//!   and hand-off's business.
//!
//! # Memory bounds
//!
//! Whatever the client sends, a session holds at most: one line
//! (`LineBuffer`, 1000 bytes, allocated once; overlong lines are discarded
//! up to their LF and answered `500 5.5.2`), one message body (capacity
//! never above `max_message_size`; freed as soon as the message is known to
//! fail), the envelope (≤ `max_recipients` paths of ≤ 256 octets), and
//! [`MAX_QUEUED_EVENTS`] undrained events (plus the few one line produces).
//!
//! # Reply codes used
//!
//! | situation | reply |
//! |---|---|
//! | greeting | `220 <host> ESMTP smtpguard` (no enhanced code, RFC 2034) |
//! | EHLO / HELO | `250-<host>` + PIPELINING, SIZE n, STARTTLS (when offered), ENHANCEDSTATUSCODES, 8BITMIME (no enhanced code) |
//! | MAIL / RCPT ok | `250 2.1.0` / `250 2.1.5` |
//! | RSET, NOOP | `250 2.0.0` |
//! | DATA | `354` (no enhanced code: intermediate, RFC 2034 covers 2xx/4xx/5xx) |
//! | message safe (driver) | `250 2.0.0 Ok: queued as <id>` |
//! | QUIT | `221 2.0.0 Bye` |
//! | HELP / VRFY | `214 2.0.0` / `252 2.5.0` |
//! | STARTTLS | `220 2.0.0 Ready to start TLS`; args `501 5.5.4`; TLS off `502 5.5.1`; already TLS or in a transaction `503 5.5.1`; unavailable `454 4.7.0` |
//! | TLS required, not active | `530 5.7.0 Must issue a STARTTLS command first` |
//! | unknown verb, bad bytes, line > 512 | `500 5.5.2` |
//! | argument syntax | `501 5.5.4`; bad sender path `501 5.1.7`; bad recipient path `501 5.1.3` |
//! | EXPN, TURN, BDAT, AUTH, XCLIENT, ... | `502 5.5.1` |
//! | bad sequence | `503 5.5.1`; DATA with no recipients `554 5.5.1` |
//! | unknown MAIL/RCPT parameter | `555 5.5.4` |
//! | SIZE= or body over the limit | `552 5.3.4` |
//! | too many recipients | `452 4.5.3` (not counted as an error) |
//! | bare LF / bare CR in DATA (reject) | `550 5.5.2`; command ending in bare LF `500 5.5.2` |
//! | text line > 1000 in DATA | `500 5.5.2` after the final dot |
//! | relay denied ([`DomainPolicy`](handoff::DomainPolicy)) | `550 5.7.1` |
//! | error cap / timeout / shutdown / kicked / HTTP | `421 4.7.0` / `421 4.4.2` / `421 4.3.2` / `421 4.7.1` / `421 4.7.0`, then close |
//! | hand-off failure (driver) | `451 4.3.0` / `451 4.4.1` |

pub mod command;
pub mod data;
pub mod handoff;
pub mod rcpt_policy;
pub mod reply;
pub mod session;
pub mod vocabulary;

pub use command::{BodyType, ForwardPath, MailParams, Mailbox, ReversePath};
pub use data::{BareLfPolicy, COMMAND_LINE_MAX, DATA_LINE_MAX};
pub use rcpt_policy::{AcceptAll, AskDriver, RcptDecision, RcptPolicy};
pub use reply::{EnhancedCode, Reply, ReplyParseError};
pub use session::{Session, SessionError, MAX_QUEUED_EVENTS};
pub use vocabulary::{
    CloseReason, Envelope, Event, Helo, Phase, SessionParams, Step, TlsInfo, TlsMode,
};
