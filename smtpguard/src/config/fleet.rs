//! `[fleet]`: the fleet source (#19), lists shared by many gateways
//! through etcd. Without the table nothing changes: no etcd client is
//! started and the `fleet` source stays empty.
//!
//! ```toml
//! [fleet]
//! endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]
//! prefix = "/smtpguard/v1/site-a/"
//! cache_file = "/var/lib/smtpguard/fleet.cache"
//! ca = "/etc/smtpguard/fleet/ca.pem"        # TLS: the CA that signed etcd's certificates
//! cert = "/etc/smtpguard/fleet/client.pem"  # mutual TLS: this gateway's certificate
//! key = "/etc/smtpguard/fleet/client.key"
//! user = "gateway"                          # etcd access control (optional)
//! password_file = "/etc/smtpguard/fleet/password"
//! gateway_name = "mx1"                      # default: server.hostname
//! share_bans = true                         # automatic bans go to every gateway
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// The longest `fleet.prefix`, in bytes (etcd keys are at most 1.5 MiB
/// requests; a prefix is a short path).
const MAX_PREFIX_BYTES: usize = 256;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawFleet {
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub cache_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub gateway_name: Option<String>,
    pub share_bans: Option<bool>,
}

/// `[fleet]`: where the fleet lists live and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// `endpoints`: etcd client URLs, `http://HOST:PORT` or
    /// `https://HOST:PORT` (all of one scheme). At least one.
    pub endpoints: Vec<String>,
    /// `prefix`: the key prefix of this site, starting and ending with `/`
    /// (`/smtpguard/v1/site-a/`). Keys: `<prefix>lists/{deny,permit}/<prefix>`.
    pub prefix: String,
    /// `cache_file`: the last fleet lists read, with their revision,
    /// written atomically after every applied change; a gateway starts
    /// filtering from it before etcd answers.
    pub cache_file: PathBuf,
    /// `ca`, `cert`, `key`: TLS to etcd (rustls). `ca` alone: server
    /// authentication; with `cert` and `key`: mutual TLS. `None`: plain
    /// HTTP endpoints.
    pub tls: Option<FleetTls>,
    /// `user` and `password_file`: etcd's access control (RBAC). The
    /// password is the file's first line.
    pub auth: Option<FleetAuth>,
    /// `gateway_name`: this gateway's name under `<prefix>gateways/`;
    /// `None`: `server.hostname`.
    pub gateway_name: Option<String>,
    /// `share_bans`: each automatic ban (`[bans]`, the `auto` source) is
    /// also written to the fleet's deny list with its expiry in the value,
    /// so every gateway drops the client in XDP. Default: false.
    pub share_bans: bool,
}

/// `fleet.ca`, `fleet.cert`, `fleet.key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetTls {
    /// PEM CA certificate(s) that sign etcd's server certificates.
    pub ca: PathBuf,
    /// The client certificate and key (PEM), for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// `fleet.user`, `fleet.password_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetAuth {
    /// The etcd user name.
    pub user: String,
    /// A file whose first line is the password (kept out of the
    /// configuration, which is world-readable on some hosts).
    pub password_file: PathBuf,
}

fn invalid(path: &Path, key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        key: key.to_owned(),
        problem: problem.into(),
        source: None,
    }
}

fn non_empty_path(
    path: &Path,
    key: &str,
    raw: Option<PathBuf>,
) -> Result<Option<PathBuf>, ConfigError> {
    match raw {
        Some(p) if p.as_os_str().is_empty() => Err(invalid(path, key, "is an empty path")),
        other => Ok(other),
    }
}

/// Checks `[fleet]`; every error names its key.
pub(super) fn validate(raw: RawFleet, path: &Path) -> Result<FleetConfig, ConfigError> {
    let endpoints = raw.endpoints.unwrap_or_default();
    if endpoints.is_empty() {
        return Err(invalid(
            path,
            "fleet.endpoints",
            "is missing or empty; give etcd's client URLs, e.g. [\"https://10.0.0.1:2379\"]",
        ));
    }
    let mut https = None;
    for (i, endpoint) in endpoints.iter().enumerate() {
        let key = format!("fleet.endpoints[{i}]");
        let (scheme_https, rest) = if let Some(rest) = endpoint.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = endpoint.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(invalid(
                path,
                &key,
                format!("= {endpoint:?} is not an etcd client URL; write http://HOST:PORT or https://HOST:PORT"),
            ));
        };
        let port_ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !port_ok || rest.contains('/') {
            return Err(invalid(
                path,
                &key,
                format!("= {endpoint:?} needs a host and a port and nothing after them (http://HOST:PORT)"),
            ));
        }
        if https.is_some_and(|h| h != scheme_https) {
            return Err(invalid(
                path,
                &key,
                format!("= {endpoint:?} mixes http and https endpoints; use one scheme"),
            ));
        }
        https = Some(scheme_https);
    }
    let https = https.unwrap_or(false);

    let prefix = raw.prefix.unwrap_or_default();
    if prefix.is_empty() {
        return Err(invalid(
            path,
            "fleet.prefix",
            "is missing; give this site's key prefix, e.g. \"/smtpguard/v1/site-a/\"",
        ));
    }
    if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 2 {
        return Err(invalid(
            path,
            "fleet.prefix",
            format!("= {prefix:?} must start and end with '/' (\"/smtpguard/v1/site-a/\")"),
        ));
    }
    if prefix.len() > MAX_PREFIX_BYTES {
        return Err(invalid(
            path,
            "fleet.prefix",
            format!(
                "is {} bytes long; at most {MAX_PREFIX_BYTES} are allowed",
                prefix.len()
            ),
        ));
    }
    if let Some(c) = prefix.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(
            path,
            "fleet.prefix",
            format!("= {prefix:?} holds {c:?}; use printable characters without spaces"),
        ));
    }

    let cache_file = non_empty_path(path, "fleet.cache_file", raw.cache_file)?.ok_or_else(|| {
        invalid(path, "fleet.cache_file", "is missing; give a file the gateway may write, e.g. \"/var/lib/smtpguard/fleet.cache\"")
    })?;

    let ca = non_empty_path(path, "fleet.ca", raw.ca)?;
    let cert = non_empty_path(path, "fleet.cert", raw.cert)?;
    let key = non_empty_path(path, "fleet.key", raw.key)?;
    let identity = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                path,
                "fleet.key",
                "is missing; fleet.cert needs its private key",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                path,
                "fleet.cert",
                "is missing; fleet.key needs its certificate",
            ))
        }
    };
    let tls = match (ca, https) {
        (Some(ca), true) => Some(FleetTls { ca, identity }),
        (None, true) => {
            return Err(invalid(
                path,
                "fleet.ca",
                "is missing; https endpoints need the CA that signed etcd's certificate",
            ))
        }
        (Some(_), false) => {
            return Err(invalid(
                path,
                "fleet.ca",
                "is set but the endpoints are http://; write https:// endpoints for TLS",
            ))
        }
        (None, false) if identity.is_some() => return Err(invalid(
            path,
            "fleet.cert",
            "is set but the endpoints are http://; write https:// endpoints and fleet.ca for TLS",
        )),
        (None, false) => None,
    };

    let password_file = non_empty_path(path, "fleet.password_file", raw.password_file)?;
    let auth = match (raw.user, password_file) {
        (Some(user), Some(password_file)) => {
            if user.is_empty() || user.chars().any(|c| c.is_control()) {
                return Err(invalid(
                    path,
                    "fleet.user",
                    format!("= {user:?} is not a user name"),
                ));
            }
            Some(FleetAuth {
                user,
                password_file,
            })
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                path,
                "fleet.password_file",
                "is missing; fleet.user needs a password file",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                path,
                "fleet.user",
                "is missing; fleet.password_file needs a user",
            ))
        }
    };
    let gateway_name = match raw.gateway_name {
        Some(name)
            if name.is_empty()
                || name.len() > 253
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) =>
        {
            return Err(invalid(
                path,
                "fleet.gateway_name",
                format!(
                    "= {name:?} is not a name of letters, digits, '-', '.' and '_' (at most 253)"
                ),
            ))
        }
        other => other,
    };
    Ok(FleetConfig {
        endpoints,
        prefix,
        cache_file,
        tls,
        auth,
        gateway_name,
        share_bans: raw.share_bans.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    /// The error with its causes, one line.
    fn check(fleet: &str) -> Result<Config, String> {
        Config::from_toml_str(&format!("[fleet]\n{fleet}"), std::path::Path::new("t.toml"))
            .map_err(|e| crate::logging::one_line(&e))
    }

    const OK: &str = "endpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/sg/v1/a/\"\ncache_file = \"/tmp/x\"\n";

    #[test]
    fn without_fleet_nothing_changes() {
        let c = Config::from_toml_str("", std::path::Path::new("t.toml")).unwrap();
        assert_eq!(c.fleet, None);
    }

    #[test]
    fn a_plain_fleet_is_read() {
        let c = check(OK).unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(f.prefix, "/sg/v1/a/");
        assert_eq!(f.tls, None);
        assert_eq!(f.auth, None);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("prefix = \"/a/\"\ncache_file = \"/x\"", "fleet.endpoints is missing"),
            ("endpoints = [\"127.0.0.1:2379\"]\nprefix = \"/a/\"\ncache_file = \"/x\"", "fleet.endpoints[0] = \"127.0.0.1:2379\" is not an etcd client URL"),
            ("endpoints = [\"http://h\"]\nprefix = \"/a/\"\ncache_file = \"/x\"", "fleet.endpoints[0] = \"http://h\" needs a host and a port"),
            ("endpoints = [\"http://h:1\", \"https://h:2\"]\nprefix = \"/a/\"\ncache_file = \"/x\"", "fleet.endpoints[1]"),
            ("endpoints = [\"http://h:1\"]\nprefix = \"a\"\ncache_file = \"/x\"", "fleet.prefix = \"a\" must start and end with '/'"),
            ("endpoints = [\"http://h:1\"]\nprefix = \"/a/\"", "fleet.cache_file is missing"),
            ("endpoints = [\"https://h:1\"]\nprefix = \"/a/\"\ncache_file = \"/x\"", "fleet.ca is missing"),
            ("endpoints = [\"http://h:1\"]\nprefix = \"/a/\"\ncache_file = \"/x\"\nca = \"/ca\"", "fleet.ca is set but the endpoints are http://"),
            ("endpoints = [\"https://h:1\"]\nprefix = \"/a/\"\ncache_file = \"/x\"\nca = \"/ca\"\ncert = \"/c\"", "fleet.key is missing"),
            ("endpoints = [\"http://h:1\"]\nprefix = \"/a/\"\ncache_file = \"/x\"\nuser = \"u\"", "fleet.password_file is missing"),
            ("endpoints = [\"http://h:1\"]\nprefix = \"/a/\"\ncache_file = \"/x\"\nbogus = 1", "unknown field `bogus`"),
        ];
        for (text, want) in cases {
            let e = check(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn tls_and_auth_are_read() {
        let c = check(
            "endpoints = [\"https://h:1\"]\nprefix = \"/a/\"\ncache_file = \"/x\"\nca = \"/ca\"\ncert = \"/c\"\nkey = \"/k\"\nuser = \"gw\"\npassword_file = \"/p\"",
        )
        .unwrap();
        let f = c.fleet.unwrap();
        let tls = f.tls.unwrap();
        assert_eq!(tls.identity.unwrap().0, std::path::PathBuf::from("/c"));
        assert_eq!(f.auth.unwrap().user, "gw");
    }
}
