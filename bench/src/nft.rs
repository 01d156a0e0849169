//! nftables as a baseline: the same list as an interval set, loaded with
//! `nft -f` inside a namespace (so the table dies with it), and the packet
//! counter of its drop rule.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{lists::List, TempDir};
use smtpguard_tests::netns::Netns;

/// Where the drop rule hooks in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `netdev` table, `ingress` hook on the gateway's interface: before
    /// the IP stack, the nftables counterpart of XDP.
    NetdevIngress,
    /// `inet` table, `prerouting` hook at raw priority (-300): the usual
    /// place for a firewall's early drop.
    InetPrerouting,
}

impl Hook {
    /// How the rows name it.
    pub fn label(self) -> &'static str {
        match self {
            Hook::NetdevIngress => "nft netdev ingress",
            Hook::InetPrerouting => "nft inet prerouting",
        }
    }

    fn family(self) -> &'static str {
        match self {
            Hook::NetdevIngress => "netdev",
            Hook::InetPrerouting => "inet",
        }
    }
}

/// Name of the bench's table in its namespace.
pub const TABLE: &str = "sgbench";
/// Name of its base chain (not `drop`: that is a keyword).
const CHAIN: &str = "guard";

/// The table with the list as set `deny` and, when `port` is given, a base
/// chain that drops SYNs to `port` from the set (counted). `device`
/// is the interface for the netdev hook.
pub fn table_script(list: &List, hook: Hook, device: &str, port: Option<u16>) -> String {
    let ip = if list.is_v6() { "ip6" } else { "ip" };
    let chain = match port {
        None => String::new(),
        Some(port) => {
            let hook_spec = match hook {
                Hook::NetdevIngress => {
                    format!("type filter hook ingress device \"{device}\" priority -500;")
                }
                Hook::InetPrerouting => "type filter hook prerouting priority -300;".into(),
            };
            format!(
                "chain {CHAIN} {{ {hook_spec} {ip} saddr @deny tcp dport {port} \
                 tcp flags & (syn | ack) == syn counter drop; }}"
            )
        }
    };
    format!(
        "table {} {TABLE} {{\n{}\n{chain}\n}}\n",
        hook.family(),
        super::lists::nft_set(list, "deny")
    )
}

/// Runs `nft -f` on `script` inside `ns`; returns how long it took.
pub fn load(ns: &Netns, script: &str) -> Result<Duration> {
    let dir = TempDir::try_new("nft")?;
    let path = dir.path().join("rules.nft");
    std::fs::write(&path, script)?;
    let started = Instant::now();
    let out = ns
        .command("nft")
        .arg("-f")
        .arg(&path)
        .output()
        .context("running nft")?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "nft -f failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        );
    }
    Ok(took)
}

/// Runs `nft ARGS` inside `ns`; returns how long it took.
pub fn command(ns: &Netns, args: &[&str]) -> Result<Duration> {
    let started = Instant::now();
    let out = ns
        .command("nft")
        .args(args)
        .output()
        .context("running nft")?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// Packets counted by the drop rule of the bench's table for `hook`.
pub fn dropped(ns: &Netns, hook: Hook) -> Result<u64> {
    let out = ns
        .command("nft")
        .args(["list", "chain", hook.family(), TABLE, CHAIN])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("no counter in the nft chain")
}

/// How long `nft -f` takes to load `list` as a set, in a namespace of its own.
pub fn load_time(list: &List) -> Result<Duration> {
    let ns = Netns::new("nft", &smtpguard_tests::netns::unique_tag());
    load(&ns, &table_script(list, Hook::InetPrerouting, "", None))
}

/// Whether `nft` is installed.
pub fn available() -> Result<()> {
    match Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("nft not installed (Debian package nftables)"),
    }
}
