//! Client keys for the tests: an RSA key (ring signs with RSA keys but
//! cannot generate them, so openssl does), the public JWK set an
//! authorization server registers for a key, and a key's RFC 7638
//! thumbprint (what a DPoP-bound token's `cnf.jkt` must be). EC and
//! Ed25519 keys come from `flinks_proxy::ground::jose::generate_pem`.

use std::process::Command;

use flinks_proxy::ground::jose::SigningKey;
use serde_json::{json, Value};

/// An RSA 2048 key, PKCS#8 PEM, from `openssl genpkey`.
pub fn openssl_rsa_2048() -> String {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("PEM")
}

/// The public JWK set of `pem` signing with `alg` (default: the key's,
/// see `SigningKey::from_pem`), `kid` given.
pub fn jwks_of(pem: &str, alg: Option<&str>, kid: &str) -> Value {
    let key = SigningKey::from_pem(pem, alg).expect("key");
    json!({ "keys": [key.public_jwk(Some(kid))] })
}

/// The RFC 7638 thumbprint of `pem`'s public key.
pub fn jkt_of(pem: &str) -> String {
    SigningKey::from_pem(pem, None)
        .expect("key")
        .thumbprint()
        .to_owned()
}
