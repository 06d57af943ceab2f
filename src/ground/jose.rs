//! JOSE signing on ring: a PKCS#8 PEM private key loaded as a
//! [`SigningKey`] (EC P-256 → `ES256`, RSA ≥ 2048 bits → `PS256` or
//! `RS256`, Ed25519 → `EdDSA`), its public JWK and RFC 7638 thumbprint,
//! compact JWS signing ([`SigningKey::sign`], and [`hs256`] for a shared
//! secret), and new P-256 / Ed25519 keys for `keygen`. It knows no token
//! endpoint and no request: the claims are the caller's (the client
//! assertion in `tokens::grant`, later DPoP proofs).
//!
//! Why a module on ring rather than the `jsonwebtoken` crate: ring is
//! already here (rustls and the store's sealing use it) and does every
//! signature JOSE needs here; ES256 with `ECDSA_P256_SHA256_FIXED_SIGNING`
//! is already JOSE's `r || s`. `jsonwebtoken` 9 would add its own PEM and
//! ASN.1 parsing (`pem`, `simple_asn1`) and cannot give the public JWK of
//! a private key, which the RFC 7638 thumbprint (`check`, `keygen`) and
//! DPoP's header `jwk` need; ring gives the public key directly. What is
//! left is base64url and three JSON strings.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
    RSA_PKCS1_SHA256, RSA_PSS_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;

/// The smallest RSA modulus accepted (RFC 7518 §3.3, FAPI 2.0 §5.4).
pub const MIN_RSA_BITS: usize = 2048;

/// A JWS algorithm the proxy signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// RSASSA-PSS with SHA-256 (FAPI's RSA choice).
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// Ed25519.
    EdDsa,
    /// HMAC SHA-256 with a shared secret (`client_secret_jwt`).
    Hs256,
}

impl Alg {
    /// The JOSE `alg` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::Ps256 => "PS256",
            Alg::Rs256 => "RS256",
            Alg::EdDsa => "EdDSA",
            Alg::Hs256 => "HS256",
        }
    }

    /// The algorithm named `s` (JOSE spelling), if the proxy signs with it.
    pub fn parse(s: &str) -> Option<Alg> {
        [Alg::Es256, Alg::Ps256, Alg::Rs256, Alg::EdDsa, Alg::Hs256]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// Why a key cannot be used. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoseError {
    /// Not a PKCS#8 PEM private key of a supported type.
    #[error("is not a PKCS#8 PEM private key (EC P-256, RSA or Ed25519): {0}")]
    Unparsable(String),
    /// An RSA key under [`MIN_RSA_BITS`].
    #[error("is an RSA key under {MIN_RSA_BITS} bits")]
    RsaTooSmall,
    /// `alg` does not fit the key.
    #[error("algorithm {alg} does not fit a {key} key (use {fits})")]
    AlgMismatch {
        /// The algorithm asked for.
        alg: &'static str,
        /// The key's type.
        key: &'static str,
        /// What fits it.
        fits: &'static str,
    },
    /// Not an algorithm the proxy signs with.
    #[error("unknown algorithm {0:?} (ES256, PS256, RS256, EdDSA or HS256)")]
    UnknownAlg(String),
    /// ring refused to sign or generate (no randomness).
    #[error("cannot sign: {0}")]
    Crypto(String),
}

enum Pair {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
    Ed(Ed25519KeyPair),
}

/// A private key, the algorithm it signs with and its public JWK's
/// RFC 7638 thumbprint. `Debug` shows neither the key nor its bytes.
pub struct SigningKey {
    pair: Pair,
    alg: Alg,
    /// The canonical public JWK (RFC 7638 §3.2: required members only,
    /// sorted, no whitespace).
    canonical_jwk: String,
    thumbprint: String,
    /// SHA-256 of the PKCS#8 DER: equality on reload without keeping the
    /// key's bytes around.
    digest: [u8; 32],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg.as_str())
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest && self.alg == other.alg
    }
}

impl SigningKey {
    /// The key of PKCS#8 PEM text, signing with `alg` (default: ES256,
    /// PS256 or EdDSA by the key's type).
    pub fn from_pem(pem: &str, alg: Option<&str>) -> Result<SigningKey, JoseError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| JoseError::Unparsable(format!("no PKCS#8 PEM block ({e})")))?;
        let alg = alg
            .map(|a| Alg::parse(a).ok_or_else(|| JoseError::UnknownAlg(a.to_owned())))
            .transpose()?;
        SigningKey::from_pkcs8(der.secret_pkcs8_der(), alg)
    }

    /// The key of PKCS#8 DER bytes (see [`SigningKey::from_pem`]).
    pub fn from_pkcs8(der: &[u8], alg: Option<Alg>) -> Result<SigningKey, JoseError> {
        let rng = SystemRandom::new();
        let (pair, fits): (Pair, &[Alg]) =
            if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng) {
                (Pair::Ec(k), &[Alg::Es256])
            } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                (Pair::Ed(k), &[Alg::EdDsa])
            } else {
                match RsaKeyPair::from_pkcs8(der) {
                    Ok(k) => (Pair::Rsa(k), &[Alg::Ps256, Alg::Rs256]),
                    Err(e) if e.to_string() == "TooSmall" => return Err(JoseError::RsaTooSmall),
                    Err(e) => return Err(JoseError::Unparsable(e.to_string())),
                }
            };
        let alg = alg.unwrap_or(fits[0]);
        if !fits.contains(&alg) {
            return Err(JoseError::AlgMismatch {
                alg: alg.as_str(),
                key: pair.kind(),
                fits: if fits.len() == 1 {
                    fits[0].as_str()
                } else {
                    "PS256 or RS256"
                },
            });
        }
        if let Pair::Rsa(k) = &pair {
            if k.public().modulus_len() * 8 < MIN_RSA_BITS {
                return Err(JoseError::RsaTooSmall);
            }
        }
        let canonical_jwk = pair.canonical_jwk();
        let thumbprint = B64.encode(ring::digest::digest(
            &ring::digest::SHA256,
            canonical_jwk.as_bytes(),
        ));
        let mut digest = [0; 32];
        digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
        Ok(SigningKey {
            pair,
            alg,
            canonical_jwk,
            thumbprint,
            digest,
        })
    }

    /// The algorithm it signs with.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// `EC P-256`, `RSA 2048` ..., `Ed25519`: for `check`.
    pub fn describe(&self) -> String {
        match &self.pair {
            Pair::Rsa(k) => format!("RSA {}", k.public().modulus_len() * 8),
            p => p.kind().to_owned(),
        }
    }

    /// The RFC 7638 JWK thumbprint (base64url SHA-256 of the canonical
    /// public JWK).
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The public JWK: the RFC 7638 members, plus `kid` (the thumbprint
    /// unless given), `alg` and `use: "sig"`.
    pub fn public_jwk(&self, kid: Option<&str>) -> serde_json::Value {
        let mut jwk: serde_json::Value =
            serde_json::from_str(&self.canonical_jwk).unwrap_or_default();
        if let Some(o) = jwk.as_object_mut() {
            let kid = kid.unwrap_or(&self.thumbprint);
            o.insert("kid".into(), kid.into());
            o.insert("alg".into(), self.alg.as_str().into());
            o.insert("use".into(), "sig".into());
        }
        jwk
    }

    /// A compact JWS of `claims` with the header `{"alg", "typ", "kid"}`
    /// (`kid` when given) and the `extra` header members.
    pub fn sign(
        &self,
        typ: &str,
        kid: Option<&str>,
        extra: &[(&str, serde_json::Value)],
        claims: &serde_json::Value,
    ) -> Result<String, JoseError> {
        self.sign_encoded(&self.encoded_header(typ, kid, extra), claims)
    }

    /// The base64url JWS header [`SigningKey::sign`] would use, to be
    /// made once and reused with [`SigningKey::sign_encoded`] (a DPoP
    /// proof's header, with its `jwk`, is the same for every request).
    pub fn encoded_header(
        &self,
        typ: &str,
        kid: Option<&str>,
        extra: &[(&str, serde_json::Value)],
    ) -> String {
        encoded_header(self.alg, typ, kid, extra)
    }

    /// The public JWK with the RFC 7638 members only (a DPoP proof's
    /// header `jwk`).
    pub fn canonical_jwk(&self) -> serde_json::Value {
        serde_json::from_str(&self.canonical_jwk).unwrap_or_default()
    }

    /// A compact JWS of `claims` under a header from
    /// [`SigningKey::encoded_header`].
    pub fn sign_encoded(
        &self,
        encoded_header: &str,
        claims: &serde_json::Value,
    ) -> Result<String, JoseError> {
        let input = format!("{encoded_header}.{}", B64.encode(claims.to_string()));
        let rng = SystemRandom::new();
        let crypto = |e: ring::error::Unspecified| JoseError::Crypto(e.to_string());
        let sig = match &self.pair {
            Pair::Ec(k) => k
                .sign(&rng, input.as_bytes())
                .map_err(crypto)?
                .as_ref()
                .to_vec(),
            Pair::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
            Pair::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                let padding: &'static dyn ring::signature::RsaEncoding = match self.alg {
                    Alg::Rs256 => &RSA_PKCS1_SHA256,
                    _ => &RSA_PSS_SHA256,
                };
                k.sign(padding, &rng, input.as_bytes(), &mut sig)
                    .map_err(crypto)?;
                sig
            }
        };
        Ok(format!("{input}.{}", B64.encode(sig)))
    }
}

impl Pair {
    fn kind(&self) -> &'static str {
        match self {
            Pair::Ec(_) => "EC P-256",
            Pair::Rsa(_) => "RSA",
            Pair::Ed(_) => "Ed25519",
        }
    }

    fn canonical_jwk(&self) -> String {
        match self {
            Pair::Ec(k) => {
                // Uncompressed point: 0x04 || x || y, 32 bytes each.
                let p = k.public_key().as_ref();
                format!(
                    r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                    B64.encode(&p[1..33]),
                    B64.encode(&p[33..65])
                )
            }
            Pair::Ed(k) => format!(
                r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                B64.encode(k.public_key().as_ref())
            ),
            Pair::Rsa(k) => {
                let public: ring::rsa::PublicKeyComponents<Vec<u8>> = k.public().into();
                format!(
                    r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                    B64.encode(&public.e),
                    B64.encode(&public.n)
                )
            }
        }
    }
}

/// `base64url(header).base64url(claims)`.
fn signing_input(
    alg: Alg,
    typ: &str,
    kid: Option<&str>,
    extra: &[(&str, serde_json::Value)],
    claims: &serde_json::Value,
) -> String {
    format!(
        "{}.{}",
        encoded_header(alg, typ, kid, extra),
        B64.encode(claims.to_string())
    )
}

/// `base64url(header)`: `alg`, `typ`, `kid` when given, then `extra`.
fn encoded_header(
    alg: Alg,
    typ: &str,
    kid: Option<&str>,
    extra: &[(&str, serde_json::Value)],
) -> String {
    let mut header = serde_json::Map::new();
    header.insert("alg".into(), alg.as_str().into());
    header.insert("typ".into(), typ.into());
    if let Some(kid) = kid {
        header.insert("kid".into(), kid.into());
    }
    for (k, v) in extra {
        header.insert((*k).into(), v.clone());
    }
    B64.encode(serde_json::Value::Object(header).to_string())
}

/// A compact JWS of `claims`, HS256 keyed by `secret`.
pub fn hs256(secret: &[u8], typ: &str, claims: &serde_json::Value) -> String {
    let input = signing_input(Alg::Hs256, typ, None, &[], claims);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", B64.encode(tag.as_ref()))
}

/// A new private key for `alg` (ES256 or EdDSA; RSA keys come from
/// openssl) as PKCS#8 PEM.
pub fn generate_pem(alg: Alg) -> Result<String, JoseError> {
    let rng = SystemRandom::new();
    let crypto = |e: ring::error::Unspecified| JoseError::Crypto(e.to_string());
    let doc = match alg {
        Alg::Es256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng),
        Alg::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng),
        other => {
            return Err(JoseError::Crypto(format!(
                "cannot generate {} keys (use openssl for RSA)",
                other.as_str()
            )))
        }
    }
    .map_err(crypto)?;
    Ok(pem("PRIVATE KEY", doc.as_ref()))
}

/// PEM text: `label`, base64 in lines of 64.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ED25519};

    fn parts(jws: &str) -> (serde_json::Value, serde_json::Value, Vec<u8>) {
        let p: Vec<&str> = jws.split('.').collect();
        assert_eq!(p.len(), 3, "{jws}");
        let json = |s: &str| serde_json::from_slice(&B64.decode(s).unwrap()).unwrap();
        (json(p[0]), json(p[1]), B64.decode(p[2]).unwrap())
    }

    #[test]
    fn es256_signs_r_s_that_verify_against_its_jwk() {
        let key = SigningKey::from_pem(&generate_pem(Alg::Es256).unwrap(), None).unwrap();
        assert_eq!(key.alg(), Alg::Es256);
        let claims = serde_json::json!({"sub": "me"});
        let jws = key.sign("JWT", Some("k1"), &[], &claims).unwrap();
        let (header, body, sig) = parts(&jws);
        assert_eq!(
            header,
            serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": "k1"})
        );
        assert_eq!(body, claims);
        assert_eq!(sig.len(), 64, "JOSE's r || s");
        let jwk = key.public_jwk(None);
        let x = B64.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = B64.decode(jwk["y"].as_str().unwrap()).unwrap();
        let point = [&[4u8][..], &x, &y].concat();
        let input = jws.rsplit_once('.').unwrap().0;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(input.as_bytes(), &sig)
            .expect("verifies");
        assert_eq!(jwk["kid"], key.thumbprint());
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], "ES256");
    }

    #[test]
    fn eddsa_signs_and_refuses_other_algorithms() {
        let pem = generate_pem(Alg::EdDsa).unwrap();
        let key = SigningKey::from_pem(&pem, None).unwrap();
        assert_eq!(key.alg(), Alg::EdDsa);
        let jws = key.sign("JWT", None, &[], &serde_json::json!({})).unwrap();
        let (_, _, sig) = parts(&jws);
        let x = B64
            .decode(key.public_jwk(None)["x"].as_str().unwrap())
            .unwrap();
        UnparsedPublicKey::new(&ED25519, x)
            .verify(jws.rsplit_once('.').unwrap().0.as_bytes(), &sig)
            .expect("verifies");
        let e = SigningKey::from_pem(&pem, Some("ES256")).unwrap_err();
        assert!(matches!(e, JoseError::AlgMismatch { .. }), "{e}");
        let e = SigningKey::from_pem(&pem, Some("HS256")).unwrap_err();
        assert!(matches!(e, JoseError::AlgMismatch { .. }), "{e}");
        let e = SigningKey::from_pem(&pem, Some("ES512")).unwrap_err();
        assert!(matches!(e, JoseError::UnknownAlg(_)), "{e}");
    }

    /// RFC 7638 §3.1's example key and thumbprint.
    #[test]
    fn rfc7638_thumbprint_of_the_rfc_example() {
        let canonical = r#"{"e":"AQAB","kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}"#;
        let t = B64.encode(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        ));
        assert_eq!(t, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }

    #[test]
    fn garbage_is_unparsable_and_the_message_has_no_key_material() {
        let e = SigningKey::from_pem("not a key", None).unwrap_err();
        assert!(matches!(e, JoseError::Unparsable(_)), "{e}");
        let junk = pem("PRIVATE KEY", b"secret-bytes-not-a-key");
        let e = SigningKey::from_pem(&junk, None).unwrap_err();
        assert!(matches!(e, JoseError::Unparsable(_)), "{e}");
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn hs256_matches_ring_hmac() {
        let jws = hs256(b"k", "JWT", &serde_json::json!({"a": 1}));
        let (header, _, sig) = parts(&jws);
        assert_eq!(header["alg"], "HS256");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k");
        ring::hmac::verify(&key, jws.rsplit_once('.').unwrap().0.as_bytes(), &sig).unwrap();
    }

    #[test]
    fn debug_shows_no_key() {
        let key = SigningKey::from_pem(&generate_pem(Alg::Es256).unwrap(), None).unwrap();
        let d = format!("{key:?}");
        assert!(d.contains("ES256") && d.contains(key.thumbprint()), "{d}");
        assert!(!d.contains("digest") && !d.contains("pair"), "{d}");
    }
}

#[cfg(test)]
mod rsa_tests {
    use super::*;
    use ring::signature::{
        RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256,
    };

    /// An RSA key of `bits` from openssl (ring cannot generate RSA keys).
    fn openssl_rsa(bits: u32) -> String {
        let out = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt"])
            .arg(format!("rsa_keygen_bits:{bits}"))
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn rsa_signs_ps256_by_default_and_rs256_when_asked() {
        let pem = openssl_rsa(2048);
        for (alg, want, params) in [
            (None, "PS256", &RSA_PSS_2048_8192_SHA256),
            (Some("RS256"), "RS256", &RSA_PKCS1_2048_8192_SHA256),
        ] {
            let key = SigningKey::from_pem(&pem, alg).unwrap();
            assert_eq!(key.alg().as_str(), want);
            assert_eq!(key.describe(), "RSA 2048");
            let jws = key.sign("JWT", None, &[], &serde_json::json!({})).unwrap();
            let (input, sig) = jws.rsplit_once('.').unwrap();
            let jwk = key.public_jwk(None);
            let n = B64.decode(jwk["n"].as_str().unwrap()).unwrap();
            let e = B64.decode(jwk["e"].as_str().unwrap()).unwrap();
            RsaPublicKeyComponents { n: &n, e: &e }
                .verify(params, input.as_bytes(), &B64.decode(sig).unwrap())
                .expect("verifies");
        }
        let e = SigningKey::from_pem(&pem, Some("ES256")).unwrap_err();
        assert!(
            matches!(e, JoseError::AlgMismatch { key: "RSA", .. }),
            "{e}"
        );
    }

    #[test]
    fn an_openssl_ed25519_key_pkcs8_v1_loads() {
        let out = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "ED25519"])
            .output()
            .expect("openssl");
        let key = SigningKey::from_pem(&String::from_utf8(out.stdout).unwrap(), None).unwrap();
        assert_eq!(key.alg(), Alg::EdDsa);
    }

    #[test]
    fn an_rsa_key_under_2048_bits_is_refused() {
        let e = SigningKey::from_pem(&openssl_rsa(1024), None).unwrap_err();
        assert_eq!(e, JoseError::RsaTooSmall, "{e}");
    }
}
