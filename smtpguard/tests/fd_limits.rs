//! The daemon under a small file-descriptor limit (issue #14, item 2): in
//! upstream mode against a private upstream, with more clients than the
//! descriptors allow, every client gets a greeting or `421 4.3.2` (never
//! silence), and the control socket keeps answering.
//!
//! Each test runs the real binary on loopback with its own limit
//! (setrlimit in the child before exec), its own ports (picked free by the
//! kernel) and its own directory; the child is killed on drop.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use smtpguard::testing::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_smtpguard");
/// The longest any single step may take before the test fails.
const STEP: Duration = Duration::from_secs(20);

/// A port the kernel says is free now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private upstream MTA: greets, says 250 to everything, keeps each
/// connection open until the other side closes it.
fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let _ = stream.write_all(b"220 upstream.example.com ESMTP\r\n");
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                    let reply: &[u8] = if line.to_ascii_uppercase().starts_with("QUIT") {
                        b"221 2.0.0 Bye\r\n"
                    } else {
                        b"250 2.0.0 Ok\r\n"
                    };
                    if stream.write_all(reply).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

/// The daemon, killed and reaped on drop (even when the test fails).
struct Daemon {
    child: Child,
    dir: TempDir,
    smtp: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts the daemon with RLIMIT_NOFILE `soft`/`hard` and `[server]`
    /// lines `server`; returns the running daemon, or its output if it
    /// exited.
    fn start(soft: u64, hard: u64, server: &str) -> Result<Daemon, Output> {
        let dir = TempDir::new("fd-limits");
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let d = dir.path().display();
        let config = dir.write(
            "smtpguard.toml",
            format!(
                "[server]\nhostname = \"gw.example.com\"\nlisten = [\"{smtp}\"]\n{server}\n\
                 [policy]\ndeny_list = \"{d}/deny.list\"\npermit_list = \"{d}/permit.list\"\n\
                 [delivery]\nupstream = \"{}\"\nupstream_protocol = \"none\"\n\
                 [control]\nsocket = \"{d}/control.sock\"\n\
                 [screening]\ngreet_wait = \"0s\"\n",
                upstream()
            ),
        );
        let mut command = Command::new(BIN);
        command
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap());
        // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        let mut daemon = Daemon { child, dir, smtp };
        let deadline = Instant::now() + STEP;
        while Instant::now() < deadline {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                return Err(Output {
                    status,
                    stdout: Vec::new(),
                    stderr: std::fs::read(daemon.dir.join("daemon.log")).unwrap_or_default(),
                });
            }
            if daemon.cli(&["status"]).is_some_and(|o| o.status.success()) {
                return Ok(daemon);
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("the daemon did not come up:\n{}", daemon.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Runs the CLI against this daemon; `None` if it did not finish
    /// within [`STEP`] (it is killed then).
    fn cli(&self, args: &[&str]) -> Option<Output> {
        let mut child = Command::new(BIN)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + STEP;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return Some(child.wait_with_output().unwrap());
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self
            .cli(args)
            .unwrap_or_else(|| panic!("smtpguard {args:?} hung\n{}", self.log()));
        assert!(
            out.status.success(),
            "smtpguard {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

/// What a client got: the greeting line, or the error (a timeout is
/// silence).
fn greeting(reader: &mut BufReader<TcpStream>) -> Result<String, std::io::Error> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    Ok(line)
}

/// A client that connects and, when greeted, sends EHLO and MAIL FROM (so
/// its session holds an upstream connection too) and stays connected.
/// Returns the greeting line and the open connection.
fn client(addr: SocketAddr, mail: bool) -> (String, Option<BufReader<TcpStream>>) {
    let stream = match TcpStream::connect_timeout(&addr, STEP) {
        Ok(s) => s,
        Err(e) => return (format!("connect failed: {e}"), None),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let first = match greeting(&mut reader) {
        Ok(line) => line,
        Err(e) => return (format!("no greeting: {e}"), None),
    };
    if first.starts_with("220 ") && mail {
        let stream = reader.get_mut();
        stream.write_all(b"EHLO client.example.com\r\n").unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                break;
            }
        }
        reader
            .get_mut()
            .write_all(b"MAIL FROM:<sender@example.com>\r\n")
            .unwrap();
        line.clear();
        let _ = reader.read_line(&mut line);
    }
    (first, Some(reader))
}

fn is_421_432(line: &str) -> bool {
    line.starts_with("421 4.3.2 ")
}

/// The scenario, scaled down: upstream mode, `max_connections`
/// unlimited, a soft limit of 64 (hard 256) and 150 clients that each
/// send EHLO and MAIL. Before: the limit stayed at 64, the accept loops
/// backed off on EMFILE, clients got silence and `status` timed out.
#[test]
fn more_clients_than_descriptors_get_a_greeting_or_421_and_status_answers() {
    let daemon = Daemon::start(64, 256, "max_connections = \"unlimited\"")
        .unwrap_or_else(|o| panic!("did not start: {}", String::from_utf8_lossy(&o.stderr)));
    let mut held = Vec::new();
    let (mut greeted, mut refused) = (0, 0);
    for _ in 0..150 {
        let (first, conn) = client(daemon.smtp, true);
        if first.starts_with("220 ") {
            greeted += 1;
        } else if is_421_432(&first) {
            refused += 1;
        } else {
            panic!(
                "a client got neither a greeting nor 421 4.3.2: {first:?}\n{}",
                daemon.log()
            );
        }
        held.extend(conn);
    }
    assert!(
        greeted > 0 && refused > 0,
        "greeted {greeted}, refused {refused}"
    );
    // The operator gets in while every session the descriptors allow is taken.
    assert!(daemon.ok(&["status"]).contains("connections:"));
    assert!(daemon
        .ok(&["deny", "add", "203.0.113.9"])
        .contains("1 added"));
    let stats = daemon.ok(&["--json", "stats"]);
    assert!(stats.contains("file_descriptors"), "{stats}");
    // The soft limit was raised to the hard one.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>();
    assert_eq!(open_files[3..5], ["256", "256"], "{limits}");

    drop(held);
}

/// An explicit `max_connections` that the descriptors cannot carry stops
/// the start with a message naming the key and the fix.
#[test]
fn max_connections_that_do_not_fit_refuse_the_start() {
    let out = match Daemon::start(256, 256, "max_connections = 1000") {
        Ok(_) => panic!("started with max_connections = 1000 under a limit of 256"),
        Err(out) => out,
    };
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("server.max_connections = 1000 needs up to 2000 file descriptors")
            && text.contains("LimitNOFILE="),
        "{text}"
    );
}

/// Descriptors that run out for another reason (here: the limit lowered
/// under the running daemon with prlimit): the accept loop's spare
/// descriptor takes the waiting client, who gets `421 4.3.2` instead of
/// silence, and the control socket still serves the operator.
#[test]
fn out_of_descriptors_clients_get_421_and_the_operator_gets_in() {
    let daemon = Daemon::start(256, 256, "max_connections = 50")
        .unwrap_or_else(|o| panic!("did not start: {}", String::from_utf8_lossy(&o.stderr)));
    // The lowest descriptor number not in use: with the soft limit there,
    // every number a new descriptor could take is taken.
    let open: std::collections::BTreeSet<u64> =
        std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .collect();
    let first_free = (0..).find(|n| !open.contains(n)).unwrap();
    let set_soft = |soft: u64| {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: 256,
        };
        // SAFETY: a plain syscall on our own child.
        let rc = unsafe {
            libc::prlimit(
                daemon.pid(),
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    };
    set_soft(first_free);

    // A session ending meanwhile would free a number: clients fill it;
    // then the next one meets EMFILE.
    let mut held = Vec::new();
    let mut got_421 = false;
    for _ in 0..40 {
        let (first, conn) = client(daemon.smtp, false);
        held.extend(conn);
        if is_421_432(&first) {
            got_421 = true;
            break;
        }
        assert!(
            first.starts_with("220 "),
            "a client got neither a greeting nor 421 4.3.2: {first:?}\n{}",
            daemon.log()
        );
    }
    assert!(got_421, "no client met the limit\n{}", daemon.log());
    // Still out of descriptors: the next client is answered too, and the
    // operator gets in on the control socket's spare.
    let (first, _conn) = client(daemon.smtp, false);
    assert!(is_421_432(&first), "{first:?}\n{}", daemon.log());
    assert!(daemon.ok(&["status"]).contains("connections:"));

    drop(held);
}
