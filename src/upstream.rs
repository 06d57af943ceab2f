//! Connections to upstreams and token endpoints over hyper-rustls: verified
//! TLS only (webpki roots plus `ca_file`), HTTP/1.1 or HTTP/2 by ALPN.
//!
//! Forwarded requests go through an [`Upstream`]: a small pool of hyper
//! connections per origin. An HTTP/1.1 connection goes back to the pool the
//! moment its response body ends (no task per request to watch for that),
//! and a pooled connection the upstream closed before the request was
//! written is retried once on a fresh one. An HTTP/2 upstream gets one
//! multiplexed connection. Pools are kept in an [`UpstreamCache`] across
//! reloads, so a reload does not throw away warm connections. Token
//! requests, a few per hour, use hyper-util's pooled client
//! ([`build_client`]). This module does not decide what to send; `proxy` and
//! `token` do.

// The in-task HTTP/1.1 client: its wire format and connection driver
// (wired into the pool next).
#[allow(dead_code)]
mod conn;
#[allow(dead_code)]
mod wire;

/// A connection's I/O, TLS or not.
type Io = hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>;

use std::collections::{HashMap, VecDeque};
use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use tower_service::Service;

use crate::body::RequestBody;

/// Idle upstream connections are kept this long: shorter than the usual
/// 60-120 s keep-alive of servers and load balancers, so the proxy stops
/// using a connection before the other side closes it.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Bound on idle connections per upstream; above the largest client
/// concurrency we expect, so steady load opens no new connections.
pub const POOL_MAX_IDLE_PER_HOST: usize = 1024;
/// TCP connect bound; the overall bound is `request_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// hyper-util's pooled client, used for token requests.
pub type HttpClient<B> = Client<HttpsConnector<HttpConnector>, B>;

fn connector(
    extra_roots: &[CertificateDer<'static>],
) -> Result<HttpsConnector<HttpConnector>, String> {
    let tls = crate::tls::client_config(extra_roots)?;
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

/// Builds a pooled client trusting webpki roots plus `extra_roots`.
pub fn build_client<B>(extra_roots: &[CertificateDer<'static>]) -> Result<HttpClient<B>, String>
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
        .build(connector(extra_roots)?))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What makes two routes share a pool: trust roots and origin.
type PoolKey = (Vec<CertificateDer<'static>>, Scheme, Authority);

/// Upstream pools by origin and trust roots, shared by routes and kept
/// across reloads.
#[derive(Default)]
pub struct UpstreamCache {
    pools: Mutex<HashMap<PoolKey, Arc<Upstream>>>,
}

impl UpstreamCache {
    /// The pool for this origin and these extra roots, made on first use.
    pub fn get(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<Arc<Upstream>, String> {
        let key = (extra_roots.to_vec(), scheme.clone(), authority.clone());
        let mut pools = lock(&self.pools);
        if let Some(u) = pools.get(&key) {
            return Ok(Arc::clone(u));
        }
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| e.to_string())?;
        let u = Arc::new(Upstream {
            origin,
            connector: connector(extra_roots)?,
            idle: Mutex::new(VecDeque::new()),
            h2: Mutex::new(None),
        });
        pools.insert(key, Arc::clone(&u));
        Ok(u)
    }
}

/// The connections to one upstream origin.
pub struct Upstream {
    origin: Uri,
    connector: HttpsConnector<HttpConnector>,
    /// HTTP/1.1 connections waiting for a request; most recent at the back.
    idle: Mutex<VecDeque<IdleConn>>,
    /// The shared connection, when the upstream speaks HTTP/2.
    h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
}

struct IdleConn {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

enum Sender {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

/// Why an exchange with the upstream failed.
#[derive(Debug)]
pub struct SendError {
    /// What kind of failure (the metric label).
    pub kind: ErrorKind,
    /// The client's own request body broke (its fault, not the upstream's).
    pub client_body: bool,
    /// The underlying error, for debug logs.
    pub source: Box<dyn StdError + Send + Sync>,
}

impl SendError {
    fn connect(e: Box<dyn StdError + Send + Sync>) -> SendError {
        let kind = match ErrorKind::scan(&*e) {
            Some(k) => k,
            None => ErrorKind::Connect,
        };
        SendError {
            kind,
            client_body: false,
            source: e,
        }
    }

    fn exchange(e: hyper::Error) -> SendError {
        // hyper reports a failing request body as a "user body" error whose
        // cause is the inbound connection's own hyper::Error.
        let client_body = e.is_user() && e.source().is_some_and(|c| c.is::<hyper::Error>());
        SendError {
            kind: ErrorKind::scan(&e).unwrap_or(ErrorKind::Protocol),
            client_body,
            source: Box::new(e),
        }
    }
}

impl Upstream {
    /// Sends a request (absolute URI) and returns the response head; the
    /// body streams, and the connection returns to the pool when it ends.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let absolute = req.uri().clone();
        let mut retried = false;
        loop {
            let (sender, reused) = self.checkout().await?;
            let result = match sender {
                Sender::H2(mut s) => {
                    *req.uri_mut() = absolute.clone();
                    s.try_send_request(req)
                        .await
                        .map(|r| r.map(|b| UpstreamBody { body: b, ret: None }))
                }
                Sender::H1(mut s) => {
                    // HTTP/1.1 origin-form: the path, not the absolute URI.
                    if let Some(pq) = absolute.path_and_query() {
                        *req.uri_mut() = Uri::from(pq.clone());
                    }
                    let exchange = Box::pin(s.try_send_request(req));
                    let mut guard = Abandoned {
                        exchange: Some(exchange),
                        ret: Some(ReturnTo {
                            upstream: Arc::clone(self),
                            sender: s,
                        }),
                    };
                    let result = match guard.exchange.as_mut() {
                        Some(exchange) => exchange.await,
                        None => unreachable!("set above"),
                    };
                    guard.exchange = None;
                    match result {
                        Ok(r) => Ok(r.map(|b| UpstreamBody {
                            body: b,
                            ret: guard.ret.take(),
                        })),
                        Err(e) => Err(e),
                    }
                }
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // Not written: a pooled connection closed under us.
                    // Once, on a new connection.
                    Some(r) if reused && !retried => {
                        tracing::debug!(upstream = %self.origin, "pooled connection was closed; retrying on a new one");
                        lock(&self.h2).take();
                        retried = true;
                        req = r;
                    }
                    _ => return Err(SendError::exchange(e.into_error())),
                },
            }
        }
    }

    /// A ready connection: the HTTP/2 one, the most recently used idle
    /// HTTP/1.1 one, or a new one. `true` when reused.
    async fn checkout(&self) -> Result<(Sender, bool), SendError> {
        if let Some(s) = lock(&self.h2).as_ref().filter(|s| !s.is_closed()) {
            return Ok((Sender::H2(s.clone()), true));
        }
        loop {
            let Some(mut conn) = lock(&self.idle).pop_back() else {
                break;
            };
            if conn.sender.is_closed() || conn.since.elapsed() > POOL_IDLE_TIMEOUT {
                continue;
            }
            // It was put back when its last response body ended; the
            // connection task may not have caught up yet.
            if conn.sender.ready().await.is_ok() {
                return Ok((Sender::H1(conn.sender), true));
            }
        }
        self.connect().await.map(|s| (s, false))
    }

    async fn connect(&self) -> Result<Sender, SendError> {
        let io = self
            .connector
            .clone()
            .call(self.origin.clone())
            .await
            .map_err(SendError::connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(SendError::exchange)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            *lock(&self.h2) = Some(sender.clone());
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(SendError::exchange)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            Ok(Sender::H1(sender))
        }
    }

    fn put_back(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) > POOL_IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() >= POOL_MAX_IDLE_PER_HOST {
            idle.pop_front();
        }
        idle.push_back(IdleConn { sender, since: now });
    }

    /// Idle HTTP/1.1 connections now (for tests and `/status`).
    pub fn idle_connections(&self) -> usize {
        lock(&self.idle).len()
    }
}

struct ReturnTo {
    upstream: Arc<Upstream>,
    sender: http1::SendRequest<RequestBody>,
}

/// Most that is read, after the client went away, of a response nobody will
/// see, to keep its connection: small API answers, not downloads.
const DRAIN_LIMIT: usize = 64 * 1024;
/// How long an abandoned exchange may take to finish in the background.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Finishes an HTTP/1.1 exchange in the background when the request that
/// started it is dropped (its client went away), so the connection goes
/// back to the pool instead of being closed; a load balancer's health checks
/// or a client's timeouts otherwise churn upstream connections.
struct Abandoned<F: Exchange> {
    exchange: Option<Pin<Box<F>>>,
    ret: Option<ReturnTo>,
}

/// The future of an HTTP/1.1 request sent on a pooled connection.
trait Exchange:
    std::future::Future<
        Output = Result<
            Response<Incoming>,
            hyper::client::conn::TrySendError<Request<RequestBody>>,
        >,
    > + Send
    + 'static
{
}

impl<F> Exchange for F where
    F: std::future::Future<
            Output = Result<
                Response<Incoming>,
                hyper::client::conn::TrySendError<Request<RequestBody>>,
            >,
        > + Send
        + 'static
{
}

impl<F: Exchange> Drop for Abandoned<F> {
    fn drop(&mut self) {
        let (Some(exchange), Some(ret)) = (self.exchange.take(), self.ret.take()) else {
            return;
        };
        spawn_drain(
            async move { exchange.await.ok().map(Response::into_body) },
            ret,
        );
    }
}

/// Spawns: wait for the body, read at most [`DRAIN_LIMIT`] of it within
/// [`DRAIN_TIMEOUT`], and return the connection if it ended.
fn spawn_drain<F>(body: F, ret: ReturnTo)
where
    F: std::future::Future<Output = Option<Incoming>> + Send + 'static,
{
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let mut body = body.await?;
            let mut read = 0usize;
            while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
                read += frame.ok()?.data_ref().map_or(0, Bytes::len);
                if read > DRAIN_LIMIT {
                    return None;
                }
            }
            Some(())
        })
        .await;
        if let Ok(Some(())) = drained {
            ret.upstream.put_back(ret.sender);
        }
    });
}

/// An upstream response body; gives its connection back to the pool when
/// it ends. Dropped early, the connection is closed instead (its unread
/// bytes make it unusable).
pub struct UpstreamBody {
    body: Incoming,
    ret: Option<ReturnTo>,
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some(r) = self.ret.take() {
            r.upstream.put_back(r.sender);
        }
    }
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

/// What went wrong talking to an upstream (the `kind` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP connect failed or was refused.
    Connect,
    /// TLS handshake or certificate verification failed.
    Tls,
    /// The request timeout passed.
    Timeout,
    /// The exchange broke after connecting.
    Protocol,
}

impl ErrorKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Protocol => "protocol",
        }
    }

    /// Classifies an error of hyper-util's client.
    pub fn of(err: &hyper_util::client::legacy::Error) -> ErrorKind {
        ErrorKind::scan(err).unwrap_or(if err.is_connect() {
            ErrorKind::Connect
        } else {
            ErrorKind::Protocol
        })
    }

    /// TLS or timeout, if the error's source chain says so.
    fn scan(err: &(dyn StdError + 'static)) -> Option<ErrorKind> {
        let mut source: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = source {
            if e.is::<rustls::Error>() {
                return Some(ErrorKind::Tls);
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                // hyper-rustls wraps tokio-rustls' io::Error (which wraps the
                // rustls::Error) in another io::Error, and io::Error::source
                // skips the error it wraps: look inside by hand.
                let mut inner = io.get_ref();
                while let Some(i) = inner {
                    if i.is::<rustls::Error>() {
                        return Some(ErrorKind::Tls);
                    }
                    inner = i
                        .downcast_ref::<std::io::Error>()
                        .and_then(std::io::Error::get_ref);
                }
                if io.kind() == std::io::ErrorKind::TimedOut {
                    return Some(ErrorKind::Timeout);
                }
            }
            source = e.source();
        }
        None
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Connect => "connection failed",
            ErrorKind::Tls => "TLS handshake failed",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Protocol => "protocol error",
        })
    }
}
