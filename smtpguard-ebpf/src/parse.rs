//! Packet parsing: Ethernet, up to two VLAN tags, IPv4 (any IHL), IPv6 with
//! a bounded extension-header walk, and the TCP header.
//!
//! The only outcome that can lead to a drop is a call of [`OnSyn`]: a
//! positively identified new-connection SYN to a guarded port, with its
//! source as loaded. Everything else comes back as `Err(counter)`, the pass
//! reason to count.
//!
//! The two families reach the caller through two methods rather than one
//! enum: an enum of a `u32` and a `[u32; 4]` joined after the parse made
//! LLVM spill the address to the stack and rebuild it byte by byte (about
//! 60 instructions on every SYN).

use aya_ebpf::programs::XdpContext;
use smtpguard_common::{counter, RuntimeConfig, IPV6_MAX_EXTENSION_HEADERS};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_MOBILITY: u8 = 135;
const IPPROTO_HIP: u8 = 139;
const IPPROTO_SHIM6: u8 = 140;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// Byte offset of the flags within the TCP header (RFC 9293 §3.1).
const TCP_FLAGS_OFFSET: usize = 13;

/// Headers end before this offset or the packet passes as malformed. Keeps
/// every offset provably small for the verifier (packet offsets must stay
/// below 64 KiB) and still covers 9000-byte jumbo frames.
const MAX_HEADER_OFFSET: usize = 0x3fff;

/// What the caller does with a new-connection SYN to a guarded port; the
/// result of `classify` is what these return.
pub trait OnSyn {
    /// What both methods return.
    type Out;
    /// An IPv4 SYN: `source` and `dport_be` as loaded from the packet
    /// (network byte order in memory).
    fn v4(&self, source: u32, dport_be: u16) -> Self::Out;
    /// An IPv6 SYN: the source's four words as loaded from the packet
    /// (network byte order in memory), and the destination port.
    fn v6(&self, source: &[u32; 4], dport_be: u16) -> Self::Out;
}

/// Pass reason (a `counter::PASS_*` index) when the packet is not a SYN to judge.
pub type PassReason = u32;

/// The address of `len` bytes at `offset` into the frame, bounds-checked
/// against the end of the packet; a short packet is `PASS_MALFORMED`.
#[inline(always)]
fn at(ctx: &XdpContext, offset: usize, len: usize) -> Result<usize, PassReason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if offset > MAX_HEADER_OFFSET || start + offset + len > end {
        return Err(counter::PASS_MALFORMED);
    }
    Ok(start + offset)
}

/// `len` bytes of the frame, bounds-checked once by [`header`]; its fields
/// are then read with no check of their own. The verifier keeps the checked
/// range on the pointer and rejects the program if a read went past it, so
/// a wrong offset cannot load, let alone read out of bounds.
#[derive(Clone, Copy)]
struct Header {
    at: usize,
}

// Header fields are loaded whole, with one BPF load each and the offset in
// the instruction. The packet has no alignment guarantee, so Rust's
// unaligned reads make LLVM split every field into byte loads and shifts;
// the BPF load instructions themselves accept any alignment on x86-64 and
// arm64 (the verifier checks alignment only with strict alignment, which
// those JITs do not ask for).
impl Header {
    /// The byte at `OFF`.
    #[inline(always)]
    fn u8<const OFF: usize>(self) -> u8 {
        let v: u64;
        // SAFETY: within the range `header` checked (see the type's docs).
        unsafe {
            core::arch::asm!("{0} = *(u8 *)({1} + {2})", out(reg) v, in(reg) self.at,
                const OFF, options(pure, readonly, nostack));
        }
        v as u8
    }

    /// The `u16` at `OFF` as it is in the packet (network byte order).
    #[inline(always)]
    fn u16<const OFF: usize>(self) -> u16 {
        let v: u64;
        // SAFETY: as in `u8`.
        unsafe {
            core::arch::asm!("{0} = *(u16 *)({1} + {2})", out(reg) v, in(reg) self.at,
                const OFF, options(pure, readonly, nostack));
        }
        v as u16
    }

    /// The `u32` at `OFF` as it is in the packet (network byte order).
    #[inline(always)]
    fn u32<const OFF: usize>(self) -> u32 {
        let v: u64;
        // SAFETY: as in `u8`.
        unsafe {
            core::arch::asm!("{0} = *(u32 *)({1} + {2})", out(reg) v, in(reg) self.at,
                const OFF, options(pure, readonly, nostack));
        }
        v as u32
    }

    /// The big-endian `u16` at `OFF` as a number.
    #[inline(always)]
    fn be16<const OFF: usize>(self) -> u16 {
        u16::from_be(self.u16::<OFF>())
    }
}

/// The `len` bytes at `offset` into the frame, checked against the end of
/// the packet once; a short packet is `PASS_MALFORMED`.
#[inline(always)]
fn header(ctx: &XdpContext, offset: usize, len: usize) -> Result<Header, PassReason> {
    Ok(Header {
        at: at(ctx, offset, len)?,
    })
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Classifies one frame and hands a SYN to judge to `on`. See the module
/// documentation.
#[inline(always)]
pub fn classify<J: OnSyn>(
    ctx: &XdpContext,
    cfg: &RuntimeConfig,
    on: &J,
) -> Result<J::Out, PassReason> {
    let mut ethertype = header(ctx, 0, ETH_HLEN)?.be16::<12>();
    let mut l3 = ETH_HLEN;
    // Up to two tags (802.1Q, or 802.1ad outer + 802.1Q inner); a third is
    // unusual enough to pass untouched, counted.
    if is_vlan(ethertype) {
        ethertype = header(ctx, l3, 4)?.be16::<2>();
        l3 += 4;
        if is_vlan(ethertype) {
            ethertype = header(ctx, l3, 4)?.be16::<2>();
            l3 += 4;
            if is_vlan(ethertype) {
                return Err(counter::PASS_VLAN_DEPTH);
            }
        }
    }
    match ethertype {
        ETH_P_IP => ipv4(ctx, cfg, l3, on),
        ETH_P_IPV6 => ipv6(ctx, cfg, l3, on),
        _ => Err(counter::PASS_NOT_IP),
    }
}

#[inline(always)]
fn ipv4<J: OnSyn>(
    ctx: &XdpContext,
    cfg: &RuntimeConfig,
    l3: usize,
    on: &J,
) -> Result<J::Out, PassReason> {
    // One bounds check for the fixed header (RFC 791 §3.1), then one load
    // per field.
    let ip = header(ctx, l3, 20)?;
    let version_ihl = ip.u8::<0>();
    let ihl = (version_ihl & 0x0f) as usize;
    if version_ihl >> 4 != 4 || ihl < 5 {
        return Err(counter::PASS_MALFORMED);
    }
    let protocol = ip.u8::<9>();
    if protocol != IPPROTO_TCP {
        return Err(counter::PASS_NOT_TCP);
    }
    let frag = ip.be16::<6>();
    if frag & 0x1fff != 0 {
        // A non-first fragment carries no TCP header: never parse it as one.
        return Err(counter::PASS_FRAGMENT);
    }
    let more_fragments = frag & 0x2000 != 0;
    let header_len = ihl * 4;
    let total_len = ip.be16::<2>() as usize;
    if total_len < header_len {
        return Err(counter::PASS_MALFORMED);
    }
    let source = ip.u32::<12>();
    // The IP length, not the frame end, bounds the TCP header: Ethernet
    // pads short frames to 60 bytes and the padding is not TCP.
    let dport_be = tcp(
        ctx,
        cfg,
        l3 + header_len,
        total_len - header_len,
        more_fragments,
    )?;
    Ok(on.v4(source, dport_be))
}

#[inline(always)]
fn ipv6<J: OnSyn>(
    ctx: &XdpContext,
    cfg: &RuntimeConfig,
    l3: usize,
    on: &J,
) -> Result<J::Out, PassReason> {
    // One bounds check for the fixed header (RFC 8200 §3).
    let ip = header(ctx, l3, 40)?;
    let version = ip.u8::<0>();
    if version >> 4 != 6 {
        return Err(counter::PASS_MALFORMED);
    }
    let source: [u32; 4] = [
        ip.u32::<8>(),
        ip.u32::<12>(),
        ip.u32::<16>(),
        ip.u32::<20>(),
    ];
    let payload_len = ip.be16::<4>() as usize;
    let mut next = ip.u8::<6>();
    let mut offset = l3 + 40;
    let payload_end = offset + payload_len;
    let mut first_fragment = false;

    for _ in 0..IPV6_MAX_EXTENSION_HEADERS {
        match next {
            IPPROTO_TCP => break,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MOBILITY
            | IPPROTO_HIP | IPPROTO_SHIM6 => {
                // Generic format (RFC 8200 §4.2): length in 8-octet units, not counting the first.
                let e = header(ctx, offset, 2)?.be16::<0>();
                next = (e >> 8) as u8;
                offset += ((e & 0xff) as usize + 1) * 8;
            }
            IPPROTO_AH => {
                // AH counts 4-octet units, minus 2 (RFC 4302 §2.2).
                let e = header(ctx, offset, 2)?.be16::<0>();
                next = (e >> 8) as u8;
                offset += ((e & 0xff) as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                // One load for the whole first word: next header, reserved,
                // then offset and flags (RFC 8200 §4.5).
                let word = header(ctx, offset, 4)?.u32::<0>().to_ne_bytes();
                let offset_and_flags = u16::from_be_bytes([word[2], word[3]]);
                if offset_and_flags & 0xfff8 != 0 {
                    return Err(counter::PASS_FRAGMENT);
                }
                first_fragment = offset_and_flags & 1 != 0;
                next = word[0];
                offset += 8;
            }
            IPPROTO_ESP => return Err(counter::PASS_ESP),
            _ => return Err(counter::PASS_NOT_TCP),
        }
        if offset > payload_end || offset > MAX_HEADER_OFFSET {
            return Err(counter::PASS_MALFORMED);
        }
    }
    if next != IPPROTO_TCP {
        return Err(counter::PASS_IPV6_CHAIN);
    }
    let dport_be = tcp(ctx, cfg, offset, payload_end - offset, first_fragment)?;
    Ok(on.v6(&source, dport_be))
}

/// Judges the TCP header at `l4`, of which the IP layer says `l4_len` bytes
/// exist. `first_fragment`: the packet is offset 0 of a fragmented datagram.
/// A SYN to judge gives its destination port (network byte order).
#[inline(always)]
fn tcp(
    ctx: &XdpContext,
    cfg: &RuntimeConfig,
    l4: usize,
    l4_len: usize,
    first_fragment: bool,
) -> Result<u16, PassReason> {
    if l4_len < 4 {
        return Err(counter::PASS_MALFORMED);
    }
    let dport_be = header(ctx, l4, 4)?.u16::<2>();
    if !port_guarded(cfg, dport_be) {
        return Err(counter::PASS_OTHER_PORT);
    }
    if l4_len <= TCP_FLAGS_OFFSET {
        // RFC 1858 tiny-fragment attack: the flags are in a later fragment
        // we never see as TCP, so a first fragment to our port counts as a SYN.
        return if first_fragment {
            Ok(dport_be)
        } else {
            Err(counter::PASS_MALFORMED)
        };
    }
    let flags = header(ctx, l4, TCP_FLAGS_OFFSET + 1)?.u8::<TCP_FLAGS_OFFSET>();
    // A new connection: SYN without ACK. ECE/CWR (ECN setup), FIN, RST, PSH
    // and data (TCP Fast Open) do not make it any less of a new connection.
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return Err(counter::PASS_NOT_SYN);
    }
    Ok(dport_be)
}

/// Whether `dport_be` is one of the guarded ports. Stops at the last port
/// in use: most packets a gateway sees are to other ports, and most
/// gateways guard one or two.
#[inline(always)]
fn port_guarded(cfg: &RuntimeConfig, dport_be: u16) -> bool {
    let count = cfg.port_count as usize;
    for (i, port) in cfg.ports.iter().enumerate() {
        if i >= count {
            return false;
        }
        if *port == dport_be {
            return true;
        }
    }
    false
}
