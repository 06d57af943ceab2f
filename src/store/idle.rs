//! Idle refresh tokens (CONNECT.md, "Keeping connections alive"): the
//! active connections of a pool whose refresh token has not been used
//! since a cutoff, oldest first, and the age of the oldest unused one.
//! A refresh token was last used at `COALESCE(last_refresh_at,
//! authorized_at)` (an authorization sets `last_refresh_at` NULL); both
//! reads go through the `connections_idle` index (migration 0005), so
//! they cost an index seek, not a scan, whatever the table's size.
//!
//! What is done with them is `connections/keepalive.rs`'s.

use super::sql::run;
use super::{unavailable, Backend, Store, StoreError};

/// The indexed expression, spelled exactly as in migration 0005 (SQLite
/// matches expression indexes textually).
const IDLE: &str = "COALESCE(last_refresh_at, authorized_at)";

/// Candidates: equality on pool and state, then the range, row comparison
/// and order on the indexed expression and id (the `connections_idle`
/// index answers it without a sort on both backends).
pub(super) fn idle_sql() -> String {
    format!(
        "SELECT id, {IDLE} AS idle_since FROM connections \
         WHERE pool = ? AND state = 'active' AND {IDLE} <= ? AND ({IDLE}, id) > (?, ?) \
         ORDER BY {IDLE}, id LIMIT ?"
    )
}

/// The oldest unused refresh token's time: the index's first entry.
pub(super) fn oldest_sql() -> String {
    format!(
        "SELECT {IDLE} AS idle_since FROM connections WHERE pool = ? AND state = 'active' \
         ORDER BY {IDLE} LIMIT 1"
    )
}

/// One connection whose refresh token is unused since `idle_since`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct IdleConnection {
    /// Its id.
    pub id: String,
    /// Unix milliseconds: `COALESCE(last_refresh_at, authorized_at)`.
    pub idle_since: i64,
}

/// Where a page of [`Store::idle_connections`] starts: after this
/// connection, in `(idle_since, id)` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleCursor {
    /// The last page's last `idle_since`.
    pub idle_since: i64,
    /// The last page's last id.
    pub id: String,
}

impl IdleCursor {
    /// Before every connection (ids are never empty).
    pub fn start() -> IdleCursor {
        IdleCursor {
            idle_since: i64::MIN,
            id: String::new(),
        }
    }
}

impl Store {
    /// The active connections of `pool` whose refresh token was last used
    /// at or before `cutoff` (Unix ms), after `after`, oldest first, at
    /// most `limit`.
    pub async fn idle_connections(
        &self,
        pool: &str,
        cutoff: i64,
        after: &IdleCursor,
        limit: u32,
    ) -> Result<Vec<IdleConnection>, StoreError> {
        self.timed("idle_scan", async {
            run!(rows IdleConnection, self, "idle", idle_sql(),
                [pool, cutoff, after.idle_since, &after.id, i64::from(limit)])
        })
        .await
    }

    /// When the oldest unused refresh token among `pool`'s active
    /// connections was last used (Unix ms); `None` without any.
    pub async fn oldest_idle(&self, pool: &str) -> Result<Option<i64>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Oldest {
            idle_since: i64,
        }
        self.timed("idle_oldest", async {
            let rows = run!(rows Oldest, self, "idle", oldest_sql(), [pool])?;
            Ok(rows.first().map(|r| r.idle_since))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{StoreConfig, StoreLocation};
    use crate::ground::metrics::Metrics;
    use crate::ground::secret::Secret;
    use crate::store::{ConnectionState, Tokens};

    async fn sqlite_store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("flinks-idle-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = StoreConfig {
            location: StoreLocation::Sqlite(dir.join("c.db")),
            key: Secret::new(crate::ground::crypto::generate_key().unwrap()),
            old_keys: vec![],
            max_connections: 1,
        };
        (
            Store::open(&config, Metrics::new().store()).await.unwrap(),
            dir,
        )
    }

    fn tokens() -> Tokens {
        Tokens {
            refresh_token: Some(Secret::new("rt".to_owned())),
            access_token: None,
            access_expires_at: None,
        }
    }

    /// Writes a row's times (and state) behind the store's back.
    async fn set(store: &Store, id: &str, authorized: i64, refreshed: Option<i64>, state: &str) {
        let Backend::Sqlite(b) = &store.backend else {
            panic!("sqlite")
        };
        sqlx::query(
            "UPDATE connections SET authorized_at = ?, last_refresh_at = ?, state = ? \
             WHERE pool = 'users' AND id = ?",
        )
        .bind(authorized)
        .bind(refreshed)
        .bind(state)
        .bind(id)
        .execute(b.pool())
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn idle_connections_are_the_active_ones_unused_since_the_cutoff_oldest_first() {
        let (store, dir) = sqlite_store().await;
        for id in ["a", "b", "c", "d", "e"] {
            store.authorize("users", id, None, &tokens()).await.unwrap();
        }
        store
            .authorize("other", "x", None, &tokens())
            .await
            .unwrap();
        // a: authorized long ago, refreshed recently (not idle); b: never
        // refreshed, oldest; c: refreshed long ago; d: idle but needs
        // reauthorization; e: fresh.
        set(&store, "a", 100, Some(9_000), "active").await;
        set(&store, "b", 200, None, "active").await;
        set(&store, "c", 100, Some(300), "active").await;
        set(&store, "d", 50, None, "needs_reauthorization").await;
        let ids = |v: Vec<IdleConnection>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
        let all = store
            .idle_connections("users", 1_000, &IdleCursor::start(), 10)
            .await
            .unwrap();
        assert_eq!(
            all,
            vec![
                IdleConnection {
                    id: "b".into(),
                    idle_since: 200
                },
                IdleConnection {
                    id: "c".into(),
                    idle_since: 300
                },
            ]
        );
        // Keyset pages.
        let first = store
            .idle_connections("users", 1_000, &IdleCursor::start(), 1)
            .await
            .unwrap();
        assert_eq!(ids(first.clone()), ["b"]);
        let after = IdleCursor {
            idle_since: first[0].idle_since,
            id: first[0].id.clone(),
        };
        let next = store
            .idle_connections("users", 1_000, &after, 1)
            .await
            .unwrap();
        assert_eq!(ids(next), ["c"]);
        // The oldest unused refresh token of an active connection.
        assert_eq!(store.oldest_idle("users").await.unwrap(), Some(200));
        assert_eq!(store.oldest_idle("nobody").await.unwrap(), None);
        let state = store.get("users", "d").await.unwrap().unwrap().info.state;
        assert_eq!(state, ConnectionState::NeedsReauthorization);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn both_idle_queries_are_answered_from_the_index() {
        let (store, dir) = sqlite_store().await;
        let Backend::Sqlite(b) = &store.backend else {
            panic!("sqlite")
        };
        for sql in [idle_sql(), oldest_sql()] {
            let plan = b.plan(&sql).await;
            assert!(plan.contains("USING INDEX connections_idle"), "{plan}");
            assert!(!plan.contains("TEMP B-TREE"), "sorted by the index: {plan}");
        }
        std::fs::remove_dir_all(dir).ok();
    }
}
