//! HTTP/1.1 connections of one pool: the idle list, the loan of a
//! connection to one exchange, and the background finish of exchanges whose
//! client left.
//!
//! A connection is driven in the task of the request using it (`conn`), so
//! it is pooled only when its exchange is over both ways: the response body
//! ended, and the request body was sent. One whose upstream answered early
//! (a 401 or 413 while the client is still uploading) is closed instead of
//! being handed to the next request. Checkout and limits live in the parent
//! module.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Response;

use super::capacity::Slot;
use super::conn::{Decoder, Failure, Release, Wire, WireBody, DRAIN_TIMEOUT};
use super::{lock, Head, Io, Upstream};

/// One HTTP/1.1 connection, out of the pool or in it.
pub(super) struct H1Conn {
    pub(super) wire: Wire,
    /// Its place under the pool's connection limit, until it closes.
    slot: Slot,
}

impl H1Conn {
    /// A connection over `io`, holding `slot` until it closes.
    pub(super) fn new(io: Io, slot: Slot) -> H1Conn {
        H1Conn {
            wire: Wire::new(io),
            slot,
        }
    }

    /// Whether it can take another request: its last exchange ended
    /// cleanly both ways and the upstream keeps it open.
    pub(super) fn is_reusable(&self) -> bool {
        self.wire.is_reusable()
    }

    /// Lends the connection to one exchange: its driver, and what gives the
    /// connection back.
    pub(super) fn lend(self, upstream: &Arc<Upstream>) -> (Wire, ReturnTo) {
        let ret = ReturnTo {
            upstream: Arc::clone(upstream),
            slot: self.slot,
        };
        (self.wire, ret)
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
        while let Some(mut c) = idle.pop_back() {
            if c.since.elapsed() <= idle_timeout && c.conn.wire.is_idle_usable() {
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
        idle.retain_mut(|c| c.since.elapsed() <= idle_timeout && c.conn.wire.is_idle_usable());
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

/// A connection on loan to one exchange, to give back when it is over.
pub(super) struct ReturnTo {
    upstream: Arc<Upstream>,
    slot: Slot,
}

impl Release for ReturnTo {
    type DrainGuard = Counted;

    fn release(self, wire: Wire) {
        self.upstream.put_back(H1Conn {
            wire,
            slot: self.slot,
        });
    }

    fn drain_guard(&self) -> Counted {
        Counted::enter(&self.upstream)
    }
}

/// The future of an exchange on a connection lent out.
pub(super) type Exchange = Pin<
    Box<
        dyn std::future::Future<Output = Result<(Response<()>, Decoder, Wire, Head), Failure>>
            + Send,
    >,
>;

/// Finishes an HTTP/1.1 exchange in the background when the request that
/// started it is dropped (its client went away, or the request timed out),
/// so the connection goes back to the pool instead of being closed; a load
/// balancer's health checks or a client's timeouts otherwise churn upstream
/// connections.
pub(super) struct Abandoned {
    pub(super) exchange: Option<Exchange>,
    pub(super) ret: Option<ReturnTo>,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        let (Some(exchange), Some(ret)) = (self.exchange.take(), self.ret.take()) else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let counted = ret.drain_guard();
        handle.spawn(async move {
            let _counted = counted;
            let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
            if let Ok(Ok((_, decoder, wire, _))) = tokio::time::timeout_at(deadline, exchange).await
            {
                WireBody::new(wire, decoder, ret).drain(deadline).await;
            }
        });
    }
}

/// Counts a background drain in its pool for as long as it runs.
pub(super) struct Counted(Arc<Upstream>);

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
