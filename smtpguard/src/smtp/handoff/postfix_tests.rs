//! A real Postfix as the upstream: a private instance started from a
//! temporary configuration directory (`postfix -c DIR start`), listening
//! only on 127.0.0.1 high ports, never the system MTA.
//!
//! Needs root and the Debian `postfix` package. Without them the test
//! prints why and passes, unless `SMTPGUARD_REQUIRE_POSTFIX=1` is set, in
//! which case it fails.
//!
//! The instance (everything under one temp dir, removed afterwards):
//! * `main.cf`: `queue_directory`, `data_directory` and `maillog_file`
//!   (with `maillog_file_prefixes`, which otherwise only allows `/var`) in
//!   the temp dir; `inet_interfaces = 127.0.0.1`, `inet_protocols = ipv4`;
//!   `mydestination = example.com` with `local_transport = discard:` and
//!   an empty `local_recipient_maps` (every local recipient accepted and
//!   discarded); `mynetworks = 127.0.0.0/8`; no alias maps, no reverse DNS
//!   (`smtpd_peername_lookup = no`).
//! * `master.cf`: an smtpd on `127.0.0.1:<port A>` with
//!   `-o smtpd_upstream_proxy_protocol=haproxy`, another on
//!   `127.0.0.1:<port B>` with `-o smtpd_authorized_xclient_hosts=127.0.0.0/8`,
//!   the services that accept and dispose of mail (cleanup, qmgr,
//!   trivial-rewrite, bounce/defer/trace, verify, proxymap, error/retry,
//!   discard, anvil, scache) and `postlog` (`postlogd`, for
//!   `maillog_file`), all with chroot off.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::test_util::TempDir;
use super::tests::{client, envelope, upstream};
use super::*;
use crate::config::UpstreamProtocol;

const POSTFIX: &str = "/usr/sbin/postfix";

/// A running private Postfix; stopped on drop (also when the test fails).
struct Postfix {
    config_dir: PathBuf,
    maillog: PathBuf,
    proxy_port: u16,
    xclient_port: u16,
    running: bool,
    // Dropped after `drop()` has stopped Postfix.
    _dir: TempDir,
}

impl Postfix {
    fn start() -> Result<Postfix, String> {
        let dir = TempDir::new("pfx");
        let root = dir.path().to_path_buf();
        set_mode(&root, 0o755)?;
        let config_dir = root.join("etc");
        let queue = root.join("queue");
        for d in [&config_dir, &queue] {
            fs::create_dir(d).map_err(|e| format!("{}: {e}", d.display()))?;
            set_mode(d, 0o755)?;
        }
        let maillog = root.join("maillog");
        let (proxy_port, xclient_port) = (free_port()?, free_port()?);
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {queue}\n\
             data_directory = {data}\n\
             maillog_file = {maillog}\n\
             maillog_file_prefixes = {root}\n\
             myhostname = postfix-test.example.net\n\
             mydomain = example.net\n\
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
             smtpd_upstream_proxy_timeout = 10s\n\
             biff = no\n\
             smtputf8_enable = no\n",
            queue = queue.display(),
            data = root.join("data").display(),
            maillog = maillog.display(),
            root = root.display(),
        );
        let master_cf = format!(
            "127.0.0.1:{proxy_port} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy\n\
             127.0.0.1:{xclient_port} inet n - n - - smtpd -o smtpd_authorized_xclient_hosts=127.0.0.0/8\n\
             cleanup   unix  n - n -   0 cleanup\n\
             qmgr      unix  n - n 300 1 qmgr\n\
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
        fs::write(config_dir.join("main.cf"), main_cf).map_err(|e| e.to_string())?;
        fs::write(config_dir.join("master.cf"), master_cf).map_err(|e| e.to_string())?;
        let mut pf = Postfix {
            config_dir,
            maillog,
            proxy_port,
            xclient_port,
            running: false,
            _dir: dir,
        };
        let out = pf.postfix("start")?;
        if !out.status.success() {
            return Err(format!(
                "postfix start failed: {}\n{}",
                describe(&out),
                pf.log()
            ));
        }
        pf.running = true;
        // `master -w` returns once the master is up; the listeners are
        // open by then, but be tolerant. (Probe the XCLIENT port: a probe
        // on the PROXY port makes smtpd log "haproxy read: EOF".)
        wait_for(Duration::from_secs(5), || {
            TcpStream::connect(("127.0.0.1", pf.xclient_port)).is_ok()
        })
        .map_err(|_| format!("postfix not listening on {}\n{}", pf.xclient_port, pf.log()))?;
        Ok(pf)
    }

    fn postfix(&self, verb: &str) -> Result<Output, String> {
        let mut cmd = Command::new(POSTFIX);
        cmd.arg("-c")
            .arg(&self.config_dir)
            .arg(verb)
            .env_remove("MAIL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run(cmd, Duration::from_secs(20))
    }

    fn stop(&mut self) -> Result<(), String> {
        if !self.running {
            return Ok(());
        }
        let out = self.postfix("stop")?;
        self.running = false;
        if !out.status.success() {
            let _ = self.postfix("abort");
            return Err(format!("postfix stop failed: {}", describe(&out)));
        }
        Ok(())
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.maillog).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (postlogd writes
    /// asynchronously).
    fn log_contains(&self, needle: &str) -> bool {
        wait_for(Duration::from_secs(5), || self.log().contains(needle)).is_ok()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("{e}");
        }
    }
}

fn set_mode(p: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", p.display()))
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn wait_for(limit: Duration, mut ok: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + limit;
    loop {
        if ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `cmd` to completion, killing it after `limit`.
fn run(mut cmd: Command, limit: Duration) -> Result<Output, String> {
    let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} took longer than {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
    child.wait_with_output().map_err(|e| e.to_string())
}

fn describe(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Why the test cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if !Path::new(POSTFIX).exists() {
        return Some(format!("{POSTFIX} not found (Debian package postfix)"));
    }
    None
}

#[tokio::test]
async fn real_postfix_accepts_with_proxy_v2_and_xclient_then_451_when_stopped() {
    if let Some(why) = unavailable() {
        if std::env::var_os("SMTPGUARD_REQUIRE_POSTFIX").is_some_and(|v| v == "1") {
            panic!("real Postfix test cannot run: {why}");
        }
        eprintln!("SKIPPED real Postfix test: {why}");
        return;
    }
    let started = Instant::now();
    let mut pf = Postfix::start().unwrap_or_else(|e| panic!("{e}"));
    let result = tokio::time::timeout(Duration::from_secs(25), async {
        let timeout = Duration::from_secs(10);
        let addr: SocketAddr = ([127, 0, 0, 1], pf.proxy_port).into();
        let env = envelope("<alice@example.org>", &["<bob@example.com>"]);
        let data = b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: smtpguard hand-off test\r\n\r\nHello.\r\n.\r\n";

        // PROXY v2, claiming a documentation address as the client.
        let c = client();
        assert_eq!(c.peer.ip().to_string(), "192.0.2.10");
        let d = upstream(addr, UpstreamProtocol::ProxyV2, timeout);
        let mut s = d.session(false);
        let r = s.mail(&c, &env.reverse_path, &MailParams::default()).await;
        assert_eq!(r.code, 250, "MAIL: {r}\n{}", pf.log());
        // Postfix believes the PROXY header: 192.0.2.10 is not in
        // mynetworks, so relaying is refused (from 127.0.0.1 it would be
        // allowed). Postfix ≥ 3.0 defaults to defer_unauth_destination
        // (454 4.7.1) in smtpd_relay_restrictions, older ones 554 5.7.1.
        let elsewhere = parse_rcpt_path("<carol@elsewhere.example>");
        let r = s.rcpt(&c, &elsewhere).await;
        assert!(matches!(r.code, 454 | 554), "{r}");
        assert_eq!(r.enhanced.map(|e| (e.1, e.2)), Some((7, 1)), "{r}");
        assert!(r.lines[0].contains("Relay access denied"), "{r}");
        let r = s.rcpt(&c, &env.forward_paths[0]).await;
        assert_eq!(r, Reply::recipient_ok(), "{r}");
        let r = s.message(&c, &env, data).await;
        assert_eq!(r.code, 250, "{r}\n{}", pf.log());
        let qid = r.lines[0]
            .strip_prefix("Ok: queued as ")
            .unwrap_or_else(|| panic!("{r}"))
            .to_string();
        s.close().await;
        assert!(
            pf.log_contains(&format!("{qid}: client=unknown[192.0.2.10]")),
            "no client=unknown[192.0.2.10] for {qid} in the Postfix log:\n{}",
            pf.log()
        );
        assert!(pf.log().contains("connect from unknown[192.0.2.10]"));

        // XCLIENT on the other port, for another documentation address.
        let mut c2 = client();
        c2.peer = "192.0.2.11:40001".parse().unwrap();
        let d2 = upstream(
            ([127, 0, 0, 1], pf.xclient_port).into(),
            UpstreamProtocol::Xclient,
            timeout,
        );
        let mut s2 = d2.session(false);
        assert_eq!(s2.mail(&c2, &env.reverse_path, &MailParams::default()).await.code, 250);
        assert_eq!(s2.rcpt(&c2, &env.forward_paths[0]).await.code, 250);
        let r = s2.message(&c2, &env, data).await;
        assert_eq!(r.code, 250, "{r}\n{}", pf.log());
        let qid2 = r.lines[0].strip_prefix("Ok: queued as ").unwrap().to_string();
        s2.close().await;
        assert!(
            pf.log_contains(&format!("{qid2}: client=unknown[192.0.2.11]")),
            "no client=unknown[192.0.2.11] for {qid2} in the Postfix log:\n{}",
            pf.log()
        );

        // Postfix stopped: temporary failure, nothing lost.
        pf.stop().unwrap();
        wait_for(Duration::from_secs(5), || {
            TcpStream::connect(("127.0.0.1", pf.proxy_port)).is_err()
        })
        .expect("postfix still listening after stop");
        let mut s3 = d.session(false);
        let r = s3.mail(&c, &env.reverse_path, &MailParams::default()).await;
        assert_eq!(r.to_string(), "451 4.4.1 Error: upstream not responding\r\n");
    })
    .await;
    drop(pf);
    result.expect("real Postfix test took longer than 25 s");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

fn parse_rcpt_path(p: &str) -> ForwardPath {
    crate::smtp::command::parse_rcpt(&format!("TO:{p}")).unwrap()
}
