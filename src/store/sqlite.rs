//! The SQLite backend: one file (created 0600, WAL), migrations from
//! `migrations/sqlite` embedded in the binary, and the SQL of every store
//! operation (leases and the writes under them in `lease`, the change-log
//! reader in `poller`). Holds sealed text only.
//!
//! SQLite serves one instance: at open, leases left by a process that died
//! are freed. The file's identity (device and inode) is checked before each
//! operation, so a file removed or replaced under the running proxy gives
//! clear errors instead of writes into an unlinked file.

mod group;
mod lease;
#[cfg(test)]
mod plan;
mod poller;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use super::{
    sealed_row, unavailable, Access, ConnectionInfo, ConnectionState, SealedRow, SealedTokens,
    StoreError,
};

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
    /// The file's device and inode when opened (`None`: opened read-only
    /// before it existed).
    identity: Option<(u64, u64)>,
    /// The refresh writes' group commit.
    group: group::Group,
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
    /// The refresh writes' group commit.
    #[cfg(test)]
    pub(super) fn group(&self) -> &group::Group {
        &self.group
    }

    /// The database connections (for `sessions.rs`'s SQL).
    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Opens the file. [`Access::ReadOnly`] opens it lazily and read-only:
    /// no file is created, nothing is written or migrated (a CLI read next
    /// to a running proxy changes nothing under it). Otherwise the file is
    /// created (0600) and migrated. Leases are left alone: they expire by
    /// themselves, and another process may be the one holding them.
    pub(super) async fn open(path: &Path, access: Access) -> Result<Sqlite, StoreError> {
        let read_only = access == Access::ReadOnly;
        if !read_only {
            create_private(path).await?;
        }
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(unavailable("open"))?
            .filename(path)
            .create_if_missing(!read_only)
            .read_only(read_only)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool_options = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT);
        if read_only {
            let identity = tokio::fs::metadata(path).await.ok().map(|m| identity(&m));
            let pool = pool_options.connect_lazy_with(options);
            return Ok(Sqlite {
                group: group::Group::start(pool.clone()),
                pool,
                path: path.to_path_buf(),
                identity,
            });
        }
        let pool = pool_options
            .connect_with(options.journal_mode(SqliteJournalMode::Wal))
            .await
            .map_err(unavailable("open"))?;
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|source| StoreError::Create {
                path: path.display().to_string(),
                source,
            })?;
        let store = Sqlite {
            group: group::Group::start(pool.clone()),
            pool,
            path: path.to_path_buf(),
            identity: Some(identity(&meta)),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Frees the leases of holders that are dead processes on this host
    /// (a proxy killed mid-refresh), so their users need not wait for the
    /// leases to expire. A live holder's lease (another proxy on the same
    /// file during a rolling restart) is left alone. Holder names start
    /// with the process id; where processes cannot be looked up (no
    /// `/proc`), leases only expire.
    pub(super) async fn free_dead_holders(&self) -> Result<(), StoreError> {
        if !Path::new("/proc/self").exists() {
            return Ok(());
        }
        // Refresh leases and webhook delivery leases alike.
        for table in ["connections", "webhook_events"] {
            let owners: Vec<(String,)> = sqlx::query_as(&format!(
                "SELECT DISTINCT lease_owner FROM {table} WHERE lease_owner IS NOT NULL"
            ))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable("open"))?;
            for (owner,) in owners {
                let pid = owner.split('-').next().and_then(|p| p.parse::<u32>().ok());
                let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
                if pid.is_some() && !alive {
                    sqlx::query(&format!(
                        "UPDATE {table} SET lease_owner = NULL, lease_until = NULL \
                         WHERE lease_owner = ?"
                    ))
                    .bind(&owner)
                    .execute(&self.pool)
                    .await
                    .map_err(unavailable("open"))?;
                }
            }
        }
        Ok(())
    }

    /// Checks a read-only store: it exists and its schema is one this
    /// binary knows.
    pub(super) async fn check_read_only(&self) -> Result<(), StoreError> {
        if self.identity.is_none() {
            return Err(StoreError::NotAStore(format!(
                "there is no store at {} yet (the proxy creates it at its first start)",
                self.path.display()
            )));
        }
        self.check_schema().await
    }

    /// Refuses a schema newer than the embedded migrations, then migrates.
    async fn migrate(&self) -> Result<(), StoreError> {
        self.check_schema().await?;
        MIGRATOR.run(&self.pool).await.map_err(StoreError::Migrate)
    }

    /// Refuses a schema newer than the embedded migrations.
    async fn check_schema(&self) -> Result<(), StoreError> {
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
        Ok(())
    }

    /// The file must still be the one opened.
    pub(super) async fn check_file(&self) -> Result<(), StoreError> {
        let Some(opened) = self.identity else {
            return Ok(());
        };
        match tokio::fs::metadata(&self.path).await {
            Ok(m) if identity(&m) == opened => Ok(()),
            _ => Err(StoreError::FileGone(self.path.display().to_string())),
        }
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
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

    /// Only for the canary (see the PostgreSQL backend).
    pub(super) async fn put_meta_if_absent(
        &self,
        name: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        self.check_file().await?;
        sqlx::query(
            "INSERT INTO store_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        )
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
        .bind(crate::ground::now_ms().to_string())
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
             failing_since = NULL, failing_reported = 0, \
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

    pub(super) async fn seed(
        &self,
        pool: &str,
        id: &str,
        t: &SealedTokens,
        now: i64,
    ) -> Result<(), StoreError> {
        self.check_file().await?;
        sqlx::query(
            "INSERT INTO connections (pool, id, state, created_at, authorized_at, \
             access_token_expires_at, refresh_token, access_token) \
             VALUES (?, ?, 'active', ?, ?, ?, ?, ?) ON CONFLICT (pool, id) DO NOTHING",
        )
        .bind(pool)
        .bind(id)
        .bind(now)
        .bind(now)
        .bind(t.access_expires_at)
        .bind(&t.refresh_token)
        .bind(&t.access_token)
        .execute(&self.pool)
        .await
        .map_err(unavailable("seed"))?;
        Ok(())
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

    /// Re-sealed tokens, written only over the sealed values read.
    pub(super) async fn rewrite_tokens(
        &self,
        pool: &str,
        id: &str,
        expected_refresh: Option<&str>,
        expected_access: Option<&str>,
        t: &SealedTokens,
    ) -> Result<bool, StoreError> {
        self.check_file().await?;
        let r = sqlx::query(
            "UPDATE connections SET refresh_token = ?, access_token = ? \
             WHERE pool = ? AND id = ? AND refresh_token IS ? AND access_token IS ?",
        )
        .bind(&t.refresh_token)
        .bind(&t.access_token)
        .bind(pool)
        .bind(id)
        .bind(expected_refresh)
        .bind(expected_access)
        .execute(&self.pool)
        .await
        .map_err(unavailable("rekey"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Moves a row to another id with tokens sealed for it, if it still
    /// holds the sealed values read.
    pub(super) async fn rename(
        &self,
        pool: &str,
        from: &str,
        to: &str,
        expected_refresh: Option<&str>,
        expected_access: Option<&str>,
        t: &SealedTokens,
    ) -> Result<bool, StoreError> {
        self.check_file().await?;
        let r = sqlx::query(
            "UPDATE connections SET id = ?, refresh_token = ?, access_token = ?, \
             lease_owner = NULL, lease_until = NULL \
             WHERE pool = ? AND id = ? AND refresh_token IS ? AND access_token IS ?",
        )
        .bind(to)
        .bind(&t.refresh_token)
        .bind(&t.access_token)
        .bind(pool)
        .bind(from)
        .bind(expected_refresh)
        .bind(expected_access)
        .execute(&self.pool)
        .await
        .map_err(unavailable("rename"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Per-state counts as the triggers keep them (no scan).
    pub(super) async fn counts(
        &self,
        pool: &str,
    ) -> Result<Vec<(ConnectionState, u64)>, StoreError> {
        self.check_file().await?;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, n FROM connection_counts WHERE pool = ? AND n > 0")
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
