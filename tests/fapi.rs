//! The end-to-end gaps of issue 19 (CLIENT_AUTH.md) that tests/client_auth.rs
//! and tests/dpop.rs leave, each against node's `oidc-provider`
//! (tests/oidc/client_auth.mjs) unless the case needs an answer it does not
//! give: an RS256 client assertion (RSA key, `client_assertion_alg =
//! "RS256"`) through a credential; `client_secret_jwt` through a pool's
//! connect flow; a pool's refresh_token grant with `private_key_jwt` and
//! DPoP, forced by the resource server refusing the token
//! ([`DpopServer::refuse_next`]) rather than by waiting for it to expire,
//! with the rotated refresh token kept in the store; and a token endpoint
//! that answers a DPoP token request with a Bearer token (a small hyper
//! endpoint here: oidc-provider binds every token whose request carries a
//! proof, `dpop_bound_access_tokens` or not).
//!
//! Needs `node`, `openssl` and `npm ci --prefix tests/oidc`; without them
//! the tests fail saying so (they never skip).

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flinks_proxy::ground::jose::{generate_pem, Alg};
use flinks_proxy::Running;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use support::browser::Browser;
use support::connections::{admin, SELECT};
use support::dpop::{DpopServer, Reason, Seen};
use support::jwks::{thumbprint, Jws};
use support::keys::{jkt_of, jwks_of, openssl_rsa_2048};
use support::oidc::{sign_in_and_consent, AuthServer};
use support::*;

/// The resource oidc-provider issues JWT access tokens for.
const RESOURCE: &str = "urn:flinks-proxy:test-api";
/// `client_secret_jwt`'s shared secret (HS256 wants 32 bytes or more).
const JWT_SECRET: &str = "fapi-client-secret-jwt-secret-0d9c8b7a6f5e4d3c2b1a";
/// RFC 7523's assertion lifetime as CLIENT_AUTH.md sets it.
const ASSERTION_LIFETIME: i64 = 60;

/// The client assertion of oidc-provider's `token ...` success line.
fn assertion_of(line: &str) -> Jws {
    let jwt = line
        .split(" assertion=")
        .nth(1)
        .unwrap_or_else(|| panic!("no assertion in {line}"));
    Jws::decode(jwt).unwrap_or_else(|e| panic!("assertion {jwt:?}: {e}"))
}

/// RFC 7523 §3 claims of a client assertion for `client_id`.
fn assert_assertion_claims(a: &Jws, client_id: &str, aud: &str) {
    let c = &a.claims;
    assert_eq!(c["iss"], client_id, "{c}");
    assert_eq!(c["sub"], client_id, "{c}");
    assert_eq!(c["aud"], aud, "{c}");
    assert!(c["jti"].as_str().is_some_and(|j| !j.is_empty()), "{c}");
    let (iat, exp) = (
        c["iat"].as_i64().expect("iat"),
        c["exp"].as_i64().expect("exp"),
    );
    assert_eq!(exp - iat, ASSERTION_LIFETIME, "{c}");
}

/// An RSA key and `client_assertion_alg = "RS256"` through a credential
/// (oidc-provider's client registered for RS256 only): the token is
/// obtained and injected, and verifies against the provider's JWKS; the
/// assertion the provider received has header alg RS256 and the key's
/// kid, RFC 7523 claims, and an RSASSA-PKCS1-v1_5 signature under the
/// registered public key (checked with tests/support/jwks.rs, not the
/// proxy's JOSE code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rs256_client_assertion_authenticates_a_credential() {
    let key = openssl_rsa_2048();
    let jwks = jwks_of(&key, Some("RS256"), "rsa-256");
    let mut op = AuthServer::start(
        &json!([{
            "client_id": "pkjwt-rs256",
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "RS256",
            "jwks": jwks,
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
        }]),
        &[],
    )
    .await;
    let upstream = TestUpstream::start("api").await;
    let credential = Credential {
        token_url: op.token_url(),
        grant_type: "client_credentials".into(),
        client_id: "pkjwt-rs256".into(),
        client_auth: Some("private_key_jwt".into()),
        client_key: Some(key.as_str().into()),
        client_key_id: Some("rsa-256".into()),
        client_assertion_alg: Some("RS256".into()),
        body_format: Some("form".into()),
        token_timeout: Some(Duration::from_secs(5)),
        ..Credential::default()
    };
    let toml = ProxyToml::listeners()
        .credential("bank", credential)
        .route("api", Route::credential("/", &upstream.http_url(), "bank"));
    let proxy = start_proxy(&toml.toml()).await;

    let r = get(&proxy_url(&proxy, "/accounts")).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), op.log());
    let claims = op
        .jwks()
        .await
        .verify(&upstream.last_bearer())
        .expect("the access token verifies against the provider's JWKS");
    assert_eq!(claims["client_id"], "pkjwt-rs256", "{claims}");
    assert_eq!(claims["iss"], op.issuer, "{claims}");
    assert_eq!(claims["aud"], RESOURCE, "{claims}");

    let (line, before) = op.wait_for_line("token ").await;
    assert!(
        line.starts_with("token client_credentials pkjwt-rs256 "),
        "{line}\n{before:?}"
    );
    let assertion = assertion_of(&line);
    assert_eq!(assertion.alg(), "RS256", "{}", assertion.header);
    assert_eq!(assertion.header["kid"], "rsa-256", "{}", assertion.header);
    // The default audience: the token URL.
    assert_assertion_claims(&assertion, "pkjwt-rs256", &op.token_url());
    assertion
        .verify_with(&jwks["keys"][0])
        .expect("an RS256 signature under the registered key");
    let jti = assertion.claims["jti"].as_str().unwrap();
    assert!(
        before.contains(&format!("assertion {jti} fresh")),
        "{before:?}"
    );
    proxy.shutdown().await;
}

/// A pool: the connect flow's code exchange and the proxied requests.
struct Pooled {
    proxy: Running,
    dir: TempDir,
    toml: ProxyToml,
}

impl Pooled {
    /// Starts the proxy with `pool` as `users`, routed at `/` to
    /// `upstream`, on an SQLite store in a new folder, with the connect
    /// listener `connect`.
    async fn start(pool: Pool, upstream: &str, connect: Connect) -> Pooled {
        let dir = TempDir::new();
        let toml = ProxyToml::connect_flow(pool, upstream, &dir.path().join("store.db"), connect);
        let proxy = start_proxy(&toml.toml()).await;
        Pooled { proxy, dir, toml }
    }

    /// Stops the proxy and starts it again on the same config and store.
    async fn restart(self) -> Pooled {
        let Pooled { proxy, dir, toml } = self;
        proxy.shutdown().await;
        let proxy = start_proxy(&toml.toml()).await;
        Pooled { proxy, dir, toml }
    }

    /// Connects `user` through the connect flow (a connect session, the
    /// browser at oidc-provider's login and consent, the callback); returns
    /// the authorize URL the browser was sent to.
    async fn connect(&self, op: &AuthServer, user: &str) -> String {
        let r = admin(
            &self.proxy,
            "POST",
            "/connect-sessions/users",
            Some(json!({})),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let link = r.json()["connect_url"].as_str().unwrap().to_owned();
        let mut b = Browser::new();
        let r = b.get(&link).await;
        assert_eq!(r.status, 302, "{}", r.text());
        let authorize = r.header("location").unwrap().to_owned();
        let (back, _) = sign_in_and_consent(&mut b, &op.issuer, &authorize, user).await;
        let done = b.get(&back).await;
        assert_eq!(done.status, 200, "{}\n{}", done.text(), op.log());
        assert!(
            done.text().contains("is connected"),
            "{}\n{}",
            done.text(),
            op.log()
        );
        authorize
    }

    /// A GET through the proxy as connection `user`.
    async fn get_as(&self, user: &str, path: &str) -> Resp {
        let req = http::Request::get(proxy_url(&self.proxy, path))
            .header(SELECT, user)
            .body(Default::default())
            .unwrap();
        send(&client(), req).await
    }
}

/// A pool with `client_auth = "client_secret_jwt"`: the connect flow's
/// code exchange authenticates with an HS256 assertion (RFC 7523 claims,
/// the configured audience, an HMAC under the client secret), and a
/// proxied request carries the user's token (sub = the user, verified
/// against the provider's JWKS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_connects_a_user_with_client_secret_jwt() {
    let connect = Connect::loopback(&[]);
    let callback = format!("{}/connect/callback", connect.public_url);
    let mut op = AuthServer::start(
        &json!([{
            "client_id": "pool-csjwt",
            "client_secret": JWT_SECRET,
            "token_endpoint_auth_method": "client_secret_jwt",
            "token_endpoint_auth_signing_alg": "HS256",
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
        client_id: "pool-csjwt".into(),
        client_secret: Some(JWT_SECRET.into()),
        client_auth: Some("client_secret_jwt".into()),
        client_assertion_audience: Some(op.issuer.clone()),
        scope: Some("openid offline_access".into()),
        body_format: Some("form".into()),
        token_timeout: Some(Duration::from_secs(5)),
        authorize_url: Some(format!("{}/auth", op.issuer)),
        issuer: Some(op.issuer.clone()),
        authorize_params: Some(BTreeMap::from([("prompt".into(), "consent".into())])),
        ..Pool::default()
    };
    let p = Pooled::start(pool, &upstream.http_url(), connect).await;
    p.connect(&op, "alice").await;

    let (line, before) = op.wait_for_line("token ").await;
    assert!(
        line.starts_with("token authorization_code pool-csjwt "),
        "{line}\n{before:?}"
    );
    let assertion = assertion_of(&line);
    assert_eq!(assertion.alg(), "HS256", "{}", assertion.header);
    assert_assertion_claims(&assertion, "pool-csjwt", &op.issuer);
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, JWT_SECRET.as_bytes());
    ring::hmac::verify(
        &hmac,
        assertion.signing_input.as_bytes(),
        &assertion.signature,
    )
    .expect("an HMAC under the client secret");

    let r = p.get_as("alice", "/accounts").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let claims = op
        .jwks()
        .await
        .verify(&upstream.last_bearer())
        .expect("the access token verifies against the provider's JWKS");
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["client_id"], "pool-csjwt", "{claims}");
    assert!(
        upstream.requests()[0].headers.get(SELECT).is_none(),
        "the select header is not forwarded"
    );
    p.proxy.shutdown().await;
}

/// The next `token` line of oidc-provider that is not a DPoP nonce
/// challenge (those are `token error GRANT use_dpop_nonce: ...` lines, kept
/// with the lines passed over on the way).
async fn next_grant(op: &mut AuthServer) -> (String, Vec<String>) {
    let mut passed = Vec::new();
    loop {
        let (line, before) = op.wait_for_line("token ").await;
        passed.extend(before);
        if line.starts_with("token error ") && line.contains(" use_dpop_nonce: ") {
            passed.push(line);
        } else {
            return (line, passed);
        }
    }
}

/// The oidc-provider lines of one DPoP refresh: `before` (the lines since
/// the previous `token` line) and the refresh's success `line`. Checks a
/// fresh assertion and a bound token, and returns how many times the token
/// endpoint asked for its nonce on the way.
fn check_refresh_lines(line: &str, before: &[String], client_id: &str, issuer: &str) -> usize {
    assert!(
        line.starts_with(&format!("token refresh_token {client_id} token_type=DPoP ")),
        "{line}\n{before:?}"
    );
    let assertion = assertion_of(line);
    assert_eq!(assertion.alg(), "ES256", "{}", assertion.header);
    assert_assertion_claims(&assertion, client_id, issuer);
    let jti = assertion.claims["jti"].as_str().unwrap();
    assert!(
        before.contains(&format!("assertion {jti} fresh")),
        "{before:?}"
    );
    before
        .iter()
        .filter(|l| l.starts_with("dpop POST /token") && l.contains("use_dpop_nonce"))
        .count()
}

/// A pool with `private_key_jwt` and DPoP (FAPI 2.0's pair): a user
/// connected through the connect flow (the code bound to the key by
/// `dpop_jkt`); then the resource server refuses the user's token once as
/// `invalid_token` (`refuse_next`), so the proxy (401 is in the default
/// `reauth_on`) drops it, the pool runs a refresh_token grant with a fresh
/// assertion and proof, and the replay with the new token (another token,
/// bound to the same key) is accepted. Nonces: one challenge per server for
/// the whole exchange, none for the refresh. A refusal of the refreshed
/// token right away is passed back (the no-storm floor of CONNECTIONS.md:
/// no second refresh for a fresh replacement). After a restart the stored
/// token is used, refused once more and refreshed again: oidc-provider
/// rotates refresh tokens (and refuses a used one), so that refresh
/// succeeding shows the rotated refresh token was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_refresh_with_private_key_jwt_and_dpop_keeps_the_rotated_refresh_token() {
    let client_key = generate_pem(Alg::Es256).expect("key");
    let dpop_key = generate_pem(Alg::Es256).expect("key");
    let jkt = jkt_of(&dpop_key);
    let connect = Connect::loopback(&[]);
    let callback = format!("{}/connect/callback", connect.public_url);
    let mut op = AuthServer::start(
        &json!([{
            "client_id": "pool-fapi",
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "ES256",
            "jwks": jwks_of(&client_key, None, "fapi-1"),
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
        client_id: "pool-fapi".into(),
        client_auth: Some("private_key_jwt".into()),
        client_key: Some(client_key.as_str().into()),
        client_key_id: Some("fapi-1".into()),
        client_assertion_audience: Some(op.issuer.clone()),
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
    let p = Pooled::start(pool, &api.url(), connect).await;
    let authorize = p.connect(&op, "alice").await;
    assert!(
        authorize.contains(&format!("dpop_jkt={jkt}")),
        "the code is bound to the key: {authorize}"
    );
    let (line, before) = next_grant(&mut op).await;
    assert!(
        line.starts_with("token authorization_code pool-fapi token_type=DPoP "),
        "{line}\n{before:?}"
    );
    let code_jti = assertion_of(&line).claims["jti"].clone();
    let nonce_challenges = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.starts_with("dpop POST /token") && l.contains("use_dpop_nonce"))
            .count()
    };
    assert_eq!(nonce_challenges(&before), 1, "{before:?}");

    // The first request: the API's nonce challenge, then the refusal of
    // the code's token, a refresh, the replay.
    api.refuse_next(1);
    let r = p.get_as("alice", "/accounts").await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), op.log());
    let seen = api.requests();
    assert_eq!(
        seen.iter().map(Seen::reason).collect::<Vec<_>>(),
        [
            Some(Reason::NonceMissing),
            Some(Reason::RefusedOnDemand),
            None
        ],
        "{seen:?}"
    );
    let (line, before) = next_grant(&mut op).await;
    assert_eq!(
        check_refresh_lines(&line, &before, "pool-fapi", &op.issuer),
        0,
        "the token endpoint's nonce was kept: {before:?}"
    );
    assert_ne!(assertion_of(&line).claims["jti"], code_jti);
    let (first, second) = (seen[1].dpop_token(), seen[2].dpop_token());
    assert_ne!(first, second, "the refresh brought a new access token");
    for s in &seen[1..] {
        let token = s.token_claims.as_ref().expect("token claims");
        assert_eq!(token["cnf"]["jkt"], jkt, "{token}");
        assert_eq!(token["sub"], "alice", "{token}");
        assert_eq!(token["client_id"], "pool-fapi", "{token}");
    }
    assert_eq!(seen[2].status, StatusCode::OK);
    assert_eq!(seen[2].path_and_query, "/accounts");

    // The replacement refused right away: passed back, no refresh.
    api.refuse_next(1);
    let r = p.get_as("alice", "/accounts").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(
        r.header("www-authenticate")
            .unwrap_or("")
            .contains("error=\"invalid_token\""),
        "{:?}",
        r.headers
    );
    let seen = api.requests();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[3].reason(), Some(Reason::RefusedOnDemand));
    assert_eq!(seen[3].dpop_token(), second);

    // A new process: the stored token, refused; a refresh with the stored
    // (rotated) refresh token; one nonce challenge per server again (a
    // process keeps nonces in memory only).
    let p = p.restart().await;
    api.refuse_next(1);
    let r = p.get_as("alice", "/accounts").await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), op.log());
    let seen = api.requests();
    assert_eq!(
        seen[4..].iter().map(Seen::reason).collect::<Vec<_>>(),
        [
            Some(Reason::NonceMissing),
            Some(Reason::RefusedOnDemand),
            None
        ],
        "{seen:?}"
    );
    assert_eq!(seen[5].dpop_token(), second, "the stored token");
    let (line, before) = next_grant(&mut op).await;
    assert!(
        check_refresh_lines(&line, &before, "pool-fapi", &op.issuer) <= 1,
        "{before:?}"
    );
    let third = seen[6].dpop_token();
    assert!(third != first && third != second, "a third access token");
    let token = seen[6].token_claims.as_ref().expect("token claims");
    assert_eq!(token["cnf"]["jkt"], jkt, "{token}");
    assert_eq!(token["sub"], "alice", "{token}");

    let r = admin(&p.proxy, "GET", "/connections/users/alice", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "active", "{}", r.text());
    p.proxy.shutdown().await;
}

/// One request the Bearer token endpoint received.
#[derive(Debug, Clone)]
struct TokenRequest {
    headers: HeaderMap,
    body: Bytes,
}

/// A token endpoint on loopback that answers every request with a Bearer
/// token (as a server without DPoP support does, RFC 9449 §5: it ignores
/// the `DPoP` header), recording what it received. Stops when dropped.
struct BearerTokenEndpoint {
    url: String,
    seen: Arc<Mutex<Vec<TokenRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The access token it hands out.
const BEARER_TOKEN: &str = "plain-bearer-access-token-5e0c7d1a";

impl BearerTokenEndpoint {
    async fn start() -> BearerTokenEndpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the token endpoint");
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let recorded = Arc::clone(&recorded);
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let recorded = Arc::clone(&recorded);
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes());
                            recorded.lock().unwrap().push(TokenRequest {
                                headers: parts.headers,
                                body: body.unwrap_or_default(),
                            });
                            let answer = json!({
                                "access_token": BEARER_TOKEN,
                                "token_type": "Bearer",
                                "expires_in": 300,
                            });
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(answer.to_string())))
                                    .unwrap(),
                            )
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        BearerTokenEndpoint { url, seen, task }
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for BearerTokenEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A credential with `dpop = true` whose token endpoint answers its DPoP
/// token request (a good proof of the key: `typ`, `jwk`, `htm`, `htu`) with
/// `token_type` Bearer: the token is used as Bearer (`Authorization:
/// Bearer`, no `DPoP` header upstream, request after request) and
/// `/status` says `token_type` Bearer next to the key's thumbprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_answer_to_a_dpop_token_request_is_used_as_bearer() {
    let dpop_key = generate_pem(Alg::Es256).expect("key");
    let jkt = jkt_of(&dpop_key);
    let endpoint = BearerTokenEndpoint::start().await;
    let upstream = TestUpstream::start("api").await;
    let credential = Credential {
        token_url: endpoint.url.clone(),
        grant_type: "client_credentials".into(),
        client_id: "legacy".into(),
        client_secret: Some("legacy-secret-71c9e0".into()),
        body_format: Some("form".into()),
        token_timeout: Some(Duration::from_secs(5)),
        dpop: Some(true),
        dpop_key: Some(dpop_key.as_str().into()),
        ..Credential::default()
    };
    let toml = ProxyToml::listeners()
        .credential("legacy", credential)
        .route(
            "api",
            Route::credential("/", &upstream.http_url(), "legacy"),
        );
    let proxy = start_proxy(&toml.toml()).await;

    for path in ["/accounts", "/accounts/2"] {
        let r = get(&proxy_url(&proxy, path)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(
            upstream.last_authorization(),
            format!("Bearer {BEARER_TOKEN}")
        );
        let last = upstream.requests().pop().unwrap();
        assert!(
            last.headers.get("dpop").is_none(),
            "{path}: {:?}",
            last.headers
        );
    }

    // The token request did carry a proof of the configured key.
    let requests = endpoint.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let form = String::from_utf8_lossy(&requests[0].body).into_owned();
    assert!(form.contains("grant_type=client_credentials"), "{form}");
    let proof = requests[0].headers["dpop"].to_str().unwrap();
    let proof = Jws::decode(proof).expect("a DPoP proof");
    assert_eq!(proof.header["typ"], "dpop+jwt", "{}", proof.header);
    assert_eq!(thumbprint(&proof.header["jwk"]).unwrap(), jkt);
    proof
        .verify_with(&proof.header["jwk"])
        .expect("the proof verifies under its jwk");
    assert_eq!(proof.claims["htm"], "POST", "{}", proof.claims);
    assert_eq!(proof.claims["htu"], endpoint.url, "{}", proof.claims);
    assert!(proof.claims.get("ath").is_none(), "{}", proof.claims);

    let st = get(&admin_url(&proxy, "/status")).await.json();
    let dpop = &st["credentials"]["legacy"]["dpop"];
    assert_eq!(dpop["token_type"], "Bearer", "{st}");
    assert_eq!(dpop["jkt"], jkt, "{st}");
    proxy.shutdown().await;
}
