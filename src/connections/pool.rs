//! [`Pool`]: its construction, the bounded cache of connections in
//! memory and the store reads that fill it, the request entry point
//! ([`Pool::token`]), following the store's change announcements, and the
//! per-state counts. The refresh path, upstream rejections and the code
//! exchange are `impl Pool` blocks of their own files.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cache::Cache;
use super::{store_err, Conn, Failure, Ledger, PoolBuildError, PoolError};
use crate::config::PoolConfig;
use crate::ground::lock;
use crate::ground::metrics::PoolMetrics;
use crate::store::{Change, ChangeKind, ConnectionState, Store};
use crate::tokens::dpop::Dpop;
use crate::tokens::{self, Endpoint, Token};

/// A request's connection and the token to send.
pub type Served = Result<(Arc<Conn>, Arc<Token>), PoolError>;

/// A store read of one connection, shared by the requests that missed it.
type Load = tokio::sync::OnceCell<Result<Arc<Conn>, PoolError>>;

/// How often the per-state counts (`/status`, metrics) are read.
const COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// A connection pool: one OAuth client, many users.
pub struct Pool {
    pub(super) config: Arc<PoolConfig>,
    pub(super) endpoint: Endpoint,
    pub(super) store: Arc<Store>,
    pub(super) ledger: Arc<Ledger>,
    pub(super) cache: Cache,
    /// Store reads in progress, one per connection: concurrent misses
    /// share it (and its error).
    loads: Mutex<HashMap<String, Arc<Load>>>,
    /// Bounds this pool's refreshes in flight (`refresh_concurrency`).
    pub(super) slots: Arc<Semaphore>,
    /// The endpoint refused the client itself: every user waits.
    pub(super) client_failure: Mutex<Option<Failure>>,
    /// Bumped whenever a connection is forgotten (deleted, re-authorized):
    /// a store read that began before must not put the old row back into
    /// the cache.
    pub(super) forgets: AtomicU64,
    pub(super) metrics: PoolMetrics,
    pub(super) cancel: CancellationToken,
    pub(super) counts: Mutex<Vec<(ConnectionState, u64)>>,
    pub(super) counts_read: AtomicU64,
    pub(super) recount: tokio::sync::Notify,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool over `store`; [`Pool::spawn`] starts its counting task.
    /// `ledger` is the process's, shared with every other pool.
    pub fn new(
        config: Arc<PoolConfig>,
        store: Arc<Store>,
        ledger: Arc<Ledger>,
        metrics: PoolMetrics,
    ) -> Result<Arc<Pool>, PoolBuildError> {
        let c = &config;
        let err = |source| PoolBuildError {
            pool: c.name.clone(),
            source,
        };
        let mut endpoint = Endpoint::new(
            &c.name,
            c.token_url.clone(),
            &c.client_id,
            &c.ca_certs,
            c.client_cert.as_ref(),
        )
        .map_err(err)?;
        endpoint.client_secret = c.client_secret.clone();
        endpoint.client_auth = c.client_auth;
        endpoint.assertion = c.assertion.clone();
        endpoint.body_format = c.body_format;
        endpoint.scope = c.scope.clone();
        endpoint.extra = c.extra.clone();
        endpoint.token_timeout = c.token_timeout;
        endpoint.dpop = c.dpop_key.clone().map(|k| Arc::new(Dpop::new(k)));
        let cache = Cache::new(c.cache_size);
        if c.authorize.is_some() {
            metrics.init_connect_sessions();
        }
        Ok(Arc::new(Pool {
            endpoint,
            store,
            ledger,
            cache,
            loads: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(c.refresh_concurrency)),
            client_failure: Mutex::new(None),
            forgets: AtomicU64::new(0),
            metrics,
            cancel: CancellationToken::new(),
            counts: Mutex::new(Vec::new()),
            counts_read: AtomicU64::new(0),
            recount: tokio::sync::Notify::new(),
            config,
        }))
    }

    /// The pool's settings.
    pub fn config(&self) -> &Arc<PoolConfig> {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The token endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// A usable token for connection `id`: memory, else store, else one
    /// refresh (waiting until `deadline`).
    pub async fn token(self: &Arc<Self>, id: &str, deadline: Instant) -> Served {
        let (conn, loaded) = match self.cache.get(id) {
            Some(c) => (c, false),
            None => self.load(id).await?,
        };
        if let Some(served) = self.serve(&conn, loaded, Instant::now()) {
            return served;
        }
        let t = self.refresh_now(&conn, deadline).await?;
        Ok((conn, t))
    }

    /// [`Pool::token`] without waiting, for a connection in memory: `None`
    /// when it must be read from the store or refreshed first (the request
    /// path's fast path, no future).
    #[inline]
    pub fn cached_token(self: &Arc<Self>, id: &str, now: Instant) -> Option<Served> {
        let conn = self.cache.get(id)?;
        self.serve(&conn, false, now)
    }

    /// The answer at `now` for a request from `conn` as it is (read from
    /// the store just now when `loaded`), starting what it is due for
    /// behind it: `None` when a refresh must come first.
    #[inline]
    fn serve(self: &Arc<Self>, conn: &Arc<Conn>, loaded: bool, now: Instant) -> Option<Served> {
        if !loaded && conn.due_for_check() {
            self.revalidate_behind(conn);
        }
        if conn.needs_reauthorization.load(Ordering::Acquire) {
            return Some(Err(PoolError::Reauthorization(conn.id.clone())));
        }
        let t = conn.usable(now)?;
        if now >= t.refresh_at && self.backoff(conn).is_none() {
            self.refresh_behind(conn);
        }
        if loaded {
            self.metrics.from_store.inc();
        } else {
            self.metrics.from_memory.inc();
        }
        Some(Ok((Arc::clone(conn), t)))
    }

    /// Reads a connection from the store into the cache; concurrent misses
    /// for one id share one read. `true` for the caller that read it. A
    /// read that raced a deletion (or re-authorization) is not kept.
    async fn load(&self, id: &str) -> Result<(Arc<Conn>, bool), PoolError> {
        let mut tries = 0;
        loop {
            let before = self.forgets.load(Ordering::Acquire);
            let (conn, fresh) = self.load_once(id).await?;
            tries += 1;
            if !fresh || self.forgets.load(Ordering::Acquire) == before || tries >= 3 {
                return Ok((conn, fresh));
            }
            self.cache.remove(id);
        }
    }

    async fn load_once(&self, id: &str) -> Result<(Arc<Conn>, bool), PoolError> {
        let load = {
            let mut loads = lock(&self.loads);
            // A read that ended put its connection here before it left
            // `loads` (both under this lock's order): looked at again.
            if let Some(c) = self.cache.get(id) {
                return Ok((c, false));
            }
            Arc::clone(loads.entry(id.to_owned()).or_default())
        };
        let mut read = false;
        let result = load
            .get_or_init(|| {
                read = true;
                self.read(id)
            })
            .await
            .clone();
        if read {
            if let Ok(c) = &result {
                self.cache.insert(Arc::clone(c));
            }
            let mut loads = lock(&self.loads);
            if loads.get(id).is_some_and(|l| Arc::ptr_eq(l, &load)) {
                loads.remove(id);
            }
        }
        result.map(|c| (c, read))
    }

    /// One connection as the store has it, not yet cached.
    async fn read(&self, id: &str) -> Result<Arc<Conn>, PoolError> {
        let record = self
            .store
            .get(&self.config.name, id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| PoolError::NotFound(id.to_owned()))?;
        let conn = Conn::new(id.to_owned());
        if record.info.state == ConnectionState::NeedsReauthorization {
            conn.needs_reauthorization.store(true, Ordering::Release);
            *lock(&conn.version) = (None, record.version.clone());
        } else if let Some(t) = tokens::stored_token(
            &record,
            self.config.refresh_before,
            self.config.dpop_key.is_some(),
        ) {
            conn.install(t, record.version.clone());
        } else {
            *lock(&conn.version) = (None, record.version.clone());
        }
        Ok(Arc::new(conn))
    }

    /// Reads a cached connection the store announced a change of again, in
    /// the background (one at a time): gone or needs_reauthorization stop
    /// its token; a newer stored token (another replica refreshed)
    /// replaces the held one. A store outage changes nothing: the token in
    /// memory keeps serving (and it stays stale).
    fn revalidate_behind(self: &Arc<Self>, conn: &Arc<Conn>) {
        if conn.revalidating.swap(true, Ordering::AcqRel) {
            return;
        }
        conn.stale.store(false, Ordering::Release);
        let (pool, conn) = (Arc::clone(self), Arc::clone(conn));
        tokio::spawn(async move {
            let name = pool.config.name.as_str();
            match pool.store.get(name, &conn.id).await {
                Ok(None) => {
                    conn.revoke(false);
                    pool.forget_local(&conn.id);
                }
                Ok(Some(r)) if r.info.state == ConnectionState::NeedsReauthorization => {
                    conn.revoke(true);
                }
                // Re-authorized elsewhere (a notification was missed): read
                // it afresh at the next request.
                Ok(Some(_)) if conn.needs_reauthorization.load(Ordering::Acquire) => {
                    pool.forget_local(&conn.id);
                }
                Ok(Some(r)) => {
                    let held = conn.held.load().as_ref().map(|t| t.usable_until);
                    if let Some(t) = tokens::stored_token(
                        &r,
                        pool.config.refresh_before,
                        pool.config.dpop_key.is_some(),
                    ) {
                        if held.is_none_or(|h| t.usable_until > h) {
                            let _ = pool.adopt(&conn, &r);
                        }
                    }
                }
                Err(e) => {
                    conn.stale.store(true, Ordering::Release);
                    tracing::debug!(pool = name, connection = %conn.id, error = %e, "cannot re-read the connection; the token in memory keeps serving");
                }
            }
            conn.revalidating.store(false, Ordering::Release);
        });
    }

    /// Follows the store's announcements of changes other processes (or
    /// replicas) made (see [`crate::store::Change`]).
    async fn apply(&self, change: Result<Change, RecvError>) {
        let (id, kind, holder) = match change {
            Ok(Change::Connection {
                pool,
                id,
                kind,
                holder,
            }) if pool == self.config.name => (id, kind, holder),
            Ok(Change::Connection { .. }) => return,
            Ok(Change::All) | Err(RecvError::Lagged(_)) => {
                self.cache
                    .for_each(|c| c.stale.store(true, Ordering::Release));
                return;
            }
            Err(RecvError::Closed) => return,
        };
        match kind {
            // What this process wrote it forgot (`Pool::forget`) or
            // installed already: a read since holds the row as written.
            ChangeKind::Created | ChangeKind::Reauthorized | ChangeKind::Refreshed
                if holder == self.store.holder() =>
            {
                return
            }
            ChangeKind::Created | ChangeKind::Reauthorized => self.forget_local(&id),
            ChangeKind::Deleted => {
                if let Some(c) = self.cache.get(&id) {
                    c.revoke(false);
                }
                self.forget_local(&id);
            }
            ChangeKind::NeedsReauthorization => {
                if let Some(c) = self.cache.get(&id) {
                    c.revoke(true);
                }
            }
            // New tokens change no count: no recount.
            ChangeKind::Refreshed => {
                if let Some(c) = self.cache.get(&id) {
                    c.stale.store(true, Ordering::Release);
                }
                return;
            }
        }
        self.recount.notify_one();
    }

    /// Forgets a connection in memory (after an admin change).
    pub fn forget(&self, id: &str) {
        self.forget_local(id);
        self.recount.notify_one();
    }

    /// Drops a connection from the cache, so that the next request reads
    /// it afresh (and a read in progress is not kept).
    pub(super) fn forget_local(&self, id: &str) {
        self.forgets.fetch_add(1, Ordering::AcqRel);
        self.cache.remove(id);
    }

    /// Access tokens in memory.
    pub fn cache_size(&self) -> u64 {
        self.cache.len()
    }

    /// Counts by state as last read from the store, for `/status`.
    pub fn counts(&self) -> Vec<(ConnectionState, u64)> {
        lock(&self.counts).clone()
    }

    /// Starts the tasks that follow the store's change announcements and
    /// read the per-state counts (every few seconds, and after changes)
    /// into `/status` and the gauge.
    pub fn spawn(self: &Arc<Self>) {
        let pool = Arc::clone(self);
        let mut changes = self.store.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = pool.cancel.cancelled() => return,
                    c = changes.recv() => pool.apply(c).await,
                }
            }
        });
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                if let Ok(counts) = pool.store.counts(&pool.config.name).await {
                    for state in ConnectionState::ALL {
                        let n = counts.iter().find(|(s, _)| *s == state).map_or(0, |c| c.1);
                        pool.metrics.set_connections(state.as_str(), n);
                    }
                    *lock(&pool.counts) = counts;
                    pool.counts_read.fetch_add(1, Ordering::Relaxed);
                }
                tokio::select! {
                    () = pool.cancel.cancelled() => return,
                    () = tokio::time::sleep(COUNT_INTERVAL) => {}
                    () = pool.recount.notified() => {}
                }
            }
        });
    }

    /// Stops the pool's tasks (shutdown, or a reload that replaced it).
    /// Refreshes in flight are the ledger's and run on.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}
