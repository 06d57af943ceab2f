//! Sandbox: a Flinks-like OAuth 2.0 token endpoint and a Flinks-like API,
//! served on loopback for `flinks-proxy demo`, integration tests and benches.
//!
//! Owns two small hyper servers (HTTP/1.1 and h2c each), the tokens they
//! issue, and counters that tests assert on. The token endpoint follows
//! SPEC §1 (JSON bodies like Flinks; form bodies and HTTP Basic like generic
//! OAuth servers) and can be told to fail the way real ones do
//! ([`FailureMode`]). The API accepts only live tokens it issued.
//!
//! It owns nothing the proxy does and is not a security component: tokens
//! are JWT-shaped but unsigned (`alg: none`).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ground::lock;
use tokio::task::{JoinHandle, JoinSet};

/// Path of the token endpoint, as Flinks serves it.
pub const TOKEN_PATH: &str = "/api/v1/token";
/// API requests kept by [`Sandbox::recorded`]: enough for any test, bounded for benches.
const RECORD_CAPACITY: usize = 1000;
/// Secrets kept by [`Sandbox::issued_secrets`] (the newest): a fault-injection
/// run issues a few thousand; benches issuing millions keep only the tail.
const ISSUED_CAPACITY: usize = 50_000;
/// Rotated-away refresh tokens remembered for [`Sandbox::reused_refresh_tokens`];
/// past it the memory starts over (benches only get there).
const RETIRED_CAPACITY: usize = 100_000;
/// A request header for the API: wait this many milliseconds before
/// answering, deciding the answer for a revoked user's token (`602`) on
/// arrival, as a server that checked the token first and answers late does.
pub const DELAY_HEADER: &str = "x-sandbox-delay-ms";
/// Larger API bodies get 413; 16 MiB leaves room for the 1 MiB round-trip tests.
const MAX_API_BODY: usize = 16 << 20;
/// Real grant requests are a few hundred bytes; anything near 64 KiB is abuse.
const MAX_TOKEN_BODY: usize = 64 << 10;
/// Once the token map holds this many entries, expired ones are pruned on insert.
const PRUNE_AT: usize = 10_000;
/// Hard cap for benchmarks issuing millions of long-lived tokens: past it the
/// half closest to expiry is forgotten (those tokens then count as unknown).
const MAX_TOKENS: usize = 100_000;
/// Expired tokens stay known this long so the API counts them as expired, not unknown.
const EXPIRED_GRACE: Duration = Duration::from_secs(60);
/// Stand-in when a configured lifetime overflows `Instant`: effectively forever.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// What a misbehaving load balancer answers in [`FailureMode::Garbage`].
const GARBAGE: &str = "<html><body><h1>Service Unavailable</h1></body></html>";
/// RFC 6750 §3 challenge on every 401 from the API.
const CHALLENGE: &str = r#"Bearer error="invalid_token""#;

type Body = Full<Bytes>;
type Params = HashMap<String, String>;

/// What the sandbox accepts and answers; `Default` gives the demo credentials.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Accepted client id.
    pub client_id: String,
    /// Accepted client secret.
    pub client_secret: String,
    /// Granted scope, echoed in every successful token response.
    pub scope: String,
    /// `expires_in` of token responses and the token's real lifetime;
    /// `None` omits the field and the token lives `jwt_lifetime`.
    pub expires_in: Option<u64>,
    /// Lifetime behind the `exp` claim and real validity when `expires_in` is `None`.
    pub jwt_lifetime: Duration,
    /// The refresh token accepted (initially) for `grant_type=refresh_token`.
    pub refresh_token: String,
    /// The authorization code, accepted once.
    pub code: String,
    /// The `redirect_uri` the code exchange must repeat exactly.
    pub redirect_uri: String,
    /// `false` (Flinks): the refresh token never changes. `true` (generic
    /// OAuth): every refresh grant returns a new one and invalidates the old.
    pub rotate_refresh_tokens: bool,
    /// The `sub` claim of issued tokens.
    pub subject: String,
    /// End users for per-user connections: each has its own `sub`, first
    /// code and accounts (see [`SandboxUser`]).
    pub users: Vec<SandboxUser>,
    /// With `rotate_refresh_tokens`: how long the previous refresh token
    /// is still accepted after a rotation (Okta's and Auth0's "grace
    /// period" / "reuse interval"); within it, the previous token gets the
    /// current refresh token back and rotates nothing. Zero: none.
    pub refresh_reuse_grace: Duration,
}

/// Overrides of the next successful token responses, for tests of bad
/// endpoint data ([`Sandbox::set_token_override`]).
#[derive(Debug, Clone, Default)]
pub struct TokenOverride {
    /// Sent as `expires_in` verbatim (any JSON: `1e300`, `-5`, a string).
    pub expires_in: Option<Value>,
    /// The JWT `exp` claim (e.g. `u64::MAX`).
    pub exp: Option<u64>,
}

/// An end user of the sandbox bank: authorizing gives tokens whose `sub`
/// is theirs, and `GET /api/fdx/5/accounts` answers only their accounts.
#[derive(Debug, Clone)]
pub struct SandboxUser {
    /// The `sub` claim of their tokens.
    pub sub: String,
    /// Their first authorization code (single-use; more from
    /// [`Sandbox::new_code`]).
    pub code: String,
    /// Their account titles.
    pub accounts: Vec<String>,
}

impl SandboxUser {
    /// A user with one code `code-<sub>` and one account `<sub>'s chequing`.
    pub fn new(sub: &str) -> SandboxUser {
        SandboxUser {
            sub: sub.to_owned(),
            code: format!("code-{sub}"),
            accounts: vec![format!("{sub}'s chequing")],
        }
    }
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            client_id: "demo-client".into(),
            client_secret: "demo-secret".into(),
            scope: "client:admin".into(),
            expires_in: Some(3600),
            jwt_lifetime: Duration::from_secs(3600),
            refresh_token: "demo-refresh-token".into(),
            code: "demo-code".into(),
            redirect_uri: "https://example.com/callback".into(),
            rotate_refresh_tokens: false,
            subject: "user-123".into(),
            users: Vec::new(),
            refresh_reuse_grace: Duration::ZERO,
        }
    }
}

/// How the token endpoint answers every request, before any grant handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// Normal operation.
    #[default]
    None,
    /// `500 {"error":"server_error"}`.
    ServerError,
    /// `503 {"error":"temporarily_unavailable"}`.
    TemporarilyUnavailable,
    /// No answer until the mode changes (or the client gives up).
    Hang,
    /// `200` with an HTML body.
    Garbage,
    /// `400 {"error":"invalid_client"}` whatever the credentials.
    InvalidClient,
    /// `200` JSON without `access_token`.
    NoToken,
}

/// One request received by the API listener.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Request method, e.g. `GET`.
    pub method: String,
    /// Path and query as received.
    pub path_and_query: String,
    /// Headers in arrival order, names lower-case, values lossily UTF-8.
    pub headers: Vec<(String, String)>,
    /// The full body (empty when it could not be read or was too large).
    pub body: Bytes,
    /// Whether it carried a live token issued by this sandbox.
    pub token_valid: bool,
}

/// A refresh token presented again after a rotation had retired it: with
/// rotation and no reuse grace, the presenter lost the token that replaced
/// it (a lost rotation), or two holders used one token.
#[derive(Debug, Clone)]
pub struct RefreshReuse {
    /// The user whose token it was.
    pub sub: String,
    /// When the rotation retired it ([`Sandbox::last_rotation`] at the time).
    pub rotated_at: Instant,
    /// When it was presented again.
    pub presented_at: Instant,
}

/// A running sandbox. Clones share it; its servers stop when the last clone drops.
#[derive(Clone)]
pub struct Sandbox {
    shared: Arc<Shared>,
    token_addr: SocketAddr,
    api_addr: SocketAddr,
    _tasks: Arc<TaskGuard>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("Sandbox");
        s.field("token_addr", &self.token_addr);
        s.field("api_addr", &self.api_addr).finish_non_exhaustive()
    }
}

/// Aborts the accept loops (whose `JoinSet`s abort their connections) and
/// wakes anything parked on `closed` (h2 streams run in tasks of their own).
struct TaskGuard {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.shared.closed.send_replace(true);
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl Sandbox {
    /// Starts the token endpoint and the API, each on `127.0.0.1:0`.
    pub async fn start(opts: SandboxOptions) -> io::Result<Sandbox> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(opts, any, any).await
    }

    /// Starts the token endpoint and the API on the given addresses.
    pub async fn start_on(
        opts: SandboxOptions,
        token_addr: SocketAddr,
        api_addr: SocketAddr,
    ) -> io::Result<Sandbox> {
        let token_listener = TcpListener::bind(token_addr).await?;
        let api_listener = TcpListener::bind(api_addr).await?;
        let (token_addr, api_addr) = (token_listener.local_addr()?, api_listener.local_addr()?);
        let shared = Arc::new(Shared::new(opts));
        let tasks = vec![
            tokio::spawn(serve(token_listener, shared.clone(), Role::Token)),
            tokio::spawn(serve(api_listener, shared.clone(), Role::Api)),
        ];
        tracing::debug!(%token_addr, %api_addr, "sandbox listening");
        let _tasks = Arc::new(TaskGuard {
            shared: shared.clone(),
            tasks,
        });
        Ok(Sandbox {
            shared,
            token_addr,
            api_addr,
            _tasks,
        })
    }

    /// Address of the token endpoint listener.
    pub fn token_addr(&self) -> SocketAddr {
        self.token_addr
    }

    /// Address of the API listener.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// `http://127.0.0.1:PORT/api/v1/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.token_addr)
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// Requests received by the token endpoint, whatever their outcome.
    pub fn token_requests(&self) -> u64 {
        *self.shared.token_requests.borrow()
    }

    /// Token requests whose body named this `grant_type` (any outcome); 0 for unknown grants.
    pub fn token_requests_by_grant(&self, grant: &str) -> u64 {
        Grant::parse(grant).map_or(0, |g| get(&self.shared.n.by_grant[g as usize]))
    }

    /// Token requests answered 200 with a token.
    pub fn successful_token_requests(&self) -> u64 {
        get(&self.shared.n.successful)
    }

    /// Resolves once [`Sandbox::token_requests`] is at least `n`.
    pub async fn wait_for_token_requests(&self, n: u64) {
        let mut rx = self.shared.token_requests.subscribe();
        // The sender lives in `shared`, which we hold: this cannot fail.
        let _ = rx.wait_for(|&count| count >= n).await;
    }

    /// Token requests being handled right now, hanging ones included.
    pub fn token_requests_in_flight(&self) -> u64 {
        get(&self.shared.n.in_flight)
    }

    /// High-water mark of token requests handled at once.
    pub fn max_concurrent_token_requests(&self) -> u64 {
        get(&self.shared.n.max_in_flight)
    }

    /// Sets how the token endpoint answers from now on; leaving `Hang`
    /// releases the hanging requests, which then answer per the new mode.
    pub fn set_failure(&self, mode: FailureMode) {
        self.shared.failure.send_replace(mode);
    }

    /// Overrides fields of successful token responses from now on
    /// (`TokenOverride::default()` ends it). The tokens stay valid for the
    /// configured lifetime whatever the override says.
    pub fn set_token_override(&self, o: TokenOverride) {
        *lock(&self.shared.token_override) = o;
    }

    /// Makes the token endpoint wait this long before answering (zero: no
    /// delay); the request counts as in flight meanwhile.
    pub fn set_token_delay(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.shared.n.token_delay_nanos.store(nanos, SeqCst);
    }

    /// `true`: a token request whose client left (gave up, was killed) is
    /// still handled to the end, as a real server's transaction is: a
    /// rotation it makes is then lost to the client. `false` (default):
    /// the handler is dropped with the connection.
    pub fn set_finish_abandoned(&self, on: bool) {
        self.shared.n.finish_abandoned.store(on, SeqCst);
    }

    /// Makes the API reject (401) every access token issued so far.
    pub fn revoke_access_tokens(&self) {
        self.shared.grants().tokens.clear();
    }

    /// Makes the current refresh token fail with `invalid_grant` from now on.
    pub fn revoke_refresh_token(&self) {
        self.shared.grants().refresh_revoked = true;
    }

    /// The refresh token valid now (it changes when rotating); after
    /// [`Sandbox::revoke_refresh_token`], the revoked one.
    pub fn current_refresh_token(&self) -> String {
        self.shared.grants().refresh_token.clone()
    }

    /// Requests received by the API, whatever their outcome.
    pub fn api_requests(&self) -> u64 {
        get(&self.shared.n.api_requests)
    }

    /// API requests answered 401 (missing, unknown, expired or revoked token).
    pub fn rejected_api_requests(&self) -> u64 {
        get(&self.shared.n.rejected)
    }

    /// API requests whose token was issued here but had expired (subset of rejected).
    pub fn expired_token_requests(&self) -> u64 {
        get(&self.shared.n.expired)
    }

    /// The last 1000 API requests, oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.recorded).iter().cloned().collect()
    }

    /// Revokes a user's consent: the API answers their tokens 401 with
    /// `"code": "602"` and their refresh token is refused, until they
    /// authorize again with a new code.
    pub fn revoke_consent(&self, sub: &str) {
        self.shared.revoke_consent(sub);
    }

    /// A new single-use code for a user (re-authorization).
    pub fn new_code(&self, sub: &str) -> String {
        self.shared.new_code(sub)
    }

    /// Token requests that named one of this user's codes or refresh tokens.
    pub fn user_token_requests(&self, sub: &str) -> u64 {
        lock(&self.shared.users)
            .requests
            .get(sub)
            .copied()
            .unwrap_or(0)
    }

    /// The most token requests handled at once for any one user (with
    /// single flight per connection: 1).
    pub fn max_user_token_requests_in_flight(&self) -> u64 {
        lock(&self.shared.users).max_in_flight
    }

    /// The user's live refresh tokens (changes when rotating).
    pub fn user_refresh_tokens(&self, sub: &str) -> Vec<String> {
        lock(&self.shared.users)
            .refresh
            .iter()
            .filter(|(_, s)| s.as_str() == sub)
            .map(|(rt, _)| rt.clone())
            .collect()
    }

    /// Makes the API wait this long before answering (zero: no delay).
    pub fn set_api_delay(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.shared.n.api_delay_nanos.store(nanos, SeqCst);
    }

    /// Presentations (any outcome, whatever the failure mode) of a user's
    /// refresh token that a rotation had already retired. With
    /// `rotate_refresh_tokens` and no reuse grace, anything above zero is a
    /// lost rotation.
    pub fn reused_refresh_tokens(&self) -> u64 {
        get(&self.shared.n.reused)
    }

    /// The last 1000 of those presentations, oldest first.
    pub fn refresh_token_reuses(&self) -> Vec<RefreshReuse> {
        lock(&self.shared.users).reuses.iter().cloned().collect()
    }

    /// When a refresh grant last rotated this user's refresh token.
    pub fn last_rotation(&self, sub: &str) -> Option<Instant> {
        lock(&self.shared.users).last_rotation.get(sub).copied()
    }

    /// Token requests for this user's codes or live refresh tokens being
    /// handled now.
    pub fn user_token_requests_in_flight(&self, sub: &str) -> u64 {
        lock(&self.shared.users)
            .in_flight
            .get(sub)
            .copied()
            .unwrap_or(0)
    }

    /// Every secret issued (access tokens, refresh tokens, the users'
    /// codes), the newest 50,000, oldest first: what must never appear in
    /// a log.
    pub fn issued_secrets(&self) -> Vec<String> {
        lock(&self.shared.issued).iter().cloned().collect()
    }

    /// Gives this user's tokens issued from now on their own lifetime
    /// (`expires_in` and validity) instead of the configured one; `None`
    /// goes back to it.
    pub fn set_user_token_lifetime(&self, sub: &str, lifetime: Option<Duration>) {
        let mut users = lock(&self.shared.users);
        match lifetime {
            Some(d) => users.lifetimes.insert(sub.to_owned(), d),
            None => users.lifetimes.remove(sub),
        };
    }
}

/// Decodes the claims (middle part) of a JWT-shaped token, verifying nothing;
/// every claim, for tests (the proxy reads only `exp` and `sub`, with
/// [`crate::tokens::jwt_claims`]).
pub fn decode_jwt_claims(token: &str) -> Option<serde_json::Value> {
    serde_json::from_slice(&crate::tokens::jwt::payload(token)?).ok()
}

#[derive(Clone, Copy)]
enum Grant {
    ClientCredentials = 0,
    AuthorizationCode = 1,
    RefreshToken = 2,
}

impl Grant {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "client_credentials" => Some(Self::ClientCredentials),
            "authorization_code" => Some(Self::AuthorizationCode),
            "refresh_token" => Some(Self::RefreshToken),
            _ => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Role {
    Token,
    Api,
}

enum TokenCheck {
    Valid,
    Missing,
    Unknown,
    Expired,
}

struct Shared {
    opts: SandboxOptions,
    failure: watch::Sender<FailureMode>,
    /// Set when the last [`Sandbox`] clone drops.
    closed: watch::Sender<bool>,
    /// A counter that `wait_for_token_requests` can await.
    token_requests: watch::Sender<u64>,
    n: Counters,
    grants: Mutex<GrantState>,
    recorded: Mutex<VecDeque<RecordedRequest>>,
    users: Mutex<Users>,
    token_override: Mutex<TokenOverride>,
    /// What [`Sandbox::issued_secrets`] returns.
    issued: Mutex<VecDeque<String>>,
}

/// Per-user grants: codes, refresh tokens, consent, and whose each access
/// token is.
#[derive(Default)]
struct Users {
    /// Unused codes -> sub.
    codes: HashMap<String, String>,
    /// Live refresh tokens -> sub.
    refresh: HashMap<String, String>,
    /// Access tokens -> sub.
    tokens: HashMap<String, String>,
    /// Subs whose consent is revoked.
    revoked: std::collections::HashSet<String>,
    /// Token requests per sub.
    requests: HashMap<String, u64>,
    /// Token requests per sub being handled now.
    in_flight: HashMap<String, u64>,
    /// The most token requests ever handled at once for one sub.
    max_in_flight: u64,
    /// Refresh tokens a rotation retired -> (sub, when).
    retired: HashMap<String, (String, Instant)>,
    /// Presentations of retired refresh tokens (the last 1000).
    reuses: VecDeque<RefreshReuse>,
    /// When each sub's refresh token was last rotated.
    last_rotation: HashMap<String, Instant>,
    /// Per-sub token lifetimes ([`Sandbox::set_user_token_lifetime`]).
    lifetimes: HashMap<String, Duration>,
}

impl Users {
    /// Counts a refresh grant presenting a token a rotation retired.
    fn note_presentation(&mut self, n: &Counters, params: &Params) {
        if params.get("grant_type").map(String::as_str) != Some("refresh_token") {
            return;
        }
        let retired = params
            .get("refresh_token")
            .and_then(|rt| self.retired.get(rt));
        let Some((sub, rotated_at)) = retired.cloned() else {
            return;
        };
        bump(&n.reused);
        if self.reuses.len() >= RECORD_CAPACITY {
            self.reuses.pop_front();
        }
        self.reuses.push_back(RefreshReuse {
            sub,
            rotated_at,
            presented_at: Instant::now(),
        });
    }

    /// Retires `old` (rotated away from `sub` now).
    fn retire(&mut self, old: String, sub: &str) {
        if self.retired.len() >= RETIRED_CAPACITY {
            self.retired.clear();
        }
        let now = Instant::now();
        self.retired.insert(old, (sub.to_owned(), now));
        self.last_rotation.insert(sub.to_owned(), now);
    }
}

/// Counts a token request for one user while it is handled.
struct UserFlight<'a> {
    shared: &'a Shared,
    sub: Option<String>,
}

impl<'a> UserFlight<'a> {
    /// The sub whose code or refresh token `params` presents, if any.
    fn enter(shared: &'a Shared, params: Option<&Params>) -> UserFlight<'a> {
        let mut users = lock(&shared.users);
        let sub = params.and_then(|p| {
            p.get("refresh_token")
                .and_then(|rt| users.refresh.get(rt))
                .or_else(|| p.get("code").and_then(|c| users.codes.get(c)))
                .cloned()
        });
        if let Some(sub) = &sub {
            let n = users.in_flight.entry(sub.clone()).or_default();
            *n += 1;
            let n = *n;
            users.max_in_flight = users.max_in_flight.max(n);
        }
        UserFlight { shared, sub }
    }
}

impl Drop for UserFlight<'_> {
    fn drop(&mut self) {
        if let Some(sub) = &self.sub {
            if let Some(n) = lock(&self.shared.users).in_flight.get_mut(sub) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    by_grant: [AtomicU64; 3],
    successful: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    api_requests: AtomicU64,
    rejected: AtomicU64,
    expired: AtomicU64,
    api_delay_nanos: AtomicU64,
    token_delay_nanos: AtomicU64,
    next_id: AtomicU64,
    reused: AtomicU64,
    finish_abandoned: AtomicBool,
}

struct GrantState {
    /// Access token -> precise expiry (the `exp` claim only has seconds).
    tokens: HashMap<String, Instant>,
    prune_at: usize,
    code_used: bool,
    refresh_token: String,
    refresh_revoked: bool,
    /// The refresh token rotated away last, and until when it is still
    /// accepted.
    previous_refresh: Option<(String, Instant)>,
}

impl GrantState {
    fn insert_token(&mut self, token: String, expiry: Instant) {
        if self.tokens.len() >= self.prune_at {
            if let Some(cutoff) = Instant::now().checked_sub(EXPIRED_GRACE) {
                self.tokens.retain(|_, exp| *exp > cutoff);
            }
            if self.tokens.len() >= MAX_TOKENS {
                let mut expiries: Vec<Instant> = self.tokens.values().copied().collect();
                let mid = expiries.len() / 2;
                let median = *expiries.select_nth_unstable(mid).1;
                self.tokens.retain(|_, exp| *exp > median);
            }
            // Doubling keeps pruning amortised O(1) while many tokens are live.
            self.prune_at = (self.tokens.len() * 2).clamp(PRUNE_AT, MAX_TOKENS);
        }
        self.tokens.insert(token, expiry);
    }
}

impl Shared {
    fn new(opts: SandboxOptions) -> Self {
        let users = Users {
            codes: opts
                .users
                .iter()
                .map(|u| (u.code.clone(), u.sub.clone()))
                .collect(),
            ..Users::default()
        };
        let opts_codes = opts.users.iter().map(|u| u.code.clone()).collect();
        let grants = GrantState {
            tokens: HashMap::new(),
            prune_at: PRUNE_AT,
            code_used: false,
            refresh_token: opts.refresh_token.clone(),
            refresh_revoked: false,
            previous_refresh: None,
        };
        Self {
            opts,
            failure: watch::Sender::new(FailureMode::None),
            closed: watch::Sender::new(false),
            token_requests: watch::Sender::new(0),
            n: Counters::default(),
            grants: Mutex::new(grants),
            recorded: Mutex::default(),
            users: Mutex::new(users),
            token_override: Mutex::default(),
            issued: Mutex::new(opts_codes),
        }
    }

    /// Remembers a secret for [`Sandbox::issued_secrets`].
    fn note_issued(&self, secret: &str) {
        let mut issued = lock(&self.issued);
        if issued.len() >= ISSUED_CAPACITY {
            issued.pop_front();
        }
        issued.push_back(secret.to_owned());
    }

    fn grants(&self) -> MutexGuard<'_, GrantState> {
        lock(&self.grants)
    }

    async fn closed(&self) {
        let _ = self.closed.subscribe().wait_for(|closed| *closed).await;
    }

    /// The failure mode to apply, waiting out `Hang`; `Hang` means shutting down.
    async fn failure_mode(&self) -> FailureMode {
        let mut rx = self.failure.subscribe();
        tokio::select! {
            mode = rx.wait_for(|m| *m != FailureMode::Hang) => {
                mode.map_or(FailureMode::Hang, |m| *m)
            }
            () = self.closed() => FailureMode::Hang,
        }
    }

    fn unique_id(&self) -> String {
        let n = bump(&self.n.next_id);
        format!("{n:x}-{:016x}", rand::random::<u64>())
    }

    /// Checks the grant and issues a token; `Err` is an `invalid_grant` description.
    fn issue(&self, grant: Grant, params: &Params) -> Result<Value, &'static str> {
        let opts = &self.opts;
        let mut state = self.grants();
        let refresh_token = match grant {
            Grant::ClientCredentials => None,
            Grant::AuthorizationCode => {
                if state.code_used || params.get("code") != Some(&opts.code) {
                    return Err("The authorization code is invalid or has already been used");
                }
                if params.get("redirect_uri") != Some(&opts.redirect_uri) {
                    return Err("The redirect_uri does not match the authorization request");
                }
                state.code_used = true;
                if state.refresh_revoked {
                    // A new authorization replaces a revoked refresh token.
                    state.refresh_token = format!("rt-{}", self.unique_id());
                    state.refresh_revoked = false;
                }
                Some(state.refresh_token.clone())
            }
            Grant::RefreshToken => {
                let presented = params.get("refresh_token");
                let in_grace = state
                    .previous_refresh
                    .as_ref()
                    .is_some_and(|(prev, until)| {
                        Some(prev) == presented && Instant::now() < *until
                    });
                if state.refresh_revoked || (presented != Some(&state.refresh_token) && !in_grace) {
                    return Err("The refresh token is invalid or has been revoked");
                }
                if in_grace {
                    Some(state.refresh_token.clone())
                } else {
                    opts.rotate_refresh_tokens.then(|| {
                        let old = std::mem::replace(
                            &mut state.refresh_token,
                            format!("rt-{}", self.unique_id()),
                        );
                        let now = Instant::now();
                        let until = now.checked_add(opts.refresh_reuse_grace).unwrap_or(now);
                        state.previous_refresh = Some((old, until));
                        state.refresh_token.clone()
                    })
                }
            }
        };
        Ok(self.mint(state, &opts.subject, refresh_token))
    }

    /// Issues an access token for `sub` (with `refresh_token`, if any).
    fn mint(
        &self,
        state: MutexGuard<'_, GrantState>,
        sub: &str,
        refresh_token: Option<String>,
    ) -> Value {
        self.mint_for(state, sub, refresh_token, None)
    }

    /// [`Shared::mint`] with the token's own lifetime, if given.
    fn mint_for(
        &self,
        mut state: MutexGuard<'_, GrantState>,
        sub: &str,
        refresh_token: Option<String>,
        own_lifetime: Option<Duration>,
    ) -> Value {
        let opts = &self.opts;
        let lifetime = opts
            .expires_in
            .map_or(opts.jwt_lifetime, Duration::from_secs);
        let lifetime = own_lifetime.unwrap_or(lifetime);
        let now = Instant::now();
        let expiry = now.checked_add(lifetime).unwrap_or(now + FOREVER);
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let wall = SystemTime::now();
        // Floor of the absolute expiry: the claim never outlives the real token.
        let exp = unix(wall.checked_add(lifetime).unwrap_or(wall + FOREVER));
        let (iat, jti) = (unix(wall), self.unique_id());
        let client_id = &opts.client_id;
        let over = lock(&self.token_override).clone();
        let exp = over.exp.unwrap_or(exp);
        let claims =
            json!({"client_id": client_id, "sub": sub, "exp": exp, "iat": iat, "jti": jti});
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let access_token = format!("{header}.{claims}.sandbox-signature");
        state.insert_token(access_token.clone(), expiry);
        drop(state);

        self.note_issued(&access_token);
        if let Some(rt) = &refresh_token {
            self.note_issued(rt);
        }
        let mut body =
            json!({"access_token": access_token, "token_type": "Bearer", "scope": opts.scope});
        if let Some(expires_in) = opts.expires_in {
            let expires_in = own_lifetime.map_or(expires_in, |d| d.as_secs());
            body["expires_in"] = expires_in.into();
        }
        if let Some(expires_in) = over.expires_in {
            body["expires_in"] = expires_in;
        }
        if let Some(refresh_token) = refresh_token {
            body["refresh_token"] = refresh_token.into();
        }
        body
    }

    /// A grant for one of [`SandboxOptions::users`]: `None` when the code
    /// or refresh token is not a user's (the single-user grants apply).
    fn issue_for_user(&self, grant: Grant, params: &Params) -> Option<Result<Value, &'static str>> {
        let mut users = lock(&self.users);
        let (sub, refresh_token) = match grant {
            Grant::ClientCredentials => return None,
            Grant::AuthorizationCode => {
                let sub = users.codes.remove(params.get("code")?)?;
                if params.get("redirect_uri") != Some(&self.opts.redirect_uri) {
                    return Some(Err(
                        "The redirect_uri does not match the authorization request",
                    ));
                }
                users.revoked.remove(&sub);
                let rt = format!("rt-{sub}-{}", self.unique_id());
                users.refresh.insert(rt.clone(), sub.clone());
                (sub, rt)
            }
            Grant::RefreshToken => {
                let presented = params.get("refresh_token")?;
                let sub = users.refresh.get(presented)?.clone();
                if users.revoked.contains(&sub) {
                    return Some(Err("The refresh token is invalid or has been revoked"));
                }
                let rt = if self.opts.rotate_refresh_tokens {
                    users.refresh.remove(presented);
                    users.retire(presented.clone(), &sub);
                    let rt = format!("rt-{sub}-{}", self.unique_id());
                    users.refresh.insert(rt.clone(), sub.clone());
                    rt
                } else {
                    presented.clone()
                };
                (sub, rt)
            }
        };
        *users.requests.entry(sub.clone()).or_default() += 1;
        let lifetime = users.lifetimes.get(&sub).copied();
        let body = self.mint_for(self.grants(), &sub, Some(refresh_token), lifetime);
        if let Some(at) = body["access_token"].as_str() {
            if users.tokens.len() >= MAX_TOKENS {
                users.tokens.clear();
            }
            users.tokens.insert(at.to_owned(), sub);
        }
        Some(Ok(body))
    }

    fn check_token(&self, headers: &HeaderMap) -> TokenCheck {
        let Some(token) = credentials(headers, "bearer") else {
            return TokenCheck::Missing;
        };
        match self.grants().tokens.get(token) {
            None => TokenCheck::Unknown,
            Some(expiry) if Instant::now() < *expiry => TokenCheck::Valid,
            Some(_) => TokenCheck::Expired,
        }
    }

    fn record(&self, request: RecordedRequest) {
        let mut recorded = lock(&self.recorded);
        if recorded.len() >= RECORD_CAPACITY {
            recorded.pop_front();
        }
        recorded.push_back(request);
    }
}

/// Counts a token request as in flight for as long as its handler lives,
/// including when hyper drops a hanging handler because the client left.
struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn enter(n: &'a Counters) -> Self {
        n.max_in_flight.fetch_max(bump(&n.in_flight), SeqCst);
        Self(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

/// Accepts connections until aborted; dropping the `JoinSet` aborts them all.
async fn serve(listener: TcpListener, shared: Arc<Shared>, role: Role) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(stream, shared.clone(), role));
                }
                Err(error) => {
                    // Usually EMFILE under a benchmark: back off instead of spinning.
                    tracing::debug!(%error, "sandbox accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, shared: Arc<Shared>, role: Role) {
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move {
            Ok::<_, Infallible>(match role {
                Role::Token if shared.n.finish_abandoned.load(SeqCst) => {
                    // Its own task: a client that leaves does not stop it.
                    let task = tokio::spawn(async move { handle_token(&shared, req).await });
                    task.await.unwrap_or_else(|_| {
                        error_json(StatusCode::INTERNAL_SERVER_ERROR, "handler_failed")
                    })
                }
                Role::Token => handle_token(&shared, req).await,
                Role::Api => handle_api(&shared, req).await,
            })
        }
    });
    let builder = Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(error) = connection.await {
        tracing::debug!(%error, "sandbox connection ended with an error");
    }
}

async fn handle_token(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    shared.token_requests.send_modify(|n| *n += 1);
    let _in_flight = InFlight::enter(&shared.n);
    if req.uri().path() != TOKEN_PATH {
        return error_json(StatusCode::NOT_FOUND, "not_found");
    }
    if req.method() != Method::POST {
        let resp = error_json(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        return with_header(resp, header::ALLOW, "POST");
    }
    let (parts, body) = req.into_parts();
    let params = match Limited::new(body, MAX_TOKEN_BODY).collect().await {
        Ok(collected) => parse_params(&parts.headers, &collected.to_bytes()),
        Err(_) => Err("The request body could not be read or is too large"),
    };
    if let Ok(params) = &params {
        lock(&shared.users).note_presentation(&shared.n, params);
    }
    let _user_flight = UserFlight::enter(shared, params.as_ref().ok());
    let grant = params.as_ref().ok().and_then(|p| p.get("grant_type"));
    let grant = grant.and_then(|g| Grant::parse(g));
    if let Some(grant) = grant {
        bump(&shared.n.by_grant[grant as usize]);
    }

    let delay = Duration::from_nanos(get(&shared.n.token_delay_nanos));
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.closed() => {}
        }
    }
    let failure = match shared.failure_mode().await {
        FailureMode::None => None,
        FailureMode::ServerError => Some(oauth_error("server_error", "Simulated failure")),
        FailureMode::TemporarilyUnavailable => {
            Some(oauth_error("temporarily_unavailable", "Simulated outage"))
        }
        FailureMode::Hang => Some(oauth_error("temporarily_unavailable", "Shutting down")),
        FailureMode::Garbage => Some(response(StatusCode::OK, "text/html", GARBAGE)),
        FailureMode::InvalidClient => Some(oauth_error("invalid_client", "Simulated rejection")),
        FailureMode::NoToken => {
            let scope = &shared.opts.scope;
            let body = json!({"token_type": "Bearer", "expires_in": 3600, "scope": scope});
            Some(json_response(StatusCode::OK, &body))
        }
    };
    if let Some(resp) = failure {
        return resp;
    }

    let params = match params {
        Ok(params) => params,
        Err(description) => return oauth_error("invalid_request", description),
    };
    let Some(grant) = grant else {
        return oauth_error("unsupported_grant_type", "Unknown grant_type");
    };
    let opts = &shared.opts;
    match client_auth(&parts.headers, &params) {
        Some((id, secret)) if id == opts.client_id && secret == opts.client_secret => {}
        _ => return oauth_error("invalid_client", "Client authentication failed"),
    }
    let issued = shared
        .issue_for_user(grant, &params)
        .unwrap_or_else(|| shared.issue(grant, &params));
    match issued {
        Ok(body) => {
            bump(&shared.n.successful);
            no_store(json_response(StatusCode::OK, &body))
        }
        Err(description) => oauth_error("invalid_grant", description),
    }
}

async fn handle_api(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    if let Some(resp) = user_admin(shared, req.method(), req.uri().path()) {
        return resp;
    }
    bump(&shared.n.api_requests);
    let check = shared.check_token(req.headers());
    let token_valid = matches!(check, TokenCheck::Valid);
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, MAX_API_BODY).collect().await;
    let body = body.map(|collected| collected.to_bytes());
    let lossy = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let pair = |(k, v): (&HeaderName, &HeaderValue)| (k.to_string(), lossy(v));
    let headers: Vec<(String, String)> = parts.headers.iter().map(pair).collect();
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    shared.record(RecordedRequest {
        method: parts.method.to_string(),
        path_and_query: path_and_query.to_owned(),
        headers: headers.clone(),
        body: body.as_ref().cloned().unwrap_or_default(),
        token_valid,
    });

    let delay = Duration::from_nanos(get(&shared.n.api_delay_nanos));
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.closed() => {}
        }
    }
    let own_delay = parts.headers.get(DELAY_HEADER);
    let own_delay = own_delay.and_then(|v| v.to_str().ok()?.parse().ok());
    let revoked_on_arrival = own_delay.is_some() && shared.consent_revoked(&parts.headers);
    if let Some(ms) = own_delay {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => {}
            () = shared.closed() => {}
        }
    }

    if !token_valid {
        bump(&shared.n.rejected);
        if matches!(check, TokenCheck::Expired) {
            bump(&shared.n.expired);
        }
        let resp = error_json(StatusCode::UNAUTHORIZED, "invalid_token");
        return with_header(resp, header::WWW_AUTHENTICATE, CHALLENGE);
    }
    let body = match body {
        Ok(body) => body,
        Err(e) if e.is::<LengthLimitError>() => {
            return error_json(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        }
        Err(_) => return error_json(StatusCode::BAD_REQUEST, "body_read_failed"),
    };

    if revoked_on_arrival {
        return consent_revoked();
    }
    let path = parts.uri.path();
    if let Some(resp) = user_api(shared, &parts.method, path, &parts.headers) {
        return resp;
    }
    if parts.method == Method::GET && path == "/api/v1/accounts" {
        return json_response(StatusCode::OK, &accounts(&shared.opts));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let code = code.parse().ok().filter(|c| (200..600).contains(c));
        return match code.and_then(|c| StatusCode::from_u16(c).ok()) {
            // These statuses must not carry a body.
            Some(status) if matches!(status.as_u16(), 204 | 304) => {
                let mut resp = Response::new(Body::default());
                *resp.status_mut() = status;
                resp
            }
            Some(status) => json_response(status, &json!({"status": status.as_u16()})),
            None => error_json(StatusCode::BAD_REQUEST, "bad_status_code"),
        };
    }

    let body_len = body.len();
    let wants_body = parts.headers.get("x-echo-body").is_some_and(|v| v == "1");
    let mut resp = if wants_body && matches!(parts.method, Method::POST | Method::PUT) {
        response(StatusCode::OK, "application/octet-stream", body)
    } else {
        let mut echoed = Map::new();
        for (name, value) in headers {
            let joined = match echoed.remove(&name) {
                Some(Value::String(previous)) => format!("{previous}, {value}"),
                _ => value,
            };
            echoed.insert(name, Value::String(joined));
        }
        let query = parts.uri.query().unwrap_or("");
        let echo = json!({"method": parts.method.as_str(), "path": path, "query": query,
                          "headers": echoed, "body_len": body_len});
        json_response(StatusCode::OK, &echo)
    };
    let body_len = HeaderValue::from(body_len);
    resp.headers_mut().insert("x-echo-body-len", body_len);
    resp
}

/// `GET /api/fdx/5/accounts` for a user's token: 401 `code 602` once
/// their consent is revoked, else only their accounts.
fn user_api(
    shared: &Shared,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Option<Response<Body>> {
    let users = lock(&shared.users);
    let sub = users.tokens.get(credentials(headers, "bearer")?)?;
    if users.revoked.contains(sub) {
        return Some(consent_revoked());
    }
    if method != Method::GET || path != "/api/fdx/5/accounts" {
        return None;
    }
    let user = shared.opts.users.iter().find(|u| &u.sub == sub)?;
    let accounts: Vec<Value> = user
        .accounts
        .iter()
        .enumerate()
        .map(|(i, title)| json!({"accountId": format!("{sub}-{i}"), "nickname": title, "accountCategory": "DEPOSIT_ACCOUNT"}))
        .collect();
    Some(json_response(
        StatusCode::OK,
        &json!({"sub": sub, "accounts": accounts}),
    ))
}

/// Flinks' answer to a token whose consent is gone: 401 with code 602.
fn consent_revoked() -> Response<Body> {
    let body = json!({"code": "602", "message": "Consent revoked or expired; the user must authorize again"});
    let resp = json_response(StatusCode::UNAUTHORIZED, &body);
    with_header(
        resp,
        HeaderName::from_static("ob-correlation-id"),
        "sandbox-602",
    )
}

/// `POST /sandbox/users/{sub}/revoke` (consent revoked) and
/// `POST /sandbox/users/{sub}/code` (a new code): for the demo's curl lines.
fn user_admin(shared: &Shared, method: &Method, path: &str) -> Option<Response<Body>> {
    let rest = path.strip_prefix("/sandbox/users/")?;
    let (sub, action) = rest.split_once('/')?;
    if method != Method::POST || !shared.opts.users.iter().any(|u| u.sub == sub) {
        return Some(error_json(StatusCode::NOT_FOUND, "unknown_user"));
    }
    match action {
        "revoke" => {
            shared.revoke_consent(sub);
            Some(json_response(
                StatusCode::OK,
                &json!({"sub": sub, "consent": "revoked"}),
            ))
        }
        "code" => Some(json_response(
            StatusCode::OK,
            &json!({"code": shared.new_code(sub)}),
        )),
        _ => Some(error_json(StatusCode::NOT_FOUND, "not_found")),
    }
}

impl Shared {
    /// Whether the bearer token is a user's whose consent is revoked now.
    fn consent_revoked(&self, headers: &HeaderMap) -> bool {
        let users = lock(&self.users);
        let sub = credentials(headers, "bearer").and_then(|t| users.tokens.get(t));
        sub.is_some_and(|sub| users.revoked.contains(sub))
    }

    fn revoke_consent(&self, sub: &str) {
        lock(&self.users).revoked.insert(sub.to_owned());
    }

    fn new_code(&self, sub: &str) -> String {
        let code = format!("code-{sub}-{}", self.unique_id());
        self.note_issued(&code);
        lock(&self.users).codes.insert(code.clone(), sub.to_owned());
        code
    }
}

fn accounts(opts: &SandboxOptions) -> Value {
    json!({
        "HttpStatusCode": 200,
        "Accounts": [{
            "Id": "5e2c8f0a-0000-4000-8000-000000000001",
            "Title": "Chequing", "AccountNumber": "1111000", "LastFourDigits": "1000",
            "TransitNumber": "77777", "InstitutionNumber": "777",
            "Category": "Operations", "Type": "Chequing", "Currency": "CAD",
            "Balance": {"Available": 1234.56, "Current": 1234.56, "Limit": null},
            "Holder": {"Name": "John Doe", "Email": "john.doe@example.com"},
            "Transactions": [
                {"Date": "2024/01/15", "Description": "Coffee Shop", "Debit": 4.75, "Credit": null},
                {"Date": "2024/01/14", "Description": "Payroll", "Debit": null, "Credit": 1500.0},
            ],
        }],
        "Login": {"Id": opts.subject, "Username": "Greatday", "IsScheduledRefresh": false},
        "Institution": "FlinksCapital",
        "RequestId": format!("{:016x}", rand::random::<u64>()),
    })
}

/// The credentials of an `Authorization: <scheme> <credentials>` header.
fn credentials<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (given, token) = value.split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then(|| token.trim())
}

/// Client id and secret from HTTP Basic (RFC 6749 §2.3.1: form-urlencoded,
/// then base64) if that header is present, else from the body.
fn client_auth(headers: &HeaderMap, params: &Params) -> Option<(String, String)> {
    if headers.contains_key(AUTHORIZATION) {
        let decoded = STANDARD.decode(credentials(headers, "basic")?).ok()?;
        let (id, secret) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        return Some((form_decode(id)?, form_decode(secret)?));
    }
    let (id, secret) = (params.get("client_id")?, params.get("client_secret")?);
    Some((id.clone(), secret.clone()))
}

/// Request parameters from a JSON object (Flinks) or a form body (RFC 6749).
fn parse_params(headers: &HeaderMap, body: &[u8]) -> Result<Params, &'static str> {
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let mime = content_type.unwrap_or("").split(';').next().unwrap_or("");
    let json = match mime.trim().to_ascii_lowercase().as_str() {
        "application/json" => true,
        "application/x-www-form-urlencoded" => false,
        "" => body.trim_ascii_start().starts_with(b"{"),
        _ => return Err("Unsupported content-type"),
    };
    if json {
        let object: Map<String, Value> =
            serde_json::from_slice(body).map_err(|_| "Malformed JSON body")?;
        let strings = object.into_iter().filter_map(|(k, v)| match v {
            Value::String(s) => Some((k, s)),
            _ => None,
        });
        return Ok(strings.collect());
    }
    let body = std::str::from_utf8(body).map_err(|_| "Form body is not UTF-8")?;
    let mut params = Params::new();
    for pair in body.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = form_decode(name).zip(form_decode(value));
        let (name, value) = decoded.ok_or("Malformed form body")?;
        if params.insert(name, value).is_some() {
            return Err("A parameter is repeated");
        }
    }
    Ok(params)
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn form_decode(s: &str) -> Option<String> {
    let hex = |b: Option<u8>| u8::try_from(char::from(b?).to_digit(16)?).ok();
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => (hex(bytes.next())? << 4) | hex(bytes.next())?,
            other => other,
        });
    }
    String::from_utf8(out).ok()
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(SeqCst)
}

/// Increments and returns the new value.
fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, SeqCst) + 1
}

fn response(status: StatusCode, mime: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = with_header(Response::new(Full::new(body.into())), CONTENT_TYPE, mime);
    *resp.status_mut() = status;
    resp
}

fn with_header(mut resp: Response<Body>, name: HeaderName, value: &'static str) -> Response<Body> {
    resp.headers_mut()
        .insert(name, HeaderValue::from_static(value));
    resp
}

/// RFC 6749 §5.1: token responses must not be cached.
fn no_store(resp: Response<Body>) -> Response<Body> {
    with_header(resp, header::CACHE_CONTROL, "no-store")
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    response(status, "application/json", body.to_string())
}

/// `{"error": CODE}`, the API's error format.
fn error_json(status: StatusCode, error: &str) -> Response<Body> {
    json_response(status, &json!({ "error": error }))
}

/// A Flinks-format token endpoint error; the status follows from the code.
fn oauth_error(error: &str, description: &str) -> Response<Body> {
    let status = match error {
        "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
        "temporarily_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    let body = json!({"error": error, "error_description": description});
    no_store(json_response(status, &body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};

    type TestClient = Client<HttpConnector, Body>;

    async fn start(opts: SandboxOptions) -> Sandbox {
        Sandbox::start(opts).await.expect("sandbox starts")
    }

    fn http1() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn send(client: &TestClient, req: Request<Body>) -> (u16, HeaderMap, Bytes) {
        let (parts, body) = client.request(req).await.expect("response").into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.status.as_u16(), parts.headers, body)
    }

    fn json_of(body: &[u8]) -> Value {
        serde_json::from_slice(body).expect("JSON body")
    }

    /// A grant with the demo client credentials in the body, plus `extra` fields.
    fn grant(grant_type: &str, extra: Value) -> Value {
        let mut body = json!({"grant_type": grant_type, "client_id": "demo-client"});
        body["client_secret"] = "demo-secret".into();
        for (name, value) in extra.as_object().into_iter().flatten() {
            body[name] = value.clone();
        }
        body
    }

    fn client_credentials() -> Value {
        grant("client_credentials", json!({}))
    }

    fn refresh(token: &str) -> Value {
        grant("refresh_token", json!({ "refresh_token": token }))
    }

    async fn token(sb: &Sandbox, body: Value) -> (u16, Value) {
        let req = Request::post(sb.token_url()).header(CONTENT_TYPE, "application/json");
        let req = req.body(Body::from(body.to_string())).expect("request");
        let (status, headers, body) = send(&http1(), req).await;
        assert_eq!(headers[CONTENT_TYPE], "application/json");
        (status, json_of(&body))
    }

    async fn access_token(sb: &Sandbox) -> String {
        let (status, body) = token(sb, client_credentials()).await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().expect("token").to_owned()
    }

    async fn api(sb: &Sandbox, method: Method, path: &str, token: &str) -> (u16, HeaderMap, Bytes) {
        let req = Request::builder().method(method);
        let req = req.uri(format!("{}{path}", sb.api_url()));
        let req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        send(&http1(), req.body(Body::default()).expect("request")).await
    }

    async fn get_status(sb: &Sandbox, path: &str, token: &str) -> u16 {
        api(sb, Method::GET, path, token).await.0
    }

    #[tokio::test]
    async fn client_credentials_returns_a_jwt_shaped_token() {
        let sb = start(SandboxOptions::default()).await;
        let (status, body) = token(&sb, client_credentials()).await;
        assert_eq!(status, 200);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["scope"], "client:admin");
        assert!(body.get("refresh_token").is_none());
        let access_token = body["access_token"].as_str().expect("token");
        let claims = decode_jwt_claims(access_token).expect("claims");
        assert_eq!(claims["client_id"], "demo-client");
        assert_eq!(claims["sub"], "user-123");
        let exp = claims["exp"].as_u64().expect("exp");
        assert!((3599..=3600).contains(&(exp - claims["iat"].as_u64().expect("iat"))));
        assert_ne!(super::tests::access_token(&sb).await, access_token);
        assert_eq!(sb.token_requests(), 2);
        assert_eq!(sb.token_requests_by_grant("client_credentials"), 2);
        assert_eq!(sb.successful_token_requests(), 2);
    }

    #[tokio::test]
    async fn form_body_with_basic_auth_is_accepted() {
        let secret = "s3cr:t+/ é".to_owned();
        let sb = start(SandboxOptions {
            client_secret: secret,
            ..Default::default()
        })
        .await;
        let basic = STANDARD.encode("demo-client:s3cr%3At%2B%2F+%C3%A9");
        let req = Request::post(sb.token_url())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(AUTHORIZATION, format!("Basic {basic}"))
            .body(Body::from(
                "grant_type=client_credentials&scope=client%3Aadmin",
            ))
            .expect("request");
        let (status, _, body) = send(&http1(), req).await;
        assert_eq!(status, 200, "{body:?}");
    }

    #[tokio::test]
    async fn bad_requests_get_flinks_format_errors() {
        let sb = start(SandboxOptions::default()).await;
        let wrong_secret = grant("client_credentials", json!({"client_secret": "no"}));
        let (status, body) = token(&sb, wrong_secret).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_client");
        assert!(body["error_description"].is_string());
        let (status, body) = token(&sb, json!({"client_id": "demo-client"})).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "unsupported_grant_type");
        let req = Request::post(sb.token_url()).header(CONTENT_TYPE, "application/json");
        let req = req.body(Body::from("{oops")).expect("request");
        let (status, _, body) = send(&http1(), req).await;
        assert_eq!(status, 400);
        assert_eq!(json_of(&body)["error"], "invalid_request");
        let req = Request::get(sb.token_url()).body(Body::default());
        assert_eq!(send(&http1(), req.expect("request")).await.0, 405);
        assert_eq!(sb.token_requests(), 4);
        assert_eq!(sb.successful_token_requests(), 0);
    }

    #[tokio::test]
    async fn authorization_code_is_single_use_and_checks_redirect_uri() {
        let sb = start(SandboxOptions::default()).await;
        let exchange = |uri: &str| {
            let fields = json!({"code": "demo-code", "redirect_uri": uri});
            grant("authorization_code", fields)
        };
        let (status, body) = token(&sb, exchange("https://example.com/other")).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
        let (status, body) = token(&sb, exchange("https://example.com/callback")).await;
        assert_eq!(status, 200);
        assert_eq!(body["refresh_token"], "demo-refresh-token");
        let (status, body) = token(&sb, exchange("https://example.com/callback")).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
        assert_eq!(sb.token_requests_by_grant("authorization_code"), 3);
    }

    #[tokio::test]
    async fn flinks_refresh_token_never_changes_until_revoked() {
        let sb = start(SandboxOptions::default()).await;
        for _ in 0..2 {
            let (status, body) = token(&sb, refresh("demo-refresh-token")).await;
            assert_eq!(status, 200);
            assert!(body.get("refresh_token").is_none());
        }
        sb.revoke_refresh_token();
        let (status, body) = token(&sb, refresh("demo-refresh-token")).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
        let description = "The refresh token is invalid or has been revoked";
        assert_eq!(body["error_description"], description);
    }

    #[tokio::test]
    async fn rotating_refresh_token_invalidates_the_old_one() {
        let opts = SandboxOptions {
            rotate_refresh_tokens: true,
            ..Default::default()
        };
        let sb = start(opts).await;
        let (status, body) = token(&sb, refresh("demo-refresh-token")).await;
        assert_eq!(status, 200);
        let rotated = body["refresh_token"].as_str().expect("new refresh token");
        assert_ne!(rotated, "demo-refresh-token");
        assert_eq!(sb.current_refresh_token(), rotated);
        let (status, body) = token(&sb, refresh("demo-refresh-token")).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
        assert_eq!(token(&sb, refresh(rotated)).await.0, 200);
    }

    #[tokio::test]
    async fn api_requires_a_live_token_and_records_requests() {
        let sb = start(SandboxOptions::default()).await;
        let req = Request::get(format!("{}/api/v1/accounts", sb.api_url()));
        let (status, headers, body) = send(&http1(), req.body(Body::default()).expect("req")).await;
        assert_eq!(status, 401);
        assert_eq!(headers[header::WWW_AUTHENTICATE], CHALLENGE);
        assert_eq!(json_of(&body)["error"], "invalid_token");
        assert_eq!(get_status(&sb, "/x", "forged").await, 401);

        let token = access_token(&sb).await;
        let (status, _, body) = api(&sb, Method::GET, "/api/v1/accounts", &token).await;
        assert_eq!(status, 200);
        assert_eq!(json_of(&body)["Accounts"][0]["Currency"], "CAD");
        assert_eq!(api(&sb, Method::DELETE, "/status/418", &token).await.0, 418);
        let (status, headers, body) = api(&sb, Method::GET, "/v1/things?x=1", &token).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-echo-body-len"], "0");
        let echo = json_of(&body);
        assert_eq!(echo["method"], "GET");
        assert_eq!(echo["path"], "/v1/things");
        assert_eq!(echo["query"], "x=1");
        assert_eq!(echo["headers"]["authorization"], format!("Bearer {token}"));

        assert_eq!(sb.api_requests(), 5);
        assert_eq!(sb.rejected_api_requests(), 2);
        assert_eq!(sb.expired_token_requests(), 0);
        let recorded = sb.recorded();
        assert_eq!(recorded.len(), 5);
        assert!(!recorded[0].token_valid && recorded[4].token_valid);
        assert_eq!(recorded[4].path_and_query, "/v1/things?x=1");
        sb.revoke_access_tokens();
        assert_eq!(get_status(&sb, "/api/v1/accounts", &token).await, 401);
    }

    #[tokio::test]
    async fn token_expiry_makes_api_answer_401() {
        let lifetime = Duration::from_millis(300);
        let opts = SandboxOptions {
            expires_in: None,
            jwt_lifetime: lifetime,
            ..Default::default()
        };
        let sb = start(opts).await;
        let (status, body) = token(&sb, client_credentials()).await;
        assert_eq!(status, 200);
        assert!(body.get("expires_in").is_none());
        let token = body["access_token"].as_str().expect("token");
        assert!(decode_jwt_claims(token).expect("claims")["exp"].is_u64());
        assert_eq!(get_status(&sb, "/api/v1/accounts", token).await, 200);
        tokio::time::sleep(lifetime + Duration::from_millis(100)).await;
        assert_eq!(get_status(&sb, "/api/v1/accounts", token).await, 401);
        assert_eq!(sb.rejected_api_requests(), 1);
        assert_eq!(sb.expired_token_requests(), 1);
    }

    #[tokio::test]
    async fn failure_modes_answer_like_broken_servers() {
        let sb = start(SandboxOptions::default()).await;
        let cases = [
            (FailureMode::ServerError, 500, Some("server_error")),
            (
                FailureMode::TemporarilyUnavailable,
                503,
                Some("temporarily_unavailable"),
            ),
            (FailureMode::InvalidClient, 400, Some("invalid_client")),
            (FailureMode::NoToken, 200, None),
        ];
        for (mode, status, error) in cases {
            sb.set_failure(mode);
            let (got, body) = token(&sb, client_credentials()).await;
            assert_eq!(got, status, "{mode:?}");
            assert_eq!(body["error"].as_str(), error, "{mode:?}");
            assert!(body.get("access_token").is_none());
        }
        sb.set_failure(FailureMode::Garbage);
        let req = Request::post(sb.token_url()).body(Body::from(client_credentials().to_string()));
        let (status, _, body) = send(&http1(), req.expect("request")).await;
        assert_eq!(status, 200);
        assert!(serde_json::from_slice::<Value>(&body).is_err());
        assert_eq!(sb.successful_token_requests(), 0);
        assert_eq!(sb.token_requests_by_grant("client_credentials"), 5);
    }

    #[tokio::test]
    async fn hang_holds_requests_until_the_mode_changes() {
        let sb = start(SandboxOptions::default()).await;
        sb.set_failure(FailureMode::Hang);
        let mut hanging = JoinSet::new();
        for _ in 0..3 {
            let sb = sb.clone();
            hanging.spawn(async move { token(&sb, client_credentials()).await.0 });
        }
        sb.wait_for_token_requests(3).await;
        assert_eq!(sb.token_requests_in_flight(), 3);
        sb.set_failure(FailureMode::None);
        while let Some(status) = hanging.join_next().await {
            assert_eq!(status.expect("task"), 200);
        }
        assert_eq!(sb.max_concurrent_token_requests(), 3);
        assert_eq!(sb.token_requests_in_flight(), 0);
    }

    #[tokio::test]
    async fn client_giving_up_on_hang_ends_the_request() {
        let sb = start(SandboxOptions::default()).await;
        sb.set_failure(FailureMode::Hang);
        let request = token(&sb, client_credentials());
        let gave_up = tokio::time::timeout(Duration::from_millis(100), request).await;
        assert!(gave_up.is_err());
        for _ in 0..100 {
            if sb.token_requests_in_flight() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the hanging handler outlived its client");
    }

    #[tokio::test]
    async fn one_mib_body_round_trips_over_h2c_after_the_delay() {
        let sb = start(SandboxOptions::default()).await;
        let token = access_token(&sb).await;
        sb.set_api_delay(Duration::from_millis(100));
        let h2c: TestClient = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let payload: Bytes = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let req = Request::put(format!("{}/upload", sb.api_url()))
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header("x-echo-body", "1")
            .body(Body::new(payload.clone()))
            .expect("request");
        let started = Instant::now();
        let (status, headers, body) = send(&h2c, req).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(status, 200);
        assert_eq!(headers[CONTENT_TYPE], "application/octet-stream");
        assert_eq!(headers["x-echo-body-len"], "1048576");
        assert!(body == payload && sb.recorded()[0].body == payload);
    }

    fn user_opts() -> SandboxOptions {
        SandboxOptions {
            users: vec![SandboxUser::new("alice")],
            expires_in: Some(60),
            rotate_refresh_tokens: true,
            ..Default::default()
        }
    }

    fn code_grant(code: &str) -> Value {
        let fields = json!({"code": code, "redirect_uri": "https://example.com/callback"});
        grant("authorization_code", fields)
    }

    #[tokio::test]
    async fn a_retired_refresh_token_presented_again_counts_as_a_reuse() {
        let sb = start(user_opts()).await;
        let (status, body) = token(&sb, code_grant("code-alice")).await;
        assert_eq!(status, 200, "{body}");
        let first = body["refresh_token"].as_str().expect("rt").to_owned();
        assert_eq!(
            sb.last_rotation("alice"),
            None,
            "a code exchange rotates nothing"
        );
        let (status, body) = token(&sb, refresh(&first)).await;
        assert_eq!(status, 200, "{body}");
        let rotated_at = sb.last_rotation("alice").expect("rotated");
        assert_eq!(sb.reused_refresh_tokens(), 0);
        // Counted whatever the endpoint answers: the presenter lost the new one.
        sb.set_failure(FailureMode::ServerError);
        assert_eq!(token(&sb, refresh(&first)).await.0, 500);
        sb.set_failure(FailureMode::None);
        let (status, body) = token(&sb, refresh(&first)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_grant"))
        );
        assert_eq!(sb.reused_refresh_tokens(), 2);
        let reuses = sb.refresh_token_reuses();
        assert_eq!(reuses.len(), 2);
        assert_eq!(reuses[0].sub, "alice");
        assert_eq!(reuses[0].rotated_at, rotated_at);
        assert!(reuses[1].presented_at >= reuses[0].presented_at);
        // An unknown token is no reuse.
        assert_eq!(token(&sb, refresh("rt-never-issued")).await.0, 400);
        assert_eq!(sb.reused_refresh_tokens(), 2);
    }

    #[tokio::test]
    async fn issued_secrets_and_per_user_lifetimes() {
        let sb = start(user_opts()).await;
        sb.set_user_token_lifetime("alice", Some(Duration::from_secs(7)));
        let code = sb.new_code("alice");
        let (status, body) = token(&sb, code_grant(&code)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["expires_in"], 7);
        let issued = sb.issued_secrets();
        for s in ["code-alice", code.as_str()] {
            assert!(issued.iter().any(|i| i == s), "{s} in {issued:?}");
        }
        for field in ["access_token", "refresh_token"] {
            let s = body[field].as_str().expect("token");
            assert!(issued.iter().any(|i| i == s), "{field}");
        }
        sb.set_user_token_lifetime("alice", None);
        let rt = body["refresh_token"].as_str().expect("rt");
        assert_eq!(token(&sb, refresh(rt)).await.1["expires_in"], 60);
    }

    #[tokio::test]
    async fn a_delayed_request_of_a_revoked_user_answers_602_after_reauthorization() {
        let sb = start(user_opts()).await;
        let (_, body) = token(&sb, code_grant("code-alice")).await;
        let old = body["access_token"].as_str().expect("token").to_owned();
        sb.revoke_consent("alice");
        let late = {
            let sb = sb.clone();
            let old = old.clone();
            tokio::spawn(async move {
                let req = Request::get(format!("{}/api/fdx/5/accounts", sb.api_url()))
                    .header(AUTHORIZATION, format!("Bearer {old}"))
                    .header(DELAY_HEADER, "300")
                    .body(Body::default())
                    .expect("request");
                send(&http1(), req).await
            })
        };
        while sb.api_requests() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (status, _) = token(&sb, code_grant(&sb.new_code("alice"))).await;
        assert_eq!(status, 200);
        let (status, _, body) = late.await.expect("task");
        assert_eq!(status, 401, "decided on arrival");
        assert_eq!(json_of(&body)["code"], "602");
        let (status, _, _) = api(&sb, Method::GET, "/api/fdx/5/accounts", &old).await;
        assert_eq!(status, 200, "without the header: decided now");
    }

    #[tokio::test]
    async fn dropping_the_sandbox_stops_its_servers() {
        let sb = start(SandboxOptions::default()).await;
        let addr = sb.token_addr();
        drop(sb);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("token endpoint still accepts connections after drop");
    }

    #[test]
    fn form_decoding_follows_the_urlencoded_rules() {
        assert_eq!(form_decode("a+b%2Fc%3a").as_deref(), Some("a b/c:"));
        assert_eq!(form_decode("%C3%A9").as_deref(), Some("é"));
        for bad in ["%4", "%zz", "%FF"] {
            assert_eq!(form_decode(bad), None, "{bad}");
        }
    }
}
