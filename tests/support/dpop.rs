//! A DPoP (RFC 9449) resource server on loopback, for the tests of the
//! proxy's DPoP tokens and of the infrastructure itself
//! (tests/dpop_server.rs): plain HTTP/1.1 and h2c on `127.0.0.1:0`,
//! recording every request and the outcome of its checks.
//!
//! Every request must carry `Authorization: DPoP <token>` and exactly one
//! `DPoP` proof, checked as RFC 9449 §4.3 and §7.1 say: a JWS with `typ`
//! `dpop+jwt`, an asymmetric `alg` ([`ALGS`]), a public header `jwk`
//! (no private members) under which it verifies; claims `jti` (never seen
//! before), `htm` = the method, `htu` = this server's URL and the request
//! path (no query or fragment; RFC 3986 §6.2.2 syntax normalization:
//! case of scheme, host and percent-encodings, default port, unreserved
//! characters decoded), `iat` within [`DpopOptions::iat_window`], `ath` =
//! base64url(SHA-256(token)); the token a JWT verifying under the
//! authorization server's [`Jwks`], unexpired, with `cnf.jkt` = the RFC
//! 7638 thumbprint of the proof's key; and, when
//! [`DpopOptions::require_nonce`], `nonce` = the server's current nonce
//! (RFC 9449 §9), which it rotates every
//! [`DpopOptions::rotate_nonce_every`] accepted requests or on
//! [`DpopServer::rotate_nonce`].
//!
//! Answers: 200 with JSON `{"method", "path", "claims"}` (the token's
//! claims); refusals are 401 with `WWW-Authenticate: DPoP error="..."` (see
//! [`Reason::error`]) and the [`Reason`] and a detail as the body (also,
//! as [`Reason::RefusedOnDemand`], for the requests a test asked to refuse
//! with [`DpopServer::refuse_next`]); a nonce
//! refusal and every 200 carry `DPoP-Nonce` (the current nonce) when nonces
//! are required. What it does not check: the token's `aud` and `scope`
//! (the test reads them from [`Seen::token_claims`]), and proofs at token
//! endpoints (oidc-provider does that).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::jwks::{thumbprint, Jwks, Jws, ALGS};

/// How long [`DpopServer::wait_requests`] waits: a request through the
/// proxy takes milliseconds; this leaves room for a loaded CI machine.
pub const WAIT_DEADLINE: Duration = Duration::from_secs(10);

/// Why a request was refused: one class per check, so that a test asserts
/// the exact check that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No `Authorization` header (RFC 6750 §3.1: no error code).
    NoAuthorization,
    /// `Authorization` with a scheme other than `DPoP` or `Bearer`, or no
    /// token after it.
    WrongScheme,
    /// A DPoP-bound token (`cnf.jkt`) as `Authorization: Bearer` (RFC 9449
    /// §7.1: refused).
    BoundTokenAsBearer,
    /// An unbound token as `Bearer`: this server takes DPoP only.
    BearerNotAccepted,
    /// No `DPoP` header.
    NoProof,
    /// More than one `DPoP` header (§4.3 check 1).
    MultipleProofs,
    /// Not a compact JWS with JSON header and claims (§4.3 checks 2-3).
    MalformedProof,
    /// `typ` is not `dpop+jwt` (check 4).
    WrongTyp,
    /// `alg` is `none`, symmetric (HS*) or unknown (check 5).
    UnacceptableAlg,
    /// No header `jwk`, or one that is not an asymmetric public key.
    NoJwk,
    /// The header `jwk` has private members (`d`, ...; check 7).
    PrivateKeyInJwk,
    /// The signature does not verify under the header `jwk` (check 6).
    BadSignature,
    /// No `jti` (or not a string).
    MissingJti,
    /// `htm` is not the request's method (check 8).
    WrongHtm,
    /// `htu` is not this server's URL and the request's path (check 9).
    WrongHtu,
    /// No numeric `iat`.
    MissingIat,
    /// `iat` outside the window (check 11).
    IatOutOfWindow,
    /// `ath` missing or not base64url(SHA-256(token)) (check 12).
    WrongAth,
    /// A `jti` seen before: a replayed proof (§11.1).
    Replay,
    /// Nonces are required and the proof has none (§9).
    NonceMissing,
    /// The proof's nonce is not the current one (check 10).
    NonceStale,
    /// The token is not a JWT verifying under the authorization server's
    /// keys.
    InvalidToken,
    /// The token's `exp` has passed.
    TokenExpired,
    /// The token has no `cnf.jkt`: not DPoP-bound.
    TokenNotBound,
    /// The token is bound to another key than the proof's (check 12's
    /// key binding).
    KeyMismatch,
    /// A request that passed every check, refused because the test asked
    /// ([`DpopServer::refuse_next`]): as a server that revoked the token.
    RefusedOnDemand,
}

impl Reason {
    /// The `error` of the `WWW-Authenticate: DPoP` challenge: `None` for a
    /// request without credentials, `use_dpop_nonce` for nonces,
    /// `invalid_dpop_proof` for the proof, `invalid_token` for the token
    /// and how it is presented (scheme, key binding).
    pub fn error(self) -> Option<&'static str> {
        use Reason::*;
        match self {
            NoAuthorization => None,
            NonceMissing | NonceStale => Some("use_dpop_nonce"),
            WrongScheme | BoundTokenAsBearer | BearerNotAccepted | InvalidToken | TokenExpired
            | TokenNotBound | KeyMismatch | RefusedOnDemand => Some("invalid_token"),
            NoProof | MultipleProofs | MalformedProof | WrongTyp | UnacceptableAlg | NoJwk
            | PrivateKeyInJwk | BadSignature | MissingJti | WrongHtm | WrongHtu | MissingIat
            | IatOutOfWindow | WrongAth | Replay => Some("invalid_dpop_proof"),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The server's settings.
#[derive(Debug, Clone)]
pub struct DpopOptions {
    /// Proofs must carry the current server nonce (RFC 9449 §9).
    pub require_nonce: bool,
    /// A new nonce after every N accepted requests (the answer to the Nth
    /// carries the new one); `None`: only on [`DpopServer::rotate_nonce`].
    pub rotate_nonce_every: Option<usize>,
    /// How far `iat` may be from now, either way.
    pub iat_window: Duration,
}

impl Default for DpopOptions {
    /// Nonces required and never rotated by themselves; `iat` within 60 s
    /// (RFC 9449 §11.1 leaves the window to the server; a minute covers
    /// clock skew between processes on one machine many times over).
    fn default() -> DpopOptions {
        DpopOptions {
            require_nonce: true,
            rotate_nonce_every: None,
            iat_window: Duration::from_secs(60),
        }
    }
}

/// One request the server received, with what it decided.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// 200, or 401 when refused.
    pub status: StatusCode,
    /// Why it was refused, with a detail; `None` when accepted.
    pub refused: Option<(Reason, String)>,
    /// The proof's claims, when there was one proof that decoded.
    pub proof_claims: Option<Value>,
    /// The token's claims, when it verified.
    pub token_claims: Option<Value>,
}

impl Seen {
    /// The refusal's class, `None` when accepted.
    pub fn reason(&self) -> Option<Reason> {
        self.refused.as_ref().map(|(r, _)| *r)
    }

    /// The token of `Authorization: DPoP <token>`; panics for another
    /// scheme.
    pub fn dpop_token(&self) -> String {
        let auth = self.headers["authorization"].to_str().unwrap_or("");
        auth.strip_prefix("DPoP ")
            .unwrap_or_else(|| panic!("not a DPoP authorization: {auth}"))
            .to_owned()
    }
}

/// The DPoP resource server (see the module doc). Stops when dropped.
pub struct DpopServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DpopServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    jwks: Jwks,
    options: DpopOptions,
    /// `http://127.0.0.1:PORT`, what `htu` must start with.
    origin: String,
    inner: Mutex<Inner>,
    /// Woken after each request is recorded.
    recorded: Notify,
}

struct Inner {
    nonce: String,
    accepted_since_rotation: usize,
    /// Otherwise-acceptable requests still to refuse
    /// ([`DpopServer::refuse_next`]).
    refuse_next: usize,
    jtis: HashSet<String>,
    seen: Vec<Seen>,
}

fn new_nonce() -> String {
    B64.encode(rand::random::<[u8; 16]>())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

impl DpopServer {
    /// A server with the default options (nonces required, not rotated)
    /// verifying tokens against `jwks`.
    pub async fn start(jwks: Jwks) -> DpopServer {
        Self::start_with(jwks, DpopOptions::default()).await
    }

    /// A server with `options`, verifying tokens against `jwks`.
    pub async fn start_with(jwks: Jwks, options: DpopOptions) -> DpopServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the DPoP resource server");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            jwks,
            options,
            origin: format!("http://{addr}"),
            inner: Mutex::new(Inner {
                nonce: new_nonce(),
                accepted_since_rotation: 0,
                refuse_next: 0,
                jtis: HashSet::new(),
                seen: Vec::new(),
            }),
            recorded: Notify::new(),
        });
        let serving = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        connections.spawn(serve(stream, Arc::clone(&serving)));
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        DpopServer { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`: the upstream URL to configure, and the
    /// start of every `htu` it accepts.
    pub fn url(&self) -> String {
        self.state.origin.clone()
    }

    /// Its address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current nonce (the one proofs must carry when required).
    pub fn nonce(&self) -> String {
        self.state.lock().nonce.clone()
    }

    /// Replaces the nonce; returns the new one. Proofs with the old one
    /// are then refused as [`Reason::NonceStale`].
    pub fn rotate_nonce(&self) -> String {
        let mut inner = self.state.lock();
        inner.nonce = new_nonce();
        inner.accepted_since_rotation = 0;
        inner.nonce.clone()
    }

    /// Refuses the next `n` requests that pass every check, as
    /// [`Reason::RefusedOnDemand`] (`401`, `WWW-Authenticate: DPoP
    /// error="invalid_token"`): the way to make a client drop a token it
    /// holds and get another, without waiting for it to expire. Their
    /// `jti`s count as seen; the nonce does not rotate for them.
    pub fn refuse_next(&self, n: usize) {
        self.state.lock().refuse_next = n;
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().seen.clone()
    }

    /// Requests accepted so far.
    pub fn accepted(&self) -> usize {
        self.state
            .lock()
            .seen
            .iter()
            .filter(|s| s.refused.is_none())
            .count()
    }

    /// The refusals so far, oldest first: (status, reason).
    pub fn refusals(&self) -> Vec<(StatusCode, Reason)> {
        self.state
            .lock()
            .seen
            .iter()
            .filter_map(|s| Some((s.status, s.reason()?)))
            .collect()
    }

    /// The last accepted request: what the proxy sent (method, path,
    /// headers, body) and its proof's and token's claims.
    pub fn last_accepted(&self) -> Option<Seen> {
        let inner = self.state.lock();
        inner
            .seen
            .iter()
            .rev()
            .find(|s| s.refused.is_none())
            .cloned()
    }

    /// Waits until `n` requests have been answered (accepted or refused);
    /// returns them all. Panics after [`WAIT_DEADLINE`]. A request is
    /// recorded before its answer is sent: who holds the response needs no
    /// wait; this is for what the proxy sends on its own (a nonce retry
    /// behind one client request).
    pub async fn wait_requests(&self, n: usize) -> Vec<Seen> {
        let waited = tokio::time::timeout(WAIT_DEADLINE, async {
            loop {
                let notified = self.state.recorded.notified();
                {
                    let inner = self.state.lock();
                    if inner.seen.len() >= n {
                        return inner.seen.clone();
                    }
                }
                notified.await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            panic!(
                "the DPoP resource server saw fewer than {n} requests: {:?}",
                self.refusals()
            )
        })
    }
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn serve(stream: tokio::net::TcpStream, state: Arc<State>) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let state = Arc::clone(&state);
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, std::convert::Infallible>(answer(&state, parts, body))
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// A request as checked: what decoded on the way, for the record.
#[derive(Default)]
struct Checked {
    proof_claims: Option<Value>,
    token_claims: Option<Value>,
}

type Refusal = (Reason, String);

fn refuse<T>(reason: Reason, detail: impl Into<String>) -> Result<T, Refusal> {
    Err((reason, detail.into()))
}

/// Checks, records and answers one request, all under the lock (the nonce
/// and the `jti` set change with what is accepted).
fn answer(state: &State, parts: http::request::Parts, body: Bytes) -> Response<Full<Bytes>> {
    let mut inner = state.lock();
    let mut checked = Checked::default();
    let outcome = check(state, &mut inner, &parts, &mut checked);
    let resp = match &outcome {
        Ok(()) => accept(state, &mut inner, &parts, &checked),
        Err((reason, detail)) => refusal(*reason, detail, &inner.nonce),
    };
    inner.seen.push(Seen {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned(),
        headers: parts.headers,
        body,
        status: resp.status(),
        refused: outcome.err(),
        proof_claims: checked.proof_claims,
        token_claims: checked.token_claims,
    });
    drop(inner);
    state.recorded.notify_waiters();
    resp
}

/// The 200: the nonce rotated when it is time, and sent (the new one).
fn accept(
    state: &State,
    inner: &mut Inner,
    parts: &http::request::Parts,
    checked: &Checked,
) -> Response<Full<Bytes>> {
    inner.accepted_since_rotation += 1;
    let every = state.options.rotate_nonce_every;
    if every.is_some_and(|n| inner.accepted_since_rotation >= n) {
        inner.nonce = new_nonce();
        inner.accepted_since_rotation = 0;
    }
    let mut resp = Response::builder().header("content-type", "application/json");
    if state.options.require_nonce {
        resp = resp.header("dpop-nonce", inner.nonce.as_str());
    }
    let body = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "claims": checked.token_claims.clone().unwrap_or_default(),
    });
    resp.body(Full::from(body.to_string())).expect("response")
}

/// The 401: the `WWW-Authenticate: DPoP` challenge (RFC 9449 §7.1, RFC
/// 6750 §3), `DPoP-Nonce` with a nonce refusal, the reason as the body.
fn refusal(reason: Reason, detail: &str, nonce: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header("content-type", "text/plain");
    let mut challenge = String::from("DPoP ");
    if let Some(error) = reason.error() {
        // A quoted-string: no quotes or backslashes inside.
        let description = format!("{reason}: {detail}").replace(['"', '\\'], "'");
        challenge.push_str(&format!(
            "error=\"{error}\", error_description=\"{description}\", "
        ));
        if error == "use_dpop_nonce" {
            resp = resp.header("dpop-nonce", nonce);
        }
    }
    challenge.push_str(&format!("algs=\"{}\"", ALGS.join(" ")));
    let challenge = HeaderValue::from_str(&challenge)
        .unwrap_or_else(|_| HeaderValue::from_static("DPoP error=\"invalid_request\""));
    resp.header("www-authenticate", challenge)
        .body(Full::from(format!("{reason}: {detail}")))
        .expect("response")
}

/// RFC 9449 §4.3 and §7.1, in order: the token's presentation, the proof's
/// form and signature, its claims, the nonce, the token and its key
/// binding, and last the `jti`, recorded only when all else passed (a
/// refused proof sent again is refused for its defect, not as a replay).
fn check(
    state: &State,
    inner: &mut Inner,
    parts: &http::request::Parts,
    checked: &mut Checked,
) -> Result<(), Refusal> {
    let token = presented_token(state, &parts.headers)?;
    let proof = one_proof(&parts.headers)?;
    let (jws, jwk) = verified_proof(proof)?;
    checked.proof_claims = Some(jws.claims.clone());
    let Some(jti) = jws.claims["jti"].as_str().filter(|j| !j.is_empty()) else {
        return refuse(Reason::MissingJti, "the proof has no jti");
    };
    check_request_claims(state, parts, &jws.claims, token)?;
    if state.options.require_nonce {
        match jws.claims["nonce"].as_str() {
            None => return refuse(Reason::NonceMissing, "a DPoP nonce is required"),
            Some(n) if n != inner.nonce => {
                return refuse(Reason::NonceStale, format!("nonce {n:?} is not current"))
            }
            Some(_) => {}
        }
    }
    let token_claims = bound_token(state, token)?;
    checked.token_claims = Some(token_claims.clone());
    check_binding(&token_claims, &jwk)?;
    if !inner.jtis.insert(jti.to_owned()) {
        return refuse(Reason::Replay, format!("jti {jti:?} was seen before"));
    }
    if inner.refuse_next > 0 {
        inner.refuse_next -= 1;
        return refuse(Reason::RefusedOnDemand, "the test asked for a refusal");
    }
    Ok(())
}

/// What ties the proof to this request: `htm`, `htu`, `iat`, `ath`.
fn check_request_claims(
    state: &State,
    parts: &http::request::Parts,
    claims: &Value,
    token: &str,
) -> Result<(), Refusal> {
    let htm = claims["htm"].as_str().unwrap_or("");
    if htm != parts.method.as_str() {
        let detail = format!("htm {htm:?} is not {}", parts.method);
        return refuse(Reason::WrongHtm, detail);
    }
    let expected = format!("{}{}", state.origin, parts.uri.path());
    let htu = claims["htu"].as_str().unwrap_or("");
    if normalize_htu(htu).is_none() || normalize_htu(htu) != normalize_htu(&expected) {
        return refuse(Reason::WrongHtu, format!("htu {htu:?} is not {expected}"));
    }
    let Some(iat) = claims["iat"].as_f64() else {
        return refuse(Reason::MissingIat, "the proof has no numeric iat");
    };
    let skew = (now() - iat).abs();
    if skew > state.options.iat_window.as_secs_f64() {
        let detail = format!("iat is {skew:.0} s from now");
        return refuse(Reason::IatOutOfWindow, detail);
    }
    let ath = B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ));
    match claims["ath"].as_str() {
        Some(a) if a == ath => Ok(()),
        Some(a) => refuse(Reason::WrongAth, format!("ath {a:?} is not {ath}")),
        None => refuse(Reason::WrongAth, "the proof has no ath"),
    }
}

/// The token's `cnf.jkt` is the proof key's thumbprint.
fn check_binding(token_claims: &Value, jwk: &Value) -> Result<(), Refusal> {
    let jkt = thumbprint(jwk).map_err(|e| (Reason::NoJwk, e))?;
    match token_claims["cnf"]["jkt"].as_str() {
        None => refuse(Reason::TokenNotBound, "the token has no cnf.jkt"),
        Some(b) if b != jkt => refuse(
            Reason::KeyMismatch,
            format!("the token is bound to {b}, the proof's key is {jkt}"),
        ),
        Some(_) => Ok(()),
    }
}

/// The token of `Authorization: DPoP <token>`; a Bearer token is refused
/// (as bound when it is, RFC 9449 §7.1).
fn presented_token<'h>(state: &State, headers: &'h HeaderMap) -> Result<&'h str, Refusal> {
    let Some(auth) = headers.get(http::header::AUTHORIZATION) else {
        return refuse(Reason::NoAuthorization, "no Authorization header");
    };
    let auth = auth.to_str().unwrap_or("");
    let (scheme, token) = auth.split_once(' ').unwrap_or((auth, ""));
    let token = token.trim();
    if token.is_empty() {
        return refuse(Reason::WrongScheme, format!("no token after {scheme:?}"));
    }
    if scheme.eq_ignore_ascii_case("dpop") {
        return Ok(token);
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return match state.jwks.verify(token) {
            Ok(c) if c["cnf"]["jkt"].is_string() => refuse(
                Reason::BoundTokenAsBearer,
                "a DPoP-bound token sent as Bearer",
            ),
            _ => refuse(Reason::BearerNotAccepted, "DPoP tokens only"),
        };
    }
    refuse(Reason::WrongScheme, format!("scheme {scheme:?}"))
}

/// The one `DPoP` header's value.
fn one_proof(headers: &HeaderMap) -> Result<&str, Refusal> {
    let mut proofs = headers.get_all("dpop").iter();
    let (Some(proof), None) = (proofs.next(), proofs.next()) else {
        let n = headers.get_all("dpop").iter().count();
        return if n == 0 {
            refuse(Reason::NoProof, "no DPoP header")
        } else {
            refuse(Reason::MultipleProofs, format!("{n} DPoP headers"))
        };
    };
    proof
        .to_str()
        .or_else(|_| refuse(Reason::MalformedProof, "the DPoP header is not ASCII"))
}

/// Private members of JWKs (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];

/// The proof decoded, its form and signature checked; and its key.
fn verified_proof(proof: &str) -> Result<(Jws, Value), Refusal> {
    let jws = Jws::decode(proof).map_err(|e| (Reason::MalformedProof, e))?;
    let typ = jws.header["typ"].as_str().unwrap_or("");
    if typ != "dpop+jwt" {
        return refuse(Reason::WrongTyp, format!("typ {typ:?}"));
    }
    let alg = jws.alg();
    if !ALGS.contains(&alg) {
        return refuse(Reason::UnacceptableAlg, format!("alg {alg:?}"));
    }
    let jwk = jws.header["jwk"].clone();
    if !jwk.is_object() {
        return refuse(Reason::NoJwk, "no jwk in the header");
    }
    if let Some(m) = PRIVATE_MEMBERS.iter().find(|m| jwk.get(**m).is_some()) {
        return refuse(
            Reason::PrivateKeyInJwk,
            format!("the header jwk has private member {m:?}"),
        );
    }
    if !matches!(jwk["kty"].as_str(), Some("EC" | "OKP" | "RSA")) {
        return refuse(Reason::NoJwk, format!("jwk kty {}", jwk["kty"]));
    }
    jws.verify_with(&jwk)
        .map_err(|e| (Reason::BadSignature, e))?;
    Ok((jws, jwk))
}

/// The claims of a DPoP-presented token: a JWT verifying under the
/// authorization server's keys, unexpired.
fn bound_token(state: &State, token: &str) -> Result<Value, Refusal> {
    let claims = state
        .jwks
        .verify(token)
        .map_err(|e| (Reason::InvalidToken, e))?;
    match claims["exp"].as_f64() {
        Some(exp) if exp > now() => Ok(claims),
        Some(exp) => refuse(Reason::TokenExpired, format!("exp {exp} has passed")),
        None => refuse(Reason::InvalidToken, "the token has no exp"),
    }
}

/// `htu` compared as RFC 9449 §4.3 checks 9 and 10 say: without query and
/// fragment, after RFC 3986 §6.2.2 syntax-based normalization (scheme and
/// host lowercased, the default port dropped, an empty path as `/`,
/// percent-encodings uppercased and unreserved ones decoded). `None` for
/// what is not an absolute http(s) URI.
pub fn normalize_htu(uri: &str) -> Option<String> {
    let uri = uri.split('#').next()?.split('?').next()?;
    let (scheme, rest) = uri.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    Some(format!("{scheme}://{authority}{}", normalize_path(path)?))
}

/// Percent-encodings uppercased, unreserved characters decoded.
fn normalize_path(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path.get(i + 1..i + 3)?;
            let byte = u8::from_str_radix(hex, 16).ok()?;
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                out.push(byte as char);
            } else {
                out.push('%');
                out.push_str(&hex.to_ascii_uppercase());
            }
            i += 3;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    Some(out)
}
