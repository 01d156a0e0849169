//! A test PKI made with rcgen at run time: a CA and server certificates it
//! signs, as rcgen values and as PEM files.

use std::{path::PathBuf, sync::Arc};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls;

use super::TempDir;

/// A certificate authority that signs test certificates (ECDSA P-256 for a
/// root, P-384 for an intermediate).
pub struct TestCa {
    /// The CA's own certificate.
    pub certificate: Certificate,
    /// The CA's key.
    pub key: KeyPair,
}

impl TestCa {
    /// A self-signed root named `CN=<common_name>`.
    ///
    /// # Panics
    ///
    /// When rcgen fails (it does not for these parameters).
    pub fn new(common_name: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let certificate = ca_params(common_name)
            .self_signed(&key)
            .expect("self-signed CA");
        TestCa { certificate, key }
    }

    /// An intermediate CA named `CN=<common_name>` signed by this one;
    /// `adjust` may change its parameters first.
    ///
    /// # Panics
    ///
    /// When rcgen refuses the adjusted parameters.
    pub fn intermediate(
        &self,
        common_name: &str,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384 key");
        let mut params = ca_params(common_name);
        adjust(&mut params);
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .expect("intermediate CA");
        TestCa { certificate, key }
    }

    /// A server certificate for `key`, signed by this CA: subject
    /// `CN=<names[0]>`, every name a subject alternative name (a DNS name,
    /// or an IP address where it parses as one), extended key usage
    /// serverAuth. `adjust` may change the parameters first (validity,
    /// names, usages).
    ///
    /// # Panics
    ///
    /// When `names` is empty or rcgen refuses the parameters.
    pub fn issue(
        &self,
        names: &[&str],
        key: &KeyPair,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Certificate {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let common_name = names
            .first()
            .expect("a certificate names its server")
            .clone();
        let mut params = CertificateParams::new(names).expect("names rcgen accepts");
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        adjust(&mut params);
        params
            .signed_by(key, &self.certificate, &self.key)
            .expect("server certificate")
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.certificate.pem()
    }

    /// The CA certificate, DER, for a client's root store.
    pub fn der(&self) -> CertificateDer<'static> {
        self.certificate.der().clone()
    }

    /// A rustls client configuration (ring provider, TLS 1.2 and 1.3) that
    /// trusts this CA alone.
    ///
    /// # Panics
    ///
    /// Never for a certificate rcgen made.
    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der()).expect("a CA rustls accepts");
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
    }
}

/// A CA and one server certificate (P-256) it signs, written as PEM files
/// in a temporary directory that lives as long as this value.
pub struct TestPki {
    /// The CA.
    pub ca: TestCa,
    /// `ca.crt`: the CA certificate.
    pub ca_certificate: PathBuf,
    /// `server.crt`: the server certificate alone.
    pub certificate: PathBuf,
    /// `fullchain.crt`: the server certificate, then the CA's.
    pub chain: PathBuf,
    /// `server.key`: the server's key, PKCS#8.
    pub private_key: PathBuf,
    /// The directory holding the files.
    pub dir: TempDir,
}

impl TestPki {
    /// A CA named `CN=<ca_name>` and a server certificate for `names`
    /// (see [`TestCa::issue`]).
    ///
    /// # Panics
    ///
    /// When rcgen fails or the files cannot be written.
    pub fn new(ca_name: &str, names: &[&str]) -> TestPki {
        let ca = TestCa::new(ca_name);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let server = ca.issue(names, &key, |_| {});
        let dir = TempDir::new("pki");
        TestPki {
            ca_certificate: dir.write("ca.crt", ca.pem()),
            certificate: dir.write("server.crt", server.pem()),
            chain: dir.write("fullchain.crt", format!("{}{}", server.pem(), ca.pem())),
            private_key: dir.write("server.key", key.serialize_pem()),
            ca,
            dir,
        }
    }
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_load_as_the_daemon_loads_them() {
        let pki = TestPki::new("test CA", &["mx.example.com", "127.0.0.1"]);
        let loaded = crate::tls::load(&pki.chain, &pki.private_key, None).unwrap();
        assert_eq!(loaded.chain_len, 2);
        assert_eq!(loaded.certificate.subject, "CN=mx.example.com");
        assert_eq!(loaded.certificate.issuer, "CN=test CA");
        let loaded = crate::tls::load(
            &pki.certificate,
            &pki.private_key,
            Some(&pki.ca_certificate),
        )
        .unwrap();
        assert_eq!(loaded.chain_len, 2);
    }
}
