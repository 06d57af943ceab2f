//! The request handler: access → route → token → rewrite → forward →
//! respond. [`handle`] is infallible; [`handle_inner`] returns a
//! [`ProxyError`] that becomes the JSON error of SPEC §6 in one place.
//!
//! Bodies stream both ways; a request body of at most 64 KiB is buffered
//! when the route replays on `reauth_on`. This module does not own
//! connections (see `server`) or tokens (see `token`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;

use crate::access_log::{self, AccessLog, ResponseFacts};
use crate::body::{ProxyBody, RequestBody};
use crate::error::ProxyError;
use crate::runtime::{AppState, Route, Runtime};
use crate::token::{Rejection, Token};
use crate::upstream::{ErrorKind, UpstreamBody};

/// `x-request-id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// Longest client request id kept; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

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
        }
    }
}

/// Headers the proxy manages itself; a route cannot put its token in them.
pub fn is_reserved_header(name: &HeaderName) -> bool {
    is_hop_by_hop(name)
        || name == header::HOST
        || name == header::PROXY_AUTHORIZATION
        || name == header::CONTENT_LENGTH
        || name == X_REQUEST_ID
        || name == X_FORWARDED_FOR
        || name == X_FORWARDED_PROTO
        || name == X_FORWARDED_HOST
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
}

/// Removes hop-by-hop headers: the fixed set and those `Connection` lists.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in Connection, removed by `&str` (no allocation). Each
    // value is cloned first (shared bytes, no copy) because the map cannot
    // stay borrowed while names are removed from it.
    let listed = headers.get_all(header::CONNECTION).iter().count();
    for i in 0..listed {
        let Some(value) = headers.get_all(header::CONNECTION).iter().nth(i).cloned() else {
            break;
        };
        for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
            // `close` and `keep-alive` are options, not header names (and
            // Keep-Alive goes below anyway).
            if !token.is_empty()
                && !token.eq_ignore_ascii_case("close")
                && !token.eq_ignore_ascii_case("keep-alive")
                && !token.eq_ignore_ascii_case("connection")
            {
                headers.remove(token);
            }
        }
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// The client's request id if sane (printable ASCII without spaces, at most
/// 128 bytes), else a new random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| c.is_ascii_graphic())
        {
            return v.clone();
        }
    }
    new_request_id()
}

fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n: u128 = rand::random();
    let mut buf = [0u8; 32];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((n >> (i * 4)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The host a request is routed by: the authority of an absolute-form or
/// HTTP/2 target, else the `Host` header; lower-case, without port.
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    let raw = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw.rsplit('@').next().unwrap_or(raw)))
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// A path that could climb out of a route's prefix once the upstream
/// normalises it (`/api/../admin`), plain or percent-encoded.
fn has_dot_segments(path: &str) -> bool {
    path.split('/').any(|seg| {
        seg == "."
            || seg == ".."
            || (seg.len() <= 6 && seg.contains('%') && {
                let lower = seg.to_ascii_lowercase().replace("%2e", ".");
                lower == "." || lower == ".."
            })
    })
}

/// Refuses targets the proxy will not route, and returns the routing host.
fn check_target(req: &Request<Incoming>) -> Result<Option<&str>, ProxyError> {
    let path = req.uri().path();
    if !path.starts_with('/') {
        return Err(ProxyError::BadRequest("the request target must be a path"));
    }
    if has_dot_segments(path) {
        return Err(ProxyError::BadRequest(
            "the path must not contain . or .. segments",
        ));
    }
    // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without
    // Host or with more than one.
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() || (host_header.is_none() && req.version() == Version::HTTP_11) {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    // RFC 9110 §4.2.4: userinfo in a target disguises the authority.
    let userinfo = host_header.is_some_and(|h| h.as_bytes().contains(&b'@'))
        || req
            .uri()
            .authority()
            .is_some_and(|a| a.as_str().contains('@'));
    if userinfo {
        return Err(ProxyError::BadRequest(
            "the request target must not carry user information",
        ));
    }
    Ok(request_host(req))
}

/// Serves one request. Never fails: errors become SPEC §6 responses.
pub async fn handle(
    state: Arc<AppState>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let _inflight = Inflight::enter(&state.metrics.inflight);
    let runtime = state.runtime.load_full();
    let rid = request_id(req.headers());
    // The access log needs the method and path after the request is
    // consumed; copy them only when the line will be written.
    let logged = (runtime.config.log.access && access_log::enabled())
        .then(|| access_log::RequestFacts::new(&req));
    let mut done = Done::default();
    let mut resp = match handle_inner(&runtime, &conn, req, &rid, &mut done).await {
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
        .map_or(&runtime.unrouted, |r| &r.metrics);
    route_metrics.count(status);
    route_metrics
        .duration
        .observe(start.elapsed().as_secs_f64());
    if let Some(request) = logged {
        let response = ResponseFacts {
            status,
            headers: resp.headers(),
            from_upstream: matches!(resp.body(), ProxyBody::Upstream(_)),
            upstream: done.upstream,
        };
        let line = AccessLog::new(start, request, rid.clone(), done.route, response);
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
    upstream: Option<Duration>,
}

async fn handle_inner(
    rt: &Runtime,
    conn: &ConnInfo,
    req: Request<Incoming>,
    rid: &HeaderValue,
    done: &mut Done,
) -> Result<Response<ProxyBody>, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    rt.access.check(conn.peer.ip(), req.headers())?;
    let host = check_target(&req)?;
    let path = req.uri().path();
    let route = match host {
        Some(h) if h.bytes().any(|b| b.is_ascii_uppercase()) => {
            rt.routes.find(Some(&h.to_ascii_lowercase()), path)
        }
        _ => rt.routes.find(host, path),
    }
    .ok_or(ProxyError::RouteNotFound)?;
    done.route = Some(Arc::clone(route));
    let deadline = Instant::now() + rt.request_timeout;

    let token = match route.source.usable() {
        Some(t) => t,
        None => route
            .source
            .get(deadline)
            .await
            .map_err(|u| ProxyError::TokenUnavailable {
                credential: route.source.config().name.clone(),
                reason: u.reason,
                retry_after: u.retry_after,
            })?,
    };

    let (parts, body) = req.into_parts();
    let original_host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    };
    let uri = upstream_uri(route, &parts.uri)?;
    let mut headers = parts.headers;
    rewrite_headers(&mut headers, route, conn, original_host, rid);
    let method = parts.method;

    let body = if route.reauth_on.is_empty() {
        RequestBody::Streaming {
            head: None,
            rest: body,
        }
    } else {
        tokio::time::timeout_at(deadline.into(), RequestBody::prepare(body))
            .await
            .map_err(|_| ProxyError::UpstreamTimeout)?
            .map_err(|_| ProxyError::BadRequest("the request body could not be read"))?
    };
    // Only a body prepared for replay (reauth_on set, at most 64 KiB) clones.
    let replay = body.try_clone();
    let started = Instant::now();
    let replay_head = replay
        .as_ref()
        .map(|_| (method.clone(), uri.clone(), headers.clone()));
    let mut resp = send(route, method, uri, headers, body, &token, deadline).await;
    if let Ok(r) = &resp {
        // A fresh token's rejection is the upstream's answer: passed through.
        if route.reauth_on.contains(&r.status())
            && route.source.reject(&token) != Rejection::IgnoredFresh
        {
            if let (Some(body), Some((method, uri, headers))) = (replay, replay_head) {
                if let Ok(fresh) = route.source.get(deadline).await {
                    route.metrics.replays.inc();
                    resp = send(route, method, uri, headers, body, &fresh, deadline).await;
                }
            }
        }
    }
    done.upstream = Some(started.elapsed());
    let resp = resp?;
    let (mut parts, body) = resp.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(parts, ProxyBody::Upstream(body)))
}

async fn send(
    route: &Route,
    method: Method,
    uri: Uri,
    mut headers: HeaderMap,
    body: RequestBody,
    token: &Token,
    deadline: Instant,
) -> Result<Response<UpstreamBody>, ProxyError> {
    headers.insert(route.header.clone(), token.header_value(&route.auth_scheme));
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    match tokio::time::timeout_at(deadline.into(), route.upstream.send(req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) if e.client_body => {
            // The client's body broke (bad chunk framing, disconnect): the
            // client's fault, not the upstream's.
            tracing::debug!(route = %route.name, error = %e.source, "request body failed");
            Err(ProxyError::BadRequest("the request body could not be read"))
        }
        Ok(Err(e)) => {
            route.metrics.upstream_error(e.kind.as_str());
            tracing::debug!(route = %route.name, error = %e.source, "upstream error");
            Err(if e.kind == ErrorKind::Timeout {
                ProxyError::UpstreamTimeout
            } else {
                ProxyError::UpstreamUnavailable(e.kind)
            })
        }
        Err(_) => {
            route.metrics.upstream_error(ErrorKind::Timeout.as_str());
            Err(ProxyError::UpstreamTimeout)
        }
    }
}

/// The upstream URI: upstream origin + base path + request path (minus
/// `strip_prefix`) + query. The client's scheme and authority are ignored.
fn upstream_uri(route: &Route, inbound: &Uri) -> Result<Uri, ProxyError> {
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
    Uri::builder()
        .scheme(route.scheme.clone())
        .authority(route.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|_| ProxyError::BadRequest("invalid request target"))
}

/// Request header rewrite: hop-by-hop and client credentials out; Host,
/// X-Forwarded-* and x-request-id in. The token header is set by `send`.
/// Public for the benchmarks.
pub fn rewrite_headers(
    headers: &mut HeaderMap,
    route: &Route,
    conn: &ConnInfo,
    original_host: Option<HeaderValue>,
    rid: &HeaderValue,
) {
    // hyper sizes the map for the headers it parsed; make room for the five
    // the proxy adds at once rather than growing (rehashing) several times.
    headers.reserve(6);
    remove_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::PROXY_AUTHORIZATION);
    match (&original_host, route.preserve_host) {
        (Some(h), true) => {
            headers.insert(header::HOST, h.clone());
        }
        _ => {
            headers.insert(header::HOST, route.host_header.clone());
        }
    }
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            let peer = conn.forwarded_for.to_str().unwrap_or("unknown");
            HeaderValue::from_str(&format!("{prev}, {peer}")).ok()
        }
        None => Some(conn.forwarded_for.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    match original_host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST.clone(), h);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    headers.insert(X_REQUEST_ID.clone(), rid.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_listed_ones_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TRAILER, HeaderValue::from_static("x"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        h.append(header::CONNECTION, HeaderValue::from_static("X-Second-Hop"));
        h.insert("x-second-hop", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        let fresh = request_id(&h);
        assert_eq!(fresh.len(), 32);
        h.insert(
            &X_REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(200)).unwrap(),
        );
        assert_eq!(request_id(&h).len(), 32);
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn dot_segments_are_detected() {
        assert!(has_dot_segments("/api/../admin"));
        assert!(has_dot_segments("/api/%2e%2E/admin"));
        assert!(has_dot_segments("/api/./x"));
        assert!(has_dot_segments("/api/.."));
        assert!(!has_dot_segments("/api/v1.2/x"));
        assert!(!has_dot_segments("/api/..."));
        assert!(!has_dot_segments("/"));
    }
}
