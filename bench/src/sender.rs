//! Raw frames on a veth: an `AF_PACKET` socket that sends prebuilt frames
//! (exact counts, as fast as the kernel takes them, no qdisc), one that
//! receives, and SYN frames with valid checksums (the IP stack and
//! nftables check them; XDP does not).

use std::{
    ffi::CString,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use etherparse::PacketBuilder;

/// A packet socket bound to one interface of the calling thread's
/// network namespace.
pub struct PacketSocket {
    fd: OwnedFd,
}

/// `htons`.
fn be16(v: i32) -> u16 {
    (v as u16).to_be()
}

impl PacketSocket {
    fn open(interface: &str, protocol: u16) -> io::Result<PacketSocket> {
        let name = CString::new(interface).map_err(io::Error::other)?;
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket(2).
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol as i32) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: addr is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd })
    }

    fn set_int(&self, level: i32, name: i32, value: i32) -> io::Result<()> {
        // SAFETY: setsockopt with a valid int.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                &value as *const i32 as *const libc::c_void,
                4,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A send-only socket (protocol 0: it receives nothing) that bypasses
    /// the qdisc, like trafgen and pktgen.
    pub fn sender(interface: &str) -> io::Result<PacketSocket> {
        let s = Self::open(interface, 0)?;
        s.set_int(libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)?;
        Ok(s)
    }

    /// A socket that receives the IPv4 frames arriving on `interface`,
    /// waiting at most `timeout` per read.
    pub fn receiver(interface: &str, timeout: Duration) -> io::Result<PacketSocket> {
        let s = Self::open(interface, be16(libc::ETH_P_IP))?;
        s.set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20)?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as i64,
            tv_usec: timeout.subsec_micros() as i64,
        };
        // SAFETY: setsockopt with a valid timeval.
        let rc = unsafe {
            libc::setsockopt(
                s.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                size_of::<libc::timeval>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }

    /// Sends `count` frames, cycling through `frames`, in `sendmmsg`
    /// batches. Returns how many the kernel took.
    pub fn send_cycle(&self, frames: &[Vec<u8>], count: usize) -> io::Result<usize> {
        const BATCH: usize = 256;
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut sent = 0;
        let mut next = 0;
        while sent < count {
            let n = BATCH.min(count - sent);
            // SAFETY: zeroed mmsghdr is valid; each points at an iovec above.
            let mut msgs: Vec<libc::mmsghdr> = (0..n)
                .map(|i| {
                    // SAFETY: mmsghdr is plain C data; all zeroes is a valid value.
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_iov = &mut iovs[(next + i) % frames.len()];
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            // SAFETY: msgs holds n valid headers whose buffers outlive the call.
            let rc = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == io::ErrorKind::WouldBlock
                {
                    continue;
                }
                return Err(e);
            }
            sent += rc as usize;
            next = (next + rc as usize) % frames.len();
        }
        Ok(sent)
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: valid buffer.
        let rc = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one frame into `buf`; `Ok(None)` on timeout.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: valid buffer.
        let rc = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(rc as usize))
    }
}

/// Source and destination MAC of the frames on a veth pair.
#[derive(Clone, Copy, Debug)]
pub struct Macs {
    /// The sending end's address.
    pub src: [u8; 6],
    /// The receiving end's address.
    pub dst: [u8; 6],
}

impl Macs {
    /// From the `net` end of a topology's veth to its `gw` end.
    pub fn net_to_gw(topo: &smtpguard_tests::netns::Topology) -> anyhow::Result<Macs> {
        Ok(Macs {
            src: mac_of(&topo.net, &topo.net_if)?,
            dst: mac_of(&topo.gw, &topo.gw_if)?,
        })
    }
}

/// An Ethernet + IPv4 + TCP SYN frame with valid checksums.
pub fn syn_frame(
    macs: Macs,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(macs.src, macs.dst)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, seq, 64240)
        .syn();
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).expect("writing to a Vec");
    out
}

/// The MAC address of `interface` in namespace `ns` (`ip -j link show`).
pub fn mac_of(ns: &smtpguard_tests::netns::Netns, interface: &str) -> anyhow::Result<[u8; 6]> {
    let out = ns
        .command("ip")
        .args(["-br", "link", "show", "dev", interface])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .find(|w| w.len() == 17 && w.matches(':').count() == 5)
        .ok_or_else(|| anyhow::anyhow!("no MAC address for {interface} in {text:?}"))?;
    let mut bytes = [0u8; 6];
    for (b, part) in bytes.iter_mut().zip(mac.split(':')) {
        *b = u8::from_str_radix(part, 16)?;
    }
    Ok(bytes)
}

/// CPU time (user + system) of the calling thread, in seconds. With tick
/// accounting the softirq work run on the way out of its `sendmmsg` calls
/// (the whole receive path of a veth) is charged here too.
pub fn thread_cpu_seconds() -> f64 {
    // SAFETY: zeroed rusage is valid output storage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// CPU time of every `ksoftirqd/N` thread, in seconds: the softirq work
/// the kernel deferred out of the sender's context.
pub fn ksoftirqd_cpu_seconds() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if !comm.starts_with("ksoftirqd/") {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(path.join("stat")) {
            // Fields after the ")" of the command: state is field 3; utime 14, stime 15.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let get = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            total += get(11) + get(12);
        }
    }
    total as f64 / hz
}
