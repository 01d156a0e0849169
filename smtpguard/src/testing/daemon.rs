//! The real `smtpguard run` binary on loopback, without XDP, for tests that
//! watch what the daemon does and writes (its log, its control socket).

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use super::TempDir;

/// How long the daemon may take to answer `status` after its start.
const START_LIMIT: Duration = Duration::from_secs(30);

/// A daemon in its own directory (config, lists, spool, control socket,
/// `daemon.log` with its stderr), killed and reaped on drop.
pub struct TestDaemon {
    child: Child,
    bin: PathBuf,
    /// The daemon's directory.
    pub dir: TempDir,
    /// The one SMTP listener, on 127.0.0.1 and a port that was free.
    pub smtp: SocketAddr,
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port the kernel says is free now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A daemon configuration for tests: hostname `gw.example.com`, one SMTP
/// listener at `listen`, lists (`deny.list`, `permit.list`), spool (domain
/// `example.com`) and control socket in `dir`, no XDP; then `tables`
/// (`("xdp", "interfaces = [\"eth0\"]\n")`, ...), whose lines are appended
/// to a base table of the same name or form a table of their own. Unless
/// `tables` set `screening.greet_wait`, it is `"0s"`: no greet wait.
pub fn config_text(dir: &Path, listen: SocketAddr, tables: &[(&str, &str)]) -> String {
    let d = dir.display();
    let mut base = vec![
        (
            "server".to_owned(),
            format!("hostname = \"gw.example.com\"\nlisten = [\"{listen}\"]\n"),
        ),
        (
            "policy".to_owned(),
            format!("deny_list = \"{d}/deny.list\"\npermit_list = \"{d}/permit.list\"\n"),
        ),
        (
            "delivery".to_owned(),
            format!("spool_dir = \"{d}/spool\"\naccept_domains = [\"example.com\"]\n"),
        ),
        (
            "control".to_owned(),
            format!("socket = \"{d}/control.sock\"\n"),
        ),
    ];
    for (table, lines) in tables {
        match base.iter_mut().find(|(t, _)| t == table) {
            Some((_, text)) => text.push_str(lines),
            None => base.push(((*table).to_owned(), (*lines).to_owned())),
        }
    }
    // Tests greet at once unless they ask for the greet wait.
    match base.iter_mut().find(|(t, _)| t == "screening") {
        Some((_, text)) if !text.contains("greet_wait") => {
            text.insert_str(0, "greet_wait = \"0s\"\n")
        }
        Some(_) => {}
        None => base.push(("screening".to_owned(), "greet_wait = \"0s\"\n".to_owned())),
    }
    base.iter()
        .map(|(t, lines)| format!("[{t}]\n{lines}\n"))
        .collect()
}

/// `bin run --config CONFIG`, stdout and stderr appended to `log`.
fn spawn(bin: &Path, config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("daemon.log");
    Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("daemon.log"))
        .stderr(log)
        .spawn()
        .expect("start smtpguard")
}

impl TestDaemon {
    /// Starts `bin run --config` with a configuration of the given
    /// `tables` (`("tls", "mode = \"optional\"\n...")`, ...) on top of the
    /// base: hostname `gw.example.com`, one listener, lists, spool (domain
    /// `example.com`) and socket in the directory, no XDP. Lines for a
    /// base table are appended to it. Waits until `status` answers.
    ///
    /// # Panics
    ///
    /// When the daemon exits or does not answer within 30 s (with its log).
    pub fn start(bin: &Path, tables: &[(&str, &str)]) -> TestDaemon {
        let dir = TempDir::new("daemon");
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("address");
        let config = config_text(dir.path(), smtp, tables);
        let config = dir.write("smtpguard.toml", config);
        let child = spawn(bin, &config, &dir.join("daemon.log"));
        let mut daemon = TestDaemon {
            child,
            bin: bin.to_owned(),
            dir,
            smtp,
        };
        daemon.wait_until_up();
        daemon
    }

    /// Stops it ([`TestDaemon::stop`]) and starts it again on the same
    /// directory and configuration; the log goes on in `daemon.log`.
    ///
    /// # Panics
    ///
    /// As [`TestDaemon::stop`] and [`TestDaemon::start`].
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(&self.bin, &self.config(), &self.dir.join("daemon.log"));
        self.wait_until_up();
    }

    fn wait_until_up(&mut self) {
        let daemon = self;
        let deadline = Instant::now() + START_LIMIT;
        while Instant::now() < deadline {
            if let Some(status) = daemon.child.try_wait().expect("wait") {
                panic!("the daemon exited ({status}):\n{}", daemon.log());
            }
            if daemon.cli(&["status"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the daemon did not come up:\n{}", daemon.log());
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its configuration file.
    pub fn config(&self) -> PathBuf {
        self.dir.join("smtpguard.toml")
    }

    /// Its control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// What it wrote so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs the CLI against its socket.
    ///
    /// # Panics
    ///
    /// When the CLI cannot be run.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run the smtpguard CLI")
    }

    /// Stops it with SIGTERM and waits (at most 30 s) for it to exit.
    ///
    /// # Panics
    ///
    /// When it does not exit in time or exits with a failure.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "daemon exit: {status}\n{}", self.log());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
