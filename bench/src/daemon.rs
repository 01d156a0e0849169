//! The real smtpguard daemon, started from a configuration file written
//! for the occasion, stopped with SIGTERM on drop (so it detaches XDP and
//! removes its pins), killed if it does not stop.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::smtpguard_binary;
use smtpguard_tests::netns::Netns;

/// A running daemon.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    /// Pins the daemon may leave if it has to be killed: `<dir>/<netns inode>-*`.
    pin_prefix: Option<String>,
}

impl Daemon {
    /// Writes `config` to `dir/smtpguard.toml` and starts the daemon on it,
    /// inside `ns` if given (else in the calling thread's namespace); waits
    /// until its control socket (`dir/control.sock`) answers.
    pub fn start(ns: Option<&Netns>, dir: &Path, config: &str) -> Result<Daemon> {
        let path = dir.join("smtpguard.toml");
        std::fs::write(&path, config)?;
        let binary = smtpguard_binary();
        let mut cmd = match ns {
            Some(ns) => ns.command(binary.to_str().context("binary path")?),
            None => Command::new(&binary),
        };
        let log = dir.join("daemon.log");
        let child = cmd
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pin_prefix = ns
            .and_then(|ns| std::fs::metadata(format!("/run/netns/{}", ns.name())).ok())
            .map(|m| format!("{}-", m.ino()));
        let mut daemon = Daemon {
            child: Some(child),
            socket: dir.join("control.sock"),
            log,
            pin_prefix,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if daemon.cli(&["status"])?.status.success() {
                return Ok(daemon);
            }
            if let Some(status) = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("smtpguard exited with {status}: {}", daemon.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("smtpguard did not come up: {}", daemon.log_tail())
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Runs the controller CLI: `smtpguard --socket SOCK ARGS`.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(smtpguard_binary())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?)
    }

    /// As [`Daemon::cli`], failing unless the command succeeds.
    pub fn cli_ok(&self, args: &[&str]) -> Result<()> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "smtpguard {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The last lines of the daemon's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after 10 s; removes pins a kill left behind.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        if let Some(prefix) = &self.pin_prefix {
            let dir = Path::new(smtpguard::kernel::loader::DEFAULT_PIN_DIR);
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(prefix.as_str())
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Resident set size of process `pid`, in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:").map(|k| k * 1024)
}

/// Proportional set size of process `pid`, in bytes (`Pss` of
/// `smaps_rollup`: shared pages divided among their users).
pub fn pss_bytes(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    kib_field(&text, "Pss:").map(|k| k * 1024)
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    kib_field(&text, field)
}

fn kib_field(text: &str, field: &str) -> Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field}"))
}
