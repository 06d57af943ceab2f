//! Token request unit tests: form encoding, failure classes, lifetimes
//! from the answer, and error causes.

use super::*;
use serde_json::json;

#[test]
fn form_encoding() {
    assert_eq!(form_encode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
}

#[test]
fn failure_classes() {
    let rejected = |error: &str, status| TokenError::Rejected {
        status,
        error: error.into(),
        description: None,
    };
    assert!(!rejected("invalid_client", 400).is_transient());
    assert!(rejected("invalid_grant", 400).is_refusal());
    assert!(rejected("invalid_client", 401).is_refusal());
    assert!(!rejected("temporarily_unavailable", 400).is_refusal());
    assert!(!rejected("slow_down", 429).is_refusal());
    assert!(rejected("temporarily_unavailable", 400).is_transient());
    assert!(rejected("slow_down", 429).is_transient());
    let server = TokenError::ServerError {
        status: 500,
        error: None,
    };
    assert!(server.is_transient() && !server.is_refusal());
    assert_eq!(server.outcome(), "server_error");
    let timeout = TokenError::Timeout {
        host: "h".into(),
        after: Duration::from_secs(1),
    };
    assert!(timeout.is_transient());
    assert_eq!(timeout.outcome(), "timeout");
    assert!(TokenError::InvalidResponse("x".into()).is_transient());
    assert_eq!(rejected("x", 400).outcome(), "rejected");
}

#[test]
fn lifetimes_from_outside_are_validated_and_capped() {
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    let l = |v: serde_json::Value| lifetime(Some(&v), None, now);
    assert_eq!(l(json!(3600)).unwrap(), Some(Duration::from_secs(3600)));
    assert_eq!(l(json!("3600")).unwrap(), Some(Duration::from_secs(3600)));
    assert_eq!(l(json!(1e300)).unwrap(), Some(MAX_LIFETIME));
    assert_eq!(l(json!(u64::MAX)).unwrap(), Some(MAX_LIFETIME));
    let huge: serde_json::Value = serde_json::from_str("18446744073709551616").unwrap();
    assert_eq!(l(huge).unwrap(), Some(MAX_LIFETIME));
    for bad in [
        json!(0),
        json!(-5),
        json!("abc"),
        json!(true),
        json!("NaN"),
        json!("inf"),
    ] {
        assert!(
            matches!(l(bad.clone()), Err(TokenError::InvalidResponse(_))),
            "{bad}"
        );
    }
    assert_eq!(lifetime(Some(&json!(null)), None, now).unwrap(), None);
    assert_eq!(lifetime(None, None, now).unwrap(), None);
}

#[test]
fn jwt_exp_is_capped_and_a_past_exp_is_invalid() {
    let now = UNIX_EPOCH + Duration::from_millis(1_000_000_500);
    let claims = |exp| Claims {
        exp: Some(exp),
        sub: None,
    };
    assert_eq!(
        lifetime(None, Some(&claims(1_000_060)), now).unwrap(),
        Some(Duration::from_millis(59_500))
    );
    assert_eq!(
        lifetime(None, Some(&claims(u64::MAX)), now).unwrap(),
        Some(MAX_LIFETIME)
    );
    assert!(lifetime(None, Some(&claims(5)), now).is_err());
    // expires_in wins over exp.
    assert_eq!(
        lifetime(Some(&json!(10)), Some(&claims(u64::MAX)), now).unwrap(),
        Some(Duration::from_secs(10))
    );
}

#[test]
fn causes_name_refused_connections_and_tls() {
    let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    assert_eq!(describe(&refused), "connection refused");
    let tls = std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName),
    );
    let outer = std::io::Error::other(tls);
    assert!(
        describe(&outer).starts_with("TLS: invalid peer certificate"),
        "{}",
        describe(&outer)
    );
}
