//! Group commit on the SQLite backend: the writes of refreshes (leases,
//! commits, failures, releases) queue for one writer task, which runs every
//! write waiting into one transaction. A commit is one fsync of the WAL, so
//! 5,000 refreshes at a cold start cost a few hundred fsyncs rather than
//! 10,000 in a row. Nothing is answered before its group's `COMMIT`
//! returns: a rotated refresh token is durable before its access token is
//! used, as with a commit of its own. A group adds no wait: the writer
//! takes what queued while the previous group was being written.
//!
//! One statement failing fails only its own write (SQLite rolls back the
//! statement, not the transaction); a failing `COMMIT` fails every write
//! of the group, and none of them was made.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::store::{sealed_row, SealedRow, StoreError};

/// At most this many writes per transaction.
const MAX_GROUP: usize = 256;
/// Writes waiting beyond this make their callers wait to queue.
const QUEUE: usize = 4_096;

/// A value bound to a statement.
pub(in crate::store) enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
}

impl From<&str> for Arg {
    fn from(s: &str) -> Arg {
        Arg::Text(Some(s.to_owned()))
    }
}

impl From<Option<&str>> for Arg {
    fn from(s: Option<&str>) -> Arg {
        Arg::Text(s.map(str::to_owned))
    }
}

impl From<i64> for Arg {
    fn from(n: i64) -> Arg {
        Arg::Int(Some(n))
    }
}

impl From<Option<i64>> for Arg {
    fn from(n: Option<i64>) -> Arg {
        Arg::Int(n)
    }
}

/// One write: a statement (`RETURNING` the row, or nothing) and its values.
pub(in crate::store) struct Write {
    pub(in crate::store) op: &'static str,
    pub(in crate::store) sql: String,
    pub(in crate::store) args: Vec<Arg>,
}

struct Job {
    write: Write,
    answer: oneshot::Sender<Result<Option<SealedRow>, StoreError>>,
}

/// The queue in front of the writer task.
pub(in crate::store) struct Group {
    queue: mpsc::Sender<Job>,
    /// Transactions written (groups of one included).
    #[cfg(test)]
    groups: Arc<AtomicU64>,
    /// Writes handed to the writer (queued or taken).
    #[cfg(test)]
    sent: AtomicU64,
}

impl Group {
    /// Starts the writer task on `pool`; it ends when the group is dropped.
    pub(in crate::store) fn start(pool: SqlitePool) -> Group {
        let (queue, rx) = mpsc::channel(QUEUE);
        let groups = Arc::new(AtomicU64::new(0));
        tokio::spawn(writer(pool, rx, Arc::clone(&groups)));
        #[cfg(not(test))]
        drop(groups);
        Group {
            queue,
            #[cfg(test)]
            groups,
            #[cfg(test)]
            sent: AtomicU64::new(0),
        }
    }

    /// Runs `write` in the next group; answers once that group committed.
    pub(in crate::store) async fn write(
        &self,
        write: Write,
    ) -> Result<Option<SealedRow>, StoreError> {
        let op = write.op;
        let (answer, answered) = oneshot::channel();
        let gone = || StoreError::Unavailable {
            op,
            source: sqlx::Error::PoolClosed,
        };
        self.queue
            .send(Job { write, answer })
            .await
            .map_err(|_| gone())?;
        #[cfg(test)]
        self.sent.fetch_add(1, Ordering::Relaxed);
        answered.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Transactions written so far.
    #[cfg(test)]
    pub(in crate::store) fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }

    /// Writes handed to the writer so far.
    #[cfg(test)]
    pub(in crate::store) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

async fn writer(pool: SqlitePool, mut rx: mpsc::Receiver<Job>, groups: Arc<AtomicU64>) {
    let mut jobs = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut jobs, MAX_GROUP).await > 0 {
        let answers = run(&pool, &jobs).await;
        groups.fetch_add(1, Ordering::Relaxed);
        for (job, answer) in jobs.drain(..).zip(answers) {
            let _ = job.answer.send(answer);
        }
    }
}

/// One transaction for `jobs`: each write's own outcome, or every write's
/// failure when the transaction could not be begun or committed.
async fn run(pool: &SqlitePool, jobs: &[Job]) -> Vec<Result<Option<SealedRow>, StoreError>> {
    let failed = |e: &sqlx::Error| -> Vec<_> {
        jobs.iter()
            .map(|j| {
                Err(StoreError::Unavailable {
                    op: j.write.op,
                    source: sqlx::Error::Protocol(format!("group commit: {e}")),
                })
            })
            .collect()
    };
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    // A write alone is a transaction of its own.
    if let [job] = jobs {
        return vec![one(&mut conn, &job.write).await];
    }
    let mut tx = match conn.begin().await {
        Ok(tx) => tx,
        Err(e) => return failed(&e),
    };
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        answers.push(one(&mut tx, &job.write).await);
    }
    match tx.commit().await {
        Ok(()) => answers,
        Err(e) => failed(&e),
    }
}

/// Runs one write's statement on `conn`.
async fn one(conn: &mut SqliteConnection, w: &Write) -> Result<Option<SealedRow>, StoreError> {
    let mut q = sqlx::query(&w.sql);
    for a in &w.args {
        q = match a {
            Arg::Text(t) => q.bind(t.as_deref()),
            Arg::Int(n) => q.bind(*n),
        };
    }
    match q.fetch_optional(&mut *conn).await {
        Ok(row) => row.map(|r| sealed_row(&r)).transpose(),
        Err(source) => Err(StoreError::Unavailable { op: w.op, source }),
    }
}
