//! HTTP/1.1 connections of one pool: the idle list, the request body
//! wrapper that says when an upload is finished, and the background finish
//! of exchanges whose client left.
//!
//! A connection is pooled only when its exchange is over both ways: the
//! response body ended *and* the request body was sent. One whose upstream
//! answered early (a 401 or 413 while the client is still uploading) is not
//! reusable until the upload ends, so it is closed once it does instead of
//! being handed to the next request. Checkout and limits live in the parent
//! module.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, TrySendError};

use super::capacity::Slot;
use super::{lock, Io, Upstream};
use crate::body::RequestBody;

/// One HTTP/1.1 connection, out of the pool or in it.
pub(super) struct H1Conn {
    pub(super) sender: http1::SendRequest<Tracked>,
    /// Set while a request body is still being written on it.
    uploading: Arc<AtomicBool>,
}

impl H1Conn {
    /// Handshakes on `io`; the connection's task holds `slot` until the
    /// connection closes.
    pub(super) async fn handshake(io: Io, slot: Slot) -> Result<H1Conn, hyper::Error> {
        let (sender, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(H1Conn {
            sender,
            uploading: Arc::new(AtomicBool::new(false)),
        })
    }

    /// `req` with its body wrapped to report the end of the upload.
    pub(super) fn track(&self, req: Request<RequestBody>) -> Request<Tracked> {
        req.map(|body| Tracked::new(body, &self.uploading))
    }

    /// Whether it can take another request once the connection task has
    /// caught up: open and not still sending a request body.
    pub(super) fn is_reusable(&self) -> bool {
        !self.sender.is_closed() && !self.uploading.load(Ordering::Acquire)
    }
}

struct IdleConn {
    conn: H1Conn,
    since: Instant,
}

/// Idle HTTP/1.1 connections; most recently used at the back.
#[derive(Default)]
pub(super) struct IdleList {
    conns: Mutex<VecDeque<IdleConn>>,
}

impl IdleList {
    /// The most recently used connection still open and idle for at most
    /// `idle_timeout`; stale ones met on the way are closed.
    pub(super) fn take(&self, idle_timeout: Duration) -> Option<H1Conn> {
        let mut idle = lock(&self.conns);
        while let Some(c) = idle.pop_back() {
            if !c.conn.sender.is_closed() && c.since.elapsed() <= idle_timeout {
                return Some(c.conn);
            }
        }
        None
    }

    /// Pools `conn`, closing the oldest beyond `max_idle`.
    pub(super) fn put(&self, conn: H1Conn, max_idle: usize) {
        let mut idle = lock(&self.conns);
        if idle.len() >= max_idle {
            idle.pop_front();
        }
        idle.push_back(IdleConn {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes connections idle for longer than `idle_timeout` or closed by
    /// the upstream; returns how many.
    pub(super) fn reap(&self, idle_timeout: Duration) -> usize {
        let mut idle = lock(&self.conns);
        let before = idle.len();
        idle.retain(|c| !c.conn.sender.is_closed() && c.since.elapsed() <= idle_timeout);
        before - idle.len()
    }

    /// Closes every idle connection.
    pub(super) fn clear(&self) {
        lock(&self.conns).clear();
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.conns).len()
    }
}

/// A request body that clears its connection's "uploading" flag when it has
/// been sent (or dropped, which is when the connection task is done with it).
pub(super) struct Tracked {
    body: RequestBody,
    uploading: Option<Arc<AtomicBool>>,
}

impl Tracked {
    fn new(body: RequestBody, flag: &Arc<AtomicBool>) -> Tracked {
        let uploading = (!body.is_end_stream()).then(|| Arc::clone(flag));
        flag.store(uploading.is_some(), Ordering::Release);
        Tracked { body, uploading }
    }

    fn finish(&mut self) {
        if let Some(flag) = self.uploading.take() {
            flag.store(false, Ordering::Release);
        }
    }

    /// The body back, for a retry of a request that was never written.
    pub(super) fn into_inner(mut self) -> RequestBody {
        std::mem::replace(&mut self.body, RequestBody::Buffered(None))
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None | Some(Err(_))) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.finish(),
            _ => {}
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

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A connection on loan to one exchange, to give back when it is over.
pub(super) struct ReturnTo {
    pub(super) upstream: Arc<Upstream>,
    pub(super) conn: H1Conn,
}

impl ReturnTo {
    pub(super) fn give_back(self) {
        self.upstream.put_back(self.conn);
    }
}

/// Most that is read, after the client went away, of a response nobody will
/// see, to keep its connection: small API answers, not downloads.
const DRAIN_LIMIT: usize = 64 * 1024;
/// How long an abandoned exchange may take to finish in the background.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The future of an HTTP/1.1 request sent on a pooled connection.
pub(super) trait Exchange:
    std::future::Future<Output = Result<Response<Incoming>, TrySendError<Request<Tracked>>>>
    + Send
    + 'static
{
}

impl<F> Exchange for F where
    F: std::future::Future<Output = Result<Response<Incoming>, TrySendError<Request<Tracked>>>>
        + Send
        + 'static
{
}

/// Finishes an HTTP/1.1 exchange in the background when the request that
/// started it is dropped (its client went away), so the connection goes
/// back to the pool instead of being closed; a load balancer's health checks
/// or a client's timeouts otherwise churn upstream connections.
pub(super) struct Abandoned<F: Exchange> {
    pub(super) exchange: Option<Pin<Box<F>>>,
    pub(super) ret: Option<ReturnTo>,
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
pub(super) fn spawn_drain<F>(body: F, ret: ReturnTo)
where
    F: std::future::Future<Output = Option<Incoming>> + Send + 'static,
{
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let counted = Counted::enter(&ret.upstream);
    handle.spawn(async move {
        let _counted = counted;
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
            ret.give_back();
        }
    });
}

/// Counts a background drain in its pool for as long as it runs.
struct Counted(Arc<Upstream>);

impl Counted {
    fn enter(upstream: &Arc<Upstream>) -> Counted {
        upstream.drains.fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(upstream))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.drains.fetch_sub(1, Ordering::Relaxed);
    }
}
