//! `client_auth = "private_key_jwt"` and `"client_secret_jwt"` (issue 19,
//! CLIENT_AUTH.md) against a real authorization server: node's
//! `oidc-provider` (tests/oidc/client_auth.mjs, pinned by
//! tests/oidc/package-lock.json) with one client per method (ES256, PS256
//! and EdDSA keys, HS256 with the client secret), the client_credentials
//! grant, revocation and JWT access tokens. The API side verifies each
//! token the proxy injected against the provider's JWKS (tests/support/jwks.rs).
//!
//! Needs `node` and `npm ci --prefix tests/oidc`; without either the tests
//! fail saying so (they never skip).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flinks_proxy::ground::jose::{generate_pem, Alg};
use serde_json::json;
use support::browser::Browser;
use support::connections::admin;
use support::jwks::Jwks;
use support::keys::{jwks_of, openssl_rsa_2048};
use support::oidc::{sign_in_and_consent, AuthServer};
use support::*;

const RESOURCE: &str = "urn:flinks-proxy:test-api";
/// `client_secret_jwt`'s shared secret (HS256 wants 32 bytes or more).
const JWT_SECRET: &str = "client-secret-jwt-test-secret-6c1f0e9a8b7d4c3e2f1a";

/// A `private_key_jwt` client of oidc-provider.
fn pkjwt_client(id: &str, alg: &str, jwks: serde_json::Value) -> serde_json::Value {
    json!({
        "client_id": id,
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": alg,
        "jwks": jwks,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
    })
}

/// The claims of a JWT verified against `jwks` (oidc-provider signs its
/// access tokens with its development RSA key).
fn verify_jwt(jwks: &Jwks, jwt: &str) -> serde_json::Value {
    jwks.verify(jwt)
        .expect("the access token's signature verifies against the provider's JWKS")
}

fn base64_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_owned)
        .collect()
}

/// Each method through a credential (client_credentials), on the real
/// binary at debug level: tokens obtained and injected, verified against
/// the provider's JWKS; two token requests by one client both accepted
/// (fresh jtis, which oidc-provider checks); a key the provider does not
/// know is invalid_client: a 503 to the app and /status saying so; no key,
/// secret, assertion or token in the log, /status or /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_method_authenticates_a_credential_and_an_unknown_key_is_invalid_client() {
    let es256 = generate_pem(Alg::Es256).expect("key");
    let eddsa = generate_pem(Alg::EdDsa).expect("key");
    let ps256 = openssl_rsa_2048();
    let unknown = generate_pem(Alg::Es256).expect("key");
    let clients = json!([
        pkjwt_client("pkjwt-es256", "ES256", jwks_of(&es256, None, "es-1")),
        pkjwt_client("pkjwt-ps256", "PS256", jwks_of(&ps256, None, "rsa-1")),
        pkjwt_client("pkjwt-eddsa", "EdDSA", jwks_of(&eddsa, None, "ed-1")),
        {
            "client_id": "csjwt",
            "client_secret": JWT_SECRET,
            "token_endpoint_auth_method": "client_secret_jwt",
            "token_endpoint_auth_signing_alg": "HS256",
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
        },
    ]);
    let mut op = AuthServer::start(&clients, &[]).await;
    let upstream = TestUpstream::start("api").await;
    let cred = |client_id: &str, auth: &str| Credential {
        token_url: op.token_url(),
        grant_type: "client_credentials".into(),
        client_id: client_id.into(),
        client_auth: Some(auth.into()),
        body_format: Some("form".into()),
        token_timeout: Some(Duration::from_secs(5)),
        ..Credential::default()
    };
    let pkjwt = |client_id: &str, pem: &str, kid: &str| Credential {
        client_key: Some(pem.into()),
        client_key_id: Some(kid.into()),
        ..cred(client_id, "private_key_jwt")
    };
    let creds = [
        ("es256", pkjwt("pkjwt-es256", &es256, "es-1")),
        ("es256_again", pkjwt("pkjwt-es256", &es256, "es-1")),
        ("ps256", pkjwt("pkjwt-ps256", &ps256, "rsa-1")),
        ("eddsa", pkjwt("pkjwt-eddsa", &eddsa, "ed-1")),
        (
            "csjwt",
            Credential {
                client_secret: Some(JWT_SECRET.into()),
                client_assertion_audience: Some(op.issuer.clone()),
                ..cred("csjwt", "client_secret_jwt")
            },
        ),
        ("unknown", pkjwt("pkjwt-es256", &unknown, "es-1")),
    ];
    let mut toml = ProxyToml::listeners();
    toml.log_mut().level = Some("debug".into());
    for (name, c) in creds {
        toml = toml.credential(name, c).route(
            name,
            Route::credential(&format!("/{name}/"), &upstream.http_url(), name),
        );
    }
    let dir = TempDir::new();
    let cfg = toml.write(&dir);
    let mut p = ProxyProcess::start(&cfg, &[]);
    let jwks = op.jwks().await;

    let c = client();
    let mut tokens = Vec::new();
    for (name, client_id) in [
        ("es256", "pkjwt-es256"),
        ("es256_again", "pkjwt-es256"),
        ("ps256", "pkjwt-ps256"),
        ("eddsa", "pkjwt-eddsa"),
        ("csjwt", "csjwt"),
    ] {
        let req = http::Request::get(p.url(&format!("/{name}/accounts")))
            .body(Default::default())
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(r.status, 200, "{name}: {}\n{}", r.text(), op.log());
        let token = upstream.last_bearer();
        let claims = verify_jwt(&jwks, &token);
        assert_eq!(claims["client_id"], client_id, "{name}: {claims}");
        assert_eq!(claims["iss"], op.issuer, "{claims}");
        assert_eq!(claims["aud"], RESOURCE, "{claims}");
        tokens.push(token);
    }
    // The proxy may have fetched them in any order (at start, or at the
    // first request): five accepted token requests, two of them by
    // pkjwt-es256.
    let (mut granted, mut refused) = (Vec::new(), Vec::new());
    while granted.len() < 5 {
        let (line, _) = op.wait_for_line("token ").await;
        match line.strip_prefix("token client_credentials ") {
            Some(rest) => granted.push(rest.split(' ').next().unwrap_or_default().to_owned()),
            None => refused.push(line),
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        [
            "csjwt",
            "pkjwt-eddsa",
            "pkjwt-es256",
            "pkjwt-es256",
            "pkjwt-ps256"
        ],
        "{}",
        op.log()
    );
    assert_ne!(tokens[0], tokens[1], "two token requests of one client");

    // A key oidc-provider does not know: invalid_client, as a wrong secret.
    let req = http::Request::get(p.url("/unknown/accounts"))
        .body(Default::default())
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.header("content-type").unwrap_or("").contains("json"),
        "{:?}",
        r.headers
    );
    assert!(r.text().contains("invalid_client"), "{}", r.text());
    if refused.is_empty() {
        refused.push(op.wait_for_line("token error").await.0);
    }
    assert!(
        refused[0].starts_with("token error client_credentials invalid_client"),
        "{refused:?}"
    );
    let status = get(&p.admin("/status")).await;
    let st = status.json();
    assert_eq!(
        st["credentials"]["unknown"]["last_error"]["error"], "invalid_client",
        "{st}"
    );
    let metrics = get(&p.admin("/metrics")).await;
    assert_eq!(metrics.status, 200);
    let outcome = |cred: &str, o: &str| {
        metric(
            &metrics.text(),
            &format!("flinks_proxy_token_requests_total{{credential=\"{cred}\",outcome=\"{o}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(outcome("unknown", "rejected") >= 1.0, "{}", metrics.text());
    assert_eq!(outcome("unknown", "success"), 0.0);
    assert_eq!(outcome("es256", "success"), 1.0, "{}", metrics.text());

    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(20)), Some(0), "{}", p.log());
    let end = Instant::now() + Duration::from_secs(10);
    while !p.log().lines().any(|l| l.trim_end().ends_with(" stopped")) {
        assert!(Instant::now() < end, "no final log line:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = p.log();
    assert!(
        log.contains("token obtained"),
        "the log is worth searching:\n{log}"
    );

    // Every assertion the provider accepted had a jti of its own.
    let op_log = op.log();
    let jtis: Vec<&str> = op_log
        .lines()
        .filter_map(|l| l.strip_prefix("assertion "))
        .collect();
    assert_eq!(jtis.len(), 5, "one per accepted token request:\n{op_log}");
    assert!(jtis.iter().all(|j| j.ends_with(" fresh")), "{jtis:?}");
    let mut unique: Vec<&str> = jtis.iter().map(|j| j.split(' ').next().unwrap()).collect();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "{jtis:?}");
    let assertions: Vec<&str> = op_log
        .lines()
        .filter_map(|l| l.split(" assertion=").nth(1))
        .collect();
    assert_eq!(assertions.len(), 5, "{op_log}");

    let mut secrets: Vec<(String, String)> = Vec::new();
    for (what, pem) in [
        ("es256", &es256),
        ("ps256", &ps256),
        ("eddsa", &eddsa),
        ("unknown", &unknown),
    ] {
        for l in base64_body_lines(pem) {
            secrets.push((format!("{what} key"), l));
        }
    }
    secrets.push(("client secret".into(), JWT_SECRET.into()));
    for a in assertions {
        secrets.push(("assertion".into(), a.to_owned()));
        let sig = a.rsplit('.').next().unwrap();
        secrets.push(("assertion signature".into(), sig.to_owned()));
    }
    for t in &tokens {
        secrets.push(("access token".into(), t.clone()));
        secrets.push((
            "access token claims".into(),
            t.split('.').nth(1).unwrap().to_owned(),
        ));
    }
    for (place, text) in [
        ("log", &log),
        ("/status", &status.text()),
        ("/metrics", &metrics.text()),
    ] {
        for (what, s) in &secrets {
            assert!(!text.contains(s.as_str()), "{what} in {place}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_connects_and_revokes_with_private_key_jwt() {
    let key = generate_pem(Alg::EdDsa).expect("key");
    let dir = TempDir::new();
    let connect = Connect::loopback(&[]);
    let public = connect.public_url.clone();
    let callback = format!("{public}/connect/callback");
    let mut op = AuthServer::start(
        &json!([{
            "client_id": "pool-eddsa",
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "EdDSA",
            "jwks": jwks_of(&key, None, "pool-1"),
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "redirect_uris": [callback],
        }]),
        &[],
    )
    .await;
    let upstream = TestUpstream::start("api").await;
    let pool = Pool {
        token_url: op.token_url(),
        client_id: "pool-eddsa".into(),
        client_auth: Some("private_key_jwt".into()),
        client_key: Some(key.as_str().into()),
        client_key_id: Some("pool-1".into()),
        client_assertion_audience: Some(op.issuer.clone()),
        scope: Some("openid offline_access".into()),
        body_format: Some("form".into()),
        token_timeout: Some(Duration::from_secs(5)),
        authorize_url: Some(format!("{}/auth", op.issuer)),
        issuer: Some(op.issuer.clone()),
        revoke_url: Some(format!("{}/token/revocation", op.issuer)),
        authorize_params: Some(BTreeMap::from([("prompt".into(), "consent".into())])),
        ..Pool::default()
    };
    let toml = ProxyToml::connect_flow(
        pool,
        &upstream.http_url(),
        &dir.path().join("store.db"),
        connect,
    );
    let proxy = start_proxy(&toml.toml()).await;

    let r = admin(&proxy, "POST", "/connect-sessions/users", Some(json!({}))).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let link = r.json()["connect_url"].as_str().unwrap().to_owned();
    let mut b = Browser::new();
    let r = b.get(&link).await;
    assert_eq!(r.status, 302, "{}", r.text());
    let authorize = r.header("location").unwrap().to_owned();
    let (back, _) = sign_in_and_consent(&mut b, &op.issuer, &authorize, "alice").await;
    assert!(back.starts_with(&callback), "{back}");
    let done = b.get(&back).await;
    assert_eq!(done.status, 200, "{}\n{}", done.text(), op.log());
    assert!(
        done.text().contains("is connected"),
        "{}\n{}",
        done.text(),
        op.log()
    );
    let (line, _) = op
        .wait_for_line("token authorization_code pool-eddsa")
        .await;
    let sent = line.split(" assertion=").nth(1).unwrap_or("-");
    assert_eq!(
        sent.split('.').count(),
        3,
        "a client assertion was sent: {line}"
    );

    let req = http::Request::get(proxy_url(&proxy, "/accounts"))
        .header(support::connections::SELECT, "alice")
        .body(Default::default())
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let claims = verify_jwt(&op.jwks().await, &upstream.last_bearer());
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["client_id"], "pool-eddsa", "{claims}");

    let r = admin(&proxy, "DELETE", "/connections/users/alice", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["revoked"], true, "{}\n{}", r.text(), op.log());
    op.wait_for_line("revoked").await;
    let jtis: Vec<String> = op
        .log()
        .lines()
        .filter_map(|l| l.strip_prefix("assertion "))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        jtis.len(),
        2,
        "the code exchange and the revocation: {jtis:?}"
    );
    assert!(jtis.iter().all(|j| j.ends_with(" fresh")), "{jtis:?}");
    assert_ne!(jtis[0], jtis[1]);
}
