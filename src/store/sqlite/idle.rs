//! Idle refresh tokens on the SQLite backend (see `store/idle.rs`): both
//! queries are shaped to the `connections_idle` index (equality on pool
//! and state, the range and order on the same expression).

use super::{unavailable, Sqlite};
use crate::store::idle::{IdleConnection, IdleCursor};
use crate::store::StoreError;

/// The indexed expression, spelled exactly as in migration 0005 (SQLite
/// matches expression indexes textually).
const IDLE: &str = "COALESCE(last_refresh_at, authorized_at)";

impl Sqlite {
    pub(in crate::store) async fn idle_connections(
        &self,
        pool: &str,
        cutoff: i64,
        after: &IdleCursor,
        limit: u32,
    ) -> Result<Vec<IdleConnection>, StoreError> {
        self.check_file().await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(&idle_sql())
            .bind(pool)
            .bind(cutoff)
            .bind(after.idle_since)
            .bind(&after.id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable("idle"))?;
        Ok(rows
            .into_iter()
            .map(|(id, idle_since)| IdleConnection { id, idle_since })
            .collect())
    }

    pub(in crate::store) async fn oldest_idle(
        &self,
        pool: &str,
    ) -> Result<Option<i64>, StoreError> {
        self.check_file().await?;
        let row: Option<(i64,)> = sqlx::query_as(&oldest_sql())
            .bind(pool)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable("idle"))?;
        Ok(row.map(|r| r.0))
    }
}

fn idle_sql() -> String {
    format!(
        "SELECT id, {IDLE} FROM connections \
         WHERE pool = ? AND state = 'active' AND {IDLE} <= ? AND ({IDLE}, id) > (?, ?) \
         ORDER BY {IDLE}, id LIMIT ?"
    )
}

fn oldest_sql() -> String {
    format!(
        "SELECT {IDLE} FROM connections WHERE pool = ? AND state = 'active' \
         ORDER BY {IDLE} LIMIT 1"
    )
}

#[cfg(test)]
impl Sqlite {
    /// `EXPLAIN QUERY PLAN` of both queries, one line per step.
    pub(in crate::store) async fn idle_plans(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sql in [idle_sql(), oldest_sql()] {
            let plan = format!("EXPLAIN QUERY PLAN {sql}");
            let mut q = sqlx::query_as::<_, (i64, i64, i64, String)>(&plan).bind("users");
            if sql.contains("LIMIT ?") {
                q = q.bind(0_i64).bind(0_i64).bind("").bind(10_i64);
            }
            let rows = q.fetch_all(&self.pool).await.expect("plan");
            out.push(rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("; "));
        }
        out
    }
}
