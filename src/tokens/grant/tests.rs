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

/// The form fields of the token request `endpoint` builds for `grant`.
fn sent_fields(
    endpoint: &Endpoint,
    grant: Grant<'_>,
) -> std::collections::BTreeMap<String, String> {
    use http_body_util::BodyExt;
    let assertion = client_assertion(endpoint).expect("assertion");
    let req = build(endpoint, grant, assertion.as_ref()).expect("request");
    let body = block_on(req.into_body().collect())
        .expect("a full body")
        .to_bytes();
    crate::ground::form::decode_pairs(std::str::from_utf8(&body).unwrap())
        .expect("a form body")
        .into_iter()
        .collect()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn jwt_parts(jwt: &str) -> (serde_json::Value, serde_json::Value) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let p: Vec<&str> = jwt.split('.').collect();
    assert_eq!(p.len(), 3, "{jwt}");
    let json = |s: &str| serde_json::from_slice(&B64.decode(s).unwrap()).unwrap();
    (json(p[0]), json(p[1]))
}

fn jwt_endpoint(auth: ClientAuth) -> Endpoint {
    use crate::ground::jose::{generate_pem, Alg, SigningKey};
    let mut e = Endpoint::new(
        "c",
        "https://as.example/token".parse().unwrap(),
        "cid",
        &[],
        None,
    )
    .unwrap();
    e.client_auth = auth;
    e.body_format = BodyFormat::Form;
    e.client_secret = Some(Secret::new("shh".to_owned()));
    let key = (auth == ClientAuth::PrivateKeyJwt)
        .then(|| Arc::new(SigningKey::from_pem(&generate_pem(Alg::Es256).unwrap(), None).unwrap()));
    e.assertion = Some(ClientAssertion {
        key,
        key_id: Some("k1".into()),
        audience: None,
    });
    e
}

#[test]
fn private_key_jwt_sends_a_fresh_assertion_and_no_secret() {
    let e = jwt_endpoint(ClientAuth::PrivateKeyJwt);
    let first = sent_fields(&e, Grant::ClientCredentials);
    assert_eq!(first["client_id"], "cid");
    assert_eq!(first["client_assertion_type"], ASSERTION_TYPE);
    assert!(!first.contains_key("client_secret"), "{first:?}");
    let (header, claims) = jwt_parts(&first["client_assertion"]);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], "k1");
    assert_eq!(claims["iss"], "cid");
    assert_eq!(claims["sub"], "cid");
    assert_eq!(claims["aud"], "https://as.example/token");
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 60);
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32, "{claims}");
    let second = sent_fields(&e, Grant::ClientCredentials);
    let (_, again) = jwt_parts(&second["client_assertion"]);
    assert_ne!(again["jti"], claims["jti"], "a new jti per request");
    assert_ne!(second["client_assertion"], first["client_assertion"]);
}

#[test]
fn client_secret_jwt_signs_hs256_with_the_secret_and_a_configured_audience() {
    let mut e = jwt_endpoint(ClientAuth::ClientSecretJwt);
    e.assertion.as_mut().unwrap().audience = Some("https://as.example".into());
    let f = sent_fields(
        &e,
        Grant::RefreshToken {
            refresh_token: "rt",
        },
    );
    assert!(!f.contains_key("client_secret"), "{f:?}");
    assert_eq!(f["refresh_token"], "rt");
    let jwt = &f["client_assertion"];
    let (header, claims) = jwt_parts(jwt);
    assert_eq!(header["alg"], "HS256");
    assert_eq!(claims["aud"], "https://as.example");
    let (input, sig) = jwt.rsplit_once('.').unwrap();
    use base64::Engine as _;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"shh");
    ring::hmac::verify(&key, input.as_bytes(), &sig).expect("HS256 with client_secret");
}

#[test]
fn a_json_body_carries_the_assertion_fields_too() {
    use http_body_util::BodyExt;
    let mut e = jwt_endpoint(ClientAuth::PrivateKeyJwt);
    e.body_format = BodyFormat::Json;
    let assertion = client_assertion(&e).expect("assertion");
    let req = build(&e, Grant::ClientCredentials, assertion.as_ref()).expect("request");
    let body = block_on(req.into_body().collect())
        .expect("body")
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(v["client_id"], "cid");
    assert_eq!(v["client_assertion_type"], ASSERTION_TYPE);
    assert_eq!(
        v["client_assertion"]
            .as_str()
            .expect("assertion")
            .split('.')
            .count(),
        3
    );
    assert!(v.get("client_secret").is_none(), "{v}");
}

#[test]
fn an_answer_quoting_the_assertion_is_scrubbed() {
    let e = jwt_endpoint(ClientAuth::PrivateKeyJwt);
    let assertion = client_assertion(&e).unwrap().unwrap();
    let body = json!({
        "error": "invalid_client",
        "error_description": format!("bad assertion {}", assertion.expose()),
    })
    .to_string();
    let err = refusal(
        &e,
        Grant::ClientCredentials,
        StatusCode::UNAUTHORIZED,
        body.as_bytes(),
        Some(&assertion),
    );
    let text = err.to_string();
    assert!(text.contains("bad assertion ***"), "{text}");
    assert!(!text.contains(assertion.expose()), "{text}");
}

fn dpop_endpoint() -> Endpoint {
    use crate::ground::jose::{generate_pem, Alg, SigningKey};
    let mut e = jwt_endpoint(ClientAuth::PrivateKeyJwt);
    e.token_url = "https://as.example/token?tenant=1".parse().unwrap();
    let key = SigningKey::from_pem(&generate_pem(Alg::EdDsa).unwrap(), None).unwrap();
    e.dpop = Some(Arc::new(Dpop::new(Arc::new(key))));
    e
}

#[test]
fn a_dpop_token_request_carries_a_proof_of_post_to_the_token_url() {
    let e = dpop_endpoint();
    let req = build(&e, Grant::ClientCredentials, None).unwrap();
    let proof = req.headers().get(&DPOP).expect("a DPoP header");
    assert!(proof.is_sensitive());
    let (header, claims) = jwt_parts(proof.to_str().unwrap());
    assert_eq!(header["typ"], "dpop+jwt");
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["jwk"]["kty"], "OKP");
    assert_eq!(claims["htm"], "POST");
    assert_eq!(claims["htu"], "https://as.example/token", "no query");
    assert!(claims.get("ath").is_none(), "{claims}");
    let again = build(&e, Grant::ClientCredentials, None).unwrap();
    assert_ne!(
        jwt_parts(again.headers()[&DPOP].to_str().unwrap()).1["jti"],
        claims["jti"]
    );
    let plain = jwt_endpoint(ClientAuth::PrivateKeyJwt);
    let req = build(&plain, Grant::ClientCredentials, None).unwrap();
    assert!(req.headers().get(&DPOP).is_none());
}

#[test]
fn token_type_dpop_is_taken_only_from_a_dpop_request() {
    let g = Grant::ClientCredentials;
    let at = || Some("tok".to_owned());
    let e = dpop_endpoint();
    assert!(access_token(&e, g, at(), Some("DPoP")).unwrap().1);
    assert!(access_token(&e, g, at(), Some("dpop")).unwrap().1);
    assert!(!access_token(&e, g, at(), Some("Bearer")).unwrap().1);
    assert!(!access_token(&e, g, at(), None).unwrap().1);
    let plain = jwt_endpoint(ClientAuth::PrivateKeyJwt);
    let err = access_token(&plain, g, at(), Some("DPoP")).unwrap_err();
    assert!(err.to_string().contains("needs dpop = true"), "{err}");
    assert!(asks_for_nonce(
        StatusCode::BAD_REQUEST,
        br#"{"error":"use_dpop_nonce"}"#
    ));
    assert!(!asks_for_nonce(
        StatusCode::UNAUTHORIZED,
        br#"{"error":"use_dpop_nonce"}"#
    ));
    assert!(!asks_for_nonce(
        StatusCode::BAD_REQUEST,
        br#"{"error":"invalid_dpop_proof"}"#
    ));
}
