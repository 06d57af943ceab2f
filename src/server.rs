//! The accept loops: connection limit, TLS handshake, HTTP/1.1 and HTTP/2
//! (ALPN on TLS, prior knowledge on plain TCP), header read timeout, and
//! graceful shutdown (stop accepting, let in-flight requests finish, GOAWAY).
//!
//! Serving a request is `proxy`'s job; this module only owns connections.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::proxy::ConnInfo;
use crate::runtime::AppState;

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
    let max = state.runtime.load().config.server.max_connections;
    let limit = Arc::new(Semaphore::new(max));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let runtime = state.runtime.load();
        let tls = runtime.tls.clone();
        let header_read_timeout = runtime.config.server.header_read_timeout;
        drop(runtime);
        let state = Arc::clone(&state);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let deadline = Instant::now() + header_read_timeout;
            let conn = Arc::new(ConnInfo::new(peer, tls.is_some()));
            let service_state = Arc::clone(&state);
            let make = move |seen: Arc<AtomicBool>| {
                service_fn(move |req: Request<Incoming>| {
                    seen.store(true, Ordering::Relaxed);
                    crate::proxy::handle(Arc::clone(&service_state), Arc::clone(&conn), req)
                })
            };
            match tls {
                None => {
                    serve_connection(stream, make, header_read_timeout, deadline, watcher).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout_at(deadline.into(), acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            serve_connection(tls, make, header_read_timeout, deadline, watcher)
                                .await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!(
        connections = graceful.count(),
        "stopped accepting; draining"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period passed with requests still in flight");
    }
}

/// Serves one connection with HTTP/1.1 or HTTP/2. The connection is dropped
/// if no request head arrived by `deadline` (covers idle connections and
/// half-sent HTTP/2 prefaces, which hyper's HTTP/1 header timeout does not).
async fn serve_connection<I, M, S, F>(
    io: I,
    make: M,
    header_read_timeout: Duration,
    deadline: Instant,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    M: FnOnce(Arc<AtomicBool>) -> S,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = std::convert::Infallible,
            Future = F,
        > + Send
        + 'static,
    F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> + Send + 'static,
{
    let seen = Arc::new(AtomicBool::new(false));
    let service = make(Arc::clone(&seen));
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
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    let conn = watcher.watch(conn);
    tokio::pin!(conn);
    let first_request_deadline = async {
        tokio::time::sleep_until(deadline.into()).await;
        if seen.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = &mut conn => if let Err(e) = r {
            tracing::debug!(error = %e, "connection ended with an error");
        },
        _ = first_request_deadline => tracing::debug!("no request head within header_read_timeout; closing"),
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
