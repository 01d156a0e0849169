//! DNSBL/DNSWL scoring against a real DNS server (hickory-server on a
//! loopback port, `smtpguard::testing::dns`), through the module API with
//! documentation addresses as clients: listings (IPv4, IPv6 nibbles),
//! weights, filters, allow lists, timeouts, SERVFAIL, NXDOMAIN, the
//! 127.255.255.254 refusal, the cache, one query per (zone, client) in
//! flight, and the global cap. Query counts are read at the server.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use smtpguard::dnsbl::config::RawDnsbl;
use smtpguard::dnsbl::{query_name, Dnsbl, DnsblConfig, Outcome};
use smtpguard::testing::bounded;
use smtpguard::testing::dns::{SilentDns, TestDns};

const LIMIT: Duration = Duration::from_secs(30);
const LISTED: &[Ipv4Addr] = &[Ipv4Addr::new(127, 0, 0, 2)];

/// The owner name of `client` relative to any zone.
fn owner(client: &str) -> String {
    let ip: IpAddr = client.parse().unwrap();
    query_name(ip, "z").strip_suffix(".z.").unwrap().to_owned()
}

fn engine(resolver: std::net::SocketAddr, rest: &str) -> Dnsbl {
    let text = format!("resolver = \"{resolver}\"\n{rest}");
    let raw: RawDnsbl = toml::from_str(&text).expect("toml");
    Dnsbl::new(DnsblConfig::from_raw(raw).expect("valid [dnsbl]")).expect("resolver")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn listed_ipv4_and_ipv6_clients() {
    bounded(LIMIT, async {
        let dns = TestDns::start();
        let v4 = owner("192.0.2.10");
        let v6 = owner("2001:db8::10");
        assert!(
            v6.starts_with("0.1.0.0.0.0.0.0") && v6.ends_with("8.b.d.0.1.0.0.2"),
            "{v6}"
        );
        dns.zone("dnsbl.test", 300, &[(&v4, LISTED), (&v6, LISTED)]);
        let dnsbl = engine(
            dns.addr(),
            r#"sites = ["dnsbl.test*3"]
threshold = 3"#,
        );
        for client in ["192.0.2.10", "2001:db8::10"] {
            let v = dnsbl.lookup(ip(client)).await;
            assert_eq!(v.score, 3, "{client}: {v:?}");
            assert!(v.is_listed());
            assert_eq!(v.sites[0].outcome, Outcome::Listed(LISTED.to_vec()));
            assert_eq!(v.matching_sites(), "dnsbl.test");
        }
        let v = dnsbl.lookup(ip("192.0.2.11")).await;
        assert_eq!((v.score, v.is_listed()), (0, false));
        assert_eq!(v.sites[0].outcome, Outcome::NotListed);
        let s = &dnsbl.snapshot()[0];
        assert_eq!((s.lookups, s.hits, s.nxdomain), (3, 2, 1));
    })
    .await;
}

#[tokio::test]
async fn weighted_sum_with_a_filter_that_excludes_one_code() {
    bounded(LIMIT, async {
        let dns = TestDns::start();
        let client = owner("198.51.100.7");
        dns.zone("dnsbl.test", 300, &[(&client, LISTED)]);
        dns.zone("other.test", 300, &[(&client, &[Ipv4Addr::new(127, 0, 0, 3)])]);
        // 127.0.0.4: a code this operator does not trust.
        dns.zone("third.test", 300, &[(&client, &[Ipv4Addr::new(127, 0, 0, 4)])]);
        let dnsbl = engine(
            dns.addr(),
            r#"sites = ["dnsbl.test*2", "other.test=127.0.0.[2..3]*1",
                        { zone = "third.test", filter = "127.0.0.[2;3]", weight = 5, name = "third" }]
threshold = 3"#,
        );
        let v = dnsbl.lookup(ip("198.51.100.7")).await;
        assert_eq!(v.score, 3, "{v:?}");
        assert!(v.is_listed());
        assert_eq!(
            v.sites[2].outcome,
            Outcome::Filtered(vec![Ipv4Addr::new(127, 0, 0, 4)])
        );
        assert_eq!(v.matching_sites(), "dnsbl.test,other.test");
    })
    .await;
}

/// postscreen's usual Spamhaus lines: one zone, several filters and
/// weights; one query serves them all.
#[tokio::test]
async fn sites_on_one_zone_share_one_query() {
    bounded(LIMIT, async {
        let dns = TestDns::start();
        let client = owner("203.0.113.50");
        dns.zone(
            "zen.test",
            300,
            &[(&client, &[Ipv4Addr::new(127, 0, 0, 4), Ipv4Addr::new(127, 0, 0, 10)])],
        );
        let dnsbl = engine(
            dns.addr(),
            r#"sites = ["zen.test=127.0.0.[10..11]*8", "zen.test=127.0.0.[4..7]*6", "zen.test=127.0.0.3*4"]
threshold = 3"#,
        )
        ;
        let v = dnsbl.lookup(ip("203.0.113.50")).await;
        assert_eq!(v.score, 14, "{v:?}");
        assert_eq!(v.sites[2].outcome.as_str(), "filtered");
        assert_eq!(dns.queries("zen.test"), 1);
        let s = dnsbl.snapshot();
        assert_eq!((s[0].hits, s[1].hits, s[2].hits), (1, 1, 0));
        assert_eq!(s[0].lookups, 1);
    })
    .await;
}

#[tokio::test]
async fn an_allow_list_with_a_negative_weight() {
    bounded(LIMIT, async {
        let dns = TestDns::start();
        let client = owner("203.0.113.9");
        dns.zone("dnsbl.test", 300, &[(&client, LISTED)]);
        dns.zone(
            "dnswl.test",
            300,
            &[(&client, &[Ipv4Addr::new(127, 0, 10, 2)])],
        );
        let dnsbl = engine(
            dns.addr(),
            r#"sites = ["dnsbl.test*3", "dnswl.test=127.0.[0..255].[1..3]*-5"]
threshold = 3"#,
        );
        let v = dnsbl.lookup(ip("203.0.113.9")).await;
        assert_eq!(v.score, -2, "{v:?}");
        assert!(!v.is_listed());
        assert!(v.is_allow_listed());
    })
    .await;
}

#[tokio::test]
async fn a_server_that_never_answers_means_unlisted_after_timeout() {
    bounded(LIMIT, async {
        let silent = SilentDns::start();
        let dnsbl = engine(
            silent.addr(),
            r#"sites = ["dnsbl.test"]
timeout = "300ms""#,
        );
        let v = dnsbl.lookup(ip("192.0.2.20")).await;
        assert_eq!(v.score, 0);
        assert!(!v.is_listed());
        assert_eq!(v.sites[0].outcome, Outcome::Timeout);
        assert!(silent.received() >= 1, "the query reached the socket");
        let s = &dnsbl.snapshot()[0];
        assert_eq!((s.lookups, s.timeouts), (1, 1));
        // A timeout is not cached.
        assert_eq!(dnsbl.cache_len(), 0);
    })
    .await;
}

#[tokio::test]
async fn servfail_nxdomain_and_the_refusal_code() {
    bounded(LIMIT, async {
        let dns = TestDns::start();
        dns.servfail_zone("broken.test");
        let client = owner("192.0.2.30");
        dns.zone(
            "refusing.test",
            300,
            &[(&client, &[Ipv4Addr::new(127, 255, 255, 254)])],
        );
        dns.zone("dnsbl.test", 300, &[]);
        let dnsbl = engine(
            dns.addr(),
            r#"sites = ["broken.test*5", "refusing.test*5", "dnsbl.test*5"]
threshold = 1"#,
        );
        let v = dnsbl.lookup(ip("192.0.2.30")).await;
        assert_eq!(v.score, 0, "errors never list: {v:?}");
        assert_eq!(v.sites[0].outcome, Outcome::ServFail);
        assert_eq!(
            v.sites[1].outcome,
            Outcome::Refused(Ipv4Addr::new(127, 255, 255, 254))
        );
        assert_eq!(v.sites[2].outcome, Outcome::NotListed);
        let s = dnsbl.snapshot();
        assert_eq!((s[0].errors, s[1].errors, s[2].errors), (1, 1, 0));
        assert_eq!(s[2].nxdomain, 1);
        // Errors are not cached; NXDOMAIN is.
        let _ = dnsbl.lookup(ip("192.0.2.30")).await;
        assert_eq!(dns.queries("dnsbl.test"), 1);
        assert!(dns.queries("broken.test") >= 2);
        assert_eq!(dns.queries("refusing.test"), 2);
    })
    .await;
}

#[tokio::test]
async fn a_cached_answer_sends_no_second_query() {
    bounded(LIMIT, async {
        let dns = TestDns::start();
        dns.zone("dnsbl.test", 300, &[(&owner("192.0.2.40"), LISTED)]);
        let dnsbl = engine(dns.addr(), r#"sites = ["dnsbl.test"]"#);
        let first = dnsbl.lookup(ip("192.0.2.40")).await;
        let second = dnsbl.lookup(ip("192.0.2.40")).await;
        assert_eq!(first.score, 1);
        assert_eq!(second.score, 1);
        assert!(!first.sites[0].cached);
        assert!(second.sites[0].cached);
        assert_eq!(
            dns.queries("dnsbl.test"),
            1,
            "the second answer came from the cache"
        );
        let s = &dnsbl.snapshot()[0];
        assert_eq!((s.lookups, s.cache_hits, s.hits), (1, 1, 2));
    })
    .await;
}

#[tokio::test]
async fn the_dns_ttl_shortens_the_cache() {
    bounded(LIMIT, async {
        let dns = TestDns::start();
        // TTL 0: nothing to reuse.
        dns.zone("dnsbl.test", 0, &[(&owner("192.0.2.41"), LISTED)]);
        let dnsbl = engine(dns.addr(), r#"sites = ["dnsbl.test"]"#);
        let _ = dnsbl.lookup(ip("192.0.2.41")).await;
        let _ = dnsbl.lookup(ip("192.0.2.41")).await;
        assert_eq!(dns.queries("dnsbl.test"), 2);
    })
    .await;
}

#[tokio::test]
async fn two_hundred_connections_from_ten_clients_make_ten_queries_per_zone() {
    bounded(LIMIT, async {
        let dns = TestDns::start();
        dns.zone("dnsbl.test", 300, &[(&owner("192.0.2.1"), LISTED)]);
        dns.zone("dnswl.test", 300, &[]);
        let dnsbl = engine(dns.addr(), r#"sites = ["dnsbl.test*2", "dnswl.test*-1"]"#);
        let tasks: Vec<_> = (0..200)
            .map(|i| tokio::spawn(dnsbl.lookup(ip(&format!("192.0.2.{}", 1 + i % 10)))))
            .collect();
        for (i, task) in tasks.into_iter().enumerate() {
            let v = task.await.unwrap();
            assert_eq!(v.score, if i % 10 == 0 { 2 } else { 0 });
        }
        assert!(
            dns.queries("dnsbl.test") <= 10,
            "{}",
            dns.queries("dnsbl.test")
        );
        assert!(
            dns.queries("dnswl.test") <= 10,
            "{}",
            dns.queries("dnswl.test")
        );
    })
    .await;
}

/// With no cache and a server that never answers, every query stays in
/// flight for the whole timeout: concurrent connections can only share.
#[tokio::test]
async fn one_query_in_flight_per_zone_and_client() {
    bounded(LIMIT, async {
        let silent = SilentDns::start();
        let dnsbl = engine(
            silent.addr(),
            r#"sites = ["dnsbl.test"]
timeout = "500ms"
cache_ttl = "0s""#,
        );
        let tasks: Vec<_> = (0..200)
            .map(|i| tokio::spawn(dnsbl.lookup(ip(&format!("192.0.2.{}", 1 + i % 10)))))
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().sites[0].outcome, Outcome::Timeout);
        }
        assert_eq!(dnsbl.snapshot()[0].lookups, 10);
        // hickory may send a UDP query twice before giving up.
        assert!(silent.received() <= 20, "{}", silent.received());
    })
    .await;
}

#[tokio::test]
async fn the_global_cap_on_queries_in_flight() {
    bounded(LIMIT, async {
        let silent = SilentDns::start();
        // Queries that never end while the test looks.
        let dnsbl = engine(
            silent.addr(),
            r#"sites = ["dnsbl.test"]
timeout = "20s"
max_queries_in_flight = 2"#,
        );
        let _tasks: Vec<_> = (1..=10)
            .map(|i| tokio::spawn(dnsbl.lookup(ip(&format!("198.51.100.{i}")))))
            .collect();
        while silent.received() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Give the other eight every chance to (wrongly) get through.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            dnsbl.snapshot()[0].lookups,
            2,
            "only two queries got a slot"
        );
    })
    .await;
}

// ----- through the daemon's front door -------------------------------------

mod daemon {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use smtpguard::testing::client::{assert_code, connect_from, reply, rest, say};
    use smtpguard::testing::dns::{SilentDns, TestDns};
    use smtpguard::testing::TestDaemon;

    use super::LISTED;

    const BIN: &str = env!("CARGO_BIN_EXE_smtpguard");

    /// A daemon whose `[dnsbl]` asks `dnsbl.test` on `resolver`; `extra`:
    /// more `[dnsbl]` lines.
    fn daemon(resolver: std::net::SocketAddr, extra: &str) -> TestDaemon {
        let table = format!("sites = [\"dnsbl.test\"]\nresolver = \"{resolver}\"\n{extra}");
        TestDaemon::start(BIN.as_ref(), &[("dnsbl", &table)])
    }

    /// `127.0.0.2` is RFC 5782's test entry (listed), `127.0.0.3` is not.
    fn rfc5782_zone() -> TestDns {
        let dns = TestDns::start();
        dns.zone("dnsbl.test", 300, &[("2.0.0.127", LISTED)]);
        dns
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_gives_a_listed_client_521_and_closes() {
        let dns = rfc5782_zone();
        let d = daemon(dns.addr(), "action = \"drop\"\ntimeout = \"5s\"\n");
        let mut listed = connect_from("127.0.0.2", d.smtp);
        let got = rest(&mut listed);
        assert!(
            got.starts_with("521 5.7.1 gw.example.com Service unavailable; client [127.0.0.2] blocked using dnsbl.test\r\n"),
            "{got:?}"
        );
        let mut clean = connect_from("127.0.0.3", d.smtp);
        assert_code(&reply(&mut clean), "220 ");
        assert_code(&say(&mut clean, "QUIT"), "221 ");
        let log = d.log();
        assert!(log.contains("DNSBL rank 1 for [127.0.0.2]:"), "{log}");
        assert!(
            log.contains("result=dnsbl_drop") || log.contains("dnsbl_drop"),
            "{log}"
        );
        let stats = String::from_utf8_lossy(&d.cli(&["stats"]).stdout).into_owned();
        for line in [
            "dnsbl.dropped",
            "dnsbl.dnsbl.test.hits",
            "dnsbl.dnsbl.test.lookups",
        ] {
            let n = stats
                .lines()
                .find(|l| l.starts_with(line))
                .unwrap_or_else(|| panic!("{line} missing:\n{stats}"));
            assert!(!n.ends_with(" 0"), "{n}");
        }
        assert_eq!(dns.queries("dnsbl.test"), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enforce_greets_then_refuses_every_recipient() {
        let dns = rfc5782_zone();
        let d = daemon(dns.addr(), "action = \"enforce\"\n");
        let mut listed = connect_from("127.0.0.2", d.smtp);
        assert_code(&reply(&mut listed), "220 ");
        assert_code(&say(&mut listed, "EHLO client.example"), "250");
        assert_code(&say(&mut listed, "MAIL FROM:<spam@example.org>"), "250 ");
        let refused = say(&mut listed, "RCPT TO:<bob@example.com>");
        assert!(
            refused.starts_with(
                "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using dnsbl.test"
            ),
            "{refused:?}"
        );
        assert_code(&say(&mut listed, "DATA"), "554 ");
        assert_code(&say(&mut listed, "QUIT"), "221 ");
        let log = d.log();
        assert!(log.contains("DNSBL enforce: recipient refused"), "{log}");
        assert!(
            log.contains("spam@example.org") && log.contains("bob@example.com"),
            "{log}"
        );
        // An unlisted client delivers as usual.
        let mut clean = connect_from("127.0.0.3", d.smtp);
        assert_code(&reply(&mut clean), "220 ");
        assert_code(&say(&mut clean, "HELO client.example"), "250 ");
        assert_code(&say(&mut clean, "MAIL FROM:<a@example.org>"), "250 ");
        assert_code(&say(&mut clean, "RCPT TO:<bob@example.com>"), "250 ");
    }

    /// A silent resolver: the unlisted verdict comes at `timeout`, then the
    /// greeting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_resolver_delays_the_greeting_to_the_timeout() {
        let silent = SilentDns::start();
        let d = daemon(silent.addr(), "action = \"drop\"\ntimeout = \"1s\"\n");
        let started = Instant::now();
        let mut client = connect_from("127.0.0.2", d.smtp);
        assert_code(&reply(&mut client), "220 ");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        assert!(silent.received() >= 1);
        let _ = client.write_all(b"QUIT\r\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_permitted_client_skips_dnsbl() {
        let dns = rfc5782_zone();
        let d = daemon(dns.addr(), "action = \"drop\"\n");
        let added = d.cli(&["permit", "add", "127.0.0.2"]);
        assert!(added.status.success(), "{added:?}");
        let mut client = connect_from("127.0.0.2", d.smtp);
        assert_code(&reply(&mut client), "220 ");
        assert_eq!(dns.queries("dnsbl.test"), 0);
        let stats = String::from_utf8_lossy(&d.cli(&["stats"]).stdout).into_owned();
        assert!(
            stats
                .lines()
                .any(|l| l.starts_with("dnsbl.skipped") && l.ends_with(" 1")),
            "{stats}"
        );
    }
}
