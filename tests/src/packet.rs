//! Frame builders for the XDP tests and the bench, on etherparse's header
//! types (no hand-counted byte offsets). Checksums are left zero: XDP does
//! not verify them and the program must not care.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Header, IpAuthHeader, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options,
    Ipv6FlowLabel, Ipv6Header, Ipv6RawExtHeader, SingleVlanHeader, TcpHeader, VlanId, VlanPcp,
};

/// TCP flag bits as on the wire (RFC 9293 §3.1).
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// A TCP segment: header (20 bytes, no options) + payload.
pub fn tcp(sport: u16, dport: u16, flag_bits: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = TcpHeader::new(sport, dport, 0x1000, 64240);
    h.fin = flag_bits & flags::FIN != 0;
    h.syn = flag_bits & flags::SYN != 0;
    h.rst = flag_bits & flags::RST != 0;
    h.psh = flag_bits & flags::PSH != 0;
    h.ack = flag_bits & flags::ACK != 0;
    h.ece = flag_bits & flags::ECE != 0;
    h.cwr = flag_bits & flags::CWR != 0;
    let mut out = h.to_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A SYN from `sport` to `dport`.
pub fn syn(dport: u16) -> Vec<u8> {
    tcp(40000, dport, flags::SYN, &[])
}

/// IPv4 packet options.
#[derive(Clone, Debug, Default)]
pub struct V4Opts {
    /// Extra header words beyond the 5 of a bare header (IHL = 5 + this).
    pub option_words: usize,
    /// Fragment offset in 8-byte units.
    pub fragment_offset: u16,
    /// The MF flag.
    pub more_fragments: bool,
}

/// An IPv4 packet with `payload` and protocol `proto`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8], opts: &V4Opts) -> Vec<u8> {
    let mut h = Ipv4Header::new(
        payload.len() as u16,
        64,
        IpNumber(proto),
        src.octets(),
        dst.octets(),
    )
    .expect("payload fits");
    // NOP options (type 1) fill the extra words.
    let options = vec![1u8; opts.option_words * 4];
    h.options = Ipv4Options::try_from(options.as_slice()).expect("at most 40 option bytes");
    h.more_fragments = opts.more_fragments;
    h.fragment_offset = IpFragOffset::try_new(opts.fragment_offset).expect("13-bit offset");
    h.total_len = (h.header_len() + payload.len()) as u16;
    let mut out = h.to_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// One IPv6 extension header in a chain.
#[derive(Clone, Debug)]
pub enum Ext {
    HopByHop,
    DestOpts,
    Routing,
    /// Authentication header (length in 4-octet units).
    Auth,
    /// Fragment header: offset in 8-byte units, M flag.
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Ext {
    fn number(&self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::Fragment { .. } => 44,
            Ext::Auth => 51,
            Ext::DestOpts => 60,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        let next = IpNumber(next);
        match self {
            // 14 bytes of PadN-ish payload: a 16-byte header, so walking it
            // needs the length field, not a constant.
            Ext::HopByHop | Ext::DestOpts | Ext::Routing => {
                Ipv6RawExtHeader::new_raw(next, &[0u8; 14])
                    .expect("valid length")
                    .to_bytes()
                    .to_vec()
            }
            // 12-byte ICV: a 24-byte AH (length field 4, in 4-octet units minus 2).
            Ext::Auth => IpAuthHeader::new(next, 0x100, 1, &[0u8; 12])
                .expect("valid ICV")
                .to_bytes()
                .to_vec(),
            // etherparse 0.18.2's Ipv6FragmentHeader::to_bytes puts the M flag
            // in bit 7 of the fourth byte; RFC 8200 §4.5 puts the 13-bit
            // offset in the top bits of the 16-bit field and M in bit 0.
            Ext::Fragment { offset, more } => {
                let field = (offset << 3) | u16::from(*more);
                let mut h = vec![next.0, 0];
                h.extend(field.to_be_bytes());
                h.extend(7u32.to_be_bytes());
                h
            }
        }
    }
}

/// An IPv6 packet: fixed header, the extension chain `exts`, then `payload`
/// of protocol `proto`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[Ext], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, ext) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map(Ext::number).unwrap_or(proto);
        chain.extend(ext.bytes(next));
    }
    let h = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: (chain.len() + payload.len()) as u16,
        next_header: IpNumber(exts.first().map(Ext::number).unwrap_or(proto)),
        hop_limit: 64,
        source: src.octets(),
        destination: dst.octets(),
    };
    let mut out = h.to_bytes().to_vec();
    out.extend(chain);
    out.extend_from_slice(payload);
    out
}

/// EtherType values.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const IPV6: u16 = 0x86DD;
    pub const VLAN: u16 = 0x8100;
    pub const QINQ: u16 = 0x88A8;
}

/// An Ethernet frame carrying `payload` of `ether_type`, behind the VLAN
/// tags `tags` (each the TPID of that tag: 0x8100 or 0x88A8), outermost first.
pub fn ethernet(ether_type: u16, tags: &[u16], payload: &[u8]) -> Vec<u8> {
    let first = tags.first().copied().unwrap_or(ether_type);
    let mut out = Ethernet2Header {
        source: [0x02, 0, 0, 0, 0, 1],
        destination: [0x02, 0, 0, 0, 0, 2],
        ether_type: EtherType(first),
    }
    .to_bytes()
    .to_vec();
    for (i, _) in tags.iter().enumerate() {
        let inner = tags.get(i + 1).copied().unwrap_or(ether_type);
        out.extend(
            SingleVlanHeader {
                pcp: VlanPcp::ZERO,
                drop_eligible_indicator: false,
                vlan_id: VlanId::try_new(100 + i as u16).unwrap(),
                ether_type: EtherType(inner),
            }
            .to_bytes(),
        );
    }
    out.extend_from_slice(payload);
    out
}

/// Ethernet + IPv4 + TCP SYN from `src` to port `dport`.
pub fn syn_v4(src: &str, dport: u16) -> Vec<u8> {
    let ip = ipv4(
        src.parse().unwrap(),
        DST_V4,
        6,
        &syn(dport),
        &V4Opts::default(),
    );
    ethernet(ethertype::IPV4, &[], &ip)
}

/// Ethernet + IPv6 + TCP SYN from `src` to port `dport`.
pub fn syn_v6(src: &str, dport: u16) -> Vec<u8> {
    let ip = ipv6(src.parse().unwrap(), DST_V6, &[], 6, &syn(dport));
    ethernet(ethertype::IPV6, &[], &ip)
}

/// The gateway's address in test frames (documentation range).
pub const DST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 25);
/// The gateway's IPv6 address in test frames (documentation range).
pub const DST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x25);

/// An ARP request (who-has) frame.
pub fn arp_request() -> Vec<u8> {
    let mut body = vec![0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01];
    body.extend([0x02, 0, 0, 0, 0, 1]);
    body.extend(Ipv4Addr::new(192, 0, 2, 1).octets());
    body.extend([0; 6]);
    body.extend(DST_V4.octets());
    ethernet(ethertype::ARP, &[], &body)
}
