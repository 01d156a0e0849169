//! A prefix map over both address families: one `prefix_trie::PrefixMap`
//! per family behind an `IpNet` interface, so the rest of the module does
//! not repeat every operation for IPv4 and IPv6.
//!
//! Keys are stored canonically (host bits zero): the trie reconstructs the
//! prefix from its position and drops host bits, so callers pass canonical
//! prefixes to get them back unchanged.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

/// A map from IPv4 and IPv6 prefixes to `T` with exact and longest-prefix
/// lookups.
#[derive(Clone)]
pub(crate) struct PrefixTable<T> {
    v4: PrefixMap<Ipv4Net, T>,
    v6: PrefixMap<Ipv6Net, T>,
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        Self {
            v4: PrefixMap::new(),
            v6: PrefixMap::new(),
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for PrefixTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<T> PrefixTable<T> {
    /// An empty table.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Number of IPv4 prefixes.
    pub(crate) fn len_v4(&self) -> usize {
        self.v4.len()
    }

    /// Number of IPv6 prefixes.
    pub(crate) fn len_v6(&self) -> usize {
        self.v6.len()
    }

    /// Inserts or overwrites; returns the previous value of that exact prefix.
    pub(crate) fn insert(&mut self, prefix: IpNet, value: T) -> Option<T> {
        match prefix {
            IpNet::V4(p) => self.v4.insert(p.trunc(), value),
            IpNet::V6(p) => self.v6.insert(p.trunc(), value),
        }
    }

    /// The value stored for exactly this prefix.
    pub(crate) fn get(&self, prefix: &IpNet) -> Option<&T> {
        match prefix {
            IpNet::V4(p) => self.v4.get(&p.trunc()),
            IpNet::V6(p) => self.v6.get(&p.trunc()),
        }
    }

    /// Mutable access to the value stored for exactly this prefix.
    pub(crate) fn get_mut(&mut self, prefix: &IpNet) -> Option<&mut T> {
        match prefix {
            IpNet::V4(p) => self.v4.get_mut(&p.trunc()),
            IpNet::V6(p) => self.v6.get_mut(&p.trunc()),
        }
    }

    /// Removes exactly this prefix (not the prefixes inside it).
    pub(crate) fn remove(&mut self, prefix: &IpNet) -> Option<T> {
        match prefix {
            IpNet::V4(p) => self.v4.remove(&p.trunc()),
            IpNet::V6(p) => self.v6.remove(&p.trunc()),
        }
    }

    /// Longest-prefix match for one address, in the address's own family
    /// (no IPv4-mapped normalisation here; callers do that).
    pub(crate) fn lpm(&self, addr: IpAddr) -> Option<(IpNet, &T)> {
        match addr {
            IpAddr::V4(a) => self
                .v4
                .get_lpm(&Ipv4Net::from(a))
                .map(|(p, v)| (IpNet::V4(p), v)),
            IpAddr::V6(a) => self
                .v6
                .get_lpm(&Ipv6Net::from(a))
                .map(|(p, v)| (IpNet::V6(p), v)),
        }
    }

    /// Every stored prefix that covers `prefix`, itself included if stored,
    /// shortest first.
    pub(crate) fn cover(&self, prefix: &IpNet) -> Vec<(IpNet, &T)> {
        match prefix {
            IpNet::V4(p) => self
                .v4
                .cover(&p.trunc())
                .map(|(p, v)| (IpNet::V4(p), v))
                .collect(),
            IpNet::V6(p) => self
                .v6
                .cover(&p.trunc())
                .map(|(p, v)| (IpNet::V6(p), v))
                .collect(),
        }
    }

    /// The first `limit` stored prefixes inside `prefix` (itself included
    /// if stored), in trie order, without visiting the rest of the table.
    pub(crate) fn inside(&self, prefix: &IpNet, limit: usize) -> Vec<(IpNet, &T)> {
        match prefix {
            IpNet::V4(p) => self
                .v4
                .children(&p.trunc())
                .take(limit)
                .map(|(p, v)| (IpNet::V4(p), v))
                .collect(),
            IpNet::V6(p) => self
                .v6
                .children(&p.trunc())
                .take(limit)
                .map(|(p, v)| (IpNet::V6(p), v))
                .collect(),
        }
    }

    /// The most specific stored prefix strictly broader than `prefix` that
    /// covers it.
    pub(crate) fn broader(&self, prefix: &IpNet) -> Option<(IpNet, &T)> {
        self.cover(prefix)
            .into_iter()
            .rev()
            .find(|(p, _)| p.prefix_len() < prefix.prefix_len())
    }

    /// All entries, IPv4 first, each family in trie order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> {
        self.v4
            .iter()
            .map(|(p, v)| (IpNet::V4(p), v))
            .chain(self.v6.iter().map(|(p, v)| (IpNet::V6(p), v)))
    }

    /// Keeps only the entries for which `keep` returns true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(IpNet, &T) -> bool) {
        self.v4.retain(|p, v| keep(IpNet::V4(*p), v));
        self.v6.retain(|p, v| keep(IpNet::V6(*p), v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn lpm_cover_and_broader_work_per_family() {
        let mut t = PrefixTable::new();
        t.insert(net("198.51.100.0/24"), 1);
        t.insert(net("198.51.100.0/25"), 2);
        t.insert(net("2001:db8::/32"), 3);
        assert_eq!(t.len_v4(), 2);
        assert_eq!(t.len_v6(), 1);
        assert_eq!(
            t.lpm("198.51.100.7".parse().unwrap()),
            Some((net("198.51.100.0/25"), &2))
        );
        assert_eq!(
            t.lpm("198.51.100.200".parse().unwrap()),
            Some((net("198.51.100.0/24"), &1))
        );
        assert_eq!(t.lpm("192.0.2.1".parse().unwrap()), None);
        assert_eq!(
            t.lpm("2001:db8::1".parse().unwrap()),
            Some((net("2001:db8::/32"), &3))
        );
        assert_eq!(
            t.broader(&net("198.51.100.0/25")),
            Some((net("198.51.100.0/24"), &1))
        );
        assert_eq!(t.broader(&net("198.51.100.0/24")), None);
        assert_eq!(t.cover(&net("198.51.100.1/32")).len(), 2);
        t.retain(|p, _| p.prefix_len() != 25);
        assert_eq!(t.get(&net("198.51.100.0/25")), None);
        assert_eq!(t.remove(&net("2001:db8::/32")), Some(3));
        assert_eq!(t.iter().count(), 1);
    }
}
