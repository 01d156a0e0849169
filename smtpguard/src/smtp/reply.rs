//! Typed SMTP replies (RFC 5321 §4.2) with RFC 3463 enhanced status codes.
//!
//! A [`Reply`] is a basic three-digit code, an optional [`EnhancedCode`] and
//! one or more lines of text. [`Reply::to_bytes`] (and `Display`) produce the
//! wire form: every line but the last is `code-text`, the last `code text`,
//! each terminated by CRLF; when an enhanced code is present it prefixes the
//! text of *every* line (RFC 2034 §4).
//!
//! # Which replies carry an enhanced code
//!
//! smtpguard advertises `ENHANCEDSTATUSCODES`, so RFC 2034 requires the
//! enhanced code on every 2xx, 4xx and 5xx reply **except** the initial
//! greeting and the replies to HELO and EHLO. We leave it off exactly there:
//!
//! * the greeting `220 <host> ESMTP smtpguard`: the first word after 220 must
//!   be the host name (RFC 5321 §4.3.1);
//! * the HELO/EHLO `250`: each EHLO line after the first is an extension
//!   keyword (`250-PIPELINING`), a code in front of it would break clients
//!   parsing the keywords, and RFC 2034 exempts the reply anyway. (So no
//!   enhanced code on the last EHLO line either: it would be read as the
//!   keyword `2.0.0`.)
//! * the `354` intermediate reply to DATA: RFC 2034 defines enhanced codes
//!   for 2xx/4xx/5xx only (RFC 3463 has no class 3).
//!
//! Every other constructor here sets one whose class equals the first digit
//! of the basic code (the session tests check every reply they see).
//!
//! Reply text is sanitised when serialised: CR, LF and other control
//! characters become spaces (nothing a client or an upstream supplies can
//! inject an extra reply line), non-ASCII becomes `?`, and each line is cut
//! to fit the 512-octet reply-line limit of RFC 5321 §4.5.3.1.5.
//! `Display` is the same wire form, CRLFs included.

use std::fmt;
use std::net::IpAddr;

/// Longest reply line on the wire, code and CRLF included (RFC 5321 §4.5.3.1.5).
pub const MAX_REPLY_LINE: usize = 512;

/// An RFC 3463 enhanced mail system status code `class.subject.detail`.
///
/// `class` is 2 (success), 4 (persistent transient failure) or 5 (permanent
/// failure); `subject` and `detail` are 0..=999.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode(pub u8, pub u16, pub u16);

impl EnhancedCode {
    /// The class digit (2, 4 or 5).
    pub fn class(self) -> u8 {
        self.0
    }
    /// The subject (`X.1.X` addressing, `X.5.X` protocol, `X.7.X` security...).
    pub fn subject(self) -> u16 {
        self.1
    }
    /// The detail number.
    pub fn detail(self) -> u16 {
        self.2
    }
    /// Whether this is a syntactically valid RFC 3463 code.
    pub fn is_valid(self) -> bool {
        matches!(self.0, 2 | 4 | 5) && self.1 <= 999 && self.2 <= 999
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// An SMTP reply: basic code, optional enhanced code, text lines.
///
/// Invariants expected by [`to_bytes`](Self::to_bytes): `code` is in
/// `200..=599`; when `enhanced` is present its class equals `code / 100`.
/// The constructors uphold them; [`Reply::normalized`] repairs a reply that
/// came from elsewhere (e.g. an upstream MTA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit basic reply code (RFC 5321 §4.2).
    pub code: u16,
    /// RFC 3463 enhanced status code, sent in front of the text of each line.
    pub enhanced: Option<EnhancedCode>,
    /// Text lines; an empty vector is sent as a single line with no text.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply.
    pub fn new(code: u16, enhanced: Option<EnhancedCode>, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced,
            lines: vec![text.into()],
        }
    }

    /// A one-line reply with an enhanced code `class.subject.detail`; the
    /// class is taken from the basic code.
    fn enh(code: u16, subject: u16, detail: u16, text: impl Into<String>) -> Self {
        Reply::new(
            code,
            Some(EnhancedCode((code / 100) as u8, subject, detail)),
            text,
        )
    }

    /// A multi-line reply.
    pub fn multiline(code: u16, enhanced: Option<EnhancedCode>, lines: Vec<String>) -> Self {
        Reply {
            code,
            enhanced,
            lines,
        }
    }

    /// The class digit of the basic code (2 positive, 3 intermediate,
    /// 4 transient negative, 5 permanent negative).
    pub fn class(&self) -> u8 {
        (self.code / 100) as u8
    }
    /// 2xx.
    pub fn is_positive(&self) -> bool {
        self.class() == 2
    }
    /// 4xx or 5xx.
    pub fn is_negative(&self) -> bool {
        matches!(self.class(), 4 | 5)
    }
    /// 421: the server closes the connection after this reply (RFC 5321 §3.8).
    pub fn is_closing(&self) -> bool {
        self.code == 421
    }

    /// Repair a reply obtained from elsewhere (an upstream MTA, a hand-off
    /// error) so it can be relayed, as the answer to MAIL, RCPT or the end
    /// of DATA, to a client to which we advertised ENHANCEDSTATUSCODES: a
    /// code outside `200..=599`, or a 3xx, becomes `451 4.3.0`; a missing
    /// enhanced code, or one whose class does not match the basic code, is
    /// replaced by `success` for a 2xx (e.g. `2.1.5` for a RCPT) and by
    /// `4.0.0` / `5.0.0` (other or undefined status) for a failure.
    pub fn normalized(mut self, success: EnhancedCode) -> Reply {
        if !(200..=599).contains(&self.code) || self.class() == 3 {
            // 3xx makes no sense as the answer to MAIL, RCPT or end of data.
            return Reply::local_error();
        }
        let class = self.class();
        match self.enhanced {
            Some(e) if e.is_valid() && e.0 == class => {}
            _ if class == 2 => self.enhanced = Some(EnhancedCode(2, success.1, success.2)),
            _ => self.enhanced = Some(EnhancedCode(class, 0, 0)),
        }
        self
    }

    /// The wire form: `code[-| ][enhanced ]text\r\n` per line.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 * self.lines.len().max(1));
        self.write_to(&mut out);
        out
    }

    /// Append the wire form to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let code = self.code.min(999);
        let enhanced = self.enhanced.map(|e| e.to_string());
        let n = self.lines.len().max(1);
        for i in 0..n {
            let start = out.len();
            out.extend_from_slice(format!("{code:03}").as_bytes());
            out.push(if i + 1 == n { b' ' } else { b'-' });
            if let Some(e) = &enhanced {
                out.extend_from_slice(e.as_bytes());
                out.push(b' ');
            }
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let room = MAX_REPLY_LINE.saturating_sub(out.len() - start + 2);
            // textstring = HT / SP / printable US-ASCII (RFC 5321 §4.2).
            out.extend(text.chars().take(room).map(|ch| match ch {
                ' '..='~' | '\t' => ch as u8,
                c if c.is_control() => b' ',
                _ => b'?',
            }));
            // No text: drop the separator space we just wrote ("250\r\n",
            // "250 2.0.0\r\n"); a "-" continuation mark stays.
            if text.is_empty() && out.last() == Some(&b' ') {
                out.pop();
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Parse one complete reply from the front of `input` (as sent by an
    /// upstream MTA). Returns `Ok(None)` when more bytes are needed, or the
    /// reply and how many bytes it took. Lines may end in CRLF or LF.
    ///
    /// An enhanced code is recognised when *every* line's text starts with
    /// `class.subject.detail ` with the class of the basic code; it is then
    /// stripped from the text. `max_len` bounds how much is examined: a reply
    /// not complete within `max_len` bytes is an error, so a hostile
    /// upstream cannot make the caller buffer without limit.
    pub fn parse(input: &[u8], max_len: usize) -> Result<Option<(Reply, usize)>, ReplyParseError> {
        let mut pos = 0;
        let mut code: Option<u16> = None;
        let mut texts: Vec<&str> = Vec::new();
        loop {
            let rest = &input[pos..];
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                if input.len() > max_len {
                    return Err(ReplyParseError::TooLong);
                }
                return Ok(None);
            };
            let end = pos + nl + 1;
            if end > max_len {
                return Err(ReplyParseError::TooLong);
            }
            let mut line = &rest[..nl];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = std::str::from_utf8(line).map_err(|_| ReplyParseError::Syntax)?;
            let b = line.as_bytes();
            if b.len() < 3
                || !b[..3].iter().all(u8::is_ascii_digit)
                || !(b'2'..=b'5').contains(&b[0])
            {
                return Err(ReplyParseError::Syntax);
            }
            let c: u16 = line[..3].parse().map_err(|_| ReplyParseError::Syntax)?;
            if *code.get_or_insert(c) != c {
                return Err(ReplyParseError::Syntax);
            }
            let (last, text) = match b.get(3) {
                None => (true, ""),
                Some(b' ') => (true, &line[4..]),
                Some(b'-') => (false, &line[4..]),
                Some(_) => return Err(ReplyParseError::Syntax),
            };
            texts.push(text);
            pos = end;
            if last {
                break;
            }
        }
        let code = code.unwrap_or(0);
        let class = (code / 100) as u8;
        let parsed: Vec<Option<(EnhancedCode, &str)>> =
            texts.iter().map(|t| split_enhanced(t)).collect();
        let first = parsed.first().copied().flatten();
        let reply = match first {
            Some((e, _))
                if e.0 == class && parsed.iter().all(|p| p.is_some_and(|(pe, _)| pe == e)) =>
            {
                Reply::multiline(
                    code,
                    Some(e),
                    parsed
                        .iter()
                        .map(|p| p.map(|(_, t)| t).unwrap_or("").to_string())
                        .collect(),
                )
            }
            _ => Reply::multiline(code, None, texts.iter().map(|t| t.to_string()).collect()),
        };
        Ok(Some((reply, pos)))
    }
}

/// Split `"5.1.1 text"` into the code and `"text"`.
fn split_enhanced(text: &str) -> Option<(EnhancedCode, &str)> {
    let (head, rest) = match text.find(' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, ""),
    };
    let mut parts = head.split('.');
    let (a, b, c) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !(digits(a, 1) && digits(b, 3) && digits(c, 3)) {
        return None;
    }
    let e = EnhancedCode(a.parse().ok()?, b.parse().ok()?, c.parse().ok()?);
    e.is_valid().then_some((e, rest))
}

/// Why [`Reply::parse`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyParseError {
    /// Not `ddd[ -]text` lines with one code.
    #[error("malformed SMTP reply")]
    Syntax,
    /// The reply did not end within the allowed length.
    #[error("SMTP reply too long")]
    TooLong,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.to_bytes()))
    }
}

/// Constructors for every reply the session emits, plus a few the driver
/// and the hand-off need. Codes checked against RFC 5321 §4.2.3/§4.3.2,
/// RFC 3463 (enhanced codes), RFC 3207 (STARTTLS), RFC 1870 (SIZE),
/// RFC 2034, RFC 2920.
impl Reply {
    // ----- connection level ---------------------------------------------

    /// `220 <host> ESMTP smtpguard` — the greeting (no enhanced code, RFC 2034).
    pub fn greeting(host: &str) -> Reply {
        Reply::new(220, None, format!("{host} ESMTP smtpguard"))
    }
    /// `221 2.0.0 Bye` — answer to QUIT.
    pub fn bye() -> Reply {
        Reply::enh(221, 0, 0, "Bye")
    }
    /// `421 4.4.2 <host> Error: timeout exceeded` — the driver's inactivity
    /// timeout fired (X.4.2 bad connection).
    pub fn timeout(host: &str) -> Reply {
        Reply::enh(421, 4, 2, format!("{host} Error: timeout exceeded"))
    }
    /// `421 4.7.0 <host> Error: too many errors` — error cap reached.
    pub fn too_many_errors(host: &str) -> Reply {
        Reply::enh(421, 7, 0, format!("{host} Error: too many errors"))
    }
    /// `421 4.3.2 <host> Service shutting down` — daemon shutdown
    /// (X.3.2 system not accepting network messages).
    pub fn shutting_down(host: &str) -> Reply {
        Reply::enh(421, 3, 2, format!("{host} Service shutting down"))
    }
    /// `421 4.7.1 <host> Closing: your address was denied` — the operator
    /// denied the client's address while the session was open.
    pub fn kicked(host: &str) -> Reply {
        Reply::enh(
            421,
            7,
            1,
            format!("{host} Closing: your address was denied"),
        )
    }
    /// `421 4.7.0 <host> Closing: session ended by the operator` —
    /// `smtpguard kick` (X.7.0 other security or policy status).
    pub fn kicked_by_operator(host: &str) -> Reply {
        Reply::enh(
            421,
            7,
            0,
            format!("{host} Closing: session ended by the operator"),
        )
    }
    /// `421 4.7.0 <host> Error: HTTP request on the SMTP port` — a browser or
    /// proxy is talking to us (cross-protocol attack); we close at once.
    pub fn http_request(host: &str) -> Reply {
        Reply::enh(
            421,
            7,
            0,
            format!("{host} Error: HTTP request on the SMTP port"),
        )
    }

    // ----- refusals on accept (the front door) ---------------------------

    /// `554 5.7.1 <ip> Access denied` — the access lists refuse the client
    /// (RFC 5321 §3.1: 554 instead of the greeting), then close.
    pub fn access_denied(client: IpAddr) -> Reply {
        Reply::enh(554, 7, 1, format!("{client} Access denied"))
    }
    /// `421 4.7.0 <host> Error: too many connections, try again later` —
    /// `max_connections` reached, then close.
    pub fn too_many_connections(host: &str) -> Reply {
        Reply::enh(
            421,
            7,
            0,
            format!("{host} Error: too many connections, try again later"),
        )
    }
    /// `421 4.3.2 <host> Error: out of resources, try again later` — the
    /// process is out of file descriptors, or every session they allow is
    /// taken (X.3.2 system not accepting network messages), then close.
    pub fn out_of_resources(host: &str) -> Reply {
        Reply::enh(
            421,
            3,
            2,
            format!("{host} Error: out of resources, try again later"),
        )
    }
    /// `421 4.7.0 <host> Error: too many connections from <client>, try
    /// again later` — `max_connections_per_client` reached, then close.
    /// `client` is an address, or the IPv6 prefix the cap counts.
    pub fn too_many_connections_from(host: &str, client: &str) -> Reply {
        Reply::enh(
            421,
            7,
            0,
            format!("{host} Error: too many connections from {client}, try again later"),
        )
    }

    // ----- HELO/EHLO ------------------------------------------------------

    /// `250 <host>` — answer to HELO (no enhanced code, RFC 2034).
    pub fn helo(host: &str) -> Reply {
        Reply::new(250, None, host.to_string())
    }
    /// `250-<host>` followed by one line per extension keyword (no enhanced
    /// code, RFC 2034; see the module docs).
    pub fn ehlo(host: &str, extensions: &[String]) -> Reply {
        let mut lines = Vec::with_capacity(extensions.len() + 1);
        lines.push(host.to_string());
        lines.extend(extensions.iter().cloned());
        Reply::multiline(250, None, lines)
    }

    // ----- positive ---------------------------------------------------------

    /// `250 2.0.0 Ok` — RSET, NOOP.
    pub fn ok() -> Reply {
        Reply::enh(250, 0, 0, "Ok")
    }
    /// `250 2.1.0 Ok` — MAIL accepted (X.1.0 other address status).
    pub fn sender_ok() -> Reply {
        Reply::enh(250, 1, 0, "Ok")
    }
    /// `250 2.1.5 Ok` — RCPT accepted (X.1.5 destination address valid).
    pub fn recipient_ok() -> Reply {
        Reply::enh(250, 1, 5, "Ok")
    }
    /// `250 2.0.0 Ok: queued as <id>` — the message is safe (spooled and
    /// fsync'd, or accepted by the upstream). Only send it then.
    pub fn queued(id: &str) -> Reply {
        Reply::enh(250, 0, 0, format!("Ok: queued as {id}"))
    }
    /// `214 2.0.0 ...` — HELP.
    pub fn help() -> Reply {
        Reply::enh(
            214,
            0,
            0,
            "Commands: EHLO HELO STARTTLS MAIL RCPT DATA RSET NOOP QUIT HELP VRFY",
        )
    }
    /// `252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery`
    /// (RFC 5321 §3.5.3; X.5.0 other protocol status).
    pub fn cannot_vrfy() -> Reply {
        Reply::enh(
            252,
            5,
            0,
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }
    /// `220 2.0.0 Ready to start TLS` (RFC 3207 §4).
    pub fn ready_to_start_tls() -> Reply {
        Reply::enh(220, 0, 0, "Ready to start TLS")
    }

    // ----- intermediate -----------------------------------------------------

    /// `354 End data with <CR><LF>.<CR><LF>` — no enhanced code: RFC 2034
    /// defines them for 2xx/4xx/5xx only.
    pub fn start_data() -> Reply {
        Reply::new(354, None, "End data with <CR><LF>.<CR><LF>")
    }

    // ----- transient negative ----------------------------------------------

    /// `452 4.5.3 Error: too many recipients` (RFC 5321 §4.5.3.1.10).
    pub fn too_many_recipients() -> Reply {
        Reply::enh(452, 5, 3, "Error: too many recipients")
    }
    /// `454 4.7.0 TLS not available due to temporary reason` (RFC 3207 §4).
    pub fn tls_unavailable() -> Reply {
        Reply::enh(454, 7, 0, "TLS not available due to temporary reason")
    }
    /// `451 4.3.0 Error: local error in processing` — for the hand-off when
    /// the spool write or the upstream failed (X.3.0 other mail system status).
    pub fn local_error() -> Reply {
        Reply::enh(451, 3, 0, "Error: local error in processing")
    }
    /// `451 4.4.6 Error: mail loop: this client is smtpguard's own upstream
    /// connection` — the hand-off found that a session comes from one of
    /// its own connections to the upstream (the upstream leads back to
    /// smtpguard). RFC 3463 X.4.6 (routing loop detected), temporary so
    /// the message is kept while the configuration is fixed.
    pub fn mail_loop() -> Reply {
        Reply::enh(
            451,
            4,
            6,
            "Error: mail loop: this client is smtpguard's own upstream connection",
        )
    }
    /// `451 4.4.1 Error: upstream not responding` — for the hand-off when
    /// the upstream MTA cannot be reached (X.4.1 no answer from host).
    pub fn upstream_unavailable() -> Reply {
        Reply::enh(451, 4, 1, "Error: upstream not responding")
    }

    // ----- permanent negative: syntax / sequence ----------------------------

    /// `500 5.5.2 Error: command not recognized`.
    pub fn unknown_command() -> Reply {
        Reply::enh(500, 5, 2, "Error: command not recognized")
    }
    /// `500 5.5.2 Error: bad syntax` — empty line, or bytes that cannot form
    /// a command (controls, 8-bit, bare CR).
    pub fn bad_command_line() -> Reply {
        Reply::enh(500, 5, 2, "Error: bad syntax")
    }
    /// `500 5.5.2 Error: line too long` — a command line over 512 octets, or
    /// (after the final dot) a text line over 1000 octets (RFC 5321 §4.5.3.1.6).
    pub fn line_too_long() -> Reply {
        Reply::enh(500, 5, 2, "Error: line too long")
    }
    /// `500 5.5.2 Error: bare <LF> received` — a command line ended in LF
    /// without CR while the bare-LF policy is `reject`.
    pub fn bare_lf_command() -> Reply {
        Reply::enh(500, 5, 2, "Error: bare <LF> received")
    }
    /// `501 5.5.4 <text>` — syntax error in parameters or arguments.
    pub fn syntax(text: &str) -> Reply {
        Reply::enh(501, 5, 4, text.to_string())
    }
    /// `501 5.1.7 Bad sender address syntax` (X.1.7 bad sender's mailbox syntax).
    pub fn bad_sender_syntax() -> Reply {
        Reply::enh(501, 1, 7, "Bad sender address syntax")
    }
    /// `501 5.1.3 Bad recipient address syntax` (X.1.3 bad destination mailbox syntax).
    pub fn bad_recipient_syntax() -> Reply {
        Reply::enh(501, 1, 3, "Bad recipient address syntax")
    }
    /// `502 5.5.1 Error: command not implemented` — EXPN, TURN, BDAT, ...
    pub fn not_implemented() -> Reply {
        Reply::enh(502, 5, 1, "Error: command not implemented")
    }
    /// `503 5.5.1 Error: <text>` — bad sequence of commands.
    pub fn bad_sequence(text: &str) -> Reply {
        Reply::enh(503, 5, 1, format!("Error: {text}"))
    }
    /// `554 5.5.1 Error: no valid recipients` — DATA after MAIL with no
    /// accepted RCPT (RFC 5321 §3.3 allows 503 or 554; RFC 2920 clients
    /// expect 554 here).
    pub fn no_valid_recipients() -> Reply {
        Reply::enh(554, 5, 1, "Error: no valid recipients")
    }
    /// `555 5.5.4 Unsupported option: <keyword>` — unknown MAIL/RCPT
    /// parameter (RFC 5321 §4.1.1.11).
    pub fn unsupported_parameter(keyword: &str) -> Reply {
        Reply::enh(555, 5, 4, format!("Unsupported option: {keyword}"))
    }

    // ----- permanent negative: policy / content -----------------------------

    /// `530 5.7.0 Must issue a STARTTLS command first` (RFC 3207 §4).
    pub fn tls_required() -> Reply {
        Reply::enh(530, 7, 0, "Must issue a STARTTLS command first")
    }
    /// `552 5.3.4 Message size exceeds fixed maximum message size`
    /// (RFC 1870 §6.1; X.3.4 message too big for system).
    pub fn message_too_big() -> Reply {
        Reply::enh(552, 3, 4, "Message size exceeds fixed maximum message size")
    }
    /// `550 5.5.2 Message contains bare LF or bare CR` — SMTP smuggling
    /// defence (CVE-2023-51764 class), bare-LF policy `reject`.
    pub fn bare_line_ending() -> Reply {
        Reply::enh(550, 5, 2, "Message contains bare LF or bare CR")
    }
    /// `550 5.7.1 Relay access denied` (RFC 5321 lists 550 for RCPT; X.7.1
    /// delivery not authorized).
    pub fn relay_denied() -> Reply {
        Reply::enh(550, 7, 1, "Relay access denied")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_enhanced() {
        assert_eq!(Reply::ok().to_bytes(), b"250 2.0.0 Ok\r\n");
        assert_eq!(
            Reply::tls_required().to_string(),
            "530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
    }

    #[test]
    fn accept_time_refusals() {
        let ip = IpAddr::from([192, 0, 2, 7]);
        assert_eq!(
            Reply::access_denied(ip).to_string(),
            "554 5.7.1 192.0.2.7 Access denied\r\n"
        );
        assert_eq!(
            Reply::too_many_connections("mx.example.com").to_string(),
            "421 4.7.0 mx.example.com Error: too many connections, try again later\r\n"
        );
        assert_eq!(
            Reply::too_many_connections_from("mx.example.com", "192.0.2.7").to_string(),
            "421 4.7.0 mx.example.com Error: too many connections from 192.0.2.7, try again later\r\n"
        );
        assert_eq!(
            Reply::out_of_resources("mx.example.com").to_string(),
            "421 4.3.2 mx.example.com Error: out of resources, try again later\r\n"
        );
    }

    #[test]
    fn greeting_and_354_have_no_enhanced() {
        assert_eq!(
            Reply::greeting("mx.example.com").to_bytes(),
            b"220 mx.example.com ESMTP smtpguard\r\n"
        );
        assert_eq!(
            Reply::start_data().to_bytes(),
            b"354 End data with <CR><LF>.<CR><LF>\r\n"
        );
    }

    #[test]
    fn multiline_format() {
        let r = Reply::ehlo("mx.example.com", &["PIPELINING".into(), "SIZE 100".into()]);
        assert_eq!(
            r.to_bytes(),
            b"250-mx.example.com\r\n250-PIPELINING\r\n250 SIZE 100\r\n"
        );
        let r = Reply::multiline(
            550,
            Some(EnhancedCode(5, 7, 1)),
            vec!["a".into(), "b".into()],
        );
        assert_eq!(r.to_bytes(), b"550-5.7.1 a\r\n550 5.7.1 b\r\n");
    }

    #[test]
    fn empty_text() {
        assert_eq!(Reply::multiline(250, None, vec![]).to_bytes(), b"250\r\n");
        assert_eq!(
            Reply::new(250, Some(EnhancedCode(2, 0, 0)), "").to_bytes(),
            b"250 2.0.0\r\n"
        );
    }

    #[test]
    fn text_is_sanitised_and_truncated() {
        let r = Reply::new(550, Some(EnhancedCode(5, 0, 0)), "evil\r\n250 injected");
        assert_eq!(r.to_bytes(), b"550 5.0.0 evil  250 injected\r\n");
        let r = Reply::new(550, None, "caf\u{e9}\tok");
        assert_eq!(r.to_bytes(), b"550 caf?\tok\r\n");
        let r = Reply::new(550, Some(EnhancedCode(5, 0, 0)), "x".repeat(2000));
        let b = r.to_bytes();
        assert_eq!(b.len(), MAX_REPLY_LINE);
        assert!(b.ends_with(b"\r\n"));
    }

    #[test]
    fn parse_roundtrip() {
        for r in [
            Reply::ok(),
            Reply::greeting("mx.example.com"),
            Reply::ehlo("mx.example.com", &["PIPELINING".into(), "8BITMIME".into()]),
            Reply::multiline(
                550,
                Some(EnhancedCode(5, 1, 1)),
                vec!["no".into(), "such user".into()],
            ),
            Reply::start_data(),
        ] {
            let bytes = r.to_bytes();
            let (p, n) = Reply::parse(&bytes, 4096).unwrap().unwrap();
            assert_eq!(n, bytes.len());
            assert_eq!(p, r);
        }
    }

    #[test]
    fn parse_partial_and_errors() {
        assert_eq!(Reply::parse(b"250-a\r\n250 b", 4096), Ok(None));
        assert_eq!(
            Reply::parse(b"250-a\r\n251 b\r\n", 4096),
            Err(ReplyParseError::Syntax)
        );
        assert_eq!(
            Reply::parse(b"hello\r\n", 4096),
            Err(ReplyParseError::Syntax)
        );
        assert_eq!(
            Reply::parse(&[b'2'; 100], 50),
            Err(ReplyParseError::TooLong)
        );
        // Mismatched class is not taken as an enhanced code.
        let (r, _) = Reply::parse(b"250 5.0.0 odd\r\n", 4096).unwrap().unwrap();
        assert_eq!(r.enhanced, None);
        assert_eq!(r.lines, vec!["5.0.0 odd".to_string()]);
    }

    #[test]
    fn normalized_fills_and_fixes() {
        let d = EnhancedCode(2, 1, 5);
        let r = Reply::new(250, None, "ok").normalized(d);
        assert_eq!(r.enhanced, Some(EnhancedCode(2, 1, 5)));
        let r = Reply::new(550, None, "no").normalized(d);
        assert_eq!(r.enhanced, Some(EnhancedCode(5, 0, 0)));
        let r = Reply::new(450, Some(EnhancedCode(2, 0, 0)), "later").normalized(d);
        assert_eq!(r.enhanced, Some(EnhancedCode(4, 0, 0)));
        let r = Reply::new(250, Some(EnhancedCode(5, 1, 1)), "odd").normalized(d);
        assert_eq!(r.enhanced, Some(EnhancedCode(2, 1, 5)));
        let r = Reply::new(550, Some(EnhancedCode(5, 7, 1)), "no").normalized(d);
        assert_eq!(r.enhanced, Some(EnhancedCode(5, 7, 1)));
        assert_eq!(
            Reply::new(999, None, "x").normalized(d),
            Reply::local_error()
        );
        assert_eq!(
            Reply::new(334, None, "x").normalized(d),
            Reply::local_error()
        );
    }
}
