//! PEM loading and rustls configurations: the listener's server config
//! (with optional client-certificate verification) and the client config
//! used towards upstreams and token endpoints.
//!
//! A [`ClientCert`] is the certificate the proxy presents as a TLS client
//! (mutual TLS to an upstream, `tls_client_auth` at a token endpoint).
//!
//! Every config is built with the `ring` provider explicitly, so nothing
//! depends on a process-wide default provider. Upstream verification cannot
//! be turned off: roots are the webpki set plus any `ca_file`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file (a chain is allowed).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{}: no usable private key: {e}", path.display()))
}

/// The listener's TLS config: h2 and http/1.1 by ALPN; with `client_ca`,
/// a client certificate signed by it is mandatory.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, String> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: unusable CA certificate: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client config trusting the webpki roots plus `extra_roots`, presenting
/// `identity` when the server asks for a client certificate.
pub fn client_config(
    extra_roots: &[CertificateDer<'static>],
    identity: Option<&ClientCert>,
) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for c in extra_roots {
        roots
            .add(c.clone())
            .map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| format!("client certificate: {e}")),
    }
}

/// A client certificate (with its chain) and its private key, checked to go
/// together. Compared by value (a reload with the same files keeps pools);
/// `Debug` shows the fingerprint only, never the key.
#[derive(Clone)]
pub struct ClientCert {
    /// The end-entity certificate first, then any intermediates.
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl ClientCert {
    /// Parses a PEM chain and a PEM private key and checks that the key is
    /// the certificate's. The errors say which of the two is wrong and
    /// never quote the key.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key_pem: &str,
    ) -> Result<ClientCert, CertError> {
        if chain.is_empty() {
            return Err(CertError::Cert("no certificate found".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
            CertError::Key("is not a PEM private key (PKCS#8, PKCS#1 or SEC1)".into())
        })?;
        let certified =
            rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => {
                        CertError::Key("does not match the certificate's public key".into())
                    }
                    rustls::Error::General(_) => {
                        CertError::Key("is not a usable private key".into())
                    }
                    e => CertError::Cert(format!("unusable: {e}")),
                })?;
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(CertError::Key(
                    "does not match the certificate's public key".into(),
                ))
            }
            Err(rustls::Error::InconsistentKeys(_)) => {}
            Err(e) => return Err(CertError::Cert(format!("unusable: {e}"))),
        }
        Ok(ClientCert {
            chain,
            key: Arc::new(key),
        })
    }

    /// The chain as presented (for pool keys).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// SHA-256 of the end-entity certificate's DER: RFC 8705's `x5t#S256`
    /// (base64url) and `check`'s fingerprint (hex).
    pub fn sha256(&self) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.chain[0]);
        let mut out = [0; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// The fingerprint as colon-separated upper-case hex.
    pub fn fingerprint(&self) -> String {
        self.sha256()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The end-entity certificate's subject, RFC 4514 style
    /// (`CN=app,O=Example`), or `?` when it cannot be read.
    pub fn subject(&self) -> String {
        subject::of(&self.chain[0]).unwrap_or_else(|| "?".into())
    }
}

impl PartialEq for ClientCert {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.key.secret_der() == other.key.secret_der()
    }
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert")
            .field("sha256", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// What is wrong with a client certificate: the certificate or its key.
#[derive(Debug)]
pub enum CertError {
    /// The certificate (file) is unusable.
    Cert(String),
    /// The key is unusable or not the certificate's.
    Key(String),
}

mod subject {
    //! Just enough DER to print a certificate's subject name.

    /// One TLV: (tag, contents, rest).
    fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, d) = d.split_first()?;
        let (&first, mut d) = d.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || d.len() < n {
                return None;
            }
            let mut len = 0usize;
            for &b in &d[..n] {
                len = (len << 8) | usize::from(b);
            }
            d = &d[n..];
            len
        };
        if d.len() < len {
            return None;
        }
        Some((tag, &d[..len], &d[len..]))
    }

    pub(super) fn of(cert: &[u8]) -> Option<String> {
        let (_, cert, _) = tlv(cert)?;
        let (_, mut tbs, _) = tlv(cert)?;
        // version [0] (optional), serial, signature algorithm, issuer, validity, subject
        let (tag, _, rest) = tlv(tbs)?;
        if tag == 0xa0 {
            tbs = rest;
        }
        let mut rest = tbs;
        for _ in 0..4 {
            rest = tlv(rest)?.2;
        }
        let (_, mut name, _) = tlv(rest)?;
        let mut parts = Vec::new();
        while !name.is_empty() {
            let (_, mut set, next) = tlv(name)?;
            name = next;
            while !set.is_empty() {
                let (_, atv, next) = tlv(set)?;
                set = next;
                let (_, oid, value) = tlv(atv)?;
                let (_, value, _) = tlv(value)?;
                let label = match oid {
                    [0x55, 0x04, 0x03] => "CN".to_owned(),
                    [0x55, 0x04, 0x06] => "C".to_owned(),
                    [0x55, 0x04, 0x07] => "L".to_owned(),
                    [0x55, 0x04, 0x08] => "ST".to_owned(),
                    [0x55, 0x04, 0x0a] => "O".to_owned(),
                    [0x55, 0x04, 0x0b] => "OU".to_owned(),
                    other => other.iter().map(|b| format!("{b:02x}")).collect(),
                };
                let value = String::from_utf8_lossy(value)
                    .chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect::<String>();
                parts.push(format!("{label}={value}"));
            }
        }
        Some(parts.join(","))
    }
}
