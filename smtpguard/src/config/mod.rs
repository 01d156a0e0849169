//! The daemon's configuration: a TOML file, checked once into a typed
//! [`Config`].
//!
//! Reading happens in two steps. Serde reads the file into private "raw"
//! structs in which every key is optional and every table refuses unknown
//! keys (so a misspelt key is an error with toml's line and column, never a
//! silently ignored setting). Validation then fills in defaults, parses
//! addresses, durations and networks, checks keys against each other and
//! produces a [`Config`] whose fields need no further checking. Every
//! failure is a [`ConfigError`] naming the file, the key and the problem.
//!
//! # The file
//!
//! All tables and keys are optional; an empty file is a valid production
//! configuration (port 25 on all addresses, no TLS, no XDP, spool delivery).
//! Each key's default and unit are documented on the field it fills.
//!
//! ```toml
//! [server]
//! hostname = "mail.example.com"      # default: the machine's host name
//! listen = ["0.0.0.0:25", "[::]:25"]
//! max_connections = 100              # or "unlimited"
//! max_connections_per_client = 0     # 0 = no per-client cap
//! max_connections_per_client_ipv6_prefix = 64  # IPv6 clients count per /64
//! idle_timeout = "5m"
//! max_session_duration = "30m"
//! max_message_size_bytes = 52428800
//! max_recipients = 100
//! max_errors = 10
//! bare_lf = "reject"                 # or "normalize"
//! shutdown_grace = "30s"
//! close_denied_sessions = true
//!
//! [tls]
//! mode = "off"                       # off | optional | required
//! certificate = "/etc/smtpguard/tls/server.crt"
//! private_key = "/etc/smtpguard/tls/server.key"
//! ca_certificate = "/etc/smtpguard/tls/ca.crt"
//! handshake_timeout = "30s"
//!
//! [policy]
//! mode = "accept-all-except-deny"    # or "deny-all-except-permit"
//! enforcement = "enforce"            # or "monitor", "off"
//! deny_list = "/etc/smtpguard/deny.list"
//! permit_list = "/etc/smtpguard/permit.list"
//!
//! [xdp]
//! interfaces = ["eth0"]              # default: none (no XDP)
//! mode = "auto"                      # auto | native | skb | off
//! log_rate_per_second = 10
//!
//! [delivery]
//! upstream = "127.0.0.1:10025"       # absent = Maildir spool
//! upstream_protocol = "proxy-v2"     # or "xclient", "none"
//! upstream_timeout = "60s"
//! # spool_dir, accept_domains, relay_networks: spool delivery only
//!
//! [control]
//! socket = "/run/smtpguard/control.sock"
//!
//! [logging]
//! format = "text"                    # or "json"
//! level = "info"
//! stats_interval = "10s"             # "0s" = no periodic statistics
//!
//! [metrics]
//! listen = "127.0.0.1:9325"          # default: no metrics endpoint
//!
//! [screening]
//! greet_wait = "6s"                  # "0s" = no greet delay
//! greet_action = "ignore"            # ignore | enforce | drop
//! greet_banner = "ESMTP"             # "" = no early 220- line
//! pass_cache_ttl = "24h"             # "0s" = no pass cache
//! pass_cache_max_entries = 100000
//! max_waiting = 1000                 # over it: 421 4.3.2
//!
//! [bans]
//! ban_after = 3                      # violations within window; 0 = no bans
//! window = "10m"
//! ban_for = "1h"
//! growth = 2                         # each repeat ban lasts twice as long
//! max_ban_for = "24h"
//! max_entries = 10000                # at the cap: new bans refused
//! ```
//!
//! Durations are [humantime] strings: `"300ms"`, `"30s"`, `"5m"`, `"1h 30m"`.
//! A bare integer is refused because its unit would be a guess.
//!
//! Relative paths are taken relative to the daemon's working directory (not
//! to the configuration file); [`Config::embedded_default`] relies on this
//! to keep a development run under `./var`.
//!
//! [humantime]: https://docs.rs/humantime

mod fleet;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;
use tracing::level_filters::LevelFilter;

pub use crate::policy::{Enforcement, PolicyMode};

/// The development configuration compiled into the binary; see
/// [`Config::embedded_default`].
pub const EMBEDDED_DEFAULT_TOML: &str = include_str!("../default-config.toml");

/// The name [`Config::embedded_default`] uses for the file in messages.
pub const EMBEDDED_DEFAULT_NAME: &str = "<embedded default-config.toml>";

/// How many distinct TCP ports `server.listen` may use: the XDP program
/// guards at most this many ([`smtpguard_common::MAX_PORTS`]).
pub const MAX_LISTEN_PORTS: usize = smtpguard_common::MAX_PORTS;

/// The control socket owns its path limit; validation checks against it.
pub use crate::control::MAX_SOCKET_PATH_BYTES;
pub use fleet::{FleetAuth, FleetConfig, FleetTls};

/// A configuration file that could not be read, parsed or accepted.
///
/// The message is one line, in lower case, and names the file; where there
/// is an underlying error (I/O, the TOML parser with its line and column, an
/// address or duration parser) it is the [`source`](std::error::Error::source),
/// so print the whole chain (`{:#}` with anyhow) to show it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read (missing, permissions, not UTF-8, ...).
    #[error("cannot read configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has a key smtpguard does not know, or a
    /// value of the wrong type. The source carries line, column and key.
    #[error("cannot parse configuration file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// A key has a value smtpguard cannot use, or keys contradict each other.
    ///
    /// Displayed as `{path}: {key} {problem}`, e.g.
    /// `smtpguard.toml: tls.mode is "required" but tls.certificate is not set`.
    #[error("{path}: {key} {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key, with an index for list elements
        /// (`server.listen[1]`).
        key: String,
        /// What is wrong, as the rest of the sentence after the key.
        problem: String,
        /// The parser's error, where one was involved.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
}

/// The validated configuration. Build it with [`Config::load`],
/// [`Config::from_toml_str`] or [`Config::embedded_default`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[server]`: the SMTP front door.
    pub server: ServerConfig,
    /// `[tls]`: STARTTLS.
    pub tls: TlsConfig,
    /// `[policy]`: permit/deny lists and what they mean.
    pub policy: PolicyConfig,
    /// `[xdp]`: the kernel SYN filter.
    pub xdp: XdpConfig,
    /// `[delivery]`: where accepted mail goes.
    pub delivery: Delivery,
    /// `[control]`: the operator's control socket.
    pub control: ControlConfig,
    /// `[logging]`.
    pub logging: LoggingConfig,
    /// `[metrics]`: the optional Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[screening]`: the greet delay, PREGREET and the pass cache.
    pub screening: ScreeningConfig,
    /// `[bans]`: violations that become temporary deny entries.
    pub bans: BansConfig,
    /// `[rate_limit]`: the per-client SYN rate limit in XDP.
    pub rate_limit: RateLimitConfig,
    /// `[dnsbl]`: DNS block/allow list scoring before the greeting;
    /// `None` without the table (nothing is asked).
    pub dnsbl: Option<crate::dnsbl::DnsblConfig>,
    /// `[fleet]`: lists shared by many gateways through etcd; `None`
    /// without the table (nothing changes then).
    pub fleet: Option<FleetConfig>,
}

/// `[rate_limit]`: the per-client SYN rate limit, enforced by the XDP
/// program on SYNs the lists let through (a token bucket per client; see
/// `smtpguard_common::rate`). The equivalent of Postfix anvil's
/// `smtpd_client_connection_rate_limit`, before the TCP handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// `syns_per_minute`: new connections (SYNs) per client per minute; a
    /// burst of this many passes from an idle client, then one more every
    /// 60 s / `syns_per_minute`. `0` turns the limiter off. At most 60,000.
    ///
    /// Default: 0 (the packaged configuration sets 60).
    pub syns_per_minute: u32,
    /// `ipv6_prefix`: IPv6 clients are grouped by this prefix length (one
    /// bucket per /64 by default, as one host usually has a whole /64);
    /// 1 to 128. IPv4 (and IPv4-mapped IPv6) clients are one per /32.
    ///
    /// Default: 64.
    pub ipv6_prefix: u8,
    /// `exempt_permitted`: a source whose deciding list entry is a permit
    /// entry (protected ranges included) is not limited.
    ///
    /// Default: true.
    pub exempt_permitted: bool,
    /// `table_size`: how many clients the kernel's bucket table holds
    /// (about 100 bytes each, preallocated). When it is full, new clients
    /// share one bucket of `syns_per_minute` until the daemon forgets idle
    /// ones (a bucket is idle 60 s after its client's last SYN); known
    /// clients keep their own. Fixed at start: `reload` keeps the old size
    /// and says a restart is needed. 1 to 16,777,216.
    ///
    /// Default: 131,072 (about 13 MiB).
    pub table_size: u32,
}

/// `[server]`: the SMTP front door.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// `hostname`: the name in the 220 greeting, the EHLO reply and
    /// `Received:` headers. Letters, digits, `-` and `.`, at most 253
    /// characters; not an IP address.
    ///
    /// Default: the machine's host name (gethostname(2)), which on many
    /// systems is not fully qualified; set it on a real gateway.
    pub hostname: String,
    /// `listen`: addresses to accept SMTP on, as `"IP:port"` strings
    /// (`"0.0.0.0:25"`, `"[::]:25"`). Non-empty, no duplicates, no port 0,
    /// at most [`MAX_LISTEN_PORTS`] distinct ports (the XDP filter guards
    /// exactly these ports; see [`ServerConfig::ports`]).
    ///
    /// Default: `["0.0.0.0:25", "[::]:25"]`. `[::]:P` alone is dual-stack
    /// (IPv4 clients too); with an IPv4 listener on port P it is IPv6-only
    /// (see `front_door::bind`).
    pub listen: Vec<SocketAddr>,
    /// `max_connections`: simultaneous SMTP sessions; further connections
    /// get `421` and are closed. An integer of at least 1, or `"unlimited"`
    /// (`None` here).
    ///
    /// Default: 100.
    pub max_connections: Option<NonZeroUsize>,
    /// `max_connections_per_client`: simultaneous sessions from one client
    /// address (like Postfix's `smtpd_client_connection_count_limit`).
    /// `0` or `"unlimited"` means no per-address cap (`None` here).
    ///
    /// Default: 0 (no cap).
    pub max_connections_per_client: Option<NonZeroUsize>,
    /// `max_connections_per_client_ipv6_prefix`: the prefix length (bits,
    /// 1–128) that groups IPv6 clients for `max_connections_per_client`.
    /// One host usually holds a whole /64, so counting each /128 alone
    /// would give it unlimited sessions; IPv4 clients count per address.
    ///
    /// Default: 64.
    pub max_connections_per_client_ipv6_prefix: u8,
    /// `idle_timeout`: close a session after this long without a command
    /// or data from the client. Longer than zero.
    ///
    /// Default: `"5m"`.
    pub idle_timeout: Duration,
    /// `max_session_duration`: close a session this long after it began,
    /// however busy. Longer than zero.
    ///
    /// Default: `"30m"`.
    pub max_session_duration: Duration,
    /// `max_message_size_bytes`: largest message accepted, in bytes;
    /// announced with the SIZE extension (RFC 1870). At least 1.
    ///
    /// Default: 52428800 (50 MiB).
    pub max_message_size_bytes: u64,
    /// `max_recipients`: RCPT TO commands accepted per message. At least 1.
    ///
    /// Default: 100.
    pub max_recipients: u32,
    /// `max_errors`: error replies after which the session is closed. At
    /// least 1.
    ///
    /// Default: 10.
    pub max_errors: u32,
    /// `bare_lf`: what to do with a line ending in LF without CR.
    ///
    /// Default: `"reject"`.
    pub bare_lf: BareLf,
    /// `shutdown_grace`: on shutdown, how long sessions in progress may run
    /// before they are cut off. `"0s"` closes them at once.
    ///
    /// Default: `"30s"`.
    pub shutdown_grace: Duration,
    /// `close_denied_sessions`: when an address is added to the deny list
    /// (or dropped from the permit list in deny-all mode), end its open
    /// sessions with `421 4.7.1`.
    ///
    /// Default: `true`.
    pub close_denied_sessions: bool,
}

impl ServerConfig {
    /// The distinct TCP ports of [`listen`](Self::listen), ascending: what
    /// the XDP program guards. Never more than [`MAX_LISTEN_PORTS`].
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.listen.iter().map(SocketAddr::port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// `server.bare_lf`: what the SMTP session does with a bare LF or bare CR
/// in message data, and with a command line that ends in a bare LF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLf {
    /// `"reject"`: the message fails with `550 5.5.2` after the final dot;
    /// such a command line gets `500 5.5.2`.
    Reject,
    /// `"normalize"`: each bare LF or CR in the data becomes CRLF; command
    /// lines ending in a bare LF are accepted.
    Normalize,
}

/// `[tls]`: STARTTLS (RFC 3207).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// `mode`: whether STARTTLS is offered and whether it is required.
    ///
    /// Default: `"off"`.
    pub mode: TlsMode,
    /// `certificate`, `private_key`, `ca_certificate`: the PEM files, or
    /// `None` when none are configured. Always `Some` when [`mode`] is not
    /// [`TlsMode::Off`]; [`TlsConfig::active_files`] gives them only then.
    ///
    /// [`mode`]: Self::mode
    pub files: Option<TlsFiles>,
    /// `handshake_timeout`: how long a TLS handshake may take after
    /// `220 Ready to start TLS`. Longer than zero.
    ///
    /// Default: `"30s"`.
    pub handshake_timeout: Duration,
}

impl TlsConfig {
    /// The files to load when TLS is on; `None` when [`mode`](Self::mode)
    /// is [`TlsMode::Off`].
    pub fn active_files(&self) -> Option<&TlsFiles> {
        match self.mode {
            TlsMode::Off => None,
            TlsMode::Optional | TlsMode::Required => self.files.as_ref(),
        }
    }
}

/// `tls.mode`: STARTTLS (RFC 3207).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// `"off"`: STARTTLS is neither offered nor accepted.
    Off,
    /// `"optional"`: STARTTLS is offered; plaintext mail is accepted too.
    Optional,
    /// `"required"`: STARTTLS is offered, and no mail is accepted before it.
    Required,
}

/// The PEM files of `[tls]`, given to [`crate::tls::load`]. Paths only;
/// nothing has been read yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `certificate`: the server certificate, leaf first, optionally
    /// followed by its intermediates. No default.
    pub certificate: PathBuf,
    /// `private_key`: the unencrypted private key of the leaf (PKCS#1,
    /// PKCS#8 or SEC1 PEM). No default; required with `certificate`.
    pub private_key: PathBuf,
    /// `ca_certificate`: certificates appended to the chain sent to
    /// clients (it is not used to verify anyone). Default: none.
    pub ca_certificate: Option<PathBuf>,
}

/// `[policy]`: what the permit/deny lists mean and where they are.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// `mode`: `"accept-all-except-deny"` (unlisted sources pass) or
    /// `"deny-all-except-permit"` (unlisted sources are dropped).
    ///
    /// Default: `"accept-all-except-deny"`.
    pub mode: PolicyMode,
    /// `enforcement`: `"enforce"` (drop what the policy denies),
    /// `"monitor"` (count and log, drop nothing) or `"off"` (judge nothing).
    ///
    /// Default: `"enforce"`.
    pub enforcement: Enforcement,
    /// `deny_list`: the deny list file.
    ///
    /// Default: `/etc/smtpguard/deny.list`.
    pub deny_list: PathBuf,
    /// `permit_list`: the permit list file.
    ///
    /// Default: `/etc/smtpguard/permit.list`.
    pub permit_list: PathBuf,
    /// `protected`: ranges the lists may never refuse, written as list
    /// entries (addresses, prefixes, netmasks, ranges), in addition to
    /// loopback, the explicit listen addresses and
    /// `delivery.relay_networks`, which are always protected.
    ///
    /// Default: `[]`.
    pub protected: Vec<IpNet>,
}

/// `[xdp]`: the kernel SYN filter.
#[derive(Debug, Clone, PartialEq)]
pub struct XdpConfig {
    /// `interfaces`: network interfaces to attach the XDP program to (names
    /// of 1 to 15 bytes, no `/`, `:` or white space, no duplicates). Empty
    /// means no XDP: the front door still applies the lists, after the TCP
    /// handshake.
    ///
    /// Default: `[]`.
    pub interfaces: Vec<String>,
    /// `mode`: how to attach. `"native"` and `"skb"` need `interfaces`.
    ///
    /// Default: `"auto"`.
    pub mode: XdpMode,
    /// `log_rate_per_second`: at most this many drop events per second go
    /// to the log from each CPU (the XDP limiter is per CPU so that it
    /// shares no cache line); `0` logs none (the counters still count).
    ///
    /// Default: 10.
    pub log_rate_per_second: u32,
}

impl XdpConfig {
    /// Whether the XDP program is to be attached at all: some interfaces
    /// and a mode other than `"off"`.
    pub fn enabled(&self) -> bool {
        self.mode != XdpMode::Off && !self.interfaces.is_empty()
    }
}

/// `xdp.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    /// `"auto"`: native (driver) mode, else generic (skb) mode if the driver
    /// has no XDP support.
    Auto,
    /// `"native"`: driver mode only; fail if the driver cannot.
    Native,
    /// `"skb"`: generic mode, works on any interface (including `lo`), slower.
    Skb,
    /// `"off"`: do not attach, whatever `interfaces` says.
    Off,
}

/// `[delivery]`: where accepted mail goes. The presence of `upstream`
/// decides which variant it is.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// `upstream` is set: each session is relayed to the MTA there.
    Upstream(UpstreamDelivery),
    /// `upstream` is absent: messages are written to a Maildir spool.
    Spool(SpoolDelivery),
}

/// Relaying sessions to an MTA (`delivery.upstream` set).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamDelivery {
    /// `upstream`: the MTA's SMTP address, `"IP:port"` (no host names: the
    /// configuration is read before, and independently of, DNS).
    /// Refused when it is one of smtpguard's own listeners (the same
    /// address and port, or a wildcard listener `0.0.0.0` / `[::]` on the
    /// port and a loopback address or an address of this host): mail
    /// would loop back into smtpguard.
    pub address: SocketAddr,
    /// `upstream_protocol`: how the MTA learns the real client address.
    ///
    /// Default: `"proxy-v2"`, so the MTA's per-client limits and logs see
    /// the real client (Postfix: `smtpd_upstream_proxy_protocol = haproxy`).
    pub protocol: UpstreamProtocol,
    /// `upstream_timeout`: connecting to the MTA, and each reply from it,
    /// may take at most this long. Longer than zero.
    ///
    /// Default: `"60s"`.
    pub timeout: Duration,
}

/// `delivery.upstream_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamProtocol {
    /// `"proxy-v2"`: a HAProxy PROXY protocol version 2 header before SMTP
    /// (Postfix: `smtpd_upstream_proxy_protocol = haproxy`).
    ProxyV2,
    /// `"xclient"`: the Postfix XCLIENT command after EHLO
    /// (`smtpd_authorized_xclient_hosts`).
    Xclient,
    /// `"none"`: plain SMTP; the MTA sees smtpguard's address as the client.
    /// Works with any MTA without configuration.
    None,
}

/// Writing messages to a Maildir spool (`delivery.upstream` absent).
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolDelivery {
    /// `spool_dir`: the Maildir (`tmp/`, `new/`, `cur/` inside).
    ///
    /// Default: `/var/spool/smtpguard`.
    pub dir: PathBuf,
    /// `accept_domains`: recipient domains accepted from any client, lower
    /// case, no duplicates.
    ///
    /// Default: `[]` (only `relay_networks` clients can send).
    pub accept_domains: Vec<String>,
    /// `relay_networks`: clients in these networks may send to any domain.
    /// Written `"192.0.2.0/24"`, `"2001:db8::/32"`, `"192.0.2.7/32"`; host
    /// bits must be zero. A `/0` (every client: an open relay) is refused
    /// unless `allow_open_relay = true` (spool delivery only).
    ///
    /// Default: `[]`.
    pub relay_networks: Vec<IpNet>,
}

/// `[control]`: the operator's control socket.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    /// `socket`: the Unix socket path, at most [`MAX_SOCKET_PATH_BYTES`]
    /// bytes.
    ///
    /// Default: `/run/smtpguard/control.sock`.
    pub socket: PathBuf,
}

/// `[logging]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggingConfig {
    /// `format`: `"text"` or `"json"` (one object a line).
    ///
    /// Default: `"text"`.
    pub format: LogFormat,
    /// `level`: `"off"`, `"error"`, `"warn"`, `"info"`, `"debug"` or
    /// `"trace"`.
    ///
    /// Default: `"info"`.
    pub level: LevelFilter,
    /// `stats_interval`: how often to log a statistics line; `"0s"` (`None`
    /// here) turns it off.
    ///
    /// Default: `"10s"`.
    pub stats_interval: Option<Duration>,
}

/// `logging.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// `"text"`: human-readable lines.
    Text,
    /// `"json"`: one JSON object per line.
    Json,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `listen`: `"IP:port"` of the Prometheus HTTP endpoint (path
    /// `/metrics`).
    ///
    /// Default: none (no endpoint).
    pub listen: Option<SocketAddr>,
}

/// `[screening]`: postscreen's pre-greeting test. Before the `220`, the
/// front door waits; a client that sends anything before the greeting is
/// complete talked early (PREGREET).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScreeningConfig {
    /// `greet_wait` (postscreen_greet_wait): how long to wait before the
    /// greeting; `"0s"` (`None` here) turns the test off.
    ///
    /// Default: `"6s"`.
    pub greet_wait: Option<Duration>,
    /// `greet_action` (postscreen_greet_action): what happens to a client
    /// that talked early.
    ///
    /// Default: `"ignore"`.
    pub greet_action: GreetAction,
    /// `greet_banner` (postscreen_greet_banner): the text of a `220-`
    /// line sent at once, before the wait (`220-HOSTNAME TEXT`), which
    /// lures early talkers; `""` (`None` here) sends nothing before the
    /// greeting.
    ///
    /// Default: `"ESMTP"`.
    pub greet_banner: Option<String>,
    /// `pass_cache_ttl` (postscreen_cache_retention_time): how long a
    /// client that passed skips the wait; `"0s"` (`None` here) keeps no
    /// cache.
    ///
    /// Default: `"24h"`.
    pub pass_cache_ttl: Option<Duration>,
    /// `pass_cache_max_entries`: clients the pass cache holds; the one that
    /// passed longest ago goes first.
    ///
    /// Default: `100000`.
    pub pass_cache_max_entries: usize,
    /// `max_waiting` (postscreen_pre_queue_limit): clients in the wait at
    /// once, apart from `server.max_connections`; over it: `421 4.3.2`.
    ///
    /// Default: `1000`.
    pub max_waiting: usize,
}

/// `screening.greet_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GreetAction {
    /// `"ignore"`: log and count, then serve the client as any other.
    Ignore,
    /// `"enforce"`: greet, then answer every command with `554 5.5.1
    /// Protocol error`, logging sender and recipients.
    Enforce,
    /// `"drop"`: `521 5.5.1 Protocol error` and close at once.
    Drop,
}

/// `[bans]`: automatic temporary bans in the `auto` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BansConfig {
    /// `ban_after`: violations within `window` that ban a client; `0`
    /// (`None` here) bans nobody.
    ///
    /// Default: `3`.
    pub ban_after: Option<std::num::NonZeroU32>,
    /// `window`: how far back violations count.
    ///
    /// Default: `"10m"`.
    pub window: Duration,
    /// `ban_for`: the length of a first ban.
    ///
    /// Default: `"1h"`.
    pub ban_for: Duration,
    /// `growth`: each further ban of the same client lasts this many times
    /// the one before (`1`: all the same), up to `max_ban_for`.
    ///
    /// Default: `2`.
    pub growth: u32,
    /// `max_ban_for`: the longest ban.
    ///
    /// Default: `"24h"`.
    pub max_ban_for: Duration,
    /// `max_entries`: bans in force at once; at the cap new bans are
    /// refused (logged and counted as `bans_refused_full`).
    ///
    /// Default: `10000`.
    pub max_entries: usize,
}

impl Config {
    /// Reads and validates the configuration file at `path`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`] if the file cannot be read, otherwise as
    /// [`Config::from_toml_str`].
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml_str(&text, path)
    }

    /// Parses and validates configuration text. `path_for_errors` is only
    /// used to name the file in messages.
    ///
    /// When `server.hostname` is absent this asks the system for its host
    /// name.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`] for TOML syntax errors, unknown keys and
    /// values of the wrong type; [`ConfigError::Invalid`] for values that
    /// cannot be used.
    pub fn from_toml_str(text: &str, path_for_errors: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path_for_errors.to_owned(),
            source,
        })?;
        validate::validate(raw, path_for_errors)
    }

    /// The development configuration compiled into the binary
    /// ([`EMBEDDED_DEFAULT_TOML`], `src/default-config.toml`), used by
    /// `cargo xtask run` when no `--config` is given: SMTP on
    /// `127.0.0.1:2525` and `[::1]:2525`, XDP on `lo` in skb mode,
    /// accept-all-except-deny with empty lists, no TLS, and everything
    /// else under `./var` in the working directory.
    ///
    /// # Errors
    ///
    /// Only if the machine's host name cannot be read or is not a valid
    /// host name (the file itself is checked by the tests).
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::from_toml_str(EMBEDDED_DEFAULT_TOML, Path::new(EMBEDDED_DEFAULT_NAME))
    }
}
