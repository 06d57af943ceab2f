//! The PostgreSQL backend, shared by replicas: a bounded sqlx pool (TLS
//! through rustls as the URL's `sslmode` says), migrations from
//! `migrations/postgres` embedded in the binary, the SQL of every store
//! operation, and (in `feed.rs`) the change feed that turns what the
//! migrations' triggers log into [`Change`]s. Holds sealed text only.
//!
//! Leases are timed on the database's clock, so replicas with skewed clocks
//! agree on when a dead holder's lease is free. The URL (it may carry a
//! password) is never formatted: sqlx's connect options are not `Debug`
//! printed here, and driver errors do not contain it.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

use super::unavailable;
use super::{
    sealed_row, ConnectionInfo, ConnectionState, LastError, SealedRow, SealedTokens, StoreError,
    Took,
};
use crate::ground::secret::Secret;

mod feed;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The channel the migration's trigger notifies.
pub(super) const CHANNEL: &str = "flinks_proxy_connections";
/// Until a pooled database connection is handed out: past this a request
/// answers `store_unavailable` rather than waiting out `request_timeout`.
pub(super) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnecting the listener backs off up to this.
pub(super) const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The database's clock in Unix milliseconds.
const DB_NOW: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

const COLUMNS: &str = "pool, id, sub, state, last_error, last_error_description, last_error_at, \
     created_at, authorized_at, last_refresh_at, access_token_expires_at, refresh_token, access_token";

pub(super) struct Postgres {
    pool: PgPool,
    options: PgConnectOptions,
}

impl Postgres {
    /// The database connections (for `sessions.rs`'s SQL).
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A pool that connects lazily: nothing is sent until [`Postgres::init`].
    pub(super) fn new(url: &Secret, max_connections: u32) -> Result<Postgres, StoreError> {
        let options = PgConnectOptions::from_str(url.expose()).map_err(unavailable("open"))?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone());
        Ok(Postgres { pool, options })
    }

    /// Refuses a schema newer than the embedded migrations, then migrates
    /// (sqlx takes an advisory lock: replicas starting together migrate once).
    pub(super) async fn init(&self) -> Result<(), StoreError> {
        self.check_schema().await?;
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(source) => StoreError::Unavailable {
                op: "migrate",
                source,
            },
            e => StoreError::Migrate(e),
        })
    }

    /// Refuses a schema newer than the embedded migrations (writes nothing).
    pub(super) async fn check_schema(&self) -> Result<(), StoreError> {
        let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let (has_table,): (bool,) =
            sqlx::query_as("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&self.pool)
                .await
                .map_err(unavailable("migrate"))?;
        if has_table {
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

    /// What follows the change feed, on connections of its own.
    pub(super) fn feed(&self) -> feed::Feed {
        feed::Feed {
            options: self.options.clone(),
        }
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    pub(super) async fn get_meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM store_meta WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable("get_meta"))?;
        Ok(row.map(|r| r.0))
    }

    pub(super) async fn put_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO store_meta (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(unavailable("put_meta"))?;
        Ok(())
    }

    /// Only for the canary: a replica starting at the same time as another
    /// keeps the first one written.
    pub(super) async fn put_meta_if_absent(
        &self,
        name: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO store_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(unavailable("put_meta"))?;
        Ok(())
    }

    pub(super) async fn probe_write(&self) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO store_meta (name, value) VALUES ('probe', $1) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(crate::ground::now_ms().to_string())
        .execute(&self.pool)
        .await
        .map_err(unavailable("probe"))?;
        Ok(())
    }

    pub(super) async fn get(&self, pool: &str, id: &str) -> Result<Option<SealedRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM connections WHERE pool = $1 AND id = $2");
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
        let sql = format!(
            "SELECT {COLUMNS} FROM connections WHERE pool = $1 \
             AND ($2::TEXT IS NULL OR state = $2) AND ($3::TEXT IS NULL OR id > $3) \
             ORDER BY id LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(pool)
            .bind(state.map(ConnectionState::as_str))
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
        let sql = format!(
            "SELECT {COLUMNS} FROM connections \
             WHERE ($1::TEXT IS NULL OR (pool, id) > ($1, $2)) ORDER BY pool, id LIMIT $3"
        );
        let (p, i) = after.map_or((None, None), |(p, i)| (Some(p), Some(i)));
        let rows = sqlx::query(&sql)
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
        // `xmax = 0` only on a freshly inserted row.
        let sql = format!(
            "INSERT INTO connections (pool, id, sub, state, created_at, authorized_at, \
             last_refresh_at, access_token_expires_at, refresh_token, access_token) \
             VALUES ($1, $2, $3, 'active', $4, $4, NULL, $5, $6, $7) \
             ON CONFLICT (pool, id) DO UPDATE SET sub = excluded.sub, state = 'active', \
             last_error = NULL, last_error_description = NULL, last_error_at = NULL, \
             failing_since = NULL, failing_reported = 0, \
             authorized_at = GREATEST(excluded.authorized_at, connections.authorized_at + 1), \
             last_refresh_at = NULL, \
             access_token_expires_at = excluded.access_token_expires_at, \
             refresh_token = excluded.refresh_token, access_token = excluded.access_token, \
             lease_owner = NULL, lease_until = NULL \
             RETURNING {COLUMNS}, (xmax = 0) AS inserted"
        );
        let row = sqlx::query(&sql)
            .bind(pool)
            .bind(id)
            .bind(sub)
            .bind(now)
            .bind(t.access_expires_at)
            .bind(&t.refresh_token)
            .bind(&t.access_token)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable("authorize"))?;
        let created: bool = row.try_get("inserted").map_err(unavailable("read"))?;
        Ok((sealed_row(&row)?.info, created))
    }

    pub(super) async fn seed(
        &self,
        pool: &str,
        id: &str,
        t: &SealedTokens,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO connections (pool, id, state, created_at, authorized_at, \
             access_token_expires_at, refresh_token, access_token) \
             VALUES ($1, $2, 'active', $3, $3, $4, $5, $6) ON CONFLICT (pool, id) DO NOTHING",
        )
        .bind(pool)
        .bind(id)
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
        let r = sqlx::query("DELETE FROM connections WHERE pool = $1 AND id = $2")
            .bind(pool)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(unavailable("delete"))?;
        Ok(r.rows_affected() > 0)
    }

    /// `(taken, row)`, or `None` when there is no such row. One statement:
    /// no transaction stays open while the holder calls the token endpoint.
    pub(super) async fn lease(
        &self,
        pool: &str,
        id: &str,
        holder: &str,
        _now: i64,
        ttl_ms: i64,
    ) -> Result<Option<(Took, SealedRow)>, StoreError> {
        // The row lock of the CTE makes the previous owner the one this
        // UPDATE replaced.
        let sql = format!(
            "WITH prev AS (SELECT lease_owner AS previous_owner FROM connections \
             WHERE pool = $3 AND id = $4 FOR UPDATE) \
             UPDATE connections SET lease_owner = $1, lease_until = {DB_NOW} + $2 FROM prev \
             WHERE pool = $3 AND id = $4 \
             AND (connections.lease_owner IS NULL OR connections.lease_owner = $1 \
                  OR connections.lease_until <= {DB_NOW}) \
             RETURNING {COLUMNS}, prev.previous_owner"
        );
        let taken = sqlx::query(&sql)
            .bind(holder)
            .bind(ttl_ms)
            .bind(pool)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable("lease"))?;
        if let Some(row) = taken {
            let previous: Option<String> = row
                .try_get("previous_owner")
                .map_err(unavailable("lease"))?;
            let took = match previous {
                Some(p) if p != holder => Took::Over,
                _ => Took::Free,
            };
            return Ok(Some((took, sealed_row(&row)?)));
        }
        Ok(self.get(pool, id).await?.map(|row| (Took::Busy, row)))
    }

    /// `UPDATE connections SET {set}, <this holder's lease freed> WHERE
    /// <the row> AND <its refresh token is the expected one> RETURNING
    /// <the row>`; `set` uses `$1`…`$n` and [`Postgres::run_conditional`]
    /// binds the rest.
    fn conditional_sql(set: &str, n: usize) -> String {
        let (h, p, i, e) = (n + 1, n + 2, n + 3, n + 4);
        // Every SET expression sees the old row, so both CASEs read the
        // old lease owner.
        format!(
            "UPDATE connections SET {set}, \
             lease_until = CASE WHEN lease_owner = ${h} THEN NULL ELSE lease_until END, \
             lease_owner = CASE WHEN lease_owner = ${h} THEN NULL ELSE lease_owner END \
             WHERE pool = ${p} AND id = ${i} AND refresh_token IS NOT DISTINCT FROM ${e}::TEXT \
             RETURNING {COLUMNS}"
        )
    }

    async fn run_conditional<'q>(
        &self,
        op: &'static str,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        holder: &'q str,
        pool: &'q str,
        id: &'q str,
        expected: Option<&'q str>,
    ) -> Result<Option<SealedRow>, StoreError> {
        q.bind(holder)
            .bind(pool)
            .bind(id)
            .bind(expected)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable(op))?
            .map(|r| sealed_row(&r))
            .transpose()
    }

    pub(super) async fn commit_refresh(
        &self,
        pool: &str,
        id: &str,
        expected: Option<&str>,
        holder: &str,
        t: &SealedTokens,
        _now: i64,
    ) -> Result<Option<SealedRow>, StoreError> {
        let sql = Self::conditional_sql(
            "refresh_token = $1, access_token = $2, access_token_expires_at = $3, \
             last_refresh_at = $4, state = 'active', last_error = NULL, \
             last_error_description = NULL, last_error_at = NULL, \
             failing_since = NULL, failing_reported = 0",
            4,
        );
        let q = sqlx::query(&sql)
            .bind(&t.refresh_token)
            .bind(&t.access_token)
            .bind(t.access_expires_at)
            .bind(_now);
        self.run_conditional("commit", q, holder, pool, id, expected)
            .await
    }

    pub(super) async fn mark_needs_reauthorization(
        &self,
        pool: &str,
        id: &str,
        expected: Option<&str>,
        holder: &str,
        e: &LastError,
    ) -> Result<Option<SealedRow>, StoreError> {
        let sql = Self::conditional_sql(
            "state = 'needs_reauthorization', access_token = NULL, \
             access_token_expires_at = NULL, last_error = $1, \
             last_error_description = $2, last_error_at = $3, \
             failing_since = NULL, failing_reported = 0",
            3,
        );
        let q = sqlx::query(&sql)
            .bind(&e.error)
            .bind(&e.description)
            .bind(e.at);
        self.run_conditional("record_failure", q, holder, pool, id, expected)
            .await
    }

    pub(super) async fn record_failure(
        &self,
        pool: &str,
        id: &str,
        expected: Option<&str>,
        holder: &str,
        e: &LastError,
        failing_after_ms: i64,
    ) -> Result<Option<SealedRow>, StoreError> {
        // Every SET expression sees the old row: the failures are reported
        // (once) when they have lasted `failing_after_ms`.
        let sql = Self::conditional_sql(
            "last_error = $1, last_error_description = $2, last_error_at = $3, \
             failing_since = COALESCE(failing_since, $3), \
             failing_reported = CASE WHEN failing_since IS NOT NULL \
                AND $3 - failing_since >= $4 THEN 1 ELSE failing_reported END",
            4,
        );
        let q = sqlx::query(&sql)
            .bind(&e.error)
            .bind(&e.description)
            .bind(e.at)
            .bind(failing_after_ms);
        self.run_conditional("record_failure", q, holder, pool, id, expected)
            .await
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
        let r = sqlx::query(
            "UPDATE connections SET refresh_token = $1, access_token = $2 \
             WHERE pool = $3 AND id = $4 AND refresh_token IS NOT DISTINCT FROM $5::TEXT \
             AND access_token IS NOT DISTINCT FROM $6::TEXT",
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
        let r = sqlx::query(
            "UPDATE connections SET id = $1, refresh_token = $2, access_token = $3, \
             lease_owner = NULL, lease_until = NULL \
             WHERE pool = $4 AND id = $5 AND refresh_token IS NOT DISTINCT FROM $6::TEXT \
             AND access_token IS NOT DISTINCT FROM $7::TEXT",
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

    pub(super) async fn release(
        &self,
        pool: &str,
        id: &str,
        holder: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE connections SET lease_owner = NULL, lease_until = NULL \
             WHERE pool = $1 AND id = $2 AND lease_owner = $3",
        )
        .bind(pool)
        .bind(id)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(unavailable("release"))?;
        Ok(())
    }

    /// Per-state counts as the trigger keeps them (no scan).
    pub(super) async fn counts(
        &self,
        pool: &str,
    ) -> Result<Vec<(ConnectionState, u64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, n FROM connection_counts WHERE pool = $1 AND n > 0")
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
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT pool FROM connections ORDER BY pool")
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable("pools"))?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}
