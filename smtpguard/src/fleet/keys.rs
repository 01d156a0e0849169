//! The fleet's key layout under the site prefix (`fleet.prefix`):
//!
//! | key | value |
//! |---|---|
//! | `<prefix>lists/{deny,permit}/<canonical prefix>` | [`EntryValue`](super::EntryValue) JSON |
//! | `<prefix>feeds/<name>/current` | the feed's generation in force, decimal |
//! | `<prefix>feeds/<name>/g/<G>/{deny,permit}/<canonical prefix>` | [`EntryValue`](super::EntryValue) JSON |
//! | `<prefix>gateways/<host>` | a gateway's status JSON, on a lease |
//!
//! A prefix in a key is canonical (`203.0.113.0/24`, host bits clear,
//! IPv4-mapped IPv6 written as IPv4), so one entry has exactly one key.

use std::str::FromStr;

use ipnet::IpNet;

use crate::policy::{canonical_prefix, ListKind, SourceName};

/// What a key under the site prefix stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetKey {
    /// One entry of the fleet's own lists.
    Entry(ListKind, IpNet),
    /// A bulk feed's pointer to the generation in force.
    FeedPointer(String),
    /// One entry of one generation of a bulk feed.
    FeedEntry {
        /// The feed's name (a source name: `a-z0-9-_`).
        feed: String,
        /// The generation.
        generation: u64,
        /// The list.
        kind: ListKind,
        /// The prefix.
        prefix: IpNet,
    },
    /// A gateway's status.
    Gateway(String),
}

/// Why a key under the site prefix was not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is not under the configured prefix.
    #[error("not under the fleet prefix")]
    OutsidePrefix,
    /// The key is not valid UTF-8.
    #[error("not UTF-8")]
    NotUtf8,
    /// The key's shape matches nothing in the layout.
    #[error("not a key of the fleet layout (lists/deny/PREFIX, lists/permit/PREFIX, feeds/NAME/current, feeds/NAME/g/G/LIST/PREFIX, gateways/HOST)")]
    Unknown,
    /// The list name is neither `deny` nor `permit`.
    #[error("list {0:?} is neither deny nor permit")]
    BadList(String),
    /// The prefix does not parse, is not canonical, or covers a whole family.
    #[error("prefix {0:?} is not a canonical network prefix such as 203.0.113.0/24 (host bits clear, not /0)")]
    BadPrefix(String),
    /// The feed name is not a valid source name.
    #[error("feed name {0:?} is not lowercase a-z, digits, '-' and '_'")]
    BadFeed(String),
    /// The generation is not a decimal number.
    #[error("generation {0:?} is not a decimal number")]
    BadGeneration(String),
}

/// The key of one entry of the fleet's lists.
pub fn entry_key(site: &str, kind: ListKind, prefix: IpNet) -> String {
    format!("{site}lists/{}/{}", kind.as_str(), canonical_prefix(prefix))
}

/// The key of a gateway's status.
pub fn gateway_key(site: &str, host: &str) -> String {
    format!("{site}gateways/{host}")
}

/// The key of a feed's pointer.
pub fn feed_pointer_key(site: &str, feed: &str) -> String {
    format!("{site}feeds/{feed}/current")
}

/// The key of one entry of one generation of a feed.
pub fn feed_entry_key(
    site: &str,
    feed: &str,
    generation: u64,
    kind: ListKind,
    prefix: IpNet,
) -> String {
    format!(
        "{site}feeds/{feed}/g/{generation}/{}/{}",
        kind.as_str(),
        canonical_prefix(prefix)
    )
}

/// The key prefix of one generation of a feed.
pub fn feed_generation_prefix(site: &str, feed: &str, generation: u64) -> String {
    format!("{site}feeds/{feed}/g/{generation}/")
}

/// Parses a key read from etcd.
///
/// # Errors
///
/// [`KeyError`] saying what is wrong with it.
pub fn parse_key(site: &str, key: &[u8]) -> Result<FleetKey, KeyError> {
    let key = std::str::from_utf8(key).map_err(|_| KeyError::NotUtf8)?;
    let rest = key.strip_prefix(site).ok_or(KeyError::OutsidePrefix)?;
    if let Some(rest) = rest.strip_prefix("lists/") {
        let (kind, prefix) = list_and_prefix(rest)?;
        return Ok(FleetKey::Entry(kind, prefix));
    }
    if let Some(host) = rest.strip_prefix("gateways/") {
        if host.is_empty() || host.contains('/') {
            return Err(KeyError::Unknown);
        }
        return Ok(FleetKey::Gateway(host.to_owned()));
    }
    if let Some(rest) = rest.strip_prefix("feeds/") {
        let (feed, rest) = rest.split_once('/').ok_or(KeyError::Unknown)?;
        if SourceName::new(feed).is_err() {
            return Err(KeyError::BadFeed(feed.to_owned()));
        }
        if rest == "current" {
            return Ok(FleetKey::FeedPointer(feed.to_owned()));
        }
        let rest = rest.strip_prefix("g/").ok_or(KeyError::Unknown)?;
        let (generation, rest) = rest.split_once('/').ok_or(KeyError::Unknown)?;
        let generation = parse_generation(generation)?;
        let (kind, prefix) = list_and_prefix(rest)?;
        return Ok(FleetKey::FeedEntry {
            feed: feed.to_owned(),
            generation,
            kind,
            prefix,
        });
    }
    Err(KeyError::Unknown)
}

/// Parses a generation number (a pointer's value or a key's part).
///
/// # Errors
///
/// [`KeyError::BadGeneration`].
pub fn parse_generation(text: &str) -> Result<u64, KeyError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(KeyError::BadGeneration(text.to_owned()));
    }
    text.parse()
        .map_err(|_| KeyError::BadGeneration(text.to_owned()))
}

fn list_and_prefix(rest: &str) -> Result<(ListKind, IpNet), KeyError> {
    let (list, prefix) = rest.split_once('/').ok_or(KeyError::Unknown)?;
    let kind = match list {
        "deny" => ListKind::Deny,
        "permit" => ListKind::Permit,
        other => return Err(KeyError::BadList(other.to_owned())),
    };
    let bad = || KeyError::BadPrefix(prefix.to_owned());
    let net = IpNet::from_str(prefix).map_err(|_| bad())?;
    if canonical_prefix(net) != net || net.to_string() != prefix || net.prefix_len() == 0 {
        return Err(bad());
    }
    Ok((kind, net))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = "/sg/v1/a/";

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn keys_round_trip() {
        for (kind, p) in [
            (ListKind::Deny, "203.0.113.0/24"),
            (ListKind::Permit, "2001:db8::/32"),
        ] {
            let k = entry_key(SITE, kind, net(p));
            assert_eq!(
                parse_key(SITE, k.as_bytes()),
                Ok(FleetKey::Entry(kind, net(p)))
            );
        }
        assert_eq!(
            entry_key(SITE, ListKind::Deny, net("192.0.2.1/24")),
            "/sg/v1/a/lists/deny/192.0.2.0/24"
        );
        let k = feed_entry_key(SITE, "ipsum", 7, ListKind::Deny, net("198.51.100.7/32"));
        assert_eq!(k, "/sg/v1/a/feeds/ipsum/g/7/deny/198.51.100.7/32");
        assert_eq!(
            parse_key(SITE, k.as_bytes()),
            Ok(FleetKey::FeedEntry {
                feed: "ipsum".into(),
                generation: 7,
                kind: ListKind::Deny,
                prefix: net("198.51.100.7/32")
            })
        );
        assert_eq!(
            parse_key(SITE, feed_pointer_key(SITE, "ipsum").as_bytes()),
            Ok(FleetKey::FeedPointer("ipsum".into()))
        );
        assert_eq!(
            parse_key(SITE, gateway_key(SITE, "mx1").as_bytes()),
            Ok(FleetKey::Gateway("mx1".into()))
        );
    }

    #[test]
    fn bad_keys_say_why() {
        let cases: &[(&str, KeyError)] = &[
            ("/other/lists/deny/192.0.2.0/24", KeyError::OutsidePrefix),
            (
                "/sg/v1/a/lists/drop/192.0.2.0/24",
                KeyError::BadList("drop".into()),
            ),
            (
                "/sg/v1/a/lists/deny/192.0.2.1/24",
                KeyError::BadPrefix("192.0.2.1/24".into()),
            ),
            (
                "/sg/v1/a/lists/deny/192.0.2.1",
                KeyError::BadPrefix("192.0.2.1".into()),
            ),
            (
                "/sg/v1/a/lists/deny/0.0.0.0/0",
                KeyError::BadPrefix("0.0.0.0/0".into()),
            ),
            (
                "/sg/v1/a/lists/deny/::ffff:192.0.2.0/120",
                KeyError::BadPrefix("::ffff:192.0.2.0/120".into()),
            ),
            ("/sg/v1/a/stuff", KeyError::Unknown),
            (
                "/sg/v1/a/feeds/Bad/current",
                KeyError::BadFeed("Bad".into()),
            ),
            (
                "/sg/v1/a/feeds/x/g/1a/deny/192.0.2.0/24",
                KeyError::BadGeneration("1a".into()),
            ),
        ];
        for (key, want) in cases {
            assert_eq!(parse_key(SITE, key.as_bytes()).as_ref(), Err(want), "{key}");
        }
        assert_eq!(
            parse_key(SITE, b"/sg/v1/a/lists/deny/\xff"),
            Err(KeyError::NotUtf8)
        );
    }
}
