//! [`StoreError`]: why a store operation failed, and which failures may
//! pass by themselves ([`StoreError::is_unavailable`]). Never carries a
//! token, key or password.

use std::time::Duration;

use tokio::time::Instant;

use crate::ground::crypto::CryptoError;

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

/// Maps a database error of operation `op` to [`StoreError::Unavailable`]
/// (every backend's SQL, and the connect sessions').
pub(super) fn unavailable(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Unavailable { op, source }
}

/// Runs a store write until it lands or fails for good, trying again while
/// the store is unavailable for up to `limit` (100 ms, doubling to 2 s): for
/// writes that must not be lost: a code was just spent, a webhook was
/// just answered.
pub async fn retry_while_unavailable<T, F, Fut>(
    limit: Duration,
    mut write: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let start = Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        match write().await {
            Err(e) if e.is_unavailable() && start.elapsed() < limit => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}
