//! HTTP/2 connections of one pool: a short list of multiplexed connections,
//! each with its count of open streams, the peer's `MAX_CONCURRENT_STREAMS`
//! and the time it last received anything.
//!
//! - **Liveness.** hyper sends a PING after [`PoolTimings::h2_keep_alive_interval`]
//!   without a frame (also while idle) and closes the connection when the
//!   answer does not come within `h2_keep_alive_timeout`; a closed
//!   connection leaves the list at the next checkout.
//! - **Timeouts.** A stream given up before its response head (the request
//!   timed out, or the client left) evicts its connection only when that
//!   connection has been silent for longer than a PING takes on a healthy
//!   one ([`PoolTimings::h2_keep_alive_interval`] + [`PING_ANSWER_GRACE`]):
//!   a slow stream on a connection that answers PINGs is the upstream's
//!   slowness, and closing it would fail every other stream on it.
//!   Eviction only stops new streams; the ones in flight finish.
//! - **Capacity.** A stream is placed on the first connection below the
//!   peer's limit; the parent opens another connection when all are full.
//! - **Refused streams** (RST_STREAM `REFUSED_STREAM`, or above a GOAWAY's
//!   last stream id) were not processed by the upstream ([`is_refused`]):
//!   the parent sends them once more, and their connection takes no new
//!   streams (a server refuses when it is going away or overloaded).
//!
//! Checkout order and connection limits live in the parent module.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::capacity::{Capacity, Slot};
use super::{lock, ErrorKind, Io, PoolTimings, SendError};
use crate::net::body::RequestBody;

/// Beyond the keep-alive interval, how long a healthy connection takes to
/// answer a PING: a second is hundreds of round trips even across regions,
/// so silence past it means the PING went unanswered.
pub const PING_ANSWER_GRACE: Duration = Duration::from_secs(1);
/// Streams assumed before the peer's SETTINGS arrive on the first
/// connection to an origin (hyper's own default, the RFC's recommended
/// minimum); later connections start from what the origin announced.
const INITIAL_MAX_STREAMS: usize = 100;

/// What the connection task and the I/O record for the pool to read.
struct Stats {
    /// When the connection was made; times below are nanoseconds after it.
    born: Instant,
    /// Last time bytes (frames, PING answers) came in.
    last_read: AtomicU64,
    /// Last time the connection had no stream open.
    last_idle: AtomicU64,
    /// The peer's current `MAX_CONCURRENT_STREAMS`.
    max_streams: AtomicUsize,
}

impl Stats {
    fn now(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn since(&self, stamp: &AtomicU64) -> Duration {
        let then = Duration::from_nanos(stamp.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(then)
    }
}

/// One multiplexed connection.
pub(super) struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    stats: Arc<Stats>,
    /// Streams checked out on it (may exceed the peer's limit at the pool's
    /// connection limit; hyper then queues them).
    active: AtomicUsize,
    evicted: AtomicBool,
    /// Silence past this means a PING went unanswered.
    silence_limit: Duration,
}

impl H2Conn {
    /// Handshakes on `io` with PING keep-alive; the connection's task holds
    /// `slot` until the connection closes. `max_streams` is assumed until
    /// the peer's SETTINGS say otherwise.
    pub(super) async fn handshake(
        io: Io,
        slot: Slot,
        timings: &PoolTimings,
        max_streams: usize,
    ) -> Result<H2Conn, hyper::Error> {
        let stats = Arc::new(Stats {
            born: Instant::now(),
            last_read: AtomicU64::new(0),
            last_idle: AtomicU64::new(0),
            max_streams: AtomicUsize::new(max_streams),
        });
        let io = Watched {
            io,
            stats: Arc::clone(&stats),
        };
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_max_send_streams(max_streams)
            .keep_alive_interval(timings.h2_keep_alive_interval)
            .keep_alive_timeout(timings.h2_keep_alive_timeout)
            .keep_alive_while_idle(true)
            .handshake(io)
            .await?;
        let task_stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let _slot = slot;
            let mut conn = Box::pin(conn);
            let ended = poll_fn(|cx| {
                let polled = conn.as_mut().poll(cx);
                // SETTINGS are read by this task: publish what they allow.
                let max = conn.current_max_send_streams();
                task_stats.max_streams.store(max, Ordering::Relaxed);
                polled
            })
            .await;
            if let Err(e) = ended {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(H2Conn {
            sender,
            stats,
            active: AtomicUsize::new(0),
            evicted: AtomicBool::new(false),
            silence_limit: timings
                .h2_keep_alive_interval
                .saturating_add(PING_ANSWER_GRACE),
        })
    }

    fn max_streams(&self) -> usize {
        self.stats.max_streams.load(Ordering::Relaxed).max(1)
    }

    fn is_usable(&self) -> bool {
        !self.sender.is_closed() && !self.evicted.load(Ordering::Relaxed)
    }

    fn has_room(&self) -> bool {
        self.active.load(Ordering::Relaxed) < self.max_streams()
    }
}

/// The pool's HTTP/2 connections and whether one is being made.
#[derive(Default)]
pub(super) struct H2List {
    state: Mutex<H2State>,
}

#[derive(Default)]
struct H2State {
    conns: Vec<Arc<H2Conn>>,
    /// A connect is under way; others wait for it (single flight).
    connecting: bool,
    /// Counts finished connects, so a waiter can tell whether the one it
    /// waited for failed.
    epoch: u64,
    /// The last connect's failure and its epoch; cleared by a success.
    failure: Option<(u64, ErrorKind, Arc<dyn std::error::Error + Send + Sync>)>,
    /// The origin's last announced `MAX_CONCURRENT_STREAMS`.
    learned_max: Option<usize>,
}

/// What [`H2List::pick`] found.
pub(super) enum Pick {
    /// A stream on a connection with room.
    Stream(Stream),
    /// Nothing has room but a connection is being made: wait for it (the
    /// connect epoch to pass to [`H2List::failure_since`] after the wait).
    Wait(u64),
    /// Nothing has room and nothing is being made.
    Full,
}

impl H2List {
    /// A stream on the first usable connection with room.
    pub(super) fn pick(&self, cap: &Arc<Capacity>) -> Pick {
        let mut st = lock(&self.state);
        st.conns.retain(|c| c.is_usable());
        if let Some(c) = st.conns.last() {
            st.learned_max = Some(c.max_streams());
        }
        match st.conns.iter().find(|c| c.has_room()) {
            Some(c) => Pick::Stream(Stream::open(c, cap)),
            None if st.connecting => Pick::Wait(st.epoch),
            None => Pick::Full,
        }
    }

    /// A stream on the least loaded usable connection, room or not (the
    /// pool is at its connection limit; hyper queues what the peer's limit
    /// does not allow yet).
    pub(super) fn least_loaded(&self, cap: &Arc<Capacity>) -> Option<Stream> {
        let st = lock(&self.state);
        st.conns
            .iter()
            .filter(|c| c.is_usable())
            .min_by_key(|c| c.active.load(Ordering::Relaxed))
            .map(|c| Stream::open(c, cap))
    }

    /// Marks a connect as under way, unless one already is. The mark is
    /// cleared, and waiters woken, when the returned guard drops.
    pub(super) fn begin_connect<'a>(&'a self, cap: &'a Capacity) -> Option<Connecting<'a>> {
        let mut st = lock(&self.state);
        if st.connecting {
            return None;
        }
        st.connecting = true;
        Some(Connecting { list: self, cap })
    }

    /// The error of a connect that failed after `epoch`, for its waiters.
    pub(super) fn failure_since(&self, epoch: u64) -> Option<SendError> {
        let st = lock(&self.state);
        let (at, kind, source) = st.failure.as_ref()?;
        (*at > epoch).then(|| SendError {
            kind: *kind,
            client_body: false,
            source: Box::new(Arc::clone(source)),
        })
    }

    /// Streams to assume on a new connection before its SETTINGS arrive.
    pub(super) fn expected_max_streams(&self) -> usize {
        lock(&self.state).learned_max.unwrap_or(INITIAL_MAX_STREAMS)
    }

    /// Adds a new connection and opens a stream on it.
    pub(super) fn add(&self, conn: H2Conn, cap: &Arc<Capacity>) -> Stream {
        let conn = Arc::new(conn);
        let stream = Stream::open(&conn, cap);
        lock(&self.state).conns.push(conn);
        stream
    }

    /// Drops connections closed by the upstream, and those with no stream
    /// for longer than `idle_timeout`; returns how many.
    pub(super) fn reap(&self, idle_timeout: Duration) -> usize {
        let mut st = lock(&self.state);
        let before = st.conns.len();
        st.conns.retain(|c| {
            c.is_usable()
                && (c.active.load(Ordering::Relaxed) > 0
                    || c.stats.since(&c.stats.last_idle) <= idle_timeout)
        });
        before - st.conns.len()
    }

    /// Drops every connection (streams in flight finish).
    pub(super) fn clear(&self) {
        lock(&self.state).conns.clear();
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.state).conns.len()
    }
}

/// A connect in progress for [`H2List`]; see [`H2List::begin_connect`].
/// Dropped without an outcome (its request was cancelled), a waiter takes
/// over the connecting.
pub(super) struct Connecting<'a> {
    list: &'a H2List,
    cap: &'a Capacity,
}

impl Connecting<'_> {
    /// The connection is in the list (HTTP/2) or turned out HTTP/1.1.
    pub(super) fn succeed(self) {
        lock(&self.list.state).failure = None;
    }

    /// The connect failed: its waiters fail with the same error.
    pub(super) fn fail(self, kind: ErrorKind, error: Arc<dyn std::error::Error + Send + Sync>) {
        let mut st = lock(&self.list.state);
        st.failure = Some((st.epoch.saturating_add(1), kind, error));
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.list.state);
            st.connecting = false;
            st.epoch = st.epoch.saturating_add(1);
        }
        self.cap.changed.notify_waiters();
    }
}

/// One stream checked out on a connection; gives its place back when
/// dropped, and judges the connection if dropped before an answer.
pub(super) struct Stream {
    conn: Arc<H2Conn>,
    cap: Arc<Capacity>,
    settled: bool,
}

impl Stream {
    fn open(conn: &Arc<H2Conn>, cap: &Arc<Capacity>) -> Stream {
        conn.active.fetch_add(1, Ordering::Relaxed);
        Stream {
            conn: Arc::clone(conn),
            cap: Arc::clone(cap),
            settled: false,
        }
    }

    /// A handle to send the request with.
    pub(super) fn sender(&self) -> http2::SendRequest<RequestBody> {
        self.conn.sender.clone()
    }

    /// The exchange got an answer (a response head or an error): dropping
    /// the stream later says nothing about the connection's health.
    pub(super) fn settle(&mut self) {
        self.settled = true;
    }

    /// No new streams on this connection.
    pub(super) fn evict(&self) {
        self.conn.evicted.store(true, Ordering::Relaxed);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let c = &self.conn;
        if !self.settled && c.stats.since(&c.stats.last_read) > c.silence_limit {
            tracing::debug!("upstream HTTP/2 connection silent past a PING; evicted");
            self.evict();
        }
        let before = c.active.fetch_sub(1, Ordering::Relaxed);
        if before == 1 {
            c.stats.last_idle.store(c.stats.now(), Ordering::Relaxed);
        }
        if before >= c.max_streams() {
            // It was full: a waiter may use it now.
            self.cap.changed.notify_waiters();
        }
    }
}

/// Whether an error says the upstream did not process the stream, so it is
/// safe to send again (RFC 9113 §8.7): reset with `REFUSED_STREAM`, or above
/// the last stream id of a GOAWAY (h2 reports those as remote GOAWAY errors
/// on the stream; streams at or below it end normally or by I/O error).
pub(super) fn is_refused(err: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2e) = e.downcast_ref::<h2::Error>() {
            return h2e.is_remote()
                && (h2e.is_go_away() || h2e.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        source = e.source();
    }
    false
}

/// The connection's I/O, stamping [`Stats::last_read`] on every read that
/// returns (data, or end of stream).
struct Watched {
    io: Io,
    stats: Arc<Stats>,
}

impl Read for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.stats
                .last_read
                .store(this.stats.now(), Ordering::Relaxed);
        }
        polled
    }
}

impl Write for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
