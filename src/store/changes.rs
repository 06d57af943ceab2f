//! Change notifications: what a shared store announces when a connection
//! changes ([`Change`], parsed from the backends' `pool/id/event/holder`
//! payloads), and how a [`Store`] hands them to subscribers. The
//! listeners themselves are the backends' (PostgreSQL's `LISTEN`,
//! SQLite's change-log poller); this file only wires them to the channel.

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
    /// Changes may have been missed (the listener (re)connected or lagged):
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
        /// For `Refreshed`: the lease holder that committed it.
        holder: String,
    },
}

impl Change {
    /// Parses a notification payload, `pool/id/event/holder`.
    pub fn parse(payload: &str) -> Option<Change> {
        let mut parts = payload.splitn(4, '/');
        let (pool, id, event) = (parts.next()?, parts.next()?, parts.next()?);
        let kind = ChangeKind::parse(event)?;
        Some(Change::Connection {
            pool: pool.to_owned(),
            id: id.to_owned(),
            kind,
            holder: parts.next().unwrap_or("").to_owned(),
        })
    }
}

impl Store {
    /// Whether several processes share this store (PostgreSQL): memory must
    /// then follow [`Store::subscribe`] and be re-checked.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

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
