//! The accept loops: connection limit, TLS handshake, HTTP/1.1 and HTTP/2
//! (ALPN on TLS, prior knowledge on plain TCP), header read timeout, idle
//! connections closed after `idle_timeout` (HTTP/2 with GOAWAY), and
//! graceful shutdown (stop accepting, let in-flight requests finish, GOAWAY).
//!
//! Serving a request is `proxy`'s job; this module only owns connections.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::net::body::{Activity, BoxError};
use crate::proxy::body::ProxyBody;
use crate::proxy::generation::AppState;
use crate::proxy::ConnInfo;

/// hyper's HTTP/1 read buffer ceiling: also the longest request head
/// accepted (a huge header line is refused with 431, not buffered forever).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most headers in one HTTP/1 request.
const MAX_HEADERS: usize = 100;
/// HTTP/2 header list ceiling, same as HTTP/1's head limit.
const MAX_H2_HEADER_LIST: u32 = 64 * 1024;
/// HTTP/2 streams per connection.
const MAX_H2_STREAMS: u32 = 256;
/// HTTP/2 pings find dead peers that never close.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the proxy listener until `shutdown` is cancelled, then waits up to
/// `grace` for open connections to finish their requests.
pub async fn serve_proxy(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let max = state.generation.load().config.server.max_connections;
    let limit = Arc::new(Semaphore::new(max));
    while let Some((permit, stream, peer)) = accept(&listener, &limit, &shutdown).await {
        let generation = state.generation.load();
        let tls = generation.tls.clone();
        let limits = Limits {
            header_read_timeout: generation.config.server.header_read_timeout,
            idle_timeout: generation.config.server.idle_timeout,
        };
        drop(generation);
        tokio::spawn(serve_accepted(
            stream,
            peer,
            tls,
            Arc::clone(&state),
            limits,
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    let open = max - limit.available_permits();
    tracing::info!(connections = open, "stopped accepting; draining");
    // Every connection holds a permit until it ends: all permits back means
    // all connections are done.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, limit.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period passed with requests still in flight");
    }
}

/// The next connection on `listener` with its slot of `limit`, waiting for a
/// free slot first; `None` once `shutdown` is cancelled. Accept errors
/// (EMFILE and friends) are logged and retried after a short pause rather
/// than spun on.
async fn accept(
    listener: &TcpListener,
    limit: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = tokio::select! {
        p = Arc::clone(limit).acquire_owned() => p.ok()?,
        _ = shutdown.cancelled() => return None,
    };
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => return Some((permit, stream, peer)),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// One accepted connection: TLS handshake (within `header_read_timeout`),
/// then HTTP until it ends; `permit` is its connection slot.
async fn serve_accepted(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<AppState>,
    limits: Limits,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let _permit = permit;
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now()
        .checked_add(limits.header_read_timeout)
        .unwrap_or_else(far_future);
    let conn = Arc::new(ConnInfo::new(peer, tls.is_some()));
    let counters = Arc::new(Counters::new());
    let watch = ConnWatch {
        limits,
        counters: Arc::clone(&counters),
        activity: Arc::clone(&conn.activity),
        shutdown,
    };
    let service = service_fn(move |req: Request<Incoming>| {
        if req.version() == hyper::Version::HTTP_2 && !counters.http2.load(Ordering::Relaxed) {
            counters.http2.store(true, Ordering::Relaxed);
        }
        let open = Counted::enter(&counters, Counter::Open);
        let bodies = Arc::clone(&counters);
        let activity = Arc::clone(&conn.activity);
        let (state, conn) = (Arc::clone(&state), Arc::clone(&conn));
        // The handler's future is made where it is awaited: made outside
        // and moved in, its bytes would be copied once more per request.
        async move {
            let resp = crate::proxy::handle(state, conn, req).await?;
            activity.touch();
            let sending = Counted::enter(&bodies, Counter::Bodies);
            Ok::<_, Infallible>(resp.map(|body| ServedBody {
                body,
                activity,
                _sending: sending,
                _open: open,
            }))
        }
    });
    match tls {
        None => serve_connection(stream, service, watch).await,
        Some(acceptor) => {
            match tokio::time::timeout_at(deadline.into(), acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_connection(tls, service, watch).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

/// An instant no timer reaches (for durations too large to add).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

/// Per-connection time limits, read from the config when it is accepted.
#[derive(Clone, Copy)]
struct Limits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

/// What ends a connection besides its peer: a request head overdue
/// (`header_read_timeout`), no open request for `idle_timeout`, response
/// bodies on which nothing moved for `idle_timeout`, or shutdown.
struct ConnWatch {
    limits: Limits,
    /// Requests open and response bodies being sent.
    counters: Arc<Counters>,
    /// When bytes last moved on a body of this connection, either way.
    activity: Arc<Activity>,
    shutdown: CancellationToken,
}

/// A connection's counters. Updated on every request without waking the
/// watchdog: its timers re-arm themselves lazily from these values (a timer
/// reset and a task wake-up per request cost more than the request's own
/// header rewrite).
struct Counters {
    /// Requests open (from their head to the end of their response body).
    open: AtomicUsize,
    /// Response bodies being sent.
    bodies: AtomicUsize,
    /// A request came on HTTP/2 (which ends the head deadline).
    http2: AtomicBool,
    /// When the last open request ended.
    idle_since: Arc<Activity>,
}

#[derive(Clone, Copy)]
enum Counter {
    Open,
    Bodies,
}

impl Counters {
    fn new() -> Counters {
        Counters {
            open: AtomicUsize::new(0),
            bodies: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            idle_since: Activity::new(),
        }
    }

    fn get(&self, which: Counter) -> &AtomicUsize {
        match which {
            Counter::Open => &self.open,
            Counter::Bodies => &self.bodies,
        }
    }
}

/// Counts itself in one of a connection's counters while it lives: a
/// request open (the connection is idle while none is), or a response body
/// being sent.
struct Counted(Arc<Counters>, Counter);

impl Counted {
    fn enter(counters: &Arc<Counters>, which: Counter) -> Counted {
        counters.get(which).fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(counters), which)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let before = self.0.get(self.1).fetch_sub(1, Ordering::Relaxed);
        if let (Counter::Open, 1) = (self.1, before) {
            self.0.idle_since.touch();
        }
    }
}

/// A response body that keeps its request counted as open, and moves the
/// connection's activity clock as it is sent.
struct ServedBody {
    body: ProxyBody,
    activity: Arc<Activity>,
    _sending: Counted,
    _open: Counted,
}

impl Body for ServedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_ready() {
            this.activity.touch();
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

/// Resolves once no request has been open on the connection for `timeout`.
async fn idle_for(counters: Arc<Counters>, timeout: Duration) {
    quiet_for(counters, timeout, |_| true).await;
}

/// Resolves once a request head is overdue: no request open and none begun
/// for `timeout` since the connection opened or its last request ended
/// (the next head, on HTTP/1.1, must arrive whole within `timeout`; on
/// HTTP/2, only the first). One timer per connection, re-armed lazily, in
/// place of hyper's HTTP/1 header timer, which is a boxed timer made and
/// dropped for every request.
async fn head_overdue(counters: Arc<Counters>, timeout: Duration) {
    quiet_for(counters, timeout, |c| !c.http2.load(Ordering::Relaxed)).await;
}

/// Resolves once no request has been open for `timeout` (since the last
/// one ended, or the connection opened) while `counts` says the quiet
/// counts. The timer is re-armed lazily from the counters: a request costs
/// it nothing.
async fn quiet_for(counters: Arc<Counters>, timeout: Duration, counts: impl Fn(&Counters) -> bool) {
    let Some(mut at) = tokio::time::Instant::now().checked_add(timeout) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep_until(at).await;
        let now = tokio::time::Instant::now();
        let quiet = counters.open.load(Ordering::Relaxed) == 0 && counts(&counters);
        let next = if quiet {
            match counters.idle_since.last().checked_add(timeout) {
                Some(t) if t <= now => return,
                t => t,
            }
        } else {
            now.checked_add(timeout)
        };
        match next {
            Some(t) => at = t,
            None => return std::future::pending().await,
        }
    }
}

/// Resolves once response bodies are being sent and no bytes moved on any
/// body of the connection for `timeout`: the upstream went silent, or the
/// client stopped reading (then hyper stops polling the body, so the body's
/// own timer cannot fire).
async fn stalled_for(counters: Arc<Counters>, activity: Arc<Activity>, timeout: Duration) {
    let Some(mut at) = tokio::time::Instant::now().checked_add(timeout) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep_until(at).await;
        let now = tokio::time::Instant::now();
        let next = if counters.bodies.load(Ordering::Relaxed) > 0 {
            match activity.last().checked_add(timeout) {
                Some(t) if t <= now => return,
                t => t,
            }
        } else {
            now.checked_add(timeout)
        };
        match next {
            Some(t) => at = t,
            None => return std::future::pending().await,
        }
    }
}

/// hyper's settings for a client connection: HTTP/1.1 head limits and
/// header read timeout (`None` on the proxy listener, whose timeout is
/// [`head_overdue`]'s); HTTP/2 header list and stream limits, keep-alive
/// pings.
fn connection_builder(header_read_timeout: Option<Duration>) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_H2_HEADER_LIST)
        .max_concurrent_streams(MAX_H2_STREAMS)
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    builder
}

/// Serves one connection with HTTP/1.1 or HTTP/2 until the peer closes it,
/// or closes it: dropped when a request head is overdue (no whole head
/// within `header_read_timeout` of the connection opening or, on HTTP/1.1,
/// of the last response; this also covers half-sent HTTP/2 prefaces); shut
/// down gracefully (HTTP/2 GOAWAY) when idle for `idle_timeout` or at
/// shutdown.
async fn serve_connection<I, S, F>(io: I, service: S, watch: ConnWatch)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ServedBody>,
            Error = Infallible,
            Future = F,
        > + Send
        + 'static,
    F: Future<Output = Result<Response<ServedBody>, Infallible>> + Send + 'static,
{
    let conn = connection_builder(None)
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    watch_connection(conn, watch).await;
}

/// Drives `conn` to its end, or ends it as [`serve_connection`] says.
///
/// The watchdog's timers and the shutdown signal are polled only when one
/// of them woke the task, not at every wake-up of the connection (a
/// request wakes it several times; polling three timers and a cancellation
/// each time cost about 1,000 instructions per request).
async fn watch_connection<C>(conn: C, watch: ConnWatch)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    let graceful = Arc::new(AtomicBool::new(false));
    let dog = watchdog(watch, Arc::clone(&graceful));
    tokio::pin!(dog);
    let alarm = Arc::new(Alarm {
        rung: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let dog_waker = Waker::from(Arc::clone(&alarm));
    let ended = std::future::poll_fn(|cx| loop {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(Ok(r));
        }
        if !alarm.rung.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        alarm.rung.store(false, Ordering::Release);
        alarm.task.register(cx.waker());
        if let Poll::Ready(reason) = dog.as_mut().poll(&mut Context::from_waker(&dog_waker)) {
            return Poll::Ready(Err(reason));
        }
        if !graceful.swap(false, Ordering::Relaxed) {
            return Poll::Pending;
        }
        // Polled again at once, so that the shutdown takes effect.
        conn.as_mut().graceful_shutdown();
    })
    .await;
    match ended {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
        Err(reason) => tracing::debug!("{reason}; closing the connection"),
    }
}

/// Wakes the connection's task for its watchdog, and says it did.
struct Alarm {
    rung: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rung.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// A connection's time limits and shutdown: resolves with the reason to
/// drop the connection; sets `graceful` (and goes on watching the rest)
/// when it should be shut down gracefully instead.
async fn watchdog(watch: ConnWatch, graceful: Arc<AtomicBool>) -> &'static str {
    let head = head_overdue(
        Arc::clone(&watch.counters),
        watch.limits.header_read_timeout,
    );
    tokio::pin!(head);
    let idle = idle_for(Arc::clone(&watch.counters), watch.limits.idle_timeout);
    tokio::pin!(idle);
    let stalled = stalled_for(watch.counters, watch.activity, watch.limits.idle_timeout);
    tokio::pin!(stalled);
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            _ = &mut head => return "no request head within header_read_timeout",
            // Responses are incomplete: close rather than drain.
            _ = &mut stalled => return "no body bytes moved for idle_timeout",
            _ = &mut idle, if !closing => {
                tracing::debug!("connection idle for idle_timeout; shutting it down");
                closing = true;
                graceful.store(true, Ordering::Relaxed);
            }
            _ = watch.shutdown.cancelled(), if !closing => {
                closing = true;
                graceful.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Serves the admin listener (HTTP/1.1) until `shutdown` is cancelled.
pub async fn serve_admin(listener: TcpListener, state: Arc<AppState>, shutdown: CancellationToken) {
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| crate::admin::handle(Arc::clone(&state), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = &mut conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// Binds a listener, naming the address on failure.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}"))
    })?;
    socket.listen(1024)
}

/// Connections the connect listener serves at once (browsers; more wait).
const CONNECT_MAX_CONNECTIONS: usize = 1024;
/// A browser has this long for its TLS handshake and each request head.
const CONNECT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A browser connection is closed after this long, busy or not (a page
/// view is a few requests; nothing here streams).
const CONNECT_CONN_LIFETIME: Duration = Duration::from_secs(600);
/// At shutdown, open browser connections get this long to finish.
const CONNECT_DRAIN: Duration = Duration::from_secs(5);

/// Serves the `[connect]` listener (HTTP/1.1, and HTTP/2 by ALPN on TLS)
/// until `shutdown` is cancelled: only `crate::connect`'s pages.
pub async fn serve_connect(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(CONNECT_MAX_CONNECTIONS));
    while let Some((permit, stream, _peer)) = accept(&listener, &limit, &shutdown).await {
        let (state, shutdown, tls) = (Arc::clone(&state), shutdown.clone(), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(CONNECT_HEAD_TIMEOUT, acceptor.accept(stream));
                    if let Ok(Ok(stream)) = handshake.await {
                        serve_connect_conn(stream, state, shutdown).await;
                    }
                }
                None => serve_connect_conn(stream, state, shutdown).await,
            }
        });
    }
}

/// One browser connection on the connect listener.
async fn serve_connect_conn<I>(io: I, state: Arc<AppState>, shutdown: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| crate::connect::handle(Arc::clone(&state), req));
    let builder = connection_builder(Some(CONNECT_HEAD_TIMEOUT));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = &mut conn => {}
        _ = tokio::time::sleep(CONNECT_CONN_LIFETIME) => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CONNECT_DRAIN, conn).await;
        }
    }
}
