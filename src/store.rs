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
//! This file holds `Store`, its life cycle and the operations on
//! connections (reads, authorizations, leases and the conditional writes);
//! the rest is a file each: `record.rs` (what a row is, opened and sealed),
//! `error.rs` ([`StoreError`]), `sealing.rs` (sealing, opening, the
//! canary), `rekey.rs` ([`Store::rekey`]), `changes.rs` ([`Change`] and
//! [`Store::subscribe`]), `sessions.rs` (connect sessions), `outbox.rs`
//! (the webhook outbox), `idle.rs` (keep-alive's idle connections),
//! `sql.rs` (SQL written once for both backends).
//!
//! This module does not call token endpoints or cache anything in memory
//! (see `connections`).

mod changes;
mod error;
pub mod idle;
mod outbox;
mod postgres;
mod record;
mod rekey;
mod sealing;
mod sessions;
mod sql;
mod sqlite;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::{StoreConfig, StoreLocation};
use crate::ground::crypto::Sealer;
use crate::ground::metrics::StoreMetrics;
use crate::ground::now_ms;
use crate::ground::secret::Secret;

use changes::CHANGE_BUFFER;
pub use changes::{Change, ChangeKind, CHANGE_POLL};
use error::unavailable;
pub use error::{retry_while_unavailable, StoreError};
pub use outbox::{Attempt, EventState, Queue, WebhookEvent};
pub use record::{
    rfc3339, ConnectionInfo, ConnectionState, LastError, Lease, Record, Tokens, Version, Written,
};
pub(crate) use record::{sealed_row, SealedRow, SealedTokens, Took};
pub use rekey::Rekeyed;
pub use sealing::sealer;
pub use sessions::{secret_hash, NewSession, Session, SessionEnd, SessionPhase, SessionStatus};

/// Pool names under this prefix hold static credentials' tokens
/// (`token/shared.rs`); config pool names cannot contain `:`.
pub const CREDENTIAL_POOL_PREFIX: &str = "credential:";

/// How often a conditional write is tried against a row whose refresh
/// token stays the same but whose sealing keeps changing (a rekey racing).
const CONDITIONAL_TRIES: usize = 8;

/// Milliseconds of `d`, saturating.
fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

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
use backend;

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
    /// How long transient refresh failures last before they are reported
    /// (`connection.refresh_failing`), in milliseconds.
    failing_after_ms: AtomicI64,
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
            failing_after_ms: AtomicI64::new(duration_ms(
                crate::config::webhooks::DEFAULT_REFRESH_FAILING_AFTER,
            )),
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

    /// How long transient refresh failures last before
    /// `connection.refresh_failing` is reported (`[webhooks]
    /// refresh_failing_after`; the config follows reloads).
    pub fn set_refresh_failing_after(&self, after: Duration) {
        self.failing_after_ms
            .store(duration_ms(after), Ordering::Relaxed);
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
                let after = self.failing_after_ms.load(Ordering::Relaxed);
                backend!(self.record_failure(
                    pool,
                    id,
                    expected.as_deref(),
                    &self.holder,
                    error,
                    after
                ))
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
}
