//! Body types that stream without boxing: what the proxy sends upstream
//! ([`RequestBody`]), the idle timer on bodies ([`Idle`], [`Activity`])
//! and the global budget of replay buffers ([`ReplayBudget`]). The body
//! the proxy answers clients with is `proxy::body`'s.
//!
//! A request body of at most [`REPLAY_LIMIT`] is buffered so it can be
//! replayed once after the upstream rejects a token, while the
//! [`ReplayBudget`] allows; other bodies stream with the part read so far
//! sent first. Connections and timeouts before the response head are not
//! this module's business (see `server` and `proxy`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// Largest request body kept for a replay after `reauth_on` (SPEC §4).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// Errors a body passes to hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No bytes moved on a body, in either direction, for `idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("no body bytes moved in either direction for {0:?} (server.idle_timeout)")]
pub struct IdleTimeout(pub Duration);

/// When bytes last moved: on the request body of an exchange (shared with
/// the response body, whose timer counts both directions), or on any body
/// of a connection (its parent, which `server` watches).
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    nanos: AtomicU64,
    parent: Option<Arc<Activity>>,
}

impl Activity {
    /// A clock that says "now".
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            nanos: AtomicU64::new(0),
            parent: None,
        })
    }

    /// A clock that says "now" and also moves `parent` when touched.
    pub fn child(parent: &Arc<Activity>) -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            nanos: AtomicU64::new(0),
            parent: Some(Arc::clone(parent)),
        })
    }

    /// Records that bytes moved now.
    pub fn touch(&self) {
        let n = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_max(n, Ordering::Relaxed);
        if let Some(p) = &self.parent {
            p.touch();
        }
    }

    /// When bytes last moved.
    pub fn last(&self) -> Instant {
        let d = Duration::from_nanos(self.nanos.load(Ordering::Relaxed));
        self.base.checked_add(d).unwrap_or(self.base)
    }
}

/// The idle timer of a response body: fires when neither it nor the request
/// body (through [`Activity`]) moved bytes for `timeout`. The timer is only
/// made once the body first waits.
#[derive(Debug)]
pub struct Idle {
    timeout: Duration,
    last: Instant,
    request: Option<Arc<Activity>>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Idle {
    /// The timeout this timer enforces.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A timer starting now; `request` is the request body's clock when it
    /// is still streaming.
    pub fn new(timeout: Duration, request: Option<Arc<Activity>>) -> Idle {
        Idle {
            timeout,
            last: Instant::now(),
            request,
            sleep: None,
        }
    }

    /// Bytes moved: the body is not idle.
    pub fn moved(&mut self) {
        self.last = Instant::now();
    }

    fn last(&self) -> Instant {
        match &self.request {
            Some(r) => self.last.max(r.last()),
            None => self.last,
        }
    }

    /// Whether the body has been idle for `timeout`; registers a wake-up
    /// otherwise.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let last = self.last();
            // A timeout too large to add never fires.
            let Some(deadline) = last.checked_add(self.timeout) else {
                return false;
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.last() == last {
                return true;
            }
        }
    }
}

/// The bytes all replay buffers may hold at once (`server.replay_buffer_limit`).
#[derive(Debug)]
pub struct ReplayBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ReplayBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<ReplayBudget> {
        Arc::new(ReplayBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes held by buffered bodies now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= self.limit)
            })
            .is_ok()
    }
}

/// Bytes of a [`ReplayBudget`] held by one buffered body; given back when
/// the last copy of the body is dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ReplayBudget>,
    bytes: usize,
}

impl Reservation {
    fn new(budget: &Arc<ReplayBudget>) -> Reservation {
        Reservation {
            budget: Arc::clone(budget),
            bytes: 0,
        }
    }

    /// Takes `n` more bytes; `false` (nothing taken) over the budget.
    fn grow(&mut self, n: usize) -> bool {
        let ok = self.budget.try_take(n);
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The body of a request the proxy sends upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// Fully buffered (small enough to replay), with its share of the
    /// replay budget.
    Buffered(Option<Bytes>, Option<Arc<Reservation>>),
    /// What was read so far, then the rest of the client's body.
    Streaming {
        /// Already read from the client.
        head: Option<Bytes>,
        /// The rest.
        rest: Incoming,
        /// Touched whenever bytes arrive, for the response's idle timer.
        activity: Option<Arc<Activity>>,
    },
}

impl RequestBody {
    /// The client's body as is, streamed; bytes arriving move `conn`, the
    /// connection's clock.
    pub fn streaming(body: Incoming, conn: &Arc<Activity>) -> RequestBody {
        if body.is_end_stream() {
            return RequestBody::Buffered(None, None);
        }
        RequestBody::Streaming {
            head: None,
            rest: body,
            activity: Some(Activity::child(conn)),
        }
    }

    /// Reads the client's body up to [`REPLAY_LIMIT`] while `budget`
    /// allows: buffered if it ended there, else streaming. Known large
    /// bodies, and bodies the budget cannot hold, are not read ahead.
    pub async fn prepare(
        mut body: Incoming,
        budget: &Arc<ReplayBudget>,
        conn: &Arc<Activity>,
    ) -> Result<RequestBody, hyper::Error> {
        if body.is_end_stream() {
            return Ok(RequestBody::Buffered(None, None));
        }
        let mut held = Reservation::new(budget);
        let hint = body.size_hint();
        let known = hint.exact().and_then(|n| usize::try_from(n).ok());
        let too_big = hint.lower() > REPLAY_LIMIT as u64;
        if too_big || known.is_some_and(|n| !held.grow(n)) {
            return Ok(RequestBody::streaming(body, conn));
        }
        let mut buf = BytesMut::new();
        loop {
            let Some(frame) = body.frame().await else {
                return Ok(RequestBody::Buffered(
                    Some(buf.freeze()),
                    Some(Arc::new(held)),
                ));
            };
            // Trailers are dropped: they are hop-by-hop for a proxy that
            // does not announce `TE: trailers` support upstream.
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            let more = (buf.len() + data.len()).saturating_sub(held.bytes);
            buf.extend_from_slice(&data);
            if buf.len() > REPLAY_LIMIT || (more > 0 && !held.grow(more)) {
                return Ok(RequestBody::Streaming {
                    head: Some(buf.freeze()),
                    rest: body,
                    activity: Some(Activity::child(conn)),
                });
            }
        }
    }

    /// A copy for a replay, if the body was buffered.
    pub fn try_clone(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Buffered(b, held) => Some(RequestBody::Buffered(b.clone(), held.clone())),
            RequestBody::Streaming { .. } => None,
        }
    }

    /// The clock the response's idle timer shares, while streaming.
    pub fn activity(&self) -> Option<Arc<Activity>> {
        match self {
            RequestBody::Streaming { activity, .. } => activity.clone(),
            RequestBody::Buffered(..) => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Buffered(b, _) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            RequestBody::Streaming {
                head,
                rest,
                activity,
            } => match head.take() {
                Some(h) => Poll::Ready(Some(Ok(Frame::data(h)))),
                None => {
                    let polled = Pin::new(rest).poll_frame(cx);
                    if let (Poll::Ready(_), Some(a)) = (&polled, activity) {
                        a.touch();
                    }
                    polled
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Buffered(b, _) => b.as_ref().is_none_or(|b| b.is_empty()),
            RequestBody::Streaming { head, rest, .. } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Buffered(b, _) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            RequestBody::Streaming { head, rest, .. } => {
                let h = head.as_ref().map_or(0, |b| b.len() as u64);
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + h);
                if let Some(u) = r.upper() {
                    hint.set_upper(u + h);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls the timer once.
    async fn expired(idle: &mut Idle) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(idle.poll_expired(cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timer_counts_bytes_in_either_direction() {
        let request = Activity::new();
        let mut idle = Idle::new(Duration::from_secs(60), Some(Arc::clone(&request)));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!expired(&mut idle).await);
        // Request bytes at 59 s move the deadline to 119 s.
        request.touch();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!expired(&mut idle).await);
        // Response bytes at 61 s move it to 121 s.
        idle.moved();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!expired(&mut idle).await);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(expired(&mut idle).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_child_clock_moves_its_parent() {
        let conn = Activity::new();
        let exchange = Activity::child(&conn);
        let before = conn.last();
        tokio::time::advance(Duration::from_secs(5)).await;
        exchange.touch();
        assert_eq!(conn.last(), before + Duration::from_secs(5));
    }

    #[test]
    fn replay_budget_is_shared_and_given_back_on_drop() {
        let budget = ReplayBudget::new(100);
        let mut a = Reservation::new(&budget);
        let mut b = Reservation::new(&budget);
        assert!(a.grow(60));
        assert!(!b.grow(60), "over the budget");
        assert!(b.grow(40));
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(b.grow(60));
        drop(b);
        assert_eq!(budget.used(), 0);
        let zero = ReplayBudget::new(0);
        assert!(!Reservation::new(&zero).grow(1));
    }
}
