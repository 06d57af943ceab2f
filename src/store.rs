//! The store of per-user connections: one interface, [`Store`], over the
//! database backends (`store/sqlite.rs` now; `store/postgres.rs` plugs in as
//! another [`Backend`] variant with its own SQL and migrations).
//!
//! `Store` owns what every backend shares: sealing and opening tokens
//! ([`crypto`]), the key canary, operation metrics and the health flag.
//! Backends only move rows of sealed text. Operations are shaped for
//! several replicas: a refresh takes a lease on the row
//! ([`Store::lease`]), re-reads it, and commits both tokens at once
//! ([`Store::commit_refresh`]); a lease whose holder died expires.
//!
//! This module does not call token endpoints or cache anything in memory
//! (see `connections`).

pub mod crypto;
mod sqlite;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::{StoreConfig, StoreLocation};
use crate::metrics::StoreMetrics;
use crate::secret::Secret;
use crypto::{CryptoError, Key, Place, Sealer};

/// What the canary row holds, sealed; opening it proves the key matches.
const CANARY_PLAINTEXT: &[u8] = b"flinks-proxy store canary";
/// The canary's place: no pool or connection may be named this (pool names
/// and ids cannot contain `/`).
const CANARY: Place<'static> = Place {
    pool: "/",
    id: "/",
    field: "canary",
};

/// Whether a connection can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    /// Tokens can be had.
    Active,
    /// The refresh token was refused or consent revoked: the user must
    /// authorize again.
    NeedsReauthorization,
}

impl ConnectionState {
    /// The stored and JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Active => "active",
            ConnectionState::NeedsReauthorization => "needs_reauthorization",
        }
    }

    /// Every state, for metrics initialised at 0.
    pub const ALL: [ConnectionState; 2] = [
        ConnectionState::Active,
        ConnectionState::NeedsReauthorization,
    ];

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<ConnectionState> {
        match s {
            "active" => Some(ConnectionState::Active),
            "needs_reauthorization" => Some(ConnectionState::NeedsReauthorization),
            _ => None,
        }
    }
}

/// The last failure recorded on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// OAuth `error` or a proxy code (`consent_revoked`).
    pub error: String,
    /// Human text (never a token).
    pub description: Option<String>,
    /// Unix milliseconds.
    pub at: i64,
}

/// A connection as the admin API shows it: never a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Its pool.
    pub pool: String,
    /// Its id, unique in the pool.
    pub id: String,
    /// The token's `sub` claim, when it had one.
    pub sub: Option<String>,
    /// Active or needing re-authorization.
    pub state: ConnectionState,
    /// The last failure.
    pub last_error: Option<LastError>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds of the last code or refresh token exchange.
    pub authorized_at: i64,
    /// Unix milliseconds of the last refresh.
    pub last_refresh_at: Option<i64>,
    /// Unix milliseconds at which the stored access token expires.
    pub access_token_expires_at: Option<i64>,
}

impl ConnectionInfo {
    /// The admin API's JSON (CONNECTIONS.md): times in RFC 3339.
    pub fn to_json(&self) -> serde_json::Value {
        let t = |ms: Option<i64>| ms.map(rfc3339);
        serde_json::json!({
            "id": self.id,
            "pool": self.pool,
            "sub": self.sub,
            "state": self.state.as_str(),
            "created_at": rfc3339(self.created_at),
            "authorized_at": rfc3339(self.authorized_at),
            "last_refresh_at": t(self.last_refresh_at),
            "access_token_expires_at": t(self.access_token_expires_at),
            "last_error": self.last_error.as_ref().map(|e| serde_json::json!({
                "error": e.error,
                "description": e.description,
                "at": rfc3339(e.at),
            })),
        })
    }
}

/// RFC 3339 (UTC, seconds) of Unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Now in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A connection's tokens, opened.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// The refresh token.
    pub refresh_token: Option<Secret>,
    /// The current access token.
    pub access_token: Option<Secret>,
    /// When it expires (Unix milliseconds).
    pub access_expires_at: Option<i64>,
}

/// A connection with its tokens.
#[derive(Debug, Clone)]
pub struct Record {
    /// What the admin API shows.
    pub info: ConnectionInfo,
    /// The tokens.
    pub tokens: Tokens,
}

/// A row as backends move it: tokens still sealed.
#[derive(Debug, Clone)]
pub(crate) struct SealedRow {
    pub(crate) info: ConnectionInfo,
    pub(crate) refresh_token: Option<String>,
    pub(crate) access_token: Option<String>,
}

/// Tokens sealed for one row, ready to write.
#[derive(Debug, Clone)]
pub(crate) struct SealedTokens {
    pub(crate) refresh_token: Option<String>,
    pub(crate) access_token: Option<String>,
    pub(crate) access_expires_at: Option<i64>,
}

/// The outcome of [`Store::lease`].
#[derive(Debug)]
pub enum Lease {
    /// This process holds the refresh lease; the record is as of now.
    Taken(Record),
    /// Another holder refreshes right now; the record is as of now.
    Busy(Record),
    /// No such connection (deleted meanwhile).
    Gone,
}

/// Why a store operation failed. Never carries a token, key or password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or refused the operation.
    #[error("store {op} failed: {source}")]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The SQLite file was removed or replaced while the proxy ran; writing
    /// on would lose data at the next start.
    #[error("the store file {0} was removed or replaced while the proxy was running; restore it (or restart to start a new store)")]
    FileGone(String),
    /// The store file could not be created.
    #[error("cannot create the store file {path}: {source}")]
    Create {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The canary does not open under any configured key.
    #[error("the store key does not match this store (the store was written with key id {found}; store.key and store.old_keys have key ids {known}): configure the key this store was created with")]
    KeyMismatch {
        /// The canary's key id.
        found: String,
        /// The configured key ids.
        known: String,
    },
    /// Applied migrations the binary does not know.
    #[error("the store's schema (version {found}) is newer than this binary knows (version {known}): run a newer flinks-proxy")]
    SchemaTooNew {
        /// Highest applied version.
        found: i64,
        /// Highest embedded version.
        known: i64,
    },
    /// Migrating failed.
    #[error("cannot migrate the store: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A stored value did not open.
    #[error("connection {pool}/{id}: {field} {source}")]
    Crypto {
        /// Pool.
        pool: String,
        /// Connection id.
        id: String,
        /// Which field.
        field: &'static str,
        /// Why.
        #[source]
        source: CryptoError,
    },
    /// A backend this binary does not have yet.
    #[error("{0} stores are not supported by this version")]
    Unsupported(&'static str),
    /// A row held a value the binary does not understand.
    #[error("connection {pool}/{id}: corrupt row ({what})")]
    Corrupt {
        /// Pool.
        pool: String,
        /// Connection id.
        id: String,
        /// What is wrong.
        what: String,
    },
}

impl StoreError {
    /// Failures that may pass by themselves (a down database, a busy file):
    /// answered 503 `store_unavailable`.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. } | StoreError::FileGone(_)
        )
    }
}

/// The database behind a [`Store`]. A PostgreSQL variant (issue 10) is one
/// more arm in each dispatch below and a `store/postgres.rs` with the same
/// methods.
enum Backend {
    Sqlite(sqlite::Sqlite),
}

/// Calls the same method on whichever backend is configured.
macro_rules! backend {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match &$self.backend {
            Backend::Sqlite(b) => b.$method($($arg),*).await,
        }
    };
}

/// The connection store: sealing, canary, metrics and health over a
/// backend.
pub struct Store {
    backend: Backend,
    sealer: Sealer,
    kind: &'static str,
    /// Identifies this process's leases.
    holder: String,
    healthy: AtomicBool,
    metrics: StoreMetrics,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("kind", &self.kind)
            .field("key_id", &self.sealer.current_id())
            .finish_non_exhaustive()
    }
}

/// The keys of a `[store]` table.
pub fn sealer(config: &StoreConfig) -> Result<Sealer, String> {
    let current = Key::from_base64(config.key.expose()).map_err(|m| format!("store.key: {m}"))?;
    let mut old = Vec::new();
    for (i, k) in config.old_keys.iter().enumerate() {
        old.push(Key::from_base64(k.expose()).map_err(|m| format!("store.old_keys[{i}]: {m}"))?);
    }
    Ok(Sealer::new(current, old))
}

impl Store {
    /// Opens (creating if needed) the store: schema check and migrations,
    /// then the key canary. A store written with another key is refused.
    pub async fn open(config: &StoreConfig, metrics: StoreMetrics) -> Result<Store, StoreError> {
        let sealer = sealer(config).map_err(|what| StoreError::Corrupt {
            pool: String::new(),
            id: String::new(),
            what,
        })?;
        let backend = match &config.location {
            StoreLocation::Sqlite(path) => Backend::Sqlite(sqlite::Sqlite::open(path).await?),
            StoreLocation::Postgres(_) => return Err(StoreError::Unsupported("PostgreSQL")),
        };
        let store = Store {
            backend,
            sealer,
            kind: config.location.kind(),
            holder: format!("{:016x}", rand::random::<u64>()),
            healthy: AtomicBool::new(true),
            metrics,
        };
        store.check_canary().await?;
        Ok(store)
    }

    async fn check_canary(&self) -> Result<(), StoreError> {
        match backend!(self.get_meta("canary"))? {
            Some(sealed) => match self.sealer.open(CANARY, &sealed) {
                Ok(v) if v == CANARY_PLAINTEXT => Ok(()),
                _ => Err(StoreError::KeyMismatch {
                    found: Sealer::key_id_of(&sealed).unwrap_or("?").to_owned(),
                    known: self.sealer.known_ids().join(", "),
                }),
            },
            None => {
                let sealed = self.seal(CANARY, CANARY_PLAINTEXT)?;
                backend!(self.put_meta("canary", &sealed))
            }
        }
    }

    /// `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Whether the last operation succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Counts, times and records the health of one operation.
    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let r = f.await;
        let ok = match &r {
            Ok(_) => true,
            Err(e) => !e.is_unavailable(),
        };
        self.healthy.store(ok, Ordering::Relaxed);
        self.metrics.observe(op, r.is_ok(), start.elapsed());
        if let Err(e) = &r {
            tracing::warn!(op, error = %e, "store operation failed");
        }
        r
    }

    fn seal(&self, place: Place<'_>, plaintext: &[u8]) -> Result<String, StoreError> {
        self.sealer
            .seal(place, plaintext)
            .map_err(|source| StoreError::Crypto {
                pool: place.pool.to_owned(),
                id: place.id.to_owned(),
                field: "canary",
                source,
            })
    }

    fn seal_tokens(
        &self,
        pool: &str,
        id: &str,
        tokens: &Tokens,
    ) -> Result<SealedTokens, StoreError> {
        let seal = |field: &'static str, s: &Option<Secret>| {
            s.as_ref()
                .map(|s| {
                    self.sealer
                        .seal(Place { pool, id, field }, s.expose().as_bytes())
                        .map_err(|source| StoreError::Crypto {
                            pool: pool.to_owned(),
                            id: id.to_owned(),
                            field,
                            source,
                        })
                })
                .transpose()
        };
        Ok(SealedTokens {
            refresh_token: seal("refresh_token", &tokens.refresh_token)?,
            access_token: seal("access_token", &tokens.access_token)?,
            access_expires_at: tokens.access_expires_at,
        })
    }

    fn open_row(&self, row: SealedRow) -> Result<Record, StoreError> {
        let (pool, id) = (row.info.pool.as_str(), row.info.id.as_str());
        let open = |field: &'static str, s: &Option<String>| {
            s.as_deref()
                .map(|s| {
                    self.sealer
                        .open_secret(Place { pool, id, field }, s)
                        .map_err(|source| StoreError::Crypto {
                            pool: pool.to_owned(),
                            id: id.to_owned(),
                            field,
                            source,
                        })
                })
                .transpose()
        };
        let tokens = Tokens {
            refresh_token: open("refresh_token", &row.refresh_token)?,
            access_token: open("access_token", &row.access_token)?,
            access_expires_at: row.info.access_token_expires_at,
        };
        Ok(Record {
            info: row.info,
            tokens,
        })
    }

    /// One connection with its tokens.
    pub async fn get(&self, pool: &str, id: &str) -> Result<Option<Record>, StoreError> {
        self.timed("get", async {
            backend!(self.get(pool, id))?
                .map(|r| self.open_row(r))
                .transpose()
        })
        .await
    }

    /// A page of connections ordered by id, after `after`, at most `limit`.
    pub async fn list(
        &self,
        pool: &str,
        state: Option<ConnectionState>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ConnectionInfo>, StoreError> {
        self.timed("list", async {
            backend!(self.list(pool, state, after, limit))
        })
        .await
    }

    /// Creates or replaces a connection just authorized: active, no error,
    /// the given tokens. Returns it and whether it was created.
    pub async fn authorize(
        &self,
        pool: &str,
        id: &str,
        sub: Option<&str>,
        tokens: &Tokens,
    ) -> Result<(ConnectionInfo, bool), StoreError> {
        self.timed("authorize", async {
            let sealed = self.seal_tokens(pool, id, tokens)?;
            backend!(self.authorize(pool, id, sub, &sealed, now_ms()))
        })
        .await
    }

    /// Checks that the store takes writes now (a write that changes
    /// nothing), before spending a single-use code on a grant whose result
    /// could not be kept.
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        self.timed("probe", async { backend!(self.probe_write()) })
            .await
    }

    /// Deletes a connection and its tokens; whether it existed.
    pub async fn delete(&self, pool: &str, id: &str) -> Result<bool, StoreError> {
        self.timed("delete", async { backend!(self.delete(pool, id)) })
            .await
    }

    /// Takes the refresh lease of a connection for `ttl` (or finds it held
    /// by another holder), returning the row as of now either way.
    pub async fn lease(&self, pool: &str, id: &str, ttl: Duration) -> Result<Lease, StoreError> {
        self.timed("lease", async {
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            let (taken, row) = match backend!(self.lease(pool, id, &self.holder, now_ms(), ttl_ms))?
            {
                Some(x) => x,
                None => return Ok(Lease::Gone),
            };
            let record = self.open_row(row)?;
            Ok(if taken {
                Lease::Taken(record)
            } else {
                Lease::Busy(record)
            })
        })
        .await
    }

    /// Commits a refresh's tokens (both at once) and frees the lease.
    /// `false` when this holder no longer holds the lease, or the
    /// connection is gone, re-authorized or turned needs_reauthorization
    /// meanwhile (the tokens are then stale).
    pub async fn commit_refresh(
        &self,
        pool: &str,
        id: &str,
        tokens: &Tokens,
    ) -> Result<bool, StoreError> {
        self.timed("commit", async {
            let sealed = self.seal_tokens(pool, id, tokens)?;
            backend!(self.commit_refresh(pool, id, &self.holder, &sealed, now_ms()))
        })
        .await
    }

    /// Frees this holder's lease without changing tokens.
    pub async fn release(&self, pool: &str, id: &str) -> Result<(), StoreError> {
        self.timed("release", async {
            backend!(self.release(pool, id, &self.holder))
        })
        .await
    }

    /// Records a failure; `needs_reauthorization` also erases the tokens
    /// (they are dead) and turns the connection so for every reader.
    pub async fn record_failure(
        &self,
        pool: &str,
        id: &str,
        error: &LastError,
        needs_reauthorization: bool,
    ) -> Result<(), StoreError> {
        self.timed("record_failure", async {
            backend!(self.record_failure(pool, id, &self.holder, error, needs_reauthorization))
        })
        .await
    }

    /// Connections per state in `pool`.
    pub async fn counts(&self, pool: &str) -> Result<Vec<(ConnectionState, u64)>, StoreError> {
        self.timed("counts", async { backend!(self.counts(pool)) })
            .await
    }

    /// Re-seals every token and the canary under the current key; returns
    /// the number of connections rewritten.
    pub async fn rekey(&self) -> Result<u64, StoreError> {
        self.timed("rekey", async {
            let canary = self.seal(CANARY, CANARY_PLAINTEXT)?;
            let mut n = 0;
            let mut after: Option<(String, String)> = None;
            loop {
                let page = backend!(self.page_all(after.as_ref(), 500))?;
                let Some(last) = page.last() else { break };
                after = Some((last.info.pool.clone(), last.info.id.clone()));
                for row in page {
                    let record = self.open_row(row)?;
                    let (pool, id) = (&record.info.pool, &record.info.id);
                    let sealed = self.seal_tokens(pool, id, &record.tokens)?;
                    backend!(self.rewrite_tokens(pool, id, &sealed))?;
                    n += 1;
                }
            }
            backend!(self.put_meta("canary", &canary))?;
            Ok(n)
        })
        .await
    }

    /// Every pool name that has rows (for `connections list` without
    /// `--pool`).
    pub async fn pools(&self) -> Result<Vec<String>, StoreError> {
        self.timed("pools", async { backend!(self.pools()) }).await
    }

    /// The id of the key new values are sealed with.
    pub fn key_id(&self) -> &str {
        self.sealer.current_id()
    }

    #[cfg(test)]
    pub(crate) async fn raw_tokens(
        &self,
        pool: &str,
        id: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>, StoreError> {
        Ok(backend!(self.get(pool, id))?.map(|r| (r.refresh_token, r.access_token)))
    }

    #[cfg(test)]
    pub(crate) async fn rewrite_raw(
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
        backend!(self.rewrite_tokens(pool, id, &sealed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn config(dir: &std::path::Path, key: &str) -> StoreConfig {
        StoreConfig {
            location: StoreLocation::Sqlite(dir.join("c.db")),
            key: Secret::new(key.to_owned()),
            old_keys: vec![],
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

    #[tokio::test]
    async fn a_ciphertext_copied_to_another_row_does_not_open() {
        let dir = tempdir();
        let key = crypto::generate_key().unwrap();
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
        let key = crypto::generate_key().unwrap();
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
        let Backend::Sqlite(b) = &store.backend;
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
            crypto::generate_key().unwrap(),
            crypto::generate_key().unwrap(),
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
        assert_eq!(store.rekey().await.unwrap(), 1);
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
        let key = crypto::generate_key().unwrap();
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
        assert!(matches!(
            store.lease("users", "alice", ttl).await.unwrap(),
            Lease::Taken(_)
        ));
        assert!(matches!(
            other.lease("users", "alice", ttl).await.unwrap(),
            Lease::Busy(_)
        ));
        assert!(store
            .commit_refresh("users", "alice", &tokens("rt2", "at2"))
            .await
            .unwrap());
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
        let _ = std::fs::remove_dir_all(dir);
    }
}
