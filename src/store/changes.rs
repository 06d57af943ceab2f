//! Change notifications: what a store announces when a connection changes
//! ([`Change`], made from the backends' change-log rows `pool, id, event,
//! holder`), and how a [`Store`] hands them to subscribers. The readers
//! themselves are the backends' (PostgreSQL's change feed, SQLite's
//! change-log poller); this file only wires them to the channel.

use std::time::Duration;

use tokio::sync::broadcast;

use super::{Backend, Store};

/// How often a process reads the store's change log (SQLite) or feed
/// (PostgreSQL) for what other processes changed.
pub const CHANGE_POLL: Duration = Duration::from_secs(1);

/// Changes buffered per subscriber; one that falls further behind gets
/// [`Change::All`] semantics (`Lagged`).
pub(super) const CHANGE_BUFFER: usize = 4096;

/// What happened to a connection, as another replica (or this one) wrote
/// it to a shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Inserted.
    Created,
    /// Authorized again (new tokens, active).
    Reauthorized,
    /// Turned `needs_reauthorization` (its tokens erased).
    NeedsReauthorization,
    /// New tokens committed by a refresh.
    Refreshed,
    /// Deleted.
    Deleted,
}

impl ChangeKind {
    /// The event name the migrations' triggers write.
    pub fn parse(event: &str) -> Option<ChangeKind> {
        Some(match event {
            "created" => ChangeKind::Created,
            "reauthorized" => ChangeKind::Reauthorized,
            "needs_reauthorization" => ChangeKind::NeedsReauthorization,
            "refreshed" => ChangeKind::Refreshed,
            "deleted" => ChangeKind::Deleted,
            _ => return None,
        })
    }
}

/// A change announced by a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Changes may have been missed (the feed could not account for what
    /// it skipped, or a subscriber lagged):
    /// everything in memory must be checked again.
    All,
    /// One connection changed.
    Connection {
        /// Its pool.
        pool: String,
        /// Its id.
        id: String,
        /// What happened.
        kind: ChangeKind,
        /// The process that made it: for `Refreshed` the lease holder that
        /// committed it, else (PostgreSQL) the writing session's; empty
        /// when unknown.
        holder: String,
    },
}

impl Change {
    /// A row of a change log or feed (`None` for an unknown event).
    pub fn of_row(pool: String, id: String, event: &str, holder: String) -> Option<Change> {
        Some(Change::Connection {
            pool,
            id,
            kind: ChangeKind::parse(event)?,
            holder,
        })
    }

    /// Parses the text form `pool/id/event/holder` (tests).
    #[cfg(test)]
    pub fn parse(payload: &str) -> Option<Change> {
        let mut parts = payload.splitn(4, '/');
        let (pool, id, event) = (parts.next()?, parts.next()?, parts.next()?);
        let holder = parts.next().unwrap_or("").to_owned();
        Change::of_row(pool.to_owned(), id.to_owned(), event, holder)
    }
}

impl Store {
    /// Changes to connections as the store announces them (nothing for
    /// SQLite, which one process owns).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Starts following changes made by other processes until the store is
    /// dropped: PostgreSQL's change feed, SQLite's change log. Either way a
    /// change reaches every process within [`CHANGE_POLL`] plus one read
    /// (PostgreSQL's doorbell makes it sooner).
    pub fn spawn_listener(&self) {
        let (tx, cancel) = (self.changes.clone(), self.cancel.clone());
        // The tasks do not keep the store alive: they read through their
        // own connections and stop when the store is dropped.
        match &self.backend {
            Backend::Postgres(pg) => {
                tokio::spawn(pg.feed().follow(tx, cancel, self.metrics.clone()));
            }
            Backend::Sqlite(sqlite) => {
                tokio::spawn(sqlite.poller().listen(tx, cancel));
            }
        }
    }
}
