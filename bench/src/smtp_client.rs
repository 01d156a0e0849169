//! The front door's load generator: tokio SMTP clients that greet and
//! quit, open idle (optionally TLS) sessions, do STARTTLS handshakes and
//! send 10 KB messages, plus a driver that runs N of them concurrently for
//! a fixed time and counts completions. Also the bench's certificates.

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use rustls_pki_types::ServerName;
use smtpguard::testing::TestPki;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tokio_rustls::{rustls::client::Resumption, TlsConnector};

/// The server name in the bench's certificate.
pub const SERVER_NAME: &str = "mx.bench.example";

/// The test PKI (a CA and a server certificate for [`SERVER_NAME`]) as
/// files for the servers, and a client configuration that trusts the CA.
pub struct Certs {
    /// Server certificate then CA certificate, PEM.
    pub chain: PathBuf,
    /// Server key, PKCS#8 PEM.
    pub key: PathBuf,
    /// Client side: trusts the CA, no session resumption (every handshake
    /// is a full one, for every server alike).
    pub connector: TlsConnector,
    /// Owns the files.
    _pki: TestPki,
}

impl Certs {
    /// Makes the certificates (in a temporary directory of their own).
    pub fn new() -> Certs {
        let pki = TestPki::new("smtpguard bench CA", &[SERVER_NAME]);
        let mut config = pki.ca.client_config();
        config.resumption = Resumption::disabled();
        Certs {
            chain: pki.chain.clone(),
            key: pki.private_key.clone(),
            connector: TlsConnector::from(Arc::new(config)),
            _pki: pki,
        }
    }
}

impl Default for Certs {
    fn default() -> Certs {
        Certs::new()
    }
}

/// Reads one SMTP reply (all its lines); returns its code.
async fn reply<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Result<u16> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            bail!("connection closed while waiting for a reply");
        }
        if line.len() < 4 {
            bail!("short reply line {line:?}");
        }
        if line.as_bytes()[3] != b'-' {
            return line[..3]
                .parse()
                .with_context(|| format!("bad reply {line:?}"));
        }
    }
}

/// Sends `command` and reads the reply, which must have code `want`.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    command: &[u8],
    want: u16,
) -> Result<()> {
    s.get_mut().write_all(command).await?;
    expect(s, want, command).await
}

async fn expect<S: AsyncRead + Unpin>(s: &mut BufReader<S>, want: u16, after: &[u8]) -> Result<()> {
    let code = reply(s).await?;
    if code != want {
        bail!(
            "got {code} after {:?}, expected {want}",
            String::from_utf8_lossy(after).trim()
        );
    }
    Ok(())
}

/// A session that has been greeted.
async fn greeted(addr: SocketAddr) -> Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    let mut s = BufReader::new(stream);
    expect(&mut s, 220, b"connect").await?;
    Ok(s)
}

/// Connect, read the greeting, QUIT, read 221, close.
pub async fn greet_and_quit(addr: SocketAddr) -> Result<u64> {
    let mut s = greeted(addr).await?;
    exchange(&mut s, b"QUIT\r\n", 221).await?;
    Ok(1)
}

/// An open session, plaintext or TLS, kept only to be held idle.
pub enum Held {
    /// After the greeting.
    Plain(BufReader<TcpStream>),
    /// After STARTTLS and the handshake.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connect, greeting, EHLO, STARTTLS, handshake.
pub async fn starttls(addr: SocketAddr, connector: &TlsConnector) -> Result<Held> {
    let mut s = greeted(addr).await?;
    exchange(&mut s, b"EHLO client.bench.example\r\n", 250).await?;
    exchange(&mut s, b"STARTTLS\r\n", 220).await?;
    if !s.buffer().is_empty() {
        bail!("server spoke after 220 to STARTTLS");
    }
    let name = ServerName::try_from(SERVER_NAME)?.to_owned();
    let tls = connector.connect(name, s.into_inner()).await?;
    Ok(Held::Tls(Box::new(tls)))
}

/// Opens a session and leaves it idle: greeted, or TLS established.
pub async fn open_idle(addr: SocketAddr, tls: Option<&TlsConnector>) -> Result<Held> {
    match tls {
        Some(connector) => starttls(addr, connector).await,
        None => Ok(Held::Plain(greeted(addr).await?)),
    }
}

/// 10 KB of message: headers, then 76-character lines.
pub fn message_10k() -> Vec<u8> {
    let mut m =
        b"From: <alice@example.org>\r\nTo: <bob@example.com>\r\nSubject: bench\r\n\r\n".to_vec();
    while m.len() < 10 * 1024 {
        m.extend_from_slice(&[b'x'; 76]);
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

/// One session that sends `message` back to back until `deadline`;
/// returns how many were accepted with 250.
pub async fn send_messages(
    addr: SocketAddr,
    message: Arc<Vec<u8>>,
    deadline: Instant,
) -> Result<u64> {
    let mut s = greeted(addr).await?;
    exchange(&mut s, b"EHLO client.bench.example\r\n", 250).await?;
    let mut sent = 0;
    while Instant::now() < deadline {
        exchange(&mut s, b"MAIL FROM:<alice@example.org>\r\n", 250).await?;
        exchange(&mut s, b"RCPT TO:<bob@example.com>\r\n", 250).await?;
        exchange(&mut s, b"DATA\r\n", 354).await?;
        exchange(&mut s, &message, 250).await?;
        sent += 1;
    }
    exchange(&mut s, b"QUIT\r\n", 221).await?;
    Ok(sent)
}

/// One unit of client work; returns how many things it completed.
pub type Work =
    Arc<dyn Fn(Instant) -> Pin<Box<dyn Future<Output = Result<u64>> + Send>> + Send + Sync>;

/// Runs `concurrency` loops of `work` until `seconds` are up; completions
/// per second. Fails if more than 1% of the work failed.
pub async fn rate(concurrency: usize, seconds: f64, work: Work) -> Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let last_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (work, done, failed, last_error) = (
                Arc::clone(&work),
                Arc::clone(&done),
                Arc::clone(&failed),
                Arc::clone(&last_error),
            );
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    match work(deadline).await {
                        Ok(n) => {
                            done.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            *last_error.lock().unwrap() = Some(format!("{e:#}"));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    if failed * 100 > done.max(1) {
        bail!(
            "{failed} failures beside {done} successes; last: {}",
            last_error.lock().unwrap().clone().unwrap_or_default()
        );
    }
    Ok(done as f64 / elapsed)
}

/// Opens `count` idle sessions, `parallel` at a time.
pub async fn open_many(
    addr: SocketAddr,
    count: usize,
    parallel: usize,
    tls: Option<TlsConnector>,
) -> Result<Vec<Held>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let sem = Arc::clone(&sem);
            let tls = tls.clone();
            tokio::spawn(async move {
                let _permit = sem.acquire_owned().await?;
                open_idle(addr, tls.as_ref()).await
            })
        })
        .collect();
    let mut held = Vec::with_capacity(count);
    for t in tasks {
        held.push(t.await??);
    }
    Ok(held)
}
