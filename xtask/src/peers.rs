//! The programs, modules and kernel features the tests and the bench use:
//! which Debian package brings each, and a probe that proves it works.
//!
//! Packages are installed with `--no-install-recommends`, so a feature that
//! a package only *recommends* (swaks' TLS and IPv6) is a package of its own
//! here. After installing, every capability is probed before anything is
//! built, so a missing peer is reported in one line up front, never found
//! deep inside a test.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Result};

use crate::provision::{apt_install, dpkg_installed, is_debian_like, is_root};

/// A Debian package the tests or the bench need.
pub struct Peer {
    /// The Debian package name.
    pub package: &'static str,
    /// Which tests or bench sections use it (one line).
    pub used_by: &'static str,
}

/// The packages building the userspace binary needs, beyond the Rust
/// toolchain: `cargo xtask build` installs these alone.
const BUILD_PEERS: &[Peer] = &[
    Peer {
        package: "protobuf-compiler",
        used_by: "building smtpguard: the etcd-client crate's build script runs protoc (fleet source)",
    },
    Peer {
        package: "libprotobuf-dev",
        used_by: "building smtpguard: google/protobuf/*.proto for protoc (only a Recommends of protobuf-compiler)",
    },
];

/// Every package a test or the bench uses, beyond the build toolchain and
/// [`BUILD_PEERS`].
const TEST_PEERS: &[Peer] = &[
    Peer {
        package: "postfix",
        used_by: "postfix_handoff, end_to_end, bench front door: a private Postfix as the upstream MTA",
    },
    Peer {
        package: "swaks",
        used_by: "front_door: swaks as a second real SMTP client",
    },
    Peer {
        package: "libnet-ssleay-perl",
        used_by: "front_door::tls_required_then_mail_over_starttls: swaks --tls (only a Recommends of swaks)",
    },
    Peer {
        package: "libio-socket-inet6-perl",
        used_by: "front_door::swaks_over_ipv6: swaks to [::1] (only a Recommends of swaks)",
    },
    Peer {
        package: "openssl",
        used_by: "smtpguard tls unit tests: RSA keys and SEC1/PKCS#1/encrypted PEM files made by openssl",
    },
    Peer {
        package: "python3",
        used_by: "front_door, end_to_end: /usr/bin/python3 smtplib and ssl clients",
    },
    Peer {
        package: "iproute2",
        used_by: "every netns test (ip netns, ip link veth) and the Postfix fixture (ss)",
    },
    Peer {
        package: "util-linux",
        used_by: "control tests: setpriv runs the CLI as nobody (socket permission checks)",
    },
    Peer {
        package: "mount",
        used_by: "xdp_netns: a private bpffs (mount -t bpf, umount)",
    },
    Peer {
        package: "strace",
        used_by: "xdp_netns::restart_*_at_any_bpf_call_*: SIGKILL or a failure injected at each bpf() call of a restart",
    },
    Peer {
        package: "procps",
        used_by: "end_to_end (pgrep: no process left), bench flood (sysctl)",
    },
    Peer {
        package: "bpftool",
        used_by: "end_to_end: no XDP program left attached (bpftool net)",
    },
    Peer {
        package: "xdp-tools",
        used_by: "bench kernel and flood rows: xdp-filter and its xdpfilt_alw_ip.o as the baseline",
    },
    Peer {
        package: "nftables",
        used_by: "bench flood, list load and CLI latency rows: nft sets as the baseline",
    },
    Peer {
        package: "haproxy",
        used_by: "bench front door: HAProxy in front of Postfix as the baseline",
    },
    Peer {
        package: "lintian",
        used_by: "package: lintian checks the .deb of cargo xtask deb",
    },
    Peer {
        package: "systemd",
        used_by: "package: systemd-analyze verify on the installed unit (no running init needed)",
    },
    Peer {
        package: "man-db",
        used_by: "package: man -l renders every installed page",
    },
    Peer {
        package: "adduser",
        used_by: "package: the postinst creates the smtpguard system user",
    },
    Peer {
        package: "gzip",
        used_by: "cargo xtask deb: man pages gzipped (gzip -9n)",
    },
    Peer {
        package: "fail2ban",
        used_by: "fail2ban: fail2ban-regex runs contrib/fail2ban's filter over the daemon's real log",
    },
    Peer {
        package: "etcd-server",
        used_by: "fleet, bench fleet rows: a private etcd (single member, 3-member cluster, TLS) on free loopback ports",
    },
    Peer {
        package: "etcd-client",
        used_by: "fleet: etcdctl sets up roles and users, compacts, and checks member health",
    },
];

/// One thing the tests rely on, and how to prove it is there.
struct Capability {
    /// What it is, as printed.
    what: &'static str,
    /// The Debian package that provides it (or the kernel feature).
    provider: &'static str,
    probe: Probe,
}

enum Probe {
    /// The command exits 0.
    Runs(&'static [&'static str]),
    /// The command exits 0 and its standard output contains the text.
    Prints(&'static [&'static str], &'static str),
    /// The file exists.
    File(&'static str),
    /// A network namespace can be made, entered, given a veth pair, and removed (root).
    Netns,
    /// bpffs can be mounted on a fresh directory and unmounted (root).
    Bpffs,
}

/// What [`BUILD_PEERS`] provide.
const BUILD_CAPABILITIES: &[Capability] = &[
    Capability {
        what: "protoc with the well-known types",
        provider: "protobuf-compiler and libprotobuf-dev",
        probe: Probe::File("/usr/include/google/protobuf/empty.proto"),
    },
    Capability {
        what: "protoc",
        provider: "protobuf-compiler",
        probe: Probe::Runs(&["protoc", "--version"]),
    },
];

/// What [`TEST_PEERS`] (and the kernel) provide.
const TEST_CAPABILITIES: &[Capability] = &[
    Capability {
        what: "postfix (/usr/sbin/postfix, postconf)",
        provider: "postfix",
        probe: Probe::Runs(&["/usr/sbin/postconf", "-d", "mail_version"]),
    },
    Capability {
        what: "swaks",
        provider: "swaks",
        probe: Probe::Runs(&["swaks", "--version"]),
    },
    Capability {
        what: "swaks STARTTLS (Net::SSLeay)",
        provider: "libnet-ssleay-perl",
        probe: Probe::Prints(&["swaks", "--support"], "=== TLS supported"),
    },
    Capability {
        what: "swaks IPv6 (IO::Socket::INET6)",
        provider: "libio-socket-inet6-perl",
        probe: Probe::Prints(&["swaks", "--support"], "=== IPv6 supported"),
    },
    Capability {
        what: "openssl",
        provider: "openssl",
        probe: Probe::Runs(&["openssl", "version"]),
    },
    Capability {
        what: "/usr/bin/python3 with smtplib and ssl",
        provider: "python3",
        probe: Probe::Runs(&["/usr/bin/python3", "-c", "import smtplib, ssl"]),
    },
    Capability {
        what: "ip",
        provider: "iproute2",
        probe: Probe::Runs(&["ip", "-V"]),
    },
    Capability {
        what: "ss",
        provider: "iproute2",
        probe: Probe::Runs(&["ss", "-V"]),
    },
    Capability {
        what: "ip netns with a veth pair",
        provider: "iproute2 (and a kernel with network namespaces and veth)",
        probe: Probe::Netns,
    },
    Capability {
        what: "setpriv",
        provider: "util-linux",
        probe: Probe::Runs(&["setpriv", "--version"]),
    },
    Capability {
        what: "bpffs mountable (mount -t bpf)",
        provider: "mount (and a kernel with CONFIG_BPF_SYSCALL)",
        probe: Probe::Bpffs,
    },
    Capability {
        what: "strace with syscall fault injection (-e inject)",
        provider: "strace",
        probe: Probe::Runs(&[
            "strace",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=getpid",
            "-e",
            "inject=getpid:retval=1:when=1",
            "true",
        ]),
    },
    Capability {
        what: "pgrep",
        provider: "procps",
        probe: Probe::Runs(&["pgrep", "--version"]),
    },
    Capability {
        what: "sysctl",
        provider: "procps",
        probe: Probe::Runs(&["sysctl", "--version"]),
    },
    Capability {
        what: "lintian",
        provider: "lintian",
        probe: Probe::Runs(&["lintian", "--version"]),
    },
    Capability {
        what: "systemd-analyze",
        provider: "systemd",
        probe: Probe::Runs(&["systemd-analyze", "--version"]),
    },
    Capability {
        what: "man -l",
        provider: "man-db",
        probe: Probe::Runs(&["man", "--version"]),
    },
    Capability {
        what: "adduser --system",
        provider: "adduser",
        probe: Probe::Runs(&["adduser", "--version"]),
    },
    Capability {
        what: "bpftool",
        provider: "bpftool",
        probe: Probe::Runs(&["bpftool", "version"]),
    },
    Capability {
        what: "xdp-filter",
        provider: "xdp-tools",
        probe: Probe::File("/usr/sbin/xdp-filter"),
    },
    Capability {
        what: "xdp-filter's object xdpfilt_alw_ip.o",
        provider: "xdp-tools (its libxdp1)",
        probe: Probe::File("/usr/lib/x86_64-linux-gnu/bpf/xdpfilt_alw_ip.o"),
    },
    Capability {
        what: "nft",
        provider: "nftables",
        probe: Probe::Runs(&["nft", "--version"]),
    },
    Capability {
        what: "haproxy",
        provider: "haproxy",
        probe: Probe::Runs(&["haproxy", "-v"]),
    },
    Capability {
        what: "fail2ban-regex",
        provider: "fail2ban",
        probe: Probe::Runs(&["fail2ban-regex", "--version"]),
    },
    Capability {
        what: "etcd",
        provider: "etcd-server",
        probe: Probe::Runs(&["etcd", "--version"]),
    },
    Capability {
        what: "etcdctl (API v3)",
        provider: "etcd-client",
        probe: Probe::Runs(&["etcdctl", "version"]),
    },
];

/// Installs (as root on Debian/Ubuntu) every package the build, the tests
/// and the bench need that is not installed, then probes every capability.
/// Fails, before anything is built, with one line per missing capability
/// naming its package.
pub fn ensure() -> Result<()> {
    ensure_sets(
        "the tests and the bench",
        &[BUILD_PEERS, TEST_PEERS],
        &[BUILD_CAPABILITIES, TEST_CAPABILITIES],
    )
}

/// The same for building the userspace binary alone (`cargo xtask build`,
/// `run`, `deb`): on a fresh machine the build itself needs protoc. A
/// working protoc is enough, from any package manager or release archive:
/// `PROTOC` set (the etcd-client build script uses it as it is), or the
/// probes passing; only otherwise are the Debian packages installed.
pub fn ensure_build() -> Result<()> {
    if std::env::var_os("PROTOC").is_some() || BUILD_CAPABILITIES.iter().all(|c| c.check().is_ok())
    {
        return Ok(());
    }
    ensure_sets("the build", &[BUILD_PEERS], &[BUILD_CAPABILITIES])
}

fn ensure_sets(who: &str, peers: &[&[Peer]], capabilities: &[&[Capability]]) -> Result<()> {
    let missing = missing_packages(peers);
    if !missing.is_empty() {
        if !is_root() || !is_debian_like() {
            bail!(
                "missing Debian packages for {who}: {}; install them and run again",
                missing.join(" ")
            );
        }
        if missing.contains(&"postfix") {
            keep_postfix_unconfigured()?;
        }
        apt_install(&missing)?;
    }
    let failures: Vec<String> = capabilities
        .iter()
        .flat_map(|set| set.iter())
        .filter_map(|c| c.check().err().map(|why| c.missing_line(&why)))
        .collect();
    if let Some(first) = failures.first() {
        for line in &failures {
            eprintln!("xtask: {line}");
        }
        bail!("{first}");
    }
    eprintln!(
        "xtask: packages for {who} present and working ({} packages, {} capabilities probed)",
        peers.iter().map(|set| set.len()).sum::<usize>(),
        capabilities.iter().map(|set| set.len()).sum::<usize>()
    );
    Ok(())
}

/// Prints what is present, what is missing and what `ensure` would
/// install; installs nothing. Returns whether everything is present.
pub fn report() -> bool {
    let peers = [BUILD_PEERS, TEST_PEERS];
    println!("build and test peers (Debian packages):");
    for peer in peers.iter().flat_map(|set| set.iter()) {
        let state = if dpkg_installed(peer.package) {
            "installed"
        } else {
            "MISSING"
        };
        println!("  {state:<9} {:<24} {}", peer.package, peer.used_by);
    }
    println!("capabilities the build and the tests rely on:");
    let mut all = true;
    for cap in [BUILD_CAPABILITIES, TEST_CAPABILITIES]
        .iter()
        .flat_map(|set| set.iter())
    {
        match cap.check() {
            Ok(()) => println!("  ok        {}", cap.what),
            Err(why) => {
                all = false;
                println!(
                    "  MISSING   {} ({why}; provided by {})",
                    cap.what, cap.provider
                );
            }
        }
    }
    let missing = missing_packages(&peers);
    if missing.is_empty() {
        println!("would install: nothing");
    } else {
        println!("would install: {}", missing.join(" "));
    }
    all && missing.is_empty()
}

fn missing_packages(peers: &[&[Peer]]) -> Vec<&'static str> {
    peers
        .iter()
        .flat_map(|set| set.iter())
        .map(|p| p.package)
        .filter(|p| !dpkg_installed(p))
        .collect()
}

/// Never let the package configure a system MTA: the tests run their own
/// Postfix from a private config directory.
fn keep_postfix_unconfigured() -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("debconf-set-selections")
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(b"postfix postfix/main_mailer_type select No configuration\n")?;
    if !child.wait()?.success() {
        bail!("debconf-set-selections failed");
    }
    Ok(())
}

impl Capability {
    fn missing_line(&self, why: &str) -> String {
        format!(
            "missing: {} ({why}); install the Debian package {}",
            self.what, self.provider
        )
    }

    /// `Err(why)` when the capability is not usable.
    fn check(&self) -> Result<(), String> {
        match &self.probe {
            Probe::Runs(argv) => run(argv).map(|_| ()),
            Probe::Prints(argv, needle) => {
                let out = run(argv)?;
                if out.contains(needle) {
                    Ok(())
                } else {
                    Err(format!("`{}` does not say \"{needle}\"", argv.join(" ")))
                }
            }
            Probe::File(path) => {
                if Path::new(path).exists() {
                    Ok(())
                } else {
                    Err(format!("{path} does not exist"))
                }
            }
            Probe::Netns => root_only(netns_probe),
            Probe::Bpffs => root_only(bpffs_probe),
        }
    }
}

/// Runs `argv`; its standard output, or why it failed.
fn run(argv: &[&str]) -> Result<String, String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "`{}` failed: {}",
            argv.join(" "),
            stderr.lines().last().unwrap_or("no output").trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn root_only(probe: fn() -> Result<(), String>) -> Result<(), String> {
    if is_root() {
        probe()
    } else {
        Err("only root can check this".into())
    }
}

fn netns_probe() -> Result<(), String> {
    let ns = format!("sg-probe-{}", std::process::id());
    run(&["ip", "netns", "add", &ns])?;
    let result = run(&["ip", "netns", "exec", &ns, "true"]).and_then(|_| {
        run(&[
            "ip", "-n", &ns, "link", "add", "sgp0", "type", "veth", "peer", "name", "sgp1",
        ])
        .map(|_| ())
    });
    // Removing the namespace removes the veth pair with it.
    let removed = run(&["ip", "netns", "del", &ns]).map(|_| ());
    result.and(removed)
}

fn bpffs_probe() -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("sg-bpffs-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.to_string_lossy().into_owned();
    let result = run(&["mount", "-t", "bpf", "bpf", &path])
        .and_then(|_| run(&["umount", &path]).map(|_| ()));
    let _ = std::fs::remove_dir(&dir);
    result
}
