//! The refresh path of a [`Pool`]: joining or starting the one refresh in
//! flight per connection, the lease, a takeover, the token request and
//! its patient wait, committing (or parking) what it obtained; and the
//! failure tail: a dead grant, a refused client, a transient failure and
//! their backoff. Parked tokens and flights are the
//! [`Ledger`](super::Ledger)'s.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    last_error, store_err, Conn, Failure, FlightGuard, Fresh, Outcome, Parked, Pool, PoolError,
};
use crate::ground::lock;
use crate::ground::secret::Secret;
use crate::store::{ConnectionState, LastError, Lease, Record, Tokens, Version, Written};
use crate::tokens::{self, Grant, Granted, Token, TokenError};

/// A waiter re-reads a row whose lease another holder has after this,
/// doubling up to [`LEASE_POLL_MAX`].
const LEASE_POLL: Duration = Duration::from_millis(25);
/// The longest wait between two reads of a leased row.
const LEASE_POLL_MAX: Duration = Duration::from_millis(400);

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

impl Pool {
    /// Starts one background refresh unless one runs or all of the pool's
    /// refresh slots are taken (the token stays usable; a later request
    /// tries again).
    pub(super) fn refresh_behind(self: &Arc<Self>, conn: &Arc<Conn>) {
        if !conn.refreshing.load(Ordering::Acquire) {
            let _ = self.start_refresh(conn, true, None);
        }
    }

    /// Starts a keep-alive refresh (`keepalive.rs`): a background refresh
    /// that calls the token endpoint even while the stored access token is
    /// fresh, as long as the row, read under the lease, still shows its
    /// refresh token unused since `cutoff` (Unix ms). Once another holder
    /// refreshed it (its commit moves `last_refresh_at`), this one uses
    /// that holder's token instead: one token request fleet-wide. `None`
    /// when the connection is backing off or no refresh slot is free.
    pub(super) fn refresh_idle(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        cutoff: i64,
    ) -> Option<watch::Receiver<Option<Outcome>>> {
        if self.backoff(conn).is_some() {
            return None;
        }
        self.start_refresh(conn, true, Some(cutoff))
    }

    /// Joins this connection's refresh in flight in this process (whichever
    /// generation's pool started it), or starts one in a task of its own:
    /// once sent, a token request runs to completion and its tokens are
    /// committed (or parked), whoever still waits. `None` only when
    /// `background` and no refresh slot is free. `idle_cutoff`: a
    /// keep-alive refresh (see [`Pool::refresh_idle`]).
    fn start_refresh(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        background: bool,
        idle_cutoff: Option<i64>,
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
            let outcome = pool.refresh(&conn, &tx, idle_cutoff).await;
            if let Err(e) = &outcome {
                tracing::debug!(pool = %pool.config.name, connection = %conn.id, error = %e, "refresh failed");
            }
            tx.send_replace(Some(outcome));
            drop(guard);
        });
        Some(rx)
    }

    /// Why a refresh must not be tried now: the connection's own backoff,
    /// or the pool's client refused.
    pub(super) fn backoff(&self, conn: &Conn) -> Option<PoolError> {
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
    pub(super) async fn refresh_now(
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
        let Some(mut rx) = self.start_refresh(conn, false, None) else {
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
    async fn refresh(
        &self,
        conn: &Conn,
        flight: &watch::Sender<Option<Outcome>>,
        idle_cutoff: Option<i64>,
    ) -> Outcome {
        if let Some(fresh) = self.commit_parked(conn).await? {
            return Ok(fresh);
        }
        let mut superseded = false;
        loop {
            let record = match self.take_lease(conn).await? {
                Ok(record) => record,
                Err(adopted) => return Ok(adopted),
            };
            match self.refresh_with(conn, record, flight, idle_cutoff).await {
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
                self.forget_local(&conn.id);
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
                    self.forget_local(id);
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
                    self.forget_local(id);
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

    /// The token request under the lease, and what its answer means. A
    /// fresh stored token is used instead, unless this is a keep-alive
    /// refresh (`idle_cutoff`) and the refresh token is still unused.
    async fn refresh_with(
        &self,
        conn: &Conn,
        record: Record,
        flight: &watch::Sender<Option<Outcome>>,
        idle_cutoff: Option<i64>,
    ) -> Result<Fresh, Retry> {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        if record.info.state == ConnectionState::NeedsReauthorization {
            let _ = self.store.release(pool, id).await;
            conn.revoke(true);
            return Err(Retry::No(PoolError::Reauthorization(id.to_owned())));
        }
        let keep_alive = idle_cutoff.is_some_and(|cutoff| {
            let info = &record.info;
            info.last_refresh_at.unwrap_or(info.authorized_at) <= cutoff
        });
        if let Some(t) = (!keep_alive).then(|| self.adopt(conn, &record)).flatten() {
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
    pub(super) fn adopt(&self, conn: &Conn, record: &Record) -> Option<Fresh> {
        if record.info.state != ConnectionState::Active {
            return None;
        }
        let t = tokens::stored_token(
            record,
            self.config.refresh_before,
            self.config.dpop_key.is_some(),
        )?;
        let rejected = conn.rejected.load();
        if rejected.as_ref().is_some_and(|r| r.expose() == t.expose()) {
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
                self.forget_local(id);
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
                self.forget_local(id);
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
        if escalated {
            tracing::error!(pool, error = %e, retry_in = %humantime::format_duration(delay), "the token endpoint refused the pool's client (check client_id, client_secret and client_auth); no connection is changed, and every user works again once the endpoint accepts the client");
        }
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
}

/// Why a refresh under the lease did not produce a token.
enum Retry {
    /// The row holds another refresh token than the one read: try again.
    Superseded,
    /// The answer.
    No(PoolError),
}
