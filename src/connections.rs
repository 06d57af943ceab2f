//! Per-user connection pools: one [`Pool`] per `[connections.NAME]`.
//!
//! A request names its connection in the pool's select header; its access
//! token comes from memory (a bounded LRU cache), else the store (one read,
//! coalesced per connection), else one refresh. Per connection there is one
//! token request at a time (single flight): a refresh takes the row's lease
//! in the store, re-reads it, uses a token another holder just committed if
//! it is fresh, else calls the endpoint and commits both tokens before the
//! access token is used. A token inside its refresh window is served while
//! one background refresh runs.
//!
//! Refusals turn the connection `needs_reauthorization` in the store;
//! transient failures back off per connection. This module does not parse
//! HTTP requests beyond the select header, and does not own the store's SQL.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::PoolConfig;
use crate::lock;
use crate::metrics::PoolMetrics;
use crate::secret::Secret;
use crate::store::{
    Change, ChangeKind, ConnectionInfo, ConnectionState, LastError, Lease, Record, Store,
    StoreError, Tokens,
};
use crate::token::{self, Endpoint, Grant, Granted, Token, TokenError};
use tokio::sync::broadcast::error::RecvError;

/// Longest connection id (CONNECTIONS.md).
pub const MAX_ID_LEN: usize = 128;
/// A waiter re-reads a row whose lease another holder has after this,
/// doubling up to [`LEASE_POLL_MAX`] (bounded by `request_timeout`).
const LEASE_POLL: Duration = Duration::from_millis(25);
/// The longest wait between two reads of a leased row.
const LEASE_POLL_MAX: Duration = Duration::from_millis(400);
/// With a shared store, a connection in memory is read again (in the
/// background) when a request uses it this long after the last read: the
/// safety net under notifications, so a deletion or new tokens missed by the
/// listener are seen within this bound plus one store read.
pub const REVALIDATE_AFTER: Duration = Duration::from_secs(5);
/// A lease outlives the token request it covers by this much.
const LEASE_SLACK: Duration = Duration::from_secs(5);
/// How often the per-state counts (`/status`, metrics) are read.
const COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// `1`-`128` of `[A-Za-z0-9._:@-]`.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// Why a pooled request gets no token.
#[derive(Debug, thiserror::Error)]
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

/// The last failure of a connection's refresh: requests answer at once
/// until `retry_at`.
struct Failure {
    retry_at: Instant,
    attempts: u32,
    reason: String,
}

/// One connection in memory.
pub struct Conn {
    id: String,
    held: ArcSwapOption<Token>,
    /// The token dropped after an upstream rejection, until the next one is
    /// installed: that one is subject to the no-storm floor
    /// ([`Token::rejectable`]), and a stored copy of this one is not used.
    rejected: ArcSwapOption<Token>,
    needs_reauthorization: AtomicBool,
    refreshing: AtomicBool,
    /// Single flight: whoever holds it refreshes.
    flight: tokio::sync::Mutex<()>,
    failure: Mutex<Option<Failure>>,
    /// Tokens a refresh obtained that the store did not take yet: a rotated
    /// refresh token must not be lost, and no access token is used before
    /// its refresh token is committed.
    uncommitted: Mutex<Option<Tokens>>,
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
            rejected: ArcSwapOption::empty(),
            needs_reauthorization: AtomicBool::new(false),
            refreshing: AtomicBool::new(false),
            flight: tokio::sync::Mutex::new(()),
            failure: Mutex::new(None),
            uncommitted: Mutex::new(None),
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

    fn install(&self, mut token: Token) -> Arc<Token> {
        token.replaces_rejected = self.rejected.swap(None).is_some();
        let token = Arc::new(token);
        self.held.store(Some(Arc::clone(&token)));
        *lock(&self.failure) = None;
        token
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
    cache: moka::future::Cache<String, Arc<Conn>>,
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
    source: token::grant::EndpointError,
}

impl Pool {
    /// A pool over `store`; [`Pool::spawn`] starts its counting task.
    pub fn new(
        config: Arc<PoolConfig>,
        store: Arc<Store>,
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
            cache,
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
            if now >= t.refresh_at && !self.backing_off(&conn) {
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
    /// for one id share one read. `true` for the caller that read it.
    async fn load(&self, id: &str) -> Result<(Arc<Conn>, bool), PoolError> {
        let pool = &self.config.name;
        let refresh_before = self.config.refresh_before;
        self.cache
            .entry_by_ref(id)
            .or_try_insert_with(async {
                let record = self
                    .store
                    .get(pool, id)
                    .await
                    .map_err(|e| PoolError::Store(Arc::new(e)))?
                    .ok_or_else(|| PoolError::NotFound(id.to_owned()))?;
                let conn = Conn::new(id.to_owned());
                if record.info.state == ConnectionState::NeedsReauthorization {
                    conn.needs_reauthorization.store(true, Ordering::Release);
                } else if let Some(t) = token::stored_token(&record, refresh_before) {
                    conn.install(t);
                }
                Ok(Arc::new(conn))
            })
            .await
            .map(|entry| {
                let fresh = entry.is_fresh();
                (entry.into_value(), fresh)
            })
            .map_err(|e: Arc<PoolError>| match &*e {
                PoolError::NotFound(id) => PoolError::NotFound(id.clone()),
                PoolError::Store(s) => PoolError::Store(Arc::clone(s)),
                other => PoolError::Unavailable {
                    id: id.to_owned(),
                    reason: other.to_string(),
                    retry_after: Duration::from_secs(1),
                },
            })
    }

    /// Starts one background refresh unless one runs.
    fn refresh_behind(self: &Arc<Self>, conn: &Arc<Conn>) {
        if conn.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, conn) = (Arc::clone(self), Arc::clone(conn));
        tokio::spawn(async move {
            let work = async {
                let _flight = conn.flight.lock().await;
                let due = conn
                    .usable(Instant::now())
                    .is_none_or(|t| Instant::now() >= t.refresh_at);
                if due && !pool.backing_off(&conn) {
                    if let Err(e) = pool.refresh(&conn).await {
                        tracing::debug!(pool = %pool.config.name, error = %e, "background refresh failed");
                    }
                }
            };
            tokio::select! {
                () = work => {}
                () = pool.cancel.cancelled() => {}
            }
            conn.refreshing.store(false, Ordering::Release);
        });
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
                    pool.cache.invalidate(&conn.id).await;
                }
                Ok(Some(r)) if r.info.state == ConnectionState::NeedsReauthorization => {
                    conn.revoke(true);
                }
                // Re-authorized elsewhere (a notification was missed): read
                // it afresh at the next request.
                Ok(Some(_)) if conn.needs_reauthorization.load(Ordering::Acquire) => {
                    pool.cache.invalidate(&conn.id).await;
                }
                Ok(Some(r)) => {
                    let held = conn.held.load().as_ref().map(|t| t.usable_until);
                    if let Some(t) = token::stored_token(&r, pool.config.refresh_before) {
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

    /// Follows a shared store's announcements (see [`crate::store::Change`]).
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
            ChangeKind::Created | ChangeKind::Reauthorized => self.cache.invalidate(&id).await,
            ChangeKind::Deleted => {
                if let Some(c) = self.cache.get(&id).await {
                    c.revoke(false);
                }
                self.cache.invalidate(&id).await;
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

    fn backing_off(&self, conn: &Conn) -> bool {
        conn.failure()
            .as_ref()
            .is_some_and(|f| Instant::now() < f.retry_at)
    }

    /// Waits for (or makes) a refresh, until `deadline`.
    async fn refresh_now(
        &self,
        conn: &Arc<Conn>,
        deadline: Instant,
    ) -> Result<Arc<Token>, PoolError> {
        let unavailable = |reason: String, retry_after| PoolError::Unavailable {
            id: conn.id.clone(),
            reason,
            retry_after,
        };
        let work = async {
            if let Some(f) = conn
                .failure()
                .as_ref()
                .filter(|f| Instant::now() < f.retry_at)
            {
                return Err(unavailable(f.reason.clone(), f.retry_at - Instant::now()));
            }
            let _flight = conn.flight.lock().await;
            if let Some(t) = conn.usable(Instant::now()) {
                self.metrics.from_memory.inc();
                return Ok(t);
            }
            if conn.needs_reauthorization.load(Ordering::Acquire) {
                return Err(PoolError::Reauthorization(conn.id.clone()));
            }
            if let Some(f) = conn
                .failure()
                .as_ref()
                .filter(|f| Instant::now() < f.retry_at)
            {
                return Err(unavailable(f.reason.clone(), f.retry_at - Instant::now()));
            }
            self.refresh(conn).await
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or_else(|_| {
                Err(unavailable(
                    "the token request is taking too long".into(),
                    Duration::from_secs(1),
                ))
            })
    }

    /// One refresh under the connection's flight lock: lease, re-read, use
    /// a fresh stored token or call the endpoint, commit, install.
    async fn refresh(&self, conn: &Conn) -> Result<Arc<Token>, PoolError> {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        let store_err = |e: StoreError| PoolError::Store(Arc::new(e));
        let ttl = self.config.token_timeout + LEASE_SLACK;
        let mut poll = LEASE_POLL;
        let record = loop {
            match self.store.lease(pool, id, ttl).await.map_err(store_err)? {
                Lease::Taken(r) => break r,
                Lease::Gone => {
                    self.cache.invalidate(id).await;
                    return Err(PoolError::NotFound(id.to_owned()));
                }
                Lease::Busy(r) => {
                    if let Some(t) = self.adopt(conn, &r) {
                        return Ok(t);
                    }
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(LEASE_POLL_MAX);
                }
            }
        };
        if record.info.state == ConnectionState::NeedsReauthorization {
            conn.needs_reauthorization.store(true, Ordering::Release);
            return Err(PoolError::Reauthorization(id.to_owned()));
        }
        let pending = lock(&conn.uncommitted).clone();
        if let Some(tokens) = pending {
            // A rotated refresh token the store did not take last time.
            // Committed (lease freed): the next round reads and adopts it.
            self.commit(conn, &tokens).await?;
            return Box::pin(self.refresh(conn)).await;
        }
        if let Some(t) = self.adopt(conn, &record) {
            self.store.release(pool, id).await.map_err(store_err)?;
            return Ok(t);
        }
        let Some(rt) = record.tokens.refresh_token.clone() else {
            let e = LastError {
                error: "no_refresh_token".into(),
                description: Some("the store holds no refresh token for this connection".into()),
                at: crate::store::now_ms(),
            };
            return self.reauthorization(conn, &e).await;
        };
        let result = token::grant::request(
            &self.endpoint,
            Grant::RefreshToken {
                refresh_token: rt.expose(),
            },
        )
        .await;
        self.metrics.token_request(
            result
                .as_ref()
                .map_or_else(TokenError::outcome, |_| "success"),
        );
        match result {
            Ok(g) => self.granted(conn, g, rt).await,
            Err(e) if e.is_refusal() => {
                let (error, description) = e.oauth_fields();
                tracing::warn!(pool, connection = id, error = %e, "refresh token refused: the connection needs reauthorization");
                let last = LastError {
                    error,
                    description,
                    at: crate::store::now_ms(),
                };
                self.reauthorization(conn, &last).await
            }
            Err(e) => Err(self.failed(conn, &e).await),
        }
    }

    /// Uses the stored token if another holder refreshed it.
    fn adopt(&self, conn: &Conn, record: &Record) -> Option<Arc<Token>> {
        let t = token::stored_token(record, self.config.refresh_before)?;
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
            conn.install(t)
        })
    }

    /// Commits what a refresh obtained, then installs the access token.
    async fn granted(
        &self,
        conn: &Conn,
        g: Granted,
        sent: Secret,
    ) -> Result<Arc<Token>, PoolError> {
        let refresh_token = Some(g.refresh_token.clone().unwrap_or(sent));
        let token = match Token::from_granted(&g, self.config.refresh_before) {
            Ok(t) => t,
            Err(e) => {
                // The access token is unusable, but a rotated refresh token
                // must still be kept.
                let keep = Tokens {
                    refresh_token,
                    access_token: None,
                    access_expires_at: None,
                };
                self.commit(conn, &keep).await?;
                return Err(self.failed(conn, &e).await);
            }
        };
        let tokens = Tokens {
            refresh_token,
            access_token: Some(g.access_token.clone()),
            access_expires_at: Some(expires_ms(&g)),
        };
        self.commit(conn, &tokens).await?;
        self.metrics.from_refresh.inc();
        Ok(conn.install(token))
    }

    /// Writes tokens; on failure keeps them in memory for the next attempt.
    async fn commit(&self, conn: &Conn, tokens: &Tokens) -> Result<(), PoolError> {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        match self.store.commit_refresh(pool, id, tokens).await {
            Ok(true) => {
                *lock(&conn.uncommitted) = None;
                Ok(())
            }
            Ok(false) => {
                // Deleted or turned needs_reauthorization meanwhile.
                *lock(&conn.uncommitted) = None;
                self.cache.invalidate(id).await;
                Err(PoolError::NotFound(id.to_owned()))
            }
            Err(e) => {
                *lock(&conn.uncommitted) = Some(tokens.clone());
                Err(PoolError::Store(Arc::new(e)))
            }
        }
    }

    async fn reauthorization(&self, conn: &Conn, e: &LastError) -> Result<Arc<Token>, PoolError> {
        conn.needs_reauthorization.store(true, Ordering::Release);
        conn.held.store(None);
        conn.rejected.store(None);
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        if let Err(err) = self.store.record_failure(pool, id, e, true).await {
            tracing::warn!(pool, connection = id, error = %err, "cannot record needs_reauthorization");
        }
        self.recount.notify_one();
        Err(PoolError::Reauthorization(id.to_owned()))
    }

    /// Records a transient failure and its backoff.
    async fn failed(&self, conn: &Conn, e: &TokenError) -> PoolError {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        let attempts = conn.failure().as_ref().map_or(0, |f| f.attempts) + 1;
        let delay = token::backoff(e.is_transient(), attempts, rand::random());
        tracing::warn!(pool, connection = id, error = %e, retry_in = %humantime::format_duration(delay), "refresh failed");
        *conn.failure() = Some(Failure {
            retry_at: Instant::now() + delay,
            attempts,
            reason: e.to_string(),
        });
        let (error, description) = e.oauth_fields();
        let last = LastError {
            error,
            description,
            at: crate::store::now_ms(),
        };
        if let Err(err) = self.store.record_failure(pool, id, &last, false).await {
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
    /// refresh, no replay); otherwise the token is dropped (unless younger
    /// than the floor) and a new one obtained for one replay.
    pub async fn rejected(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        token: &Arc<Token>,
        body: &[u8],
        deadline: Instant,
        replay: bool,
    ) -> Rejected {
        if let Some(code) = self.revoked_code(body) {
            let e = LastError {
                error: "consent_revoked".into(),
                description: Some(format!(
                    "the API answered code {code}: the user's consent is revoked or expired"
                )),
                at: crate::store::now_ms(),
            };
            tracing::info!(pool = %self.config.name, connection = %conn.id, code, "consent revoked: the connection needs reauthorization");
            let _ = self.reauthorization(conn, &e).await;
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
            _ => self.replay_with_new(conn, deadline).await,
        }
    }

    async fn replay_with_new(self: &Arc<Self>, conn: &Arc<Conn>, deadline: Instant) -> Rejected {
        match self.refresh_now(conn, deadline).await {
            Ok(t) => Rejected::Replay(t),
            Err(_) => Rejected::PassThrough,
        }
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
    /// Returns the connection and whether it was created.
    pub async fn authorize(
        &self,
        exchange: Exchange<'_>,
        id: Option<&str>,
    ) -> Result<(ConnectionInfo, bool), AuthorizeError> {
        let (grant, sent) = match exchange {
            Exchange::Code { code, redirect_uri } => (
                Grant::AuthorizationCode {
                    code,
                    redirect_uri: redirect_uri
                        .or(self.config.redirect_uri.as_deref())
                        .unwrap_or(""),
                },
                None,
            ),
            Exchange::RefreshToken(rt) => (Grant::RefreshToken { refresh_token: rt }, Some(rt)),
        };
        // A single-use code must not be spent on a grant the store cannot keep.
        self.store
            .probe_write()
            .await
            .map_err(AuthorizeError::Store)?;
        let result = token::grant::request(&self.endpoint, grant).await;
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
            Some(id) => id.to_owned(),
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
                .or_else(|| sent.map(|s| Secret::new(s.to_owned()))),
            access_token: Some(g.access_token.clone()),
            access_expires_at: Some(expires_ms(&g)),
        };
        let stored = self
            .store
            .authorize(&self.config.name, &id, g.sub.as_deref(), &tokens)
            .await
            .map_err(AuthorizeError::Store)?;
        self.forget(&id).await;
        tracing::info!(pool = %self.config.name, connection = %id, created = stored.1, "connection authorized");
        Ok(stored)
    }

    /// Forgets a connection in memory (after an admin change).
    pub async fn forget(&self, id: &str) {
        self.cache.invalidate(id).await;
        self.recount.notify_one();
    }

    /// Access tokens in memory.
    pub fn cache_size(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Counts by state as last read from the store, for `/status`.
    pub fn counts(&self) -> Vec<(ConnectionState, u64)> {
        lock(&self.counts).clone()
    }

    /// Starts the task that reads the per-state counts (every few seconds,
    /// and after admin changes) into `/status` and the gauge.
    pub fn spawn(self: &Arc<Self>) {
        if self.store.is_shared() {
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
        }
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
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// When a granted token expires, in Unix milliseconds.
pub fn expires_ms(g: &Granted) -> i64 {
    let lifetime = i64::try_from(g.lifetime.as_millis()).unwrap_or(i64::MAX);
    crate::store::now_ms().saturating_add(lifetime)
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
