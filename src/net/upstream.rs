//! Connections to upstreams and token endpoints over hyper-rustls: verified
//! TLS only (webpki roots plus `ca_file`), HTTP/1.1 or HTTP/2 by ALPN.
//!
//! Forwarded requests go through an [`Upstream`]: the pool of connections
//! to one origin.
//!
//! - **Limit.** At most `max_connections` (the route key) connections are
//!   open per pool; a checkout at the limit waits for one to come back or
//!   close, bounded by the caller's request deadline (`capacity`).
//! - **HTTP/1.1** (`h1`): the proxy's own client (`conn` drives a
//!   connection, `wire` parses httparse-strict responses), run in the task
//!   of the request that uses it: no connection task and no channel per
//!   exchange. A connection returns to the pool the moment its response
//!   body ends and its request body is sent; a request on a pooled
//!   connection the upstream had closed is retried once on a fresh one; an
//!   exchange whose client left is finished in the background to keep its
//!   connection.
//! - **HTTP/2** (`h2`, on hyper): a short list of multiplexed connections with PING
//!   keep-alive; one connect at a time (a cold burst waits for it), another
//!   connection when all are at the peer's `MAX_CONCURRENT_STREAMS`, and a
//!   stream the upstream refused unprocessed is sent once more elsewhere.
//! - **Idle** connections are closed after [`POOL_IDLE_TIMEOUT`] by a reaper
//!   task the [`UpstreamCache`] owns (`cache`). The cache keeps pools across
//!   reloads (warm connections survive) and drops those no route uses any
//!   more.
//!
//! Token requests, a few per hour, use hyper-util's pooled client
//! ([`build_client`]). This module does not decide what to send; `proxy` and
//! `token` do.

mod cache;
mod capacity;
mod conn;
mod error;
mod h1;
mod h2;
mod wire;

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use tower_service::Service;

use crate::ground::lock;
use crate::net::body::RequestBody;
use crate::net::headers::{self, Forwarding};
use crate::net::tls::ClientCert;
use capacity::Capacity;
use conn::WireBody;
use h1::{Abandoned, H1Conn, IdleList, ReturnTo};
use h2::{H2Conn, H2List, Pick, Stream};

pub use cache::UpstreamCache;
pub use error::{ErrorKind, SendError};
pub use h2::PING_ANSWER_GRACE;

/// Idle upstream connections are kept this long: shorter than the usual
/// 60-120 s keep-alive of servers and load balancers, so the proxy stops
/// using a connection before the other side closes it.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Bound on idle connections per upstream; above the largest client
/// concurrency we expect, so steady load opens no new connections.
pub const POOL_MAX_IDLE_PER_HOST: usize = 1024;
/// TCP connect bound; the overall bound is `request_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An HTTP/2 connection that received nothing for this long is sent a PING
/// (also while idle, so a dead idle connection is found before a request
/// needs it). Well inside the default 30 s `request_timeout`.
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// An unanswered PING closes the connection after this long: a black-holed
/// upstream is found within interval + timeout (15 s), not when TCP gives up
/// (minutes), and a healthy one answers within milliseconds.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The pool's timers. The constants above in production; tests shorten them
/// with [`UpstreamCache::set_timings`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct PoolTimings {
    /// See [`POOL_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// See [`H2_KEEP_ALIVE_INTERVAL`].
    pub h2_keep_alive_interval: Duration,
    /// See [`H2_KEEP_ALIVE_TIMEOUT`].
    pub h2_keep_alive_timeout: Duration,
}

impl Default for PoolTimings {
    fn default() -> Self {
        PoolTimings {
            idle_timeout: POOL_IDLE_TIMEOUT,
            h2_keep_alive_interval: H2_KEEP_ALIVE_INTERVAL,
            h2_keep_alive_timeout: H2_KEEP_ALIVE_TIMEOUT,
        }
    }
}

/// hyper-util's pooled client, used for token requests.
pub type HttpClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// A connection's I/O, TLS or not.
type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

fn connector(
    extra_roots: &[CertificateDer<'static>],
    identity: Option<&ClientCert>,
) -> Result<HttpsConnector<HttpConnector>, String> {
    let tls = crate::net::tls::client_config(extra_roots, identity)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_keepalive(Some(Duration::from_secs(60)));
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http))
}

/// Builds a pooled client trusting webpki roots plus `extra_roots`, and
/// presenting `identity` to servers that ask for a client certificate
/// (`tls_client_auth`). The client's connections all carry that identity.
pub fn build_client<B>(
    extra_roots: &[CertificateDer<'static>],
    identity: Option<&ClientCert>,
) -> Result<HttpClient<B>, String>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .build(connector(extra_roots, identity)?))
}

/// What an origin spoke on its last new connection.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Protocol {
    Unknown = 0,
    Http1 = 1,
    Http2 = 2,
}

/// The connections to one upstream origin.
pub struct Upstream {
    origin: Uri,
    connector: HttpsConnector<HttpConnector>,
    timings: Arc<ArcSwap<PoolTimings>>,
    cap: Arc<Capacity>,
    /// HTTP/1.1 connections waiting for a request.
    idle: IdleList,
    /// HTTP/2 connections.
    h2: H2List,
    /// Until known, new connections are made one at a time (an HTTP/2
    /// origin needs just one).
    protocol: AtomicU8,
    /// No route uses it any more: returning connections are closed.
    retired: AtomicBool,
    /// Exchanges being finished in the background after their client left.
    drains: AtomicUsize,
}

/// A connection ready for one request.
enum Checkout {
    H1(H1Conn),
    H2(Stream),
}

/// What one look for a connection found.
enum Attempt {
    /// A connection, and whether it was reused.
    Got(Checkout, bool),
    /// Nothing free; when waiting on another checkout's connect, its epoch.
    Wait(Option<u64>),
}

/// A failed attempt, and the request back when it may be sent again.
struct Failed {
    error: SendError,
    /// The request, when the upstream never processed it.
    retry: Option<(Head, RequestBody)>,
    /// The upstream refused it (HTTP/2): retry even on a fresh connection.
    refused: bool,
}

/// A request's head on its way upstream. While `client` is set its headers
/// are the client's, and the request's [`Rewrite`] (SPEC §5) is still to
/// apply: an HTTP/1.1 connection writes the upstream's head straight from
/// them into its buffer (no second map is built per request); for HTTP/2
/// the map hyper needs is built ([`Head::into_request`]).
#[derive(Debug, Clone)]
pub struct Head {
    /// The method.
    pub method: Method,
    /// Absolute (its authority is HTTP/2's `:authority`), or origin-form.
    pub uri: Uri,
    /// The client's headers while `client` is set, else those to send.
    pub headers: HeaderMap,
    /// `headers` are the client's: the rewrite still applies.
    pub client: bool,
}

/// What the proxy does to a request's headers on the way: the SPEC §5
/// rewrite of a client's headers, then headers set over any of the same
/// name (the token header, a DPoP proof).
#[derive(Debug, Clone, Copy)]
pub struct Rewrite<'a> {
    /// Applied to a head whose headers are the client's.
    pub forwarding: Option<Forwarding<'a>>,
    /// Set last, replacing any header of the same name.
    pub set: &'a [Option<(HeaderName, HeaderValue)>],
}

impl Rewrite<'_> {
    /// Nothing to rewrite: headers go as they are.
    pub const NONE: Rewrite<'static> = Rewrite {
        forwarding: None,
        set: &[],
    };
}

impl Head {
    /// A head whose `headers` are sent as they are (but for `set`).
    pub fn new(method: Method, uri: Uri, headers: HeaderMap) -> Head {
        Head {
            method,
            uri,
            headers,
            client: false,
        }
    }

    /// The request with `rw` applied to a map of headers, for a client that
    /// needs one (HTTP/2).
    pub fn into_request<B>(self, body: B, rw: &Rewrite<'_>) -> Request<B> {
        let mut headers = match (&rw.forwarding, self.client) {
            (Some(f), true) => headers::rewrite_request(self.headers, f),
            _ => self.headers,
        };
        for (name, value) in rw.set.iter().flatten() {
            headers.insert(name.clone(), value.clone());
        }
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = headers;
        req
    }

    /// A request's head as it is, and its body.
    pub fn split<B>(req: Request<B>) -> (Head, B) {
        let (parts, body) = req.into_parts();
        (Head::new(parts.method, parts.uri, parts.headers), body)
    }
}

/// A response from an upstream, and the request's head when the exchange
/// gave it back.
#[derive(Debug)]
pub struct Sent {
    /// The response, hop-by-hop headers (and those `Connection` lists)
    /// already left out; its body streams.
    pub response: Response<UpstreamBody>,
    /// The request's head as it was sent, from an HTTP/1.1 exchange
    /// (written, no longer needed): a replay needs no copy made in
    /// advance. `None` from HTTP/2.
    pub request: Option<Head>,
}

impl Upstream {
    /// Sends a request (absolute URI) and returns the response head; the
    /// body streams, and the connection returns to the pool when it ends.
    ///
    /// Sent again once, on another connection, when a pooled connection
    /// turned out closed before the request was written, or when an HTTP/2
    /// upstream refused the stream unprocessed.
    pub async fn send(
        self: &Arc<Self>,
        mut head: Head,
        mut body: RequestBody,
        rw: &Rewrite<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<Sent, SendError> {
        let mut retried = false;
        loop {
            let (checkout, reused) = match self.ready_checkout() {
                Some(c) => c,
                // Boxed: waiting for (or making) a connection is rare.
                None => tokio::time::timeout_at(deadline, Box::pin(self.checkout()))
                    .await
                    .map_err(|_| SendError::timeout())??,
            };
            let failed = match checkout {
                // Boxed: hyper's HTTP/2 exchange future is large, and would be
                // moved with every request's future, HTTP/1.1 ones too.
                Checkout::H2(stream) => {
                    let sent = Box::pin(tokio::time::timeout_at(
                        deadline,
                        self.send_h2(stream, head, body, rw),
                    ))
                    .await;
                    match sent {
                        Ok(r) => r,
                        Err(_) => Err(Failed {
                            error: SendError::timeout(),
                            retry: None,
                            refused: false,
                        }),
                    }
                }
                // Its deadline is the connection's own timer's. Written out
                // here rather than in a method of its own: one async layer
                // less for every request and answer to be moved through.
                Checkout::H1(conn) => {
                    let (wire, ret) = conn.lend(self);
                    let mut guard = Abandoned {
                        exchange: Some(Box::pin(wire.exchange(head, body, rw, reused, deadline))),
                        ret: Some(ret),
                    };
                    let result = match guard.exchange.as_mut() {
                        Some(exchange) => exchange.await,
                        None => unreachable!("set above"),
                    };
                    guard.exchange = None;
                    match (result, guard.ret.take()) {
                        (Ok((head, decoder, wire, request)), Some(ret)) => Ok(Sent {
                            response: head.map(|()| UpstreamBody {
                                inner: Inner::H1(WireBody::new(wire, decoder, ret)),
                            }),
                            request: Some(request),
                        }),
                        (Ok(_), None) => unreachable!("the guard keeps its loan until here"),
                        (Err(f), _) => Err(Failed {
                            error: SendError::wire(f.error),
                            retry: f.retry,
                            refused: false,
                        }),
                    }
                }
            };
            let f = match failed {
                Ok(resp) => return Ok(resp),
                Err(f) => f,
            };
            match f.retry {
                Some(r) if !retried && (reused || f.refused) => {
                    tracing::debug!(upstream = %self.origin, refused = f.refused, "request not processed; sending it once more");
                    retried = true;
                    (head, body) = r;
                }
                _ => return Err(f.error),
            }
        }
    }

    async fn send_h2(
        &self,
        mut stream: Stream,
        mut head: Head,
        body: RequestBody,
        rw: &Rewrite<'_>,
    ) -> Result<Sent, Failed> {
        // The URI's own authority is kept (`:authority` must match what the
        // proxy chose for `Host`); only a relative URI gets the pool's.
        if head.uri.authority().is_none() {
            let mut parts = head.uri.clone().into_parts();
            parts.scheme = self.origin.scheme().cloned();
            parts.authority = self.origin.authority().cloned();
            if let Ok(uri) = Uri::from_parts(parts) {
                head.uri = uri;
            }
        }
        let copy = replay_copy(&head, &body);
        let result = stream
            .sender()
            .try_send_request(head.into_request(body, rw))
            .await;
        stream.settle();
        match result {
            Ok(mut resp) => Ok(Sent {
                response: {
                    // HTTP/1.1's parser leaves them out as it reads.
                    headers::remove_hop_by_hop(resp.headers_mut());
                    resp
                }
                .map(|body| UpstreamBody {
                    inner: Inner::H2 {
                        body,
                        _stream: stream,
                    },
                }),
                request: None,
            }),
            Err(mut e) => {
                let not_written = e.take_message().map(Head::split);
                let e = e.into_error();
                let refused = h2::is_refused(&e);
                if not_written.is_some() || refused {
                    stream.evict();
                }
                Err(Failed {
                    retry: not_written.or(if refused { copy } else { None }),
                    refused,
                    error: SendError::exchange(e),
                })
            }
        }
    }

    /// A connection to be had at once: a stream on an HTTP/2 connection
    /// with room, or the most recently used idle HTTP/1.1 one (reused).
    fn ready_checkout(&self) -> Option<(Checkout, bool)> {
        // An origin that answered in HTTP/1.1 last is not asked for a stream
        // first (the slow path still looks).
        if self.protocol.load(Ordering::Relaxed) != Protocol::Http1 as u8 {
            if let Pick::Stream(s) = self.h2.pick(&self.cap) {
                return Some((Checkout::H2(s), true));
            }
        }
        let timings = **self.timings.load();
        let conn = self.idle.take(timings.idle_timeout)?;
        Some((Checkout::H1(conn), true))
    }

    /// A connection for one request: a stream on an HTTP/2 connection with
    /// room, the most recently used idle HTTP/1.1 one, or a new one; at the
    /// connection limit, waits for one of those. `true` when reused.
    async fn checkout(self: &Arc<Self>) -> Result<(Checkout, bool), SendError> {
        loop {
            // The common case takes no lock on the wait list.
            if let Attempt::Got(c, reused) = self.attempt().await? {
                return Ok((c, reused));
            }
            let changed = self.cap.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let connect_epoch = match self.attempt().await? {
                Attempt::Got(c, reused) => return Ok((c, reused)),
                Attempt::Wait(epoch) => epoch,
            };
            changed.await;
            // The connect we waited for failed: its error is ours too (as
            // Envoy fails the requests queued on a connection).
            if let Some(e) = connect_epoch.and_then(|e| self.h2.failure_since(e)) {
                return Err(e);
            }
        }
    }

    /// One look for a connection, connecting if the pool may.
    async fn attempt(&self) -> Result<Attempt, SendError> {
        match self.h2.pick(&self.cap) {
            Pick::Stream(s) => return Ok(Attempt::Got(Checkout::H2(s), true)),
            Pick::Wait(epoch) => return Ok(Attempt::Wait(Some(epoch))),
            Pick::Full => {}
        }
        let timings = **self.timings.load();
        if let Some(conn) = self.idle.take(timings.idle_timeout) {
            return Ok(Attempt::Got(Checkout::H1(conn), true));
        }
        // Boxed: connecting (TCP, TLS, handshake) is rare and its future
        // large; inline it would be moved with every request's future.
        if let Some(checkout) = Box::pin(self.try_connect()).await? {
            return Ok(Attempt::Got(checkout, false));
        }
        // At the limit: share an HTTP/2 connection past the peer's stream
        // limit (hyper queues), or wait for a connection.
        Ok(match self.h2.least_loaded(&self.cap) {
            Some(s) => Attempt::Got(Checkout::H2(s), true),
            None => Attempt::Wait(None),
        })
    }

    /// A new connection, unless the pool is at its limit or (for an origin
    /// that may speak HTTP/2) another checkout is already connecting:
    /// `None`, and the caller waits.
    async fn try_connect(&self) -> Result<Option<Checkout>, SendError> {
        let Some(slot) = self.cap.try_acquire() else {
            return Ok(None);
        };
        if self.protocol.load(Ordering::Relaxed) == Protocol::Http1 as u8 {
            return self.connect(slot).await.map(Some);
        }
        let Some(connecting) = self.h2.begin_connect(&self.cap) else {
            return Ok(None);
        };
        match self.connect(slot).await {
            Ok(checkout) => {
                connecting.succeed();
                Ok(Some(checkout))
            }
            Err(e) => {
                let (e, shared) = e.share();
                connecting.fail(e.kind, shared);
                Err(e)
            }
        }
    }

    /// Connects, handshakes by ALPN, and for HTTP/2 adds the connection to
    /// the list with a stream reserved for the caller.
    async fn connect(&self, slot: capacity::Slot) -> Result<Checkout, SendError> {
        let io = self
            .connector
            .clone()
            .call(self.origin.clone())
            .await
            .map_err(SendError::connect)?;
        if io.connected().is_negotiated_h2() {
            self.protocol
                .store(Protocol::Http2 as u8, Ordering::Relaxed);
            let timings = **self.timings.load();
            let max_streams = self.h2.expected_max_streams();
            let conn = H2Conn::handshake(io, slot, &timings, max_streams)
                .await
                .map_err(SendError::exchange)?;
            Ok(Checkout::H2(self.h2.add(conn, &self.cap)))
        } else {
            self.protocol
                .store(Protocol::Http1 as u8, Ordering::Relaxed);
            Ok(Checkout::H1(H1Conn::new(io, slot)))
        }
    }

    /// Pools a connection whose exchange is over, unless it cannot take
    /// another request (closed, or its request body is still being sent
    /// after an early answer: it closes once the upload ends) or the pool
    /// no longer wants it.
    fn put_back(&self, conn: H1Conn) {
        if !conn.is_reusable() || self.retired.load(Ordering::Relaxed) || self.cap.is_over() {
            return;
        }
        self.idle.put(conn, POOL_MAX_IDLE_PER_HOST);
        self.cap.changed.notify_one();
    }

    /// Closes idle connections past `idle_timeout` (the reaper).
    fn reap(&self, idle_timeout: Duration) {
        let closed = self.idle.reap(idle_timeout) + self.h2.reap(idle_timeout);
        if closed > 0 {
            tracing::debug!(upstream = %self.origin, closed, "idle upstream connections closed");
        }
    }

    /// No route uses this pool any more.
    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.idle.clear();
        self.h2.clear();
    }

    /// Whether [`Upstream::send`] gives the request's head back ([`Sent`]):
    /// the origin speaks HTTP/1.1, as far as is known.
    pub fn gives_request_back(&self) -> bool {
        self.protocol.load(Ordering::Relaxed) == Protocol::Http1 as u8
    }

    /// Idle HTTP/1.1 connections now (for tests and `/status`).
    pub fn idle_connections(&self) -> usize {
        self.idle.len()
    }

    /// Connections open now, HTTP/1.1 and HTTP/2, idle or busy.
    pub fn open_connections(&self) -> usize {
        self.cap.open()
    }

    /// HTTP/2 connections taking new streams (for tests).
    pub fn http2_connections(&self) -> usize {
        self.h2.len()
    }

    /// HTTP/1.1 exchanges being finished in the background because their
    /// client left, to keep their connections (for tests).
    pub fn pending_drains(&self) -> usize {
        self.drains.load(Ordering::Relaxed)
    }
}

/// A copy of a request whose body can be sent again (buffered, or empty),
/// for a retry after a refused HTTP/2 stream.
fn replay_copy(head: &Head, body: &RequestBody) -> Option<(Head, RequestBody)> {
    let body = match body.try_clone() {
        Some(b) => b,
        None if body.is_end_stream() => RequestBody::Buffered(None, None),
        None => return None,
    };
    Some((head.clone(), body))
}

/// An upstream response body. HTTP/1.1: read off the connection in the
/// reader's task; the connection goes back to the pool when the body ends,
/// and a body dropped early (its client left) is read to its end in the
/// background, within bounds, so its connection can go back too. HTTP/2:
/// hyper's stream, holding its place on the connection until dropped.
pub struct UpstreamBody {
    inner: Inner,
}

enum Inner {
    H1(WireBody<ReturnTo>),
    H2 {
        body: Incoming,
        /// Held for its drop: the stream's place on its connection.
        _stream: Stream,
    },
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().inner {
            Inner::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::H2 { body, .. } => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2 { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::H1(b) => b.size_hint(),
            Inner::H2 { body, .. } => body.size_hint(),
        }
    }
}
