//! Command-line parsing: verbs, MAIL/RCPT paths (RFC 5321 §4.1.2) and
//! ESMTP parameters (SIZE, RFC 1870; BODY, RFC 6152).
//!
//! The session splits the byte stream into lines; this module turns one
//! line (terminator already removed) into a verb and its arguments, and the
//! arguments of MAIL and RCPT into typed paths. Parsing is strict where it
//! matters for safety (paths must be bracketed, ASCII only, RFC 5321 length
//! limits) and lenient where real clients deviate harmlessly (spaces after
//! `FROM:`, trailing spaces, any case).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest local part (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;
/// Longest domain (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Longest path, brackets included (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH: usize = 256;

/// A command verb, recognised case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `EHLO` (RFC 5321 §4.1.1.1).
    Ehlo,
    /// `HELO`.
    Helo,
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `MAIL FROM:`.
    Mail,
    /// `RCPT TO:`.
    Rcpt,
    /// `DATA`.
    Data,
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `HELP`.
    Help,
    /// `VRFY`.
    Vrfy,
    /// Known SMTP verbs we do not implement (EXPN, TURN, BDAT, AUTH, ...).
    NotImplemented,
    /// `GET`, `POST`, ...: an HTTP client on the SMTP port.
    Http,
    /// Anything else.
    Unknown,
}

impl Verb {
    fn from_word(w: &str) -> Verb {
        const NOT_IMPL: &[&str] = &[
            "EXPN", "TURN", "ATRN", "ETRN", "BDAT", "AUTH", "SEND", "SOML", "SAML", "XCLIENT",
            "XFORWARD", "VERB", "ONEX", "BURL",
        ];
        const HTTP: &[&str] = &["GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"];
        let eq = |s: &str| w.eq_ignore_ascii_case(s);
        match () {
            _ if eq("EHLO") => Verb::Ehlo,
            _ if eq("HELO") => Verb::Helo,
            _ if eq("STARTTLS") => Verb::StartTls,
            _ if eq("MAIL") => Verb::Mail,
            _ if eq("RCPT") => Verb::Rcpt,
            _ if eq("DATA") => Verb::Data,
            _ if eq("RSET") => Verb::Rset,
            _ if eq("NOOP") => Verb::Noop,
            _ if eq("QUIT") => Verb::Quit,
            _ if eq("HELP") => Verb::Help,
            _ if eq("VRFY") => Verb::Vrfy,
            _ if NOT_IMPL.iter().any(|v| eq(v)) => Verb::NotImplemented,
            // HTTP methods are case-sensitive upper case; "get" is just unknown.
            _ if HTTP.contains(&w) => Verb::Http,
            _ => Verb::Unknown,
        }
    }

    /// Allowed before STARTTLS when TLS is required (RFC 3207 §4).
    pub(crate) fn allowed_before_tls(self) -> bool {
        matches!(
            self,
            Verb::Ehlo | Verb::Helo | Verb::StartTls | Verb::Noop | Verb::Rset | Verb::Quit
        )
    }
}

/// Split a command line (without its line terminator) into verb and
/// arguments. `None` when the line is empty or contains bytes that cannot
/// appear in a command (controls other than HT, bare CR, 8-bit).
pub fn split_line(line: &[u8]) -> Option<(Verb, &str)> {
    if line.is_empty()
        || !line
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return None;
    }
    // All ASCII: cannot fail.
    let line = std::str::from_utf8(line)
        .ok()?
        .trim_end_matches([' ', '\t']);
    if line.is_empty() {
        return None;
    }
    let (word, args) = match line.find(' ') {
        Some(i) => (&line[..i], line[i + 1..].trim_start_matches(' ')),
        None => (line, ""),
    };
    Some((Verb::from_word(word), args))
}

/// A mailbox `local-part@domain`, as sent (case preserved).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    local_part: String,
    domain: String,
}

impl Mailbox {
    /// The local part as sent, quotes included if it was a quoted string.
    pub fn local_part(&self) -> &str {
        &self.local_part
    }
    /// The domain as sent: a host name, or an address literal with its
    /// brackets (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
    pub fn domain(&self) -> &str {
        &self.domain
    }
    /// Whether the domain is an address literal.
    pub fn is_address_literal(&self) -> bool {
        self.domain.starts_with('[')
    }
}

impl fmt::Display for Mailbox {
    /// `local-part@domain`, without brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local_part, self.domain)
    }
}

/// The argument of `MAIL FROM:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>`: bounces and other notifications (RFC 5321 §4.5.5).
    Null,
    /// A sender mailbox.
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    /// The bracketed path as used in SMTP: `<>` or `<a@example.com>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// The argument of `RCPT TO:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ForwardPath {
    /// `<postmaster>` with no domain (RFC 5321 §4.1.1.3, must be accepted).
    Postmaster,
    /// A recipient mailbox.
    Mailbox(Mailbox),
}

impl ForwardPath {
    /// The mailbox, if any (not for the bare `<postmaster>`).
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            ForwardPath::Postmaster => None,
            ForwardPath::Mailbox(m) => Some(m),
        }
    }
    /// Whether this is `<postmaster>` or `<postmaster@...>`.
    pub fn is_postmaster(&self) -> bool {
        match self {
            ForwardPath::Postmaster => true,
            ForwardPath::Mailbox(m) => m.local_part.eq_ignore_ascii_case("postmaster"),
        }
    }
}

impl fmt::Display for ForwardPath {
    /// The bracketed path as used in SMTP: `<postmaster>` or `<a@example.com>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("<postmaster>"),
            ForwardPath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// `BODY=` value of MAIL (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BodyType {
    /// `BODY=7BIT`
    SevenBit,
    /// `BODY=8BITMIME`
    EightBitMime,
}

impl BodyType {
    /// The parameter value, for relaying to an upstream MTA.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
        }
    }
}

/// ESMTP parameters accepted on MAIL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=` (RFC 1870): the client's estimate of the message size.
    /// Saturates at `u64::MAX` for absurd values.
    pub size: Option<u64>,
    /// `BODY=` (RFC 6152).
    pub body: Option<BodyType>,
}

/// Why MAIL or RCPT arguments were refused; the session maps each to a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgError {
    /// Not `FROM:`/`TO:` followed by something path-like → 501 5.5.4.
    Syntax,
    /// The path itself is malformed → 501 5.1.7 / 501 5.1.3.
    BadPath,
    /// A malformed or duplicated parameter, or a bad value → 501 5.5.4.
    BadParam,
    /// A well-formed parameter we do not support → 555 5.5.4.
    UnknownParam(String),
}

/// Parse the arguments of MAIL: `FROM:<path> [params]`.
pub fn parse_mail(args: &str) -> Result<(ReversePath, MailParams), ArgError> {
    let rest = strip_prefix_ci(args, "FROM:").ok_or(ArgError::Syntax)?;
    let rest = rest.trim_start_matches(' ');
    let (path, rest) = parse_path(rest, false)?;
    let path = match path {
        Path::Null => ReversePath::Null,
        Path::Mailbox(m) => ReversePath::Mailbox(m),
        Path::Postmaster => return Err(ArgError::BadPath),
    };
    let mut params = MailParams::default();
    for (key, value) in parse_params(rest)? {
        if key.eq_ignore_ascii_case("SIZE") {
            let v = value.ok_or(ArgError::BadParam)?;
            if params.size.is_some() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ArgError::BadParam);
            }
            params.size = Some(v.parse().unwrap_or(u64::MAX));
        } else if key.eq_ignore_ascii_case("BODY") {
            let v = value.ok_or(ArgError::BadParam)?;
            if params.body.is_some() {
                return Err(ArgError::BadParam);
            }
            params.body = Some(if v.eq_ignore_ascii_case("7BIT") {
                BodyType::SevenBit
            } else if v.eq_ignore_ascii_case("8BITMIME") {
                BodyType::EightBitMime
            } else {
                return Err(ArgError::BadParam);
            });
        } else {
            return Err(ArgError::UnknownParam(key.to_ascii_uppercase()));
        }
    }
    Ok((path, params))
}

/// Parse the arguments of RCPT: `TO:<path>`; no parameters are supported.
pub fn parse_rcpt(args: &str) -> Result<ForwardPath, ArgError> {
    let rest = strip_prefix_ci(args, "TO:").ok_or(ArgError::Syntax)?;
    let rest = rest.trim_start_matches(' ');
    let (path, rest) = parse_path(rest, true)?;
    let path = match path {
        Path::Null => return Err(ArgError::BadPath),
        Path::Postmaster => ForwardPath::Postmaster,
        Path::Mailbox(m) => ForwardPath::Mailbox(m),
    };
    if let Some((key, _)) = parse_params(rest)?.into_iter().next() {
        return Err(ArgError::UnknownParam(key.to_ascii_uppercase()));
    }
    Ok(path)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `esmtp-param *(SP esmtp-param)`; keyword `ALPHA/DIGIT *(ALPHA/DIGIT/"-")`,
/// value `1*(%d33-60 / %d62-126)`. Returned in order.
fn parse_params(s: &str) -> Result<Vec<(&str, Option<&str>)>, ArgError> {
    let mut out = Vec::new();
    for p in s.split(' ').filter(|p| !p.is_empty()) {
        let (k, v) = match p.find('=') {
            Some(i) => (&p[..i], Some(&p[i + 1..])),
            None => (p, None),
        };
        let kb = k.as_bytes();
        let key_ok = !kb.is_empty()
            && kb[0].is_ascii_alphanumeric()
            && kb.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-');
        let val_ok = v.is_none_or(|v| {
            !v.is_empty() && v.bytes().all(|b| (33..=126).contains(&b) && b != b'=')
        });
        if !key_ok || !val_ok {
            return Err(ArgError::BadParam);
        }
        out.push((k, v));
    }
    Ok(out)
}

enum Path {
    Null,
    Postmaster,
    Mailbox(Mailbox),
}

/// Parse `<...>` at the start of `s`; returns the path and what follows it
/// (which must be empty or start with a space).
fn parse_path(s: &str, rcpt: bool) -> Result<(Path, &str), ArgError> {
    if !s.starts_with('<') {
        return Err(ArgError::BadPath);
    }
    let end = find_path_end(s).ok_or(ArgError::BadPath)?;
    if end + 1 > MAX_PATH {
        return Err(ArgError::BadPath);
    }
    let inner = &s[1..end];
    let rest = &s[end + 1..];
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(ArgError::BadPath);
    }
    // Source route "@a,@b:" — accepted and ignored (RFC 5321 §4.1.2, C.).
    let inner = if inner.starts_with('@') {
        let colon = inner.find(':').ok_or(ArgError::BadPath)?;
        for hop in inner[..colon].split(',') {
            let d = hop.strip_prefix('@').ok_or(ArgError::BadPath)?;
            if !valid_domain(d) {
                return Err(ArgError::BadPath);
            }
        }
        &inner[colon + 1..]
    } else {
        inner
    };
    if inner.is_empty() {
        return Ok((Path::Null, rest));
    }
    if rcpt && inner.eq_ignore_ascii_case("postmaster") {
        return Ok((Path::Postmaster, rest));
    }
    let at = local_part_end(inner).ok_or(ArgError::BadPath)?;
    let (local, domain) = (&inner[..at], &inner[at + 1..]);
    if local.len() > MAX_LOCAL_PART || domain.len() > MAX_DOMAIN {
        return Err(ArgError::BadPath);
    }
    if !(valid_domain(domain) || valid_address_literal(domain)) {
        return Err(ArgError::BadPath);
    }
    Ok((
        Path::Mailbox(Mailbox {
            local_part: local.to_string(),
            domain: domain.to_string(),
        }),
        rest,
    ))
}

/// Index of the `>` closing the path that starts at `s[0] == '<'`, skipping
/// over a quoted local part (which may contain `>`).
fn find_path_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 1;
    let mut quoted = false;
    while i < b.len() {
        match b[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            b'<' if !quoted => return None,
            _ => {}
        }
        i += 1;
    }
    None
}

/// Validate the local part at the start of `s` and return the index of the
/// `@` that ends it. Dot-string or quoted-string (RFC 5321 §4.1.2).
fn local_part_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.first() == Some(&b'"') {
        let mut i = 1;
        loop {
            match *b.get(i)? {
                b'"' => break,
                b'\\' => {
                    let c = *b.get(i + 1)?;
                    if !(32..=126).contains(&c) {
                        return None;
                    }
                    i += 2;
                }
                c if c == 32 || c == 33 || (35..=91).contains(&c) || (93..=126).contains(&c) => {
                    i += 1
                }
                _ => return None,
            }
        }
        (b.get(i + 1) == Some(&b'@')).then_some(i + 1)
    } else {
        let at = s.find('@')?;
        let local = &s[..at];
        let atext = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c);
        let ok = local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(atext));
        ok.then_some(at)
    }
}

/// `sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]`.
pub(crate) fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= MAX_DOMAIN
        && d.split('.').all(|label| {
            let l = label.as_bytes();
            !l.is_empty()
                && l.len() <= 63
                && l[0].is_ascii_alphanumeric()
                && l[l.len() - 1].is_ascii_alphanumeric()
                && l.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

/// `[IPv4]` or `[IPv6:...]` (RFC 5321 §4.1.3). General address literals
/// (`[tag:...]`) are refused.
fn valid_address_literal(d: &str) -> bool {
    let Some(inner) = d.strip_prefix('[').and_then(|d| d.strip_suffix(']')) else {
        return false;
    };
    if let Some(v6) = strip_prefix_ci(inner, "IPv6:") {
        return v6.parse::<Ipv6Addr>().is_ok();
    }
    inner.parse::<Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(l: &str, d: &str) -> Mailbox {
        Mailbox {
            local_part: l.into(),
            domain: d.into(),
        }
    }

    #[test]
    fn verbs_case_insensitive() {
        for (line, verb, args) in [
            ("EHLO client.example.org", Verb::Ehlo, "client.example.org"),
            ("ehlo client.example.org", Verb::Ehlo, "client.example.org"),
            (
                "MaIl FROM:<a@example.com>",
                Verb::Mail,
                "FROM:<a@example.com>",
            ),
            ("rset", Verb::Rset, ""),
            ("RSET   ", Verb::Rset, ""),
            ("STARTTLS", Verb::StartTls, ""),
            ("expn list", Verb::NotImplemented, "list"),
            ("BDAT 100 LAST", Verb::NotImplemented, "100 LAST"),
            ("GET / HTTP/1.1", Verb::Http, "/ HTTP/1.1"),
            ("FOO bar", Verb::Unknown, "bar"),
        ] {
            assert_eq!(split_line(line.as_bytes()), Some((verb, args)), "{line}");
        }
        assert_eq!(split_line(b""), None);
        assert_eq!(split_line(b"   "), None);
        assert_eq!(split_line(b"NOOP\r"), None);
        assert_eq!(split_line(b"NOOP \x00"), None);
        assert_eq!(split_line("EHLO h\u{e9}".as_bytes()), None);
    }

    #[test]
    fn mail_paths() {
        let ok = [
            (
                "FROM:<a@example.com>",
                ReversePath::Mailbox(mb("a", "example.com")),
            ),
            (
                "from:<A.B+c@Example.COM>",
                ReversePath::Mailbox(mb("A.B+c", "Example.COM")),
            ),
            (
                "FROM: <a@example.com>",
                ReversePath::Mailbox(mb("a", "example.com")),
            ),
            ("FROM:<>", ReversePath::Null),
            (
                "FROM:<@a.example.net,@b.example.net:u@example.com>",
                ReversePath::Mailbox(mb("u", "example.com")),
            ),
            (
                "FROM:<\"john doe\"@example.com>",
                ReversePath::Mailbox(mb("\"john doe\"", "example.com")),
            ),
            (
                "FROM:<\"a>b\"@example.com>",
                ReversePath::Mailbox(mb("\"a>b\"", "example.com")),
            ),
            (
                "FROM:<u@[192.0.2.1]>",
                ReversePath::Mailbox(mb("u", "[192.0.2.1]")),
            ),
            (
                "FROM:<u@[IPv6:2001:db8::1]>",
                ReversePath::Mailbox(mb("u", "[IPv6:2001:db8::1]")),
            ),
        ];
        for (args, want) in ok {
            assert_eq!(parse_mail(args).map(|r| r.0), Ok(want), "{args}");
        }
        let long_local = format!("FROM:<{}@example.com>", "a".repeat(65));
        let long_path = format!("FROM:<a@{}.example.com>", vec!["b".repeat(60); 4].join("."));
        let bad = [
            "FROM:a@example.com",
            "FROM:<a@example.com",
            "FROM:<a@>",
            "FROM:<@example.com>",
            "FROM:<a..b@example.com>",
            "FROM:<.a@example.com>",
            "FROM:<a@-example.com>",
            "FROM:<a@example..com>",
            "FROM:<a@example.com.>",
            "FROM:<a b@example.com>",
            "FROM:<a@b@example.com>",
            "FROM:<a@[300.1.1.1]>",
            "FROM:<a@[tag:stuff]>",
            "FROM:<a@example.com>x",
            "FROM:<postmaster>",
            "FROM:<<a@example.com>>",
            "FROM:<\"unterminated@example.com>",
            long_local.as_str(),
            long_path.as_str(),
        ];
        for args in bad {
            assert_eq!(parse_mail(args), Err(ArgError::BadPath), "{args}");
        }
        assert_eq!(parse_mail("TO:<a@example.com>"), Err(ArgError::Syntax));
        assert_eq!(parse_mail(""), Err(ArgError::Syntax));
    }

    #[test]
    fn mail_params() {
        let (_, p) = parse_mail("FROM:<a@example.com> SIZE=1000 BODY=8bitmime").unwrap();
        assert_eq!(
            p,
            MailParams {
                size: Some(1000),
                body: Some(BodyType::EightBitMime)
            }
        );
        let (_, p) = parse_mail("FROM:<> body=7BIT").unwrap();
        assert_eq!(p.body, Some(BodyType::SevenBit));
        let (_, p) = parse_mail("FROM:<> SIZE=99999999999999999999").unwrap();
        assert_eq!(p.size, Some(u64::MAX));
        for bad in [
            "FROM:<> SIZE=",
            "FROM:<> SIZE",
            "FROM:<> SIZE=12a",
            "FROM:<> SIZE=1 SIZE=2",
            "FROM:<> SIZE=123456789012345678901",
            "FROM:<> BODY=BINARYMIME",
            "FROM:<> BODY=8BITMIME BODY=7BIT",
            "FROM:<> -X=1",
            "FROM:<> X=a=b",
        ] {
            assert_eq!(parse_mail(bad), Err(ArgError::BadParam), "{bad}");
        }
        assert_eq!(
            parse_mail("FROM:<> SMTPUTF8"),
            Err(ArgError::UnknownParam("SMTPUTF8".into()))
        );
        assert_eq!(
            parse_mail("FROM:<> ret=HDRS"),
            Err(ArgError::UnknownParam("RET".into()))
        );
    }

    #[test]
    fn rcpt_paths() {
        assert_eq!(parse_rcpt("TO:<postmaster>"), Ok(ForwardPath::Postmaster));
        assert_eq!(parse_rcpt("to:<PostMaster>"), Ok(ForwardPath::Postmaster));
        assert!(parse_rcpt("TO:<postmaster@example.com>")
            .unwrap()
            .is_postmaster());
        assert_eq!(
            parse_rcpt("TO:<b@example.org>"),
            Ok(ForwardPath::Mailbox(mb("b", "example.org")))
        );
        assert_eq!(parse_rcpt("TO:<>"), Err(ArgError::BadPath));
        assert_eq!(parse_rcpt("TO:b@example.org"), Err(ArgError::BadPath));
        assert_eq!(parse_rcpt("FROM:<b@example.org>"), Err(ArgError::Syntax));
        assert_eq!(
            parse_rcpt("TO:<b@example.org> NOTIFY=NEVER"),
            Err(ArgError::UnknownParam("NOTIFY".into()))
        );
    }

    #[test]
    fn display() {
        assert_eq!(ReversePath::Null.to_string(), "<>");
        assert_eq!(ForwardPath::Postmaster.to_string(), "<postmaster>");
        assert_eq!(
            parse_rcpt("TO:<b@example.org>").unwrap().to_string(),
            "<b@example.org>"
        );
        assert_eq!(mb("b", "example.org").to_string(), "b@example.org");
    }
}
