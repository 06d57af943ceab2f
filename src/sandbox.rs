//! Sandbox: a Flinks-like OAuth 2.0 token endpoint, authorize endpoint
//! (a consent page) and API, served on loopback for `flinks-proxy demo`,
//! integration tests and benches.
//!
//! Owns two small hyper servers (HTTP/1.1 and h2c each), the tokens they
//! issue, and counters that tests assert on. The token endpoint follows
//! SPEC §1 (JSON bodies like Flinks; form bodies and HTTP Basic like generic
//! OAuth servers) and can be told to fail the way real ones do
//! ([`FailureMode`]). Its listener also serves [`AUTHORIZE_PATH`]
//! (CONNECT.md): a consent page whose codes the token endpoint exchanges,
//! checking PKCE. The API accepts only live tokens it issued.
//!
//! It owns nothing the proxy does and is not a security component: tokens
//! are JWT-shaped but unsigned (`alg: none`).
//!
//! This file holds the public face ([`Sandbox`], its options and what it
//! reports) and the state both servers share; the rest is a file each:
//! `token.rs` (the token endpoint: grants, rotation, failure modes),
//! `users.rs` (end users: their grants, consent, reuse detection),
//! `bench.rs` (stateless bench users, known by their tokens' form),
//! `authorize.rs` (the consent page, its codes and their exchange, PKCE,
//! and the [`Sandbox`] getters about them),
//! `api.rs` (the API: token checks, accounts, consent revoked as `602`,
//! the echo) and `server.rs` (accept loops and response helpers).

mod api;
mod authorize;
pub mod bench;
mod revoke;
mod server;
#[cfg(test)]
mod tests;
mod token;
mod users;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ground::lock;
use authorize::Authorizations;
use server::{serve, Role};
use token::{Grant, GrantState, PRUNE_AT};
use users::Users;

/// Path of the token endpoint, as Flinks serves it.
pub const TOKEN_PATH: &str = "/api/v1/token";
/// Path of the authorize endpoint (the consent page), as Flinks serves it,
/// on the token endpoint's listener.
pub const AUTHORIZE_PATH: &str = "/api/v1/authorize";
pub use revoke::REVOKE_PATH;
/// API requests kept by [`Sandbox::recorded`]: enough for any test, bounded for benches.
const RECORD_CAPACITY: usize = 1000;
/// Secrets kept by [`Sandbox::issued_secrets`] (the newest): a fault-injection
/// run issues a few thousand; benches issuing millions keep only the tail.
const ISSUED_CAPACITY: usize = 50_000;
/// A request header for the API: wait this many milliseconds before
/// answering, deciding the answer for a revoked user's token (`602`) on
/// arrival, as a server that checked the token first and answers late does.
pub const DELAY_HEADER: &str = "x-sandbox-delay-ms";

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
    /// Stateless bench users `u0..u{N-1}` (see [`bench`]): their tokens
    /// are known by their form, so a store can be seeded without the
    /// sandbox. 0: none.
    pub bench_users: u64,
    /// With `rotate_refresh_tokens`: how long the previous refresh token
    /// is still accepted after a rotation (Okta's and Auth0's "grace
    /// period" / "reuse interval"); within it, the previous token gets the
    /// current refresh token back and rotates nothing. Zero: none.
    pub refresh_reuse_grace: Duration,
    /// When set, the authorize endpoint's redirects carry it as `iss`
    /// (RFC 9207).
    pub issuer: Option<String>,
    /// How long a consent page's request and a code it gives stay usable.
    pub authorize_lifetime: Duration,
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
            bench_users: 0,
            refresh_reuse_grace: Duration::ZERO,
            issuer: None,
            authorize_lifetime: Duration::from_secs(600),
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
    /// codes, the consent page's codes and request ids) and every PKCE
    /// `code_verifier` presented to it, the newest
    /// 50,000, oldest first: what must never appear in a log.
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

/// What both servers share: the options, the failure mode, the grants and
/// users, the counters and the records tests read.
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
    /// The authorize endpoint's requests and codes.
    authorize: Mutex<Authorizations>,
}

/// The counters behind [`Sandbox`]'s getters (and the delays it was told).
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
    authorize_requests: AtomicU64,
    with_verifier: AtomicU64,
    revocations: AtomicU64,
    verified: AtomicU64,
    code_replays: AtomicU64,
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
            authorize: Mutex::default(),
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

    fn unique_id(&self) -> String {
        let n = bump(&self.n.next_id);
        format!("{n:x}-{:016x}", rand::random::<u64>())
    }
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(SeqCst)
}

/// Increments and returns the new value.
fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, SeqCst) + 1
}
