//! The store's unit tests (over SQLite), with two helpers that read and
//! write sealed text behind the store's back.

use super::*;
use crate::ground::crypto::{CryptoError, Key};
use crate::ground::metrics::Metrics;
use std::sync::Arc;

fn config(dir: &std::path::Path, key: &str) -> StoreConfig {
    StoreConfig {
        location: StoreLocation::Sqlite(dir.join("c.db")),
        key: Secret::new(key.to_owned()),
        old_keys: vec![],
        max_connections: 1,
    }
}

fn tempdir() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("flinks-store-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn tokens(rt: &str, at: &str) -> Tokens {
    Tokens {
        refresh_token: Some(Secret::new(rt.to_owned())),
        access_token: Some(Secret::new(at.to_owned())),
        access_expires_at: Some(now_ms() + 60_000),
    }
}

#[test]
fn notification_payloads_parse() {
    assert_eq!(
        Change::parse("users/alice/refreshed/abc"),
        Some(Change::Connection {
            pool: "users".into(),
            id: "alice".into(),
            kind: ChangeKind::Refreshed,
            holder: "abc".into(),
        })
    );
    assert!(matches!(
        Change::parse("credential:c/0123/deleted/"),
        Some(Change::Connection {
            kind: ChangeKind::Deleted,
            ..
        })
    ));
    assert_eq!(Change::parse("users/alice/exploded/"), None);
    assert_eq!(Change::parse("garbage"), None);
}

#[tokio::test]
async fn a_ciphertext_copied_to_another_row_does_not_open() {
    let dir = tempdir();
    let key = crate::ground::crypto::generate_key().unwrap();
    let store = Store::open(&config(&dir, &key), Metrics::new().store())
        .await
        .unwrap();
    store
        .authorize("users", "alice", None, &tokens("rt-alice", "at-alice"))
        .await
        .unwrap();
    store
        .authorize("users", "bob", None, &tokens("rt-bob", "at-bob"))
        .await
        .unwrap();
    let (alice_rt, _) = store.raw_tokens("users", "alice").await.unwrap().unwrap();
    assert!(!alice_rt.as_deref().unwrap().contains("rt-alice"));
    store.rewrite_raw("users", "bob", alice_rt).await.unwrap();
    let e = store.get("users", "bob").await.unwrap_err();
    assert!(
        matches!(
            &e,
            StoreError::Crypto {
                field: "refresh_token",
                source: CryptoError::Open,
                ..
            }
        ),
        "{e}"
    );
    let alice = store.get("users", "alice").await.unwrap().unwrap();
    assert_eq!(
        alice.tokens.refresh_token.unwrap().expose(),
        "rt-alice",
        "the original row still opens"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_file_is_private_and_a_newer_schema_is_refused() {
    let dir = tempdir();
    let key = crate::ground::crypto::generate_key().unwrap();
    let cfg = config(&dir, &key);
    let store = Store::open(&cfg, Metrics::new().store()).await.unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("c.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let Backend::Sqlite(b) = &store.backend else {
        unreachable!("an SQLite config")
    };
    b.insert_fake_migration(9999).await;
    drop(store);
    let e = Store::open(&cfg, Metrics::new().store()).await.unwrap_err();
    assert!(
        matches!(e, StoreError::SchemaTooNew { found: 9999, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("newer than this binary knows"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn rekey_moves_rows_to_the_new_key_and_old_keys_still_open() {
    let dir = tempdir();
    let (k1, k2) = (
        crate::ground::crypto::generate_key().unwrap(),
        crate::ground::crypto::generate_key().unwrap(),
    );
    let first = Store::open(&config(&dir, &k1), Metrics::new().store())
        .await
        .unwrap();
    first
        .authorize("users", "alice", None, &tokens("rt-a", "at-a"))
        .await
        .unwrap();
    drop(first);
    let mut rotated = config(&dir, &k2);
    rotated.old_keys = vec![Secret::new(k1.clone())];
    let store = Store::open(&rotated, Metrics::new().store()).await.unwrap();
    let alice = store.get("users", "alice").await.unwrap().unwrap();
    assert_eq!(
        alice.tokens.refresh_token.unwrap().expose(),
        "rt-a",
        "old key opens"
    );
    assert_eq!(store.rekey().await.unwrap().resealed, 1);
    assert_eq!(
        store.rekey().await.unwrap(),
        Rekeyed {
            resealed: 0,
            current: 1,
            raced: 0
        },
        "rows already under the key are left alone"
    );
    drop(store);
    let only_new = Store::open(&config(&dir, &k2), Metrics::new().store())
        .await
        .unwrap();
    let alice = only_new.get("users", "alice").await.unwrap().unwrap();
    assert_eq!(alice.tokens.access_token.unwrap().expose(), "at-a");
    drop(only_new);
    let e = Store::open(&config(&dir, &k1), Metrics::new().store())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::KeyMismatch { .. }), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn leases_exclude_other_holders_until_they_expire() {
    let dir = tempdir();
    let key = crate::ground::crypto::generate_key().unwrap();
    let store = Store::open(&config(&dir, &key), Metrics::new().store())
        .await
        .unwrap();
    store
        .authorize("users", "alice", Some("sub-a"), &tokens("rt", "at"))
        .await
        .unwrap();
    let mut other = Store::open(&config(&dir, &key), Metrics::new().store())
        .await
        .unwrap();
    other.holder = "other".into();
    let ttl = Duration::from_secs(60);
    let Lease::Taken(mine) = store.lease("users", "alice", ttl).await.unwrap() else {
        panic!("free lease")
    };
    assert!(matches!(
        other.lease("users", "alice", ttl).await.unwrap(),
        Lease::Busy(_)
    ));
    assert!(matches!(
        store
            .commit_refresh("users", "alice", &mine.version, &tokens("rt2", "at2"))
            .await
            .unwrap(),
        Written::Done(_)
    ));
    match other.lease("users", "alice", ttl).await.unwrap() {
        Lease::Taken(r) => assert_eq!(r.tokens.refresh_token.unwrap().expose(), "rt2"),
        l => panic!("{l:?}"),
    }
    // An expired lease is free again.
    assert!(matches!(
        store.lease("users", "alice", ttl).await.unwrap(),
        Lease::Busy(_)
    ));
    other.release("users", "alice").await.unwrap();
    assert!(matches!(
        store.lease("users", "alice", Duration::ZERO).await.unwrap(),
        Lease::Taken(_)
    ));
    assert!(matches!(
        other.lease("users", "alice", ttl).await.unwrap(),
        Lease::Taken(_)
    ));
    assert!(matches!(
        other.lease("users", "nobody", ttl).await.unwrap(),
        Lease::Gone
    ));
    store
        .seed("credential:flinks", "0123", &tokens("rt", "at"))
        .await
        .unwrap();
    assert_eq!(
        store.pools().await.unwrap(),
        ["users"],
        "static credentials' rows are not listed as pools"
    );
    let _ = std::fs::remove_dir_all(dir);
}

async fn open(dir: &std::path::Path, key: &str) -> Store {
    Store::open(&config(dir, key), Metrics::new().store())
        .await
        .unwrap()
}

async fn record(store: &Store, id: &str) -> Record {
    store.get("users", id).await.unwrap().expect("row")
}

fn rt(r: &Record) -> &str {
    r.tokens.refresh_token.as_ref().map_or("", |s| s.expose())
}

#[tokio::test]
async fn a_commit_lands_after_its_lease_expired_and_the_late_holder_is_superseded() {
    // Fault 6: the lease expires before the commit and a second holder
    // refreshes with the same refresh token. The first commit is
    // conditional on the refresh token it sent, not on the lease; the
    // second then finds the row moved on and writes nothing.
    let dir = tempdir();
    let key = crate::ground::crypto::generate_key().unwrap();
    let a = open(&dir, &key).await;
    let mut b = open(&dir, &key).await;
    b.holder = "b".into();
    a.authorize("users", "alice", None, &tokens("rt1", "at1"))
        .await
        .unwrap();
    let Lease::Taken(ra) = a.lease("users", "alice", Duration::ZERO).await.unwrap() else {
        panic!("free lease")
    };
    let Lease::Taken(rb) = b
        .lease("users", "alice", Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("an expired lease is free")
    };
    let w = a
        .commit_refresh("users", "alice", &ra.version, &tokens("rt2", "at2"))
        .await
        .unwrap();
    assert!(matches!(w, Written::Done(_)), "{w:?}");
    let w = b
        .commit_refresh("users", "alice", &rb.version, &tokens("rt2-b", "at2-b"))
        .await
        .unwrap();
    let Written::Superseded(now) = w else {
        panic!("{w:?}")
    };
    assert_eq!(rt(&now), "rt2");
    assert_eq!(rt(&record(&a, "alice").await), "rt2");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_stale_failure_does_not_touch_a_fresh_reauthorization() {
    // Fault 2: a 602 (or invalid_grant) for the old tokens lands after
    // the user authorized again.
    let dir = tempdir();
    let store = open(&dir, &crate::ground::crypto::generate_key().unwrap()).await;
    store
        .authorize("users", "alice", None, &tokens("rt-old", "at-old"))
        .await
        .unwrap();
    let old = record(&store, "alice").await;
    store
        .authorize("users", "alice", None, &tokens("rt-new", "at-new"))
        .await
        .unwrap();
    let e = LastError {
        error: "consent_revoked".into(),
        description: None,
        at: now_ms(),
    };
    let w = store
        .mark_needs_reauthorization("users", "alice", &old.version, &e)
        .await
        .unwrap();
    assert!(matches!(w, Written::Superseded(_)), "{w:?}");
    let w = store
        .record_failure("users", "alice", &old.version, &e)
        .await
        .unwrap();
    assert!(matches!(w, Written::Superseded(_)), "{w:?}");
    let now = record(&store, "alice").await;
    assert_eq!(now.info.state, ConnectionState::Active);
    assert_eq!(now.info.last_error, None);
    assert_eq!(rt(&now), "rt-new");
    // The current tokens' failure does count.
    let w = store
        .mark_needs_reauthorization("users", "alice", &now.version, &e)
        .await
        .unwrap();
    assert!(matches!(w, Written::Done(_)), "{w:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn needs_reauthorization_keeps_the_sealed_refresh_token() {
    // Fault 1: never NULL a refresh token.
    let dir = tempdir();
    let store = open(&dir, &crate::ground::crypto::generate_key().unwrap()).await;
    store
        .authorize("users", "alice", None, &tokens("rt-a", "at-a"))
        .await
        .unwrap();
    let r = record(&store, "alice").await;
    let e = LastError {
        error: "invalid_grant".into(),
        description: None,
        at: now_ms(),
    };
    store
        .mark_needs_reauthorization("users", "alice", &r.version, &e)
        .await
        .unwrap();
    let (sealed_rt, sealed_at) = store.raw_tokens("users", "alice").await.unwrap().unwrap();
    assert!(
        sealed_rt.is_some_and(|s| !s.contains("rt-a")),
        "kept, sealed"
    );
    assert_eq!(sealed_at, None, "the dead access token goes");
    let now = record(&store, "alice").await;
    assert_eq!(now.info.state, ConnectionState::NeedsReauthorization);
    assert_eq!(rt(&now), "rt-a", "an operator can still get it back");
    // A refresh that was in flight with it and succeeded proves it good.
    let w = store
        .commit_refresh("users", "alice", &now.version, &tokens("rt-b", "at-b"))
        .await
        .unwrap();
    let Written::Done(after) = w else {
        panic!("{w:?}")
    };
    assert_eq!(after.info.state, ConnectionState::Active);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn rekey_never_puts_back_a_token_rotated_after_it_read_the_row() {
    // Fault 5: rekey reads a page, a refresh commits a rotated token,
    // then rekey writes. The write is conditional on what it read: the
    // rotation survives (and is re-sealed on the second read).
    let dir = tempdir();
    let (k1, k2) = (
        crate::ground::crypto::generate_key().unwrap(),
        crate::ground::crypto::generate_key().unwrap(),
    );
    let first = open(&dir, &k1).await;
    first
        .authorize("users", "alice", None, &tokens("rt1", "at1"))
        .await
        .unwrap();
    drop(first);
    let mut rotated = config(&dir, &k2);
    rotated.old_keys = vec![Secret::new(k1.clone())];
    let store = Store::open(&rotated, Metrics::new().store()).await.unwrap();
    // The rekey's read …
    let Backend::Sqlite(b) = &store.backend else {
        unreachable!()
    };
    let page = b.page_all(None, 500).await.unwrap();
    // … a refresh commits meanwhile (by a proxy still sealing with k1) …
    let proxy = open(&dir, &k1).await;
    let r = record(&proxy, "alice").await;
    assert!(matches!(
        proxy
            .commit_refresh("users", "alice", &r.version, &tokens("rt2", "at2"))
            .await
            .unwrap(),
        Written::Done(_)
    ));
    // … then the rekey's write.
    let mut report = Rekeyed::default();
    for row in page {
        store.rekey_row(row, &mut report).await.unwrap();
    }
    assert_eq!(
        report,
        Rekeyed {
            resealed: 1,
            current: 0,
            raced: 1
        }
    );
    let now = record(&store, "alice").await;
    assert_eq!(rt(&now), "rt2", "the rotated token survives the rekey");
    let (sealed, _) = store.raw_tokens("users", "alice").await.unwrap().unwrap();
    assert_eq!(
        sealed.as_deref().and_then(Sealer::key_id_of),
        Some(store.key_id()),
        "and is under the new key"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_commit_after_a_rekey_still_lands() {
    // The row's sealing changed (same refresh token): the conditional
    // write notices the token is the same and writes.
    let dir = tempdir();
    let (k1, k2) = (
        crate::ground::crypto::generate_key().unwrap(),
        crate::ground::crypto::generate_key().unwrap(),
    );
    let proxy = open(&dir, &k1).await;
    proxy
        .authorize("users", "alice", None, &tokens("rt1", "at1"))
        .await
        .unwrap();
    let seen = record(&proxy, "alice").await.version;
    let mut rotated = config(&dir, &k2);
    rotated.old_keys = vec![Secret::new(k1.clone())];
    let cli = Store::open(&rotated, Metrics::new().store()).await.unwrap();
    assert_eq!(cli.rekey().await.unwrap().resealed, 1);
    drop(proxy);
    let proxy = Store::open(&rotated, Metrics::new().store()).await.unwrap();
    let w = proxy
        .commit_refresh("users", "alice", &seen, &tokens("rt2", "at2"))
        .await
        .unwrap();
    assert!(matches!(w, Written::Done(_)), "{w:?}");
    assert_eq!(rt(&record(&proxy, "alice").await), "rt2");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_read_only_store_creates_and_writes_nothing() {
    // Fault 4: a CLI read next to a running proxy must not free its
    // leases (or write at all).
    let dir = tempdir();
    let key = crate::ground::crypto::generate_key().unwrap();
    let missing = Store::open_for(
        &config(&dir, &key),
        Metrics::new().store(),
        Access::ReadOnly,
    )
    .await
    .unwrap_err();
    assert!(matches!(missing, StoreError::NotAStore(_)), "{missing}");
    assert!(!dir.join("c.db").exists(), "a read creates no file");
    let proxy = open(&dir, &key).await;
    proxy
        .authorize("users", "alice", None, &tokens("rt", "at"))
        .await
        .unwrap();
    assert!(matches!(
        proxy
            .lease("users", "alice", Duration::from_secs(60))
            .await
            .unwrap(),
        Lease::Taken(_)
    ));
    let before = std::fs::read(dir.join("c.db-wal")).unwrap_or_default();
    for _ in 0..2 {
        let cli = Store::open_for(
            &config(&dir, &key),
            Metrics::new().store(),
            Access::ReadOnly,
        )
        .await
        .unwrap();
        assert_eq!(cli.list("users", None, None, 10).await.unwrap().len(), 1);
        assert!(cli.get("users", "alice").await.unwrap().is_some());
    }
    let mut other = open(&dir, &key).await;
    other.holder = "other".into();
    assert!(
        matches!(
            other
                .lease("users", "alice", Duration::from_secs(60))
                .await
                .unwrap(),
            Lease::Busy(_)
        ),
        "the proxy's lease is still held"
    );
    drop(other);
    assert_eq!(
        std::fs::read(dir.join("c.db-wal"))
            .unwrap_or_default()
            .len(),
        before.len(),
        "nothing was written"
    );
    let wrong = Store::open_for(
        &config(&dir, &crate::ground::crypto::generate_key().unwrap()),
        Metrics::new().store(),
        Access::ReadOnly,
    )
    .await
    .unwrap_err();
    assert!(matches!(wrong, StoreError::KeyMismatch { .. }), "{wrong}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn counts_are_kept_by_triggers() {
    let dir = tempdir();
    let store = open(&dir, &crate::ground::crypto::generate_key().unwrap()).await;
    for id in ["a", "b", "c"] {
        store
            .authorize("users", id, None, &tokens("rt", "at"))
            .await
            .unwrap();
    }
    let b = record(&store, "b").await;
    let e = LastError {
        error: "invalid_grant".into(),
        description: None,
        at: now_ms(),
    };
    store
        .mark_needs_reauthorization("users", "b", &b.version, &e)
        .await
        .unwrap();
    store.delete("users", "c").await.unwrap();
    store
        .authorize("users", "b", None, &tokens("rt", "at"))
        .await
        .unwrap();
    store
        .mark_needs_reauthorization("users", "a", &record(&store, "a").await.version, &e)
        .await
        .unwrap();
    let mut counts = store.counts("users").await.unwrap();
    counts.sort_by_key(|c| c.0.as_str());
    assert_eq!(
        counts,
        [
            (ConnectionState::Active, 1),
            (ConnectionState::NeedsReauthorization, 1)
        ]
    );
    assert_eq!(store.counts("other").await.unwrap(), []);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn another_process_deleting_is_announced_through_the_change_log() {
    // Fault 7: an SQLite store now tells the serving process what a CLI
    // command changed.
    let dir = tempdir();
    let key = crate::ground::crypto::generate_key().unwrap();
    let proxy = open(&dir, &key).await;
    proxy
        .authorize("users", "alice", None, &tokens("rt", "at"))
        .await
        .unwrap();
    let mut changes = proxy.subscribe();
    proxy.spawn_listener();
    // The poller starts after the newest change present.
    tokio::time::sleep(super::CHANGE_POLL * 2).await;
    let cli = Store::open_for(&config(&dir, &key), Metrics::new().store(), Access::Write)
        .await
        .unwrap();
    assert!(cli.delete("users", "alice").await.unwrap());
    let change = tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .expect("announced within the bound")
        .unwrap();
    assert_eq!(
        change,
        Change::Connection {
            pool: "users".into(),
            id: "alice".into(),
            kind: ChangeKind::Deleted,
            holder: String::new(),
        }
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fingerprints_are_keyed_and_old_keys_still_name_old_rows() {
    let (k1, k2) = (
        crate::ground::crypto::generate_key().unwrap(),
        crate::ground::crypto::generate_key().unwrap(),
    );
    let one = Sealer::new(Key::from_base64(&k1).unwrap(), vec![]);
    let rotated = Sealer::new(
        Key::from_base64(&k2).unwrap(),
        vec![Key::from_base64(&k1).unwrap()],
    );
    let a = one.fingerprints(b"rt-secret");
    let b = rotated.fingerprints(b"rt-secret");
    assert_eq!(a.len(), 1);
    assert_eq!(b.len(), 2);
    assert_ne!(a[0], b[0], "keyed: another key, another name");
    assert_eq!(a[0], b[1], "the old key still finds the old name");
    assert_eq!(a[0].len(), 32);
    assert_ne!(one.fingerprints(b"other")[0], a[0]);
    assert!(!a[0].contains("rt-secret"));
}

/// Reaching under the sealing, to forge or inspect rows.
impl Store {
    async fn raw_tokens(
        &self,
        pool: &str,
        id: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>, StoreError> {
        Ok(backend!(self.get(pool, id))?.map(|r| (r.refresh_token, r.access_token)))
    }

    async fn rewrite_raw(
        &self,
        pool: &str,
        id: &str,
        refresh_token: Option<String>,
    ) -> Result<(), StoreError> {
        let sealed = SealedTokens {
            refresh_token,
            access_token: None,
            access_expires_at: None,
        };
        let row = backend!(self.get(pool, id))?.expect("row to rewrite");
        let (rt, at) = (row.refresh_token.as_deref(), row.access_token.as_deref());
        assert!(backend!(self.rewrite_tokens(pool, id, rt, at, &sealed))?);
        Ok(())
    }
}

/// The admin API's pages of one state's events and the operator page's
/// latest events read down `webhook_events_listed` in order: no scan of
/// every event in the state, no sort (with 300,000 delivered events that
/// was about 430 ms per read).
#[tokio::test]
async fn event_listings_are_answered_from_the_index_in_order() {
    let dir = tempdir();
    let store = open(&dir, &crate::ground::crypto::generate_key().unwrap()).await;
    let Backend::Sqlite(b) = &store.backend else {
        panic!("sqlite")
    };
    for sql in [outbox::page_sql(true), outbox::latest_sql()] {
        let plan = b.plan(&sql).await;
        assert!(plan.contains("USING INDEX webhook_events_listed"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "in index order: {plan}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A store in a new directory, to share between tasks.
async fn shared_store() -> (std::path::PathBuf, Arc<Store>) {
    let dir = tempdir();
    let key = crate::ground::crypto::generate_key().unwrap();
    let store = Store::open(&config(&dir, &key), Metrics::new().store())
        .await
        .unwrap();
    (dir, Arc::new(store))
}

/// The SQLite backend of `store` (the group commit's counters).
fn sqlite(store: &Store) -> &sqlite::Sqlite {
    match &store.backend {
        Backend::Sqlite(s) => s,
        Backend::Postgres(_) => unreachable!("the unit tests run on SQLite"),
    }
}

/// Holds SQLite's write lock from a connection of its own, so the group
/// writer pauses on its first write while the rest queue behind it.
async fn hold_write_lock(dir: &std::path::Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join("c.db"));
    let mut c = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut c)
        .await
        .unwrap();
    c
}

/// Seeds `n` connections u0.. and starts a commit of new tokens for each
/// while the write lock is held; returns once all are queued or taken.
async fn commits_behind_a_held_lock(
    store: &Arc<Store>,
    dir: &std::path::Path,
    n: usize,
) -> (
    sqlx::SqliteConnection,
    Vec<tokio::task::JoinHandle<Result<Written, StoreError>>>,
) {
    for i in 0..n {
        let t = tokens(&format!("rt{i}"), &format!("at{i}"));
        store.seed("users", &format!("u{i}"), &t).await.unwrap();
    }
    let lock = hold_write_lock(dir).await;
    let sent = sqlite(store).group().sent();
    let mut tasks = Vec::new();
    for i in 0..n {
        let store = Arc::clone(store);
        tasks.push(tokio::spawn(async move {
            let id = format!("u{i}");
            let seen = store.get("users", &id).await?.expect("seeded").version;
            let t = tokens(&format!("rt{i}-2"), &format!("at{i}-2"));
            store.commit_refresh("users", &id, &seen, &t).await
        }));
    }
    while sqlite(store).group().sent() < sent + n as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (lock, tasks)
}

fn refresh_token_of(r: &Record) -> String {
    r.tokens
        .refresh_token
        .as_ref()
        .map(|t| t.expose().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_commits_waiting_together_share_one_transaction_and_answer_after_it() {
    const N: usize = 64;
    let (dir, store) = shared_store().await;
    let groups = sqlite(&store).group().groups();
    let (mut lock, tasks) = commits_behind_a_held_lock(&store, &dir, N).await;
    // The writer waits for the lock with the first writes; none answers.
    assert!(tasks.iter().all(|t| !t.is_finished()));
    for i in 0..N {
        let r = store.get("users", &format!("u{i}")).await.unwrap().unwrap();
        assert_eq!(refresh_token_of(&r), format!("rt{i}"));
    }
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Ok(Written::Done(_))));
    }
    let written = sqlite(&store).group().groups() - groups;
    // The writes taken before the lock, then all that queued behind them.
    assert!(
        (1..=2).contains(&written),
        "{N} commits in {written} transactions"
    );
    for i in 0..N {
        let r = store.get("users", &format!("u{i}")).await.unwrap().unwrap();
        assert_eq!(refresh_token_of(&r), format!("rt{i}-2"), "u{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_inside_a_group_fails_alone() {
    const N: usize = 8;
    let (dir, store) = shared_store().await;
    sqlx::query(
        "CREATE TRIGGER refuse_u3 BEFORE UPDATE OF refresh_token ON connections \
         WHEN NEW.id = 'u3' BEGIN SELECT RAISE(ABORT, 'refused'); END",
    )
    .execute(sqlite(&store).pool())
    .await
    .unwrap();
    let (mut lock, tasks) = commits_behind_a_held_lock(&store, &dir, N).await;
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        let row = store.get("users", &format!("u{i}")).await.unwrap().unwrap();
        if i == 3 {
            assert!(
                matches!(r, Err(StoreError::Unavailable { op: "commit", .. })),
                "{r:?}"
            );
            assert_eq!(refresh_token_of(&row), "rt3", "u3 keeps its token");
        } else {
            assert!(matches!(r, Ok(Written::Done(_))), "u{i}: {r:?}");
            assert_eq!(refresh_token_of(&row), format!("rt{i}-2"));
        }
    }
}
