//! The whole product end to end, as on a mail gateway.
//!
//! Namespace `gw` runs the real `smtpguard` binary (XDP attached in native
//! mode to its veth, the front door on 192.0.2.1:2525 and
//! [2001:db8::1]:2525 with STARTTLS required, at most 50 connections, a
//! 10 s idle timeout, relaying with PROXY v2) and a real, private Postfix
//! on 127.0.0.1:10025 behind it. Namespace `net` holds the clients.
//!
//! Lists go in through the CLI: the Spamhaus DROP lists, the two denied
//! documentation ranges, a permitted exception inside one of them. Then,
//! at the same time: a SYN flood from the denied ranges (IPv4 and IPv6,
//! raw frames, counted exactly), 20 legitimate clients (Python smtplib with
//! STARTTLS, 10 IPv4, 10 IPv6, 5 messages each, one session a message), the
//! exception's message, a client that goes idle after STARTTLS, and an
//! import of ipsum (~120,000 entries). Afterwards: the connection cap, the
//! counters (CLI and Prometheus) against what was sent, and that nothing
//! is left behind.
//!
//! Run with `cargo xtask test`, or after `cargo xtask build`:
//! `SMTPGUARD_BIN=$PWD/target/debug/smtpguard cargo test -p smtpguard-tests --test end_to_end -- --nocapture`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use smtpguard::testing::{TempDir, TestPki};
use smtpguard_tests::{
    flood::{self, FrameSender, Plan, Progress},
    netns::{Netns, Topology, GW_V4, GW_V6},
    postfix::{self, Postfix},
    require_root, run_bounded, wait_for,
};
use socket2::{Domain, Socket, Type};

/// The SMTP port smtpguard listens on and guards.
const PORT: u16 = 2525;
/// Postfix's PROXY-protocol smtpd, inside `gw`.
const UPSTREAM_PORT: u16 = 10025;
/// The Prometheus endpoint, inside `gw`.
const METRICS: &str = "127.0.0.1:9325";
const MAX_CONNECTIONS: usize = 50;
const IDLE_TIMEOUT_SECS: u64 = 10;
const MESSAGES_PER_CLIENT: usize = 5;
/// The permitted exception inside the denied 203.0.113.0/24.
const EXCEPTION: &str = "203.0.113.77";
/// Goes idle after STARTTLS and EHLO.
const IDLE_CLIENT: &str = "198.51.100.200";
/// Opens the connections that fill the cap.
const CAP_CLIENT: &str = "198.51.100.201";
/// The flood runs at least this long, and at most `FLOOD_MAX`.
const FLOOD_MIN: Duration = Duration::from_secs(10);
const FLOOD_MAX: Duration = Duration::from_secs(60);
/// Greeting probes per measurement.
const PROBES: usize = 20;
/// Seconds between one client's sessions: spreads the clients' traffic
/// over the ipsum import (each client's last message waits for the import
/// to be applied, so the import lands in the middle of the traffic).
const CLIENT_PACE_SECS: f64 = 2.5;

fn legit_v4() -> Vec<String> {
    (10..20).map(|i| format!("198.51.100.{i}")).collect()
}

fn legit_v6() -> Vec<String> {
    (0x10..0x1a).map(|i| format!("2001:db8:1::{i:x}")).collect()
}

fn legit() -> Vec<String> {
    let mut all = legit_v4();
    all.extend(legit_v6());
    all
}

/// The SMTP client (Debian's python3 has smtplib and ssl).
const PYTHON: &str = "/usr/bin/python3";

/// `send SRC DST PORT CA COUNT PACE GATE`: COUNT sessions, one message
/// each (~10 KB), STARTTLS verified against CA, PACE seconds apart, the
/// last one only once the file GATE exists (`-`: no gate); one JSON line
/// per message.
/// `idle SRC DST PORT CA`: EHLO, STARTTLS, EHLO, then wait for the
/// server's next reply; one JSON line.
const CLIENT_PY: &str = r#"
import json, os, smtplib, ssl, sys, time

mode, src, dst, port, ca = sys.argv[1:6]
port = int(port)
ctx = ssl.create_default_context(cafile=ca)

def session():
    t0 = time.monotonic()
    s = smtplib.SMTP(dst, port, local_hostname="client.example", timeout=60,
                     source_address=(src, 0))
    greeting_ms = (time.monotonic() - t0) * 1000
    s.ehlo()
    s.starttls(context=ctx)
    s.ehlo()
    return s, greeting_ms

if mode == "send":
    count, pace, gate = int(sys.argv[6]), float(sys.argv[7]), sys.argv[8]
    line = "smtpguard end-to-end test body line, long enough to be realistic...\r\n"
    body = line * (10240 // len(line))
    for i in range(count):
        if i > 0:
            time.sleep(pace)
        if i == count - 1 and gate != "-":
            deadline = time.monotonic() + 120
            while not os.path.exists(gate):
                assert time.monotonic() < deadline, "gate " + gate + " never opened"
                time.sleep(0.05)
        s, greeting_ms = session()
        msgid = "<e2e-%s-%d@client.example>" % (src.replace(":", "."), i)
        msg = ("From: sender@client.example\r\nTo: bob@example.com\r\n"
               "Subject: e2e %s %d\r\nMessage-ID: %s\r\n\r\n" % (src, i, msgid)) + body
        refused = s.sendmail("sender@client.example", ["bob@example.com"], msg)
        assert not refused, refused
        s.quit()
        print(json.dumps({"message_id": msgid, "greeting_ms": greeting_ms, "done_at": time.time()}),
              flush=True)
elif mode == "idle":
    s, greeting_ms = session()
    t0 = time.monotonic()
    code, text = s.getreply()
    print(json.dumps({"code": code, "text": text.decode(), "waited_s": time.monotonic() - t0}),
          flush=True)
else:
    sys.exit("unknown mode " + mode)
"#;

// ----- locating things -------------------------------------------------------

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `SMTPGUARD_BIN` (set by `cargo xtask test`), else the debug build.
fn smtpguard_bin() -> PathBuf {
    let bin = std::env::var_os("SMTPGUARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/smtpguard"));
    assert!(
        bin.is_file(),
        "smtpguard binary not found at {} (build it with `cargo xtask build`, or set SMTPGUARD_BIN)",
        bin.display()
    );
    bin
}

/// The shared real-world lists: `SMTPGUARD_SHARED_DATA`, else
/// `shared/data` beside the checkout or beside the worktrees' directory.
fn shared_data() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("SMTPGUARD_SHARED_DATA")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(workspace().join("../shared/data"));
    candidates.push(workspace().join("../../shared/data"));
    candidates
        .iter()
        .find(|p| p.join("ipsum.txt").is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!("shared test data (ipsum.txt) not found in any of {candidates:?}")
        })
}

// ----- the daemon ----------------------------------------------------------------

/// The smtpguard daemon, stopped with SIGTERM (then SIGKILL) on drop. Its
/// log is printed if the test fails.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the daemon has exited.
    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("smtpguard exited ({status}); its log:\n{}", self.log());
            }
        }
    }

    /// SIGTERM, then up to `grace` for it to exit, then SIGKILL; the exit
    /// status if it exited on its own.
    fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
        if thread::panicking() || show_logs() {
            eprintln!(
                "----- smtpguard log ({}) -----\n{}\n----- end of smtpguard log -----",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// Whether to print the daemon's and Postfix's logs even when the test
/// passes (`SMTPGUARD_E2E_LOGS=1`).
fn show_logs() -> bool {
    std::env::var_os("SMTPGUARD_E2E_LOGS").is_some_and(|v| v == "1")
}

/// Prints the Postfix log if the test fails (dropped before the Postfix).
struct PrintPostfixLogOnFailure<'a>(&'a Postfix);

impl Drop for PrintPostfixLogOnFailure<'_> {
    fn drop(&mut self) {
        if thread::panicking() || show_logs() {
            let log = self.0.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("----- Postfix log (last 80 lines) -----");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            eprintln!("----- end of Postfix log -----");
        }
    }
}

/// The CLI, run in `gw` against the daemon's control socket.
struct Cli<'a> {
    gw: &'a Netns,
    bin: &'a Path,
    socket: PathBuf,
}

impl Cli<'_> {
    fn output(&self, args: &[&str]) -> Output {
        let mut cmd = self.gw.command(&self.bin.to_string_lossy());
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run_bounded(cmd, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `smtpguard --socket S ARGS`; stdout; panics on failure.
    fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "smtpguard {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `smtpguard --json ARGS`, parsed.
    fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let text = self.run(&full);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    fn stats(&self) -> Value {
        self.json(&["stats", "--top", "10"])
    }

    fn status(&self) -> Value {
        self.json(&["status"])
    }
}

fn u64_at(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {v:#}"))
}

// ----- clients ---------------------------------------------------------------------

/// Connects from `src` to the gateway's address of the same family, port
/// [`PORT`], in `net`.
fn connect(net: &Netns, src: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    net.enter(|| {
        let src: IpAddr = src.parse().unwrap();
        let dst: SocketAddr = match src {
            IpAddr::V4(_) => SocketAddr::new(GW_V4.parse().unwrap(), PORT),
            IpAddr::V6(_) => SocketAddr::new(GW_V6.parse().unwrap(), PORT),
        };
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(src, 0).into())?;
        socket.connect_timeout(&dst.into(), timeout)?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(stream)
    })
}

/// Reads one reply line (a single-line reply such as the greeting).
fn read_line(stream: &TcpStream) -> String {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("reading a reply: {e}"));
    line
}

/// Time from connect() to the complete `220` line, from `src`; then QUIT.
fn greeting_time(net: &Netns, src: &str) -> Duration {
    let started = Instant::now();
    let mut stream =
        connect(net, src, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{src}: {e}"));
    let greeting = read_line(&stream);
    let took = started.elapsed();
    assert!(greeting.starts_with("220 "), "{src}: {greeting:?}");
    let _ = stream.write_all(b"QUIT\r\n");
    let _ = read_line(&stream);
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    assert!(!v.is_empty());
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A client process in `net` (killed on drop if still running).
struct PyClient {
    child: Option<Child>,
    what: String,
}

impl PyClient {
    fn spawn(net: &Netns, script: &Path, args: &[&str], what: String) -> PyClient {
        let child = net
            .command(PYTHON)
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {PYTHON}: {e}"));
        PyClient {
            child: Some(child),
            what,
        }
    }

    /// Waits (at most `limit`) and returns the JSON lines it printed;
    /// panics with its stderr on failure.
    fn finish(mut self, limit: Duration) -> Vec<Value> {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} took longer than {limit:?}", self.what);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let mut stdout = String::new();
        let mut stderr = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "{} failed ({status}):\n{stderr}\nstdout:\n{stdout}",
            self.what
        );
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", self.what)))
            .collect()
    }
}

impl Drop for PyClient {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ----- the network ---------------------------------------------------------------

fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = ns
        .command("ip")
        .args(["-j", "link", "show", "dev", ifname])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ip -j link show {ifname}: {e}"));
    let text = v[0]["address"].as_str().expect("link address");
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().expect("6-byte MAC")
}

/// The id of the XDP program attached to `ifname`, if any.
fn xdp_prog_id(ns: &Netns, ifname: &str) -> Option<u32> {
    let out = ns
        .command("ip")
        .args(["-d", "-j", "link", "show", "dev", ifname])
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v[0]["xdp"]["prog"]["id"].as_u64().map(|id| id as u32)
}

/// A namespace's network-namespace inode (what `/proc/PID/ns/net` shows).
fn netns_inode(ns: &Netns) -> u64 {
    fs::metadata(format!("/run/netns/{}", ns.name()))
        .expect("netns file")
        .ino()
}

/// Processes whose network namespace is `net:[inode]`.
fn processes_in_netns(inode: u64) -> Vec<String> {
    let want = format!("net:[{inode}]");
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if fs::read_link(entry.path().join("ns/net")).is_ok_and(|l| l.to_string_lossy() == want) {
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

/// Seconds since the Unix epoch (Python's `time.time()`).
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Whether process `pid` exists and is not a zombie (an exited process
/// its new parent, init, has not reaped yet).
fn running(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "PID (COMM) STATE ...": COMM may contain spaces and parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// `GET /metrics` from inside `gw`: the body.
fn scrape(gw: &Netns) -> String {
    gw.enter(|| {
        let mut s = TcpStream::connect(METRICS).expect("connect to the metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(head.contains("Content-Type: text/plain"), "{head}");
        body.to_string()
    })
}

// ----- the scenario ----------------------------------------------------------------

/// What the scenario measured, and what it made (to check it is gone).
struct Outcome {
    baseline_greeting: Duration,
    flood_greeting: Duration,
    clients_greeting_during_flood: Duration,
    import_greeting: Duration,
    import_probes: usize,
    messages_after_import: usize,
    sent: flood::Sent,
    import_secs: f64,
    ipsum_added: u64,
    idle_waited_s: f64,
    namespaces: Vec<String>,
    interfaces: Vec<String>,
    netns_inodes: Vec<u64>,
    temp_dirs: Vec<PathBuf>,
    pids: Vec<i32>,
    xdp_prog_id: u32,
}

fn scenario() -> Outcome {
    let bin = smtpguard_bin();
    let data = shared_data();
    let tmp = TempDir::new("e2e");
    let topo = Topology::new();
    for addr in legit()
        .iter()
        .map(String::as_str)
        .chain([EXCEPTION, IDLE_CLIENT, CAP_CLIENT])
    {
        topo.add_client(addr);
    }

    // TLS: a CA and a server certificate for the gateway's addresses.
    let pki = TestPki::new(
        "smtpguard end-to-end test CA",
        &["mx.gw.example", GW_V4, GW_V6],
    );
    let ca = &pki.ca_certificate;
    let cert = &pki.certificate;
    let key = &pki.private_key;
    let script = tmp.write("client.py", CLIENT_PY);

    let postfix = Postfix::start(postfix::Options::proxy(&topo.gw, UPSTREAM_PORT))
        .unwrap_or_else(|e| panic!("{e}"));
    let _postfix_log = PrintPostfixLogOnFailure(&postfix);

    let socket = tmp.path().join("control.sock");
    let config = tmp.write(
        "smtpguard.toml",
        format!(
            r#"[server]
hostname = "mx.gw.example"
listen = ["{GW_V4}:{PORT}", "[{GW_V6}]:{PORT}"]
max_connections = {MAX_CONNECTIONS}
idle_timeout = "{IDLE_TIMEOUT_SECS}s"
shutdown_grace = "5s"

[tls]
mode = "required"
certificate = "{cert}"
private_key = "{key}"

[policy]
mode = "accept-all-except-deny"
enforcement = "enforce"
deny_list = "{dir}/deny.list"
permit_list = "{dir}/permit.list"

[xdp]
interfaces = ["{gw_if}"]
mode = "native"

[delivery]
upstream = "127.0.0.1:{UPSTREAM_PORT}"
upstream_protocol = "proxy-v2"
upstream_timeout = "30s"

[control]
socket = "{socket}"

[logging]
level = "info"
stats_interval = "5s"

[metrics]
listen = "{METRICS}"

[screening]
greet_wait = "0s"
"#,
            cert = cert.display(),
            key = key.display(),
            dir = tmp.path().display(),
            gw_if = topo.gw_if,
            socket = socket.display(),
        ),
    );
    let log_path = tmp.path().join("smtpguard.log");
    let log_file = fs::File::create(&log_path).unwrap();
    let child = topo
        .gw
        .command(&bin.to_string_lossy())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("spawn smtpguard");
    let mut daemon = Daemon {
        child: Some(child),
        log: log_path,
    };
    let cli = Cli {
        gw: &topo.gw,
        bin: &bin,
        socket: socket.clone(),
    };

    // Wait for the control socket to answer.
    let started = Instant::now();
    let status = loop {
        daemon.assert_running();
        if socket.exists() {
            let out = cli.output(&["--json", "status"]);
            if out.status.success() {
                break serde_json::from_slice::<Value>(&out.stdout).unwrap();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the daemon's control socket did not answer within 60 s:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "e2e: daemon up after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let interfaces = status["interfaces"].as_array().expect("interfaces");
    assert_eq!(interfaces.len(), 1, "{status:#}");
    assert_eq!(interfaces[0]["name"], topo.gw_if, "{status:#}");
    assert_eq!(interfaces[0]["xdp_mode"], "native", "{status:#}");
    // `ip netns exec` hides the host's bpffs: the daemon mounted its own
    // there and pinned, so a crash would leave the filter in force.
    assert!(
        interfaces[0]["pinned"]
            .as_str()
            .is_some_and(|p| p.starts_with("yes (/sys/fs/bpf/smtpguard/")),
        "{status:#}"
    );
    assert_eq!(status["ports"], serde_json::json!([PORT]));
    assert_eq!(status["mode"], "accept-all-except-deny");
    assert_eq!(status["tls_mode"], "required");
    assert_eq!(u64_at(&status, "/max_connections"), MAX_CONNECTIONS as u64);
    let prog_id = xdp_prog_id(&topo.gw, &topo.gw_if).expect("an XDP program on the gw veth");

    // The lists, through the CLI.
    let import = |file: &str| -> Value {
        let path = data.join(file);
        let r = cli.json(&["import", "deny", &path.to_string_lossy()]);
        assert_eq!(r["applied"], true, "{file}: {r:#}");
        assert_eq!(r["skipped"], serde_json::json!([]), "{file}: {r:#}");
        r
    };
    let drop4 = import("spamhaus-drop.txt");
    let drop6 = import("spamhaus-dropv6.txt");
    eprintln!(
        "e2e: imported Spamhaus DROP ({} added), DROPv6 ({} added)",
        drop4["added"], drop6["added"]
    );
    let added = cli.json(&["deny", "add", "203.0.113.0/24", "2001:db8:bad::/48"]);
    assert_eq!(added["added"], 2, "{added:#}");
    let added = cli.json(&["permit", "add", EXCEPTION]);
    assert_eq!(added["added"], 1, "{added:#}");
    let mode = cli.json(&["mode", "accept-all-except-deny"]);
    assert_eq!(mode["mode"], "accept-all-except-deny", "{mode:#}");
    assert_eq!(mode["enforcement"], "enforce", "{mode:#}");
    let checked = cli.json(&[
        "check",
        "203.0.113.9",
        EXCEPTION,
        "2001:db8:bad::9",
        "198.51.100.10",
        "2001:db8:1::10",
    ]);
    let verdicts: Vec<&str> = checked["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(
        verdicts,
        ["refuse", "accept", "refuse", "accept", "accept"],
        "{checked:#}"
    );

    // Greeting time without the flood.
    let baseline: Vec<Duration> = legit()
        .iter()
        .cycle()
        .take(PROBES)
        .map(|src| greeting_time(&topo.net, src))
        .collect();
    let baseline_greeting = median(baseline);

    // The flood, the clients, the idle client and the import, together.
    let gw_mac = mac_of(&topo.gw, &topo.gw_if);
    let net_mac = mac_of(&topo.net, &topo.net_if);
    let plan = Plan {
        macs: (net_mac, gw_mac),
        dst_v4: GW_V4.parse().unwrap(),
        dst_v6: GW_V6.parse().unwrap(),
        dport: PORT,
        // Denied sources only: 203.0.113.0/24 but the exception, and
        // 2001:db8:bad::/48.
        sources_v4: (1..=254u8)
            .filter(|&i| i != 77)
            .map(|i| Ipv4Addr::new(203, 0, 113, i))
            .collect(),
        sources_v6: (1..=256u16)
            .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 0xbad, i, 0, 0, 0, i))
            .collect(),
        v6_every: 5,
    };
    let progress = Progress::default();
    let stop = AtomicBool::new(false);
    let importing = AtomicBool::new(true);
    let gate = tmp.path().join("import-applied");
    let mut clients_greetings: Vec<Duration> = Vec::new();
    let mut done_at: Vec<f64> = Vec::new();
    let mut flood_greetings: Vec<Duration> = Vec::new();
    let mut import_greetings: Vec<Duration> = Vec::new();
    let mut idle_reply = Value::Null;
    let mut message_ids: BTreeMap<String, String> = BTreeMap::new();
    let (sent, (import_secs, ipsum, import_applied_at)) = thread::scope(|s| {
        // Ends the flood however the scope is left.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let flood = s.spawn(|| {
            topo.net.enter(|| {
                let sender = FrameSender::open(&topo.net_if).expect("AF_PACKET socket");
                flood::run(&sender, &plan, &progress, |elapsed| {
                    elapsed < FLOOD_MAX && (elapsed < FLOOD_MIN || !stop.load(Ordering::Relaxed))
                })
            })
        });
        let _stop = StopOnDrop(&stop);
        assert!(
            wait_for(Duration::from_secs(10), || progress.total() > 10_000),
            "the flood did not start"
        );

        // Greeting time under the flood alone.
        flood_greetings = legit()
            .iter()
            .cycle()
            .take(PROBES)
            .map(|src| greeting_time(&topo.net, src))
            .collect();

        let ca = ca.to_string_lossy().into_owned();
        let script = script.as_path();
        let clients: Vec<(String, PyClient)> = legit()
            .into_iter()
            .map(|src| (src, MESSAGES_PER_CLIENT))
            .chain([(EXCEPTION.to_string(), 1)])
            .map(|(src, count)| {
                let dst = if src.contains(':') { GW_V6 } else { GW_V4 };
                let gate_arg = if count > 1 {
                    gate.to_string_lossy().into_owned()
                } else {
                    "-".to_string()
                };
                let client = PyClient::spawn(
                    &topo.net,
                    script,
                    &[
                        "send",
                        &src,
                        dst,
                        &PORT.to_string(),
                        &ca,
                        &count.to_string(),
                        &CLIENT_PACE_SECS.to_string(),
                        &gate_arg,
                    ],
                    format!("client {src}"),
                );
                (src, client)
            })
            .collect();
        let idle = PyClient::spawn(
            &topo.net,
            script,
            &["idle", IDLE_CLIENT, GW_V4, &PORT.to_string(), &ca],
            "idle client".to_string(),
        );

        // The big import, once the clients' first round is in, while a
        // prober keeps connecting until the import has been applied. Then
        // the gate opens for the clients' last round (also if the import
        // fails, so that they do not wait in vain).
        let importer = s.spawn(|| {
            struct Done<'a>(&'a AtomicBool, &'a Path);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Relaxed);
                    let _ = fs::write(self.1, b"");
                }
            }
            let _done = Done(&importing, &gate);
            postfix.wait_for_log(Duration::from_secs(30), |log| {
                log.matches("message-id=<e2e-").count() >= legit().len()
            });
            let flood_before = progress.total();
            let started = Instant::now();
            let path = data.join("ipsum.txt");
            let r = cli.json(&["import", "deny", &path.to_string_lossy()]);
            let secs = started.elapsed().as_secs_f64();
            let applied_at = unix_now();
            assert!(
                progress.total() > flood_before,
                "the flood was not running during the import"
            );
            (secs, r, applied_at)
        });
        let prober = s.spawn(|| {
            let mut times = Vec::new();
            for src in legit().iter().cycle() {
                if !importing.load(Ordering::Relaxed) {
                    break;
                }
                times.push(greeting_time(&topo.net, src));
                thread::sleep(Duration::from_millis(50));
            }
            times
        });

        for (src, client) in clients {
            for line in client.finish(Duration::from_secs(120)) {
                clients_greetings.push(Duration::from_secs_f64(
                    line["greeting_ms"].as_f64().unwrap() / 1000.0,
                ));
                message_ids.insert(
                    line["message_id"].as_str().unwrap().to_string(),
                    src.clone(),
                );
                done_at.push(line["done_at"].as_f64().unwrap());
            }
        }
        let mut idle_lines = idle.finish(Duration::from_secs(60));
        idle_reply = idle_lines.pop().expect("the idle client's reply");
        let import = importer.join().expect("the import thread");
        import_greetings = prober.join().expect("the prober thread");
        stop.store(true, Ordering::Relaxed);
        (flood.join().expect("the flood thread"), import)
    });
    let flood_greeting = median(flood_greetings);
    let clients_greeting_during_flood = median(clients_greetings);
    let import_probes = import_greetings.len();
    let import_greeting = median(import_greetings);
    let after_import = done_at.iter().filter(|t| **t > import_applied_at).count();
    assert!(
        after_import >= legit().len(),
        "only {after_import} client messages came after the import was applied"
    );
    assert_eq!(ipsum["applied"], true, "{ipsum:#}");
    let ipsum_added = u64_at(&ipsum, "/added");
    assert!(ipsum_added > 100_000, "{ipsum:#}");
    eprintln!(
        "e2e: flood: {} IPv4 + {} IPv6 SYNs in {:.1} s ({} refused and resent)",
        sent.v4,
        sent.v6,
        sent.elapsed.as_secs_f64(),
        sent.refused
    );

    // Every legitimate message reached Postfix with its real client address.
    let expected = legit().len() * MESSAGES_PER_CLIENT + 1;
    assert_eq!(message_ids.len(), expected, "messages the clients sent");
    let arrived = |m: &BTreeMap<String, postfix::Logged>| {
        m.values()
            .filter(|l| {
                l.sent
                    && l.message_id
                        .as_ref()
                        .is_some_and(|id| message_ids.contains_key(id))
            })
            .count()
    };
    let all_arrived = postfix.wait_for_log(Duration::from_secs(30), |log| {
        arrived(&postfix::parse_log(log)) == expected
    });
    let logged = postfix.messages();
    let by_id: BTreeMap<&str, &postfix::Logged> = logged
        .values()
        .filter_map(|l| l.message_id.as_deref().map(|id| (id, l)))
        .collect();
    for (id, src) in &message_ids {
        let l = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} from {src} not in the Postfix log"));
        assert_eq!(l.client.as_deref(), Some(src.as_str()), "{id}: {l:?}");
        assert!(l.sent, "{id} not delivered (discarded) by Postfix: {l:?}");
    }
    assert!(all_arrived);
    let exception_msgs = message_ids.values().filter(|s| *s == EXCEPTION).count();
    assert_eq!(exception_msgs, 1, "the exception's message");

    // The idle client was cut off with 421 4.4.2.
    assert_eq!(idle_reply["code"], 421, "{idle_reply:#}");
    assert!(
        idle_reply["text"].as_str().unwrap().starts_with("4.4.2 "),
        "{idle_reply:#}"
    );
    let idle_waited_s = idle_reply["waited_s"].as_f64().unwrap();

    // Everyone has left: the gauge goes back to 0.
    let open = || u64_at(&cli.status(), "/open_connections");
    assert!(
        wait_for(Duration::from_secs(30), || open() == 0),
        "open connections after the clients left: {}",
        open()
    );

    // The cap: 50 idle connections, then one more gets 421 4.7.0.
    {
        let held: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|i| {
                let s = connect(&topo.net, CAP_CLIENT, Duration::from_secs(30))
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                let g = read_line(&s);
                assert!(g.starts_with("220 "), "connection {i}: {g:?}");
                s
            })
            .collect();
        assert_eq!(open(), MAX_CONNECTIONS as u64);
        let extra = connect(&topo.net, CAP_CLIENT, Duration::from_secs(30)).unwrap();
        let reply = read_line(&extra);
        assert!(reply.starts_with("421 4.7.0 "), "over the cap: {reply:?}");
        let mut rest = Vec::new();
        let _ = (&extra).read_to_end(&mut rest);
        assert!(
            rest.is_empty(),
            "after the 421: {:?}",
            String::from_utf8_lossy(&rest)
        );
        drop(held);
    }
    assert!(
        wait_for(Duration::from_secs(30), || open() == 0),
        "open connections after the cap test: {}",
        open()
    );
    let status = cli.status();
    assert_eq!(u64_at(&status, "/open_connections"), 0, "{status:#}");
    assert_eq!(
        u64_at(&status, "/deny_list_size/ipv4") + u64_at(&status, "/deny_list_size/ipv6"),
        u64_at(&ipsum, "/list_size"),
        "{status:#}"
    );
    assert_eq!(u64_at(&status, "/permit_list_size/ipv4"), 1, "{status:#}");

    // The counters: XDP dropped exactly what the flood sent; the front
    // door never saw a denied source.
    let stats_now = || cli.stats();
    let mut stats = stats_now();
    // The veth's NAPI may still be working through its queue.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (
        u64_at(&stats, "/xdp/drop_v4"),
        u64_at(&stats, "/xdp/drop_v6"),
    ) != (sent.v4, sent.v6)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(200));
        stats = stats_now();
    }
    eprintln!("e2e: stats: {}", serde_json::to_string(&stats).unwrap());
    assert_eq!(
        u64_at(&stats, "/xdp/drop_v4"),
        sent.v4,
        "IPv4 flood SYNs dropped"
    );
    assert_eq!(
        u64_at(&stats, "/xdp/drop_v6"),
        sent.v6,
        "IPv6 flood SYNs dropped"
    );
    assert_eq!(u64_at(&stats, "/xdp/drop_deny_list"), sent.v4 + sent.v6);
    assert_eq!(u64_at(&stats, "/xdp/drop_not_permitted"), 0);
    let fd = &stats["front_door"];
    assert_eq!(
        u64_at(fd, "/refused_deny_list"),
        0,
        "denied at the front door: {fd:#}"
    );
    assert_eq!(u64_at(fd, "/refused_not_permitted"), 0, "{fd:#}");
    assert_eq!(u64_at(fd, "/refused_connection_cap"), 1, "{fd:#}");
    assert!(u64_at(fd, "/closed_idle_timeout") >= 1, "{fd:#}");
    // Every connection accepted at the socket was either refused on
    // accept or greeted: the two counters do not overlap.
    let refused: u64 = fd
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.starts_with("refused_"))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert_eq!(
        u64_at(fd, "/accepted_at_socket"),
        u64_at(fd, "/greeted") + refused,
        "{fd:#}"
    );
    assert_eq!(u64_at(fd, "/messages_accepted"), expected as u64, "{fd:#}");
    assert_eq!(u64_at(fd, "/handoff_failures"), 0, "{fd:#}");
    assert_eq!(u64_at(fd, "/clients_untracked"), 0, "{fd:#}");
    let denied: [ipnet::IpNet; 2] = [
        "203.0.113.0/24".parse().unwrap(),
        "2001:db8:bad::/48".parse().unwrap(),
    ];
    let clients = stats["clients"].as_object().expect("stats.clients");
    let mut seen = BTreeSet::new();
    for (addr, counts) in clients {
        let ip: IpAddr = addr.parse().unwrap();
        if addr != EXCEPTION {
            assert!(
                !denied.iter().any(|n| n.contains(&ip)),
                "a denied source reached the front door: {addr} {counts}"
            );
        }
        seen.insert(addr.clone());
    }
    let must_see: BTreeSet<String> = legit()
        .into_iter()
        .chain([EXCEPTION, IDLE_CLIENT, CAP_CLIENT].map(String::from))
        .collect();
    assert_eq!(seen, must_see, "the front door's clients");
    assert_eq!(u64_at(&stats, &format!("/clients/{EXCEPTION}/accepted")), 1);
    assert_eq!(
        u64_at(&stats, &format!("/clients/{CAP_CLIENT}/accepted")),
        MAX_CONNECTIONS as u64 + 1
    );
    assert_eq!(
        u64_at(&stats, &format!("/clients/{CAP_CLIENT}/rejected")),
        1
    );

    // The Prometheus endpoint agrees.
    let body = scrape(&topo.gw);
    let lines: Vec<std::io::Result<String>> = body.lines().map(|l| Ok(l.to_string())).collect();
    let samples_in_text = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).expect("Prometheus text");
    assert_eq!(
        scrape.samples.len(),
        samples_in_text,
        "every sample line parses:\n{body}"
    );
    let sample = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{body}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    };
    assert_eq!(
        sample("smtpguard_xdp_dropped_total", &[("reason", "deny_list")]),
        u64_at(&stats, "/xdp/drop_deny_list") as f64
    );
    assert_eq!(
        sample(
            "smtpguard_connections_refused_total",
            &[("reason", "connection_cap")]
        ),
        1.0
    );
    assert_eq!(sample("smtpguard_connections_open", &[]), 0.0);
    assert_eq!(
        sample("smtpguard_messages_accepted_total", &[]),
        expected as f64
    );
    assert_eq!(
        sample(
            "smtpguard_list_entries",
            &[("list", "deny"), ("family", "ipv4")]
        ),
        u64_at(&status, "/deny_list_size/ipv4") as f64
    );

    // A clean stop: SIGTERM, exit 0, XDP detached.
    let daemon_pid = daemon.pid();
    let exit = daemon.stop(Duration::from_secs(20));
    assert!(
        exit.is_some_and(|s| s.success()),
        "smtpguard did not stop cleanly on SIGTERM ({exit:?}):\n{}",
        daemon.log()
    );
    assert_eq!(
        xdp_prog_id(&topo.gw, &topo.gw_if),
        None,
        "XDP still attached after the stop"
    );
    let postfix_pid = postfix.master_pid().unwrap_or(0);

    Outcome {
        baseline_greeting,
        flood_greeting,
        clients_greeting_during_flood,
        import_greeting,
        import_probes,
        messages_after_import: after_import,
        sent,
        import_secs,
        ipsum_added,
        idle_waited_s,
        namespaces: vec![topo.gw.name().to_string(), topo.net.name().to_string()],
        interfaces: vec![topo.gw_if.clone(), topo.net_if.clone()],
        netns_inodes: vec![netns_inode(&topo.gw), netns_inode(&topo.net)],
        temp_dirs: vec![tmp.path().to_path_buf()],
        pids: vec![daemon_pid, postfix_pid],
        xdp_prog_id: prog_id,
    }
}

#[test]
fn mail_gateway_end_to_end() {
    require_root();
    let started = Instant::now();
    let o = scenario();
    // Everything the scenario made is dropped by now: check it is gone.
    let netns_list = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for name in &o.namespaces {
        assert!(
            !netns_list.contains(name.as_str()),
            "namespace {name} left behind"
        );
    }
    let links = String::from_utf8(
        Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for name in &o.interfaces {
        assert!(
            !links.contains(name.as_str()),
            "interface {name} left behind"
        );
    }
    // Stopped processes may take a moment to exit and be reaped.
    for inode in &o.netns_inodes {
        wait_for(Duration::from_secs(10), || {
            processes_in_netns(*inode).is_empty()
        });
        let left = processes_in_netns(*inode);
        assert!(
            left.is_empty(),
            "processes left in a test namespace: {left:?}"
        );
    }
    for pid in o.pids.iter().filter(|p| **p > 0) {
        wait_for(Duration::from_secs(10), || !running(*pid));
        assert!(!running(*pid), "process {pid} left behind");
    }
    for dir in &o.temp_dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
        let pgrep = Command::new("pgrep").arg("-af").arg(dir).output().unwrap();
        assert!(
            pgrep.stdout.is_empty(),
            "processes left: {}",
            String::from_utf8_lossy(&pgrep.stdout)
        );
    }
    for name in &o.interfaces {
        let pin = Path::new("/sys/fs/bpf/smtpguard").join(name);
        assert!(!pin.exists(), "pinned link {} left behind", pin.display());
    }
    // The program goes once its last reference does (freed asynchronously).
    let gone = wait_for(Duration::from_secs(10), || {
        !Command::new("bpftool")
            .args(["prog", "show", "id", &o.xdp_prog_id.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(gone, "XDP program id {} still loaded", o.xdp_prog_id);

    let secs = o.sent.elapsed.as_secs_f64();
    eprintln!(
        "\n===== smtpguard end to end ({:.1} s) =====",
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "greeting (connect to 220), median of {PROBES}: without flood {}, under the flood {}",
        ms(o.baseline_greeting),
        ms(o.flood_greeting)
    );
    eprintln!(
        "greeting seen by the smtplib clients during flood + load (median of {}): {}",
        legit().len() * MESSAGES_PER_CLIENT + 1,
        ms(o.clients_greeting_during_flood)
    );
    eprintln!(
        "flood: {} IPv4 + {} IPv6 SYNs in {secs:.1} s = {:.0} + {:.0} per second, all dropped by XDP ({} sends refused and retried)",
        o.sent.v4,
        o.sent.v6,
        o.sent.v4 as f64 / secs,
        o.sent.v6 as f64 / secs,
        o.sent.refused
    );
    eprintln!(
        "ipsum import under load: {} entries added in {:.1} s; meanwhile {} greetings, median {}",
        o.ipsum_added,
        o.import_secs,
        o.import_probes,
        ms(o.import_greeting)
    );
    eprintln!(
        "client messages accepted after the import was applied: {} of {}",
        o.messages_after_import,
        legit().len() * MESSAGES_PER_CLIENT + 1
    );
    eprintln!(
        "idle client cut off after {:.1} s with 421 4.4.2",
        o.idle_waited_s
    );
}
