//! A SYN flood whose size is known exactly: whole Ethernet frames written to
//! an `AF_PACKET` socket bound to one interface (e.g. the client end of a
//! veth pair), so every frame the kernel accepted reaches the peer's XDP
//! program, IPv4 and IPv6 alike, with any source address.
//!
//! A frame counts as sent only when `sendto` succeeded. When the peer's
//! queue is full, veth drops the frame and `sendto` fails with `ENOBUFS`;
//! the sender then retries the same frame, so the counts stay exact.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use crate::packet::{self, ethertype, flags};

/// Writes raw Ethernet frames to one interface.
pub struct FrameSender {
    fd: OwnedFd,
    ifindex: i32,
}

impl FrameSender {
    /// Opens a sending-only `AF_PACKET` socket on `ifname`, in the calling
    /// thread's network namespace.
    pub fn open(ifname: &str) -> io::Result<FrameSender> {
        let name = std::ffi::CString::new(ifname)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // Protocol 0: this socket receives nothing.
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(FrameSender {
            fd,
            ifindex: ifindex as i32,
        })
    }

    /// Sends one frame (Ethernet header included). `Ok(true)`: the
    /// interface took it; `Ok(false)`: it was dropped for lack of room
    /// (`ENOBUFS`, `EAGAIN`) and may be sent again.
    pub fn send(&self, frame: &[u8]) -> io::Result<bool> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
        addr.sll_protocol = ether_type.to_be();
        // SAFETY: frame and addr are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n >= 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOBUFS) | Some(libc::EAGAIN) => Ok(false),
            _ => Err(e),
        }
    }
}

/// An Ethernet + IPv4 + TCP SYN frame (checksums zero: XDP does not check
/// them, and a stack that saw the frame would drop it).
pub fn syn_frame_v4(
    macs: ([u8; 6], [u8; 6]),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let tcp = packet::tcp(sport, dport, flags::SYN, &[]);
    let ip = packet::ipv4(src, dst, 6, &tcp, &packet::V4Opts::default());
    with_macs(packet::ethernet(ethertype::IPV4, &[], &ip), macs)
}

/// An Ethernet + IPv6 + TCP SYN frame (see [`syn_frame_v4`]).
pub fn syn_frame_v6(
    macs: ([u8; 6], [u8; 6]),
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let tcp = packet::tcp(sport, dport, flags::SYN, &[]);
    let ip = packet::ipv6(src, dst, &[], 6, &tcp);
    with_macs(packet::ethernet(ethertype::IPV6, &[], &ip), macs)
}

/// Puts `(source, destination)` MAC addresses into an Ethernet frame.
fn with_macs(mut frame: Vec<u8>, (src, dst): ([u8; 6], [u8; 6])) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame
}

/// Offset of the TCP source port in [`syn_frame_v4`] / [`syn_frame_v6`] frames.
const SPORT_V4: usize = 14 + 20;
const SPORT_V6: usize = 14 + 40;

/// What to send.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `(source, destination)` MAC addresses: the sending interface's and
    /// the receiving one's.
    pub macs: ([u8; 6], [u8; 6]),
    /// IPv4 destination.
    pub dst_v4: Ipv4Addr,
    /// IPv6 destination.
    pub dst_v6: Ipv6Addr,
    /// TCP destination port.
    pub dport: u16,
    /// IPv4 source addresses, used in turn.
    pub sources_v4: Vec<Ipv4Addr>,
    /// IPv6 source addresses, used in turn.
    pub sources_v6: Vec<Ipv6Addr>,
    /// Every `v6_every`-th frame is IPv6, the others IPv4.
    pub v6_every: u64,
}

/// Frames sent so far, readable while the flood runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// IPv4 frames the interface took.
    pub v4: AtomicU64,
    /// IPv6 frames the interface took.
    pub v6: AtomicU64,
}

impl Progress {
    /// Both families.
    pub fn total(&self) -> u64 {
        self.v4.load(Ordering::Relaxed) + self.v6.load(Ordering::Relaxed)
    }
}

/// The outcome of [`run`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sent {
    /// IPv4 frames the interface took (exact).
    pub v4: u64,
    /// IPv6 frames the interface took (exact).
    pub v6: u64,
    /// Sends refused for lack of room (then retried).
    pub refused: u64,
    /// How long the flood ran.
    pub elapsed: Duration,
}

/// Sends `plan`'s frames through `sender` as fast as it can while
/// `keep_going(elapsed)` says so (asked every 1024 frames), updating
/// `progress` as it goes.
///
/// # Panics
///
/// On a send error other than a full queue, or an empty source list for a
/// family the plan sends.
pub fn run(
    sender: &FrameSender,
    plan: &Plan,
    progress: &Progress,
    mut keep_going: impl FnMut(Duration) -> bool,
) -> Sent {
    let v4: Vec<Vec<u8>> = plan
        .sources_v4
        .iter()
        .map(|s| syn_frame_v4(plan.macs, *s, plan.dst_v4, 1024, plan.dport))
        .collect();
    let v6: Vec<Vec<u8>> = plan
        .sources_v6
        .iter()
        .map(|s| syn_frame_v6(plan.macs, *s, plan.dst_v6, 1024, plan.dport))
        .collect();
    let started = Instant::now();
    let mut sent = Sent::default();
    let mut attempts: u64 = 0;
    loop {
        if attempts.is_multiple_of(1024) {
            progress.v4.store(sent.v4, Ordering::Relaxed);
            progress.v6.store(sent.v6, Ordering::Relaxed);
            if !keep_going(started.elapsed()) {
                break;
            }
        }
        attempts += 1;
        let n = sent.v4 + sent.v6;
        let is_v6 = plan.v6_every > 0 && n % plan.v6_every == plan.v6_every - 1;
        let sport = (1024 + n % 60_000) as u16;
        let (frame, at) = if is_v6 {
            let frames = &v6;
            assert!(!frames.is_empty(), "no IPv6 sources");
            (&frames[(sent.v6 % frames.len() as u64) as usize], SPORT_V6)
        } else {
            assert!(!v4.is_empty(), "no IPv4 sources");
            (&v4[(sent.v4 % v4.len() as u64) as usize], SPORT_V4)
        };
        // Frames are shared templates: patch the port into a copy on the stack.
        let mut buf = [0u8; 128];
        let len = frame.len();
        buf[..len].copy_from_slice(frame);
        buf[at..at + 2].copy_from_slice(&sport.to_be_bytes());
        match sender.send(&buf[..len]) {
            Ok(true) if is_v6 => sent.v6 += 1,
            Ok(true) => sent.v4 += 1,
            Ok(false) => {
                sent.refused += 1;
                std::thread::yield_now();
            }
            Err(e) => panic!("sending a flood frame: {e}"),
        }
    }
    sent.elapsed = started.elapsed();
    progress.v4.store(sent.v4, Ordering::Relaxed);
    progress.v6.store(sent.v6, Ordering::Relaxed);
    sent
}
