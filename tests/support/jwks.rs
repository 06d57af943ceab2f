//! JWS verification for the tests' resource servers, on ring and
//! independent of the crate's own JOSE code (so a test never checks the
//! proxy's signatures with the proxy's code): compact JWS decoding, a
//! signature checked against one public JWK (RS256, PS256, ES256, EdDSA;
//! a DPoP proof's key is its header `jwk`), a [`Jwks`] (an authorization
//! server's `/jwks`) that verifies access tokens, and the RFC 7638
//! thumbprint of a public JWK (a DPoP-bound token's `cnf.jkt`).
//!
//! It decides whether a signature verifies, nothing else: claims (`exp`,
//! `aud`, `cnf`) are the caller's to check.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::signature as sig;

/// The asymmetric JWS algorithms verified here (what DPoP proofs and
/// access tokens may use; never `none` or HS*).
pub const ALGS: [&str; 4] = ["ES256", "EdDSA", "PS256", "RS256"];

/// A compact JWS split into its parts, not yet verified.
#[derive(Debug, Clone)]
pub struct Jws {
    pub header: serde_json::Value,
    pub claims: serde_json::Value,
    /// `base64url(header).base64url(claims)`, what was signed.
    pub signing_input: String,
    pub signature: Vec<u8>,
}

fn b64(s: &str) -> Result<Vec<u8>, String> {
    B64.decode(s).map_err(|e| format!("base64url: {e}"))
}

impl Jws {
    /// Splits `compact` into header, claims (both JSON objects) and
    /// signature.
    pub fn decode(compact: &str) -> Result<Jws, String> {
        let mut parts = compact.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS (three dot-separated parts)".into());
        };
        let json = |part: &str, what: &str| -> Result<serde_json::Value, String> {
            let v: serde_json::Value =
                serde_json::from_slice(&b64(part)?).map_err(|e| format!("{what}: {e}"))?;
            if v.is_object() {
                Ok(v)
            } else {
                Err(format!("{what} is not a JSON object"))
            }
        };
        Ok(Jws {
            header: json(h, "header")?,
            claims: json(p, "claims")?,
            signing_input: format!("{h}.{p}"),
            signature: b64(s)?,
        })
    }

    /// The header's `alg`, `""` when absent.
    pub fn alg(&self) -> &str {
        self.header["alg"].as_str().unwrap_or("")
    }

    /// Whether the signature verifies under `jwk` with the header's `alg`.
    pub fn verify_with(&self, jwk: &serde_json::Value) -> Result<(), String> {
        verify_signature(
            self.alg(),
            jwk,
            self.signing_input.as_bytes(),
            &self.signature,
        )
    }
}

/// Checks `signature` over `message` with public key `jwk` and JWS
/// algorithm `alg`; the key's type must fit the algorithm (an `EC` key
/// never verifies an `EdDSA` signature, ...).
pub fn verify_signature(
    alg: &str,
    jwk: &serde_json::Value,
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    let field = |n: &str| {
        jwk[n]
            .as_str()
            .ok_or_else(|| format!("the {alg} key has no `{n}`"))
            .and_then(b64)
    };
    let bad = |_| format!("the {alg} signature does not verify");
    match (alg, jwk["kty"].as_str(), jwk["crv"].as_str()) {
        ("RS256" | "PS256", Some("RSA"), _) => {
            let params = if alg == "RS256" {
                &sig::RSA_PKCS1_2048_8192_SHA256
            } else {
                &sig::RSA_PSS_2048_8192_SHA256
            };
            sig::RsaPublicKeyComponents {
                n: field("n")?,
                e: field("e")?,
            }
            .verify(params, message, signature)
            .map_err(bad)
        }
        ("ES256", Some("EC"), Some("P-256")) => {
            let mut point = vec![4u8];
            point.extend(field("x")?);
            point.extend(field("y")?);
            sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, signature)
                .map_err(bad)
        }
        ("EdDSA", Some("OKP"), Some("Ed25519")) => {
            sig::UnparsedPublicKey::new(&sig::ED25519, field("x")?)
                .verify(message, signature)
                .map_err(bad)
        }
        (alg, kty, crv) if ALGS.contains(&alg) => Err(format!(
            "a {} {} key cannot verify {alg}",
            kty.unwrap_or("(no kty)"),
            crv.unwrap_or("")
        )),
        (alg, ..) => Err(format!("algorithm {alg:?} is not verified here")),
    }
}

/// The RFC 7638 thumbprint of a public JWK: base64url(SHA-256) of its
/// required members (EC: `crv kty x y`; OKP: `crv kty x`; RSA: `e kty n`),
/// sorted, no whitespace.
pub fn thumbprint(jwk: &serde_json::Value) -> Result<String, String> {
    let members: &[&str] = match jwk["kty"].as_str() {
        Some("EC") => &["crv", "kty", "x", "y"],
        Some("OKP") => &["crv", "kty", "x"],
        Some("RSA") => &["e", "kty", "n"],
        other => return Err(format!("no thumbprint for kty {other:?}")),
    };
    // The members are listed sorted; each value is written as a JSON
    // string, with no whitespace: RFC 7638 §3.2's form.
    let mut pairs = Vec::with_capacity(members.len());
    for m in members {
        let v = jwk[*m]
            .as_str()
            .ok_or_else(|| format!("the JWK has no `{m}`"))?;
        pairs.push(format!("\"{m}\":{}", serde_json::Value::from(v)));
    }
    let text = format!("{{{}}}", pairs.join(","));
    Ok(B64.encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes())))
}

/// JWT verification keys from a JWKS (RS256, PS256, ES256, EdDSA): an
/// authorization server's `/jwks`, for the access tokens it signs.
#[derive(Debug, Clone)]
pub struct Jwks(Vec<(Option<String>, serde_json::Value)>);

impl Jwks {
    /// The keys of a JWK set (`{"keys": [...]}`).
    pub fn from_json(v: &serde_json::Value) -> Jwks {
        Jwks(
            v["keys"]
                .as_array()
                .expect("keys")
                .iter()
                .map(|k| (k["kid"].as_str().map(str::to_owned), k.clone()))
                .collect(),
        )
    }

    /// GETs the JWK set at `url` (plain HTTP).
    pub async fn fetch(url: &str) -> Jwks {
        let r = super::get(url).await;
        assert_eq!(r.status, 200, "{url}: {}", r.text());
        Jwks::from_json(&r.json())
    }

    /// The claims of `jwt` when its signature verifies under one of the
    /// keys (the one its `kid` names, when it names one).
    pub fn verify(&self, jwt: &str) -> Result<serde_json::Value, String> {
        let jws = Jws::decode(jwt)?;
        let alg = jws.alg();
        if !ALGS.contains(&alg) {
            return Err(format!("algorithm {alg:?} is not accepted"));
        }
        let kid = jws.header["kid"].as_str();
        for (k_kid, jwk) in &self.0 {
            if kid.is_some() && k_kid.as_deref() != kid {
                continue;
            }
            if jws.verify_with(jwk).is_ok() {
                return Ok(jws.claims);
            }
        }
        Err(format!("no key verifies this {alg} signature"))
    }
}
