//! One HTTP/1.1 connection to an upstream, driven in the task of the
//! request that uses it: no connection task, no channel between the two.
//! The request head and body are written and the response head read in one
//! future ([`Wire::exchange`]); the response body is read by whoever polls
//! [`WireBody`] (the inbound connection's task, as it writes to the
//! client). One read buffer per connection, kept across requests.
//!
//! The format is in `wire`; which connection to use and when it goes back
//! to the pool is the parent module's business.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Response};
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};

pub(crate) use super::wire::Decoder;
use super::wire::{self, Decoded, Parsed, WireError};
use super::{Head, Io, Rewrite};
use crate::net::body::RequestBody;

/// Read buffer kept per connection: a typical API response in one read.
const READ_BUF: usize = 8 * 1024;
/// Body bytes written together with the head in one write.
const INLINE_BODY: usize = 16 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// Reading or writing the connection failed.
    #[error("upstream connection: {0}")]
    Io(#[source] io::Error),
    /// The upstream's response was malformed.
    #[error("upstream response: {0}")]
    Wire(#[source] WireError),
    /// The client's request body failed while it was being forwarded.
    #[error("client request body: {0}")]
    ClientBody(#[source] hyper::Error),
    /// The request's deadline (`request_timeout`) passed first.
    #[error("no response head before the request timeout")]
    Timeout,
}

/// A failed exchange, with the request back when it may be sent again.
pub(crate) struct Failure {
    pub(crate) error: ExchangeError,
    /// The request, when the upstream cannot have processed it.
    pub(crate) retry: Option<(Head, RequestBody)>,
}

/// An HTTP/1.1 connection between exchanges.
pub(crate) struct Wire {
    /// Boxed: a TLS stream is large, and a connection moves in and out of
    /// the pool and the exchange on every request.
    io: Box<TokioIo<Io>>,
    read: BytesMut,
    write: BytesMut,
    /// Scratch space for parsing response heads.
    spans: Vec<wire::Span>,
    /// It can carry another request once the current response has ended.
    reusable: bool,
    /// The exchanges' time limit: one timer per connection, armed at the
    /// first exchange's deadline and re-armed lazily when it fires during a
    /// later one (a tokio timer made, polled and dropped per request cost
    /// about 550 instructions). It may wake a task that no longer uses the
    /// connection, once per `request_timeout`: a spurious poll.
    timer: Option<Pin<Box<Sleep>>>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("reusable", &self.reusable)
            .finish_non_exhaustive()
    }
}

/// How far an exchange got before it failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Nothing written.
    Nothing,
    /// The request (or part of it) written, no response byte read.
    Written,
    /// Response bytes read.
    Answered,
}

impl Wire {
    /// A connection over `io`, fresh from the connector.
    pub(crate) fn new(io: Io) -> Wire {
        Wire {
            io: Box::new(TokioIo::new(io)),
            read: BytesMut::with_capacity(READ_BUF),
            write: BytesMut::new(),
            spans: Vec::new(),
            reusable: true,
            timer: None,
        }
    }

    /// Whether an idle connection can take a request: nothing arrived on it
    /// since its last response (the upstream's close, or stray bytes, make
    /// it unusable). Costs no syscall when the socket has not been woken.
    pub(crate) fn is_idle_usable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Ready means EOF, an error, or bytes nobody asked for.
        self.poll_fill(&mut cx).is_pending()
    }

    /// Sends a request (its URI's path and query in origin form, its
    /// headers rewritten by `rw` as they are written) and reads the final
    /// response head; the response body is read through a [`WireBody`] made
    /// of the returned decoder and connection. The request's head comes back
    /// too (it is written and no longer needed), for a replay without a
    /// copy. The head is written into the buffer before the future is made,
    /// so the future does not borrow `rw`. No response head by `deadline`
    /// is [`ExchangeError::Timeout`].
    pub(crate) fn exchange(
        mut self,
        head: Head,
        body: RequestBody,
        rw: &Rewrite<'_>,
        reused: bool,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Result<(Response<()>, Decoder, Wire, Head), Failure>>
           + Send
           + 'static {
        let length = body.size_hint().exact();
        self.write.clear();
        wire::encode_request(&mut self.write, &head, rw, length);
        self.exchange_written(head, body, length, reused, deadline)
    }

    /// [`Wire::exchange`] once the head is in the write buffer.
    async fn exchange_written(
        mut self,
        parts: Head,
        mut body: RequestBody,
        length: Option<u64>,
        reused: bool,
        deadline: Instant,
    ) -> Result<(Response<()>, Decoder, Wire, Head), Failure> {
        let chunked = length.is_none();
        // A small buffered body goes out with the head, in one write.
        let mut upload = match &body {
            RequestBody::Buffered(Some(b), _) if b.len() <= INLINE_BODY => {
                self.write.extend_from_slice(b);
                Upload::Done
            }
            RequestBody::Buffered(None, _) => Upload::Done,
            _ => Upload::Body { chunked },
        };
        let mut progress = Progress::Nothing;
        let result = poll_fn(|cx| {
            let polled =
                self.poll_exchange(cx, &parts.method, &mut body, &mut upload, &mut progress);
            if polled.is_pending() && self.poll_deadline(cx, deadline).is_ready() {
                return Poll::Ready(Err(ExchangeError::Timeout));
            }
            polled
        })
        .await;
        match result {
            Ok((head, decoder)) => {
                // An upload the upstream answered before it ended is cut
                // short; the connection cannot carry another request.
                let keep = head.keep_alive && matches!(upload, Upload::Done);
                let mut resp = Response::new(());
                *resp.status_mut() = head.status;
                *resp.version_mut() = head.version;
                *resp.headers_mut() = head.headers;
                self.reusable = keep;
                Ok((resp, decoder, self, parts))
            }
            Err(error) => {
                // Not processed for sure when nothing was written; when the
                // request went out on a reused connection and it closed with
                // no answer, the upstream closed it idle as we wrote (what
                // nginx retries too), for requests that may be repeated.
                let replayable = body.try_clone().is_some() || body.is_end_stream();
                let retry = replayable
                    && !matches!(error, ExchangeError::ClientBody(_) | ExchangeError::Timeout)
                    && (progress == Progress::Nothing
                        || (reused && progress == Progress::Written && idempotent(&parts.method)));
                Err(Failure {
                    error,
                    retry: retry.then_some((parts, body)),
                })
            }
        }
    }

    /// Ready once `deadline` has passed, else the connection's timer is
    /// armed at or before it (see [`Wire::timer`]).
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // It fired: at this deadline, or at an earlier exchange's.
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
    }

    /// Writes what is pending, moves the upload on, and reads until a final
    /// response head is in.
    fn poll_exchange(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
        body: &mut RequestBody,
        upload: &mut Upload,
        progress: &mut Progress,
    ) -> Poll<Result<(wire::Head, Decoder), ExchangeError>> {
        loop {
            let wrote = self.poll_upload(cx, body, upload, progress)?;
            match self.poll_head(cx, method, progress)? {
                Poll::Ready(head) => {
                    let decoder = Decoder::new(head.framing);
                    return Poll::Ready(Ok((head, decoder)));
                }
                Poll::Pending if wrote => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Flushes the write buffer and refills it from the request body.
    /// `true` when it made progress that may allow more.
    fn poll_upload(
        &mut self,
        cx: &mut Context<'_>,
        body: &mut RequestBody,
        upload: &mut Upload,
        progress: &mut Progress,
    ) -> Result<bool, ExchangeError> {
        let mut moved = false;
        loop {
            while !self.write.is_empty() {
                match Pin::new(&mut *self.io).poll_write(cx, &self.write) {
                    Poll::Ready(Ok(0)) => {
                        return Err(ExchangeError::Io(io::ErrorKind::WriteZero.into()))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.write.advance(n);
                        *progress = (*progress).max_written();
                        moved = true;
                    }
                    Poll::Ready(Err(e)) => return Err(ExchangeError::Io(e)),
                    Poll::Pending => return Ok(moved),
                }
            }
            let Upload::Body { chunked } = *upload else {
                return Ok(moved);
            };
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => return Ok(moved),
                Poll::Ready(Some(Err(e))) => return Err(ExchangeError::ClientBody(e)),
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not forwarded (no `TE: trailers` upstream).
                    if let Ok(data) = frame.into_data() {
                        if chunked && !data.is_empty() {
                            wire::encode_chunk(&mut self.write, &data);
                        } else {
                            self.write.extend_from_slice(&data);
                        }
                    }
                }
                Poll::Ready(None) => {
                    if chunked {
                        self.write.extend_from_slice(wire::LAST_CHUNK);
                    }
                    *upload = Upload::Done;
                }
            }
            moved = true;
        }
    }

    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
        progress: &mut Progress,
    ) -> Poll<Result<wire::Head, ExchangeError>> {
        loop {
            while !self.read.is_empty() {
                *progress = Progress::Answered;
                match wire::parse_head(&mut self.read, method, &mut self.spans)
                    .map_err(ExchangeError::Wire)?
                {
                    Parsed::Final(head) => return Poll::Ready(Ok(head)),
                    Parsed::Interim => continue,
                    Parsed::Partial => break,
                }
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(if self.read.is_empty() {
                        ExchangeError::Io(io::ErrorKind::UnexpectedEof.into())
                    } else {
                        ExchangeError::Wire(WireError::Incomplete)
                    }))
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ExchangeError::Io(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Reads more into the read buffer; `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_BUF / 4 {
            self.read.reserve(READ_BUF);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut *self.io), cx, &mut self.read)
    }

    /// Whether the connection can be pooled now that its response ended:
    /// the upstream keeps it open, and sent nothing beyond the response.
    pub(crate) fn is_reusable(&self) -> bool {
        self.reusable && self.read.is_empty()
    }

    /// The next frame of the response body being read on this connection.
    fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
        decoder: &mut Decoder,
        eof: &mut bool,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        loop {
            match decoder.decode(&mut self.read, *eof) {
                Err(e) => return Poll::Ready(Some(Err(ExchangeError::Wire(e)))),
                Ok(Decoded::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Ok(Decoded::Trailers(t)) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
                Ok(Decoded::End) => {
                    self.reusable &= !*eof;
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => match self.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => *eof = true,
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(ExchangeError::Io(e)))),
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }
}

/// The state of the request body's upload.
#[derive(Clone, Copy)]
enum Upload {
    /// Frames still to read from the client's body (chunk-encoded or not).
    Body { chunked: bool },
    /// All of it is in the write buffer or written.
    Done,
}

impl Progress {
    fn max_written(self) -> Progress {
        match self {
            Progress::Nothing => Progress::Written,
            p => p,
        }
    }
}

/// Methods a client may send again without changing what it asked for
/// (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A response body read off a [`Wire`]: holds the connection while the
/// body is read and hands it to its [`Release`] once the body ended cleanly.
/// Dropped before its end (the client left), the rest is read in the
/// background within [`DRAIN_LIMIT`] and [`DRAIN_TIMEOUT`] so the
/// connection can still be pooled.
pub(crate) struct WireBody<R: Release> {
    wire: Option<Wire>,
    decoder: Decoder,
    eof: bool,
    release: Option<R>,
    /// Finish in the background when dropped early (not for a drain).
    drain_on_drop: bool,
}

/// Where a connection goes when its response body has been read.
pub(crate) trait Release: Send + Unpin + 'static {
    /// The body ended; `wire` may be pooled if [`Wire::is_reusable`].
    fn release(self, wire: Wire);
    /// Held by a background drain of an abandoned body while it runs.
    type DrainGuard: Send + 'static;
    /// Starts counting a background drain.
    fn drain_guard(&self) -> Self::DrainGuard;
}

/// Most that is read, after the client went away, of a response nobody will
/// see, to keep its connection: small API answers, not downloads.
pub(crate) const DRAIN_LIMIT: usize = 64 * 1024;
/// How long an abandoned exchange may take to finish in the background.
pub(crate) const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl<R: Release> WireBody<R> {
    /// The body of the response just read on `wire`. A body that is already
    /// complete (no body) releases the connection at once.
    pub(crate) fn new(wire: Wire, decoder: Decoder, release: R) -> WireBody<R> {
        let mut body = WireBody {
            wire: Some(wire),
            decoder,
            eof: false,
            release: Some(release),
            drain_on_drop: true,
        };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let (Some(mut wire), Some(release)) = (self.wire.take(), self.release.take()) {
            wire.reusable &= !self.eof;
            release.release(wire);
        }
    }

    /// Reads the rest of an abandoned body in a task of its own.
    fn spawn_drain(&mut self) {
        let (Some(wire), Some(release)) = (self.wire.take(), self.release.take()) else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let guard = release.drain_guard();
        let rest = WireBody {
            wire: Some(wire),
            decoder: std::mem::replace(&mut self.decoder, Decoder::new(wire::Framing::Empty)),
            eof: self.eof,
            release: Some(release),
            drain_on_drop: false,
        };
        handle.spawn(async move {
            let _guard = guard;
            rest.drain(tokio::time::Instant::now() + DRAIN_TIMEOUT)
                .await;
        });
    }

    /// Reads the body to its end (releasing the connection), unless it is
    /// longer than [`DRAIN_LIMIT`] or takes past `deadline`: then the
    /// connection is closed.
    pub(crate) async fn drain(mut self, deadline: tokio::time::Instant) {
        self.drain_on_drop = false;
        let _ = tokio::time::timeout_at(deadline, async {
            let mut read = 0usize;
            while let Some(frame) = http_body_util::BodyExt::frame(&mut self).await {
                read += frame.ok()?.data_ref().map_or(0, Bytes::len);
                if read > DRAIN_LIMIT {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }
}

impl<R: Release> Drop for WireBody<R> {
    fn drop(&mut self) {
        if self.drain_on_drop && self.wire.is_some() {
            self.spawn_drain();
        }
    }
}
impl<R: Release> Body for WireBody<R> {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        let Some(wire) = this.wire.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = wire.poll_body(cx, &mut this.decoder, &mut this.eof);
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.decoder.is_done() => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                // A broken body leaves the connection unusable.
                this.wire = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
