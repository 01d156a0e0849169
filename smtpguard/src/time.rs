//! Dates as text, in the three shapes smtpguard writes, all in UTC:
//!
//! - [`rfc5322`]: the `Received:` header date (RFC 5322 §3.3),
//!   `Sun, 29 Nov 2026 09:43:48 +0000`;
//! - [`rfc3339`], [`rfc3339_unix`], [`parse_rfc3339`]: list expiries and
//!   the CLI (RFC 3339), `2026-11-29T09:43:48Z`;
//! - [`utc`]: certificate dates in messages, `2026-11-29 09:43:48 UTC`.
//!
//! The calendar is the `time` crate's (RFC 5322, certificate dates) and
//! humantime's (RFC 3339); nothing here does calendar arithmetic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{format_description::BorrowedFormatItem, macros::format_description, OffsetDateTime};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TimeError {
    /// Text that is not an RFC 3339 UTC time such as `2026-12-01T10:00:00Z`.
    #[error("not an RFC 3339 UTC time")]
    Rfc3339(#[source] humantime::TimestampError),
}

/// RFC 5322 §3.3 date-time: the day of the month without padding, the
/// zone always `+0000`.
const RFC5322: &[BorrowedFormatItem<'_>] = format_description!(
    "[weekday repr:short], [day padding:none] [month repr:short] [year] \
     [hour]:[minute]:[second] +0000"
);

/// `YYYY-MM-DD HH:MM:SS UTC`.
const UTC: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");

/// RFC 5322 §3.3 date-time in UTC, e.g. `Sat, 29 Nov 2026 09:43:48 +0000`,
/// to the second. Times before 1970 are clamped to the epoch.
pub fn rfc5322(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Past year 9999 (what `time` holds without large dates): the last
    // second it can write. No clock gets there.
    let at = i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc());
    at.format(RFC5322)
        .expect("an RFC 5322 date has no fallible part")
}

/// `2026-11-29 09:43:48 UTC` for a Unix time in seconds (negative: before
/// 1970). Outside years -9999..=9999 it is `@SECONDS`.
pub fn utc(unix: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(unix) {
        Ok(at) => at.format(UTC).expect("a UTC date has no fallible part"),
        Err(_) => format!("@{unix}"),
    }
}

/// RFC 3339 to the second in UTC, e.g. `2026-11-29T09:43:48Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// [`rfc3339`] of a Unix time in seconds; past year 9999 (which RFC 3339
/// cannot write) `@SECONDS`.
pub fn rfc3339_unix(unix_secs: u64) -> String {
    match UNIX_EPOCH.checked_add(Duration::from_secs(unix_secs)) {
        Some(t) if unix_secs < 253_402_300_800 => rfc3339(t),
        _ => format!("@{unix_secs}"),
    }
}

/// Reads an RFC 3339 UTC time such as `2026-12-01T10:00:00Z`.
///
/// # Errors
///
/// [`TimeError::Rfc3339`] for anything else.
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, TimeError> {
    humantime::parse_rfc3339(text).map_err(TimeError::Rfc3339)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn rfc5322_dates() {
        assert_eq!(rfc5322(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322(at(1_795_945_428)),
            "Sun, 29 Nov 2026 09:43:48 +0000"
        );
        // Leap day, and the last second of a leap year.
        assert_eq!(rfc5322(at(951_782_400)), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322(at(1_735_689_599)),
            "Tue, 31 Dec 2024 23:59:59 +0000"
        );
        assert_eq!(
            rfc5322(UNIX_EPOCH - Duration::from_secs(1)),
            "Thu, 1 Jan 1970 00:00:00 +0000"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(-1), "1969-12-31 23:59:59 UTC");
        assert_eq!(utc(4_102_444_799), "2099-12-31 23:59:59 UTC");
        assert_eq!(utc(253_402_300_799), "9999-12-31 23:59:59 UTC");
        assert_eq!(utc(253_402_300_800), "@253402300800");
    }

    #[test]
    fn rfc3339_round_trip() {
        assert_eq!(rfc3339_unix(1_795_945_428), "2026-11-29T09:43:48Z");
        assert_eq!(rfc3339_unix(253_402_300_800), "@253402300800");
        assert_eq!(
            parse_rfc3339("2026-11-29T09:43:48Z").unwrap(),
            at(1_795_945_428)
        );
        assert!(parse_rfc3339("2026-11-29").is_err());
    }
}
