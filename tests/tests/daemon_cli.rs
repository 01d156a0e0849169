//! The daemon and its controller CLI together, in a network namespace with
//! native XDP on a veth: live list changes reach the kernel before the CLI
//! returns, temporary entries expire, imports replace atomically, stats and
//! metrics agree with what was sent, and a restart restores the lists.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use smtpguard::testing::{config_text, TempDir};
use smtpguard_tests::{
    netns::{ChildGuard, Netns, Topology, GW_V4},
    require_root,
};

const PORT: u16 = 2525;

fn binary() -> PathBuf {
    std::env::var_os("SMTPGUARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/smtpguard"))
}

fn shared_data(file: &str) -> PathBuf {
    std::env::var_os("SMTPGUARD_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
        .join(file)
}

struct Gateway<'a> {
    ns: &'a Netns,
    dir: &'a Path,
    daemon: Option<ChildGuard>,
}

impl Gateway<'_> {
    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("daemon.log")).unwrap();
        let child = self
            .ns
            .command(binary().to_str().unwrap())
            .args(["run", "--config"])
            .arg(self.dir.join("smtpguard.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start smtpguard");
        self.daemon = Some(ChildGuard(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.cli(&["status"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("daemon did not come up:\n{}", self.log());
    }

    /// Stops the daemon with SIGTERM and waits for it.
    fn stop(&mut self) {
        if let Some(mut guard) = self.daemon.take() {
            let pid = guard.0.id() as i32;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let status = guard.0.wait().unwrap();
            assert!(status.success(), "daemon exit: {status}\n{}", self.log());
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "smtpguard {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ok(&full)).unwrap()
    }

    fn xdp(&self, counter: &str) -> u64 {
        self.json(&["stats"])["xdp"][counter].as_u64().unwrap()
    }
}

/// Writes the gateway's `smtpguard.toml` into `dir`: the test base
/// ([`config_text`]) listening on the gateway address, plus `tables`.
fn write_config(dir: &TempDir, tables: &[(&str, &str)]) {
    let listen = format!("{GW_V4}:{PORT}").parse().unwrap();
    dir.write("smtpguard.toml", config_text(dir.path(), listen, tables));
}

/// Connects from `src` in `ns` to the gateway: the greeting, or the error.
/// The timeout is under the 1 s initial SYN retransmission timeout: one
/// SYN per try, so counters can be compared exactly.
fn connect_from(ns: &Netns, src: &str) -> std::io::Result<String> {
    let dst: SocketAddr = format!("{GW_V4}:{PORT}").parse().unwrap();
    ns.connect_from(src, dst, Duration::from_millis(600))
}

fn assert_greeted(ns: &Netns, src: &str, when: &str) {
    let got = connect_from(ns, src);
    assert!(
        matches!(&got, Ok(g) if g.starts_with("220 ")),
        "{when}: {src} should be greeted, got {got:?}"
    );
}

fn assert_dropped(ns: &Netns, src: &str, when: &str) {
    let got = connect_from(ns, src);
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "{when}: {src}'s SYN should be dropped, got {got:?}"
    );
}

/// `GET /metrics` from inside `ns`.
fn scrape(ns: &Netns, address: &str) -> String {
    ns.enter(|| {
        let mut s = std::net::TcpStream::connect(address).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        body
    })
}

#[test]
fn live_list_changes_stats_metrics_and_restart() {
    require_root();
    let topo = Topology::new();
    for client in [
        "198.51.100.10",
        "203.0.113.9",
        "203.0.113.10",
        "203.0.113.11",
    ] {
        topo.add_client(client);
    }
    let dir = TempDir::new("daemon");
    let xdp = format!("interfaces = [\"{}\"]\nmode = \"native\"\n", topo.gw_if);
    write_config(
        &dir,
        &[
            ("xdp", &xdp),
            ("logging", "stats_interval = \"1s\"\n"),
            ("metrics", "listen = \"127.0.0.1:9325\"\n"),
        ],
    );
    let mut gw = Gateway {
        ns: &topo.gw,
        dir: dir.path(),
        daemon: None,
    };
    gw.start();
    let net = &topo.net;

    assert_greeted(net, "203.0.113.9", "before any entry");

    // deny add: in the kernel by the time the CLI returns.
    let drops = gw.xdp("drop_deny_list");
    gw.ok(&["deny", "add", "203.0.113.9", "--comment", "spam run"]);
    let returned = Instant::now();
    // The very next SYN, sent as soon as the CLI has returned, is dropped:
    // the kernel update is part of the command, not something that follows.
    let sent_after = returned.elapsed();
    assert_dropped(net, "203.0.113.9", "right after deny add");
    eprintln!("deny add: the first SYN, sent {sent_after:?} after the CLI returned, was dropped");
    assert_eq!(gw.xdp("drop_deny_list"), drops + 1);
    let check = gw.json(&["check", "203.0.113.9"]);
    assert_eq!(check["results"][0]["verdict"], "refuse", "{check}");

    // deny remove lets it through again.
    gw.ok(&["deny", "remove", "203.0.113.9"]);
    assert_greeted(net, "203.0.113.9", "after deny remove");

    // A temporary entry expires on its own, from kernel, list and file.
    gw.ok(&["deny", "add", "203.0.113.10", "--for", "2s"]);
    assert_dropped(net, "203.0.113.10", "temporary entry in force");
    assert!(std::fs::read_to_string(dir.join("deny.list"))
        .unwrap()
        .contains("203.0.113.10/32"));
    std::thread::sleep(Duration::from_secs(3));
    assert_greeted(net, "203.0.113.10", "after the temporary entry expired");
    assert!(!std::fs::read_to_string(dir.join("deny.list"))
        .unwrap()
        .contains("203.0.113.10/32"));
    assert!(
        gw.log().contains("temporary entry expired"),
        "expiry not logged"
    );

    // Stats equal what was sent: count our SYNs from a fresh baseline.
    gw.ok(&["deny", "add", "203.0.113.11"]);
    let before = gw.json(&["stats"]);
    for _ in 0..3 {
        assert_dropped(net, "203.0.113.11", "stats round");
    }
    assert_greeted(net, "198.51.100.10", "stats round");
    let after = gw.json(&["stats"]);
    let delta = |k: &str| after["xdp"][k].as_u64().unwrap() - before["xdp"][k].as_u64().unwrap();
    assert_eq!(delta("syn"), 4, "{after}");
    assert_eq!(delta("drop_deny_list"), 3);
    assert_eq!(delta("pass_permitted"), 1);
    // The kernel's drop events name the entry's prefix, not a rule id.
    let dropped_line = format!(
        "SYN dropped src=203.0.113.11 dport={PORT} reason=deny_list prefix=203.0.113.11/32 source=local"
    );
    assert!(
        smtpguard_tests::wait_for(Duration::from_secs(5), || gw.log().contains(&dropped_line)),
        "no {dropped_line:?} in\n{}",
        gw.log()
    );
    let top = &after["top_entries"][0];
    assert_eq!(
        (top["prefix"].as_str(), top["hits"].as_u64()),
        (Some("203.0.113.11/32"), Some(3)),
        "{after}"
    );
    let gauge = |stats: &Value, k: &str| stats["gauges"][k].as_u64().unwrap();
    // How full the kernel IPv6 table would be: a dry run says it, and
    // changes nothing.
    let v6_file = dir.join("v6.txt");
    std::fs::write(&v6_file, "2001:db8:bad::/48\n").unwrap();
    let dry = gw.ok(&["import", "deny", v6_file.to_str().unwrap(), "--dry-run"]);
    let nodes_after = gauge(&after, "kernel_ipv6_nodes") + 4;
    assert!(
        dry.contains(&format!(
            "kernel IPv6 table afterwards: {nodes_after} of 262144 nodes"
        )),
        "{dry}"
    );
    assert_eq!(
        gauge(&gw.json(&["stats"]), "kernel_ipv6_nodes"),
        gauge(&after, "kernel_ipv6_nodes")
    );
    // An IPv4-only import leaves the IPv6 table alone: no such line.
    let v4_file = dir.join("v4.txt");
    std::fs::write(&v4_file, "198.51.100.0/24\n").unwrap();
    let dry = gw.ok(&["import", "deny", v4_file.to_str().unwrap(), "--dry-run"]);
    assert!(!dry.contains("IPv6"), "{dry}");
    // How full the kernel IPv6 table is: a /48 under a /16 of its own
    // takes four nodes (one per octet after the first two) of three runs
    // each; the maximums are what a generation holds.
    gw.ok(&["deny", "add", "2001:db8:bad::/48"]);
    let with_v6 = gw.json(&["stats"]);
    assert_eq!(
        (
            gauge(&with_v6, "kernel_ipv6_nodes") - gauge(&after, "kernel_ipv6_nodes"),
            gauge(&with_v6, "kernel_ipv6_leaves") - gauge(&after, "kernel_ipv6_leaves"),
            gauge(&with_v6, "kernel_ipv6_nodes_max"),
            gauge(&with_v6, "kernel_ipv6_leaves_max"),
        ),
        (4, 12, 262_144, 1_048_576),
        "{with_v6}"
    );
    gw.ok(&["deny", "remove", "2001:db8:bad::/48"]);
    // check --json names the deciding entry's hits, as stats does.
    let check = gw.json(&["check", "203.0.113.11"]);
    assert_eq!(
        check["results"][0]["deny_match"]["hits"].as_u64(),
        Some(3),
        "{check}"
    );

    // The metrics endpoint parses and agrees with stats.
    let body = scrape(&topo.gw, "127.0.0.1:9325");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text");
    let dropped = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "smtpguard_xdp_dropped_total" && s.labels.get("reason") == Some("deny_list")
        })
        .expect("smtpguard_xdp_dropped_total{reason=\"deny_list\"}");
    let stats_now = gw.xdp("drop_deny_list");
    assert!(
        matches!(dropped.value, prometheus_parse::Value::Counter(v) if v as u64 == stats_now),
        "{dropped:?} vs {stats_now}"
    );
    // The start's list load counts: no reload or import has run yet.
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "smtpguard_list_last_load_timestamp_seconds"),
        "{body}"
    );

    // import --replace: the whole list switches at once.
    let out = gw.ok(&[
        "import",
        "deny",
        shared_data("spamhaus-drop.txt").to_str().unwrap(),
        "--replace",
    ]);
    assert!(out.contains("989"), "{out}");
    assert_greeted(net, "203.0.113.11", "after replace (no longer listed)");
    let status = gw.json(&["status"]);
    assert_eq!(status["deny_list_size"]["ipv4"], 989, "{status}");

    // A garbage request gets an error reply; the daemon carries on.
    let mut raw = UnixStream::connect(gw.socket()).unwrap();
    raw.write_all(b"{this is not json}\n").unwrap();
    let mut reply = [0u8; 256];
    let n = raw.read(&mut reply).unwrap();
    assert!(String::from_utf8_lossy(&reply[..n]).contains("error"));
    gw.ok(&["status"]);

    // A list file edited by hand is never silently overwritten by the CLI:
    // the change is refused until a reload has read the file.
    let deny_file = dir.join("deny.list");
    let mut text = std::fs::read_to_string(&deny_file).unwrap();
    text.push_str("198.51.100.200/32 # added by hand\n");
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&deny_file, text).unwrap();
    let refused = gw.cli(&["deny", "add", "198.51.100.201"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("changed on disk"),
        "{stderr}"
    );
    gw.ok(&["reload"]);
    gw.ok(&["deny", "add", "198.51.100.201"]);
    let listed = gw.ok(&["deny", "list"]);
    assert!(
        listed.contains("198.51.100.200/32") && listed.contains("198.51.100.201/32"),
        "{listed}"
    );

    // Restart: the same lists come back from disk; XDP was detached between.
    gw.ok(&["deny", "add", "203.0.113.9"]);
    let listed = gw.ok(&["deny", "list"]);
    gw.stop();
    assert_eq!(
        topo.gw.xdp_programs(&topo.gw_if),
        0,
        "XDP still attached after SIGTERM"
    );
    gw.start();
    assert_eq!(gw.ok(&["deny", "list"]), listed, "lists after restart");
    assert_dropped(net, "203.0.113.9", "after restart");

    // A reload never half-applies settings the running server was built
    // from: a new listen port is named and waits for a restart, and the
    // kernel keeps guarding the port that is actually listening.
    let config_path = dir.join("smtpguard.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace(&format!(":{PORT}\""), ":2626\""),
    )
    .unwrap();
    let reloaded = gw.ok(&["reload"]);
    assert!(
        reloaded.contains("not applied until a restart") && reloaded.contains("[server]"),
        "{reloaded}"
    );
    let status = gw.json(&["status"]);
    assert_eq!(status["ports"], serde_json::json!([PORT]), "{status}");
    assert_dropped(net, "203.0.113.9", "after a reload that changed [server]");
    gw.stop();
}

/// The Unix time now, in seconds with a fraction.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn list_files_keep_what_operators_wrote_and_imports_say_what_they_do() {
    require_root();
    let topo = Topology::new();
    let dir = TempDir::new("daemon-lists");
    // The deny list is written by hand; the permit list is a dangling
    // symlink into a "repository" directory.
    let hand_written = "# Team list, managed by ops\n\
                        ## section: spam runs\n\
                        \n\
                        192.0.2.0/24 # spam run, ticket 4711\n\
                        198.51.100.7 ; trailing comment\n\
                        # 203.0.113.0/24 commented out on purpose\n\
                        2001:db8:bad::/48\n";
    std::fs::write(dir.join("deny.list"), hand_written).unwrap();
    std::fs::create_dir(dir.join("repo")).unwrap();
    std::os::unix::fs::symlink("repo/permit.list", dir.join("permit.list")).unwrap();
    write_config(&dir, &[]);
    let mut gw = Gateway {
        ns: &topo.gw,
        dir: dir.path(),
        daemon: None,
    };
    gw.start();
    let deny_file = || std::fs::read_to_string(dir.join("deny.list")).unwrap();

    // CLI changes keep every comment, blank line and the order.
    gw.ok(&["deny", "add", "203.0.113.9", "--comment", "new"]);
    gw.ok(&["deny", "remove", "198.51.100.7"]);
    assert_eq!(
        deny_file(),
        "# Team list, managed by ops\n\
         ## section: spam runs\n\
         \n\
         192.0.2.0/24 # spam run, ticket 4711\n\
         # 203.0.113.0/24 commented out on purpose\n\
         2001:db8:bad::/48\n\
         203.0.113.9/32 # new\n"
    );
    // A dangling symlink is written through, and stays a symlink.
    gw.ok(&["permit", "add", "198.51.100.77"]);
    let link = std::fs::symlink_metadata(dir.join("permit.list")).unwrap();
    assert!(link.file_type().is_symlink(), "the link was replaced");
    assert!(std::fs::read_to_string(dir.join("repo/permit.list"))
        .unwrap()
        .contains("198.51.100.77/32"));
    gw.ok(&["permit", "add", "198.51.100.78"]);
    assert!(std::fs::symlink_metadata(dir.join("permit.list"))
        .unwrap()
        .file_type()
        .is_symlink());

    // A temporary entry never expires early: --for 2s from before the
    // command is the earliest possible expiry.
    let before = unix_now();
    gw.ok(&["permit", "add", "203.0.113.20", "--for", "2s"]);
    let listed = gw.json(&["permit", "list"]);
    let expires = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["prefix"] == "203.0.113.20/32")
        .and_then(|e| e["expires_at_unix"].as_u64())
        .expect("expiry listed");
    assert!(
        expires as f64 >= before + 2.0,
        "expires at {expires}, the command started at {before:.3}"
    );

    // A merge import of a file without entries changes nothing, warns and
    // succeeds (Spamhaus EDROP has been comments only since 2024).
    let edrop = dir.join("edrop.txt");
    std::fs::write(
        &edrop,
        "; Spamhaus EDROP List\n; this list has been merged into DROP\n",
    )
    .unwrap();
    let edrop = edrop.to_str().unwrap();
    let file_before = deny_file();
    for dry in [false, true] {
        let mut args = vec!["import", "deny", edrop];
        if dry {
            args.push("--dry-run");
        }
        let out = gw.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("no entries in 2 line(s)"), "{stderr}");
    }
    assert_eq!(deny_file(), file_before);
    // --replace by nothing is refused (dry run too), unless --allow-empty.
    for dry in [false, true] {
        let mut args = vec!["import", "deny", edrop, "--replace"];
        if dry {
            args.push("--dry-run");
        }
        let out = gw.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("--allow-empty"), "{stderr}");
    }
    assert_eq!(deny_file(), file_before);

    // A dry run of a file with an invalid line fails as the import does.
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "192.0.2.99\n192.0.2.300\n").unwrap();
    let bad = bad.to_str().unwrap();
    let real = gw.cli(&["import", "deny", bad]);
    let dry = gw.cli(&["import", "deny", bad, "--dry-run"]);
    assert_eq!(real.status.code(), Some(1));
    assert_eq!(dry.status.code(), Some(1), "{dry:?}");
    assert!(String::from_utf8_lossy(&dry.stdout).contains("nothing would be imported"));
    assert_eq!(deny_file(), file_before);

    // A refresh that shrinks the list by more than half warns.
    let small = dir.join("small.txt");
    std::fs::write(&small, "192.0.2.0/24\n").unwrap();
    let out = gw.cli(&["import", "deny", small.to_str().unwrap(), "--replace"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("by more than half"), "{stderr}");
    // And the replace kept the comments (the entry now has the file's).
    assert_eq!(
        deny_file(),
        "# Team list, managed by ops\n\
         ## section: spam runs\n\
         \n\
         192.0.2.0/24\n\
         # 203.0.113.0/24 commented out on purpose\n"
    );
    // With --allow-empty the list may be emptied on purpose.
    gw.ok(&["import", "deny", edrop, "--replace", "--allow-empty"]);
    assert_eq!(gw.json(&["status"])["deny_list_size"]["ipv4"], 0);
    gw.stop();
}

/// The issue's daily-refresh routine, with sources: manual and `--for`
/// entries and other imports survive `import --source ipsum --replace`,
/// `check` names the source, sources and the mode survive a reload and a
/// restart, bad source names and a broken source file change nothing.
#[test]
fn sources_keep_manual_entries_across_a_daily_refresh_and_a_restart() {
    require_root();
    let topo = Topology::new();
    let dir = TempDir::new("daemon-sources");
    write_config(&dir, &[]);
    let mut gw = Gateway {
        ns: &topo.gw,
        dir: dir.path(),
        daemon: None,
    };
    gw.start();
    let ipsum = shared_data("ipsum.txt");
    let ipsum = ipsum.to_str().unwrap();
    let drop = shared_data("spamhaus-drop.txt");
    let drop = drop.to_str().unwrap();
    let entries = |gw: &Gateway<'_>, source: &str| {
        gw.json(&["deny", "list", "--source", source])["entries"]
            .as_array()
            .unwrap()
            .len()
    };

    // The README's routine: manual entries, a Spamhaus import, ipsum.
    gw.ok(&["deny", "add", "203.0.113.0/24", "--comment", "spam-run"]);
    gw.ok(&["deny", "add", "198.51.100.7", "--for", "1h"]);
    gw.ok(&["import", "deny", drop, "--source", "spamhaus-drop"]);
    let out = gw.ok(&["import", "deny", ipsum, "--source", "ipsum", "--replace"]);
    assert!(
        out.starts_with("deny list of source ipsum: 120430 added"),
        "{out}"
    );
    // The next day's ipsum: a smaller file, --replace.
    let today: String = std::fs::read_to_string(ipsum)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .take(1000)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("ipsum-today.txt"), &today).unwrap();
    let today_path = dir.join("ipsum-today.txt");
    let today_path = today_path.to_str().unwrap();
    let dry = gw.ok(&[
        "import",
        "deny",
        today_path,
        "--source",
        "ipsum",
        "--replace",
        "--dry-run",
    ]);
    assert!(dry.contains("119430 removed"), "{dry}");
    gw.ok(&[
        "import",
        "deny",
        today_path,
        "--source",
        "ipsum",
        "--replace",
    ]);
    // Only ipsum changed: the manual, --for and Spamhaus entries are there.
    assert_eq!(entries(&gw, "ipsum"), 1000);
    assert_eq!(entries(&gw, "spamhaus-drop"), 989);
    let local = gw.json(&["deny", "list", "--source", "local"]);
    let local = local["entries"].as_array().unwrap();
    assert_eq!(local.len(), 2, "{local:?}");
    assert!(local
        .iter()
        .any(|e| e["prefix"] == "198.51.100.7/32" && e["expires_at_unix"].as_u64().is_some()));
    assert!(local
        .iter()
        .any(|e| e["prefix"] == "203.0.113.0/24" && e["comment"] == "spam-run"));
    assert!(std::fs::read_to_string(dir.join("deny.list"))
        .unwrap()
        .contains("203.0.113.0/24 # spam-run"));
    assert!(dir.join("sources/ipsum.deny.list").exists());

    // check names the deciding source and what it overrode.
    let first_ipsum = today.lines().next().unwrap().split('\t').next().unwrap();
    gw.ok(&["deny", "add", first_ipsum, "--comment", "also mine"]);
    let check = gw.json(&["check", "203.0.113.9", first_ipsum]);
    let r = &check["results"];
    assert_eq!(r[0]["deny_match"]["source"], "local", "{check}");
    assert!(
        r[0]["reason"].as_str().unwrap().contains("(source local)"),
        "{check}"
    );
    assert_eq!(r[1]["deny_match"]["source"], "local", "{check}");
    assert_eq!(r[1]["overridden"][0]["source"], "ipsum", "{check}");
    let text = gw.ok(&["check", first_ipsum]);
    assert!(text.contains("over deny"), "{text}");
    assert!(text.contains("(source ipsum)"), "{text}");

    // Bad and reserved source names: a clear error, nothing changed.
    for (source, says) in [
        ("Bad!", "source name \"Bad!\" has 'B' at position 1"),
        ("auto", "reserved for automatic bans"),
        ("fleet", "reserved for lists shared by a fleet"),
    ] {
        let out = gw.cli(&["deny", "add", "192.0.2.77", "--source", source]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
    let out = gw.cli(&["deny", "list", "--source", "nosuch"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no source \"nosuch\""));

    // status: entries per source, and when each was loaded.
    let status = gw.json(&["status"]);
    let names: Vec<&str> = status["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["local", "ipsum", "spamhaus-drop"], "{status}");
    assert!(status["sources"][1]["loaded_at_unix"].as_u64().unwrap() > 0);

    // The mode survives a reload and a restart (state file).
    gw.ok(&["mode", "monitor"]);
    gw.ok(&["reload"]);
    assert_eq!(gw.json(&["status"])["enforcement"], "monitor");

    // A broken source file fails the reload whole, naming file and line.
    std::fs::write(
        dir.join("sources/broken.deny.list"),
        "192.0.2.9\n192.0.2.300\n",
    )
    .unwrap();
    let out = gw.cli(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("broken.deny.list"), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert_eq!(gw.json(&["status"])["sources"].as_array().unwrap().len(), 3);
    std::fs::remove_file(dir.join("sources/broken.deny.list")).unwrap();

    let before = gw.json(&["status"]);
    gw.stop();
    gw.start();
    let after = gw.json(&["status"]);
    assert_eq!(after["enforcement"], "monitor", "{after}");
    for (b, a) in before["sources"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["sources"].as_array().unwrap())
    {
        assert_eq!((&b["name"], &b["deny"]), (&a["name"], &a["deny"]));
    }
    assert_eq!(entries(&gw, "ipsum"), 1000);
    gw.stop();
}

/// Protected ranges: with Team Cymru's full bogons imported (which hold
/// 127.0.0.0/8, the documentation ranges and so the listen address),
/// loopback, the listen address and `policy.protected` are never dropped,
/// by XDP or by the front door; a `deny add` over them needs `--force`.
#[test]
fn protected_ranges_pass_with_full_bogons_imported() {
    require_root();
    let topo = Topology::new();
    for client in ["198.51.100.10", "203.0.113.5"] {
        topo.add_client(client);
    }
    let dir = TempDir::new("daemon-protected");
    let d = dir.path().display();
    std::fs::write(
        dir.join("smtpguard.toml"),
        format!(
            r#"
[server]
hostname = "gw.example.com"
listen = ["{GW_V4}:{PORT}", "127.0.0.1:{PORT}"]
[policy]
deny_list = "{d}/deny.list"
permit_list = "{d}/permit.list"
protected = ["198.51.100.10"]
[xdp]
interfaces = ["{iface}"]
mode = "native"
[delivery]
spool_dir = "{d}/spool"
accept_domains = ["example.com"]
[control]
socket = "{d}/control.sock"
[screening]
greet_wait = "0s"
"#,
            iface = topo.gw_if
        ),
    )
    .unwrap();
    let mut gw = Gateway {
        ns: &topo.gw,
        dir: dir.path(),
        daemon: None,
    };
    gw.start();
    let (v4, v6) = (
        shared_data("fullbogons-ipv4.txt"),
        shared_data("fullbogons-ipv6.txt"),
    );
    let reply = gw.json(&["import", "deny", v4.to_str().unwrap(), "--source", "bogons"]);
    assert!(reply["protected"].as_u64().unwrap() >= 3, "{reply}");
    let warnings = reply["warnings"].to_string();
    assert!(warnings.contains("127.0.0.0/8 (line"), "{warnings}");
    assert!(
        warnings.contains("covers 192.0.2.1/32 (listen address)"),
        "{warnings}"
    );
    assert!(
        warnings.contains("198.51.100.10/32 (policy.protected)"),
        "{warnings}"
    );
    gw.ok(&["import", "deny", v6.to_str().unwrap(), "--source", "bogons"]);

    // XDP: a bogon is dropped, the protected client passes.
    let net = &topo.net;
    assert_dropped(net, "203.0.113.5", "a bogon");
    let passed = gw.xdp("pass_permitted");
    assert_greeted(net, "198.51.100.10", "policy.protected inside a bogon");
    assert_eq!(gw.xdp("pass_permitted"), passed + 1);
    // The front door (loopback, no XDP there): loopback and the listen
    // address itself are greeted.
    let lo: SocketAddr = format!("127.0.0.1:{PORT}").parse().unwrap();
    let gw_addr: SocketAddr = format!("{GW_V4}:{PORT}").parse().unwrap();
    for (src, dst) in [("127.0.0.1", lo), (GW_V4, gw_addr)] {
        let got = topo.gw.connect_from(src, dst, Duration::from_secs(5));
        assert!(
            matches!(&got, Ok(g) if g.starts_with("220 ")),
            "{src} -> {dst}: {got:?}"
        );
    }
    let check = gw.json(&["check", "127.0.0.2", GW_V4, "203.0.113.5"]);
    let r = &check["results"];
    assert_eq!(r[0]["protected"], "127.0.0.0/8 (loopback)", "{check}");
    assert_eq!(r[1]["verdict"], "accept", "{check}");
    assert_eq!(r[1]["overridden"][0]["source"], "bogons", "{check}");
    assert_eq!(r[2]["deny_match"]["source"], "bogons", "{check}");

    // deny add over a protected range: refused, unless --force (and then
    // the protected addresses still pass).
    let out = gw.cli(&["deny", "add", "198.51.100.0/24"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .contains("198.51.100.0/24 covers protected range 198.51.100.10/32 (policy.protected)"),
        "{stderr}"
    );
    assert_eq!(
        gw.json(&["deny", "list", "--source", "local"])["entries"],
        serde_json::json!([])
    );
    let out = gw.cli(&["deny", "add", "198.51.100.0/24", "--force"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stay permitted"));
    assert_greeted(net, "198.51.100.10", "after deny add --force");

    // A permit shadowed by a longer deny is named.
    let out = gw.cli(&["permit", "add", "203.0.0.0/16"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("shadowed by the longer deny 203.0.113.0/24 of source bogons"),
        "{stderr}"
    );
    gw.stop();
}

/// Talks before the greeting from `src` in `ns` and reads until the
/// gateway closes (at most 10 s).
fn talk_early(ns: &Netns, src: &str) -> String {
    let dst: SocketAddr = format!("{GW_V4}:{PORT}").parse().unwrap();
    ns.talk_early(src, dst, b"EHLO early.example\r\n")
}

/// One session from `src` in `ns`: the greeting, then each of `lines`
/// with its reply.
fn session(ns: &Netns, src: &str, lines: &[&str]) -> Vec<String> {
    use smtpguard::testing::client::{reply, say};
    ns.enter(|| {
        let dst: SocketAddr = format!("{GW_V4}:{PORT}").parse().unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::new(src.parse().unwrap(), 0).into())
            .unwrap();
        socket
            .connect_timeout(&dst.into(), Duration::from_secs(2))
            .unwrap();
        let mut s: std::net::TcpStream = socket.into();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = vec![reply(&mut s)];
        got.extend(lines.iter().map(|l| say(&mut s, l)));
        got
    })
}

/// Waits (at most 10 s) for a daemon log line containing `needle`.
fn wait_for_log(gw: &Gateway<'_>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = gw.log().lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?}:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// #16's acceptance: an early talker gets `521` (`greet_action = "drop"`)
/// and after `ban_after` violations a ban in the `auto` source; its next
/// SYN dies in XDP (the entry's hits rise, no socket is accepted); the ban
/// expires by itself. A protected and a permitted address are never
/// banned; relay attempts ban too. (ignore and enforce: the loopback test
/// `smtpguard/tests/screening.rs`.)
#[test]
fn early_talkers_are_banned_in_the_kernel_until_the_ban_expires() {
    require_root();
    let topo = Topology::new();
    let (talker, quiet, relayer) = ("203.0.113.30", "203.0.113.31", "203.0.113.32");
    let (protected, permitted) = ("198.51.100.30", "198.51.100.31");
    for client in [talker, quiet, relayer, protected, permitted] {
        topo.add_client(client);
    }
    let dir = TempDir::new("daemon-bans");
    let xdp = format!("interfaces = [\"{}\"]\nmode = \"native\"\n", topo.gw_if);
    let policy = format!("protected = [\"{protected}\"]\n");
    write_config(
        &dir,
        &[
            ("xdp", &xdp),
            ("policy", &policy),
            (
                "screening",
                "greet_wait = \"1s\"\ngreet_action = \"drop\"\n",
            ),
            ("bans", "ban_after = 2\nban_for = \"3s\"\n"),
        ],
    );
    let mut gw = Gateway {
        ns: &topo.gw,
        dir: dir.path(),
        daemon: None,
    };
    gw.start();
    gw.ok(&["permit", "add", permitted]);
    let net = &topo.net;
    let auto = |gw: &Gateway<'_>| gw.json(&["deny", "list", "--source", "auto"])["entries"].clone();
    let front_door =
        |gw: &Gateway<'_>, name: &str| gw.json(&["stats"])["front_door"][name].as_u64().unwrap();
    // Before the first ban, `auto` is empty, not unknown.
    assert_eq!(auto(&gw), serde_json::json!([]));

    // A quiet client waits and passes.
    assert_eq!(
        session(net, quiet, &["QUIT"]),
        [
            "220-gw.example.com ESMTP\r\n220 gw.example.com ESMTP smtpguard\r\n",
            "221 2.0.0 Bye\r\n"
        ]
    );
    wait_for_log(&gw, &format!("PASS NEW [{quiet}]:"));

    // Two early talks: 521 each, then the ban.
    let dropped =
        "220-gw.example.com ESMTP\r\n220 gw.example.com ESMTP smtpguard\r\n521 5.5.1 Protocol error\r\n";
    assert_eq!(talk_early(net, talker), dropped);
    let line = wait_for_log(&gw, "PREGREET 20 after ");
    assert!(
        line.contains(&format!("from [{talker}]:")) && line.ends_with(": EHLO early.example\\r\\n"),
        "{line}"
    );
    assert_eq!(talk_early(net, talker), dropped);
    wait_for_log(&gw, &format!("BAN {talker}/32 for 3s reason=pregreet"));
    let entries = auto(&gw);
    assert_eq!(entries[0]["prefix"], format!("{talker}/32"), "{entries}");
    assert_eq!(entries[0]["comment"], "reason=pregreet ban=1", "{entries}");
    assert!(
        entries[0]["expires_at_unix"].as_u64().is_some(),
        "{entries}"
    );
    let file = std::fs::read_to_string(dir.join("sources/auto.deny.list")).unwrap();
    assert!(file.contains(&format!("{talker}/32")), "persisted: {file}");

    // Its next SYN is dropped in XDP: the entry's hits rise, no socket.
    let accepted = front_door(&gw, "accepted_at_socket");
    let hits = entries[0]["hits"].as_u64().unwrap_or(0);
    assert_dropped(net, talker, "banned");
    assert_eq!(auto(&gw)[0]["hits"].as_u64().unwrap_or(0), hits + 1);
    assert_eq!(front_door(&gw, "accepted_at_socket"), accepted);

    // Protected and permitted addresses: never banned.
    for _ in 0..3 {
        assert_eq!(talk_early(net, protected), dropped);
        let relay = session(
            net,
            permitted,
            &[
                "HELO c.example",
                "MAIL FROM:<a@example.net>",
                "RCPT TO:<x@elsewhere.example>",
                "QUIT",
            ],
        );
        assert_eq!(
            relay[0], "220 gw.example.com ESMTP smtpguard\r\n",
            "permitted: no wait"
        );
        assert!(relay[3].starts_with("550 5.7.1"), "{relay:?}");
    }
    assert_eq!(auto(&gw).as_array().unwrap().len(), 1, "{}", gw.log());
    assert!(front_door(&gw, "violations_exempt") >= 6);
    assert_greeted(net, permitted, "permitted");

    // Relay attempts count too.
    for _ in 0..2 {
        let relay = session(
            net,
            relayer,
            &[
                "HELO c.example",
                "MAIL FROM:<a@example.net>",
                "RCPT TO:<x@elsewhere.example>",
                "QUIT",
            ],
        );
        assert!(relay[3].starts_with("550 5.7.1"), "{relay:?}");
    }
    wait_for_log(
        &gw,
        &format!("BAN {relayer}/32 for 3s reason=relay_attempt"),
    );

    // The bans expire by themselves.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !auto(&gw).as_array().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the bans did not expire:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = connect_from(net, talker);
    assert!(
        matches!(&got, Ok(g) if g.starts_with("220")),
        "after expiry: {got:?}"
    );
    assert_eq!(front_door(&gw, "bans_added"), 2);
    assert_eq!(front_door(&gw, "bans_expired"), 2);
    gw.stop();
}

/// #17's end to end: a real DNS server (hickory-server, bound inside the
/// gateway's namespace) lists one client; with `action = "drop"` it gets
/// `521 5.7.1` instead of the greeting, is banned in the `auto` source
/// (`reason=dnsbl`), and its next SYN dies in XDP (the ban's hits rise, no
/// socket is accepted). An unlisted client is greeted, and the DNSBL
/// answer for it comes from the one query the server saw.
#[test]
fn a_dnsbl_listed_client_is_dropped_banned_and_its_next_syn_dies_in_xdp() {
    use smtpguard::testing::dns::TestDns;
    require_root();
    let topo = Topology::new();
    let (listed, clean) = ("203.0.113.40", "203.0.113.41");
    for client in [listed, clean] {
        topo.add_client(client);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // The server's socket is bound in the gateway's namespace, where the
    // daemon asks it; the runtime's thread serves it from anywhere.
    let dns = topo.gw.enter(|| {
        let _rt = rt.enter();
        TestDns::start()
    });
    dns.zone(
        "dnsbl.test",
        300,
        &[("40.113.0.203", &[std::net::Ipv4Addr::new(127, 0, 0, 2)])],
    );
    let dir = TempDir::new("daemon-dnsbl");
    let xdp = format!("interfaces = [\"{}\"]\nmode = \"native\"\n", topo.gw_if);
    let dnsbl = format!(
        "sites = [\"dnsbl.test*3\"]\nthreshold = 3\naction = \"drop\"\ntimeout = \"5s\"\nresolver = \"{}\"\n",
        dns.addr()
    );
    write_config(
        &dir,
        &[
            ("xdp", &xdp),
            ("dnsbl", &dnsbl),
            ("bans", "ban_after = 1\nban_for = \"1h\"\n"),
        ],
    );
    let mut gw = Gateway {
        ns: &topo.gw,
        dir: dir.path(),
        daemon: None,
    };
    gw.start();
    let net = &topo.net;

    assert_greeted(net, clean, "unlisted");
    let refused = connect_from(net, listed).expect("the listed client connects");
    assert!(
        refused.starts_with("521 5.7.1 gw.example.com Service unavailable; client [203.0.113.40]"),
        "{refused:?}"
    );
    wait_for_log(&gw, &format!("DNSBL rank 3 for [{listed}]:"));
    wait_for_log(&gw, &format!("BAN {listed}/32 for 1h reason=dnsbl"));
    let entries = gw.json(&["deny", "list", "--source", "auto"])["entries"].clone();
    assert_eq!(entries[0]["prefix"], format!("{listed}/32"), "{entries}");
    assert_eq!(entries[0]["comment"], "reason=dnsbl ban=1", "{entries}");

    // Its next SYN is dropped in XDP: the ban's hits rise, no socket.
    let accepted = gw.json(&["stats"])["front_door"]["accepted_at_socket"]
        .as_u64()
        .unwrap();
    assert_dropped(net, listed, "banned by DNSBL");
    let entries = gw.json(&["deny", "list", "--source", "auto"])["entries"].clone();
    assert_eq!(entries[0]["hits"].as_u64(), Some(1), "{entries}");
    assert_eq!(
        gw.json(&["stats"])["front_door"]["accepted_at_socket"].as_u64(),
        Some(accepted)
    );
    // One lookup per client (hickory may send a UDP query twice).
    let queries = dns.queries("dnsbl.test");
    assert!((2..=4).contains(&queries), "{queries} queries");
    gw.stop();
}
