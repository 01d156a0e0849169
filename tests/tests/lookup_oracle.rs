//! The compiled IPv4 lookup against two references: the frozen program's
//! kernel LPM trie (`trie-reference`) and userspace `Policy::decide`, over
//! lists of 1, 1k, 100k and 1M entries. Each list has nested permit/deny
//! down to /32, /25-/31 inside /24s, the same prefix on both lists and
//! (from 1k up) /0; each is probed at every prefix boundary +-1, inside
//! every prefix and at random, at least 100,000 addresses per list, in
//! both modes and all three enforcement settings. Then the same list in
//! the other generation, then live single-prefix changes of every length.
//! The short lists run with the per-/16 summary read first, the million
//! without it, so both lookup paths meet the references.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net};
use rand::{rngs::StdRng, Rng, SeedableRng};
use smtpguard::policy::{AccessList, Enforcement, ListKind, Policy, PolicyMode};
use smtpguard_tests::{oracle::Oracle, require_root};

/// Addresses probed per list in the first configuration; the other five
/// mode/enforcement pairs get every `SPARSE`th of them.
const PROBES: usize = 100_000;
const SPARSE: usize = 20;
/// Live single-prefix changes per list, after the whole-list checks.
const CHANGES: usize = 300;
/// Each list's check must finish within this (loading 1M prefixes into the
/// reference trie alone takes seconds).
const LIMIT: Duration = Duration::from_secs(300);

fn net(bits: u32, len: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(bits), len).unwrap().trunc()
}

/// `size` distinct prefixes: a fixed adversarial core, then random ones of
/// the shapes real lists have, a fifth of them nested in earlier ones.
fn prefixes(size: usize, rng: &mut StdRng) -> Vec<Ipv4Net> {
    let mut set = BTreeSet::new();
    if size == 1 {
        set.insert("198.18.5.128/25".parse().unwrap());
    } else {
        // A chain from /0 down to /32, and every /25-/31 inside one /24.
        let host = u32::from(Ipv4Addr::new(198, 18, 77, 201));
        for len in [
            0u8, 8, 12, 15, 16, 20, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32,
        ] {
            set.insert(net(host, len));
        }
        for len in 25..=31 {
            set.insert(net(u32::from(Ipv4Addr::new(198, 19, 3, 0)) | 0x55, len));
        }
    }
    let mut all: Vec<Ipv4Net> = set.iter().copied().collect();
    while set.len() < size {
        let p = if !all.is_empty() && rng.random_bool(0.2) {
            // Nested in an earlier prefix.
            let outer = all[rng.random_range(0..all.len())];
            if outer.prefix_len() == 32 {
                continue;
            }
            let len = rng.random_range(outer.prefix_len() + 1..=32);
            net(
                u32::from(outer.network()) | (rng.random::<u32>() & !u32::from(outer.netmask())),
                len,
            )
        } else {
            let len = match rng.random_range(0..100) {
                0..40 => 32,
                40..70 => 24,
                70..85 => rng.random_range(25..=31),
                _ => rng.random_range(8..=23),
            };
            net(rng.random(), len)
        };
        if set.insert(p) {
            all.push(p);
        }
    }
    all
}

/// Deny or permit or both, for each prefix.
fn policy(prefixes: &[Ipv4Net], rng: &mut StdRng) -> Policy {
    let mut deny = Vec::new();
    let mut permit = Vec::new();
    for p in prefixes {
        match rng.random_range(0..100) {
            0..55 => deny.push(IpNet::V4(*p)),
            55..95 => permit.push(IpNet::V4(*p)),
            _ => {
                deny.push(IpNet::V4(*p));
                permit.push(IpNet::V4(*p));
            }
        }
    }
    let mut d = AccessList::new(ListKind::Deny);
    d.add(deny, None, None).unwrap();
    let mut p = AccessList::new(ListKind::Permit);
    p.add(permit, None, None).unwrap();
    Policy::with_lists(PolicyMode::AcceptAllExceptDeny, Enforcement::Enforce, d, p).unwrap()
}

/// Boundaries +-1 and an address inside each prefix (as many prefixes as
/// the budget allows), the rest random.
fn probes(prefixes: &[Ipv4Net], rng: &mut StdRng) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(PROBES);
    let step = (prefixes.len() * 5).div_ceil(PROBES * 4 / 5).max(1);
    for p in prefixes.iter().step_by(step) {
        let first = u32::from(p.network());
        let last = u32::from(p.broadcast());
        let inside = first | (rng.random::<u32>() & !u32::from(p.netmask()));
        for a in [
            first.wrapping_sub(1),
            first,
            inside,
            last,
            last.wrapping_add(1),
        ] {
            out.push(IpAddr::V4(a.into()));
        }
    }
    while out.len() < PROBES {
        out.push(IpAddr::V4(rng.random::<u32>().into()));
    }
    out
}

/// `summary`: whether the program must read the IPv4 summary first for
/// this list (`None`: either), so that both lookup paths are checked.
fn check_list(size: usize, seed: u64, summary: Option<bool>) {
    require_root();
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let prefixes = prefixes(size, &mut rng);
    let probes = probes(&prefixes, &mut rng);
    assert!(probes.len() >= PROBES);
    let mut oracle = Oracle::new(policy(&prefixes, &mut rng));
    if let Some(summary) = summary {
        assert_eq!(
            oracle.reads_summary(),
            summary,
            "summary flag, list of {size}"
        );
    }
    let configs = [
        (PolicyMode::AcceptAllExceptDeny, Enforcement::Enforce),
        (PolicyMode::DenyAllExceptPermit, Enforcement::Enforce),
        (PolicyMode::AcceptAllExceptDeny, Enforcement::Monitor),
        (PolicyMode::DenyAllExceptPermit, Enforcement::Monitor),
        (PolicyMode::AcceptAllExceptDeny, Enforcement::Off),
        (PolicyMode::DenyAllExceptPermit, Enforcement::Off),
    ];
    let mut checked = 0;
    for (i, (mode, enforcement)) in configs.into_iter().enumerate() {
        oracle.configure(mode, enforcement);
        let every = if i == 0 { 1 } else { SPARSE };
        for addr in probes.iter().step_by(every) {
            oracle.check(*addr);
            checked += 1;
        }
        assert!(
            start.elapsed() < LIMIT,
            "list of {size}: took longer than {LIMIT:?}"
        );
    }
    assert!(checked >= PROBES, "{checked} checks");

    // The same list in the other generation.
    oracle.configure(PolicyMode::DenyAllExceptPermit, Enforcement::Enforce);
    oracle.reapply();
    for addr in probes.iter().step_by(SPARSE) {
        oracle.check(*addr);
    }
    // Live single-prefix changes (deny add, permit add, remove) of every
    // length, nested in listed prefixes and not, each checked at its
    // boundaries and around them before the next one.
    for round in 0..CHANGES {
        let outer = prefixes[rng.random_range(0..prefixes.len())];
        let len = rng.random_range(if round % 4 == 0 { 0..=24 } else { 20..=32 });
        let host = u32::from(outer.network()) | (rng.random::<u32>() & !u32::from(outer.netmask()));
        let p = net(host, len);
        let list = match rng.random_range(0..3) {
            0 => Some(ListKind::Deny),
            1 => Some(ListKind::Permit),
            _ => None,
        };
        // Removals mostly of listed prefixes.
        let (p, list) = if list.is_none() && round % 2 == 0 {
            (outer, None)
        } else {
            (p, list)
        };
        oracle.change(IpNet::V4(p), list);
        let first = u32::from(p.network());
        let last = u32::from(p.broadcast());
        for a in [
            first.wrapping_sub(1),
            first,
            first | 1,
            last ^ 1,
            last,
            last.wrapping_add(1),
        ] {
            oracle.check(IpAddr::V4(a.into()));
        }
        for _ in 0..20 {
            let near = first
                .wrapping_add(rng.random_range(0..512))
                .wrapping_sub(256);
            oracle.check(IpAddr::V4(near.into()));
        }
    }
    assert!(
        start.elapsed() < LIMIT,
        "list of {size}: took longer than {LIMIT:?}"
    );
}

#[test]
fn one_entry() {
    check_list(1, 1, Some(true));
}

#[test]
fn a_thousand_entries() {
    check_list(1_000, 1_000, Some(true));
}

#[test]
fn a_hundred_thousand_entries() {
    check_list(100_000, 100_000, None);
}

#[test]
fn a_million_entries() {
    check_list(1_000_000, 1_000_000, Some(false));
}
