//! The Debian package of `cargo xtask deb` (path in `SMTPGUARD_DEB`), as an
//! operator gets it: lintian, `dpkg -i`, the installed files and their
//! owners, `systemd-analyze verify` on the unit, every man page rendered,
//! the bash completion loaded; then the unit's own `ExecStartPre=+` and
//! `ExecStart` lines run as systemd would (no init runs here): the pre-start
//! lines as root, the daemon as the `smtpguard` user with exactly the
//! unit's capabilities (`setpriv`), in a network namespace whose
//! `ip netns exec` mount namespace gets a private bpffs. A denied SYN is
//! dropped, `kill -9` leaves the filter in force, `sd_notify` says READY;
//! then remove and purge, and what each leaves.
//!
//! One test, since it installs a package system-wide; it purges the
//! package on every way out.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use smtpguard::testing::TempDir;
use smtpguard_tests::netns::{ChildGuard, Topology, GW_V4};
use smtpguard_tests::{require_root, run_bounded, wait_for};

const UNIT: &str = "/usr/lib/systemd/system/smtpguard.service";

fn deb() -> PathBuf {
    PathBuf::from(
        std::env::var_os("SMTPGUARD_DEB").expect(
            "SMTPGUARD_DEB: run this test through `cargo xtask test`, which builds the .deb",
        ),
    )
}

/// Runs `cmd` (bounded) and panics unless it succeeds; returns its stdout
/// and stderr (small outputs only: they must fit in the pipes).
fn run(cmd: &mut Command) -> String {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = run_bounded(
        std::mem::replace(cmd, Command::new("true")),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Purges the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "smtpguard"])
            .stdout(Stdio::null())
            .status();
    }
}

/// The values of `key=` lines of the unit (several for `ExecStartPre`).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

fn mode_owner(path: &str) -> (u32, String, String) {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let name = |args: &[&str]| {
        run(Command::new("stat").args(args).arg(path))
            .trim()
            .to_owned()
    };
    (
        meta.permissions().mode() & 0o7777,
        name(&["-c", "%U"]),
        name(&["-c", "%G"]),
    )
}

#[test]
fn package_installs_runs_hardened_and_purges() {
    require_root();
    let deb = deb();
    assert!(deb.exists(), "{} is missing", deb.display());

    // lintian: no errors; warnings are printed for the record.
    let lintian = Command::new("lintian")
        .arg("--no-tag-display-limit")
        .arg(&deb)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&lintian.stdout);
    eprintln!("lintian:\n{report}");
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));

    let _installed = Installed;
    run(Command::new("dpkg").arg("-i").arg(&deb));

    // Files, owners and modes.
    assert!(Path::new("/usr/sbin/smtpguard").exists());
    run(Command::new("getent").args(["passwd", "smtpguard"]));
    assert_eq!(
        mode_owner("/etc/smtpguard"),
        (0o750, "root".into(), "smtpguard".into())
    );
    assert_eq!(
        mode_owner("/etc/smtpguard/tls"),
        (0o750, "root".into(), "smtpguard".into())
    );
    assert_eq!(
        mode_owner("/etc/smtpguard/smtpguard.toml"),
        (0o640, "root".into(), "smtpguard".into())
    );
    assert_eq!(
        mode_owner("/var/lib/smtpguard"),
        (0o750, "smtpguard".into(), "smtpguard".into())
    );
    let conffiles = fs::read_to_string("/var/lib/dpkg/info/smtpguard.conffiles").unwrap();
    for conffile in [
        "/etc/smtpguard/smtpguard.toml",
        "/etc/fail2ban/filter.d/smtpguard.conf",
        "/etc/fail2ban/action.d/smtpguard.conf",
    ] {
        assert!(conffiles.contains(conffile), "{conffile} in {conffiles}");
    }

    // The unit: systemd's own checker, and no running init needed.
    let unit = fs::read_to_string(UNIT).unwrap();
    run(Command::new("systemd-analyze").args(["verify", UNIT]));
    assert_eq!(unit_values(&unit, "User"), ["smtpguard"]);
    assert_eq!(unit_values(&unit, "Type"), ["notify"]);

    // Every page renders; the completion loads.
    let pages: Vec<PathBuf> = ["/usr/share/man/man8", "/usr/share/man/man5"]
        .iter()
        .flat_map(|d| fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("smtpguard")
        })
        .collect();
    assert!(pages.len() >= 10, "{pages:?}");
    for page in &pages {
        let text = run(Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANWIDTH", "80"));
        assert!(text.contains("smtpguard"), "{}: {text}", page.display());
    }
    run(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/smtpguard && complete -p smtpguard",
    ]));

    run_the_unit(&unit);

    // Remove: the configuration (a conffile) and the lists stay.
    run(Command::new("dpkg").args(["--remove", "smtpguard"]));
    assert!(!Path::new("/usr/sbin/smtpguard").exists());
    assert!(Path::new("/etc/smtpguard/smtpguard.toml").exists());
    assert!(Path::new("/var/lib/smtpguard").exists());
    // Purge: they go; the user stays (its uid may own files elsewhere).
    run(Command::new("dpkg").args(["--purge", "smtpguard"]));
    for gone in [
        "/etc/smtpguard",
        "/var/lib/smtpguard",
        "/var/spool/smtpguard",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} survived the purge");
    }
    run(Command::new("getent").args(["passwd", "smtpguard"]));
}

/// The unit's pre-start lines as root and its `ExecStart` as the service
/// user with the unit's capabilities, in the gateway namespace of a
/// [`Topology`]; the test's configuration is bind-mounted over
/// /etc/smtpguard/smtpguard.toml in that mount namespace only.
fn run_the_unit(unit: &str) {
    let topo = Topology::new();
    topo.add_client("203.0.113.9");
    topo.add_client("198.51.100.7");
    let dir = TempDir::new("package");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.join("state");
    fs::create_dir(&state).unwrap();
    fs::write(state.join("deny.list"), "203.0.113.0/24 # test: denied\n").unwrap();
    run(Command::new("chown")
        .args(["-R", "smtpguard:smtpguard"])
        .arg(&state));
    let s = state.display();
    let config = dir.join("smtpguard.toml");
    fs::write(
        &config,
        format!(
            r#"
[server]
hostname = "gw.example.com"
listen = ["{GW_V4}:25"]
[policy]
deny_list = "{s}/deny.list"
permit_list = "{s}/permit.list"
[xdp]
interfaces = ["{iface}"]
mode = "native"
[delivery]
spool_dir = "{s}/spool"
accept_domains = ["example.com"]
[control]
socket = "{s}/control.sock"
[screening]
greet_wait = "0s"
"#,
            iface = topo.gw_if
        ),
    )
    .unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();

    // sd_notify: a datagram socket the service user may write to.
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o777)).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let caps: Vec<String> = unit_values(unit, "AmbientCapabilities")
        .join(" ")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let caps = caps.join(",");
    let bounding: Vec<String> = unit_values(unit, "CapabilityBoundingSet")
        .join(" ")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let pre_root: Vec<String> = unit_values(unit, "ExecStartPre")
        .into_iter()
        .filter_map(|l| l.strip_prefix('+').map(str::to_owned))
        .collect();
    assert_eq!(
        pre_root.len(),
        2,
        "bpffs mount and pin directory: {pre_root:?}"
    );
    // The unprivileged pre-start lines (`config check`) run as the user.
    let pre_user: Vec<String> = unit_values(unit, "ExecStartPre")
        .into_iter()
        .filter(|l| !l.starts_with('+'))
        .collect();
    assert!(
        pre_user.iter().any(|l| l.contains("config check")),
        "{pre_user:?}"
    );
    let exec_start = unit_values(unit, "ExecStart").remove(0);
    // LimitNOFILE, capped at this machine's hard limit: raising the hard
    // limit needs CAP_SYS_RESOURCE, which a container may not grant.
    let limit_nofile: u64 = unit_values(unit, "LimitNOFILE").remove(0).parse().unwrap();
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let limit_nofile = limit_nofile.min(hard);

    // `ip netns exec` gives the shell a mount namespace of its own with /sys
    // remounted (no bpffs): the unit's pre-start lines mount one there.
    let mut script = String::from("set -e\n");
    for line in &pre_root {
        script.push_str(line);
        script.push('\n');
    }
    script.push_str(&format!(
        "mount --bind {} /etc/smtpguard/smtpguard.toml\n",
        config.display()
    ));
    let log = dir.join("daemon.log");
    for line in &pre_user {
        script.push_str(&format!(
            "setpriv --reuid=smtpguard --regid=smtpguard --init-groups --inh-caps=-all \
             --no-new-privs {line} >>{log} 2>&1 || {{ echo pre-start-failed; exit 1; }}\n",
            log = log.display()
        ));
    }
    script.push_str(&format!(
        "ulimit -n {limit_nofile}\n\
         setpriv --reuid=smtpguard --regid=smtpguard --init-groups \
         --inh-caps=-all,{caps} --ambient-caps=-all,{caps} --bounding-set=-all,{bounding} \
         --no-new-privs {exec_start} >>{log} 2>&1 &\n\
         echo $!\nwait || true\nexec sleep 600\n",
        bounding = bounding.join(","),
        log = log.display(),
    ));
    let mut child = topo
        .gw
        .command("sh")
        .args(["-c", &script])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let holder = ChildGuard(child);
    let mut pid = String::new();
    BufReader::new(stdout).read_line(&mut pid).unwrap();
    let log = || fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    let daemon_pid: i32 = pid
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no daemon pid ({pid:?}):\n{}", log()));
    // The pre-start check passed on the configuration the daemon then ran.
    assert!(
        log().contains("/etc/smtpguard/smtpguard.toml: configuration OK"),
        "{}",
        log()
    );

    // READY=1 once filtering.
    let mut buf = [0u8; 512];
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 ({e}):\n{}", log()));
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.contains("READY=1"), "{message}\n{}", log());

    // Running as the service user, with the unit's capabilities only.
    let status = fs::read_to_string(format!("/proc/{daemon_pid}/status")).unwrap();
    let uid = run(Command::new("id").args(["-u", "smtpguard"]))
        .trim()
        .to_owned();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid)),
        "{status}"
    );
    let dst: SocketAddr = format!("{GW_V4}:25").parse().unwrap();
    let greeting = topo
        .net
        .connect_from("198.51.100.7", dst, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("permitted client: {e}\n{}", log()));
    assert!(greeting.starts_with("220 "), "{greeting}");
    let denied = topo
        .net
        .connect_from("203.0.113.9", dst, Duration::from_millis(600));
    assert!(
        matches!(&denied, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "the denied SYN should be dropped in XDP: {denied:?}\n{}",
        log()
    );

    // A reload is announced: RELOADING=1 (with MONOTONIC_USEC), READY=1.
    run(Command::new("/usr/sbin/smtpguard")
        .arg("--socket")
        .arg(state.join("control.sock"))
        .arg("reload"));
    let mut notified = String::new();
    while !notified.contains("READY=1") {
        let n = notify.recv(&mut buf).expect("READY=1 after the reload");
        notified.push_str(&String::from_utf8_lossy(&buf[..n]));
        notified.push('\n');
    }
    assert!(
        notified.contains("RELOADING=1") && notified.contains("MONOTONIC_USEC="),
        "{notified}"
    );

    // kill -9: the pinned link keeps the filter in force.
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(daemon_pid, libc::SIGKILL) };
    assert!(wait_for(Duration::from_secs(10), || !Path::new(&format!(
        "/proc/{daemon_pid}"
    ))
    .exists()
        || fs::read_to_string(format!("/proc/{daemon_pid}/stat"))
            .is_ok_and(|s| s.contains(") Z"))));
    assert_eq!(topo.gw.xdp_programs(&topo.gw_if), 1, "{}", log());
    let after_kill = topo
        .net
        .connect_from("203.0.113.9", dst, Duration::from_millis(600));
    assert!(
        matches!(&after_kill, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "after kill -9 the denied SYN should still be dropped: {after_kill:?}"
    );
    // The holder shell ends the mount namespace, and with it the pins.
    drop(holder);
}
