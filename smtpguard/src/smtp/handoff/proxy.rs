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
//!
//! When the client used STARTTLS, one TLV follows the addresses (HAProxy's
//! proxy-protocol.txt §2.2.5): `PP2_TYPE_SSL` (0x20) with `client` =
//! `PP2_CLIENT_SSL`, `verify` = 1 (no client certificate was asked for, so
//! none was verified), and two sub-TLVs, `PP2_SUBTYPE_SSL_VERSION` (0x21,
//! `TLSv1.3`) and `PP2_SUBTYPE_SSL_CIPHER` (0x23, the OpenSSL name as
//! HAProxy and nginx send it, `TLS_AES_256_GCM_SHA384`). The length field
//! covers them. Postfix up to at least 3.7 skips TLVs; a reader that
//! understands them (HAProxy `accept-proxy`, Dovecot) sees the client's TLS.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::smtp::TlsInfo;

/// The 12-byte PROXY v2 signature.
pub(crate) const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2 (high nibble), command PROXY (low nibble).
const VERSION_PROXY: u8 = 0x21;
/// AF_INET (high nibble), SOCK_STREAM (low nibble).
const TCP4: u8 = 0x11;
/// AF_INET6 (high nibble), SOCK_STREAM (low nibble).
const TCP6: u8 = 0x21;
/// TLV type: the client connection used TLS.
const PP2_TYPE_SSL: u8 = 0x20;
/// Sub-TLV of [`PP2_TYPE_SSL`]: the TLS version, US-ASCII.
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
/// Sub-TLV of [`PP2_TYPE_SSL`]: the cipher suite's OpenSSL name, US-ASCII.
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
/// `client` bit: the connection used SSL/TLS.
const PP2_CLIENT_SSL: u8 = 0x01;

/// The PROXY v2 header saying a TCP connection came from `client` to
/// `local`: 28 bytes for IPv4, 52 for IPv6, plus the `PP2_TYPE_SSL` TLV
/// when `tls` says the client used STARTTLS.
///
/// Both addresses must be of one family in the header. IPv4-mapped IPv6
/// addresses (`::ffff:a.b.c.d`) are first turned into IPv4, so a client
/// normalised to IPv4 that reached an IPv6 socket still goes out as TCP4;
/// if the families still differ, the IPv4 one is mapped into IPv6 and the
/// header is TCP6.
pub(crate) fn header(client: SocketAddr, local: SocketAddr, tls: Option<&TlsInfo>) -> Vec<u8> {
    let (src, dst) = (client.ip().to_canonical(), local.ip().to_canonical());
    let tlv = tls.map(ssl_tlv).unwrap_or_default();
    let mut out = Vec::with_capacity(52 + tlv.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(TCP4);
            out.extend_from_slice(&length(12, &tlv));
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(TCP6);
            out.extend_from_slice(&length(36, &tlv));
            out.extend_from_slice(&as_v6(s).octets());
            out.extend_from_slice(&as_v6(d).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out.extend_from_slice(&tlv);
    out
}

/// The length field: the addresses and the TLVs after them.
fn length(addresses: usize, tlv: &[u8]) -> [u8; 2] {
    // A TLV here is at most a few hundred bytes (two short strings).
    u16::try_from(addresses + tlv.len())
        .expect("PROXY header under 64 KiB")
        .to_be_bytes()
}

/// `PP2_TYPE_SSL` with its version and cipher sub-TLVs.
fn ssl_tlv(tls: &TlsInfo) -> Vec<u8> {
    let mut value = vec![PP2_CLIENT_SSL];
    value.extend_from_slice(&1u32.to_be_bytes());
    push_tlv(&mut value, PP2_SUBTYPE_SSL_VERSION, tls.version.as_bytes());
    push_tlv(
        &mut value,
        PP2_SUBTYPE_SSL_CIPHER,
        openssl_cipher_name(&tls.cipher).as_bytes(),
    );
    let mut out = Vec::with_capacity(3 + value.len());
    push_tlv(&mut out, PP2_TYPE_SSL, &value);
    out
}

/// One TLV: type, 16-bit big-endian length, value (cut at 65535 bytes,
/// which no version or cipher name reaches).
fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let value = &value[..value.len().min(u16::MAX as usize)];
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// The OpenSSL name of a rustls cipher suite (`TLS13_AES_256_GCM_SHA384`
/// → `TLS_AES_256_GCM_SHA384`, `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256` →
/// `ECDHE-RSA-AES128-GCM-SHA256`), as HAProxy and nginx send it; other
/// names as they are.
fn openssl_cipher_name(rustls: &str) -> &str {
    match rustls {
        "TLS13_AES_128_GCM_SHA256" => "TLS_AES_128_GCM_SHA256",
        "TLS13_AES_256_GCM_SHA384" => "TLS_AES_256_GCM_SHA384",
        "TLS13_CHACHA20_POLY1305_SHA256" => "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-RSA-CHACHA20-POLY1305",
        other => other,
    }
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
            None,
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
            None,
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
            None,
        );
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..24], &[192, 0, 2, 10, 198, 51, 100, 1]);
        // A real IPv6 local address: the client is mapped into IPv6.
        let h = header(
            "192.0.2.10:1".parse().unwrap(),
            "[2001:db8::1]:25".parse().unwrap(),
            None,
        );
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            &h[16..32],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 10]
        );
        assert_eq!(&h[48..52], &[0, 1, 0, 25]);
    }

    /// HAProxy proxy-protocol.txt §2.2.5, byte for byte: the SSL TLV after
    /// the addresses, counted in the length field.
    #[test]
    fn tls_tlvs_exact_bytes() {
        let tls = TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
        };
        let h = header(
            "192.0.2.10:40000".parse().unwrap(),
            "198.51.100.1:25".parse().unwrap(),
            Some(&tls),
        );
        let cipher = b"TLS_AES_256_GCM_SHA384";
        let ssl_len = 1 + 4 + (3 + 7) + (3 + cipher.len());
        let want: Vec<u8> = [
            &b"\r\n\r\n\0\r\nQUIT\n"[..],
            &[0x21, 0x11],
            &((12 + 3 + ssl_len) as u16).to_be_bytes(),
            &[192, 0, 2, 10, 198, 51, 100, 1, 0x9c, 0x40, 0x00, 0x19],
            &[0x20],
            &(ssl_len as u16).to_be_bytes(),
            &[0x01, 0, 0, 0, 1],
            &[0x21, 0, 7],
            b"TLSv1.3",
            &[0x23, 0, cipher.len() as u8],
            cipher,
        ]
        .concat();
        assert_eq!(h, want);
        // IPv6: the same TLV after 36 bytes of addresses.
        let h6 = header(
            "[2001:db8::10]:40000".parse().unwrap(),
            "[2001:db8:1::1]:25".parse().unwrap(),
            Some(&tls),
        );
        assert_eq!(&h6[14..16], &((36 + 3 + ssl_len) as u16).to_be_bytes());
        assert_eq!(&h6[52..], &want[28..]);
    }

    #[test]
    fn cipher_names_are_openssl_names() {
        assert_eq!(
            openssl_cipher_name("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
            "ECDHE-RSA-AES128-GCM-SHA256"
        );
        assert_eq!(
            openssl_cipher_name("TLS13_CHACHA20_POLY1305_SHA256"),
            "TLS_CHACHA20_POLY1305_SHA256"
        );
        assert_eq!(openssl_cipher_name("SOMETHING_NEW"), "SOMETHING_NEW");
    }
}
