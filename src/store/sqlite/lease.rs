//! Leases on the SQLite backend: taking one, the writes that hold only
//! while the refresh token read is still there (each frees this holder's
//! lease), and giving one back. All of them go through the group commit
//! (`group.rs`).

use super::group::{Arg, Write};
use super::{Sqlite, COLUMNS};
use crate::store::{LastError, SealedRow, SealedTokens, StoreError, Took};

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
        let args = vec![
            holder.into(),
            now.saturating_add(ttl_ms).into(),
            pool.into(),
            id.into(),
            holder.into(),
            now.into(),
        ];
        let taken = self.write("lease", sql, args).await?;
        // One serving process per file (a killed one's leases are freed
        // at the next start): a lease is never taken over from a live one.
        if let Some(row) = taken {
            return Ok(Some((Took::Free, row)));
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

    #[allow(clippy::too_many_arguments)]
    async fn run_conditional(
        &self,
        op: &'static str,
        sql: String,
        mut args: Vec<Arg>,
        holder: &str,
        pool: &str,
        id: &str,
        expected: Option<&str>,
    ) -> Result<Option<SealedRow>, StoreError> {
        self.check_file().await?;
        args.extend([
            holder.into(),
            holder.into(),
            pool.into(),
            id.into(),
            expected.into(),
        ]);
        self.write(op, sql, args).await
    }

    /// A write through the group commit.
    async fn write(
        &self,
        op: &'static str,
        sql: String,
        args: Vec<Arg>,
    ) -> Result<Option<SealedRow>, StoreError> {
        self.group.write(Write { op, sql, args }).await
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
        let args = vec![
            t.refresh_token.as_deref().into(),
            t.access_token.as_deref().into(),
            t.access_expires_at.into(),
            now.into(),
        ];
        self.run_conditional("commit", sql, args, holder, pool, id, expected)
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
        let args = vec![
            e.error.as_str().into(),
            e.description.as_deref().into(),
            e.at.into(),
        ];
        self.run_conditional("record_failure", sql, args, holder, pool, id, expected)
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
        let args = vec![
            e.error.as_str().into(),
            e.description.as_deref().into(),
            e.at.into(),
            e.at.into(),
            e.at.into(),
            failing_after_ms.into(),
        ];
        self.run_conditional("record_failure", sql, args, holder, pool, id, expected)
            .await
    }

    pub(in crate::store) async fn release(
        &self,
        pool: &str,
        id: &str,
        holder: &str,
    ) -> Result<(), StoreError> {
        self.check_file().await?;
        let sql = "UPDATE connections SET lease_owner = NULL, lease_until = NULL \
                   WHERE pool = ? AND id = ? AND lease_owner = ?";
        let args = vec![pool.into(), id.into(), holder.into()];
        self.write("release", sql.to_owned(), args).await?;
        Ok(())
    }
}
