//! DPoP through the proxy (issue 19, CLIENT_AUTH.md "DPoP"): a credential
//! and a pool with `dpop = true` get DPoP-bound tokens from a real
//! authorization server (node's `oidc-provider` under
//! tests/oidc/client_auth.mjs `--dpop`, nonces required) and send them to a
//! resource server that verifies every proof as RFC 9449 §4.3 and §7 say
//! (tests/support/dpop.rs, its own nonces required and rotating). Each
//! server's nonce challenge costs one retry, after which the latest nonce
//! is reused; a request whose body could not be kept gets the challenge
//! back. No key, assertion, proof or token in the log, `/status` or
//! `/metrics`.
//!
//! Needs `node` and `npm ci --prefix tests/oidc`; without either the tests
//! fail saying so (they never skip).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use flinks_proxy::ground::jose::{generate_pem, Alg, SigningKey};
use http::StatusCode;
use serde_json::json;
use support::browser::Browser;
use support::connections::admin;
use support::dpop::{DpopOptions, DpopServer, Reason, Seen};
use support::keys::jkt_of;
use support::oidc::{sign_in_and_consent, AuthServer};
use support::*;

fn base64_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_owned)
        .collect()
}

fn b64url_sha256(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()))
}

/// Checks an accepted request: its proof names its method and URL (no
/// query) and its token is bound to `jkt`.
fn assert_bound(seen: &Seen, api: &DpopServer, jkt: &str) {
    assert_eq!(seen.status, StatusCode::OK, "{seen:?}");
    let proof = seen.proof_claims.as_ref().expect("proof claims");
    assert_eq!(proof["htm"], seen.method.as_str(), "{proof}");
    let path = seen.path_and_query.split('?').next().unwrap();
    assert_eq!(proof["htu"], format!("{}{path}", api.url()), "{proof}");
    let token = seen.token_claims.as_ref().expect("token claims");
    assert_eq!(token["cnf"]["jkt"], jkt, "{token}");
}

/// `private_key_jwt` + DPoP through a credential on the real binary (the
/// FAPI 2.0 pair): the token endpoint's nonce challenge is answered once,
/// with a fresh assertion and proof; every proxied request carries a fresh
/// proof of its own method and URL with `ath`, accepted by the resource
/// server; the API's nonce challenge costs one retry (GET and POST alike),
/// the nonce it rotates on its own answers costs none; a challenge to a
/// body too large to keep is passed back. `check` and `/status` show the
/// key's thumbprint, and nothing secret reaches the log, `/status` or
/// `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_proves_its_key_on_every_request_and_follows_both_servers_nonces() {
    let client_key = generate_pem(Alg::Es256).expect("key");
    let dpop_key = generate_pem(Alg::Es256).expect("key");
    let jkt = jkt_of(&dpop_key);
    let client_jwk = SigningKey::from_pem(&client_key, None)
        .unwrap()
        .public_jwk(Some("c-1"));
    let mut op = AuthServer::start(
        &json!([{
            "client_id": "fapi",
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "ES256",
            "jwks": { "keys": [client_jwk] },
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
            "dpop_bound_access_tokens": true,
        }]),
        &["--dpop"],
    )
    .await;
    let api = DpopServer::start_with(
        op.jwks().await,
        DpopOptions {
            rotate_nonce_every: Some(3),
            ..DpopOptions::default()
        },
    )
    .await;
    let credential = Credential {
        token_url: op.token_url(),
        grant_type: "client_credentials".into(),
        client_id: "fapi".into(),
        client_auth: Some("private_key_jwt".into()),
        client_key: Some(client_key.as_str().into()),
        client_key_id: Some("c-1".into()),
        client_assertion_audience: Some(op.issuer.clone()),
        body_format: Some("form".into()),
        token_timeout: Some(Duration::from_secs(5)),
        dpop: Some(true),
        dpop_key: Some(dpop_key.as_str().into()),
        ..Credential::default()
    };
    let mut toml = ProxyToml::listeners()
        .credential("bank", credential)
        .route("api", Route::credential("/", &api.url(), "bank"));
    toml.log_mut().level = Some("debug".into());
    let dir = TempDir::new();
    let cfg = toml.write(&dir);

    let (code, stdout, stderr) = run_binary(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("dpop: EC P-256 key (ES256), JWK thumbprint {jkt}")),
        "{stdout}"
    );

    let mut p = ProxyProcess::start(&cfg, &[]);
    let c = client();
    let get = |path: &str| {
        http::Request::get(p.url(path))
            .body(Default::default())
            .unwrap()
    };
    let r = send(&c, get("/v1/accounts?page=2")).await;
    assert_eq!(r.status, 200, "{}\n{}\n{}", r.text(), p.log(), op.log());
    // The token endpoint asked for its nonce once; the retry carried it,
    // with a new assertion (oidc-provider refuses a replayed jti).
    let (line, before) = op.wait_for_line("token client_credentials fapi").await;
    assert!(line.contains("token_type=DPoP"), "{line}");
    let challenges: Vec<&String> = before
        .iter()
        .filter(|l| l.starts_with("dpop POST /token") && l.contains("use_dpop_nonce"))
        .collect();
    assert_eq!(challenges.len(), 1, "{before:?}");
    assert!(challenges[0].contains("nonce=-"), "{before:?}");
    let assertions: Vec<&String> = before
        .iter()
        .filter(|l| l.starts_with("assertion "))
        .collect();
    assert!(
        !assertions.is_empty() && assertions.iter().all(|l| l.ends_with(" fresh")),
        "{before:?}"
    );
    // The API asked for its nonce once too, and the request was sent again.
    let seen = api.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].reason(), Some(Reason::NonceMissing), "{seen:?}");
    assert_bound(&seen[1], &api, &jkt);
    assert_eq!(seen[1].path_and_query, "/v1/accounts?page=2");
    let token = seen[1].dpop_token();
    assert_eq!(
        seen[1].proof_claims.as_ref().unwrap()["ath"],
        b64url_sha256(&token)
    );

    // A POST challenged after an out-of-band rotation is replayed with its
    // body; then steady state: the nonce the API rotates every third answer
    // is taken from that answer, so no request is challenged.
    api.rotate_nonce();
    let post = http::Request::post(p.url("/v1/transfers"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"amount":"12.50"}"#,
        )))
        .unwrap();
    let r = send(&c, post).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for i in 0..5 {
        let r = send(&c, get(&format!("/v1/accounts/{i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let seen = api.requests();
    assert_eq!(seen.len(), 9, "{seen:?}");
    assert_eq!(seen[2].reason(), Some(Reason::NonceStale), "{:?}", seen[2]);
    assert_eq!(seen[3].method, "POST");
    assert_eq!(&seen[3].body[..], br#"{"amount":"12.50"}"#);
    for s in &seen[3..] {
        assert_bound(s, &api, &jkt);
    }
    let jtis: std::collections::BTreeSet<String> = seen
        .iter()
        .filter_map(|s| s.proof_claims.as_ref())
        .map(|c| c["jti"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(jtis.len(), 9, "a fresh proof per request sent");

    // A body too large to keep (over 64 KiB): the challenge goes back to
    // the app, and the nonce it carried serves the next request.
    api.rotate_nonce();
    let big = http::Request::post(p.url("/v1/upload"))
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![
            b'x';
            100 * 1024
        ])))
        .unwrap();
    let r = send(&c, big).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(
        r.header("www-authenticate")
            .unwrap_or("")
            .contains("use_dpop_nonce"),
        "{:?}",
        r.headers
    );
    let r = send(&c, get("/v1/after")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = api.requests();
    assert_eq!(seen.len(), 11, "{seen:?}");
    assert_eq!(seen[9].reason(), Some(Reason::NonceStale));
    assert_bound(&seen[10], &api, &jkt);

    let status = get_text(&p.admin("/status")).await;
    let st: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(st["credentials"]["bank"]["dpop"]["jkt"], jkt, "{st}");
    assert_eq!(
        st["credentials"]["bank"]["dpop"]["token_type"], "DPoP",
        "{st}"
    );
    let metrics = get_text(&p.admin("/metrics")).await;
    assert_eq!(
        metric(
            &metrics,
            r#"flinks_proxy_dpop_nonce_retries_total{route="api"}"#
        ),
        Some(2.0),
        "the first request's and the POST's: {metrics}"
    );
    // A nonce challenge is not a rejection of the token: one token request
    // served every request, the passed-back challenge included.
    assert_eq!(
        metric(
            &metrics,
            r#"flinks_proxy_token_requests_total{credential="bank",outcome="success"}"#
        ),
        Some(1.0),
        "{metrics}"
    );

    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(20)), Some(0), "{}", p.log());
    assert!(
        p.wait_for_log(" stopped", Duration::from_secs(10)),
        "{}",
        p.log()
    );
    let log = p.log();
    assert!(log.contains("token obtained"), "worth searching:\n{log}");
    let mut secrets: Vec<(&str, String)> = Vec::new();
    for l in base64_body_lines(&dpop_key) {
        secrets.push(("DPoP key", l));
    }
    for l in base64_body_lines(&client_key) {
        secrets.push(("client key", l));
    }
    for s in &seen {
        let proof = s.headers["dpop"].to_str().unwrap().to_owned();
        secrets.push(("proof signature", proof.rsplit('.').next().unwrap().into()));
        secrets.push(("proof", proof));
    }
    secrets.push(("access token", token.clone()));
    secrets.push((
        "access token signature",
        token.rsplit('.').next().unwrap().into(),
    ));
    for a in op
        .log()
        .lines()
        .filter_map(|l| l.split(" assertion=").nth(1))
    {
        if a != "-" {
            secrets.push(("assertion", a.to_owned()));
        }
    }
    for (place, text) in [("log", &log), ("/status", &status), ("/metrics", &metrics)] {
        for (what, s) in &secrets {
            assert!(!text.contains(s.as_str()), "{what} in {place}");
        }
    }
}

async fn get_text(url: &str) -> String {
    let r = get(url).await;
    assert_eq!(r.status, 200, "{url}: {}", r.text());
    r.text()
}

/// A pool with DPoP through the connect flow: the authorize URL binds the
/// code to the pool's key (`dpop_jkt`, RFC 9449 §10), the code exchange
/// answers the token endpoint's nonce challenge, and a user's request
/// reaches the resource server with a token bound to the key (Ed25519
/// here), after one API nonce retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_binds_the_code_and_its_users_tokens_to_its_key() {
    let dpop_key = generate_pem(Alg::EdDsa).expect("key");
    let jkt = jkt_of(&dpop_key);
    let dir = TempDir::new();
    let connect = Connect::loopback(&[]);
    let callback = format!("{}/connect/callback", connect.public_url);
    let mut op = AuthServer::start(
        &json!([{
            "client_id": "pool-dpop",
            "client_secret": "pool-dpop-secret-1f0e9a8b7d4c3e2f",
            "token_endpoint_auth_method": "client_secret_post",
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "redirect_uris": [callback],
            "dpop_bound_access_tokens": true,
        }]),
        &["--dpop"],
    )
    .await;
    let api = DpopServer::start(op.jwks().await).await;
    let pool = Pool {
        token_url: op.token_url(),
        client_id: "pool-dpop".into(),
        client_secret: Some("pool-dpop-secret-1f0e9a8b7d4c3e2f".into()),
        scope: Some("openid offline_access".into()),
        body_format: Some("form".into()),
        token_timeout: Some(Duration::from_secs(5)),
        authorize_url: Some(format!("{}/auth", op.issuer)),
        issuer: Some(op.issuer.clone()),
        authorize_params: Some(BTreeMap::from([("prompt".into(), "consent".into())])),
        dpop: Some(true),
        dpop_key: Some(dpop_key.as_str().into()),
        ..Pool::default()
    };
    let toml = ProxyToml::connect_flow(pool, &api.url(), &dir.path().join("store.db"), connect);
    let proxy = start_proxy(&toml.toml()).await;

    let r = admin(&proxy, "POST", "/connect-sessions/users", Some(json!({}))).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let link = r.json()["connect_url"].as_str().unwrap().to_owned();
    let mut b = Browser::new();
    let r = b.get(&link).await;
    assert_eq!(r.status, 302, "{}", r.text());
    let authorize = r.header("location").unwrap().to_owned();
    assert!(
        authorize.contains(&format!("dpop_jkt={jkt}")),
        "the code is bound to the key: {authorize}"
    );
    let (back, _) = sign_in_and_consent(&mut b, &op.issuer, &authorize, "alice").await;
    let done = b.get(&back).await;
    assert!(
        done.text().contains("is connected"),
        "{}\n{}",
        done.text(),
        op.log()
    );
    let (line, before) = op.wait_for_line("token authorization_code pool-dpop").await;
    assert!(line.contains("token_type=DPoP"), "{line}");
    assert!(
        before
            .iter()
            .any(|l| l.starts_with("dpop POST /token") && l.contains("use_dpop_nonce")),
        "{before:?}"
    );

    let req = http::Request::get(proxy_url(&proxy, "/accounts"))
        .header(support::connections::SELECT, "alice")
        .body(Default::default())
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = api.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].reason(), Some(Reason::NonceMissing));
    assert_bound(&seen[1], &api, &jkt);
    assert_eq!(seen[1].token_claims.as_ref().unwrap()["sub"], "alice");
    assert!(
        seen[1].headers.get(support::connections::SELECT).is_none(),
        "the select header is not forwarded"
    );
}
