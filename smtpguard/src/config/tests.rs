use std::{error::Error as _, net::SocketAddr, num::NonZeroUsize, path::Path, time::Duration};

use super::*;

const FILE: &str = "/etc/smtpguard/smtpguard.toml";

fn parse(text: &str) -> Config {
    Config::from_toml_str(text, Path::new(FILE)).unwrap_or_else(|e| panic!("{e:?}"))
}

fn error(text: &str) -> ConfigError {
    match Config::from_toml_str(text, Path::new(FILE)) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(e) => e,
    }
}

/// The message of an error, asserting it is an `Invalid` one.
fn invalid(text: &str) -> String {
    let e = error(text);
    assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
    e.to_string()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn empty_file_gives_production_defaults() {
    let c = parse("");
    assert_eq!(c.server.hostname, validate::machine_hostname_for_tests());
    assert_eq!(c.server.listen, vec![addr("0.0.0.0:25"), addr("[::]:25")]);
    assert_eq!(c.server.ports(), vec![25]);
    assert_eq!(c.server.max_connections, NonZeroUsize::new(100));
    assert_eq!(c.server.max_connections_per_client, None);
    assert_eq!(c.server.max_connections_per_client_ipv6_prefix, 64);
    assert_eq!(c.server.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.server.max_session_duration, Duration::from_secs(1800));
    assert_eq!(c.server.max_message_size_bytes, 52_428_800);
    assert_eq!(c.server.max_recipients, 100);
    assert_eq!(c.server.max_errors, 10);
    assert_eq!(c.server.bare_lf, BareLf::Reject);
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
    assert!(c.server.close_denied_sessions);

    assert_eq!(c.tls.mode, TlsMode::Off);
    assert_eq!(c.tls.files, None);
    assert_eq!(c.tls.active_files(), None);
    assert_eq!(c.tls.handshake_timeout, Duration::from_secs(30));

    assert_eq!(c.policy.mode, PolicyMode::AcceptAllExceptDeny);
    assert_eq!(c.policy.enforcement, Enforcement::Enforce);
    assert_eq!(c.policy.deny_list, Path::new("/etc/smtpguard/deny.list"));
    assert_eq!(
        c.policy.permit_list,
        Path::new("/etc/smtpguard/permit.list")
    );

    assert!(c.xdp.interfaces.is_empty());
    assert_eq!(c.xdp.mode, XdpMode::Auto);
    assert_eq!(c.xdp.log_rate_per_second, 10);
    assert!(!c.xdp.enabled());

    assert_eq!(
        c.delivery,
        Delivery::Spool(SpoolDelivery {
            dir: "/var/spool/smtpguard".into(),
            accept_domains: vec![],
            relay_networks: vec![],
        })
    );
    assert_eq!(c.control.socket, Path::new("/run/smtpguard/control.sock"));
    assert_eq!(c.logging.format, LogFormat::Text);
    assert_eq!(c.logging.level, LevelFilter::INFO);
    assert_eq!(c.logging.stats_interval, Some(Duration::from_secs(10)));
    assert_eq!(c.metrics.listen, None);
}

#[test]
fn embedded_default_is_the_development_setup() {
    let c = Config::embedded_default().unwrap();
    assert_eq!(c.server.hostname, validate::machine_hostname_for_tests());
    assert_eq!(
        c.server.listen,
        vec![addr("127.0.0.1:2525"), addr("[::1]:2525")]
    );
    assert_eq!(c.server.ports(), vec![2525]);
    assert_eq!(c.server.max_connections, NonZeroUsize::new(100));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(5 * 60));
    assert_eq!(c.tls.mode, TlsMode::Off);
    assert_eq!(c.tls.active_files(), None);
    assert_eq!(c.policy.mode, PolicyMode::AcceptAllExceptDeny);
    assert_eq!(c.policy.enforcement, Enforcement::Enforce);
    assert_eq!(c.policy.deny_list, Path::new("./var/lists/deny.list"));
    assert_eq!(c.policy.permit_list, Path::new("./var/lists/permit.list"));
    assert_eq!(c.xdp.interfaces, vec!["lo".to_string()]);
    assert_eq!(c.xdp.mode, XdpMode::Skb);
    assert!(c.xdp.enabled());
    let Delivery::Spool(spool) = &c.delivery else {
        panic!("{:?}", c.delivery)
    };
    assert_eq!(spool.dir, Path::new("./var/spool"));
    assert_eq!(spool.accept_domains, vec!["localhost".to_string()]);
    assert_eq!(
        spool.relay_networks,
        vec![
            "127.0.0.0/8".parse::<IpNet>().unwrap(),
            "::1/128".parse().unwrap()
        ]
    );
    assert_eq!(c.control.socket, Path::new("./var/run/control.sock"));
    assert_eq!(c.metrics.listen, None);
}

#[test]
fn embedded_default_sets_the_same_values_as_the_built_in_defaults() {
    // Apart from the development choices, the file must not drift from
    // the documented defaults.
    let file = Config::embedded_default().unwrap();
    let built_in = parse("");
    let dev_server = ServerConfig {
        listen: built_in.server.listen.clone(),
        ..file.server.clone()
    };
    assert_eq!(dev_server, built_in.server);
    assert_eq!(file.tls, built_in.tls);
    assert_eq!(file.logging, built_in.logging);
    // Development runs greet at once; everything else as built in.
    assert_eq!(file.screening.greet_wait, None);
    assert_eq!(
        ScreeningConfig {
            greet_wait: built_in.screening.greet_wait,
            ..file.screening.clone()
        },
        built_in.screening
    );
    assert_eq!(file.bans, built_in.bans);
    assert_eq!(
        file.xdp.log_rate_per_second,
        built_in.xdp.log_rate_per_second
    );
}

#[test]
fn full_file_is_read_into_every_field() {
    let c = parse(
        r#"
        [server]
        hostname = "mail.example.com"
        listen = ["192.0.2.1:25", "[2001:db8::1]:25", "192.0.2.1:587"]
        max_connections = "unlimited"
        max_connections_per_client = 5
        idle_timeout = "90s"
        max_session_duration = "1h 30m"
        max_message_size_bytes = 10485760
        max_recipients = 50
        max_errors = 3
        bare_lf = "normalize"
        shutdown_grace = "0s"
        close_denied_sessions = false

        [tls]
        mode = "required"
        certificate = "/etc/smtpguard/tls/server.crt"
        private_key = "/etc/smtpguard/tls/server.key"
        ca_certificate = "/etc/smtpguard/tls/ca.crt"
        handshake_timeout = "10s"

        [policy]
        mode = "deny-all-except-permit"
        enforcement = "monitor"
        deny_list = "/srv/deny"
        permit_list = "/srv/permit"

        [xdp]
        interfaces = ["eth0", "bond0.100"]
        mode = "native"
        log_rate_per_second = 0

        [delivery]
        upstream = "127.0.0.1:10025"
        upstream_protocol = "proxy-v2"
        upstream_timeout = "2m"

        [control]
        socket = "/run/sg.sock"

        [logging]
        format = "json"
        level = "debug"
        stats_interval = "0s"

        [metrics]
        listen = "127.0.0.1:9325"
        "#,
    );
    assert_eq!(c.server.hostname, "mail.example.com");
    assert_eq!(c.server.ports(), vec![25, 587]);
    assert_eq!(c.server.max_connections, None);
    assert_eq!(c.server.max_connections_per_client, NonZeroUsize::new(5));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(90));
    assert_eq!(c.server.max_session_duration, Duration::from_secs(5400));
    assert_eq!(c.server.max_message_size_bytes, 10_485_760);
    assert_eq!(c.server.max_recipients, 50);
    assert_eq!(c.server.max_errors, 3);
    assert_eq!(c.server.bare_lf, BareLf::Normalize);
    assert_eq!(c.server.shutdown_grace, Duration::ZERO);
    assert!(!c.server.close_denied_sessions);
    assert_eq!(c.tls.mode, TlsMode::Required);
    let files = TlsFiles {
        certificate: "/etc/smtpguard/tls/server.crt".into(),
        private_key: "/etc/smtpguard/tls/server.key".into(),
        ca_certificate: Some("/etc/smtpguard/tls/ca.crt".into()),
    };
    assert_eq!(c.tls.active_files(), Some(&files));
    assert_eq!(c.tls.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.policy.mode, PolicyMode::DenyAllExceptPermit);
    assert_eq!(c.policy.enforcement, Enforcement::Monitor);
    assert_eq!(c.policy.deny_list, Path::new("/srv/deny"));
    assert_eq!(c.policy.permit_list, Path::new("/srv/permit"));
    assert_eq!(c.xdp.interfaces, vec!["eth0", "bond0.100"]);
    assert_eq!(c.xdp.mode, XdpMode::Native);
    assert_eq!(c.xdp.log_rate_per_second, 0);
    assert_eq!(
        c.delivery,
        Delivery::Upstream(UpstreamDelivery {
            address: addr("127.0.0.1:10025"),
            protocol: UpstreamProtocol::ProxyV2,
            timeout: Duration::from_secs(120),
        })
    );
    assert_eq!(c.control.socket, Path::new("/run/sg.sock"));
    assert_eq!(c.logging.format, LogFormat::Json);
    assert_eq!(c.logging.level, LevelFilter::DEBUG);
    assert_eq!(c.logging.stats_interval, None);
    assert_eq!(c.metrics.listen, Some(addr("127.0.0.1:9325")));
}

#[test]
fn spool_delivery_rules_are_normalized() {
    let c = parse(
        r#"
        [delivery]
        spool_dir = "/srv/maildir"
        accept_domains = ["Example.COM", "mail.example.org"]
        relay_networks = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7/32"]
        "#,
    );
    assert_eq!(
        c.delivery,
        Delivery::Spool(SpoolDelivery {
            dir: "/srv/maildir".into(),
            accept_domains: vec!["example.com".into(), "mail.example.org".into()],
            relay_networks: vec![
                "192.0.2.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
                "198.51.100.7/32".parse().unwrap(),
            ],
        })
    );
}

#[test]
fn tls_files_without_tls_mode_are_kept_but_not_active() {
    let c = parse(
        r#"
        [tls]
        certificate = "a.crt"
        private_key = "a.key"
        "#,
    );
    assert_eq!(c.tls.mode, TlsMode::Off);
    assert!(c.tls.files.is_some());
    assert_eq!(c.tls.active_files(), None);
}

#[test]
fn per_client_zero_and_unlimited_both_mean_no_cap() {
    for value in ["0", "\"unlimited\""] {
        let c = parse(&format!("[server]\nmax_connections_per_client = {value}"));
        assert_eq!(c.server.max_connections_per_client, None, "{value}");
    }
}

#[test]
fn every_log_level_word_is_accepted() {
    for (word, level) in [
        ("off", LevelFilter::OFF),
        ("error", LevelFilter::ERROR),
        ("warn", LevelFilter::WARN),
        ("info", LevelFilter::INFO),
        ("debug", LevelFilter::DEBUG),
        ("trace", LevelFilter::TRACE),
    ] {
        let c = parse(&format!("[logging]\nlevel = {word:?}"));
        assert_eq!(c.logging.level, level);
    }
}

#[test]
fn exactly_eight_ports_is_allowed() {
    let listen: Vec<String> = (2525..2533).map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let c = parse(&format!("[server]\nlisten = [{}]", listen.join(", ")));
    assert_eq!(c.server.ports().len(), 8);
}

// ----- errors -------------------------------------------------------------

#[test]
fn load_names_a_missing_file() {
    let path = Path::new("/nonexistent/smtpguard.toml");
    let e = Config::load(path).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot read configuration file /nonexistent/smtpguard.toml"
    );
    let source = e
        .source()
        .unwrap()
        .downcast_ref::<std::io::Error>()
        .unwrap();
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn load_reads_a_file() {
    let dir = std::env::temp_dir().join(format!("smtpguard-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("smtpguard.toml");
    std::fs::write(&path, "[server]\nmax_errors = 4\n").unwrap();
    let c = Config::load(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(c.server.max_errors, 4);
}

#[test]
fn unknown_key_is_a_parse_error_with_line_and_column() {
    let e = error("[server]\nlisten = [\"0.0.0.0:25\"]\nidle_timout = \"5m\"\n");
    assert_eq!(
        e.to_string(),
        "cannot parse configuration file /etc/smtpguard/smtpguard.toml"
    );
    let detail = e.source().unwrap().to_string();
    assert!(detail.contains("line 3, column 1"), "{detail}");
    assert!(detail.contains("unknown field `idle_timout`"), "{detail}");
}

#[test]
fn unknown_table_is_a_parse_error() {
    let detail = error("[sever]\n").source().unwrap().to_string();
    assert!(detail.contains("unknown field `sever`"), "{detail}");
}

#[test]
fn unknown_word_is_a_parse_error_listing_the_choices() {
    let detail = error("[tls]\nmode = \"on\"\n")
        .source()
        .unwrap()
        .to_string();
    assert!(detail.contains("line 2, column 8"), "{detail}");
    assert!(
        detail.contains("unknown variant `on`, expected one of `off`, `optional`, `required`"),
        "{detail}"
    );
}

#[test]
fn toml_syntax_error_is_a_parse_error() {
    let detail = error("[server\n").source().unwrap().to_string();
    assert!(detail.contains("line 1, column 8"), "{detail}");
}

#[test]
fn duration_of_the_wrong_type_is_a_parse_error() {
    let detail = error("[server]\nidle_timeout = 1.5\n")
        .source()
        .unwrap()
        .to_string();
    assert!(
        detail.contains("expected a duration such as \"5m\" or \"300s\""),
        "{detail}"
    );
}

#[test]
fn tls_required_without_certificate() {
    assert_eq!(
        invalid("[tls]\nmode = \"required\"\nprivate_key = \"k.pem\""),
        "/etc/smtpguard/smtpguard.toml: tls.mode is \"required\" but tls.certificate is not set"
    );
}

#[test]
fn tls_optional_without_private_key() {
    assert_eq!(
        invalid("[tls]\nmode = \"optional\"\ncertificate = \"c.pem\""),
        "/etc/smtpguard/smtpguard.toml: tls.mode is \"optional\" but tls.private_key is not set"
    );
}

#[test]
fn tls_certificate_without_private_key() {
    assert_eq!(
        invalid("[tls]\ncertificate = \"c.pem\""),
        "/etc/smtpguard/smtpguard.toml: tls.certificate is set but tls.private_key is not"
    );
    assert_eq!(
        invalid("[tls]\nprivate_key = \"k.pem\""),
        "/etc/smtpguard/smtpguard.toml: tls.private_key is set but tls.certificate is not"
    );
    assert_eq!(
        invalid("[tls]\nca_certificate = \"ca.pem\""),
        "/etc/smtpguard/smtpguard.toml: tls.ca_certificate is set but tls.certificate is not"
    );
}

#[test]
fn empty_path() {
    assert_eq!(
        invalid("[tls]\ncertificate = \"\"\nprivate_key = \"k.pem\""),
        "/etc/smtpguard/smtpguard.toml: tls.certificate is an empty path"
    );
    assert_eq!(
        invalid("[policy]\ndeny_list = \"\""),
        "/etc/smtpguard/smtpguard.toml: policy.deny_list is an empty path"
    );
}

#[test]
fn listen_unparsable() {
    let e = error("[server]\nlisten = [\"0.0.0.0:25\", \"mail.example.com:25\"]");
    assert_eq!(
        e.to_string(),
        "/etc/smtpguard/smtpguard.toml: server.listen[1] = \"mail.example.com:25\" is not an \
         IP address and port such as \"0.0.0.0:25\" or \"[::]:25\""
    );
    assert!(e.source().unwrap().is::<std::net::AddrParseError>());
    // No port: a common slip.
    assert_eq!(
        invalid("[server]\nlisten = [\"0.0.0.0\"]"),
        "/etc/smtpguard/smtpguard.toml: server.listen[0] = \"0.0.0.0\" is not an \
         IP address and port such as \"0.0.0.0:25\" or \"[::]:25\""
    );
}

#[test]
fn listen_empty_duplicate_and_port_zero() {
    assert_eq!(
        invalid("[server]\nlisten = []"),
        "/etc/smtpguard/smtpguard.toml: server.listen is empty; give at least one address \
         such as \"0.0.0.0:25\""
    );
    assert_eq!(
        invalid("[server]\nlisten = [\"0.0.0.0:25\", \"0.0.0.0:25\"]"),
        "/etc/smtpguard/smtpguard.toml: server.listen[1] = \"0.0.0.0:25\" is listed twice"
    );
    assert_eq!(
        invalid("[server]\nlisten = [\"0.0.0.0:0\"]"),
        "/etc/smtpguard/smtpguard.toml: server.listen[0] = \"0.0.0.0:0\" has port 0; \
         give a real port"
    );
}

#[test]
fn more_than_eight_distinct_ports() {
    let listen: Vec<String> = (2525..2534).map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    assert_eq!(
        invalid(&format!("[server]\nlisten = [{}]", listen.join(", "))),
        "/etc/smtpguard/smtpguard.toml: server.listen has 9 distinct ports; \
         the XDP filter can guard at most 8"
    );
}

#[test]
fn max_connections_zero() {
    assert_eq!(
        invalid("[server]\nmax_connections = 0"),
        "/etc/smtpguard/smtpguard.toml: server.max_connections is 0; it must be at least 1, \
         or \"unlimited\""
    );
}

#[test]
fn max_connections_not_a_count() {
    assert_eq!(
        invalid("[server]\nmax_connections = -5"),
        "/etc/smtpguard/smtpguard.toml: server.max_connections = -5 is not a count; \
         write a positive integer or \"unlimited\""
    );
    assert_eq!(
        invalid("[server]\nmax_connections = \"lots\""),
        "/etc/smtpguard/smtpguard.toml: server.max_connections = \"lots\" is not a count; \
         write a positive integer or \"unlimited\""
    );
    assert_eq!(
        invalid("[server]\nmax_connections_per_client = \"none\""),
        "/etc/smtpguard/smtpguard.toml: server.max_connections_per_client = \"none\" is not \
         a count; write 0 (no limit), a positive integer or \"unlimited\""
    );
    for bits in [0, 129] {
        assert_eq!(
            invalid(&format!(
                "[server]\nmax_connections_per_client_ipv6_prefix = {bits}"
            )),
            format!(
                "/etc/smtpguard/smtpguard.toml: server.max_connections_per_client_ipv6_prefix \
                 is {bits}; it must be a prefix length from 1 to 128"
            )
        );
    }
    let c = parse("[server]\nmax_connections_per_client_ipv6_prefix = 56");
    assert_eq!(c.server.max_connections_per_client_ipv6_prefix, 56);
}

#[test]
fn duration_as_bare_integer() {
    assert_eq!(
        invalid("[server]\nidle_timeout = 300"),
        "/etc/smtpguard/smtpguard.toml: server.idle_timeout = 300 has no unit; \
         write it with one, e.g. \"5m\" or \"300s\""
    );
}

#[test]
fn duration_unparsable() {
    let e = error("[tls]\nhandshake_timeout = \"half a minute\"");
    assert_eq!(
        e.to_string(),
        "/etc/smtpguard/smtpguard.toml: tls.handshake_timeout = \"half a minute\" is not a \
         duration such as \"5m\" or \"300s\""
    );
    assert!(e.source().unwrap().is::<humantime::DurationError>());
}

#[test]
fn duration_zero() {
    assert_eq!(
        invalid("[server]\nidle_timeout = \"0s\""),
        "/etc/smtpguard/smtpguard.toml: server.idle_timeout = \"0s\" is zero; it must be longer"
    );
    assert_eq!(
        invalid("[delivery]\nupstream = \"127.0.0.1:10025\"\nupstream_timeout = \"0m\""),
        "/etc/smtpguard/smtpguard.toml: delivery.upstream_timeout = \"0m\" is zero; \
         it must be longer"
    );
}

#[test]
fn zero_limits() {
    for key in ["max_message_size_bytes", "max_recipients", "max_errors"] {
        assert_eq!(
            invalid(&format!("[server]\n{key} = 0")),
            format!("/etc/smtpguard/smtpguard.toml: server.{key} is 0; it must be at least 1")
        );
    }
}

#[test]
fn bad_hostname() {
    assert_eq!(
        invalid("[server]\nhostname = \"mail_1.example.com\""),
        "/etc/smtpguard/smtpguard.toml: server.hostname = \"mail_1.example.com\" is not a \
         host name (letters, digits and '-' in dot-separated labels of 1 to 63 characters)"
    );
    assert_eq!(
        invalid("[server]\nhostname = \"192.0.2.1\""),
        "/etc/smtpguard/smtpguard.toml: server.hostname = \"192.0.2.1\" is an IP address, \
         not a host name"
    );
    assert_eq!(
        invalid("[server]\nhostname = \"mäil.example\""),
        "/etc/smtpguard/smtpguard.toml: server.hostname = \"mäil.example\" is not ASCII; \
         write an internationalized name in its xn-- form"
    );
}

#[test]
fn bad_interface() {
    assert_eq!(
        invalid("[xdp]\ninterfaces = [\"eth0\", \"averyveryverylongname\"]"),
        "/etc/smtpguard/smtpguard.toml: xdp.interfaces[1] = \"averyveryverylongname\" is not \
         an interface name (1 to 15 bytes, no '/', ':' or white space)"
    );
    assert_eq!(
        invalid("[xdp]\ninterfaces = [\"eth0\", \"eth0\"]"),
        "/etc/smtpguard/smtpguard.toml: xdp.interfaces[1] = \"eth0\" is listed twice"
    );
    assert_eq!(
        invalid("[xdp]\nmode = \"native\""),
        "/etc/smtpguard/smtpguard.toml: xdp.mode is \"native\" but xdp.interfaces is empty"
    );
}

#[test]
fn relay_network_not_a_network() {
    let e = error("[delivery]\nrelay_networks = [\"192.0.2.0/24\", \"192.0.2.1\"]");
    assert_eq!(
        e.to_string(),
        "/etc/smtpguard/smtpguard.toml: delivery.relay_networks[1] = \"192.0.2.1\" is not a \
         network such as \"192.0.2.0/24\", \"2001:db8::/32\" or \"192.0.2.7/32\""
    );
    assert!(e.source().unwrap().is::<ipnet::AddrParseError>());
}

#[test]
fn relay_network_with_host_bits() {
    assert_eq!(
        invalid("[delivery]\nrelay_networks = [\"192.0.2.1/24\"]"),
        "/etc/smtpguard/smtpguard.toml: delivery.relay_networks[0] = \"192.0.2.1/24\" has \
         host bits set; write \"192.0.2.0/24\""
    );
    assert_eq!(
        invalid("[delivery]\nrelay_networks = [\"2001:db8::1/32\"]"),
        "/etc/smtpguard/smtpguard.toml: delivery.relay_networks[0] = \"2001:db8::1/32\" has \
         host bits set; write \"2001:db8::/32\""
    );
}

#[test]
fn open_relay_needs_allow_open_relay() {
    for net in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96"] {
        assert_eq!(
            invalid(&format!(
                "[delivery]\nrelay_networks = [\"192.0.2.0/24\", \"{net}\"]"
            )),
            format!(
                "/etc/smtpguard/smtpguard.toml: delivery.relay_networks[1] = \"{net}\" lets \
                 every client relay (an open relay); set delivery.allow_open_relay = true if \
                 that is really meant"
            )
        );
        let c = Config::from_toml_str(
            &format!("[delivery]\nrelay_networks = [\"{net}\"]\nallow_open_relay = true"),
            Path::new(FILE),
        )
        .unwrap();
        let Delivery::Spool(spool) = c.delivery else {
            panic!("not spool")
        };
        assert_eq!(spool.relay_networks[0].prefix_len(), 0);
    }
    assert_eq!(
        invalid("[delivery]\nupstream = \"192.0.2.1:10025\"\nallow_open_relay = true"),
        "/etc/smtpguard/smtpguard.toml: delivery.allow_open_relay applies only to spool \
         delivery, but delivery.upstream is set"
    );
}

#[test]
fn upstream_must_not_be_our_own_listener() {
    for (listen, upstream) in [
        ("127.0.0.1:2525", "127.0.0.1:2525"),
        ("0.0.0.0:25", "127.0.0.1:25"),
        ("0.0.0.0:25", "127.0.0.2:25"),
        ("[::]:25", "[::1]:25"),
        ("[::]:25", "127.0.0.1:25"),
        ("127.0.0.1:25", "0.0.0.0:25"),
        ("127.0.0.1:25", "[::ffff:127.0.0.1]:25"),
    ] {
        let text =
            format!("[server]\nlisten = [\"{listen}\"]\n[delivery]\nupstream = \"{upstream}\"");
        assert_eq!(
            invalid(&text),
            format!(
                "/etc/smtpguard/smtpguard.toml: delivery.upstream = \"{upstream}\" is \
                 smtpguard's own listener {listen} (server.listen): mail would loop back \
                 into smtpguard; give the MTA's address"
            ),
            "{listen} {upstream}"
        );
    }
    // Another port, or a non-local address on the same port, is fine.
    for (listen, upstream) in [
        ("0.0.0.0:25", "127.0.0.1:10025"),
        ("127.0.0.1:25", "198.51.100.7:25"),
        ("[::1]:25", "127.0.0.1:25"),
    ] {
        let text =
            format!("[server]\nlisten = [\"{listen}\"]\n[delivery]\nupstream = \"{upstream}\"");
        Config::from_toml_str(&text, Path::new(FILE)).expect(&text);
    }
}

#[test]
fn upstream_loop_counts_the_hosts_own_addresses() {
    use super::validate::upstream_is_own_listener as own;
    let local: Vec<std::net::IpAddr> =
        vec!["192.0.2.5".parse().unwrap(), "2001:db8::5".parse().unwrap()];
    let wild4 = [addr("0.0.0.0:25")];
    let wild6 = [addr("[::]:25")];
    assert_eq!(own(&wild4, addr("192.0.2.5:25"), &local), Some(wild4[0]));
    assert_eq!(
        own(&wild6, addr("[2001:db8::5]:25"), &local),
        Some(wild6[0])
    );
    assert_eq!(own(&wild6, addr("192.0.2.5:25"), &local), Some(wild6[0]));
    assert_eq!(own(&wild4, addr("192.0.2.6:25"), &local), None);
    assert_eq!(own(&wild4, addr("192.0.2.5:26"), &local), None);
    assert_eq!(
        own(&[addr("192.0.2.9:25")], addr("192.0.2.5:25"), &local),
        None
    );
}

#[test]
fn bad_accept_domain() {
    assert_eq!(
        invalid("[delivery]\naccept_domains = [\"example..com\"]"),
        "/etc/smtpguard/smtpguard.toml: delivery.accept_domains[0] = \"example..com\" is not \
         a host name (letters, digits and '-' in dot-separated labels of 1 to 63 characters)"
    );
    assert_eq!(
        invalid("[delivery]\naccept_domains = [\"example.com\", \"EXAMPLE.com\"]"),
        "/etc/smtpguard/smtpguard.toml: delivery.accept_domains[1] = \"EXAMPLE.com\" is \
         listed twice"
    );
}

#[test]
fn spool_keys_with_upstream() {
    assert_eq!(
        invalid("[delivery]\nupstream = \"127.0.0.1:10025\"\nrelay_networks = []"),
        "/etc/smtpguard/smtpguard.toml: delivery.relay_networks applies only to spool \
         delivery, but delivery.upstream is set"
    );
}

#[test]
fn upstream_keys_without_upstream() {
    assert_eq!(
        invalid("[delivery]\nupstream_protocol = \"xclient\""),
        "/etc/smtpguard/smtpguard.toml: delivery.upstream_protocol is set but \
         delivery.upstream is not (without it mail is spooled)"
    );
}

#[test]
fn upstream_unparsable() {
    assert_eq!(
        invalid("[delivery]\nupstream = \"localhost:10025\""),
        "/etc/smtpguard/smtpguard.toml: delivery.upstream = \"localhost:10025\" is not an \
         IP address and port such as \"127.0.0.1:10025\""
    );
}

#[test]
fn metrics_listen_unparsable() {
    assert_eq!(
        invalid("[metrics]\nlisten = \":9325\""),
        "/etc/smtpguard/smtpguard.toml: metrics.listen = \":9325\" is not an IP address and \
         port such as \"127.0.0.1:9325\""
    );
}

#[test]
fn control_socket_too_long() {
    let long = format!("/run/{}/control.sock", "x".repeat(100));
    assert_eq!(
        invalid(&format!("[control]\nsocket = {long:?}")),
        "/etc/smtpguard/smtpguard.toml: control.socket is 118 bytes long; \
         a Unix socket path can have at most 107"
    );
}

#[test]
fn bad_log_level() {
    assert_eq!(
        invalid("[logging]\nlevel = \"verbose\""),
        "/etc/smtpguard/smtpguard.toml: logging.level = \"verbose\" is not a log level; \
         write \"off\", \"error\", \"warn\", \"info\", \"debug\" or \"trace\""
    );
}

/// The configuration the Debian package installs is valid, and keeps the
/// lists in the unit's state directory (the unit keeps /etc read-only).
#[test]
fn packaged_configuration_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/smtpguard.toml");
    let c = Config::load(path).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(c.server.listen, vec![addr("0.0.0.0:25"), addr("[::]:25")]);
    assert!(c.policy.deny_list.starts_with("/var/lib/smtpguard"));
    assert!(c.policy.permit_list.starts_with("/var/lib/smtpguard"));
    assert_eq!(
        c.control.socket,
        PathBuf::from("/run/smtpguard/control.sock")
    );
}

#[test]
fn protected_ranges_take_list_entry_syntax() {
    let c = parse("[policy]\nprotected = [\"192.0.2.10\", \"198.51.100.0:255.255.255.0\", \"203.0.113.1-203.0.113.2\"]");
    let got: Vec<String> = c.policy.protected.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        got,
        [
            "192.0.2.10/32",
            "198.51.100.0/24",
            "203.0.113.1/32",
            "203.0.113.2/32"
        ]
    );
    assert!(parse("").policy.protected.is_empty());
    let e = error("[policy]\nprotected = [\"192.0.2.300\"]");
    assert!(
        e.to_string().starts_with(
            "/etc/smtpguard/smtpguard.toml: policy.protected[0] = \"192.0.2.300\" is not a network"
        ),
        "{e}"
    );
    assert!(e.source().is_some());
}

#[test]
fn screening_and_bans_defaults_and_values() {
    let c = parse("");
    assert_eq!(c.screening.greet_wait, Some(Duration::from_secs(6)));
    assert_eq!(c.screening.greet_action, GreetAction::Ignore);
    assert_eq!(c.screening.greet_banner.as_deref(), Some("ESMTP"));
    assert_eq!(
        c.screening.pass_cache_ttl,
        Some(Duration::from_secs(24 * 3600))
    );
    assert_eq!(c.screening.max_waiting, 1000);
    assert_eq!(c.bans.ban_after.map(|n| n.get()), Some(3));
    assert_eq!(c.bans.ban_for, Duration::from_secs(3600));
    assert_eq!(c.bans.max_ban_for, Duration::from_secs(24 * 3600));
    let c = parse(
        r#"
        [screening]
        greet_wait = "0s"
        greet_action = "drop"
        greet_banner = ""
        pass_cache_ttl = "0s"
        max_waiting = 5
        [bans]
        ban_after = 0
        ban_for = "2d"
        "#,
    );
    assert_eq!(c.screening.greet_wait, None);
    assert_eq!(c.screening.greet_action, GreetAction::Drop);
    assert_eq!(c.screening.greet_banner, None);
    assert_eq!(c.screening.pass_cache_ttl, None);
    assert_eq!(c.screening.max_waiting, 5);
    assert_eq!(c.bans.ban_after, None);
    // max_ban_for unset follows a longer ban_for.
    assert_eq!(c.bans.max_ban_for, Duration::from_secs(2 * 24 * 3600));
}

#[test]
fn screening_and_bans_errors_name_the_key() {
    for (text, needle) in [
        (
            "[screening]\ngreet_wait = 6\n",
            "screening.greet_wait = 6 has no unit",
        ),
        (
            "[screening]\ngreet_wait = \"10m\"\n",
            "screening.greet_wait is longer than",
        ),
        (
            "[screening]\nmax_waiting = 0\n",
            "screening.max_waiting is 0",
        ),
        (
            "[screening]\ngreet_banner = \"a\\r\\nb\"\n",
            "screening.greet_banner",
        ),
        ("[bans]\ngrowth = 0\n", "bans.growth is 0"),
        (
            "[bans]\nban_for = \"2h\"\nmax_ban_for = \"1h\"\n",
            "bans.max_ban_for = \"1h\" is shorter than bans.ban_for",
        ),
        ("[bans]\nwindow = \"0s\"\n", "bans.window = \"0s\" is zero"),
    ] {
        let e = Config::from_toml_str(text, Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains(needle), "{text}: {e}");
    }
    let e = Config::from_toml_str(
        "[screening]\ngreet_action = \"reject\"\n",
        Path::new("t.toml"),
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
}

#[test]
fn rate_limit_defaults_and_values() {
    let c = parse("");
    assert_eq!(
        c.rate_limit,
        RateLimitConfig {
            syns_per_minute: 0,
            ipv6_prefix: 64,
            exempt_permitted: true,
            table_size: 131_072,
        }
    );
    let c = parse(
        "[rate_limit]\nsyns_per_minute = 30\nipv6_prefix = 56\nexempt_permitted = false\n\
         table_size = 1000\n",
    );
    assert_eq!(
        c.rate_limit,
        RateLimitConfig {
            syns_per_minute: 30,
            ipv6_prefix: 56,
            exempt_permitted: false,
            table_size: 1000,
        }
    );
}

#[test]
fn rate_limit_errors_name_the_key() {
    assert_eq!(
        invalid("[rate_limit]\nsyns_per_minute = -1"),
        "/etc/smtpguard/smtpguard.toml: rate_limit.syns_per_minute is -1; it must be 0 (off) \
         or a number of SYNs per minute up to 60000"
    );
    assert_eq!(
        invalid("[rate_limit]\nipv6_prefix = 0"),
        "/etc/smtpguard/smtpguard.toml: rate_limit.ipv6_prefix is 0; it must be a prefix \
         length from 1 to 128"
    );
    assert_eq!(
        invalid("[rate_limit]\ntable_size = 0"),
        "/etc/smtpguard/smtpguard.toml: rate_limit.table_size is 0; it must be a number of \
         clients from 1 to 16777216"
    );
    let detail = error("[rate_limit]\nsyns_per_min = 3")
        .source()
        .unwrap()
        .to_string();
    assert!(detail.contains("unknown field `syns_per_min`"), "{detail}");
}
