//! The userspace verdict (`Policy::decide`, used by the SMTP front door and
//! `smtpguard check`) and the XDP program's verdict agree for every
//! address: random nested lists in both families on both lists, both modes,
//! random addresses, each judged both ways.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::{rngs::StdRng, Rng, SeedableRng};
use smtpguard::{
    kernel::{ApplyHow, XdpFilter},
    policy::{AccessList, Enforcement, ListKind, Policy, PolicyMode, Verdict},
};
use smtpguard_tests::{packet, require_root};

const XDP_DROP: u32 = 1;

/// A prefix inside a small space (so entries nest and overlap): IPv4 under
/// 198.18.0.0/15, IPv6 under 2001:db8::/32.
fn random_prefix(rng: &mut StdRng) -> IpNet {
    if rng.random_bool(0.6) {
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) | (rng.random::<u32>() & 0x1_ffff);
        let len = rng.random_range(15..=32);
        IpNet::V4(Ipv4Net::new(base.into(), len).unwrap().trunc())
    } else {
        let base = (u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)))
            | (rng.random::<u128>() & ((1u128 << 96) - 1));
        // Mostly short-ish prefixes, some long ones, some hosts.
        let len = *[32u8, 40, 48, 56, 64, 96, 112, 120, 128]
            .get(rng.random_range(0..9))
            .unwrap();
        IpNet::V6(Ipv6Net::new(base.into(), len).unwrap().trunc())
    }
}

/// An address that often falls inside `near` (random host bits), sometimes anywhere.
fn random_address(rng: &mut StdRng, near: &[IpNet]) -> IpAddr {
    if !near.is_empty() && rng.random_bool(0.8) {
        let net = near[rng.random_range(0..near.len())];
        match net {
            IpNet::V4(n) => {
                let host = rng.random::<u32>() & !u32::from(n.netmask());
                IpAddr::V4((u32::from(n.network()) | host).into())
            }
            IpNet::V6(n) => {
                let host = rng.random::<u128>() & !u128::from(n.netmask());
                IpAddr::V6((u128::from(n.network()) | host).into())
            }
        }
    } else if rng.random_bool(0.5) {
        IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
    } else {
        IpAddr::V6(Ipv6Addr::from(
            u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0))
                | (rng.random::<u128>() >> 32),
        ))
    }
}

fn frame_from(addr: IpAddr, rng: &mut StdRng) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) if rng.random_bool(0.1) => {
            // The same client on a dual-stack socket: ::ffff:a.b.c.d.
            packet::syn_v6(&a.to_ipv6_mapped().to_string(), 25)
        }
        IpAddr::V4(a) => packet::syn_v4(&a.to_string(), 25),
        IpAddr::V6(a) => packet::syn_v6(&a.to_string(), 25),
    }
}

#[test]
fn userspace_and_kernel_verdicts_agree() {
    require_root();
    let mut rng = StdRng::seed_from_u64(20261129);
    let (mut filter, mut sync, _stats) = XdpFilter::load().expect("load XDP program");
    let mut checked = 0;
    for round in 0..8 {
        let mut deny = AccessList::new(ListKind::Deny);
        let mut permit = AccessList::new(ListKind::Permit);
        let mut all = Vec::new();
        for _ in 0..rng.random_range(20..200) {
            let p = random_prefix(&mut rng);
            all.push(p);
            // Some prefixes land on both lists: deny must win in both verdicts.
            if rng.random_bool(0.55) {
                deny.add([p], None, None).unwrap();
            }
            if rng.random_bool(0.5) {
                permit.add([p], None, None).unwrap();
            }
        }
        let mode = if round % 2 == 0 {
            PolicyMode::AcceptAllExceptDeny
        } else {
            PolicyMode::DenyAllExceptPermit
        };
        let policy = Policy::with_lists(mode, Enforcement::Enforce, deny, permit).unwrap();
        let rules: Vec<(IpNet, smtpguard_common::Action)> = policy
            .compile()
            .unwrap()
            .into_iter()
            .map(|r| (r.prefix, r.action))
            .collect();
        sync.apply(&rules, ApplyHow::Atomic).unwrap();
        sync.set_runtime(mode.into(), Enforcement::Enforce.into(), &[25], 0)
            .unwrap();
        for _ in 0..1_500 {
            let addr = random_address(&mut rng, &all);
            let userspace_refuses = policy.decide(addr).verdict() == Verdict::Deny;
            let kernel_drops = filter.test_run(&frame_from(addr, &mut rng)).unwrap() == XDP_DROP;
            assert_eq!(
                userspace_refuses,
                kernel_drops,
                "round {round}, mode {mode}: {addr}: userspace {} / kernel {}\n{}",
                if userspace_refuses {
                    "refuses"
                } else {
                    "accepts"
                },
                if kernel_drops { "drops" } else { "passes" },
                policy.explain(addr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 10_000, "{checked} addresses checked");
}
