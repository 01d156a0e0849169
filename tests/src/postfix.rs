//! A real Postfix, the one fixture for the tests (smtpguard's upstream
//! MTA) and the bench (a baseline beside the front door): a private
//! instance started as root from a temporary configuration directory
//! (`postfix -c DIR start`), in a test network namespace or the calling
//! thread's, never the system MTA. Stopped (and its directory removed) on
//! drop, also when the test fails. [`Options`] says what it runs.
//!
//! The instance (everything under one temp dir):
//! * `main.cf`: `queue_directory`, `data_directory` and `maillog_file`
//!   (with `maillog_file_prefixes`, which otherwise only allows `/var`) in
//!   the temp dir; `inet_interfaces = 127.0.0.1`; `inet_protocols = all`
//!   (Postfix refuses IPv6 client addresses in a PROXY header when its
//!   IPv6 support is off); `mydestination = example.com` with
//!   `local_transport = discard:` and an empty `local_recipient_maps`
//!   (every local recipient accepted, then discarded and logged);
//!   `mynetworks = 127.0.0.0/8`; no alias maps, no reverse DNS
//!   (`smtpd_peername_lookup = no`). With [`Options::tls`], STARTTLS
//!   offered (`smtpd_tls_security_level = may`); with
//!   [`Options::process_limit`], `default_process_limit` and a short
//!   `max_idle`.
//! * `master.cf`: one smtpd on `127.0.0.1:<port>` with
//!   `-o smtpd_upstream_proxy_protocol=haproxy` (PROXY v1 and v2),
//!   optionally a plain one ([`Options::plain_port`]) and one on
//!   `127.0.0.1:<xclient port>` with
//!   `-o smtpd_authorized_xclient_hosts=127.0.0.0/8` (XCLIENT), the
//!   services that accept and dispose of mail, and `postlog` (`postlogd`,
//!   for `maillog_file`), all with chroot off.
//!
//! Postfix logs `QUEUEID: client=unknown[ADDR]` with the address from the
//! PROXY header (or XCLIENT), `QUEUEID: message-id=<...>` and, once discarded,
//! `QUEUEID: to=<...>, relay=none, ... status=sent`; [`Postfix::messages`]
//! reads those back.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use smtpguard::testing::TempDir;

use crate::{netns::Netns, run_bounded, wait_for};

/// The Debian package's `postfix` command.
pub const POSTFIX: &str = "/usr/sbin/postfix";

/// What a [`Postfix`] runs. Every port is on 127.0.0.1.
#[derive(Clone, Copy)]
pub struct Options<'a> {
    /// The namespace to run in (`ip netns exec`); `None`: the calling
    /// thread's.
    pub netns: Option<&'a Netns>,
    /// The smtpd that expects a PROXY header
    /// (`smtpd_upstream_proxy_protocol = haproxy`).
    pub port: u16,
    /// An smtpd without PROXY header, if any.
    pub plain_port: Option<u16>,
    /// An smtpd that trusts XCLIENT from 127.0.0.0/8
    /// (`smtpd_authorized_xclient_hosts`), if any.
    pub xclient_port: Option<u16>,
    /// STARTTLS offered, with this certificate chain and key.
    pub tls: Option<Tls<'a>>,
    /// `default_process_limit`: at most this many smtpd processes. Idle
    /// ones then leave after 2 s (`max_idle`), so a memory figure counts
    /// only the processes holding its connections.
    pub process_limit: Option<usize>,
}

/// Certificate files for STARTTLS.
#[derive(Clone, Copy, Debug)]
pub struct Tls<'a> {
    /// The server certificate, then its chain, PEM.
    pub chain: &'a Path,
    /// The server's private key, PEM.
    pub key: &'a Path,
}

impl<'a> Options<'a> {
    /// Only the PROXY-protocol smtpd on `port`, in `netns`.
    pub fn proxy(netns: &'a Netns, port: u16) -> Options<'a> {
        Options {
            netns: Some(netns),
            port,
            plain_port: None,
            xclient_port: None,
            tls: None,
            process_limit: None,
        }
    }
}

/// A running private Postfix; stopped on drop.
pub struct Postfix {
    config_dir: PathBuf,
    queue_dir: PathBuf,
    maillog: PathBuf,
    netns: Option<String>,
    /// The PROXY-protocol smtpd's port on 127.0.0.1.
    pub port: u16,
    /// The plain smtpd's port on 127.0.0.1, if it has one.
    pub plain_port: Option<u16>,
    /// The XCLIENT smtpd's port on 127.0.0.1, if it has one.
    pub xclient_port: Option<u16>,
    /// `default_process_limit`, if set.
    pub process_limit: Option<usize>,
    running: bool,
    // Dropped after `drop()` has stopped Postfix.
    _dir: TempDir,
}

/// What Postfix logged about one queued message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Logged {
    /// The client address smtpd logged (`client=unknown[ADDR]`: from the
    /// PROXY header).
    pub client: Option<String>,
    /// The `Message-ID` cleanup logged, with its angle brackets.
    pub message_id: Option<String>,
    /// Whether a delivery was logged with `status=sent`.
    pub sent: bool,
}

impl Postfix {
    /// Starts an instance as `options` say; returns once every smtpd
    /// listens.
    ///
    /// # Errors
    ///
    /// Postfix is not installed, its files cannot be written, or it does
    /// not start (the message holds its log).
    pub fn start(options: Options<'_>) -> Result<Postfix, String> {
        if !Path::new(POSTFIX).exists() {
            return Err(format!("{POSTFIX} not found (Debian package postfix)"));
        }
        let dir = TempDir::new("pfx");
        let root = dir.path().to_path_buf();
        let config_dir = root.join("etc");
        let queue_dir = root.join("queue");
        for d in [&config_dir, &queue_dir] {
            fs::create_dir(d).map_err(|e| format!("{}: {e}", d.display()))?;
            set_mode(d, 0o755)?;
        }
        let maillog = root.join("maillog");
        let mut main_cf = format!(
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
             inet_protocols = all\n\
             mynetworks = 127.0.0.0/8\n\
             local_transport = discard:\n\
             local_recipient_maps =\n\
             alias_maps =\n\
             alias_database =\n\
             smtpd_peername_lookup = no\n\
             smtpd_upstream_proxy_timeout = 10s\n\
             biff = no\n\
             smtputf8_enable = no\n",
            queue = queue_dir.display(),
            data = root.join("data").display(),
            maillog = maillog.display(),
            root = root.display(),
        );
        if let Some(limit) = options.process_limit {
            main_cf.push_str(&format!("default_process_limit = {limit}\nmax_idle = 2s\n"));
        }
        if let Some(tls) = options.tls {
            main_cf.push_str(&format!(
                "smtpd_tls_security_level = may\n\
                 smtpd_tls_chain_files = {key}, {chain}\n\
                 smtpd_tls_loglevel = 0\n",
                key = tls.key.display(),
                chain = tls.chain.display(),
            ));
        }
        let mut master_cf = format!(
            "127.0.0.1:{} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy\n",
            options.port
        );
        if let Some(p) = options.plain_port {
            master_cf.push_str(&format!("127.0.0.1:{p} inet n - n - - smtpd\n"));
        }
        if let Some(x) = options.xclient_port {
            master_cf.push_str(&format!(
                "127.0.0.1:{x} inet n - n - - smtpd \
                 -o smtpd_authorized_xclient_hosts=127.0.0.0/8\n"
            ));
        }
        if options.tls.is_some() {
            master_cf.push_str("tlsmgr    unix  - - n 1000? 1 tlsmgr\n");
        }
        master_cf.push_str(
            "cleanup   unix  n - n -   0 cleanup\n\
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
             postlog   unix-dgram n - n - 1 postlogd\n",
        );
        fs::write(config_dir.join("main.cf"), main_cf).map_err(|e| e.to_string())?;
        fs::write(config_dir.join("master.cf"), master_cf).map_err(|e| e.to_string())?;
        let mut pf = Postfix {
            config_dir,
            queue_dir,
            maillog,
            netns: options.netns.map(|ns| ns.name().to_string()),
            port: options.port,
            plain_port: options.plain_port,
            xclient_port: options.xclient_port,
            process_limit: options.process_limit,
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
        // `master -w` returns once the master is up; wait for the listeners
        // without connecting (a probe without a PROXY header makes smtpd log
        // a warning).
        let ports = [Some(pf.port), pf.plain_port, pf.xclient_port];
        for p in ports.into_iter().flatten() {
            if !wait_for(Duration::from_secs(10), || pf.listening(p)) {
                return Err(format!("postfix not listening on {p}\n{}", pf.log()));
            }
        }
        Ok(pf)
    }

    /// The PROXY-protocol smtpd's address.
    pub fn proxied(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The plain smtpd's address, if it has one.
    pub fn plain(&self) -> Option<SocketAddr> {
        self.plain_port
            .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
    }

    /// A command run in the instance's namespace.
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, program]);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Whether something listens on TCP `port` in the instance's
    /// namespace (`ss`, without connecting).
    pub fn listening(&self, port: u16) -> bool {
        self.command("ss")
            .arg("-Hltn")
            .arg(format!("sport = :{port}"))
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
    }

    fn postfix(&self, verb: &str) -> Result<Output, String> {
        let mut cmd = self.command(POSTFIX);
        cmd.arg("-c")
            .arg(&self.config_dir)
            .arg(verb)
            .env_remove("MAIL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run_bounded(cmd, Duration::from_secs(20))
    }

    /// The master daemon's process id, while it runs.
    pub fn master_pid(&self) -> Option<i32> {
        fs::read_to_string(self.queue_dir.join("pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The smtpd processes of this instance (children of its master).
    pub fn smtpd_pids(&self) -> Vec<i32> {
        let Some(master) = self.master_pid() else {
            return Vec::new();
        };
        let Ok(proc) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        proc.flatten()
            .filter_map(|entry| entry.file_name().to_string_lossy().parse::<i32>().ok())
            .filter(|pid| {
                let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    return false;
                };
                // "pid (comm) state ppid ...": comm may hold spaces, so split at ')'.
                let Some((head, rest)) = stat.rsplit_once(')') else {
                    return false;
                };
                let ppid = rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<i32>().ok());
                head.ends_with("(smtpd") && ppid == Some(master)
            })
            .collect()
    }

    /// Waits up to `limit` until no smtpd process is left (with
    /// [`Options::process_limit`] they leave after 2 s idle); whether
    /// none is.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        wait_for(limit, || self.smtpd_pids().is_empty())
    }

    /// Stops the instance (`postfix stop`, which waits for the master to
    /// exit; `postfix abort` if that fails).
    pub fn stop(&mut self) -> Result<(), String> {
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

    /// The instance's configuration directory (for `sendmail -C`,
    /// `postcat -c`).
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// The files in the `maildrop` queue: what `sendmail` submitted (the
    /// instance runs no `pickup`, so they stay there to be read with
    /// `postcat`).
    pub fn maildrop(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(self.queue_dir.join("maildrop"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.maillog).unwrap_or_default()
    }

    /// The messages in the log, by queue id.
    pub fn messages(&self) -> BTreeMap<String, Logged> {
        parse_log(&self.log())
    }

    /// Waits up to `limit` until `ok` holds for the log (postlogd writes
    /// asynchronously); whether it did.
    pub fn wait_for_log(&self, limit: Duration, mut ok: impl FnMut(&str) -> bool) -> bool {
        wait_for(limit, || ok(&self.log()))
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("{e}");
        }
    }
}

/// The messages in a Postfix log, by queue id (see [`Logged`]).
pub fn parse_log(log: &str) -> BTreeMap<String, Logged> {
    let mut out: BTreeMap<String, Logged> = BTreeMap::new();
    for line in log.lines() {
        // "... postfix/smtpd[123]: 4XyZ1234: client=unknown[198.51.100.10]"
        let Some((_, rest)) = line.split_once("]: ") else {
            continue;
        };
        let Some((qid, detail)) = rest.split_once(": ") else {
            continue;
        };
        if qid.is_empty() || !qid.chars().all(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        if let Some(client) = detail.strip_prefix("client=") {
            let addr = client
                .split(',')
                .next()
                .and_then(|c| c.split_once('['))
                .and_then(|(_, a)| a.split_once(']'))
                .map(|(a, _)| a.to_string());
            out.entry(qid.to_string()).or_default().client = addr;
        } else if let Some(id) = detail.strip_prefix("message-id=") {
            out.entry(qid.to_string()).or_default().message_id = Some(id.trim().to_string());
        } else if detail.starts_with("to=") && detail.contains(" status=sent ") {
            out.entry(qid.to_string()).or_default().sent = true;
        }
    }
    out
}

fn set_mode(p: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", p.display()))
}

fn describe(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_become_messages() {
        let log = "\
Nov 29 10:00:00 postfix-test postfix/smtpd[10]: connect from unknown[198.51.100.10]
Nov 29 10:00:00 postfix-test postfix/smtpd[10]: 4ABC12: client=unknown[198.51.100.10]
Nov 29 10:00:00 postfix-test postfix/cleanup[11]: 4ABC12: message-id=<e2e-1@client.example>
Nov 29 10:00:00 postfix-test postfix/qmgr[12]: 4ABC12: from=<a@client.example>, size=10543, nrcpt=1 (queue active)
Nov 29 10:00:00 postfix-test postfix/discard[13]: 4ABC12: to=<bob@example.com>, relay=none, delay=0.1, delays=0.1/0/0/0, dsn=2.0.0, status=sent (example.com)
Nov 29 10:00:01 postfix-test postfix/smtpd[10]: 5DEF34: client=unknown[2001:db8:1::10]
";
        let m = parse_log(log);
        assert_eq!(
            m["4ABC12"],
            Logged {
                client: Some("198.51.100.10".into()),
                message_id: Some("<e2e-1@client.example>".into()),
                sent: true
            }
        );
        assert_eq!(m["5DEF34"].client.as_deref(), Some("2001:db8:1::10"));
        assert!(!m["5DEF34"].sent);
        assert_eq!(m.len(), 2);
    }
}
