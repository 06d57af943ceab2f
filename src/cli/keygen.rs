//! `flinks-proxy keygen`: a new store key (base64 of 32 random bytes), or
//! with `--client-key` a new `private_key_jwt` key as PKCS#8 PEM and its
//! public JWK for registration at the authorization server, or with
//! `--dpop` a DPoP key (`dpop_key`) with its public JWK and RFC 7638
//! thumbprint (the `jkt` its tokens are bound to). RSA keys are
//! not generated here (ring cannot): `openssl genpkey -algorithm RSA
//! -pkeyopt rsa_keygen_bits:2048` makes one the proxy loads.

use anyhow::Context as _;

use crate::ground::jose::{self, Alg, SigningKey};

/// What `keygen` prints.
pub enum KeygenWhat {
    /// A store key.
    StoreKey,
    /// A client assertion key for `alg` (ES256 or EdDSA), its JWK's
    /// `kid` (default: the RFC 7638 thumbprint).
    ClientKey {
        /// `--alg`: ES256 (default) or EdDSA.
        alg: Option<String>,
        /// `--kid`.
        kid: Option<String>,
    },
    /// A DPoP key for `alg` (ES256 or EdDSA).
    DpopKey {
        /// `--alg`: ES256 (default) or EdDSA.
        alg: Option<String>,
    },
}

/// ES256 (the default) or EdDSA, the algorithms ring generates.
fn generated_alg(alg: Option<&str>) -> anyhow::Result<Alg> {
    Ok(match alg.unwrap_or("ES256") {
        "ES256" => Alg::Es256,
        "EdDSA" => Alg::EdDsa,
        other => anyhow::bail!(
            "--alg {other:?}: keygen makes ES256 or EdDSA keys; for PS256/RS256 use \
             `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`"
        ),
    })
}

/// Prints what `what` asks for on stdout.
pub fn keygen(what: KeygenWhat) -> anyhow::Result<()> {
    match what {
        KeygenWhat::StoreKey => {
            let key = crate::ground::crypto::generate_key().context("cannot generate a key")?;
            println!("{key}");
        }
        KeygenWhat::ClientKey { alg, kid } => {
            let alg = generated_alg(alg.as_deref())?;
            let pem = jose::generate_pem(alg).context("cannot generate a key")?;
            let key = SigningKey::from_pem(&pem, None).context("the new key")?;
            let jwk = serde_json::json!({ "keys": [key.public_jwk(kid.as_deref())] });
            print!("{pem}");
            println!("{jwk:#}");
        }
        KeygenWhat::DpopKey { alg } => {
            let alg = generated_alg(alg.as_deref())?;
            let pem = jose::generate_pem(alg).context("cannot generate a key")?;
            let key = SigningKey::from_pem(&pem, None).context("the new key")?;
            let public = serde_json::json!({
                "jwk": key.canonical_jwk(),
                "jkt": key.thumbprint(),
            });
            print!("{pem}");
            println!("{public:#}");
        }
    }
    Ok(())
}
