//! The session's vocabulary: its parameters, what it asks of the driver
//! ([`Event`], [`Step`]), the envelope it builds and what it learns from
//! the client (HELO, TLS). Plain values, shared by the state machine, the
//! driver and the hand-off.

use super::command::{BodyType, ForwardPath, MailParams, ReversePath};
use super::data::BareLfPolicy;
use super::reply::Reply;

/// Default maximum message size: 10 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 10 * 1024 * 1024;
/// Default recipients per message (RFC 5321 §4.5.3.1.8 minimum is 100).
pub const DEFAULT_MAX_RECIPIENTS: usize = 100;
/// Default error cap.
pub const DEFAULT_MAX_ERRORS: u32 = 10;
/// STARTTLS policy (RFC 3207).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No STARTTLS: not advertised, the command gets `502 5.5.1`.
    #[default]
    Off,
    /// STARTTLS advertised (when available); plaintext mail accepted.
    Optional,
    /// STARTTLS advertised; before it only EHLO, HELO, STARTTLS, NOOP, RSET
    /// and QUIT are allowed, everything else gets `530 5.7.0`.
    Required,
}

/// Per-connection parameters, fixed for the life of the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// Our host name: in the greeting (`220 <host> ESMTP smtpguard`), the
    /// EHLO/HELO reply and the 421 replies.
    pub hostname: String,
    /// STARTTLS policy.
    pub tls_mode: TlsMode,
    /// Whether a TLS handshake can be offered right now (certificate
    /// loaded). With `tls_mode != Off` and this false, STARTTLS is not
    /// advertised and gets `454 4.7.0`; with `Required` that means no mail
    /// can be sent at all, so the driver should fix that rather than run so.
    pub tls_available: bool,
    /// Maximum message size in octets, advertised as `SIZE n` (RFC 1870).
    /// A larger `SIZE=` on MAIL gets `552 5.3.4` at once; a larger body gets
    /// `552 5.3.4` after the final dot and is not handed off. Also the bound
    /// on the message buffer. (0 is not "unlimited": it refuses any body.)
    pub max_message_size: usize,
    /// Recipients per message; the next RCPT gets `452 4.5.3`.
    pub max_recipients: usize,
    /// Error replies (4xx/5xx) tolerated before `421 4.7.0 ... too many
    /// errors` and close; 0 disables the cap.
    pub max_errors: u32,
    /// Bare LF / bare CR handling in DATA and command lines.
    pub bare_lf: BareLfPolicy,
}

impl SessionParams {
    /// Defaults: TLS off, 10 MiB, 100 recipients, 10 errors, bare LF rejected.
    pub fn new(hostname: impl Into<String>) -> Self {
        SessionParams {
            hostname: hostname.into(),
            tls_mode: TlsMode::Off,
            tls_available: false,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_recipients: DEFAULT_MAX_RECIPIENTS,
            max_errors: DEFAULT_MAX_ERRORS,
            bare_lf: BareLfPolicy::Reject,
        }
    }
}

/// What the driver learnt from the TLS handshake; kept for the hand-off
/// (Received header, XCLIENT/PROXY TLVs, logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// Protocol version, e.g. `TLSv1.3`.
    pub version: String,
    /// Cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

/// The client's HELO/EHLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Helo {
    /// The name given (first word of the argument, as sent, unvalidated
    /// beyond printable ASCII: treat it as untrusted text).
    pub name: String,
    /// EHLO (true) or HELO (false): `ESMTP` vs `SMTP` in a Received header.
    pub extended: bool,
}

/// The envelope of the current mail transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// MAIL FROM.
    pub reverse_path: ReversePath,
    /// Accepted RCPT TOs, in order (duplicates are kept).
    pub forward_paths: Vec<ForwardPath>,
    /// `BODY=` given on MAIL, if any.
    pub body: Option<BodyType>,
    /// `SIZE=` given on MAIL, if any (the client's estimate).
    pub declared_size: Option<u64>,
}

/// A transaction step the session cannot decide alone: the driver answers
/// with [`Session::decide`](super::Session::decide).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// MAIL FROM, syntactically valid and within the size limit. On a 2xx
    /// decision the transaction starts.
    Mail {
        reverse_path: ReversePath,
        params: MailParams,
    },
    /// RCPT TO, syntactically valid and within the recipient limit. On a
    /// 2xx decision the recipient is added to the envelope.
    Rcpt { forward_path: ForwardPath },
}

/// What the driver must do next; drain with [`Session::next_event`](super::Session::next_event), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Write this reply to the client.
    Reply(Reply),
    /// Ask the hand-off about a MAIL or RCPT, then call [`Session::decide`](super::Session::decide).
    /// The session consumes no input until then.
    NeedDecision(Step),
    /// A complete, well-formed message: un-dot-stuffed, CRLF line endings,
    /// at most `max_message_size` octets. Hand it off, then call
    /// [`Session::decide`](super::Session::decide) — with a 2xx only once the message is safe
    /// (spool file fsync'd, or the upstream's 250 after its final dot).
    /// When relaying over SMTP the hand-off must dot-stuff it again.
    Message { envelope: Envelope, data: Vec<u8> },
    /// `220 2.0.0 Ready to start TLS` was the previous event. Write it,
    /// discard anything else read in plaintext (CVE-2011-0411: `feed`
    /// already dropped what it was given), run the handshake on the raw
    /// socket, then call [`Session::tls_established`](super::Session::tls_established) (or just close if the
    /// handshake fails: nothing more may be said in plaintext).
    StartTls,
    /// Write the replies before this one, then close the connection. The
    /// reason says why, so the driver need not guess it from the replies.
    Close(CloseReason),
}

/// Why the session closes (after its last reply), as [`Event::Close`]
/// tells the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent QUIT (`221 2.0.0`).
    Quit,
    /// The error cap was reached (`421 4.7.0`).
    TooManyErrors,
    /// The client spoke HTTP (`421 4.7.0`).
    HttpRequest,
    /// A decision or the RCPT policy was a `421` (e.g. the upstream MTA is
    /// going away), which closes the session.
    ClosingReply,
    /// The driver called [`Session::timeout`](super::Session::timeout)
    /// (`421 4.4.2`).
    Timeout,
    /// The driver called [`Session::shutdown`](super::Session::shutdown)
    /// (`421 4.3.2`).
    Shutdown,
    /// The driver called [`Session::kicked`](super::Session::kicked)
    /// (`421 4.7.1`).
    Kicked,
}

/// Coarse session state, e.g. for the driver to pick a timeout (RFC 5321
/// §4.5.3.2 suggests 5 min for commands, 3 min per data block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading command lines.
    Command,
    /// Reading the message body after 354.
    Data,
    /// Waiting for [`Session::decide`](super::Session::decide); input is not consumed.
    AwaitingDecision,
    /// Waiting for [`Session::tls_established`](super::Session::tls_established); input is discarded.
    AwaitingTls,
    /// Finished; input is discarded.
    Closed,
}
