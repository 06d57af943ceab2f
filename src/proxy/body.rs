//! The body of a response the proxy sends to its client: the upstream's
//! body streamed under its idle timer, or a body the proxy made (errors,
//! admin pages). It may carry its request's access log line
//! ([`ProxyBody::Logged`]), counting the bytes sent into it; the line is
//! written when the body is dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::net::body::{BoxError, Idle, IdleTimeout};
use crate::net::upstream::UpstreamBody;
use crate::proxy::access_log::AccessLog;

/// The body of a response the proxy sends to its client.
// The access log line is boxed: a few hundred bytes inline made every
// response larger, and a response is moved several times on its way to
// hyper (about 150 instructions of memcpy per request); a logged request
// formats and writes a line, next to which the allocation is small.
#[derive(Debug)]
pub enum ProxyBody {
    /// The upstream's response body, streamed, with its idle timer.
    Upstream(UpstreamBody, Idle),
    /// A body the proxy made (errors, admin pages).
    Full(Option<Bytes>),
    /// The upstream's response body, its bytes counted into an access log
    /// line that is written when the body is dropped.
    Logged(UpstreamBody, Idle, Box<AccessLog>),
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
            ProxyBody::Upstream(b, idle) => ProxyBody::Logged(b, idle, Box::new(log)),
            ProxyBody::Full(b) => {
                log.sent(b.as_ref().map_or(0, Bytes::len));
                ProxyBody::Full(b)
            }
            logged @ ProxyBody::Logged(..) => logged,
        }
    }
}

/// Polls an upstream body under its idle timer.
fn poll_upstream(
    body: &mut UpstreamBody,
    idle: &mut Idle,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    match Pin::new(body).poll_frame(cx) {
        Poll::Ready(frame) => {
            idle.moved();
            Poll::Ready(frame)
        }
        Poll::Pending if idle.poll_expired(cx) => {
            // hyper ends the exchange: HTTP/1.1 closes the client's
            // connection (its response is incomplete), HTTP/2 resets the
            // stream; dropping the upstream body frees its connection.
            Poll::Ready(Some(Err(IdleTimeout(idle.timeout()).into())))
        }
        Poll::Pending => Poll::Pending,
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
            ProxyBody::Upstream(b, idle) => poll_upstream(b, idle, cx),
            ProxyBody::Logged(b, idle, log) => {
                let polled = poll_upstream(b, idle, cx);
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
            ProxyBody::Upstream(b, _) | ProxyBody::Logged(b, _, _) => b.is_end_stream(),
            ProxyBody::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b, _) | ProxyBody::Logged(b, _, _) => b.size_hint(),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
