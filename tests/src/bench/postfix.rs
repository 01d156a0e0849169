//! The front door's peers: a private Postfix started from a temporary
//! configuration directory (as in smtpguard's hand-off tests: never the
//! system MTA; every local recipient accepted and discarded), and HAProxy
//! in TCP mode in front of it. Both stopped on drop.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{smtp_client::Certs, TempDir};
use crate::netns::ChildGuard;

const POSTFIX: &str = "/usr/sbin/postfix";

/// A running private Postfix.
pub struct Postfix {
    config_dir: PathBuf,
    queue: PathBuf,
    maillog: PathBuf,
    /// Plain smtpd (STARTTLS offered).
    pub plain: SocketAddr,
    /// smtpd behind a PROXY protocol v2 header (for smtpguard and HAProxy).
    pub proxied: SocketAddr,
    /// `default_process_limit`: at most this many smtpd processes.
    pub process_limit: usize,
    running: bool,
    _dir: TempDir,
}

impl Postfix {
    /// Starts Postfix on 127.0.0.1:10025 (plain) and :10026 (PROXY v2) in
    /// the calling thread's network namespace.
    pub fn start(process_limit: usize, certs: &Certs) -> Result<Postfix> {
        if !Path::new(POSTFIX).exists() {
            bail!("{POSTFIX} not found (Debian package postfix)");
        }
        let dir = TempDir::try_new("pfx")?;
        let root = dir.path().to_path_buf();
        let config_dir = root.join("etc");
        let queue = root.join("queue");
        for d in [&config_dir, &queue] {
            std::fs::create_dir(d)?;
        }
        let maillog = root.join("maillog");
        let (plain, proxied): (SocketAddr, SocketAddr) =
            ("127.0.0.1:10025".parse()?, "127.0.0.1:10026".parse()?);
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {queue}\n\
             data_directory = {data}\n\
             maillog_file = {maillog}\n\
             maillog_file_prefixes = {root}\n\
             myhostname = postfix.bench.example\n\
             mydomain = bench.example\n\
             myorigin = $myhostname\n\
             mydestination = example.com\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             local_transport = discard:\n\
             local_recipient_maps =\n\
             alias_maps =\n\
             alias_database =\n\
             smtpd_peername_lookup = no\n\
             biff = no\n\
             smtputf8_enable = no\n\
             default_process_limit = {process_limit}\n\
             # Idle smtpd processes leave soon, so each memory figure counts\n\
             # only the processes that hold its connections.\n\
             max_idle = 2s\n\
             smtpd_tls_security_level = may\n\
             smtpd_tls_chain_files = {key}, {chain}\n\
             smtpd_tls_loglevel = 0\n",
            queue = queue.display(),
            data = root.join("data").display(),
            maillog = maillog.display(),
            root = root.display(),
            key = certs.key.display(),
            chain = certs.chain.display(),
        );
        let master_cf = format!(
            "{plain} inet n - n - - smtpd\n\
             {proxied} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy\n\
             cleanup   unix  n - n -   0 cleanup\n\
             qmgr      unix  n - n 300 1 qmgr\n\
             tlsmgr    unix  - - n 1000? 1 tlsmgr\n\
             rewrite   unix  - - n -   - trivial-rewrite\n\
             bounce    unix  - - n -   0 bounce\n\
             defer     unix  - - n -   0 bounce\n\
             trace     unix  - - n -   0 bounce\n\
             verify    unix  - - n -   1 verify\n\
             proxymap  unix  - - n -   - proxymap\n\
             error     unix  - - n -   - error\n\
             retry     unix  - - n -   - error\n\
             discard   unix  - - n -   - discard\n\
             anvil     unix  - - n -   1 anvil\n\
             scache    unix  - - n -   1 scache\n\
             postlog   unix-dgram n - n - 1 postlogd\n"
        );
        std::fs::write(config_dir.join("main.cf"), main_cf)?;
        std::fs::write(config_dir.join("master.cf"), master_cf)?;
        let mut pf = Postfix {
            config_dir,
            queue,
            maillog,
            plain,
            proxied,
            process_limit,
            running: false,
            _dir: dir,
        };
        let out = pf.postfix("start")?;
        if !out.status.success() {
            bail!(
                "postfix start failed: {}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                pf.log_tail()
            );
        }
        pf.running = true;
        wait_listening(plain).with_context(|| format!("postfix: {}", pf.log_tail()))?;
        Ok(pf)
    }

    fn postfix(&self, verb: &str) -> Result<Output> {
        Ok(Command::new(POSTFIX)
            .arg("-c")
            .arg(&self.config_dir)
            .arg(verb)
            .env_remove("MAIL_CONFIG")
            .stdin(Stdio::null())
            .output()?)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.maillog).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("\n{}", lines[lines.len().saturating_sub(5)..].join("\n"))
    }

    /// The master process's id.
    fn master_pid(&self) -> Result<u32> {
        let text = std::fs::read_to_string(self.queue.join("pid/master.pid"))?;
        Ok(text.trim().parse()?)
    }

    /// The smtpd processes of this instance (children of its master).
    pub fn smtpd_pids(&self) -> Result<Vec<u32>> {
        let master = self.master_pid()?;
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces, so split at ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let ppid = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok());
            if head.ends_with("(smtpd") && ppid == Some(master) {
                out.push(pid);
            }
        }
        Ok(out)
    }

    /// Waits until no smtpd process is left (they leave after `max_idle`).
    pub fn wait_idle(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.smtpd_pids()?.is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("Postfix smtpd processes did not go idle")
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if self.running {
            match self.postfix("stop") {
                Ok(out) if out.status.success() => {}
                _ => {
                    let _ = self.postfix("abort");
                }
            }
        }
    }
}

/// HAProxy in TCP mode, passing the client's address on with PROXY v2.
pub struct HaProxy {
    _child: ChildGuard,
    /// Where it listens.
    pub listen: SocketAddr,
    _dir: TempDir,
}

impl HaProxy {
    /// Starts `haproxy -db` listening on `listen`, forwarding to `upstream`.
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> Result<HaProxy> {
        let dir = TempDir::try_new("haproxy")?;
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 9000\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10m\n  timeout server 10m\n\
                 frontend smtp\n  bind {listen}\n  default_backend postfix\n\
                 backend postfix\n  server postfix {upstream} send-proxy-v2\n"
            ),
        )?;
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting haproxy (Debian package haproxy)")?;
        let proxy = HaProxy {
            _child: ChildGuard(child),
            listen,
            _dir: dir,
        };
        wait_listening(listen).context("haproxy")?;
        Ok(proxy)
    }
}

/// Waits up to 10 s until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on {addr}")
}
