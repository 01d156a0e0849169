//! The value of one fleet entry: JSON
//! `{"comment": "...", "expires_at": "2026-12-02T10:00:00Z", "added_by": "mx1", "added_at": "..."}`.
//!
//! Times are RFC 3339 in UTC. `expires_at` is enforced by every gateway
//! from the value, not by an etcd lease: a lease's remaining time is reset
//! on every leader change, and the value works offline.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The longest comment accepted, in bytes (as the list files).
const MAX_COMMENT_BYTES: usize = 1024;

/// One fleet entry's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryValue {
    /// Free text, one line.
    #[serde(default)]
    pub comment: Option<String>,
    /// When the entry stops applying; `None`: permanent.
    #[serde(default, with = "humantime_serde")]
    pub expires_at: Option<SystemTime>,
    /// Who wrote it: the gateway's host name and the operator, `mx1/root`.
    #[serde(default)]
    pub added_by: Option<String>,
    /// When it was written.
    #[serde(default, with = "humantime_serde")]
    pub added_at: Option<SystemTime>,
}

/// Why a value was not understood.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// Not JSON of the expected shape.
    #[error("not an entry value {{comment, expires_at, added_by, added_at}}")]
    Json(#[source] serde_json::Error),
    /// A comment over [`MAX_COMMENT_BYTES`] or with a line break.
    #[error("the comment is longer than {MAX_COMMENT_BYTES} bytes or spans lines")]
    Comment,
}

impl EntryValue {
    /// Parses and checks a value read from etcd.
    ///
    /// # Errors
    ///
    /// [`ValueError`].
    pub fn parse(bytes: &[u8]) -> Result<EntryValue, ValueError> {
        let value: EntryValue = serde_json::from_slice(bytes).map_err(ValueError::Json)?;
        if let Some(c) = &value.comment {
            if c.len() > MAX_COMMENT_BYTES || c.contains(['\n', '\r']) || c.starts_with("expires=")
            {
                return Err(ValueError::Comment);
            }
        }
        Ok(value)
    }

    /// The JSON written to etcd.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an entry value always serialises")
    }

    /// Whether the entry no longer applies at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn values_round_trip_and_bad_ones_are_refused() {
        let v = EntryValue {
            comment: Some("spam run".into()),
            expires_at: Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
            added_by: Some("mx1/root".into()),
            added_at: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        };
        let json = v.to_json();
        assert!(
            json.contains("\"expires_at\":\"2027-01-15T08:00:00Z\""),
            "{json}"
        );
        assert_eq!(EntryValue::parse(json.as_bytes()).unwrap(), v);
        assert_eq!(EntryValue::parse(b"{}").unwrap().comment, None);
        assert!(EntryValue::parse(b"not json").is_err());
        assert!(EntryValue::parse(br#"{"expires_at":"tomorrow"}"#).is_err());
        assert!(EntryValue::parse(br#"{"comment":"a\nb"}"#).is_err());
        assert!(v.expired(UNIX_EPOCH + Duration::from_secs(1_800_000_000)));
        assert!(!v.expired(UNIX_EPOCH));
    }
}
