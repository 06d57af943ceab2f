//! The access log: one line per request (`[log] access`), written through
//! `tracing` so it comes out as text or JSON like every other line
//! (`[log] format`), with the target `flinks_proxy::proxy::access_log`.
//!
//! The line is written when the response body is dropped — after its last
//! byte, or when the client leaves — so it can carry the bytes sent and the
//! whole exchange's latency. What it records is copied cheaply (shared
//! bytes, an `Arc` to the route's [`RouteLabels`]); nothing is allocated before the line is
//! formatted. It never holds the query string (tokens and personal data
//! travel there) nor any header but the request id and Flinks's
//! `ob-correlation-id` / `ob-trace-id` (what Flinks support asks for).
//! This module does not decide what is counted in metrics (see `proxy`).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// Flinks's per-exchange id, on its API responses.
static OB_CORRELATION_ID: HeaderName = HeaderName::from_static("ob-correlation-id");
/// Flinks's trace id, on its API responses.
static OB_TRACE_ID: HeaderName = HeaderName::from_static("ob-trace-id");

/// What a line says of the route that took the request (the route of a
/// config generation implements it; the log needs nothing else of it).
pub trait RouteLabels: Send + Sync {
    /// The route's name.
    fn name(&self) -> &str;
    /// The credential whose token it injects, if any.
    fn credential(&self) -> Option<&str>;
    /// The connection pool it serves, if any.
    fn pool(&self) -> Option<&str>;
}

/// Whether lines would be written at all (the `tracing` filter lets
/// `info` through for this module).
pub fn enabled() -> bool {
    tracing::enabled!(tracing::Level::INFO)
}

/// What the line needs from the request, taken before the handler consumes
/// it.
#[derive(Debug)]
pub struct RequestFacts {
    method: Method,
    path: Option<PathAndQuery>,
    bytes_in: Option<u64>,
}

impl RequestFacts {
    /// Method, path and the request body's length when it is known up
    /// front (`Content-Length`, or no body); a body of unknown length
    /// (chunked, HTTP/2 without `content-length`) is not counted.
    pub fn new(req: &http::Request<impl http_body::Body>) -> RequestFacts {
        RequestFacts {
            method: req.method().clone(),
            path: req.uri().path_and_query().cloned(),
            bytes_in: req.body().size_hint().exact(),
        }
    }
}

/// One access log line in the making; written when dropped.
pub struct AccessLog {
    start: Instant,
    request: RequestFacts,
    request_id: HeaderValue,
    route: Option<Arc<dyn RouteLabels>>,
    status: u16,
    upstream_status: Option<u16>,
    upstream: Option<Duration>,
    correlation_id: Option<HeaderValue>,
    trace_id: Option<HeaderValue>,
    bytes_out: u64,
}

/// The response side of a line.
pub struct ResponseFacts<'a> {
    /// Status sent to the client.
    pub status: u16,
    /// Response headers, read for Flinks's ids when `from_upstream`.
    pub headers: &'a HeaderMap,
    /// Whether the response is the upstream's (not an error the proxy made).
    pub from_upstream: bool,
    /// Until the upstream's response headers (the last attempt's, on a replay).
    pub upstream: Option<Duration>,
}

impl AccessLog {
    /// A line for a request received at `start`.
    pub fn new(
        start: Instant,
        request: RequestFacts,
        request_id: HeaderValue,
        route: Option<Arc<dyn RouteLabels>>,
        response: ResponseFacts<'_>,
    ) -> AccessLog {
        let upstream_header = |name: &HeaderName| {
            response
                .from_upstream
                .then(|| response.headers.get(name).cloned())
                .flatten()
        };
        AccessLog {
            start,
            request,
            request_id,
            route,
            status: response.status,
            upstream_status: response.from_upstream.then_some(response.status),
            upstream: response.upstream,
            correlation_id: upstream_header(&OB_CORRELATION_ID),
            trace_id: upstream_header(&OB_TRACE_ID),
            bytes_out: 0,
        }
    }

    /// Counts response body bytes sent.
    pub fn sent(&mut self, n: usize) {
        self.bytes_out = self.bytes_out.saturating_add(n as u64);
    }
}

/// Whole microseconds: latencies without float noise.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn header_text(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let route = self.route.as_deref();
        tracing::info!(
            request_id = self.request_id.to_str().unwrap_or(""),
            route = route.map_or("", |r| r.name()),
            credential = route.and_then(|r| r.credential()),
            pool = route.and_then(|r| r.pool()),
            method = self.request.method.as_str(),
            path = self.request.path.as_ref().map_or("", |p| p.path()),
            status = self.status,
            upstream_status = self.upstream_status,
            bytes_in = self.request.bytes_in,
            bytes_out = self.bytes_out,
            upstream_us = self.upstream.map(micros),
            total_us = micros(self.start.elapsed()),
            ob_correlation_id = header_text(&self.correlation_id),
            ob_trace_id = header_text(&self.trace_id),
            "request"
        );
    }
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog")
            .field("status", &self.status)
            .field("bytes_out", &self.bytes_out)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_whole_microseconds() {
        assert_eq!(micros(Duration::from_nanos(117_790_999)), 117_790);
        assert_eq!(micros(Duration::from_secs(2)), 2_000_000);
        assert_eq!(micros(Duration::MAX), u64::MAX);
    }

    #[test]
    fn request_facts_keep_the_path_and_a_known_length() {
        let req = http::Request::get("http://h/a/b?token=secret")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"12345",
            )))
            .unwrap();
        let facts = RequestFacts::new(&req);
        assert_eq!(facts.path.as_ref().map(|p| p.path()), Some("/a/b"));
        assert_eq!(facts.bytes_in, Some(5));
        assert_eq!(facts.method, Method::GET);
    }
}
