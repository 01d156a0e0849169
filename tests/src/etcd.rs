//! A private etcd (Debian's `etcd-server`) on free loopback ports in a
//! temporary directory: one member or a 3-member cluster, plain or TLS
//! (server certificate, optionally client-certificate authentication).
//! Every member is killed and reaped on drop; `etcdctl` talks to it.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use smtpguard::testing::{free_port, TempDir, TestPki};

/// How long a member may take to answer after its start.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// One etcdctl call.
const ETCDCTL_LIMIT: Duration = Duration::from_secs(20);

/// TLS for the client port.
pub struct EtcdTls<'a> {
    /// The PKI whose server certificate etcd uses (names `127.0.0.1`).
    pub pki: &'a TestPki,
    /// Require client certificates signed by the PKI's CA.
    pub client_cert_auth: bool,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running etcd, one or more members.
pub struct Etcd {
    members: Vec<Member>,
    /// Data directories and logs.
    pub dir: TempDir,
    cluster: String,
    token: String,
    tls: Option<(PathBuf, PathBuf, PathBuf, bool)>,
    /// Client certificate and key for etcdctl under client-cert auth.
    client_identity: Option<(PathBuf, PathBuf)>,
    /// The network namespace etcd and etcdctl run in (`None`: this one).
    netns: Option<String>,
    /// The address etcd listens on, as written in a URL.
    host: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Etcd {
    /// One member, plain HTTP.
    ///
    /// # Panics
    ///
    /// When it does not come up within 30 s (with its log).
    pub fn single() -> Etcd {
        Etcd::start(1, None)
    }

    /// Three members, plain HTTP.
    ///
    /// # Panics
    ///
    /// As [`Etcd::single`].
    pub fn cluster() -> Etcd {
        Etcd::start(3, None)
    }

    /// One member with TLS on the client port.
    ///
    /// # Panics
    ///
    /// As [`Etcd::single`].
    pub fn single_tls(tls: EtcdTls<'_>) -> Etcd {
        Etcd::start(1, Some(tls))
    }

    /// One member, plain HTTP, run inside network namespace `netns` and
    /// listening on `host` (a URL host: `[2001:db8:f1ee::1]`) there, for
    /// gateways in other namespaces linked to it.
    ///
    /// # Panics
    ///
    /// As [`Etcd::single`].
    pub fn single_in(netns: &str, host: &str) -> Etcd {
        Etcd::start_with(1, None, Some(netns.to_owned()), host.to_owned())
    }

    fn start(n: usize, tls: Option<EtcdTls<'_>>) -> Etcd {
        Etcd::start_with(n, tls, None, "127.0.0.1".to_owned())
    }

    fn start_with(n: usize, tls: Option<EtcdTls<'_>>, netns: Option<String>, host: String) -> Etcd {
        let dir = TempDir::new("etcd");
        let token = format!("sg-{}-{}", std::process::id(), free_port());
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://{host}:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let (tls, client_identity) = match tls {
            Some(t) => {
                let identity = if t.client_cert_auth {
                    Some(client_certificate(t.pki, &dir, "root"))
                } else {
                    None
                };
                (
                    Some((
                        t.pki.ca_certificate.clone(),
                        t.pki.certificate.clone(),
                        t.pki.private_key.clone(),
                        t.client_cert_auth,
                    )),
                    identity,
                )
            }
            None => (None, None),
        };
        let mut etcd = Etcd {
            members,
            dir,
            cluster,
            token,
            tls,
            client_identity,
            netns,
            host,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        for i in 0..n {
            etcd.wait_ready(i);
        }
        etcd
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn spawn(&mut self, i: usize) {
        let scheme = self.scheme();
        let m = &self.members[i];
        let client = format!("{scheme}://{}:{}", self.host, m.client_port);
        let peer = format!("http://{}:{}", self.host, m.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))
            .expect("etcd log");
        let mut cmd = self.command("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.join(format!("{}.etcd", m.name)))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Small and quick: tests compact and elect on purpose.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--quota-backend-bytes", &(2u64 << 30).to_string()])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log);
        if let Some((ca, cert, key, client_auth)) = &self.tls {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca);
            if *client_auth {
                cmd.arg("--client-cert-auth");
            }
        }
        let child = cmd.spawn().expect("start etcd (package etcd-server)");
        self.members[i].child = Some(child);
    }

    fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + READY_LIMIT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(Some(status)) = self.members[i]
                .child
                .as_mut()
                .map(|c| c.try_wait().expect("wait"))
            {
                panic!("etcd member {i} exited ({status}):\n{}", self.log(i));
            }
            let out = self.etcdctl_at(&[self.endpoint(i)], &["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd member {i} did not come up ({last}):\n{}", self.log(i));
    }

    /// Member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.members[i].name)))
            .unwrap_or_default()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "{}://{}:{}",
            self.scheme(),
            self.host,
            self.members[i].client_port
        )
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The endpoints as a TOML array.
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!("[{}]", quoted.join(", "))
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory and waits until it
    /// answers (for a cluster member: once a quorum is up).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready(i);
    }

    /// Starts member `i` again without waiting.
    pub fn restart_nowait(&mut self, i: usize) {
        self.spawn(i);
    }

    /// The index of the current leader.
    ///
    /// # Panics
    ///
    /// When no live member names one.
    pub fn leader(&self) -> usize {
        let live: Vec<String> = (0..self.members.len())
            .filter(|i| self.members[*i].child.is_some())
            .map(|i| self.endpoint(i))
            .collect();
        let out = self.etcdctl_at(&live, &["endpoint", "status", "-w", "json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(&text).expect("endpoint status json");
        for s in v.as_array().expect("array") {
            let member = s["Status"]["header"]["member_id"].as_u64();
            let leader = s["Status"]["leader"].as_u64();
            if member.is_some() && member == leader {
                let ep = s["Endpoint"].as_str().expect("endpoint");
                return self
                    .endpoints()
                    .iter()
                    .position(|e| e == ep)
                    .expect("known endpoint");
            }
        }
        panic!("no leader: {text}");
    }

    /// Runs `etcdctl` (API v3) against every member.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let live: Vec<String> = (0..self.members.len())
            .filter(|i| self.members[*i].child.is_some())
            .map(|i| self.endpoint(i))
            .collect();
        self.etcdctl_at(&live, args)
    }

    /// Runs `etcdctl`, panicking with its output when it fails.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn etcdctl_at(&self, endpoints: &[String], args: &[&str]) -> Output {
        let mut cmd = self.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoints.join(","))
            .args(["--command-timeout", "5s", "--dial-timeout", "2s"]);
        if let Some((ca, _, _, _)) = &self.tls {
            cmd.arg("--cacert").arg(ca);
        }
        if let Some((cert, key)) = &self.client_identity {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::run_bounded(cmd, ETCDCTL_LIMIT).unwrap_or_else(|e| Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
            stdout: Vec::new(),
            stderr: e.into_bytes(),
        })
    }

    /// `program`, inside the namespace if there is one (`ip netns exec`
    /// execs it, so the child is the program itself).
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

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let text = self.etcdctl_ok(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("endpoint status json");
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("revision")
    }
}

/// A client certificate (clientAuth) for `common_name`, signed by the
/// PKI's CA, written into `dir`: (certificate, key).
pub fn client_certificate(pki: &TestPki, dir: &TempDir, common_name: &str) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let cert = pki.ca.issue(&[common_name], &key, |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    });
    (
        dir.write(format!("{common_name}.crt"), cert.pem()),
        dir.write(format!("{common_name}.key"), key.serialize_pem()),
    )
}
