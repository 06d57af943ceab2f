//! The SQLite query plans of `store/idle.rs`'s queries, for its test that
//! they use the `connections_idle` index without a sort.

use super::Sqlite;
use crate::store::idle::{idle_sql, oldest_sql};

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
