//! Importing access lists from the text formats found in the field, as they
//! are, without editing:
//!
//! - the appliance format: `ADDRESS[:NETMASK]` entries, one per line or
//!   several on one line separated by spaces (the vendor manual prints its
//!   sample on one line);
//! - plain prefix lists: Spamhaus DROP mirrors (`PREFIX ` with a trailing
//!   space), Team Cymru full bogons (`# last updated ...` header);
//! - Spamhaus' own `drop.txt`: `; comment` lines and `PREFIX ; SBLnnnnnn`;
//! - ipsum: `ADDRESS<TAB>COUNT`. On a tab-separated line of two fields the
//!   second is dropped when it is a bare integer: it counts blocklists, it
//!   is not an entry;
//! - Postfix CIDR tables (`cidr_table(5)`): `PREFIX ACTION [text]`. The
//!   action picks the list: `REJECT`, `DISCARD`, `DEFER`,
//!   `DEFER_IF_PERMIT`, `4NN`/`5NN` codes go to the deny list, `OK` and
//!   `PERMIT` to the permit list; `DUNNO` and actions without a permit/deny
//!   meaning (`HOLD`, `WARN`, `PREPEND`, restriction names, ...) are skipped
//!   with a warning. Postfix takes the first matching line, smtpguard the
//!   longest prefix: where that changes the outcome the import warns.
//!
//! Everywhere: `#` and `;` start a comment (whole-line or trailing); blank
//! lines, spaces and tabs, CRLF line ends and a UTF-8 byte order mark are
//! ignored. A trailing comment becomes the comment of the entries on its
//! line; a comment starting with `expires=RFC3339-UTC-TIME` (the form
//! [`AccessList::save`](super::AccessList::save) writes, e.g.
//! `# expires=2026-12-01T10:00:00Z spam run`) makes them temporary.
//!
//! Imports are all-or-nothing: one bad line rejects the file and the error
//! lists every bad line, unless [`ImportOptions::skip_invalid`] is set. A
//! file with no entries at all is an error too (a wrong file, an HTML error
//! page, an empty download) unless [`ImportOptions::allow_empty`] is set.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ipnet::IpNet;

use super::entry::{parse_entry, EntryError, EntryOptions, EntryWarning};
use super::table::PrefixTable;
use super::{sanitize_comment, ListKind};

/// How lines are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImportFormat {
    /// Every format of the module documentation; a line whose second field
    /// is a Postfix action is read as a Postfix CIDR table line.
    #[default]
    Auto,
    /// Entries only: every field of every line is an entry for
    /// [`ImportOptions::target`] (the persisted list files).
    Plain,
    /// A Postfix CIDR table: every line must be `PREFIX ACTION [text]`; the
    /// ipsum count rule does not apply.
    PostfixCidr,
}

/// What to import and how strictly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportOptions {
    /// The list that entries without a Postfix action go to.
    pub target: ListKind,
    /// Line syntax.
    pub format: ImportFormat,
    /// Accept entries that cover a whole address family (`0.0.0.0/0`).
    pub allow_all: bool,
    /// Import the good lines of a file with bad lines, reporting each bad
    /// line in [`ImportReport::skipped`], instead of rejecting the file.
    pub skip_invalid: bool,
    /// Accept a file without a single entry (used for the persisted lists,
    /// which may legitimately be empty).
    pub allow_empty: bool,
}

impl ImportOptions {
    /// Strict defaults: automatic format, no whole-family entries, reject
    /// the file on any bad line, reject an empty file.
    pub fn new(target: ListKind) -> Self {
        Self {
            target,
            format: ImportFormat::Auto,
            allow_all: false,
            skip_invalid: false,
            allow_empty: false,
        }
    }
}

/// One prefix read from a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedEntry {
    /// The list it goes to: [`ImportOptions::target`], or what its Postfix
    /// action says.
    pub list: ListKind,
    /// Canonical prefix.
    pub prefix: IpNet,
    /// 1-based line number.
    pub line: usize,
    /// The trailing comment (or, for a Postfix line without one, its action
    /// and text), sanitised to one line.
    pub comment: Option<String>,
    /// When a temporary entry expires (`# expires=...`).
    pub expires: Option<SystemTime>,
}

/// The result of a successful import. Nothing has been applied yet: see
/// [`AccessList::diff`](super::AccessList::diff) and
/// [`AccessList::import`](super::AccessList::import).
#[derive(Debug)]
pub struct ImportReport {
    /// Where the text came from (a path, `-`, `argv`), for messages.
    pub source_name: String,
    /// Number of lines read.
    pub lines: usize,
    /// Every prefix read, in file order; duplicates included.
    pub entries: Vec<ImportedEntry>,
    /// Things accepted that deserve a look, in file order.
    pub warnings: Vec<ImportWarning>,
    /// With [`ImportOptions::skip_invalid`]: the problem of each skipped
    /// line (line-level [`ImportError`] variants), in file order.
    pub skipped: Vec<ImportError>,
}

impl ImportReport {
    /// The entries that go to `list`.
    pub fn entries_for(&self, list: ListKind) -> impl Iterator<Item = &ImportedEntry> {
        self.entries.iter().filter(move |e| e.list == list)
    }

    /// How many entries go to `list`.
    pub fn count(&self, list: ListKind) -> usize {
        self.entries_for(list).count()
    }
}

/// Something accepted during an import that the operator should know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImportWarning {
    /// A warning of the entry parser (host bits set), located in the file.
    Entry {
        /// File.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// The warning; its column is the column in the line.
        warning: EntryWarning,
    },
    /// A Postfix `DUNNO` line, skipped.
    Dunno {
        /// File.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// Its prefix.
        prefix: IpNet,
    },
    /// A Postfix action that neither permits nor denies; line skipped.
    UnmappedAction {
        /// File.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// The action as written.
        action: String,
    },
    /// A Postfix line that an earlier, broader (or identical) line with a
    /// different action hides under Postfix's first-match order, but that
    /// takes effect under longest-prefix matching.
    FirstMatchOrder {
        /// File.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// Its prefix.
        prefix: IpNet,
        /// Its action as written.
        action: String,
        /// The earliest line covering it.
        earlier_line: usize,
        /// That line's prefix.
        earlier_prefix: IpNet,
        /// That line's action as written.
        earlier_action: String,
    },
}

impl fmt::Display for ImportWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportWarning::Entry {
                source_name,
                line,
                warning,
            } => write!(f, "{source_name} line {line}, {warning}"),
            ImportWarning::Dunno {
                source_name,
                line,
                prefix,
            } => write!(
                f,
                "{source_name} line {line}: {prefix} DUNNO skipped (it makes no decision; a broader entry still applies to it)"
            ),
            ImportWarning::UnmappedAction {
                source_name,
                line,
                action,
            } => write!(
                f,
                "{source_name} line {line}: postfix action {action} neither permits nor denies; line skipped"
            ),
            ImportWarning::FirstMatchOrder {
                source_name,
                line,
                prefix,
                action,
                earlier_line,
                earlier_prefix,
                earlier_action,
            } => write!(
                f,
                "{source_name} line {line}: {prefix} {action} lies inside {earlier_prefix} {earlier_action} from line {earlier_line}; \
                 postfix stops at the first match and never applied it, but the longest prefix wins here, so it now takes effect"
            ),
        }
    }
}

/// Why an import failed, or (line-level variants, in
/// [`ImportReport::skipped`]) why a line was skipped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A field of a line is not a valid entry.
    #[error("{source_name} line {line}, {reason}")]
    Entry {
        /// File.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// The entry error, its column shifted to the column in the line.
        reason: EntryError,
    },
    /// A comment starting with `expires=` without a usable time.
    #[error("{source_name} line {line}, column {column}: expiry \"{text}\" is invalid: {reason}")]
    BadExpiry {
        /// File.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// Column of `expires=`.
        column: usize,
        /// The text after `expires=`.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A line of a Postfix CIDR table without an action.
    #[error("{source_name} line {line}, column {column}: postfix table line has no action (expected PREFIX ACTION)")]
    MissingAction {
        /// File.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// Column after the prefix.
        column: usize,
    },
    /// A Postfix CIDR table line whose second field is not an action.
    #[error(
        "{source_name} line {line}, column {column}: \"{action}\" is not a postfix access action"
    )]
    UnknownAction {
        /// File.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// Column of the action.
        column: usize,
        /// The field as written.
        action: String,
    },
    /// The file was rejected whole; `errors` holds every bad line.
    #[error("{source_name}: rejected, nothing imported: {} error(s) on {} line(s):{}", .errors.len(), distinct_lines(.errors), list_errors(.errors))]
    Rejected {
        /// File.
        source_name: String,
        /// Line-level errors, in file order.
        errors: Vec<ImportError>,
    },
    /// The file holds no entry at all.
    #[error(
        "{source_name}: no entries in {lines} line(s), nothing imported (wrong or empty file?)"
    )]
    NoEntries {
        /// File.
        source_name: String,
        /// Lines read.
        lines: usize,
    },
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// Path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not UTF-8 text.
    #[error("{source_name} line {line}, column {column}: not UTF-8 text")]
    NotUtf8 {
        /// File.
        source_name: String,
        /// 1-based line of the first invalid byte.
        line: usize,
        /// 1-based character column of the first invalid byte.
        column: usize,
    },
}

impl ImportError {
    /// The 1-based line a line-level error is about.
    pub fn line(&self) -> Option<usize> {
        match self {
            ImportError::Entry { line, .. }
            | ImportError::BadExpiry { line, .. }
            | ImportError::MissingAction { line, .. }
            | ImportError::UnknownAction { line, .. }
            | ImportError::NotUtf8 { line, .. } => Some(*line),
            ImportError::Rejected { .. }
            | ImportError::NoEntries { .. }
            | ImportError::Read { .. } => None,
        }
    }
}

fn distinct_lines(errors: &[ImportError]) -> usize {
    let mut lines: Vec<usize> = errors.iter().filter_map(ImportError::line).collect();
    lines.dedup();
    lines.len()
}

fn list_errors(errors: &[ImportError]) -> String {
    errors.iter().map(|e| format!("\n  {e}")).collect()
}

/// Reads an access list from a file; see [`parse_list`]. The path is the
/// source name in messages.
///
/// # Errors
///
/// [`ImportError::Read`] and [`ImportError::NotUtf8`] for an unreadable
/// file, and the errors of [`parse_list`].
pub fn read_list_file(path: &Path, options: &ImportOptions) -> Result<ImportReport, ImportError> {
    let bytes = crate::files::read_regular(path, super::MAX_LIST_FILE_BYTES).map_err(|source| {
        ImportError::Read {
            path: path.to_path_buf(),
            source,
        }
    })?;
    parse_bytes(&bytes, &path.display().to_string(), options)
}

/// [`parse_list`] for raw bytes: checks that they are UTF-8 first.
pub(crate) fn parse_bytes(
    bytes: &[u8],
    source_name: &str,
    options: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_list(text, source_name, options),
        Err(e) => {
            let valid = String::from_utf8_lossy(&bytes[..e.valid_up_to()]);
            let line = valid.matches('\n').count() + 1;
            let column = valid.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            Err(ImportError::NotUtf8 {
                source_name: source_name.to_string(),
                line,
                column,
            })
        }
    }
}

/// Parses an access list in any of the formats of the module documentation.
///
/// `source_name` names the text in messages (a path, `-` for stdin). The
/// result holds every entry with its list, line and comment, plus warnings;
/// nothing is applied. Errors: [`ImportError::Rejected`] listing every bad
/// line (unless `skip_invalid`), [`ImportError::NoEntries`] for a file
/// without entries (unless `allow_empty`).
///
/// # Errors
///
/// [`ImportError::Rejected`] with every bad line when any line is invalid
/// (with `skip_invalid`: only when no line is valid), and
/// [`ImportError::NoEntries`] when no line holds an entry (unless
/// `allow_empty`).
pub fn parse_list(
    text: &str,
    source_name: &str,
    options: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut importer = Importer {
        source_name,
        options,
        entries: Vec::new(),
        warnings: Vec::new(),
        errors: Vec::new(),
        postfix_seen: PrefixTable::new(),
    };
    let mut lines = 0;
    for (index, line) in text.lines().enumerate() {
        lines += 1;
        importer.line(index + 1, line);
    }
    let Importer {
        entries,
        warnings,
        errors,
        ..
    } = importer;
    if !errors.is_empty() && (!options.skip_invalid || entries.is_empty()) {
        return Err(ImportError::Rejected {
            source_name: source_name.to_string(),
            errors,
        });
    }
    if entries.is_empty() && !options.allow_empty {
        return Err(ImportError::NoEntries {
            source_name: source_name.to_string(),
            lines,
        });
    }
    Ok(ImportReport {
        source_name: source_name.to_string(),
        lines,
        entries,
        warnings,
        skipped: errors,
    })
}

/// What a Postfix access action means here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PostfixAction {
    Deny,
    Permit,
    /// `DUNNO`: stop looking, no decision.
    Dunno,
    /// Stops the lookup in Postfix but neither permits nor denies.
    Unmapped,
}

impl PostfixAction {
    /// Classifies the second field of a Postfix access table line
    /// (`access(5)`), case-insensitively; `None` if it is not an action.
    fn classify(word: &str) -> Option<Self> {
        let upper = word.to_ascii_uppercase();
        let code = upper.len() == 3
            && upper.bytes().all(|b| b.is_ascii_digit())
            && matches!(upper.as_bytes()[0], b'4' | b'5');
        match upper.as_str() {
            _ if code => Some(PostfixAction::Deny),
            "REJECT" | "DISCARD" | "DEFER" | "DEFER_IF_PERMIT" => Some(PostfixAction::Deny),
            "OK" | "PERMIT" => Some(PostfixAction::Permit),
            "DUNNO" => Some(PostfixAction::Dunno),
            "HOLD" | "WARN" | "INFO" | "PREPEND" | "REDIRECT" | "FILTER" | "BCC"
            | "DEFER_IF_REJECT" | "DELAY" | "SHUTDOWN" => Some(PostfixAction::Unmapped),
            _ if ["PERMIT_", "REJECT_", "CHECK_", "DEFER_", "WARN_"]
                .iter()
                .any(|p| upper.starts_with(p))
                && upper
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                Some(PostfixAction::Unmapped)
            }
            _ => None,
        }
    }
}

/// The first Postfix line seen for a prefix, for the first-match check.
struct PostfixLine {
    line: usize,
    action: PostfixAction,
    word: String,
}

struct Importer<'a> {
    source_name: &'a str,
    options: &'a ImportOptions,
    entries: Vec<ImportedEntry>,
    warnings: Vec<ImportWarning>,
    errors: Vec<ImportError>,
    postfix_seen: PrefixTable<PostfixLine>,
}

/// 1-based character column of byte offset `at` in `line`.
fn column(line: &str, at: usize) -> usize {
    line[..at].chars().count() + 1
}

/// Whitespace-separated fields with their byte offsets.
fn fields(s: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(st)) => {
                out.push((st, &s[st..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(st) = start {
        out.push((st, &s[st..]));
    }
    out
}

impl Importer<'_> {
    fn line(&mut self, number: usize, line: &str) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let comment_at = line.find(['#', ';']);
        let content = &line[..comment_at.unwrap_or(line.len())];
        let mut fields = fields(content);
        if fields.is_empty() {
            return;
        }
        let (comment, expires) = match comment_at {
            Some(at) => match self.comment(number, line, at) {
                Ok(parts) => parts,
                Err(e) => {
                    self.errors.push(e);
                    return;
                }
            },
            None => (None, None),
        };
        // ipsum: ADDRESS<TAB>COUNT
        if self.options.format != ImportFormat::PostfixCidr
            && fields.len() == 2
            && content.contains('\t')
            && fields[1].1.bytes().all(|b| b.is_ascii_digit())
        {
            fields.truncate(1);
        }
        let postfix = match self.options.format {
            ImportFormat::Plain => None,
            ImportFormat::Auto => fields
                .get(1)
                .and_then(|(_, word)| PostfixAction::classify(word)),
            ImportFormat::PostfixCidr => match fields.get(1) {
                None => {
                    self.errors.push(ImportError::MissingAction {
                        source_name: self.source_name.to_string(),
                        line: number,
                        column: column(line, content.trim_end().len()),
                    });
                    return;
                }
                Some(&(at, word)) => match PostfixAction::classify(word) {
                    Some(action) => Some(action),
                    None => {
                        self.errors.push(ImportError::UnknownAction {
                            source_name: self.source_name.to_string(),
                            line: number,
                            column: column(line, at),
                            action: word.to_string(),
                        });
                        return;
                    }
                },
            },
        };
        let (list, comment, entry_fields) = match postfix {
            Some(action) => {
                let list = if action == PostfixAction::Permit {
                    ListKind::Permit
                } else {
                    ListKind::Deny
                };
                let comment = comment.or_else(|| sanitize_comment(&content[fields[1].0..]));
                (list, comment, &fields[..1])
            }
            None => (self.options.target, comment, &fields[..]),
        };

        let entry_options = EntryOptions {
            allow_all: self.options.allow_all,
        };
        let mut prefixes = Vec::new();
        let mut line_warnings = Vec::new();
        let mut bad = false;
        for &(at, field) in entry_fields {
            match parse_entry(field, entry_options) {
                Ok(parsed) => {
                    prefixes.extend(parsed.prefixes);
                    for w in parsed.warnings {
                        line_warnings.push(w.shifted(column(line, at) - 1));
                    }
                }
                Err(e) => {
                    bad = true;
                    self.errors.push(ImportError::Entry {
                        source_name: self.source_name.to_string(),
                        line: number,
                        reason: e.shifted(column(line, at) - 1),
                    });
                }
            }
        }
        if bad {
            return;
        }
        for warning in line_warnings {
            self.warnings.push(ImportWarning::Entry {
                source_name: self.source_name.to_string(),
                line: number,
                warning,
            });
        }
        if let Some(action) = postfix {
            let word = fields[1].1;
            self.check_first_match(number, &prefixes, action, word);
            match action {
                PostfixAction::Deny | PostfixAction::Permit => {}
                PostfixAction::Dunno => {
                    for &prefix in &prefixes {
                        self.warnings.push(ImportWarning::Dunno {
                            source_name: self.source_name.to_string(),
                            line: number,
                            prefix,
                        });
                    }
                    return;
                }
                PostfixAction::Unmapped => {
                    self.warnings.push(ImportWarning::UnmappedAction {
                        source_name: self.source_name.to_string(),
                        line: number,
                        action: word.to_string(),
                    });
                    return;
                }
            }
        }
        for prefix in prefixes {
            self.entries.push(ImportedEntry {
                list,
                prefix,
                line: number,
                comment: comment.clone(),
                expires,
            });
        }
    }

    /// Splits a trailing comment starting at byte `at` into its text and an
    /// optional leading `expires=TIME`.
    fn comment(
        &self,
        number: usize,
        line: &str,
        at: usize,
    ) -> Result<(Option<String>, Option<SystemTime>), ImportError> {
        let raw = &line[at..];
        let body = raw.trim_start_matches(['#', ';']).trim_start();
        let body_at = at + (raw.len() - body.len());
        let Some(rest) = body.strip_prefix("expires=") else {
            return Ok((sanitize_comment(body), None));
        };
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let stamp = &rest[..end];
        let bad = |reason| ImportError::BadExpiry {
            source_name: self.source_name.to_string(),
            line: number,
            column: column(line, body_at),
            text: stamp.to_string(),
            reason,
        };
        let expires = crate::time::parse_rfc3339(stamp)
            .map_err(|_| bad("expected an RFC 3339 UTC time such as 2026-12-01T10:00:00Z"))?;
        let remaining = rest[end..].trim();
        if remaining.starts_with("expires=") {
            return Err(bad("expires= given twice"));
        }
        Ok((sanitize_comment(remaining), Some(expires)))
    }

    /// Warns where Postfix's first-match order and longest-prefix matching
    /// disagree: an earlier line covers this one (or has the identical
    /// prefix) with a different outcome, so Postfix never applied this line
    /// but smtpguard does.
    fn check_first_match(
        &mut self,
        number: usize,
        prefixes: &[IpNet],
        action: PostfixAction,
        word: &str,
    ) {
        for &prefix in prefixes {
            if matches!(action, PostfixAction::Deny | PostfixAction::Permit) {
                let earliest = self
                    .postfix_seen
                    .cover(&prefix)
                    .into_iter()
                    .min_by_key(|(_, seen)| seen.line);
                if let Some((earlier_prefix, earlier)) = earliest {
                    // Identical prefix on both lists: the deny entry wins.
                    let ours = if earlier_prefix == prefix && earlier.action == PostfixAction::Deny
                    {
                        PostfixAction::Deny
                    } else {
                        action
                    };
                    if ours != earlier.action {
                        self.warnings.push(ImportWarning::FirstMatchOrder {
                            source_name: self.source_name.to_string(),
                            line: number,
                            prefix,
                            action: word.to_string(),
                            earlier_line: earlier.line,
                            earlier_prefix,
                            earlier_action: earlier.word.clone(),
                        });
                    }
                }
            }
            if self.postfix_seen.get(&prefix).is_none() {
                self.postfix_seen.insert(
                    prefix,
                    PostfixLine {
                        line: number,
                        action,
                        word: word.to_string(),
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{AccessList, ImportDiff, ImportMode};
    use std::time::{Duration, UNIX_EPOCH};

    /// The shared real-world lists (see its README.md): `shared/data`
    /// beside the checkout, as in CI and in /work/main. A worktree one
    /// level deeper (/work/wt/NAME) finds it one directory further up.
    /// `SMTPGUARD_TEST_DATA` overrides both. Missing data fails the tests.
    fn data_dir() -> PathBuf {
        const BESIDE_CHECKOUT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data");
        const BESIDE_WORKTREES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data");
        let candidates: Vec<PathBuf> = std::env::var_os("SMTPGUARD_TEST_DATA")
            .map(PathBuf::from)
            .into_iter()
            .chain([
                PathBuf::from(BESIDE_CHECKOUT),
                PathBuf::from(BESIDE_WORKTREES),
            ])
            .collect();
        candidates
            .iter()
            .find(|dir| dir.join("README.md").is_file())
            .cloned()
            .unwrap_or_else(|| panic!("shared test data not found in any of {candidates:?}"))
    }

    fn deny() -> ImportOptions {
        ImportOptions::new(ListKind::Deny)
    }

    fn prefixes(report: &ImportReport) -> Vec<String> {
        report
            .entries
            .iter()
            .map(|e| e.prefix.to_string())
            .collect()
    }

    const APPLIANCE: [&str; 5] = [
        "192.0.2.1",
        "198.51.100.0:255.255.255.0",
        "203.0.113.1:255.255.255.128",
        "192.0.2.100",
        "203.0.113.32:255.255.255.192",
    ];
    const APPLIANCE_STORED: [&str; 5] = [
        "192.0.2.1/32",
        "198.51.100.0/24",
        "203.0.113.0/25",
        "192.0.2.100/32",
        "203.0.113.0/26",
    ];

    #[test]
    fn appliance_format_one_per_line_and_on_one_line() {
        let one_line = APPLIANCE.join(" ");
        let per_line = APPLIANCE.join("\n");
        for (text, warn_lines) in [(one_line, [1, 1]), (per_line, [3, 5])] {
            let report = parse_list(&text, "appliance.txt", &deny()).unwrap();
            assert_eq!(prefixes(&report), APPLIANCE_STORED);
            assert!(report.entries.iter().all(|e| e.list == ListKind::Deny));
            let lines: Vec<usize> = report
                .warnings
                .iter()
                .map(|w| match w {
                    ImportWarning::Entry { line, .. } => *line,
                    other => panic!("unexpected warning {other}"),
                })
                .collect();
            assert_eq!(lines, warn_lines);
        }
        let report = parse_list(&APPLIANCE.join(" "), "appliance.txt", &deny()).unwrap();
        assert_eq!(
            report.warnings[0].to_string(),
            "appliance.txt line 1, column 38: 203.0.113.1:255.255.255.128 has host bits set under its mask; \
             stored as the network 203.0.113.0/25"
        );
    }

    #[test]
    fn comments_blanks_crlf_bom_and_tabs() {
        let text = "\u{feff}; Spamhaus DROP List 2024/02/01\r\n\
                    ; Last-Modified: Thu, 01 Feb 2024\r\n\
                    \r\n\
                    1.10.16.0/20 ; SBL256894\r\n\
                    \t 192.0.2.0/24\t# documentation \r\n\
                    # whole-line comment\r\n\
                    2001:db8::/32 \r\n";
        let report = parse_list(text, "drop.txt", &deny()).unwrap();
        assert_eq!(report.lines, 7);
        assert_eq!(
            prefixes(&report),
            ["1.10.16.0/20", "192.0.2.0/24", "2001:db8::/32"]
        );
        let comments: Vec<Option<&str>> = report
            .entries
            .iter()
            .map(|e| e.comment.as_deref())
            .collect();
        assert_eq!(comments, [Some("SBL256894"), Some("documentation"), None]);
        let lines: Vec<usize> = report.entries.iter().map(|e| e.line).collect();
        assert_eq!(lines, [4, 5, 7]);
    }

    #[test]
    fn ipsum_count_column_is_dropped() {
        let text = "# IPsum\n#\n192.0.2.7\t5\n198.51.100.9\t1\n";
        let report = parse_list(text, "ipsum.txt", &deny()).unwrap();
        assert_eq!(prefixes(&report), ["192.0.2.7/32", "198.51.100.9/32"]);
        // Separated by a space, a bare number is an (invalid) entry.
        let err = parse_list("192.0.2.7 5\n", "x", &deny()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x: rejected, nothing imported: 1 error(s) on 1 line(s):\n  \
             x line 1, column 11: \"5\" is not an IPv4 address (expected four decimal octets a.b.c.d)"
        );
    }

    #[test]
    fn expiry_comments_make_entries_temporary() {
        let text =
            "198.51.100.7/32 # expires=2026-12-01T10:00:00Z spam run\n192.0.2.1 # expires=\n";
        let err = parse_list(text, "deny.list", &deny()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "deny.list: rejected, nothing imported: 1 error(s) on 1 line(s):\n  \
             deny.list line 2, column 13: expiry \"\" is invalid: expected an RFC 3339 UTC time such as 2026-12-01T10:00:00Z"
        );
        let report = parse_list(text.lines().next().unwrap(), "deny.list", &deny()).unwrap();
        let entry = &report.entries[0];
        assert_eq!(entry.comment.as_deref(), Some("spam run"));
        assert_eq!(
            entry.expires,
            Some(UNIX_EPOCH + Duration::from_secs(1_796_119_200))
        );
    }

    #[test]
    fn postfix_cidr_table_actions_pick_the_list() {
        let text = "# postfix client access\n\
                    192.0.2.0/24     REJECT\n\
                    198.51.100.7     OK\n\
                    203.0.113.0/25   550 5.7.1 go away\n\
                    203.0.113.128/25 DUNNO\n\
                    2001:db8::/32    defer_if_permit\n\
                    192.0.2.99       PREPEND X-Seen: yes\n";
        let report = parse_list(text, "client_access.cidr", &deny()).unwrap();
        let got: Vec<(ListKind, String, Option<String>)> = report
            .entries
            .iter()
            .map(|e| (e.list, e.prefix.to_string(), e.comment.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (ListKind::Deny, "192.0.2.0/24".into(), Some("REJECT".into())),
                (
                    ListKind::Permit,
                    "198.51.100.7/32".into(),
                    Some("OK".into())
                ),
                (
                    ListKind::Deny,
                    "203.0.113.0/25".into(),
                    Some("550 5.7.1 go away".into())
                ),
                (
                    ListKind::Deny,
                    "2001:db8::/32".into(),
                    Some("defer_if_permit".into())
                ),
            ]
        );
        let warnings: Vec<String> = report.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            warnings,
            [
                "client_access.cidr line 5: 203.0.113.128/25 DUNNO skipped (it makes no decision; a broader entry still applies to it)",
                "client_access.cidr line 7: postfix action PREPEND neither permits nor denies; line skipped",
            ]
        );
    }

    #[test]
    fn postfix_first_match_order_that_longest_prefix_changes_is_flagged() {
        let text = "198.51.100.0/24 OK\n\
                    198.51.100.7 REJECT\n\
                    192.0.2.0/24 REJECT\n\
                    192.0.2.7 OK\n\
                    203.0.113.0/24 REJECT\n\
                    203.0.113.0/24 OK\n\
                    2001:db8::/48 OK\n\
                    2001:db8::/48 REJECT\n";
        let report = parse_list(text, "access.cidr", &deny()).unwrap();
        let flagged: Vec<(usize, usize)> = report
            .warnings
            .iter()
            .map(|w| match w {
                ImportWarning::FirstMatchOrder {
                    line, earlier_line, ..
                } => (*line, *earlier_line),
                other => panic!("unexpected warning {other}"),
            })
            .collect();
        // Lines 2 and 4 lie inside an earlier line with another action:
        // Postfix never reached them, longest-prefix lets them win. Line 6
        // repeats line 5's prefix with OK: Postfix takes the REJECT, and so
        // does deny-wins. Line 8 repeats line 7 with REJECT: deny-wins
        // changes Postfix's OK.
        assert_eq!(flagged, [(2, 1), (4, 3), (8, 7)]);
        assert_eq!(
            report.warnings[0].to_string(),
            "access.cidr line 2: 198.51.100.7/32 REJECT lies inside 198.51.100.0/24 OK from line 1; \
             postfix stops at the first match and never applied it, but the longest prefix wins here, so it now takes effect"
        );
    }

    #[test]
    fn explicit_postfix_format_requires_actions() {
        let mut options = deny();
        options.format = ImportFormat::PostfixCidr;
        let err = parse_list(
            "192.0.2.0/24\n198.51.100.0/24 BLOCK\n192.0.2.9\t554\n",
            "t.cidr",
            &options,
        )
        .unwrap_err();
        let ImportError::Rejected { errors, .. } = &err else {
            panic!("{err}")
        };
        let messages: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            messages,
            [
                "t.cidr line 1, column 13: postfix table line has no action (expected PREFIX ACTION)",
                "t.cidr line 2, column 17: \"BLOCK\" is not a postfix access action",
            ]
        );
        // A plain-format import treats no word as an action.
        let mut plain = deny();
        plain.format = ImportFormat::Plain;
        assert!(parse_list("192.0.2.0/24 REJECT\n", "p", &plain).is_err());
    }

    #[test]
    fn one_bad_line_rejects_all_and_every_bad_line_is_listed() {
        let text =
            "192.0.2.1\n010.0.0.1\n198.51.100.0/24\nmail.example.com 192.0.2.9\n203.0.113.0/33\n";
        let err = parse_list(text, "list.txt", &deny()).unwrap_err();
        let ImportError::Rejected { errors, .. } = &err else {
            panic!("{err}")
        };
        let at: Vec<(Option<usize>, usize)> = errors
            .iter()
            .map(|e| match e {
                ImportError::Entry { line, reason, .. } => (Some(*line), reason.column()),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(at, [(Some(2), 1), (Some(4), 1), (Some(5), 13)]);
        assert!(err
            .to_string()
            .starts_with("list.txt: rejected, nothing imported: 3 error(s) on 3 line(s):"));

        let mut skip = deny();
        skip.skip_invalid = true;
        let report = parse_list(text, "list.txt", &skip).unwrap();
        assert_eq!(prefixes(&report), ["192.0.2.1/32", "198.51.100.0/24"]);
        let skipped: Vec<Option<usize>> = report.skipped.iter().map(ImportError::line).collect();
        assert_eq!(skipped, [Some(2), Some(4), Some(5)]);
    }

    #[test]
    fn files_without_entries_are_loud() {
        for text in ["", "# only a comment\n\n", "<html>\n"] {
            let err = parse_list(text, "empty.txt", &deny()).unwrap_err();
            assert!(
                matches!(
                    err,
                    ImportError::NoEntries { .. } | ImportError::Rejected { .. }
                ),
                "{text:?}: {err}"
            );
        }
        assert_eq!(
            parse_list("# nothing\n", "empty.txt", &deny())
                .unwrap_err()
                .to_string(),
            "empty.txt: no entries in 1 line(s), nothing imported (wrong or empty file?)"
        );
        // All lines bad with skip_invalid: still an error, listing them.
        let mut skip = deny();
        skip.skip_invalid = true;
        assert!(matches!(
            parse_list("garbage\n", "g", &skip),
            Err(ImportError::Rejected { .. })
        ));
        let mut empty_ok = deny();
        empty_ok.allow_empty = true;
        assert_eq!(
            parse_list("# none\n", "e", &empty_ok)
                .unwrap()
                .entries
                .len(),
            0
        );
    }

    #[test]
    fn non_utf8_bytes_are_located() {
        let err = parse_bytes(b"192.0.2.1\n19\xff2.0.2.2\n", "bin", &deny()).unwrap_err();
        assert_eq!(err.to_string(), "bin line 2, column 3: not UTF-8 text");
    }

    /// Reads a real list and applies it to an empty list of that kind.
    /// None of these files repeats a prefix (checked with `sort | uniq -d`).
    fn import_real(name: &str, kind: ListKind) -> (ImportReport, ImportDiff) {
        let path = data_dir().join(name);
        let started = std::time::Instant::now();
        let report = read_list_file(&path, &ImportOptions::new(kind))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let parsed = started.elapsed();
        let mut list = AccessList::new(kind);
        let diff = list.import(&report, ImportMode::Merge).unwrap();
        eprintln!(
            "{name}: {} lines, {} entries, {} warnings, {} covered by broader entries; parsed in {parsed:?}, applied in {:?}",
            report.lines,
            report.entries.len(),
            report.warnings.len(),
            diff.covered.len(),
            started.elapsed() - parsed,
        );
        assert!(
            report.warnings.is_empty(),
            "{name}: {:?}",
            report.warnings.first()
        );
        assert!(report.skipped.is_empty());
        assert!(report.entries.iter().all(|e| e.list == kind));
        assert!(diff.duplicates.is_empty());
        assert_eq!(diff.added.len(), report.entries.len());
        assert_eq!(list.len().total(), report.entries.len());
        (report, diff)
    }

    // Expected counts: `wc -l` minus the `#` header lines (ipsum 120,437
    // lines with 7 header lines; the bogon lists one header line each).
    #[test]
    fn real_ipsum_imports_whole() {
        let (report, diff) = import_real("ipsum.txt", ListKind::Deny);
        assert_eq!(report.lines, 120_437);
        assert_eq!(report.entries.len(), 120_430);
        assert!(report.entries.iter().all(|e| e.prefix.prefix_len() == 32));
        assert_eq!(diff.covered.len(), 0);
    }

    #[test]
    fn real_spamhaus_drop_imports_whole() {
        let (v4, diff) = import_real("spamhaus-drop.txt", ListKind::Deny);
        assert_eq!(v4.entries.len(), 989);
        // Two DROP prefixes lie inside broader DROP prefixes.
        assert_eq!(diff.covered.len(), 2);
        let (v6, _) = import_real("spamhaus-dropv6.txt", ListKind::Permit);
        assert_eq!(v6.entries.len(), 51);
    }

    #[test]
    fn real_fullbogons_import_whole() {
        let (v4, diff) = import_real("fullbogons-ipv4.txt", ListKind::Deny);
        assert_eq!(
            (v4.lines, v4.entries.len(), diff.covered.len()),
            (1_480, 1_479, 0)
        );
        let (v6, diff) = import_real("fullbogons-ipv6.txt", ListKind::Deny);
        assert_eq!(
            (v6.lines, v6.entries.len(), diff.covered.len()),
            (130_321, 130_320, 0)
        );
        assert!(v6.entries.iter().all(|e| e.prefix.addr().is_ipv6()));
    }

    #[test]
    fn real_file_with_one_bad_line_in_the_middle_is_rejected_whole() {
        let text = std::fs::read_to_string(data_dir().join("spamhaus-drop.txt")).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        let middle = lines.len() / 2;
        lines[middle] = "45.9.20.0/2O ";
        let broken = lines.join("\n");
        let err = parse_list(&broken, "spamhaus-drop.txt", &deny()).unwrap_err();
        let ImportError::Rejected { errors, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line(), Some(middle + 1));
        assert_eq!(
            errors[0].to_string(),
            format!(
                "spamhaus-drop.txt line {}, column 11: \"2O\" is not a prefix length (expected a decimal number or a dotted IPv4 netmask)",
                middle + 1
            )
        );
    }
}
