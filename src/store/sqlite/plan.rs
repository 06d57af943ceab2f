//! SQLite query plans, for the tests that the store's reads are answered
//! from their indexes (`store/idle.rs`: `connections_idle`;
//! `store/outbox.rs`: `webhook_events_listed`) without a sort.

use super::Sqlite;

impl Sqlite {
    /// `EXPLAIN QUERY PLAN` of `sql`, its steps joined by `; `. The
    /// parameters stay unbound: a plan does not depend on their values.
    pub(in crate::store) async fn plan(&self, sql: &str) -> String {
        let plan = format!("EXPLAIN QUERY PLAN {sql}");
        let rows = sqlx::query_as::<_, (i64, i64, i64, String)>(&plan)
            .fetch_all(&self.pool)
            .await
            .expect("plan");
        rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("; ")
    }
}
