//! From the file as written ([`super::raw`]) to a [`Config`]: defaults,
//! parsing, and checks across keys. Every message names the key.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use tracing::level_filters::LevelFilter;

use super::{
    raw::{self, Count, DurationValue, RawConfig, Scalar},
    BareLf, Config, ConfigError, ControlConfig, Delivery, Enforcement, LogFormat, LoggingConfig,
    MetricsConfig, PolicyConfig, PolicyMode, RateLimitConfig, ServerConfig, SpoolDelivery,
    TlsConfig, TlsFiles, TlsMode, UpstreamDelivery, UpstreamProtocol, XdpConfig, XdpMode,
    MAX_LISTEN_PORTS, MAX_SOCKET_PATH_BYTES,
};

const DEFAULT_LISTEN: [&str; 2] = ["0.0.0.0:25", "[::]:25"];
const DEFAULT_MAX_CONNECTIONS: usize = 100;
const DEFAULT_PER_CLIENT_IPV6_PREFIX: u8 = 64;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const DEFAULT_MAX_SESSION_DURATION: Duration = Duration::from_secs(30 * 60);
const DEFAULT_MAX_MESSAGE_SIZE_BYTES: u64 = 50 * 1024 * 1024;
const DEFAULT_MAX_RECIPIENTS: u32 = 100;
const DEFAULT_MAX_ERRORS: u32 = 10;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_DENY_LIST: &str = "/etc/smtpguard/deny.list";
const DEFAULT_PERMIT_LIST: &str = "/etc/smtpguard/permit.list";
const DEFAULT_XDP_LOG_RATE_PER_SECOND: u32 = 10;
const DEFAULT_RATE_IPV6_PREFIX: u8 = 64;
/// One SYN per millisecond: beyond it, a "limit" is no limit.
const MAX_SYNS_PER_MINUTE: i64 = 60_000;
const MIN_RATE_TABLE_SIZE: i64 = 1;
/// 16M clients: about 1.6 GB of kernel memory, more than any gateway needs.
const MAX_RATE_TABLE_SIZE: i64 = 1 << 24;
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_SPOOL_DIR: &str = "/var/spool/smtpguard";
const DEFAULT_CONTROL_SOCKET: &str = "/run/smtpguard/control.sock";
const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(10);

/// Linux interface names are at most `IFNAMSIZ - 1` bytes.
const MAX_INTERFACE_NAME_BYTES: usize = 15;

mod defence;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub(super) fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
    let cx = Cx { path };
    let config = Config {
        server: cx.server(raw.server)?,
        tls: cx.tls(raw.tls)?,
        policy: cx.policy(raw.policy)?,
        xdp: cx.xdp(raw.xdp)?,
        delivery: cx.delivery(raw.delivery)?,
        control: cx.control(raw.control)?,
        logging: cx.logging(raw.logging)?,
        metrics: cx.metrics(raw.metrics)?,
        screening: cx.screening(raw.screening)?,
        bans: cx.bans(raw.bans)?,
        rate_limit: cx.rate_limit(raw.rate_limit)?,
        dnsbl: raw.dnsbl.map(|d| cx.dnsbl(d)).transpose()?,
        fleet: raw
            .fleet
            .map(|f| super::fleet::validate(f, path))
            .transpose()?,
    };
    if let Delivery::Upstream(up) = &config.delivery {
        let local = host_addresses();
        if let Some(listener) = upstream_is_own_listener(&config.server.listen, up.address, &local)
        {
            return Err(cx.invalid(
                "delivery.upstream",
                format!(
                    "= \"{}\" is smtpguard's own listener {listener} (server.listen): mail \
                     would loop back into smtpguard; give the MTA's address",
                    up.address
                ),
            ));
        }
    }
    Ok(config)
}

/// The addresses of this host's interfaces (empty if they cannot be
/// listed; loopback and the wildcard are judged without them).
fn host_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|ifa| {
            let a = ifa.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// The listener in `listen` that a connection to `upstream` would reach,
/// if any: same port, and the same address, or a wildcard listener
/// (`0.0.0.0`, `[::]`) and an address of this host (`local`, loopback,
/// the unspecified address). `[::]` counts for IPv4 too (it may be
/// dual-stack). IPv4-mapped IPv6 is judged as IPv4.
pub(super) fn upstream_is_own_listener(
    listen: &[SocketAddr],
    upstream: SocketAddr,
    local: &[IpAddr],
) -> Option<SocketAddr> {
    let target = upstream.ip().to_canonical();
    let is_local = target.is_loopback()
        || target.is_unspecified()
        || local.iter().any(|a| a.to_canonical() == target);
    listen.iter().copied().find(|l| {
        if l.port() != upstream.port() {
            return false;
        }
        let ip = l.ip().to_canonical();
        if ip.is_unspecified() {
            let family_ok = l.is_ipv6() || target.is_ipv4();
            return family_ok && is_local;
        }
        // Connecting to 0.0.0.0 / [::] reaches the host itself.
        ip == target || (target.is_unspecified() && ip.is_ipv4() == target.is_ipv4())
    })
}

/// What a duration key may be besides positive.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zero {
    Refused,
    Allowed,
}

struct Cx<'a> {
    path: &'a Path,
}

/// The longest duration any key accepts: one year.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The largest connection count: far above what one host serves, far
/// below what the semaphore behind it can hold.
const MAX_COUNT: usize = 1_000_000;

impl Cx<'_> {
    /// `[dnsbl]`: validated by its own module, which names the key.
    fn dnsbl(
        &self,
        raw: crate::dnsbl::config::RawDnsbl,
    ) -> Result<crate::dnsbl::DnsblConfig, ConfigError> {
        crate::dnsbl::DnsblConfig::from_raw(raw).map_err(|e| match e {
            crate::dnsbl::DnsblError::Invalid { key, problem } => {
                self.invalid(&format!("dnsbl.{key}"), problem)
            }
            other => self.invalid("dnsbl", other.to_string()),
        })
    }

    fn invalid(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            problem: problem.into(),
            source: None,
        }
    }

    fn invalid_because(
        &self,
        key: &str,
        problem: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            problem: problem.into(),
            source: Some(source.into()),
        }
    }

    // ----- [server] -------------------------------------------------------

    fn server(&self, raw: raw::RawServer) -> Result<ServerConfig, ConfigError> {
        let hostname = match raw.hostname {
            Some(name) => {
                if let Some(problem) = host_name_problem(&name) {
                    return Err(self.invalid("server.hostname", format!("= {name:?} {problem}")));
                }
                name
            }
            None => self.machine_hostname()?,
        };

        let listen = self.listen(raw.listen)?;

        let max_connections = match raw.max_connections {
            None => NonZeroUsize::new(DEFAULT_MAX_CONNECTIONS),
            Some(Count(value)) => {
                let key = "server.max_connections";
                match self.count(key, &value, "a positive integer or \"unlimited\"")? {
                    Some(0) => {
                        return Err(
                            self.invalid(key, "is 0; it must be at least 1, or \"unlimited\"")
                        )
                    }
                    Some(n) => NonZeroUsize::new(n),
                    None => None,
                }
            }
        };
        let max_connections_per_client = match raw.max_connections_per_client {
            None => None,
            Some(Count(value)) => self
                .count(
                    "server.max_connections_per_client",
                    &value,
                    "0 (no limit), a positive integer or \"unlimited\"",
                )?
                .and_then(NonZeroUsize::new),
        };

        let max_connections_per_client_ipv6_prefix =
            match raw.max_connections_per_client_ipv6_prefix {
                None => DEFAULT_PER_CLIENT_IPV6_PREFIX,
                Some(bits @ 1..=128) => bits as u8,
                Some(bits) => {
                    return Err(self.invalid(
                        "server.max_connections_per_client_ipv6_prefix",
                        format!("is {bits}; it must be a prefix length from 1 to 128"),
                    ))
                }
            };

        let idle_timeout = self.duration(
            "server.idle_timeout",
            raw.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
            Zero::Refused,
        )?;
        let max_session_duration = self.duration(
            "server.max_session_duration",
            raw.max_session_duration,
            DEFAULT_MAX_SESSION_DURATION,
            Zero::Refused,
        )?;
        let shutdown_grace = self.duration(
            "server.shutdown_grace",
            raw.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE,
            Zero::Allowed,
        )?;

        let max_message_size_bytes = self.at_least_one(
            "server.max_message_size_bytes",
            raw.max_message_size_bytes,
            DEFAULT_MAX_MESSAGE_SIZE_BYTES,
        )?;
        let max_recipients = self.at_least_one(
            "server.max_recipients",
            raw.max_recipients,
            DEFAULT_MAX_RECIPIENTS,
        )?;
        let max_errors =
            self.at_least_one("server.max_errors", raw.max_errors, DEFAULT_MAX_ERRORS)?;

        Ok(ServerConfig {
            hostname,
            listen,
            max_connections,
            max_connections_per_client,
            max_connections_per_client_ipv6_prefix,
            idle_timeout,
            max_session_duration,
            max_message_size_bytes,
            max_recipients,
            max_errors,
            bare_lf: raw.bare_lf.unwrap_or(BareLf::Reject),
            shutdown_grace,
            close_denied_sessions: raw.close_denied_sessions.unwrap_or(true),
        })
    }

    fn machine_hostname(&self) -> Result<String, ConfigError> {
        let key = "server.hostname";
        let name = gethostname().map_err(|e| {
            self.invalid_because(
                key,
                "is not set and the machine's host name cannot be read; set server.hostname",
                e,
            )
        })?;
        if let Some(problem) = host_name_problem(&name) {
            return Err(self.invalid(
                key,
                format!(
                    "is not set and the machine's host name {name:?} {problem}; set server.hostname"
                ),
            ));
        }
        Ok(name)
    }

    fn listen(&self, raw: Option<Vec<String>>) -> Result<Vec<SocketAddr>, ConfigError> {
        let Some(entries) = raw else {
            return Ok(DEFAULT_LISTEN
                .iter()
                .map(|s| s.parse().expect("default listen addresses parse"))
                .collect());
        };
        if entries.is_empty() {
            return Err(self.invalid(
                "server.listen",
                "is empty; give at least one address such as \"0.0.0.0:25\"",
            ));
        }
        let mut listen: Vec<SocketAddr> = Vec::with_capacity(entries.len());
        for (i, text) in entries.iter().enumerate() {
            let key = format!("server.listen[{i}]");
            let addr = self.socket_addr(&key, text, "\"0.0.0.0:25\" or \"[::]:25\"")?;
            if addr.port() == 0 {
                return Err(self.invalid(&key, format!("= {text:?} has port 0; give a real port")));
            }
            if listen.contains(&addr) {
                return Err(self.invalid(&key, format!("= {text:?} is listed twice")));
            }
            listen.push(addr);
        }
        let ports: BTreeSet<u16> = listen.iter().map(SocketAddr::port).collect();
        if ports.len() > MAX_LISTEN_PORTS {
            return Err(self.invalid(
                "server.listen",
                format!(
                    "has {} distinct ports; the XDP filter can guard at most {MAX_LISTEN_PORTS}",
                    ports.len()
                ),
            ));
        }
        Ok(listen)
    }

    // ----- [tls] ----------------------------------------------------------

    fn tls(&self, raw: raw::RawTls) -> Result<TlsConfig, ConfigError> {
        let mode = raw.mode.unwrap_or(TlsMode::Off);
        let certificate = self.optional_path("tls.certificate", raw.certificate)?;
        let private_key = self.optional_path("tls.private_key", raw.private_key)?;
        let ca_certificate = self.optional_path("tls.ca_certificate", raw.ca_certificate)?;

        if mode != TlsMode::Off {
            let mode_word = match mode {
                TlsMode::Optional => "optional",
                _ => "required",
            };
            for (key, value) in [
                ("tls.certificate", &certificate),
                ("tls.private_key", &private_key),
            ] {
                if value.is_none() {
                    return Err(
                        self.invalid("tls.mode", format!("is {mode_word:?} but {key} is not set"))
                    );
                }
            }
        }
        let files = match (certificate, private_key) {
            (Some(certificate), Some(private_key)) => Some(TlsFiles {
                certificate,
                private_key,
                ca_certificate,
            }),
            (Some(_), None) => {
                return Err(self.invalid("tls.certificate", "is set but tls.private_key is not"))
            }
            (None, Some(_)) => {
                return Err(self.invalid("tls.private_key", "is set but tls.certificate is not"))
            }
            (None, None) => {
                if ca_certificate.is_some() {
                    return Err(
                        self.invalid("tls.ca_certificate", "is set but tls.certificate is not")
                    );
                }
                None
            }
        };

        let handshake_timeout = self.duration(
            "tls.handshake_timeout",
            raw.handshake_timeout,
            DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            Zero::Refused,
        )?;
        Ok(TlsConfig {
            mode,
            files,
            handshake_timeout,
        })
    }

    // ----- [policy] -------------------------------------------------------

    fn policy(&self, raw: raw::RawPolicy) -> Result<PolicyConfig, ConfigError> {
        let mode: PolicyMode = raw.mode.unwrap_or_default();
        let enforcement: Enforcement = raw.enforcement.unwrap_or_default();
        let mut protected = Vec::new();
        for (i, text) in raw.protected.unwrap_or_default().iter().enumerate() {
            let key = format!("policy.protected[{i}]");
            let parsed = crate::policy::parse_entry(text, crate::policy::EntryOptions::default())
                .map_err(|e| {
                self.invalid_because(&key, format!("= {text:?} is not a network"), e)
            })?;
            protected.extend(parsed.prefixes);
        }
        Ok(PolicyConfig {
            mode,
            enforcement,
            deny_list: self.path_or("policy.deny_list", raw.deny_list, DEFAULT_DENY_LIST)?,
            permit_list: self.path_or(
                "policy.permit_list",
                raw.permit_list,
                DEFAULT_PERMIT_LIST,
            )?,
            protected,
        })
    }

    // ----- [xdp] ----------------------------------------------------------

    fn xdp(&self, raw: raw::RawXdp) -> Result<XdpConfig, ConfigError> {
        let interfaces = raw.interfaces.unwrap_or_default();
        for (i, name) in interfaces.iter().enumerate() {
            let key = format!("xdp.interfaces[{i}]");
            if !valid_interface_name(name) {
                return Err(self.invalid(
                    &key,
                    format!(
                        "= {name:?} is not an interface name (1 to {MAX_INTERFACE_NAME_BYTES} bytes, \
                         no '/', ':' or white space)"
                    ),
                ));
            }
            if interfaces[..i].contains(name) {
                return Err(self.invalid(&key, format!("= {name:?} is listed twice")));
            }
        }
        let mode = raw.mode.unwrap_or(XdpMode::Auto);
        if interfaces.is_empty() && matches!(mode, XdpMode::Native | XdpMode::Skb) {
            let word = if mode == XdpMode::Native {
                "native"
            } else {
                "skb"
            };
            return Err(self.invalid(
                "xdp.mode",
                format!("is {word:?} but xdp.interfaces is empty"),
            ));
        }
        Ok(XdpConfig {
            interfaces,
            mode,
            log_rate_per_second: raw
                .log_rate_per_second
                .unwrap_or(DEFAULT_XDP_LOG_RATE_PER_SECOND),
        })
    }

    // ----- [rate_limit] ---------------------------------------------------

    fn rate_limit(&self, raw: raw::RawRateLimit) -> Result<RateLimitConfig, ConfigError> {
        let syns_per_minute = match raw.syns_per_minute {
            None => 0,
            Some(n @ 0..=MAX_SYNS_PER_MINUTE) => n as u32,
            Some(n) => {
                return Err(self.invalid(
                    "rate_limit.syns_per_minute",
                    format!(
                        "is {n}; it must be 0 (off) or a number of SYNs per minute up to \
                         {MAX_SYNS_PER_MINUTE}"
                    ),
                ))
            }
        };
        let ipv6_prefix = match raw.ipv6_prefix {
            None => DEFAULT_RATE_IPV6_PREFIX,
            Some(bits @ 1..=128) => bits as u8,
            Some(bits) => {
                return Err(self.invalid(
                    "rate_limit.ipv6_prefix",
                    format!("is {bits}; it must be a prefix length from 1 to 128"),
                ))
            }
        };
        let table_size = match raw.table_size {
            None => smtpguard_common::rate::DEFAULT_TABLE_SIZE,
            Some(n @ MIN_RATE_TABLE_SIZE..=MAX_RATE_TABLE_SIZE) => n as u32,
            Some(n) => {
                return Err(self.invalid(
                    "rate_limit.table_size",
                    format!(
                        "is {n}; it must be a number of clients from {MIN_RATE_TABLE_SIZE} to \
                         {MAX_RATE_TABLE_SIZE}"
                    ),
                ))
            }
        };
        Ok(RateLimitConfig {
            syns_per_minute,
            ipv6_prefix,
            exempt_permitted: raw.exempt_permitted.unwrap_or(true),
            table_size,
        })
    }

    // ----- [delivery] -----------------------------------------------------

    fn delivery(&self, raw: raw::RawDelivery) -> Result<Delivery, ConfigError> {
        if let Some(text) = raw.upstream {
            for (key, present) in [
                ("delivery.spool_dir", raw.spool_dir.is_some()),
                ("delivery.accept_domains", raw.accept_domains.is_some()),
                ("delivery.relay_networks", raw.relay_networks.is_some()),
                ("delivery.allow_open_relay", raw.allow_open_relay.is_some()),
            ] {
                if present {
                    return Err(self.invalid(
                        key,
                        "applies only to spool delivery, but delivery.upstream is set",
                    ));
                }
            }
            let address = self.socket_addr("delivery.upstream", &text, "\"127.0.0.1:10025\"")?;
            if address.port() == 0 {
                return Err(self.invalid(
                    "delivery.upstream",
                    format!("= {text:?} has port 0; give the MTA's port"),
                ));
            }
            return Ok(Delivery::Upstream(UpstreamDelivery {
                address,
                protocol: raw.upstream_protocol.unwrap_or(UpstreamProtocol::ProxyV2),
                timeout: self.duration(
                    "delivery.upstream_timeout",
                    raw.upstream_timeout,
                    DEFAULT_UPSTREAM_TIMEOUT,
                    Zero::Refused,
                )?,
            }));
        }

        for (key, present) in [
            (
                "delivery.upstream_protocol",
                raw.upstream_protocol.is_some(),
            ),
            ("delivery.upstream_timeout", raw.upstream_timeout.is_some()),
        ] {
            if present {
                return Err(self.invalid(
                    key,
                    "is set but delivery.upstream is not (without it mail is spooled)",
                ));
            }
        }

        let mut accept_domains: Vec<String> = Vec::new();
        for (i, domain) in raw.accept_domains.unwrap_or_default().iter().enumerate() {
            let key = format!("delivery.accept_domains[{i}]");
            if let Some(problem) = host_name_problem(domain) {
                return Err(self.invalid(&key, format!("= {domain:?} {problem}")));
            }
            let lower = domain.to_ascii_lowercase();
            if accept_domains.contains(&lower) {
                return Err(self.invalid(&key, format!("= {domain:?} is listed twice")));
            }
            accept_domains.push(lower);
        }

        let mut relay_networks: Vec<IpNet> = Vec::new();
        for (i, text) in raw.relay_networks.unwrap_or_default().iter().enumerate() {
            let key = format!("delivery.relay_networks[{i}]");
            let net = IpNet::from_str(text).map_err(|e| {
                self.invalid_because(
                    &key,
                    format!(
                        "= {text:?} is not a network such as \"192.0.2.0/24\", \
                         \"2001:db8::/32\" or \"192.0.2.7/32\""
                    ),
                    e,
                )
            })?;
            if net.trunc() != net {
                return Err(self.invalid(
                    &key,
                    format!("= {text:?} has host bits set; write \"{}\"", net.trunc()),
                ));
            }
            // Clients are judged as IPv4 when they come as ::ffff:a.b.c.d,
            // so an IPv4-mapped network must be stored as IPv4 to match.
            let net = crate::policy::canonical_prefix(net);
            if net.prefix_len() == 0 && raw.allow_open_relay != Some(true) {
                return Err(self.invalid(
                    &key,
                    format!(
                        "= {text:?} lets every client relay (an open relay); set \
                         delivery.allow_open_relay = true if that is really meant"
                    ),
                ));
            }
            if relay_networks.contains(&net) {
                return Err(self.invalid(&key, format!("= {text:?} is listed twice")));
            }
            relay_networks.push(net);
        }

        Ok(Delivery::Spool(SpoolDelivery {
            dir: self.path_or("delivery.spool_dir", raw.spool_dir, DEFAULT_SPOOL_DIR)?,
            accept_domains,
            relay_networks,
        }))
    }

    // ----- [control], [logging], [metrics] -------------------------------

    fn control(&self, raw: raw::RawControl) -> Result<ControlConfig, ConfigError> {
        let socket = self.path_or("control.socket", raw.socket, DEFAULT_CONTROL_SOCKET)?;
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH_BYTES {
            return Err(self.invalid(
                "control.socket",
                format!(
                    "is {len} bytes long; a Unix socket path can have at most \
                     {MAX_SOCKET_PATH_BYTES}"
                ),
            ));
        }
        Ok(ControlConfig { socket })
    }

    fn logging(&self, raw: raw::RawLogging) -> Result<LoggingConfig, ConfigError> {
        let level = match raw.level.as_deref() {
            None | Some("info") => LevelFilter::INFO,
            Some("off") => LevelFilter::OFF,
            Some("error") => LevelFilter::ERROR,
            Some("warn") => LevelFilter::WARN,
            Some("debug") => LevelFilter::DEBUG,
            Some("trace") => LevelFilter::TRACE,
            Some(other) => {
                return Err(self.invalid(
                    "logging.level",
                    format!(
                        "= {other:?} is not a log level; write \"off\", \"error\", \"warn\", \
                         \"info\", \"debug\" or \"trace\""
                    ),
                ))
            }
        };
        let stats_interval = self.duration(
            "logging.stats_interval",
            raw.stats_interval,
            DEFAULT_STATS_INTERVAL,
            Zero::Allowed,
        )?;
        Ok(LoggingConfig {
            format: raw.format.unwrap_or(LogFormat::Text),
            level,
            stats_interval: (!stats_interval.is_zero()).then_some(stats_interval),
        })
    }

    fn metrics(&self, raw: raw::RawMetrics) -> Result<MetricsConfig, ConfigError> {
        let listen = match raw.listen {
            None => None,
            Some(text) => {
                let addr = self.socket_addr("metrics.listen", &text, "\"127.0.0.1:9325\"")?;
                if addr.port() == 0 {
                    return Err(self.invalid(
                        "metrics.listen",
                        format!("= {text:?} has port 0; give a real port"),
                    ));
                }
                Some(addr)
            }
        };
        Ok(MetricsConfig { listen })
    }

    // ----- value helpers --------------------------------------------------

    fn socket_addr(&self, key: &str, text: &str, example: &str) -> Result<SocketAddr, ConfigError> {
        SocketAddr::from_str(text).map_err(|e| {
            self.invalid_because(
                key,
                format!("= {text:?} is not an IP address and port such as {example}"),
                e,
            )
        })
    }

    /// A duration key: absent → `default`; a humantime string → its value;
    /// a bare integer → refused, because its unit would be a guess.
    fn duration(
        &self,
        key: &str,
        raw: Option<DurationValue>,
        default: Duration,
        zero: Zero,
    ) -> Result<Duration, ConfigError> {
        let Some(DurationValue(value)) = raw else {
            return Ok(default);
        };
        let text = match &value {
            Scalar::Int(n) => {
                return Err(self.invalid(
                    key,
                    format!("= {n} has no unit; write it with one, e.g. \"5m\" or \"300s\""),
                ))
            }
            Scalar::Text(text) => text,
        };
        let duration = humantime::parse_duration(text).map_err(|e| {
            self.invalid_because(
                key,
                format!("= {text:?} is not a duration such as \"5m\" or \"300s\""),
                e,
            )
        })?;
        if duration.is_zero() && zero == Zero::Refused {
            return Err(self.invalid(key, format!("= {text:?} is zero; it must be longer")));
        }
        // Deadlines are added to clocks; a thousand-year timeout would
        // overflow them, and no gateway wants more than a year.
        if duration > MAX_DURATION {
            return Err(self.invalid(
                key,
                format!(
                    "= {text:?} is longer than the most allowed, {}",
                    humantime::format_duration(MAX_DURATION)
                ),
            ));
        }
        Ok(duration)
    }

    /// A connection count: `Some(n)` for an integer `n >= 0`, `None` for
    /// `"unlimited"`.
    fn count(
        &self,
        key: &str,
        value: &Scalar,
        expected: &str,
    ) -> Result<Option<usize>, ConfigError> {
        match value {
            Scalar::Text(word) if word == "unlimited" => Ok(None),
            Scalar::Int(n) if *n > MAX_COUNT as i64 => Err(self.invalid(
                key,
                format!("= {value} is more than the most allowed, {MAX_COUNT}; write \"unlimited\" for no limit"),
            )),
            Scalar::Int(n) => usize::try_from(*n).map(Some).map_err(|_| {
                self.invalid(key, format!("= {value} is not a count; write {expected}"))
            }),
            Scalar::Text(_) => {
                Err(self.invalid(key, format!("= {value} is not a count; write {expected}")))
            }
        }
    }

    fn at_least_one<T: Copy + PartialEq + From<u8>>(
        &self,
        key: &str,
        raw: Option<T>,
        default: T,
    ) -> Result<T, ConfigError> {
        match raw {
            None => Ok(default),
            Some(v) if v == T::from(0) => Err(self.invalid(key, "is 0; it must be at least 1")),
            Some(v) => Ok(v),
        }
    }

    fn optional_path(
        &self,
        key: &str,
        raw: Option<PathBuf>,
    ) -> Result<Option<PathBuf>, ConfigError> {
        match raw {
            Some(p) if p.as_os_str().is_empty() => Err(self.invalid(key, "is an empty path")),
            other => Ok(other),
        }
    }

    fn path_or(
        &self,
        key: &str,
        raw: Option<PathBuf>,
        default: &str,
    ) -> Result<PathBuf, ConfigError> {
        Ok(self
            .optional_path(key, raw)?
            .unwrap_or_else(|| PathBuf::from(default)))
    }
}

/// Why `name` cannot be a host or domain name (RFC 1123 §2.1 syntax:
/// letters, digits and hyphens in dot-separated labels of 1 to 63
/// characters, 253 in all, no hyphen at either end of a label), or `None`
/// if it can. Used for `server.hostname` and `delivery.accept_domains`.
fn host_name_problem(name: &str) -> Option<&'static str> {
    if name.parse::<IpAddr>().is_ok() {
        return Some("is an IP address, not a host name");
    }
    if !name.is_ascii() {
        return Some("is not ASCII; write an internationalized name in its xn-- form");
    }
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    if name.is_empty() || name.len() > 253 || !labels_ok {
        return Some(
            "is not a host name (letters, digits and '-' in dot-separated labels \
             of 1 to 63 characters)",
        );
    }
    None
}

/// Linux `dev_valid_name()`: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// white space.
fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_INTERFACE_NAME_BYTES
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// The machine's host name, from gethostname(2).
fn gethostname() -> io::Result<String> {
    // HOST_NAME_MAX is 64 on Linux; leave room for the terminating NUL.
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, and
    // gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..len].to_vec())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
pub(super) fn machine_hostname_for_tests() -> String {
    gethostname().expect("gethostname")
}
