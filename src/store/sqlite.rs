//! The SQLite backend: one file (created 0600, WAL), migrations from
//! `migrations/sqlite` embedded in the binary, and the SQL of every store
//! operation. Holds sealed text only.
//!
//! SQLite serves one instance: at open, leases left by a process that died
//! are freed. The file's identity (device and inode) is checked before each
//! operation, so a file removed or replaced under the running proxy gives
//! clear errors instead of writes into an unlinked file.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

use super::{ConnectionInfo, ConnectionState, LastError, SealedRow, SealedTokens, StoreError};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// Readers run in parallel under WAL; writes queue on SQLite's lock.
const MAX_CONNECTIONS: u32 = 4;
/// A write waits this long for another writer before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Until a pooled database connection is handed out.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

const COLUMNS: &str = "pool, id, sub, state, last_error, last_error_description, last_error_at, \
     created_at, authorized_at, last_refresh_at, access_token_expires_at, refresh_token, access_token";

pub(super) struct Sqlite {
    pool: SqlitePool,
    path: PathBuf,
    identity: (u64, u64),
}

fn unavailable(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Unavailable { op, source }
}

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn identity(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

/// Creates the file with mode 0600 unless it exists (SQLite gives its
/// `-wal` and `-shm` files the same mode).
async fn create_private(path: &Path) -> Result<(), StoreError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        opts.open(&p).map(drop)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    .map_err(|source| StoreError::Create {
        path: path.display().to_string(),
        source,
    })
}

impl Sqlite {
    pub(super) async fn open(path: &Path) -> Result<Sqlite, StoreError> {
        create_private(path).await?;
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(unavailable("open"))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(unavailable("open"))?;
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|source| StoreError::Create {
                path: path.display().to_string(),
                source,
            })?;
        let store = Sqlite {
            pool,
            path: path.to_path_buf(),
            identity: identity(&meta),
        };
        store.migrate().await?;
        sqlx::query("UPDATE connections SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL")
            .execute(&store.pool)
            .await
            .map_err(unavailable("open"))?;
        Ok(store)
    }

    /// Refuses a schema newer than the embedded migrations, then migrates.
    async fn migrate(&self) -> Result<(), StoreError> {
        let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let has_table: Option<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable("migrate"))?;
        if has_table.is_some() {
            let (found,): (Option<i64>,) =
                sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(unavailable("migrate"))?;
            if let Some(found) = found.filter(|f| *f > known) {
                return Err(StoreError::SchemaTooNew { found, known });
            }
        }
        MIGRATOR.run(&self.pool).await.map_err(StoreError::Migrate)
    }

    /// The file must still be the one opened.
    async fn check_file(&self) -> Result<(), StoreError> {
        match tokio::fs::metadata(&self.path).await {
            Ok(m) if identity(&m) == self.identity => Ok(()),
            _ => Err(StoreError::FileGone(self.path.display().to_string())),
        }
    }

    pub(super) async fn get_meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.check_file().await?;
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM store_meta WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable("get_meta"))?;
        Ok(row.map(|r| r.0))
    }

    pub(super) async fn put_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.check_file().await?;
        sqlx::query("INSERT INTO store_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(name)
            .bind(value)
            .execute(&self.pool)
            .await
            .map_err(unavailable("put_meta"))?;
        Ok(())
    }

    pub(super) async fn probe_write(&self) -> Result<(), StoreError> {
        self.check_file().await?;
        // A real change: SQLite skips writing rows that stay the same.
        sqlx::query(
            "INSERT INTO store_meta (name, value) VALUES ('probe', ?) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(super::now_ms().to_string())
        .execute(&self.pool)
        .await
        .map_err(unavailable("probe"))?;
        Ok(())
    }

    pub(super) async fn get(&self, pool: &str, id: &str) -> Result<Option<SealedRow>, StoreError> {
        self.check_file().await?;
        let sql = format!("SELECT {COLUMNS} FROM connections WHERE pool = ? AND id = ?");
        sqlx::query(&sql)
            .bind(pool)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable("get"))?
            .map(|r| sealed_row(&r))
            .transpose()
    }

    pub(super) async fn list(
        &self,
        pool: &str,
        state: Option<ConnectionState>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ConnectionInfo>, StoreError> {
        self.check_file().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM connections WHERE pool = ? AND (? IS NULL OR state = ?) \
             AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?"
        );
        let state = state.map(ConnectionState::as_str);
        let rows = sqlx::query(&sql)
            .bind(pool)
            .bind(state)
            .bind(state)
            .bind(after)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable("list"))?;
        rows.iter().map(|r| sealed_row(r).map(|s| s.info)).collect()
    }

    pub(super) async fn page_all(
        &self,
        after: Option<&(String, String)>,
        limit: u32,
    ) -> Result<Vec<SealedRow>, StoreError> {
        self.check_file().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM connections WHERE (? IS NULL OR (pool, id) > (?, ?)) \
             ORDER BY pool, id LIMIT ?"
        );
        let (p, i) = after.map_or((None, None), |(p, i)| (Some(p), Some(i)));
        let rows = sqlx::query(&sql)
            .bind(p)
            .bind(p)
            .bind(i)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable("rekey"))?;
        rows.iter().map(sealed_row).collect()
    }

    pub(super) async fn authorize(
        &self,
        pool: &str,
        id: &str,
        sub: Option<&str>,
        t: &SealedTokens,
        now: i64,
    ) -> Result<(ConnectionInfo, bool), StoreError> {
        self.check_file().await?;
        // One statement: a read-then-write transaction could not wait for
        // another writer (SQLite refuses the upgrade instead of blocking).
        // A new row has created_at = authorized_at = now; a replaced one
        // keeps its older created_at.
        let sql = format!(
            "INSERT INTO connections (pool, id, sub, state, created_at, authorized_at, \
             last_refresh_at, access_token_expires_at, refresh_token, access_token) \
             VALUES (?, ?, ?, 'active', ?, ?, NULL, ?, ?, ?) \
             ON CONFLICT (pool, id) DO UPDATE SET sub = excluded.sub, state = 'active', \
             last_error = NULL, last_error_description = NULL, last_error_at = NULL, \
             authorized_at = excluded.authorized_at, last_refresh_at = NULL, \
             access_token_expires_at = excluded.access_token_expires_at, \
             refresh_token = excluded.refresh_token, access_token = excluded.access_token, \
             lease_owner = NULL, lease_until = NULL, created_at = MIN(created_at, excluded.created_at - 1) \
             RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(pool)
            .bind(id)
            .bind(sub)
            .bind(now)
            .bind(now)
            .bind(t.access_expires_at)
            .bind(&t.refresh_token)
            .bind(&t.access_token)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable("authorize"))?;
        let info = sealed_row(&row)?.info;
        let created = info.created_at == info.authorized_at;
        Ok((info, created))
    }

    pub(super) async fn delete(&self, pool: &str, id: &str) -> Result<bool, StoreError> {
        self.check_file().await?;
        let r = sqlx::query("DELETE FROM connections WHERE pool = ? AND id = ?")
            .bind(pool)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(unavailable("delete"))?;
        Ok(r.rows_affected() > 0)
    }

    /// `(taken, row)`, or `None` when there is no such row.
    pub(super) async fn lease(
        &self,
        pool: &str,
        id: &str,
        holder: &str,
        now: i64,
        ttl_ms: i64,
    ) -> Result<Option<(bool, SealedRow)>, StoreError> {
        self.check_file().await?;
        let sql = format!(
            "UPDATE connections SET lease_owner = ?, lease_until = ? WHERE pool = ? AND id = ? \
             AND (lease_owner IS NULL OR lease_owner = ? OR lease_until <= ?) RETURNING {COLUMNS}"
        );
        let taken = sqlx::query(&sql)
            .bind(holder)
            .bind(now.saturating_add(ttl_ms))
            .bind(pool)
            .bind(id)
            .bind(holder)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable("lease"))?;
        if let Some(row) = taken {
            return Ok(Some((true, sealed_row(&row)?)));
        }
        Ok(self.get(pool, id).await?.map(|row| (false, row)))
    }

    pub(super) async fn commit_refresh(
        &self,
        pool: &str,
        id: &str,
        holder: &str,
        t: &SealedTokens,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.check_file().await?;
        let r = sqlx::query(
            "UPDATE connections SET refresh_token = ?, access_token = ?, \
             access_token_expires_at = ?, last_refresh_at = ?, last_error = NULL, \
             last_error_description = NULL, last_error_at = NULL, \
             lease_owner = NULL, lease_until = NULL \
             WHERE pool = ? AND id = ? AND state = 'active' AND lease_owner = ?",
        )
        .bind(&t.refresh_token)
        .bind(&t.access_token)
        .bind(t.access_expires_at)
        .bind(now)
        .bind(pool)
        .bind(id)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(unavailable("commit"))?;
        Ok(r.rows_affected() > 0)
    }

    pub(super) async fn rewrite_tokens(
        &self,
        pool: &str,
        id: &str,
        t: &SealedTokens,
    ) -> Result<(), StoreError> {
        self.check_file().await?;
        sqlx::query(
            "UPDATE connections SET refresh_token = ?, access_token = ?, \
             access_token_expires_at = COALESCE(?, access_token_expires_at) WHERE pool = ? AND id = ?",
        )
        .bind(&t.refresh_token)
        .bind(&t.access_token)
        .bind(t.access_expires_at)
        .bind(pool)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(unavailable("rekey"))?;
        Ok(())
    }

    pub(super) async fn release(
        &self,
        pool: &str,
        id: &str,
        holder: &str,
    ) -> Result<(), StoreError> {
        self.check_file().await?;
        sqlx::query(
            "UPDATE connections SET lease_owner = NULL, lease_until = NULL \
             WHERE pool = ? AND id = ? AND lease_owner = ?",
        )
        .bind(pool)
        .bind(id)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(unavailable("release"))?;
        Ok(())
    }

    pub(super) async fn record_failure(
        &self,
        pool: &str,
        id: &str,
        holder: &str,
        e: &LastError,
        needs_reauthorization: bool,
    ) -> Result<(), StoreError> {
        self.check_file().await?;
        sqlx::query(
            "UPDATE connections SET last_error = ?, last_error_description = ?, last_error_at = ?, \
             state = CASE WHEN ? THEN 'needs_reauthorization' ELSE state END, \
             refresh_token = CASE WHEN ? THEN NULL ELSE refresh_token END, \
             access_token = CASE WHEN ? THEN NULL ELSE access_token END, \
             access_token_expires_at = CASE WHEN ? THEN NULL ELSE access_token_expires_at END, \
             lease_owner = CASE WHEN lease_owner = ? THEN NULL ELSE lease_owner END, \
             lease_until = CASE WHEN lease_owner = ? THEN NULL ELSE lease_until END \
             WHERE pool = ? AND id = ?",
        )
        .bind(&e.error)
        .bind(&e.description)
        .bind(e.at)
        .bind(needs_reauthorization)
        .bind(needs_reauthorization)
        .bind(needs_reauthorization)
        .bind(needs_reauthorization)
        .bind(holder)
        .bind(holder)
        .bind(pool)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(unavailable("record_failure"))?;
        Ok(())
    }

    pub(super) async fn counts(
        &self,
        pool: &str,
    ) -> Result<Vec<(ConnectionState, u64)>, StoreError> {
        self.check_file().await?;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM connections WHERE pool = ? GROUP BY state")
                .bind(pool)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable("counts"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(s, n)| Some((ConnectionState::parse(&s)?, u64::try_from(n).ok()?)))
            .collect())
    }

    pub(super) async fn pools(&self) -> Result<Vec<String>, StoreError> {
        self.check_file().await?;
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT pool FROM connections ORDER BY pool")
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable("pools"))?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}

#[cfg(test)]
impl Sqlite {
    /// Pretends a newer binary migrated this file.
    pub(super) async fn insert_fake_migration(&self, version: i64) {
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (?, 'from the future', TRUE, x'00', 0)",
        )
        .bind(version)
        .execute(&self.pool)
        .await
        .expect("fake migration");
    }
}

fn sealed_row(r: &sqlx::sqlite::SqliteRow) -> Result<SealedRow, StoreError> {
    let pool: String = r.try_get("pool").map_err(unavailable("read"))?;
    let id: String = r.try_get("id").map_err(unavailable("read"))?;
    let get_i = |c: &str| r.try_get::<Option<i64>, _>(c).map_err(unavailable("read"));
    let get_s = |c: &str| {
        r.try_get::<Option<String>, _>(c)
            .map_err(unavailable("read"))
    };
    let state_text: String = r.try_get("state").map_err(unavailable("read"))?;
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
