//! Idle refresh tokens on the PostgreSQL backend (see `store/idle.rs`):
//! both queries are shaped to the `connections_idle` expression index
//! (equality on pool and state, the range, row comparison and order on the
//! same expression and id).

use super::{unavailable, Postgres};
use crate::store::idle::{IdleConnection, IdleCursor};
use crate::store::StoreError;

/// The indexed expression, as in migration 0005.
const IDLE: &str = "COALESCE(last_refresh_at, authorized_at)";

impl Postgres {
    pub(in crate::store) async fn idle_connections(
        &self,
        pool: &str,
        cutoff: i64,
        after: &IdleCursor,
        limit: u32,
    ) -> Result<Vec<IdleConnection>, StoreError> {
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
         WHERE pool = $1 AND state = 'active' AND {IDLE} <= $2 AND ({IDLE}, id) > ($3, $4) \
         ORDER BY {IDLE}, id LIMIT $5"
    )
}

fn oldest_sql() -> String {
    format!(
        "SELECT {IDLE} FROM connections WHERE pool = $1 AND state = 'active' \
         ORDER BY {IDLE} LIMIT 1"
    )
}
