//! Where the daemon pins its XDP links, in the three situations an
//! installation meets (each in a gateway namespace of its own, whose
//! `ip netns exec` mount namespace has no bpffs on /sys/fs/bpf):
//! - nothing mounted, run as root: the daemon mounts bpffs itself and pins;
//! - a root-only bpffs, run as an unprivileged user with the unit's
//!   capabilities: not pinned, and `status` says why (the directory cannot
//!   be created) and what it costs (a crash removes the filter);
//! - nothing mounted, the same user (no right to mount): not pinned, and
//!   `status` says that no bpffs is mounted.
//!
//! Each daemon still filters; the unpinned ones just do not outlive a
//! crash. The packaged unit's way (its `ExecStartPre=+` lines make the
//! directory for the service user) is checked in `package.rs`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use smtpguard::testing::{config_text, TempDir};
use smtpguard_tests::netns::{ChildGuard, Topology, GW_V4};
use smtpguard_tests::{require_root, wait_for};

/// The capabilities of the packaged unit, for `setpriv`.
const UNIT_CAPS: &str = "+bpf,+net_admin,+net_bind_service,+perfmon";

fn binary() -> PathBuf {
    std::env::var_os("SMTPGUARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/smtpguard"))
}

/// How the daemon is started inside the gateway namespace.
enum Start {
    /// As root, nothing mounted on /sys/fs/bpf.
    Root,
    /// As `nobody` with the unit's capabilities, after root mounted a
    /// bpffs (root-only, as bpffs is by default).
    UserOnRootOnlyBpffs,
    /// As `nobody` with the unit's capabilities, nothing mounted.
    UserWithoutBpffs,
}

/// Starts the daemon as `start` says, waits for `status`, and returns the
/// XDP interface's `pinned` text and the daemon's log.
fn pinned_as(start: Start) -> (String, String) {
    let topo = Topology::new();
    let dir = TempDir::new("bpffs");
    // `nobody` reads the config and writes lists and socket here.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let xdp = format!("interfaces = [\"{}\"]\nmode = \"skb\"\n", topo.gw_if);
    let listen = format!("{GW_V4}:2525").parse().unwrap();
    let config = dir.write(
        "smtpguard.toml",
        config_text(dir.path(), listen, &[("xdp", &xdp)]),
    );
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    let run = format!("{} run --config {}", binary().display(), config.display());
    let as_user = format!(
        "setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all,{UNIT_CAPS} \
         --ambient-caps=-all,{UNIT_CAPS} {run}"
    );
    let script = match start {
        Start::Root => format!("exec {run}"),
        Start::UserOnRootOnlyBpffs => {
            format!("mount -t bpf -o mode=0700 bpf /sys/fs/bpf && exec {as_user}")
        }
        Start::UserWithoutBpffs => format!("exec {as_user}"),
    };
    let log_path = dir.join("daemon.log");
    let child = topo
        .gw
        .command("sh")
        .args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let _daemon = ChildGuard(child);
    let log = || fs::read_to_string(&log_path).unwrap_or_default();
    let status = || {
        Command::new(binary())
            .arg("--socket")
            .arg(dir.join("control.sock"))
            .args(["--json", "status"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
    };
    assert!(
        wait_for(Duration::from_secs(30), || status().is_some()),
        "the daemon did not come up:\n{}",
        log()
    );
    let status = status().unwrap();
    let pinned = status["interfaces"][0]["pinned"]
        .as_str()
        .unwrap_or_else(|| panic!("{status}"))
        .to_owned();
    // Still filtering, pinned or not.
    assert_eq!(topo.gw.xdp_programs(&topo.gw_if), 1, "{}", log());
    (pinned, log())
}

#[test]
fn without_bpffs_root_mounts_it_and_pins() {
    require_root();
    let (pinned, log) = pinned_as(Start::Root);
    assert!(
        pinned.starts_with("yes (/sys/fs/bpf/smtpguard/"),
        "{pinned}\n{log}"
    );
    assert!(log.contains("mounted bpffs"), "{log}");
}

#[test]
fn root_only_bpffs_says_why_it_cannot_pin() {
    require_root();
    let (pinned, log) = pinned_as(Start::UserOnRootOnlyBpffs);
    assert!(
        pinned.starts_with("no (cannot create /sys/fs/bpf/smtpguard as uid ")
            && pinned.contains("Permission denied")
            && pinned.contains("ExecStartPre=+")
            && pinned.ends_with("a crash removes the filter"),
        "{pinned}\n{log}"
    );
    assert!(log.contains("XDP links are not pinned"), "{log}");
}

#[test]
fn no_bpffs_and_no_right_to_mount_says_so() {
    require_root();
    let (pinned, log) = pinned_as(Start::UserWithoutBpffs);
    assert!(
        pinned.starts_with("no (no bpffs on /sys/fs/bpf and mounting one failed: ")
            && pinned.ends_with("a crash removes the filter"),
        "{pinned}\n{log}"
    );
}
