//! The SMTP front door end to end on loopback: real clients (Python
//! smtplib, swaks) and raw TCP clients for the edge cases, against
//! `front_door::run` with an in-memory hand-off.
//!
//! Every test is bounded by [`bounded`]; timing assertions measure elapsed
//! time, they never sleep to make a point. The deadline tests (idle
//! timeout, session cap, shutdown grace) run on tokio's paused clock, as
//! mini-redis's do: their clients' sleeps and the server's deadlines are
//! virtual time, so they take no wall-clock seconds.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::sync::RwLock;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use smtpguard::config::Config;
use smtpguard::front_door::{
    self, Access, AccessCheck, AllowAll, DenyReason, Rejection, ServerContext, ServerHandle,
    Settings,
};
use smtpguard::smtp::handoff::{ClientInfo, Handoff, HandoffFactory};
use smtpguard::smtp::{
    AcceptAll, Envelope, ForwardPath, MailParams, RcptPolicy, Reply, ReversePath, TlsMode,
};
use smtpguard::testing::{self, TestPki};

const HOST: &str = "mx.example.com";

/// Tests run concurrently in this process; the memory test measures the
/// process's RSS and so runs alone (write lock), the others share.
static SERIAL: RwLock<()> = RwLock::const_new(());

/// Every test body runs under this bound, sharing [`SERIAL`].
async fn bounded<F: Future<Output = ()>>(test: F) {
    install_log_capture();
    let _shared = SERIAL.read().await;
    testing::bounded(Duration::from_secs(60), test).await;
}

/// Captures the log lines of the current thread (the test's runtime runs
/// the server's tasks on it) until dropped.
///
/// One global subscriber, installed before any test body runs (see
/// [`bounded`]), writes each thread's lines to that thread's capture. A
/// per-test `set_default` would race: tests on paused time emit their
/// first events at once, and a callsite first seen on a thread without a
/// subscriber can be cached as uninteresting for every thread.
struct Logs {
    buf: Arc<Mutex<Vec<u8>>>,
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Arc<Mutex<Vec<u8>>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Writes to the current thread's capture, if any.
struct ThreadWriter;

impl std::io::Write for ThreadWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(buf) = &*c.borrow() {
                buf.lock().unwrap().extend_from_slice(data);
            }
        });
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the global subscriber (once per process).
fn install_log_capture() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| ThreadWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
}

impl Logs {
    fn capture() -> Logs {
        install_log_capture();
        let buf = Arc::new(Mutex::new(Vec::new()));
        CAPTURE.with(|c| *c.borrow_mut() = Some(Arc::clone(&buf)));
        Logs { buf }
    }

    /// The first captured line containing every one of `parts`.
    fn line_with(&self, parts: &[&str]) -> String {
        let text = String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned();
        text.lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .unwrap_or_else(|| panic!("no log line with {parts:?} in:\n{text}"))
            .to_string()
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        CAPTURE.with(|c| *c.borrow_mut() = None);
    }
}

// ----- the test hand-off ------------------------------------------------------

/// What the hand-off was given for one message.
#[derive(Debug, Clone)]
struct Delivered {
    client: ClientInfo,
    envelope: Envelope,
    data: Vec<u8>,
}

/// Records messages in memory. A message to `panic@example.com` makes the
/// session task panic (to test that its slot is released).
#[derive(Clone, Default)]
struct Recorder {
    delivered: Arc<Mutex<Vec<Delivered>>>,
}

impl Recorder {
    fn delivered(&self) -> Vec<Delivered> {
        self.delivered.lock().unwrap().clone()
    }
}

struct RecorderSession {
    delivered: Arc<Mutex<Vec<Delivered>>>,
}

impl HandoffFactory for Recorder {
    type Session = RecorderSession;
    fn session(&self, _client: IpAddr) -> RecorderSession {
        RecorderSession {
            delivered: Arc::clone(&self.delivered),
        }
    }
}

impl Handoff for RecorderSession {
    fn rcpt_policy(&self) -> Box<dyn RcptPolicy> {
        Box::new(AcceptAll)
    }
    async fn mail(&mut self, _: &ClientInfo, _: &ReversePath, _: &MailParams) -> Reply {
        Reply::sender_ok()
    }
    async fn rcpt(&mut self, _: &ClientInfo, _: &ForwardPath) -> Reply {
        Reply::recipient_ok()
    }
    async fn message(&mut self, client: &ClientInfo, envelope: &Envelope, data: &[u8]) -> Reply {
        if envelope
            .forward_paths
            .iter()
            .any(|p| p.to_string() == "<panic@example.com>")
        {
            panic!("injected hand-off panic");
        }
        let mut delivered = self.delivered.lock().unwrap();
        delivered.push(Delivered {
            client: client.clone(),
            envelope: envelope.clone(),
            data: data.to_vec(),
        });
        Reply::queued(&format!("T{}", delivered.len()))
    }
    async fn close(&mut self) {}
}

// ----- the server under test ----------------------------------------------------

/// Settings from a `[server]` table (plus `extra` keys), as the daemon
/// builds them.
fn settings(extra: &str) -> Settings {
    let toml = format!(
        "[server]\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:2525\"]\nshutdown_grace = \"1s\"\n{extra}\n"
    );
    let config = Config::from_toml_str(&toml, Path::new("front_door.toml")).unwrap();
    smtpguard::daemon::settings::front_door(&config.server, &config.tls)
}

struct TestServer {
    addr: SocketAddr,
    handle: ServerHandle,
    recorder: Recorder,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(
    settings: Settings,
    tls: Option<Arc<rustls::ServerConfig>>,
    access: Arc<dyn AccessCheck>,
) -> TestServer {
    start_on(IpAddr::from(Ipv4Addr::LOCALHOST), settings, tls, access).await
}

/// Like [`start`], listening on `ip` (an ephemeral port).
async fn start_on(
    ip: IpAddr,
    settings: Settings,
    tls: Option<Arc<rustls::ServerConfig>>,
    access: Arc<dyn AccessCheck>,
) -> TestServer {
    let listeners = front_door::bind(&[SocketAddr::new(ip, 0)]).unwrap();
    let addr = listeners[0].local_addr().unwrap();
    let recorder = Recorder::default();
    let ctx = ServerContext::new(settings, tls, access, recorder.clone());
    let handle = ctx.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(front_door::run(listeners, ctx, shutdown.clone()));
    TestServer {
        addr,
        handle,
        recorder,
        shutdown,
        task,
    }
}

async fn start_plain(extra: &str) -> TestServer {
    start(settings(extra), None, Arc::new(AllowAll)).await
}

impl TestServer {
    fn snapshot(&self) -> front_door::MetricsSnapshot {
        self.handle.metrics().snapshot()
    }

    /// Waits until the server has noticed that every client left.
    async fn wait_for_no_sessions(&self) {
        let metrics = self.handle.metrics();
        let waited = timeout(Duration::from_secs(10), async {
            while metrics.open_connections() != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "open-connection gauge stuck at {}",
            metrics.open_connections()
        );
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not stop")
            .unwrap();
    }
}

// ----- raw clients ----------------------------------------------------------------

/// A line-oriented SMTP client over any stream.
struct Client<S> {
    io: BufReader<S>,
}

async fn connect(addr: SocketAddr) -> Client<TcpStream> {
    Client {
        io: BufReader::new(TcpStream::connect(addr).await.unwrap()),
    }
}

impl<S: AsyncRead + Unpin> Client<S> {
    /// One complete reply (all its lines), or `None` at end of stream.
    async fn try_reply(&mut self) -> Option<String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = timeout(Duration::from_secs(10), self.io.read_line(&mut line))
                .await
                .expect("no reply within 10 s")
                .unwrap_or(0);
            if n == 0 {
                assert!(all.is_empty(), "connection closed mid-reply: {all:?}");
                return None;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(all);
            }
        }
    }

    async fn reply(&mut self) -> String {
        self.try_reply().await.expect("connection closed")
    }

    /// The server closes the connection (EOF or reset) without another word.
    async fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        let read = timeout(Duration::from_secs(10), self.io.read_to_end(&mut rest))
            .await
            .expect("connection not closed within 10 s");
        if read.is_ok() {
            assert!(
                rest.is_empty(),
                "unexpected bytes: {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn send(&mut self, text: &str) {
        self.io.get_mut().write_all(text.as_bytes()).await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }
}

fn assert_starts(reply: &str, prefix: &str) {
    assert!(
        reply.starts_with(prefix),
        "expected {prefix:?}, got {reply:?}"
    );
}

// ----- certificates -----------------------------------------------------------------

/// The test PKI (a CA, and a server certificate for `mx.example.com` and
/// 127.0.0.1), the server side loaded through `tls::load` like the daemon
/// does.
struct Pki {
    files: TestPki,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    let files = TestPki::new("smtpguard front door test CA", &[HOST, "127.0.0.1"]);
    let loaded = smtpguard::tls::load(&files.certificate, &files.private_key, None).unwrap();
    Pki {
        files,
        server: loaded.server_config,
    }
}

async fn tls_client(pki: &Pki, stream: TcpStream) -> tokio_rustls::client::TlsStream<TcpStream> {
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(pki.files.ca.client_config()))
        .connect(name, stream)
        .await
        .expect("client TLS handshake")
}

fn tls_settings(mode: TlsMode, extra: &str) -> Settings {
    let mut s = settings(extra);
    s.conn.session.tls_mode = mode;
    s
}

// ----- external clients ----------------------------------------------------------------

/// Runs a command to completion (bounded); returns stdout, panics with
/// stderr on failure.
async fn run_tool(cmd: &mut Command) -> String {
    let out = timeout(Duration::from_secs(30), cmd.kill_on_drop(true).output())
        .await
        .expect("client took longer than 30 s")
        .expect("cannot run the client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Debian's Python, the one `cargo xtask test` installs and probes.
const PYTHON: &str = "/usr/bin/python3";

async fn python(script: &str, args: &[&str]) -> String {
    run_tool(Command::new(PYTHON).arg("-c").arg(script).args(args)).await
}

async fn swaks(addr: SocketAddr, extra: &[&str]) -> String {
    run_tool(
        Command::new("swaks")
            .args([
                "--server",
                &addr.ip().to_string(),
                "--port",
                &addr.port().to_string(),
            ])
            .args([
                "--helo",
                "client.example.org",
                "--from",
                "swaks@example.org",
            ])
            .args(["--to", "rcpt@example.com", "--timeout", "10"])
            .args(extra),
    )
    .await
}

// ----- tests ------------------------------------------------------------------------------

/// swaks reaches an IPv6 listener (its IPv6 support is a Recommends that
/// `cargo xtask test` installs on its own: libio-socket-inet6-perl).
#[tokio::test]
async fn swaks_over_ipv6() {
    bounded(async {
        let srv = start_on(
            IpAddr::from(Ipv6Addr::LOCALHOST),
            settings(""),
            None,
            Arc::new(AllowAll),
        )
        .await;
        let out = swaks(srv.addr, &["--body", "over IPv6"]).await;
        assert!(out.contains("<-  250 2.0.0"), "{out}");
        let delivered = srv.recorder.delivered();
        assert_eq!(delivered.len(), 1);
        assert_eq!(
            delivered[0].client.peer.ip(),
            IpAddr::from(Ipv6Addr::LOCALHOST)
        );
        assert!(String::from_utf8_lossy(&delivered[0].data).contains("over IPv6"));
        srv.wait_for_no_sessions().await;
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn message_is_handed_off_with_its_envelope() {
    bounded(async {
        let srv = start_plain("").await;
        let port = srv.addr.port().to_string();
        let out = python(
            r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), local_hostname="client.example.org", timeout=10)
refused = s.sendmail("alice@example.org", ["bob@example.com", "carol@example.com"],
                     "From: alice@example.org\r\nSubject: front door\r\n\r\nHello, Bob.\r\n.dot line\r\n")
print("refused", refused)
s.quit()
"#,
            &[&port],
        )
        .await;
        assert!(out.contains("refused {}"), "{out}");
        swaks(srv.addr, &["--body", "from swaks"]).await;

        let delivered = srv.recorder.delivered();
        assert_eq!(delivered.len(), 2);
        let m = &delivered[0];
        assert_eq!(m.envelope.reverse_path.to_string(), "<alice@example.org>");
        let rcpts: Vec<String> = m.envelope.forward_paths.iter().map(|p| p.to_string()).collect();
        assert_eq!(rcpts, ["<bob@example.com>", "<carol@example.com>"]);
        let body = String::from_utf8_lossy(&m.data);
        assert!(body.contains("Subject: front door\r\n"), "{body}");
        assert!(body.contains("\r\n.dot line\r\n"), "dot-unstuffed: {body}");
        assert_eq!(m.client.peer.ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
        assert_eq!(m.client.local, srv.addr);
        assert_eq!(m.client.helo.as_deref(), Some("client.example.org"));
        assert!(m.client.esmtp);
        assert!(m.client.tls.is_none());
        assert!(!m.client.session_id.is_empty());
        let s = &delivered[1];
        assert_eq!(s.envelope.reverse_path.to_string(), "<swaks@example.org>");
        assert!(String::from_utf8_lossy(&s.data).contains("from swaks"));
        assert_ne!(m.client.session_id, s.client.session_id);

        srv.wait_for_no_sessions().await;
        let snap = srv.snapshot();
        assert_eq!(snap.messages_accepted, 2);
        assert_eq!(snap.greeted, 2);
        assert_eq!(snap.clients[&IpAddr::from(Ipv4Addr::LOCALHOST)].accepted, 2);
        serde_json::to_string(&snap).unwrap();
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn tls_required_then_mail_over_starttls() {
    bounded(async {
        let logs = Logs::capture();
        let pki = pki();
        let srv = start(
            tls_settings(TlsMode::Required, ""),
            Some(pki.server.clone()),
            Arc::new(AllowAll),
        )
        .await;
        let port = srv.addr.port().to_string();
        let out = python(
            r#"
import smtplib, ssl, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), local_hostname="client.example.org", timeout=10)
s.ehlo()
print("starttls offered", s.has_extn("starttls"))
code, msg = s.mail("alice@example.org")
print("before", code, msg.decode())
ctx = ssl.create_default_context(cafile=sys.argv[2])
s.starttls(context=ctx)
s.ehlo()
print("after", s.has_extn("starttls"))
s.sendmail("alice@example.org", ["bob@example.com"], "Subject: over TLS\r\n\r\nsecret\r\n")
s.quit()
"#,
            &[&port, pki.files.ca_certificate.to_str().unwrap()],
        )
        .await;
        assert!(out.contains("starttls offered True"), "{out}");
        assert!(
            out.contains("before 530 5.7.0 Must issue a STARTTLS command first"),
            "{out}"
        );
        assert!(
            out.contains("after False"),
            "STARTTLS not offered again: {out}"
        );

        let ca = pki.files.ca_certificate.to_str().unwrap();
        swaks(srv.addr, &["--tls", "--tls-verify", "--tls-ca-path", ca]).await;

        let delivered = srv.recorder.delivered();
        assert_eq!(delivered.len(), 2);
        for m in &delivered {
            let tls = m.client.tls.as_ref().expect("TLS info handed off");
            assert!(tls.version.starts_with("TLSv1."), "{tls:?}");
            assert!(tls.cipher.starts_with("TLS"), "{tls:?}");
        }
        let tls = delivered[0].client.tls.as_ref().unwrap();
        assert_eq!(tls.version, "TLSv1.3");
        assert!(tls.cipher.starts_with("TLS13_"), "{tls:?}");

        srv.wait_for_no_sessions().await;
        let snap = srv.snapshot();
        assert_eq!(snap.tls_handshakes_ok, 2);
        assert_eq!(snap.tls_handshakes_failed, 0);
        assert!(snap.rejected(Rejection::TlsRequired) >= 1);
        logs.line_with(&[
            "before STARTTLS",
            "client=127.0.0.1",
            "reason=\"tls_required\"",
        ]);
        drop(pki);
        srv.stop().await;
    })
    .await;
}

/// The cap of 3; the gauge returns to 0 after normal clients, clients that
/// reset mid-TLS-handshake and a session task that panics.
#[tokio::test]
async fn connection_cap_and_slots_always_released() {
    bounded(async {
        let logs = Logs::capture();
        let pki = pki();
        let srv = start(
            tls_settings(TlsMode::Optional, "max_connections = 3"),
            Some(pki.server.clone()),
            Arc::new(AllowAll),
        )
        .await;

        let mut clients = Vec::new();
        for _ in 0..3 {
            let mut c = connect(srv.addr).await;
            assert_starts(&c.reply().await, "220 mx.example.com ESMTP");
            clients.push(c);
        }
        let mut fourth = connect(srv.addr).await;
        assert_eq!(
            fourth.reply().await,
            "421 4.7.0 mx.example.com Error: too many connections, try again later\r\n"
        );
        fourth.expect_closed().await;
        logs.line_with(&[
            "connection refused",
            "client=127.0.0.1",
            "reason=\"connection_cap\"",
        ]);
        assert_eq!(srv.handle.metrics().open_connections(), 3);
        assert_eq!(srv.snapshot().rejected(Rejection::ConnectionCap), 1);

        assert_starts(&clients[0].cmd("QUIT").await, "221 2.0.0");
        drop(clients);
        srv.wait_for_no_sessions().await;

        // 10 clients that reset the connection in the middle of the TLS
        // handshake, 3 at a time.
        for batch in 0..4 {
            let mut resets = Vec::new();
            for _ in 0..(if batch < 3 { 3 } else { 1 }) {
                let mut c = connect(srv.addr).await;
                c.reply().await;
                assert_starts(
                    &c.cmd("EHLO client.example.org").await,
                    "250-mx.example.com",
                );
                assert_starts(&c.cmd("STARTTLS").await, "220 2.0.0");
                // Half a ClientHello record, then RST (SO_LINGER 0).
                let half_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
                c.io.get_mut().write_all(half_hello).await.unwrap();
                resets.push(c);
            }
            for c in resets {
                let stream = c.io.into_inner();
                stream.set_zero_linger().unwrap();
                drop(stream);
            }
            srv.wait_for_no_sessions().await;
        }
        let snap = srv.snapshot();
        assert_eq!(snap.tls_handshakes_failed, 10);
        assert_eq!(snap.open_connections, 0);

        // A panicking session task.
        let mut c = connect(srv.addr).await;
        c.reply().await;
        c.cmd("EHLO client.example.org").await;
        assert_starts(&c.cmd("MAIL FROM:<a@example.org>").await, "250 2.1.0");
        assert_starts(&c.cmd("RCPT TO:<panic@example.com>").await, "250 2.1.5");
        assert_starts(&c.cmd("DATA").await, "354");
        c.send("Subject: boom\r\n\r\nx\r\n.\r\n").await;
        c.expect_closed().await;
        srv.wait_for_no_sessions().await;
        assert_eq!(srv.snapshot().session_panics, 1);
        logs.line_with(&["session task panicked", "injected hand-off panic"]);

        // All three slots are free again.
        let mut again = Vec::new();
        for _ in 0..3 {
            let mut c = connect(srv.addr).await;
            assert_starts(&c.reply().await, "220 ");
            again.push(c);
        }
        drop(again);
        srv.wait_for_no_sessions().await;
        assert_eq!(srv.snapshot().rejected(Rejection::ConnectionCap), 1);
        drop(pki);
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn per_client_cap() {
    bounded(async {
        let logs = Logs::capture();
        let srv = start_plain("max_connections_per_client = 2").await;
        let mut a = connect(srv.addr).await;
        assert_starts(&a.reply().await, "220 ");
        let mut b = connect(srv.addr).await;
        assert_starts(&b.reply().await, "220 ");
        let mut c = connect(srv.addr).await;
        assert_eq!(
            c.reply().await,
            "421 4.7.0 mx.example.com Error: too many connections from 127.0.0.1, try again later\r\n"
        );
        c.expect_closed().await;
        logs.line_with(&["connection refused", "client=127.0.0.1", "reason=\"per_client_cap\""]);
        assert_eq!(
            srv.handle.open_by_client()[&IpAddr::from(Ipv4Addr::LOCALHOST)],
            2
        );

        assert_starts(&a.cmd("QUIT").await, "221 ");
        a.expect_closed().await;
        // Once the server has let go of `a`, there is room for one more.
        let metrics = srv.handle.metrics().clone();
        timeout(Duration::from_secs(10), async {
            while metrics.open_connections() != 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        let mut d = connect(srv.addr).await;
        assert_starts(&d.reply().await, "220 ");
        drop((b, d));
        srv.wait_for_no_sessions().await;
        let snap = srv.snapshot();
        assert_eq!(snap.rejected(Rejection::PerClientCap), 1);
        let local = snap.clients[&IpAddr::from(Ipv4Addr::LOCALHOST)];
        assert_eq!((local.accepted, local.rejected), (4, 1));
        assert!(srv.handle.open_by_client().is_empty());
        srv.stop().await;
    })
    .await;
}

#[tokio::test]
async fn access_denied_before_any_greeting() {
    bounded(async {
        let deny = |ip: IpAddr| Access::Deny {
            reason: DenyReason::DenyList,
            entry: Some(format!("{ip}/32")),
        };
        let logs = Logs::capture();
        let srv = start(settings(""), None, Arc::new(deny)).await;
        let mut c = connect(srv.addr).await;
        assert_eq!(c.reply().await, "554 5.7.1 127.0.0.1 Access denied\r\n");
        c.expect_closed().await;
        logs.line_with(&[
            "connection refused",
            "client=127.0.0.1",
            "reason=\"deny_list\"",
            "entry=\"127.0.0.1/32\"",
        ]);

        let out = python(
            r#"
import smtplib, sys
try:
    smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=10)
    print("connected")
except smtplib.SMTPConnectError as e:
    print("refused", e.smtp_code, e.smtp_error.decode())
"#,
            &[&srv.addr.port().to_string()],
        )
        .await;
        assert_eq!(out.trim(), "refused 554 5.7.1 127.0.0.1 Access denied");

        let snap = srv.snapshot();
        assert_eq!(snap.rejected(Rejection::DenyList), 2);
        // Refused connections are accepted at the socket, never greeted.
        assert_eq!((snap.accepted_at_socket, snap.greeted), (2, 0));
        assert_eq!(snap.open_connections, 0);
        let local = snap.clients[&IpAddr::from(Ipv4Addr::LOCALHOST)];
        assert_eq!((local.accepted, local.rejected), (2, 2));
        srv.stop().await;

        // Monitor mode: logged and counted, let in.
        let would = |_: IpAddr| Access::WouldDeny {
            reason: DenyReason::NotPermitted,
            entry: None,
        };
        let srv = start(settings(""), None, Arc::new(would)).await;
        let mut c = connect(srv.addr).await;
        assert_starts(&c.reply().await, "220 mx.example.com");
        assert_starts(&c.cmd("QUIT").await, "221 ");
        srv.wait_for_no_sessions().await;
        let snap = srv.snapshot();
        assert_eq!(
            (snap.would_deny, snap.rejected(Rejection::NotPermitted)),
            (1, 0)
        );
        logs.line_with(&["would deny", "client=127.0.0.1", "reason=\"not_permitted\""]);
        srv.stop().await;
    })
    .await;
}

/// Waits for the 421 timeout reply and the close; returns how long after
/// `since` the reply came.
async fn expect_timeout<S: AsyncRead + Unpin>(c: &mut Client<S>, since: Instant) -> Duration {
    assert_eq!(
        c.reply().await,
        "421 4.4.2 mx.example.com Error: timeout exceeded\r\n"
    );
    let elapsed = since.elapsed();
    c.expect_closed().await;
    elapsed
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_is_per_line_not_per_byte() {
    bounded(async {
        let logs = Logs::capture();
        let srv = start_plain(r#"idle_timeout = "2s""#).await;
        let window = Duration::from_millis(1900)..Duration::from_millis(3500);

        // Silent after the greeting.
        let mut c = connect(srv.addr).await;
        c.reply().await;
        let t = expect_timeout(&mut c, Instant::now()).await;
        assert!(window.contains(&t), "silent client cut after {t:?}");

        // One byte a second, never a line: cut like a silent client.
        let mut c = connect(srv.addr).await;
        c.reply().await;
        let start = Instant::now();
        let (read, mut write) = c.io.into_inner().into_split();
        let trickle = tokio::spawn(async move {
            for b in b"EHLO client.example.org".iter().cycle() {
                if write.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let mut c = Client {
            io: BufReader::new(read),
        };
        let t = {
            let reply = c.try_reply().await;
            assert_eq!(
                reply.as_deref(),
                Some("421 4.4.2 mx.example.com Error: timeout exceeded\r\n")
            );
            start.elapsed()
        };
        assert!(window.contains(&t), "trickling client cut after {t:?}");
        trickle.abort();

        // The same inside DATA.
        let mut c = connect(srv.addr).await;
        c.reply().await;
        c.cmd("EHLO client.example.org").await;
        c.cmd("MAIL FROM:<a@example.org>").await;
        c.cmd("RCPT TO:<b@example.com>").await;
        assert_starts(&c.cmd("DATA").await, "354");
        let start = Instant::now();
        for _ in 0..5 {
            c.send("x").await;
            if timeout(Duration::from_secs(1), c.io.fill_buf())
                .await
                .is_ok()
            {
                break;
            }
        }
        let t = expect_timeout(&mut c, start).await;
        assert!(window.contains(&t), "trickling DATA cut after {t:?}");

        // Complete lines do move the deadline: 4 s of NOOPs, one a second.
        let mut c = connect(srv.addr).await;
        c.reply().await;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(4) {
            assert_starts(&c.cmd("NOOP").await, "250 2.0.0");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_starts(&c.cmd("QUIT").await, "221 ");

        srv.wait_for_no_sessions().await;
        assert_eq!(srv.snapshot().rejected(Rejection::IdleTimeout), 3);
        logs.line_with(&[
            "closing session",
            "client=127.0.0.1",
            "reason=\"idle_timeout\"",
        ]);
        srv.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn session_duration_cap() {
    bounded(async {
        let mut s = settings(r#"idle_timeout = "2s""#);
        s.conn.max_session_duration = Duration::from_secs(3);
        let srv = start(s, None, Arc::new(AllowAll)).await;
        let start_at = Instant::now();
        let mut c = connect(srv.addr).await;
        c.reply().await;
        let reply = loop {
            c.send("NOOP\r\n").await;
            let r = c.reply().await;
            if !r.starts_with("250") {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let t = start_at.elapsed();
        assert_eq!(
            reply,
            "421 4.4.2 mx.example.com Error: timeout exceeded\r\n"
        );
        assert!(
            t >= Duration::from_millis(2900) && t < Duration::from_secs(5),
            "{t:?}"
        );
        c.expect_closed().await;
        srv.wait_for_no_sessions().await;
        assert_eq!(srv.snapshot().rejected(Rejection::SessionTimeout), 1);
        srv.stop().await;
    })
    .await;
}

/// CVE-2011-0411: a command pipelined behind STARTTLS in the same packet
/// must be thrown away, not answered (in plaintext or after the handshake).
#[tokio::test]
async fn starttls_command_injection() {
    bounded(async {
        let pki = pki();
        let srv = start(
            tls_settings(TlsMode::Optional, ""),
            Some(pki.server.clone()),
            Arc::new(AllowAll),
        )
        .await;
        let mut c = connect(srv.addr).await;
        c.reply().await;
        assert_starts(
            &c.cmd("EHLO client.example.org").await,
            "250-mx.example.com",
        );
        c.send("STARTTLS\r\nMAIL FROM:<a@example.com>\r\n").await;
        assert_eq!(c.reply().await, "220 2.0.0 Ready to start TLS\r\n");
        assert!(c.io.buffer().is_empty(), "nothing after the 220");
        // Had the server answered the MAIL in plaintext, those bytes would
        // break the handshake.
        let tls = tls_client(&pki, c.io.into_inner()).await;
        let mut c = Client {
            io: BufReader::new(tls),
        };
        let ehlo = c.cmd("EHLO client.example.org").await;
        assert_starts(&ehlo, "250-mx.example.com");
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
        // No transaction was started by the injected MAIL.
        assert_starts(&c.cmd("RCPT TO:<b@example.com>").await, "503 5.5.1");
        assert_starts(&c.cmd("MAIL FROM:<a@example.com>").await, "250 2.1.0");
        assert_starts(&c.cmd("QUIT").await, "221 ");
        drop(c);
        srv.wait_for_no_sessions().await;
        assert!(srv.recorder.delivered().is_empty());
        drop(pki);
        srv.stop().await;
    })
    .await;
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    pages * page
}

/// A 10 MiB line without CRLF: refused with 500 5.5.2 once it ends, the
/// session goes on, and the process's memory does not grow with it.
#[tokio::test]
async fn ten_mib_line_keeps_memory_bounded() {
    install_log_capture();
    let _alone = SERIAL.write().await;
    timeout(Duration::from_secs(60), async {
        let srv = start_plain("").await;
        // Warm up: one ordinary session first.
        let mut c = connect(srv.addr).await;
        c.reply().await;
        c.cmd("EHLO client.example.org").await;
        let before = rss_bytes();

        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..160 {
            c.io.get_mut().write_all(&chunk).await.unwrap();
        }
        let during = rss_bytes();
        let reply = c.cmd("").await;
        assert_eq!(reply, "500 5.5.2 Error: line too long\r\n");
        assert_starts(&c.cmd("NOOP").await, "250 2.0.0");
        let after = rss_bytes();
        assert_starts(&c.cmd("QUIT").await, "221 ");
        let grown = during.max(after).saturating_sub(before);
        assert!(
            grown < 4 * 1024 * 1024,
            "RSS grew by {grown} bytes ({before} -> {during} -> {after})"
        );
        srv.stop().await;
    })
    .await
    .expect("test took longer than 60 s");
}

#[tokio::test]
async fn bare_lf_in_data_is_refused() {
    bounded(async {
        let srv = start_plain("").await;
        let mut c = connect(srv.addr).await;
        c.reply().await;
        c.cmd("EHLO client.example.org").await;
        c.cmd("MAIL FROM:<a@example.org>").await;
        c.cmd("RCPT TO:<b@example.com>").await;
        assert_starts(&c.cmd("DATA").await, "354");
        c.send("Subject: smuggle\r\n\r\nline\n.\nMAIL FROM:<x@example.org>\r\n.\r\n")
            .await;
        assert_starts(&c.reply().await, "550 5.5.2");
        assert_starts(&c.cmd("QUIT").await, "221 ");
        assert!(srv.recorder.delivered().is_empty());
        srv.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_idle_sessions_after_the_grace() {
    bounded(async {
        let mut s = settings(r#"idle_timeout = "30s""#);
        s.shutdown_grace = Duration::from_secs(2);
        let srv = start(s, None, Arc::new(AllowAll)).await;
        let mut c = connect(srv.addr).await;
        c.reply().await;
        c.cmd("EHLO client.example.org").await;

        let start_at = Instant::now();
        srv.shutdown.cancel();
        // New connections are refused at once (well before the grace ends).
        timeout(Duration::from_secs(1), async {
            while TcpStream::connect(srv.addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("still accepting after shutdown");

        assert_eq!(
            c.reply().await,
            "421 4.3.2 mx.example.com Service shutting down\r\n"
        );
        let t = start_at.elapsed();
        assert!(
            t >= Duration::from_millis(1900),
            "421 came after {t:?}, before the grace"
        );
        c.expect_closed().await;
        timeout(Duration::from_secs(5), srv.task)
            .await
            .expect("run did not return")
            .unwrap();
        assert_eq!(srv.handle.metrics().open_connections(), 0);
    })
    .await;
}

#[tokio::test]
async fn kick_closes_sessions_of_a_denied_address() {
    bounded(async {
        let logs = Logs::capture();
        let srv = start_plain("").await;
        let mut c = connect(srv.addr).await;
        c.reply().await;
        c.cmd("EHLO client.example.org").await;
        assert_eq!(srv.handle.kick(|ip| ip == IpAddr::from([192, 0, 2, 1])), 0);
        assert_eq!(srv.handle.kick(|ip| ip.is_loopback()), 1);
        assert_eq!(
            c.reply().await,
            "421 4.7.1 mx.example.com Closing: your address was denied\r\n"
        );
        c.expect_closed().await;
        srv.wait_for_no_sessions().await;
        // Counted apart from an operator's `kick` (421 4.7.0).
        assert_eq!(srv.snapshot().rejected(Rejection::Denied), 1);
        assert_eq!(srv.snapshot().rejected(Rejection::Kicked), 0);
        logs.line_with(&["closing session", "client=127.0.0.1", "reason=\"denied\""]);
        srv.stop().await;
    })
    .await;
}

#[test]
fn caps_from_the_configuration() {
    // `max_connections = "unlimited"` reaches the server as None.
    let s = settings(r#"max_connections = "unlimited""#);
    assert_eq!(s.max_connections, None);
    let s = settings("max_connections_per_client = 5");
    assert_eq!(s.max_connections_per_client, NonZeroUsize::new(5));
}
