//! Permit/deny access lists and the verdict shared by the kernel fast path
//! and the SMTP front door.
//!
//! # Model
//!
//! There are two lists, the **deny list** and the **permit list**
//! ([`ListKind`]), each a set of IP prefixes ([`AccessList`]). For a source
//! address, the most specific matching entry of either list decides
//! (longest-prefix match, LPM): a permitted `/32` inside a denied `/24`
//! passes, a denied `/32` inside a permitted `/16` is dropped, whatever the
//! order of the lines in the files. When both lists hold the identical
//! prefix, the deny entry wins. An address no entry covers gets the default
//! of the [`PolicyMode`]: `accept-all-except-deny` lets it pass,
//! `deny-all-except-permit` drops it. Switching modes keeps both lists.
//! [`Enforcement`] (`enforce`, `monitor`, `off`) says whether verdicts are
//! carried out at all. [`Policy::explain`] shows how a verdict came about;
//! [`Policy::compile`] merges both lists into the rules of the kernel LPM
//! tries so that the XDP program reaches the same verdict.
//!
//! Entries come in named **sources** ([`SourceName`]): `local` (the
//! operator's CLI entries, the configured list files) and imports such as
//! `ipsum`, each its own deny and permit list with its own files. The
//! verdict and the kernel rules are the merge of all sources. **Protected
//! ranges** ([`Protected`]) are never refused, whatever the lists hold.
//!
//! IPv4-mapped IPv6 addresses and prefixes (`::ffff:192.0.2.1`,
//! `::ffff:198.51.100.0/120`, RFC 4291 section 2.5.5.2) are IPv4 for every
//! purpose here: entries are stored as IPv4, and addresses are normalised
//! to IPv4 before the lookup.
//!
//! # Entry syntax
//!
//! One parser, [`parse_entry`], serves the configuration, the command line
//! and the importer: an address (`/32` or `/128`), a CIDR prefix (RFC 4632,
//! RFC 4291), `ADDRESS:NETMASK` or `ADDRESS/NETMASK` with a dotted IPv4
//! netmask, or a range `FIRST-LAST` stored as the minimal set of prefixes.
//!
//! # Files
//!
//! [`parse_list`] and [`read_list_file`] import the formats found in the
//! field (the appliance format, Spamhaus DROP, ipsum, Team Cymru bogons,
//! Postfix CIDR tables); [`AccessList::load`] and [`AccessList::save`]
//! keep the lists in that same plain-text format, written atomically.

pub mod bans;
mod entry;
mod import;
mod list;
mod protect;
mod ruleset;
mod source;
mod table;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use entry::{
    canonical_prefix, parse_entry, EntryError, EntryOptions, EntryWarning, ParsedEntry,
};
pub use import::{
    parse_list, read_list_file, ImportError, ImportFormat, ImportOptions, ImportReport,
    ImportWarning, ImportedEntry,
};
pub use list::{
    entries, AccessList, AddOutcome, CoveredEntry, DuplicateEntry, FamilyCounts, ImportDiff,
    ImportMode, ListEntry, ListError, LoadedList, RemoveOutcome, DEFAULT_DENY_LIST_PATH,
    DEFAULT_PERMIT_LIST_PATH,
};
pub(crate) use list::{install_temp, parent_dir, sweep_stale_temps, write_temp};
pub use protect::{Protected, ProtectedKind, ProtectedRange};
pub use ruleset::{
    CompiledRule, Enforcement, Explanation, Policy, PolicyError, PolicyMode, Reason, RuleOrigin,
    SourcedEntry, Verdict,
};
pub use source::{SourceError, SourceLists, SourceName, MAX_SOURCE_NAME_BYTES};

/// The largest list file read (a list on disk or a file to import), in
/// bytes: 256 MiB, over ten times a million-prefix list. A path that is a
/// device or a FIFO is refused before reading (`crate::files`).
pub const MAX_LIST_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// Which of the two access lists an entry belongs to.
///
/// Serialised as `"deny"` / `"permit"`; displayed as `deny list` /
/// `permit list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    /// The deny list: covered sources are dropped, unless a more specific
    /// permit entry covers them.
    Deny,
    /// The permit list: covered sources pass, unless a more specific or
    /// identical deny entry covers them.
    Permit,
}

impl ListKind {
    /// The short name used in files, the CLI and JSON: `deny` or `permit`.
    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Deny => "deny",
            ListKind::Permit => "permit",
        }
    }
}

impl From<ListKind> for smtpguard_common::Action {
    /// The kernel rule an entry of the list becomes.
    fn from(kind: ListKind) -> Self {
        match kind {
            ListKind::Deny => smtpguard_common::Action::Deny,
            ListKind::Permit => smtpguard_common::Action::Permit,
        }
    }
}

impl fmt::Display for ListKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} list", self.as_str())
    }
}

impl FromStr for ListKind {
    type Err = String;

    /// Accepts `deny` or `permit` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "deny" => Ok(ListKind::Deny),
            "permit" => Ok(ListKind::Permit),
            _ => Err(format!("unknown list \"{s}\" (expected deny or permit)")),
        }
    }
}

/// An IP address family, for counts and messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressFamily {
    /// IPv4 (32-bit addresses).
    Ipv4,
    /// IPv6 (128-bit addresses).
    Ipv6,
}

impl AddressFamily {
    /// Address width in bits: the longest prefix length of the family.
    pub fn max_prefix_len(self) -> u8 {
        match self {
            AddressFamily::Ipv4 => 32,
            AddressFamily::Ipv6 => 128,
        }
    }

    /// The family of a prefix.
    pub fn of(prefix: &ipnet::IpNet) -> Self {
        match prefix {
            ipnet::IpNet::V4(_) => AddressFamily::Ipv4,
            ipnet::IpNet::V6(_) => AddressFamily::Ipv6,
        }
    }
}

impl fmt::Display for AddressFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressFamily::Ipv4 => "IPv4",
            AddressFamily::Ipv6 => "IPv6",
        })
    }
}

/// Makes a free-text comment safe to store in a one-line list file:
/// control characters (line breaks above all, which would smuggle entries
/// into the file) become spaces, runs of whitespace collapse, the ends are
/// trimmed. An empty result is `None`.
pub(crate) fn sanitize_comment(comment: &str) -> Option<String> {
    let cleaned: Vec<&str> = comment
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
        .collect();
    if cleaned.is_empty() {
        None
    } else {
        Some(cleaned.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_kind_names_round_trip() {
        for kind in [ListKind::Deny, ListKind::Permit] {
            assert_eq!(kind.as_str().parse::<ListKind>(), Ok(kind));
        }
        assert_eq!(ListKind::Deny.to_string(), "deny list");
        assert!("block".parse::<ListKind>().is_err());
    }

    #[test]
    fn comments_lose_line_breaks_and_control_characters() {
        assert_eq!(
            sanitize_comment("spam\n0.0.0.0/0\r\tmore\u{7}"),
            Some("spam 0.0.0.0/0 more".to_string())
        );
        assert_eq!(sanitize_comment(" \t\n"), None);
    }
}
