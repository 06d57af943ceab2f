//! Replicas on a shared PostgreSQL store (issue 10, CONNECTIONS.md "Store"):
//! the backend's store behaviour, a database outage, visibility across
//! replicas, and a fleet of three real proxy processes. Every test starts
//! its own throwaway cluster (`support::postgres`).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flinks_proxy::config::{StoreConfig, StoreLocation};
use flinks_proxy::ground::metrics::Metrics;
use flinks_proxy::ground::secret::Secret;
use flinks_proxy::sandbox::{Sandbox, SandboxOptions, SandboxUser};
use flinks_proxy::store::{Lease, Store, StoreError, Tokens, Written};
use http::Request;
use http_body_util::Full;
use support::connections::{admin, connect, get_as, new_key, reauthorize, API_TOKEN, SELECT};
use support::postgres::{PgCluster, PASSWORD};
use support::{client, config, send, ProxyProcess, ProxyToml, Resp, TempDir};

fn store_config(url: &str, key: &str) -> StoreConfig {
    StoreConfig {
        location: StoreLocation::Postgres(Secret::new(url.to_owned())),
        key: Secret::new(key.to_owned()),
        old_keys: vec![],
        max_connections: 4,
    }
}

fn tokens(rt: &str, at: &str) -> Tokens {
    Tokens {
        refresh_token: Some(Secret::new(rt.to_owned())),
        access_token: Some(Secret::new(at.to_owned())),
        access_expires_at: Some(flinks_proxy::ground::now_ms() + 60_000),
    }
}

/// A proxy config on a PostgreSQL store, pool `users` on the sandbox.
fn pg_toml(sb: &Sandbox, url: &str, key: &str) -> String {
    let store = config::Store {
        url: Some(url.into()),
        key: key.into(),
        old_keys: None,
        max_connections: Some(4),
    };
    ProxyToml::pool(sb, std::path::Path::new("unused.db"), key)
        .with(|c| {
            c.server.request_timeout = Some(Duration::from_secs(10));
            c.store = Some(store);
        })
        .toml()
}

async fn users_sandbox(subs: &[String], expires_in: u64) -> Sandbox {
    Sandbox::start(SandboxOptions {
        users: subs.iter().map(|s| SandboxUser::new(s)).collect(),
        expires_in: Some(expires_in),
        rotate_refresh_tokens: true,
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox")
}

/// Polls `f` until it returns true (up to `limit`).
async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_backend_keeps_the_store_contract() {
    let pg = PgCluster::start();
    pg.create_database("contract");
    let url = pg.url("contract");
    let key = new_key();
    let a = Store::open(&store_config(&url, &key), Metrics::new().store())
        .await
        .expect("open");
    assert_eq!(a.kind(), "postgres");
    let (info, created) = a
        .authorize("users", "alice", Some("sub-a"), &tokens("rt", "at"))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(info.sub.as_deref(), Some("sub-a"));
    let (_, created) = a
        .authorize("users", "alice", Some("sub-a"), &tokens("rt1", "at1"))
        .await
        .unwrap();
    assert!(!created, "a second authorize replaces");
    // Another replica: same store, another lease holder.
    let b = Store::open(&store_config(&url, &key), Metrics::new().store())
        .await
        .unwrap();
    let ttl = Duration::from_secs(60);
    let Lease::Taken(leased) = a.lease("users", "alice", ttl).await.unwrap() else {
        panic!("free lease")
    };
    let Lease::Busy(read_by_b) = b.lease("users", "alice", ttl).await.unwrap() else {
        panic!("a holds the lease")
    };
    assert!(matches!(
        a.commit_refresh("users", "alice", &leased.version, &tokens("rt2", "at2"))
            .await
            .unwrap(),
        Written::Done(_)
    ));
    // Writes are conditional on the refresh token read: b's view is stale.
    assert!(
        matches!(
            b.commit_refresh("users", "alice", &read_by_b.version, &tokens("x", "y"))
                .await
                .unwrap(),
            Written::Superseded(_)
        ),
        "a stale commit writes nothing"
    );
    match b.lease("users", "alice", Duration::ZERO).await.unwrap() {
        Lease::Taken(r) => assert_eq!(r.tokens.refresh_token.unwrap().expose(), "rt2"),
        l => panic!("{l:?}"),
    }
    // b's lease had a zero TTL: it expired, so a takes it (a dead holder's
    // lease frees itself).
    assert!(matches!(
        a.lease("users", "alice", ttl).await.unwrap(),
        Lease::TakenOver(_)
    ));
    a.release("users", "alice").await.unwrap();
    assert!(matches!(
        b.lease("users", "alice", ttl).await.unwrap(),
        Lease::Taken(_)
    ));
    assert!(matches!(
        b.lease("users", "nobody", ttl).await.unwrap(),
        Lease::Gone
    ));
    let listed = b.list("users", None, None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(b.counts("users").await.unwrap().len(), 1);
    // Sealed at rest.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let (rt,): (String,) =
        sqlx::query_as("SELECT refresh_token FROM connections WHERE id = 'alice'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!rt.contains("rt2"), "{rt}");
    assert!(b.delete("users", "alice").await.unwrap());
    assert!(b.get("users", "alice").await.unwrap().is_none());
    // Another key is refused; a newer schema is refused.
    let e = Store::open(&store_config(&url, &new_key()), Metrics::new().store())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::KeyMismatch { .. }), "{e}");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', TRUE, '\\x00'::BYTEA, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let e = Store::open(&store_config(&url, &key), Metrics::new().store())
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::SchemaTooNew { found: 9999, .. }),
        "{e}"
    );
    // A database that cannot be reached: a clear error without the password.
    let down = format!("postgres://postgres:{PASSWORD}@127.0.0.1:1/contract");
    let e = Store::open(&store_config(&down, &key), Metrics::new().store())
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    let shown = format!("{e} {e:?} {:?}", store_config(&down, &key));
    assert!(!shown.contains(PASSWORD), "{shown}");
}

async fn status(p: &flinks_proxy::Running) -> serde_json::Value {
    support::get(&support::admin_url(p, "/status")).await.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_spares_users_in_memory_and_heals_without_restart() {
    let pg = PgCluster::start();
    pg.create_database("outage");
    let subs: Vec<String> = ["alice", "bob"].iter().map(|s| s.to_string()).collect();
    let sb = users_sandbox(&subs, 3600).await;
    let p = support::start_proxy(&pg_toml(&sb, &pg.url("outage"), &new_key())).await;
    connect(&p, "alice").await;
    connect(&p, "bob").await;
    assert_eq!(get_as(&p, "/api/fdx/5/accounts", "alice").await.status, 200);
    assert_eq!(status(&p).await["store"]["healthy"], true);

    pg.stop();
    let r = get_as(&p, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 200, "alice's token is in memory: {}", r.text());
    let r = get_as(&p, "/api/fdx/5/accounts", "bob").await;
    assert_eq!(
        r.status,
        503,
        "bob must be read from the store: {}",
        r.text()
    );
    assert_eq!(r.json()["error"], "store_unavailable");
    assert!(r.header("retry-after").is_some());
    let s = status(&p).await;
    assert_eq!(s["store"]["healthy"], false, "{s}");
    let m = support::get(&support::admin_url(&p, "/metrics"))
        .await
        .text();
    assert_eq!(
        support::metric(&m, "flinks_proxy_store_up{kind=\"postgres\"}"),
        Some(0.0),
        "{m}"
    );
    assert!(!s.to_string().contains(PASSWORD));

    pg.start_server();
    let healed = eventually(Duration::from_secs(30), || async {
        get_as(&p, "/api/fdx/5/accounts", "bob").await.status == 200
    })
    .await;
    assert!(
        healed,
        "bob works again once PostgreSQL is back, without a restart"
    );
    assert_eq!(status(&p).await["store"]["healthy"], true);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_on_one_replica_works_on_another_and_its_deletion_follows() {
    let pg = PgCluster::start();
    pg.create_database("visible");
    let subs: Vec<String> = ["alice"].iter().map(|s| s.to_string()).collect();
    let sb = users_sandbox(&subs, 3600).await;
    let toml = pg_toml(&sb, &pg.url("visible"), &new_key());
    let a = support::start_proxy(&toml).await;
    let b = support::start_proxy(&toml).await;
    connect(&a, "alice").await;
    let r = get_as(&b, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sb.user_token_requests("alice"),
        1,
        "b used the token a stored"
    );

    let r = admin(&a, "DELETE", "/connections/users/alice", None).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let deleted = Instant::now();
    let gone = eventually(Duration::from_secs(20), || async {
        get_as(&b, "/api/fdx/5/accounts", "alice").await.status == 404
    })
    .await;
    assert!(gone, "b stops using a deleted connection");
    // Bound: the doorbell, else the next read of the change feed.
    let took = deleted.elapsed();
    assert!(
        took < flinks_proxy::store::CHANGE_POLL + Duration::from_secs(5),
        "{took:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// One proxied request of the fleet test.
struct Outcome {
    replica: usize,
    user: String,
    sent: Instant,
    done: Instant,
    status: u16,
    body: String,
}

async fn fleet_get(url: String, user: String) -> (u16, String) {
    let req = Request::get(url)
        .header(SELECT, user)
        .body(Full::<Bytes>::default())
        .expect("request");
    let c = client();
    match tokio::time::timeout(Duration::from_secs(15), c.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            (status, body)
        }
        Ok(Err(e)) => (0, e.to_string()),
        Err(_) => (0, "timed out".into()),
    }
}

async fn admin_post(admin_url: String, sub: &str) -> Resp {
    let req = Request::post(format!("{admin_url}/connections/users"))
        .header("authorization", format!("Bearer {API_TOKEN}"))
        .body(Full::new(Bytes::from(
            serde_json::json!({"code": format!("code-{sub}"), "id": sub}).to_string(),
        )))
        .expect("request");
    send(&client(), req).await
}

/// Three real proxy processes on one PostgreSQL, 24 users with rotating
/// refresh tokens and 3 s access tokens, load over the replicas for ~14 s,
/// one replica killed with SIGKILL, the database restarted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_three_shares_one_token_per_user_per_expiry() {
    const USERS: usize = 24;
    const LIFETIME: Duration = Duration::from_secs(3);
    let pg = PgCluster::start();
    pg.create_database("fleet");
    let subs: Vec<String> = (0..USERS).map(|i| format!("user{i:02}")).collect();
    let sb = users_sandbox(&subs, LIFETIME.as_secs()).await;
    sb.set_token_delay(Duration::from_millis(100));
    let dir = TempDir::new();
    let config = dir.write("proxy.toml", pg_toml(&sb, &pg.url("fleet"), &new_key()));
    let mut replicas: Vec<ProxyProcess> =
        (0..3).map(|_| ProxyProcess::start(&config, &[])).collect();
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| r.url("/api/fdx/5/accounts"))
        .collect();
    let admins: Vec<String> = replicas.iter().map(|r| r.admin("")).collect();
    // Each user connects through one replica and is used through all.
    for (i, sub) in subs.iter().enumerate() {
        let r = admin_post(admins[i % 3].clone(), sub).await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let start = Instant::now();
    let killed = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let run_for = Duration::from_secs(14);
    let mut workers = Vec::new();
    for w in 0..8usize {
        let (urls, subs, killed, outcomes) = (
            urls.clone(),
            subs.clone(),
            Arc::clone(&killed),
            Arc::clone(&outcomes),
        );
        workers.push(tokio::spawn(async move {
            let mut n = w;
            while start.elapsed() < run_for {
                n += 1;
                let user = subs[(n * 7 + w) % subs.len()].clone();
                let mut replica = n % 3;
                if replica == 2 && killed.load(Ordering::Acquire) {
                    replica = n % 2;
                }
                let sent = Instant::now();
                let (status, body) = fleet_get(urls[replica].clone(), user.clone()).await;
                outcomes.lock().unwrap().push(Outcome {
                    replica,
                    user,
                    sent,
                    done: Instant::now(),
                    status,
                    body,
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    killed.store(true, Ordering::Release);
    replicas[2].child.kill().expect("SIGKILL replica 2");
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let db_down = Instant::now();
    pg.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.start_server();
    let db_up = Instant::now();
    for w in workers {
        w.await.expect("worker");
    }
    let elapsed = start.elapsed();

    // Allowed failures: requests sent to replica 2 before it was killed and
    // answered after (in flight at the kill); and, while the database was
    // down (until it was up again plus one pool reconnect), 503
    // store_unavailable for users whose token was not usable in memory.
    let reconnect_grace = Duration::from_secs(4);
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let mut in_flight_at_kill = 0;
    let mut store_unavailable = 0;
    // The one loss no proxy can prevent: a refresh the endpoint answered
    // (rotating the refresh token) as replica 2 died, so the new refresh
    // token never reached a store; the next refresh presents the retired
    // one and the sandbox refuses it. Such a user (the sandbox saw its
    // rotation within a second of the kill) is at risk, as in the chaos
    // suite; any other reauthorization is a failure.
    let at_risk: std::collections::BTreeSet<String> = sb
        .refresh_token_reuses()
        .into_iter()
        .filter(|r| {
            let (at, kill) = (r.rotated_at, killed_at);
            at + Duration::from_secs(1) >= kill && at <= kill + Duration::from_secs(1)
        })
        .map(|r| r.sub)
        .collect();
    assert!(
        at_risk.len() <= 2,
        "at most the refreshes in flight on replica 2 at the kill: {at_risk:?}"
    );
    let mut lost_at_kill = 0;
    let mut failures = Vec::new();
    for o in outcomes.iter().filter(|o| o.status != 200) {
        if o.status == 401 && at_risk.contains(&o.user) {
            lost_at_kill += 1;
        } else if o.replica == 2
            && o.sent <= killed_at + Duration::from_millis(50)
            && o.done >= killed_at
        {
            in_flight_at_kill += 1;
        } else if o.status == 503
            && o.body.contains("store_unavailable")
            && o.done >= db_down
            && o.sent <= db_up + reconnect_grace
        {
            store_unavailable += 1;
        } else {
            failures.push(format!(
                "replica {} at {:?}: {} {}",
                o.replica,
                o.sent - start,
                o.status,
                o.body
            ));
        }
    }
    let total = outcomes.len();
    // Store round trips per proxied request on replica 0 (warm after the
    // first request of each user; the 5 s re-check and refreshes remain).
    let m = support::get(&replicas[0].admin("/metrics")).await.text();
    let store_ops: f64 = m
        .lines()
        .filter(|l| l.starts_with("flinks_proxy_store_operations_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    let served0 = outcomes.iter().filter(|o| o.replica == 0).count();
    // A cold user's first request on a replica: one store read.
    let mut seen = std::collections::HashSet::new();
    let mut cold: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.status == 200 && seen.insert((o.replica, o.user.clone())))
        .map(|o| o.done - o.sent)
        .collect();
    cold.sort();
    let warm_median = {
        let mut all: Vec<Duration> = outcomes.iter().map(|o| o.done - o.sent).collect();
        all.sort();
        all.get(all.len() / 2).copied().unwrap_or_default()
    };
    eprintln!(
        "fleet: store round trips per request on replica 0: {:.3} ({store_ops} for {served0}); \
         cold first requests: median {:?}, max {:?} over {} (all requests: median {warm_median:?})",
        store_ops / served0.max(1) as f64,
        cold.get(cold.len() / 2).copied().unwrap_or_default(),
        cold.last().copied().unwrap_or_default(),
        cold.len()
    );
    let refreshes: Vec<u64> = subs.iter().map(|s| sb.user_token_requests(s) - 1).collect();
    let total_refreshes: u64 = refreshes.iter().sum();
    // Refresh ahead renews a 3 s token after half its life: one expiry
    // cycle per 1.5 s per user, for the whole fleet together.
    let cycles = elapsed.as_secs_f64() / (LIFETIME.as_secs_f64() / 2.0);
    let per_cycle = total_refreshes as f64 / (USERS as f64 * cycles);
    eprintln!(
        "fleet: {total} requests in {elapsed:?}, {in_flight_at_kill} in flight at the kill, \
         {store_unavailable} store_unavailable during the database restart, \
         {lost_at_kill} refused for users whose rotation was answered to replica 2 as it died {at_risk:?}, \
         {total_refreshes} refreshes ({per_cycle:.2} per user per renewal cycle), \
         max per user in flight {}, expired tokens sent {}",
        sb.max_user_token_requests_in_flight(),
        sb.expired_token_requests()
    );
    if !failures.is_empty() {
        // What the replicas said about the users that failed (the logs
        // hold no secrets: checked below and in the chaos suite).
        let failed: std::collections::BTreeSet<&str> = outcomes
            .iter()
            .filter(|o| o.status == 401)
            .map(|o| o.user.as_str())
            .collect();
        for r in sb.refresh_token_reuses() {
            eprintln!(
                "{} presented a retired refresh token at {:?} (rotated at {:?}; replica 2 killed at {:?})",
                r.sub,
                r.presented_at - start,
                r.rotated_at - start,
                killed_at - start
            );
        }
        for (i, r) in replicas.iter().enumerate() {
            for line in r.log().lines() {
                if failed
                    .iter()
                    .any(|u| line.contains(&format!("={u}")) || line.contains(&format!("=\"{u}\"")))
                    && !line.contains(" INFO request ")
                {
                    eprintln!("replica {i}: {line}");
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(total > 500, "load was spread: {total}");
    assert_eq!(sb.expired_token_requests(), 0, "no expired token sent");
    assert_eq!(
        sb.max_user_token_requests_in_flight(),
        1,
        "one token request per user at a time, fleet-wide"
    );
    assert!(
        per_cycle < 1.6,
        "about one refresh per user per cycle, not one per replica: {per_cycle:.2}"
    );
    assert!(
        refreshes.iter().all(|&r| r >= 2),
        "every user was refreshed: {refreshes:?}"
    );
    // Every user still works at the end, on both live replicas.
    for sub in subs.iter().filter(|s| !at_risk.contains(*s)) {
        for url in &urls[..2] {
            let (status, body) = fleet_get(url.clone(), sub.clone()).await;
            assert_eq!(status, 200, "{sub}: {body}");
        }
    }
    for r in &replicas[..2] {
        let log = r.log();
        assert!(
            !log.contains(PASSWORD),
            "the database password is never logged"
        );
        let s = support::get(&r.admin("/status")).await.text();
        assert!(!s.contains(PASSWORD), "{s}");
    }
    for r in &mut replicas {
        let _ = r.child.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_while_the_database_is_down_waits_for_it_and_says_so() {
    let pg = PgCluster::start();
    pg.create_database("late");
    pg.stop();
    let subs: Vec<String> = vec!["alice".to_owned()];
    let sb = users_sandbox(&subs, 3600).await;
    let p = support::start_proxy(&pg_toml(&sb, &pg.url("late"), &new_key())).await;
    let r = support::get(&support::admin_url(&p, "/readyz")).await;
    assert_eq!(r.status, 503);
    assert!(r.text().contains("waiting for the store"), "{}", r.text());
    let r = admin(
        &p,
        "POST",
        "/connections/users",
        Some(serde_json::json!({"code": "code-alice"})),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "store_unavailable");
    assert_eq!(status(&p).await["store"]["healthy"], false);

    pg.start_server();
    let ready = eventually(Duration::from_secs(30), || async {
        support::get(&support::admin_url(&p, "/readyz"))
            .await
            .status
            == 200
    })
    .await;
    assert!(ready, "ready once the store is reached, without a restart");
    connect(&p, "alice").await;
    assert_eq!(get_as(&p, "/api/fdx/5/accounts", "alice").await.status, 200);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_reauthorization_on_one_replica_reach_the_other() {
    let pg = PgCluster::start();
    pg.create_database("states");
    let subs: Vec<String> = vec!["alice".to_owned()];
    let sb = users_sandbox(&subs, 3600).await;
    let toml = pg_toml(&sb, &pg.url("states"), &new_key());
    let a = support::start_proxy(&toml).await;
    let b = support::start_proxy(&toml).await;
    connect(&a, "alice").await;
    assert_eq!(get_as(&b, "/api/fdx/5/accounts", "alice").await.status, 200);

    // Consent revoked: a learns it from the API (code 602), b from the store.
    sb.revoke_consent("alice");
    let r = get_as(&a, "/api/fdx/5/accounts", "alice").await;
    assert_eq!(r.status, 401, "{}", r.text());
    let turned = eventually(Duration::from_secs(20), || async {
        let r = get_as(&b, "/api/fdx/5/accounts", "alice").await;
        r.status == 401 && r.text().contains("reauthorization_required")
    })
    .await;
    assert!(
        turned,
        "b stops sending alice's token once a marks her needs_reauthorization"
    );

    // Re-authorized through a: b serves her again.
    let r = reauthorize(&a, &sb, "alice").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let back = eventually(Duration::from_secs(20), || async {
        get_as(&b, "/api/fdx/5/accounts", "alice").await.status == 200
    })
    .await;
    assert!(back, "b follows the re-authorization");
    a.shutdown().await;
    b.shutdown().await;
}

/// A config with one static credential on a PostgreSQL store.
fn credential_on_store(sb: &Sandbox, url: &str, key: &str, grant: &str) -> String {
    let o = SandboxOptions::default();
    let mut credential = config::Credential {
        grant_type: grant.to_owned(),
        scope: None,
        ..config::Credential::sandbox(sb)
    };
    match grant {
        "refresh_token" => credential.refresh_token = Some(o.refresh_token.into()),
        _ => credential.shared = Some(true),
    }
    let store = config::Store {
        url: Some(url.into()),
        key: key.into(),
        old_keys: None,
        max_connections: None,
    };
    ProxyToml::listeners()
        .credential("flinks", credential)
        .route(
            "flinks",
            config::Route::credential("/", &sb.api_url(), "flinks"),
        )
        .with(|c| {
            c.server.request_timeout = Some(Duration::from_secs(10));
            c.store = Some(store);
        })
        .toml()
}

/// Two replicas share one credential through the store for `run_for`,
/// every request answered; returns the number of requests.
async fn share_one_credential(grant: &str, sb: &Sandbox, run_for: Duration) -> u64 {
    let pg = PgCluster::start();
    pg.create_database("cred");
    let toml = credential_on_store(sb, &pg.url("cred"), &new_key(), grant);
    let replicas = [
        support::start_proxy(&toml).await,
        support::start_proxy(&toml).await,
    ];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < run_for {
        for p in &replicas {
            let r = support::get(&support::proxy_url(p, "/api/v1/accounts")).await;
            assert_eq!(r.status, 200, "{grant}: {}", r.text());
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in replicas {
        p.shutdown().await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_rotating_refresh_token_through_the_store() {
    let sb = Sandbox::start(SandboxOptions {
        expires_in: Some(3),
        rotate_refresh_tokens: true,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    sb.set_token_delay(Duration::from_millis(100));
    let run_for = Duration::from_secs(8);
    let n = share_one_credential("refresh_token", &sb, run_for).await;
    assert!(n > 100, "{n}");
    // Without the store, each replica would present its own copy of the
    // refresh token and the rotation would refuse the other's.
    assert_eq!(
        sb.token_requests(),
        sb.successful_token_requests(),
        "no refused refresh"
    );
    assert_eq!(
        sb.max_concurrent_token_requests(),
        1,
        "one token request at a time across both"
    );
    assert_eq!(sb.expired_token_requests(), 0);
    // One renewal per 1.5 s (half of a 3 s token) for the pair, not two.
    let refreshes = sb.token_requests_by_grant("refresh_token");
    let cycles = run_for.as_secs_f64() / 1.5;
    assert!(
        (refreshes as f64) < cycles * 1.4 + 2.0,
        "{refreshes} refreshes for {cycles:.1} cycles"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_client_credentials_token_is_fetched_once_per_expiry_for_both_replicas() {
    let sb = Sandbox::start(SandboxOptions {
        expires_in: Some(3),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let run_for = Duration::from_secs(6);
    share_one_credential("client_credentials", &sb, run_for).await;
    let requests = sb.token_requests_by_grant("client_credentials");
    let cycles = run_for.as_secs_f64() / 1.5;
    assert!(
        (requests as f64) < cycles * 1.4 + 2.0,
        "{requests} token requests for {cycles:.1} cycles"
    );
    assert_eq!(sb.max_concurrent_token_requests(), 1);
    assert_eq!(sb.expired_token_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_speaks_tls_as_the_urls_sslmode_says() {
    let pg = PgCluster::start();
    pg.create_database("tls");
    let pki = support::Pki::new("pg");
    let leaf = pki.server_named(&["localhost"]);
    pg.require_tls(&leaf.cert_pem, &leaf.key_pem);
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let other_ca = dir.write("other.pem", support::Pki::new("other").ca_pem);
    let key = new_key();
    let url = |q: &str| {
        format!(
            "postgres://postgres:{PASSWORD}@localhost:{}/tls?{q}",
            pg.port()
        )
    };
    let open = |u: String| {
        let key = key.clone();
        async move { Store::open(&store_config(&u, &key), Metrics::new().store()).await }
    };
    // The server refuses plaintext: these only work over TLS.
    open(url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        ca.display()
    )))
    .await
    .expect("verify-full against the right CA");
    open(url("sslmode=require"))
        .await
        .expect("require: encrypted, not verified");
    let e = open(url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        other_ca.display()
    )))
    .await
    .unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(!format!("{e} {e:?}").contains(PASSWORD));
    let e = open(url("sslmode=disable")).await.unwrap_err();
    assert!(
        e.is_unavailable(),
        "plaintext is refused by this server: {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_whose_notification_is_lost_is_seen_by_the_next_read_of_the_feed() {
    let pg = PgCluster::start();
    pg.create_database("lost");
    let subs: Vec<String> = vec!["alice".to_owned()];
    let sb = users_sandbox(&subs, 3600).await;
    let p = support::start_proxy(&pg_toml(&sb, &pg.url("lost"), &new_key())).await;
    connect(&p, "alice").await;
    assert_eq!(get_as(&p, "/api/fdx/5/accounts", "alice").await.status, 200);
    // Deleted without the doorbell ringing.
    let db = sqlx::PgPool::connect(&pg.url("lost")).await.unwrap();
    for sql in [
        "ALTER TABLE connection_changes DISABLE TRIGGER connection_changes_ring",
        "DELETE FROM connections WHERE id = 'alice'",
        "ALTER TABLE connection_changes ENABLE TRIGGER connection_changes_ring",
    ] {
        sqlx::query(sql).execute(&db).await.unwrap();
    }
    let deleted = Instant::now();
    let gone = eventually(Duration::from_secs(30), || async {
        get_as(&p, "/api/fdx/5/accounts", "alice").await.status == 404
    })
    .await;
    assert!(
        gone,
        "the cached token of a deleted connection stops being used"
    );
    let took = deleted.elapsed();
    assert!(
        took < flinks_proxy::store::CHANGE_POLL + Duration::from_secs(5),
        "{took:?}"
    );
    p.shutdown().await;
}

/// Sequence numbers of the change feed are drawn when a change is written
/// and seen when its transaction commits: a change committed after a later
/// one's must still reach the replica (it asks again for the numbers it
/// skipped). Here alice's deletion draws its number first and its writer
/// pauses until the proxy has read past it (bob's re-authorization, which
/// takes no lock the deletion holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_after_a_later_one_is_still_seen() {
    const ACCOUNTS: &str = "/api/fdx/5/accounts";
    let pg = PgCluster::start();
    pg.create_database("gaps");
    let subs: Vec<String> = vec!["alice".to_owned(), "bob".to_owned()];
    let sb = users_sandbox(&subs, 3600).await;
    let p = support::start_proxy(&pg_toml(&sb, &pg.url("gaps"), &new_key())).await;
    for s in &subs {
        connect(&p, s).await;
        assert_eq!(get_as(&p, ACCOUNTS, s).await.status, 200);
    }
    let db = sqlx::PgPool::connect(&pg.url("gaps")).await.unwrap();
    let mut paused = db.begin().await.unwrap();
    sqlx::query("DELETE FROM connections WHERE id = 'alice'")
        .execute(&mut *paused)
        .await
        .unwrap();
    let (alice_seq,): (i64,) =
        sqlx::query_as("SELECT currval(pg_get_serial_sequence('connection_changes', 'seq'))")
            .fetch_one(&mut *paused)
            .await
            .unwrap();
    let gets = store_gets(&p).await;
    sqlx::query("UPDATE connections SET authorized_at = authorized_at + 1 WHERE id = 'bob'")
        .execute(&db)
        .await
        .unwrap();
    let (bob_seq,): (i64,) = sqlx::query_as(
        "SELECT seq FROM connection_changes WHERE id = 'bob' AND event = 'reauthorized'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(bob_seq > alice_seq, "{bob_seq} > {alice_seq}");
    // Once the proxy has read bob's change it forgets him: his next
    // request reads the store.
    let read_past = eventually(Duration::from_secs(10), || async {
        assert_eq!(get_as(&p, ACCOUNTS, "bob").await.status, 200);
        store_gets(&p).await > gets
    })
    .await;
    assert!(
        read_past,
        "the proxy read bob's change, past alice's number"
    );
    let r = get_as(&p, ACCOUNTS, "alice").await;
    assert_eq!(r.status, 200, "alice's deletion is not committed yet");

    paused.commit().await.unwrap();
    let committed = Instant::now();
    let gone = eventually(Duration::from_secs(10), || async {
        get_as(&p, ACCOUNTS, "alice").await.status == 404
    })
    .await;
    assert!(
        gone,
        "the deletion committed out of order reaches the proxy"
    );
    let took = committed.elapsed();
    assert!(
        took < flinks_proxy::store::CHANGE_POLL + Duration::from_secs(5),
        "{took:?}"
    );
    p.shutdown().await;
}

/// A jump in the feed's numbers too large to track as holes (a sequence
/// moved by hand, a partial restore) makes the replica re-read what it has
/// in memory rather than trust it: alice's deletion, made here without a
/// feed row, is found by that re-read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jump_in_the_feeds_numbers_makes_the_replica_check_what_it_holds() {
    const ACCOUNTS: &str = "/api/fdx/5/accounts";
    let pg = PgCluster::start();
    pg.create_database("jump");
    let subs: Vec<String> = vec!["alice".to_owned(), "bob".to_owned()];
    let sb = users_sandbox(&subs, 3600).await;
    let p = support::start_proxy(&pg_toml(&sb, &pg.url("jump"), &new_key())).await;
    for s in &subs {
        connect(&p, s).await;
        assert_eq!(get_as(&p, ACCOUNTS, s).await.status, 200);
    }
    let db = sqlx::PgPool::connect(&pg.url("jump")).await.unwrap();
    for sql in [
        "ALTER TABLE connections DISABLE TRIGGER connections_log",
        "DELETE FROM connections WHERE id = 'alice'",
        "ALTER TABLE connections ENABLE TRIGGER connections_log",
        "SELECT setval(pg_get_serial_sequence('connection_changes', 'seq'), \
         (SELECT MAX(seq) FROM connection_changes) + 20000)",
        "UPDATE connections SET authorized_at = authorized_at + 1 WHERE id = 'bob'",
    ] {
        sqlx::query(sql).execute(&db).await.unwrap();
    }
    let gone = eventually(Duration::from_secs(10), || async {
        get_as(&p, ACCOUNTS, "alice").await.status == 404
    })
    .await;
    assert!(gone, "the replica re-read alice after the jump");
    assert_eq!(get_as(&p, ACCOUNTS, "bob").await.status, 200);
    p.shutdown().await;
}

/// Store reads for connections (`get`) a proxy has made, from its metrics.
async fn store_gets(p: &flinks_proxy::Running) -> f64 {
    let m = support::get(&support::admin_url(p, "/metrics"))
        .await
        .text();
    m.lines()
        .filter(|l| l.starts_with("flinks_proxy_store_operations_total{op=\"get\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Warm requests on replicas read nothing from the store, however long
/// they go on: what a replica keeps follows the change feed (one read per
/// replica per interval), not a re-read of each connection in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_requests_on_replicas_read_nothing_from_the_store() {
    const ACCOUNTS: &str = "/api/fdx/5/accounts";
    let pg = PgCluster::start();
    pg.create_database("warm");
    let subs: Vec<String> = vec!["alice".to_owned(), "bob".to_owned()];
    let sb = users_sandbox(&subs, 3600).await;
    let toml = pg_toml(&sb, &pg.url("warm"), &new_key());
    let replicas = [
        support::start_proxy(&toml).await,
        support::start_proxy(&toml).await,
    ];
    for s in &subs {
        connect(&replicas[0], s).await;
    }
    let (rs, users) = (&replicas, &subs);
    let gets = || async move {
        let mut n = 0.0;
        for p in rs {
            n += store_gets(p).await;
        }
        n
    };
    let requests = |run_for: Duration| async move {
        let until = Instant::now() + run_for;
        let mut sent = 0;
        while Instant::now() < until {
            for p in rs {
                for s in users {
                    let r = get_as(p, ACCOUNTS, s).await;
                    assert_eq!(r.status, 200, "{}", r.text());
                    sent += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    };
    // Warm up until a feed interval passes without a read: replica 1
    // re-reads a user it cached before replica 0's creation of her reached
    // it through the feed (once per connection, not per interval).
    let mut settled = false;
    for _ in 0..10 {
        let g = gets().await;
        requests(flinks_proxy::store::CHANGE_POLL + Duration::from_millis(500)).await;
        if gets().await == g {
            settled = true;
            break;
        }
    }
    assert!(settled, "the replicas keep reading the store");
    let before = gets().await;
    // Longer than the 5 s after which each connection in use used to be
    // read again.
    let sent = requests(Duration::from_secs(7)).await;
    let after = gets().await;
    assert_eq!(
        after - before,
        0.0,
        "store reads during {sent} warm requests"
    );
    // What each replica did instead: read the change feed, once a second.
    for p in &replicas {
        let m = support::get(&support::admin_url(p, "/metrics"))
            .await
            .text();
        let reads = support::metric(
            &m,
            "flinks_proxy_store_operations_total{op=\"changes\",outcome=\"ok\"}",
        )
        .unwrap_or(0.0);
        assert!(reads >= 5.0, "feed reads in 7 s: {reads}");
    }
    for p in replicas {
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_the_store_could_not_take_is_committed_later() {
    let sb = Sandbox::start(SandboxOptions {
        expires_in: Some(3),
        rotate_refresh_tokens: true,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let pg = PgCluster::start();
    pg.create_database("pending");
    let toml = credential_on_store(&sb, &pg.url("pending"), &new_key(), "refresh_token");
    let p = support::start_proxy(&toml).await;
    let url = support::proxy_url(&p, "/api/v1/accounts");
    let first = eventually(Duration::from_secs(20), || async {
        support::get(&url).await.status == 200
    })
    .await;
    assert!(first, "a first token");
    // The next renewal is on the wire when the database goes away: the
    // server has rotated the refresh token, the store cannot take it.
    sb.set_token_delay(Duration::from_millis(1500));
    let on_wire = eventually(Duration::from_secs(20), || async {
        sb.token_requests_in_flight() == 1
    })
    .await;
    assert!(on_wire);
    pg.stop();
    let answered = eventually(Duration::from_secs(20), || async {
        sb.token_requests_in_flight() == 0
    })
    .await;
    assert!(answered);
    sb.set_token_delay(Duration::ZERO);
    // The commit has failed (not merely waiting for a connection).
    let failed = eventually(Duration::from_secs(20), || async {
        status(&p).await["store"]["healthy"] == false
    })
    .await;
    assert!(failed, "the store reports the failed commit");
    pg.start_server();
    let before = sb.successful_token_requests();
    let renewed = eventually(Duration::from_secs(30), || async {
        sb.successful_token_requests() >= before + 2 && support::get(&url).await.status == 200
    })
    .await;
    assert!(
        renewed,
        "renewed twice after the outage with the rotated refresh token"
    );
    assert_eq!(
        sb.token_requests(),
        sb.successful_token_requests(),
        "the retired refresh token was never presented"
    );
    p.shutdown().await;
}
