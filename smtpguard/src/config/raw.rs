//! The configuration file exactly as written: what serde reads from TOML.
//!
//! Every key is optional here (absent means "use the default") and every
//! table refuses keys it does not know, so a misspelt key is an error with
//! toml's line and column instead of a silently ignored setting. Word-valued
//! keys are serde enums for the same reason. Values that need more than a
//! type check (durations, counts, addresses, paths that depend on other keys)
//! stay loose here and are checked by `super::validate`, which knows the key
//! names for its messages.

use std::{fmt, path::PathBuf};

use serde::{
    de::{self, Visitor},
    Deserialize, Deserializer,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub server: RawServer,
    pub tls: RawTls,
    pub policy: RawPolicy,
    pub xdp: RawXdp,
    pub delivery: RawDelivery,
    pub control: RawControl,
    pub logging: RawLogging,
    pub metrics: RawMetrics,
    pub screening: RawScreening,
    pub bans: RawBans,
    pub rate_limit: RawRateLimit,
    pub dnsbl: Option<crate::dnsbl::config::RawDnsbl>,
    pub fleet: Option<super::fleet::RawFleet>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    pub hostname: Option<String>,
    pub listen: Option<Vec<String>>,
    pub max_connections: Option<Count>,
    pub max_connections_per_client: Option<Count>,
    pub max_connections_per_client_ipv6_prefix: Option<u32>,
    pub idle_timeout: Option<DurationValue>,
    pub max_session_duration: Option<DurationValue>,
    pub max_message_size_bytes: Option<u64>,
    pub max_recipients: Option<u32>,
    pub max_errors: Option<u32>,
    pub bare_lf: Option<super::BareLf>,
    pub shutdown_grace: Option<DurationValue>,
    pub close_denied_sessions: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTls {
    pub mode: Option<super::TlsMode>,
    pub certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    pub ca_certificate: Option<PathBuf>,
    pub handshake_timeout: Option<DurationValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPolicy {
    pub mode: Option<crate::policy::PolicyMode>,
    pub enforcement: Option<crate::policy::Enforcement>,
    pub deny_list: Option<PathBuf>,
    pub permit_list: Option<PathBuf>,
    pub protected: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawXdp {
    pub interfaces: Option<Vec<String>>,
    pub mode: Option<super::XdpMode>,
    pub log_rate_per_second: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDelivery {
    pub upstream: Option<String>,
    pub upstream_protocol: Option<super::UpstreamProtocol>,
    pub upstream_timeout: Option<DurationValue>,
    pub spool_dir: Option<PathBuf>,
    pub accept_domains: Option<Vec<String>>,
    pub relay_networks: Option<Vec<String>>,
    pub allow_open_relay: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawControl {
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLogging {
    pub format: Option<super::LogFormat>,
    pub level: Option<String>,
    pub stats_interval: Option<DurationValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawScreening {
    pub greet_wait: Option<DurationValue>,
    pub greet_action: Option<super::GreetAction>,
    pub greet_banner: Option<String>,
    pub pass_cache_ttl: Option<DurationValue>,
    pub pass_cache_max_entries: Option<u32>,
    pub max_waiting: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBans {
    pub ban_after: Option<u32>,
    pub window: Option<DurationValue>,
    pub ban_for: Option<DurationValue>,
    pub growth: Option<u32>,
    pub max_ban_for: Option<DurationValue>,
    pub max_entries: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRateLimit {
    pub syns_per_minute: Option<i64>,
    pub ipv6_prefix: Option<i64>,
    pub exempt_permitted: Option<bool>,
    pub table_size: Option<i64>,
}

/// A TOML integer or string, as written. Durations and counts accept both
/// shapes at the serde level so that validation can say something better
/// than "invalid type" about the wrong one (a bare `300` for a duration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scalar {
    Int(i64),
    Text(String),
}

impl fmt::Display for Scalar {
    /// As it would be written in TOML: integers bare, strings quoted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Int(n) => write!(f, "{n}"),
            Scalar::Text(s) => write!(f, "{s:?}"),
        }
    }
}

struct ScalarVisitor {
    expecting: &'static str,
}

impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        i64::try_from(v)
            .map(Scalar::Int)
            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar::Text(v.to_owned()))
    }
}

/// A duration key: a humantime string (`"5m"`), or a bare integer that
/// validation rejects with advice.
#[derive(Debug, Clone)]
pub(super) struct DurationValue(pub Scalar);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a duration such as \"5m\" or \"300s\"",
        })
        .map(DurationValue)
    }
}

/// A connection-count key: an integer or the word `"unlimited"`.
#[derive(Debug, Clone)]
pub(super) struct Count(pub Scalar);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "an integer or \"unlimited\"",
        })
        .map(Count)
    }
}
