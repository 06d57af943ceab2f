//! The API: it accepts only live tokens this sandbox issued (401 with an
//! RFC 6750 challenge otherwise, expired ones counted apart), records
//! every request, waits as told ([`Sandbox::set_api_delay`],
//! [`DELAY_HEADER`]), answers end users' accounts and, once a user's
//! consent is revoked, Flinks' 401 `code 602`; anything else it echoes.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::server::{credentials, error_json, json_response, response, with_header};
use super::users::user_admin;
#[cfg(doc)]
use super::Sandbox;
use super::{bump, get, lock, Body, RecordedRequest, SandboxOptions, Shared};
use super::{DELAY_HEADER, RECORD_CAPACITY};

/// Larger API bodies get 413; 16 MiB leaves room for the 1 MiB round-trip tests.
const MAX_API_BODY: usize = 16 << 20;
/// RFC 6750 §3 challenge on every 401 from the API.
pub(super) const CHALLENGE: &str = r#"Bearer error="invalid_token""#;

enum TokenCheck {
    Valid,
    Missing,
    Unknown,
    Expired,
}

/// One API request: user admin first (not counted), else counted,
/// checked and recorded, delayed as told, then answered.
pub(super) async fn handle_api(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    if let Some(resp) = user_admin(shared, req.method(), req.uri().path()) {
        return resp;
    }
    bump(&shared.n.api_requests);
    let check = shared.check_token(req.headers());
    let token_valid = matches!(check, TokenCheck::Valid);
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, MAX_API_BODY).collect().await;
    let body = body.map(|collected| collected.to_bytes());
    let headers = shared.record_request(&parts, body.as_ref().ok(), token_valid);
    let revoked_on_arrival = wait_as_told(shared, &parts.headers).await;

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
        return status_page(code);
    }
    echo(&parts, headers, body)
}

/// Waits out [`Sandbox::set_api_delay`], then the request's own
/// [`DELAY_HEADER`]; whether the request asked for its own delay and came
/// with a revoked user's token as it arrived (after the first wait).
async fn wait_as_told(shared: &Shared, headers: &HeaderMap) -> bool {
    let delay = Duration::from_nanos(get(&shared.n.api_delay_nanos));
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.closed() => {}
        }
    }
    let own_delay = headers.get(DELAY_HEADER);
    let own_delay = own_delay.and_then(|v| v.to_str().ok()?.parse().ok());
    let revoked_on_arrival = own_delay.is_some() && shared.consent_revoked(headers);
    if let Some(ms) = own_delay {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => {}
            () = shared.closed() => {}
        }
    }
    revoked_on_arrival
}

/// `/status/{code}`: that status, with a small JSON body where one is
/// allowed.
fn status_page(code: &str) -> Response<Body> {
    let code = code.parse().ok().filter(|c| (200..600).contains(c));
    match code.and_then(|c| StatusCode::from_u16(c).ok()) {
        // These statuses must not carry a body.
        Some(status) if matches!(status.as_u16(), 204 | 304) => {
            let mut resp = Response::new(Body::default());
            *resp.status_mut() = status;
            resp
        }
        Some(status) => json_response(status, &json!({"status": status.as_u16()})),
        None => error_json(StatusCode::BAD_REQUEST, "bad_status_code"),
    }
}

/// Anything else: the request echoed as JSON (or, with `x-echo-body: 1`
/// on a POST or PUT, its body as is), its body length in
/// `x-echo-body-len`.
fn echo(parts: &Parts, headers: Vec<(String, String)>, body: Bytes) -> Response<Body> {
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
        let path = parts.uri.path();
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

impl Shared {
    /// Records a request as it arrived (its body if it could be read);
    /// its headers in arrival order, names lower-case, values lossily
    /// UTF-8.
    fn record_request(
        &self,
        parts: &Parts,
        body: Option<&Bytes>,
        token_valid: bool,
    ) -> Vec<(String, String)> {
        let lossy = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        let pair = |(k, v): (&HeaderName, &HeaderValue)| (k.to_string(), lossy(v));
        let headers: Vec<(String, String)> = parts.headers.iter().map(pair).collect();
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        self.record(RecordedRequest {
            method: parts.method.to_string(),
            path_and_query: path_and_query.to_owned(),
            headers: headers.clone(),
            body: body.cloned().unwrap_or_default(),
            token_valid,
        });
        headers
    }

    /// Whether the bearer token is a user's whose consent is revoked now.
    fn consent_revoked(&self, headers: &HeaderMap) -> bool {
        let users = lock(&self.users);
        let sub = credentials(headers, "bearer").and_then(|t| users.tokens.get(t));
        sub.is_some_and(|sub| users.revoked.contains(sub))
    }

    fn check_token(&self, headers: &HeaderMap) -> TokenCheck {
        let Some(token) = credentials(headers, "bearer") else {
            return TokenCheck::Missing;
        };
        match self.grants().tokens.get(token) {
            None => match super::bench::check(&self.opts, token) {
                Some(true) => TokenCheck::Valid,
                Some(false) => TokenCheck::Expired,
                None => TokenCheck::Unknown,
            },
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
