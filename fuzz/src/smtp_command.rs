//! The SMTP command-line parser: `split_line`, then `parse_mail` and
//! `parse_rcpt` on the arguments (whatever the verb, so the path parser sees
//! every input).
//!
//! Checked, from the docs of `smtp::command`:
//! - `split_line` refuses exactly the empty, blank and non-printable lines;
//!   otherwise the arguments are a trimmed tail of the line and the verb is
//!   the first word, case-insensitively;
//! - an accepted path is ASCII, within RFC 5321's limits (local part 64,
//!   domain 255, path 256 octets), and round-trips: printing it back as
//!   `FROM:<path> SIZE=n BODY=x` / `TO:<path>` parses to the same value,
//!   whatever the case of `FROM:`/`TO:` and the spaces after it;
//! - an unsupported parameter is named as written (upper-cased).

use arbitrary::Arbitrary;
use smtpguard::smtp::command::{
    parse_mail, parse_rcpt, split_line, ArgError, Verb, MAX_DOMAIN, MAX_LOCAL_PART, MAX_PATH,
};
use smtpguard::smtp::{ForwardPath, MailParams, Mailbox, ReversePath};

/// One command line, without its line terminator.
#[derive(Debug, Clone, Arbitrary)]
pub struct Input {
    /// The line as the client sent it.
    pub line: Vec<u8>,
}

/// Verbs the parser names, with their words.
const NAMED: &[(Verb, &str)] = &[
    (Verb::Ehlo, "EHLO"),
    (Verb::Helo, "HELO"),
    (Verb::StartTls, "STARTTLS"),
    (Verb::Mail, "MAIL"),
    (Verb::Rcpt, "RCPT"),
    (Verb::Data, "DATA"),
    (Verb::Rset, "RSET"),
    (Verb::Noop, "NOOP"),
    (Verb::Quit, "QUIT"),
    (Verb::Help, "HELP"),
    (Verb::Vrfy, "VRFY"),
];

/// Splits the line, then parses its arguments as MAIL and as RCPT.
pub fn check(input: &Input) {
    let line = &input.line[..];
    let printable = line
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    let blank = line.iter().all(|&b| b == b' ' || b == b'\t');
    let Some((verb, args)) = split_line(line) else {
        assert!(!printable || blank, "printable line refused: {line:?}");
        return;
    };
    assert!(printable && !blank, "line accepted: {line:?}");
    let text = std::str::from_utf8(line).expect("printable ASCII");
    let trimmed = text.trim_end_matches([' ', '\t']);
    assert!(
        trimmed.ends_with(args),
        "arguments {args:?} are not a tail of {text:?}"
    );
    assert!(
        !args.starts_with(' ') && !args.ends_with([' ', '\t']),
        "{args:?} untrimmed"
    );
    let word = trimmed.split(' ').next().unwrap_or("");
    for &(named, name) in NAMED {
        assert_eq!(
            verb == named,
            word.eq_ignore_ascii_case(name),
            "{word:?} read as {verb:?}"
        );
    }
    check_mail(args);
    check_rcpt(args);
}

fn check_mail(args: &str) {
    match parse_mail(args) {
        Ok((path, params)) => {
            if let ReversePath::Mailbox(m) = &path {
                check_mailbox(m);
            }
            check_path_len(&path.to_string());
            let again = format!("from:  {path}{}", render_params(&params));
            assert_eq!(
                parse_mail(&again),
                Ok((path, params)),
                "{args:?} printed as {again:?} parses differently"
            );
        }
        Err(e) => check_error(args, &e),
    }
}

fn check_rcpt(args: &str) {
    match parse_rcpt(args) {
        Ok(path) => {
            match &path {
                ForwardPath::Mailbox(m) => check_mailbox(m),
                ForwardPath::Postmaster => {}
            }
            check_path_len(&path.to_string());
            let again = format!("To: {path}");
            assert_eq!(
                parse_rcpt(&again),
                Ok(path),
                "{args:?} printed as {again:?} parses differently"
            );
        }
        Err(e) => check_error(args, &e),
    }
}

fn check_mailbox(m: &Mailbox) {
    assert!(
        m.local_part().len() <= MAX_LOCAL_PART,
        "local part {:?}",
        m.local_part()
    );
    assert!(m.domain().len() <= MAX_DOMAIN, "domain {:?}", m.domain());
    assert!(!m.local_part().is_empty() && !m.domain().is_empty(), "{m}");
    assert!(m.to_string().is_ascii(), "{m}");
}

fn check_path_len(path: &str) {
    assert!(
        path.len() <= MAX_PATH,
        "path of {} octets: {path}",
        path.len()
    );
}

/// ` SIZE=n BODY=x`, as a client would write them.
fn render_params(params: &MailParams) -> String {
    let mut out = String::new();
    if let Some(size) = params.size {
        out.push_str(&format!(" SIZE={size}"));
    }
    if let Some(body) = params.body {
        out.push_str(&format!(" BODY={}", body.as_str()));
    }
    out
}

fn check_error(args: &str, e: &ArgError) {
    if let ArgError::UnknownParam(keyword) = e {
        assert!(!keyword.is_empty(), "unnamed parameter in {args:?}");
        assert_eq!(*keyword, keyword.to_ascii_uppercase());
        assert!(
            args.to_ascii_uppercase().contains(keyword.as_str()),
            "parameter {keyword:?} is not in {args:?}"
        );
    }
}
