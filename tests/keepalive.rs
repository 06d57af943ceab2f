//! Keep-alive (issue 18, CONNECT.md "Keeping connections alive"): a
//! connection whose refresh token is unused for `keepalive` is refreshed in
//! the background without any app request, paced at `keepalive_rate`, once
//! across replicas; and the oldest unused refresh token's age is a gauge.
//! Connections are aged by writing `last_refresh_at` into the store behind
//! the proxy's back (a column no change notification or log follows).
//!
//! `keepalive = "100s"` makes the scans a second apart (a hundredth of it,
//! at least 1 s) while a connection made during the test stays fresh.

mod support;

use std::time::{Duration, Instant};

use flinks_proxy::sandbox::{Sandbox, SandboxOptions, SandboxUser};
use flinks_proxy::Running;
use support::connections::{connect, new_key};
use support::postgres::PgCluster;
use support::{config, ProxyToml, TempDir};

const HOUR_MS: i64 = 3600 * 1000;
const DAY_MS: i64 = 24 * HOUR_MS;

async fn sandbox(subs: &[String]) -> Sandbox {
    Sandbox::start(SandboxOptions {
        users: subs.iter().map(|s| SandboxUser::new(s)).collect(),
        expires_in: Some(3600),
        rotate_refresh_tokens: true,
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox")
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user{i:02}")).collect()
}

/// The sandbox pool on SQLite at `db`, with `keepalive` and its rate.
fn sqlite_toml(sb: &Sandbox, db: &std::path::Path, keepalive: Option<(&str, f64)>) -> String {
    ProxyToml::pool(sb, db, &new_key())
        .with(|c| set_keepalive(c, keepalive))
        .toml()
}

fn set_keepalive(c: &mut ProxyToml, keepalive: Option<(&str, f64)>) {
    if let Some((idle, rate)) = keepalive {
        let p = c.pool_mut("users");
        p.keepalive = Some(idle.to_owned());
        p.keepalive_rate = Some(rate);
    }
}

/// The store behind the proxy's back: SQLite or PostgreSQL.
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Db {
    async fn sqlite(path: &std::path::Path) -> Db {
        Db::Sqlite(
            sqlx::SqlitePool::connect(&format!("sqlite:{}", path.display()))
                .await
                .expect("open the store"),
        )
    }

    /// Pretends connection `id` last used its refresh token `ago_ms` ago.
    async fn age(&self, id: &str, ago_ms: i64) {
        let at = flinks_proxy::ground::now_ms() - ago_ms;
        let n = match self {
            Db::Sqlite(p) => sqlx::query(
                "UPDATE connections SET last_refresh_at = ? WHERE pool = 'users' AND id = ?",
            )
            .bind(at)
            .bind(id)
            .execute(p)
            .await
            .expect("age")
            .rows_affected(),
            Db::Postgres(p) => sqlx::query(
                "UPDATE connections SET last_refresh_at = $1 WHERE pool = 'users' AND id = $2",
            )
            .bind(at)
            .bind(id)
            .execute(p)
            .await
            .expect("age")
            .rows_affected(),
        };
        assert_eq!(n, 1, "{id} exists");
    }
}

/// The value of one series in `/metrics` (`name{labels}` exactly as
/// rendered), 0 when absent.
async fn metric(p: &Running, series: &str) -> f64 {
    let text = support::get(&support::admin_url(p, "/metrics"))
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// Keep-alive scans this proxy has started (each reads the store once).
async fn scans(p: &Running) -> f64 {
    metric(
        p,
        r#"flinks_proxy_store_operations_total{op="idle_scan",outcome="ok"}"#,
    )
    .await
}

/// Waits until `f` holds (polling: what is awaited happens in another
/// process's task or the sandbox), at most `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until each of `proxies` has started two more scans than now: the
/// first of them began after everything before, the second only once the
/// first had started all its refreshes.
async fn two_more_scans(proxies: &[&Running]) {
    for p in proxies {
        let n = scans(p).await;
        until(Duration::from_secs(20), "two more scans", || async {
            scans(p).await >= n + 2.0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_gets_one_refresh_without_any_request_and_a_fresh_one_none() {
    let subs = users(2);
    let sb = sandbox(&subs).await;
    let dir = TempDir::new();
    let db_path = dir.join("c.db");
    let p = support::start_proxy(&sqlite_toml(&sb, &db_path, Some(("100s", 5.0)))).await;
    let (idle, fresh) = (&subs[0], &subs[1]);
    connect(&p, idle).await;
    connect(&p, fresh).await;
    let ka = |o: &str| {
        format!(r#"flinks_proxy_keepalive_refreshes_total{{outcome="{o}",pool="users"}}"#)
    };
    assert_eq!(metric(&p, &ka("success")).await, 0.0);
    let db = Db::sqlite(&db_path).await;
    db.age(idle, HOUR_MS).await;

    until(
        Duration::from_secs(20),
        "the keep-alive refresh",
        || async { metric(&p, &ka("success")).await >= 1.0 },
    )
    .await;
    assert_eq!(sb.user_token_requests(idle), 2, "its code, one refresh");
    two_more_scans(&[&p]).await;
    assert_eq!(
        sb.user_token_requests(idle),
        2,
        "refreshed once: no longer idle"
    );
    assert_eq!(
        sb.user_token_requests(fresh),
        1,
        "a fresh connection is left alone"
    );
    assert_eq!(metric(&p, &ka("success")).await, 1.0);
    assert_eq!(sb.api_requests(), 0, "no app request was involved");
    // The refresh went through the normal path: the store has its time.
    let c = support::connections::admin(&p, "GET", &format!("/connections/users/{idle}"), None)
        .await
        .json();
    assert!(c["last_refresh_at"].is_string(), "{c}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_refreshed_at_most_keepalive_rate_per_second() {
    const N: usize = 6;
    const RATE: f64 = 4.0;
    let subs = users(N);
    let sb = sandbox(&subs).await;
    let dir = TempDir::new();
    let db_path = dir.join("c.db");
    let p = support::start_proxy(&sqlite_toml(&sb, &db_path, Some(("100s", RATE)))).await;
    let db = Db::sqlite(&db_path).await;
    for (i, s) in subs.iter().enumerate() {
        connect(&p, s).await;
        db.age(s, DAY_MS + i64::try_from(i).unwrap()).await;
    }
    until(
        Duration::from_secs(30),
        "every keep-alive refresh",
        || async { subs.iter().all(|s| sb.user_token_requests(s) == 2) },
    )
    .await;
    // Each refresh rotated its user's refresh token: when is the sandbox's.
    let times: Vec<Instant> = subs
        .iter()
        .map(|s| sb.last_rotation(s).expect("rotated"))
        .collect();
    let first = *times.iter().min().unwrap();
    let last = *times.iter().max().unwrap();
    // Starts are 1/rate apart; the endpoint's answer times may shift each
    // by a little (a loaded box), never bring them together.
    let floor = Duration::from_secs_f64((N - 1) as f64 / RATE) - Duration::from_millis(150);
    assert!(
        last - first >= floor,
        "{N} refreshes at {RATE}/s took {:?}, expected at least {floor:?}",
        last - first
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgres_store_refresh_each_idle_connection_once() {
    // Twenty connections at 10/s: both replicas' scans (a second apart at
    // most) overlap on most of them, so the one that comes second finds
    // each connection just refreshed by the other.
    const N: usize = 20;
    let pg = PgCluster::start();
    pg.create_database("keepalive");
    let url = pg.url("keepalive");
    let subs = users(N);
    let sb = sandbox(&subs).await;
    let key = new_key();
    let toml = ProxyToml::pool(&sb, std::path::Path::new("unused.db"), &key)
        .with(|c| {
            c.store = Some(config::Store {
                url: Some(url.clone().into()),
                key: key.clone().into(),
                old_keys: None,
                max_connections: Some(4),
            });
            set_keepalive(c, Some(("100s", 10.0)));
        })
        .toml();
    let a = support::start_proxy(&toml).await;
    let db = Db::Postgres(sqlx::PgPool::connect(&url).await.unwrap());
    for s in &subs {
        connect(&a, s).await;
    }
    let b = support::start_proxy(&toml).await;
    for s in &subs {
        db.age(s, 2 * DAY_MS).await;
    }
    until(
        Duration::from_secs(30),
        "every keep-alive refresh",
        || async { subs.iter().all(|s| sb.user_token_requests(s) >= 2) },
    )
    .await;
    two_more_scans(&[&a, &b]).await;
    for s in &subs {
        assert_eq!(
            sb.user_token_requests(s),
            2,
            "{s}: its code and one refresh, fleet-wide"
        );
    }
    assert_eq!(
        sb.reused_refresh_tokens(),
        0,
        "no rotated-away token presented"
    );
    let ka = r#"flinks_proxy_keepalive_refreshes_total{outcome="success",pool="users"}"#;
    let total = metric(&a, ka).await + metric(&b, ka).await;
    assert!(total >= N as f64, "every connection kept alive: {total}");
    a.shutdown().await;
    b.shutdown().await;
    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    assert_idle_queries_use_the_index(pool).await;
}

/// The PostgreSQL plans of the keep-alive's two queries (their shape as in
/// `src/store/idle.rs`), with sequential scans priced out (a
/// small table would be scanned anyway): the index answers both, already
/// in order.
async fn assert_idle_queries_use_the_index(pool: &sqlx::PgPool) {
    let idle = "COALESCE(last_refresh_at, authorized_at)";
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    for sql in [
        format!(
            "SELECT id, {idle} FROM connections WHERE pool = 'users' AND state = 'active' \
             AND {idle} <= 5 AND ({idle}, id) > (1, 'a') ORDER BY {idle}, id LIMIT 100"
        ),
        format!(
            "SELECT {idle} FROM connections WHERE pool = 'users' AND state = 'active' \
             ORDER BY {idle} LIMIT 1"
        ),
    ] {
        let rows: Vec<(String,)> = sqlx::query_as(&format!("EXPLAIN {sql}"))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let plan: Vec<String> = rows.into_iter().map(|r| r.0).collect();
        let plan = plan.join("\n");
        assert!(plan.contains("connections_idle"), "{sql}\n{plan}");
        assert!(!plan.contains("Sort"), "{sql}\n{plan}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_unused_refresh_token_age_is_a_gauge_even_without_keepalive() {
    let subs = users(2);
    let sb = sandbox(&subs).await;
    let dir = TempDir::new();
    let db_path = dir.join("c.db");
    let p = support::start_proxy(&sqlite_toml(&sb, &db_path, None)).await;
    let gauge = r#"flinks_proxy_connection_refresh_token_idle_seconds{pool="users"}"#;
    let text = support::get(&support::admin_url(&p, "/metrics"))
        .await
        .text();
    assert!(
        text.contains(&format!("{gauge} 0")),
        "at 0 from the start:\n{text}"
    );
    assert!(
        text.contains(r#"flinks_proxy_keepalive_refreshes_total{outcome="needs_reauthorization",pool="users"} 0"#),
        "{text}"
    );
    connect(&p, &subs[0]).await;
    connect(&p, &subs[1]).await;
    let db = Db::sqlite(&db_path).await;
    db.age(&subs[0], 3 * DAY_MS).await;
    db.age(&subs[1], DAY_MS).await;
    let three_days = (3 * DAY_MS / 1000) as f64;
    until(
        Duration::from_secs(20),
        "the gauge to show three days",
        || async { metric(&p, gauge).await >= three_days },
    )
    .await;
    let shown = metric(&p, gauge).await;
    assert!(shown < three_days + 60.0, "the oldest one's age: {shown}");
    assert_eq!(
        sb.user_token_requests(&subs[0]),
        1,
        "no keep-alive without keepalive"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_keep_alive_turns_the_connection_needs_reauthorization() {
    let subs = users(1);
    let sb = sandbox(&subs).await;
    let dir = TempDir::new();
    let db_path = dir.join("c.db");
    let p = support::start_proxy(&sqlite_toml(&sb, &db_path, Some(("100s", 5.0)))).await;
    let user = &subs[0];
    connect(&p, user).await;
    // The user's consent is gone: the endpoint refuses their refresh token.
    sb.revoke_consent(user);
    Db::sqlite(&db_path).await.age(user, HOUR_MS).await;
    let refused =
        r#"flinks_proxy_keepalive_refreshes_total{outcome="needs_reauthorization",pool="users"}"#;
    until(
        Duration::from_secs(20),
        "the refused keep-alive",
        || async { metric(&p, refused).await >= 1.0 },
    )
    .await;
    let c = support::connections::admin(&p, "GET", &format!("/connections/users/{user}"), None)
        .await
        .json();
    assert_eq!(c["state"], "needs_reauthorization", "{c}");
    assert_eq!(c["last_error"]["error"], "invalid_grant", "{c}");
    // Its user must authorize again: keep-alive leaves it alone now.
    two_more_scans(&[&p]).await;
    assert_eq!(
        sb.token_requests_by_grant("refresh_token"),
        1,
        "one refused refresh"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_turned_on_by_a_reload_takes_effect() {
    let subs = users(1);
    let sb = sandbox(&subs).await;
    let dir = TempDir::new();
    let db_path = dir.join("c.db");
    let key = new_key();
    let toml = |keepalive| {
        ProxyToml::pool(&sb, &db_path, &key)
            .with(|c| set_keepalive(c, keepalive))
            .toml()
    };
    let p = support::start_proxy(&toml(None)).await;
    let user = &subs[0];
    connect(&p, user).await;
    Db::sqlite(&db_path).await.age(user, HOUR_MS).await;
    assert_eq!(scans(&p).await, 0.0, "no keepalive, no scans");
    p.reload(support::parse_config(
        &toml(Some(("100s", 5.0))),
        &dir.join(""),
    ))
    .expect("reload");
    until(
        Duration::from_secs(20),
        "the keep-alive refresh",
        || async { sb.user_token_requests(user) >= 2 },
    )
    .await;
    assert!(scans(&p).await >= 1.0);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_removed_by_a_reload_leaves_no_idle_gauge_behind() {
    let sb = sandbox(&users(1)).await;
    let dir = TempDir::new();
    let db_path = dir.join("c.db");
    let key = new_key();
    let base = ProxyToml::pool(&sb, &db_path, &key);
    let with_spare = base
        .clone()
        .pool_table("spare", config::Pool::sandbox(&sb))
        .toml();
    let p = support::start_proxy(&with_spare).await;
    let spare = r#"flinks_proxy_connection_refresh_token_idle_seconds{pool="spare"}"#;
    let shown = |p: &Running| {
        let url = support::admin_url(p, "/metrics");
        async move { support::get(&url).await.text().contains(spare) }
    };
    assert!(shown(&p).await, "at 0 from the start");
    p.reload(support::parse_config(&base.toml(), &dir.join("")))
        .expect("reload");
    until(Duration::from_secs(10), "the gauge to go", || async {
        !shown(&p).await
    })
    .await;
    p.shutdown().await;
}
