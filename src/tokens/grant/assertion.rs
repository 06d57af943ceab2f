//! The client assertion of `private_key_jwt` and `client_secret_jwt`
//! (RFC 7523 §2.2 and §3, OpenID Connect Core §9): a JWT made fresh for
//! every token or revocation request, never reused, never logged. The
//! signing itself is [`crate::ground::jose`]'s.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::{Endpoint, TokenError};
use crate::config::ClientAuth;
use crate::ground::crypto::{hex, random_bytes};
use crate::ground::jose;
use crate::ground::secret::Secret;

/// `client_assertion_type` of a JWT assertion (RFC 7523 §2.2).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long an assertion is good for: one request's worth, with room for
/// clock skew at the server, and short so a captured one dies soon.
pub const ASSERTION_LIFETIME_SECS: u64 = 60;

/// A new assertion for `endpoint`, when its `client_auth` uses one.
pub fn client_assertion(endpoint: &Endpoint) -> Result<Option<Secret>, TokenError> {
    if !endpoint.client_auth.is_jwt() {
        return Ok(None);
    }
    let config = endpoint.assertion.as_ref().ok_or_else(|| {
        TokenError::State(format!(
            "client_auth = \"{}\" without its keys",
            endpoint.client_auth.as_str()
        ))
    })?;
    let jti = random_bytes::<16>()
        .map_err(|e| TokenError::State(format!("cannot make a client assertion: {e}")))?;
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let aud = config
        .audience
        .clone()
        .unwrap_or_else(|| endpoint.token_url.to_string());
    let claims = json!({
        "iss": endpoint.client_id,
        "sub": endpoint.client_id,
        "aud": aud,
        "jti": hex(&jti),
        "iat": iat,
        "exp": iat + ASSERTION_LIFETIME_SECS,
    });
    let jwt = match (endpoint.client_auth, &config.key) {
        (ClientAuth::PrivateKeyJwt, Some(key)) => key
            .sign("JWT", config.key_id.as_deref(), &[], &claims)
            .map_err(|e| TokenError::State(format!("cannot sign the client assertion: {e}")))?,
        (ClientAuth::ClientSecretJwt, _) => {
            let secret = endpoint.client_secret.as_ref().ok_or_else(|| {
                TokenError::State(
                    "client_auth = \"client_secret_jwt\" without client_secret".into(),
                )
            })?;
            jose::hs256(secret.expose().as_bytes(), "JWT", &claims)
        }
        _ => {
            return Err(TokenError::State(
                "client_auth = \"private_key_jwt\" without client_key".into(),
            ))
        }
    };
    Ok(Some(Secret::new(jwt)))
}
