//! Another XDP program on the interface (xdp-filter, through libxdp): the
//! daemon refuses to start with an error that names that program (id,
//! name, mode) and says what to do, instead of a bare "Device or resource
//! busy". In skb mode (the same mode: EBUSY) and native mode (the other
//! mode: the kernel refuses both at once).

use std::path::{Path, PathBuf};
use std::time::Duration;

use smtpguard::testing::{config_text, TempDir};
use smtpguard_tests::netns::{Topology, GW_V4};
use smtpguard_tests::{require_root, run_bounded};

fn binary() -> PathBuf {
    std::env::var_os("SMTPGUARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/smtpguard"))
}

/// The daemon's error when xdp-filter already holds the gateway interface
/// and smtpguard asks for `mode`.
fn start_beside_xdp_filter(mode: &str) -> (String, String) {
    let topo = Topology::new();
    let dir = TempDir::new("coexist");
    let xdp = format!("interfaces = [\"{}\"]\nmode = \"{mode}\"\n", topo.gw_if);
    let listen = format!("{GW_V4}:2525").parse().unwrap();
    let config = dir.write(
        "smtpguard.toml",
        config_text(dir.path(), listen, &[("xdp", &xdp)]),
    );
    // libxdp needs a bpffs; `ip netns exec` gives this shell its own.
    let script = format!(
        "mount -t bpf bpf /sys/fs/bpf && xdp-filter load -m skb {iface} && \
         exec {bin} run --config {config}",
        iface = topo.gw_if,
        bin = binary().display(),
        config = config.display()
    );
    let mut cmd = topo.gw.command("sh");
    cmd.args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = run_bounded(cmd, Duration::from_secs(60)).unwrap();
    assert!(!out.status.success(), "the daemon should refuse to start");
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        topo.gw_if.clone(),
    )
}

fn assert_names_the_holder(stderr: &str, iface: &str) {
    let wanted = format!("another XDP program holds {iface}: program ");
    assert!(stderr.contains(&wanted), "{stderr}");
    assert!(
        stderr.contains("\"xdpfilt_alw_all\" in skb mode"),
        "names the program and its mode: {stderr}"
    );
    assert!(
        stderr.contains(&format!("xdp-loader unload {iface} --all")),
        "{stderr}"
    );
}

/// One test for both modes: xdp-filter takes a lock file shared by the
/// whole machine (not per namespace), so two loads at once collide.
#[test]
fn the_error_names_the_program_in_the_way_in_either_mode() {
    require_root();
    for mode in ["skb", "native"] {
        let (stderr, iface) = start_beside_xdp_filter(mode);
        assert_names_the_holder(&stderr, &iface);
    }
}
