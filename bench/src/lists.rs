//! The lists every section uses, built once per size so that smtpguard and
//! its baselines filter exactly the same prefixes: a generated IPv4 mix and
//! the real Team Cymru IPv6 full-bogons list, plus the addresses the bench's
//! packets come from.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use ipnet::{IpNet, Ipv4Net};
use rand::{rngs::StdRng, Rng, SeedableRng};
use smtpguard::policy::{read_list_file, ImportOptions, ListKind};
use smtpguard_common::Action;

/// A denied IPv4 source: inside `203.0.113.0/24`, which every IPv4 list holds.
pub const DENIED_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
/// An IPv4 source on no list.
pub const PERMITTED_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 5);
/// The prefix that makes [`DENIED_V4`] denied.
pub const DENIED_V4_NET: &str = "203.0.113.0/24";

/// A deny list and the addresses the bench sends from.
pub struct List {
    /// How the rows name it, e.g. `100,000 IPv4 prefixes`.
    pub label: String,
    /// The prefixes, all denied.
    pub prefixes: Vec<IpNet>,
    /// A source the list denies.
    pub denied: IpAddr,
    /// A source the list does not cover.
    pub permitted: IpAddr,
}

impl List {
    /// The rules for `MapSync::apply`.
    pub fn rules(&self) -> Vec<(IpNet, Action)> {
        self.prefixes.iter().map(|n| (*n, Action::Deny)).collect()
    }

    /// Whether the list holds IPv6 prefixes (else IPv4).
    pub fn is_v6(&self) -> bool {
        self.denied.is_ipv6()
    }

    /// One exact address per prefix (its network address), plus the denied
    /// source: what a filter of exact addresses (xdp-filter) is given for
    /// "the same list". It covers the sources the bench sends from, not the
    /// rest of each prefix.
    pub fn exact_addresses(&self) -> Vec<IpAddr> {
        let mut seen = HashSet::new();
        std::iter::once(self.denied)
            .chain(self.prefixes.iter().map(IpNet::network))
            .filter(|a| seen.insert(*a))
            .collect()
    }

    /// Whether some prefix of the list covers `addr`.
    pub fn covers(&self, addr: IpAddr) -> bool {
        self.prefixes.iter().any(|n| n.contains(&addr))
    }
}

/// `n` IPv4 prefixes, seeded: `203.0.113.0/24` (the bench's denied
/// source), then a realistic mix of 70% /32, 25% /24 and 5% /12–/22, clear
/// of the documentation ranges the bench's permitted sources come from.
pub fn generated_v4(n: usize) -> List {
    let mut rng = StdRng::seed_from_u64(0x5347);
    let mut prefixes: Vec<IpNet> = vec![DENIED_V4_NET.parse().unwrap()];
    let mut seen: HashSet<IpNet> = prefixes.iter().copied().collect();
    while prefixes.len() < n {
        let addr: u32 = rng.random();
        let first = (addr >> 24) as u8;
        // Keep clear of 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, and of
        // multicast/reserved space (the flood must look like unicast).
        if matches!(first, 0 | 10 | 127 | 192 | 198 | 203) || first >= 224 {
            continue;
        }
        let len = match rng.random_range(0..100u32) {
            0..70 => 32,
            70..95 => 24,
            _ => rng.random_range(12..=22),
        };
        let net = IpNet::V4(Ipv4Net::new(addr.into(), len).unwrap().trunc());
        if seen.insert(net) {
            prefixes.push(net);
        }
    }
    List {
        label: format!("{} IPv4 prefixes", super::report::thousands(n)),
        prefixes,
        denied: DENIED_V4.into(),
        permitted: PERMITTED_V4.into(),
    }
}

/// Where the shared data file `file` is: under `SMTPGUARD_SHARED_DATA`,
/// else in `shared/data` beside the workspace or beside its parent (a git
/// worktree under `wt/`).
pub fn shared_data(file: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("SMTPGUARD_SHARED_DATA") {
        return PathBuf::from(dir).join(file);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ["../shared/data", "../../shared/data"]
        .iter()
        .map(|d| workspace.join(d).join(file))
        .find(|p| p.exists())
        .unwrap_or_else(|| workspace.join("../shared/data").join(file))
}

/// Allocated (non-bogon) IPv6 sources, the first one the bogons list does
/// not cover is the permitted source (it covers the documentation range).
const PERMITTED_V6: [&str; 3] = ["2a00:1450:4001:800::5", "2001:4860:4860::5", "2606:4700::5"];

/// The IPv6 full-bogons list, read with smtpguard's own list parser. The
/// denied source lies inside its first prefix longer than /16; the
/// permitted source is an allocated address it does not cover.
pub fn fullbogons_v6() -> Result<List> {
    let path = shared_data("fullbogons-ipv6.txt");
    let report = read_list_file(&path, &ImportOptions::new(ListKind::Deny))
        .with_context(|| format!("reading {}", path.display()))?;
    let mut seen = HashSet::new();
    let prefixes: Vec<IpNet> = report
        .entries
        .iter()
        .map(|e| e.prefix)
        .filter(|p| p.addr().is_ipv6() && seen.insert(*p))
        .collect();
    let inside = prefixes
        .iter()
        .find(|p| p.prefix_len() > 16)
        .context("no IPv6 prefix in the bogons list")?;
    let IpAddr::V6(net) = inside.network() else {
        unreachable!("filtered to IPv6")
    };
    let denied = IpAddr::V6(Ipv6Addr::from(u128::from(net) | 9));
    let mut list = List {
        label: format!(
            "{} IPv6 prefixes (fullbogons)",
            super::report::thousands(prefixes.len())
        ),
        prefixes,
        denied,
        permitted: denied,
    };
    list.permitted = PERMITTED_V6
        .iter()
        .map(|a| a.parse::<IpAddr>().unwrap())
        .find(|a| !list.covers(*a))
        .context("the bogons list covers every permitted test source")?;
    Ok(list)
}

/// `count` distinct IPv4 sources for the batch: every other one is the
/// network address of a prefix of `list` (denied, and an exact address
/// xdp-filter holds), the rest random unicast addresses no prefix covers.
pub fn distinct_sources_v4(list: &List, count: usize) -> Vec<Ipv4Addr> {
    let mut rng = StdRng::seed_from_u64(0xba7c);
    let lengths: HashSet<u8> = list.prefixes.iter().map(|p| p.prefix_len()).collect();
    let listed: HashSet<IpNet> = list.prefixes.iter().copied().collect();
    let covered = |a: Ipv4Addr| {
        lengths
            .iter()
            .any(|len| listed.contains(&IpNet::V4(Ipv4Net::new(a, *len).unwrap().trunc())))
    };
    let mut out = Vec::with_capacity(count);
    let mut seen = HashSet::new();
    while out.len() < count {
        let addr = if out.len() % 2 == 0 {
            match list.prefixes[rng.random_range(0..list.prefixes.len())].network() {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => continue,
            }
        } else {
            let a = Ipv4Addr::from(rng.random::<u32>());
            let first = a.octets()[0];
            if first == 0 || first == 127 || first >= 224 || covered(a) {
                continue;
            }
            a
        };
        // With a short list the denied half repeats; keep it anyway (the
        // batch is then half one address), but not the random half.
        if out.len() % 2 == 0 || seen.insert(addr) {
            out.push(addr);
        }
    }
    out
}

/// The list as an nftables interval set named `name` for `family`
/// (`ipv4_addr` / `ipv6_addr`): `set NAME { ... elements = { ... } }`.
pub fn nft_set(list: &List, name: &str) -> String {
    let kind = if list.is_v6() {
        "ipv6_addr"
    } else {
        "ipv4_addr"
    };
    let mut out = format!("set {name} {{ type {kind}; flags interval; auto-merge; elements = {{ ");
    let mut first = true;
    for p in &list.prefixes {
        if !first {
            out.push_str(",\n");
        }
        first = false;
        out.push_str(&p.to_string());
    }
    out.push_str(" } }");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_lists_hold_the_denied_source_and_not_the_permitted() {
        let list = generated_v4(1000);
        assert_eq!(list.prefixes.len(), 1000);
        assert!(list.covers(list.denied));
        assert!(!list.covers(list.permitted));
        let one = generated_v4(1);
        assert_eq!(one.prefixes, vec![DENIED_V4_NET.parse::<IpNet>().unwrap()]);
        let sources = distinct_sources_v4(&list, 100);
        assert!(sources.iter().step_by(2).all(|a| list.covers((*a).into())));
        assert!(sources
            .iter()
            .skip(1)
            .step_by(2)
            .all(|a| !list.covers((*a).into())));
    }
}
