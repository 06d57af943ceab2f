//! Per-user connections (issue 9, CONNECTIONS.md) through the proxy like an
//! app uses them: connect users through the admin API, then proxy requests
//! naming each user, against the sandbox and a real SQLite store.

mod support;

use std::time::Duration;

use futures_util_free::join_all;
use support::connections::*;
use support::{get, ProxyToml, TempDir};

/// `join_all` without a futures dependency: spawn and await each.
mod futures_util_free {
    pub async fn join_all<F>(futures: Vec<F>) -> Vec<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.expect("task"));
        }
        out
    }
}

async fn start(sb: &flinks_proxy::sandbox::Sandbox, dir: &TempDir) -> flinks_proxy::Running {
    let toml = ProxyToml::pool(sb, &dir.join("c.db"), &new_key()).toml();
    support::start_proxy(&toml).await
}

#[tokio::test]
async fn each_user_sees_only_their_accounts_and_the_select_header_stays_here() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    let alice = connect(&p, "alice").await;
    assert_eq!(alice["id"], "alice", "the id defaults to the token's sub");
    assert_eq!(alice["sub"], "alice");
    assert_eq!(alice["state"], "active");
    assert_eq!(alice["pool"], "users");
    assert!(alice["access_token_expires_at"].is_string());
    connect(&p, "bob").await;

    for user in ["alice", "bob"] {
        let r = get_as(&p, "/api/fdx/5/accounts", user).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["sub"], user);
        assert_eq!(v["accounts"].as_array().unwrap().len(), 1);
        assert_eq!(v["accounts"][0]["nickname"], format!("{user}'s chequing"));
    }
    for req in sb.recorded() {
        assert!(
            !req.headers.iter().any(|(k, _)| k == SELECT),
            "the select header reached the upstream: {:?}",
            req.headers
        );
    }
    // Warm requests are served from memory: no more token requests.
    assert_eq!(sb.user_token_requests("alice"), 1);
    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 200);
    assert_eq!(sb.user_token_requests("alice"), 1);
}

#[tokio::test]
async fn concurrent_cold_requests_make_one_token_request_per_connection() {
    let sb = users_sandbox(1, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    connect(&p, "alice").await;
    connect(&p, "bob").await;
    // Let the one-second tokens expire: every request below needs a refresh.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let url = support::proxy_url(&p, "/api/fdx/5/accounts");
    let reqs: Vec<_> = (0..40)
        .map(|i| {
            let url = url.clone();
            let user = if i % 2 == 0 { "alice" } else { "bob" };
            async move {
                let req = http::Request::get(url)
                    .header(SELECT, user)
                    .body(http_body_util::Full::default())
                    .unwrap();
                (user, support::send(&support::client(), req).await)
            }
        })
        .collect();
    for (user, r) in join_all(reqs).await {
        assert_eq!(r.status, 200, "{user}: {}", r.text());
        assert_eq!(r.json()["sub"], user);
    }
    assert_eq!(sb.user_token_requests("alice"), 2, "one code, one refresh");
    assert_eq!(sb.user_token_requests("bob"), 2, "one code, one refresh");
}

#[tokio::test]
async fn a_token_in_its_refresh_window_is_served_while_one_refresh_runs() {
    // 4 s tokens: refresh_before (60 s) is capped at half, so renewal is due
    // after 2 s while the token stays usable until 3.6 s.
    let sb = users_sandbox(4, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    connect(&p, "alice").await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    for _ in 0..5 {
        let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The refresh runs in the background; wait for it, generously.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sb.user_token_requests("alice") < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sb.user_token_requests("alice"),
        2,
        "exactly one background refresh"
    );
    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 200);
    assert_eq!(sb.user_token_requests("alice"), 2);
    // The refresh is committed right after the endpoint answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = admin(&p, "GET", "/connections/users/alice", None)
            .await
            .json();
        if c["last_refresh_at"].is_string() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never committed: {c}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn admin_api_refuses_bad_input_with_named_errors() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    let post = |body: serde_json::Value| admin(&p, "POST", "/connections/users", Some(body));

    let r = post(serde_json::json!({"code": "bogus"})).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"], "grant_rejected");
    assert_eq!(v["token_error"], "invalid_grant");
    assert!(v["token_error_description"].is_string());

    connect(&p, "alice").await;
    let r = post(serde_json::json!({"code": "code-alice"})).await;
    assert_eq!(r.status, 422, "a used code: {}", r.text());
    assert_eq!(r.json()["token_error"], "invalid_grant");

    for (body, what) in [
        (
            serde_json::json!({"code": "c", "refresh_token": "r"}),
            "both",
        ),
        (serde_json::json!({"id": "x"}), "neither"),
        (serde_json::json!({"code": ""}), "empty code"),
        (serde_json::json!({"code": "c", "id": "a b"}), "bad id"),
        (
            serde_json::json!({"code": "c", "id": "x".repeat(129)}),
            "129 chars",
        ),
        (
            serde_json::json!({"code": "c", "colour": "red"}),
            "unknown field",
        ),
    ] {
        let r = post(body).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.json()["error"], "bad_request", "{what}");
    }
    let r = admin_raw(&p, "{not json").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "bad_request");

    let ok_id = "x".repeat(128);
    let code = sb.new_code("carol");
    let r = post(serde_json::json!({"code": code, "id": ok_id})).await;
    assert_eq!(r.status, 201, "128 chars is fine: {}", r.text());

    let r = admin(
        &p,
        "POST",
        "/connections/nope",
        Some(serde_json::json!({"code": "c"})),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "pool_not_found");
    for method in ["GET", "DELETE"] {
        let r = admin(&p, method, "/connections/users/nobody", None).await;
        assert_eq!(r.status, 404, "{method}");
        assert_eq!(r.json()["error"], "connection_not_found");
    }
    for token in [None, Some("wrong")] {
        let r = admin_as(&p, "GET", "/connections/users", None, token).await;
        assert_eq!(r.status, 401, "{token:?}");
        assert_eq!(r.json()["error"], "admin_unauthorized");
    }

    sb.set_failure(flinks_proxy::sandbox::FailureMode::ServerError);
    let r = post(serde_json::json!({"code": sb.new_code("bob")})).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"], "token_endpoint_unavailable");
}

async fn admin_raw(p: &flinks_proxy::Running, body: &str) -> support::Resp {
    let req = http::Request::post(support::admin_url(p, "/connections/users"))
        .header("authorization", format!("Bearer {API_TOKEN}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap();
    support::send(&support::client(), req).await
}

#[tokio::test]
async fn list_pages_by_id_and_delete_erases_the_connection() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    for user in ["carol", "alice", "bob"] {
        connect(&p, user).await;
    }
    let page = admin(&p, "GET", "/connections/users?limit=2", None)
        .await
        .json();
    let ids: Vec<_> = page["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(ids, ["alice", "bob"]);
    assert_eq!(page["next"], "bob");
    let page = admin(&p, "GET", "/connections/users?limit=2&after=bob", None)
        .await
        .json();
    assert_eq!(page["connections"][0]["id"], "carol");
    assert_eq!(page["next"], serde_json::Value::Null);
    let r = admin(&p, "GET", "/connections/users?limit=1001", None).await;
    assert_eq!(r.status, 400);

    assert_eq!(get_as(&p, "/api/fdx/5/accounts", "bob").await.status, 200);
    let r = admin(&p, "DELETE", "/connections/users/bob", None).await;
    assert_eq!(r.status, 204);
    let r = get_as(&p, "/api/fdx/5/accounts", "bob").await;
    assert_eq!(r.status, 404, "deleted from memory too: {}", r.text());
    assert_eq!(r.json()["error"], "connection_not_found");
}

#[tokio::test]
async fn the_select_header_must_name_one_known_connection() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    connect(&p, "alice").await;
    let r = get(&support::proxy_url(&p, "/api/fdx/5/accounts")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "connection_required");
    for bad in ["", "a b"] {
        let r = get_as(&p, "/api/fdx/5/accounts", bad).await;
        assert_eq!(r.status, 400, "{bad:?}");
        assert_eq!(r.json()["error"], "connection_required");
    }
    let req = http::Request::get(support::proxy_url(&p, "/api/fdx/5/accounts"))
        .header(SELECT, "alice")
        .header(SELECT, "alice")
        .body(http_body_util::Full::default())
        .unwrap();
    let r = support::send(&support::client(), req).await;
    assert_eq!(r.status, 400, "duplicated");
    assert_eq!(r.json()["error"], "connection_required");
    let r = get_as(&p, "/api/fdx/5/accounts", "mallory").await;
    assert_eq!(r.status, 404);
    let v = r.json();
    assert_eq!(v["error"], "connection_not_found");
    assert_eq!(v["connection"], "mallory");
    assert_eq!(sb.api_requests(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn revoked_consent_passes_the_602_through_then_asks_for_reauthorization() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    connect(&p, "alice").await;
    connect(&p, "bob").await;
    assert_eq!(get_as(&p, "/api/fdx/5/accounts", "alice").await.status, 200);
    sb.revoke_consent("alice");

    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["code"], "602", "the upstream's answer, as is");
    assert_eq!(r.header("ob-correlation-id"), Some("sandbox-602"));
    assert_eq!(sb.user_token_requests("alice"), 1, "no refresh attempt");

    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 401);
    let v = r.json();
    assert_eq!(v["error"], "reauthorization_required");
    assert_eq!(v["connection"], "alice");
    let c = admin(&p, "GET", "/connections/users/alice", None)
        .await
        .json();
    assert_eq!(c["state"], "needs_reauthorization");
    assert_eq!(c["last_error"]["error"], "consent_revoked");
    let listed = admin(
        &p,
        "GET",
        "/connections/users?state=needs_reauthorization",
        None,
    )
    .await
    .json();
    assert_eq!(listed["connections"].as_array().unwrap().len(), 1);
    assert_eq!(
        get_as(&p, "/api/fdx/5/accounts", "bob").await.status,
        200,
        "bob is unaffected"
    );

    // The user authorizes again: a new code for the same id.
    let r = reauthorize(&p, &sb, "alice").await;
    assert_eq!(r.status, 200, "replaced: {}", r.text());
    assert_eq!(r.json()["state"], "active");
    assert_eq!(r.json()["last_error"], serde_json::Value::Null);
    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn a_refused_refresh_token_turns_the_connection_needs_reauthorization() {
    let sb = users_sandbox(1, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    connect(&p, "alice").await;
    sb.revoke_consent("alice");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "reauthorization_required");
    let c = admin(&p, "GET", "/connections/users/alice", None)
        .await
        .json();
    assert_eq!(c["state"], "needs_reauthorization");
    assert_eq!(c["last_error"]["error"], "invalid_grant");
}

#[tokio::test]
async fn a_removed_store_file_gives_clear_503s_and_cached_users_keep_working() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    connect(&p, "alice").await;
    connect(&p, "bob").await;
    assert_eq!(get_as(&p, "/api/fdx/5/accounts", "alice").await.status, 200);
    std::fs::rename(dir.join("c.db"), dir.join("moved.db")).unwrap();

    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 200, "alice's token is in memory");
    let r = get_as(&p, "/api/fdx/5/accounts", "bob").await;
    assert_eq!(
        r.status,
        503,
        "bob must be read from the store: {}",
        r.text()
    );
    assert_eq!(r.json()["error"], "store_unavailable");
    assert!(r.header("retry-after").is_some());
    let r = admin(
        &p,
        "POST",
        "/connections/users",
        Some(serde_json::json!({"code": "code-carol"})),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "store_unavailable");
    assert_eq!(
        sb.user_token_requests("carol"),
        0,
        "the single-use code was not spent on a grant the store could not keep"
    );
    let status = get(&support::admin_url(&p, "/status")).await.json();
    assert_eq!(status["store"]["healthy"], false);

    // Put it back: everything committed is still there.
    std::fs::rename(dir.join("moved.db"), dir.join("c.db")).unwrap();
    let r = get_as(&p, "/api/fdx/5/accounts", "bob").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn a_store_written_with_another_key_stops_startup() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let db = dir.join("c.db");
    let p = support::start_proxy(&ProxyToml::pool(&sb, &db, &new_key()).toml()).await;
    connect(&p, "alice").await;
    p.shutdown().await;
    let toml = ProxyToml::pool(&sb, &db, &new_key()).toml();
    let config = support::parse_config(&toml, dir.path());
    let e = flinks_proxy::start(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("the store key does not match this store"), "{e}");
}

#[tokio::test]
async fn no_token_appears_in_admin_answers_status_or_metrics() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    let mut seen = vec![connect(&p, "alice").await.to_string()];
    assert_eq!(get_as(&p, "/api/fdx/5/accounts", "alice").await.status, 200);
    seen.push(
        admin(&p, "GET", "/connections/users/alice", None)
            .await
            .text(),
    );
    seen.push(admin(&p, "GET", "/connections/users", None).await.text());
    seen.push(get(&support::admin_url(&p, "/status")).await.text());
    let metrics = get(&support::admin_url(&p, "/metrics")).await.text();
    seen.push(metrics.clone());
    let mut secrets = sb.user_refresh_tokens("alice");
    for req in sb.recorded() {
        for (k, v) in req.headers {
            if k == "authorization" {
                secrets.push(v.trim_start_matches("Bearer ").to_owned());
            }
        }
    }
    assert!(secrets.len() >= 2, "{secrets:?}");
    secrets.push(API_TOKEN.to_owned());
    for text in &seen {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a secret leaked into {text}");
        }
    }
    let status: serde_json::Value = serde_json::from_str(&seen[3]).unwrap();
    assert_eq!(status["store"]["kind"], "sqlite");
    assert_eq!(status["pools"]["users"]["select_header"], SELECT);
    assert_eq!(
        support::metric(
            &metrics,
            r#"flinks_proxy_connection_token_requests_total{outcome="success",pool="users"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        support::metric(
            &metrics,
            r#"flinks_proxy_connection_tokens_total{pool="users",source="store"}"#
        ),
        Some(1.0),
        "the first request read alice from the store"
    );
    assert_eq!(
        support::metric(
            &metrics,
            r#"flinks_proxy_connection_tokens_total{pool="users",source="refresh"}"#
        ),
        Some(0.0)
    );
    assert!(support::metric(
        &metrics,
        r#"flinks_proxy_store_operations_total{op="authorize",outcome="ok"}"#
    )
    .is_some());
}

async fn process_request(
    method: &str,
    url: String,
    id: Option<&str>,
    body: Option<serde_json::Value>,
) -> support::Resp {
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(id) = id {
        req = req.header(SELECT, id);
    }
    req = req.header("authorization", format!("Bearer {API_TOKEN}"));
    let body = body.map_or_else(bytes::Bytes::new, |b| bytes::Bytes::from(b.to_string()));
    support::send(
        &support::client(),
        req.body(http_body_util::Full::new(body)).unwrap(),
    )
    .await
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_refresh_against_a_rotating_server_loses_no_user() {
    let sb = users_sandbox(1, true).await;
    let dir = TempDir::new();
    let key = new_key();
    let config = dir.write(
        "proxy.toml",
        ProxyToml::pool(&sb, &dir.join("c.db"), &key).toml(),
    );
    let start = |config: std::path::PathBuf| {
        tokio::task::block_in_place(|| support::ProxyProcess::start(&config, &[]))
    };
    let mut first = start(config.clone());
    for user in ["alice", "bob"] {
        let r = process_request(
            "POST",
            first.admin("/connections/users"),
            None,
            Some(serde_json::json!({"code": format!("code-{user}")})),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    // Rotate once through the proxy: the new refresh token is committed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = process_request("GET", first.url("/api/fdx/5/accounts"), Some("alice"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sb.user_token_requests("alice"), 2);

    // The next refresh hangs at the token endpoint; kill -9 meanwhile.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    sb.set_failure(flinks_proxy::sandbox::FailureMode::Hang);
    let url = first.url("/api/fdx/5/accounts");
    let pending = tokio::spawn(async move {
        let req = http::Request::get(url)
            .header(SELECT, "alice")
            .body(http_body_util::Full::default())
            .unwrap();
        support::client().request(req).await.map(|r| r.status())
    });
    wait_until("a refresh in flight", || sb.token_requests_in_flight() >= 1).await;
    let mut log = first.log();
    first.child.kill().expect("SIGKILL");
    let _ = first.child.wait();
    assert!(
        pending.await.unwrap().is_err(),
        "the client saw the process die"
    );
    // The hanging request (if it is still being handled) fails without rotating.
    sb.set_failure(flinks_proxy::sandbox::FailureMode::ServerError);
    wait_until("the hanging request to end", || {
        sb.token_requests_in_flight() == 0
    })
    .await;
    sb.set_failure(flinks_proxy::sandbox::FailureMode::None);

    let second = start(config);
    for user in ["alice", "bob"] {
        let r = process_request("GET", second.url("/api/fdx/5/accounts"), Some(user), None).await;
        assert_eq!(r.status, 200, "{user} after the restart: {}", r.text());
        assert_eq!(r.json()["sub"], user);
    }
    let c = process_request("GET", second.admin("/connections/users/alice"), None, None)
        .await
        .json();
    assert_eq!(c["state"], "active", "{c}");
    log.push_str(&second.log());

    // Nothing secret in either process's log lines.
    let mut secrets: Vec<String> = ["alice", "bob"]
        .iter()
        .flat_map(|u| sb.user_refresh_tokens(u))
        .collect();
    for req in sb.recorded() {
        for (k, v) in req.headers {
            if k == "authorization" {
                secrets.push(v.trim_start_matches("Bearer ").to_owned());
            }
        }
    }
    secrets.extend([
        key,
        API_TOKEN.to_owned(),
        "code-alice".into(),
        flinks_proxy::sandbox::SandboxOptions::default().client_secret,
    ]);
    assert!(secrets.len() > 6, "{secrets:?}");
    assert!(log.contains("connection authorized"), "{log}");
    for s in &secrets {
        assert!(!log.contains(s.as_str()), "a secret is in the log:\n{log}");
    }
}

#[tokio::test]
async fn a_rejected_token_is_replaced_once_and_a_fresh_replacement_is_not_dropped_again() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    connect(&p, "alice").await;
    assert_eq!(get_as(&p, "/api/fdx/5/accounts", "alice").await.status, 200);
    sb.revoke_access_tokens();
    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 200, "refreshed and replayed: {}", r.text());
    assert_eq!(sb.user_token_requests("alice"), 2);
    // The replacement is rejected too (say, a permission problem): its
    // answer passes through and no token request follows.
    sb.revoke_access_tokens();
    for _ in 0..3 {
        let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.json()["error"], "invalid_token", "the upstream's answer");
    }
    assert_eq!(sb.user_token_requests("alice"), 2, "no refresh storm");
    let metrics = get(&support::admin_url(&p, "/metrics")).await.text();
    assert_eq!(
        support::metric(&metrics, r#"flinks_proxy_token_replays_total{route="ob"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_failing_token_endpoint_backs_off_per_connection_with_retry_after() {
    let sb = users_sandbox(1, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    connect(&p, "alice").await;
    connect(&p, "bob").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    sb.set_failure(flinks_proxy::sandbox::FailureMode::ServerError);
    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "token_unavailable");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=2).contains(&retry),
        "first backoff is about a second: {retry}"
    );
    let before = sb.token_requests();
    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        sb.token_requests(),
        before,
        "alice backs off: no new token request"
    );
    let r = get_as(&p, "/api/fdx/5/accounts", "bob").await;
    assert_eq!(r.status, 503);
    assert_eq!(sb.token_requests(), before + 1, "bob has his own backoff");
    let c = admin(&p, "GET", "/connections/users/alice", None)
        .await
        .json();
    assert_eq!(c["state"], "active", "a transient failure is no refusal");
    assert_eq!(c["last_error"]["error"], "server_error");
    let metrics = get(&support::admin_url(&p, "/metrics")).await.text();
    assert_eq!(
        support::metric(
            &metrics,
            r#"flinks_proxy_connection_token_requests_total{outcome="server_error",pool="users"}"#
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn the_connections_gauge_counts_by_state() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let p = start(&sb, &dir).await;
    connect(&p, "alice").await;
    connect(&p, "bob").await;
    sb.revoke_consent("bob");
    assert_eq!(get_as(&p, "/api/fdx/5/accounts", "bob").await.status, 401);
    let series =
        |state: &str| format!(r#"flinks_proxy_connections{{pool="users",state="{state}"}}"#);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = get(&support::admin_url(&p, "/metrics")).await.text();
        if support::metric(&m, &series("active")) == Some(1.0)
            && support::metric(&m, &series("needs_reauthorization")) == Some(1.0)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gauge never caught up:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = get(&support::admin_url(&p, "/status")).await.json();
    assert_eq!(status["pools"]["users"]["connections"]["active"], 1);
    assert_eq!(
        status["pools"]["users"]["connections"]["needs_reauthorization"],
        1
    );
}

#[tokio::test]
async fn the_cli_lists_shows_deletes_and_rekeys_the_store() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let old_key = new_key();
    let config = dir.write(
        "proxy.toml",
        ProxyToml::pool(&sb, &dir.join("c.db"), &old_key).toml(),
    );
    let p = support::start_proxy(&std::fs::read_to_string(&config).unwrap()).await;
    connect(&p, "alice").await;
    connect(&p, "bob").await;
    p.shutdown().await;
    let cfg = config.to_str().unwrap();

    let (code, out, err) = support::run_binary(&["connections", "list", "--config", cfg], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "users\talice\tactive\talice\nusers\tbob\tactive\tbob\n"
    );
    let (code, out, _) =
        support::run_binary(&["connections", "show", "alice", "--config", cfg], &[]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["state"],
        "active"
    );
    let (code, _, _) = support::run_binary(&["connections", "delete", "bob", "--config", cfg], &[]);
    assert_eq!(code, 0);
    let (code, _, err) = support::run_binary(&["connections", "show", "bob", "--config", cfg], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("no connection bob"), "{err}");

    let (code, new_key, _) = support::run_binary(&["keygen"], &[]);
    assert_eq!(code, 0);
    let new_key = new_key.trim().to_owned();
    assert_eq!(base64_len(&new_key), 32);
    let rotated = ProxyToml::pool(&sb, &dir.join("c.db"), &new_key)
        .with(|c| c.store_mut().old_keys = Some(vec![old_key.as_str().into()]))
        .toml();
    std::fs::write(&config, rotated).unwrap();
    let (code, out, err) = support::run_binary(&["store", "rekey", "--config", cfg], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("re-sealed 1 connections"), "{out}");
    // Without the old key now: alice still opens.
    std::fs::write(
        &config,
        ProxyToml::pool(&sb, &dir.join("c.db"), &new_key).toml(),
    )
    .unwrap();
    let (code, out, err) =
        support::run_binary(&["connections", "show", "alice", "--config", cfg], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("rt-"), "no token in the output: {out}");
    // With only the old key: refused, saying why.
    std::fs::write(
        &config,
        ProxyToml::pool(&sb, &dir.join("c.db"), &old_key).toml(),
    )
    .unwrap();
    let (code, _, err) = support::run_binary(&["connections", "list", "--config", cfg], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("the store key does not match this store"),
        "{err}"
    );
    assert!(!err.contains(&old_key) && !err.contains(&new_key), "{err}");
}

fn base64_len(s: &str) -> usize {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_or(0, |b| b.len())
}

/// A proxy whose pool `users` revokes at `revoke_url` before deleting.
async fn start_revoking(
    sb: &flinks_proxy::sandbox::Sandbox,
    dir: &TempDir,
    revoke_url: &str,
) -> flinks_proxy::Running {
    let toml = ProxyToml::pool(sb, &dir.path().join("store.db"), &new_key())
        .with(|c| c.pool_mut("users").revoke_url = Some(revoke_url.to_owned()));
    support::start_proxy(&toml.toml()).await
}

#[tokio::test]
async fn delete_revokes_the_refresh_token_at_the_provider_then_erases_it() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let p = start_revoking(&sb, &dir, &sb.revoke_url()).await;
    connect(&p, "alice").await;
    assert_eq!(
        sb.user_refresh_tokens("alice").len(),
        1,
        "alice has a live refresh token"
    );
    let r = admin(&p, "DELETE", "/connections/users/alice", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"revoked": true}));
    assert_eq!(sb.revocations(), 1);
    assert!(
        sb.user_refresh_tokens("alice").is_empty(),
        "the provider no longer honours it"
    );
    assert_eq!(
        admin(&p, "GET", "/connections/users/alice", None)
            .await
            .status,
        404
    );
    assert_eq!(
        admin(&p, "DELETE", "/connections/users/alice", None)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn a_failed_revocation_still_erases_and_says_why_without_the_token() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    // Nothing listens there: the revocation cannot be delivered.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/revoke", dead.local_addr().unwrap());
    drop(dead);
    let p = start_revoking(&sb, &dir, &url).await;
    connect(&p, "bob").await;
    let rt = sb
        .user_refresh_tokens("bob")
        .pop()
        .expect("bob's refresh token");
    let r = admin(&p, "DELETE", "/connections/users/bob", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["revoked"], false, "{body}");
    assert!(
        body["revoke_error"]
            .as_str()
            .is_some_and(|e| e.contains("127.0.0.1")),
        "{body}"
    );
    assert!(!r.text().contains(&rt), "the token is not in the answer");
    assert_eq!(
        admin(&p, "GET", "/connections/users/bob", None)
            .await
            .status,
        404,
        "erased anyway"
    );
}
