//! Named list sources: each source is its own pair of lists (deny and
//! permit) with its own files, so that an import replaces one source and
//! leaves the operator's entries and every other import alone.
//!
//! `local` is the operator's CLI entries (the configured list files);
//! other sources are imports (`spamhaus-drop`, `ipsum`, ...). The names
//! `auto` and `fleet` are reserved for automatic bans and fleet lists and
//! cannot be written from the CLI.

use std::cmp::Ordering;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::list::{AccessList, FamilyCounts};
use super::ListKind;

/// The longest source name, in bytes.
pub const MAX_SOURCE_NAME_BYTES: usize = 32;

/// The names kept for sources the daemon itself fills, and what for.
const RESERVED: &[(&str, &str)] = &[
    ("auto", "automatic bans"),
    ("fleet", "lists shared by a fleet of gateways"),
];

/// Why a source name is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// An empty name.
    #[error("the source name is empty")]
    Empty,
    /// A name over [`MAX_SOURCE_NAME_BYTES`].
    #[error(
        "source name {name:?} is {len} bytes long; at most {MAX_SOURCE_NAME_BYTES} are allowed"
    )]
    TooLong {
        /// The name as given.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A character outside the allowed set.
    #[error(
        "source name {name:?} has {found:?} at position {position}; a source name is lowercase \
         letters a-z, digits, '-' and '_', starting with a letter or digit"
    )]
    BadCharacter {
        /// The name as given.
        name: String,
        /// The offending character.
        found: char,
        /// Its position, from 1, in characters.
        position: usize,
    },
    /// A reserved name given to a command that would write into it.
    #[error("source {name:?} is reserved for {owner}; it cannot be changed from the CLI")]
    Reserved {
        /// The name.
        name: String,
        /// What it is reserved for.
        owner: &'static str,
    },
}

/// A valid source name: 1 to 32 bytes of `a-z`, `0-9`, `-`, `_`, starting
/// with a letter or digit (so it is a safe file name).
///
/// Sources order `local` first, then by name: where two sources hold the
/// same prefix, the first in this order is the one named as deciding.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SourceName(String);

impl SourceName {
    /// The name of the operator's own entries, the default source.
    pub const LOCAL: &'static str = "local";

    /// `local`.
    pub fn local() -> Self {
        SourceName(Self::LOCAL.to_string())
    }

    /// The name of the automatic bans' source.
    pub const AUTO: &'static str = "auto";

    /// `auto`: the automatic bans (#16); the CLI may list and remove its
    /// entries, never add.
    pub fn auto() -> Self {
        SourceName(Self::AUTO.to_string())
    }

    /// Checks a name the CLI wants to remove entries from: as
    /// [`SourceName::writable`], but `auto` is allowed (an operator lifts
    /// a ban by hand).
    ///
    /// # Errors
    ///
    /// As [`SourceName::writable`].
    pub fn removable(name: &str) -> Result<Self, SourceError> {
        if name == Self::AUTO {
            return Ok(Self::auto());
        }
        Self::writable(name)
    }

    /// Checks a name.
    ///
    /// # Errors
    ///
    /// [`SourceError`] naming what is wrong.
    pub fn new(name: &str) -> Result<Self, SourceError> {
        if name.is_empty() {
            return Err(SourceError::Empty);
        }
        if name.len() > MAX_SOURCE_NAME_BYTES {
            return Err(SourceError::TooLong {
                name: name.to_string(),
                len: name.len(),
            });
        }
        for (i, c) in name.chars().enumerate() {
            let ok =
                c.is_ascii_lowercase() || c.is_ascii_digit() || (i > 0 && (c == '-' || c == '_'));
            if !ok {
                return Err(SourceError::BadCharacter {
                    name: name.to_string(),
                    found: c,
                    position: i + 1,
                });
            }
        }
        Ok(SourceName(name.to_string()))
    }

    /// Checks a name the CLI wants to write into: also refuses the
    /// reserved names (`auto`, `fleet`).
    ///
    /// # Errors
    ///
    /// [`SourceError`] as for [`SourceName::new`], or
    /// [`SourceError::Reserved`].
    pub fn writable(name: &str) -> Result<Self, SourceError> {
        let name = Self::new(name)?;
        match RESERVED.iter().find(|(n, _)| *n == name.0) {
            Some((_, owner)) => Err(SourceError::Reserved {
                name: name.0,
                owner,
            }),
            None => Ok(name),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is `local`.
    pub fn is_local(&self) -> bool {
        self.0 == Self::LOCAL
    }
}

impl Ord for SourceName {
    fn cmp(&self, other: &Self) -> Ordering {
        (!self.is_local(), &self.0).cmp(&(!other.is_local(), &other.0))
    }
}

impl PartialOrd for SourceName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl TryFrom<String> for SourceName {
    type Error = SourceError;

    fn try_from(s: String) -> Result<Self, SourceError> {
        SourceName::new(&s)
    }
}

impl From<SourceName> for String {
    fn from(s: SourceName) -> String {
        s.0
    }
}

impl fmt::Display for SourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One source: its deny and permit entries, and when they were last
/// loaded (read from its files, imported or changed).
#[derive(Clone, Debug)]
pub struct SourceLists {
    deny: AccessList,
    permit: AccessList,
    /// When the entries were last read from the files or changed.
    pub loaded_at: SystemTime,
}

impl Default for SourceLists {
    fn default() -> Self {
        Self::new(
            AccessList::new(ListKind::Deny),
            AccessList::new(ListKind::Permit),
        )
    }
}

impl SourceLists {
    /// A source over two lists (the caller checks their kinds), loaded now.
    pub(crate) fn new(deny: AccessList, permit: AccessList) -> Self {
        SourceLists {
            deny,
            permit,
            loaded_at: SystemTime::now(),
        }
    }

    /// One of the source's lists.
    pub fn list(&self, kind: ListKind) -> &AccessList {
        match kind {
            ListKind::Deny => &self.deny,
            ListKind::Permit => &self.permit,
        }
    }

    /// One of the source's lists, to change it (marks the source loaded now).
    pub fn list_mut(&mut self, kind: ListKind) -> &mut AccessList {
        self.loaded_at = SystemTime::now();
        match kind {
            ListKind::Deny => &mut self.deny,
            ListKind::Permit => &mut self.permit,
        }
    }

    /// Entries of both lists, by family.
    pub fn len(&self) -> FamilyCounts {
        let (d, p) = (self.deny.len(), self.permit.len());
        FamilyCounts {
            v4: d.v4 + p.v4,
            v6: d.v6 + p.v6,
        }
    }

    /// Whether both lists are empty.
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.permit.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_local_sorts_first() {
        for good in [
            "local",
            "ipsum",
            "spamhaus-drop",
            "a",
            "team_cymru2",
            "fail2ban",
        ] {
            assert_eq!(SourceName::new(good).unwrap().as_str(), good);
        }
        assert_eq!(SourceName::new(""), Err(SourceError::Empty));
        let e = SourceName::new("Spamhaus").unwrap_err();
        assert_eq!(
            e.to_string(),
            "source name \"Spamhaus\" has 'S' at position 1; a source name is lowercase letters \
             a-z, digits, '-' and '_', starting with a letter or digit"
        );
        for bad in ["-x", "a.b", "a/b", "../x", "a b", "é"] {
            assert!(SourceName::new(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            SourceName::new(&"x".repeat(33)),
            Err(SourceError::TooLong { len: 33, .. })
        ));
        let mut names: Vec<SourceName> = ["zeta", "local", "abc"]
            .iter()
            .map(|n| SourceName::new(n).unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["local", "abc", "zeta"]
        );
    }

    #[test]
    fn reserved_names_are_not_writable() {
        assert!(SourceName::new("auto").is_ok());
        let e = SourceName::writable("auto").unwrap_err();
        assert_eq!(
            e.to_string(),
            "source \"auto\" is reserved for automatic bans; it cannot be changed from the CLI"
        );
        assert!(SourceName::writable("fleet").is_err());
        assert!(SourceName::writable("ipsum").is_ok());
        assert!(serde_json::from_str::<SourceName>("\"Bad\"").is_err());
    }
}
