//! The authorize endpoint ([`AUTHORIZE_PATH`], on the token listener),
//! Flinks-like. `GET` checks the request (RFC 6749 §4.1.1; PKCE with S256
//! only, RFC 7636) and shows a consent page: pick a user, Approve or Deny.
//! Its form `POST`s back here, and the answer is a 302 to the client's
//! `redirect_uri` with a single-use code bound to the client, the
//! `redirect_uri`, the user and the code challenge, or with
//! `error=access_denied`. A bad `client_id` or `redirect_uri` gets a page
//! instead: nothing is sent to an unchecked place (RFC 6749 §4.1.2.1).
//!
//! The token endpoint exchanges these codes ([`Shared::issue_authorized`]):
//! the same client and `redirect_uri`, the `code_verifier` against the
//! challenge (none without one: a PKCE downgrade, RFC 9700 §2.1.1), the
//! code spent whatever the outcome, and a spent code presented again
//! revokes the tokens it gave (RFC 6749 §4.1.2). Tokens are the chosen
//! user's, made by `users.rs`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use ring::digest;
use serde_json::Value;

use super::server::{response, with_header};
use super::token::{form_decode, read_params, Grant};
use super::{bump, get, lock, Body, Params, Sandbox, SandboxOptions, Shared};
use super::{AUTHORIZE_PATH, RECORD_CAPACITY};
use crate::connect::pages::escape;
pub(super) use crate::ground::form::{encode as form_encode, with_query};

/// A consent form is three short fields; anything near 16 KiB is abuse.
const MAX_FORM_BODY: usize = 16 << 10;
/// Pending requests, codes and spent codes kept at most (each): past it the
/// expired ones go, then the one closest to expiry.
const MAX_KEPT: usize = 100_000;
/// The policy of every page here. No `form-action`: Chromium applies it to
/// every redirect after the form is sent (w3c/webappsec-csp#8), so the
/// proxy's callback could not send the browser on to the app.
const PAGE_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'";
const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:34rem;\
    margin:3rem auto;padding:0 1rem}label{display:block;margin:.4rem 0}\
    button{margin:1rem .6rem 0 0;padding:.4rem 1.4rem}";
const INVALID_CODE: &str = "The authorization code is invalid, expired or has already been used";
const UNKNOWN_REQUEST: &str = "This authorization request is unknown, already answered or \
    expired. Start again from the application.";

/// What the authorize endpoint keeps between its steps; every entry with
/// its expiry.
#[derive(Default)]
pub(super) struct Authorizations {
    /// Consent pages shown and not answered yet: request id -> request.
    requests: HashMap<String, (AuthRequest, Instant)>,
    /// Codes not exchanged yet -> what they are bound to.
    codes: HashMap<String, (BoundCode, Instant)>,
    /// Exchanged codes -> the tokens they gave (revoked on a replay).
    spent: HashMap<String, (Vec<String>, Instant)>,
    /// Query parameters of the last page views, for [`Sandbox::authorize_params`].
    recorded: VecDeque<Params>,
}

/// An authorize request that passed the checks, waiting for the user.
struct AuthRequest {
    client_id: String,
    redirect_uri: String,
    state: String,
    challenge: Option<String>,
}

/// What a code from the consent page is bound to.
struct BoundCode {
    client_id: String,
    redirect_uri: String,
    sub: String,
    challenge: Option<String>,
}

impl Sandbox {
    /// `http://127.0.0.1:PORT/api/v1/authorize` (on the token listener).
    pub fn authorize_url(&self) -> String {
        format!("http://{}{AUTHORIZE_PATH}", self.token_addr)
    }

    /// `GET` requests of the authorize endpoint (page views), whatever
    /// their outcome.
    pub fn authorize_requests(&self) -> u64 {
        get(&self.shared.n.authorize_requests)
    }

    /// The query parameters of the last 1000 authorize page views that
    /// could be decoded, oldest first (empty values left out).
    pub fn authorize_params(&self) -> Vec<HashMap<String, String>> {
        lock(&self.shared.authorize)
            .recorded
            .iter()
            .cloned()
            .collect()
    }

    /// `authorization_code` token requests that carried a `code_verifier`
    /// (any code, any outcome, whatever the failure mode).
    pub fn code_exchanges_with_verifier(&self) -> u64 {
        get(&self.shared.n.with_verifier)
    }

    /// Code exchanges whose `code_verifier` matched the code's challenge.
    pub fn verified_code_exchanges(&self) -> u64 {
        get(&self.shared.n.verified)
    }

    /// Consent-page codes presented again after their exchange (each
    /// revoked the tokens that exchange gave).
    pub fn code_replays(&self) -> u64 {
        get(&self.shared.n.code_replays)
    }
}

/// `GET` (the consent page) or `POST` (its answer) on [`AUTHORIZE_PATH`].
pub(super) async fn handle_authorize(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    match *req.method() {
        Method::GET => {
            bump(&shared.n.authorize_requests);
            consent(shared, req.uri().query().unwrap_or(""))
        }
        Method::POST => decide(shared, req).await,
        _ => {
            let resp = error_page(StatusCode::METHOD_NOT_ALLOWED, "Only GET and POST here.");
            with_header(resp, header::ALLOW, "GET, POST")
        }
    }
}

/// The request checked: the client and `redirect_uri` first (a page if
/// bad), the rest redirected as errors; then the consent page.
fn consent(shared: &Shared, query: &str) -> Response<Body> {
    let Some((params, repeated)) = parse_query(query) else {
        return error_page(StatusCode::BAD_REQUEST, "The request could not be decoded.");
    };
    record(&mut lock(&shared.authorize).recorded, &params);
    let (redirect_uri, origin) = match checked_client(&shared.opts, &params, &repeated) {
        Ok(checked) => checked,
        Err(why) => return error_page(StatusCode::BAD_REQUEST, why),
    };
    let state = params.get("state");
    let challenge = match checked_request(&params, &repeated) {
        Ok(challenge) => challenge,
        Err((error, description)) => {
            let mut fields = vec![("error", error), ("error_description", description)];
            fields.extend(state.map(|s| ("state", s.as_str())));
            return redirect(shared, &redirect_uri, fields);
        }
    };
    let request = AuthRequest {
        client_id: shared.opts.client_id.clone(),
        redirect_uri,
        state: state.cloned().unwrap_or_default(),
        challenge,
    };
    let id = shared.keep_request(request);
    let html = consent_html(&shared.opts, &id, &params, &origin);
    page(StatusCode::OK, html, PAGE_CSP)
}

/// The `redirect_uri` and its origin, if the client is ours and the
/// `redirect_uri` an absolute http(s) URL; else what the page says.
fn checked_client(
    opts: &SandboxOptions,
    params: &Params,
    repeated: &HashSet<String>,
) -> Result<(String, String), &'static str> {
    if repeated.contains("client_id") || params.get("client_id") != Some(&opts.client_id) {
        return Err("Unknown client_id: no such application is registered with this bank.");
    }
    if repeated.contains("redirect_uri") {
        return Err("The redirect_uri is repeated.");
    }
    let uri = params
        .get("redirect_uri")
        .ok_or("The redirect_uri is missing.")?;
    let origin = origin(uri).ok_or("The redirect_uri is not an absolute http(s) URL.")?;
    Ok((uri.clone(), origin))
}

/// `scheme://host[:port]` of an absolute http(s) URL without a fragment,
/// whose host is a plain name or address (it goes into a CSP header).
pub(super) fn origin(uri: &str) -> Option<String> {
    if uri.contains('#') {
        return None;
    }
    let parsed: Uri = uri.parse().ok()?;
    let scheme = parsed.scheme_str()?.to_ascii_lowercase();
    let authority = parsed.authority()?;
    let host = authority.host().to_ascii_lowercase();
    let name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.');
    let ipv6 = |h: &str| {
        let inner = h.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        inner.is_some_and(|a| a.chars().all(|c| c.is_ascii_hexdigit() || ":.".contains(c)))
    };
    let plain = !host.is_empty() && (host.chars().all(name) || ipv6(&host));
    if !matches!(scheme.as_str(), "http" | "https") || !plain {
        return None;
    }
    Some(match authority.port_u16() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

/// The code challenge, if any; or the error and description to redirect with.
fn checked_request(
    params: &Params,
    repeated: &HashSet<String>,
) -> Result<Option<String>, (&'static str, &'static str)> {
    let invalid = |description| Err(("invalid_request", description));
    if !repeated.is_empty() {
        return invalid("A parameter is repeated");
    }
    match params.get("response_type").map(String::as_str) {
        Some("code") => {}
        None => return invalid("The response_type is missing"),
        Some(_) => return Err(("unsupported_response_type", "Only response_type=code")),
    }
    if !params.contains_key("state") {
        return invalid("The state parameter is required");
    }
    let challenge = params.get("code_challenge");
    match (
        challenge,
        params.get("code_challenge_method").map(String::as_str),
    ) {
        (None, None) => Ok(None),
        (Some(c), Some("S256")) if is_s256(c) => Ok(Some(c.clone())),
        (Some(_), Some("S256")) => invalid("The code_challenge is no BASE64URL SHA-256 hash"),
        (None, Some(_)) => invalid("A code_challenge_method without a code_challenge"),
        // Without a method the challenge would be `plain` (RFC 7636 §4.3).
        (Some(_), None) => invalid("The code_challenge_method is missing: only S256"),
        (Some(_), Some(_)) => invalid("Only code_challenge_method=S256 is supported"),
    }
}

/// The answer to the consent form: a redirect with a code or
/// `access_denied`, or a page when the form is bad. The request is spent
/// whatever the answer.
async fn decide(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let (_, form) = read_params(req, MAX_FORM_BODY).await;
    let form = form.ok();
    let Some(form) = form else {
        return error_page(StatusCode::BAD_REQUEST, "The form could not be read.");
    };
    let taken = form.get("request").and_then(|id| {
        let kept = lock(&shared.authorize).requests.remove(id);
        kept.filter(|(_, expiry)| Instant::now() < *expiry)
    });
    let Some((request, _)) = taken else {
        return error_page(StatusCode::BAD_REQUEST, UNKNOWN_REQUEST);
    };
    let user = form.get("user").map(String::as_str);
    let (uri, state) = (&request.redirect_uri, request.state.as_str());
    match form.get("decision").map(String::as_str) {
        Some("deny") => {
            let description = "The user denied access";
            let fields = vec![
                ("error", "access_denied"),
                ("error_description", description),
                ("state", state),
            ];
            redirect(shared, uri, fields)
        }
        Some("approve") => match user.filter(|u| subjects(&shared.opts).contains(u)) {
            Some(sub) => {
                let code = shared.new_bound_code(&request, sub);
                redirect(shared, uri, vec![("code", &code), ("state", state)])
            }
            None => error_page(StatusCode::BAD_REQUEST, "Unknown user."),
        },
        _ => error_page(StatusCode::BAD_REQUEST, "Choose Approve or Deny."),
    }
}

/// Who may sign in on the consent page: the users, else the one subject.
fn subjects(opts: &SandboxOptions) -> Vec<&str> {
    if opts.users.is_empty() {
        return vec![opts.subject.as_str()];
    }
    opts.users.iter().map(|u| u.sub.as_str()).collect()
}

/// The consent page: the client and scope, one radio per user (the one
/// `login_hint` names checked, else the first), Approve and Deny.
fn consent_html(opts: &SandboxOptions, id: &str, params: &Params, origin: &str) -> String {
    let subs = subjects(opts);
    let hint = params.get("login_hint").map(String::as_str);
    let checked = subs.iter().position(|s| Some(*s) == hint).unwrap_or(0);
    let radios = subs.iter().enumerate().map(|(i, sub)| {
        let (sub, on) = (escape(sub), if i == checked { " checked" } else { "" });
        format!(
            "<label for=\"user-{sub}\"><input type=\"radio\" name=\"user\" value=\"{sub}\" \
             id=\"user-{sub}\"{on}> {sub}</label>\n"
        )
    });
    let radios: String = radios.collect();
    let scope = params.get("scope").unwrap_or(&opts.scope);
    let provider = params.get("provider_id").map_or(String::new(), |p| {
        format!("<p>Institution: {}</p>\n", escape(p))
    });
    let (client, scope, origin) = (escape(&opts.client_id), escape(scope), escape(origin));
    let main = format!(
        "<h1>Sandbox bank — {client} asks for {scope}</h1>\n{provider}\
         <p>Either answer sends you back to {origin}.</p>\n\
         <form method=\"post\" action=\"{AUTHORIZE_PATH}\">\n\
         <input type=\"hidden\" name=\"request\" value=\"{id}\">\n\
         <fieldset><legend>Sign in as</legend>\n{radios}</fieldset>\n\
         <button type=\"submit\" name=\"decision\" value=\"approve\" id=\"approve\">Approve</button>\n\
         <button type=\"submit\" name=\"decision\" value=\"deny\" id=\"deny\">Deny</button>\n\
         </form>"
    );
    layout("Sandbox bank — authorize", &main)
}

fn layout(title: &str, main: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title}</title><style>{STYLE}</style></head>\n\
         <body><main>\n{main}\n</main></body></html>\n"
    )
}

fn error_page(status: StatusCode, message: &str) -> Response<Body> {
    let main = format!("<h1>Sandbox bank</h1>\n<p>{}</p>", escape(message));
    page(status, layout("Sandbox bank — error", &main), PAGE_CSP)
}

fn page(status: StatusCode, html: String, csp: &str) -> Response<Body> {
    secured(response(status, "text/html; charset=utf-8", html), csp)
}

/// A 302 to `uri` with `fields` (and `iss`, when configured: RFC 9207)
/// added to the query it may already have.
fn redirect<'a>(shared: &'a Shared, uri: &str, mut fields: Vec<(&str, &'a str)>) -> Response<Body> {
    fields.extend(shared.opts.issuer.as_deref().map(|iss| ("iss", iss)));
    let added: Vec<String> = fields
        .iter()
        .map(|(name, value)| format!("{name}={}", form_encode(value)))
        .collect();
    let location = with_query(uri, &added.join("&"));
    // The redirect_uri parsed as a URI and the fields are encoded: valid.
    let Ok(location) = HeaderValue::from_str(&location) else {
        return error_page(StatusCode::BAD_REQUEST, "The redirect_uri is unusable.");
    };
    let mut resp = secured(Response::new(Body::default()), PAGE_CSP);
    *resp.status_mut() = StatusCode::FOUND;
    resp.headers_mut().insert(header::LOCATION, location);
    resp
}

/// The headers of every answer here: not cached, not framed, no referrer.
fn secured(mut resp: Response<Body>, csp: &str) -> Response<Body> {
    let csp = HeaderValue::from_str(csp).unwrap_or(HeaderValue::from_static(PAGE_CSP));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    let fixed: [(HeaderName, &'static str); 4] = [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    resp
}

/// The query's parameters (empty values left out, RFC 6749 §3.1) and the
/// names given more than once; `None` if it does not decode.
fn parse_query(query: &str) -> Option<(Params, HashSet<String>)> {
    let (mut params, mut repeated) = (Params::new(), HashSet::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (form_decode(name)?, form_decode(value)?);
        if !value.is_empty() && params.insert(name.clone(), value).is_some() {
            repeated.insert(name);
        }
    }
    Some((params, repeated))
}

fn record(recorded: &mut VecDeque<Params>, params: &Params) {
    if recorded.len() >= RECORD_CAPACITY {
        recorded.pop_front();
    }
    recorded.push_back(params.clone());
}

/// A challenge S256 can have made: BASE64URL (no padding) of 32 bytes.
fn is_s256(challenge: &str) -> bool {
    challenge.len() == 43
        && URL_SAFE_NO_PAD
            .decode(challenge)
            .is_ok_and(|h| h.len() == 32)
}

/// BASE64URL-NOPAD(SHA-256(verifier)) of a well-formed verifier (43 to 128
/// unreserved characters, RFC 7636 §4.1).
fn s256(verifier: &str) -> Option<String> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    let well_formed = (43..=128).contains(&verifier.len()) && verifier.bytes().all(unreserved);
    let hash = digest::digest(&digest::SHA256, verifier.as_bytes());
    well_formed.then(|| URL_SAFE_NO_PAD.encode(hash))
}

/// A random secret: `prefix-` and 192 bits in BASE64URL.
fn secret(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>())
    )
}

/// Inserts, first making room if `map` is full: the expired entries go,
/// then (if still full) the one closest to expiry.
fn keep<T>(map: &mut HashMap<String, (T, Instant)>, key: String, value: T, expiry: Instant) {
    if map.len() >= MAX_KEPT {
        let now = Instant::now();
        map.retain(|_, (_, e)| *e > now);
        let soonest = map.iter().min_by_key(|(_, (_, e))| *e);
        if let Some(k) = soonest
            .map(|(k, _)| k.clone())
            .filter(|_| map.len() >= MAX_KEPT)
        {
            map.remove(&k);
        }
    }
    map.insert(key, (value, expiry));
}

impl BoundCode {
    /// Whether the exchange matches what the code is bound to; `Ok(true)`
    /// when a verifier matched the challenge.
    fn check(&self, params: &Params, client_id: &str) -> Result<bool, &'static str> {
        if self.client_id != client_id {
            return Err("The authorization code was issued to another client");
        }
        if params.get("redirect_uri") != Some(&self.redirect_uri) {
            return Err("The redirect_uri does not match the authorization request");
        }
        match (&self.challenge, params.get("code_verifier")) {
            (None, None) => Ok(false),
            (None, Some(_)) => Err("A code_verifier for a code requested without code_challenge"),
            (Some(_), None) => Err("The code_verifier is missing"),
            (Some(c), Some(v)) if s256(v).as_ref() == Some(c) => Ok(true),
            (Some(_), Some(_)) => Err("The code_verifier does not match the code_challenge"),
        }
    }
}

impl Shared {
    /// When what is made now expires.
    fn authorize_expiry(&self) -> Instant {
        let now = Instant::now();
        let lifetime = self.opts.authorize_lifetime;
        now.checked_add(lifetime)
            .unwrap_or(now + Duration::from_secs(365 * 24 * 3600))
    }

    /// Keeps a checked request for its consent form; its id.
    fn keep_request(&self, request: AuthRequest) -> String {
        let id = secret("req");
        self.note_issued(&id);
        let expiry = self.authorize_expiry();
        keep(
            &mut lock(&self.authorize).requests,
            id.clone(),
            request,
            expiry,
        );
        id
    }

    /// A single-use code for `sub`, bound to what the request named.
    fn new_bound_code(&self, request: &AuthRequest, sub: &str) -> String {
        let code = secret("authz");
        self.note_issued(&code);
        let bound = BoundCode {
            client_id: request.client_id.clone(),
            redirect_uri: request.redirect_uri.clone(),
            sub: sub.to_owned(),
            challenge: request.challenge.clone(),
        };
        let expiry = self.authorize_expiry();
        keep(
            &mut lock(&self.authorize).codes,
            code.clone(),
            bound,
            expiry,
        );
        code
    }

    /// A grant for a code of the consent page: `None` when the code is no
    /// such code (the other grants apply). The code is spent whatever the
    /// outcome; presented again, it revokes the tokens it gave.
    pub(super) fn issue_authorized(
        &self,
        grant: Grant,
        params: &Params,
        client_id: &str,
    ) -> Option<Result<Value, &'static str>> {
        if !matches!(grant, Grant::AuthorizationCode) {
            return None;
        }
        let presented = params.get("code")?;
        let mut store = lock(&self.authorize);
        let Some((code, expiry)) = store.codes.remove(presented) else {
            let (tokens, _) = store.spent.get(presented)?.clone();
            drop(store);
            bump(&self.n.code_replays);
            self.revoke_tokens(&tokens);
            return Some(Err(INVALID_CODE));
        };
        drop(store);
        if Instant::now() >= expiry {
            return Some(Err(INVALID_CODE));
        }
        match code.check(params, client_id) {
            Ok(verified) => {
                if verified {
                    bump(&self.n.verified);
                }
            }
            Err(description) => return Some(Err(description)),
        }
        let body = self.issue_consented(&code.sub);
        let tokens = ["access_token", "refresh_token"].iter();
        let tokens = tokens.filter_map(|f| body[f].as_str().map(str::to_owned));
        let (tokens, expiry) = (tokens.collect(), self.authorize_expiry());
        keep(
            &mut lock(&self.authorize).spent,
            presented.clone(),
            tokens,
            expiry,
        );
        Some(Ok(body))
    }

    /// Makes these access and refresh tokens unknown to the API and the
    /// token endpoint.
    fn revoke_tokens(&self, tokens: &[String]) {
        let mut users = lock(&self.users);
        let mut grants = self.grants();
        for token in tokens {
            users.refresh.remove(token);
            users.tokens.remove(token);
            grants.tokens.remove(token);
        }
    }
}
