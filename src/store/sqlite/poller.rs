//! The SQLite backend's change-log poller: what tells a serving process
//! about changes another process (a CLI command) made.

use sqlx::sqlite::SqlitePool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::Sqlite;
use crate::store::{Change, CHANGE_POLL};

/// Change-log rows kept behind the newest one read (older ones are pruned).
const CHANGES_KEPT: i64 = 10_000;
/// Changes read per poll.
const CHANGES_PER_POLL: i64 = 1_000;

impl Sqlite {
    /// What listens for changes other processes made (a CLI command): the
    /// change log the triggers keep, read every [`CHANGE_POLL`].
    pub(in crate::store) fn poller(&self) -> Poller {
        Poller {
            pool: self.pool.clone(),
        }
    }
}

/// Reads the change log the triggers of `0002_changes_and_counts.sql` keep.
pub(in crate::store) struct Poller {
    pool: SqlitePool,
}

impl Poller {
    /// Polls until `cancel`: every change after the newest one present at
    /// the start becomes a [`Change`]. Old rows are pruned now and then.
    pub(in crate::store) async fn listen(
        self,
        tx: broadcast::Sender<Change>,
        cancel: CancellationToken,
    ) {
        let mut last: Option<i64> = None;
        let mut polls = 0u32;
        loop {
            match self.poll(&mut last, &tx).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the store's change log; trying again")
                }
            }
            polls = polls.wrapping_add(1);
            if polls % 60 == 0 {
                if let Some(seen) = last {
                    let _ = sqlx::query("DELETE FROM connection_changes WHERE seq <= ?")
                        .bind(seen.saturating_sub(CHANGES_KEPT))
                        .execute(&self.pool)
                        .await;
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(CHANGE_POLL) => {}
            }
        }
    }

    async fn poll(
        &self,
        last: &mut Option<i64>,
        tx: &broadcast::Sender<Change>,
    ) -> Result<(), sqlx::Error> {
        let Some(from) = *last else {
            let (max,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM connection_changes")
                .fetch_one(&self.pool)
                .await?;
            *last = Some(max.unwrap_or(0));
            return Ok(());
        };
        let rows: Vec<(i64, String, String, String, String)> = sqlx::query_as(
            "SELECT seq, pool, id, event, holder FROM connection_changes \
             WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(from)
        .bind(CHANGES_PER_POLL)
        .fetch_all(&self.pool)
        .await?;
        for (seq, pool, id, event, holder) in rows {
            if let Some(c) = Change::of_row(pool, id, &event, holder) {
                let _ = tx.send(c);
            }
            *last = Some(seq);
        }
        Ok(())
    }
}
