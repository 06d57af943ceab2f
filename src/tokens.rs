//! One [`TokenSource`] per credential: the cached access token, the single
//! background task that fetches and renews it, and the state file of
//! refresh tokens. [`Token`] (a cached token with prebuilt header values,
//! in `token`) is shared with per-user pools; so is [`grant`], the one token request,
//! [`jwt`], the one JWT claims decoder, and [`dpop`], the DPoP proofs of
//! both.
//!
//! The request path only reads: [`TokenSource::usable`] is a lock-free
//! `arc-swap` load. Every token request is made by the source's refresh
//! task, so "single flight" holds by construction: requests that find no
//! usable token wait on a `watch` channel for the task's next result, or
//! answer `503 token_unavailable` at once when the last attempt failed.
//! This module does not know about routes or HTTP requests from clients.

pub mod dpop;
pub mod grant;
pub mod jwt;
pub mod refresh;
pub mod shared;
pub mod state;
#[cfg(test)]
mod tests;
mod token;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{CredentialConfig, GrantType};
use crate::ground::lock;
use crate::ground::metrics::CredentialMetrics;
use crate::ground::secret::Secret;
pub use grant::{Endpoint, Grant, Granted, TokenError, DEFAULT_LIFETIME, MAX_LIFETIME};
pub use jwt::{jwt_claims, Claims};
use refresh::{Persistence, RefreshState};
pub use token::{stored_token, Token, REJECT_FLOOR_MAX};

/// First retry delay after a transient failure; doubles per attempt.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Ceiling of the transient backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Delay after a non-transient failure (bad credentials do not fix themselves
/// quickly; hammering the endpoint can get the client locked out).
pub const BACKOFF_REJECTED: Duration = Duration::from_secs(300);

/// The delay before the next attempt after `attempt` consecutive failures
/// (1-based). `jitter` in [0, 1) spreads replicas: the delay is drawn from
/// [base/2, base].
pub fn backoff(transient: bool, attempt: u32, jitter: f64) -> Duration {
    let base = if transient {
        let exp = attempt.saturating_sub(1).min(16);
        BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
    } else {
        BACKOFF_REJECTED
    };
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// What `/status` says about a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// A usable token is cached.
    Valid,
    /// A token request is in flight and no usable token is cached.
    Refreshing,
    /// The last token request failed.
    Failing,
    /// The refresh token or code was refused: a person must authorize again.
    NeedsReauthorization,
}

/// The last failure, shared with waiting requests.
struct Failure {
    retry_at: Instant,
    reason: String,
    needs_reauthorization: bool,
}

#[derive(Default)]
struct Status {
    last_refresh: Option<SystemTime>,
    last_error: Option<(SystemTime, String, Option<String>)>,
}

/// Why a request cannot have a token now.
#[derive(Debug, Clone)]
pub struct Unavailable {
    /// Secret-free reason.
    pub reason: String,
    /// When trying again makes sense.
    pub retry_after: Duration,
}

/// What [`TokenSource::reject`] did with an upstream rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The token was dropped; the refresh task fetches a new one.
    Refreshed,
    /// Another rejection already dropped it: its successor is (or will be)
    /// there, and a replay may use it.
    AlreadyRefreshed,
    /// The token is younger than the floor ([`Token::rejectable`]): kept,
    /// and the upstream's answer passed through.
    IgnoredFresh,
}

/// The token cache and refresher of one credential.
pub struct TokenSource {
    config: Arc<CredentialConfig>,
    endpoint: Endpoint,
    current: ArcSwapOption<Token>,
    failure: ArcSwapOption<Failure>,
    changed: watch::Sender<u64>,
    wake: Notify,
    refresh: Arc<RefreshState>,
    status: Mutex<Status>,
    ready: AtomicBool,
    /// A token request is on the wire (requests wait for it rather than
    /// answer from the previous failure).
    in_flight: AtomicBool,
    /// The upstream rejected the cached token: the next one replaces it.
    rejected: AtomicBool,
    /// The supervised refresh task, awaited by a successor after a reload.
    task: Mutex<Option<JoinHandle<()>>>,
    metrics: CredentialMetrics,
    /// Test hook: the next token request panics.
    #[cfg(test)]
    panic_next: AtomicBool,
}

/// Clears the in-flight flag however the request ends (panics included).
struct InFlight<'a>(&'a TokenSource);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.store(false, Ordering::Release);
        self.0.changed.send_modify(|g| *g += 1);
    }
}

impl TokenSource {
    /// Builds a source: its HTTP client and, for refresh grants, the refresh
    /// token from the state file (or the config). Fails on an unreadable or
    /// corrupt state file. Reads the state file: call it off runtime threads
    /// once serving.
    pub fn new(
        config: Arc<CredentialConfig>,
        metrics: CredentialMetrics,
    ) -> Result<Arc<TokenSource>, String> {
        TokenSource::with_state(config, metrics, None)
    }

    /// As [`TokenSource::new`], sharing `previous`'s refresh-token state
    /// when it is the same state (see [`refresh`]).
    pub fn with_state(
        config: Arc<CredentialConfig>,
        metrics: CredentialMetrics,
        previous: Option<&Arc<RefreshState>>,
    ) -> Result<Arc<TokenSource>, String> {
        TokenSource::with_store(config, metrics, previous, None)
    }

    /// As [`TokenSource::with_state`], with the store a credential whose
    /// tokens live there ([`CredentialConfig::in_store`]) uses.
    pub fn with_store(
        config: Arc<CredentialConfig>,
        metrics: CredentialMetrics,
        previous: Option<&Arc<RefreshState>>,
        store: Option<&Arc<crate::store::Store>>,
    ) -> Result<Arc<TokenSource>, String> {
        let endpoint = Endpoint::from_credential(&config).map_err(|e| e.to_string())?;
        let refresh = RefreshState::inherit_or_load(&config, previous, store)?;
        Ok(Arc::new(TokenSource {
            config,
            endpoint,
            current: ArcSwapOption::empty(),
            failure: ArcSwapOption::empty(),
            changed: watch::Sender::new(0),
            wake: Notify::new(),
            refresh,
            status: Mutex::new(Status::default()),
            ready: AtomicBool::new(false),
            in_flight: AtomicBool::new(false),
            rejected: AtomicBool::new(false),
            task: Mutex::new(None),
            metrics,
            #[cfg(test)]
            panic_next: AtomicBool::new(false),
        }))
    }

    /// The credential's settings.
    pub fn config(&self) -> &Arc<CredentialConfig> {
        &self.config
    }

    /// Its DPoP proofs and nonces, with `dpop = true`.
    pub fn dpop(&self) -> Option<&Arc<dpop::Dpop>> {
        self.endpoint.dpop.as_ref()
    }

    /// The refresh-token state (shared with other generations of this
    /// credential).
    pub fn refresh_state(&self) -> &Arc<RefreshState> {
        &self.refresh
    }

    /// The cached token if it may be sent now. Lock-free.
    #[inline]
    pub fn usable(&self) -> Option<Arc<Token>> {
        self.usable_at(Instant::now())
    }

    /// [`TokenSource::usable`] at `now` (the request's clock).
    #[inline]
    pub fn usable_at(&self, now: Instant) -> Option<Arc<Token>> {
        let guard = self.current.load();
        match &*guard {
            Some(t) if t.is_usable(now) => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// A usable token, waiting until `deadline` while a token request is
    /// under way (a retry after a failure included); at once
    /// [`Unavailable`] when the last attempt failed and no retry is on the
    /// wire.
    pub async fn get(&self, deadline: impl Into<Instant>) -> Result<Arc<Token>, Unavailable> {
        let deadline: Instant = deadline.into();
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        let mut rx = self.changed.subscribe();
        loop {
            if let Some(t) = self.usable() {
                return Ok(t);
            }
            if let Some(f) = &*self.failure.load() {
                if !self.in_flight.load(Ordering::Acquire) {
                    return Err(Unavailable {
                        reason: f.reason.clone(),
                        retry_after: f.retry_at.saturating_duration_since(Instant::now()),
                    });
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => {
                    return Err(Unavailable {
                        reason: "the token request is taking too long".into(),
                        retry_after: Duration::from_secs(1),
                    })
                }
            }
        }
    }

    /// The upstream rejected `token`. Drops it if it is still the cached
    /// one and old enough ([`Token::rejectable`]), and has the refresh task
    /// fetch a new one: a burst of rejections of one token causes one token
    /// request, and rejections of a fresh token cause none. Counted in
    /// `flinks_proxy_token_rejections_total`.
    pub fn reject(&self, token: &Arc<Token>) -> Rejection {
        let outcome = self.drop_rejected(token);
        let m = &self.metrics;
        match outcome {
            Rejection::Refreshed => {
                tracing::info!(credential = %self.config.name, "upstream rejected the token; fetching a new one");
                m.rejections_refreshed.inc();
            }
            Rejection::AlreadyRefreshed => m.rejections_already_refreshed.inc(),
            Rejection::IgnoredFresh => {
                tracing::debug!(credential = %self.config.name, "upstream rejected a fresh token; passing its answer through");
                m.rejections_ignored_fresh.inc();
            }
        }
        outcome
    }

    fn drop_rejected(&self, token: &Arc<Token>) -> Rejection {
        let cur = self.current.load();
        if !cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) {
            return Rejection::AlreadyRefreshed;
        }
        if !token.rejectable(Instant::now()) {
            return Rejection::IgnoredFresh;
        }
        let prev = self.current.compare_and_swap(&*cur, None);
        if prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, token)) {
            self.rejected.store(true, Ordering::Release);
            self.wake.notify_one();
            Rejection::Refreshed
        } else {
            Rejection::AlreadyRefreshed
        }
    }

    /// Whether a first token has been obtained since start.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether this credential must exchange its authorization code first.
    pub fn needs_code_exchange(&self) -> bool {
        self.config.grant_type == GrantType::AuthorizationCode
            && self.refresh.refresh_token().is_none()
    }

    /// The current state, for `/status`.
    pub fn state(&self) -> SourceState {
        let failure = self.failure.load();
        match (&*failure, self.usable().is_some()) {
            (Some(f), _) if f.needs_reauthorization => SourceState::NeedsReauthorization,
            (_, true) => SourceState::Valid,
            (Some(_), false) => SourceState::Failing,
            (None, false) => SourceState::Refreshing,
        }
    }

    /// `/status` JSON for this credential (never a secret; the `sub` claim,
    /// personal data, only with `show_subjects`; the token URL without its
    /// query).
    pub fn status_json(&self, show_subjects: bool) -> serde_json::Value {
        let token = self.current.load_full();
        let st = lock(&self.status);
        let fmt_time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let expires_at = token
            .as_ref()
            .and_then(|t| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(t.expires_unix)));
        let m = &self.metrics;
        let mut json = serde_json::json!({
            "grant": self.config.grant_type.as_str(),
            "state": self.state(),
            "token_url": without_query(&self.config.token_url),
            "client_id": self.config.client_id,
            "expires_at": expires_at.map(fmt_time),
            "scope": token.as_ref().and_then(|t| t.scope.clone()),
            "last_refresh": st.last_refresh.map(fmt_time),
            "last_error": st.last_error.as_ref().map(|(at, error, desc)| serde_json::json!({
                "at": fmt_time(*at), "error": error, "error_description": desc,
            })),
            "next_attempt_in_seconds": self.failure.load().as_ref().map(|f| f.retry_at.saturating_duration_since(Instant::now()).as_secs()),
            "token_requests": {
                "success": m.success.get(),
                "rejected": m.rejected.get(),
                "server_error": m.server_error.get(),
                "timeout": m.timeout.get(),
                "network": m.network.get(),
                "invalid_response": m.invalid_response.get(),
            },
        });
        if let Some(d) = &self.endpoint.dpop {
            // Whether the endpoint bound the token to the key, or answered
            // a Bearer token to a DPoP request (then sent as Bearer).
            json["dpop"] = serde_json::json!({
                "jkt": d.thumbprint(),
                "token_type": token.as_ref().map(|t| if t.ath.is_some() { "DPoP" } else { "Bearer" }),
            });
        }
        if show_subjects {
            let sub = token
                .as_ref()
                .and_then(|t| t.sub.clone())
                .or_else(|| self.refresh.sub());
            json["sub"] = sub.into();
        }
        json
    }

    /// Starts the supervised refresh task; it stops when `cancel` is
    /// cancelled, between token requests (never mid-request). With `after`
    /// (the task of the generation this source replaces), it first waits
    /// for that task to end.
    pub fn spawn(self: &Arc<Self>, cancel: CancellationToken, after: Option<JoinHandle<()>>) {
        let me = Arc::clone(self);
        let handle = tokio::spawn(async move {
            if let Some(previous) = after {
                let _ = previous.await;
            }
            me.supervise(cancel).await;
        });
        *lock(&self.task) = Some(handle);
    }

    /// The refresh task's handle, for a successor to await.
    pub fn take_task(&self) -> Option<JoinHandle<()>> {
        lock(&self.task).take()
    }

    /// Runs the refresh loop; a panic is logged, counted and the loop
    /// restarted with backoff, so a credential never stays without a task.
    async fn supervise(self: Arc<Self>, cancel: CancellationToken) {
        let mut panics = 0u32;
        loop {
            let (me, c) = (Arc::clone(&self), cancel.clone());
            let err = match tokio::spawn(async move { me.refresh_loop(&c).await }).await {
                Ok(()) => return,
                Err(e) if e.is_panic() => e,
                Err(_) => return, // aborted: the runtime is shutting down
            };
            panics = panics.saturating_add(1);
            self.metrics.refresh_task_restarts.inc();
            let delay = backoff(true, panics, rand::random::<f64>());
            tracing::error!(
                credential = %self.config.name,
                panic = %panic_message(err),
                restart_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                "the token refresh task panicked (a bug: please report it); restarting"
            );
            self.record_failure(
                &TokenError::State("internal error in the token refresh task".into()),
                delay,
            );
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Fetches and renews until `cancel` is cancelled; cancellation is
    /// only looked at while waiting, so a token request (and the commit of
    /// a rotated refresh token) always completes.
    async fn refresh_loop(&self, cancel: &CancellationToken) {
        let mut failures = 0u32;
        loop {
            // A token obtained before the task started (an authorization
            // code exchanged at startup) or the last good one is renewed
            // when due, or at once when the upstream rejected it.
            let due = self.current.load().as_ref().map(|t| t.refresh_at);
            if let Some(refresh_at) = due {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep_until(refresh_at) => break,
                        _ = self.wake.notified() => {
                            if self.current.load().is_none() {
                                break;
                            }
                        }
                    }
                }
            }
            if cancel.is_cancelled() {
                return;
            }
            // Requests that find the last failure wait for this attempt
            // instead of answering from it; its outcome is recorded before
            // they are told.
            self.in_flight.store(true, Ordering::Release);
            let in_flight = InFlight(self);
            let result = self.fetch().await;
            let delay = match &result {
                Ok(_) => None,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    Some(backoff(e.is_transient(), failures, rand::random::<f64>()))
                }
            };
            match (result, delay) {
                (Ok(mut token), _) => {
                    failures = 0;
                    token.replaces_rejected = self.rejected.swap(false, Ordering::AcqRel);
                    self.install(token);
                }
                (Err(e), delay) => self.record_failure(&e, delay.unwrap_or(BACKOFF_MAX)),
            }
            drop(in_flight);
            if let Some(delay) = delay {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    /// Makes `token` the cached one and wakes waiting requests.
    pub fn install(&self, token: Token) {
        self.metrics
            .expiry
            .set(i64::try_from(token.expires_unix).unwrap_or(i64::MAX));
        tracing::info!(
            credential = %self.config.name,
            expires_in = token.lifetime.as_secs(),
            "token obtained"
        );
        self.current.store(Some(Arc::new(token)));
        self.failure.store(None);
        self.ready.store(true, Ordering::Release);
        lock(&self.status).last_refresh = Some(SystemTime::now());
        self.changed.send_modify(|g| *g += 1);
    }

    /// Records a failed attempt: `/status`, the log, and the answer of
    /// requests until `delay` has passed.
    pub fn record_failure(&self, e: &TokenError, delay: Duration) {
        let needs_reauthorization =
            e.is_refusal() && self.config.grant_type != GrantType::ClientCredentials;
        let (error, description) = e.oauth_fields();
        let retry_in = humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
        if e.is_transient() {
            tracing::warn!(credential = %self.config.name, error = %e, %retry_in, "token request failed");
            tracing::debug!(credential = %self.config.name, cause = ?e, "token request failure detail");
        } else if needs_reauthorization {
            tracing::error!(
                credential = %self.config.name, error = %error,
                error_description = description.as_deref().unwrap_or(""), %retry_in,
                "refresh token refused: the user must authorize again; put the new authorization code in the config and reload"
            );
        } else {
            tracing::error!(
                credential = %self.config.name, error = %error,
                error_description = description.as_deref().unwrap_or(""), %retry_in,
                "token request refused"
            );
        }
        lock(&self.status).last_error = Some((SystemTime::now(), error, description));
        let now = Instant::now();
        self.failure.store(Some(Arc::new(Failure {
            retry_at: now.checked_add(delay).unwrap_or(now),
            reason: if needs_reauthorization {
                "the credential needs re-authorization".into()
            } else {
                e.to_string()
            },
            needs_reauthorization,
        })));
        self.changed.send_modify(|g| *g += 1);
    }

    /// Makes one token request with the credential's grant, counts it, and
    /// commits any new refresh token before returning the access token.
    /// Requests on one refresh token are one at a time (across reloads).
    pub async fn fetch(&self) -> Result<Token, TokenError> {
        let _one_at_a_time = match self.config.grant_type {
            GrantType::ClientCredentials => None,
            _ => Some(self.refresh.lock().await),
        };
        #[cfg(test)]
        if self.panic_next.swap(false, Ordering::AcqRel) {
            panic!("test: token request panics");
        }
        let started = Instant::now();
        let result = self.request_token().await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let m = &self.metrics;
        let counter = match result.as_ref().map_err(TokenError::outcome) {
            Ok(_) | Err("success") => &m.success,
            Err("rejected") => &m.rejected,
            Err("server_error") => &m.server_error,
            Err("timeout") => &m.timeout,
            Err("network") => &m.network,
            Err(_) => &m.invalid_response,
        };
        counter.inc();
        result
    }

    async fn request_token(&self) -> Result<Token, TokenError> {
        let c = &self.config;
        if let Persistence::Store(slot) = self.refresh.persistence() {
            return slot.fetch(c, &self.endpoint).await;
        }
        let using = self.refresh.refresh_token();
        let grant = match (c.grant_type, &using) {
            (GrantType::ClientCredentials, _) => Grant::ClientCredentials,
            (_, Some(rt)) => Grant::RefreshToken {
                refresh_token: rt.expose(),
            },
            (GrantType::AuthorizationCode, None) => Grant::AuthorizationCode {
                code: c.code.as_ref().map_or("", Secret::expose),
                redirect_uri: c.redirect_uri.as_deref().unwrap_or(""),
                code_verifier: None,
            },
            (GrantType::RefreshToken, None) => {
                return Err(TokenError::State("no refresh token is configured".into()))
            }
        };
        let granted = grant::request(&self.endpoint, grant).await?;
        if !matches!(grant, Grant::ClientCredentials) {
            self.refresh.commit(c, &granted, using.as_ref()).await?;
        }
        Token::from_granted(&granted, c.refresh_before)
    }
}

/// A token URL as `/status` shows it: without its query, which may carry
/// secrets (some endpoints take an API key there).
fn without_query(url: &http::Uri) -> String {
    let mut s = String::new();
    if let Some(scheme) = url.scheme_str() {
        s.push_str(scheme);
        s.push_str("://");
    }
    if let Some(a) = url.authority() {
        s.push_str(a.as_str());
    }
    s.push_str(url.path());
    s
}

/// The message of a panic, when it is a string.
fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}
