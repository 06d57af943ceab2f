//! One [`TokenSource`] per credential: the cached access token, the single
//! background task that fetches and renews it, and the state file of
//! refresh tokens. [`Token`] (a cached token with prebuilt header values)
//! is shared with per-user pools; so is [`grant`], the one token request,
//! and [`jwt`], the one JWT claims decoder.
//!
//! The request path only reads: [`TokenSource::usable`] is a lock-free
//! `arc-swap` load. Every token request is made by the source's refresh
//! task, so "single flight" holds by construction: requests that find no
//! usable token wait on a `watch` channel for the task's next result, or
//! answer `503 token_unavailable` at once when the last attempt failed.
//! This module does not know about routes or HTTP requests from clients.

pub mod grant;
pub mod jwt;
pub mod state;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{AuthScheme, CredentialConfig, GrantType};
use crate::metrics::CredentialMetrics;
use crate::secret::Secret;
pub use grant::{Endpoint, Grant, Granted, TokenError, DEFAULT_LIFETIME, MAX_LIFETIME};
pub use jwt::{jwt_claims, Claims};

/// First retry delay after a transient failure; doubles per attempt.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Ceiling of the transient backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Delay after a non-transient failure (bad credentials do not fix themselves
/// quickly; hammering the endpoint can get the client locked out).
pub const BACKOFF_REJECTED: Duration = Duration::from_secs(300);
/// Never renew sooner than this after obtaining a token, whatever the
/// endpoint says, so a zero lifetime cannot turn into a request loop.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(500);
/// A token is not sent in the last part of its life (a tenth, at most
/// this), so clock drift and transit time cannot make it arrive expired.
const EXPIRY_MARGIN_MAX: Duration = Duration::from_secs(5);

/// A cached access token with its prebuilt header values.
pub struct Token {
    value: Secret,
    bearer: HeaderValue,
    bare: HeaderValue,
    /// The last instant the token may be sent.
    pub usable_until: Instant,
    /// When the refresh task renews it.
    pub refresh_at: Instant,
    /// Unix time the endpoint says it expires.
    pub expires_unix: u64,
    /// Granted scope, when the endpoint says.
    pub scope: Option<String>,
    /// The JWT `sub` claim, when present.
    pub sub: Option<String>,
    /// Lifetime granted.
    pub lifetime: Duration,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"***")
            .field("expires_unix", &self.expires_unix)
            .field("scope", &self.scope)
            .field("sub", &self.sub)
            .finish()
    }
}

impl Token {
    /// The header value for `scheme`: prebuilt for `Bearer` and bare tokens.
    pub fn header_value(&self, scheme: &AuthScheme) -> HeaderValue {
        match scheme {
            AuthScheme::Bearer => self.bearer.clone(),
            AuthScheme::Bare => self.bare.clone(),
            AuthScheme::Other(s) => {
                let mut v = HeaderValue::from_str(&format!("{s} {}", self.value.expose()))
                    .unwrap_or_else(|_| self.bare.clone());
                v.set_sensitive(true);
                v
            }
        }
    }

    /// The token itself (for `flinks-proxy token --show`).
    pub fn secret(&self) -> &Secret {
        &self.value
    }

    /// Whether it may still be sent.
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    /// A token obtained just now with `lifetime`, refreshed and retired as a
    /// fetched one would be (with the default `refresh_before`). For
    /// benchmarks and tests that put a token in a source with
    /// [`TokenSource::install`].
    pub fn new(access: &str, lifetime: Duration) -> Result<Token, TokenError> {
        let granted = Granted {
            access_token: Secret::new(access.to_owned()),
            refresh_token: None,
            lifetime: lifetime.min(MAX_LIFETIME),
            scope: None,
            sub: None,
            sent_at: Instant::now(),
            expires_unix: state::unix_now().saturating_add(lifetime.as_secs()),
        };
        Token::from_granted(&granted, crate::config::DEFAULT_REFRESH_BEFORE)
    }

    /// The cached form of a token request's answer: header values built
    /// once (marked sensitive), renewal due `refresh_before` ahead of expiry
    /// (at most half the lifetime), and retired a margin before expiry.
    /// Times count from when the request was sent.
    pub fn from_granted(g: &Granted, refresh_before: Duration) -> Result<Token, TokenError> {
        let access = g.access_token.expose();
        let invalid = || {
            TokenError::InvalidResponse(
                "access_token has characters not allowed in a header".into(),
            )
        };
        let mut bearer =
            HeaderValue::from_str(&format!("Bearer {access}")).map_err(|_| invalid())?;
        bearer.set_sensitive(true);
        let mut bare = HeaderValue::from_str(access).map_err(|_| invalid())?;
        bare.set_sensitive(true);
        let lifetime = g.lifetime.min(MAX_LIFETIME);
        let margin = (lifetime / 10).min(EXPIRY_MARGIN_MAX);
        let ahead = refresh_before.min(lifetime / 2);
        let refresh_in = lifetime.saturating_sub(ahead).max(MIN_REFRESH_INTERVAL);
        let at = |d: Duration| {
            g.sent_at
                .checked_add(d)
                .ok_or_else(|| TokenError::InvalidResponse("lifetime out of range".into()))
        };
        Ok(Token {
            value: g.access_token.clone(),
            bearer,
            bare,
            usable_until: at(lifetime.saturating_sub(margin))?,
            refresh_at: at(refresh_in)?,
            expires_unix: g.expires_unix,
            scope: g.scope.clone(),
            sub: g.sub.clone(),
            lifetime,
        })
    }
}

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

/// The token cache and refresher of one credential.
pub struct TokenSource {
    config: Arc<CredentialConfig>,
    endpoint: Endpoint,
    current: ArcSwapOption<Token>,
    failure: ArcSwapOption<Failure>,
    changed: watch::Sender<u64>,
    wake: Notify,
    refresh_token: Mutex<Option<Secret>>,
    sub: Mutex<Option<String>>,
    status: Mutex<Status>,
    ready: AtomicBool,
    metrics: CredentialMetrics,
}

impl TokenSource {
    /// Builds a source: its HTTP client and, for refresh grants, the refresh
    /// token from the state file (or the config). Fails on an unreadable or
    /// corrupt state file.
    pub fn new(
        config: Arc<CredentialConfig>,
        metrics: CredentialMetrics,
    ) -> Result<Arc<TokenSource>, String> {
        let endpoint = Endpoint::from_credential(&config).map_err(|e| e.to_string())?;
        let configured = match config.grant_type {
            GrantType::ClientCredentials => None,
            GrantType::RefreshToken => config.refresh_token.clone(),
            GrantType::AuthorizationCode => config.code.clone(),
        };
        let mut refresh_token = match config.grant_type {
            GrantType::RefreshToken => config.refresh_token.clone(),
            _ => None,
        };
        let mut sub = None;
        if let (Some(path), Some(origin)) = (&config.state_file, &configured) {
            if let Some(st) = state::load(path)? {
                if st.origin == state::fingerprint(origin) {
                    refresh_token = Some(Secret::new(st.refresh_token));
                    sub = st.sub;
                } else {
                    tracing::info!(
                        credential = %config.name,
                        "configured {} changed since the state file was written; using the new one",
                        if config.grant_type == GrantType::AuthorizationCode { "code" } else { "refresh_token" }
                    );
                }
            }
        }
        Ok(Arc::new(TokenSource {
            config,
            endpoint,
            current: ArcSwapOption::empty(),
            failure: ArcSwapOption::empty(),
            changed: watch::Sender::new(0),
            wake: Notify::new(),
            refresh_token: Mutex::new(refresh_token),
            sub: Mutex::new(sub),
            status: Mutex::new(Status::default()),
            ready: AtomicBool::new(false),
            metrics,
        }))
    }

    /// The credential's settings.
    pub fn config(&self) -> &Arc<CredentialConfig> {
        &self.config
    }

    /// The cached token if it may be sent now. Lock-free.
    #[inline]
    pub fn usable(&self) -> Option<Arc<Token>> {
        let guard = self.current.load();
        match &*guard {
            Some(t) if t.is_usable(Instant::now()) => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// A usable token, waiting until `deadline` for the refresh task when a
    /// token request is under way; at once [`Unavailable`] when the last
    /// attempt failed.
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
                return Err(Unavailable {
                    reason: f.reason.clone(),
                    retry_after: f.retry_at.saturating_duration_since(Instant::now()),
                });
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

    /// The upstream rejected `token`: drop it if it is still the cached one
    /// and have the refresh task fetch a new one. A burst of rejections of
    /// one token causes one token request.
    pub fn reject(&self, token: &Arc<Token>) {
        let cur = self.current.load();
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) {
            let prev = self.current.compare_and_swap(&*cur, None);
            if prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, token)) {
                tracing::info!(credential = %self.config.name, "upstream rejected the token; fetching a new one");
                self.wake.notify_one();
            }
        }
    }

    /// Whether a first token has been obtained since start.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether this credential must exchange its authorization code first.
    pub fn needs_code_exchange(&self) -> bool {
        self.config.grant_type == GrantType::AuthorizationCode
            && self.lock_refresh_token().is_none()
    }

    fn lock_refresh_token(&self) -> std::sync::MutexGuard<'_, Option<Secret>> {
        self.refresh_token.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
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

    /// `/status` JSON for this credential (never a secret).
    pub fn status_json(&self) -> serde_json::Value {
        let token = self.current.load_full();
        let st = self.lock_status();
        let fmt_time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let m = &self.metrics;
        serde_json::json!({
            "grant": self.config.grant_type.as_str(),
            "state": self.state(),
            "token_url": self.config.token_url.to_string(),
            "client_id": self.config.client_id,
            "expires_at": token.as_ref().map(|t| fmt_time(SystemTime::UNIX_EPOCH + Duration::from_secs(t.expires_unix))),
            "scope": token.as_ref().and_then(|t| t.scope.clone()),
            "sub": token.as_ref().and_then(|t| t.sub.clone()).or_else(|| self.sub.lock().unwrap_or_else(|e| e.into_inner()).clone()),
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
        })
    }

    /// Starts the refresh task; it stops when `cancel` is cancelled.
    pub fn spawn(self: &Arc<Self>, cancel: CancellationToken) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = me.refresh_loop() => {}
            }
        });
    }

    async fn refresh_loop(&self) {
        let mut failures = 0u32;
        loop {
            // A token obtained before the task started (an authorization
            // code exchanged at startup) or the last good one is renewed
            // when due, or at once when the upstream rejected it.
            let due = self.current.load().as_ref().map(|t| t.refresh_at);
            if let Some(refresh_at) = due {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(refresh_at) => break,
                        _ = self.wake.notified() => {
                            if self.current.load().is_none() {
                                break;
                            }
                        }
                    }
                }
            }
            match self.fetch().await {
                Ok(token) => {
                    failures = 0;
                    self.install(token);
                }
                Err(e) => {
                    failures += 1;
                    let delay = backoff(e.is_transient(), failures, rand::random::<f64>());
                    self.record_failure(&e, delay);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Makes `token` the cached one and wakes waiting requests.
    pub fn install(&self, token: Token) {
        self.metrics.expiry.set(token.expires_unix as i64);
        tracing::info!(
            credential = %self.config.name,
            expires_in = token.lifetime.as_secs(),
            sub = token.sub.as_deref().unwrap_or(""),
            "token obtained"
        );
        self.current.store(Some(Arc::new(token)));
        self.failure.store(None);
        self.ready.store(true, Ordering::Release);
        self.lock_status().last_refresh = Some(SystemTime::now());
        self.changed.send_modify(|g| *g += 1);
    }

    fn record_failure(&self, e: &TokenError, delay: Duration) {
        let needs_reauthorization = !e.is_transient()
            && matches!(e, TokenError::Rejected { .. })
            && self.config.grant_type != GrantType::ClientCredentials;
        let (error, description) = e.oauth_fields();
        if e.is_transient() {
            tracing::warn!(credential = %self.config.name, error = %e, retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)), "token request failed");
        } else if needs_reauthorization {
            tracing::error!(
                credential = %self.config.name, error = %error,
                error_description = description.as_deref().unwrap_or(""), retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                "refresh token refused: the user must authorize again; put the new authorization code in the config and reload"
            );
        } else {
            tracing::error!(
                credential = %self.config.name, error = %error,
                error_description = description.as_deref().unwrap_or(""), retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                "token request refused"
            );
        }
        self.lock_status().last_error = Some((SystemTime::now(), error, description));
        self.failure.store(Some(Arc::new(Failure {
            retry_at: Instant::now() + delay,
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
    /// persists any new refresh token before returning the access token.
    pub async fn fetch(&self) -> Result<Token, TokenError> {
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
        let using = self.lock_refresh_token().clone();
        let grant = match (c.grant_type, &using) {
            (GrantType::ClientCredentials, _) => Grant::ClientCredentials,
            (_, Some(rt)) => Grant::RefreshToken {
                refresh_token: rt.expose(),
            },
            (GrantType::AuthorizationCode, None) => Grant::AuthorizationCode {
                code: c.code.as_ref().map_or("", Secret::expose),
                redirect_uri: c.redirect_uri.as_deref().unwrap_or(""),
            },
            (GrantType::RefreshToken, None) => {
                return Err(TokenError::State("no refresh token is configured".into()))
            }
        };
        let granted = grant::request(&self.endpoint, grant).await?;
        if !matches!(grant, Grant::ClientCredentials) {
            self.keep_refresh_token(&granted, using.as_ref())?;
        }
        if let Some(s) = &granted.sub {
            *self.sub.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.clone());
        }
        Token::from_granted(&granted, c.refresh_before)
    }

    /// Commits the refresh token of `granted` (a new one from a code
    /// exchange or a server that rotates) before its access token is used.
    fn keep_refresh_token(
        &self,
        granted: &Granted,
        using: Option<&Secret>,
    ) -> Result<(), TokenError> {
        let c = &self.config;
        let new_refresh = granted.refresh_token.as_ref();
        let rotated = match (new_refresh, using) {
            (Some(n), Some(old)) => n.expose() != old.expose(),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !rotated && c.state_file.is_none() {
            return Ok(());
        }
        let Some(rt) = new_refresh.or(using) else {
            return Ok(());
        };
        // Keep a rotated refresh token in memory even if the write fails:
        // the server has already replaced the old one. The access token is
        // not used until the write succeeds (the retry rotates again and
        // writes again).
        let persisted = self.persist(rt.expose(), granted.sub.clone(), rotated);
        if rotated {
            if c.state_file.is_none() && c.grant_type == GrantType::RefreshToken {
                tracing::warn!(
                    credential = %c.name,
                    "the token endpoint rotated the refresh token and no state_file is set: \
                     a restart will use the configured one, which the server no longer accepts"
                );
            }
            *self.lock_refresh_token() = Some(rt.clone());
        }
        persisted
    }

    fn persist(
        &self,
        refresh_token: &str,
        sub: Option<String>,
        rotated: bool,
    ) -> Result<(), TokenError> {
        let Some(path) = &self.config.state_file else {
            return Ok(());
        };
        let origin = match self.config.grant_type {
            GrantType::AuthorizationCode => self.config.code.as_ref(),
            _ => self.config.refresh_token.as_ref(),
        };
        let now = state::unix_now();
        let obtained_at = if rotated {
            now
        } else {
            state::load(path)
                .ok()
                .flatten()
                .map(|s| s.obtained_at)
                .unwrap_or(now)
        };
        let st = state::State {
            refresh_token: refresh_token.to_owned(),
            sub,
            obtained_at,
            last_used_at: Some(now),
            origin: origin.map(state::fingerprint).unwrap_or_default(),
        };
        state::store(path, &st).map_err(TokenError::Persist)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(access: &str, lifetime: Duration) -> Granted {
        Granted {
            access_token: Secret::new(access.to_owned()),
            refresh_token: None,
            lifetime,
            scope: None,
            sub: None,
            sent_at: Instant::now(),
            expires_unix: 0,
        }
    }

    #[test]
    fn transient_backoff_doubles_to_a_minute() {
        let full = |n| backoff(true, n, 0.999_999);
        assert!(full(1) <= Duration::from_secs(1) && full(1) > Duration::from_millis(990));
        assert!(full(2) <= Duration::from_secs(2) && full(2) > Duration::from_millis(1990));
        assert!(full(7) <= BACKOFF_MAX && full(7) > Duration::from_secs(59));
        assert_eq!(backoff(true, 100, 0.999_999), full(7));
        assert_eq!(backoff(true, 1, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn rejected_backoff_is_five_minutes_with_jitter() {
        assert!(backoff(false, 1, 0.0) >= Duration::from_secs(150));
        assert!(backoff(false, 1, 0.999) <= BACKOFF_REJECTED);
    }

    #[test]
    fn refresh_ahead_is_capped_at_half_the_lifetime() {
        let sixty = Duration::from_secs(60);
        let g = granted("a", Duration::from_secs(2));
        let t = Token::from_granted(&g, sixty).unwrap();
        assert_eq!(t.refresh_at - g.sent_at, Duration::from_secs(1));
        assert!(t.usable_until - g.sent_at >= Duration::from_millis(1800));
        let g = granted("a", Duration::from_secs(3600));
        let t = Token::from_granted(&g, sixty).unwrap();
        assert_eq!(t.refresh_at - g.sent_at, Duration::from_secs(3540));
        assert!(t.usable_until > t.refresh_at);
        let g = granted("a", Duration::ZERO);
        let t = Token::from_granted(&g, sixty).unwrap();
        assert_eq!(t.refresh_at - g.sent_at, MIN_REFRESH_INTERVAL);
    }

    #[test]
    fn lifetimes_beyond_the_cap_are_capped() {
        let g = granted("a", Duration::MAX);
        let t = Token::from_granted(&g, Duration::from_secs(60)).unwrap();
        assert_eq!(t.lifetime, MAX_LIFETIME);
        assert!(t.usable_until - g.sent_at <= MAX_LIFETIME);
    }

    #[test]
    fn header_unsafe_tokens_are_invalid_responses() {
        let g = granted("a\nb", Duration::from_secs(60));
        assert!(matches!(
            Token::from_granted(&g, Duration::from_secs(1)),
            Err(TokenError::InvalidResponse(_))
        ));
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::from_granted(
            &granted("tok-123", Duration::from_secs(9)),
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(!format!("{t:?}").contains("tok-123"));
        assert!(t.bearer.is_sensitive());
    }
}
