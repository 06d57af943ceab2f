//! One [`TokenSource`] per credential: the cached access token, the single
//! background task that fetches and renews it, the grants, and the state
//! file of refresh tokens.
//!
//! The request path only reads: [`TokenSource::usable`] is a lock-free
//! `arc-swap` load. Every token request is made by the source's refresh
//! task, so "single flight" holds by construction: requests that find no
//! usable token wait on a `watch` channel for the task's next result, or
//! answer `503 token_unavailable` at once when the last attempt failed.
//! This module does not know about routes or HTTP requests from clients.

pub mod state;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{AuthScheme, BodyFormat, ClientAuth, CredentialConfig, GrantType};
use crate::metrics::CredentialMetrics;
use crate::secret::Secret;
use crate::upstream::HttpClient;

/// Lifetime assumed when the endpoint gives neither `expires_in` nor a JWT `exp`.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// First retry delay after a transient failure; doubles per attempt.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Ceiling of the transient backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Delay after a non-transient failure (bad credentials do not fix themselves
/// quickly; hammering the endpoint can get the client locked out).
pub const BACKOFF_REJECTED: Duration = Duration::from_secs(300);
/// Largest token endpoint response read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
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
    pub fn new(access: &str, lifetime: Duration) -> Result<Token, String> {
        make_token(
            access.to_owned(),
            lifetime,
            crate::config::DEFAULT_REFRESH_BEFORE,
            Instant::now(),
            state::unix_now(),
            None,
            None,
        )
    }
}

/// Why a token request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The endpoint refused with a 4xx OAuth error.
    #[error("token endpoint refused the request ({status}): {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Rejected {
        /// HTTP status.
        status: u16,
        /// OAuth `error`.
        error: String,
        /// OAuth `error_description`.
        description: Option<String>,
    },
    /// A 5xx.
    #[error("token endpoint failed ({status}){}", error.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    ServerError {
        /// HTTP status.
        status: u16,
        /// OAuth `error`, if any.
        error: Option<String>,
    },
    /// `token_timeout` passed.
    #[error("token request timed out after {0:?}")]
    Timeout(Duration),
    /// Connect or I/O error.
    #[error("cannot reach the token endpoint: {0}")]
    Network(String),
    /// A 200 without a usable token.
    #[error("token endpoint answered without a usable token: {0}")]
    InvalidResponse(String),
    /// The request could not be made from the configured settings.
    #[error("{0}")]
    State(String),
    /// The state file could not be written (retried like a transient failure).
    #[error("state file: {0}")]
    Persist(String),
}

impl TokenError {
    /// Transient failures are retried quickly; others wait [`BACKOFF_REJECTED`].
    pub fn is_transient(&self) -> bool {
        match self {
            TokenError::Rejected { status, error, .. } => {
                *status == 429 || error == "temporarily_unavailable"
            }
            TokenError::ServerError { .. }
            | TokenError::Timeout(_)
            | TokenError::Network(_)
            | TokenError::InvalidResponse(_) => true,
            TokenError::State(_) => false,
            TokenError::Persist(_) => true,
        }
    }

    /// `error` and `error_description` for `/status`.
    fn oauth_fields(&self) -> (String, Option<String>) {
        match self {
            TokenError::Rejected {
                error, description, ..
            } => (error.clone(), description.clone()),
            TokenError::ServerError { error, .. } => (
                error.clone().unwrap_or_else(|| "server_error".into()),
                Some(self.to_string()),
            ),
            TokenError::Timeout(_) => ("timeout".into(), Some(self.to_string())),
            TokenError::Network(_) => ("network".into(), Some(self.to_string())),
            TokenError::InvalidResponse(_) => ("invalid_response".into(), Some(self.to_string())),
            TokenError::State(_) => ("invalid_configuration".into(), Some(self.to_string())),
            TokenError::Persist(_) => ("state_file".into(), Some(self.to_string())),
        }
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
    client: HttpClient<Full<Bytes>>,
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
        let client = crate::upstream::build_client(&config.ca_certs)?;
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
            client,
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
    pub async fn get(&self, deadline: Instant) -> Result<Arc<Token>, Unavailable> {
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
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
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
                        _ = tokio::time::sleep_until(refresh_at.into()) => break,
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
        let result = tokio::time::timeout(self.config.token_timeout, self.request_token(started))
            .await
            .unwrap_or(Err(TokenError::Timeout(self.config.token_timeout)));
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let counter = match &result {
            Ok(_) => &self.metrics.success,
            Err(TokenError::Rejected { .. }) | Err(TokenError::State(_)) => &self.metrics.rejected,
            // The endpoint answered fine; the failure is ours (disk).
            Err(TokenError::Persist(_)) => &self.metrics.success,
            Err(TokenError::ServerError { .. }) => &self.metrics.server_error,
            Err(TokenError::Timeout(_)) => &self.metrics.timeout,
            Err(TokenError::Network(_)) => &self.metrics.network,
            Err(TokenError::InvalidResponse(_)) => &self.metrics.invalid_response,
        };
        counter.inc();
        result
    }

    async fn request_token(&self, started: Instant) -> Result<Token, TokenError> {
        let c = &self.config;
        let mut fields: Vec<(&str, String)> = Vec::with_capacity(8);
        let using_refresh = self.lock_refresh_token().clone();
        let grant = match (c.grant_type, &using_refresh) {
            (GrantType::ClientCredentials, _) => GrantType::ClientCredentials,
            (_, Some(_)) => GrantType::RefreshToken,
            (GrantType::AuthorizationCode, None) => GrantType::AuthorizationCode,
            (GrantType::RefreshToken, None) => {
                return Err(TokenError::State("no refresh token is configured".into()))
            }
        };
        fields.push(("grant_type", grant.as_str().to_owned()));
        if c.client_auth == ClientAuth::Body {
            fields.push(("client_id", c.client_id.clone()));
            if let Some(s) = &c.client_secret {
                fields.push(("client_secret", s.expose().to_owned()));
            }
        }
        match grant {
            GrantType::ClientCredentials | GrantType::RefreshToken => {
                if let Some(scope) = &c.scope {
                    fields.push(("scope", scope.clone()));
                }
            }
            GrantType::AuthorizationCode => {}
        }
        match grant {
            GrantType::RefreshToken => {
                if let Some(rt) = &using_refresh {
                    fields.push(("refresh_token", rt.expose().to_owned()));
                }
            }
            GrantType::AuthorizationCode => {
                if let Some(code) = &c.code {
                    fields.push(("code", code.expose().to_owned()));
                }
                if let Some(uri) = &c.redirect_uri {
                    fields.push(("redirect_uri", uri.clone()));
                }
            }
            GrantType::ClientCredentials => {}
        }
        for (k, v) in &c.extra {
            fields.push((k.as_str(), v.clone()));
        }
        let (content_type, body) = match c.body_format {
            BodyFormat::Json => {
                let map: serde_json::Map<String, serde_json::Value> = fields
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
                    .collect();
                (
                    "application/json",
                    serde_json::Value::Object(map).to_string(),
                )
            }
            BodyFormat::Form => {
                let body = fields
                    .iter()
                    .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
                    .collect::<Vec<_>>()
                    .join("&");
                ("application/x-www-form-urlencoded", body)
            }
        };
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(c.token_url.clone())
            .header(header::CONTENT_TYPE, content_type)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("flinks-proxy/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| TokenError::Network(e.to_string()))?;
        if c.client_auth == ClientAuth::Basic {
            let secret = c.client_secret.as_ref().map(|s| s.expose()).unwrap_or("");
            let creds = format!("{}:{}", form_encode(&c.client_id), form_encode(secret));
            let mut v = HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(creds)
            ))
            .map_err(|_| {
                TokenError::State("client id or secret cannot be sent in a header".into())
            })?;
            v.set_sensitive(true);
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }

        let resp = self.client.request(req).await.map_err(|e| {
            let kind = crate::upstream::ErrorKind::of(&e);
            TokenError::Network(format!("{kind}"))
        })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(|e| {
                if status.is_success() {
                    TokenError::InvalidResponse(format!("cannot read body: {e}"))
                } else {
                    TokenError::Network(format!("cannot read body: {e}"))
                }
            })?
            .to_bytes();

        if !status.is_success() {
            let err: Option<OAuthError> = serde_json::from_slice(&body).ok();
            let error = err.as_ref().map(|e| self.scrub(&e.error));
            let description = err
                .and_then(|e| e.error_description)
                .map(|d| self.scrub(&d));
            return Err(if status.is_server_error() {
                TokenError::ServerError {
                    status: status.as_u16(),
                    error,
                }
            } else {
                TokenError::Rejected {
                    status: status.as_u16(),
                    error: error.unwrap_or_else(|| {
                        status
                            .canonical_reason()
                            .unwrap_or("error")
                            .to_ascii_lowercase()
                            .replace(' ', "_")
                    }),
                    description,
                }
            });
        }
        if status != StatusCode::OK {
            return Err(TokenError::InvalidResponse(format!(
                "unexpected status {status}"
            )));
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| TokenError::InvalidResponse(format!("not a token response: {e}")))?;
        let access = parsed
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| TokenError::InvalidResponse("no access_token".into()))?;
        if let Some(tt) = &parsed.token_type {
            if !tt.eq_ignore_ascii_case("bearer") {
                return Err(TokenError::InvalidResponse(format!(
                    "token_type {tt:?} is not Bearer"
                )));
            }
        }
        let claims = jwt_claims(&access);
        let now_unix = state::unix_now();
        let lifetime = match (
            parsed.expires_in.as_ref().and_then(number),
            claims.as_ref().and_then(|c| c.exp),
        ) {
            (Some(secs), _) => Duration::from_secs(secs),
            // `exp` is whole seconds: measure from the precise time, not
            // from `now_unix` (floored), or a token obtained late in a
            // second would be used up to a second after its `exp`.
            (None, Some(exp)) => Duration::from_secs(exp).saturating_sub(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
            (None, None) => {
                tracing::warn!(
                    credential = %c.name,
                    "token response has neither expires_in nor a JWT exp; assuming {}s",
                    DEFAULT_LIFETIME.as_secs()
                );
                DEFAULT_LIFETIME
            }
        };
        let sub = claims.and_then(|c| c.sub);

        // A new refresh token (authorization code exchange, or a server that
        // rotates) is persisted before the access token is ever used.
        let new_refresh = parsed.refresh_token.filter(|t| !t.is_empty());
        match grant {
            GrantType::AuthorizationCode if new_refresh.is_none() => {
                return Err(TokenError::InvalidResponse(
                    "the code exchange returned no refresh_token".into(),
                ))
            }
            GrantType::ClientCredentials => {}
            _ => {
                let rotated = match (&new_refresh, &using_refresh) {
                    (Some(n), Some(old)) => n != old.expose(),
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if rotated || c.state_file.is_some() {
                    let rt = new_refresh
                        .clone()
                        .or_else(|| using_refresh.as_ref().map(|s| s.expose().to_owned()))
                        .unwrap_or_default();
                    // Keep a rotated refresh token in memory even if the
                    // write fails: the server has already replaced the old
                    // one. The access token is not used until the write
                    // succeeds (the retry rotates again and writes again).
                    let persisted = self.persist(&rt, sub.clone(), rotated);
                    if rotated {
                        if c.state_file.is_none() && c.grant_type == GrantType::RefreshToken {
                            tracing::warn!(
                                credential = %c.name,
                                "the token endpoint rotated the refresh token and no state_file is set: \
                                 a restart will use the configured one, which the server no longer accepts"
                            );
                        }
                        *self.lock_refresh_token() = Some(Secret::new(rt));
                    }
                    persisted?;
                }
            }
        }
        if let Some(s) = &sub {
            *self.sub.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.clone());
        }
        make_token(
            access,
            lifetime,
            c.refresh_before,
            started,
            now_unix,
            parsed.scope,
            sub,
        )
        .map_err(TokenError::InvalidResponse)
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

    /// Removes our own secrets from text the endpoint sent back.
    fn scrub(&self, text: &str) -> String {
        let mut out: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
        let rt = self.lock_refresh_token().clone();
        for s in [
            &self.config.client_secret,
            &self.config.code,
            &self.config.refresh_token,
            &rt,
        ]
        .into_iter()
        .flatten()
        {
            if !s.expose().is_empty() {
                out = out.replace(s.expose(), "***");
            }
        }
        out
    }
}

fn make_token(
    access: String,
    lifetime: Duration,
    refresh_before: Duration,
    started: Instant,
    now_unix: u64,
    scope: Option<String>,
    sub: Option<String>,
) -> Result<Token, String> {
    let mut bearer = HeaderValue::from_str(&format!("Bearer {access}"))
        .map_err(|_| "access_token has characters not allowed in a header".to_string())?;
    bearer.set_sensitive(true);
    let mut bare = HeaderValue::from_str(&access)
        .map_err(|_| "access_token has characters not allowed in a header".to_string())?;
    bare.set_sensitive(true);
    // Times count from when the request was sent: conservative by the
    // request's own latency.
    let margin = (lifetime / 10).min(EXPIRY_MARGIN_MAX);
    let ahead = refresh_before.min(lifetime / 2);
    let refresh_at = started + (lifetime - ahead).max(MIN_REFRESH_INTERVAL);
    Ok(Token {
        value: Secret::new(access),
        bearer,
        bare,
        usable_until: started + lifetime - margin,
        refresh_at,
        expires_unix: now_unix + lifetime.as_secs(),
        scope,
        sub,
        lifetime,
    })
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    error_description: Option<String>,
}

/// `expires_in` as a number or a numeric string (some servers send "3600").
fn number(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => {
            n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64))
        }
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The claims the proxy reads from a JWT access token.
#[derive(Deserialize, Debug, Default)]
pub struct Claims {
    /// Expiry, Unix seconds.
    pub exp: Option<u64>,
    /// The user at the Data Provider.
    pub sub: Option<String>,
}

/// Decodes (does not verify) the claims of a JWT; `None` for opaque tokens.
pub fn jwt_claims(token: &str) -> Option<Claims> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// `application/x-www-form-urlencoded` encoding of one key or value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let t0 = Instant::now();
        let t = make_token(
            "a".into(),
            Duration::from_secs(2),
            Duration::from_secs(60),
            t0,
            0,
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.refresh_at - t0, Duration::from_secs(1));
        assert!(t.usable_until - t0 >= Duration::from_millis(1800));
        let t = make_token(
            "a".into(),
            Duration::from_secs(3600),
            Duration::from_secs(60),
            t0,
            0,
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.refresh_at - t0, Duration::from_secs(3540));
        assert!(t.usable_until > t.refresh_at);
        let t = make_token(
            "a".into(),
            Duration::ZERO,
            Duration::from_secs(60),
            t0,
            0,
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.refresh_at - t0, MIN_REFRESH_INTERVAL);
    }

    #[test]
    fn failure_classes() {
        let rejected = |error: &str, status| TokenError::Rejected {
            status,
            error: error.into(),
            description: None,
        };
        assert!(!rejected("invalid_client", 400).is_transient());
        assert!(!rejected("invalid_grant", 400).is_transient());
        assert!(rejected("temporarily_unavailable", 400).is_transient());
        assert!(rejected("slow_down", 429).is_transient());
        assert!(TokenError::ServerError {
            status: 500,
            error: None
        }
        .is_transient());
        assert!(TokenError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(TokenError::InvalidResponse("x".into()).is_transient());
    }

    #[test]
    fn jwt_claims_are_read_without_verification() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"sub":"u1","exp":42}"#);
        let c = jwt_claims(&format!("e30.{payload}.sig")).unwrap();
        assert_eq!(c.exp, Some(42));
        assert_eq!(c.sub.as_deref(), Some("u1"));
        assert!(jwt_claims("opaque-token").is_none());
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = make_token(
            "tok-123".into(),
            Duration::from_secs(9),
            Duration::from_secs(1),
            Instant::now(),
            0,
            None,
            None,
        )
        .unwrap();
        assert!(!format!("{t:?}").contains("tok-123"));
        assert!(t.bearer.is_sensitive());
    }
}
