//! The `Received:` trace header we prepend to every message (RFC 5321
//! §4.4), with the RFC 3848 `with` protocol keyword and an RFC 5322 date.
//!
//! Shape (folded at 78 columns; continuation lines start with a tab, shown
//! here as spaces):
//!
//! ```text
//! Received: from mail.example.org ([192.0.2.10]) by mx.example.com (smtpguard)
//!         with ESMTPS id M396330P21137Q1006Rccc88bc81c2c3b10
//!         (version=TLSv1.3 cipher=TLS13_AES_256_GCM_SHA384) for <bob@example.com>;
//!         Sun, 29 Nov 2026 09:43:48 +0000
//! ```
//!
//! * `from`: the client's HELO/EHLO name when it is a syntactically valid
//!   domain or address literal; otherwise (missing or bogus) the client's
//!   address literal, with the bogus name, made comment-safe, recorded as
//!   `helo=...` in the TCP-info comment.
//! * The TCP-info comment holds only the address literal (`[192.0.2.10]`,
//!   `[IPv6:2001:db8::1]`): smtpguard does no reverse DNS lookups.
//! * `with`: `ESMTP` / `SMTP` (EHLO / HELO), `ESMTPS` / `SMTPS` after
//!   STARTTLS (RFC 3848 registers `ESMTPS`; `SMTPS` is the same idea for a
//!   client that said HELO after STARTTLS).
//! * `id`: our queue id (the Maildir unique part in spool mode).
//! * TLS details, when STARTTLS completed, in a comment after the id.
//! * `for <path>` only when the message has exactly one recipient (more
//!   would disclose Bcc recipients to every other recipient).
//! * The date is UTC (`+0000`).

use std::net::IpAddr;
use std::time::SystemTime;

use super::ClientInfo;
use crate::smtp::command::valid_domain;
use crate::smtp::ForwardPath;

/// Fold header lines that would be longer than this (RFC 5322 §2.1.1
/// "SHOULD be no more than 78 characters", CRLF excluded).
const FOLD_AT: usize = 78;

/// The complete `Received:` header field for one message, CRLF-terminated
/// (every line, including continuation lines, ends in CRLF).
///
/// `by` is our host name, `id` our queue id, `recipients` the accepted
/// forward paths, `now` the time of receipt.
pub(crate) fn received_header(
    client: &ClientInfo,
    by: &str,
    id: &str,
    recipients: &[ForwardPath],
    now: SystemTime,
) -> String {
    let ip = client.peer.ip().to_canonical();
    let literal = address_literal(ip);
    let mut tokens: Vec<String> = Vec::with_capacity(10);
    match client.helo.as_deref() {
        Some(helo) if valid_helo(helo) => {
            tokens.push(format!("from {helo}"));
            tokens.push(format!("({literal})"));
        }
        Some(helo) => {
            tokens.push(format!("from {literal}"));
            tokens.push(format!("({literal} helo={})", comment_safe(helo)));
        }
        None => {
            tokens.push(format!("from {literal}"));
            tokens.push(format!("({literal})"));
        }
    }
    tokens.push(format!("by {by}"));
    tokens.push("(smtpguard)".to_string());
    let proto = match (client.esmtp, client.tls.is_some()) {
        (true, false) => "ESMTP",
        (true, true) => "ESMTPS",
        (false, false) => "SMTP",
        (false, true) => "SMTPS",
    };
    tokens.push(format!("with {proto}"));
    tokens.push(format!("id {id}"));
    if let Some(tls) = &client.tls {
        tokens.push(format!(
            "(version={} cipher={})",
            comment_safe(&tls.version),
            comment_safe(&tls.cipher)
        ));
    }
    if let [only] = recipients {
        tokens.push(format!("for {only}"));
    }
    if let Some(last) = tokens.last_mut() {
        last.push(';');
    }
    tokens.push(crate::time::rfc5322(now));
    fold("Received:", &tokens)
}

/// `name: tok1 tok2 ...` folded before a token whenever the line would
/// exceed [`FOLD_AT`] characters; continuation lines start with a tab
/// (RFC 5322 §2.2.3). A token longer than a line stays whole; the first
/// token always stays on the field name's line.
pub(crate) fn fold(name: &str, tokens: &[String]) -> String {
    let mut out =
        String::with_capacity(name.len() + tokens.iter().map(|t| t.len() + 3).sum::<usize>());
    out.push_str(name);
    let mut line_len = name.len();
    for (i, tok) in tokens.iter().enumerate() {
        // Never fold right after the field name, nor on an empty line.
        if i > 0 && line_len > 1 && line_len + 1 + tok.len() > FOLD_AT {
            out.push_str("\r\n\t");
            line_len = 1;
        } else {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(tok);
        line_len += tok.len();
    }
    out.push_str("\r\n");
    out
}

/// `[192.0.2.10]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3).
fn address_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

/// A HELO name usable as the `From-domain` of RFC 5321 §4.4: a domain or an
/// address literal.
fn valid_helo(helo: &str) -> bool {
    if let Some(inner) = helo.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        if let Some(v6) = inner
            .get(..5)
            .filter(|p| p.eq_ignore_ascii_case("IPv6:"))
            .and_then(|_| inner.get(5..))
        {
            return v6.parse::<std::net::Ipv6Addr>().is_ok();
        }
        return inner.parse::<std::net::Ipv4Addr>().is_ok();
    }
    valid_domain(helo)
}

/// Text safe inside an RFC 5322 comment on one line: printable ASCII other
/// than `(`, `)` and `\`; everything else becomes `?`. Capped at 255
/// characters (a client's junk HELO must not make the header unwieldy).
fn comment_safe(s: &str) -> String {
    s.chars()
        .take(255)
        .map(|c| match c {
            '(' | ')' | '\\' => '?',
            '!'..='~' => c,
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::command::parse_rcpt;
    use crate::smtp::TlsInfo;
    use std::time::{Duration, UNIX_EPOCH};

    fn client(helo: Option<&str>, esmtp: bool, tls: bool) -> ClientInfo {
        ClientInfo {
            peer: "192.0.2.10:40000".parse().unwrap(),
            local: "198.51.100.1:25".parse().unwrap(),
            helo: helo.map(str::to_string),
            esmtp,
            tls: tls.then(|| TlsInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_256_GCM_SHA384".into(),
            }),
            session_id: "s1".into(),
        }
    }

    /// 2026-11-29 09:43:48 UTC.
    fn when() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_945_428)
    }

    #[test]
    fn plain_esmtp_one_recipient() {
        let rcpt = [parse_rcpt("TO:<bob@example.com>").unwrap()];
        let h = received_header(
            &client(Some("mail.example.org"), true, false),
            "mx.example.com",
            "ABC123",
            &rcpt,
            when(),
        );
        assert_eq!(
            h,
            "Received: from mail.example.org ([192.0.2.10]) by mx.example.com (smtpguard)\r\n\
             \twith ESMTP id ABC123 for <bob@example.com>; Sun, 29 Nov 2026 09:43:48 +0000\r\n"
        );
    }

    #[test]
    fn tls_two_recipients_no_for() {
        let rcpt = [
            parse_rcpt("TO:<bob@example.com>").unwrap(),
            parse_rcpt("TO:<carol@example.com>").unwrap(),
        ];
        let h = received_header(
            &client(Some("mail.example.org"), true, true),
            "mx.example.com",
            "ABC123",
            &rcpt,
            when(),
        );
        assert_eq!(
            h,
            "Received: from mail.example.org ([192.0.2.10]) by mx.example.com (smtpguard)\r\n\
             \twith ESMTPS id ABC123 (version=TLSv1.3 cipher=TLS13_AES_256_GCM_SHA384);\r\n\
             \tSun, 29 Nov 2026 09:43:48 +0000\r\n"
        );
        assert!(!h.contains("for "));
    }

    #[test]
    fn helo_smtp_and_bogus_helo_and_ipv6() {
        let rcpt = [ForwardPath::Postmaster];
        let mut c = client(Some("bad(name)\u{1}"), false, false);
        c.peer = "[2001:db8::7]:1234".parse().unwrap();
        let h = received_header(&c, "mx", "X", &rcpt, when());
        assert_eq!(
            h,
            "Received: from [IPv6:2001:db8::7] ([IPv6:2001:db8::7] helo=bad?name??) by mx\r\n\
             \t(smtpguard) with SMTP id X for <postmaster>; Sun, 29 Nov 2026 09:43:48 +0000\r\n"
        );
        let h = received_header(&client(None, false, true), "mx", "X", &[], when());
        assert!(
            h.starts_with(
                "Received: from [192.0.2.10] ([192.0.2.10]) by mx (smtpguard) with SMTPS"
            ),
            "{h}"
        );
        let h = received_header(
            &client(Some("[192.0.2.10]"), true, false),
            "mx",
            "X",
            &[],
            when(),
        );
        assert!(
            h.starts_with("Received: from [192.0.2.10] ([192.0.2.10]) by"),
            "{h}"
        );
    }

    #[test]
    fn every_line_is_short_crlf_and_continuations_start_with_whitespace() {
        let long = format!("{}.example.org", "a".repeat(60));
        let rcpt = [parse_rcpt(&format!("TO:<{}@{long}>", "b".repeat(60))).unwrap()];
        let h = received_header(&client(Some(&long), true, true), &long, "ID", &rcpt, when());
        assert!(h.ends_with("\r\n"));
        let body = h.strip_suffix("\r\n").unwrap();
        for (i, line) in body.split("\r\n").enumerate() {
            assert!(!line.contains('\r') && !line.contains('\n'));
            assert!(line.len() <= 998);
            if i > 0 {
                assert!(line.starts_with('\t'), "{line:?}");
            }
            // Only a line holding a single token that is itself too long
            // may exceed 78 characters.
            if line.len() > FOLD_AT {
                let words = line
                    .trim_start_matches("Received:")
                    .split_whitespace()
                    .count();
                assert!(words <= 2, "{line:?}");
            }
        }
    }
}
