//! Lifecycle webhooks (issue 18, CONNECT.md "Lifecycle events"): every
//! event type reaches a real receiver on loopback, signed per Standard
//! Webhooks and verified with the specification's reference
//! implementation (the `standardwebhooks` crate), never our own code;
//! retries, order, giving up, the admin API, the queue gauges, a kill -9
//! in the middle of a delivery, and two replicas on one PostgreSQL store.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine as _;
use flinks_proxy::sandbox::{FailureMode, Sandbox};
use flinks_proxy::Running;
use support::connections::*;
use support::receiver::{Delivery, Receiver, Reply};
use support::{get, metric, ProxyToml, TempDir, Webhooks};

/// Long enough for a delivery on a loaded 2-core box, short enough to fail.
const WAIT: Duration = Duration::from_secs(20);

fn new_secret() -> String {
    let bytes: [u8; 32] = rand_bytes();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn rand_bytes() -> [u8; 32] {
    let key = new_key();
    let mut out = [0u8; 32];
    for (o, b) in out.iter_mut().zip(key.bytes().cycle()) {
        *o = b;
    }
    out
}

fn hooks(receiver: &Receiver, secret: &str) -> Webhooks {
    Webhooks {
        url: receiver.url(),
        secret: Some(secret.into()),
        refresh_failing_after: Some(Duration::ZERO),
        ..Webhooks::default()
    }
}

fn toml_for(sb: &Sandbox, dir: &TempDir, w: Webhooks) -> ProxyToml {
    ProxyToml::pool(sb, &dir.join("c.db"), &new_key()).with(|c| c.webhooks = Some(w))
}

/// Verifies a delivery with the reference implementation.
fn verify(secret: &str, d: &Delivery) {
    d.verify(secret);
}

/// A PostgreSQL store on database `db` of `pg`.
fn pg_store(pg: &support::postgres::PgCluster, db: &str) -> support::config::Store {
    support::config::Store {
        url: Some(pg.url(db).into()),
        key: new_key().into(),
        old_keys: None,
        max_connections: Some(4),
    }
}

async fn metrics(p: &Running) -> String {
    get(&support::admin_url(p, "/metrics")).await.text()
}

fn deliveries(text: &str, outcome: &str) -> f64 {
    metric(
        text,
        &format!("flinks_proxy_webhook_deliveries_total{{outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(-1.0)
}

/// Sends requests for `user` until one makes a token request (the
/// connection's backoff after a failure answers without one), and checks
/// that one's status.
async fn until_token_request(p: &Running, sb: &Sandbox, user: &str, check: impl Fn(u16)) {
    // Only `user` is connected where this is used: every token request is theirs.
    let before = sb.token_requests();
    let end = std::time::Instant::now() + WAIT;
    loop {
        let status = request(p, user).await;
        if sb.token_requests() > before {
            return check(status);
        }
        assert!(
            std::time::Instant::now() < end,
            "no token request for {user} (last answer {status}, {} token requests)",
            sb.token_requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A proxied request for `user` (its status).
async fn request(p: &Running, user: &str) -> u16 {
    get_as(p, "/api/fdx/5/accounts", user).await.status.as_u16()
}

#[tokio::test]
async fn every_connection_event_arrives_signed_in_order_with_the_admin_json_and_no_token() {
    // One-second tokens: a request after a second needs a refresh.
    let sb = users_sandbox(1, false).await;
    let dir = TempDir::new();
    let rx = Receiver::start().await;
    let secret = new_secret();
    let p = support::start_proxy(&toml_for(&sb, &dir, hooks(&rx, &secret)).toml()).await;

    let created = connect(&p, "alice").await;
    let r = reauthorize(&p, &sb, "alice").await;
    assert_eq!(r.status, 200, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Transient failures: with refresh_failing_after = 0 the second one is
    // reported, the third is not (one event per transition).
    sb.set_failure(FailureMode::TemporarilyUnavailable);
    for n in 1..=3 {
        until_token_request(&p, &sb, "alice", |status| {
            assert_eq!(status, 503, "failure {n}")
        })
        .await;
    }
    sb.set_failure(FailureMode::None);
    until_token_request(&p, &sb, "alice", |status| {
        assert_eq!(status, 200, "the refresh succeeds again")
    })
    .await;
    assert_eq!(request(&p, "alice").await, 200, "no second recovered");
    sb.revoke_consent("alice");
    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_ne!(r.status, 200, "{}", r.text());
    let c = admin(&p, "GET", "/connections/users/alice", None)
        .await
        .json();
    assert_eq!(c["state"], "needs_reauthorization", "{c}");
    let r = admin(&p, "DELETE", "/connections/users/alice", None).await;
    assert!(r.status.is_success(), "{}", r.text());

    let want = [
        "connection.created",
        "connection.reauthorized",
        "connection.refresh_failing",
        "connection.recovered",
        "connection.reauthorization_required",
        "connection.deleted",
    ];
    let got = rx.wait_delivered(want.len(), WAIT).await;
    let kinds: Vec<String> = got.iter().map(Delivery::kind).collect();
    assert_eq!(kinds, want, "in the order they happened");
    for d in &got {
        verify(&secret, d);
        let body = d.json();
        assert!(body["timestamp"].is_string(), "{body}");
        assert_eq!(body["data"]["id"], "alice", "{body}");
        assert_eq!(body["data"]["pool"], "users", "{body}");
    }
    // `data` is the admin API's JSON of the connection at the change.
    assert_eq!(
        got[0].json()["data"],
        created,
        "created carries what POST answered"
    );
    assert_eq!(
        got[2].json()["data"]["last_error"]["error"],
        "temporarily_unavailable"
    );
    assert_eq!(got[3].json()["data"]["last_error"], serde_json::Value::Null);
    assert_eq!(got[4].json()["data"]["state"], "needs_reauthorization");
    // Nothing more arrives: the third failure and the second success were
    // not transitions.
    let all = rx.deliveries();
    assert_eq!(
        all.len(),
        want.len(),
        "{:?}",
        all.iter().map(Delivery::kind).collect::<Vec<_>>()
    );
    // No token, code or refresh token in any header or body.
    let secrets = sb.issued_secrets();
    assert!(!secrets.is_empty());
    for d in &all {
        let text = format!("{:?}{}", d.headers, d.body);
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "a token reached the receiver: {text}"
            );
        }
        assert!(!text.contains(&secret), "the secret reached the receiver");
    }
    let m = metrics(&p).await;
    assert_eq!(deliveries(&m, "delivered"), want.len() as f64, "{m}");
    for outcome in ["retried", "rejected", "expired"] {
        assert_eq!(deliveries(&m, outcome), 0.0, "{outcome}: {m}");
    }
}

#[tokio::test]
async fn retries_keep_the_webhook_id_honour_retry_after_and_hold_back_the_next_event() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let rx = Receiver::start().await;
    rx.script(&[
        Reply::Status(503, Some(0)),
        Reply::HangUp,
        Reply::Status(429, Some(1)),
    ]);
    let secret = new_secret();
    let p = support::start_proxy(&toml_for(&sb, &dir, hooks(&rx, &secret)).toml()).await;
    connect(&p, "bob").await;
    let r = admin(&p, "DELETE", "/connections/users/bob", None).await;
    assert!(r.status.is_success(), "{}", r.text());

    let got = rx.wait_delivered(2, WAIT).await;
    let all = rx.deliveries();
    let kinds: Vec<(String, Reply)> = all.iter().map(|d| (d.kind(), d.reply.clone())).collect();
    assert_eq!(
        kinds,
        [
            ("connection.created".to_owned(), Reply::Status(503, Some(0))),
            ("connection.created".to_owned(), Reply::HangUp),
            ("connection.created".to_owned(), Reply::Status(429, Some(1))),
            ("connection.created".to_owned(), Reply::Status(200, None)),
            ("connection.deleted".to_owned(), Reply::Status(200, None)),
        ],
        "the deleted event waits until created is delivered"
    );
    let ids: HashSet<&str> = all[..4].iter().map(|d| d.id()).collect();
    assert_eq!(ids.len(), 1, "one webhook-id on every attempt");
    assert_ne!(got[0].id(), got[1].id());
    for d in &all {
        verify(&secret, d);
    }
    // Retry-After: 1 was honoured: the fourth attempt came at least a
    // second after the third (timestamps are whole seconds).
    let ts = |d: &Delivery| {
        d.header("webhook-timestamp")
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    assert!(
        ts(&all[3]) > ts(&all[2]),
        "{} then {}",
        ts(&all[2]),
        ts(&all[3])
    );
    let m = metrics(&p).await;
    assert_eq!(deliveries(&m, "retried"), 3.0, "{m}");
    assert_eq!(deliveries(&m, "delivered"), 2.0, "{m}");
}

#[tokio::test]
async fn a_4xx_rejects_the_event_and_the_admin_api_lists_and_retries_it() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(410, None));
    let secret = new_secret();
    let p = support::start_proxy(&toml_for(&sb, &dir, hooks(&rx, &secret)).toml()).await;
    connect(&p, "carol").await;
    rx.wait_for(1, WAIT).await;

    let failed = wait_listed(&p, "failed", 1).await;
    let ev = &failed[0];
    assert_eq!(ev["type"], "connection.created", "{ev}");
    assert_eq!(ev["outcome"], "rejected", "{ev}");
    assert_eq!(ev["last_status"], 410, "{ev}");
    assert_eq!(ev["attempts"], 1, "{ev}");
    assert_eq!(ev["data"]["id"], "carol", "{ev}");
    let id = ev["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_listed(&p, "pending", 0).await.len(), 0);
    let m = metrics(&p).await;
    assert_eq!(deliveries(&m, "rejected"), 1.0, "{m}");

    // The receiver is fixed; the operator asks again.
    rx.set_default(Reply::Status(204, None));
    let r = admin(&p, "POST", &format!("/webhooks/events/{id}/retry"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "pending");
    let all = rx.wait_for(2, WAIT).await;
    assert_eq!(all[1].id(), id, "the same webhook-id");
    verify(&secret, &all[1]);
    let delivered = wait_listed(&p, "delivered", 1).await;
    assert_eq!(delivered[0]["id"], id.as_str());
    assert_eq!(delivered[0]["attempts"], 2);

    // The API's errors.
    for (method, path, status) in [
        ("POST", "/webhooks/events/msg_nothere/retry", 404),
        ("GET", "/webhooks/events/msg_nothere", 404),
        ("GET", "/webhooks/events?state=lost", 400),
        ("GET", "/webhooks/events?limit=0", 400),
        ("DELETE", "/webhooks/events", 405),
    ] {
        let r = admin(&p, method, path, None).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
    }
    let r = admin_as(&p, "GET", "/webhooks/events", None, Some("wrong")).await;
    assert_eq!(r.status, 401);
    let r = admin(&p, "GET", &format!("/webhooks/events/{id}"), None).await;
    assert_eq!(r.json()["state"], "delivered");
}

/// Polls the admin API until `state` lists at least `n` events (the
/// deliverer writes after the receiver answered).
async fn wait_listed(p: &Running, state: &str, n: usize) -> Vec<serde_json::Value> {
    let end = std::time::Instant::now() + WAIT;
    loop {
        let r = admin(p, "GET", &format!("/webhooks/events?state={state}"), None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let events = r.json()["events"].as_array().cloned().unwrap_or_default();
        if events.len() >= n && (n > 0 || events.is_empty()) {
            return events;
        }
        assert!(
            std::time::Instant::now() < end,
            "{n} {state} events expected: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_event_not_delivered_within_max_age_expires_and_is_counted() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(503, None));
    let secret = new_secret();
    let w = Webhooks {
        timeout: Some(Duration::from_secs(1)),
        max_age: Some(Duration::from_secs(1)),
        ..hooks(&rx, &secret)
    };
    let p = support::start_proxy(&toml_for(&sb, &dir, w).toml()).await;
    connect(&p, "alice").await;
    let failed = wait_listed(&p, "failed", 1).await;
    assert_eq!(failed[0]["outcome"], "expired", "{}", failed[0]);
    assert_eq!(failed[0]["last_status"], 503);
    let attempts = rx.deliveries().len();
    assert!(attempts >= 2, "retried until max_age: {attempts}");
    assert_eq!(failed[0]["attempts"], attempts as i64);
    let m = metrics(&p).await;
    assert_eq!(deliveries(&m, "expired"), 1.0, "{m}");
    assert_eq!(deliveries(&m, "retried"), (attempts - 1) as f64, "{m}");
}

#[tokio::test]
async fn the_queue_gauges_show_what_waits_and_events_can_be_filtered() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let rx = Receiver::start().await;
    rx.set_default(Reply::Hold);
    let secret = new_secret();
    let w = Webhooks {
        // A receiver token in the query: /status must not show it.
        url: format!("{}?token=receiver-query-secret", rx.url()),
        events: Some(vec![
            "connection.deleted".into(),
            "connect_session.*".into(),
        ]),
        ..hooks(&rx, &secret)
    };
    let p = support::start_proxy(&toml_for(&sb, &dir, w).toml()).await;
    let m = metrics(&p).await;
    assert_eq!(metric(&m, "flinks_proxy_webhook_queue"), Some(0.0), "{m}");
    assert_eq!(
        metric(&m, "flinks_proxy_webhook_oldest_pending_seconds"),
        Some(0.0)
    );
    connect(&p, "alice").await;
    connect(&p, "bob").await;
    let r = admin(&p, "DELETE", "/connections/users/bob", None).await;
    assert!(r.status.is_success());
    let held = rx.wait_for(1, WAIT).await;
    assert_eq!(
        held[0].kind(),
        "connection.deleted",
        "created events are not wanted"
    );
    // The held delivery is pending: the gauges say so.
    let end = std::time::Instant::now() + WAIT;
    loop {
        let m = metrics(&p).await;
        if metric(&m, "flinks_proxy_webhook_queue") == Some(1.0) {
            assert!(metric(&m, "flinks_proxy_webhook_oldest_pending_seconds").unwrap() > 0.0);
            let status = get(&support::admin_url(&p, "/status")).await.text();
            let parsed: serde_json::Value = serde_json::from_str(&status).unwrap();
            let w = &parsed["webhooks"];
            assert_eq!(w["queue"]["pending"], 1, "{w}");
            let events = serde_json::json!(["connection.deleted", "connect_session.*"]);
            assert_eq!(w["events"], events, "{w}");
            assert_eq!(w["url"], format!("{}?…", rx.url()), "{w}");
            assert!(!status.contains("receiver-query-secret"), "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "queue never showed the held event: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rx.release();
    let end = std::time::Instant::now() + WAIT;
    loop {
        let m = metrics(&p).await;
        if metric(&m, "flinks_proxy_webhook_queue") == Some(0.0) {
            assert_eq!(
                metric(&m, "flinks_proxy_webhook_oldest_pending_seconds"),
                Some(0.0)
            );
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "the queue never emptied: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rx.deliveries().len(), 1, "only the wanted event was sent");
}

#[tokio::test]
async fn a_kill_9_during_a_delivery_loses_nothing_and_the_restart_delivers_it_with_the_same_id() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let rx = Receiver::start().await;
    rx.set_default(Reply::Hold);
    let secret = new_secret();
    let config = toml_for(&sb, &dir, hooks(&rx, &secret)).write(&dir);
    let mut first = support::ProxyProcess::start(&config, &[]);
    let admin_url = format!("http://{}", first.admin_addr.expect("admin"));
    let created = admin_post(
        &admin_url,
        "/connections/users",
        serde_json::json!({"code": "code-alice"}),
    )
    .await;
    assert_eq!(created, 201);
    let held = rx.wait_for(1, WAIT).await;
    let id = held[0].id().to_owned();
    first.child.kill().expect("SIGKILL");
    let _ = first.child.wait();
    // A change right after the kill by the CLI (another writer) is an
    // event too: the trigger writes it with the change.
    let (code, _, err) = support::run_binary(
        &[
            "--config",
            config.to_str().unwrap(),
            "connections",
            "delete",
            "--pool",
            "users",
            "alice",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");

    rx.set_default(Reply::Status(200, None));
    let second = support::ProxyProcess::start(&config, &[]);
    let got = rx.wait_delivered(2, WAIT).await;
    assert_eq!(got[0].id(), id, "the held event again, same webhook-id");
    assert_eq!(got[0].kind(), "connection.created");
    assert_eq!(got[1].kind(), "connection.deleted");
    for d in &got {
        verify(&secret, d);
    }
    drop(second);
}

async fn admin_post(base: &str, path: &str, body: serde_json::Value) -> u16 {
    let req = http::Request::post(format!("{base}{path}"))
        .header("authorization", format!("Bearer {API_TOKEN}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    support::send(&support::client(), req).await.status.as_u16()
}

#[tokio::test]
async fn two_replicas_on_one_postgres_store_deliver_each_event_once_in_order() {
    let pg = support::postgres::PgCluster::start();
    pg.create_database("hooks");
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let rx = Receiver::start().await;
    let secret = new_secret();
    let toml =
        toml_for(&sb, &dir, hooks(&rx, &secret)).with(|c| c.store = Some(pg_store(&pg, "hooks")));
    let a = support::start_proxy(&toml.toml()).await;
    let b = support::start_proxy(&toml.toml()).await;
    let users = ["alice", "bob", "carol"];
    for (i, user) in users.iter().enumerate() {
        let p = if i % 2 == 0 { &a } else { &b };
        connect(p, user).await;
    }
    for (i, user) in users.iter().enumerate() {
        let p = if i % 2 == 0 { &b } else { &a };
        let r = admin(p, "DELETE", &format!("/connections/users/{user}"), None).await;
        assert!(r.status.is_success(), "{}", r.text());
    }
    let got = rx.wait_delivered(6, WAIT).await;
    let all = rx.deliveries();
    assert_eq!(
        all.len(),
        6,
        "each event once across the fleet: {:?}",
        all.iter().map(Delivery::kind).collect::<Vec<_>>()
    );
    let mut per_user: HashMap<String, Vec<String>> = HashMap::new();
    for d in &got {
        verify(&secret, d);
        let user = d.json()["data"]["id"].as_str().unwrap().to_owned();
        per_user.entry(user).or_default().push(d.kind());
    }
    for user in users {
        assert_eq!(
            per_user[user],
            ["connection.created", "connection.deleted"],
            "{user}"
        );
    }
    let total =
        deliveries(&metrics(&a).await, "delivered") + deliveries(&metrics(&b).await, "delivered");
    assert_eq!(total, 6.0);
    assert_listings_use_the_index(&pg.url("hooks")).await;
}

/// The admin API's pages of one state's events and the operator page's
/// latest events are read down `webhook_events_listed` (migration 0006),
/// already in order. Sequential scans are switched off for the check: on
/// a table this small the planner would scan it anyway.
async fn assert_listings_use_the_index(url: &str) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    for sql in [
        "SELECT seq, id FROM webhook_events WHERE state = 'delivered' AND seq > 1 \
         ORDER BY seq LIMIT 100",
        "SELECT seq, id FROM webhook_events WHERE state = 'delivered' \
         ORDER BY seq DESC LIMIT 20",
    ] {
        let rows: Vec<(String,)> = sqlx::query_as(&format!("EXPLAIN {sql}"))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let plan: Vec<String> = rows.into_iter().map(|r| r.0).collect();
        let plan = plan.join("\n");
        assert!(plan.contains("webhook_events_listed"), "{sql}\n{plan}");
        assert!(!plan.contains("Sort"), "{sql}\n{plan}");
    }
}

#[tokio::test]
async fn an_outcome_is_kept_through_a_store_outage_and_delivery_resumes_after_it() {
    let pg = support::postgres::PgCluster::start();
    pg.create_database("outage");
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let rx = Receiver::start().await;
    // The first attempt fails: the event is pending (a retry scheduled)
    // when the database goes away.
    rx.script(&[Reply::Status(503, Some(1))]);
    let secret = new_secret();
    let toml =
        toml_for(&sb, &dir, hooks(&rx, &secret)).with(|c| c.store = Some(pg_store(&pg, "outage")));
    let p = support::start_proxy(&toml.toml()).await;
    connect(&p, "alice").await;
    rx.wait_for(1, WAIT).await;
    pg.stop();
    let r = admin(
        &p,
        "POST",
        "/connections/users",
        Some(serde_json::json!({"code": "code-bob"})),
    )
    .await;
    assert_eq!(
        r.status,
        503,
        "no store, no connection, no event: {}",
        r.text()
    );
    pg.start_server();
    connect(&p, "bob").await;
    let got = rx.wait_delivered(2, WAIT).await;
    let mut users: Vec<String> = got
        .iter()
        .map(|d| d.json()["data"]["id"].as_str().unwrap().to_owned())
        .collect();
    users.sort();
    assert_eq!(
        users,
        ["alice", "bob"],
        "both delivered, alice's answer recorded through the outage"
    );
    let alice = got
        .iter()
        .find(|d| d.json()["data"]["id"] == "alice")
        .unwrap();
    assert_eq!(
        alice.id(),
        rx.deliveries()[0].id(),
        "alice's retry kept its id"
    );
}

#[tokio::test]
async fn webhooks_turned_on_by_a_reload_deliver_what_happened_before_it() {
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let rx = Receiver::start().await;
    let secret = new_secret();
    let without = ProxyToml::pool(&sb, &dir.join("c.db"), &new_key());
    let with = without
        .clone()
        .with(|c| c.webhooks = Some(hooks(&rx, &secret)));
    let p = support::start_proxy(&without.toml()).await;
    connect(&p, "alice").await;
    // Without [webhooks] the event waits in the outbox, undelivered.
    let r = admin(&p, "GET", "/webhooks/events?state=pending", None).await;
    assert_eq!(
        r.json()["events"].as_array().map(Vec::len),
        Some(1),
        "{}",
        r.text()
    );
    assert!(rx.deliveries().is_empty());
    p.reload(support::parse_config(&with.toml(), &std::env::temp_dir()))
        .expect("reload");
    let got = rx.wait_delivered(1, WAIT).await;
    assert_eq!(got[0].kind(), "connection.created");
    verify(&secret, &got[0]);
    // And off again: a later event stays pending.
    p.reload(support::parse_config(
        &without.toml(),
        &std::env::temp_dir(),
    ))
    .expect("reload");
    connect(&p, "bob").await;
    let pending = wait_listed(&p, "pending", 1).await;
    assert_eq!(pending[0]["data"]["id"], "bob");
    assert_eq!(rx.deliveries().len(), 1);
}
