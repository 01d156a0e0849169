//! The control protocol's request: one line of JSON, read by the daemon
//! with `serde_json::from_str::<control::Request>` (the framing codec hands
//! it a line of UTF-8 without its LF, at most `control::MAX_FRAME_BYTES`).
//!
//! Checked, from the docs of `control::proto`:
//! - an accepted request serialises to one line, tagged by `"op"` with the
//!   value `Request::op` names, and reads back to the same request;
//! - a change is never a dry-run import, and every request is one or the
//!   other (`is_change`);
//! - an error reply built from any text (here the line, and the parse
//!   error) is one line and reads back to itself.

use arbitrary::Arbitrary;
use smtpguard::control::{proto, Request, MAX_FRAME_BYTES};

/// One request line.
#[derive(Debug, Clone, Arbitrary)]
pub struct Input {
    /// The line, without its LF.
    pub line: String,
}

/// Parses the line as the control server does.
pub fn check(input: &Input) {
    let line = &input.line;
    if line.contains('\n') || line.len() > MAX_FRAME_BYTES {
        // The framing codec never hands such a line to the parser.
        return;
    }
    match serde_json::from_str::<Request>(line) {
        Ok(request) => {
            let wire = serde_json::to_string(&request).expect("requests serialise");
            assert!(!wire.contains('\n'), "request is not one line: {wire}");
            let value: serde_json::Value = serde_json::from_str(&wire).expect("valid JSON");
            assert_eq!(value["op"], request.op(), "{wire}");
            let again: Request = serde_json::from_str(&wire)
                .unwrap_or_else(|e| panic!("{wire} does not read back: {e}"));
            assert_eq!(again, request, "{line:?} -> {wire}");
            if let Request::Import { dry_run: true, .. } = request {
                assert!(!request.is_change(), "a dry run changes nothing");
            }
        }
        Err(e) => check_error_reply(&e.to_string()),
    }
    check_error_reply(line);
}

fn check_error_reply(text: &str) {
    let reply = proto::Response::error(text);
    let proto::Response::Error(message) = &reply else {
        panic!("Response::error built {reply:?}");
    };
    assert!(
        !message.chars().any(char::is_control),
        "{message:?} spans lines"
    );
    let wire = serde_json::to_string(&reply).expect("replies serialise");
    assert!(!wire.contains('\n'));
    let again: proto::Response = serde_json::from_str(&wire).expect("reads back");
    assert_eq!(again, reply);
}
