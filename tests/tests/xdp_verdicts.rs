//! The XDP program on crafted frames through BPF_PROG_TEST_RUN: every case
//! has an expected verdict and the exact counter deltas it must cause.

use std::collections::BTreeMap;

use ipnet::IpNet;
use smtpguard::kernel::{ApplyHow, MapSync, Stats, XdpFilter};
use smtpguard_common::{counter, Action, Enforcement, Mode, COUNTER_NAMES};
use smtpguard_tests::{
    packet::{self, ethertype, flags, Ext, V4Opts, DST_V4, DST_V6},
    require_root,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const PORTS: [u16; 3] = [25, 465, 587];

/// Deny/permit pairs with exceptions both ways, in both families.
const BASE_RULES: &[(&str, Action)] = &[
    ("203.0.113.0/24", Action::Deny),
    ("203.0.113.77/32", Action::Permit),
    ("198.51.100.0/24", Action::Permit),
    ("198.51.100.66/32", Action::Deny),
    ("2001:db8:bad::/48", Action::Deny),
    ("2001:db8:bad::77/128", Action::Permit),
    ("2001:db8:1::/64", Action::Permit),
];

/// Whole-family entries and host entries.
const EDGE_RULES: &[(&str, Action)] = &[
    ("0.0.0.0/0", Action::Deny),
    ("192.0.2.10/32", Action::Permit),
    ("::/0", Action::Deny),
    ("2001:db8:2::10/128", Action::Permit),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

struct Case {
    name: &'static str,
    rules: &'static [(&'static str, Action)],
    mode: Mode,
    enforcement: Enforcement,
    frame: Vec<u8>,
    /// The verdict counter that must go up by one: a drop reason or a pass reason.
    outcome: u32,
    /// Set when the frame is a SYN to a guarded port (SYN counters go up).
    syn: Option<Family>,
}

fn case(name: &'static str, frame: Vec<u8>, outcome: u32, syn: Option<Family>) -> Case {
    Case {
        name,
        rules: BASE_RULES,
        mode: Mode::AcceptAllExceptDeny,
        enforcement: Enforcement::Enforce,
        frame,
        outcome,
        syn,
    }
}

impl Case {
    fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
    fn enforcement(mut self, e: Enforcement) -> Self {
        self.enforcement = e;
        self
    }
    fn rules(mut self, rules: &'static [(&'static str, Action)]) -> Self {
        self.rules = rules;
        self
    }
    fn is_drop(&self) -> bool {
        self.outcome == counter::DROP_DENY_LIST || self.outcome == counter::DROP_NOT_PERMITTED
    }
}

fn v4(src: &str, payload: Vec<u8>, proto: u8, opts: V4Opts) -> Vec<u8> {
    let ip = packet::ipv4(src.parse().unwrap(), DST_V4, proto, &payload, &opts);
    packet::ethernet(ethertype::IPV4, &[], &ip)
}

fn v6(src: &str, exts: &[Ext], proto: u8, payload: Vec<u8>) -> Vec<u8> {
    let ip = packet::ipv6(src.parse().unwrap(), DST_V6, exts, proto, &payload);
    packet::ethernet(ethertype::IPV6, &[], &ip)
}

fn tcp_v4(src: &str, dport: u16, flag_bits: u8) -> Vec<u8> {
    v4(
        src,
        packet::tcp(40000, dport, flag_bits, &[]),
        6,
        V4Opts::default(),
    )
}

fn cases() -> Vec<Case> {
    use counter::*;
    use Family::*;
    let denied4 = "203.0.113.9";
    let denied6 = "2001:db8:bad::1";
    let deny_all = Mode::DenyAllExceptPermit;
    let syn = packet::syn(25);
    let chain7 = [
        Ext::HopByHop,
        Ext::DestOpts,
        Ext::Routing,
        Ext::Auth,
        Ext::DestOpts,
        Ext::Routing,
        Ext::DestOpts,
    ];
    let chain9 = [
        Ext::HopByHop,
        Ext::DestOpts,
        Ext::Routing,
        Ext::Auth,
        Ext::DestOpts,
        Ext::Routing,
        Ext::DestOpts,
        Ext::Routing,
        Ext::DestOpts,
    ];
    // ICMPv6 neighbour solicitation (type 135), the heart of NDP.
    let ndp = {
        let mut body = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
        body.extend(DST_V6.octets());
        v6("fe80::1", &[], 58, body)
    };
    let truncated = |frame: Vec<u8>, len: usize| frame[..len].to_vec();
    // A first fragment carrying only the ports: the flags are in the next fragment.
    let tiny_first_fragment = v4(
        denied4,
        packet::syn(25)[..8].to_vec(),
        6,
        V4Opts {
            more_fragments: true,
            ..Default::default()
        },
    );
    // The same 8 bytes without MF: a truncated segment, padded by Ethernet
    // to 60 bytes with bytes that would read as SYN flags.
    let mut padded_runt = v4(denied4, packet::syn(25)[..8].to_vec(), 6, V4Opts::default());
    padded_runt.resize(60, flags::SYN);

    vec![
        // Policy, IPv4.
        case(
            "v4 SYN from denied /24",
            packet::syn_v4(denied4, 25),
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "v4 SYN from permitted /32 inside denied /24",
            packet::syn_v4("203.0.113.77", 25),
            PASS_PERMITTED,
            Some(V4),
        ),
        case(
            "v4 SYN unlisted, accept-all",
            packet::syn_v4("192.0.2.200", 25),
            PASS_PERMITTED,
            Some(V4),
        ),
        case(
            "v4 SYN unlisted, deny-all",
            packet::syn_v4("192.0.2.200", 25),
            DROP_NOT_PERMITTED,
            Some(V4),
        )
        .mode(deny_all),
        case(
            "v4 SYN permitted, deny-all",
            packet::syn_v4("198.51.100.5", 25),
            PASS_PERMITTED,
            Some(V4),
        )
        .mode(deny_all),
        case(
            "v4 denied /32 inside permitted /24, deny-all",
            packet::syn_v4("198.51.100.66", 25),
            DROP_DENY_LIST,
            Some(V4),
        )
        .mode(deny_all),
        case(
            "v4 denied /32 inside permitted /24, accept-all",
            packet::syn_v4("198.51.100.66", 25),
            DROP_DENY_LIST,
            Some(V4),
        ),
        // Policy, IPv6.
        case(
            "v6 SYN from denied /48",
            packet::syn_v6(denied6, 25),
            DROP_DENY_LIST,
            Some(V6),
        ),
        case(
            "v6 SYN from permitted /128 inside denied /48",
            packet::syn_v6("2001:db8:bad::77", 25),
            PASS_PERMITTED,
            Some(V6),
        ),
        case(
            "v6 SYN unlisted, accept-all",
            packet::syn_v6("2001:db8:5::1", 25),
            PASS_PERMITTED,
            Some(V6),
        ),
        case(
            "v6 SYN unlisted, deny-all",
            packet::syn_v6("2001:db8:5::1", 25),
            DROP_NOT_PERMITTED,
            Some(V6),
        )
        .mode(deny_all),
        case(
            "v6 SYN permitted /64, deny-all",
            packet::syn_v6("2001:db8:1::10", 25),
            PASS_PERMITTED,
            Some(V6),
        )
        .mode(deny_all),
        case(
            "v4-mapped v6 source judged by the IPv4 list",
            packet::syn_v6("::ffff:203.0.113.9", 25),
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "v4-mapped v6 source permitted exception",
            packet::syn_v6("::ffff:203.0.113.77", 25),
            PASS_PERMITTED,
            Some(V4),
        ),
        // Enforcement.
        case(
            "monitor: denied SYN passes, counted",
            packet::syn_v4(denied4, 25),
            WOULD_DROP,
            Some(V4),
        )
        .enforcement(Enforcement::Monitor),
        case(
            "monitor deny-all: unlisted passes",
            packet::syn_v6("2001:db8:5::1", 25),
            WOULD_DROP,
            Some(V6),
        )
        .mode(deny_all)
        .enforcement(Enforcement::Monitor),
        case(
            "off: denied SYN passes",
            packet::syn_v4(denied4, 25),
            PASS_FILTER_OFF,
            Some(V4),
        )
        .enforcement(Enforcement::Off),
        // TCP flags.
        case(
            "SYN-ACK from denied",
            tcp_v4(denied4, 25, flags::SYN | flags::ACK),
            PASS_NOT_SYN,
            None,
        ),
        case(
            "ACK from denied",
            tcp_v4(denied4, 25, flags::ACK),
            PASS_NOT_SYN,
            None,
        ),
        case(
            "RST from denied",
            tcp_v4(denied4, 25, flags::RST),
            PASS_NOT_SYN,
            None,
        ),
        case(
            "FIN from denied",
            tcp_v4(denied4, 25, flags::FIN | flags::ACK),
            PASS_NOT_SYN,
            None,
        ),
        case(
            "SYN+FIN from denied",
            tcp_v4(denied4, 25, flags::SYN | flags::FIN),
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "SYN+RST from denied",
            tcp_v4(denied4, 25, flags::SYN | flags::RST),
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "ECN SYN (0xC2) from denied",
            tcp_v4(denied4, 25, 0xC2),
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "TFO SYN with data from denied",
            v4(
                denied4,
                packet::tcp(40000, 25, flags::SYN, b"EHLO x\r\n"),
                6,
                V4Opts::default(),
            ),
            DROP_DENY_LIST,
            Some(V4),
        ),
        // Ports and protocols.
        case(
            "SYN to port 465 from denied",
            packet::syn_v4(denied4, 465),
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "SYN to port 587 from denied",
            packet::syn_v6(denied6, 587),
            DROP_DENY_LIST,
            Some(V6),
        ),
        case(
            "SYN to port 22 from denied, deny-all",
            packet::syn_v4(denied4, 22),
            PASS_OTHER_PORT,
            None,
        )
        .mode(deny_all),
        case(
            "UDP to port 25 from denied",
            v4(
                denied4,
                vec![0x9c, 0x40, 0, 25, 0, 8, 0, 0],
                17,
                V4Opts::default(),
            ),
            PASS_NOT_TCP,
            None,
        ),
        case("ARP, deny-all", packet::arp_request(), PASS_NOT_IP, None).mode(deny_all),
        case(
            "NDP neighbour solicitation, deny-all",
            ndp,
            PASS_NOT_TCP,
            None,
        )
        .mode(deny_all),
        case(
            "ICMP echo, deny-all",
            v4(denied4, vec![8, 0, 0, 0, 0, 1, 0, 1], 1, V4Opts::default()),
            PASS_NOT_TCP,
            None,
        )
        .mode(deny_all),
        // VLAN.
        case(
            "one 802.1Q tag",
            packet::ethernet(
                ethertype::IPV4,
                &[ethertype::VLAN],
                &packet::syn_v4(denied4, 25)[14..],
            ),
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "802.1ad + 802.1Q tags",
            packet::ethernet(
                ethertype::IPV6,
                &[ethertype::QINQ, ethertype::VLAN],
                &packet::syn_v6(denied6, 25)[14..],
            ),
            DROP_DENY_LIST,
            Some(V6),
        ),
        case(
            "three tags",
            packet::ethernet(
                ethertype::IPV4,
                &[ethertype::QINQ, ethertype::VLAN, ethertype::VLAN],
                &packet::syn_v4(denied4, 25)[14..],
            ),
            PASS_VLAN_DEPTH,
            None,
        ),
        // IPv4 header lengths.
        case(
            "IPv4 IHL 6",
            v4(
                denied4,
                syn.clone(),
                6,
                V4Opts {
                    option_words: 1,
                    ..Default::default()
                },
            ),
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "IPv4 IHL 15",
            v4(
                denied4,
                syn.clone(),
                6,
                V4Opts {
                    option_words: 10,
                    ..Default::default()
                },
            ),
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "IPv4 IHL 4",
            {
                let mut f = packet::syn_v4(denied4, 25);
                f[14] = 0x44;
                f
            },
            PASS_MALFORMED,
            None,
        ),
        // IPv6 extension headers.
        case(
            "IPv6 HBH + DestOpts + Routing",
            v6(
                denied6,
                &[Ext::HopByHop, Ext::DestOpts, Ext::Routing],
                6,
                syn.clone(),
            ),
            DROP_DENY_LIST,
            Some(V6),
        ),
        case(
            "IPv6 with AH",
            v6(denied6, &[Ext::Auth], 6, syn.clone()),
            DROP_DENY_LIST,
            Some(V6),
        ),
        case(
            "IPv6 7-header chain",
            v6(denied6, &chain7, 6, syn.clone()),
            DROP_DENY_LIST,
            Some(V6),
        ),
        case(
            "IPv6 9-header chain",
            v6(denied6, &chain9, 6, syn.clone()),
            PASS_IPV6_CHAIN,
            None,
        ),
        case(
            "IPv6 unknown next header 253",
            v6(denied6, &[Ext::DestOpts], 253, syn.clone()),
            PASS_NOT_TCP,
            None,
        ),
        case(
            "IPv6 ESP",
            v6(denied6, &[], 50, vec![0; 32]),
            PASS_ESP,
            None,
        ),
        // Fragments.
        case(
            "IPv4 first fragment with full TCP header",
            v4(
                denied4,
                syn.clone(),
                6,
                V4Opts {
                    more_fragments: true,
                    ..Default::default()
                },
            ),
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "IPv4 tiny first fragment (RFC 1858)",
            tiny_first_fragment,
            DROP_DENY_LIST,
            Some(V4),
        ),
        case(
            "IPv4 runt segment padded by Ethernet",
            padded_runt,
            PASS_MALFORMED,
            None,
        ),
        case(
            "IPv4 non-first fragment that looks like a SYN",
            v4(
                denied4,
                syn.clone(),
                6,
                V4Opts {
                    fragment_offset: 3,
                    ..Default::default()
                },
            ),
            PASS_FRAGMENT,
            None,
        ),
        case(
            "IPv6 first fragment",
            v6(
                denied6,
                &[Ext::Fragment {
                    offset: 0,
                    more: true,
                }],
                6,
                syn.clone(),
            ),
            DROP_DENY_LIST,
            Some(V6),
        ),
        case(
            "IPv6 tiny first fragment",
            v6(
                denied6,
                &[Ext::Fragment {
                    offset: 0,
                    more: true,
                }],
                6,
                syn[..8].to_vec(),
            ),
            DROP_DENY_LIST,
            Some(V6),
        ),
        case(
            "IPv6 non-first fragment that looks like a SYN",
            v6(
                denied6,
                &[Ext::Fragment {
                    offset: 2,
                    more: false,
                }],
                6,
                syn.clone(),
            ),
            PASS_FRAGMENT,
            None,
        ),
        // Truncation at every layer.
        // The kernel refuses test frames under 14 bytes (no driver hands XDP
        // one either): the shortest case is a bare Ethernet header.
        case(
            "Ethernet header and nothing else",
            truncated(packet::syn_v4(denied4, 25), 14),
            PASS_MALFORMED,
            None,
        ),
        case(
            "truncated inside a VLAN tag",
            truncated(
                packet::ethernet(
                    ethertype::IPV4,
                    &[ethertype::VLAN],
                    &packet::syn_v4(denied4, 25)[14..],
                ),
                16,
            ),
            PASS_MALFORMED,
            None,
        ),
        case(
            "truncated IPv4 header",
            truncated(packet::syn_v4(denied4, 25), 14 + 12),
            PASS_MALFORMED,
            None,
        ),
        case(
            "truncated IPv6 header",
            truncated(packet::syn_v6(denied6, 25), 14 + 30),
            PASS_MALFORMED,
            None,
        ),
        case(
            "truncated IPv6 extension header",
            truncated(v6(denied6, &[Ext::HopByHop], 6, syn.clone()), 14 + 40 + 1),
            PASS_MALFORMED,
            None,
        ),
        case(
            "truncated TCP ports",
            truncated(packet::syn_v4(denied4, 25), 14 + 20 + 3),
            PASS_MALFORMED,
            None,
        ),
        case(
            "truncated before TCP flags",
            truncated(packet::syn_v4(denied4, 25), 14 + 20 + 10),
            PASS_MALFORMED,
            None,
        ),
        // /0, /32 and /128 entries.
        case(
            "/0 deny, /32 permit: the host passes",
            packet::syn_v4("192.0.2.10", 25),
            PASS_PERMITTED,
            Some(V4),
        )
        .rules(EDGE_RULES),
        case(
            "/0 deny: its neighbour is dropped",
            packet::syn_v4("192.0.2.11", 25),
            DROP_DENY_LIST,
            Some(V4),
        )
        .rules(EDGE_RULES),
        case(
            "::/0 deny, /128 permit: the host passes",
            packet::syn_v6("2001:db8:2::10", 25),
            PASS_PERMITTED,
            Some(V6),
        )
        .rules(EDGE_RULES),
        case(
            "::/0 deny: its neighbour is dropped",
            packet::syn_v6("2001:db8:2::11", 25),
            DROP_DENY_LIST,
            Some(V6),
        )
        .rules(EDGE_RULES),
    ]
}

fn rules_of(set: &[(&str, Action)]) -> Vec<(IpNet, Action)> {
    set.iter().map(|(n, a)| (n.parse().unwrap(), *a)).collect()
}

fn deltas(after: &[u64], before: &[u64]) -> BTreeMap<&'static str, u64> {
    COUNTER_NAMES
        .iter()
        .zip(after.iter().zip(before))
        .filter(|(_, (a, b))| a != b)
        .map(|(name, (a, b))| (*name, a - b))
        .collect()
}

fn expected_deltas(case: &Case) -> BTreeMap<&'static str, u64> {
    let mut want = BTreeMap::new();
    let mut add = |index: u32| *want.entry(COUNTER_NAMES[index as usize]).or_insert(0) += 1;
    add(counter::PACKETS);
    add(case.outcome);
    if let Some(family) = case.syn {
        add(counter::SYN);
        add(if family == Family::V4 {
            counter::SYN_V4
        } else {
            counter::SYN_V6
        });
    }
    if case.is_drop() {
        add(if case.syn == Some(Family::V4) {
            counter::DROP_V4
        } else {
            counter::DROP_V6
        });
    } else {
        add(counter::PASSED);
    }
    want
}

fn load() -> (XdpFilter, MapSync, Stats) {
    require_root();
    XdpFilter::load().expect("load the embedded XDP program")
}

#[test]
fn table_of_crafted_frames() {
    let (mut filter, mut sync, stats) = load();
    let cases = cases();
    assert!(cases.len() >= 40, "the suite keeps at least 40 frames");
    let mut failures = Vec::new();
    let mut current_rules: Option<*const (&str, Action)> = None;
    for case in &cases {
        if current_rules != Some(case.rules.as_ptr()) {
            sync.apply(&rules_of(case.rules), ApplyHow::Atomic).unwrap();
            current_rules = Some(case.rules.as_ptr());
        }
        // A rate of 0 keeps drop logging out of the counter deltas.
        sync.set_runtime(case.mode, case.enforcement, &PORTS, 0)
            .unwrap();
        let before = stats.counters().0;
        let verdict = filter
            .test_run(&case.frame)
            .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN: {e:?}", case.name));
        let mut got = deltas(&stats.counters().0, &before);
        got.remove("log_suppressed");
        let want_verdict = if case.is_drop() { XDP_DROP } else { XDP_PASS };
        let want = expected_deltas(case);
        if verdict != want_verdict || got != want {
            failures.push(format!(
                "{}: verdict {verdict} (want {want_verdict}), counters {got:?} (want {want:?})",
                case.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn entry_hits_are_counted_by_rule() {
    let (mut filter, mut sync, stats) = load();
    sync.apply(&rules_of(BASE_RULES), ApplyHow::Atomic).unwrap();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &PORTS, 0)
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            filter.test_run(&packet::syn_v4("203.0.113.9", 25)).unwrap(),
            XDP_DROP
        );
    }
    assert_eq!(
        filter
            .test_run(&packet::syn_v4("203.0.113.77", 25))
            .unwrap(),
        XDP_PASS
    );
    let hits: BTreeMap<String, u64> = stats
        .all_hits()
        .into_iter()
        .map(|(id, n)| (sync.prefix_of(id).unwrap().to_string(), n))
        .collect();
    let want: BTreeMap<String, u64> = [
        ("203.0.113.0/24".to_string(), 3),
        ("203.0.113.77/32".to_string(), 1),
    ]
    .into();
    assert_eq!(hits, want);
}

#[test]
fn pending_hits_are_visible_before_and_after_their_flush() {
    let (mut filter, mut sync, stats) = load();
    sync.apply(&rules_of(BASE_RULES), ApplyHow::Atomic).unwrap();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &PORTS, 0)
        .unwrap();
    let id_of = |prefix: &str| {
        let net: IpNet = prefix.parse().unwrap();
        (1..64).find(|id| sync.prefix_of(*id) == Some(net)).unwrap()
    };
    let (deny, permit) = (id_of("203.0.113.0/24"), id_of("203.0.113.77/32"));
    // One run of repeats stays on one CPU: all four hits are still pending
    // in that CPU's record, none in SG_HITS yet.
    let denied = packet::syn_v4("203.0.113.9", 25);
    assert_eq!(filter.test_run_repeat(&denied, 4).unwrap().0, XDP_DROP);
    assert_eq!(stats.hits(deny), 4);
    assert_eq!(stats.all_hits(), vec![(deny, 4)]);
    // A hit of another entry flushes the pending ones (on that CPU).
    let permitted = packet::syn_v4("203.0.113.77", 25);
    assert_eq!(filter.test_run_repeat(&permitted, 2).unwrap().0, XDP_PASS);
    assert_eq!((stats.hits(deny), stats.hits(permit)), (4, 2));
    let mut want = vec![(deny, 4), (permit, 2)];
    want.sort();
    assert_eq!(stats.all_hits(), want);
    // The /32's two hits are still pending when its id goes to a new
    // prefix: they are not the new prefix's hits.
    let gone: IpNet = "203.0.113.77/32".parse().unwrap();
    let new: IpNet = "192.0.2.0/24".parse().unwrap();
    sync.update(&[(gone, None), (new, Some(Action::Deny))])
        .unwrap();
    assert_eq!(sync.prefix_of(permit), Some(new), "the freed id is reused");
    assert_eq!(stats.hits(permit), 0);
    assert_eq!(stats.all_hits(), vec![(deny, 4)]);
    let from_new = packet::syn_v4("192.0.2.1", 25);
    assert_eq!(filter.test_run(&from_new).unwrap(), XDP_DROP);
    assert_eq!(stats.hits(permit), 1);
}

#[test]
fn suppressed_drop_logs_are_counted_without_a_write() {
    let (mut filter, mut sync, stats) = load();
    sync.apply(&rules_of(BASE_RULES), ApplyHow::Atomic).unwrap();
    // Two events a second per CPU; one run of repeats stays on one CPU and
    // takes far less than the one-second window.
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &PORTS, 2)
        .unwrap();
    let before = stats.counters();
    let denied = packet::syn_v4("203.0.113.9", 25);
    assert_eq!(filter.test_run_repeat(&denied, 5).unwrap().0, XDP_DROP);
    let delta = stats.counters().since(&before);
    assert_eq!(delta.get(counter::DROP_DENY_LIST), 5);
    assert_eq!(delta.get(counter::LOG_SUPPRESSED), 3);
    // Logging off: drops are not log events, nothing is suppressed.
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &PORTS, 0)
        .unwrap();
    let before = stats.counters();
    assert_eq!(filter.test_run_repeat(&denied, 5).unwrap().0, XDP_DROP);
    let delta = stats.counters().since(&before);
    assert_eq!(delta.get(counter::DROP_DENY_LIST), 5);
    assert_eq!(delta.get(counter::LOG_SUPPRESSED), 0);
}

#[test]
fn atomic_replace_switches_generation_and_empties_the_old_one() {
    let (mut filter, mut sync, _stats) = load();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &PORTS, 0)
        .unwrap();
    sync.apply(
        &rules_of(&[("203.0.113.0/24", Action::Deny)]),
        ApplyHow::Atomic,
    )
    .unwrap();
    let first = sync.runtime().active_generation;
    assert_eq!(
        filter.test_run(&packet::syn_v4("203.0.113.1", 25)).unwrap(),
        XDP_DROP
    );
    let report = sync
        .apply(
            &rules_of(&[("198.51.100.0/24", Action::Deny)]),
            ApplyHow::Atomic,
        )
        .unwrap();
    assert_eq!((report.added, report.removed, report.total), (1, 1, 1));
    assert_ne!(sync.runtime().active_generation, first);
    assert_eq!(
        filter.test_run(&packet::syn_v4("203.0.113.1", 25)).unwrap(),
        XDP_PASS
    );
    assert_eq!(
        filter
            .test_run(&packet::syn_v4("198.51.100.1", 25))
            .unwrap(),
        XDP_DROP
    );
    // Incremental changes land in the active generation.
    sync.apply(
        &rules_of(&[
            ("198.51.100.0/24", Action::Deny),
            ("2001:db8:bad::/48", Action::Deny),
        ]),
        ApplyHow::Incremental,
    )
    .unwrap();
    assert_eq!(
        filter
            .test_run(&packet::syn_v6("2001:db8:bad::9", 25))
            .unwrap(),
        XDP_DROP
    );
    assert_eq!(sync.len(), (1, 1));
}

#[test]
fn non_canonical_prefixes_are_stored_canonical() {
    let (mut filter, mut sync, _stats) = load();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &PORTS, 0)
        .unwrap();
    // 203.0.113.9/24 must mean 203.0.113.0/24, never alias anything else.
    let host_bits: IpNet = "203.0.113.9/24".parse().unwrap();
    sync.apply(&[(host_bits, Action::Deny)], ApplyHow::Incremental)
        .unwrap();
    assert_eq!(
        filter
            .test_run(&packet::syn_v4("203.0.113.200", 25))
            .unwrap(),
        XDP_DROP
    );
    assert_eq!(sync.prefix_of(1).unwrap().to_string(), "203.0.113.0/24");
}

#[test]
fn tables_are_created_at_full_size_in_both_generations() {
    // Other programs on the machine (other tests, the frozen trie-reference)
    // have maps of the same names: look only at the maps this load made.
    let ids = || -> std::collections::BTreeSet<u32> {
        aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .map(|m| m.id())
            .collect()
    };
    let before = ids();
    let (_filter, _sync, _stats) = load();
    // The program passed the verifier with these sizes (load() above); check
    // the kernel really created them that large. IPv4 is the compiled table
    // (2^24 first-level entries 16 to an element, a group per /24 holding
    // longer prefixes); IPv6 is the compiled trie (2^16 first-level entries
    // 16 to an element, nodes and leaves; bounds in
    // smtpguard_common::ipv6_table).
    use aya::maps::MapType::Array;
    let want = [
        ("SG_TBL24_A", 1 << 20, Array),
        ("SG_TBL24_B", 1 << 20, Array),
        ("SG_GROUPS4_A", 1 << 20, Array),
        ("SG_GROUPS4_B", 1 << 20, Array),
        ("SG_TBL16_6_A", 1 << 12, Array),
        ("SG_TBL16_6_B", 1 << 12, Array),
        ("SG_GROUPS6_A", 1 << 18, Array),
        ("SG_GROUPS6_B", 1 << 18, Array),
        ("SG_LEAVES6_A", 1 << 16, Array),
        ("SG_LEAVES6_B", 1 << 16, Array),
    ];
    for (name, entries, map_type) in want {
        let found: Vec<(u32, aya::maps::MapType)> = aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .filter(|m| !before.contains(&m.id()) && m.name_as_str() == Some(name))
            .map(|m| (m.max_entries(), m.map_type().unwrap()))
            .collect();
        assert!(
            found.contains(&(entries, map_type)),
            "{name}: want {entries} entries of {map_type:?}, new maps of that name: {found:?}"
        );
    }
}

#[test]
fn a_list_that_does_not_fit_leaves_the_old_one_in_force() {
    require_root();
    let (mut filter, mut sync, _stats) = XdpFilter::load_with_capacity(8).expect("load");
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &PORTS, 0)
        .unwrap();
    sync.apply(
        &rules_of(&[("203.0.113.0/24", Action::Deny)]),
        ApplyHow::Atomic,
    )
    .unwrap();
    let generation = sync.runtime().active_generation;
    // Nine IPv4 prefixes into tries that hold eight.
    let too_many: Vec<(IpNet, Action)> = (0..9)
        .map(|i| (format!("198.51.100.{i}/32").parse().unwrap(), Action::Deny))
        .collect();
    let err = sync.apply(&too_many, ApplyHow::Atomic).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("kernel IPv4 list is full after 8 of 9 prefixes"),
        "{err}"
    );
    assert_eq!(
        sync.runtime().active_generation,
        generation,
        "no switch happened"
    );
    assert_eq!(
        filter.test_run(&packet::syn_v4("203.0.113.5", 25)).unwrap(),
        XDP_DROP,
        "old list in force"
    );
    assert_eq!(
        filter
            .test_run(&packet::syn_v4("198.51.100.1", 25))
            .unwrap(),
        XDP_PASS,
        "nothing of the new one"
    );
    // The half-built generation was emptied: a list that fits goes in.
    sync.apply(&too_many[..8], ApplyHow::Atomic).unwrap();
    assert_eq!(
        filter
            .test_run(&packet::syn_v4("198.51.100.1", 25))
            .unwrap(),
        XDP_DROP
    );
}

#[test]
fn an_ipv6_list_that_does_not_fit_leaves_the_old_one_in_force() {
    require_root();
    let (mut filter, mut sync, _stats) = XdpFilter::load_with_capacity(8).expect("load");
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &PORTS, 0)
        .unwrap();
    sync.apply(
        &rules_of(&[("2001:db8:bad::/48", Action::Deny)]),
        ApplyHow::Atomic,
    )
    .unwrap();
    // Nine /128s into a table that takes eight prefixes.
    let too_many: Vec<(IpNet, Action)> = (1..10)
        .map(|i| {
            (
                format!("2001:db8:1::{i}/128").parse().unwrap(),
                Action::Deny,
            )
        })
        .collect();
    for how in [ApplyHow::Atomic, ApplyHow::Incremental] {
        let err = sync.apply(&too_many, how).unwrap_err();
        assert_eq!(
            err.to_string(),
            "9 IPv6 prefixes exceed the kernel table capacity of 8",
            "{how:?}: {err:?}"
        );
        assert_old_ipv6_list_in_force(&mut filter, &sync, how);
    }
    // What was half-written into the inactive table does not get in the
    // way of a list that fits.
    sync.apply(&too_many[..8], ApplyHow::Atomic).unwrap();
    assert_eq!(
        filter
            .test_run(&packet::syn_v6("2001:db8:1::1", 25))
            .unwrap(),
        XDP_DROP
    );
    assert_eq!(
        filter
            .test_run(&packet::syn_v6("2001:db8:bad::1", 25))
            .unwrap(),
        XDP_PASS
    );
}

/// After a refused IPv6 list: nothing was recorded as applied, the old
/// list (a deny of 2001:db8:bad::/48) still drops and the refused one
/// (which covers 2001:db8:1::1) does not.
fn assert_old_ipv6_list_in_force(filter: &mut XdpFilter, sync: &MapSync, how: ApplyHow) {
    assert_eq!(sync.len(), (0, 1), "{how:?}: nothing recorded as applied");
    assert_eq!(
        filter
            .test_run(&packet::syn_v6("2001:db8:bad::1", 25))
            .unwrap(),
        XDP_DROP,
        "{how:?}: old list in force"
    );
    assert_eq!(
        filter
            .test_run(&packet::syn_v6("2001:db8:1::1", 25))
            .unwrap(),
        XDP_PASS,
        "{how:?}: nothing of the new one"
    );
}

#[test]
fn an_ipv6_list_needing_more_nodes_than_the_table_holds_is_refused_whole() {
    require_root();
    let (mut filter, mut sync, _stats) = load();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &PORTS, 0)
        .unwrap();
    sync.apply(
        &rules_of(&[("2001:db8:bad::/48", Action::Deny)]),
        ApplyHow::Atomic,
    )
    .unwrap();
    // 60,000 /128s in distinct /48s: ten nodes each of their own (/48 to
    // /120), 600,000, plus the 235 nodes at /40 and one each at /16, /24
    // and /32 they share: 600,238 in all, more than the 2^18 a generation
    // holds, though far fewer prefixes than the policy accepts.
    let too_deep: Vec<(IpNet, Action)> = (0..60_000u32)
        .map(|i| {
            let net = format!("2001:db8:{i:x}::1/128");
            (net.parse().unwrap(), Action::Deny)
        })
        .collect();
    for how in [ApplyHow::Atomic, ApplyHow::Incremental] {
        let err = sync.apply(&too_deep, how).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel IPv6 table too small: the IPv6 entries of all sources, merged, need \
             600238 nodes, a generation holds 262144; aggregate or shorten them (a prefix \
             longer than /16 takes up to one node and its leaves per octet past the second)",
            "{how:?}"
        );
        assert_old_ipv6_list_in_force(&mut filter, &sync, how);
    }
}

#[test]
fn a_single_change_with_no_free_slot_rewrites_the_whole_list_into_the_other_generation() {
    let (mut filter, mut sync, stats) = load();
    sync.set_runtime(Mode::AcceptAllExceptDeny, Enforcement::Enforce, &PORTS, 0)
        .unwrap();
    sync.apply(
        &rules_of(&[
            ("203.0.113.0/24", Action::Deny),
            ("198.51.100.66/32", Action::Deny),
            ("2001:db8:bad::/48", Action::Deny),
        ]),
        ApplyHow::Atomic,
    )
    .unwrap();
    let syn = |a: &str| {
        if a.contains(':') {
            packet::syn_v6(a, 25)
        } else {
            packet::syn_v4(a, 25)
        }
    };
    let id_of = |sync: &MapSync, prefix: &str| {
        let net: IpNet = prefix.parse().unwrap();
        (1..10).find(|id| sync.prefix_of(*id) == Some(net)).unwrap()
    };
    let slash24 = id_of(&sync, "203.0.113.0/24");
    assert_eq!(filter.test_run(&syn("203.0.113.5")).unwrap(), XDP_DROP);
    let hits_before = stats.hits(slash24);
    let generation = sync.runtime().active_generation;

    // A /32 in a /24 of its own needs a group slot; there is none left.
    sync.use_up_ipv4_slots();
    sync.update(&[("192.0.2.7/32".parse().unwrap(), Some(Action::Deny))])
        .expect("the fallback writes the whole list");
    assert_ne!(
        sync.runtime().active_generation,
        generation,
        "the change went in through the other generation"
    );
    for (source, want) in [
        ("192.0.2.7", XDP_DROP),
        ("192.0.2.8", XDP_PASS),
        ("203.0.113.5", XDP_DROP),
        ("198.51.100.66", XDP_DROP),
        ("198.51.100.67", XDP_PASS),
        ("2001:db8:bad::1", XDP_DROP),
    ] {
        assert_eq!(filter.test_run(&syn(source)).unwrap(), want, "{source}");
    }
    // The entries in force kept their ids and their hit counts.
    assert_eq!(id_of(&sync, "203.0.113.0/24"), slash24);
    assert_eq!(stats.hits(slash24), hits_before + 1);
    // The rewritten table has free slots again: the next change is in place.
    let generation = sync.runtime().active_generation;
    sync.update(&[("192.0.2.9/32".parse().unwrap(), Some(Action::Deny))])
        .unwrap();
    assert_eq!(sync.runtime().active_generation, generation);
    assert_eq!(filter.test_run(&syn("192.0.2.9")).unwrap(), XDP_DROP);
    assert_eq!(sync.len(), (4, 1));
}
