//! `[dnsbl]`: the raw TOML shape and its validation into [`DnsblConfig`].
//!
//! A site is written either as a postscreen-style string (copied from
//! `postscreen_dnsbl_sites`) or as a table; both mean the same:
//!
//! ```toml
//! [dnsbl]
//! sites = [
//!     "zen.spamhaus.org*3",
//!     { zone = "b.barracudacentral.org", weight = 2, name = "barracuda" },
//!     "list.dnswl.org=127.0.[0..255].[1..3]*-5",
//!     { zone = "multi.example", filter = "&0.0.0.4", weight = 1 },
//! ]
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use super::DnsblError;

/// `[dnsbl]` as written; every key optional but `sites`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDnsbl {
    /// `sites`: strings or tables.
    pub sites: Option<Vec<RawSite>>,
    /// `threshold`.
    pub threshold: Option<i64>,
    /// `action`.
    pub action: Option<Action>,
    /// `timeout`: a humantime string.
    pub timeout: Option<String>,
    /// `cache_ttl`: a humantime string.
    pub cache_ttl: Option<String>,
    /// `max_cache_entries`.
    pub max_cache_entries: Option<i64>,
    /// `resolver`: `"system"` or `"ADDR:PORT"`.
    pub resolver: Option<String>,
    /// `max_queries_in_flight`.
    pub max_queries_in_flight: Option<i64>,
}

/// One entry of `sites` as written.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSite {
    /// `"zone[=filter|&mask][*weight]"`, postscreen's syntax.
    Text(String),
    /// `{ zone, filter, weight, name }`.
    Table(RawSiteTable),
}

/// A site written as a table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSiteTable {
    /// The list's DNS zone (`zen.spamhaus.org`).
    pub zone: String,
    /// A reply filter: a pattern (`127.0.0.[2..11]`) or `&` and a mask.
    pub filter: Option<String>,
    /// Added to the score when the site lists the client; default 1.
    pub weight: Option<i64>,
    /// The name in logs and metrics; default the zone.
    pub name: Option<String>,
}

/// What a listed client gets (the score reached `threshold`); the words of
/// postscreen's `postscreen_dnsbl_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Log only.
    #[default]
    Ignore,
    /// Greet, then answer every recipient with `554 5.7.1` (logging the
    /// sender and recipients); nothing is accepted.
    Enforce,
    /// `521 5.7.1` instead of the greeting (RFC 7504), then close.
    Drop,
}

impl Action {
    /// The configuration word.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Ignore => "ignore",
            Action::Enforce => "enforce",
            Action::Drop => "drop",
        }
    }
}

/// Which DNS server answers the queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolverSetting {
    /// The name servers of /etc/resolv.conf.
    System,
    /// One recursive resolver (UDP, TCP on truncation).
    Address(SocketAddr),
}

/// The part of an A reply a site's filter matches (RFC 5782 §2.1: replies
/// are addresses in 127.0.0.0/8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyFilter {
    /// postscreen's `d.d.d.d` where each `d` is a number, `[n..m]` or
    /// `[a;b;n..m]`: one list of inclusive ranges per octet.
    Pattern([Vec<(u8, u8)>; 4]),
    /// `&a.b.c.d`: the reply matches when it shares a set bit with the mask
    /// (bit-coded lists such as DNSWL-style or SURBL-style multi lists).
    Mask(Ipv4Addr),
}

impl ReplyFilter {
    /// Whether `reply` passes the filter.
    pub fn matches(&self, reply: Ipv4Addr) -> bool {
        match self {
            ReplyFilter::Pattern(octets) => reply
                .octets()
                .iter()
                .zip(octets)
                .all(|(o, ranges)| ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(o))),
            ReplyFilter::Mask(mask) => u32::from(reply) & u32::from(*mask) != 0,
        }
    }

    /// Parses `127.0.0.[2..11]`, `127.0.[0..255].[1;3]` or `&0.0.0.4`.
    pub fn parse(text: &str) -> Result<ReplyFilter, String> {
        if let Some(mask) = text.strip_prefix('&') {
            let mask: Ipv4Addr = mask
                .parse()
                .map_err(|_| format!("mask {mask:?} is not an IPv4 address"))?;
            if mask.is_unspecified() {
                return Err("mask 0.0.0.0 matches nothing".to_owned());
            }
            return Ok(ReplyFilter::Mask(mask));
        }
        let parts = split_octets(text);
        if parts.len() != 4 {
            return Err(format!(
                "filter {text:?} needs four octets, such as 127.0.0.2 or 127.0.0.[2..11]"
            ));
        }
        let mut octets: [Vec<(u8, u8)>; 4] = Default::default();
        for (slot, part) in octets.iter_mut().zip(parts) {
            *slot = parse_octet(part).map_err(|e| format!("filter {text:?}: {e}"))?;
        }
        Ok(ReplyFilter::Pattern(octets))
    }
}

/// Splits at the dots outside brackets (`127.0.0.[2..11]`).
fn split_octets(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0u32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_octet(part: &str) -> Result<Vec<(u8, u8)>, String> {
    let number = |s: &str| {
        s.parse::<u8>()
            .map_err(|_| format!("{s:?} is not a number from 0 to 255"))
    };
    let Some(inner) = part.strip_prefix('[').and_then(|p| p.strip_suffix(']')) else {
        let n = number(part)?;
        return Ok(vec![(n, n)]);
    };
    inner
        .split(';')
        .map(|item| match item.split_once("..") {
            Some((lo, hi)) => {
                let (lo, hi) = (number(lo)?, number(hi)?);
                if lo > hi {
                    return Err(format!("range [{lo}..{hi}] is empty"));
                }
                Ok((lo, hi))
            }
            None => number(item).map(|n| (n, n)),
        })
        .collect()
}

/// One DNS list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// The zone, lower case, without the trailing dot.
    pub zone: String,
    /// Which replies count; `None`: any reply in 127.0.0.0/8 other than the
    /// error codes 127.255.255.254 and .255.
    pub filter: Option<ReplyFilter>,
    /// Added to the score when the site lists the client; negative for
    /// allow lists (DNSWL).
    pub weight: i32,
    /// The name in logs and metrics (the zone unless given).
    pub name: String,
}

/// The validated `[dnsbl]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsblConfig {
    /// The lists, asked in parallel. At least one; names unique.
    pub sites: Vec<Site>,
    /// A score at or above it is a listing: `action` applies. Default 1.
    pub threshold: i32,
    /// What a listed client gets. Default `ignore`.
    pub action: Action,
    /// How long the greeting waits for answers; later ones do not count.
    /// Default 5 s, from 100 ms to 60 s.
    pub timeout: Duration,
    /// Longest time an answer is reused; the answer's DNS TTL shortens it.
    /// Default 1 h (postscreen's `postscreen_dnsbl_max_ttl`); 0 disables
    /// the cache.
    pub cache_ttl: Duration,
    /// Cached answers kept at most (one per site and client). Default 100000.
    pub max_cache_entries: usize,
    /// Which DNS server answers. Default `system`.
    pub resolver: ResolverSetting,
    /// DNS queries in flight at most, over all sites and clients; a query
    /// over the cap waits for a slot within `timeout`. Default 256.
    pub max_queries_in_flight: usize,
}

/// Defaults of the optional keys.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `cache_ttl`.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(3600);
/// Default `max_cache_entries`.
pub const DEFAULT_MAX_CACHE_ENTRIES: usize = 100_000;
/// Default `max_queries_in_flight`.
pub const DEFAULT_MAX_QUERIES_IN_FLIGHT: usize = 256;

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> DnsblError {
    DnsblError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

impl DnsblConfig {
    /// Validates `[dnsbl]`.
    ///
    /// # Errors
    ///
    /// [`DnsblError::Invalid`] naming the key (within `[dnsbl]`, sites as
    /// `sites[i] (zone)`) and the problem.
    pub fn from_raw(raw: RawDnsbl) -> Result<DnsblConfig, DnsblError> {
        let raw_sites = raw
            .sites
            .ok_or_else(|| invalid("sites", "is missing: name at least one DNS list"))?;
        if raw_sites.is_empty() {
            return Err(invalid("sites", "is empty: name at least one DNS list"));
        }
        let parsed = raw_sites
            .into_iter()
            .enumerate()
            .map(|(i, raw_site)| {
                parse_site(raw_site)
                    .map_err(|(zone, problem)| invalid(format!("sites[{i}] ({zone})"), problem))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A site without a name is called by its zone, or, when other sites
        // share the zone (postscreen's one line per Spamhaus return code),
        // by its zone and filter as written.
        let zones: Vec<String> = parsed.iter().map(|(s, _)| s.zone.clone()).collect();
        let mut sites: Vec<Site> = Vec::with_capacity(parsed.len());
        for (i, (mut site, long_name)) in parsed.into_iter().enumerate() {
            if let Some(long_name) = long_name {
                if zones.iter().filter(|z| **z == site.zone).count() > 1 {
                    site.name = long_name;
                }
            }
            if sites.iter().any(|s| s.name == site.name) {
                return Err(invalid(
                    format!("sites[{i}] ({})", site.zone),
                    format!(
                        "repeats the name {:?}: give each site its own name",
                        site.name
                    ),
                ));
            }
            sites.push(site);
        }
        let threshold = match raw.threshold {
            None => 1,
            Some(t) => i32::try_from(t).ok().filter(|t| *t >= 1).ok_or_else(|| {
                invalid("threshold", format!("is {t}: use an integer of at least 1"))
            })?,
        };
        let duration = |key: &str, value: Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(text) => humantime::parse_duration(&text).map_err(|_| {
                invalid(
                    key,
                    format!("is {text:?}: use a duration such as \"5s\" or \"1h\""),
                )
            }),
        };
        let timeout = duration("timeout", raw.timeout, DEFAULT_TIMEOUT)?;
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&timeout) {
            return Err(invalid(
                "timeout",
                format!(
                    "is {}: use 100ms to 60s",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        let cache_ttl = duration("cache_ttl", raw.cache_ttl, DEFAULT_CACHE_TTL)?;
        if cache_ttl > Duration::from_secs(7 * 86400) {
            return Err(invalid(
                "cache_ttl",
                "is over 7 days: lists change faster than that",
            ));
        }
        let count = |key: &str, value: Option<i64>, default: usize| match value {
            None => Ok(default),
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| (1..=10_000_000).contains(n))
                .ok_or_else(|| invalid(key, format!("is {n}: use an integer from 1 to 10000000"))),
        };
        let max_cache_entries = count(
            "max_cache_entries",
            raw.max_cache_entries,
            DEFAULT_MAX_CACHE_ENTRIES,
        )?;
        let max_queries_in_flight = count(
            "max_queries_in_flight",
            raw.max_queries_in_flight,
            DEFAULT_MAX_QUERIES_IN_FLIGHT,
        )?;
        let resolver = match raw.resolver.as_deref() {
            None | Some("system") => ResolverSetting::System,
            Some(text) => ResolverSetting::Address(text.parse().map_err(|_| {
                invalid(
                    "resolver",
                    format!("is {text:?}: use \"system\" or an address with a port (\"127.0.0.1:53\", \"[::1]:53\")"),
                )
            })?),
        };
        Ok(DnsblConfig {
            sites,
            threshold,
            action: raw.action.unwrap_or_default(),
            timeout,
            cache_ttl,
            max_cache_entries,
            resolver,
            max_queries_in_flight,
        })
    }
}

/// A site from either shape; on error the zone as written and the problem.
/// A site from either shape, and, when its name was not given, the longer
/// name (`zone=filter`) it takes if other sites share its zone.
fn parse_site(raw: RawSite) -> Result<(Site, Option<String>), (String, String)> {
    let (zone, filter, weight, name) = match raw {
        RawSite::Table(t) => (t.zone, t.filter, t.weight, t.name),
        RawSite::Text(text) => {
            let (rest, weight) = match text.rsplit_once('*') {
                Some((rest, w)) => {
                    let w = w.parse::<i64>().map_err(|_| {
                        (rest.to_owned(), format!("weight {w:?} is not an integer"))
                    })?;
                    (rest.to_owned(), Some(w))
                }
                None => (text.clone(), None),
            };
            let (zone, filter) = match rest.find(['=', '&']) {
                Some(at) if rest.as_bytes()[at] == b'=' => {
                    (rest[..at].to_owned(), Some(rest[at + 1..].to_owned()))
                }
                Some(at) => (rest[..at].to_owned(), Some(rest[at..].to_owned())),
                None => (rest, None),
            };
            (zone, filter, weight, None)
        }
    };
    let fail = |problem: String| (zone.clone(), problem);
    let normalized = zone.trim_end_matches('.').to_ascii_lowercase();
    let labels_ok = !normalized.is_empty()
        && normalized.len() <= 190
        && normalized.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !labels_ok || normalized.parse::<IpAddr>().is_ok() {
        return Err(fail(format!(
            "zone {zone:?} is not a DNS name (letters, digits, '-', '_', dot-separated labels)"
        )));
    }
    let filter_text = filter.clone();
    let filter = filter
        .map(|f| ReplyFilter::parse(&f))
        .transpose()
        .map_err(fail)?;
    let weight = match weight {
        None => 1,
        Some(w) => i32::try_from(w)
            .ok()
            .filter(|w| *w != 0 && w.abs() <= 1_000_000)
            .ok_or_else(|| {
                fail(format!(
                    "weight {w} must be non-zero, from -1000000 to 1000000"
                ))
            })?,
    };
    let long_name = match (&name, &filter_text) {
        (None, Some(f)) => Some(format!("{normalized}={f}")),
        _ => None,
    };
    let name = match name {
        None => normalized.clone(),
        Some(n) if !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_graphic()) => n,
        Some(n) => {
            return Err(fail(format!(
                "name {n:?} must be 1 to 64 visible ASCII characters"
            )))
        }
    };
    Ok((
        Site {
            zone: normalized,
            filter,
            weight,
            name,
        },
        long_name,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<DnsblConfig, DnsblError> {
        let raw: RawDnsbl = toml::from_str(toml_text).expect("toml");
        DnsblConfig::from_raw(raw)
    }

    #[test]
    fn postscreen_strings_and_tables_mean_the_same() {
        let c = parse(
            r#"sites = ["zen.spamhaus.org*3", "list.dnswl.org=127.0.[0..255].[1..3]*-5",
                        { zone = "Multi.Example.", filter = "&0.0.0.4", weight = 2, name = "multi" }]
               threshold = 3
               action = "drop"
               timeout = "2s"
               resolver = "127.0.0.1:5353""#,
        )
        .unwrap();
        assert_eq!(c.sites.len(), 3);
        assert_eq!(c.sites[0].zone, "zen.spamhaus.org");
        assert_eq!(c.sites[0].weight, 3);
        assert_eq!(c.sites[0].filter, None);
        assert_eq!(c.sites[1].weight, -5);
        let dnswl = c.sites[1].filter.as_ref().unwrap();
        assert!(dnswl.matches(Ipv4Addr::new(127, 0, 10, 2)));
        assert!(!dnswl.matches(Ipv4Addr::new(127, 0, 10, 0)));
        assert_eq!(c.sites[2].zone, "multi.example");
        assert_eq!(c.sites[2].name, "multi");
        assert!(c.sites[2]
            .filter
            .as_ref()
            .unwrap()
            .matches(Ipv4Addr::new(127, 0, 0, 6)));
        assert!(!c.sites[2]
            .filter
            .as_ref()
            .unwrap()
            .matches(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(c.threshold, 3);
        assert_eq!(c.action, Action::Drop);
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(
            c.resolver,
            ResolverSetting::Address("127.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(c.cache_ttl, DEFAULT_CACHE_TTL);
    }

    #[test]
    fn sites_sharing_a_zone_are_named_by_their_filter() {
        let c = parse(r#"sites = ["zen.example=127.0.0.[10..11]*8", "zen.example=127.0.0.[4..7]*6", "other.example=127.0.0.2"]"#)
            .unwrap();
        let names: Vec<&str> = c.sites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "zen.example=127.0.0.[10..11]",
                "zen.example=127.0.0.[4..7]",
                "other.example"
            ]
        );
    }

    #[test]
    fn filters() {
        let f = ReplyFilter::parse("127.0.0.[2..11]").unwrap();
        assert!(f.matches(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(f.matches(Ipv4Addr::new(127, 0, 0, 11)));
        assert!(!f.matches(Ipv4Addr::new(127, 0, 0, 12)));
        let f = ReplyFilter::parse("127.0.0.[2;4;10..11]").unwrap();
        assert!(f.matches(Ipv4Addr::new(127, 0, 0, 4)));
        assert!(!f.matches(Ipv4Addr::new(127, 0, 0, 3)));
        assert!(ReplyFilter::parse("127.0.0").is_err());
        assert!(ReplyFilter::parse("127.0.0.[9..2]").is_err());
        assert!(ReplyFilter::parse("127.0.0.256").is_err());
        assert!(ReplyFilter::parse("&0.0.0.0").is_err());
    }

    #[test]
    fn errors_name_the_key_and_the_site() {
        let e = parse(r#"sites = ["ok.example", "bad..zone*2"]"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "dnsbl.sites[1] (bad..zone) zone \"bad..zone\" is not a DNS name (letters, digits, '-', '_', dot-separated labels)"
        );
        let e = parse(r#"sites = ["a.example*x"]"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("dnsbl.sites[0] (a.example) weight \"x\""),
            "{e}"
        );
        let e = parse(r#"sites = [{ zone = "a.example", filter = "127.0.0.[2..]" }]"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("dnsbl.sites[0] (a.example) filter"),
            "{e}"
        );
        let e = parse(r#"sites = ["a.example", "a.example"]"#).unwrap_err();
        assert!(e.to_string().contains("repeats the name"), "{e}");
        let e = parse(r#"sites = []"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "dnsbl.sites is empty: name at least one DNS list"
        );
        let e = parse(
            r#"sites = ["a.example"]
                         timeout = "5 parsecs""#,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("dnsbl.timeout is"), "{e}");
        let e = parse(
            r#"sites = ["a.example"]
                         resolver = "127.0.0.1""#,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("dnsbl.resolver is \"127.0.0.1\""),
            "{e}"
        );
        let e = parse(
            r#"sites = ["a.example"]
                         threshold = 0"#,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("dnsbl.threshold is 0"), "{e}");
    }
}
