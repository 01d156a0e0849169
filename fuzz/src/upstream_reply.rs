//! The upstream reply parser, `smtp::Reply::parse`, read the way the
//! upstream client reads it: bytes arrive in arbitrary pieces into a
//! buffer, and each complete reply is taken off its front.
//!
//! Checked, from the docs of `smtp::reply`:
//! - a reply takes at most `max_len` bytes, and never more than given;
//!   "more bytes needed" only while the buffer is within `max_len`;
//! - the replies (and the error) do not depend on how the bytes arrived;
//! - a parsed reply has one code in 200..=599, and an enhanced code only
//!   of that class;
//! - its wire form is well-formed (no injected lines, 512-octet lines) and
//!   parses back to the same reply when the text needed no cleaning;
//! - `normalized` makes any parsed reply relayable: a 2xx/4xx/5xx code with
//!   a valid enhanced code of its class.

use arbitrary::Arbitrary;
use smtpguard::smtp::reply::MAX_REPLY_LINE;
use smtpguard::smtp::{EnhancedCode, Reply, ReplyParseError};

/// What the upstream sends.
#[derive(Debug, Clone, Arbitrary)]
pub struct Input {
    /// The bound on one reply, in bytes (the client uses 64 KiB; small
    /// values here reach the bound).
    pub max_len: u16,
    /// Sizes of the successive reads, used in turn (0 reads 1 byte).
    pub reads: Vec<u8>,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// What reading the whole input gives: the replies, then how it stopped.
#[derive(Debug, PartialEq)]
struct Outcome {
    replies: Vec<Reply>,
    end: End,
}

#[derive(Debug, PartialEq)]
enum End {
    /// Every byte was used, or the rest is an incomplete reply.
    NeedMore,
    /// The next reply is malformed or too long.
    Error(ReplyParseError),
}

/// Reads the input in the chosen pieces and in one piece; checks each reply.
pub fn check(input: &Input) {
    let max_len = usize::from(input.max_len);
    let pieces = read(input, &input.reads, max_len);
    let whole = read(input, &[u8::MAX], max_len);
    assert_eq!(pieces, whole, "replies depend on how the bytes arrived");
    for reply in &whole.replies {
        check_reply(reply);
    }
}

/// The client's loop: parse what is buffered, else read more.
fn read(input: &Input, reads: &[u8], max_len: usize) -> Outcome {
    let mut unread = &input.bytes[..];
    let mut buf: Vec<u8> = Vec::new();
    let mut replies = Vec::new();
    let mut next_read = 0;
    loop {
        match Reply::parse(&buf, max_len) {
            Ok(Some((reply, n))) => {
                assert!(n > 0 && n <= buf.len(), "took {n} of {} bytes", buf.len());
                assert!(n <= max_len, "took {n} bytes, bound {max_len}");
                assert_eq!(buf[n - 1], b'\n', "reply does not end at a line end");
                buf.drain(..n);
                replies.push(reply);
                continue;
            }
            Ok(None) => assert!(
                buf.len() <= max_len,
                "{} bytes buffered, bound {max_len}",
                buf.len()
            ),
            Err(e) => {
                return Outcome {
                    replies,
                    end: End::Error(e),
                }
            }
        }
        if unread.is_empty() {
            return Outcome {
                replies,
                end: End::NeedMore,
            };
        }
        let size = reads.get(next_read % reads.len().max(1)).copied();
        next_read += 1;
        let size = usize::from(size.unwrap_or(u8::MAX).max(1)).min(unread.len());
        buf.extend_from_slice(&unread[..size]);
        unread = &unread[size..];
    }
}

fn check_reply(reply: &Reply) {
    assert!((200..=599).contains(&reply.code), "code {}", reply.code);
    assert!(!reply.lines.is_empty(), "reply without lines");
    if let Some(e) = reply.enhanced {
        assert!(e.is_valid(), "{e}");
        assert_eq!(
            u16::from(e.class()),
            reply.code / 100,
            "{e} on {}",
            reply.code
        );
    }
    let wire = reply.to_bytes();
    crate::assert_wire_reply(&wire);
    // The text needed no cleaning: the wire form says exactly the same.
    let prefix = 4 + reply.enhanced.map_or(0, |e| e.to_string().len() + 1);
    let clean = reply.lines.iter().all(|l| {
        l.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
            && prefix + l.len() + 2 <= MAX_REPLY_LINE
    });
    if clean {
        let again = Reply::parse(&wire, wire.len())
            .expect("our wire form parses")
            .expect("our wire form is complete");
        assert_eq!(again.1, wire.len());
        assert_eq!(&again.0, reply, "{:?}", String::from_utf8_lossy(&wire));
    }
    for success in [
        EnhancedCode(2, 1, 0),
        EnhancedCode(2, 1, 5),
        EnhancedCode(2, 0, 0),
    ] {
        let relayed = reply.clone().normalized(success);
        assert!((200..=599).contains(&relayed.code) && relayed.class() != 3);
        let e = relayed
            .enhanced
            .expect("normalized replies carry an enhanced code");
        assert!(e.is_valid() && e.class() == relayed.class(), "{relayed:?}");
        crate::assert_wire_reply(&relayed.to_bytes());
    }
}
