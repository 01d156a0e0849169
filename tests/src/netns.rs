//! Network namespaces, veth pairs and child processes for tests, each
//! removed when its guard drops, so a failing test leaves nothing behind.
//! Names are unique per process and call, so tests run in parallel.

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsFd,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Socket, Type};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A short unique tag: `<pid mod 100000><counter>`, for names of at most 15 bytes.
pub fn unique_tag() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{}{}", std::process::id() % 100_000, n)
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    run_checked(Command::new("ip").args(args));
}

fn run_checked(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `sgt-<role>-<tag>` with its loopback up.
    pub fn new(role: &str, tag: &str) -> Netns {
        let name = format!("sgt-{role}-{tag}");
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// `ip -d link show dev IFACE` inside the namespace.
    pub fn link_details(&self, interface: &str) -> String {
        let out = run_checked(
            self.command("ip")
                .args(["-d", "link", "show", "dev", interface]),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many XDP programs `interface` has attached (0 or 1 for a sane
    /// interface; more would mean a program attached twice).
    pub fn xdp_programs(&self, interface: &str) -> usize {
        self.link_details(interface).matches("prog/xdp id").count()
    }

    /// Connects from `src` (an address of this namespace) to `dst` with a
    /// connect timeout, and reads the server's first line: `Ok(greeting)`,
    /// or the error (`TimedOut` when the SYN was dropped).
    pub fn connect_from(
        &self,
        src: &str,
        dst: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<String> {
        self.enter(|| {
            let src: IpAddr = src.parse().expect("source address");
            let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(src, 0).into())?;
            socket.connect_timeout(&dst.into(), timeout)?;
            let mut stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 256];
            let n = stream.read(&mut buf)?;
            let _ = stream.write_all(b"QUIT\r\n");
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
    }

    /// Connects from `src` (an address of this namespace) to `dst`, sends
    /// `early` at once, before any greeting (postscreen's PREGREET), and
    /// reads until the server closes (at most 10 s): all it sent.
    pub fn talk_early(&self, src: &str, dst: SocketAddr, early: &[u8]) -> String {
        self.enter(|| {
            let src: IpAddr = src.parse().expect("source address");
            let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None).unwrap();
            socket.bind(&SocketAddr::new(src, 0).into()).unwrap();
            socket
                .connect_timeout(&dst.into(), Duration::from_secs(2))
                .unwrap();
            let mut stream: TcpStream = socket.into();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream.write_all(early).unwrap();
            let mut all = Vec::new();
            let _ = stream.read_to_end(&mut all);
            String::from_utf8_lossy(&all).into_owned()
        })
    }

    /// The MAC address of `interface` in this namespace (`ip -br link show`).
    pub fn mac(&self, interface: &str) -> [u8; 6] {
        let out = self
            .command("ip")
            .args(["-br", "link", "show", "dev", interface])
            .output()
            .expect("run ip link show");
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text
            .split_whitespace()
            .find(|w| w.len() == 17 && w.matches(':').count() == 5)
            .unwrap_or_else(|| panic!("no MAC address for {interface} in {text:?}"));
        let mut bytes = [0u8; 6];
        for (b, part) in bytes.iter_mut().zip(mac.split(':')) {
            *b = u8::from_str_radix(part, 16).expect("hex MAC");
        }
        bytes
    }

    /// A command that runs inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on this thread with this namespace as its network
    /// namespace, then switches the thread back (sockets made inside stay
    /// in this namespace).
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        let original = File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target = File::open(format!("/run/netns/{}", self.name)).expect("open test netns");
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into test netns");
        struct Restore(File);
        impl Drop for Restore {
            fn drop(&mut self) {
                setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns back");
            }
        }
        let _restore = Restore(original);
        f()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its interfaces (and their veth
        // peers) and detaches any XDP program on them.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Two namespaces joined by a veth pair: `gw` (the mail gateway) and `net`
/// (the Internet side). Addresses are documentation ranges only:
/// gw 192.0.2.1/24 and 2001:db8::1/64, net 192.0.2.2/24 and 2001:db8::2/64.
/// Client source addresses are added to `net` with [`Topology::add_client`].
pub struct Topology {
    /// The gateway side (listeners, XDP).
    pub gw: Netns,
    /// The client side.
    pub net: Netns,
    /// Interface name of the veth end in `gw`.
    pub gw_if: String,
    /// Interface name of the veth end in `net`.
    pub net_if: String,
}

/// The gateway's IPv4 address in a [`Topology`].
pub const GW_V4: &str = "192.0.2.1";
/// The gateway's IPv6 address in a [`Topology`].
pub const GW_V6: &str = "2001:db8::1";

impl Topology {
    /// Builds the two namespaces and the veth pair between them.
    pub fn new() -> Topology {
        let tag = unique_tag();
        let gw = Netns::new("gw", &tag);
        let net = Netns::new("net", &tag);
        let gw_if = format!("sg{tag}g");
        let net_if = format!("sg{tag}n");
        assert!(gw_if.len() <= 15, "interface name too long: {gw_if}");
        ip(&[
            "link",
            "add",
            &gw_if,
            "netns",
            gw.name(),
            "type",
            "veth",
            "peer",
            "name",
            &net_if,
            "netns",
            net.name(),
        ]);
        let topo = Topology {
            gw,
            net,
            gw_if,
            net_if,
        };
        let (g, n) = (&topo.gw_if, &topo.net_if);
        topo.gw.ip(&["addr", "add", "192.0.2.1/24", "dev", g]);
        topo.gw
            .ip(&["addr", "add", "2001:db8::1/64", "dev", g, "nodad"]);
        topo.net.ip(&["addr", "add", "192.0.2.2/24", "dev", n]);
        topo.net
            .ip(&["addr", "add", "2001:db8::2/64", "dev", n, "nodad"]);
        topo.gw.ip(&["link", "set", g, "up"]);
        topo.net.ip(&["link", "set", n, "up"]);
        // Clients live in other documentation ranges, routed over the veth.
        for prefix in ["198.51.100.0/24", "203.0.113.0/24"] {
            topo.gw.ip(&["route", "add", prefix, "via", "192.0.2.2"]);
        }
        topo.gw.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:1::/48",
            "via",
            "2001:db8::2",
        ]);
        topo.gw.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:bad::/48",
            "via",
            "2001:db8::2",
        ]);
        topo.net
            .ip(&["route", "add", "default", "via", "192.0.2.1"]);
        topo.net
            .ip(&["-6", "route", "add", "default", "via", "2001:db8::1"]);
        topo
    }

    /// Adds `addr` (a host address in 198.51.100.0/24, 203.0.113.0/24,
    /// 2001:db8:1::/48 or 2001:db8:bad::/48) to the client side.
    pub fn add_client(&self, addr: &str) {
        let prefix = if addr.contains(':') { "/128" } else { "/32" };
        let with_len = format!("{addr}{prefix}");
        if addr.contains(':') {
            self.net
                .ip(&["addr", "add", &with_len, "dev", &self.net_if, "nodad"]);
        } else {
            self.net
                .ip(&["addr", "add", &with_len, "dev", &self.net_if]);
        }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
