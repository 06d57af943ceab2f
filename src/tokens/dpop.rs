//! DPoP (RFC 9449): the proofs a credential or pool with `dpop = true`
//! sends with each token request and each proxied request, and the latest
//! `DPoP-Nonce` each server gave, so that a server rotating nonces costs
//! no extra round trip in the steady state.
//!
//! One [`Dpop`] per credential or pool: its key (configured, so replicas
//! share it and a restart keeps tokens usable), the proof header made once
//! (`typ`, `alg`, the public `jwk`), and the nonces by server. A proof is
//! one signature over `jti`, `htm`, `htu`, `iat`, the server's nonce when
//! one is known, and `ath` on resource requests. Proofs are secrets: they
//! are never logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use serde_json::json;

use crate::ground::crypto::random_bytes;
use crate::ground::jose::SigningKey;
use crate::ground::lock;

/// The `DPoP` request header (the proof).
pub static DPOP: HeaderName = HeaderName::from_static("dpop");
/// The `DPoP-Nonce` response header.
pub static DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");
/// The `typ` of a proof.
pub const PROOF_TYP: &str = "dpop+jwt";
/// Servers whose nonce is kept, at most: a proxy talks to a token endpoint
/// and a few upstreams; more means a `preserve_host` route fanning out,
/// and then the oldest are forgotten (a forgotten nonce costs one retry).
const MAX_SERVERS: usize = 256;
/// Longest nonce kept: RFC 9449 nonces are short opaque strings.
const MAX_NONCE: usize = 512;

/// A credential's or pool's DPoP key and the nonces its servers gave.
pub struct Dpop {
    key: Arc<SigningKey>,
    /// `base64url({"alg","typ","jwk"})`, the same for every proof.
    header: String,
    nonces: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Dpop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dpop")
            .field("thumbprint", &self.key.thumbprint())
            .finish_non_exhaustive()
    }
}

/// A proof could not be made (no randomness, or ring refused to sign).
#[derive(Debug, thiserror::Error)]
#[error("cannot make a DPoP proof: {0}")]
pub struct ProofError(String);

impl Dpop {
    /// DPoP with `key` (ES256 or EdDSA: config refuses others).
    pub fn new(key: Arc<SigningKey>) -> Dpop {
        let header = key.encoded_header(PROOF_TYP, None, &[("jwk", key.canonical_jwk())]);
        Dpop {
            key,
            header,
            nonces: Mutex::new(HashMap::new()),
        }
    }

    /// The RFC 7638 thumbprint of the key (`jkt`, `dpop_jkt`).
    pub fn thumbprint(&self) -> &str {
        self.key.thumbprint()
    }

    /// A fresh proof for `method` on `uri` (its scheme, authority and
    /// path: RFC 9449 §4.2 `htu` has no query or fragment), with the
    /// latest nonce of `uri`'s server and `ath` when given.
    pub fn proof(&self, method: &str, uri: &Uri, ath: Option<&str>) -> Result<String, ProofError> {
        self.proof_on(&Server::of(uri), method, uri.path(), ath)
    }

    /// [`Dpop::proof`] for `path` on `server`, named once per request
    /// and shared with [`Dpop::remember_from`].
    pub fn proof_on(
        &self,
        server: &Server,
        method: &str,
        path: &str,
        ath: Option<&str>,
    ) -> Result<String, ProofError> {
        let nonce = lock(&self.nonces).get(&server.0).cloned();
        let jti = random_bytes::<16>().map_err(|e| ProofError(e.to_string()))?;
        let iat = crate::ground::unix_now();
        let htu = format!("{}{path}", server.0);
        let mut claims = json!({
            "jti": B64.encode(jti),
            "htm": method,
            "htu": htu,
            "iat": iat,
        });
        if let Some(o) = claims.as_object_mut() {
            if let Some(n) = nonce {
                o.insert("nonce".into(), n.into());
            }
            if let Some(a) = ath {
                o.insert("ath".into(), a.into());
            }
        }
        self.key
            .sign_encoded(&self.header, &claims)
            .map_err(|e| ProofError(e.to_string()))
    }

    /// The proof as a header value (marked sensitive).
    pub fn proof_header(
        &self,
        method: &str,
        uri: &Uri,
        ath: Option<&str>,
    ) -> Result<HeaderValue, ProofError> {
        header_value(self.proof(method, uri, ath)?)
    }

    /// [`Dpop::proof_on`] as a header value (marked sensitive).
    pub fn proof_header_on(
        &self,
        server: &Server,
        method: &str,
        path: &str,
        ath: Option<&str>,
    ) -> Result<HeaderValue, ProofError> {
        header_value(self.proof_on(server, method, path, ath)?)
    }

    /// Keeps the `DPoP-Nonce` of an answer from `uri`'s server, if it has
    /// one; returns whether it did.
    pub fn remember(&self, uri: &Uri, headers: &HeaderMap) -> bool {
        self.remember_from(&Server::of(uri), headers)
    }

    /// [`Dpop::remember`] for an answer from `server`.
    pub fn remember_from(&self, server: &Server, headers: &HeaderMap) -> bool {
        let Some(nonce) = headers.get(&DPOP_NONCE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        if nonce.is_empty() || nonce.len() > MAX_NONCE {
            return false;
        }
        let mut nonces = lock(&self.nonces);
        if nonces.get(&server.0).is_some_and(|n| n == nonce) {
            return true;
        }
        if nonces.len() >= MAX_SERVERS && !nonces.contains_key(&server.0) {
            nonces.clear();
        }
        nonces.insert(server.0.clone(), nonce.to_owned());
        true
    }
}

fn header_value(proof: String) -> Result<HeaderValue, ProofError> {
    let mut v = HeaderValue::try_from(proof).map_err(|e| ProofError(e.to_string()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// A server a proof is for and whose nonce is kept: `scheme://authority`,
/// lower-cased (RFC 9449 §4.3 compares `htu` after RFC 3986
/// normalization).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server(String);

impl Server {
    /// The server of an absolute `uri` (`https` when it has no scheme).
    pub fn of(uri: &Uri) -> Server {
        let scheme = uri.scheme_str().unwrap_or("https");
        let authority = uri.authority().map_or("", |a| a.as_str());
        Server::new(scheme, authority)
    }

    /// The server at `scheme://authority`.
    pub fn new(scheme: &str, authority: &str) -> Server {
        Server(format!("{scheme}://{authority}").to_ascii_lowercase())
    }
}

/// `ath`: base64url(SHA-256(access token)) (RFC 9449 §4.2).
pub fn ath(access_token: &str) -> String {
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        access_token.as_bytes(),
    ))
}

/// Whether an upstream's `401` asks for a nonce: `WWW-Authenticate: DPoP
/// error="use_dpop_nonce"` (RFC 9449 §9).
pub fn asks_for_nonce(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            let v = v.trim_start();
            v.len() > 5
                && v[..5].eq_ignore_ascii_case("dpop ")
                && v.contains("error=\"use_dpop_nonce\"")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ground::jose::{generate_pem, Alg};

    fn dpop(alg: Alg) -> Dpop {
        let pem = generate_pem(alg).unwrap();
        Dpop::new(Arc::new(SigningKey::from_pem(&pem, None).unwrap()))
    }

    fn parts(jws: &str) -> (serde_json::Value, serde_json::Value) {
        let mut it = jws.split('.');
        let mut dec = || -> serde_json::Value {
            serde_json::from_slice(&B64.decode(it.next().unwrap()).unwrap()).unwrap()
        };
        (dec(), dec())
    }

    #[test]
    fn a_proof_carries_the_public_key_method_target_and_nonce_once_known() {
        let d = dpop(Alg::Es256);
        let uri: Uri = "https://API.example.com:8443/v1/accounts?x=1#f"
            .parse()
            .unwrap();
        let (h, c) = parts(&d.proof("GET", &uri, Some("abc")).unwrap());
        assert_eq!(h["typ"], "dpop+jwt");
        assert_eq!(h["alg"], "ES256");
        assert_eq!(h["jwk"]["kty"], "EC");
        assert!(h["jwk"].get("d").is_none(), "{h}");
        assert_eq!(c["htm"], "GET");
        assert_eq!(c["htu"], "https://api.example.com:8443/v1/accounts");
        assert_eq!(c["ath"], "abc");
        assert!(c.get("nonce").is_none());
        let mut headers = HeaderMap::new();
        headers.insert(&DPOP_NONCE, HeaderValue::from_static("n-1"));
        assert!(d.remember(&uri, &headers));
        let (_, c2) = parts(&d.proof("POST", &uri, None).unwrap());
        assert_eq!(c2["nonce"], "n-1");
        assert!(c2.get("ath").is_none());
        assert_ne!(c["jti"], c2["jti"], "a fresh jti per proof");
        // Another server's nonce is its own.
        let other: Uri = "https://other.example.com/".parse().unwrap();
        let (_, c3) = parts(&d.proof("GET", &other, None).unwrap());
        assert!(c3.get("nonce").is_none());
        let (h, _) = parts(&dpop(Alg::EdDsa).proof("GET", &other, None).unwrap());
        assert_eq!(h["alg"], "EdDSA");
        assert_eq!(h["jwk"]["crv"], "Ed25519");
    }

    #[test]
    fn nonce_challenges_are_recognised_and_odd_nonces_ignored() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"DPoP error="use_dpop_nonce", error_description="x""#),
        );
        assert!(asks_for_nonce(&h));
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"DPoP error="invalid_token""#),
        );
        assert!(!asks_for_nonce(&h));
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer error="use_dpop_nonce""#),
        );
        assert!(!asks_for_nonce(&h));
        let d = dpop(Alg::Es256);
        let uri: Uri = "https://a.example/".parse().unwrap();
        let mut n = HeaderMap::new();
        n.insert(
            &DPOP_NONCE,
            HeaderValue::from_str(&"n".repeat(600)).unwrap(),
        );
        assert!(!d.remember(&uri, &n));
        assert!(!d.remember(&uri, &HeaderMap::new()));
    }

    #[test]
    fn ath_is_the_base64url_sha256_of_the_token() {
        // RFC 9449 §7.1's example token and its ath.
        assert_eq!(
            ath("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
        );
    }
}
