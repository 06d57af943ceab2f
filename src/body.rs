//! Body types that stream without boxing: what the proxy sends upstream
//! ([`RequestBody`]) and what it answers clients with ([`ProxyBody`]).
//!
//! A request body of at most [`REPLAY_LIMIT`] is buffered so it can be
//! replayed once after the upstream rejects a token; larger bodies stream
//! with the part read so far sent first.
//!
//! A response body may carry its request's access log line
//! ([`ProxyBody::Logged`]), counting the bytes sent into it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::access_log::AccessLog;

/// Largest request body kept for a replay after `reauth_on` (SPEC §4).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// Errors a body passes to hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a response the proxy sends to its client.
// `Logged` is a few hundred bytes inline: the body is moved once or twice
// per response, which costs less than a heap allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ProxyBody {
    /// The upstream's response body, streamed.
    Upstream(crate::upstream::UpstreamBody),
    /// A body the proxy made (errors, admin pages).
    Full(Option<Bytes>),
    /// The upstream's response body, its bytes counted into an access log
    /// line that is written when the body is dropped.
    Logged(crate::upstream::UpstreamBody, AccessLog),
}

impl ProxyBody {
    /// A body of the given bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(bytes.into()))
    }

    /// Attaches the access log line: a streamed body counts its bytes and
    /// writes the line when dropped; a body the proxy made has its length
    /// known, so its line is written now.
    pub fn with_access_log(self, mut log: AccessLog) -> ProxyBody {
        match self {
            ProxyBody::Upstream(b) => ProxyBody::Logged(b, log),
            ProxyBody::Full(b) => {
                log.sent(b.as_ref().map_or(0, Bytes::len));
                ProxyBody::Full(b)
            }
            logged @ ProxyBody::Logged(..) => logged,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Logged(b, log) => {
                let polled = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    log.sent(frame.data_ref().map_or(0, Bytes::len));
                }
                polled
            }
            ProxyBody::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) | ProxyBody::Logged(b, _) => b.is_end_stream(),
            ProxyBody::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) | ProxyBody::Logged(b, _) => b.size_hint(),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// The body of a request the proxy sends upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// Fully buffered (small enough to replay).
    Buffered(Option<Bytes>),
    /// What was read so far, then the rest of the client's body.
    Streaming {
        /// Already read from the client.
        head: Option<Bytes>,
        /// The rest.
        rest: Incoming,
    },
}

impl RequestBody {
    /// Reads the client's body up to [`REPLAY_LIMIT`]: buffered if it ended
    /// there, else streaming. Known large bodies are not read ahead at all.
    pub async fn prepare(mut body: Incoming) -> Result<RequestBody, hyper::Error> {
        if body.is_end_stream() {
            return Ok(RequestBody::Buffered(None));
        }
        if body.size_hint().lower() > REPLAY_LIMIT as u64 {
            return Ok(RequestBody::Streaming {
                head: None,
                rest: body,
            });
        }
        let mut buf = BytesMut::new();
        loop {
            match body.frame().await {
                None => return Ok(RequestBody::Buffered(Some(buf.freeze()))),
                Some(frame) => {
                    // Trailers are dropped: they are hop-by-hop for a proxy
                    // that does not announce `TE: trailers` support upstream.
                    if let Ok(data) = frame?.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    if buf.len() > REPLAY_LIMIT {
                        return Ok(RequestBody::Streaming {
                            head: Some(buf.freeze()),
                            rest: body,
                        });
                    }
                }
            }
        }
    }

    /// A copy for a replay, if the body was buffered.
    pub fn try_clone(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Buffered(b) => Some(RequestBody::Buffered(b.clone())),
            RequestBody::Streaming { .. } => None,
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
            RequestBody::Buffered(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            RequestBody::Streaming { head, rest } => match head.take() {
                Some(h) => Poll::Ready(Some(Ok(Frame::data(h)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Buffered(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            RequestBody::Streaming { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Buffered(b) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            RequestBody::Streaming { head, rest } => {
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
