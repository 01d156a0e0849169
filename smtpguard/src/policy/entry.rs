//! The one parser for access-list entries, shared by the configuration,
//! the command line and the importer.
//!
//! Accepted forms (documentation addresses shown):
//!
//! | form | example | stored as |
//! |---|---|---|
//! | IPv4 address | `192.0.2.1` | `192.0.2.1/32` |
//! | IPv6 address (RFC 4291 2.2) | `2001:db8::1` | `2001:db8::1/128` |
//! | CIDR prefix (RFC 4632, RFC 4291 2.3) | `198.51.100.0/24`, `2001:db8::/32` | itself |
//! | dotted netmask | `198.51.100.0:255.255.255.0`, `198.51.100.0/255.255.255.0` | `198.51.100.0/24` |
//! | range | `192.0.2.1-192.0.2.6` | the minimal prefixes: `.1/32 .2/31 .4/31 .6/32` |
//! | IPv4-mapped IPv6 (RFC 4291 2.5.5.2) | `::ffff:192.0.2.1`, `::ffff:198.51.100.0/120` | `192.0.2.1/32`, `198.51.100.0/24` |
//!
//! `ADDRESS:NETMASK` is only recognised when the left side is a dotted
//! IPv4 address and the right side a dotted quad, so `2001:db8::1` and
//! `::ffff:192.0.2.1` stay IPv6 addresses. Host bits under the mask are
//! cleared with a warning (`203.0.113.1:255.255.255.128` is
//! `203.0.113.0/25`). Rejected: octets with leading zeros (`010.0.0.1`
//! reads as octal to `inet_aton(3)` and as decimal elsewhere), non-contiguous
//! netmasks, prefix lengths beyond the family, zone ids (RFC 6874: only
//! meaningful on one host), hostnames (never resolved), and `0.0.0.0/0` /
//! `::/0` unless [`EntryOptions::allow_all`] is set.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::AddressFamily;

/// Options for [`parse_entry`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryOptions {
    /// Accept `0.0.0.0/0` and `::/0` (and anything else that covers a whole
    /// address family). The CLI sets it with `--allow-all`.
    pub allow_all: bool,
}

/// A parsed entry: one prefix, or several for a range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedEntry {
    /// Canonical prefixes (host bits zero, IPv4-mapped IPv6 stored as
    /// IPv4), in address order. One element except for ranges.
    pub prefixes: Vec<IpNet>,
    /// Things the entry said that were accepted but deserve a look.
    pub warnings: Vec<EntryWarning>,
}

/// Something accepted in an entry that the operator should know about.
///
/// Columns are 1-based character positions in the text given to
/// [`parse_entry`] (the importer shifts them to the line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryWarning {
    /// The address has bits set below the prefix length or netmask; the
    /// entry is stored as the network.
    HostBitsSet {
        /// Where the entry starts.
        column: usize,
        /// The entry as written.
        written: String,
        /// The network it is stored as.
        network: IpNet,
    },
}

impl EntryWarning {
    /// The 1-based column the warning points at.
    pub fn column(&self) -> usize {
        match self {
            EntryWarning::HostBitsSet { column, .. } => *column,
        }
    }

    pub(crate) fn shifted(self, by: usize) -> Self {
        match self {
            EntryWarning::HostBitsSet {
                column,
                written,
                network,
            } => EntryWarning::HostBitsSet {
                column: column + by,
                written,
                network,
            },
        }
    }
}

impl fmt::Display for EntryWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryWarning::HostBitsSet {
                column,
                written,
                network,
            } => write!(
                f,
                "column {column}: {written} has host bits set under its mask; stored as the network {network}"
            ),
        }
    }
}

/// Why an entry was rejected.
///
/// Every variant carries the 1-based character column of the offending
/// part of the text given to [`parse_entry`]; the importer shifts it to the
/// column in the line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Nothing but whitespace.
    #[error("column {column}: empty entry")]
    Empty {
        /// Column.
        column: usize,
    },
    /// Whitespace inside one entry.
    #[error("column {column}: unexpected whitespace inside the entry (one entry per token)")]
    Whitespace {
        /// Column of the first whitespace character.
        column: usize,
    },
    /// An IPv4 octet written with a leading zero.
    #[error("column {column}: octet \"{octet}\" has a leading zero (ambiguous: octal or decimal)")]
    LeadingZero {
        /// Column of the octet.
        column: usize,
        /// The octet as written.
        octet: String,
    },
    /// An IPv4 octet above 255.
    #[error("column {column}: octet \"{octet}\" is greater than 255")]
    OctetOutOfRange {
        /// Column of the octet.
        column: usize,
        /// The octet as written.
        octet: String,
    },
    /// Digits and dots, but not four octets.
    #[error(
        "column {column}: \"{text}\" is not an IPv4 address (expected four decimal octets a.b.c.d)"
    )]
    BadIpv4 {
        /// Column of the address.
        column: usize,
        /// The address as written.
        text: String,
    },
    /// Contains `:` but is not an IPv6 address.
    #[error("column {column}: \"{text}\" is not an IPv6 address")]
    BadIpv6 {
        /// Column of the address.
        column: usize,
        /// The address as written.
        text: String,
    },
    /// An IPv6 zone id such as `%eth0`.
    #[error("column {column}: zone id \"{zone}\" is not allowed (a zone only means something on one host)")]
    ZoneId {
        /// Column of the `%`.
        column: usize,
        /// The zone id, `%` included.
        zone: String,
    },
    /// A DNS name instead of an address.
    #[error("column {column}: \"{text}\" is a hostname; entries must be IP addresses (hostnames are never resolved)")]
    Hostname {
        /// Column of the name.
        column: usize,
        /// The name as written.
        text: String,
    },
    /// Anything else that is not an address, prefix, netmask or range.
    #[error("column {column}: \"{text}\" is not an IP address, prefix, netmask or range")]
    NotAnEntry {
        /// Column of the text.
        column: usize,
        /// The text.
        text: String,
    },
    /// A prefix length that is not a decimal number.
    #[error("column {column}: \"{text}\" is not a prefix length (expected a decimal number or a dotted IPv4 netmask)")]
    BadPrefixLen {
        /// Column of the prefix length.
        column: usize,
        /// The prefix length as written.
        text: String,
    },
    /// A prefix length longer than the address.
    #[error("column {column}: prefix length /{text} is out of range for {family} (0 to {max})")]
    PrefixLenOutOfRange {
        /// Column of the prefix length.
        column: usize,
        /// The prefix length as written.
        text: String,
        /// Family of the address.
        family: AddressFamily,
        /// Longest prefix of the family.
        max: u8,
    },
    /// A netmask whose one bits are not all at the top.
    #[error(
        "column {column}: netmask {mask} is not contiguous (its one bits must all come first)"
    )]
    NonContiguousNetmask {
        /// Column of the netmask.
        column: usize,
        /// The netmask.
        mask: Ipv4Addr,
    },
    /// A dotted netmask after an IPv6 address.
    #[error("column {column}: dotted netmask {mask} needs an IPv4 address, not {address}")]
    NetmaskOnIpv6 {
        /// Column of the netmask.
        column: usize,
        /// The netmask.
        mask: String,
        /// The IPv6 address before it.
        address: Ipv6Addr,
    },
    /// An IPv4-mapped IPv6 prefix shorter than `/96`.
    #[error("column {column}: IPv4-mapped prefix {text} is shorter than /96 (it would cover more than the IPv4-mapped space)")]
    MappedPrefixTooShort {
        /// Column of the entry.
        column: usize,
        /// The entry as written.
        text: String,
    },
    /// `0.0.0.0/0`, `::/0` or a range covering a whole family, without
    /// [`EntryOptions::allow_all`].
    #[error("column {column}: {prefix} covers every {family} address; pass allow_all (--allow-all) to accept it")]
    WholeFamily {
        /// Column of the entry.
        column: usize,
        /// The prefix (`0.0.0.0/0` or `::/0`).
        prefix: IpNet,
        /// Its family.
        family: AddressFamily,
    },
    /// A range bound that is not a single address.
    #[error("column {column}: \"{text}\" is not a single address (a range is FIRST-LAST)")]
    RangeBound {
        /// Column of the bound.
        column: usize,
        /// The bound as written.
        text: String,
    },
    /// A range from IPv4 to IPv6 or back.
    #[error("column {column}: range {first}-{last} mixes IPv4 and IPv6")]
    RangeMixedFamilies {
        /// Column of the range.
        column: usize,
        /// First address.
        first: IpAddr,
        /// Last address.
        last: IpAddr,
    },
    /// A range whose first address is after its last.
    #[error("column {column}: range start {first} is after its end {last}")]
    RangeReversed {
        /// Column of the range.
        column: usize,
        /// First address.
        first: IpAddr,
        /// Last address.
        last: IpAddr,
    },
}

impl EntryError {
    /// The 1-based column the error points at.
    pub fn column(&self) -> usize {
        // One list of variants: `column_mut` is the only place that knows
        // where each variant keeps its column.
        *self.clone().column_mut()
    }

    /// The same error with its column moved right by `by` characters.
    pub(crate) fn shifted(mut self, by: usize) -> Self {
        *self.column_mut() += by;
        self
    }

    fn column_mut(&mut self) -> &mut usize {
        match self {
            EntryError::Empty { column }
            | EntryError::Whitespace { column }
            | EntryError::LeadingZero { column, .. }
            | EntryError::OctetOutOfRange { column, .. }
            | EntryError::BadIpv4 { column, .. }
            | EntryError::BadIpv6 { column, .. }
            | EntryError::ZoneId { column, .. }
            | EntryError::Hostname { column, .. }
            | EntryError::NotAnEntry { column, .. }
            | EntryError::BadPrefixLen { column, .. }
            | EntryError::PrefixLenOutOfRange { column, .. }
            | EntryError::NonContiguousNetmask { column, .. }
            | EntryError::NetmaskOnIpv6 { column, .. }
            | EntryError::MappedPrefixTooShort { column, .. }
            | EntryError::WholeFamily { column, .. }
            | EntryError::RangeBound { column, .. }
            | EntryError::RangeMixedFamilies { column, .. }
            | EntryError::RangeReversed { column, .. } => column,
        }
    }
}

/// Parses one access-list entry (see the module documentation for the
/// forms). Surrounding spaces and tabs are ignored.
///
/// Returns the canonical prefixes the entry stands for and any warnings;
/// columns in errors and warnings are 1-based character positions in
/// `text`.
///
/// # Errors
///
/// An [`EntryError`] naming the column and the reason when `text` is not
/// one of the accepted forms, or covers a whole address family without
/// [`EntryOptions::allow_all`].
pub fn parse_entry(text: &str, options: EntryOptions) -> Result<ParsedEntry, EntryError> {
    Parser { text, options }.parse()
}

/// The canonical form of a prefix as stored in a list: host bits cleared,
/// and an IPv6 prefix inside `::ffff:0:0/96` turned into the IPv4 prefix it
/// maps (`::ffff:198.51.100.0/120` is `198.51.100.0/24`).
pub fn canonical_prefix(prefix: IpNet) -> IpNet {
    match prefix {
        IpNet::V6(p) if p.prefix_len() >= 96 => match p.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(
                Ipv4Net::new(v4, p.prefix_len() - 96)
                    .expect("96..=128 minus 96 is a valid IPv4 prefix length")
                    .trunc(),
            ),
            None => IpNet::V6(p.trunc()),
        },
        other => other.trunc(),
    }
}

struct Parser<'a> {
    text: &'a str,
    options: EntryOptions,
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// `d.d.d.d` with 1+ digits per part: the shape of an IPv4 address or
/// netmask, before checking values.
fn is_dotted_quad_shape(s: &str) -> bool {
    let mut parts = 0;
    for part in s.split('.') {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        parts += 1;
    }
    parts == 4
}

/// A DNS name: letters, digits, `-`, `_` and dots, at least one dot, and a
/// last label starting with a letter (top-level domains are alphabetic,
/// which no IPv4 address can be mistaken for).
fn looks_like_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    if !s.contains('.')
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    {
        return false;
    }
    s.rsplit('.')
        .next()
        .and_then(|label| label.chars().next())
        .is_some_and(|c| c.is_ascii_alphabetic())
}

impl Parser<'_> {
    /// 1-based character column of byte offset `at` in the text.
    fn col(&self, at: usize) -> usize {
        self.text[..at].chars().count() + 1
    }

    fn parse(&self) -> Result<ParsedEntry, EntryError> {
        let start = self.text.len() - self.text.trim_start_matches(is_blank).len();
        let body = self.text.trim_matches(is_blank);
        if body.is_empty() {
            return Err(EntryError::Empty { column: 1 });
        }
        if let Some(i) = body.find(char::is_whitespace) {
            return Err(EntryError::Whitespace {
                column: self.col(start + i),
            });
        }
        if looks_like_hostname(body) {
            return Err(EntryError::Hostname {
                column: self.col(start),
                text: body.to_string(),
            });
        }
        let mut warnings = Vec::new();
        let prefixes = match body.find('-') {
            Some(dash) => self.range(body, start, dash)?,
            None => vec![self.single(body, start, &mut warnings)?],
        };
        Ok(ParsedEntry { prefixes, warnings })
    }

    /// One address, prefix or address with netmask; `s` starts at byte `at`.
    fn single(
        &self,
        s: &str,
        at: usize,
        warnings: &mut Vec<EntryWarning>,
    ) -> Result<IpNet, EntryError> {
        if let Some(pct) = s.find('%') {
            return Err(self.zone_or_garbage(s, at, pct));
        }
        // Split off a prefix length or netmask: after '/', or after the
        // last ':' when both sides are dotted quads (never inside IPv6).
        let (addr_text, suffix) = if let Some(slash) = s.find('/') {
            (&s[..slash], Some((slash + 1, &s[slash + 1..])))
        } else {
            match s.rfind(':') {
                Some(colon)
                    if is_dotted_quad_shape(&s[colon + 1..])
                        && is_dotted_quad_shape(&s[..colon]) =>
                {
                    (&s[..colon], Some((colon + 1, &s[colon + 1..])))
                }
                _ => (s, None),
            }
        };
        if addr_text.is_empty() {
            return Err(EntryError::NotAnEntry {
                column: self.col(at),
                text: s.to_string(),
            });
        }
        let addr = self.address(addr_text, at)?;
        let (family, max) = match addr {
            IpAddr::V4(_) => (AddressFamily::Ipv4, 32u8),
            IpAddr::V6(_) => (AddressFamily::Ipv6, 128u8),
        };
        let len = match suffix {
            None => max,
            Some((off, len_text)) => {
                let len_at = at + off;
                if len_text.contains('.') {
                    let mask = self.ipv4(len_text, len_at)?;
                    if let IpAddr::V6(address) = addr {
                        return Err(EntryError::NetmaskOnIpv6 {
                            column: self.col(len_at),
                            mask: len_text.to_string(),
                            address,
                        });
                    }
                    let bits = u32::from(mask);
                    if bits.leading_ones() + bits.trailing_zeros() != 32 {
                        return Err(EntryError::NonContiguousNetmask {
                            column: self.col(len_at),
                            mask,
                        });
                    }
                    bits.leading_ones() as u8
                } else if !len_text.is_empty() && len_text.bytes().all(|b| b.is_ascii_digit()) {
                    match len_text.parse::<u8>() {
                        Ok(n) if n <= max => n,
                        _ => {
                            return Err(EntryError::PrefixLenOutOfRange {
                                column: self.col(len_at),
                                text: len_text.to_string(),
                                family,
                                max,
                            })
                        }
                    }
                } else {
                    return Err(EntryError::BadPrefixLen {
                        column: self.col(len_at),
                        text: len_text.to_string(),
                    });
                }
            }
        };
        let written = match addr {
            IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, len).expect("length checked against 32")),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(_) if len < 96 => {
                    return Err(EntryError::MappedPrefixTooShort {
                        column: self.col(at),
                        text: s.to_string(),
                    })
                }
                _ => IpNet::V6(Ipv6Net::new(a, len).expect("length checked against 128")),
            },
        };
        let prefix = canonical_prefix(written);
        if prefix.prefix_len() == 0 && !self.options.allow_all {
            return Err(EntryError::WholeFamily {
                column: self.col(at),
                prefix,
                family: AddressFamily::of(&prefix),
            });
        }
        if written.addr() != written.network() {
            warnings.push(EntryWarning::HostBitsSet {
                column: self.col(at),
                written: s.to_string(),
                network: prefix,
            });
        }
        Ok(prefix)
    }

    /// `FIRST-LAST`, the dash at byte `dash` of `s`, which starts at `at`.
    fn range(&self, s: &str, at: usize, dash: usize) -> Result<Vec<IpNet>, EntryError> {
        let first = self.range_bound(&s[..dash], at)?;
        let last = self.range_bound(&s[dash + 1..], at + dash + 1)?;
        let column = self.col(at);
        let (lo, hi, bits) = match (first, last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                (u128::from(u32::from(a)), u128::from(u32::from(b)), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => {
                return Err(EntryError::RangeMixedFamilies {
                    column,
                    first,
                    last,
                })
            }
        };
        if lo > hi {
            return Err(EntryError::RangeReversed {
                column,
                first,
                last,
            });
        }
        let prefixes: Vec<IpNet> = range_to_prefixes(lo, hi, bits)
            .into_iter()
            .map(|(start, len)| match first {
                IpAddr::V4(_) => {
                    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(start as u32), len).expect("len <= 32"))
                }
                IpAddr::V6(_) => {
                    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(start), len).expect("len <= 128"))
                }
            })
            .collect();
        if let [whole] = prefixes.as_slice() {
            if whole.prefix_len() == 0 && !self.options.allow_all {
                return Err(EntryError::WholeFamily {
                    column,
                    prefix: *whole,
                    family: AddressFamily::of(whole),
                });
            }
        }
        Ok(prefixes)
    }

    /// One end of a range: a single address, IPv4-mapped normalised.
    fn range_bound(&self, s: &str, at: usize) -> Result<IpAddr, EntryError> {
        if let Some(pct) = s.find('%') {
            return Err(self.zone_or_garbage(s, at, pct));
        }
        let with_netmask = s
            .rfind(':')
            .is_some_and(|c| is_dotted_quad_shape(&s[..c]) && is_dotted_quad_shape(&s[c + 1..]));
        if s.is_empty() || s.contains('/') || with_netmask {
            return Err(EntryError::RangeBound {
                column: self.col(at),
                text: s.to_string(),
            });
        }
        Ok(self.address(s, at)?.to_canonical())
    }

    fn zone_or_garbage(&self, s: &str, at: usize, pct: usize) -> EntryError {
        if s[..pct].contains(':') {
            let zone_end = s[pct..].find(['/', '-']).map_or(s.len(), |e| pct + e);
            EntryError::ZoneId {
                column: self.col(at + pct),
                zone: s[pct..zone_end].to_string(),
            }
        } else {
            EntryError::NotAnEntry {
                column: self.col(at),
                text: s.to_string(),
            }
        }
    }

    /// An address without prefix length; `s` starts at byte `at`.
    fn address(&self, s: &str, at: usize) -> Result<IpAddr, EntryError> {
        if s.contains(':') {
            // A dotted tail (`::ffff:192.0.2.1`) gets the IPv4 octet checks
            // so a leading zero is reported as such.
            if let Some(colon) = s.rfind(':') {
                let tail = &s[colon + 1..];
                if tail.contains('.') {
                    self.ipv4(tail, at + colon + 1)?;
                }
            }
            return s
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| EntryError::BadIpv6 {
                    column: self.col(at),
                    text: s.to_string(),
                });
        }
        if looks_like_hostname(s) {
            return Err(EntryError::Hostname {
                column: self.col(at),
                text: s.to_string(),
            });
        }
        if !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(EntryError::NotAnEntry {
                column: self.col(at),
                text: s.to_string(),
            });
        }
        self.ipv4(s, at).map(IpAddr::V4)
    }

    /// Strict dotted-quad IPv4: four decimal octets 0-255, no leading zeros.
    fn ipv4(&self, s: &str, at: usize) -> Result<Ipv4Addr, EntryError> {
        let bad = || EntryError::BadIpv4 {
            column: self.col(at),
            text: s.to_string(),
        };
        let mut octets = [0u8; 4];
        let mut count = 0;
        let mut offset = 0;
        for part in s.split('.') {
            if count == 4 || part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            if part.len() > 1 && part.starts_with('0') {
                return Err(EntryError::LeadingZero {
                    column: self.col(at + offset),
                    octet: part.to_string(),
                });
            }
            octets[count] = match part.parse::<u8>() {
                Ok(v) => v,
                Err(_) => {
                    return Err(EntryError::OctetOutOfRange {
                        column: self.col(at + offset),
                        octet: part.to_string(),
                    })
                }
            };
            count += 1;
            offset += part.len() + 1;
        }
        if count != 4 {
            return Err(bad());
        }
        Ok(Ipv4Addr::from(octets))
    }
}

/// The minimal list of aligned blocks `(start, prefix length)` covering
/// `lo..=hi` in a `bits`-wide address space (32 or 128), in address order.
/// At most `2 * bits` blocks.
fn range_to_prefixes(lo: u128, hi: u128, bits: u32) -> Vec<(u128, u8)> {
    let mut out = Vec::new();
    let mut start = lo;
    loop {
        let span = hi - start; // number of addresses left, minus one
        let fits = |k: u32| {
            if k >= 128 {
                span == u128::MAX
            } else {
                (1u128 << k) - 1 <= span
            }
        };
        let mut k = if start == 0 {
            bits
        } else {
            start.trailing_zeros().min(bits)
        };
        while !fits(k) {
            k -= 1;
        }
        out.push((start, (bits - k) as u8));
        if k >= 128 {
            break;
        }
        let block_last = start + ((1u128 << k) - 1);
        if block_last >= hi {
            break;
        }
        start = block_last + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: EntryOptions = EntryOptions { allow_all: true };
    const STRICT: EntryOptions = EntryOptions { allow_all: false };

    /// Expected outcome of one table row.
    enum Want {
        /// The exact normalised prefixes, and how many warnings.
        Ok(&'static [&'static str], usize),
        /// The exact error text.
        Err(&'static str),
    }
    use Want::{Err as E, Ok as P};

    #[test]
    fn entry_table() {
        let table: &[(&str, EntryOptions, Want)] = &[
            // single addresses
            ("192.0.2.1", STRICT, P(&["192.0.2.1/32"], 0)),
            ("2001:db8::1", STRICT, P(&["2001:db8::1/128"], 0)),
            ("2001:DB8::1", STRICT, P(&["2001:db8::1/128"], 0)),
            ("0.0.0.0", STRICT, P(&["0.0.0.0/32"], 0)),
            (" \t192.0.2.1 \t", STRICT, P(&["192.0.2.1/32"], 0)),
            // CIDR
            ("198.51.100.0/24", STRICT, P(&["198.51.100.0/24"], 0)),
            ("2001:db8::/32", STRICT, P(&["2001:db8::/32"], 0)),
            ("203.0.113.0/25", STRICT, P(&["203.0.113.0/25"], 0)),
            ("255.255.255.255/32", STRICT, P(&["255.255.255.255/32"], 0)),
            ("2001:db8::1/64", STRICT, P(&["2001:db8::/64"], 1)),
            ("192.0.2.77/24", STRICT, P(&["192.0.2.0/24"], 1)),
            // dotted netmasks, both separators
            ("198.51.100.0:255.255.255.0", STRICT, P(&["198.51.100.0/24"], 0)),
            ("198.51.100.0/255.255.255.0", STRICT, P(&["198.51.100.0/24"], 0)),
            ("198.51.100.0:255.255.254.0", STRICT, P(&["198.51.100.0/23"], 0)),
            ("192.0.2.9:255.255.255.255", STRICT, P(&["192.0.2.9/32"], 0)),
            ("203.0.113.1:255.255.255.128", STRICT, P(&["203.0.113.0/25"], 1)),
            ("203.0.113.32:255.255.255.192", STRICT, P(&["203.0.113.0/26"], 1)),
            // an IPv6 address whose last groups look like a netmask is IPv6
            ("2001:db8::1:255.255.255.0", STRICT, P(&["2001:db8::1:ffff:ff00/128"], 0)),
            // ranges
            ("192.0.2.0-192.0.2.255", STRICT, P(&["192.0.2.0/24"], 0)),
            (
                "192.0.2.1-192.0.2.6",
                STRICT,
                P(&["192.0.2.1/32", "192.0.2.2/31", "192.0.2.4/31", "192.0.2.6/32"], 0),
            ),
            ("192.0.2.5-192.0.2.5", STRICT, P(&["192.0.2.5/32"], 0)),
            ("2001:db8::-2001:db8::ffff", STRICT, P(&["2001:db8::/112"], 0)),
            (
                "::ffff:192.0.2.1-::ffff:192.0.2.2",
                STRICT,
                P(&["192.0.2.1/32", "192.0.2.2/32"], 0),
            ),
            ("0.0.0.0-255.255.255.255", ALL, P(&["0.0.0.0/0"], 0)),
            // IPv4-mapped IPv6 is stored as IPv4
            ("::ffff:192.0.2.1", STRICT, P(&["192.0.2.1/32"], 0)),
            ("::ffff:c000:201", STRICT, P(&["192.0.2.1/32"], 0)),
            ("::ffff:198.51.100.0/120", STRICT, P(&["198.51.100.0/24"], 0)),
            ("::ffff:198.51.100.0/96", ALL, P(&["0.0.0.0/0"], 1)),
            // whole families with allow_all
            ("0.0.0.0/0", ALL, P(&["0.0.0.0/0"], 0)),
            ("::/0", ALL, P(&["::/0"], 0)),
            // rejected
            ("", STRICT, E("column 1: empty entry")),
            (" \t ", STRICT, E("column 1: empty entry")),
            (
                "010.0.0.1",
                STRICT,
                E("column 1: octet \"010\" has a leading zero (ambiguous: octal or decimal)"),
            ),
            (
                "192.0.2.01",
                STRICT,
                E("column 9: octet \"01\" has a leading zero (ambiguous: octal or decimal)"),
            ),
            (
                "::ffff:010.0.0.1",
                STRICT,
                E("column 8: octet \"010\" has a leading zero (ambiguous: octal or decimal)"),
            ),
            (
                "192.0.2.0:255.255.255.000",
                STRICT,
                E("column 23: octet \"000\" has a leading zero (ambiguous: octal or decimal)"),
            ),
            ("192.0.2.256", STRICT, E("column 9: octet \"256\" is greater than 255")),
            (
                "192.0.2",
                STRICT,
                E("column 1: \"192.0.2\" is not an IPv4 address (expected four decimal octets a.b.c.d)"),
            ),
            (
                "192.0.2.0:255.0.255.0",
                STRICT,
                E("column 11: netmask 255.0.255.0 is not contiguous (its one bits must all come first)"),
            ),
            (
                "192.0.2.0/255.255.0.255",
                STRICT,
                E("column 11: netmask 255.255.0.255 is not contiguous (its one bits must all come first)"),
            ),
            (
                "192.0.2.0/33",
                STRICT,
                E("column 11: prefix length /33 is out of range for IPv4 (0 to 32)"),
            ),
            (
                "2001:db8::/129",
                STRICT,
                E("column 12: prefix length /129 is out of range for IPv6 (0 to 128)"),
            ),
            (
                "192.0.2.0/99999",
                STRICT,
                E("column 11: prefix length /99999 is out of range for IPv4 (0 to 32)"),
            ),
            (
                "192.0.2.0/abc",
                STRICT,
                E("column 11: \"abc\" is not a prefix length (expected a decimal number or a dotted IPv4 netmask)"),
            ),
            (
                "192.0.2.0/",
                STRICT,
                E("column 11: \"\" is not a prefix length (expected a decimal number or a dotted IPv4 netmask)"),
            ),
            (
                "fe80::1%eth0",
                STRICT,
                E("column 8: zone id \"%eth0\" is not allowed (a zone only means something on one host)"),
            ),
            (
                "fe80::1%eth0/64",
                STRICT,
                E("column 8: zone id \"%eth0\" is not allowed (a zone only means something on one host)"),
            ),
            (
                "mail.example.com",
                STRICT,
                E("column 1: \"mail.example.com\" is a hostname; entries must be IP addresses (hostnames are never resolved)"),
            ),
            (
                "mail-1.example.com",
                STRICT,
                E("column 1: \"mail-1.example.com\" is a hostname; entries must be IP addresses (hostnames are never resolved)"),
            ),
            (
                "garbage",
                STRICT,
                E("column 1: \"garbage\" is not an IP address, prefix, netmask or range"),
            ),
            (
                "/24",
                STRICT,
                E("column 1: \"/24\" is not an IP address, prefix, netmask or range"),
            ),
            ("2001:db8:::1", STRICT, E("column 1: \"2001:db8:::1\" is not an IPv6 address")),
            (
                "2001:db8::/255.255.255.0",
                STRICT,
                E("column 12: dotted netmask 255.255.255.0 needs an IPv4 address, not 2001:db8::"),
            ),
            (
                "0.0.0.0/0",
                STRICT,
                E("column 1: 0.0.0.0/0 covers every IPv4 address; pass allow_all (--allow-all) to accept it"),
            ),
            (
                "::/0",
                STRICT,
                E("column 1: ::/0 covers every IPv6 address; pass allow_all (--allow-all) to accept it"),
            ),
            (
                "::ffff:0:0/96",
                STRICT,
                E("column 1: 0.0.0.0/0 covers every IPv4 address; pass allow_all (--allow-all) to accept it"),
            ),
            (
                "0.0.0.0-255.255.255.255",
                STRICT,
                E("column 1: 0.0.0.0/0 covers every IPv4 address; pass allow_all (--allow-all) to accept it"),
            ),
            (
                "::ffff:198.51.100.0/90",
                STRICT,
                E("column 1: IPv4-mapped prefix ::ffff:198.51.100.0/90 is shorter than /96 (it would cover more than the IPv4-mapped space)"),
            ),
            (
                "192.0.2.9-192.0.2.1",
                STRICT,
                E("column 1: range start 192.0.2.9 is after its end 192.0.2.1"),
            ),
            (
                "192.0.2.1-2001:db8::1",
                STRICT,
                E("column 1: range 192.0.2.1-2001:db8::1 mixes IPv4 and IPv6"),
            ),
            (
                "192.0.2.0/24-192.0.2.255",
                STRICT,
                E("column 1: \"192.0.2.0/24\" is not a single address (a range is FIRST-LAST)"),
            ),
            (
                "192.0.2.1-",
                STRICT,
                E("column 11: \"\" is not a single address (a range is FIRST-LAST)"),
            ),
            (
                "192.0.2.1 198.51.100.1",
                STRICT,
                E("column 10: unexpected whitespace inside the entry (one entry per token)"),
            ),
        ];
        assert!(table.len() >= 40);
        let mut failures = Vec::new();
        for (text, options, want) in table {
            let got = parse_entry(text, *options);
            let ok = match (want, &got) {
                (Want::Ok(prefixes, warnings), Ok(parsed)) => {
                    let got: Vec<String> = parsed.prefixes.iter().map(|p| p.to_string()).collect();
                    got == *prefixes && parsed.warnings.len() == *warnings
                }
                (Want::Err(message), Err(e)) => e.to_string() == *message,
                _ => false,
            };
            if !ok {
                failures.push(format!(
                    "{text:?}: got {got:?} / {}",
                    match &got {
                        Ok(_) => String::new(),
                        Err(e) => e.to_string(),
                    }
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} rows failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn host_bits_warning_names_the_entry_and_network() {
        let parsed = parse_entry("  203.0.113.1:255.255.255.128", STRICT).unwrap();
        assert_eq!(
            parsed.warnings,
            vec![EntryWarning::HostBitsSet {
                column: 3,
                written: "203.0.113.1:255.255.255.128".into(),
                network: "203.0.113.0/25".parse().unwrap(),
            }]
        );
        assert_eq!(
            parsed.warnings[0].to_string(),
            "column 3: 203.0.113.1:255.255.255.128 has host bits set under its mask; stored as the network 203.0.113.0/25"
        );
    }

    #[test]
    fn columns_count_characters_and_shift() {
        let e = parse_entry("  010.0.0.1", STRICT).unwrap_err();
        assert_eq!(e.column(), 3);
        assert_eq!(e.shifted(10).column(), 13);
    }

    /// Naive reference: every address of a small range lies in exactly one
    /// block, blocks are aligned, and no two neighbours could merge.
    #[test]
    fn ranges_are_minimal_and_exact() {
        for lo in 0u128..70 {
            for hi in lo..70 {
                let blocks = range_to_prefixes(lo, hi, 32);
                let mut next = lo;
                for &(start, len) in &blocks {
                    let size = 1u128 << (32 - len as u32);
                    assert_eq!(start, next, "gap or overlap in {lo}-{hi}: {blocks:?}");
                    assert_eq!(start % size, 0, "unaligned block in {lo}-{hi}");
                    next = start + size;
                }
                assert_eq!(next, hi + 1, "{lo}-{hi}: {blocks:?}");
                for pair in blocks.windows(2) {
                    let (a, la) = pair[0];
                    let (_, lb) = pair[1];
                    let merged = 1u128 << (33 - la as u32);
                    assert!(
                        !(la == lb && a % merged == 0),
                        "{lo}-{hi} not minimal: {blocks:?}"
                    );
                }
            }
        }
        assert_eq!(range_to_prefixes(0, u128::MAX, 128), vec![(0, 0)]);
        assert_eq!(range_to_prefixes(0, u32::MAX as u128, 32), vec![(0, 0)]);
        assert_eq!(range_to_prefixes(1, u128::MAX, 128).len(), 128);
    }

    #[test]
    fn canonical_prefix_maps_ipv4_mapped_space() {
        let c = |s: &str| canonical_prefix(s.parse().unwrap()).to_string();
        assert_eq!(c("::ffff:198.51.100.7/120"), "198.51.100.0/24");
        assert_eq!(c("::ffff:0:0/96"), "0.0.0.0/0");
        assert_eq!(c("::fffe:0:0/96"), "::fffe:0:0/96");
        assert_eq!(c("::/8"), "::/8");
        assert_eq!(c("192.0.2.7/24"), "192.0.2.0/24");
    }
}
