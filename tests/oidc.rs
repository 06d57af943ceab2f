//! The hosted connect flow (CONNECT.md) against a real authorization
//! server, not only the sandbox (issue 17): node's `oidc-provider`
//! (tests/oidc/server.mjs, pinned by tests/oidc/package-lock.json) with
//! PKCE required, its development login and consent pages, `iss` on the
//! callback (RFC 9207), HTTP Basic client authentication and form bodies
//! at its token endpoint, and JWT access tokens for the proxied API.
//!
//! Needs `node` and `npm ci --prefix tests/oidc`; without either the tests
//! fail saying so (they never skip).

mod support;

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use flinks_proxy::Running;
use serde_json::json;
use support::browser::{query_params, Browser};
use support::connections::admin;
use support::oidc::{lock, sign_in_and_consent, spawn_node, Spawned};
use support::*;
use tokio::sync::mpsc;

const CLIENT_ID: &str = "flinks-proxy-test";
const CLIENT_SECRET: &str = "oidc-test-secret";
/// A token request is answered in milliseconds; its log line follows it.
const LINE_DEADLINE: Duration = Duration::from_secs(10);

/// `tests/oidc/server.mjs` running under node, stopped when dropped (and
/// by itself when this process ends: it exits when its stdin closes).
struct OidcServer {
    child: Child,
    /// `http://127.0.0.1:PORT`, the issuer and the origin of its endpoints.
    issuer: String,
    /// Its stdout lines, as they come.
    lines: mpsc::UnboundedReceiver<String>,
    /// Everything it printed (stdout and stderr), for failure messages.
    log: Arc<Mutex<String>>,
}

impl OidcServer {
    /// Starts the server for one client whose redirect URI is
    /// `redirect_uri`, access tokens living `access_token_ttl` seconds, with
    /// more launcher `flags` (`--require-par`); returns once it answers (its
    /// `listening` line).
    async fn start_with(redirect_uri: &str, access_token_ttl: u64, flags: &[&str]) -> OidcServer {
        let Spawned {
            child,
            issuer,
            lines,
            log,
        } = spawn_node("server.mjs", |cmd| {
            cmd.args(["--port", "0", "--client-id", CLIENT_ID])
                .args([
                    "--client-secret",
                    CLIENT_SECRET,
                    "--redirect-uri",
                    redirect_uri,
                ])
                .args(["--access-token-ttl", &access_token_ttl.to_string()])
                .args(flags);
        })
        .await;
        assert!(issuer.starts_with("http://127.0.0.1:"), "{issuer}");
        OidcServer {
            child,
            issuer,
            lines,
            log,
        }
    }

    /// Waits for a stdout line starting with `prefix` (lines before it are
    /// passed over); panics with the log past [`LINE_DEADLINE`].
    async fn wait_for_line(&mut self, prefix: &str) -> String {
        let deadline = tokio::time::Instant::now() + LINE_DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line.starts_with(prefix) => return line,
                Ok(Some(_)) => {}
                _ => panic!("no `{prefix}` line from oidc-provider:\n{}", self.log()),
            }
        }
    }

    /// The token requests answered so far (their lines, `token GRANT` or
    /// `token error GRANT ...`): sends one of its own that must fail and
    /// reads up to its line. Whatever the proxy sent before was answered,
    /// and so printed, before this one was sent.
    async fn token_requests_so_far(&mut self) -> Vec<String> {
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
        let req = http::Request::post(format!("{}/token", self.issuer))
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=refresh_token&refresh_token=sentinel".into())
            .expect("request");
        let r = send(&client(), req).await;
        assert_eq!(r.status, 400, "{}", r.text());
        let mut seen = Vec::new();
        loop {
            let line = self.wait_for_line("token ").await;
            if line.starts_with("token error refresh_token invalid_grant") {
                return seen;
            }
            seen.push(line);
        }
    }

    fn log(&self) -> String {
        lock(&self.log).clone()
    }
}

impl Drop for OidcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy whose pool `users` is oidc-provider's client, a `[connect]`
/// listener on loopback, and route `api`: `/` to a recording upstream with
/// the connection's token.
struct Setup {
    op: OidcServer,
    proxy: Running,
    upstream: TestUpstream,
    public: String,
    _dir: TempDir,
}

/// The pool as a careful operator writes it for a generic OpenID Connect
/// server: its endpoints, Basic client authentication and form bodies
/// (RFC 6749), PKCE (the default), `iss` checked, and `offline_access`
/// with `prompt=consent` (oidc-provider issues a refresh token only then).
fn oidc_pool(issuer: &str) -> Pool {
    Pool {
        token_url: format!("{issuer}/token"),
        client_id: CLIENT_ID.to_owned(),
        client_secret: Some(CLIENT_SECRET.into()),
        scope: Some("openid offline_access".to_owned()),
        client_auth: Some("basic".to_owned()),
        body_format: Some("form".to_owned()),
        token_timeout: Some(Duration::from_secs(5)),
        authorize_url: Some(format!("{issuer}/auth")),
        issuer: Some(issuer.to_owned()),
        authorize_params: Some(BTreeMap::from([(
            "prompt".to_owned(),
            "consent".to_owned(),
        )])),
        ..Pool::default()
    }
}

/// Starts oidc-provider (access tokens living `access_token_ttl` s) and the
/// proxy, its pool changed by `f`.
async fn setup_with(access_token_ttl: u64, f: impl FnOnce(&mut Pool)) -> Setup {
    setup_on(access_token_ttl, &[], |_, p| f(p)).await
}

/// [`setup_with`] with launcher `flags`; `f` also sees the issuer.
async fn setup_on(access_token_ttl: u64, flags: &[&str], f: impl FnOnce(&str, &mut Pool)) -> Setup {
    let dir = TempDir::new();
    let connect = Connect::loopback(&[]);
    let public = connect.public_url.clone();
    let op = OidcServer::start_with(
        &format!("{public}/connect/callback"),
        access_token_ttl,
        flags,
    )
    .await;
    let upstream = TestUpstream::start("api").await;
    let mut pool = oidc_pool(&op.issuer);
    f(&op.issuer, &mut pool);
    let mut toml = ProxyToml::connect_flow(
        pool,
        &upstream.http_url(),
        &dir.path().join("store.db"),
        connect,
    );
    toml.server.request_timeout = Some(Duration::from_secs(5));
    let proxy = start_proxy(&toml.toml()).await;
    Setup {
        op,
        proxy,
        upstream,
        public,
        _dir: dir,
    }
}

async fn setup() -> Setup {
    setup_with(300, |_| {}).await
}

impl Setup {
    /// `POST /connect-sessions/users`; asserts 201 and returns (session
    /// id, connect URL).
    async fn session(&self) -> (String, String) {
        let r = admin(
            &self.proxy,
            "POST",
            "/connect-sessions/users",
            Some(json!({})),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let s = r.json();
        assert_eq!(s["state"], "pending", "{s}");
        let id = s["session_id"].as_str().expect("session_id").to_owned();
        (
            id,
            s["connect_url"].as_str().expect("connect_url").to_owned(),
        )
    }

    async fn session_state(&self, id: &str) -> serde_json::Value {
        let r = admin(
            &self.proxy,
            "GET",
            &format!("/connect-sessions/users/{id}"),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Opens `link` in `b`: asserts the 302 to oidc-provider's authorize
    /// endpoint with what a real server needs, and returns its URL.
    async fn open(&self, b: &mut Browser, link: &str) -> String {
        let r = b.get(link).await;
        assert_eq!(r.status, 302, "{}", r.text());
        let authorize = r.header("location").expect("location").to_owned();
        assert!(
            authorize.starts_with(&format!("{}/auth?", self.op.issuer)),
            "{authorize}"
        );
        authorize
    }

    /// A proxied GET as connection `id`; asserts 200 and returns the
    /// bearer token the upstream received.
    async fn call_api_as(&self, id: &str) -> String {
        let req = http::Request::get(proxy_url(&self.proxy, "/accounts"))
            .header(connections::SELECT, id)
            .body(Default::default())
            .expect("request");
        let r = send(&client(), req).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = self
            .upstream
            .requests()
            .last()
            .expect("a request upstream")
            .clone();
        let auth = seen
            .headers
            .get("authorization")
            .expect("an Authorization header");
        let token = auth
            .to_str()
            .expect("ASCII")
            .strip_prefix("Bearer ")
            .expect("a bearer token");
        token.to_owned()
    }
}

/// A JWT's payload (not verified: the proxy forwards, the API verifies).
fn jwt_payload(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON payload")
}

#[tokio::test]
async fn a_user_connects_through_oidc_provider_with_pkce_and_iss() {
    let mut s = setup().await;
    let (id, link) = s.session().await;
    let mut b = Browser::new();
    let authorize = s.open(&mut b, &link).await;
    let q = query_params(&authorize);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], format!("{}/connect/callback", s.public));
    assert_eq!(q["scope"], "openid offline_access");
    assert_eq!(
        q.get("prompt").map(String::as_str),
        Some("consent"),
        "{authorize}"
    );
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43, "{authorize}");
    assert!(q["state"].len() >= 43, "{authorize}");

    let (callback, prompts) = sign_in_and_consent(&mut b, &s.op.issuer, &authorize, "alice").await;
    assert_eq!(
        prompts,
        ["login", "consent"],
        "oidc-provider's own pages were filled in"
    );
    assert!(
        callback.starts_with(&format!("{}/connect/callback?", s.public)),
        "{callback}"
    );
    let back = query_params(&callback);
    assert!(back.contains_key("code"), "{callback}");
    assert_eq!(back["state"], q["state"]);
    let iss = back.get("iss").map(String::as_str);
    assert_eq!(iss, Some(s.op.issuer.as_str()), "RFC 9207 iss: {callback}");

    let done = b.get(&callback).await;
    assert_eq!(done.status, 200, "{}\n{}", done.text(), s.op.log());
    assert!(done.text().contains("is connected"), "{}", done.text());
    // Exchanged with Basic client authentication and the code_verifier
    // (oidc-provider requires it and checks it against the challenge).
    s.op.wait_for_line("token authorization_code").await;

    let st = s.session_state(&id).await;
    assert_eq!(st["state"], "connected", "{st}");
    assert_eq!(
        st["connection_id"], "alice",
        "the id is the access token's sub: {st}"
    );
    let c = admin(&s.proxy, "GET", "/connections/users/alice", None).await;
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["state"], "active", "{}", c.text());
    assert_eq!(c.json()["sub"], "alice", "{}", c.text());

    // The app reads the API as alice: the upstream gets oidc-provider's token.
    let token = s.call_api_as("alice").await;
    let claims = jwt_payload(&token);
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["iss"], s.op.issuer, "{claims}");
    assert_eq!(claims["client_id"], CLIENT_ID, "{claims}");
}

#[tokio::test]
async fn a_callback_whose_iss_is_not_the_configured_issuer_is_refused() {
    let mut s = setup_with(300, |p| {
        p.issuer = Some("http://127.0.0.1:9/another-issuer".into())
    })
    .await;
    let (id, link) = s.session().await;
    let mut b = Browser::new();
    let authorize = s.open(&mut b, &link).await;
    let (callback, _) = sign_in_and_consent(&mut b, &s.op.issuer, &authorize, "alice").await;
    assert_eq!(query_params(&callback)["iss"], s.op.issuer, "{callback}");

    let r = b.get(&callback).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("iss"), "the page says why: {}", r.text());
    let st = s.session_state(&id).await;
    assert_eq!(st["state"], "pending", "the session is unchanged: {st}");
    assert!(st["connection_id"].is_null(), "{st}");
    let c = admin(&s.proxy, "GET", "/connections/users/alice", None).await;
    assert_eq!(c.status, 404, "no connection: {}", c.text());
    let exchanges = s.op.token_requests_so_far().await;
    assert!(exchanges.is_empty(), "nothing exchanged: {exchanges:?}");
}

#[tokio::test]
async fn without_pkce_oidc_provider_refuses_and_the_session_fails_with_its_error() {
    let s = setup_with(300, |p| p.pkce = Some(false)).await;
    let (id, link) = s.session().await;
    let mut b = Browser::new();
    let authorize = s.open(&mut b, &link).await;
    assert!(
        !query_params(&authorize).contains_key("code_challenge"),
        "{authorize}"
    );
    let (callback, prompts) = sign_in_and_consent(&mut b, &s.op.issuer, &authorize, "alice").await;
    assert!(prompts.is_empty(), "refused before any page: {prompts:?}");
    let back = query_params(&callback);
    assert_eq!(back["error"], "invalid_request", "{callback}");
    assert!(back["error_description"].contains("PKCE"), "{callback}");

    let r = b.get(&callback).await;
    assert_eq!(r.status, 200, "the result page: {}", r.text());
    assert!(r.text().contains("not connected"), "{}", r.text());
    assert!(r.text().contains("invalid_request"), "{}", r.text());
    let st = s.session_state(&id).await;
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["error"]["error"], "invalid_request", "{st}");
}

#[tokio::test]
async fn past_its_expiry_the_api_gets_a_token_the_proxy_refreshed_at_oidc_provider() {
    const TTL: u64 = 2;
    let mut s = setup_with(TTL, |_| {}).await;
    let (id, link) = s.session().await;
    let mut b = Browser::new();
    let authorize = s.open(&mut b, &link).await;
    let (callback, _) = sign_in_and_consent(&mut b, &s.op.issuer, &authorize, "alice").await;
    assert_eq!(b.get(&callback).await.status, 200);
    assert_eq!(s.session_state(&id).await["state"], "connected");
    s.op.wait_for_line("token authorization_code").await;

    let first = s.call_api_as("alice").await;
    let exp = jwt_payload(&first)["exp"].as_u64().expect("exp");
    // The event is the token's expiry: past it no request may carry it,
    // whether the proxy refreshed ahead (half the lifetime) or on demand.
    // JWT times are whole seconds (`exp` = the issue second + TTL), so a
    // second more covers a token issued late in its second.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    let expired = Duration::from_secs(exp + 1).saturating_sub(now);
    assert!(
        expired <= Duration::from_secs(TTL + 1),
        "exp {exp} is within the TTL"
    );
    tokio::time::sleep(expired).await;

    let second = s.call_api_as("alice").await;
    assert_ne!(second, first, "a new access token after expiry");
    s.op.wait_for_line("token refresh_token").await;
    let claims = jwt_payload(&second);
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert!(claims["exp"].as_u64().expect("exp") > exp, "{claims}");
    let c = admin(&s.proxy, "GET", "/connections/users/alice", None)
        .await
        .json();
    assert_eq!(c["state"], "active", "{c}");
    assert!(!c["last_refresh_at"].is_null(), "{c}");
}

#[tokio::test]
async fn with_par_the_browser_carries_only_a_request_uri_and_the_user_connects() {
    let mut s = setup_on(300, &["--require-par"], |issuer, p| {
        p.par_url = Some(format!("{issuer}/request"));
    })
    .await;
    let (id, link) = s.session().await;
    let mut b = Browser::new();
    let authorize = s.open(&mut b, &link).await;
    let q = query_params(&authorize);
    let keys: Vec<&str> = q.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["client_id", "request_uri"],
        "RFC 9126 §4: {authorize}"
    );
    assert_eq!(q["client_id"], CLIENT_ID);
    assert!(
        q["request_uri"].starts_with("urn:ietf:params:oauth:request_uri:"),
        "{authorize}"
    );
    let (callback, prompts) = sign_in_and_consent(&mut b, &s.op.issuer, &authorize, "alice").await;
    assert_eq!(prompts, ["login", "consent"], "{}", s.op.log());
    let done = b.get(&callback).await;
    assert_eq!(done.status, 200, "{}\n{}", done.text(), s.op.log());
    s.op.wait_for_line("token authorization_code").await;
    let st = s.session_state(&id).await;
    assert_eq!(st["state"], "connected", "{st}");
    let token = s.call_api_as("alice").await;
    assert_eq!(jwt_payload(&token)["sub"], "alice");
}

#[tokio::test]
async fn a_client_that_must_push_is_refused_without_par_and_the_session_fails() {
    let s = setup_on(300, &["--require-par"], |_, _| {}).await;
    let (id, link) = s.session().await;
    let mut b = Browser::new();
    let authorize = s.open(&mut b, &link).await;
    assert!(
        query_params(&authorize).contains_key("state"),
        "{authorize}"
    );
    let (callback, _) = sign_in_and_consent(&mut b, &s.op.issuer, &authorize, "alice").await;
    let back = query_params(&callback);
    assert_eq!(back["error"], "invalid_request", "{callback}");
    let r = b.get(&callback).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let st = s.session_state(&id).await;
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["error"]["error"], "invalid_request", "{st}");
}

#[tokio::test]
async fn a_par_endpoint_that_cannot_be_reached_shows_a_retry_page_and_keeps_the_session() {
    // Nothing listens there: a network error, which may pass (a 4xx
    // answer ends the session instead, see below).
    let port = free_port();
    let s = setup_on(300, &[], |_, p| {
        p.par_url = Some(format!("http://127.0.0.1:{port}/par"));
    })
    .await;
    let (id, link) = s.session().await;
    let mut b = Browser::new();
    let r = b.get(&link).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("try again") || r.text().contains("Reload"),
        "{}",
        r.text()
    );
    assert_eq!(r.header("retry-after"), Some("30"));
    let st = s.session_state(&id).await;
    assert_eq!(
        st["state"], "pending",
        "the same browser may try again: {st}"
    );
    assert!(!r.text().contains(CLIENT_SECRET));
}

#[tokio::test]
async fn a_pushed_request_the_provider_refuses_fails_the_session_with_its_error() {
    let s = setup_on(300, &["--require-par"], |issuer, p| {
        p.par_url = Some(format!("{issuer}/request"));
        p.client_secret = Some("not-the-secret".into());
    })
    .await;
    let (id, link) = s.session().await;
    let mut b = Browser::new();
    let r = b.get(&link).await;
    // No browser could go on: the result page, as for a denied consent.
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("not connected"), "{}", r.text());
    assert!(r.text().contains("invalid_client"), "{}", r.text());
    let st = s.session_state(&id).await;
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["error"]["error"], "invalid_client", "{st}");
    let again = b.get(&link).await;
    assert_eq!(again.status, 409, "the link has ended: {}", again.text());
}
