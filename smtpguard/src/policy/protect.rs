//! Protected ranges: addresses the lists may never refuse (loopback, the
//! gateway's own listen addresses, the relay networks, `policy.protected`).
//!
//! Entries covering them may still be stored (an import of full bogons
//! holds `127.0.0.0/8`); the verdict and the kernel rules keep the
//! protected part permitted: [`Policy::decide`](super::Policy::decide)
//! answers [`Reason::Protected`](super::Reason::Protected) first, and
//! [`Policy::compile`](super::Policy::compile) adds a permit rule for each
//! protected range and turns every deny rule inside one into a permit, so
//! the kernel's longest-prefix lookup can never end on a deny there.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use super::canonical_prefix;
use super::table::PrefixTable;

/// Why a range is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtectedKind {
    /// `127.0.0.0/8`, `::1/128`: always protected.
    Loopback,
    /// An explicit (non-wildcard) address of `server.listen`.
    ListenAddress,
    /// A network of `delivery.relay_networks`.
    RelayNetwork,
    /// A range of `policy.protected`.
    Configured,
}

impl fmt::Display for ProtectedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtectedKind::Loopback => "loopback",
            ProtectedKind::ListenAddress => "listen address",
            ProtectedKind::RelayNetwork => "delivery.relay_networks",
            ProtectedKind::Configured => "policy.protected",
        })
    }
}

/// One protected range and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ProtectedRange {
    /// Canonical prefix.
    pub prefix: IpNet,
    /// Why it is protected.
    pub kind: ProtectedKind,
}

impl fmt::Display for ProtectedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.prefix, self.kind)
    }
}

/// The protected ranges of a policy.
#[derive(Clone, Debug, Default)]
pub struct Protected {
    /// Every range as configured, sorted, for messages.
    ranges: Vec<ProtectedRange>,
    /// The ranges aggregated (no two nest or touch), for lookups and for
    /// the kernel's permit rules.
    merged: PrefixTable<()>,
}

impl Protected {
    /// The loopback ranges, `127.0.0.0/8` and `::1/128`.
    pub fn loopback() -> [ProtectedRange; 2] {
        [
            ProtectedRange {
                prefix: IpNet::V4(Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("/8")),
                kind: ProtectedKind::Loopback,
            },
            ProtectedRange {
                prefix: IpNet::V6(Ipv6Net::new(Ipv6Addr::LOCALHOST, 128).expect("/128")),
                kind: ProtectedKind::Loopback,
            },
        ]
    }

    /// Protects `ranges` (canonicalised; repeats kept once).
    pub fn new(ranges: impl IntoIterator<Item = ProtectedRange>) -> Self {
        let mut ranges: Vec<ProtectedRange> = ranges
            .into_iter()
            .map(|r| ProtectedRange {
                prefix: canonical_prefix(r.prefix).trunc(),
                kind: r.kind,
            })
            .collect();
        ranges.sort_unstable();
        ranges.dedup_by_key(|r| r.prefix);
        let mut merged = PrefixTable::new();
        let prefixes: Vec<IpNet> = ranges.iter().map(|r| r.prefix).collect();
        for prefix in IpNet::aggregate(&prefixes) {
            merged.insert(prefix, ());
        }
        Protected { ranges, merged }
    }

    /// Every range, sorted by prefix.
    pub fn ranges(&self) -> &[ProtectedRange] {
        &self.ranges
    }

    /// The most specific range holding `addr` (IPv4-mapped is IPv4).
    pub fn covering(&self, addr: IpAddr) -> Option<ProtectedRange> {
        let addr = addr.to_canonical();
        self.merged.lpm(addr)?;
        self.ranges
            .iter()
            .filter(|r| r.prefix.contains(&addr))
            .max_by_key(|r| r.prefix.prefix_len())
            .copied()
    }

    /// Whether every address of `prefix` is protected.
    pub fn contains(&self, prefix: IpNet) -> bool {
        // The aggregated ranges do not nest: at most one holds the network
        // address, and it holds the whole prefix when it is no longer.
        self.merged
            .lpm(prefix.network())
            .is_some_and(|(m, _)| m.prefix_len() <= prefix.prefix_len())
    }

    /// The ranges that share addresses with `prefix` (inside it or around it).
    pub fn overlapping(&self, prefix: IpNet) -> Vec<ProtectedRange> {
        self.ranges
            .iter()
            .filter(|r| r.prefix.contains(&prefix) || prefix.contains(&r.prefix))
            .copied()
            .collect()
    }

    /// The permit rules the kernel gets for the ranges: the aggregated
    /// prefixes.
    pub fn rule_prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.merged.iter().map(|(p, _)| p)
    }

    /// Whether `prefix` is exactly one of [`Protected::rule_prefixes`].
    pub fn is_rule(&self, prefix: IpNet) -> bool {
        self.merged.get(&prefix).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn configured(s: &str) -> ProtectedRange {
        ProtectedRange {
            prefix: net(s),
            kind: ProtectedKind::Configured,
        }
    }

    #[test]
    fn lookups_see_through_aggregation() {
        let p = Protected::new(
            Protected::loopback()
                .into_iter()
                .chain([configured("192.0.2.0/25"), configured("192.0.2.128/25")])
                .chain([configured("192.0.2.7/32")]),
        );
        assert_eq!(
            p.rule_prefixes().collect::<Vec<_>>(),
            [net("127.0.0.0/8"), net("192.0.2.0/24"), net("::1/128")]
        );
        assert!(p.contains(net("192.0.2.0/24")));
        assert!(p.contains(net("192.0.2.7/32")));
        assert!(!p.contains(net("192.0.0.0/16")));
        assert_eq!(
            p.covering("192.0.2.7".parse().unwrap()).unwrap().prefix,
            net("192.0.2.7/32")
        );
        assert_eq!(
            p.covering("::ffff:127.0.0.1".parse().unwrap())
                .unwrap()
                .kind,
            ProtectedKind::Loopback
        );
        assert!(p.covering("198.51.100.1".parse().unwrap()).is_none());
        assert_eq!(p.overlapping(net("192.0.0.0/16")).len(), 3);
        assert_eq!(p.overlapping(net("127.1.0.0/16")).len(), 1);
        assert!(p.is_rule(net("192.0.2.0/24")));
        assert!(!p.is_rule(net("192.0.2.0/25")));
    }
}
