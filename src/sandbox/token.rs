//! The token endpoint (`POST /api/v1/token`): reading a grant request
//! (JSON like Flinks, or a form with HTTP Basic like generic OAuth), the
//! failure modes it can be told to answer with, and the single-user
//! grants: `client_credentials`, the one authorization code and the
//! refresh token, which rotates (with an optional reuse grace) or never
//! changes. End users' grants are `users.rs`'s (stateless bench users'
//! `bench.rs`'s), the consent page's codes
//! `authorize.rs`'s; the access tokens minted here are what the API checks
//! (`api.rs`).

use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::MutexGuard;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::server::{credentials, error_json, json_response, no_store, response, with_header};
use super::users::UserFlight;
use super::{bump, get, lock, Body, Counters, FailureMode, Params, Shared, TOKEN_PATH};

/// Real grant requests are a few hundred bytes; anything near 64 KiB is abuse.
const MAX_TOKEN_BODY: usize = 64 << 10;
/// Once the token map holds this many entries, expired ones are pruned on insert.
pub(super) const PRUNE_AT: usize = 10_000;
/// Hard cap for benchmarks issuing millions of long-lived tokens: past it the
/// half closest to expiry is forgotten (those tokens then count as unknown).
pub(super) const MAX_TOKENS: usize = 100_000;
/// Expired tokens stay known this long so the API counts them as expired, not unknown.
const EXPIRED_GRACE: Duration = Duration::from_secs(60);
/// Stand-in when a configured lifetime overflows `Instant`: effectively forever.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// What a misbehaving load balancer answers in [`FailureMode::Garbage`].
const GARBAGE: &str = "<html><body><h1>Service Unavailable</h1></body></html>";

#[derive(Clone, Copy)]
pub(super) enum Grant {
    ClientCredentials = 0,
    AuthorizationCode = 1,
    RefreshToken = 2,
}

impl Grant {
    pub(super) fn parse(s: &str) -> Option<Self> {
        match s {
            "client_credentials" => Some(Self::ClientCredentials),
            "authorization_code" => Some(Self::AuthorizationCode),
            "refresh_token" => Some(Self::RefreshToken),
            _ => None,
        }
    }
}

pub(super) struct GrantState {
    /// Access token -> precise expiry (the `exp` claim only has seconds).
    pub(super) tokens: HashMap<String, Instant>,
    pub(super) prune_at: usize,
    pub(super) code_used: bool,
    pub(super) refresh_token: String,
    pub(super) refresh_revoked: bool,
    /// The refresh token rotated away last, and until when it is still
    /// accepted.
    pub(super) previous_refresh: Option<(String, Instant)>,
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

/// One token request: counted (in flight, per grant, per user) before
/// anything else, then the delay and failure mode, then the grant.
pub(super) async fn handle_token(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    shared.token_requests.send_modify(|n| *n += 1);
    let _in_flight = InFlight::enter(&shared.n);
    if req.uri().path() != TOKEN_PATH {
        return error_json(StatusCode::NOT_FOUND, "not_found");
    }
    if req.method() != Method::POST {
        let resp = error_json(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        return with_header(resp, header::ALLOW, "POST");
    }
    let (parts, params) = read_params(req, MAX_TOKEN_BODY).await;
    if let Ok(params) = &params {
        lock(&shared.users).note_presentation(&shared.n, params);
    }
    let _user_flight = UserFlight::enter(shared, params.as_ref().ok());
    let grant = params.as_ref().ok().and_then(|p| p.get("grant_type"));
    let grant = grant.and_then(|g| Grant::parse(g));
    if let Some(grant) = grant {
        bump(&shared.n.by_grant[grant as usize]);
        let verifier = params.as_ref().ok().and_then(|p| p.get("code_verifier"));
        if let (Grant::AuthorizationCode, Some(v)) = (grant, verifier) {
            bump(&shared.n.with_verifier);
            // A secret of the client's, kept for leak tests like the issued ones.
            shared.note_issued(v);
        }
    }

    let delay = Duration::from_nanos(get(&shared.n.token_delay_nanos));
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.closed() => {}
        }
    }
    if let Some(resp) = simulated_failure(shared).await {
        return resp;
    }
    grant_response(shared, &parts.headers, params, grant)
}

/// The answer of the current [`FailureMode`] (waiting out `Hang`), or
/// `None` in normal operation.
async fn simulated_failure(shared: &Shared) -> Option<Response<Body>> {
    match shared.failure_mode().await {
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
    }
}

/// Whether the request authenticates the sandbox's client (HTTP Basic or
/// body fields).
pub(super) fn client_auth_ok(shared: &Shared, headers: &HeaderMap, params: &Params) -> bool {
    let opts = &shared.opts;
    matches!(client_auth(headers, params), Some((id, secret)) if id == opts.client_id && secret == opts.client_secret)
}

/// Checks the request and the client, then issues the grant: the consent
/// page's if the code is one of its codes, a user's if the code or refresh
/// token is one, else the single-user one.
fn grant_response(
    shared: &Shared,
    headers: &HeaderMap,
    params: Result<Params, &'static str>,
    grant: Option<Grant>,
) -> Response<Body> {
    let params = match params {
        Ok(params) => params,
        Err(description) => return oauth_error("invalid_request", description),
    };
    let Some(grant) = grant else {
        return oauth_error("unsupported_grant_type", "Unknown grant_type");
    };
    let opts = &shared.opts;
    let client_id = match client_auth(headers, &params) {
        Some((id, secret)) if id == opts.client_id && secret == opts.client_secret => id,
        _ => return oauth_error("invalid_client", "Client authentication failed"),
    };
    let issued = shared
        .issue_authorized(grant, &params, &client_id)
        .or_else(|| shared.issue_for_user(grant, &params))
        .or_else(|| shared.issue_for_bench_user(grant, &params).map(Ok))
        .unwrap_or_else(|| shared.issue(grant, &params));
    match issued {
        Ok(body) => {
            bump(&shared.n.successful);
            no_store(json_response(StatusCode::OK, &body))
        }
        Err(description) => oauth_error("invalid_grant", description),
    }
}

impl Shared {
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
    pub(super) fn mint_for(
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
        let access_token = format!(
            "{}.sandbox-signature",
            unsigned_jwt(client_id, sub, exp, iat, &jti)
        );
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
}

/// A sandbox access token's header and claims (`header.claims`, base64url),
/// before its signature: the API's check reads these claims.
pub(super) fn unsigned_jwt(client_id: &str, sub: &str, exp: u64, iat: u64, jti: &str) -> String {
    let claims = json!({"client_id": client_id, "sub": sub, "exp": exp, "iat": iat, "jti": jti});
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()))
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

/// A request's head and its body's parameters (at most `max` bytes, form
/// or JSON as [`parse_params`] reads them).
pub(super) async fn read_params(
    req: Request<Incoming>,
    max: usize,
) -> (http::request::Parts, Result<Params, &'static str>) {
    let (parts, body) = req.into_parts();
    let params = match Limited::new(body, max).collect().await {
        Ok(collected) => parse_params(&parts.headers, &collected.to_bytes()),
        Err(_) => Err("The request body could not be read or is too large"),
    };
    (parts, params)
}

/// Request parameters from a JSON object (Flinks) or a form body (RFC 6749).
pub(super) fn parse_params(headers: &HeaderMap, body: &[u8]) -> Result<Params, &'static str> {
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

pub(super) use crate::ground::form::decode as form_decode;

/// A Flinks-format token endpoint error; the status follows from the code.
pub(super) fn oauth_error(error: &str, description: &str) -> Response<Body> {
    let status = match error {
        "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
        "temporarily_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    let body = json!({"error": error, "error_description": description});
    no_store(json_response(status, &body))
}
