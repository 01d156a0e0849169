//! The configuration turned into what the front door, the SMTP session and
//! the hand-off take: the one place where `config`'s file vocabulary meets
//! theirs, so that neither `smtp` nor `front_door` depends on `config`.

use crate::config::{self, BareLf, ServerConfig, TlsConfig, TlsMode};
use crate::front_door;
use crate::front_door::connection::ConnSettings;
use crate::smtp::handoff::{DeliverySettings, SpoolSettings, UpstreamProtocol, UpstreamSettings};
use crate::smtp::{self, BareLfPolicy, SessionParams};

/// The front door's limits and timeouts, from `[server]` and `[tls]`.
/// Writes get `idle_timeout` as their deadline too.
pub fn front_door(server: &ServerConfig, tls: &TlsConfig) -> front_door::Settings {
    front_door::Settings {
        max_connections: server.max_connections,
        max_connections_per_client: server.max_connections_per_client,
        per_client_ipv6_prefix: server.max_connections_per_client_ipv6_prefix,
        // Set by the daemon from its file-descriptor budget.
        max_sessions_by_fds: None,
        shutdown_grace: server.shutdown_grace,
        conn: ConnSettings {
            session: SessionParams {
                hostname: server.hostname.clone(),
                tls_mode: tls_mode(tls.mode),
                tls_available: false,
                max_message_size: usize::try_from(server.max_message_size_bytes)
                    .unwrap_or(usize::MAX),
                max_recipients: usize::try_from(server.max_recipients).unwrap_or(usize::MAX),
                max_errors: server.max_errors,
                bare_lf: bare_lf(server.bare_lf),
            },
            idle_timeout: server.idle_timeout,
            handshake_timeout: tls.handshake_timeout,
            max_session_duration: server.max_session_duration,
            write_timeout: server.idle_timeout,
        },
    }
}

/// The XDP program's SYN rate limit, from `[rate_limit]`.
pub fn rate_limit(r: &config::RateLimitConfig) -> crate::kernel::RateLimitSettings {
    crate::kernel::RateLimitSettings {
        syns_per_minute: r.syns_per_minute,
        ipv6_prefix: r.ipv6_prefix,
        exempt_permitted: r.exempt_permitted,
    }
}

/// The hand-off's delivery mode, from `[delivery]`.
pub fn delivery(delivery: &config::Delivery) -> DeliverySettings {
    match delivery {
        config::Delivery::Upstream(u) => DeliverySettings::Upstream(UpstreamSettings {
            address: u.address,
            protocol: match u.protocol {
                config::UpstreamProtocol::ProxyV2 => UpstreamProtocol::ProxyV2,
                config::UpstreamProtocol::Xclient => UpstreamProtocol::Xclient,
                config::UpstreamProtocol::None => UpstreamProtocol::None,
            },
            timeout: u.timeout,
        }),
        config::Delivery::Spool(s) => DeliverySettings::Spool(SpoolSettings {
            dir: s.dir.clone(),
            accept_domains: s.accept_domains.clone(),
            relay_networks: s.relay_networks.clone(),
        }),
    }
}

fn tls_mode(mode: TlsMode) -> smtp::TlsMode {
    match mode {
        TlsMode::Off => smtp::TlsMode::Off,
        TlsMode::Optional => smtp::TlsMode::Optional,
        TlsMode::Required => smtp::TlsMode::Required,
    }
}

fn bare_lf(policy: BareLf) -> BareLfPolicy {
    match policy {
        BareLf::Reject => BareLfPolicy::Reject,
        BareLf::Normalize => BareLfPolicy::Normalize,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::config::Config;

    fn parse(toml: &str) -> Config {
        Config::from_toml_str(toml, Path::new("settings.toml")).unwrap()
    }

    #[test]
    fn server_and_tls_become_session_params() {
        let c = parse("[server]\nhostname = \"mx.example.com\"\nbare_lf = \"normalize\"\nmax_recipients = 7\n");
        let s = front_door(&c.server, &c.tls);
        let p = &s.conn.session;
        assert_eq!(p.hostname, "mx.example.com");
        assert_eq!(p.tls_mode, smtp::TlsMode::Off);
        assert_eq!(p.bare_lf, BareLfPolicy::Normalize);
        assert_eq!(p.max_recipients, 7);
        assert_eq!(s.conn.write_timeout, c.server.idle_timeout);
    }

    #[test]
    fn delivery_modes_carry_over() {
        let c = parse(
            "[delivery]\nupstream = \"127.0.0.1:10025\"\nupstream_protocol = \"xclient\"\nupstream_timeout = \"2m\"\n",
        );
        assert_eq!(
            delivery(&c.delivery),
            DeliverySettings::Upstream(UpstreamSettings {
                address: "127.0.0.1:10025".parse().unwrap(),
                protocol: UpstreamProtocol::Xclient,
                timeout: Duration::from_secs(120),
            })
        );
        let c = parse(
            "[delivery]\nspool_dir = \"/srv/maildir\"\naccept_domains = [\"Example.COM\"]\nrelay_networks = [\"192.0.2.0/24\"]\n",
        );
        assert_eq!(
            delivery(&c.delivery),
            DeliverySettings::Spool(SpoolSettings {
                dir: "/srv/maildir".into(),
                accept_domains: vec!["example.com".into()],
                relay_networks: vec!["192.0.2.0/24".parse().unwrap()],
            })
        );
    }
}
