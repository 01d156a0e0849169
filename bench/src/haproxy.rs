//! HAProxy in TCP mode, in front of the bench's Postfix (the tests'
//! fixture, `smtpguard_tests::postfix`): a baseline for smtpguard relaying
//! with PROXY v2. Stopped on drop.

use std::{
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::TempDir;
use smtpguard_tests::netns::ChildGuard;

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
