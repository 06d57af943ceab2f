//! The PostgreSQL change feed (migration 0007): each replica reads "changes
//! since N" from `connection_changes` every [`CHANGE_POLL`], and at once
//! when the doorbell (`LISTEN`) rings, and turns the rows into
//! [`Change`]s. One query per replica per interval, whatever the number of
//! users.
//!
//! Sequence numbers are drawn when a change is written and become visible
//! when its transaction commits, so commits can reveal them out of order
//! (10 drawn first, 11 committed first). The [`Cursor`] keeps every number
//! it skipped as a hole and asks for the holes again with each read, for
//! [`HOLE_HORIZON`]: a transaction that commits within that of writing its
//! change is seen (the store's own writes are single statements). A number
//! whose transaction rolled back stays a hole until then.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ACQUIRE_TIMEOUT, CHANNEL, LISTEN_BACKOFF_MAX};
use crate::ground::lock;
use crate::ground::metrics::StoreMetrics;
use crate::store::{Change, CHANGE_POLL};

/// Reads of one replica are at least this far apart (at most 20 a second,
/// whatever the fleet's change rate); a full page is read on at once.
const READ_GAP: Duration = Duration::from_millis(50);
/// Rows read per query; a full page is followed at once by the next.
const PAGE: i64 = 1_000;
/// How long a skipped sequence number is asked for again.
pub(in crate::store) const HOLE_HORIZON: Duration = Duration::from_secs(120);
/// More holes than this (or a jump of more than this) and the cursor gives
/// up tracking them: everything in memory is checked again instead.
const MAX_HOLES: i64 = 10_000;
/// At start, the numbers skipped over the last this many seconds of the
/// feed are holes (transactions in flight while the replica starts).
const START_WINDOW_S: i64 = 10;
/// Rows older than this are pruned (by any replica, every [`PRUNE_EVERY`]).
const RETENTION_S: i64 = 600;
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// A replica that could not read the feed for this long may have missed
/// pruned rows: everything in memory is checked again.
const FEED_LOST: Duration = Duration::from_secs(300);

/// Where a replica is in the feed: the newest number read, and the older
/// numbers not seen yet (with when they were first missed).
#[derive(Debug, Default)]
pub(in crate::store) struct Cursor {
    last: i64,
    holes: BTreeMap<i64, Instant>,
}

/// What [`Cursor::take`] made of a row.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::store) enum Taken {
    /// Not seen before: apply it.
    New,
    /// Seen already (a hole asked for again and answered twice).
    Seen,
    /// New, after a jump too large to track: apply it, and check
    /// everything in memory again.
    Overflow,
}

impl Cursor {
    /// A cursor after `last`, with the numbers missing among `recent` (the
    /// numbers visible in the last few seconds, ascending) as holes.
    pub(in crate::store) fn start(last: i64, recent: &[i64], now: Instant) -> Cursor {
        let mut c = Cursor {
            last: recent.first().map_or(last, |f| f.saturating_sub(1)),
            holes: BTreeMap::new(),
        };
        for &seq in recent {
            c.take(seq, now);
        }
        c.last = c.last.max(last);
        c
    }

    /// Takes a row's number, in the order a read returns them.
    pub(in crate::store) fn take(&mut self, seq: i64, now: Instant) -> Taken {
        if self.holes.remove(&seq).is_some() {
            return Taken::New;
        }
        if seq <= self.last {
            return Taken::Seen;
        }
        let skipped = seq - self.last - 1;
        let overflow = skipped > MAX_HOLES || self.holes.len() as i64 + skipped > MAX_HOLES;
        if overflow {
            self.holes.clear();
        } else {
            for h in self.last + 1..seq {
                self.holes.insert(h, now);
            }
        }
        self.last = seq;
        if overflow {
            Taken::Overflow
        } else {
            Taken::New
        }
    }

    /// Forgets holes older than [`HOLE_HORIZON`].
    pub(in crate::store) fn expire(&mut self, now: Instant) {
        self.holes
            .retain(|_, since| now.saturating_duration_since(*since) < HOLE_HORIZON);
    }

    /// The numbers to ask for again.
    pub(in crate::store) fn holes(&self) -> Vec<i64> {
        self.holes.keys().copied().collect()
    }

    /// The newest number read.
    pub(in crate::store) fn last(&self) -> i64 {
        self.last
    }
}

/// Follows the feed: the doorbell on one connection, the reads on another.
pub(in crate::store) struct Feed {
    pub(super) options: PgConnectOptions,
    /// Where [`super::Postgres::init`] leaves the cursor it placed before
    /// the store served anything.
    pub(super) start: Arc<Mutex<Option<Cursor>>>,
}

impl Feed {
    /// Reads the feed until `cancel`, sending what changed to `tx`, from
    /// the cursor the store's initialisation placed (nothing is read from
    /// the store before: nothing cached can predate it). It sends
    /// [`Change::All`] when it cannot know what it missed: after a jump it
    /// could not track, after being unable to read for [`FEED_LOST`], and
    /// when the store's numbers went back.
    pub(in crate::store) async fn follow(
        self,
        tx: broadcast::Sender<Change>,
        cancel: CancellationToken,
        metrics: StoreMetrics,
    ) {
        let own = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(self.options);
        let bell = Arc::new(Notify::new());
        tokio::spawn(doorbell(own.clone(), Arc::clone(&bell), cancel.clone()));
        let mut cursor: Option<Cursor> = None;
        let mut read_at = Instant::now();
        let mut pruned_at = Instant::now();
        loop {
            let now = Instant::now();
            if cursor.is_none() {
                cursor = lock(&self.start).take();
            }
            let Some(c) = cursor.as_mut() else {
                // The store is not initialised yet.
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(READ_GAP) => {}
                }
                read_at = Instant::now();
                continue;
            };
            let r = tokio::select! {
                () = cancel.cancelled() => return,
                r = read(&own, c, &tx) => r,
            };
            // As `op="changes"` of the store's operations: a feed that
            // cannot be read shows as errors there.
            metrics.observe("changes", r.is_ok(), now.elapsed());
            match r {
                Ok(full) => {
                    if now.saturating_duration_since(read_at) >= FEED_LOST {
                        let _ = tx.send(Change::All);
                    }
                    read_at = now;
                    if full {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the store's change feed; trying again")
                }
            }
            if now.saturating_duration_since(pruned_at) >= PRUNE_EVERY {
                pruned_at = now;
                let pruned = sqlx::query(
                    "DELETE FROM connection_changes \
                     WHERE at < clock_timestamp() - make_interval(secs => $1)",
                )
                .bind(RETENTION_S as f64)
                .execute(&own)
                .await;
                if let Err(e) = pruned {
                    tracing::debug!(error = %e, "cannot prune the store's change feed");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = bell.notified() => {}
                () = tokio::time::sleep(CHANGE_POLL) => {}
            }
            // A busy fleet rings all the time: one read gathers what rang
            // within READ_GAP, so reads per second stay bounded.
            if let Some(wait) = now.checked_add(READ_GAP) {
                tokio::time::sleep_until(wait).await;
            }
        }
    }
}

type Row = (i64, String, String, String, String);

/// A cursor after the newest change, with the numbers skipped over the
/// last [`START_WINDOW_S`] as holes (transactions still in flight).
pub(in crate::store) async fn start(db: &PgPool, now: Instant) -> Result<Cursor, sqlx::Error> {
    let max = newest(db).await?;
    let recent: Vec<(i64,)> = sqlx::query_as(
        "SELECT seq FROM connection_changes \
         WHERE at > clock_timestamp() - make_interval(secs => $1) ORDER BY seq",
    )
    .bind(START_WINDOW_S as f64)
    .fetch_all(db)
    .await?;
    let recent: Vec<i64> = recent.into_iter().map(|r| r.0).collect();
    Ok(Cursor::start(max, &recent, now))
}

/// The newest number in the feed (0 for none).
async fn newest(db: &PgPool) -> Result<i64, sqlx::Error> {
    let (max,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM connection_changes")
        .fetch_one(db)
        .await?;
    Ok(max.unwrap_or(0))
}

/// One read of the feed; `true` when a full page came back (read again at
/// once). A store whose numbers went back (restored from an older backup)
/// gets a new cursor at its newest, and everything in memory is checked.
async fn read(
    db: &PgPool,
    c: &mut Cursor,
    tx: &broadcast::Sender<Change>,
) -> Result<bool, sqlx::Error> {
    let now = Instant::now();
    c.expire(now);
    let rows: Vec<Row> = sqlx::query_as(
        "(SELECT seq, pool, id, event, holder FROM connection_changes \
          WHERE seq > $1 ORDER BY seq LIMIT $2) \
         UNION ALL \
         (SELECT seq, pool, id, event, holder FROM connection_changes WHERE seq = ANY($3))",
    )
    .bind(c.last())
    .bind(PAGE)
    .bind(c.holes())
    .fetch_all(db)
    .await?;
    let mut after = 0i64;
    for (seq, pool, id, event, holder) in rows {
        if seq > c.last() {
            after += 1;
        }
        let taken = c.take(seq, now);
        if taken == Taken::Seen {
            continue;
        }
        if let Some(change) = Change::of_row(pool, id, &event, holder) {
            let _ = tx.send(change);
        }
        if taken == Taken::Overflow {
            let _ = tx.send(Change::All);
        }
    }
    if after == 0 && newest(db).await? < c.last() {
        *c = start(db, now).await?;
        let _ = tx.send(Change::All);
    }
    Ok(after >= PAGE)
}

/// Rings `bell` at every notification on [`CHANNEL`], reconnecting with
/// backoff (and ringing after every reconnection: what was announced
/// meanwhile is in the feed).
async fn doorbell(db: PgPool, bell: Arc<Notify>, cancel: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        let run = async {
            let mut listener = PgListener::connect_with(&db).await?;
            listener.listen(CHANNEL).await?;
            bell.notify_one();
            tracing::debug!("listening for store changes");
            while listener.try_recv().await?.is_some() {
                bell.notify_one();
            }
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            r = run => {
                bell.notify_one();
                match r {
                    Ok(()) => delay = Duration::from_millis(100),
                    Err(e) => tracing::debug!(error = %e, "store listener lost; reconnecting"),
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(LISTEN_BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_revealed_out_of_order_are_each_taken_once() {
        let now = Instant::now();
        let mut c = Cursor::start(9, &[], now);
        // 10 drawn first, 11 committed first.
        assert_eq!(c.take(11, now), Taken::New);
        assert_eq!(c.holes(), vec![10]);
        assert_eq!(c.take(10, now), Taken::New);
        assert_eq!(c.holes(), Vec::<i64>::new());
        assert_eq!(c.take(10, now), Taken::Seen);
        assert_eq!(c.take(11, now), Taken::Seen);
        assert_eq!(c.last(), 11);
    }

    #[test]
    fn holes_are_asked_for_until_the_horizon() {
        let now = Instant::now();
        let mut c = Cursor::start(0, &[], now);
        c.take(3, now);
        assert_eq!(c.holes(), vec![1, 2]);
        c.expire(now + HOLE_HORIZON / 2);
        assert_eq!(c.holes(), vec![1, 2]);
        c.expire(now + HOLE_HORIZON);
        assert!(c.holes().is_empty());
    }

    #[test]
    fn a_start_keeps_what_recent_commits_skipped() {
        let now = Instant::now();
        // 5 and 7 are in flight (or rolled back) while the replica starts.
        let c = Cursor::start(8, &[4, 6, 8], now);
        assert_eq!(c.holes(), vec![5, 7]);
        assert_eq!(c.last(), 8);
        let c = Cursor::start(42, &[], now);
        assert_eq!((c.last(), c.holes()), (42, vec![]));
    }

    #[test]
    fn a_jump_too_large_to_track_says_so() {
        let now = Instant::now();
        let mut c = Cursor::start(0, &[], now);
        assert_eq!(c.take(MAX_HOLES + 2, now), Taken::Overflow);
        assert!(c.holes().is_empty());
        assert_eq!(c.take(MAX_HOLES + 3, now), Taken::New);
    }
}
