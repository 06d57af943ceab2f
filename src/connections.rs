//! Per-user connection pools: one [`Pool`] per `[connections.NAME]`, and
//! the process-wide [`Ledger`] of refreshes in flight that every config
//! generation's pools share.
//!
//! A request names its connection in the pool's select header; its access
//! token comes from memory (a bounded LRU cache), else the store (one read,
//! coalesced per connection), else one refresh. Per connection and process
//! there is one refresh at a time, whichever generation's pool asks: it
//! runs in a task of its own ([`Ledger`]), so a request that leaves (its
//! deadline, its client, a reload or shutdown) never cancels a refresh the
//! provider may already have answered with a rotated refresh token. The
//! refresh takes the row's lease in the store (one token request per
//! expiry across replicas), re-reads it, uses a token another holder just
//! committed if it is fresh, else calls the endpoint and commits both
//! tokens before the access token is used. A token inside its refresh
//! window is served while one background refresh runs.
//!
//! The rule this module keeps: a connection ends only when the provider
//! says its grant is dead (`invalid_grant` on a refresh, a `revoked_codes`
//! answer for the token in use) or someone deletes it; nothing ever erases
//! a refresh token. Every store write says which refresh token it expects
//! ([`Version`]) and does nothing when the row has moved on, so a stale
//! answer never undoes a re-authorization. Tokens a refresh obtained that
//! the store could not take are parked in the ledger (not in the evictable
//! cache) and committed as soon as it can. A refusal of the *client*
//! (`invalid_client`, other 4xx) is the pool's problem, not the users':
//! 503 `token_unavailable` for everyone, no state change.
//!
//! This module does not parse HTTP requests beyond the select header, and
//! does not own the store's SQL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::PoolConfig;
use crate::ground::lock;
use crate::ground::metrics::PoolMetrics;
use crate::ground::secret::Secret;
use crate::store::{
    Change, ChangeKind, ConnectionInfo, ConnectionState, LastError, Lease, Record, Store,
    StoreError, Tokens, Version, Written,
};
use crate::tokens::{self, Endpoint, Grant, Granted, Token, TokenError};
use tokio::sync::broadcast::error::RecvError;

/// Longest connection id (CONNECTIONS.md).
pub const MAX_ID_LEN: usize = 128;
/// A waiter re-reads a row whose lease another holder has after this,
/// doubling up to [`LEASE_POLL_MAX`].
const LEASE_POLL: Duration = Duration::from_millis(25);
/// The longest wait between two reads of a leased row.
const LEASE_POLL_MAX: Duration = Duration::from_millis(400);
/// With a shared store, a connection in memory is read again (in the
/// background) when a request uses it this long after the last read: the
/// safety net under notifications, so a deletion or new tokens missed by the
/// listener are seen within this bound plus one store read.
pub const REVALIDATE_AFTER: Duration = Duration::from_secs(5);
/// A lease outlives the token request it covers (bounded by
/// `token_timeout`) by this much: room for waiting on a store connection
/// and the commit. Short on purpose: a replica that dies mid-refresh holds
/// its users up for no longer than this. Should a lease expire before its
/// holder commits, nothing is lost: the commit is conditional on the
/// refresh token sent, not on the lease.
const LEASE_SLACK: Duration = Duration::from_secs(5);
/// How long a refresh's answer is awaited (at least `token_timeout`).
/// Requests stop waiting for it at `token_timeout`; the refresh does not,
/// because an endpoint that answers late rotates the refresh token all the
/// same.
const REFRESH_PATIENCE: Duration = Duration::from_secs(120);
/// How often the per-state counts (`/status`, metrics) are read.
const COUNT_INTERVAL: Duration = Duration::from_secs(5);
/// Parked tokens are tried again this often while the store is down:
/// often, so that they land before another replica's lease on the row
/// expires and it refreshes with the old refresh token.
const PARKED_RETRY: Duration = Duration::from_millis(500);
/// After taking over an expired lease, how long to watch the row for the
/// previous holder's commit before refreshing (see
/// [`Pool::after_takeover`]).
const TAKEOVER_WAIT: Duration = Duration::from_millis(1500);
/// How often the row is read meanwhile.
const TAKEOVER_POLL: Duration = Duration::from_millis(100);
/// A refused client (`invalid_client`…) is tried again after this,
/// doubling up to [`CLIENT_BACKOFF_MAX`]: short, because the users come
/// back the moment the endpoint accepts the client again.
const CLIENT_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a refused client.
const CLIENT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Refresh-ahead moments are spread over up to this share of a token's
/// lifetime, so connections authorized together do not refresh together.
const REFRESH_JITTER: f64 = 0.1;
/// The admin API's code exchange keeps trying to store what it obtained
/// for this long (the code is spent; the tokens must not be).
const AUTHORIZE_STORE_RETRY: Duration = Duration::from_secs(10);

/// `1`-`128` of `[A-Za-z0-9._:@-]`.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// Why a pooled request gets no token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    /// The select header is missing, empty, repeated or malformed.
    #[error("name the connection in the {0} header (1-128 of A-Z a-z 0-9 . _ : @ -)")]
    ConnectionRequired(HeaderName),
    /// No such connection in the pool.
    #[error("connection {0} does not exist in this pool")]
    NotFound(String),
    /// The user must authorize again.
    #[error("connection {0} needs reauthorization: the user must authorize again")]
    Reauthorization(String),
    /// No token now; retry later.
    #[error("no access token is available for connection {id}: {reason}")]
    Unavailable {
        /// The connection.
        id: String,
        /// Secret-free reason.
        reason: String,
        /// When trying again makes sense.
        retry_after: Duration,
    },
    /// The store cannot be reached.
    #[error("{0}")]
    Store(#[source] Arc<StoreError>),
}

/// The connection a request named (taken out of its headers without
/// copying).
#[derive(Debug, Clone)]
pub struct ConnectionId(HeaderValue);

impl ConnectionId {
    /// The id.
    pub fn as_str(&self) -> &str {
        // Checked to be ASCII by `select`.
        self.0.to_str().unwrap_or("")
    }
}

/// The connection a request named, removed from its headers.
pub fn select(headers: &mut HeaderMap, name: &HeaderName) -> Result<ConnectionId, PoolError> {
    let single = {
        let mut values = headers.get_all(name).iter();
        values.next().is_some() && values.next().is_none()
    };
    let value = headers.remove(name);
    value
        .filter(|v| single && v.to_str().is_ok_and(valid_id))
        .map(ConnectionId)
        .ok_or_else(|| PoolError::ConnectionRequired(name.clone()))
}

/// The last failure of a connection's refresh (or of the pool's client):
/// requests answer at once until `retry_at`.
struct Failure {
    retry_at: Instant,
    attempts: u32,
    reason: String,
}

impl Failure {
    fn after(
        prev: Option<&Failure>,
        delay: impl FnOnce(u32) -> Duration,
        reason: String,
    ) -> Failure {
        let attempts = prev.map_or(0, |f| f.attempts).saturating_add(1);
        let now = Instant::now();
        Failure {
            retry_at: now.checked_add(delay(attempts)).unwrap_or(now),
            attempts,
            reason,
        }
    }

    /// While it holds: the answer for a request.
    fn pending(&self, id: &str) -> Option<PoolError> {
        let now = Instant::now();
        (now < self.retry_at).then(|| PoolError::Unavailable {
            id: id.to_owned(),
            reason: self.reason.clone(),
            retry_after: self.retry_at.saturating_duration_since(now),
        })
    }
}

/// A token a refresh obtained, with the row version it was committed as.
#[derive(Clone)]
struct Fresh {
    token: Arc<Token>,
    version: Version,
}

/// What a refresh in flight ends with; everyone waiting gets a copy.
type Outcome = Result<Fresh, PoolError>;

/// A connection in the ledger's maps: pool name and id.
type Key = (String, String);

/// Tokens a refresh obtained that the store did not take yet, with the
/// refresh token they replace (the commit's condition).
struct Parked {
    tokens: Tokens,
    seen: Version,
}

/// Process-wide bookkeeping of per-user refreshes, shared by the pools of
/// every config generation (a reload hands refreshes in flight to the new
/// pools): one refresh per connection in flight at a time, in tasks of
/// their own that shutdown waits for, and rotated tokens the store could
/// not take yet, kept until it does (where no cache eviction reaches them).
pub struct Ledger {
    flights: Mutex<HashMap<Key, watch::Receiver<Option<Outcome>>>>,
    parked: Mutex<HashMap<Key, Parked>>,
    parked_added: tokio::sync::Notify,
    tasks: TaskTracker,
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

    fn park(&self, key: Key, parked: Parked) {
        lock(&self.parked).insert(key, parked);
        self.parked_added.notify_one();
    }

    /// A copy of what is parked for `key`.
    fn parked_for(&self, key: &Key) -> Option<(Tokens, Version)> {
        lock(&self.parked)
            .get(key)
            .map(|p| (p.tokens.clone(), p.seen.clone()))
    }

    /// The store answered a commit of the entry that replaced `seen`: it
    /// leaves, unless a newer refresh parked newer tokens meanwhile.
    fn settle(&self, key: &Key, seen: &Version) {
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
struct FlightGuard {
    ledger: Arc<Ledger>,
    key: Key,
    conn: Arc<Conn>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        lock(&self.ledger.flights).remove(&self.key);
        self.conn.refreshing.store(false, Ordering::Release);
    }
}

/// One connection in memory.
pub struct Conn {
    id: String,
    held: ArcSwapOption<Token>,
    /// The row version the held token belongs to (with that token): what a
    /// `revoked_codes` answer for it expects to find in the store. A
    /// refresh another request shares installs its token and version here
    /// together, so an answer for an older token is told apart.
    version: Mutex<(Option<Arc<Token>>, Version)>,
    /// The token dropped after an upstream rejection, until the next one is
    /// installed: that one is subject to the no-storm floor
    /// ([`Token::rejectable`]), and a stored copy of this one is not used.
    rejected: ArcSwapOption<Token>,
    needs_reauthorization: AtomicBool,
    /// This connection started the refresh in flight (a cheap check before
    /// the ledger's map).
    refreshing: AtomicBool,
    failure: Mutex<Option<Failure>>,
    /// A shared store announced a change (or may have): read it again.
    stale: AtomicBool,
    /// When it was last read from the store.
    checked: Mutex<Instant>,
    revalidating: AtomicBool,
}

impl Conn {
    fn new(id: String) -> Conn {
        Conn {
            id,
            held: ArcSwapOption::empty(),
            version: Mutex::new((None, Version::default())),
            rejected: ArcSwapOption::empty(),
            needs_reauthorization: AtomicBool::new(false),
            refreshing: AtomicBool::new(false),
            failure: Mutex::new(None),
            stale: AtomicBool::new(false),
            checked: Mutex::new(Instant::now()),
            revalidating: AtomicBool::new(false),
        }
    }

    /// Whether a shared store's row must be read again.
    fn due_for_check(&self, now: Instant) -> bool {
        self.stale.load(Ordering::Acquire)
            || now.saturating_duration_since(*lock(&self.checked)) >= REVALIDATE_AFTER
    }

    /// The connection was deleted or turned needs_reauthorization
    /// elsewhere: its token must not be used any more.
    fn revoke(&self, needs_reauthorization: bool) {
        self.needs_reauthorization
            .store(needs_reauthorization, Ordering::Release);
        self.held.store(None);
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn usable(&self, now: Instant) -> Option<Arc<Token>> {
        let held = self.held.load();
        held.as_ref().filter(|t| t.is_usable(now)).map(Arc::clone)
    }

    /// Installs a token just obtained or read, its refresh moment spread
    /// by a little jitter.
    fn install(&self, mut token: Token, version: Version) -> Fresh {
        token.replaces_rejected = self.rejected.swap(None).is_some();
        let window = token
            .refresh_at
            .saturating_duration_since(token.obtained_at);
        let jitter = window.mul_f64(REFRESH_JITTER * rand::random::<f64>());
        if let Some(at) = token.refresh_at.checked_sub(jitter) {
            token.refresh_at = at.max(token.obtained_at);
        }
        let fresh = Fresh {
            token: Arc::new(token),
            version,
        };
        self.install_fresh(&fresh);
        fresh
    }

    /// Installs what a refresh (maybe another generation's) obtained.
    fn install_fresh(&self, fresh: &Fresh) {
        self.held.store(Some(Arc::clone(&fresh.token)));
        *lock(&self.version) = (Some(Arc::clone(&fresh.token)), fresh.version.clone());
        self.needs_reauthorization.store(false, Ordering::Release);
        *lock(&self.failure) = None;
    }

    /// Drops `token` if it is still the current one.
    fn drop_token(&self, token: &Arc<Token>) {
        let cur = self.held.load();
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) {
            let prev = self.held.compare_and_swap(&*cur, None);
            if prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, token)) {
                self.rejected.store(Some(Arc::clone(token)));
            }
        }
    }

    fn failure(&self) -> MutexGuard<'_, Option<Failure>> {
        lock(&self.failure)
    }
}

/// What an admin request exchanges for a connection.
#[derive(Clone, Copy)]
pub enum Exchange<'a> {
    /// An authorization code from the authorize redirect.
    Code {
        /// The code.
        code: &'a str,
        /// Overrides the pool's `redirect_uri`.
        redirect_uri: Option<&'a str>,
    },
    /// A refresh token the app already holds.
    RefreshToken(&'a str),
}

/// Why a connection could not be authorized.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    /// The endpoint refused the code or refresh token.
    #[error("the token endpoint refused the grant: {error}")]
    Rejected {
        /// OAuth `error`.
        error: String,
        /// OAuth `error_description`.
        description: Option<String>,
    },
    /// The endpoint could not be reached or failed.
    #[error("{0}")]
    EndpointUnavailable(#[source] TokenError),
    /// The store could not take the connection.
    #[error("{0}")]
    Store(#[source] StoreError),
}

/// What to do with an upstream answer in `reauth_on`.
pub enum Rejected {
    /// Send the request again with this token.
    Replay(Arc<Token>),
    /// Pass the answer through (consent revoked, token too young to drop,
    /// or no new token).
    PassThrough,
}

/// A connection pool: one OAuth client, many users.
pub struct Pool {
    config: Arc<PoolConfig>,
    endpoint: Endpoint,
    store: Arc<Store>,
    ledger: Arc<Ledger>,
    cache: moka::future::Cache<String, Arc<Conn>>,
    /// Bounds this pool's refreshes in flight (`refresh_concurrency`).
    slots: Arc<Semaphore>,
    /// The endpoint refused the client itself: every user waits.
    client_failure: Mutex<Option<Failure>>,
    /// Bumped whenever a connection is forgotten (deleted, re-authorized):
    /// a store read that began before must not put the old row back into
    /// the cache.
    forgets: AtomicU64,
    metrics: PoolMetrics,
    cancel: CancellationToken,
    counts: Mutex<Vec<(ConnectionState, u64)>>,
    counts_read: AtomicU64,
    recount: tokio::sync::Notify,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

/// Why a pool could not be built.
#[derive(Debug, thiserror::Error)]
#[error("connections.{pool}: {source}")]
pub struct PoolBuildError {
    pool: String,
    #[source]
    source: tokens::grant::EndpointError,
}

fn store_err(e: StoreError) -> PoolError {
    PoolError::Store(Arc::new(e))
}

fn last_error(error: String, description: Option<String>) -> LastError {
    LastError {
        error,
        description,
        at: crate::ground::now_ms(),
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
        let mut endpoint =
            Endpoint::new(&c.name, c.token_url.clone(), &c.client_id, &c.ca_certs).map_err(err)?;
        endpoint.client_secret = c.client_secret.clone();
        endpoint.client_auth = c.client_auth;
        endpoint.body_format = c.body_format;
        endpoint.scope = c.scope.clone();
        endpoint.extra = c.extra.clone();
        endpoint.token_timeout = c.token_timeout;
        let cache = moka::future::Cache::builder()
            .max_capacity(c.cache_size)
            .build();
        Ok(Arc::new(Pool {
            endpoint,
            store,
            ledger,
            cache,
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
    pub async fn token(
        self: &Arc<Self>,
        id: &str,
        deadline: Instant,
    ) -> Result<(Arc<Conn>, Arc<Token>), PoolError> {
        let (conn, loaded) = match self.cache.get(id).await {
            Some(c) => (c, false),
            None => self.load(id).await?,
        };
        let now = Instant::now();
        if !loaded && self.store.is_shared() && conn.due_for_check(now) {
            self.revalidate_behind(&conn);
        }
        if conn.needs_reauthorization.load(Ordering::Acquire) {
            return Err(PoolError::Reauthorization(conn.id.clone()));
        }
        if let Some(t) = conn.usable(now) {
            if now >= t.refresh_at && self.backoff(&conn).is_none() {
                self.refresh_behind(&conn);
            }
            if loaded {
                self.metrics.from_store.inc();
            } else {
                self.metrics.from_memory.inc();
            }
            return Ok((conn, t));
        }
        let t = self.refresh_now(&conn, deadline).await?;
        Ok((conn, t))
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
            self.cache.invalidate(id).await;
        }
    }

    async fn load_once(&self, id: &str) -> Result<(Arc<Conn>, bool), PoolError> {
        let pool = &self.config.name;
        let refresh_before = self.config.refresh_before;
        self.cache
            .entry_by_ref(id)
            .or_try_insert_with(async {
                let record = self
                    .store
                    .get(pool, id)
                    .await
                    .map_err(store_err)?
                    .ok_or_else(|| PoolError::NotFound(id.to_owned()))?;
                let conn = Conn::new(id.to_owned());
                if record.info.state == ConnectionState::NeedsReauthorization {
                    conn.needs_reauthorization.store(true, Ordering::Release);
                    *lock(&conn.version) = (None, record.version.clone());
                } else if let Some(t) = tokens::stored_token(&record, refresh_before) {
                    conn.install(t, record.version.clone());
                } else {
                    *lock(&conn.version) = (None, record.version.clone());
                }
                Ok(Arc::new(conn))
            })
            .await
            .map(|entry| {
                let fresh = entry.is_fresh();
                (entry.into_value(), fresh)
            })
            .map_err(|e: Arc<PoolError>| (*e).clone())
    }

    /// Starts one background refresh unless one runs or all of the pool's
    /// refresh slots are taken (the token stays usable; a later request
    /// tries again).
    fn refresh_behind(self: &Arc<Self>, conn: &Arc<Conn>) {
        if !conn.refreshing.load(Ordering::Acquire) {
            let _ = self.start_refresh(conn, true);
        }
    }

    /// Joins this connection's refresh in flight in this process (whichever
    /// generation's pool started it), or starts one in a task of its own:
    /// once sent, a token request runs to completion and its tokens are
    /// committed (or parked), whoever still waits. `None` only when
    /// `background` and no refresh slot is free.
    fn start_refresh(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        background: bool,
    ) -> Option<watch::Receiver<Option<Outcome>>> {
        let key = (self.config.name.clone(), conn.id.clone());
        let mut flights = lock(&self.ledger.flights);
        if let Some(rx) = flights.get(&key) {
            return Some(rx.clone());
        }
        let permit = if background {
            Some(Arc::clone(&self.slots).try_acquire_owned().ok()?)
        } else {
            None
        };
        let (tx, rx) = watch::channel(None);
        flights.insert(key.clone(), rx.clone());
        drop(flights);
        conn.refreshing.store(true, Ordering::Release);
        let guard = FlightGuard {
            ledger: Arc::clone(&self.ledger),
            key,
            conn: Arc::clone(conn),
        };
        let (pool, conn) = (Arc::clone(self), Arc::clone(conn));
        self.ledger.tasks.spawn(async move {
            let _permit = match permit {
                Some(p) => Some(p),
                None => Arc::clone(&pool.slots).acquire_owned().await.ok(),
            };
            let outcome = pool.refresh(&conn, &tx).await;
            if let Err(e) = &outcome {
                tracing::debug!(pool = %pool.config.name, connection = %conn.id, error = %e, "refresh failed");
            }
            tx.send_replace(Some(outcome));
            drop(guard);
        });
        Some(rx)
    }

    /// Reads a cached connection again in the background (one at a time):
    /// gone or needs_reauthorization stop its token; a newer stored token
    /// (another replica refreshed) replaces the held one. A store outage
    /// changes nothing: the token in memory keeps serving.
    fn revalidate_behind(self: &Arc<Self>, conn: &Arc<Conn>) {
        if conn.revalidating.swap(true, Ordering::AcqRel) {
            return;
        }
        conn.stale.store(false, Ordering::Release);
        *lock(&conn.checked) = Instant::now();
        let (pool, conn) = (Arc::clone(self), Arc::clone(conn));
        tokio::spawn(async move {
            let name = pool.config.name.as_str();
            match pool.store.get(name, &conn.id).await {
                Ok(None) => {
                    conn.revoke(false);
                    pool.forget_local(&conn.id).await;
                }
                Ok(Some(r)) if r.info.state == ConnectionState::NeedsReauthorization => {
                    conn.revoke(true);
                }
                // Re-authorized elsewhere (a notification was missed): read
                // it afresh at the next request.
                Ok(Some(_)) if conn.needs_reauthorization.load(Ordering::Acquire) => {
                    pool.forget_local(&conn.id).await;
                }
                Ok(Some(r)) => {
                    let held = conn.held.load().as_ref().map(|t| t.usable_until);
                    if let Some(t) = tokens::stored_token(&r, pool.config.refresh_before) {
                        if held.is_none_or(|h| t.usable_until > h) {
                            let _ = pool.adopt(&conn, &r);
                        }
                    }
                }
                Err(e) => {
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
                for (_, c) in &self.cache {
                    c.stale.store(true, Ordering::Release);
                }
                return;
            }
            Err(RecvError::Closed) => return,
        };
        match kind {
            ChangeKind::Created | ChangeKind::Reauthorized => self.forget_local(&id).await,
            ChangeKind::Deleted => {
                if let Some(c) = self.cache.get(&id).await {
                    c.revoke(false);
                }
                self.forget_local(&id).await;
            }
            ChangeKind::NeedsReauthorization => {
                if let Some(c) = self.cache.get(&id).await {
                    c.revoke(true);
                }
            }
            ChangeKind::Refreshed if holder != self.store.holder() => {
                if let Some(c) = self.cache.get(&id).await {
                    c.stale.store(true, Ordering::Release);
                }
            }
            ChangeKind::Refreshed => return,
        }
        self.recount.notify_one();
    }

    /// Why a refresh must not be tried now: the connection's own backoff,
    /// or the pool's client refused.
    fn backoff(&self, conn: &Conn) -> Option<PoolError> {
        if let Some(e) = lock(&self.client_failure)
            .as_ref()
            .and_then(|f| f.pending(&conn.id))
        {
            return Some(e);
        }
        conn.failure().as_ref().and_then(|f| f.pending(&conn.id))
    }

    /// Waits for (or starts) a refresh, until `deadline`. Leaving early
    /// does not cancel the refresh.
    async fn refresh_now(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        deadline: Instant,
    ) -> Result<Arc<Token>, PoolError> {
        if let Some(e) = self.backoff(conn) {
            return Err(e);
        }
        let unavailable = |reason: &str| PoolError::Unavailable {
            id: conn.id.clone(),
            reason: reason.to_owned(),
            retry_after: Duration::from_secs(1),
        };
        let Some(mut rx) = self.start_refresh(conn, false) else {
            return Err(unavailable("no refresh slot is free"));
        };
        let outcome = match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(done)) => match &*done {
                Some(outcome) => outcome.clone(),
                None => Err(unavailable("the refresh ended without an answer")),
            },
            Ok(Err(_)) => Err(unavailable("the refresh ended without an answer")),
            Err(_) => Err(unavailable("the token request is taking too long")),
        };
        match outcome {
            Ok(fresh) => {
                // A refresh another generation's pool started: this
                // connection object learns its outcome too.
                if !conn
                    .held
                    .load()
                    .as_ref()
                    .is_some_and(|t| Arc::ptr_eq(t, &fresh.token))
                {
                    conn.install_fresh(&fresh);
                }
                Ok(fresh.token)
            }
            Err(e) => {
                if matches!(e, PoolError::Reauthorization(_)) {
                    conn.revoke(true);
                }
                Err(e)
            }
        }
    }

    /// One refresh, in its own task: tokens parked earlier go first; then
    /// lease, re-read, use a fresh stored token or call the endpoint,
    /// commit, install.
    async fn refresh(&self, conn: &Conn, flight: &watch::Sender<Option<Outcome>>) -> Outcome {
        if let Some(fresh) = self.commit_parked(conn).await? {
            return Ok(fresh);
        }
        let mut superseded = false;
        loop {
            let record = match self.take_lease(conn).await? {
                Ok(record) => record,
                Err(adopted) => return Ok(adopted),
            };
            match self.refresh_with(conn, record, flight).await {
                // The row moved on under this refresh (another holder
                // rotated the refresh token): once more with the new one.
                Err(Retry::Superseded) if !superseded => superseded = true,
                Err(Retry::Superseded) => {
                    return Err(PoolError::Unavailable {
                        id: conn.id.clone(),
                        reason: "the connection changed while it was refreshed".into(),
                        retry_after: Duration::from_secs(1),
                    })
                }
                Err(Retry::No(e)) => return Err(e),
                Ok(fresh) => return Ok(fresh),
            }
        }
    }

    /// Commits tokens an earlier refresh of this connection obtained but
    /// could not store; a fresh access token among them is used.
    async fn commit_parked(&self, conn: &Conn) -> Result<Option<Fresh>, PoolError> {
        let key = (self.config.name.clone(), conn.id.clone());
        let Some((tokens, seen)) = self.ledger.parked_for(&key) else {
            return Ok(None);
        };
        let written = self
            .store
            .commit_refresh(&key.0, &key.1, &seen, &tokens)
            .await
            .map_err(store_err)?;
        self.ledger.settle(&key, &seen);
        match written {
            Written::Done(record) | Written::Superseded(record) => Ok(self.adopt(conn, &record)),
            Written::Gone => {
                self.forget_local(&conn.id).await;
                Err(PoolError::NotFound(conn.id.clone()))
            }
        }
    }

    /// Takes the row's lease: `Ok(record)` to refresh, `Err(fresh)` when
    /// another holder committed a fresh token meanwhile.
    async fn take_lease(&self, conn: &Conn) -> Result<Result<Record, Fresh>, PoolError> {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        let ttl = self.config.token_timeout.saturating_add(LEASE_SLACK);
        let start = Instant::now();
        let give_up = start
            .checked_add(ttl.saturating_add(LEASE_SLACK))
            .unwrap_or(start);
        let mut poll = LEASE_POLL;
        loop {
            match self.store.lease(pool, id, ttl).await.map_err(store_err)? {
                Lease::Taken(r) => return Ok(Ok(r)),
                Lease::TakenOver(r) => return self.after_takeover(conn, r).await,
                Lease::Gone => {
                    self.forget_local(id).await;
                    return Err(PoolError::NotFound(id.to_owned()));
                }
                Lease::Busy(r) => {
                    if r.info.state == ConnectionState::NeedsReauthorization {
                        conn.revoke(true);
                        return Err(PoolError::Reauthorization(id.to_owned()));
                    }
                    if let Some(t) = self.adopt(conn, &r) {
                        return Ok(Err(t));
                    }
                    if Instant::now() >= give_up {
                        return Err(PoolError::Unavailable {
                            id: id.to_owned(),
                            reason: "another replica holds the connection's refresh lease".into(),
                            retry_after: Duration::from_secs(1),
                        });
                    }
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(LEASE_POLL_MAX);
                }
            }
        }
    }

    /// A lease taken over from a holder whose lease expired (a replica cut
    /// off from the store while it refreshed): if that replica obtained a
    /// rotated refresh token, it commits it as soon as the store answers
    /// again, and refreshing with the old one meanwhile would present a
    /// rotated-away token (which providers with reuse detection punish by
    /// revoking the grant). So the row is watched for a short while first.
    async fn after_takeover(
        &self,
        conn: &Conn,
        record: Record,
    ) -> Result<Result<Record, Fresh>, PoolError> {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        let start = Instant::now();
        let until = start.checked_add(TAKEOVER_WAIT).unwrap_or(start);
        while Instant::now() < until {
            tokio::time::sleep(TAKEOVER_POLL).await;
            match self.store.get(pool, id).await.map_err(store_err)? {
                None => {
                    self.forget_local(id).await;
                    return Err(PoolError::NotFound(id.to_owned()));
                }
                Some(now) if !now.version.same_refresh_token(&record.version) => {
                    let _ = self.store.release(pool, id).await;
                    return Ok(match self.adopt(conn, &now) {
                        Some(t) => Err(t),
                        None => Ok(now),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(Ok(record))
    }

    /// The token request under the lease, and what its answer means.
    async fn refresh_with(
        &self,
        conn: &Conn,
        record: Record,
        flight: &watch::Sender<Option<Outcome>>,
    ) -> Result<Fresh, Retry> {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        if record.info.state == ConnectionState::NeedsReauthorization {
            let _ = self.store.release(pool, id).await;
            conn.revoke(true);
            return Err(Retry::No(PoolError::Reauthorization(id.to_owned())));
        }
        if let Some(t) = self.adopt(conn, &record) {
            self.store
                .release(pool, id)
                .await
                .map_err(|e| Retry::No(store_err(e)))?;
            return Ok(t);
        }
        let Some(rt) = record.tokens.refresh_token.clone() else {
            let e = last_error(
                "no_refresh_token".into(),
                Some("the store holds no refresh token for this connection".into()),
            );
            return self.grant_dead(conn, &record, &e).await;
        };
        let result = self.patient_refresh(conn, &rt, flight).await;
        self.metrics.token_request(
            result
                .as_ref()
                .map_or_else(TokenError::outcome, |_| "success"),
        );
        match result {
            Ok(g) => {
                // The endpoint accepts the client again: a later refusal
                // starts its backoff afresh.
                lock(&self.client_failure).take();
                self.granted(conn, g, rt, &record.version).await
            }
            Err(e) if e.is_invalid_grant() => {
                let (error, description) = e.oauth_fields();
                tracing::warn!(pool, connection = id, error = %e, "the token endpoint says the refresh token is dead");
                self.grant_dead(conn, &record, &last_error(error, description))
                    .await
            }
            Err(e) if e.is_refusal() => {
                Err(Retry::No(self.client_refused(conn, &record, &e).await))
            }
            Err(e) => Err(Retry::No(self.failed(conn, &record, &e).await)),
        }
    }

    /// Sends the refresh and waits for its answer, however late (up to
    /// [`REFRESH_PATIENCE`]): an endpoint that answers after the proxy left
    /// has still rotated the refresh token sent, and the new one would be
    /// lost. Requests waiting on the refresh are answered at `token_timeout`
    /// as before (503, the request timed out); the lease is renewed while
    /// the answer is awaited, so no other replica refreshes meanwhile.
    async fn patient_refresh(
        &self,
        conn: &Conn,
        refresh_token: &Secret,
        flight: &watch::Sender<Option<Outcome>>,
    ) -> Result<Granted, TokenError> {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        let token_timeout = self.config.token_timeout;
        let grant = Grant::RefreshToken {
            refresh_token: refresh_token.expose(),
        };
        let answer = tokens::grant::request_within(
            &self.endpoint,
            grant,
            token_timeout.max(REFRESH_PATIENCE),
        );
        tokio::pin!(answer);
        if let Ok(result) = tokio::time::timeout(token_timeout, &mut answer).await {
            return result;
        }
        let late = TokenError::Timeout {
            host: self.endpoint.host(),
            after: token_timeout,
        };
        tracing::warn!(pool, connection = id, error = %late, "still waiting for the refresh's answer: a refresh token it rotates must not be lost");
        flight.send_replace(Some(Err(PoolError::Unavailable {
            id: id.to_owned(),
            reason: late.to_string(),
            retry_after: Duration::from_secs(1),
        })));
        let ttl = token_timeout.saturating_add(LEASE_SLACK);
        let mut renew = tokio::time::interval(ttl / 2);
        renew.tick().await;
        loop {
            tokio::select! {
                result = &mut answer => return result,
                _ = renew.tick() => {
                    if let Err(e) = self.store.lease(pool, id, ttl).await {
                        tracing::debug!(pool, connection = id, error = %e, "cannot renew the refresh lease");
                    }
                }
            }
        }
    }

    /// Uses the stored token if another holder refreshed it.
    fn adopt(&self, conn: &Conn, record: &Record) -> Option<Fresh> {
        if record.info.state != ConnectionState::Active {
            return None;
        }
        let t = tokens::stored_token(record, self.config.refresh_before)?;
        let rejected = conn.rejected.load();
        if rejected
            .as_ref()
            .is_some_and(|r| r.secret().expose() == t.secret().expose())
        {
            return None;
        }
        let now = Instant::now();
        (t.is_usable(now) && now < t.refresh_at).then(|| {
            self.metrics.from_store.inc();
            conn.install(t, record.version.clone())
        })
    }

    /// Commits what a refresh obtained (conditional on the refresh token
    /// sent), then installs the access token. A store that cannot take it
    /// now gets it later: the tokens are parked in the ledger. An access
    /// token whose refresh token did not rotate serves at once either way
    /// (nothing the store lacks could be lost).
    async fn granted(
        &self,
        conn: &Conn,
        g: Granted,
        sent: Secret,
        seen: &Version,
    ) -> Result<Fresh, Retry> {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        let rotated = g
            .refresh_token
            .as_ref()
            .is_some_and(|n| n.expose() != sent.expose());
        let token = Token::from_granted(&g, self.config.refresh_before);
        let tokens = Tokens {
            refresh_token: Some(g.refresh_token.clone().unwrap_or(sent)),
            access_token: token.as_ref().ok().map(|_| g.access_token.clone()),
            access_expires_at: token.as_ref().ok().map(|_| g.expires_ms()),
        };
        match self.store.commit_refresh(pool, id, seen, &tokens).await {
            Ok(Written::Done(record)) => match token {
                Ok(t) => {
                    self.metrics.from_refresh.inc();
                    Ok(conn.install(t, record.version))
                }
                Err(e) => Err(Retry::No(self.failed(conn, &record, &e).await)),
            },
            Ok(Written::Superseded(record)) => {
                tracing::info!(pool, connection = id, "the connection changed while it was refreshed (re-authorized, or refreshed by another replica); the stored tokens win");
                let _ = self.store.release(pool, id).await;
                match self.adopt(conn, &record) {
                    Some(t) => Ok(t),
                    None => Err(Retry::Superseded),
                }
            }
            Ok(Written::Gone) => {
                self.forget_local(id).await;
                Err(Retry::No(PoolError::NotFound(id.to_owned())))
            }
            Err(e) => {
                tracing::warn!(pool, connection = id, error = %e, rotated, "the store did not take the refreshed tokens; they are kept in memory and committed when it does");
                self.ledger.park(
                    (pool.to_owned(), id.to_owned()),
                    Parked {
                        tokens,
                        seen: seen.clone(),
                    },
                );
                match token {
                    Ok(t) if !rotated => Ok(conn.install(t, seen.clone())),
                    _ => Err(Retry::No(store_err(e))),
                }
            }
        }
    }

    /// The provider said the grant is dead: the connection turns
    /// `needs_reauthorization`, unless the row holds another refresh token
    /// by now (re-authorized, or rotated by another holder: then that one
    /// is tried).
    async fn grant_dead(
        &self,
        conn: &Conn,
        record: &Record,
        e: &LastError,
    ) -> Result<Fresh, Retry> {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        match self
            .store
            .mark_needs_reauthorization(pool, id, &record.version, e)
            .await
        {
            Ok(Written::Done(_)) => {}
            Ok(Written::Superseded(r)) => {
                return match self.adopt(conn, &r) {
                    Some(t) => Ok(t),
                    None => Err(Retry::Superseded),
                }
            }
            Ok(Written::Gone) => {
                self.forget_local(id).await;
                return Err(Retry::No(PoolError::NotFound(id.to_owned())));
            }
            Err(err) => {
                tracing::warn!(pool, connection = id, error = %err, "cannot record needs_reauthorization in the store; this process stops using the connection");
            }
        }
        conn.revoke(true);
        conn.rejected.store(None);
        self.recount.notify_one();
        Err(Retry::No(PoolError::Reauthorization(id.to_owned())))
    }

    /// The endpoint refused the client (not the user's grant): every user
    /// of the pool waits a short, growing while; no connection changes.
    async fn client_refused(&self, conn: &Conn, record: &Record, e: &TokenError) -> PoolError {
        let pool = self.config.name.as_str();
        let (delay, escalated) = {
            let mut f = lock(&self.client_failure);
            let now = Instant::now();
            match f.as_ref().filter(|f| now < f.retry_at) {
                // A refusal of a request sent before the backoff began: the
                // same episode, not a reason to wait longer.
                Some(pending) => (pending.retry_at.saturating_duration_since(now), false),
                None => {
                    let next = Failure::after(
                        f.as_ref(),
                        |n| {
                            CLIENT_BACKOFF
                                .saturating_mul(1u32 << n.saturating_sub(1).min(16))
                                .min(CLIENT_BACKOFF_MAX)
                        },
                        e.to_string(),
                    );
                    let delay = next.retry_at.saturating_duration_since(now);
                    *f = Some(next);
                    (delay, true)
                }
            }
        };
        if !escalated {
            return self.record_failure(conn, record, e, delay).await;
        }
        tracing::error!(pool, error = %e, retry_in = %humantime::format_duration(delay), "the token endpoint refused the pool's client (check client_id, client_secret and client_auth); no connection is changed, and every user works again once the endpoint accepts the client");
        self.record_failure(conn, record, e, delay).await
    }

    /// Records a transient failure and its backoff.
    async fn failed(&self, conn: &Conn, record: &Record, e: &TokenError) -> PoolError {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        let next = Failure::after(
            conn.failure().as_ref(),
            |n| tokens::backoff(e.is_transient(), n, rand::random()),
            e.to_string(),
        );
        let delay = next.retry_at.saturating_duration_since(Instant::now());
        tracing::warn!(pool, connection = id, error = %e, retry_in = %humantime::format_duration(delay), "refresh failed");
        *conn.failure() = Some(next);
        self.record_failure(conn, record, e, delay).await
    }

    /// Writes a failure to the row (frees the lease; conditional like every
    /// write) and answers it with `Retry-After: delay`.
    async fn record_failure(
        &self,
        conn: &Conn,
        record: &Record,
        e: &TokenError,
        delay: Duration,
    ) -> PoolError {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        let (error, description) = e.oauth_fields();
        if let Err(err) = self
            .store
            .record_failure(pool, id, &record.version, &last_error(error, description))
            .await
        {
            tracing::debug!(pool, connection = id, error = %err, "cannot record the failure");
        }
        PoolError::Unavailable {
            id: id.to_owned(),
            reason: e.to_string(),
            retry_after: delay,
        }
    }

    /// The upstream answered `reauth_on` to `token`. A JSON `code` in
    /// `revoked_codes` turns the connection `needs_reauthorization` (no
    /// refresh, no replay) — if the store still holds the refresh token
    /// that token came from (a re-authorization since wins); otherwise the
    /// token is dropped (unless younger than the floor) and a new one
    /// obtained for one replay.
    pub async fn rejected(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        token: &Arc<Token>,
        body: &[u8],
        deadline: Instant,
        replay: bool,
    ) -> Rejected {
        if let Some(code) = self.revoked_code(body) {
            self.consent_revoked(conn, token, &code).await;
            return Rejected::PassThrough;
        }
        let now = Instant::now();
        // A fresh replacement of a rejected token, rejected again, points
        // at a permission problem: its answer passes through.
        if !token.rejectable(now) {
            return Rejected::PassThrough;
        }
        conn.drop_token(token);
        if !replay {
            return Rejected::PassThrough;
        }
        match conn.usable(now) {
            // Another request already replaced it.
            Some(t) if !Arc::ptr_eq(&t, token) => Rejected::Replay(t),
            _ => match self.refresh_now(conn, deadline).await {
                Ok(t) => Rejected::Replay(t),
                Err(_) => Rejected::PassThrough,
            },
        }
    }

    async fn consent_revoked(&self, conn: &Conn, token: &Arc<Token>, code: &str) {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        let e = last_error(
            "consent_revoked".into(),
            Some(format!(
                "the API answered code {code}: the user's consent is revoked or expired"
            )),
        );
        let seen = {
            let held = lock(&conn.version);
            match &held.0 {
                Some(t) if Arc::ptr_eq(t, token) => Some(held.1.clone()),
                _ => None,
            }
        };
        let Some(seen) = seen else {
            // The connection holds another token by now (a refresh, or a
            // re-authorization): this answer is about the old one. Passed
            // through; a request with the current token tells.
            tracing::info!(pool, connection = id, code, "consent revoked for a token replaced since: passed through, the connection is left as it is");
            return;
        };
        match self
            .store
            .mark_needs_reauthorization(pool, id, &seen, &e)
            .await
        {
            Ok(Written::Superseded(_)) => {
                tracing::info!(pool, connection = id, code, "consent revoked for tokens replaced since (the user authorized again): ignored");
                return;
            }
            Ok(Written::Gone) => {
                conn.revoke(false);
                self.forget_local(id).await;
                return;
            }
            Ok(Written::Done(_)) => {
                tracing::info!(
                    pool,
                    connection = id,
                    code,
                    "consent revoked: the connection needs reauthorization"
                );
            }
            Err(err) => {
                tracing::warn!(pool, connection = id, code, error = %err, "consent revoked, but the store cannot record it; this process stops using the connection");
            }
        }
        conn.revoke(true);
        conn.rejected.store(None);
        self.recount.notify_one();
    }

    /// The `code` of a JSON error body when it is one of `revoked_codes`.
    fn revoked_code(&self, body: &[u8]) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let code = match v.get("code")? {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return None,
        };
        self.config.revoked_codes.contains(&code).then_some(code)
    }

    /// Exchanges a code or refresh token now and stores the connection
    /// (replacing one with the same id: re-authorization). The id is
    /// `id`, else the token's `sub` if it is a valid id, else random.
    /// Returns the connection and whether it was created. Runs in a task
    /// of its own: an admin client that leaves does not lose the tokens a
    /// spent code bought.
    pub async fn authorize(
        self: &Arc<Self>,
        exchange: Exchange<'_>,
        id: Option<&str>,
    ) -> Result<(ConnectionInfo, bool), AuthorizeError> {
        let (grant, code_or_rt, redirect_uri) = match exchange {
            Exchange::Code { code, redirect_uri } => (
                false,
                Secret::new(code.to_owned()),
                redirect_uri
                    .or(self.config.redirect_uri.as_deref())
                    .unwrap_or("")
                    .to_owned(),
            ),
            Exchange::RefreshToken(rt) => (true, Secret::new(rt.to_owned()), String::new()),
        };
        let (pool, id) = (Arc::clone(self), id.map(str::to_owned));
        let task = self.ledger.tasks.spawn(async move {
            pool.authorize_owned(grant, code_or_rt, redirect_uri, id)
                .await
        });
        task.await.unwrap_or_else(|e| {
            Err(AuthorizeError::EndpointUnavailable(
                TokenError::InvalidResponse(format!("the exchange ended abnormally: {e}")),
            ))
        })
    }

    async fn authorize_owned(
        &self,
        refresh: bool,
        presented: Secret,
        redirect_uri: String,
        id: Option<String>,
    ) -> Result<(ConnectionInfo, bool), AuthorizeError> {
        let grant = if refresh {
            Grant::RefreshToken {
                refresh_token: presented.expose(),
            }
        } else {
            Grant::AuthorizationCode {
                code: presented.expose(),
                redirect_uri: &redirect_uri,
            }
        };
        // A single-use code must not be spent on a grant the store cannot keep.
        self.store
            .probe_write()
            .await
            .map_err(AuthorizeError::Store)?;
        let result = tokens::grant::request(&self.endpoint, grant).await;
        self.metrics.token_request(
            result
                .as_ref()
                .map_or_else(TokenError::outcome, |_| "success"),
        );
        let g = match result {
            Ok(g) => g,
            Err(e @ TokenError::Rejected { .. }) if !e.is_transient() => {
                let (error, description) = e.oauth_fields();
                return Err(AuthorizeError::Rejected { error, description });
            }
            Err(e) => return Err(AuthorizeError::EndpointUnavailable(e)),
        };
        let id = match id {
            Some(id) => id,
            None => g
                .sub
                .clone()
                .filter(|s| valid_id(s))
                .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>())),
        };
        let tokens = Tokens {
            refresh_token: g
                .refresh_token
                .clone()
                .or_else(|| refresh.then_some(presented)),
            access_token: Some(g.access_token.clone()),
            access_expires_at: Some(g.expires_ms()),
        };
        let name = &self.config.name;
        let start = Instant::now();
        let mut wait = Duration::from_millis(100);
        let stored = loop {
            match self
                .store
                .authorize(name, &id, g.sub.as_deref(), &tokens)
                .await
            {
                Ok(stored) => break stored,
                Err(e) if e.is_unavailable() && start.elapsed() < AUTHORIZE_STORE_RETRY => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::error!(pool = %name, connection = %id, error = %e, "the store did not take a just-authorized connection; the user must authorize again");
                    return Err(AuthorizeError::Store(e));
                }
            }
        };
        self.forget(&id).await;
        tracing::info!(pool = %name, connection = %id, created = stored.1, "connection authorized");
        Ok(stored)
    }

    /// Forgets a connection in memory (after an admin change).
    pub async fn forget(&self, id: &str) {
        self.forget_local(id).await;
        self.recount.notify_one();
    }

    /// Drops a connection from the cache, so that the next request reads
    /// it afresh (and a read in progress is not kept).
    async fn forget_local(&self, id: &str) {
        self.forgets.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate(id).await;
        self.cache.run_pending_tasks().await;
    }

    /// Access tokens in memory.
    pub fn cache_size(&self) -> u64 {
        self.cache.entry_count()
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

/// Why a refresh under the lease did not produce a token.
enum Retry {
    /// The row holds another refresh token than the one read: try again.
    Superseded,
    /// The answer.
    No(PoolError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_contract() {
        for ok in ["a", "user-1", "a.b_c:d@e-f", &"x".repeat(128)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", &"x".repeat(129), "a\0"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_select_header_is_checked_and_removed() {
        let name = HeaderName::from_static("x-flinks-connection");
        let mut h = HeaderMap::new();
        h.insert(&name, HeaderValue::from_static("alice"));
        assert_eq!(select(&mut h, &name).unwrap().as_str(), "alice");
        assert!(h.is_empty());
        for bad in [vec![], vec![""], vec!["a b"], vec!["alice", "bob"]] {
            let mut h = HeaderMap::new();
            for v in bad {
                h.append(&name, HeaderValue::from_str(v).unwrap());
            }
            assert!(matches!(
                select(&mut h, &name),
                Err(PoolError::ConnectionRequired(_))
            ));
            assert!(h.is_empty());
        }
    }
}
