//! A controllable bank for the durability tests (issue 15): an OAuth token
//! endpoint and an API on loopback whose answers the test can hold and
//! release, so that an interleaving happens on purpose rather than by luck.
//!
//! The token endpoint decides each answer the moment a request arrives (a
//! rotation happens then, as at a real provider that processed the request
//! but whose answer is slow to come back), then waits while its gate is
//! held. Refresh tokens rotate with no reuse grace when asked, and every
//! rotated-away refresh token presented again is recorded: that is a lost
//! rotation. The API answers live tokens 200, revoked consent 401
//! `{"code":"602"}`, anything else 401 `invalid_token`, deciding on arrival
//! too. It also owns a typed proxy config for a pool on this bank.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::config::{Pool, ProxyToml, Route, Store, API_TOKEN};

/// The bank's client id.
pub const CLIENT_ID: &str = "durability-client";
/// The bank's client secret (it accepts any; refusals are simulated).
pub const CLIENT_SECRET: &str = "durability-secret";
/// The pool name of [`ProxyConfig`].
pub const POOL: &str = "users";
/// How long the tests wait for an event before failing.
const EVENT_LIMIT: Duration = Duration::from_secs(15);

/// What happened at one of the bank's gates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateCounts {
    /// Requests received (their answers decided).
    pub arrived: u64,
    /// Answers handed back to the connection.
    pub answered: u64,
    /// Requests whose client left before the answer was handed back.
    pub abandoned: u64,
}

/// Holds answers while armed; counts arrivals and answers.
struct Gate {
    held: watch::Sender<bool>,
    counts: watch::Sender<GateCounts>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            held: watch::Sender::new(false),
            counts: watch::Sender::new(GateCounts::default()),
        }
    }

    /// Counts the arrival, waits while held, counts the answer (or the
    /// abandonment, if the future is dropped meanwhile).
    async fn pass(&self) {
        struct Abandoned<'a>(&'a Gate, bool);
        impl Drop for Abandoned<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.counts.send_modify(|c| c.abandoned += 1);
                }
            }
        }
        let mut held = self.held.subscribe();
        self.counts.send_modify(|c| c.arrived += 1);
        let mut guard = Abandoned(self, false);
        // The sender lives in `self`: this cannot fail.
        let _ = held.wait_for(|h| !*h).await;
        guard.1 = true;
        self.counts.send_modify(|c| c.answered += 1);
    }

    async fn wait(&self, what: &str, cond: impl Fn(&GateCounts) -> bool) -> GateCounts {
        let mut rx = self.counts.subscribe();
        let seen = match tokio::time::timeout(EVENT_LIMIT, rx.wait_for(|c| cond(c))).await {
            Ok(Ok(c)) => *c,
            _ => panic!("timed out waiting for {what}: {:?}", *self.counts.borrow()),
        };
        seen
    }
}

/// An access token the bank issued.
struct Access {
    sub: String,
    until: Instant,
    consent_revoked: bool,
}

#[derive(Default)]
struct Books {
    /// Unused codes -> sub.
    codes: HashMap<String, String>,
    /// Refresh tokens accepted now -> sub.
    live: HashMap<String, String>,
    /// Refresh tokens rotated away.
    retired: HashSet<String>,
    /// Rotated-away refresh tokens presented again (lost rotations).
    reused: Vec<String>,
    access: HashMap<String, Access>,
    rotate: bool,
    /// Seconds, possibly fractional.
    lifetime: f64,
    /// Every grant is answered with this status and OAuth error.
    refusal: Option<(u16, String)>,
    /// API answers `602`.
    consent_revoked_answers: u64,
    /// Refresh grants received, per sub.
    refreshes: HashMap<String, u64>,
    /// Code exchanges that issued tokens, per sub.
    authorizations: HashMap<String, u64>,
    next: u64,
}

impl Books {
    fn id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// A new refresh token for `sub`, accepted from now on.
    fn new_refresh(&mut self, sub: &str) -> String {
        let rt = format!("rt-{sub}-{}", self.id());
        self.live.insert(rt.clone(), sub.to_owned());
        rt
    }

    /// A new access token for `sub`, living [`Books::lifetime`].
    fn new_access(&mut self, sub: &str) -> String {
        let at = format!("at-{sub}-{}", self.id());
        let access = Access {
            sub: sub.to_owned(),
            until: Instant::now() + Duration::from_secs_f64(self.lifetime),
            consent_revoked: false,
        };
        self.access.insert(at.clone(), access);
        at
    }

    fn granted(&self, rt: &str, at: &str) -> (StatusCode, Value) {
        let body = json!({"access_token": at, "token_type": "Bearer",
                          "expires_in": self.lifetime, "refresh_token": rt});
        (StatusCode::OK, body)
    }

    fn token(&mut self, params: &HashMap<String, String>) -> (StatusCode, Value) {
        if let Some((status, error)) = &self.refusal {
            let status = StatusCode::from_u16(*status).expect("status");
            let body = json!({"error": error, "error_description": "simulated refusal"});
            return (status, body);
        }
        let invalid_grant = |why: &str| {
            let body = json!({"error": "invalid_grant", "error_description": why});
            (StatusCode::BAD_REQUEST, body)
        };
        match params.get("grant_type").map(String::as_str) {
            Some("authorization_code") => {
                let Some(sub) = params.get("code").and_then(|c| self.codes.remove(c)) else {
                    return invalid_grant("unknown or used code");
                };
                *self.authorizations.entry(sub.clone()).or_default() += 1;
                let (rt, at) = (self.new_refresh(&sub), self.new_access(&sub));
                self.granted(&rt, &at)
            }
            Some("refresh_token") => {
                let presented = params.get("refresh_token").cloned().unwrap_or_default();
                let Some(sub) = self.live.get(&presented).cloned() else {
                    if self.retired.contains(&presented) {
                        self.reused.push(presented);
                        return invalid_grant("this refresh token was rotated away");
                    }
                    return invalid_grant("unknown or revoked refresh token");
                };
                *self.refreshes.entry(sub.clone()).or_default() += 1;
                let rt = if self.rotate {
                    self.live.remove(&presented);
                    self.retired.insert(presented);
                    self.new_refresh(&sub)
                } else {
                    presented
                };
                let at = self.new_access(&sub);
                self.granted(&rt, &at)
            }
            _ => (
                StatusCode::BAD_REQUEST,
                json!({"error": "unsupported_grant_type"}),
            ),
        }
    }

    fn api(&mut self, bearer: Option<&str>) -> (StatusCode, Value) {
        let access = bearer.and_then(|t| self.access.get(t).map(|a| (t, a)));
        match access {
            Some((_, a)) if a.consent_revoked => {
                self.consent_revoked_answers += 1;
                let body = json!({"code": "602", "message": "consent revoked"});
                (StatusCode::UNAUTHORIZED, body)
            }
            Some((t, a)) if Instant::now() < a.until => {
                (StatusCode::OK, json!({"sub": a.sub, "token": t}))
            }
            _ => (StatusCode::UNAUTHORIZED, json!({"error": "invalid_token"})),
        }
    }
}

struct Shared {
    books: Mutex<Books>,
    token: Gate,
    api: Gate,
}

impl Shared {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running bank; its servers stop when it is dropped.
pub struct Bank {
    token_addr: SocketAddr,
    api_addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Bank {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

#[derive(Clone, Copy)]
enum Role {
    Token,
    Api,
}

impl Bank {
    /// A bank issuing tokens that live `lifetime` seconds; with `rotate`,
    /// every refresh retires the refresh token presented (no grace).
    pub async fn start(rotate: bool, lifetime: f64) -> Bank {
        let shared = Arc::new(Shared {
            books: Mutex::new(Books {
                rotate,
                lifetime,
                ..Books::default()
            }),
            token: Gate::new(),
            api: Gate::new(),
        });
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let (token, api) = (bind().await.expect("bind"), bind().await.expect("bind"));
        let (token_addr, api_addr) = (token.local_addr().unwrap(), api.local_addr().unwrap());
        let tasks = vec![
            tokio::spawn(serve(token, Arc::clone(&shared), Role::Token)),
            tokio::spawn(serve(api, Arc::clone(&shared), Role::Api)),
        ];
        Bank {
            token_addr,
            api_addr,
            shared,
            tasks,
        }
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.token_addr)
    }

    /// The API's base URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// A new single-use code for `sub`.
    pub fn new_code(&self, sub: &str) -> String {
        let mut b = self.shared.books();
        let code = format!("code-{sub}-{}", b.id());
        b.codes.insert(code.clone(), sub.to_owned());
        code
    }

    /// Lifetime (seconds) of the tokens issued from now on.
    pub fn set_lifetime(&self, secs: f64) {
        self.shared.books().lifetime = secs;
    }

    /// Answers every grant from now on with `status` `{"error": error}`.
    pub fn refuse(&self, status: u16, error: &str) {
        self.shared.books().refusal = Some((status, error.to_owned()));
    }

    /// Ends [`Bank::refuse`]: the client is accepted again.
    pub fn accept(&self) {
        self.shared.books().refusal = None;
    }

    /// The user's refresh tokens stop working (`invalid_grant`), as when a
    /// bank revokes a grant; their access tokens keep working.
    pub fn revoke_refresh_tokens(&self, sub: &str) {
        self.shared.books().live.retain(|_, s| s != sub);
    }

    /// The user revoked their consent: their access tokens get 401 `602`
    /// and their refresh tokens `invalid_grant`; a new code starts afresh.
    pub fn revoke_consent(&self, sub: &str) {
        let mut b = self.shared.books();
        b.live.retain(|_, s| s != sub);
        for a in b.access.values_mut().filter(|a| a.sub == sub) {
            a.consent_revoked = true;
        }
    }

    /// Holds token answers until [`Bank::release_tokens`].
    pub fn hold_tokens(&self) {
        self.shared.token.held.send_replace(true);
    }

    /// Lets held and later token answers go.
    pub fn release_tokens(&self) {
        self.shared.token.held.send_replace(false);
    }

    /// Holds API answers until [`Bank::release_api`].
    pub fn hold_api(&self) {
        self.shared.api.held.send_replace(true);
    }

    /// Lets held and later API answers go.
    pub fn release_api(&self) {
        self.shared.api.held.send_replace(false);
    }

    /// The token endpoint's counts now.
    pub fn token_counts(&self) -> GateCounts {
        *self.shared.token.counts.borrow()
    }

    /// Waits until the token endpoint's counts satisfy `cond`.
    pub async fn wait_token(&self, what: &str, cond: impl Fn(&GateCounts) -> bool) -> GateCounts {
        self.shared.token.wait(what, cond).await
    }

    /// Waits until the API's counts satisfy `cond`.
    pub async fn wait_api(&self, what: &str, cond: impl Fn(&GateCounts) -> bool) -> GateCounts {
        self.shared.api.wait(what, cond).await
    }

    /// Refresh grants received for `sub` with a refresh token it accepted.
    pub fn refreshes(&self, sub: &str) -> u64 {
        self.shared.books().refreshes.get(sub).copied().unwrap_or(0)
    }

    /// Code exchanges for `sub` that issued tokens.
    pub fn authorizations(&self, sub: &str) -> u64 {
        let b = self.shared.books();
        b.authorizations.get(sub).copied().unwrap_or(0)
    }

    /// API answers `401 {"code":"602"}` so far.
    pub fn consent_revoked_answers(&self) -> u64 {
        self.shared.books().consent_revoked_answers
    }

    /// Rotated-away refresh tokens presented again: each is a rotation the
    /// proxy lost.
    pub fn reused_refresh_tokens(&self) -> Vec<String> {
        self.shared.books().reused.clone()
    }
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, role: Role) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(answer(&shared, role, req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn answer(shared: &Shared, role: Role, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let (status, body) = match role {
        Role::Token => {
            let params = params(&body.unwrap_or_default());
            let decided = shared.books().token(&params);
            shared.token.pass().await;
            decided
        }
        Role::Api => {
            let decided = shared.books().api(bearer.as_deref());
            shared.api.pass().await;
            decided
        }
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

/// A JSON object's string fields, else a form body's fields.
fn params(body: &[u8]) -> HashMap<String, String> {
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) {
        return m
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
            .collect();
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), form_decode(v)))
        .collect()
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ------------------------------------------------------------- proxy config

/// A proxy config with an SQLite store and one pool on a [`Bank`]: typed
/// settings rendered to TOML once.
pub struct ProxyConfig {
    pub token_url: String,
    pub api_url: String,
    pub db: std::path::PathBuf,
    pub key: String,
    pub request_timeout: Duration,
    pub token_timeout: Duration,
    pub cache_size: Option<u64>,
    pub refresh_concurrency: Option<usize>,
}

impl ProxyConfig {
    /// Defaults: 5 s request timeout, 5 s token timeout, default cache.
    pub fn new(bank: &Bank, db: &Path) -> ProxyConfig {
        ProxyConfig {
            token_url: bank.token_url(),
            api_url: bank.api_url(),
            db: db.to_path_buf(),
            key: super::connections::new_key(),
            request_timeout: Duration::from_secs(5),
            token_timeout: Duration::from_secs(5),
            cache_size: None,
            refresh_concurrency: None,
        }
    }

    /// The TOML text.
    pub fn toml(&self) -> String {
        let pool = Pool {
            token_url: self.token_url.clone(),
            client_id: CLIENT_ID.to_owned(),
            client_secret: Some(CLIENT_SECRET.into()),
            redirect_uri: Some("https://example.com/callback".to_owned()),
            token_timeout: Some(self.token_timeout),
            cache_size: self.cache_size,
            refresh_concurrency: self.refresh_concurrency,
            ..Pool::default()
        };
        ProxyToml::listeners()
            .with(|c| {
                c.server.request_timeout = Some(self.request_timeout);
                c.admin_mut().api_token = Some(API_TOKEN.into());
                c.store = Some(Store::sqlite(&self.db, &self.key));
            })
            .pool_table(POOL, pool)
            .route("bank", Route::pool("/", &self.api_url, POOL))
            .toml()
    }
}

/// `state` and `refresh_token` (sealed text, or `None` for NULL) of a row,
/// read from the SQLite file directly (read-only).
pub async fn stored_row(db: &Path, id: &str) -> (String, Option<String>) {
    use sqlx::ConnectOptions as _;
    let mut c = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .expect("open the store file");
    let row: (String, Option<String>) =
        sqlx::query_as("SELECT state, refresh_token FROM connections WHERE pool = ? AND id = ?")
            .bind(POOL)
            .bind(id)
            .fetch_one(&mut c)
            .await
            .expect("the connection's row");
    row
}
