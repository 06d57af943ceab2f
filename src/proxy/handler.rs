//! The request handler: access → route → token → rewrite → forward →
//! respond. [`handle`] is infallible; `handle_inner` returns a
//! [`ProxyError`] that becomes the JSON error of SPEC §6 in one place.
//!
//! Bodies stream both ways; a request body of at most 64 KiB is buffered
//! when the route replays on `reauth_on` and the global replay budget
//! allows, and the response body carries the `idle_timeout` timer (see
//! `body`). Header policy is `headers`'; the checks of a request's target
//! before routing are `target`'s. This module does not own connections
//! (see `server`) or tokens (see `token`).

mod target;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;

use crate::connections::{Conn, Pool, Rejected};
use crate::net::body::{Activity, Idle, RequestBody, REPLAY_LIMIT};
use crate::net::headers::{self, Forwarding, X_REQUEST_ID};
use crate::net::upstream::{ErrorKind, Head, Rewrite, SendError, Sent, UpstreamBody};
use crate::proxy::access_log::{self, AccessLog, ResponseFacts, RouteLabels};
use crate::proxy::body::ProxyBody;
use crate::proxy::error::ProxyError;
use crate::proxy::generation::{AppState, Generation, Route, RouteTokens};
use crate::tokens::{dpop, Rejection, Token};
use target::check_target;

/// What the handler knows about the connection a request came on; made
/// once per connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the listener speaks TLS.
    pub tls: bool,
    /// The client's address as an `X-Forwarded-For` value.
    forwarded_for: HeaderValue,
    /// When bytes last moved on any body of this connection.
    pub activity: Arc<Activity>,
}

impl ConnInfo {
    /// Describes a connection from `peer`.
    pub fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        let ip = peer.ip().to_canonical().to_string();
        ConnInfo {
            peer,
            tls,
            forwarded_for: HeaderValue::from_str(&ip)
                .unwrap_or(HeaderValue::from_static("unknown")),
            activity: Activity::new(),
        }
    }
}

/// Serves one request. Never fails: errors become SPEC §6 responses.
pub async fn handle(
    state: Arc<AppState>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let _inflight = Inflight::enter(&state.metrics.inflight);
    let generation = state.generation.load_full();
    let rid = headers::request_id(req.headers());
    // The access log needs the method and path after the request is
    // consumed; copy them only when the line will be written.
    let logged = (generation.config.log.access && access_log::enabled())
        .then(|| access_log::RequestFacts::new(&req));
    let mut done = Done {
        timed: logged.is_some(),
        ..Done::default()
    };
    let mut resp = match handle_inner(&generation, &conn, req, &rid, start, &mut done).await {
        Ok(resp) => resp,
        Err(e) => {
            if e.status().is_server_error() {
                tracing::warn!(
                    request_id = rid.to_str().unwrap_or(""),
                    route = done.route.as_ref().map_or("", |r| r.name.as_str()),
                    error = %e,
                    "request failed"
                );
            }
            e.into_response(&rid)
        }
    };
    let status = resp.status().as_u16();
    let route_metrics = done
        .route
        .as_ref()
        .map_or(&generation.unrouted, |r| &r.metrics);
    route_metrics.count(status);
    route_metrics
        .duration
        .observe(start.elapsed().as_secs_f64());
    if let Some(request) = logged {
        let response = ResponseFacts {
            status,
            headers: resp.headers(),
            from_upstream: done.passed_through || matches!(resp.body(), ProxyBody::Upstream(..)),
            upstream: done.upstream,
        };
        let route = done.route.map(|r| r as Arc<dyn RouteLabels>);
        let line = AccessLog::new(start, request, rid.clone(), route, response);
        resp = resp.map(|body| body.with_access_log(line));
    }
    resp.headers_mut().insert(X_REQUEST_ID.clone(), rid);
    Ok(resp)
}

/// Counts a request in `flinks_proxy_inflight_requests` for as long as it
/// lives, including when the client goes away and the handler is dropped.
struct Inflight<'a>(&'a prometheus::IntGauge);

impl<'a> Inflight<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Inflight(gauge)
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the handler learnt on the way, for metrics and the log line.
#[derive(Default)]
struct Done {
    route: Option<Arc<Route>>,
    /// The upstream's time is wanted (for the access log).
    timed: bool,
    upstream: Option<Duration>,
    /// The answer is the upstream's, re-sent from a read body (a pooled
    /// route's pass-through, e.g. a revoked-consent 401).
    passed_through: bool,
}

async fn handle_inner(
    rt: &Generation,
    conn: &ConnInfo,
    req: Request<Incoming>,
    rid: &HeaderValue,
    start: Instant,
    done: &mut Done,
) -> Result<Response<ProxyBody>, ProxyError> {
    let route = route_for(rt, conn, &req)?;
    done.route = Some(Arc::clone(route));
    // `request_timeout` is at most a day (config): the check cannot fail.
    let deadline = start.checked_add(rt.request_timeout).unwrap_or(start);

    let (parts, body) = req.into_parts();
    let (token, picked, select) = token_for(route, &parts.headers, start, deadline).await?;
    let (head, host, original_host) = upstream_head(route, parts)?;
    let fwd = Forwarding {
        host: &host,
        original_host: original_host.as_ref(),
        peer: &conn.forwarded_for,
        tls: conn.tls,
        request_id: rid,
        remove: select,
    };
    // A DPoP-bound token's request may be asked for a nonce: kept for a
    // replay as for `reauth_on`.
    let body = if route.reauth_on.is_empty() && token.ath.is_none() {
        RequestBody::streaming(body, &conn.activity)
    } else {
        // Boxed: reading ahead for a replay is the rarer case.
        Box::pin(replay_body(rt, conn, body, deadline)).await?
    };
    let activity = body.activity();
    // Only a body prepared for replay (reauth_on set, at most 64 KiB,
    // within the replay budget) clones.
    let replay = body.try_clone();
    // The clock is read for the upstream's time only when it is logged.
    let started = done.timed.then(Instant::now);
    let mut replay_head = head_copy(route, replay.is_some(), &head);
    // `send` written out: one async layer less for every request's head,
    // body and answer to be moved through.
    let mut resp = match Outgoing::new(route, &head, &fwd, &token) {
        Ok(out) => {
            let rw = out.rewrite(&fwd);
            let sent = route.upstream.send(head, body, &rw, deadline.into()).await;
            out.answered(route, sent)
        }
        Err(e) => Err(e),
    };
    // A DPoP nonce challenge is answered once; one left standing (its body
    // could not be kept) is not a rejection of the token: it goes back to
    // the app, token kept. Boxed: a challenge is rare (the latest nonce is
    // reused).
    let challenged = token.ath.is_some()
        && Box::pin(nonce_retry(
            route,
            &fwd,
            &token,
            &mut resp,
            replay.as_ref(),
            &mut replay_head,
            deadline,
        ))
        .await;
    // Until the first answer's head: what a pass-through reports.
    let first_answer = started.map(|t| t.elapsed());
    let (rejected, again) = if challenged {
        (false, None)
    } else {
        reauth_replay(route, &mut resp, replay, replay_head)
    };
    if rejected {
        // Boxed: the rare second attempt would otherwise double the space
        // every request's future takes.
        match Box::pin(after_rejection(
            route, &fwd, picked, &token, resp, again, deadline,
        ))
        .await
        {
            Ok(r) => resp = r,
            Err(passed) => {
                done.upstream = first_answer;
                done.passed_through = true;
                return Ok(passed);
            }
        }
    }
    done.upstream = started.map(|t| t.elapsed());
    Ok(downstream(rt, resp?.response, activity))
}

/// The route of a request the proxy takes: not `CONNECT`, from a client
/// `access` allows, to a target it routes (host lower-cased for the match).
#[inline]
fn route_for<'g>(
    rt: &'g Generation,
    conn: &ConnInfo,
    req: &Request<Incoming>,
) -> Result<&'g Arc<Route>, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    rt.access.check(conn.peer.ip(), req.headers())?;
    let host = check_target(req)?;
    let path = req.uri().path();
    match host {
        Some(h) if h.bytes().any(|b| b.is_ascii_uppercase()) => {
            rt.routes.find(Some(&h.to_ascii_lowercase()), path)
        }
        _ => rt.routes.find(host, path),
    }
    .ok_or(ProxyError::RouteNotFound)
}

/// A copy of the request's head in case of a replay of a body that can be
/// replayed. An HTTP/1.1 upstream gives the head back with its answer; for
/// any other, the copy is made before sending.
#[inline]
fn head_copy(route: &Route, replayable: bool, head: &Head) -> Option<Head> {
    (replayable && !route.upstream.gives_request_back()).then(|| head.clone())
}

/// Whether the answer has one of the route's `reauth_on` statuses, and if
/// so the body and head to replay with when there are both. The head is
/// the copy made before sending, or the one an HTTP/1.1 upstream gave back
/// with its answer. (A flag and an option rather than nested options: the
/// handler's future keeps one `Replay` across the second attempt, not two.)
#[inline]
fn reauth_replay(
    route: &Route,
    resp: &mut Result<Sent, ProxyError>,
    replay: Option<RequestBody>,
    copy: Option<Head>,
) -> (bool, Option<Replay>) {
    match resp {
        Ok(sent) if route.reauth_on.contains(&sent.response.status()) => {
            let head = copy.or_else(|| sent.request.take());
            (true, replay.zip(head))
        }
        _ => (false, None),
    }
}

/// The upstream's answer as the client gets it (hop-by-hop headers were
/// left out by `net::upstream`): HTTP/1.1, the body under the
/// `idle_timeout` timer.
#[inline]
fn downstream(
    rt: &Generation,
    resp: Response<UpstreamBody>,
    activity: Option<Arc<Activity>>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    parts.version = Version::HTTP_11;
    let idle = Idle::new(rt.idle_timeout, activity);
    Response::from_parts(parts, ProxyBody::Upstream(body, idle))
}

/// The upstream request's head: its method and URI, and the client's
/// headers, to which the SPEC §5 rewrite applies as they are written; and
/// the `Host` it goes with and the client's host, for that rewrite.
fn upstream_head(
    route: &Route,
    parts: http::request::Parts,
) -> Result<(Head, HeaderValue, Option<HeaderValue>), ProxyError> {
    let original_host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    };
    let (authority, host) = upstream_authority(route, original_host.as_ref())?;
    let uri = upstream_uri(route, &parts.uri, authority)?;
    let head = Head {
        method: parts.method,
        uri,
        headers: parts.headers,
        client: true,
    };
    Ok((head, host, original_host))
}

/// The request body read ahead for a replay (within the global replay
/// budget, else streamed).
async fn replay_body(
    rt: &Generation,
    conn: &ConnInfo,
    body: Incoming,
    deadline: Instant,
) -> Result<RequestBody, ProxyError> {
    tokio::time::timeout_at(
        deadline.into(),
        RequestBody::prepare(body, &rt.replay_budget, &conn.activity),
    )
    .await
    .map_err(|_| ProxyError::UpstreamTimeout)?
    .map_err(|_| ProxyError::BadRequest("the request body could not be read"))
}

/// The route's token: its credential's, or that of the connection the
/// request names in the pool's select header (whose name comes back too:
/// the rewrite leaves it out).
async fn token_for<'r>(
    route: &'r Route,
    headers: &HeaderMap,
    now: Instant,
    deadline: Instant,
) -> Result<(Arc<Token>, Option<Arc<Conn>>, Option<&'r HeaderName>), ProxyError> {
    match &route.tokens {
        RouteTokens::Credential(source) => match source.usable_at(now.into()) {
            Some(t) => Ok((t, None, None)),
            // Boxed: waiting for a token is rare and its future large.
            None => Box::pin(source.get(deadline))
                .await
                .map(|t| (t, None, None))
                .map_err(|u| ProxyError::TokenUnavailable {
                    credential: source.config().name.clone(),
                    reason: u.reason,
                    retry_after: u.retry_after,
                }),
        },
        RouteTokens::Pool(pool) => {
            let name = &pool.config().select_header;
            let id = crate::connections::named(headers, name)?;
            // A connection in memory answers without a future; the rest
            // is boxed: the pool's lookup future is large, and the
            // handler's future is moved for every request.
            let (conn, token) = match pool.cached_token(id, now.into()) {
                Some(served) => served?,
                None => Box::pin(pool.token(id, deadline.into())).await?,
            };
            Ok((token, Some(conn), Some(name)))
        }
    }
}

/// RFC 9449 §9: an upstream's `401` with `WWW-Authenticate: DPoP
/// error="use_dpop_nonce"` (its `DPoP-Nonce` kept by [`send`]) is sent
/// once more with a proof carrying the nonce, when the body could be kept;
/// otherwise the 401 stands. `head` is the copy for a later `reauth_on`
/// replay, renewed here when it was used. Whether the answer left in
/// `resp` is a challenge.
async fn nonce_retry(
    route: &Route,
    fwd: &Forwarding<'_>,
    token: &Token,
    resp: &mut Result<Sent, ProxyError>,
    replay: Option<&RequestBody>,
    head: &mut Option<Head>,
    deadline: Instant,
) -> bool {
    let sent = match resp {
        Ok(sent) if nonce_challenge(sent) => sent,
        _ => return false,
    };
    let Some(body) = replay.and_then(RequestBody::try_clone) else {
        return true;
    };
    let Some(again) = head.take().or_else(|| sent.request.take()) else {
        return true;
    };
    *head = head_copy(route, true, &again);
    route.metrics.dpop_nonce_retries.inc();
    *resp = send(route, again, body, fwd, token, deadline).await;
    resp.as_ref().is_ok_and(nonce_challenge)
}

/// Whether the upstream answered `401` with `WWW-Authenticate: DPoP
/// error="use_dpop_nonce"`.
fn nonce_challenge(sent: &Sent) -> bool {
    sent.response.status() == http::StatusCode::UNAUTHORIZED
        && dpop::asks_for_nonce(sent.response.headers())
}

/// A request's head and replayable body, for a second attempt.
type Replay = (RequestBody, Head);

/// A `reauth_on` answer: the rejected token is dropped (unless too young to
/// drop again) and the request replayed once with a new one when it can be;
/// otherwise the answer stands. A pooled route may instead pass the answer
/// through at once, e.g. when the user's consent is gone: that is the `Err`.
async fn after_rejection(
    route: &Route,
    fwd: &Forwarding<'_>,
    picked: Option<Arc<Conn>>,
    token: &Arc<Token>,
    resp: Result<Sent, ProxyError>,
    again: Option<Replay>,
    deadline: Instant,
) -> Result<Result<Sent, ProxyError>, Response<ProxyBody>> {
    let fresh = match (&route.tokens, picked) {
        (RouteTokens::Pool(pool), Some(conn)) => {
            let answer = match resp {
                Ok(sent) => sent.response,
                Err(e) => return Ok(Err(e)),
            };
            pooled_rejection(pool, &conn, token, answer, deadline, again.is_some()).await?
        }
        (RouteTokens::Credential(source), _) => {
            // A fresh token's rejection is the upstream's answer.
            if source.reject(token) == Rejection::IgnoredFresh || again.is_none() {
                return Ok(resp);
            }
            match source.get(deadline).await {
                Ok(fresh) => fresh,
                Err(_) => return Ok(resp),
            }
        }
        (RouteTokens::Pool(_), None) => return Ok(resp),
    };
    // A pooled route hands out a new token only when a replay is possible.
    let Some((body, head)) = again else {
        return Ok(Err(ProxyError::BadRequest(
            "the request cannot be replayed",
        )));
    };
    route.metrics.replays.inc();
    Ok(send(route, head, body, fwd, &fresh, deadline).await)
}

/// A pooled route's `reauth_on` answer: the token to replay with, or the
/// answer itself to pass through (consent revoked, token too young to
/// drop, no new token). The body is read (up to the replay limit) to find
/// a revoked-consent `code`.
async fn pooled_rejection(
    pool: &Arc<Pool>,
    conn: &Arc<Conn>,
    token: &Arc<Token>,
    answer: Response<UpstreamBody>,
    deadline: Instant,
    replay: bool,
) -> Result<Arc<Token>, Response<ProxyBody>> {
    let (mut parts, body) = answer.into_parts();
    parts.version = Version::HTTP_11;
    let collected = tokio::time::timeout_at(
        deadline.into(),
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, REPLAY_LIMIT)),
    )
    .await;
    let Ok(Ok(read)) = collected.map(|r| r.map(|c| c.to_bytes())) else {
        // Too large or broken: not a JSON error document; answer what the
        // proxy knows, the status.
        parts.headers.remove(header::CONTENT_LENGTH);
        return Err(Response::from_parts(parts, ProxyBody::full(Vec::new())));
    };
    match pool
        .rejected(conn, token, &read, deadline.into(), replay)
        .await
    {
        Rejected::Replay(fresh) if replay => Ok(fresh),
        Rejected::Replay(_) | Rejected::PassThrough => {
            Err(Response::from_parts(parts, ProxyBody::full(read)))
        }
    }
}

/// Sends a request with `token` (see [`Outgoing`]).
async fn send(
    route: &Route,
    head: Head,
    body: RequestBody,
    fwd: &Forwarding<'_>,
    token: &Token,
    deadline: Instant,
) -> Result<Sent, ProxyError> {
    let out = Outgoing::new(route, &head, fwd, token)?;
    let rw = out.rewrite(fwd);
    let sent = route.upstream.send(head, body, &rw, deadline.into()).await;
    out.answered(route, sent)
}

/// What a request goes upstream with besides the client's headers: the
/// token's header, and for a DPoP-bound token a fresh proof of this method
/// and URL (RFC 9449 §7), whose server's `DPoP-Nonce` is kept from the
/// answer for the next one.
struct Outgoing<'r> {
    set: [Option<(HeaderName, HeaderValue)>; 2],
    dpop: Option<(&'r dpop::Dpop, dpop::Server)>,
}

impl<'r> Outgoing<'r> {
    fn new(
        route: &'r Route,
        head: &Head,
        fwd: &Forwarding<'_>,
        token: &Token,
    ) -> Result<Outgoing<'r>, ProxyError> {
        let mut set = [
            Some((route.header.clone(), token.header_value(&route.auth_scheme))),
            None,
        ];
        let dpop = match (&route.dpop, &token.ath) {
            (Some(d), Some(ath)) => {
                let server = proof_server(route, head, fwd);
                let proof = d
                    .proof_header_on(&server, head.method.as_str(), head.uri.path(), Some(ath))
                    .map_err(|e| ProxyError::TokenUnavailable {
                        credential: route.config.auth.name().to_owned(),
                        reason: e.to_string(),
                        retry_after: Duration::from_secs(1),
                    })?;
                set[1] = Some((dpop::DPOP.clone(), proof));
                Some((&**d, server))
            }
            _ => None,
        };
        Ok(Outgoing { set, dpop })
    }

    fn rewrite<'a>(&'a self, fwd: &Forwarding<'a>) -> Rewrite<'a> {
        Rewrite {
            forwarding: Some(*fwd),
            set: &self.set,
        }
    }

    /// The upstream's answer, or the error it is for the client.
    fn answered(self, route: &Route, sent: Result<Sent, SendError>) -> Result<Sent, ProxyError> {
        match sent {
            Ok(resp) => {
                if let Some((d, server)) = self.dpop {
                    d.remember_from(&server, resp.response.headers());
                }
                Ok(resp)
            }
            Err(e) if e.client_body => {
                // The client's body broke (bad chunk framing, disconnect):
                // the client's fault, not the upstream's.
                tracing::debug!(route = %route.name, error = %e.source, "request body failed");
                Err(ProxyError::BadRequest("the request body could not be read"))
            }
            Err(e) => {
                route.metrics.upstream_error(e.kind.as_str());
                tracing::debug!(route = %route.name, error = %e.source, "upstream error");
                Err(if e.kind == ErrorKind::Timeout {
                    ProxyError::UpstreamTimeout
                } else {
                    ProxyError::UpstreamUnavailable(e.kind)
                })
            }
        }
    }
}

/// The server a DPoP proof names in `htu` and whose nonce it carries: the
/// upstream request's scheme and authority. Its URI is absolute as the
/// handler builds it; an origin-form one gets the route's scheme and the
/// `Host` sent (the upstream's, or the client's with `preserve_host`).
fn proof_server(route: &Route, head: &Head, fwd: &Forwarding<'_>) -> dpop::Server {
    if head.uri.authority().is_some() {
        return dpop::Server::of(&head.uri);
    }
    let host = match head.client {
        true => Some(fwd.host),
        false => head.headers.get(header::HOST),
    };
    let authority = host
        .and_then(|h| h.to_str().ok())
        .unwrap_or(route.authority.as_str());
    dpop::Server::new(route.scheme.as_str(), authority)
}

/// The authority of the upstream request and the `Host` that goes with it:
/// the upstream's, or with `preserve_host` the client's. Both are the same
/// so that an HTTP/2 upstream sees `:authority` equal to `Host` (RFC 9113
/// §8.3.1); which connection the request uses is the route's choice, not
/// the URI's.
fn upstream_authority(
    route: &Route,
    original_host: Option<&HeaderValue>,
) -> Result<(Authority, HeaderValue), ProxyError> {
    match original_host {
        Some(h) if route.preserve_host => {
            let authority = Authority::try_from(h.as_bytes())
                .map_err(|_| ProxyError::BadRequest("the Host header is not a valid authority"))?;
            Ok((authority, h.clone()))
        }
        _ => Ok((route.authority.clone(), route.host_header.clone())),
    }
}

/// The upstream URI: `authority` + base path + request path (minus
/// `strip_prefix`) + query. The client's scheme and authority are ignored.
fn upstream_uri(route: &Route, inbound: &Uri, authority: Authority) -> Result<Uri, ProxyError> {
    let path = inbound.path();
    let path = match &route.strip_prefix {
        Some(p) if path.starts_with(p.as_str()) => &path[p.len()..],
        _ => path,
    };
    let pq = if route.base_path.is_empty() && path.len() == inbound.path().len() {
        inbound
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    } else {
        let mut s = String::with_capacity(route.base_path.len() + path.len() + 64);
        s.push_str(&route.base_path);
        if !path.starts_with('/') {
            s.push('/');
        }
        s.push_str(path);
        if let Some(q) = inbound.query() {
            s.push('?');
            s.push_str(q);
        }
        PathAndQuery::try_from(s).map_err(|_| ProxyError::BadRequest("invalid request target"))?
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(route.scheme.clone());
    parts.authority = Some(authority);
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))
}

/// Request header rewrite as the handler does it (see
/// [`headers::rewrite_request`]), for the benchmarks.
pub fn rewrite_headers(
    headers: &mut HeaderMap,
    route: &Route,
    conn: &ConnInfo,
    original_host: Option<HeaderValue>,
    rid: &HeaderValue,
) {
    let host = match (&original_host, route.preserve_host) {
        (Some(h), true) => h.clone(),
        _ => route.host_header.clone(),
    };
    *headers = headers::rewrite_request(
        std::mem::take(headers),
        &Forwarding {
            host: &host,
            original_host: original_host.as_ref(),
            peer: &conn.forwarded_for,
            tls: conn.tls,
            request_id: rid,
            remove: None,
        },
    );
}
