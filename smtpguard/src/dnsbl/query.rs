//! RFC 5782 §2.1 and §2.4 query names: the client address reversed under
//! the list's zone.

use std::fmt::Write as _;
use std::net::IpAddr;

/// The fully qualified name to ask (type A) for `client` on `zone` (lower
/// case, without the trailing dot): IPv4 as its four octets reversed
/// (`192.0.2.99` → `99.2.0.192.zone.`), IPv6 as its 32 nibbles reversed
/// (`2001:db8::1` → `1.0.0.0.…​.8.b.d.0.1.0.0.2.zone.`). An IPv4-mapped
/// IPv6 address is asked as IPv4.
pub fn query_name(client: IpAddr, zone: &str) -> String {
    let mut name = String::with_capacity(72 + zone.len());
    match client.to_canonical() {
        IpAddr::V4(v4) => {
            for octet in v4.octets().iter().rev() {
                let _ = write!(name, "{octet}.");
            }
        }
        IpAddr::V6(v6) => {
            for byte in v6.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0x0f, byte >> 4);
            }
        }
    }
    name.push_str(zone);
    name.push('.');
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_octets_reversed() {
        let ip: IpAddr = "192.0.2.99".parse().unwrap();
        assert_eq!(query_name(ip, "dnsbl.test"), "99.2.0.192.dnsbl.test.");
        let mapped: IpAddr = "::ffff:192.0.2.99".parse().unwrap();
        assert_eq!(query_name(mapped, "dnsbl.test"), "99.2.0.192.dnsbl.test.");
    }

    /// RFC 5782 §2.4's own example.
    #[test]
    fn ipv6_nibbles_reversed() {
        let ip: IpAddr = "2001:db8:1:2:3:4:567:89ab".parse().unwrap();
        assert_eq!(
            query_name(ip, "ugly.example.com"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com."
        );
    }
}
