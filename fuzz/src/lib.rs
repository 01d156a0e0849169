//! The bodies of smtpguard's fuzz targets, one module per parser.
//!
//! Each module has an `Input` (built by `arbitrary` from the fuzzer's bytes,
//! or by a proptest strategy in `tests/bounded.rs`) and a `check(&Input)`
//! that runs the parser and panics when a documented promise is broken:
//! bounds, round trips, columns inside the input, results that do not
//! depend on how the input was cut. "No panic" alone is never the test.
//!
//! | target | parser |
//! |---|---|
//! | [`session_feed`] | `smtp::Session::feed`, bytes in arbitrary reads, with the driver protocol of `smtp` |
//! | [`smtp_command`] | `smtp::command::{split_line, parse_mail, parse_rcpt}` |
//! | [`list_entry`] | `policy::parse_entry` and the importer `policy::parse_list` |
//! | [`control_request`] | the control protocol's JSON `control::Request` |
//! | [`upstream_reply`] | `smtp::Reply::parse`, as the upstream client reads replies |
//!
//! `cargo xtask fuzz --minutes N [--target NAME]` runs them under libFuzzer;
//! `cargo xtask test` runs the bounded property tests.

pub mod control_request;
pub mod list_entry;
pub mod session_feed;
pub mod smtp_command;
pub mod upstream_reply;

/// Whether `wire` is well-formed SMTP reply text as RFC 5321 §4.2 and
/// §4.5.3.1.5 want it on the wire: lines of `ddd[ -]text` ending in CRLF, at
/// most `smtpguard::smtp::reply::MAX_REPLY_LINE` octets each (CRLF included), no
/// other CR or LF, printable ASCII or HT only, one code on every line, only
/// the last line with a space (or nothing) after the code.
pub fn assert_wire_reply(wire: &[u8]) {
    use smtpguard::smtp::reply::MAX_REPLY_LINE;
    assert!(
        wire.ends_with(b"\r\n"),
        "reply not CRLF-terminated: {wire:?}"
    );
    let lines: Vec<&[u8]> = wire[..wire.len() - 2].split(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = if i + 1 < lines.len() {
            line.strip_suffix(b"\r").expect("every LF follows a CR")
        } else {
            line
        };
        assert!(
            line.len() + 2 <= MAX_REPLY_LINE,
            "reply line of {} octets: {line:?}",
            line.len() + 2
        );
        assert!(
            line.iter()
                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)),
            "control or 8-bit octet in a reply line: {line:?}"
        );
        assert!(
            line.len() >= 3 && line[..3] == lines[0][..3],
            "code differs: {line:?}"
        );
        let last = i + 1 == lines.len();
        match line.get(3) {
            None => assert!(last, "bare code on a continuation line"),
            Some(b' ') => assert!(last, "space after the code on a continuation: {line:?}"),
            Some(b'-') => assert!(!last, "last line marked as continued: {line:?}"),
            Some(_) => panic!("no separator after the code: {line:?}"),
        }
    }
}
