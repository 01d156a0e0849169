//! The HAProxy PROXY protocol version 2 header (binary form), sent as the
//! very first bytes of an upstream connection so the MTA sees the real
//! client (Postfix: `smtpd_upstream_proxy_protocol = haproxy`).
//!
//! Layout (all integers big-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 0..12 | signature `\r\n\r\n\0\r\nQUIT\n` |
//! | 12 | `0x21`: version 2, command PROXY |
//! | 13 | `0x11` TCP over IPv4, or `0x21` TCP over IPv6 |
//! | 14..16 | length of what follows: 12 (IPv4) or 36 (IPv6) |
//! | 16.. | source address, destination address, source port, destination port |
//!
//! Source is the client, destination the address the client connected to.
//! No TLVs are sent.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The 12-byte PROXY v2 signature.
pub(crate) const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2 (high nibble), command PROXY (low nibble).
const VERSION_PROXY: u8 = 0x21;
/// AF_INET (high nibble), SOCK_STREAM (low nibble).
const TCP4: u8 = 0x11;
/// AF_INET6 (high nibble), SOCK_STREAM (low nibble).
const TCP6: u8 = 0x21;

/// The PROXY v2 header saying a TCP connection came from `client` to
/// `local`: 28 bytes for IPv4, 52 for IPv6.
///
/// Both addresses must be of one family in the header. IPv4-mapped IPv6
/// addresses (`::ffff:a.b.c.d`) are first turned into IPv4, so a client
/// normalised to IPv4 that reached an IPv6 socket still goes out as TCP4;
/// if the families still differ, the IPv4 one is mapped into IPv6 and the
/// header is TCP6.
pub(crate) fn header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (src, dst) = (client.ip().to_canonical(), local.ip().to_canonical());
    let mut out = Vec::with_capacity(52);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(TCP4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(TCP6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&as_v6(s).octets());
            out.extend_from_slice(&as_v6(d).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_exact_bytes() {
        let h = header(
            "192.0.2.10:40000".parse().unwrap(),
            "198.51.100.1:25".parse().unwrap(),
        );
        let want: Vec<u8> = [
            &b"\r\n\r\n\0\r\nQUIT\n"[..],
            &[0x21, 0x11, 0x00, 0x0c],
            &[192, 0, 2, 10],
            &[198, 51, 100, 1],
            &[0x9c, 0x40], // 40000
            &[0x00, 0x19], // 25
        ]
        .concat();
        assert_eq!(h, want);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn ipv6_exact_bytes() {
        let h = header(
            "[2001:db8::10]:40000".parse().unwrap(),
            "[2001:db8:1::1]:587".parse().unwrap(),
        );
        let want: Vec<u8> = [
            &b"\r\n\r\n\0\r\nQUIT\n"[..],
            &[0x21, 0x21, 0x00, 0x24],
            &[
                0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
            ],
            &[
                0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
            ],
            &[0x9c, 0x40],
            &[0x02, 0x4b], // 587
        ]
        .concat();
        assert_eq!(h, want);
        assert_eq!(h.len(), 52);
    }

    #[test]
    fn mixed_families() {
        // A v4-mapped local address is IPv4: TCP4.
        let h = header(
            "192.0.2.10:1".parse().unwrap(),
            "[::ffff:198.51.100.1]:25".parse().unwrap(),
        );
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..24], &[192, 0, 2, 10, 198, 51, 100, 1]);
        // A real IPv6 local address: the client is mapped into IPv6.
        let h = header(
            "192.0.2.10:1".parse().unwrap(),
            "[2001:db8::1]:25".parse().unwrap(),
        );
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            &h[16..32],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 10]
        );
        assert_eq!(&h[48..52], &[0, 1, 0, 25]);
    }
}
