//! Leases on the SQLite backend: taking one, the writes that hold only
//! while the refresh token read is still there (each frees this holder's
//! lease), and giving one back.

use super::{unavailable, Sqlite, COLUMNS};
use crate::store::{sealed_row, LastError, SealedRow, SealedTokens, StoreError, Took};

impl Sqlite {
    /// `(taken, row)`, or `None` when there is no such row.
    pub(in crate::store) async fn lease(
        &self,
        pool: &str,
        id: &str,
        holder: &str,
        now: i64,
        ttl_ms: i64,
    ) -> Result<Option<(Took, SealedRow)>, StoreError> {
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
        // One serving process per file (a killed one's leases are freed
        // at the next start): a lease is never taken over from a live one.
        if let Some(row) = taken {
            return Ok(Some((Took::Free, sealed_row(&row)?)));
        }
        Ok(self.get(pool, id).await?.map(|row| (Took::Busy, row)))
    }

    /// `UPDATE connections SET {set}, <this holder's lease freed> WHERE
    /// <the row> AND <its refresh token is the expected one> RETURNING
    /// <the row>`: [`Sqlite::run_conditional`] binds the rest.
    fn conditional_sql(set: &str) -> String {
        // Every SET expression sees the old row, so both CASEs read the
        // old lease owner.
        format!(
            "UPDATE connections SET {set}, \
             lease_until = CASE WHEN lease_owner = ? THEN NULL ELSE lease_until END, \
             lease_owner = CASE WHEN lease_owner = ? THEN NULL ELSE lease_owner END \
             WHERE pool = ? AND id = ? AND refresh_token IS ? RETURNING {COLUMNS}"
        )
    }

    async fn run_conditional<'q>(
        &self,
        op: &'static str,
        q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
        holder: &'q str,
        pool: &'q str,
        id: &'q str,
        expected: Option<&'q str>,
    ) -> Result<Option<SealedRow>, StoreError> {
        self.check_file().await?;
        q.bind(holder)
            .bind(holder)
            .bind(pool)
            .bind(id)
            .bind(expected)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable(op))?
            .map(|r| sealed_row(&r))
            .transpose()
    }

    pub(in crate::store) async fn commit_refresh(
        &self,
        pool: &str,
        id: &str,
        expected: Option<&str>,
        holder: &str,
        t: &SealedTokens,
        now: i64,
    ) -> Result<Option<SealedRow>, StoreError> {
        let sql = Self::conditional_sql(
            "refresh_token = ?, access_token = ?, access_token_expires_at = ?, \
             last_refresh_at = ?, state = 'active', last_error = NULL, \
             last_error_description = NULL, last_error_at = NULL, \
             failing_since = NULL, failing_reported = 0",
        );
        let q = sqlx::query(&sql)
            .bind(&t.refresh_token)
            .bind(&t.access_token)
            .bind(t.access_expires_at)
            .bind(now);
        self.run_conditional("commit", q, holder, pool, id, expected)
            .await
    }

    pub(in crate::store) async fn mark_needs_reauthorization(
        &self,
        pool: &str,
        id: &str,
        expected: Option<&str>,
        holder: &str,
        e: &LastError,
    ) -> Result<Option<SealedRow>, StoreError> {
        let sql = Self::conditional_sql(
            "state = 'needs_reauthorization', access_token = NULL, \
             access_token_expires_at = NULL, last_error = ?, \
             last_error_description = ?, last_error_at = ?, \
             failing_since = NULL, failing_reported = 0",
        );
        let q = sqlx::query(&sql)
            .bind(&e.error)
            .bind(&e.description)
            .bind(e.at);
        self.run_conditional("record_failure", q, holder, pool, id, expected)
            .await
    }

    pub(in crate::store) async fn record_failure(
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
            "last_error = ?, last_error_description = ?, last_error_at = ?, \
             failing_since = COALESCE(failing_since, ?), \
             failing_reported = CASE WHEN failing_since IS NOT NULL \
                AND ? - failing_since >= ? THEN 1 ELSE failing_reported END",
        );
        let q = sqlx::query(&sql)
            .bind(&e.error)
            .bind(&e.description)
            .bind(e.at)
            .bind(e.at)
            .bind(e.at)
            .bind(failing_after_ms);
        self.run_conditional("record_failure", q, holder, pool, id, expected)
            .await
    }

    pub(in crate::store) async fn release(
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
}
