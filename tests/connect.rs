//! The hosted connect flow (CONNECT.md) against the sandbox, by scripted
//! HTTP: manual redirects and a cookie jar per browser, one test per
//! security point of issue 17. The real-browser run is tests/browser.rs.

mod support;

use std::time::Duration;

use flinks_proxy::Running;
use serde_json::json;
use support::browser::{query_params, Browser};
use support::connections::{admin, users_sandbox, SELECT};
use support::*;

const APP: &str = "https://app.example.com/";

/// The sandbox pool `users` with the connect flow: PKCE, a `[connect]`
/// listener on loopback allowing `https://app.example.com/`.
fn connect_toml(sb: &flinks_proxy::sandbox::Sandbox, dir: &TempDir) -> ProxyToml {
    ProxyToml::pool(sb, &dir.path().join("store.db"), &connections::new_key()).with(|c| {
        let p = c.pool_mut("users");
        p.authorize_url = Some(sb.authorize_url());
        p.scope = Some("ACCOUNT_BASIC TRANSACTIONS".into());
        c.connect = Some(Connect::loopback(&[APP]));
    })
}

struct Flow {
    proxy: Running,
    sb: flinks_proxy::sandbox::Sandbox,
    public: String,
    _dir: TempDir,
}

async fn flow_with(f: impl FnOnce(&mut ProxyToml)) -> Flow {
    flow_on(users_sandbox(3600, false).await, f).await
}

async fn flow_on(sb: flinks_proxy::sandbox::Sandbox, f: impl FnOnce(&mut ProxyToml)) -> Flow {
    let dir = TempDir::new();
    let mut toml = connect_toml(&sb, &dir);
    f(&mut toml);
    let public = toml.connect.as_ref().expect("[connect]").public_url.clone();
    let proxy = start_proxy(&toml.toml()).await;
    Flow {
        proxy,
        sb,
        public,
        _dir: dir,
    }
}

async fn flow() -> Flow {
    flow_with(|_| {}).await
}

impl Flow {
    /// `POST /connect-sessions/users` with `body`; asserts 201.
    async fn session(&self, body: serde_json::Value) -> serde_json::Value {
        let r = admin(&self.proxy, "POST", "/connect-sessions/users", Some(body)).await;
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()
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

    async fn metrics(&self) -> String {
        get(&admin_url(&self.proxy, "/metrics")).await.text()
    }

    fn outcome(&self, text: &str, pool: &str, outcome: &str) -> f64 {
        metric(
            text,
            &format!(
                "flinks_proxy_connect_sessions_total{{outcome=\"{outcome}\",pool=\"{pool}\"}}"
            ),
        )
        .unwrap_or(0.0)
    }

    /// Opens `link` in `b`: asserts the 302 to the sandbox and returns it.
    async fn open(&self, b: &mut Browser, link: &str) -> String {
        let r = b.get(link).await;
        assert_eq!(r.status, 302, "{}", r.text());
        r.header("location").expect("location").to_owned()
    }
}

/// Asserts the headers every connect answer carries.
fn assert_hardened(r: &Resp) {
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    let csp = r.header("content-security-policy").expect("a CSP");
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(
        !r.text().to_ascii_lowercase().contains("<script"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn a_user_connects_through_one_link_and_the_app_reads_their_accounts() {
    let f = flow().await;
    let s = f
        .session(json!({"redirect_to": "https://app.example.com/done?from=test"}))
        .await;
    assert_eq!(s["state"], "pending");
    let link = s["connect_url"].as_str().expect("connect_url").to_owned();
    assert!(
        link.starts_with(&format!("{}/connect/", f.public)),
        "{link}"
    );
    let token = link.rsplit('/').next().unwrap();
    assert!(
        token.len() >= 43,
        "the link's token has at least 256 bits: {token}"
    );

    let mut b = Browser::new();
    let authorize = f.open(&mut b, &link).await;
    let q = query_params(&authorize);
    assert!(authorize.starts_with(&f.sb.authorize_url()), "{authorize}");
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], "demo-client");
    assert_eq!(q["redirect_uri"], format!("{}/connect/callback", f.public));
    assert_eq!(q["scope"], "ACCOUNT_BASIC TRANSACTIONS");
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert!(q["state"].len() >= 43, "state has 256 bits");
    let cookie = b.set_cookie_lines.last().expect("a binding cookie").clone();
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/connect"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain http on loopback: {cookie}"
    );

    let callback = b.consent(&authorize, "alice", true).await;
    assert!(
        callback.starts_with(&format!("{}/connect/callback?", f.public)),
        "{callback}"
    );
    let done = b.get(&callback).await;
    assert_eq!(done.status, 302, "{}", done.text());
    assert_hardened(&done);
    let to = done.header("location").unwrap();
    let back = query_params(to);
    assert!(
        to.starts_with("https://app.example.com/done?from=test&"),
        "{to}"
    );
    assert_eq!(back["status"], "connected");
    assert_eq!(back["session_id"], s["session_id"].as_str().unwrap());
    assert_eq!(back["connection_id"], "alice");
    assert!(
        b.cookies.is_empty(),
        "the binding cookie is cleared: {:?}",
        b.cookies
    );

    let st = f.session_state(s["session_id"].as_str().unwrap()).await;
    assert_eq!(st["state"], "connected", "{st}");
    assert_eq!(st["connection_id"], "alice");
    assert!(
        st.get("connect_url").is_none(),
        "the link is shown once: {st}"
    );

    let mut req = http::Request::get(proxy_url(&f.proxy, "/api/fdx/5/accounts"));
    req = req.header(SELECT, "alice");
    let r = send(&client(), req.body(Default::default()).unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("alice's chequing"), "{}", r.text());
    assert_eq!(f.sb.code_exchanges_with_verifier(), 1, "PKCE verifier sent");
    let m = f.metrics().await;
    assert_eq!(f.outcome(&m, "users", "connected"), 1.0, "{m}");
    for o in ["failed", "expired", "rejected"] {
        assert!(
            m.contains(&format!(
                "flinks_proxy_connect_sessions_total{{outcome=\"{o}\",pool=\"users\"}} 0"
            )),
            "{o} at 0: {m}"
        );
    }
}

#[tokio::test]
async fn a_replayed_callback_never_exchanges_the_code_twice() {
    let f = flow().await;
    let s = f.session(json!({})).await;
    let mut b = Browser::new();
    let authorize = f.open(&mut b, s["connect_url"].as_str().unwrap()).await;
    let callback = b.consent(&authorize, "bob", true).await;
    let cookies = b.cookies.clone();
    let first = b.get(&callback).await;
    assert_eq!(
        first.status,
        200,
        "a result page without redirect_to: {}",
        first.text()
    );
    assert!(first.text().contains("connected"), "{}", first.text());
    assert_hardened(&first);
    let exchanges = f.sb.token_requests();

    // The same callback again, with the cookie it had.
    b.cookies = cookies;
    let again = b.get(&callback).await;
    assert_eq!(again.status, 400, "{}", again.text());
    assert_hardened(&again);
    assert_eq!(f.sb.token_requests(), exchanges, "no second exchange");
    let m = f.metrics().await;
    assert_eq!(f.outcome(&m, "", "rejected"), 1.0, "{m}");
}

#[tokio::test]
async fn a_callback_from_another_browser_changes_nothing() {
    let f = flow().await;
    let s = f.session(json!({})).await;
    let mut victim = Browser::new();
    let authorize = f
        .open(&mut victim, s["connect_url"].as_str().unwrap())
        .await;
    let callback = victim.consent(&authorize, "alice", true).await;

    let mut other = Browser::new();
    let r = other.get(&callback).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("browser"), "{}", r.text());
    let before = f.sb.token_requests();
    assert_eq!(
        f.session_state(s["session_id"].as_str().unwrap()).await["state"],
        "pending"
    );
    // A forged cookie with the right name does not pass either.
    other.cookies.insert(
        format!("fp_connect_{}", s["session_id"].as_str().unwrap()),
        "A".repeat(43),
    );
    assert_eq!(other.get(&callback).await.status, 400);
    assert_eq!(f.sb.token_requests(), before, "nothing exchanged");

    let ok = victim.get(&callback).await;
    assert_eq!(
        ok.status,
        200,
        "the real browser still completes: {}",
        ok.text()
    );
    let m = f.metrics().await;
    assert_eq!(f.outcome(&m, "users", "rejected"), 2.0, "{m}");
    assert_eq!(f.outcome(&m, "users", "connected"), 1.0, "{m}");
}

#[tokio::test]
async fn a_link_is_single_use_across_browsers_and_reopening_it_renews_the_state() {
    let f = flow().await;
    let s = f.session(json!({})).await;
    let link = s["connect_url"].as_str().unwrap();
    let mut first = Browser::new();
    let authorize1 = f.open(&mut first, link).await;

    let mut second = Browser::new();
    let r = second.get(link).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("already been used"), "{}", r.text());
    assert_hardened(&r);

    // The first browser may open it again: a new state, the old one dead.
    let authorize2 = f.open(&mut first, link).await;
    let (q1, q2) = (query_params(&authorize1), query_params(&authorize2));
    assert_ne!(q1["state"], q2["state"]);
    assert_ne!(q1["code_challenge"], q2["code_challenge"]);
    let stale = first.consent(&authorize1, "alice", true).await;
    assert_eq!(
        first.get(&stale).await.status,
        400,
        "the replaced state is spent"
    );
    let fresh = first.consent(&authorize2, "alice", true).await;
    assert_eq!(first.get(&fresh).await.status, 200);
}

#[tokio::test]
async fn unknown_deleted_and_expired_links_say_which() {
    let f = flow().await;
    let unknown = format!("{}/connect/{}", f.public, "x".repeat(43));
    let r = get(&unknown).await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("not valid"), "{}", r.text());
    assert_hardened(&r);
    assert_eq!(
        get(&format!("{}/connect/short", f.public)).await.status,
        404
    );

    let s = f.session(json!({})).await;
    let id = s["session_id"].as_str().unwrap();
    let r = admin(
        &f.proxy,
        "DELETE",
        &format!("/connect-sessions/users/{id}"),
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(get(s["connect_url"].as_str().unwrap()).await.status, 404);
    assert_eq!(
        admin(
            &f.proxy,
            "GET",
            &format!("/connect-sessions/users/{id}"),
            None
        )
        .await
        .status,
        404
    );

    let s = f.session(json!({"ttl": "1m"})).await;
    let id = s["session_id"].as_str().unwrap();
    expire_session(&f, id).await;
    assert_eq!(f.session_state(id).await["state"], "expired");
    let r = get(s["connect_url"].as_str().unwrap()).await;
    assert_eq!(r.status, 410, "{}", r.text());
    assert!(r.text().contains("expired"), "{}", r.text());
    assert_eq!(get(s["connect_url"].as_str().unwrap()).await.status, 410);
    let m = f.metrics().await;
    assert_eq!(f.outcome(&m, "users", "expired"), 1.0, "counted once: {m}");
}

/// Moves a session's expiry into the past, in the store file.
async fn expire_session(f: &Flow, id: &str) {
    let db = f._dir.path().join("store.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", db.display()))
        .await
        .expect("open the store");
    sqlx::query("UPDATE connect_sessions SET expires_at = 0 WHERE id = ?")
        .bind(id)
        .execute(&pool)
        .await
        .expect("expire");
    pool.close().await;
}

#[tokio::test]
async fn a_denied_consent_fails_the_session_and_tells_the_app() {
    let f = flow().await;
    let s = f.session(json!({"redirect_to": APP})).await;
    let mut b = Browser::new();
    let authorize = f.open(&mut b, s["connect_url"].as_str().unwrap()).await;
    let callback = b.consent(&authorize, "alice", false).await;
    let r = b.get(&callback).await;
    assert_eq!(r.status, 302, "{}", r.text());
    let back = query_params(r.header("location").unwrap());
    assert_eq!(back["status"], "failed");
    assert_eq!(back["error"], "access_denied");
    assert!(!back.contains_key("connection_id"));
    let st = f.session_state(s["session_id"].as_str().unwrap()).await;
    assert_eq!(st["state"], "failed");
    assert_eq!(st["error"]["error"], "access_denied", "{st}");
    let m = f.metrics().await;
    assert_eq!(f.outcome(&m, "users", "failed"), 1.0, "{m}");
}

#[tokio::test]
async fn a_denied_consent_is_a_signed_connect_session_failed_event() {
    let rx = support::receiver::Receiver::start().await;
    let secret = format!("whsec_{}", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let f = flow_with(|c| {
        c.webhooks = Some(support::Webhooks {
            url: rx.url(),
            secret: Some(secret.as_str().into()),
            ..support::Webhooks::default()
        })
    })
    .await;
    let s = f.session(json!({"redirect_to": APP})).await;
    let mut b = Browser::new();
    let authorize = f.open(&mut b, s["connect_url"].as_str().unwrap()).await;
    let callback = b.consent(&authorize, "alice", false).await;
    assert_eq!(b.get(&callback).await.status, 302);
    let got = rx.wait_delivered(1, Duration::from_secs(20)).await;
    let d = &got[0];
    d.verify(&secret);
    let body = d.json();
    assert_eq!(body["type"], "connect_session.failed", "{body}");
    let id = s["session_id"].as_str().unwrap();
    assert_eq!(body["data"]["session_id"], id, "{body}");
    assert_eq!(body["data"]["state"], "failed", "{body}");
    assert_eq!(body["data"]["error"]["error"], "access_denied", "{body}");
    assert_eq!(
        body["data"],
        f.session_state(id).await,
        "the admin API's JSON"
    );
    let text = format!("{:?}{}", d.headers, d.body);
    assert!(
        !text.contains(s["connect_url"].as_str().unwrap()),
        "the link is a secret"
    );
}

#[tokio::test]
async fn redirects_outside_the_allowed_list_are_refused_naming_redirect_to() {
    let f = flow().await;
    for bad in [
        "https://app.example.com.evil.test/",
        "https://app.example.com@evil.test/",
        "//evil.test",
        "https://evil.test/",
        "http://app.example.com/",
        "https://app.example.com/a/../../evil",
        "javascript:alert(1)",
    ] {
        let r = admin(
            &f.proxy,
            "POST",
            "/connect-sessions/users",
            Some(json!({"redirect_to": bad})),
        )
        .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.text().contains("redirect_to"), "{bad}: {}", r.text());
    }
    for (body, needle) in [
        (json!({"ttl": "10s"}), "ttl"),
        (json!({"ttl": "2d"}), "ttl"),
        (
            json!({"authorize_params": {"redirect_uri": "https://evil.test/"}}),
            "authorize_params.redirect_uri",
        ),
        (json!({"connection_id": "a b"}), "connection_id"),
        (json!({"surprise": 1}), "surprise"),
    ] {
        let r = admin(
            &f.proxy,
            "POST",
            "/connect-sessions/users",
            Some(body.clone()),
        )
        .await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().contains(needle), "{body}: {}", r.text());
    }
    let r = admin(&f.proxy, "POST", "/connect-sessions/nope", Some(json!({}))).await;
    assert_eq!(r.status, 404);
    let r = support::connections::admin_as(
        &f.proxy,
        "POST",
        "/connect-sessions/users",
        Some(json!({})),
        None,
    )
    .await;
    assert_eq!(r.status, 401, "behind api_token");
}

#[tokio::test]
async fn the_connect_listener_serves_nothing_but_connect_pages() {
    let f = flow().await;
    for path in [
        "/",
        "/metrics",
        "/status",
        "/healthz",
        "/connections/users",
        "/connect-sessions/users",
        "/api/fdx/5/accounts",
        "/connect",
    ] {
        let r = get(&format!("{}{path}", f.public)).await;
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert_hardened(&r);
    }
    let r = Browser::new()
        .post_form(&format!("{}/connect/callback", f.public), &[("code", "x")])
        .await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn a_session_naming_an_existing_connection_reauthorizes_it_in_place() {
    let f = flow().await;
    let first = connections::connect(&f.proxy, "alice").await;
    f.sb.revoke_consent("alice");
    let s = f.session(json!({"connection_id": "alice"})).await;
    let mut b = Browser::new();
    let authorize = f.open(&mut b, s["connect_url"].as_str().unwrap()).await;
    let callback = b.consent(&authorize, "alice", true).await;
    assert_eq!(b.get(&callback).await.status, 200);
    let c = admin(&f.proxy, "GET", "/connections/users/alice", None)
        .await
        .json();
    assert_eq!(c["state"], "active");
    assert_eq!(c["created_at"], first["created_at"], "the same row: {c}");
    let list = admin(&f.proxy, "GET", "/connections/users", None)
        .await
        .json();
    assert_eq!(
        list["connections"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
}

#[tokio::test]
async fn a_code_the_token_endpoint_refuses_fails_the_session_with_its_error() {
    let f = flow().await;
    let s = f.session(json!({"redirect_to": APP})).await;
    let mut b = Browser::new();
    let authorize = f.open(&mut b, s["connect_url"].as_str().unwrap()).await;
    let callback = b.consent(&authorize, "alice", true).await;
    // Someone spends the code first (without the verifier: refused, and spent).
    let code = query_params(&callback)["code"].clone();
    let stolen = exchange_directly(&f, &code).await;
    assert_eq!(
        stolen, 400,
        "the sandbox refuses a code without its verifier"
    );
    let r = b.get(&callback).await;
    assert_eq!(r.status, 302, "{}", r.text());
    let back = query_params(r.header("location").unwrap());
    assert_eq!(back["status"], "failed");
    assert_eq!(back["error"], "invalid_grant");
}

/// A flow whose pool wants `iss = https://ob.example.com`, against a
/// sandbox sending `sandbox_iss`.
async fn issuer_flow(sandbox_iss: Option<&str>) -> Flow {
    let sb = flinks_proxy::sandbox::Sandbox::start(flinks_proxy::sandbox::SandboxOptions {
        issuer: sandbox_iss.map(str::to_owned),
        users: vec![flinks_proxy::sandbox::SandboxUser::new("alice")],
        ..Default::default()
    })
    .await
    .expect("sandbox");
    flow_on(sb, |c| {
        c.pool_mut("users").issuer = Some("https://ob.example.com".into())
    })
    .await
}

/// Runs one flow as alice; the callback's answer.
async fn alice_consents(f: &Flow) -> (String, Resp) {
    let s = f.session(json!({})).await;
    let mut b = Browser::new();
    let authorize = f.open(&mut b, s["connect_url"].as_str().unwrap()).await;
    let callback = b.consent(&authorize, "alice", true).await;
    let r = b.get(&callback).await;
    (s["session_id"].as_str().unwrap().to_owned(), r)
}

#[tokio::test]
async fn with_an_issuer_the_callbacks_iss_must_match() {
    for wrong in [Some("https://evil.example.com"), None] {
        let f = issuer_flow(wrong).await;
        let (id, r) = alice_consents(&f).await;
        assert_eq!(r.status, 400, "iss {wrong:?}: {}", r.text());
        assert!(r.text().contains("iss"), "{}", r.text());
        assert_eq!(f.session_state(&id).await["state"], "pending", "unchanged");
        assert_eq!(f.sb.code_exchanges_with_verifier(), 0, "nothing exchanged");
    }
    let f = issuer_flow(Some("https://ob.example.com")).await;
    let (id, r) = alice_consents(&f).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(f.session_state(&id).await["state"], "connected");
}

#[tokio::test]
async fn two_callbacks_racing_exchange_once() {
    let f = flow().await;
    let s = f.session(json!({})).await;
    let mut b = Browser::new();
    let authorize = f.open(&mut b, s["connect_url"].as_str().unwrap()).await;
    let callback = b.consent(&authorize, "carol", true).await;
    // Hold the token endpoint: the first callback spends the state and
    // waits in the exchange while the second arrives.
    f.sb.set_failure(flinks_proxy::sandbox::FailureMode::Hang);
    let cookies = b.cookies.clone();
    let first = {
        let callback = callback.clone();
        let mut b1 = Browser::new();
        b1.cookies = cookies.clone();
        tokio::spawn(async move { b1.get(&callback).await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while f.sb.token_requests_in_flight() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first exchange never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut b2 = Browser::new();
    b2.cookies = cookies;
    let second = b2.get(&callback).await;
    assert_eq!(second.status, 400, "{}", second.text());
    f.sb.set_failure(flinks_proxy::sandbox::FailureMode::None);
    let first = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("the first callback ends")
        .expect("task");
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(f.sb.code_exchanges_with_verifier(), 1);
}

/// Presents `code` at the sandbox token endpoint without a verifier, as a
/// thief with the client's credentials would; the status.
async fn exchange_directly(f: &Flow, code: &str) -> u16 {
    let body = format!(
        "grant_type=authorization_code&code={code}&client_id=demo-client&client_secret=demo-secret&redirect_uri={}",
        flinks_proxy::ground::form::encode(&format!("{}/connect/callback", f.public))
    );
    let req = http::Request::post(f.sb.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    send(&client(), req).await.status.as_u16()
}

/// Two replicas on one PostgreSQL store, behind one public URL (replica
/// A's address; B listens elsewhere, as behind a load balancer).
async fn fleet() -> (support::postgres::PgCluster, Flow, Running) {
    let pg = support::postgres::PgCluster::start();
    pg.create_database("connect");
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let store = config::Store {
        url: Some(pg.url("connect").into()),
        key: connections::new_key().into(),
        old_keys: None,
        max_connections: Some(4),
    };
    let a = connect_toml(&sb, &dir).with(|c| c.store = Some(store));
    let public = a.connect.as_ref().unwrap().public_url.clone();
    let b = a.clone().with(|c| {
        c.connect.as_mut().unwrap().listen = format!("127.0.0.1:{}", free_port());
    });
    let proxy_a = start_proxy(&a.toml()).await;
    let proxy_b = start_proxy(&b.toml()).await;
    let flow = Flow {
        proxy: proxy_a,
        sb,
        public,
        _dir: dir,
    };
    (pg, flow, proxy_b)
}

/// `url` (on the public URL) sent to replica `r`'s connect listener.
fn on(r: &Running, public: &str, url: &str) -> String {
    url.replacen(
        public,
        &format!("http://{}", r.connect_addr().expect("connect listener")),
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_finishes_a_flow_and_the_fleet_spends_a_state_once() {
    let (_pg, f, b) = fleet().await;
    // Opened on A, called back on B.
    let s = f.session(json!({})).await;
    let mut browser = Browser::new();
    let authorize = f
        .open(&mut browser, s["connect_url"].as_str().unwrap())
        .await;
    let callback = browser.consent(&authorize, "alice", true).await;
    let r = browser.get(&on(&b, &f.public, &callback)).await;
    assert_eq!(
        r.status,
        200,
        "replica B finishes what A started: {}",
        r.text()
    );
    assert_eq!(
        f.session_state(s["session_id"].as_str().unwrap()).await["state"],
        "connected"
    );

    // Both replicas get the same callback while the exchange is held.
    let s = f.session(json!({})).await;
    let mut browser = Browser::new();
    let authorize = f
        .open(&mut browser, s["connect_url"].as_str().unwrap())
        .await;
    let callback = browser.consent(&authorize, "bob", true).await;
    let exchanges = f.sb.code_exchanges_with_verifier();
    f.sb.set_failure(flinks_proxy::sandbox::FailureMode::Hang);
    let cookies = browser.cookies.clone();
    let first = {
        let (callback, cookies) = (callback.clone(), cookies.clone());
        tokio::spawn(async move {
            let mut b1 = Browser::new();
            b1.cookies = cookies;
            b1.get(&callback).await
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while f.sb.token_requests_in_flight() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first exchange never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut b2 = Browser::new();
    b2.cookies = cookies;
    let second = b2.get(&on(&b, &f.public, &callback)).await;
    assert_eq!(
        second.status,
        400,
        "replica B finds the state spent: {}",
        second.text()
    );
    f.sb.set_failure(flinks_proxy::sandbox::FailureMode::None);
    let first = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("the held callback ends")
        .expect("task");
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        f.sb.code_exchanges_with_verifier(),
        exchanges + 1,
        "one exchange fleet-wide"
    );
    f.proxy.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_link_state_code_cookie_verifier_or_token_reaches_a_log_page_metric_or_the_store() {
    let dir = TempDir::new();
    let sb = users_sandbox(3600, false).await;
    let toml = connect_toml(&sb, &dir).with(|c| c.log_mut().level = Some("debug".into()));
    let public = toml.connect.as_ref().unwrap().public_url.clone();
    let proxy = ProxyProcess::start(&toml.write(&dir), &[]);
    let admin_req = |method: &str, path: &str, body: &str| {
        http::Request::builder()
            .method(method)
            .uri(proxy.admin(path))
            .header(
                "authorization",
                format!("Bearer {}", connections::API_TOKEN),
            )
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_owned(),
            )))
            .unwrap()
    };
    let mut seen = String::new();
    let created = send(
        &client(),
        admin_req("POST", "/connect-sessions/users", "{}"),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let link = created.json()["connect_url"].as_str().unwrap().to_owned();
    let id = created.json()["session_id"].as_str().unwrap().to_owned();
    let mut b = Browser::new();
    let first = b.get(&link).await;
    seen.push_str(&first.text());
    let authorize = first.header("location").unwrap().to_owned();
    let callback = b.consent(&authorize, "alice", true).await;
    let cookie = b.cookies.values().next().expect("binding cookie").clone();
    let done = b.get(&callback).await;
    assert_eq!(done.status, 200, "{}", done.text());
    seen.push_str(&done.text());
    seen.push_str(&b.get(&callback).await.text()); // the replay's page
    seen.push_str(&b.get(&link).await.text()); // the used link's page
    seen.push_str(
        &send(
            &client(),
            admin_req("GET", &format!("/connect-sessions/users/{id}"), ""),
        )
        .await
        .text(),
    );
    seen.push_str(
        &send(&client(), admin_req("GET", "/connections/users/alice", ""))
            .await
            .text(),
    );
    seen.push_str(&get(&proxy.admin("/metrics")).await.text());
    seen.push_str(&get(&proxy.admin("/status")).await.text());
    let q = query_params(&callback);
    let mut secrets = vec![
        link.rsplit('/').next().unwrap().to_owned(),
        query_params(&authorize)["state"].clone(),
        q["code"].clone(),
        cookie,
    ];
    secrets.extend(sb.issued_secrets());
    assert!(
        sb.code_exchanges_with_verifier() == 1,
        "a verifier was sent"
    );
    let mut store = Vec::new();
    for f in ["store.db", "store.db-wal"] {
        store.extend(std::fs::read(dir.path().join(f)).unwrap_or_default());
    }
    let store = String::from_utf8_lossy(&store).into_owned();
    let log = proxy.log();
    assert!(
        log.contains("connect session finished"),
        "debug logs were read: {log}"
    );
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(!log.contains(s.as_str()), "a secret in the log: {s}\n{log}");
        assert!(
            !seen.contains(s.as_str()),
            "a secret in a page or answer: {s}"
        );
        assert!(
            !store.contains(s.as_str()),
            "a secret in the store in clear: {s}"
        );
    }
    assert!(!public.is_empty());
}
