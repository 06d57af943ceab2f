//! The one JWT decoder of the crate: reads (never verifies) the claims of a
//! JWT-shaped access token. The proxy only needs `exp` (when the endpoint
//! gives no `expires_in`) and `sub` (the user at the Data Provider); the
//! signature is the upstream's business. This module does not know about
//! token requests or lifetimes.

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::Deserialize;

/// The claims the proxy reads from a JWT access token.
#[derive(Deserialize, Debug, Default, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Expiry, Unix seconds (a value that is not a non-negative integer
    /// that fits in 64 bits is ignored).
    #[serde(default, deserialize_with = "lenient_u64")]
    pub exp: Option<u64>,
    /// The user at the Data Provider.
    #[serde(default, deserialize_with = "lenient_string")]
    pub sub: Option<String>,
}

/// The decoded payload (middle part) of a JWT-shaped token; `None` for an
/// opaque token or a payload that is not base64url JSON.
pub fn payload(token: &str) -> Option<Vec<u8>> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .or_else(|_| URL_SAFE.decode(payload))
        .ok()
}

/// Decodes (does not verify) the claims of a JWT; `None` for opaque tokens.
pub fn jwt_claims(token: &str) -> Option<Claims> {
    serde_json::from_slice(&payload(token)?).ok()
}

fn lenient_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(serde_json::Value::deserialize(d)?.as_u64())
}

fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(claims))
    }

    #[test]
    fn claims_are_read_without_verification() {
        let c = jwt_claims(&jwt(r#"{"sub":"u1","exp":42}"#)).unwrap();
        assert_eq!(c.exp, Some(42));
        assert_eq!(c.sub.as_deref(), Some("u1"));
        assert!(jwt_claims("opaque-token").is_none());
        assert!(jwt_claims("a.!!!.c").is_none());
    }

    #[test]
    fn odd_claim_types_are_ignored_not_fatal() {
        let c = jwt_claims(&jwt(r#"{"sub":7,"exp":-1}"#)).unwrap();
        assert_eq!(c, Claims::default());
        let c = jwt_claims(&jwt(r#"{"exp":1e300}"#)).unwrap();
        assert_eq!(c.exp, None);
        let c = jwt_claims(&jwt(&format!(r#"{{"exp":{}}}"#, u64::MAX))).unwrap();
        assert_eq!(c.exp, Some(u64::MAX));
    }

    #[test]
    fn padded_payloads_decode() {
        let padded = format!("e30.{}.sig", URL_SAFE.encode(r#"{"sub":"ab"}"#));
        assert_eq!(jwt_claims(&padded).unwrap().sub.as_deref(), Some("ab"));
    }
}
