//! The driver against scripted upstreams on loopback.

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper_rustls::MaybeHttpsStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use http::Request;

use super::*;

/// Collects released connections.
#[derive(Clone, Default)]
struct Pool(Arc<Mutex<Vec<Wire>>>);

impl Release for Pool {
    type DrainGuard = ();
    fn release(self, wire: Wire) {
        self.0.lock().unwrap().push(wire);
    }
    fn drain_guard(&self) {}
}

impl Pool {
    fn take(&self) -> Option<Wire> {
        self.0.lock().unwrap().pop()
    }
}

/// A connected pair: the proxy's `Wire` and the upstream's socket.
async fn pair() -> (Wire, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (Wire::new(MaybeHttpsStream::Http(TokioIo::new(c))), s)
}

/// Reads one request head (and `body` more bytes) off the upstream side.
async fn read_request(s: &mut TcpStream, body: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if got.len() >= i + 4 + body {
                return got;
            }
        }
        let n = s.read(&mut b).await.unwrap();
        assert!(
            n > 0,
            "closed mid-request: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&b[..n]);
    }
}

fn get(path: &str) -> Request<RequestBody> {
    Request::builder()
        .uri(path)
        .header("host", "up")
        .body(RequestBody::Buffered(None, None))
        .unwrap()
}

impl Wire {
    /// [`Wire::exchange`] of a request as it is.
    async fn exchange_request(
        self,
        req: Request<RequestBody>,
        reused: bool,
    ) -> Result<(Response<()>, Decoder, Wire, Head), Failure> {
        let far = Instant::now() + std::time::Duration::from_secs(60);
        self.exchange_until(req, reused, far).await
    }

    /// [`Wire::exchange`] of a request as it is, answered by `deadline`.
    async fn exchange_until(
        self,
        req: Request<RequestBody>,
        reused: bool,
        deadline: Instant,
    ) -> Result<(Response<()>, Decoder, Wire, Head), Failure> {
        let (head, body) = Head::split(req);
        self.exchange(head, body, &Rewrite::NONE, reused, deadline)
            .await
    }
}

async fn body_of(wire: Wire, decoder: Decoder, pool: &Pool) -> Vec<u8> {
    let body = WireBody::new(wire, decoder, pool.clone());
    body.collect().await.unwrap().to_bytes().to_vec()
}

#[tokio::test]
async fn sequential_exchanges_reuse_the_connection() {
    let (mut wire, mut up) = pair().await;
    let pool = Pool::default();
    for i in 0..3 {
        let server = async {
            let req = read_request(&mut up, 0).await;
            assert!(req.starts_with(format!("GET /r{i} HTTP/1.1\r\nhost: up\r\n").as_bytes()));
            up.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                .await
                .unwrap();
        };
        let (r, ()) = tokio::join!(wire.exchange_request(get(&format!("/r{i}")), i > 0), server);
        let Ok((resp, decoder, w, _)) = r else {
            panic!("exchange failed")
        };
        assert_eq!(resp.status(), 200);
        assert_eq!(body_of(w, decoder, &pool).await, b"hello");
        wire = pool.take().expect("released after the body");
        assert!(wire.is_reusable());
        assert!(wire.is_idle_usable());
    }
}

/// The connection's timer was armed at the first exchange's (far) deadline:
/// a later exchange with a nearer one (a reload shortened
/// `request_timeout`) still ends at its own.
#[tokio::test]
async fn an_exchange_times_out_at_its_deadline_when_the_timer_was_armed_later() {
    let (wire, mut up) = pair().await;
    let pool = Pool::default();
    let server = async {
        read_request(&mut up, 0).await;
        up.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
    };
    let (r, ()) = tokio::join!(wire.exchange_request(get("/first"), false), server);
    let Ok((_, decoder, w, _)) = r else {
        panic!("exchange failed")
    };
    assert_eq!(body_of(w, decoder, &pool).await, b"ok");
    let wire = pool.take().expect("released after the body");
    // The upstream reads the second request and never answers.
    let limit = std::time::Duration::from_millis(200);
    let started = Instant::now();
    let server = async {
        read_request(&mut up, 0).await;
        up
    };
    let (r, _up) = tokio::join!(
        wire.exchange_until(get("/second"), true, started + limit),
        server
    );
    let took = started.elapsed();
    match r {
        Err(Failure {
            error: ExchangeError::Timeout,
            retry: None,
        }) => {}
        Err(f) => panic!("failed otherwise: {}", f.error),
        Ok(_) => panic!("answered"),
    }
    assert!(
        took >= limit && took < std::time::Duration::from_secs(10),
        "timed out after {took:?}"
    );
}

#[tokio::test]
async fn a_body_known_complete_releases_at_once_and_is_end_stream() {
    let (wire, mut up) = pair().await;
    let pool = Pool::default();
    let server = async {
        read_request(&mut up, 0).await;
        up.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
    };
    let (r, ()) = tokio::join!(wire.exchange_request(get("/"), false), server);
    let Ok((_, decoder, w, _)) = r else {
        panic!("exchange failed")
    };
    let body = WireBody::new(w, decoder, pool.clone());
    assert!(body.is_end_stream());
    assert!(pool.take().is_some(), "released before the body is polled");
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_usable() {
    let (mut wire, up) = pair().await;
    drop(up);
    // The FIN arrives asynchronously; wait for the readiness event.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while wire.is_idle_usable() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the close was never noticed");
}

#[tokio::test]
async fn a_request_on_a_connection_closed_without_answer_comes_back_for_a_retry() {
    let (wire, mut up) = pair().await;
    let server = async {
        read_request(&mut up, 0).await;
        drop(up);
    };
    let (r, ()) = tokio::join!(wire.exchange_request(get("/again"), true), server);
    let Err(f) = r else { panic!("should fail") };
    assert!(matches!(f.error, ExchangeError::Io(_)), "{}", f.error);
    let retry = f
        .retry
        .expect("an idempotent request on a reused connection is retried");
    assert_eq!(retry.0.uri, "/again");
    // Not on a fresh connection, nor for a POST.
    let (wire, mut up) = pair().await;
    let server = async {
        read_request(&mut up, 0).await;
        drop(up);
    };
    let (r, ()) = tokio::join!(wire.exchange_request(get("/fresh"), false), server);
    assert!(r.is_err_and(|f| f.retry.is_none()));
    let (wire, mut up) = pair().await;
    let server = async {
        read_request(&mut up, 0).await;
        drop(up);
    };
    let mut post = get("/post");
    *post.method_mut() = Method::POST;
    let (r, ()) = tokio::join!(wire.exchange_request(post, true), server);
    assert!(r.is_err_and(|f| f.retry.is_none()));
}

#[tokio::test]
async fn buffered_bodies_go_with_the_head_and_chunked_bodies_stream() {
    let (wire, mut up) = pair().await;
    let pool = Pool::default();
    let mut req = get("/upload");
    *req.method_mut() = Method::POST;
    *req.body_mut() = RequestBody::Buffered(Some(Bytes::from_static(b"payload")), None);
    let server = async {
        let got = read_request(&mut up, 7).await;
        assert!(
            got.ends_with(b"content-length: 7\r\n\r\npayload"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        up.write_all(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .await
            .unwrap();
    };
    let (r, ()) = tokio::join!(wire.exchange_request(req, false), server);
    let Ok((resp, decoder, w, _)) = r else {
        panic!("exchange failed")
    };
    assert_eq!(resp.status(), 201);
    assert_eq!(body_of(w, decoder, &pool).await, b"abcde");
    assert!(pool.take().is_some_and(|w| w.is_reusable()));
}

#[tokio::test]
async fn an_answer_before_the_upload_ends_makes_the_connection_unusable() {
    // An inbound hyper connection whose body never ends.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let (inbound, _) = l.accept().await.unwrap();
    client
        .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\nxxxx")
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Mutex::new(Some(tx));
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        if let Some(tx) = tx.lock().unwrap().take() {
            let _ = tx.send(req.into_body());
        }
        std::future::pending::<Result<Response<String>, std::convert::Infallible>>()
    });
    tokio::spawn(
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(inbound), svc),
    );
    let incoming = rx.await.unwrap();

    let (wire, mut up) = pair().await;
    let pool = Pool::default();
    let mut req = get("/upload");
    *req.method_mut() = Method::POST;
    *req.body_mut() = RequestBody::Streaming {
        head: None,
        rest: incoming,
        activity: None,
    };
    let server = async {
        read_request(&mut up, 4).await;
        up.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
    };
    let (r, ()) = tokio::join!(wire.exchange_request(req, false), server);
    let Ok((resp, decoder, w, _)) = r else {
        panic!("exchange failed")
    };
    assert_eq!(resp.status(), 413);
    drop(WireBody::new(w, decoder, pool.clone()));
    assert!(!pool.take().expect("released").is_reusable());
}

#[tokio::test]
async fn a_malformed_response_fails_the_exchange() {
    let (wire, mut up) = pair().await;
    let server = async {
        read_request(&mut up, 0).await;
        up.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
    };
    let (r, ()) = tokio::join!(wire.exchange_request(get("/"), true), server);
    let Err(f) = r else { panic!("should fail") };
    assert!(
        matches!(f.error, ExchangeError::Wire(WireError::Framing(_))),
        "{}",
        f.error
    );
    assert!(f.retry.is_none(), "the upstream answered: no retry");
}

#[tokio::test]
async fn a_body_dropped_early_is_drained_and_released() {
    let (wire, mut up) = pair().await;
    let pool = Pool::default();
    let server = async {
        read_request(&mut up, 0).await;
        up.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
            .await
            .unwrap();
    };
    let (r, ()) = tokio::join!(wire.exchange_request(get("/"), false), server);
    let Ok((_, decoder, w, _)) = r else {
        panic!("exchange failed")
    };
    let mut body = WireBody::new(w, decoder, pool.clone());
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first");
    drop(body);
    assert!(pool.take().is_none(), "not before the rest arrived");
    up.write_all(b"-rest").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Some(w) = pool.take() {
                assert!(w.is_reusable());
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("drained and released");
}
