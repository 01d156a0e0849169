//! IPv6 lookup oracle: the production program (the compiled multibit trie
//! in array maps), the frozen `trie-reference` program (a kernel LPM trie
//! loaded with the same list) and the userspace `Policy` must give every
//! address the same verdict. Lists of 1, 1k (a chain of nested permit/deny
//! at every length from /0 to /128 on one path, random prefixes of every
//! length, most of them nesting under 2001:db8::/32, prefixes on both
//! lists) and full bogons (130k, with nested permits); addresses at every
//! prefix boundary (first, last, one before, one after), random ones inside
//! and outside, and IPv4-mapped ones; both modes for every address, all
//! three enforcement settings for a sample.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv6Net};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use smtpguard::{
    kernel::{ApplyHow, MapSync, Stats, XdpFilter},
    policy::{
        read_list_file, AccessList, Enforcement, ImportOptions, ListKind, Policy, PolicyMode,
        Verdict,
    },
};
use smtpguard_common::{counter, Action};
use smtpguard_tests::{packet, require_root, trie_reference::TrieReference};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const PORT: u16 = 25;
/// Addresses checked under monitor and off, per list (each costs counter reads).
const ENFORCEMENT_SAMPLE: usize = 300;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shared_data(file: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("SMTPGUARD_SHARED_DATA") {
        return PathBuf::from(dir).join(file);
    }
    ["../shared/data", "../../shared/data"]
        .iter()
        .map(|d| workspace().join(d).join(file))
        .find(|p| p.exists())
        .unwrap_or_else(|| workspace().join("../shared/data").join(file))
}

struct Production {
    filter: XdpFilter,
    sync: MapSync,
    stats: Stats,
}

fn policy_of(rules: &[(IpNet, Action)], mode: PolicyMode, enforcement: Enforcement) -> Policy {
    let mut deny = AccessList::new(ListKind::Deny);
    let mut permit = AccessList::new(ListKind::Permit);
    for (net, action) in rules {
        match action {
            Action::Deny => deny.add([*net], None, None).unwrap(),
            Action::Permit => permit.add([*net], None, None).unwrap(),
        };
    }
    Policy::with_lists(mode, enforcement, deny, permit).unwrap()
}

fn v6(addr: u128) -> Ipv6Addr {
    Ipv6Addr::from(addr)
}

/// Random prefixes under 2001:db8::/32 that nest (a small space), down to
/// /128, plus ::/0 and a chain of every length from /0 to /128 on one
/// address, permit and deny in turn; some prefixes on both lists.
fn nested_list(rng: &mut StdRng, n: usize) -> Vec<(IpNet, Action)> {
    let base = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0));
    let mut out = vec![("::/0".parse().unwrap(), Action::Permit)];
    let chain = base | (rng.random::<u128>() >> 32);
    for len in 1..=128u8 {
        let action = if len % 2 == 0 {
            Action::Permit
        } else {
            Action::Deny
        };
        let net = Ipv6Net::new(v6(chain), len).unwrap().trunc();
        out.push((IpNet::V6(net), action));
    }
    while out.len() < n {
        // Every length now and then; mostly the ones around the octet
        // boundaries the kernel's nodes split at.
        let len = if rng.random_bool(0.25) {
            rng.random_range(0..=128u8)
        } else {
            *[
                17u8, 23, 32, 33, 40, 47, 48, 56, 63, 64, 65, 96, 112, 120, 127, 128,
            ]
            .get(rng.random_range(0..16))
            .unwrap()
        };
        // Host bits drawn from few values so prefixes share their tops.
        let host = (rng.random::<u128>() & 0xf000_0000_0000_0000_0000_0000_000f_000f) >> 32;
        let net = Ipv6Net::new(v6(base | host), len).unwrap().trunc();
        let action = if rng.random_bool(0.5) {
            Action::Deny
        } else {
            Action::Permit
        };
        out.push((IpNet::V6(net), action));
        if rng.random_bool(0.05) {
            // The same prefix on the other list too: deny wins.
            out.push((IpNet::V6(net), Action::Deny));
        }
    }
    out
}

/// Full bogons as deny entries, with permits nested inside some of them.
fn bogons_list(rng: &mut StdRng) -> Vec<(IpNet, Action)> {
    let report = read_list_file(
        &shared_data("fullbogons-ipv6.txt"),
        &ImportOptions::new(ListKind::Deny),
    )
    .expect("read fullbogons-ipv6.txt");
    let mut seen = HashSet::new();
    let denied: Vec<Ipv6Net> = report
        .entries
        .iter()
        .filter_map(|e| match e.prefix {
            IpNet::V6(n) if seen.insert(n) => Some(n),
            _ => None,
        })
        .collect();
    assert!(denied.len() > 100_000, "full bogons: {}", denied.len());
    let mut out: Vec<(IpNet, Action)> = denied
        .iter()
        .map(|n| (IpNet::V6(*n), Action::Deny))
        .collect();
    for _ in 0..1_000 {
        let outer = denied[rng.random_range(0..denied.len())];
        if outer.prefix_len() >= 120 {
            continue;
        }
        let len = rng.random_range(outer.prefix_len() + 1..=128);
        let host = rng.random::<u128>() & !u128::from(outer.netmask());
        let inner = Ipv6Net::new(v6(u128::from(outer.network()) | host), len)
            .unwrap()
            .trunc();
        out.push((IpNet::V6(inner), Action::Permit));
    }
    out
}

/// `want` addresses: the boundaries of every prefix (as many as 90% of
/// the budget holds), random ones inside and anywhere, IPv4-mapped ones.
fn addresses(rng: &mut StdRng, rules: &[(IpNet, Action)], want: usize) -> Vec<IpAddr> {
    let mut nets: Vec<Ipv6Net> = rules
        .iter()
        .filter_map(|(n, _)| match n {
            IpNet::V6(n) => Some(*n),
            IpNet::V4(_) => None,
        })
        .collect();
    // Where the budget does not cover every prefix, a random spread of them.
    nets.shuffle(rng);
    let mut out = Vec::with_capacity(want);
    let mut i = 0;
    while out.len() < want.saturating_sub(want / 10) && i < nets.len() {
        let n = nets[i];
        let first = u128::from(n.network());
        let last = u128::from(n.broadcast());
        for a in [first, last, first.wrapping_sub(1), last.wrapping_add(1)] {
            out.push(IpAddr::V6(v6(a)));
        }
        let host = rng.random::<u128>() & !u128::from(n.netmask());
        out.push(IpAddr::V6(v6(first | host)));
        i += 1;
    }
    while out.len() < want {
        let addr = match rng.random_range(0..10) {
            // IPv4-mapped: the IPv4 path, whose lists are empty here.
            0 => IpAddr::V6(std::net::Ipv4Addr::from(rng.random::<u32>()).to_ipv6_mapped()),
            1..=4 if !nets.is_empty() => {
                let n = nets[rng.random_range(0..nets.len())];
                let host = rng.random::<u128>() & !u128::from(n.netmask());
                IpAddr::V6(v6(u128::from(n.network()) | host))
            }
            _ => IpAddr::V6(v6(rng.random())),
        };
        out.push(addr);
    }
    out
}

fn frame(addr: IpAddr) -> Vec<u8> {
    packet::syn_v6(&addr.to_string(), PORT)
}

/// Checks one list: returns how many addresses were judged.
fn check_list(name: &str, rules: &[(IpNet, Action)], addrs: &[IpAddr]) -> usize {
    let (filter, mut sync, stats) = XdpFilter::load().expect("load the embedded XDP program");
    let merged = policy_of(rules, PolicyMode::AcceptAllExceptDeny, Enforcement::Enforce)
        .compile()
        .unwrap();
    let merged: Vec<(IpNet, Action)> = merged.into_iter().map(|r| (r.prefix, r.action)).collect();
    sync.apply(&merged, ApplyHow::Atomic).unwrap();
    let mut prod = Production {
        filter,
        sync,
        stats,
    };
    let mut reference = TrieReference::load(&merged);
    let mut failures = Vec::new();
    for mode in [
        PolicyMode::AcceptAllExceptDeny,
        PolicyMode::DenyAllExceptPermit,
    ] {
        let policy = policy_of(rules, mode, Enforcement::Enforce);
        prod.sync
            .set_runtime(mode.into(), Enforcement::Enforce.into(), &[PORT], 0)
            .unwrap();
        reference.set_runtime(mode.into(), Enforcement::Enforce.into(), PORT, 0);
        for addr in addrs {
            let f = frame(*addr);
            let want = if policy.decide(*addr).verdict() == Verdict::Deny {
                XDP_DROP
            } else {
                XDP_PASS
            };
            let got = prod.filter.test_run(&f).unwrap();
            let old = reference.run(&f, 1).unwrap().0;
            if got != want || old != want {
                failures.push(format!(
                    "{name}, {mode}: {addr}: policy {want}, program {got}, trie-reference {old}\n{}",
                    policy.explain(*addr)
                ));
            }
        }
        // Monitor and off on a sample: nothing dropped; monitor counts the
        // would-drops the policy predicts, off counts none.
        for enforcement in [Enforcement::Monitor, Enforcement::Off] {
            let policy = policy_of(rules, mode, enforcement);
            prod.sync
                .set_runtime(mode.into(), enforcement.into(), &[PORT], 0)
                .unwrap();
            reference.set_runtime(mode.into(), enforcement.into(), PORT, 0);
            for addr in addrs.iter().step_by(addrs.len() / ENFORCEMENT_SAMPLE + 1) {
                let f = frame(*addr);
                let denied = policy.decide(*addr).verdict() == Verdict::Deny;
                let want_would = u64::from(denied && enforcement == Enforcement::Monitor);
                let before = prod.stats.counters();
                let old_before = reference.counter(counter::WOULD_DROP);
                let got = prod.filter.test_run(&f).unwrap();
                let old = reference.run(&f, 1).unwrap().0;
                let would = prod
                    .stats
                    .counters()
                    .since(&before)
                    .get(counter::WOULD_DROP);
                let old_would = reference.counter(counter::WOULD_DROP) - old_before;
                if (got, old, would, old_would) != (XDP_PASS, XDP_PASS, want_would, want_would) {
                    failures.push(format!(
                        "{name}, {mode}, {enforcement}: {addr}: program {got} would_drop +{would}, \
                         trie-reference {old} would_drop +{old_would}, policy would_drop +{want_would}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreements, first 20:\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    addrs.len()
}

#[test]
fn production_trie_reference_and_policy_agree_on_ipv6() {
    require_root();
    let mut rng = StdRng::seed_from_u64(20261202);
    let mut checked = 0;

    let one = vec![("2001:db8:bad::/48".parse().unwrap(), Action::Deny)];
    let addrs = addresses(&mut rng, &one, 2_000);
    checked += check_list("1 prefix", &one, &addrs);

    let nested = nested_list(&mut rng, 1_000);
    let addrs = addresses(&mut rng, &nested, 20_000);
    checked += check_list("1k nested", &nested, &addrs);

    let bogons = bogons_list(&mut rng);
    let v6: Vec<(Ipv6Net, smtpguard_common::Rule)> = bogons
        .iter()
        .filter_map(|(n, a)| match n {
            IpNet::V6(n) => Some((
                *n,
                smtpguard_common::Rule {
                    action: *a as u32,
                    rule_id: 1,
                },
            )),
            IpNet::V4(_) => None,
        })
        .collect();
    let compiled = smtpguard::kernel::ipv6_table::compile(&v6);
    eprintln!(
        "full bogons: {} IPv6 nodes, {} leaves",
        compiled.groups.len(),
        compiled.leaves.len()
    );
    let addrs = addresses(&mut rng, &bogons, 80_000);
    checked += check_list("full bogons", &bogons, &addrs);

    assert!(checked >= 100_000, "{checked} addresses checked");
}
