//! Loading the STARTTLS certificate and key into a rustls server
//! configuration, refusing unusable files with messages an operator can act
//! on.
//!
//! [`load`] reads three PEM files (the paths of [`crate::config::TlsFiles`]):
//!
//! - the **certificate** file: the server's own certificate first, then
//!   optionally its intermediates. All of it is sent to clients.
//! - the **private key** file: exactly one unencrypted key, PKCS#1
//!   (`RSA PRIVATE KEY`), PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`);
//!   RSA of 2048 bits or more, ECDSA P-256 or P-384, or Ed25519.
//! - the optional **CA certificate** file: appended to the chain sent to
//!   clients, as the appliance did (certificates already in the chain are
//!   not sent twice). It is not used to verify anyone: clients do not
//!   authenticate with certificates.
//!
//! It checks that the key matches the first certificate (their
//! SubjectPublicKeyInfo must be equal) and that the first certificate is
//! valid now, and builds a [`ServerConfig`] for TLS 1.3 (RFC 8446) and
//! TLS 1.2 (RFC 5246) with rustls' *ring* provider and its default cipher
//! suites (AEAD only, forward secrecy only), no client authentication and
//! no ALPN (SMTP has none). Peers that only speak TLS 1.0/1.1 or CBC suites
//! fail the handshake (an opportunistic sender may then retry without TLS).
//!
//! Nothing here logs: warnings (a certificate about to expire) come back in
//! [`LoadedTls::warnings`] for the caller to log and show in status.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls_pki_types::{
    pem::{self, PemObject, SectionKind},
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};
use tokio_rustls::rustls::{
    self,
    crypto::{ring, CryptoProvider},
    sign::{CertifiedKey, SingleCertAndKey},
    InconsistentKeys, ServerConfig,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

/// The largest certificate, CA certificate or key file read, in bytes
/// (1 MiB: a long chain is a few tens of KiB).
pub const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

/// A certificate that expires within this many days loads with a
/// [`TlsWarning::ExpiresSoon`].
pub const EXPIRY_WARNING_DAYS: i64 = 14;

const SECONDS_PER_DAY: i64 = 24 * 60 * 60;

/// Which of the three files a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemFile {
    /// `tls.certificate`: the server certificate and its chain.
    Certificate,
    /// `tls.private_key`.
    PrivateKey,
    /// `tls.ca_certificate`.
    CaCertificate,
}

impl fmt::Display for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PemFile::Certificate => "certificate",
            PemFile::PrivateKey => "private key",
            PemFile::CaCertificate => "CA certificate",
        })
    }
}

/// Why the certificate and key cannot be used. Every message names the
/// file; an underlying error (I/O, PEM, X.509, rustls) is the
/// [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("cannot read {file} file {path}")]
    Read {
        /// Which file.
        file: PemFile,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A path that is not a regular file (a FIFO, a device such as
    /// `/dev/zero`, a socket): refused before anything is read from it.
    #[error("{file} file {path} is not a regular file")]
    NotARegularFile {
        /// Which file.
        file: PemFile,
        /// Its path.
        path: PathBuf,
    },
    /// A file larger than [`MAX_PEM_FILE_BYTES`].
    #[error("{file} file {path} is larger than {MAX_PEM_FILE_BYTES} bytes")]
    TooLarge {
        /// Which file.
        file: PemFile,
        /// Its path.
        path: PathBuf,
    },
    /// A file is not valid PEM (a broken header or footer, bad base64).
    #[error("{file} file {path} is not valid PEM")]
    Pem {
        /// Which file.
        file: PemFile,
        /// Its path.
        path: PathBuf,
        /// What the PEM parser found.
        #[source]
        source: pem::Error,
    },
    /// A certificate or CA certificate file has no `CERTIFICATE` section.
    #[error(
        "no PEM certificate in {path}{}",
        hint(*.holds_private_key, " (it holds a private key: are the certificate and key files swapped?)")
    )]
    NoCertificate {
        /// Which file.
        file: PemFile,
        /// Its path.
        path: PathBuf,
        /// The file has a private key instead.
        holds_private_key: bool,
    },
    /// The private key file has no private key section.
    #[error(
        "no PEM private key in {path}{}",
        hint(*.holds_certificate, " (it holds certificates: are the certificate and key files swapped?)")
    )]
    NoPrivateKey {
        /// Its path.
        path: PathBuf,
        /// The file has certificates instead.
        holds_certificate: bool,
    },
    /// The private key file has more than one key.
    #[error("{path} holds {count} private keys; keep only the server's")]
    SeveralPrivateKeys {
        /// Its path.
        path: PathBuf,
        /// How many.
        count: usize,
    },
    /// The private key is encrypted (`ENCRYPTED PRIVATE KEY`, or a
    /// `Proc-Type: 4,ENCRYPTED` header).
    #[error(
        "private key in {path} is encrypted; smtpguard cannot prompt for a passphrase: \
         decrypt it with `openssl pkey -in {path} -out {path}.decrypted`"
    )]
    EncryptedPrivateKey {
        /// Its path.
        path: PathBuf,
    },
    /// The private key parses as PEM but no supported key is inside.
    #[error(
        "private key in {path} cannot be used: smtpguard supports RSA (2048 bits or more), \
         ECDSA P-256 and P-384, and Ed25519 keys"
    )]
    UnsupportedPrivateKey {
        /// Its path.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// A `CERTIFICATE` section is not an X.509 certificate.
    #[error("certificate {index} in {path} is not a valid X.509 certificate")]
    BadCertificate {
        /// Which file.
        file: PemFile,
        /// Its path.
        path: PathBuf,
        /// Position in the file, counting from 1.
        index: usize,
        /// What the X.509 parser found.
        #[source]
        source: x509_parser::error::X509Error,
    },
    /// rustls refuses the server certificate although it parses.
    #[error("certificate in {path} cannot be used")]
    UnusableCertificate {
        /// Its path.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The key's public key is not the one in the first certificate.
    #[error(
        "private key in {key} does not match the certificate in {certificate} \
         (the server's own certificate must come first in the file)"
    )]
    KeyMismatch {
        /// The private key file.
        key: PathBuf,
        /// The certificate file.
        certificate: PathBuf,
    },
    /// The server certificate's notAfter has passed.
    #[error("certificate in {path} expired on {}", crate::time::utc(*.not_after_unix))]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// Its notAfter, in seconds since the Unix epoch.
        not_after_unix: i64,
    },
    /// The server certificate's notBefore has not come yet.
    #[error(
        "certificate in {path} is not valid before {} (is the clock right?)",
        crate::time::utc(*.not_before_unix)
    )]
    NotYetValid {
        /// The certificate file.
        path: PathBuf,
        /// Its notBefore, in seconds since the Unix epoch.
        not_before_unix: i64,
    },
    /// rustls could not build the configuration (should not happen with the
    /// fixed settings used here).
    #[error("cannot build the TLS server configuration")]
    Config {
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
}

/// `text` if `show`, else nothing: optional advice in a message.
fn hint(show: bool, text: &'static str) -> &'static str {
    if show {
        text
    } else {
        ""
    }
}

/// Something the operator should act on that does not stop TLS working.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsWarning {
    /// A certificate that is sent expires within [`EXPIRY_WARNING_DAYS`].
    ExpiresSoon {
        /// The file it is in.
        path: PathBuf,
        /// Its subject, written like [`CertificateFacts::subject`].
        subject: String,
        /// Its notAfter, in seconds since the Unix epoch.
        not_after_unix: i64,
        /// Whole days left (0 when less than a day is left).
        days: i64,
    },
    /// An intermediate or CA certificate in the chain sent has expired.
    /// Clients may or may not reject the chain, depending on the path
    /// they build.
    ChainCertificateExpired {
        /// The file it is in.
        path: PathBuf,
        /// Its subject, written like [`CertificateFacts::subject`].
        subject: String,
        /// Its notAfter, in seconds since the Unix epoch.
        not_after_unix: i64,
    },
}

impl fmt::Display for TlsWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsWarning::ExpiresSoon {
                path,
                subject,
                not_after_unix,
                days,
            } => {
                let when = match days {
                    0 => "within a day".to_owned(),
                    1 => "in 1 day".to_owned(),
                    n => format!("in {n} days"),
                };
                write!(
                    f,
                    "certificate {subject:?} in {} expires {when}, on {}; renew it",
                    path.display(),
                    crate::time::utc(*not_after_unix)
                )
            }
            TlsWarning::ChainCertificateExpired {
                path,
                subject,
                not_after_unix,
            } => write!(
                f,
                "certificate {subject:?} in {} expired on {}; clients may refuse the chain",
                path.display(),
                crate::time::utc(*not_after_unix)
            ),
        }
    }
}

/// Facts about the server's own certificate, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Subject distinguished name: `TYPE=value` attributes in certificate
    /// order, joined by `, ` (`CN=mail.example.com, O=Example`).
    pub subject: String,
    /// Issuer distinguished name, written like `subject`.
    pub issuer: String,
    /// DNS names of the subjectAltName extension, in order.
    pub dns_names: Vec<String>,
    /// notBefore, in seconds since the Unix epoch (negative before 1970).
    pub not_before_unix: i64,
    /// notAfter, in seconds since the Unix epoch.
    pub not_after_unix: i64,
}

impl CertificateFacts {
    /// notBefore as a [`SystemTime`].
    pub fn not_before(&self) -> SystemTime {
        system_time(self.not_before_unix)
    }

    /// notAfter as a [`SystemTime`].
    pub fn not_after(&self) -> SystemTime {
        system_time(self.not_after_unix)
    }

    /// Whole days from `now` until notAfter, rounded down; negative once
    /// expired (`-1` during the first day after).
    pub fn days_until_expiry(&self, now: SystemTime) -> i64 {
        (self.not_after_unix - unix_seconds(now)).div_euclid(SECONDS_PER_DAY)
    }
}

/// A usable certificate and key: what [`load`] returns.
#[derive(Debug, Clone)]
pub struct LoadedTls {
    /// For `tokio_rustls::TlsAcceptor::from`: TLS 1.3 and 1.2, ring
    /// provider, no client authentication, no ALPN.
    pub server_config: Arc<ServerConfig>,
    /// The server's own certificate.
    pub certificate: CertificateFacts,
    /// Certificates sent to clients: the certificate file's, then the CA
    /// file's that were not already among them.
    pub chain_len: usize,
    /// Problems that do not stop TLS working; log them.
    pub warnings: Vec<TlsWarning>,
}

/// Reads and checks the server certificate (chain), its private key and the
/// optional CA certificate file, and builds the rustls server configuration.
///
/// The certificate must be valid at the current system time; see the module
/// documentation for what the files may contain.
///
/// # Errors
///
/// A [`TlsError`] naming the file when a file is missing or unreadable, is
/// not PEM, holds no certificate or no (or several) private keys, the key is
/// encrypted or of an unsupported kind, the key does not match the first
/// certificate, or that certificate has expired or is not yet valid.
pub fn load(
    certificate: &Path,
    private_key: &Path,
    ca_certificate: Option<&Path>,
) -> Result<LoadedTls, TlsError> {
    load_at(certificate, private_key, ca_certificate, SystemTime::now())
}

/// [`load`], judging validity at `now` instead of the current time (for
/// tests, and for checking ahead of time).
///
/// # Errors
///
/// As [`load`].
pub fn load_at(
    certificate: &Path,
    private_key: &Path,
    ca_certificate: Option<&Path>,
    now: SystemTime,
) -> Result<LoadedTls, TlsError> {
    let now = unix_seconds(now);
    let (chain, origins) = read_chain(certificate, ca_certificate)?;
    let key = read_private_key(private_key)?;
    let (facts, warnings) = inspect(&chain, &origins, now)?;
    let chain_len = chain.len();

    // A key that does not belong to the certificate says the files are the
    // wrong ones altogether, so it is reported before the dates.
    let provider = Arc::new(ring::default_provider());
    let certified = certified_key(chain, key, certificate, private_key, &provider)?;
    if now < facts.not_before_unix {
        return Err(TlsError::NotYetValid {
            path: certificate.to_owned(),
            not_before_unix: facts.not_before_unix,
        });
    }
    if now > facts.not_after_unix {
        return Err(TlsError::Expired {
            path: certificate.to_owned(),
            not_after_unix: facts.not_after_unix,
        });
    }

    let server_config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Config { source })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));

    Ok(LoadedTls {
        server_config: Arc::new(server_config),
        certificate: facts,
        chain_len,
        warnings,
    })
}

/// Where a certificate in the chain sent came from.
struct Origin<'a> {
    file: PemFile,
    path: &'a Path,
    /// Position in the file, counting from 1.
    index: usize,
}

/// The chain to send: the certificate file's certificates, then the CA
/// file's that are not among them yet; with where each came from.
fn read_chain<'a>(
    certificate: &'a Path,
    ca_certificate: Option<&'a Path>,
) -> Result<(Vec<CertificateDer<'static>>, Vec<Origin<'a>>), TlsError> {
    let mut chain = read_certificates(PemFile::Certificate, certificate)?;
    let mut origins: Vec<Origin<'a>> = (1..=chain.len())
        .map(|index| Origin {
            file: PemFile::Certificate,
            path: certificate,
            index,
        })
        .collect();
    if let Some(ca_path) = ca_certificate {
        let ca_chain = read_certificates(PemFile::CaCertificate, ca_path)?;
        for (i, cert) in ca_chain.into_iter().enumerate() {
            if !chain.contains(&cert) {
                chain.push(cert);
                origins.push(Origin {
                    file: PemFile::CaCertificate,
                    path: ca_path,
                    index: i + 1,
                });
            }
        }
    }
    Ok((chain, origins))
}

/// Parses every certificate sent (so that garbage is reported by file and
/// position, not by a client failing the handshake), and returns the facts
/// of the first and warnings about the dates of all.
fn inspect(
    chain: &[CertificateDer<'static>],
    origins: &[Origin<'_>],
    now: i64,
) -> Result<(CertificateFacts, Vec<TlsWarning>), TlsError> {
    let mut leaf_facts = None;
    let mut warnings = Vec::new();
    for (der, origin) in chain.iter().zip(origins) {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| {
            TlsError::BadCertificate {
                file: origin.file,
                path: origin.path.to_owned(),
                index: origin.index,
                source: match e {
                    x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
                    x509_parser::nom::Err::Incomplete(_) => {
                        x509_parser::error::X509Error::InvalidCertificate
                    }
                },
            }
        })?;
        let not_after_unix = cert.validity().not_after.timestamp();
        let is_leaf = leaf_facts.is_none();
        if is_leaf {
            leaf_facts = Some(facts(&cert));
        }
        // The leaf's own expiry is an error, reported by the caller.
        if now > not_after_unix && !is_leaf {
            warnings.push(TlsWarning::ChainCertificateExpired {
                path: origin.path.to_owned(),
                subject: cert.subject().to_string(),
                not_after_unix,
            });
        } else if (0..EXPIRY_WARNING_DAYS * SECONDS_PER_DAY).contains(&(not_after_unix - now)) {
            warnings.push(TlsWarning::ExpiresSoon {
                path: origin.path.to_owned(),
                subject: cert.subject().to_string(),
                not_after_unix,
                days: (not_after_unix - now) / SECONDS_PER_DAY,
            });
        }
    }
    let facts = leaf_facts.expect("read_certificates returns at least one certificate");
    Ok((facts, warnings))
}

/// The chain with its signing key, once the key is known to be usable and
/// to belong to the first certificate.
fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    certificate: &Path,
    private_key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::UnsupportedPrivateKey {
            path: private_key.to_owned(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Unknown: the key cannot tell its public key. ring's keys always
        // can, and rustls itself accepts such keys.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                key: private_key.to_owned(),
                certificate: certificate.to_owned(),
            })
        }
        Err(source) => Err(TlsError::UnusableCertificate {
            path: certificate.to_owned(),
            source,
        }),
    }
}

fn facts(cert: &X509Certificate<'_>) -> CertificateFacts {
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    CertificateFacts {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        dns_names,
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
    }
}

/// Reads a regular file of at most [`MAX_PEM_FILE_BYTES`]
/// ([`crate::files::read_regular`]: no device, FIFO or huge file).
fn read(file: PemFile, path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::files::read_regular(path, MAX_PEM_FILE_BYTES).map_err(|source| match source.kind() {
        io::ErrorKind::InvalidInput => TlsError::NotARegularFile {
            file,
            path: path.to_owned(),
        },
        io::ErrorKind::FileTooLarge => TlsError::TooLarge {
            file,
            path: path.to_owned(),
        },
        _ => TlsError::Read {
            file,
            path: path.to_owned(),
            source,
        },
    })
}

/// Every PEM section of `bytes`, in order, including kinds we do not use.
fn sections(
    file: PemFile,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            file,
            path: path.to_owned(),
            source,
        })
}

fn is_private_key(kind: SectionKind) -> bool {
    matches!(
        kind,
        SectionKind::RsaPrivateKey | SectionKind::PrivateKey | SectionKind::EcPrivateKey
    )
}

fn read_certificates(file: PemFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let sections = sections(file, path, &read(file, path)?)?;
    let holds_private_key = sections.iter().any(|(kind, _)| is_private_key(*kind));
    let certificates: Vec<CertificateDer<'static>> = sections
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            file,
            path: path.to_owned(),
            holds_private_key,
        });
    }
    Ok(certificates)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(PemFile::PrivateKey, path)?;
    // Before PEM parsing: a legacy encrypted key's Proc-Type and DEK-Info
    // headers are not base64, so the parser would call it broken.
    if contains(&bytes, b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || contains(&bytes, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(TlsError::EncryptedPrivateKey {
            path: path.to_owned(),
        });
    }
    let sections = sections(PemFile::PrivateKey, path, &bytes)?;
    let holds_certificate = sections
        .iter()
        .any(|(kind, _)| *kind == SectionKind::Certificate);
    let mut keys: Vec<PrivateKeyDer<'static>> = sections
        .into_iter()
        .filter_map(|(kind, der)| match kind {
            SectionKind::RsaPrivateKey => Some(PrivatePkcs1KeyDer::from(der).into()),
            SectionKind::PrivateKey => Some(PrivatePkcs8KeyDer::from(der).into()),
            SectionKind::EcPrivateKey => Some(PrivateSec1KeyDer::from(der).into()),
            _ => None,
        })
        .collect();
    match keys.len() {
        0 => Err(TlsError::NoPrivateKey {
            path: path.to_owned(),
            holds_certificate,
        }),
        1 => Ok(keys.remove(0)),
        count => Err(TlsError::SeveralPrivateKeys {
            path: path.to_owned(),
            count,
        }),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

fn system_time(unix: i64) -> SystemTime {
    let magnitude = Duration::from_secs(unix.unsigned_abs());
    if unix >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::fs;

    use rcgen::{CertificateParams, KeyPair, SignatureAlgorithm};
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::testing::{TempDir, TestCa};

    const HOST: &str = "mail.example.test";

    /// Private keys in the PEM variants the loader tells apart, made once
    /// with openssl (see testdata/tls/README.md): ring cannot generate RSA
    /// or P-521 keys, and unit tests do not run openssl.
    mod keys {
        pub const RSA2048_PKCS8: &str = include_str!("../testdata/tls/rsa2048.pkcs8.pem");
        pub const RSA2048_PKCS1: &str = include_str!("../testdata/tls/rsa2048.pkcs1.pem");
        pub const P256_PKCS8: &str = include_str!("../testdata/tls/p256.pkcs8.pem");
        pub const P256_SEC1: &str = include_str!("../testdata/tls/p256.sec1.pem");
        pub const P256_ENCRYPTED_PKCS8: &str =
            include_str!("../testdata/tls/p256.encrypted-pkcs8.pem");
        pub const P256_ENCRYPTED_SEC1: &str =
            include_str!("../testdata/tls/p256.encrypted-sec1.pem");
        pub const P521_PKCS8: &str = include_str!("../testdata/tls/p521.pkcs8.pem");
        pub const RSA1024_PKCS8: &str = include_str!("../testdata/tls/rsa1024.pkcs8.pem");
    }

    fn generate(alg: &'static SignatureAlgorithm) -> KeyPair {
        KeyPair::generate_for(alg).unwrap()
    }

    fn root() -> TestCa {
        TestCa::new("smtpguard test root")
    }

    fn intermediate(root: &TestCa, adjust: impl FnOnce(&mut CertificateParams)) -> TestCa {
        root.intermediate("smtpguard test intermediate", adjust)
    }

    fn leaf(
        issuer: &TestCa,
        key: &KeyPair,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> rcgen::Certificate {
        issuer.issue(&[HOST], key, adjust)
    }

    /// A root, and in `dir` a P-256 leaf signed by it (`server.crt`) with
    /// its key (`server.key`).
    fn simple(dir: &TempDir) -> (TestCa, PathBuf, PathBuf) {
        let root = root();
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256);
        let cert = dir.write("server.crt", leaf(&root, &key, |_| {}).pem());
        let key = dir.write("server.key", key.serialize_pem());
        (root, cert, key)
    }

    fn error(result: Result<LoadedTls, TlsError>) -> TlsError {
        result.expect_err("loaded")
    }

    /// STARTTLS in miniature: a rustls client trusting only `root` does a
    /// handshake with `loaded` over an in-memory pipe, restricted to
    /// `version`, and exchanges a line each way. Returns the certificates
    /// the client received.
    async fn handshake(
        loaded: &LoadedTls,
        root: &rcgen::Certificate,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> usize {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.der().clone()).unwrap();
        let client_config =
            rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(loaded.server_config.clone());
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(server_io).await.expect("server handshake");
            let mut line = [0u8; 16];
            tls.read_exact(&mut line).await.unwrap();
            assert_eq!(&line, b"EHLO client.test");
            tls.write_all(b"250 mail\r\n").await.unwrap();
            tls.flush().await.unwrap();
            tls.get_ref().1.protocol_version()
        });
        let connector = TlsConnector::from(Arc::new(client_config));
        let name = ServerName::try_from(HOST).unwrap();
        let mut tls = connector
            .connect(name, client_io)
            .await
            .expect("client handshake");
        tls.write_all(b"EHLO client.test").await.unwrap();
        tls.flush().await.unwrap();
        let mut reply = [0u8; 10];
        tls.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"250 mail\r\n");
        let (_, connection) = tls.get_ref();
        assert_eq!(connection.protocol_version(), Some(version.version));
        assert_eq!(server.await.unwrap(), Some(version.version));
        connection.peer_certificates().unwrap().len()
    }

    async fn handshake_both_versions(loaded: &LoadedTls, root: &rcgen::Certificate) {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            assert_eq!(handshake(loaded, root, version).await, loaded.chain_len);
        }
    }

    #[tokio::test]
    async fn chain_and_ca_are_sent_and_clients_trusting_the_root_connect() {
        let dir = TempDir::new("tls");
        let root = root();
        let intermediate = intermediate(&root, |_| {});
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256);
        let leaf = leaf(&intermediate, &key, |p| {
            p.not_before = rcgen::date_time_ymd(2024, 1, 1);
            p.not_after = rcgen::date_time_ymd(2099, 12, 31);
        });
        let cert = dir.write(
            "fullchain.crt",
            format!("{}{}", leaf.pem(), intermediate.certificate.pem()),
        );
        let key = dir.write("server.key", key.serialize_pem());
        let ca = dir.write("ca.crt", root.certificate.pem());

        let loaded = load(&cert, &key, Some(&ca)).unwrap();
        assert_eq!(loaded.chain_len, 3);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert!(loaded.server_config.alpn_protocols.is_empty());
        let facts = &loaded.certificate;
        assert_eq!(facts.subject, "CN=mail.example.test");
        assert_eq!(facts.issuer, "CN=smtpguard test intermediate");
        assert_eq!(facts.dns_names, vec![HOST.to_owned()]);
        assert_eq!(facts.not_before_unix, 1_704_067_200);
        assert_eq!(facts.not_after_unix, 4_102_358_400);
        assert_eq!(
            facts.not_after(),
            UNIX_EPOCH + Duration::from_secs(4_102_358_400)
        );
        let jan_1_2099 = UNIX_EPOCH + Duration::from_secs(4_070_908_800);
        assert_eq!(facts.days_until_expiry(jan_1_2099), 364);
        assert_eq!(
            facts.days_until_expiry(facts.not_after() + Duration::from_secs(1)),
            -1
        );

        handshake_both_versions(&loaded, &root.certificate).await;
    }

    #[tokio::test]
    async fn ca_certificate_already_in_the_chain_is_not_sent_twice() {
        let dir = TempDir::new("tls");
        let root = root();
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256);
        let leaf = leaf(&root, &key, |_| {});
        let cert = dir.write(
            "fullchain.crt",
            format!("{}{}", leaf.pem(), root.certificate.pem()),
        );
        let key = dir.write("server.key", key.serialize_pem());
        let ca = dir.write("ca.crt", root.certificate.pem());
        let loaded = load(&cert, &key, Some(&ca)).unwrap();
        assert_eq!(loaded.chain_len, 2);
        handshake_both_versions(&loaded, &root.certificate).await;
    }

    /// Loads a leaf for `key_pem` (the key rcgen signs with) from a key file
    /// holding `key_file_pem`, and does a handshake with both versions.
    async fn loads_and_connects(key: &KeyPair, key_file_pem: &str, expected_label: &str) {
        assert!(key_file_pem.starts_with(expected_label), "{key_file_pem}");
        let dir = TempDir::new("tls");
        let root = root();
        let cert = dir.write("server.crt", leaf(&root, key, |_| {}).pem());
        let key = dir.write("server.key", key_file_pem);
        let loaded = load(&cert, &key, None).unwrap();
        assert_eq!(loaded.chain_len, 1);
        handshake_both_versions(&loaded, &root.certificate).await;
    }

    #[tokio::test]
    async fn ecdsa_p256_pkcs8() {
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256);
        loads_and_connects(&key, &key.serialize_pem(), "-----BEGIN PRIVATE KEY-----").await;
    }

    #[tokio::test]
    async fn ecdsa_p384_pkcs8() {
        let key = generate(&rcgen::PKCS_ECDSA_P384_SHA384);
        loads_and_connects(&key, &key.serialize_pem(), "-----BEGIN PRIVATE KEY-----").await;
    }

    #[tokio::test]
    async fn ed25519_pkcs8() {
        let key = generate(&rcgen::PKCS_ED25519);
        loads_and_connects(&key, &key.serialize_pem(), "-----BEGIN PRIVATE KEY-----").await;
    }

    #[tokio::test]
    async fn ecdsa_p256_sec1() {
        let key = KeyPair::from_pem(keys::P256_PKCS8).unwrap();
        loads_and_connects(&key, keys::P256_SEC1, "-----BEGIN EC PRIVATE KEY-----").await;
    }

    #[tokio::test]
    async fn rsa_pkcs8() {
        let key = KeyPair::from_pem(keys::RSA2048_PKCS8).unwrap();
        loads_and_connects(&key, keys::RSA2048_PKCS8, "-----BEGIN PRIVATE KEY-----").await;
    }

    #[tokio::test]
    async fn rsa_pkcs1() {
        let key = KeyPair::from_pem(keys::RSA2048_PKCS8).unwrap();
        loads_and_connects(&key, keys::RSA2048_PKCS1, "-----BEGIN RSA PRIVATE KEY-----").await;
    }

    #[tokio::test]
    async fn one_file_with_certificate_and_key_serves_as_both() {
        let dir = TempDir::new("tls");
        let root = root();
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256);
        let both = dir.write(
            "server.pem",
            format!("{}{}", key.serialize_pem(), leaf(&root, &key, |_| {}).pem()),
        );
        let loaded = load(&both, &both, None).unwrap();
        handshake_both_versions(&loaded, &root.certificate).await;
    }

    #[test]
    fn missing_files() {
        let dir = TempDir::new("tls");
        let (_root, cert, key) = simple(&dir);
        let missing = dir.join("missing.pem");

        let e = error(load(&missing, &key, None));
        assert_eq!(
            e.to_string(),
            format!("cannot read certificate file {}", missing.display())
        );
        let io = e.source().unwrap().downcast_ref::<io::Error>().unwrap();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);

        assert_eq!(
            error(load(&cert, &missing, None)).to_string(),
            format!("cannot read private key file {}", missing.display())
        );
        assert_eq!(
            error(load(&cert, &key, Some(&missing))).to_string(),
            format!("cannot read CA certificate file {}", missing.display())
        );
    }

    #[test]
    fn unreadable_file() {
        let dir = TempDir::new("tls");
        let (_root, cert, _key) = simple(&dir);
        // Tests may run as root, who can read any file; a directory is
        // unreadable for everyone.
        let e = error(load(&cert, dir.path(), None));
        assert_eq!(
            e.to_string(),
            format!("cannot read private key file {}", dir.path().display())
        );
        let io = e.source().unwrap().downcast_ref::<io::Error>().unwrap();
        assert_eq!(io.kind(), io::ErrorKind::IsADirectory);
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = TempDir::new("tls");
        let (_root, cert, key) = simple(&dir);
        // A device that never ends: refused at once, nothing read.
        let zero = Path::new("/dev/zero");
        let e = error(load(&cert, zero, None));
        assert!(
            matches!(
                e,
                TlsError::NotARegularFile {
                    file: PemFile::PrivateKey,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "private key file /dev/zero is not a regular file"
        );
        // A FIFO with no writer: refused at once instead of waiting.
        let fifo = dir.path().join("server.key.fifo");
        nix::unistd::mkfifo(
            &fifo,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        let e = error(load(&cert, &fifo, None));
        assert_eq!(
            e.to_string(),
            format!("private key file {} is not a regular file", fifo.display())
        );
        assert_eq!(
            error(load(&fifo, &key, None)).to_string(),
            format!("certificate file {} is not a regular file", fifo.display())
        );
        assert_eq!(
            error(load(&cert, &key, Some(&fifo))).to_string(),
            format!(
                "CA certificate file {} is not a regular file",
                fifo.display()
            )
        );
    }

    #[test]
    fn files_over_the_size_cap_are_refused() {
        let dir = TempDir::new("tls");
        let (_root, cert, key) = simple(&dir);
        let big = dir.path().join("big.crt");
        let f = fs::File::create(&big).unwrap();
        // Sparse: no disk used.
        f.set_len(MAX_PEM_FILE_BYTES + 1).unwrap();
        assert_eq!(
            error(load(&big, &key, None)).to_string(),
            format!(
                "certificate file {} is larger than 1048576 bytes",
                big.display()
            )
        );
        // Exactly at the cap is read (and then is not PEM).
        f.set_len(MAX_PEM_FILE_BYTES).unwrap();
        assert!(matches!(
            error(load(&cert, &big, None)),
            TlsError::NoPrivateKey { .. }
        ));
    }

    #[test]
    fn no_certificate() {
        let dir = TempDir::new("tls");
        let (_root, _cert, key) = simple(&dir);
        let text = dir.write("notes.txt", "this is not a certificate\n");
        assert_eq!(
            error(load(&text, &key, None)).to_string(),
            format!("no PEM certificate in {}", text.display())
        );
        let empty = dir.write("empty.crt", "");
        assert_eq!(
            error(load(&empty, &key, None)).to_string(),
            format!("no PEM certificate in {}", empty.display())
        );
    }

    #[test]
    fn no_ca_certificate() {
        let dir = TempDir::new("tls");
        let (_root, cert, key) = simple(&dir);
        let empty = dir.write("ca.crt", "\n");
        let e = error(load(&cert, &key, Some(&empty)));
        assert!(
            matches!(
                e,
                TlsError::NoCertificate {
                    file: PemFile::CaCertificate,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("no PEM certificate in {}", empty.display())
        );
    }

    #[test]
    fn swapped_files() {
        let dir = TempDir::new("tls");
        let (_root, cert, key) = simple(&dir);
        assert_eq!(
            error(load(&key, &cert, None)).to_string(),
            format!(
                "no PEM certificate in {} (it holds a private key: are the certificate and \
                 key files swapped?)",
                key.display()
            )
        );
        assert_eq!(
            error(load(&cert, &cert, None)).to_string(),
            format!(
                "no PEM private key in {} (it holds certificates: are the certificate and \
                 key files swapped?)",
                cert.display()
            )
        );
    }

    #[test]
    fn no_private_key() {
        let dir = TempDir::new("tls");
        let (_root, cert, _key) = simple(&dir);
        let text = dir.write(
            "server.key",
            "-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n",
        );
        assert_eq!(
            error(load(&cert, &text, None)).to_string(),
            format!("no PEM private key in {}", text.display())
        );
    }

    #[test]
    fn several_private_keys() {
        let dir = TempDir::new("tls");
        let (_root, cert, key) = simple(&dir);
        let other = generate(&rcgen::PKCS_ECDSA_P256_SHA256).serialize_pem();
        let two = dir.write(
            "two.key",
            format!("{}{other}", fs::read_to_string(&key).unwrap()),
        );
        assert_eq!(
            error(load(&cert, &two, None)).to_string(),
            format!(
                "{} holds 2 private keys; keep only the server's",
                two.display()
            )
        );
    }

    #[test]
    fn encrypted_pkcs8_private_key() {
        let dir = TempDir::new("tls");
        let (_root, cert, _key) = simple(&dir);
        let encrypted = dir.write("encrypted.key", keys::P256_ENCRYPTED_PKCS8);
        assert!(fs::read_to_string(&encrypted)
            .unwrap()
            .starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
        let p = encrypted.display();
        assert_eq!(
            error(load(&cert, &encrypted, None)).to_string(),
            format!(
                "private key in {p} is encrypted; smtpguard cannot prompt for a passphrase: \
                 decrypt it with `openssl pkey -in {p} -out {p}.decrypted`"
            )
        );
    }

    #[test]
    fn encrypted_legacy_private_key() {
        let dir = TempDir::new("tls");
        let (_root, cert, _key) = simple(&dir);
        let encrypted = dir.write("encrypted.key", keys::P256_ENCRYPTED_SEC1);
        assert!(fs::read_to_string(&encrypted)
            .unwrap()
            .contains("Proc-Type: 4,ENCRYPTED"));
        let p = encrypted.display();
        assert_eq!(
            error(load(&cert, &encrypted, None)).to_string(),
            format!(
                "private key in {p} is encrypted; smtpguard cannot prompt for a passphrase: \
                 decrypt it with `openssl pkey -in {p} -out {p}.decrypted`"
            )
        );
    }

    #[test]
    fn garbage_pem() {
        let dir = TempDir::new("tls");
        let (_root, _cert, key) = simple(&dir);
        let bad_base64 = dir.write(
            "bad.crt",
            "-----BEGIN CERTIFICATE-----\nthis is *not* base64!\n-----END CERTIFICATE-----\n",
        );
        let e = error(load(&bad_base64, &key, None));
        assert_eq!(
            e.to_string(),
            format!("certificate file {} is not valid PEM", bad_base64.display())
        );
        assert!(e.source().unwrap().is::<pem::Error>());

        let truncated = dir.write("truncated.crt", "-----BEGIN CERTIFICATE-----\nMIIB\n");
        assert_eq!(
            error(load(&truncated, &key, None)).to_string(),
            format!("certificate file {} is not valid PEM", truncated.display())
        );

        let bad_key = dir.write(
            "bad.key",
            "-----BEGIN PRIVATE KEY-----\n%%%%\n-----END PRIVATE KEY-----\n",
        );
        assert_eq!(
            error(load(&bad_base64, &bad_key, None)).to_string(),
            format!("certificate file {} is not valid PEM", bad_base64.display())
        );
    }

    #[test]
    fn base64_that_is_not_a_certificate() {
        let dir = TempDir::new("tls");
        let (_root, cert, key) = simple(&dir);
        let junk = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
        let first = dir.write("junk.crt", junk);
        let e = error(load(&first, &key, None));
        assert_eq!(
            e.to_string(),
            format!(
                "certificate 1 in {} is not a valid X.509 certificate",
                first.display()
            )
        );
        assert!(e.source().is_some());

        let second = dir.write(
            "chain.crt",
            format!("{}{junk}", fs::read_to_string(&cert).unwrap()),
        );
        assert_eq!(
            error(load(&second, &key, None)).to_string(),
            format!(
                "certificate 2 in {} is not a valid X.509 certificate",
                second.display()
            )
        );

        let ca = dir.write("ca.crt", junk);
        let e = error(load(&cert, &key, Some(&ca)));
        assert!(
            matches!(
                e,
                TlsError::BadCertificate {
                    file: PemFile::CaCertificate,
                    index: 1,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn garbage_private_key() {
        let dir = TempDir::new("tls");
        let (_root, cert, _key) = simple(&dir);
        let junk = dir.write(
            "junk.key",
            "-----BEGIN PRIVATE KEY-----\naGVsbG8gd29ybGQ=\n-----END PRIVATE KEY-----\n",
        );
        let e = error(load(&cert, &junk, None));
        assert_eq!(
            e.to_string(),
            format!(
                "private key in {} cannot be used: smtpguard supports RSA (2048 bits or more), \
                 ECDSA P-256 and P-384, and Ed25519 keys",
                junk.display()
            )
        );
        assert!(e.source().unwrap().is::<rustls::Error>());
    }

    #[test]
    fn unsupported_private_keys() {
        let dir = TempDir::new("tls");
        let (_root, cert, _key) = simple(&dir);
        for (name, pem) in [
            ("p521.key", keys::P521_PKCS8),
            ("rsa1024.key", keys::RSA1024_PKCS8),
        ] {
            let key = dir.write(name, pem);
            let e = error(load(&cert, &key, None));
            assert!(
                matches!(e, TlsError::UnsupportedPrivateKey { .. }),
                "{name}: {e:?}"
            );
        }
    }

    #[test]
    fn key_does_not_match_certificate() {
        let dir = TempDir::new("tls");
        let (_root, cert, _key) = simple(&dir);
        let other = dir.write(
            "other.key",
            generate(&rcgen::PKCS_ECDSA_P256_SHA256).serialize_pem(),
        );
        assert_eq!(
            error(load(&cert, &other, None)).to_string(),
            format!(
                "private key in {} does not match the certificate in {} (the server's own \
                 certificate must come first in the file)",
                other.display(),
                cert.display()
            )
        );
        // Same key kind not needed: an RSA key against an ECDSA certificate.
        let rsa = dir.write("rsa.key", keys::RSA2048_PKCS8);
        assert!(matches!(
            error(load(&cert, &rsa, None)),
            TlsError::KeyMismatch { .. }
        ));
    }

    #[test]
    fn chain_in_the_wrong_order_does_not_match_the_key() {
        let dir = TempDir::new("tls");
        let root = root();
        let intermediate = intermediate(&root, |_| {});
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256);
        let leaf = leaf(&intermediate, &key, |_| {});
        let cert = dir.write(
            "fullchain.crt",
            format!("{}{}", intermediate.certificate.pem(), leaf.pem()),
        );
        let key = dir.write("server.key", key.serialize_pem());
        assert!(matches!(
            error(load(&cert, &key, None)),
            TlsError::KeyMismatch { .. }
        ));
    }

    #[test]
    fn expired_certificate() {
        let dir = TempDir::new("tls");
        let root = root();
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256);
        let cert = leaf(&root, &key, |p| {
            p.not_before = rcgen::date_time_ymd(2019, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 1, 1);
        });
        let cert = dir.write("server.crt", cert.pem());
        let key = dir.write("server.key", key.serialize_pem());
        assert_eq!(
            error(load(&cert, &key, None)).to_string(),
            format!(
                "certificate in {} expired on 2020-01-01 00:00:00 UTC",
                cert.display()
            )
        );
    }

    #[test]
    fn certificate_not_yet_valid() {
        let dir = TempDir::new("tls");
        let root = root();
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256);
        let cert = leaf(&root, &key, |p| {
            p.not_before = rcgen::date_time_ymd(2999, 6, 30);
        });
        let cert = dir.write("server.crt", cert.pem());
        let key = dir.write("server.key", key.serialize_pem());
        assert_eq!(
            error(load(&cert, &key, None)).to_string(),
            format!(
                "certificate in {} is not valid before 2999-06-30 00:00:00 UTC (is the clock \
                 right?)",
                cert.display()
            )
        );
    }

    #[test]
    fn certificate_expiring_soon_loads_with_a_warning() {
        let dir = TempDir::new("tls");
        let root = root();
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256);
        let cert = leaf(&root, &key, |p| {
            p.not_before = rcgen::date_time_ymd(2029, 1, 1);
            p.not_after = rcgen::date_time_ymd(2030, 1, 10);
        });
        let cert = dir.write("server.crt", cert.pem());
        let key = dir.write("server.key", key.serialize_pem());
        // 2030-01-01 00:00:00 UTC
        let now = UNIX_EPOCH + Duration::from_secs(1_893_456_000);

        let loaded = load_at(&cert, &key, None, now).unwrap();
        assert_eq!(loaded.certificate.days_until_expiry(now), 9);
        assert_eq!(
            loaded.warnings,
            vec![TlsWarning::ExpiresSoon {
                path: cert.clone(),
                subject: "CN=mail.example.test".into(),
                not_after_unix: 1_894_233_600,
                days: 9,
            }]
        );
        assert_eq!(
            loaded.warnings[0].to_string(),
            format!(
                "certificate \"CN=mail.example.test\" in {} expires in 9 days, on \
                 2030-01-10 00:00:00 UTC; renew it",
                cert.display()
            )
        );

        // Fourteen days and more: no warning.
        let earlier = now - Duration::from_secs(5 * 24 * 3600);
        assert!(load_at(&cert, &key, None, earlier)
            .unwrap()
            .warnings
            .is_empty());
        // The last day.
        let last_day = now + Duration::from_secs(9 * 24 * 3600 - 3600);
        let warnings = load_at(&cert, &key, None, last_day).unwrap().warnings;
        assert!(warnings[0].to_string().contains(" expires within a day, "));
    }

    #[test]
    fn expired_intermediate_is_a_warning() {
        let dir = TempDir::new("tls");
        let root = root();
        let intermediate = intermediate(&root, |p| {
            p.not_before = rcgen::date_time_ymd(2019, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 1, 1);
        });
        let key = generate(&rcgen::PKCS_ECDSA_P256_SHA256);
        let leaf = leaf(&intermediate, &key, |_| {});
        let cert = dir.write(
            "fullchain.crt",
            format!("{}{}", leaf.pem(), intermediate.certificate.pem()),
        );
        let key = dir.write("server.key", key.serialize_pem());
        let loaded = load(&cert, &key, None).unwrap();
        assert_eq!(loaded.warnings.len(), 1);
        assert_eq!(
            loaded.warnings[0].to_string(),
            format!(
                "certificate \"CN=smtpguard test intermediate\" in {} expired on \
                 2020-01-01 00:00:00 UTC; clients may refuse the chain",
                cert.display()
            )
        );
    }

    #[test]
    fn system_time_round_trips() {
        for unix in [-86_400, -1, 0, 1, 1_700_000_000] {
            assert_eq!(unix_seconds(system_time(unix)), unix);
        }
    }
}
