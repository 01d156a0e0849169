//! One access list (the deny list or the permit list) and its persistence.
//!
//! A list is a set of canonical prefixes (host bits zero, IPv4-mapped IPv6
//! stored as IPv4), each with an optional comment and an optional expiry
//! for temporary entries. Lookups are longest-prefix matches in one
//! `prefix_trie::PrefixMap` per address family.
//!
//! # File format
//!
//! The lists live in plain text files in the import format, so any list
//! file can also be imported and vice versa:
//!
//! ```text
//! # smtpguard deny list: one entry per line, PREFIX [# [expires=TIME] comment]
//! 192.0.2.0/24 # spam run
//! 198.51.100.7/32 # expires=2026-12-01T10:00:00Z until the ticket is closed
//! 2001:db8::/32
//! ```
//!
//! `TIME` is RFC 3339 in UTC with whole seconds. Files are replaced
//! atomically: a temporary file in the same directory is written and
//! fsync'ed, renamed over the list, and the directory is fsync'ed, so a
//! crash leaves either the old or the new list, never a mix. A save keeps
//! what the operator wrote in the file (comments, blank lines, the order of
//! untouched lines; see [`AccessList::text_over`]) and writes through
//! symbolic links, dangling ones included. A missing file is an empty list.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::entry::canonical_prefix;
use super::import::{
    parse_bytes, parse_list, ImportError, ImportFormat, ImportOptions, ImportReport, ImportWarning,
};
use super::table::PrefixTable;
use super::{sanitize_comment, ListKind};

/// Default path of the deny list (the configuration may name another).
pub const DEFAULT_DENY_LIST_PATH: &str = "/etc/smtpguard/deny.list";
/// Default path of the permit list (the configuration may name another).
pub const DEFAULT_PERMIT_LIST_PATH: &str = "/etc/smtpguard/permit.list";

/// Why a list operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The list file exists but could not be read.
    #[error("reading {path}")]
    Read {
        /// Path of the list file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The list file has bad lines (it is not loaded at all).
    #[error(transparent)]
    Import(#[from] ImportError),
    /// Writing the list file failed at `step`; the old file is intact.
    #[error("writing {path} ({step})")]
    Write {
        /// Path of the list file.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// A comment that would read back as an expiry.
    #[error("comment \"{comment}\" starts with \"expires=\", which is reserved for the expiry of temporary entries")]
    ReservedComment {
        /// The comment.
        comment: String,
    },
}

/// One entry of a list, as shown to operators and written to the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// Canonical prefix.
    pub prefix: IpNet,
    /// Free text, one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// When the entry is removed by [`AccessList::expire`]; `None` for a
    /// permanent entry. Serialised as RFC 3339.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires: Option<SystemTime>,
}

/// Per-prefix data kept in the trie.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) comment: Option<String>,
    pub(crate) expires: Option<SystemTime>,
}

impl Meta {
    /// Folds a re-added entry into an existing one: a new comment replaces
    /// the old one; the entry stays permanent if either is (re-adding a
    /// permanent entry as temporary must not make it expire), otherwise the
    /// later expiry counts.
    fn merge(&mut self, new: Meta) {
        if new.comment.is_some() {
            self.comment = new.comment;
        }
        self.expires = match (self.expires, new.expires) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }

    fn entry(&self, prefix: IpNet) -> ListEntry {
        ListEntry {
            prefix,
            comment: self.comment.clone(),
            expires: self.expires,
        }
    }
}

/// Whole seconds, between the epoch and the end of year 9999: what the file
/// format can hold, so an entry reads back exactly as it was written. A
/// fraction of a second is rounded *up*: a temporary entry may be lifted
/// up to a second late, never early.
fn storable_expiry(t: SystemTime) -> SystemTime {
    const LAST_SECOND_OF_9999: u64 = 253_402_300_799;
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .min(LAST_SECOND_OF_9999);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Sanitises a comment to one line and refuses one that would read back as
/// an expiry.
fn checked_comment(comment: Option<&str>) -> Result<Option<String>, ListError> {
    match comment.and_then(sanitize_comment) {
        Some(c) if c.starts_with("expires=") => Err(ListError::ReservedComment { comment: c }),
        other => Ok(other),
    }
}

/// Number of entries per address family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyCounts {
    /// IPv4 prefixes.
    pub v4: usize,
    /// IPv6 prefixes.
    pub v6: usize,
}

impl FamilyCounts {
    /// Both families together.
    pub fn total(&self) -> usize {
        self.v4 + self.v6
    }
}

/// `n` list entries, as the messages say it: "1 entry", "3 entries".
pub fn entries(n: usize) -> String {
    if n == 1 {
        "1 entry".to_owned()
    } else {
        format!("{n} entries")
    }
}

/// What [`AccessList::add`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddOutcome {
    /// Prefixes that were not on the list.
    pub added: Vec<IpNet>,
    /// Prefixes already on the list (comment/expiry merged).
    pub updated: Vec<IpNet>,
}

/// What [`AccessList::remove`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoveOutcome {
    /// The entries removed.
    pub removed: Vec<ListEntry>,
    /// Prefixes that were not on the list (exact match only; entries
    /// inside or around them are untouched).
    pub not_found: Vec<IpNet>,
}

/// How an import is applied to a list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportMode {
    /// Add the file's entries to the list.
    #[default]
    Merge,
    /// Make the list exactly the file's entries.
    Replace,
}

/// A prefix that occurs again in the same file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DuplicateEntry {
    /// The prefix.
    pub prefix: IpNet,
    /// The line of the repetition.
    pub line: usize,
    /// The line of its first occurrence.
    pub first_line: usize,
}

/// A prefix of the file that a broader entry of the resulting list covers
/// (harmless: it only matters if the broader one is removed later).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CoveredEntry {
    /// The prefix.
    pub prefix: IpNet,
    /// Its line in the file.
    pub line: usize,
    /// The most specific broader entry covering it.
    pub by: IpNet,
    /// That entry's line in the file; `None` if it is an existing entry of
    /// the list.
    pub by_line: Option<usize>,
}

/// What an import does (or would do, in a dry run) to one list. All
/// prefix vectors are sorted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImportDiff {
    /// The list.
    pub list: ListKind,
    /// Merge or replace.
    pub mode: ImportMode,
    /// In the file, not on the list.
    pub added: Vec<IpNet>,
    /// On the list, not in the file (replace only).
    pub removed: Vec<IpNet>,
    /// In the file and already on the list.
    pub unchanged: Vec<IpNet>,
    /// Repetitions within the file, in file order.
    pub duplicates: Vec<DuplicateEntry>,
    /// File entries inside broader entries of the result, in file order.
    pub covered: Vec<CoveredEntry>,
}

/// A list read by [`AccessList::load`].
#[derive(Debug)]
pub struct LoadedList {
    /// The list.
    pub list: AccessList,
    /// Warnings of the parser (host bits set in hand-edited lines).
    pub warnings: Vec<ImportWarning>,
    /// Whether the file existed (a missing file is an empty list).
    pub existed: bool,
}

/// The deny list or the permit list: prefixes with comments and expiry,
/// with longest-prefix lookup.
#[derive(Clone, Debug)]
pub struct AccessList {
    kind: ListKind,
    table: PrefixTable<Meta>,
}

impl AccessList {
    /// An empty list.
    pub fn new(kind: ListKind) -> Self {
        Self {
            kind,
            table: PrefixTable::new(),
        }
    }

    /// Which list this is.
    pub fn kind(&self) -> ListKind {
        self.kind
    }

    /// Number of entries per family.
    pub fn len(&self) -> FamilyCounts {
        FamilyCounts {
            v4: self.table.len_v4(),
            v6: self.table.len_v6(),
        }
    }

    /// No entries at all.
    pub fn is_empty(&self) -> bool {
        self.len().total() == 0
    }

    pub(crate) fn table(&self) -> &PrefixTable<Meta> {
        &self.table
    }

    /// Adds prefixes (canonicalised) with one comment and expiry.
    ///
    /// A prefix already on the list keeps its place: a new comment replaces
    /// its comment, and it stays permanent if it was permanent or is re-added
    /// without expiry (otherwise the later expiry counts). Expiry times are
    /// stored in whole seconds, rounded up (an entry is never lifted
    /// early). Control characters in comments become spaces.
    ///
    /// # Errors
    ///
    /// [`ListError::ReservedComment`] for a comment starting with
    /// `expires=`; the list is then unchanged.
    pub fn add<I>(
        &mut self,
        prefixes: I,
        comment: Option<&str>,
        expires: Option<SystemTime>,
    ) -> Result<AddOutcome, ListError>
    where
        I: IntoIterator<Item = IpNet>,
    {
        let comment = checked_comment(comment)?;
        let expires = expires.map(storable_expiry);
        let mut outcome = AddOutcome::default();
        for prefix in prefixes {
            let prefix = canonical_prefix(prefix);
            let meta = Meta {
                comment: comment.clone(),
                expires,
            };
            match self.table.get_mut(&prefix) {
                Some(existing) => {
                    existing.merge(meta);
                    outcome.updated.push(prefix);
                }
                None => {
                    self.table.insert(prefix, meta);
                    outcome.added.push(prefix);
                }
            }
        }
        Ok(outcome)
    }

    /// Removes exactly these prefixes (canonicalised).
    pub fn remove<I>(&mut self, prefixes: I) -> RemoveOutcome
    where
        I: IntoIterator<Item = IpNet>,
    {
        let mut outcome = RemoveOutcome::default();
        for prefix in prefixes {
            let prefix = canonical_prefix(prefix);
            match self.table.remove(&prefix) {
                Some(meta) => outcome.removed.push(meta.entry(prefix)),
                None => outcome.not_found.push(prefix),
            }
        }
        outcome
    }

    /// Makes the list exactly `entries` (repeated prefixes merged as in
    /// [`AccessList::add`]).
    ///
    /// # Errors
    ///
    /// [`ListError::ReservedComment`] as for [`AccessList::add`]; the list
    /// is then unchanged.
    pub fn replace<I>(&mut self, entries: I) -> Result<(), ListError>
    where
        I: IntoIterator<Item = ListEntry>,
    {
        let mut table = PrefixTable::new();
        for entry in entries {
            let meta = Meta {
                comment: checked_comment(entry.comment.as_deref())?,
                expires: entry.expires.map(storable_expiry),
            };
            insert_merging(&mut table, canonical_prefix(entry.prefix), meta);
        }
        self.table = table;
        Ok(())
    }

    /// All entries, sorted: IPv4 before IPv6, by address, then by prefix
    /// length.
    pub fn entries(&self) -> Vec<ListEntry> {
        let mut entries: Vec<ListEntry> = self.table.iter().map(|(p, m)| m.entry(p)).collect();
        entries.sort_unstable_by_key(|e| e.prefix);
        entries
    }

    /// The entry for exactly this prefix (canonicalised).
    pub fn get(&self, prefix: IpNet) -> Option<ListEntry> {
        let prefix = canonical_prefix(prefix);
        self.table.get(&prefix).map(|m| m.entry(prefix))
    }

    /// The most specific entry covering `addr` (IPv4-mapped IPv6 addresses
    /// are looked up as IPv4).
    pub fn longest_match(&self, addr: IpAddr) -> Option<ListEntry> {
        self.table.lpm(addr.to_canonical()).map(|(p, m)| m.entry(p))
    }

    /// Removes every entry whose expiry is at or before `now` and returns
    /// them, sorted.
    pub fn expire(&mut self, now: SystemTime) -> Vec<ListEntry> {
        let mut removed = Vec::new();
        self.table.retain(|prefix, meta| match meta.expires {
            Some(t) if t <= now => {
                removed.push(meta.entry(prefix));
                false
            }
            _ => true,
        });
        removed.sort_unstable_by_key(|e| e.prefix);
        removed
    }

    /// The earliest expiry on the list, to schedule the next
    /// [`AccessList::expire`].
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.table.iter().filter_map(|(_, m)| m.expires).min()
    }

    /// Dry run: what importing the report's entries for this list would
    /// change. Entries the report assigns to the other list are ignored.
    pub fn diff(&self, report: &ImportReport, mode: ImportMode) -> ImportDiff {
        self.plan(report, mode).0
    }

    /// Applies the report's entries for this list (merge or replace) and
    /// returns what changed. Comments and expiry come from the file; for a
    /// prefix already on the list they merge as in [`AccessList::add`].
    ///
    /// # Errors
    ///
    /// [`ListError::ReservedComment`] for an entry whose comment starts with
    /// `expires=` (the importer never produces one); the list is then
    /// unchanged.
    pub fn import(
        &mut self,
        report: &ImportReport,
        mode: ImportMode,
    ) -> Result<ImportDiff, ListError> {
        let (diff, file) = self.plan(report, mode);
        let mut metas = Vec::with_capacity(file.len_v4() + file.len_v6());
        for (prefix, (_, meta)) in file.iter() {
            let meta = Meta {
                comment: checked_comment(meta.comment.as_deref())?,
                expires: meta.expires.map(storable_expiry),
            };
            metas.push((prefix, meta));
        }
        match mode {
            ImportMode::Merge => {
                for (prefix, meta) in metas {
                    insert_merging(&mut self.table, prefix, meta);
                }
            }
            ImportMode::Replace => {
                let mut table = PrefixTable::new();
                for (prefix, meta) in metas {
                    table.insert(prefix, meta);
                }
                self.table = table;
            }
        }
        Ok(diff)
    }

    /// The diff, and the file's entries for this list: first line of each
    /// prefix and its merged metadata.
    fn plan(
        &self,
        report: &ImportReport,
        mode: ImportMode,
    ) -> (ImportDiff, PrefixTable<(usize, Meta)>) {
        let mut file: PrefixTable<(usize, Meta)> = PrefixTable::new();
        let mut order = Vec::new();
        let mut duplicates = Vec::new();
        for entry in report.entries_for(self.kind) {
            let prefix = canonical_prefix(entry.prefix);
            let meta = Meta {
                comment: entry.comment.clone(),
                expires: entry.expires,
            };
            match file.get_mut(&prefix) {
                Some((first_line, existing)) => {
                    duplicates.push(DuplicateEntry {
                        prefix,
                        line: entry.line,
                        first_line: *first_line,
                    });
                    existing.merge(meta);
                }
                None => {
                    file.insert(prefix, (entry.line, meta));
                    order.push((prefix, entry.line));
                }
            }
        }
        let mut added = Vec::new();
        let mut unchanged = Vec::new();
        let mut covered = Vec::new();
        for &(prefix, line) in &order {
            if self.table.get(&prefix).is_some() {
                unchanged.push(prefix);
            } else {
                added.push(prefix);
            }
            let in_file = file
                .broader(&prefix)
                .map(|(by, (by_line, _))| (by, Some(*by_line)));
            let in_list = match mode {
                ImportMode::Merge => self.table.broader(&prefix).map(|(by, _)| (by, None)),
                ImportMode::Replace => None,
            };
            // The most specific of the two; a file entry over an identical
            // list entry names its line.
            let best = match (in_file, in_list) {
                (Some(f), Some(l)) if l.0.prefix_len() > f.0.prefix_len() => Some(l),
                (Some(f), _) => Some(f),
                (None, l) => l,
            };
            if let Some((by, by_line)) = best {
                covered.push(CoveredEntry {
                    prefix,
                    line,
                    by,
                    by_line,
                });
            }
        }
        let removed = match mode {
            ImportMode::Merge => Vec::new(),
            ImportMode::Replace => {
                let mut removed: Vec<IpNet> = self
                    .table
                    .iter()
                    .map(|(p, _)| p)
                    .filter(|p| file.get(p).is_none())
                    .collect();
                removed.sort_unstable();
                removed
            }
        };
        added.sort_unstable();
        unchanged.sort_unstable();
        let diff = ImportDiff {
            list: self.kind,
            mode,
            added,
            removed,
            unchanged,
            duplicates,
            covered,
        };
        (diff, file)
    }

    /// The list in its file format (see the module documentation).
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let entries = self.entries();
        let mut out = String::with_capacity(64 + entries.len() * 24);
        let _ = writeln!(
            out,
            "# smtpguard {}: one entry per line, PREFIX [# [expires=YYYY-MM-DDTHH:MM:SSZ] comment]",
            self.kind
        );
        for entry in &entries {
            push_entry_line(&mut out, entry, "\n");
        }
        out
    }

    /// The list written over `old`, the text of its file as it is now:
    /// whole-line comments, blank lines and the lines of unchanged entries
    /// stay as they are, byte for byte and in their order; the line of a
    /// changed entry is rewritten in place (in the form of
    /// [`AccessList::to_text`]), the line of a removed entry goes, and new
    /// entries are appended at the end, sorted. An empty `old` gives
    /// [`AccessList::to_text`] (with its header).
    ///
    /// # Errors
    ///
    /// [`ListError::Import`] if `old` has a bad line (it is not overwritten
    /// then: nothing the operator wrote is lost).
    pub fn text_over(&self, old: &str, source_name: &str) -> Result<String, ListError> {
        if old.trim().is_empty() {
            return Ok(self.to_text());
        }
        let report = parse_list(old, source_name, &file_options(self.kind))?;
        let mut before = AccessList::new(self.kind);
        before.import(&report, ImportMode::Replace)?;
        let mut by_line: std::collections::HashMap<usize, Vec<IpNet>> =
            std::collections::HashMap::new();
        for entry in &report.entries {
            by_line.entry(entry.line).or_default().push(entry.prefix);
        }
        let eol = if old.split('\n').next().is_some_and(|l| l.ends_with('\r')) {
            "\r\n"
        } else {
            "\n"
        };
        let unchanged = |p: &IpNet| {
            let now = self.table.get(p);
            now.is_some() && now == before.table.get(p)
        };
        let mut written: std::collections::HashSet<IpNet> = std::collections::HashSet::new();
        let mut out = String::with_capacity(old.len() + 64);
        for (index, line) in old.split_inclusive('\n').enumerate() {
            let Some(prefixes) = by_line.get(&(index + 1)) else {
                out.push_str(line);
                continue;
            };
            if prefixes.iter().all(unchanged) {
                out.push_str(line);
                written.extend(prefixes.iter().copied());
                continue;
            }
            for prefix in prefixes {
                if let Some(meta) = self.table.get(prefix) {
                    if written.insert(*prefix) {
                        push_entry_line(&mut out, &meta.entry(*prefix), eol);
                    }
                }
            }
        }
        let mut new_entries = self
            .entries()
            .into_iter()
            .filter(|e| !written.contains(&e.prefix))
            .peekable();
        if new_entries.peek().is_some() && !out.is_empty() && !out.ends_with('\n') {
            out.push_str(eol);
        }
        for entry in new_entries {
            push_entry_line(&mut out, &entry, eol);
        }
        Ok(out)
    }

    /// Reads a list file. A missing file is an empty list; a file with any
    /// bad line is an error naming every bad line (nothing is loaded).
    /// Entries covering a whole family are accepted here: they were allowed
    /// when they were added.
    ///
    /// # Errors
    ///
    /// [`ListError::Read`] for a file that exists but cannot be read, and
    /// [`ListError::Import`] for one with bad lines or bytes.
    pub fn load(path: &Path, kind: ListKind) -> Result<LoadedList, ListError> {
        let bytes = match crate::files::read_regular(path, super::MAX_LIST_FILE_BYTES) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(LoadedList {
                    list: AccessList::new(kind),
                    warnings: Vec::new(),
                    existed: false,
                })
            }
            Err(source) => {
                return Err(ListError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let report = parse_bytes(&bytes, &path.display().to_string(), &file_options(kind))?;
        let mut list = AccessList::new(kind);
        list.import(&report, ImportMode::Replace)?;
        Ok(LoadedList {
            list,
            warnings: report.warnings,
            existed: true,
        })
    }

    /// Writes the list to `path` atomically (temporary file in the same
    /// directory, fsync, rename over, fsync of the directory), keeping what
    /// the operator wrote in the file: comments, blank lines and the order
    /// of untouched lines (see [`AccessList::text_over`]). A symbolic link
    /// (a list kept elsewhere and linked into place), dangling or not, is
    /// followed: its target is written, in the target's directory, and the
    /// link stays. An existing file's permission bits are kept; a new file
    /// gets mode 0644.
    ///
    /// # Errors
    ///
    /// [`ListError::Write`] naming the step that failed, [`ListError::Read`]
    /// if the current file cannot be read and [`ListError::Import`] if it has
    /// a bad line; the old file is then intact and no temporary file is left
    /// behind.
    pub fn save(&self, path: &Path) -> Result<(), ListError> {
        let resolved = resolve_links(path).map_err(|source| ListError::Write {
            path: path.to_path_buf(),
            step: "following the symbolic link",
            source,
        })?;
        let path = resolved.as_path();
        // First save on a fresh machine: the directory may not exist yet.
        fs::create_dir_all(parent_dir(path)).map_err(|source| ListError::Write {
            path: path.to_path_buf(),
            step: "creating the directory",
            source,
        })?;
        let text = match crate::files::read_regular(path, super::MAX_LIST_FILE_BYTES) {
            Ok(bytes) => {
                let name = path.display().to_string();
                let old = std::str::from_utf8(&bytes).map_err(|_| {
                    ListError::Import(
                        parse_bytes(&bytes, &name, &file_options(self.kind))
                            .expect_err("not UTF-8"),
                    )
                })?;
                self.text_over(old, &name)?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.to_text(),
            Err(source) => {
                return Err(ListError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let temp = write_temp(path, text.as_bytes())?;
        if let Err(e) = install_temp(&temp, path) {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        Ok(())
    }
}

fn insert_merging(table: &mut PrefixTable<Meta>, prefix: IpNet, meta: Meta) {
    match table.get_mut(&prefix) {
        Some(existing) => existing.merge(meta),
        None => {
            table.insert(prefix, meta);
        }
    }
}

/// How list files are read: entries only, whole-family entries allowed
/// (they were allowed when added), an empty file is an empty list.
fn file_options(kind: ListKind) -> ImportOptions {
    ImportOptions {
        target: kind,
        format: ImportFormat::Plain,
        allow_all: true,
        skip_invalid: false,
        allow_empty: true,
    }
}

/// One entry as a line of the list file, ending in `eol`.
fn push_entry_line(out: &mut String, entry: &ListEntry, eol: &str) {
    use std::fmt::Write as _;
    let _ = write!(out, "{}", entry.prefix);
    if entry.expires.is_some() || entry.comment.is_some() {
        out.push_str(" #");
        if let Some(t) = entry.expires {
            let _ = write!(out, " expires={}", crate::time::rfc3339(t));
        }
        if let Some(c) = &entry.comment {
            out.push(' ');
            out.push_str(c);
        }
    }
    out.push_str(eol);
}

/// Follows `path` while it is a symbolic link (relative targets are
/// relative to the link's directory), to a path that is not one: an
/// existing file, or the missing target of a dangling link.
fn resolve_links(path: &Path) -> io::Result<PathBuf> {
    /// As the kernel's `MAXSYMLINKS`.
    const MAX_LINKS: usize = 40;
    let mut current = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&current)?;
                current = parent_dir(&current).join(target);
            }
            // Not a link, or nothing there (a dangling link's target): the
            // steps that follow name what is wrong with it, if anything.
            Ok(_) | Err(_) => return Ok(current),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ELOOP))
}

/// The directory `path` is in (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Removes the temporary files [`write_temp`] left in `dir` by processes
/// that are gone (killed between writing and renaming): the file they were
/// to replace was never replaced, so nothing needs them. A running
/// process's files are left alone. Returns the files removed; a directory
/// that cannot be read removes nothing.
pub fn sweep_stale_temps(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = temp_owner(&name.to_string_lossy()) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_file()) && fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The process id in a [`write_temp`] file name (`.NAME.tmp.PID.N`).
fn temp_owner(name: &str) -> Option<u32> {
    let (head, tail) = name.rsplit_once(".tmp.")?;
    if !head.starts_with('.') || head.len() < 2 {
        return None;
    }
    let (pid, n) = tail.split_once('.')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// First step of [`AccessList::save`]: writes `contents` to a new temporary
/// file beside `path` and fsyncs it. Returns the temporary path; `path`
/// itself is untouched.
pub(crate) fn write_temp(path: &Path, contents: &[u8]) -> Result<PathBuf, ListError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let fail = |step, source| ListError::Write {
        path: path.to_path_buf(),
        step,
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        fail(
            "naming the temporary file",
            io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        )
    })?;
    let temp = parent_dir(path).join(format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&temp)
        .map_err(|e| fail("creating the temporary file", e))?;
    let written = (|| {
        if let Ok(old) = fs::metadata(path) {
            file.set_permissions(old.permissions())
                .map_err(|e| ("copying the permissions", e))?;
        }
        file.write_all(contents)
            .map_err(|e| ("writing the temporary file", e))?;
        file.sync_all()
            .map_err(|e| ("syncing the temporary file", e))
    })();
    if let Err((step, e)) = written {
        let _ = fs::remove_file(&temp);
        return Err(fail(step, e));
    }
    Ok(temp)
}

/// Second step of [`AccessList::save`]: renames the temporary file over
/// `path` and fsyncs the directory so the rename itself is durable.
pub(crate) fn install_temp(temp: &Path, path: &Path) -> Result<(), ListError> {
    let fail = |step, source| ListError::Write {
        path: path.to_path_buf(),
        step,
        source,
    };
    fs::rename(temp, path).map_err(|e| fail("renaming the temporary file over it", e))?;
    File::open(parent_dir(path))
        .and_then(|dir| dir.sync_all())
        .map_err(|e| fail("syncing the directory", e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::import::parse_list;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| net(s)).collect()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TestDir(pub(crate) PathBuf);

    impl TestDir {
        pub(crate) fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "smtpguard-policy-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn stale_temporary_files_of_dead_processes_are_swept() {
        let dir = TestDir::new("sweep");
        // Above the kernel's largest pid: no such process.
        let dead = dir.0.join(".deny.list.tmp.4194305.0");
        let alive = dir
            .0
            .join(format!(".deny.list.tmp.{}.3", std::process::id()));
        let others = [dir.0.join("deny.list"), dir.0.join(".deny.list.tmp.x.1")];
        for path in [&dead, &alive].into_iter().chain(&others) {
            fs::write(path, "192.0.2.1\n").unwrap();
        }
        assert_eq!(sweep_stale_temps(&dir.0), vec![dead.clone()]);
        assert!(!dead.exists());
        assert!(alive.exists() && others.iter().all(|p| p.exists()));
        assert!(sweep_stale_temps(&dir.0.join("missing")).is_empty());
    }

    #[test]
    fn add_remove_entries_len_and_merge_rules() {
        let mut list = AccessList::new(ListKind::Deny);
        let out = list
            .add(
                nets(&["2001:db8::/32", "198.51.100.0/24", "192.0.2.7/32"]),
                Some("spam"),
                None,
            )
            .unwrap();
        assert_eq!(out.added.len(), 3);
        assert_eq!(list.len(), FamilyCounts { v4: 2, v6: 1 });
        // Mapped and host-bit forms are canonicalised; re-adding merges.
        let out = list
            .add(
                nets(&["::ffff:192.0.2.7/128", "198.51.100.9/24"]),
                None,
                Some(at(100)),
            )
            .unwrap();
        assert_eq!(out.updated, nets(&["192.0.2.7/32", "198.51.100.0/24"]));
        assert!(out.added.is_empty());
        let e = list.get(net("192.0.2.7/32")).unwrap();
        assert_eq!(
            e.comment.as_deref(),
            Some("spam"),
            "no new comment keeps the old"
        );
        assert_eq!(e.expires, None, "a permanent entry stays permanent");

        list.add(nets(&["203.0.113.0/24"]), Some("temp"), Some(at(100)))
            .unwrap();
        list.add(nets(&["203.0.113.0/24"]), Some("longer"), Some(at(50)))
            .unwrap();
        let e = list.get(net("203.0.113.0/24")).unwrap();
        assert_eq!(
            (e.comment.as_deref(), e.expires),
            (Some("longer"), Some(at(100)))
        );

        let sorted: Vec<String> = list
            .entries()
            .iter()
            .map(|e| e.prefix.to_string())
            .collect();
        assert_eq!(
            sorted,
            [
                "192.0.2.7/32",
                "198.51.100.0/24",
                "203.0.113.0/24",
                "2001:db8::/32"
            ]
        );

        let out = list.remove(nets(&[
            "198.51.100.0/24",
            "10.0.0.0/8",
            "::ffff:192.0.2.7/128",
        ]));
        assert_eq!(out.removed.len(), 2);
        assert_eq!(out.not_found, nets(&["10.0.0.0/8"]));
        assert_eq!(list.len(), FamilyCounts { v4: 1, v6: 1 });
        assert!(!list.is_empty());
    }

    #[test]
    fn comments_are_one_line_and_cannot_fake_an_expiry() {
        let mut list = AccessList::new(ListKind::Permit);
        list.add(nets(&["192.0.2.1/32"]), Some("a\n0.0.0.0/0 b"), None)
            .unwrap();
        assert_eq!(
            list.get(net("192.0.2.1/32")).unwrap().comment.as_deref(),
            Some("a 0.0.0.0/0 b")
        );
        assert_eq!(list.to_text().lines().count(), 2);
        let err = list
            .add(
                nets(&["192.0.2.2/32"]),
                Some("expires=2030-01-01T00:00:00Z"),
                None,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "comment \"expires=2030-01-01T00:00:00Z\" starts with \"expires=\", which is reserved for the expiry of temporary entries"
        );
        assert!(list.get(net("192.0.2.2/32")).is_none());
    }

    #[test]
    fn expire_removes_only_due_entries() {
        let mut list = AccessList::new(ListKind::Deny);
        list.add(nets(&["192.0.2.1/32"]), None, Some(at(10)))
            .unwrap();
        list.add(nets(&["192.0.2.2/32", "2001:db8::/48"]), None, Some(at(20)))
            .unwrap();
        list.add(nets(&["192.0.2.3/32"]), None, None).unwrap();
        assert_eq!(list.next_expiry(), Some(at(10)));
        assert!(list.expire(at(9)).is_empty());
        let gone: Vec<IpNet> = list.expire(at(20)).into_iter().map(|e| e.prefix).collect();
        assert_eq!(
            gone,
            nets(&["192.0.2.1/32", "192.0.2.2/32", "2001:db8::/48"])
        );
        assert_eq!(list.len(), FamilyCounts { v4: 1, v6: 0 });
        assert_eq!(list.next_expiry(), None);
    }

    #[test]
    fn replace_makes_the_list_exactly_the_entries() {
        let mut list = AccessList::new(ListKind::Deny);
        list.add(nets(&["192.0.2.0/24"]), None, None).unwrap();
        let entry = |p: &str| ListEntry {
            prefix: net(p),
            comment: None,
            expires: None,
        };
        list.replace([
            entry("198.51.100.0/24"),
            entry("198.51.100.0/24"),
            entry("::/0"),
        ])
        .unwrap();
        let got: Vec<IpNet> = list.entries().into_iter().map(|e| e.prefix).collect();
        assert_eq!(got, nets(&["198.51.100.0/24", "::/0"]));
    }

    fn report(text: &str) -> ImportReport {
        parse_list(text, "import.txt", &ImportOptions::new(ListKind::Deny)).unwrap()
    }

    #[test]
    fn dry_run_diff_reports_every_category() {
        let mut list = AccessList::new(ListKind::Deny);
        list.add(
            nets(&["192.0.2.0/24", "198.51.100.0/24", "10.0.0.0/8"]),
            None,
            None,
        )
        .unwrap();
        let file = report(
            "192.0.2.0/24\n\
             192.0.2.0:255.255.255.0\n\
             10.1.0.0/16\n\
             203.0.113.0/24\n\
             203.0.113.128/25\n\
             2001:db8::/32\n",
        );
        let merge = list.diff(&file, ImportMode::Merge);
        assert_eq!(
            merge.added,
            nets(&[
                "10.1.0.0/16",
                "203.0.113.0/24",
                "203.0.113.128/25",
                "2001:db8::/32"
            ])
        );
        assert_eq!(merge.unchanged, nets(&["192.0.2.0/24"]));
        assert!(merge.removed.is_empty());
        assert_eq!(
            merge.duplicates,
            [DuplicateEntry {
                prefix: net("192.0.2.0/24"),
                line: 2,
                first_line: 1
            }]
        );
        assert_eq!(
            merge.covered,
            [
                CoveredEntry {
                    prefix: net("10.1.0.0/16"),
                    line: 3,
                    by: net("10.0.0.0/8"),
                    by_line: None
                },
                CoveredEntry {
                    prefix: net("203.0.113.128/25"),
                    line: 5,
                    by: net("203.0.113.0/24"),
                    by_line: Some(4)
                },
            ]
        );
        let replace = list.diff(&file, ImportMode::Replace);
        assert_eq!(replace.removed, nets(&["10.0.0.0/8", "198.51.100.0/24"]));
        assert_eq!(
            replace.covered.len(),
            1,
            "10.0.0.0/8 is gone after a replace"
        );
        // A dry run changes nothing.
        assert_eq!(list.len().total(), 3);

        let applied = list.import(&file, ImportMode::Replace).unwrap();
        assert_eq!(applied, replace);
        let got: Vec<IpNet> = list.entries().into_iter().map(|e| e.prefix).collect();
        assert_eq!(
            got,
            nets(&[
                "192.0.2.0/24",
                "10.1.0.0/16",
                "203.0.113.0/24",
                "203.0.113.128/25",
                "2001:db8::/32"
            ])
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn import_ignores_entries_for_the_other_list() {
        let mut permit = AccessList::new(ListKind::Permit);
        let file = report("192.0.2.0/24 REJECT\n198.51.100.7 OK\n");
        let diff = permit.import(&file, ImportMode::Merge).unwrap();
        assert_eq!(diff.added, nets(&["198.51.100.7/32"]));
        assert_eq!(permit.len().total(), 1);
    }

    /// A list path linked to a device or a FIFO fails at once, naming the
    /// file, instead of reading without end (a reload once ran the daemon
    /// out of memory on `deny.list -> /dev/zero`).
    #[test]
    fn a_list_that_is_a_device_or_fifo_is_refused_at_once() {
        let dir = crate::testing::TempDir::new("list-device");
        let link = dir.path().join("deny.list");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let Err(err) = AccessList::load(&link, ListKind::Deny) else {
            panic!("a list linked to /dev/zero was loaded");
        };
        assert!(
            err.to_string().contains(&link.display().to_string()),
            "names the file: {err}"
        );
        assert!(
            matches!(&err, ListError::Read { source, .. } if source.to_string() == "not a regular file"),
            "{err:?}"
        );
        let fifo = dir.path().join("permit.list");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(AccessList::load(&fifo, ListKind::Permit).is_err());
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = TestDir::new("roundtrip");
        let path = dir.0.join("deny.list");
        let mut list = AccessList::new(ListKind::Deny);
        list.add(
            nets(&["198.51.100.0/24"]),
            Some("spam run # 2 ; see ticket"),
            None,
        )
        .unwrap();
        list.add(
            nets(&["192.0.2.7/32"]),
            Some("temporary"),
            Some(at(1_796_119_200)),
        )
        .unwrap();
        list.add(
            nets(&["2001:db8::/32"]),
            None,
            Some(at(1_796_119_200) + Duration::from_millis(900)),
        )
        .unwrap();
        list.add(nets(&["0.0.0.0/0"]), None, None).unwrap();
        list.save(&path).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "# smtpguard deny list: one entry per line, PREFIX [# [expires=YYYY-MM-DDTHH:MM:SSZ] comment]\n\
             0.0.0.0/0\n\
             192.0.2.7/32 # expires=2026-12-01T10:00:00Z temporary\n\
             198.51.100.0/24 # spam run # 2 ; see ticket\n\
             2001:db8::/32 # expires=2026-12-01T10:00:01Z\n"
        );
        let loaded = AccessList::load(&path, ListKind::Deny).unwrap();
        assert!(loaded.existed);
        assert!(loaded.warnings.is_empty());
        assert_eq!(loaded.list.entries(), list.entries());
        // Saving again over an existing file keeps its permissions.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        list.save(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let leftovers = fs::read_dir(&dir.0).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
    }

    #[test]
    fn missing_file_is_an_empty_list_and_a_bad_file_loads_nothing() {
        let dir = TestDir::new("load");
        let loaded = AccessList::load(&dir.0.join("permit.list"), ListKind::Permit).unwrap();
        assert!(!loaded.existed);
        assert!(loaded.list.is_empty());

        let path = dir.0.join("deny.list");
        fs::write(&path, "# comments only\n").unwrap();
        assert!(AccessList::load(&path, ListKind::Deny)
            .unwrap()
            .list
            .is_empty());

        fs::write(&path, "192.0.2.0/24\n192.0.2.300\n198.51.100.0/24 OK\n").unwrap();
        let err = AccessList::load(&path, ListKind::Deny).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("deny.list line 2, column 9: octet \"300\" is greater than 255"),
            "{shown}"
        );
        assert!(
            shown.contains("deny.list line 3, column 17: \"OK\""),
            "{shown}"
        );
    }

    #[test]
    fn crash_between_write_and_rename_leaves_the_old_list() {
        let dir = TestDir::new("crash");
        let path = dir.0.join("deny.list");
        let mut old = AccessList::new(ListKind::Deny);
        old.add(nets(&["192.0.2.0/24"]), Some("old"), None).unwrap();
        old.save(&path).unwrap();

        let mut new = old.clone();
        new.add(nets(&["198.51.100.0/24"]), None, None).unwrap();
        // The first step of save, then "crash": no rename.
        let temp = write_temp(&path, new.to_text().as_bytes()).unwrap();
        assert_eq!(
            temp.parent(),
            path.parent(),
            "temporary file in the same directory"
        );
        assert!(temp.exists());

        let loaded = AccessList::load(&path, ListKind::Deny).unwrap();
        assert_eq!(loaded.list.entries(), old.entries());
        // The next save still works and replaces the list.
        new.save(&path).unwrap();
        assert_eq!(
            AccessList::load(&path, ListKind::Deny)
                .unwrap()
                .list
                .entries(),
            new.entries()
        );
        // Finishing the interrupted save installs its (complete) content.
        install_temp(&temp, &path).unwrap();
        assert_eq!(
            AccessList::load(&path, ListKind::Deny)
                .unwrap()
                .list
                .len()
                .total(),
            2
        );
    }

    #[test]
    fn expiry_is_rounded_up_so_an_entry_is_never_lifted_early() {
        let mut list = AccessList::new(ListKind::Deny);
        let due = at(100) + Duration::from_millis(200);
        list.add(nets(&["192.0.2.1/32"]), None, Some(due)).unwrap();
        let stored = list.get(net("192.0.2.1/32")).unwrap().expires.unwrap();
        assert!(stored >= due, "stored {stored:?} before {due:?}");
        assert_eq!(stored, at(101));
        assert!(list.expire(due - Duration::from_millis(1)).is_empty());
        assert!(
            list.expire(due).is_empty(),
            "swept at the due instant: kept"
        );
        assert_eq!(list.expire(at(101)).len(), 1);
    }

    const HAND_WRITTEN: &str = "\
# Team list, managed by ops
# ------------------------------------------------------------
## section: spam runs

192.0.2.0/24 # spam run, ticket 4711
198.51.100.7   ;   trailing comment in another style
# 203.0.113.0/24 commented out on purpose

## section: IPv6
2001:db8:bad::/48
2001:db8:1::/48 # goes away
";

    #[test]
    fn cli_changes_keep_every_comment_blank_line_and_the_order() {
        let dir = TestDir::new("fidelity");
        let path = dir.0.join("deny.list");
        fs::write(&path, HAND_WRITTEN).unwrap();
        let mut list = AccessList::load(&path, ListKind::Deny).unwrap().list;
        // Unchanged: saved as it was, byte for byte.
        list.save(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), HAND_WRITTEN);

        list.add(nets(&["203.0.113.9/32"]), Some("new one"), None)
            .unwrap();
        list.add(nets(&["198.51.100.7/32"]), Some("re-added"), None)
            .unwrap();
        list.remove(nets(&["2001:db8:1::/48"]));
        list.save(&path).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "\
# Team list, managed by ops
# ------------------------------------------------------------
## section: spam runs

192.0.2.0/24 # spam run, ticket 4711
198.51.100.7/32 # re-added
# 203.0.113.0/24 commented out on purpose

## section: IPv6
2001:db8:bad::/48
203.0.113.9/32 # new one
"
        );
        assert_eq!(
            AccessList::load(&path, ListKind::Deny)
                .unwrap()
                .list
                .entries(),
            list.entries()
        );

        // Expiry and a merge import go through the same path.
        list.add(nets(&["192.0.2.77/32"]), None, Some(at(1_796_119_200)))
            .unwrap();
        list.save(&path).unwrap();
        list.expire(at(1_796_119_200));
        let file = report("# refreshed feed\n2001:db8:bad::/48\n10.0.0.0/8 ; feed\n");
        list.import(&file, ImportMode::Merge).unwrap();
        list.save(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Team list, managed by ops\n"), "{text}");
        assert!(
            text.ends_with("203.0.113.9/32 # new one\n10.0.0.0/8 # feed\n"),
            "{text}"
        );
        assert!(!text.contains("192.0.2.77"), "{text}");
    }

    #[test]
    fn a_removed_part_of_a_line_leaves_the_rest_and_crlf_stays_crlf() {
        let mut list = AccessList::new(ListKind::Deny);
        let old = "# appliance export\r\n192.0.2.1 192.0.2.2:255.255.255.255 # two\r\n";
        let file = parse_list(old, "x", &file_options(ListKind::Deny)).unwrap();
        list.import(&file, ImportMode::Replace).unwrap();
        list.remove(nets(&["192.0.2.1/32"]));
        assert_eq!(
            list.text_over(old, "x").unwrap(),
            "# appliance export\r\n192.0.2.2/32 # two\r\n"
        );
        // A file without a trailing newline gets one before new entries.
        let old = "# x\n192.0.2.1";
        let mut list = AccessList::new(ListKind::Deny);
        list.add(nets(&["192.0.2.1/32", "192.0.2.3/32"]), None, None)
            .unwrap();
        assert_eq!(
            list.text_over(old, "x").unwrap(),
            "# x\n192.0.2.1\n192.0.2.3/32\n"
        );
    }

    #[test]
    fn saving_writes_through_symlinks_dangling_ones_included() {
        use std::os::unix::fs::symlink;
        let dir = TestDir::new("symlink");
        fs::create_dir(dir.0.join("repo")).unwrap();
        let target = dir.0.join("repo").join("deny.list");
        let link = dir.0.join("deny.list");
        // Dangling, relative link: the target does not exist yet.
        symlink("repo/deny.list", &link).unwrap();
        let mut list = AccessList::new(ListKind::Deny);
        list.add(nets(&["192.0.2.0/24"]), None, None).unwrap();
        list.save(&link).unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::read_to_string(&target)
            .unwrap()
            .contains("192.0.2.0/24\n"));
        // A chain of links to an existing file with comments.
        let chain = dir.0.join("chain.list");
        symlink(&link, &chain).unwrap();
        fs::write(&target, "# kept\n192.0.2.0/24\n").unwrap();
        list.add(nets(&["198.51.100.0/24"]), None, None).unwrap();
        list.save(&chain).unwrap();
        for l in [&link, &chain] {
            assert!(fs::symlink_metadata(l).unwrap().file_type().is_symlink());
        }
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            "# kept\n192.0.2.0/24\n198.51.100.0/24\n"
        );
        let leftovers: Vec<_> = fs::read_dir(dir.0.join("repo")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left behind");
        // A loop is an error naming the step, not a hang.
        let a = dir.0.join("a.list");
        let b = dir.0.join("b.list");
        symlink(&b, &a).unwrap();
        symlink(&a, &b).unwrap();
        let err = list.save(&a).unwrap_err();
        assert!(
            err.to_string().contains("following the symbolic link"),
            "{err}"
        );
    }

    #[test]
    fn save_creates_a_missing_directory() {
        let dir = TestDir::new("nodir");
        let path = dir.0.join("missing").join("deny.list");
        AccessList::new(ListKind::Deny).save(&path).unwrap();
        assert!(path.exists());
    }

    #[test]
    fn save_under_a_file_fails_and_names_the_step() {
        let dir = TestDir::new("underfile");
        let blocker = dir.0.join("blocker");
        fs::write(&blocker, b"not a directory").unwrap();
        let path = blocker.join("deny.list");
        let err = AccessList::new(ListKind::Deny).save(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("writing {} (creating the directory)", path.display())
        );
    }
}
