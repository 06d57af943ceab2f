//! The store of per-user connections: one interface, [`Store`], over the
//! database backends (`store/sqlite.rs` for one instance,
//! `store/postgres.rs` shared by replicas), each with its own SQL and
//! migrations.
//!
//! `Store` owns what every backend shares: sealing and opening tokens
//! ([`crypto`]), the key canary, operation metrics and the health flag.
//! Backends only move rows of sealed text. Operations are shaped for
//! several replicas: a refresh takes a lease on the row
//! ([`Store::lease`]), re-reads it, and commits both tokens at once
//! ([`Store::commit_refresh`]); a lease whose holder died expires.
//!
//! A shared store (PostgreSQL) also announces every change to a
//! connection ([`Store::subscribe`]) so each replica's memory follows, and
//! connects lazily: [`Store::new`] does no I/O, [`Store::init`] (migrations
//! and canary) is retried by every operation until it succeeds, so a proxy
//! starts while its database is down and recovers without a restart.
//!
//! This module does not call token endpoints or cache anything in memory
//! (see `connections`).

mod postgres;
mod sqlite;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::{StoreConfig, StoreLocation};
use crate::ground::crypto::{CryptoError, Key, Place, Sealer};
use crate::ground::metrics::StoreMetrics;
use crate::ground::now_ms;
use crate::ground::secret::Secret;

/// What the canary row holds, sealed; opening it proves the key matches.
const CANARY_PLAINTEXT: &[u8] = b"flinks-proxy store canary";
/// The canary's place: no pool or connection may be named this (pool names
/// and ids cannot contain `/`).
const CANARY: Place<'static> = Place {
    pool: "/",
    id: "/",
    field: "canary",
};

/// Pool names under this prefix hold static credentials' tokens
/// (`token/shared.rs`); config pool names cannot contain `:`.
pub const CREDENTIAL_POOL_PREFIX: &str = "credential:";

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
    /// What a conditional write of this row expects to find.
    pub version: Version,
}

/// The refresh token a row held when it was read: every write that
/// replaces a connection's tokens or state says which refresh token it
/// expects to find (STYLE: "writes are conditional on what was read"), and
/// does nothing when the row moved on (re-authorized, or refreshed by
/// another holder). The sealed text is compared in SQL; the opened token
/// tells a rekey (same token, new sealing) from a real change.
#[derive(Debug, Clone, Default)]
pub struct Version {
    sealed: Option<String>,
    refresh_token: Option<Secret>,
}

impl Version {
    /// Whether both name the same refresh token (whatever its sealing).
    pub fn same_refresh_token(&self, other: &Version) -> bool {
        match (&self.refresh_token, &other.refresh_token) {
            (Some(a), Some(b)) => a.expose() == b.expose(),
            (None, None) => true,
            _ => false,
        }
    }
}

/// The outcome of a conditional write ([`Store::commit_refresh`],
/// [`Store::mark_needs_reauthorization`], [`Store::record_failure`]).
#[derive(Debug)]
pub enum Written {
    /// Written; the row as it is now.
    Done(Record),
    /// Nothing written: the row holds another refresh token than expected
    /// (re-authorized, or another holder committed a rotation). The row as
    /// it is now.
    Superseded(Record),
    /// No such connection.
    Gone,
}

/// A row as backends move it: tokens still sealed.
#[derive(Debug, Clone)]
pub(crate) struct SealedRow {
    pub(crate) info: ConnectionInfo,
    pub(crate) refresh_token: Option<String>,
    pub(crate) access_token: Option<String>,
}

/// Reads a row of the `connections` table (both backends select the same
/// columns under the same names).
pub(crate) fn sealed_row<'r, R>(r: &'r R) -> Result<SealedRow, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let read = |source| StoreError::Unavailable { op: "read", source };
    let get_i = |c: &str| r.try_get::<Option<i64>, _>(c).map_err(read);
    let get_s = |c: &str| r.try_get::<Option<String>, _>(c).map_err(read);
    let pool: String = r.try_get("pool").map_err(read)?;
    let id: String = r.try_get("id").map_err(read)?;
    let state_text: String = r.try_get("state").map_err(read)?;
    let state = ConnectionState::parse(&state_text).ok_or_else(|| StoreError::Corrupt {
        pool: pool.clone(),
        id: id.clone(),
        what: format!("unknown state {state_text:?}"),
    })?;
    let last_error = match (get_s("last_error")?, get_i("last_error_at")?) {
        (Some(error), Some(at)) => Some(LastError {
            error,
            description: get_s("last_error_description")?,
            at,
        }),
        _ => None,
    };
    Ok(SealedRow {
        info: ConnectionInfo {
            sub: get_s("sub")?,
            state,
            last_error,
            created_at: get_i("created_at")?.unwrap_or(0),
            authorized_at: get_i("authorized_at")?.unwrap_or(0),
            last_refresh_at: get_i("last_refresh_at")?,
            access_token_expires_at: get_i("access_token_expires_at")?,
            pool,
            id,
        },
        refresh_token: get_s("refresh_token")?,
        access_token: get_s("access_token")?,
    })
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
    /// This process holds the lease, taken over from another holder whose
    /// lease had expired: that holder may be alive with tokens the store
    /// could not take yet (it commits them as soon as it can), so a
    /// refresh with the stored refresh token should wait for that a little.
    TakenOver(Record),
    /// Another holder refreshes right now; the record is as of now.
    Busy(Record),
    /// No such connection (deleted meanwhile).
    Gone,
}

/// How a backend's lease attempt went.
pub(crate) enum Took {
    /// Free (or already this holder's).
    Free,
    /// Another holder's, expired.
    Over,
    /// Another holder's, live.
    Busy,
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
    /// A conditional write kept missing a row that keeps changing.
    #[error("connection {pool}/{id} kept changing while it was written; try again")]
    Contended {
        /// Pool.
        pool: String,
        /// Connection id.
        id: String,
    },
    /// A read-only command found no store (or one never initialized).
    #[error("{0}")]
    NotAStore(String),
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
            StoreError::Unavailable { .. } | StoreError::FileGone(_) | StoreError::Contended { .. }
        )
    }
}

/// What happened to a connection, as another replica (or this one) wrote
/// it to a shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Inserted.
    Created,
    /// Authorized again (new tokens, active).
    Reauthorized,
    /// Turned `needs_reauthorization` (its tokens erased).
    NeedsReauthorization,
    /// New tokens committed by a refresh.
    Refreshed,
    /// Deleted.
    Deleted,
}

/// A change announced by a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Changes may have been missed (the listener (re)connected or lagged):
    /// everything in memory must be checked again.
    All,
    /// One connection changed.
    Connection {
        /// Its pool.
        pool: String,
        /// Its id.
        id: String,
        /// What happened.
        kind: ChangeKind,
        /// For `Refreshed`: the lease holder that committed it.
        holder: String,
    },
}

impl Change {
    /// Parses a notification payload, `pool/id/event/holder`.
    pub fn parse(payload: &str) -> Option<Change> {
        let mut parts = payload.splitn(4, '/');
        let (pool, id, event) = (parts.next()?, parts.next()?, parts.next()?);
        let kind = match event {
            "created" => ChangeKind::Created,
            "reauthorized" => ChangeKind::Reauthorized,
            "needs_reauthorization" => ChangeKind::NeedsReauthorization,
            "refreshed" => ChangeKind::Refreshed,
            "deleted" => ChangeKind::Deleted,
            _ => return None,
        };
        Some(Change::Connection {
            pool: pool.to_owned(),
            id: id.to_owned(),
            kind,
            holder: parts.next().unwrap_or("").to_owned(),
        })
    }
}

/// How often a conditional write is tried against a row whose refresh
/// token stays the same but whose sealing keeps changing (a rekey racing).
const CONDITIONAL_TRIES: usize = 8;

/// What [`Store::rekey`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rekeyed {
    /// Rows re-sealed under the current key.
    pub resealed: u64,
    /// Rows already under the current key.
    pub current: u64,
    /// Rows that changed between reading and rewriting (read again).
    pub raced: u64,
}

/// Changes buffered per subscriber; one that falls further behind gets
/// [`Change::All`] semantics (`Lagged`).
const CHANGE_BUFFER: usize = 4096;

/// The database behind a [`Store`].
enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(Box<postgres::Postgres>),
}

/// Calls the same method on whichever backend is configured.
macro_rules! backend {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match &$self.backend {
            Backend::Sqlite(b) => b.$method($($arg),*).await,
            Backend::Postgres(b) => b.$method($($arg),*).await,
        }
    };
}

/// The connection store: sealing, canary, metrics and health over a
/// backend.
pub struct Store {
    backend: Backend,
    sealer: Sealer,
    kind: &'static str,
    access: Access,
    /// Identifies this process's leases.
    holder: String,
    healthy: AtomicBool,
    metrics: StoreMetrics,
    /// Migrations and canary done (retried by operations until then).
    initialized: tokio::sync::OnceCell<()>,
    /// Announced changes (shared stores only).
    changes: broadcast::Sender<Change>,
    /// Stops the listener with the store.
    cancel: CancellationToken,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
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

/// What a process may do with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The proxy: creates and migrates the store, follows changes.
    Serve,
    /// A CLI command that writes (`connections delete`, `store rekey`):
    /// creates and migrates, follows nothing.
    Write,
    /// A command that only reads (`connections list|show`, `check`): never
    /// creates, migrates or writes anything, so it cannot disturb a running
    /// proxy.
    ReadOnly,
}

impl Store {
    /// Opens (creating if needed) the store: schema check and migrations,
    /// then the key canary. A store written with another key is refused.
    pub async fn open(config: &StoreConfig, metrics: StoreMetrics) -> Result<Store, StoreError> {
        Store::open_for(config, metrics, Access::Serve).await
    }

    /// [`Store::open`] for a process with `access`.
    pub async fn open_for(
        config: &StoreConfig,
        metrics: StoreMetrics,
        access: Access,
    ) -> Result<Store, StoreError> {
        let store = Store::new_for(config, metrics, access).await?;
        store.init().await?;
        Ok(store)
    }

    /// The store without its initialization: an SQLite file is opened and
    /// migrated, a PostgreSQL pool is only configured (no connection yet).
    pub async fn new(config: &StoreConfig, metrics: StoreMetrics) -> Result<Store, StoreError> {
        Store::new_for(config, metrics, Access::Serve).await
    }

    /// [`Store::new`] for a process with `access` ([`Access::ReadOnly`]
    /// does no I/O at all until the first operation).
    pub async fn new_for(
        config: &StoreConfig,
        metrics: StoreMetrics,
        access: Access,
    ) -> Result<Store, StoreError> {
        let sealer = sealer(config).map_err(|what| StoreError::Corrupt {
            pool: String::new(),
            id: String::new(),
            what,
        })?;
        let backend = match &config.location {
            StoreLocation::Sqlite(path) => {
                let b = sqlite::Sqlite::open(path, access).await?;
                if access == Access::Serve {
                    b.free_dead_holders().await?;
                }
                Backend::Sqlite(b)
            }
            StoreLocation::Postgres(url) => Backend::Postgres(Box::new(postgres::Postgres::new(
                url,
                config.max_connections,
            )?)),
        };
        Ok(Store {
            backend,
            sealer,
            kind: config.location.kind(),
            access,
            // The process id first: an SQLite store frees the leases of
            // holders that died (see `free_dead_holders`).
            holder: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
            healthy: AtomicBool::new(true),
            metrics,
            initialized: tokio::sync::OnceCell::new(),
            changes: broadcast::channel(CHANGE_BUFFER).0,
            cancel: CancellationToken::new(),
        })
    }

    /// Migrations (PostgreSQL) and the key canary, once; until it succeeds
    /// every operation tries it first. Read-only: the schema and the canary
    /// are only checked.
    pub async fn init(&self) -> Result<(), StoreError> {
        self.initialized
            .get_or_try_init(|| async {
                let r = async {
                    match (&self.backend, self.access) {
                        (Backend::Postgres(b), Access::ReadOnly) => b.check_schema().await?,
                        (Backend::Postgres(b), _) => b.init().await?,
                        (Backend::Sqlite(b), Access::ReadOnly) => b.check_read_only().await?,
                        (Backend::Sqlite(_), _) => {}
                    }
                    self.check_canary().await
                }
                .await;
                self.set_healthy(r.as_ref().map_or_else(|e| !e.is_unavailable(), |()| true));
                r
            })
            .await
            .map(|_| ())
    }

    /// Closes the database connections (waiting for them: an SQLite file
    /// is checkpointed and quiet afterwards).
    pub async fn close(&self) {
        self.cancel.cancel();
        match &self.backend {
            Backend::Sqlite(b) => b.close().await,
            Backend::Postgres(b) => b.close().await,
        }
    }

    /// Whether [`Store::init`] has succeeded.
    pub fn is_initialized(&self) -> bool {
        self.initialized.initialized()
    }

    async fn check_canary(&self) -> Result<(), StoreError> {
        let sealed = match backend!(self.get_meta("canary"))? {
            Some(sealed) => sealed,
            None if self.access == Access::ReadOnly => {
                return Err(StoreError::NotAStore(
                    "the store has never been opened by a proxy (no key canary yet)".into(),
                ))
            }
            None => {
                // Two replicas creating the store together: the first wins.
                let sealed = self.seal(CANARY, CANARY_PLAINTEXT)?;
                backend!(self.put_meta_if_absent("canary", &sealed))?;
                backend!(self.get_meta("canary"))?.unwrap_or(sealed)
            }
        };
        match self.sealer.open(CANARY, &sealed) {
            Ok(v) if v == CANARY_PLAINTEXT => Ok(()),
            _ => Err(StoreError::KeyMismatch {
                found: Sealer::key_id_of(&sealed).unwrap_or("?").to_owned(),
                known: self.sealer.known_ids().join(", "),
            }),
        }
    }

    /// Whether several processes share this store (PostgreSQL): memory must
    /// then follow [`Store::subscribe`] and be re-checked.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Changes to connections as the store announces them (nothing for
    /// SQLite, which one process owns).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Starts following changes made by other processes until the store is
    /// dropped: PostgreSQL's notifications, SQLite's change log (a CLI
    /// command's delete reaches the running proxy within a second).
    pub fn spawn_listener(&self) {
        let (tx, cancel) = (self.changes.clone(), self.cancel.clone());
        // The tasks do not keep the store alive: they read through their
        // own connections and stop when the store is dropped.
        match &self.backend {
            Backend::Postgres(pg) => {
                tokio::spawn(pg.listener().listen(tx, cancel));
            }
            Backend::Sqlite(sqlite) => {
                tokio::spawn(sqlite.poller().listen(tx, cancel));
            }
        }
    }

    /// Keyed fingerprints of a configured secret (a static credential's
    /// code or refresh token) to name its row: under the current key first,
    /// then each old key (a row named before a key rotation).
    pub fn fingerprints(&self, secret: &Secret) -> Vec<String> {
        self.sealer.fingerprints(secret.expose().as_bytes())
    }

    /// Renames a static credential's row (found under an older name: an
    /// old key's fingerprint, or the unkeyed one of earlier versions),
    /// re-sealing its tokens for the new name; conditional on the row
    /// still holding what was read. Whether it was renamed.
    pub async fn rename(&self, pool: &str, from: &str, to: &str) -> Result<bool, StoreError> {
        self.timed("rename", async {
            let Some(row) = backend!(self.get(pool, from))? else {
                return Ok(false);
            };
            let (rt, at) = (row.refresh_token.clone(), row.access_token.clone());
            let record = self.open_row(row)?;
            let sealed = self.seal_tokens(pool, to, &record.tokens)?;
            backend!(self.rename(pool, from, to, rt.as_deref(), at.as_deref(), &sealed))
        })
        .await
    }

    /// This process's lease holder name (a refresh it committed is not news
    /// to it).
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    fn set_healthy(&self, ok: bool) {
        self.healthy.store(ok, Ordering::Relaxed);
        self.metrics.set_up(ok);
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
        let r = match self.init().await {
            Ok(()) => f.await,
            Err(e) => Err(e),
        };
        let ok = match &r {
            Ok(_) => true,
            Err(e) => !e.is_unavailable(),
        };
        self.set_healthy(ok);
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
        let version = Version {
            sealed: row.refresh_token,
            refresh_token: tokens.refresh_token.clone(),
        };
        Ok(Record {
            info: row.info,
            tokens,
            version,
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

    /// Creates a row with `tokens` unless one exists (the first of several
    /// replicas wins; a static credential's row starts so).
    pub async fn seed(&self, pool: &str, id: &str, tokens: &Tokens) -> Result<(), StoreError> {
        self.timed("seed", async {
            let sealed = self.seal_tokens(pool, id, tokens)?;
            backend!(self.seed(pool, id, &sealed, now_ms()))
        })
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
            let (took, row) = match backend!(self.lease(pool, id, &self.holder, now_ms(), ttl_ms))?
            {
                Some(x) => x,
                None => return Ok(Lease::Gone),
            };
            let record = self.open_row(row)?;
            Ok(match took {
                Took::Free => Lease::Taken(record),
                Took::Over => Lease::TakenOver(record),
                Took::Busy => Lease::Busy(record),
            })
        })
        .await
    }

    /// Commits a refresh's tokens (both at once), turns the connection
    /// `active` (the provider just honoured its grant) and frees this
    /// holder's lease, if the row still holds the refresh token `seen`
    /// (whoever holds the lease: the refresh token sent is what makes the
    /// answer valid). A row re-authorized or refreshed by another holder
    /// meanwhile is left alone ([`Written::Superseded`]).
    pub async fn commit_refresh(
        &self,
        pool: &str,
        id: &str,
        seen: &Version,
        tokens: &Tokens,
    ) -> Result<Written, StoreError> {
        self.timed("commit", async {
            let sealed = &self.seal_tokens(pool, id, tokens)?;
            let now = now_ms();
            self.conditional(pool, id, seen, |expected| async move {
                backend!(self.commit_refresh(
                    pool,
                    id,
                    expected.as_deref(),
                    &self.holder,
                    sealed,
                    now
                ))
            })
            .await
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

    /// Turns the connection `needs_reauthorization` (the provider said its
    /// grant is dead) if it still holds the refresh token `seen`. The access
    /// token is dropped; the sealed refresh token is kept (an operator may
    /// need it back, and a refresh that was in flight may still prove it
    /// good).
    pub async fn mark_needs_reauthorization(
        &self,
        pool: &str,
        id: &str,
        seen: &Version,
        error: &LastError,
    ) -> Result<Written, StoreError> {
        self.timed("record_failure", async {
            self.conditional(pool, id, seen, |expected| async move {
                backend!(self.mark_needs_reauthorization(
                    pool,
                    id,
                    expected.as_deref(),
                    &self.holder,
                    error
                ))
            })
            .await
        })
        .await
    }

    /// Records a transient failure (state unchanged) and frees this
    /// holder's lease, if the row still holds the refresh token `seen`.
    pub async fn record_failure(
        &self,
        pool: &str,
        id: &str,
        seen: &Version,
        error: &LastError,
    ) -> Result<Written, StoreError> {
        self.timed("record_failure", async {
            self.conditional(pool, id, seen, |expected| async move {
                backend!(self.record_failure(pool, id, expected.as_deref(), &self.holder, error))
            })
            .await
        })
        .await
    }

    /// Runs a write that expects the row's sealed refresh token until it
    /// lands, or the row really holds another refresh token (or is gone).
    /// A miss whose row holds the same token sealed anew (a rekey ran) is
    /// tried again with the new sealing.
    async fn conditional<F, Fut>(
        &self,
        pool: &str,
        id: &str,
        seen: &Version,
        write: F,
    ) -> Result<Written, StoreError>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<Option<SealedRow>, StoreError>>,
    {
        let mut expected = seen.sealed.clone();
        for _ in 0..CONDITIONAL_TRIES {
            if let Some(row) = write(expected.clone()).await? {
                return Ok(Written::Done(self.open_row(row)?));
            }
            let Some(row) = backend!(self.get(pool, id))? else {
                return Ok(Written::Gone);
            };
            let now = self.open_row(row)?;
            if !now.version.same_refresh_token(seen) {
                return Ok(Written::Superseded(now));
            }
            expected = now.version.sealed;
        }
        Err(StoreError::Contended {
            pool: pool.to_owned(),
            id: id.to_owned(),
        })
    }

    /// Connections per state in `pool`.
    pub async fn counts(&self, pool: &str) -> Result<Vec<(ConnectionState, u64)>, StoreError> {
        self.timed("counts", async { backend!(self.counts(pool)) })
            .await
    }

    /// Re-seals every token not yet under the current key, and the canary.
    /// Each row is rewritten only if it still holds the sealed values read
    /// (a refresh that committed meanwhile wins; the row is read again), so
    /// a rekey on a live fleet never puts back a rotated-away token.
    pub async fn rekey(&self) -> Result<Rekeyed, StoreError> {
        self.timed("rekey", async {
            let canary = self.seal(CANARY, CANARY_PLAINTEXT)?;
            let mut report = Rekeyed::default();
            let mut after: Option<(String, String)> = None;
            loop {
                let page = backend!(self.page_all(after.as_ref(), 500))?;
                let Some(last) = page.last() else { break };
                after = Some((last.info.pool.clone(), last.info.id.clone()));
                for row in page {
                    self.rekey_row(row, &mut report).await?;
                }
            }
            backend!(self.put_meta("canary", &canary))?;
            Ok(report)
        })
        .await
    }

    async fn rekey_row(&self, mut row: SealedRow, report: &mut Rekeyed) -> Result<(), StoreError> {
        let current = self.sealer.current_id();
        let is_current = |s: &Option<String>| {
            s.as_deref()
                .is_none_or(|s| Sealer::key_id_of(s) == Some(current))
        };
        for _ in 0..CONDITIONAL_TRIES {
            if is_current(&row.refresh_token) && is_current(&row.access_token) {
                report.current += 1;
                return Ok(());
            }
            let (pool, id) = (row.info.pool.clone(), row.info.id.clone());
            let (rt, at) = (row.refresh_token.clone(), row.access_token.clone());
            let record = self.open_row(row)?;
            let sealed = self.seal_tokens(&pool, &id, &record.tokens)?;
            if backend!(self.rewrite_tokens(&pool, &id, rt.as_deref(), at.as_deref(), &sealed))? {
                report.resealed += 1;
                return Ok(());
            }
            report.raced += 1;
            match backend!(self.get(&pool, &id))? {
                Some(r) => row = r,
                None => return Ok(()),
            }
        }
        Err(StoreError::Contended {
            pool: row.info.pool,
            id: row.info.id,
        })
    }

    /// Every pool name that has rows (for `connections list` without
    /// `--pool`), static credentials' reserved pools left out.
    pub async fn pools(&self) -> Result<Vec<String>, StoreError> {
        let mut pools = self
            .timed("pools", async { backend!(self.pools()) })
            .await?;
        pools.retain(|p| !p.starts_with(CREDENTIAL_POOL_PREFIX));
        Ok(pools)
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
        let row = backend!(self.get(pool, id))?.expect("row to rewrite");
        let (rt, at) = (row.refresh_token.as_deref(), row.access_token.as_deref());
        assert!(backend!(self.rewrite_tokens(pool, id, rt, at, &sealed))?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ground::metrics::Metrics;

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
        tokio::time::sleep(sqlite::CHANGE_POLL * 2).await;
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
}
