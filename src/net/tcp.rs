//! A client's TCP stream shared between the HTTP server that reads and
//! writes it and the connection's watchdog, which asks whether the client
//! has closed its side ([`SharedTcp::peer_closed`]) while a request is
//! open.
//!
//! hyper can notice a client gone mid-request itself, but only by reading
//! the socket at every request (an extra `recv` that finds nothing, and a
//! fresh read buffer while the request still holds the old one: about 870
//! instructions and a syscall per request); the proxy turns that off
//! (`half_close`) and its watchdog asks the poller's state instead, which
//! costs nothing per request (`server::watch_connection`). The peer's FIN
//! shows there as "read closed" even when bytes it sent before (a TLS
//! `close_notify`, a pipelined request) are still unread.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A [`TcpStream`] that another holder of the same `Arc` can look at.
#[derive(Debug, Clone)]
pub struct SharedTcp(Arc<TcpStream>);

impl SharedTcp {
    /// Shares `stream`.
    pub fn new(stream: TcpStream) -> SharedTcp {
        SharedTcp(Arc::new(stream))
    }

    /// Whether the client has shut its side of the connection (FIN or
    /// reset seen by the poller). Does not read, and leaves the reader's
    /// wake-up alone.
    pub fn peer_closed(&self) -> bool {
        match self.0.ready(Interest::READABLE).now_or_never() {
            Some(Ok(ready)) => ready.is_read_closed() || ready.is_error(),
            Some(Err(_)) => true,
            None => false,
        }
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // Into the unfilled part as it is: no zeroing first.
            match self.0.try_read_buf(buf) {
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write);
        Poll::Ready(match shut {
            // Already gone: nothing left to shut.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (SharedTcp, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (SharedTcp::new(s), c)
    }

    /// Waits (bounded) until the poller has seen what the peer did.
    async fn settle(s: &SharedTcp, closed: bool) {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while s.peer_closed() != closed {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the poller never saw it");
    }

    #[tokio::test]
    async fn reads_writes_and_shuts_down_like_the_stream() {
        let (mut s, mut c) = pair().await;
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        s.write_all(b"pong").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"pong");
    }

    #[tokio::test]
    async fn a_closed_peer_is_seen_with_its_bytes_unread() {
        let (s, mut c) = pair().await;
        assert!(!s.peer_closed());
        // Bytes alone (a pipelined request) are not a close.
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), s.0.readable())
            .await
            .unwrap()
            .unwrap();
        assert!(!s.peer_closed(), "data is not a close");
        // The FIN, behind bytes nobody read.
        c.shutdown().await.unwrap();
        settle(&s, true).await;
    }

    #[tokio::test]
    async fn a_peer_that_drops_the_connection_is_seen() {
        let (s, c) = pair().await;
        drop(c);
        settle(&s, true).await;
    }
}
