//! The access-list entry parser (`policy::parse_entry`) and the importer
//! that reads whole list files with it (`policy::parse_list`).
//!
//! Checked, from the docs of `policy::entry` and `policy::import`:
//! - an accepted entry is one or more canonical prefixes (host bits clear,
//!   IPv4-mapped stored as IPv4), in address order, of one family, at most
//!   `2 × bits` of them; each printed back parses to itself;
//! - without `allow_all` no prefix covers a whole family; `allow_all` only
//!   ever accepts more;
//! - columns of errors and warnings are 1-based character positions inside
//!   the text; surrounding blanks are ignored and shift the columns;
//! - the importer counts the lines it read, keeps entries and errors in
//!   line order within the file, shifts entry columns into their line,
//!   skips only when told to, and returns exactly the strict result's
//!   entries when told to skip a file without bad lines.

use arbitrary::Arbitrary;
use ipnet::IpNet;
use smtpguard::policy::{
    canonical_prefix, parse_entry, parse_list, EntryOptions, ImportError, ImportFormat,
    ImportOptions, ImportWarning, ListKind,
};

/// One entry, also read as a list file.
#[derive(Debug, Clone, Arbitrary)]
pub struct Input {
    /// The entry text; as a file, its lines.
    pub text: String,
    /// `EntryOptions::allow_all` / `ImportOptions::allow_all`.
    pub allow_all: bool,
    /// How the importer reads lines.
    pub format: Format,
    /// Entries without an action go to the permit list.
    pub permit: bool,
    /// `ImportOptions::skip_invalid`.
    pub skip_invalid: bool,
    /// `ImportOptions::allow_empty`.
    pub allow_empty: bool,
}

/// `ImportFormat`, owned here so it can derive `Arbitrary`.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Format {
    /// `ImportFormat::Auto`.
    Auto,
    /// `ImportFormat::Plain`.
    Plain,
    /// `ImportFormat::PostfixCidr`.
    PostfixCidr,
}

/// Parses `text` as one entry and as a list file.
pub fn check(input: &Input) {
    check_entry(&input.text, input.allow_all);
    check_import(input);
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

fn check_entry(text: &str, allow_all: bool) {
    let options = EntryOptions { allow_all };
    let result = parse_entry(text, options);
    match &result {
        Ok(entry) => {
            let prefixes = &entry.prefixes;
            assert!(!prefixes.is_empty(), "{text:?}: no prefixes");
            let bits = match prefixes[0] {
                IpNet::V4(_) => 32,
                IpNet::V6(_) => 128,
            };
            assert!(
                prefixes.len() <= 2 * bits,
                "{text:?}: {} prefixes",
                prefixes.len()
            );
            for p in prefixes {
                assert_eq!(canonical_prefix(*p), *p, "{text:?}: {p} not canonical");
                assert_eq!(p.max_prefix_len(), bits as u8, "{text:?}: families mixed");
                assert!(
                    allow_all || p.prefix_len() > 0,
                    "{text:?}: {p} without allow_all"
                );
                let again = parse_entry(&p.to_string(), EntryOptions { allow_all: true })
                    .unwrap_or_else(|e| panic!("{text:?}: {p} printed does not parse: {e}"));
                assert_eq!(
                    again.prefixes,
                    [*p],
                    "{text:?}: {p} printed parses differently"
                );
                assert!(again.warnings.is_empty(), "{p}: {:?}", again.warnings);
            }
            for pair in prefixes.windows(2) {
                assert!(
                    pair[0].broadcast() < pair[1].network(),
                    "{text:?}: {} and {} out of order or overlapping",
                    pair[0],
                    pair[1]
                );
            }
            for w in &entry.warnings {
                assert!((1..=chars(text)).contains(&w.column()), "{text:?}: {w}");
            }
            if !allow_all {
                assert_eq!(parse_entry(text, EntryOptions { allow_all: true }), result);
            }
        }
        Err(e) => {
            assert!((1..=chars(text) + 1).contains(&e.column()), "{text:?}: {e}");
        }
    }
    // Blanks around an entry change nothing but the columns.
    let core = text.trim_matches([' ', '\t']);
    if core.len() == text.len() && !core.is_empty() {
        let padded = parse_entry(&format!(" \t{text} "), options);
        match (&result, padded) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.prefixes, b.prefixes, "{text:?} padded");
                let shifted: Vec<usize> = a.warnings.iter().map(|w| w.column() + 2).collect();
                let got: Vec<usize> = b.warnings.iter().map(|w| w.column()).collect();
                assert_eq!(shifted, got, "{text:?} padded: warning columns");
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.column() + 2, b.column(), "{text:?} padded: {a} / {b}")
            }
            (a, b) => panic!("{text:?}: {a:?}, padded: {b:?}"),
        }
    }
}

fn options(input: &Input) -> ImportOptions {
    let mut options = ImportOptions::new(if input.permit {
        ListKind::Permit
    } else {
        ListKind::Deny
    });
    options.format = match input.format {
        Format::Auto => ImportFormat::Auto,
        Format::Plain => ImportFormat::Plain,
        Format::PostfixCidr => ImportFormat::PostfixCidr,
    };
    options.allow_all = input.allow_all;
    options.skip_invalid = input.skip_invalid;
    options.allow_empty = input.allow_empty;
    options
}

fn check_import(input: &Input) {
    let options = options(input);
    let text = input.text.strip_prefix('\u{feff}').unwrap_or(&input.text);
    let lines: Vec<&str> = text.lines().collect();
    let result = parse_list(&input.text, "fuzz", &options);
    match &result {
        Ok(report) => {
            assert_eq!(report.lines, lines.len());
            let mut last = 0;
            for entry in &report.entries {
                assert!(
                    (1..=lines.len()).contains(&entry.line),
                    "entry line {}",
                    entry.line
                );
                assert!(entry.line >= last, "entries out of line order");
                last = entry.line;
                assert_eq!(canonical_prefix(entry.prefix), entry.prefix);
                assert!(
                    options.allow_all || entry.prefix.prefix_len() > 0,
                    "{}",
                    entry.prefix
                );
            }
            assert!(
                !report.entries.is_empty() || options.allow_empty,
                "empty import accepted"
            );
            assert!(
                report.skipped.is_empty() || options.skip_invalid,
                "skipped lines"
            );
            check_line_errors(&report.skipped, &lines);
            for w in &report.warnings {
                let (ImportWarning::Entry { line, .. }
                | ImportWarning::Dunno { line, .. }
                | ImportWarning::UnmappedAction { line, .. }
                | ImportWarning::FirstMatchOrder { line, .. }) = w;
                assert!(
                    (1..=lines.len()).contains(line),
                    "warning on line {line}: {w}"
                );
                if let ImportWarning::Entry { warning, .. } = w {
                    let in_line = chars(lines[line - 1]);
                    assert!((1..=in_line).contains(&warning.column()), "{w}");
                }
            }
            if !options.skip_invalid {
                let lenient = ImportOptions {
                    skip_invalid: true,
                    ..options.clone()
                };
                let again = parse_list(&input.text, "fuzz", &lenient)
                    .expect("a file accepted strictly is accepted when skipping");
                assert_eq!(again.entries, report.entries);
                assert!(again.skipped.is_empty());
            }
        }
        Err(ImportError::Rejected { errors, .. }) => {
            assert!(!errors.is_empty(), "rejected without a reason");
            check_line_errors(errors, &lines);
        }
        Err(ImportError::NoEntries { lines: n, .. }) => {
            assert_eq!(*n, lines.len());
            assert!(!options.allow_empty, "empty file refused with allow_empty");
        }
        Err(e) => panic!("parse_list cannot fail this way: {e}"),
    }
}

/// Line-level errors: each on a line of the file, in line order, columns
/// inside their line.
fn check_line_errors(errors: &[ImportError], lines: &[&str]) {
    let mut last = 0;
    for e in errors {
        let line = e.line().unwrap_or_else(|| panic!("not a line error: {e}"));
        assert!(
            (1..=lines.len()).contains(&line),
            "error on line {line}: {e}"
        );
        assert!(line >= last, "errors out of line order");
        last = line;
        let in_line = chars(lines[line - 1]) + 1;
        let column = match e {
            ImportError::Entry { reason, .. } => reason.column(),
            ImportError::BadExpiry { column, .. }
            | ImportError::MissingAction { column, .. }
            | ImportError::UnknownAction { column, .. } => *column,
            other => panic!("not a line error: {other}"),
        };
        assert!(
            (1..=in_line).contains(&column),
            "column {column} of {in_line}: {e}"
        );
    }
}
