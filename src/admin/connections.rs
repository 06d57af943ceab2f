//! The connections API on the admin listener (CONNECTIONS.md, "Admin
//! API"): `POST /connections/{pool}`, `GET /connections/{pool}[/{id}]`,
//! `DELETE /connections/{pool}/{id}`. JSON in and out, bodies of at most
//! 16 KiB, bearer `api_token` compared in constant time. Answers never
//! carry a token.
//!
//! This module speaks HTTP only: grants and storage are `connections`'.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::connections::{valid_id, AuthorizeError, Deleted, Exchange, Pool};
use crate::proxy::body::ProxyBody;
use crate::proxy::generation::{AppState, Generation};
use crate::store::{ConnectionInfo, ConnectionState, StoreError};

/// Largest request body: a code or refresh token and an id fit many times.
const MAX_BODY: usize = 16 * 1024;
/// Page size when `limit` is not given.
const DEFAULT_LIMIT: u32 = 100;
/// Largest page.
const MAX_LIMIT: u32 = 1000;
/// A store outage is retried after this long.
const STORE_RETRY_AFTER: u64 = 5;

/// An answer: status, JSON body, optional extra header.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) body: serde_json::Value,
}

pub(super) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Answer {
    Answer {
        status,
        body: serde_json::json!({"error": code, "message": message.into()}),
    }
}

pub(super) fn bad_request(message: impl Into<String>) -> Answer {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

pub(super) fn store_error(e: &StoreError) -> Answer {
    if e.is_unavailable() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the connection store is unavailable",
        )
    } else {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        )
    }
}

fn connection_not_found(pool: &str, id: &str) -> Answer {
    error(
        StatusCode::NOT_FOUND,
        "connection_not_found",
        format!("pool {pool} has no connection {id}"),
    )
}

pub(super) fn respond(a: Answer) -> Response<ProxyBody> {
    if a.status == StatusCode::NO_CONTENT {
        let mut r = Response::new(ProxyBody::full(Bytes::new()));
        *r.status_mut() = a.status;
        return r;
    }
    let mut r = Response::new(ProxyBody::full(Bytes::from(a.body.to_string())));
    *r.status_mut() = a.status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match a.status {
        StatusCode::UNAUTHORIZED => {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"flinks-proxy admin\""),
            );
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            h.insert(header::RETRY_AFTER, HeaderValue::from(STORE_RETRY_AFTER));
        }
        _ => {}
    }
    r
}

/// Serves one `/connections...` request.
pub async fn handle(state: &AppState, req: Request<Incoming>) -> Response<ProxyBody> {
    respond(answer(state, req).await)
}

/// An admin API request on `/{api}/{pool}[/{id}]`, its bearer checked and
/// its pool found.
pub(super) struct PoolRequest {
    /// The generation the request is served with.
    pub(super) generation: Arc<Generation>,
    /// The pool the path names.
    pub(super) pool: Arc<Pool>,
    /// The path's last segment, if any (not empty).
    pub(super) id: Option<String>,
}

/// Checks `api_token` (for `what`, named in the 401), splits the path as
/// `/{api}/{pool}[/{id}]` (`usage` in the 404) and finds the pool.
pub(super) fn pool_request(
    state: &AppState,
    req: &Request<Incoming>,
    (api, what, usage): (&str, &str, &str),
) -> Result<PoolRequest, Answer> {
    let generation = state.generation.load_full();
    check_bearer(&generation, req, what)?;
    let mut segments = req.uri().path().trim_start_matches('/').split('/');
    let (Some(first), Some(pool_name), id, None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(error(StatusCode::NOT_FOUND, "not_found", usage));
    };
    if first != api {
        return Err(error(StatusCode::NOT_FOUND, "not_found", usage));
    }
    let Some(pool) = generation.pools.get(pool_name).cloned() else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "pool_not_found",
            format!("no [connections.{pool_name}] pool is configured"),
        ));
    };
    let id = id.filter(|s| !s.is_empty()).map(str::to_owned);
    Ok(PoolRequest {
        generation,
        pool,
        id,
    })
}

/// Checks `api_token`, when configured (for `what`, named in the 401).
pub(super) fn check_bearer(
    generation: &Generation,
    req: &Request<Incoming>,
    what: &str,
) -> Result<(), Answer> {
    match &generation.config.admin_api_token {
        Some(token) if !authorized(req.headers(), token.expose()) => Err(error(
            StatusCode::UNAUTHORIZED,
            "admin_unauthorized",
            format!("the {what} needs Authorization: Bearer <admin.api_token>"),
        )),
        _ => Ok(()),
    }
}

/// A request body of at most [`MAX_BODY`] bytes.
pub(super) async fn read_body(req: Request<Incoming>) -> Result<Bytes, Answer> {
    Ok(Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_request",
                "the body must be JSON of at most 16 KiB",
            )
        })?
        .to_bytes())
}

/// `bytes` as the JSON the endpoint expects; serde's message names the
/// field or position, never a value.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Answer> {
    serde_json::from_slice(bytes)
        .map_err(|e| bad_request(format!("the body is not the expected JSON: {e}")))
}

async fn answer(state: &AppState, req: Request<Incoming>) -> Answer {
    let r = match pool_request(
        state,
        &req,
        (
            "connections",
            "connections API",
            "use /connections/{pool} or /connections/{pool}/{id}",
        ),
    ) {
        Ok(r) => r,
        Err(a) => return a,
    };
    let (pool, id) = (r.pool, r.id.as_deref());
    if let Some(id) = id {
        if !valid_id(id) {
            return bad_request("a connection id is 1-128 of A-Z a-z 0-9 . _ : @ -");
        }
    }
    match (req.method().clone(), id) {
        (Method::POST, None) => post(&pool, req).await,
        (Method::GET, None) => list(&pool, req.uri().query().unwrap_or("")).await,
        (Method::GET, Some(id)) => get(&pool, id).await,
        (Method::DELETE, Some(id)) => delete(&pool, id).await,
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "POST and GET /connections/{pool}; GET and DELETE /connections/{pool}/{id}",
        ),
    }
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn authorized(headers: &http::HeaderMap, token: &str) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .and_then(|v| {
            let (scheme, rest) = v.split_at(v.iter().position(|&b| b == b' ')?);
            scheme
                .eq_ignore_ascii_case(b"bearer")
                .then(|| rest.trim_ascii())
        });
    presented.is_some_and(|p| bool::from(p.ct_eq(token.as_bytes())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostBody {
    code: Option<String>,
    refresh_token: Option<String>,
    id: Option<String>,
    redirect_uri: Option<String>,
    /// The PKCE verifier, when the app ran the authorize request itself.
    code_verifier: Option<String>,
}

/// `POST /connections/{pool}`: read the body, choose the exchange, and
/// answer with what the pool's `authorize` made of it.
async fn post(pool: &Arc<Pool>, req: Request<Incoming>) -> Answer {
    let body = match post_body(req).await {
        Ok(b) => b,
        Err(a) => return a,
    };
    let exchange = match exchange(&body) {
        Ok(x) => x,
        Err(a) => return a,
    };
    authorized_answer(pool.authorize(exchange, body.id.as_deref()).await)
}

/// The POST body: at most [`MAX_BODY`] bytes of [`PostBody`] JSON, with a
/// valid `id` if one is given.
async fn post_body(req: Request<Incoming>) -> Result<PostBody, Answer> {
    let body: PostBody = parse_json(&read_body(req).await?)?;
    if let Some(id) = &body.id {
        if !valid_id(id) {
            return Err(bad_request("id: 1-128 of A-Z a-z 0-9 . _ : @ -"));
        }
    }
    Ok(body)
}

/// The exchange the body asks for: a non-empty `code` (with an optional
/// `redirect_uri`) or a non-empty `refresh_token` (without one), not both.
fn exchange(body: &PostBody) -> Result<Exchange<'_>, Answer> {
    if body.code_verifier.is_some() && body.code.is_none() {
        return Err(bad_request("code_verifier goes with a code"));
    }
    match (&body.code, &body.refresh_token) {
        (Some(code), None) if !code.is_empty() => Ok(Exchange::Code {
            code,
            redirect_uri: body.redirect_uri.as_deref(),
            code_verifier: body.code_verifier.as_deref(),
        }),
        (None, Some(rt)) if !rt.is_empty() && body.redirect_uri.is_none() => {
            Ok(Exchange::RefreshToken(rt))
        }
        (None, Some(_)) if body.redirect_uri.is_some() => Err(bad_request(
            "redirect_uri goes with a code, not a refresh_token",
        )),
        _ => Err(bad_request(
            "give exactly one of code and refresh_token, not empty",
        )),
    }
}

/// The answer to an `authorize`: 201 for a new connection, 200 when it
/// replaced one with the same id (re-authorization), 422 with the OAuth
/// error when the endpoint refused the grant, 502 when it could not be
/// reached, the store's error otherwise.
fn authorized_answer(result: Result<(ConnectionInfo, bool), AuthorizeError>) -> Answer {
    match result {
        Ok((info, created)) => Answer {
            status: if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            body: info.to_json(),
        },
        Err(AuthorizeError::Rejected {
            error: e,
            description,
        }) => Answer {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: serde_json::json!({
                "error": "grant_rejected",
                "message": "the token endpoint refused the grant",
                "token_error": e,
                "token_error_description": description,
            }),
        },
        Err(AuthorizeError::EndpointUnavailable(e)) => error(
            StatusCode::BAD_GATEWAY,
            "token_endpoint_unavailable",
            e.to_string(),
        ),
        Err(AuthorizeError::Store(e)) => store_error(&e),
    }
}

async fn get(pool: &Pool, id: &str) -> Answer {
    let name = &pool.config().name;
    match pool.store().get(name, id).await {
        Ok(Some(record)) => Answer {
            status: StatusCode::OK,
            body: record.info.to_json(),
        },
        Ok(None) => connection_not_found(name, id),
        Err(e) => store_error(&e),
    }
}

async fn delete(pool: &Arc<Pool>, id: &str) -> Answer {
    let name = &pool.config().name;
    match pool.delete_revoking(id).await {
        Ok(d) if !d.existed => connection_not_found(name, id),
        Ok(Deleted { revoked: None, .. }) => Answer {
            status: StatusCode::NO_CONTENT,
            body: serde_json::Value::Null,
        },
        Ok(Deleted {
            revoked: Some(r), ..
        }) => Answer {
            status: StatusCode::OK,
            body: match r {
                Ok(()) => serde_json::json!({"revoked": true}),
                Err(e) => serde_json::json!({"revoked": false, "revoke_error": e}),
            },
        },
        Err(e) => store_error(&e),
    }
}

/// `state`, `after` and `limit` from a query string.
/// A list's query: `state=` (parsed by `state`, else `state_help`),
/// `after=` (checked by `after`, else `after_help`), `limit=` (1 to
/// [`MAX_LIMIT`], default [`DEFAULT_LIMIT`]); anything else is refused.
pub(super) fn page_query<S>(
    query: &str,
    (state, state_help): (impl Fn(&str) -> Option<S>, &str),
    (after, after_help): (impl Fn(&str) -> bool, &str),
) -> Result<(Option<S>, Option<String>, u32), Answer> {
    let (mut st, mut aft, mut limit) = (None, None, DEFAULT_LIMIT);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "state" => st = Some(state(v).ok_or_else(|| bad_request(state_help))?),
            "after" if after(v) => aft = Some(v.to_owned()),
            "after" => return Err(bad_request(after_help)),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| bad_request("limit: 1 to 1000"))?
            }
            _ => return Err(bad_request(format!("unknown parameter {k:?}"))),
        }
    }
    Ok((st, aft, limit))
}

/// One page of a list read with one more than `limit`: the items as JSON
/// under `key`, and `next` (the last item's cursor) when there are more.
pub(super) fn page_answer<T>(
    key: &str,
    mut items: Vec<T>,
    limit: u32,
    cursor: impl Fn(&T) -> String,
    json: impl Fn(&T) -> serde_json::Value,
) -> Answer {
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next = more.then(|| items.last().map(&cursor)).flatten();
    let mut body = serde_json::Map::new();
    body.insert(key.to_owned(), items.iter().map(json).collect());
    body.insert("next".to_owned(), serde_json::json!(next));
    Answer {
        status: StatusCode::OK,
        body: body.into(),
    }
}

fn list_query(query: &str) -> Result<(Option<ConnectionState>, Option<String>, u32), Answer> {
    page_query(
        query,
        (
            ConnectionState::parse,
            "state: active or needs_reauthorization",
        ),
        (valid_id, "after: a connection id"),
    )
}

async fn list(pool: &Pool, query: &str) -> Answer {
    let (state, after, limit) = match list_query(query) {
        Ok(q) => q,
        Err(a) => return a,
    };
    let name = &pool.config().name;
    match pool
        .store()
        .list(name, state, after.as_deref(), limit + 1)
        .await
    {
        Ok(page) => page_answer(
            "connections",
            page,
            limit,
            |c| c.id.clone(),
            |c| c.to_json(),
        ),
        Err(e) => store_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_compared_whole() {
        let mut h = http::HeaderMap::new();
        assert!(!authorized(&h, "secret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        assert!(authorized(&h, "secret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer secret"),
        );
        assert!(authorized(&h, "secret"));
        for bad in [
            "Bearer secre",
            "Bearer secrets",
            "Basic secret",
            "secret",
            "Bearer",
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(bad));
            assert!(!authorized(&h, "secret"), "{bad}");
        }
    }

    #[test]
    fn list_queries_are_checked() {
        assert_eq!(list_query("").ok().unwrap().2, DEFAULT_LIMIT);
        let (s, a, l) = list_query("state=active&after=bob&limit=5").ok().unwrap();
        assert_eq!(
            (s, a.as_deref(), l),
            (Some(ConnectionState::Active), Some("bob"), 5)
        );
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "state=gone",
            "after=a%20b",
            "x=1",
        ] {
            assert!(list_query(bad).is_err(), "{bad}");
        }
    }
}
