//! The SMTP client side: one connection to the upstream MTA per client
//! session.
//!
//! Every read of a reply has a deadline (`upstream_timeout`) and a length
//! bound ([`MAX_REPLY_BYTES`], multi-line replies included); every write
//! too has the deadline (the body goes out in [`WRITE_CHUNK`]-sized pieces,
//! each with its own deadline, so a large message on a slow link is not cut
//! off while it makes progress). Commands are sent one at a time (no
//! pipelining: the driver asks one MAIL/RCPT at a time anyway).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::settings::{UpstreamProtocol, UpstreamSettings};
use super::{proxy, ClientInfo};
use crate::smtp::{MailParams, Reply, ReplyParseError, ReversePath};

/// Longest reply accepted from the upstream, all lines of a multi-line
/// reply together, in bytes.
pub(crate) const MAX_REPLY_BYTES: usize = 64 * 1024;
/// The message body is written in pieces of about this many bytes, each
/// under the upstream timeout.
pub(crate) const WRITE_CHUNK: usize = 64 * 1024;
/// Longest SMTP command line, CRLF included (RFC 5321 §4.5.3.1.4); XCLIENT
/// attributes are split over several commands to respect it.
const MAX_COMMAND_LINE: usize = 512;
/// `close()` waits at most this long (or the upstream timeout, if shorter)
/// for the reply to QUIT.
pub(crate) const QUIT_WAIT: Duration = Duration::from_secs(5);

/// Why talking to the upstream failed. Every one of these makes the client
/// see `451 4.4.1` and drops the connection. The cause, if any, is only in
/// [`source`](std::error::Error::source): log the whole chain.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// TCP connect failed.
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    /// No connection, or no complete reply, within the timeout.
    #[error("timed out ({0})")]
    Timeout(&'static str),
    /// Reading or writing failed.
    #[error("I/O error ({stage})")]
    Io {
        stage: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The upstream closed the connection.
    #[error("connection closed by the upstream ({0})")]
    Closed(&'static str),
    /// Not an SMTP reply, or a reply over [`MAX_REPLY_BYTES`].
    #[error("bad reply ({stage})")]
    Garbage {
        stage: &'static str,
        #[source]
        source: ReplyParseError,
    },
    /// A reply that ends the conversation: a 421 at any point, a non-220
    /// greeting, a refused EHLO/HELO/XCLIENT/RSET, an odd reply to DATA.
    #[error("unexpected reply ({stage}): {reply}")]
    Unexpected { stage: &'static str, reply: String },
    /// XCLIENT mode, but the upstream does not offer XCLIENT with ADDR
    /// (Postfix: the client is not in `smtpd_authorized_xclient_hosts`).
    #[error("upstream does not offer XCLIENT ADDR (Postfix: smtpd_authorized_xclient_hosts)")]
    NoXclient,
    /// A command we were about to send contains control characters.
    #[error("refusing to send a command with control characters ({0})")]
    BadCommand(&'static str),
    /// The upstream sent something nobody asked for yet (e.g. a `250`
    /// together with its `354`, before the message was sent): it cannot
    /// be taken as the answer to what we send next.
    #[error("unsolicited reply ({stage}): {reply}")]
    Unsolicited { stage: &'static str, reply: String },
}

impl UpstreamError {
    /// Short label for logs: which step failed.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Io { .. } => "io",
            UpstreamError::Closed(_) => "closed",
            UpstreamError::Garbage { .. } => "garbage",
            UpstreamError::Unexpected { .. } => "reply",
            UpstreamError::NoXclient => "no-xclient",
            UpstreamError::BadCommand(_) => "bad-command",
            UpstreamError::Unsolicited { .. } => "unsolicited",
        }
    }
}

/// What the upstream's EHLO reply offered (only what we use).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extensions {
    /// `SIZE` (RFC 1870): we may pass `SIZE=`.
    pub size: bool,
    /// `8BITMIME` (RFC 6152): we may pass `BODY=`.
    pub eight_bit_mime: bool,
    /// `XCLIENT` and its attribute names, upper case.
    pub xclient: Option<Vec<String>>,
}

impl Extensions {
    /// Keywords from the lines after the first of a 250 EHLO reply.
    fn from_ehlo(reply: &Reply) -> Extensions {
        let mut ext = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            if kw.eq_ignore_ascii_case("SIZE") {
                ext.size = true;
            } else if kw.eq_ignore_ascii_case("8BITMIME") {
                ext.eight_bit_mime = true;
            } else if kw.eq_ignore_ascii_case("XCLIENT") {
                ext.xclient = Some(words.map(str::to_ascii_uppercase).collect());
            }
        }
        ext
    }
}

/// The local addresses of this delivery's open upstream connections
/// (IPv4-mapped normalised to IPv4): a session whose client is one of
/// them is smtpguard talking to itself.
#[derive(Debug, Default)]
pub(crate) struct OwnConnections {
    addrs: Mutex<HashSet<SocketAddr>>,
}

impl OwnConnections {
    /// Whether `peer` is the local end of one of our upstream connections.
    pub(crate) fn contains(&self, peer: SocketAddr) -> bool {
        let peer = canonical(peer);
        self.addrs
            .lock()
            .expect("own connections lock")
            .contains(&peer)
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Keeps a connection's local address in [`OwnConnections`] while it is open.
#[derive(Debug)]
struct OwnAddr {
    set: Arc<OwnConnections>,
    addr: Option<SocketAddr>,
}

impl Drop for OwnAddr {
    fn drop(&mut self) {
        if let Some(a) = self.addr {
            self.set
                .addrs
                .lock()
                .expect("own connections lock")
                .remove(&a);
        }
    }
}

/// An open, greeted, EHLO'd connection to the upstream MTA.
#[derive(Debug)]
pub(crate) struct UpstreamConnection {
    /// Our local address, registered while the connection lives.
    _own: OwnAddr,
    stream: TcpStream,
    /// Bytes read and not yet parsed into a reply.
    rbuf: Vec<u8>,
    timeout: Duration,
    ext: Extensions,
    address: SocketAddr,
}

impl UpstreamConnection {
    /// Connects (within the timeout), sends the PROXY v2 header or does the
    /// XCLIENT exchange as configured, reads the greeting and EHLOs with
    /// `hostname` (HELO if EHLO is refused).
    /// The connection's local address is in `own` while it is open.
    pub(crate) async fn open(
        cfg: &UpstreamSettings,
        hostname: &str,
        client: &ClientInfo,
        own: &Arc<OwnConnections>,
    ) -> Result<UpstreamConnection, UpstreamError> {
        let stream = match timeout(cfg.timeout, TcpStream::connect(cfg.address)).await {
            Err(_) => return Err(UpstreamError::Timeout("connect")),
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().map(canonical);
        if let Some(a) = local {
            own.addrs.lock().expect("own connections lock").insert(a);
        }
        let mut c = UpstreamConnection {
            _own: OwnAddr {
                set: Arc::clone(own),
                addr: local,
            },
            stream,
            rbuf: Vec::with_capacity(1024),
            timeout: cfg.timeout,
            ext: Extensions::default(),
            address: cfg.address,
        };
        if cfg.protocol == UpstreamProtocol::ProxyV2 {
            // Before anything else, in one write (the header must arrive
            // as a whole before the server greets).
            let h = proxy::header(client.peer, client.local, client.tls.as_ref());
            c.write_all(&h, "PROXY header").await?;
        }
        let greeting = c.read_reply("greeting").await?;
        if greeting.code != 220 {
            return Err(unexpected("greeting", &greeting));
        }
        c.hello(hostname).await?;
        if cfg.protocol == UpstreamProtocol::Xclient {
            c.xclient(client, hostname).await?;
        }
        Ok(c)
    }

    /// The upstream's address (for logs).
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// Our end of the connection, when the kernel says.
    pub(crate) fn local_address(&self) -> Option<SocketAddr> {
        self.stream.local_addr().ok()
    }

    /// What the upstream's (last) EHLO offered.
    pub(crate) fn extensions(&self) -> &Extensions {
        &self.ext
    }

    /// EHLO `name`; on a 5xx (the server does not do ESMTP) HELO `name`.
    async fn hello(&mut self, name: &str) -> Result<(), UpstreamError> {
        let r = self.command(&format!("EHLO {name}"), "EHLO").await?;
        if r.code == 250 {
            self.ext = Extensions::from_ehlo(&r);
            return Ok(());
        }
        if r.class() != 5 {
            return Err(unexpected("EHLO", &r));
        }
        let r = self.command(&format!("HELO {name}"), "HELO").await?;
        if r.code != 250 {
            return Err(unexpected("HELO", &r));
        }
        self.ext = Extensions::default();
        Ok(())
    }

    /// The Postfix XCLIENT exchange: the attributes the upstream offers
    /// among ADDR, PORT, NAME, HELO, PROTO (xtext values), split into
    /// commands of at most 512 octets, each answered 220 (or 250 by older
    /// servers); then EHLO again, with the client's HELO name when it has
    /// one (XCLIENT_README: the conversation restarts as if new).
    async fn xclient(&mut self, client: &ClientInfo, hostname: &str) -> Result<(), UpstreamError> {
        let offered = match &self.ext.xclient {
            Some(attrs) if attrs.iter().any(|a| a == "ADDR") => attrs.clone(),
            _ => return Err(UpstreamError::NoXclient),
        };
        for line in xclient_commands(client, &offered) {
            let r = self.command(&line, "XCLIENT").await?;
            if r.class() != 2 {
                return Err(unexpected("XCLIENT", &r));
            }
        }
        let name = client
            .helo
            .as_deref()
            .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or(hostname)
            .to_string();
        self.hello(&name).await
    }

    /// `MAIL FROM:<path>` with `SIZE=` / `BODY=` only when the upstream
    /// offers SIZE / 8BITMIME. Returns the upstream's reply.
    pub(crate) async fn mail(
        &mut self,
        from: &ReversePath,
        params: &MailParams,
    ) -> Result<Reply, UpstreamError> {
        let line = mail_command(from, params, &self.ext);
        self.command(&line, "MAIL").await
    }

    /// Sends the message after a 354: `header` (our `Received:`, ending
    /// in CRLF) and `data` dot-stuffed, then `.` CRLF. Returns the reply to
    /// the final dot. Anything the upstream says before the final dot is
    /// sent (a `250` in the same write as its `354`, say) is
    /// [`UpstreamError::Unsolicited`]: only a reply read after the whole
    /// message went out can be its answer.
    pub(crate) async fn send_message(
        &mut self,
        header: &[u8],
        data: &[u8],
    ) -> Result<Reply, UpstreamError> {
        let mut out = Vec::with_capacity(WRITE_CHUNK + header.len() + 1024);
        let mut stuffer = DotStuffer::new();
        self.check_idle("after 354")?;
        stuffer.push(header, &mut out);
        for piece in data.chunks(WRITE_CHUNK) {
            stuffer.push(piece, &mut out);
            if out.len() >= WRITE_CHUNK {
                self.check_idle("message body")?;
                self.write_all(&out, "message body").await?;
                out.clear();
            }
        }
        stuffer.finish(&mut out);
        self.check_idle("message body")?;
        self.write_all(&out, "message body").await?;
        self.read_reply("end of data").await
    }

    /// Sends one command line (CRLF added) and reads the reply. A 421 is
    /// an error: the upstream is closing.
    pub(crate) async fn command(
        &mut self,
        line: &str,
        stage: &'static str,
    ) -> Result<Reply, UpstreamError> {
        if line.bytes().any(|b| b.is_ascii_control()) {
            return Err(UpstreamError::BadCommand(stage));
        }
        self.check_idle(stage)?;
        let mut buf = Vec::with_capacity(line.len() + 2);
        buf.extend_from_slice(line.as_bytes());
        buf.extend_from_slice(b"\r\n");
        self.write_all(&buf, stage).await?;
        let r = self.read_reply(stage).await?;
        if r.code == 421 {
            return Err(unexpected(stage, &r));
        }
        Ok(r)
    }

    /// QUIT, waiting at most `wait` for the reply; the connection is
    /// dropped either way.
    pub(crate) async fn quit(mut self, wait: Duration) {
        self.timeout = self.timeout.min(wait);
        let _ = self.command("QUIT", "QUIT").await;
        let _ = timeout(wait, self.stream.shutdown()).await;
    }

    /// Before a command: the upstream must have said nothing since its
    /// last reply. We never pipeline, so anything already sent was not
    /// asked for and would be taken as the answer to the wrong command.
    /// Typically it is a 421 (the upstream timed out an idle connection)
    /// or EOF; either way the connection is unusable. Does not wait.
    fn check_idle(&mut self, stage: &'static str) -> Result<(), UpstreamError> {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return Err(UpstreamError::Closed(stage)),
                Ok(n) if self.rbuf.len() < MAX_REPLY_BYTES => {
                    self.rbuf.extend_from_slice(&chunk[..n])
                }
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(source) => return Err(UpstreamError::Io { stage, source }),
            }
        }
        if self.rbuf.is_empty() {
            return Ok(());
        }
        let reply = match Reply::parse(&self.rbuf, MAX_REPLY_BYTES) {
            Ok(Some((r, _))) => r.to_string().trim_end().replace("\r\n", " | "),
            _ => "data that is not a reply".to_string(),
        };
        Err(UpstreamError::Unsolicited { stage, reply })
    }

    async fn write_all(&mut self, bytes: &[u8], stage: &'static str) -> Result<(), UpstreamError> {
        match timeout(self.timeout, self.stream.write_all(bytes)).await {
            Err(_) => Err(UpstreamError::Timeout(stage)),
            Ok(Err(source)) => Err(UpstreamError::Io { stage, source }),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// One complete reply, within the timeout and [`MAX_REPLY_BYTES`].
    pub(crate) async fn read_reply(&mut self, stage: &'static str) -> Result<Reply, UpstreamError> {
        match timeout(self.timeout, self.read_reply_inner(stage)).await {
            Err(_) => Err(UpstreamError::Timeout(stage)),
            Ok(r) => r,
        }
    }

    async fn read_reply_inner(&mut self, stage: &'static str) -> Result<Reply, UpstreamError> {
        let mut chunk = [0u8; 4096];
        loop {
            match Reply::parse(&self.rbuf, MAX_REPLY_BYTES) {
                Ok(Some((reply, n))) => {
                    self.rbuf.drain(..n);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => return Err(UpstreamError::Garbage { stage, source }),
            }
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|source| UpstreamError::Io { stage, source })?;
            if n == 0 {
                return Err(UpstreamError::Closed(stage));
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn unexpected(stage: &'static str, r: &Reply) -> UpstreamError {
    let mut text = r.to_string();
    text.truncate(text.trim_end().len().min(300));
    UpstreamError::Unexpected {
        stage,
        reply: text.replace("\r\n", " | "),
    }
}

/// `MAIL FROM:<path>[ SIZE=n][ BODY=x]`, parameters only when offered.
pub(crate) fn mail_command(from: &ReversePath, params: &MailParams, ext: &Extensions) -> String {
    let mut line = format!("MAIL FROM:{from}");
    if let (true, Some(size)) = (ext.size, params.size) {
        line.push_str(&format!(" SIZE={size}"));
    }
    if let (true, Some(body)) = (ext.eight_bit_mime, params.body) {
        line.push_str(" BODY=");
        line.push_str(body.as_str());
    }
    line
}

/// The XCLIENT command lines for `client`, using only the `offered`
/// attribute names, each line at most 512 octets with its CRLF.
///
/// `ADDR=<ip>` (`IPV6:<ip>` for IPv6), `PORT=<port>`, `NAME=[UNAVAILABLE]`
/// (we do no reverse DNS), `HELO=<name>` (or `[UNAVAILABLE]`) and
/// `PROTO=ESMTP|SMTP` (only once the client said HELO/EHLO); values xtext
/// encoded (RFC 3461 §4).
pub(crate) fn xclient_commands(client: &ClientInfo, offered: &[String]) -> Vec<String> {
    let ip = client.peer.ip().to_canonical();
    let addr = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("IPV6:{v6}"),
    };
    let mut attrs = vec![
        ("ADDR", xtext(&addr)),
        ("PORT", client.peer.port().to_string()),
        ("NAME", "[UNAVAILABLE]".to_string()),
    ];
    match &client.helo {
        Some(h) => {
            attrs.push(("HELO", xtext(h)));
            attrs.push(("PROTO", if client.esmtp { "ESMTP" } else { "SMTP" }.into()));
        }
        None => attrs.push(("HELO", "[UNAVAILABLE]".into())),
    }
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::from("XCLIENT");
    for (name, value) in attrs {
        if !offered.iter().any(|o| o == name) {
            continue;
        }
        let attr = format!(" {name}={value}");
        if cur.len() > "XCLIENT".len() && cur.len() + attr.len() + 2 > MAX_COMMAND_LINE {
            lines.push(std::mem::replace(&mut cur, String::from("XCLIENT")));
        }
        cur.push_str(&attr);
    }
    if cur.len() > "XCLIENT".len() {
        lines.push(cur);
    }
    lines
}

/// xtext (RFC 3461 §4): printable ASCII `!`..`~` except `+` and `=` as
/// is, every other octet as `+XX` (upper-case hex).
pub(crate) fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Streaming dot-stuffing (RFC 5321 §4.5.2) of a message given in pieces:
/// a `.` at the start of a line is doubled; [`finish`](Self::finish) ends
/// an unterminated last line with CRLF and appends the final `.` CRLF.
/// Lines are taken to end at LF (the message has CRLF line ends).
#[derive(Debug)]
pub(crate) struct DotStuffer {
    at_line_start: bool,
    /// The last two octets pushed (CRLF before anything is pushed, so an
    /// empty message is just `.` CRLF).
    tail: [u8; 2],
}

impl DotStuffer {
    pub(crate) fn new() -> DotStuffer {
        DotStuffer {
            at_line_start: true,
            tail: *b"\r\n",
        }
    }

    /// Appends `input`, stuffed, to `out`.
    pub(crate) fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        while !rest.is_empty() {
            if self.at_line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    out.extend_from_slice(&rest[..=i]);
                    rest = &rest[i + 1..];
                    self.at_line_start = true;
                }
                None => {
                    out.extend_from_slice(rest);
                    rest = &[];
                    self.at_line_start = false;
                }
            }
        }
        match input {
            [] => {}
            [b] => self.tail = [self.tail[1], *b],
            [.., a, b] => self.tail = [*a, *b],
        }
    }

    /// Appends CRLF if the last line is unterminated, then `.` CRLF.
    pub(crate) fn finish(self, out: &mut Vec<u8>) {
        if self.tail != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// The whole message dot-stuffed and terminated (for tests and small
/// messages).
#[cfg(test)]
pub(crate) fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    let mut s = DotStuffer::new();
    s.push(data, &mut out);
    s.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::command::parse_mail;
    use crate::smtp::BodyType;

    #[test]
    fn xtext_encoding() {
        assert_eq!(xtext("mail.example.org"), "mail.example.org");
        assert_eq!(xtext("a+b=c"), "a+2Bb+3Dc");
        assert_eq!(xtext("sp ace\ttab"), "sp+20ace+09tab");
        assert_eq!(xtext("IPV6:2001:db8::1"), "IPV6:2001:db8::1");
        assert_eq!(xtext("[UNAVAILABLE]"), "[UNAVAILABLE]");
        assert_eq!(xtext("caf\u{e9}"), "caf+C3+A9");
        assert_eq!(xtext("\x7f~!"), "+7F~!");
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b"hello\r\n"), b"hello\r\n.\r\n");
        assert_eq!(dot_stuff(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(
            dot_stuff(b"a\r\n.\r\n..b\r\n.c\r\nd.e\r\n"),
            b"a\r\n..\r\n...b\r\n..c\r\nd.e\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b".starts"), b"..starts\r\n.\r\n");
        assert_eq!(dot_stuff(b"no crlf at end"), b"no crlf at end\r\n.\r\n");
        assert_eq!(dot_stuff(b"line\r\n."), b"line\r\n..\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
        assert_eq!(dot_stuff(b"\r\n"), b"\r\n.\r\n");
    }

    #[test]
    fn dot_stuffing_in_pieces_matches_whole() {
        let msg = b"Subject: x\r\n\r\n.\r\n..\r\nabc\r\n.def\r\nend.".to_vec();
        let whole = dot_stuff(&msg);
        for split in 0..=msg.len() {
            for split2 in split..=msg.len() {
                let mut out = Vec::new();
                let mut s = DotStuffer::new();
                s.push(&msg[..split], &mut out);
                s.push(&msg[split..split2], &mut out);
                s.push(&msg[split2..], &mut out);
                s.finish(&mut out);
                assert_eq!(out, whole, "split at {split}/{split2}");
            }
        }
        // A piece ending in CR and the next starting with LF.
        let mut out = Vec::new();
        let mut s = DotStuffer::new();
        s.push(b"a\r", &mut out);
        s.push(b"\n", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b"a\r\n.\r\n");
    }

    #[test]
    fn ehlo_extensions() {
        let (r, _) = Reply::parse(
            b"250-mx\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8bitmime\r\n250 XCLIENT NAME addr PORT PROTO HELO\r\n",
            4096,
        )
        .unwrap()
        .unwrap();
        let e = Extensions::from_ehlo(&r);
        assert!(e.size && e.eight_bit_mime);
        assert_eq!(
            e.xclient.unwrap(),
            ["NAME", "ADDR", "PORT", "PROTO", "HELO"]
        );
        let (r, _) = Reply::parse(b"250 mx\r\n", 4096).unwrap().unwrap();
        assert_eq!(Extensions::from_ehlo(&r), Extensions::default());
    }

    #[test]
    fn mail_params_only_when_offered() {
        let (from, params) = parse_mail("FROM:<a@example.org> SIZE=1234 BODY=8BITMIME").unwrap();
        assert_eq!(params.body, Some(BodyType::EightBitMime));
        let all = Extensions {
            size: true,
            eight_bit_mime: true,
            xclient: None,
        };
        assert_eq!(
            mail_command(&from, &params, &all),
            "MAIL FROM:<a@example.org> SIZE=1234 BODY=8BITMIME"
        );
        assert_eq!(
            mail_command(&from, &params, &Extensions::default()),
            "MAIL FROM:<a@example.org>"
        );
        let (null, none) = parse_mail("FROM:<>").unwrap();
        assert_eq!(mail_command(&null, &none, &all), "MAIL FROM:<>");
    }

    fn client(peer: &str, helo: Option<&str>, esmtp: bool) -> ClientInfo {
        ClientInfo {
            peer: peer.parse().unwrap(),
            local: "127.0.0.1:25".parse().unwrap(),
            helo: helo.map(str::to_string),
            esmtp,
            tls: None,
            session_id: "s".into(),
        }
    }

    #[test]
    fn xclient_lines() {
        let all: Vec<String> = ["NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            xclient_commands(&client("192.0.2.10:40000", Some("mail.example.org"), true), &all),
            ["XCLIENT ADDR=192.0.2.10 PORT=40000 NAME=[UNAVAILABLE] HELO=mail.example.org PROTO=ESMTP"]
        );
        assert_eq!(
            xclient_commands(&client("[2001:db8::5]:25", Some("we+ird=name"), false), &all),
            ["XCLIENT ADDR=IPV6:2001:db8::5 PORT=25 NAME=[UNAVAILABLE] HELO=we+2Bird+3Dname PROTO=SMTP"]
        );
        assert_eq!(
            xclient_commands(
                &client("192.0.2.10:1", None, false),
                &["ADDR".into(), "HELO".into()]
            ),
            ["XCLIENT ADDR=192.0.2.10 HELO=[UNAVAILABLE]"]
        );
        // A HELO name that would make the line too long goes in a second command.
        let long = "h".repeat(480);
        let lines = xclient_commands(&client("192.0.2.10:1", Some(&long), true), &all);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines
            .iter()
            .all(|l| l.len() + 2 <= 512 && l.starts_with("XCLIENT ")));
        assert!(lines[1].starts_with(&format!("XCLIENT HELO={long}")));
    }
}
