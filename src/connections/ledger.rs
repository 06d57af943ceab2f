//! The process-wide [`Ledger`]: refreshes in flight (one per connection,
//! in tasks of their own that shutdown waits for), and rotated tokens the
//! store could not take yet, parked and committed by a task of its own
//! until it does. It does not decide when to refresh (see `refresh.rs`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Conn, Fresh, PoolError};
use crate::ground::lock;
use crate::store::{Store, Tokens, Version, Written};

/// Parked tokens are tried again this often while the store is down:
/// often, so that they land before another replica's lease on the row
/// expires and it refreshes with the old refresh token.
const PARKED_RETRY: Duration = Duration::from_millis(500);

/// What a refresh in flight ends with; everyone waiting gets a copy.
pub(super) type Outcome = Result<Fresh, PoolError>;

/// A connection in the ledger's maps: pool name and id.
pub(super) type Key = (String, String);

/// Tokens a refresh obtained that the store did not take yet, with the
/// refresh token they replace (the commit's condition).
pub(super) struct Parked {
    pub(super) tokens: Tokens,
    pub(super) seen: Version,
}

/// Process-wide bookkeeping of per-user refreshes, shared by the pools of
/// every config generation (a reload hands refreshes in flight to the new
/// pools): one refresh per connection in flight at a time, in tasks of
/// their own that shutdown waits for, and rotated tokens the store could
/// not take yet, kept until it does (where no cache eviction reaches them).
pub struct Ledger {
    pub(super) flights: Mutex<HashMap<Key, watch::Receiver<Option<Outcome>>>>,
    parked: Mutex<HashMap<Key, Parked>>,
    parked_added: tokio::sync::Notify,
    pub(super) tasks: TaskTracker,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("in_flight", &lock(&self.flights).len())
            .field("parked", &lock(&self.parked).len())
            .finish()
    }
}

impl Ledger {
    /// A ledger over `store`, with the task that commits parked tokens.
    pub fn new(store: &Arc<Store>) -> Arc<Ledger> {
        let ledger = Arc::new(Ledger {
            flights: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            parked_added: tokio::sync::Notify::new(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(Arc::clone(&ledger).commit_parked_loop(Arc::downgrade(store)));
        }
        ledger
    }

    /// Refreshes in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }

    /// Connections whose obtained tokens wait for the store.
    pub fn parked(&self) -> usize {
        lock(&self.parked).len()
    }

    pub(super) fn park(&self, key: Key, parked: Parked) {
        lock(&self.parked).insert(key, parked);
        self.parked_added.notify_one();
    }

    /// A copy of what is parked for `key`.
    pub(super) fn parked_for(&self, key: &Key) -> Option<(Tokens, Version)> {
        lock(&self.parked)
            .get(key)
            .map(|p| (p.tokens.clone(), p.seen.clone()))
    }

    /// The store answered a commit of the entry that replaced `seen`: it
    /// leaves, unless a newer refresh parked newer tokens meanwhile.
    pub(super) fn settle(&self, key: &Key, seen: &Version) {
        let mut parked = lock(&self.parked);
        if parked
            .get(key)
            .is_some_and(|p| p.seen.same_refresh_token(seen))
        {
            parked.remove(key);
        }
    }

    /// Commits every parked entry it can; the ones the store refuses to
    /// take now stay.
    async fn commit_all_parked(&self, store: &Store) {
        let keys: Vec<Key> = lock(&self.parked).keys().cloned().collect();
        for key in keys {
            let Some((tokens, seen)) = self.parked_for(&key) else {
                continue;
            };
            match store.commit_refresh(&key.0, &key.1, &seen, &tokens).await {
                Ok(w) => {
                    if !matches!(w, Written::Done(_)) {
                        tracing::info!(pool = %key.0, connection = %key.1, "tokens obtained while the store was down were superseded (re-authorized or deleted meanwhile); dropped");
                    }
                    self.settle(&key, &seen);
                }
                Err(e) => {
                    tracing::debug!(pool = %key.0, connection = %key.1, error = %e, "parked tokens still wait for the store");
                }
            }
        }
    }

    async fn commit_parked_loop(self: Arc<Self>, store: std::sync::Weak<Store>) {
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = self.parked_added.notified() => {}
                () = tokio::time::sleep(PARKED_RETRY) => {}
            }
            if self.parked() == 0 {
                continue;
            }
            let Some(store) = store.upgrade() else { return };
            self.commit_all_parked(&store).await;
        }
    }

    /// Shutdown: lets refreshes in flight finish and commit (within
    /// `grace`), tries parked tokens once more, and says loudly what could
    /// not be kept.
    pub async fn drain(&self, store: &Store, grace: Duration) {
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.in_flight(),
                "refreshes still in flight at the end of shutdown_grace"
            );
        }
        if self.parked() > 0 {
            let _ = tokio::time::timeout(grace, self.commit_all_parked(store)).await;
        }
        let lost = self.parked();
        if lost > 0 {
            tracing::error!(connections = lost, "the store did not take tokens obtained while it was down; with rotating refresh tokens these users may have to authorize again");
        }
        self.cancel.cancel();
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Removes a flight from the ledger when its task ends (or panics).
pub(super) struct FlightGuard {
    pub(super) ledger: Arc<Ledger>,
    pub(super) key: Key,
    pub(super) conn: Arc<Conn>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        lock(&self.ledger.flights).remove(&self.key);
        self.conn.refreshing.store(false, Ordering::Release);
    }
}
