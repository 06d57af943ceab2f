//! The upstream connection pool: keep-alive reuse, the per-upstream
//! connection limit, the idle reaper, pools dropped on reload, recovery from
//! pooled connections the upstream closed, exchanges whose client left; and
//! for HTTP/2 upstreams multiplexing, PING keep-alive, eviction of silent
//! connections, single-flight connects, refused streams and
//! `MAX_CONCURRENT_STREAMS`.
//!
//! The test upstreams here count what the pool does from the other side:
//! connections accepted and closed (a TCP relay that can also black-hole
//! them), streams seen, and scripted HTTP/2 frames.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flinks_proxy::net::upstream::PoolTimings;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Listeners (10 s request timeout), the sandbox credential `flinks` and
/// route `up` to `upstream` with it.
fn config(sb: &flinks_proxy::sandbox::Sandbox, upstream: &str) -> ProxyToml {
    let route = Route {
        upstream: upstream.to_owned(),
        credential: Some("flinks".to_owned()),
        ..Route::default()
    };
    ProxyToml::listeners()
        .credential("flinks", Credential::sandbox(sb))
        .route("up", route)
        .with(|c| c.server.request_timeout = Some(Duration::from_secs(10)))
}

fn config_for(sb: &flinks_proxy::sandbox::Sandbox, upstream: &str) -> String {
    config(sb, upstream).toml()
}

/// [`config_for`], route `up` trusting the CA in the file `ca`.
fn config_with_ca(sb: &flinks_proxy::sandbox::Sandbox, upstream: &str, ca: &Path) -> String {
    config(sb, upstream)
        .with(|c| c.route_mut("up").ca_file = Some(ca.to_path_buf()))
        .toml()
}

/// Waits (up to 20 s, polling) for `cond`; panics naming `what`.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The pool of the only route.
fn pool(p: &flinks_proxy::Running) -> Arc<flinks_proxy::net::upstream::Upstream> {
    Arc::clone(&p.state().generation.load().route_list[0].upstream)
}

/// Sends GET `path` with `x-delay-ms: delay_ms` (the test upstreams wait
/// that long before answering).
async fn get_delayed(c: &HttpClient, p: &flinks_proxy::Running, path: &str, delay_ms: u64) -> Resp {
    let req = Request::get(proxy_url(p, path))
        .header("x-delay-ms", delay_ms.to_string())
        .body(Full::default())
        .expect("request");
    send(c, req).await
}

/// Short HTTP/2 PINGs for tests: every 200 ms, the answer awaited `timeout`.
fn fast_pings(timeout: Duration) -> PoolTimings {
    PoolTimings {
        h2_keep_alive_interval: Duration::from_millis(200),
        h2_keep_alive_timeout: timeout,
        ..PoolTimings::default()
    }
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let sb = sandbox().await;
    let up = TestUpstream::start("plain").await;
    let p = start_proxy(&config_for(&sb, &up.http_url())).await;
    let c = client();
    for i in 0..50 {
        let r = get_with(&c, &proxy_url(&p, &format!("/seq/{i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(up.requests().len(), 50);
    assert_eq!(
        up.connections(),
        1,
        "every request after the first should reuse the connection"
    );
}

#[tokio::test]
async fn concurrent_rounds_open_no_more_connections_than_concurrent_requests() {
    let sb = sandbox().await;
    let up = TestUpstream::start("plain").await;
    let p = start_proxy(&config_for(&sb, &up.http_url())).await;
    let c = client();
    for round in 0..4 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..32 {
            let (c, url) = (c.clone(), proxy_url(&p, &format!("/r{round}/{i}")));
            tasks.spawn(async move { get_with(&c, &url).await.status });
        }
        while let Some(status) = tasks.join_next().await {
            assert_eq!(status.expect("task"), 200);
        }
    }
    assert_eq!(up.requests().len(), 128);
    assert!(
        up.connections() <= 32,
        "{} upstream connections for 32 concurrent requests",
        up.connections()
    );
}

#[tokio::test]
async fn http2_upstream_multiplexes_concurrent_requests_on_one_connection() {
    let sb = sandbox().await;
    let pki = Pki::new("pool");
    let up = TestUpstream::start_tls("h2", &pki.server()).await;
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let p = start_proxy(&config_with_ca(&sb, &up.https_url(), &ca)).await;
    // One request first, so the connection exists before the burst.
    assert_eq!(get(&proxy_url(&p, "/first")).await.status, 200);
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (c, url) = (c.clone(), proxy_url(&p, &format!("/h2/{i}")));
        tasks.spawn(async move { get_with(&c, &url).await.status });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task"), 200);
    }
    assert!(up
        .requests()
        .iter()
        .all(|r| r.version == http::Version::HTTP_2));
    assert_eq!(up.connections(), 1);
}

/// An upstream that answers one request per connection as keep-alive
/// (no `Connection: close`) and then closes the connection anyway, the way a
/// server does when its keep-alive timeout fires between requests.
async fn one_shot_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // Closing right away: the proxy's pooled connection is dead.
            });
        }
    });
    (format!("http://{addr}"), task)
}

#[tokio::test]
async fn pooled_connections_the_upstream_closed_are_not_an_error() {
    let sb = sandbox().await;
    let (url, _task) = one_shot_upstream().await;
    let p = start_proxy(&config_for(&sb, &url)).await;
    let c = client();
    for i in 0..30 {
        let r = get_with(&c, &proxy_url(&p, &format!("/x/{i}"))).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.body, Bytes::from_static(b"ok"));
        if i % 3 == 0 {
            // Let the close reach the proxy sometimes, and sometimes not.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// An upstream answering every request with `response`, keeping its
/// connections open; counts the connections it accepted.
async fn scripted_upstream(response: &'static [u8]) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                while !read_until(&mut s, b"\r\n\r\n").await.is_empty() {
                    if s.write_all(response).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), accepted)
}

#[tokio::test]
async fn ambiguous_upstream_framing_is_a_502_and_the_connection_is_not_reused() {
    let sb = sandbox().await;
    let (url, accepted) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    let p = start_proxy(&config_for(&sb, &url)).await;
    let c = client();
    for i in 0..3 {
        let r = get_with(&c, &proxy_url(&p, &format!("/smuggle/{i}"))).await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(r.text().contains("upstream_unavailable"), "{}", r.text());
    }
    // The upstream keeps its connections open: only the proxy's refusal to
    // reuse a connection whose framing it could not trust makes new ones.
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "each request on a new connection"
    );
    assert_eq!(pool(&p).idle_connections(), 0);
}

#[tokio::test]
async fn a_client_leaving_before_the_response_keeps_the_upstream_connection() {
    let sb = sandbox().await;
    let up = TestUpstream::start("plain").await;
    let p = start_proxy(&config_for(&sb, &up.http_url())).await;
    let c = client();
    assert_eq!(get_with(&c, &proxy_url(&p, "/warm")).await.status, 200);
    assert_eq!(up.connections(), 1);
    // The client gives up while the upstream is still working on it.
    let mut tcp = tokio::net::TcpStream::connect(p.proxy_addr())
        .await
        .expect("connect");
    tcp.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nx-delay-ms: 300\r\n\r\n")
        .await
        .expect("write");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !up.requests().iter().any(|r| r.path_and_query == "/slow") {
        assert!(
            std::time::Instant::now() < deadline,
            "slow request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(tcp);
    // The abandoned exchange finishes in the background and its connection
    // goes back to the pool: later requests need no new connection.
    let idle = || {
        p.state().generation.load().route_list[0]
            .upstream
            .idle_connections()
    };
    while idle() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "connection never returned to the pool"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..10 {
        assert_eq!(
            get_with(&c, &proxy_url(&p, &format!("/later/{i}")))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        up.connections(),
        1,
        "the abandoned exchange cost a connection"
    );
}

// ------------------------------------------------------------ test servers

/// A TCP relay in front of `target` that counts the connections it accepts
/// and those the proxy closes, and can black-hole the open ones: their bytes
/// are read and dropped, nothing goes through, nothing is closed.
struct Relay {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let (a, c, f) = (
            Arc::clone(&accepted),
            Arc::clone(&closed),
            Arc::clone(&frozen),
        );
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let flag = Arc::new(AtomicBool::new(false));
                f.lock().unwrap().push(Arc::clone(&flag));
                tokio::spawn(relay_connection(client, target, flag, Arc::clone(&c)));
            }
        });
        Relay {
            addr,
            accepted,
            closed,
            frozen,
            task,
        }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// From now on, the connections open now forward nothing.
    fn black_hole(&self) {
        for f in self.frozen.lock().unwrap().iter() {
            f.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_connection(
    client: TcpStream,
    target: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
    closed: Arc<AtomicUsize>,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let frozen_down = Arc::clone(&frozen);
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) if frozen_down.load(Ordering::SeqCst) => std::future::pending::<()>().await,
                Ok(n) => {
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = cw.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) if frozen.load(Ordering::SeqCst) => {}
            Ok(n) => {
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    // The proxy closed its side.
    closed.fetch_add(1, Ordering::SeqCst);
    down.abort();
}

/// A TLS acceptor offering only `h2` by ALPN, with `pki`'s server certificate.
fn h2_acceptor(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let leaf = pki.server();
    let certs = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key PEM");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A `ca_file` trusting `pki`, and the folder holding it.
fn ca_file(pki: &Pki) -> (TempDir, PathBuf) {
    let dir = TempDir::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    (dir, ca)
}

/// An HTTP/2-only upstream (TLS, ALPN `h2`) announcing `max_streams`
/// concurrent streams; answers 200 after `x-delay-ms`.
struct H2Upstream {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl H2Upstream {
    async fn start(pki: &Pki, max_streams: u32) -> H2Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = h2_acceptor(pki);
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let delay = req
                                .headers()
                                .get("x-delay-ms")
                                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                            if let Some(ms) = delay {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .max_concurrent_streams(max_streams)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        H2Upstream {
            addr,
            connections,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a [`ScriptedH2`] treats the second stream of its first connection.
#[derive(Clone, Copy)]
enum Refusal {
    /// GOAWAY with the first stream as the last one processed.
    GoAway,
    /// RST_STREAM with REFUSED_STREAM.
    RefusedStream,
}

/// An HTTP/2 upstream written frame by frame, to refuse exactly one
/// stream: it answers every stream 200, except the second stream of the
/// first connection, which it refuses as `refusal` says. Records
/// (connection number, stream id) of every request.
struct ScriptedH2 {
    addr: std::net::SocketAddr,
    streams: Arc<Mutex<Vec<(usize, u32)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedH2 {
    async fn start(pki: &Pki, refusal: Refusal) -> ScriptedH2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = h2_acceptor(pki);
        let streams: Arc<Mutex<Vec<(usize, u32)>>> = Arc::default();
        let log = Arc::clone(&streams);
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((tcp, _)) = listener.accept().await {
                n += 1;
                let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = scripted_connection(tls, n, refusal, log).await;
                    }
                });
            }
        });
        ScriptedH2 {
            addr,
            streams,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn streams(&self) -> Vec<(usize, u32)> {
        self.streams.lock().unwrap().clone()
    }
}

impl Drop for ScriptedH2 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/2 frame (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const SETTINGS: u8 = 4;
const PING: u8 = 6;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const GOAWAY: u8 = 7;
const ACK: u8 = 1;
const END_STREAM_END_HEADERS: u8 = 0x5;
/// HPACK: static table entry 8, `:status: 200`.
const STATUS_200: u8 = 0x88;
const REFUSED_STREAM: u32 = 0x7;

async fn scripted_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    conn: usize,
    refusal: Refusal,
    log: Arc<Mutex<Vec<(usize, u32)>>>,
) -> std::io::Result<()> {
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).await?;
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    let mut first_stream = None;
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await?;
        match kind {
            SETTINGS if flags & ACK == 0 => s.write_all(&frame(SETTINGS, ACK, 0, &[])).await?,
            PING if flags & ACK == 0 => s.write_all(&frame(PING, ACK, 0, &payload)).await?,
            HEADERS => {
                log.lock().unwrap().push((conn, stream));
                match first_stream {
                    Some(first) if conn == 1 => {
                        let refuse = match refusal {
                            Refusal::GoAway => {
                                let mut p = u32::to_be_bytes(first).to_vec();
                                p.extend_from_slice(&[0, 0, 0, 0]);
                                frame(GOAWAY, 0, 0, &p)
                            }
                            Refusal::RefusedStream => {
                                frame(RST_STREAM, 0, stream, &REFUSED_STREAM.to_be_bytes())
                            }
                        };
                        s.write_all(&refuse).await?;
                    }
                    _ => {
                        first_stream.get_or_insert(stream);
                        s.write_all(&frame(
                            HEADERS,
                            END_STREAM_END_HEADERS,
                            stream,
                            &[STATUS_200],
                        ))
                        .await?;
                    }
                }
            }
            _ => {}
        }
    }
}

/// A keep-alive HTTP/1.1 upstream written by hand, counting connections:
/// `/upload` answers 413 at once, before reading the request body (then
/// reads it); `/stream` sends a chunked head and a first chunk `first`, and
/// the rest only when `release` is notified; anything else answers `ok`.
struct RawUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    release: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let (a, r) = (Arc::clone(&accepted), Arc::clone(&release));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(raw_connection(tcp, Arc::clone(&r)));
            }
        });
        RawUpstream {
            addr,
            accepted,
            release,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_connection(mut s: TcpStream, release: Arc<Notify>) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await? {
                0 => return Ok(()),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if path == "/upload" {
            s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
                .await?;
        }
        // The request body, then the answer.
        while buf.len() < length {
            let mut chunk = [0u8; 16 * 1024];
            match s.read(&mut chunk).await? {
                0 => return Ok(()),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
        match path.as_str() {
            "/upload" => {}
            "/stream" => {
                s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                    .await?;
                release.notified().await;
                s.write_all(b"4\r\nrest\r\n0\r\n\r\n").await?;
            }
            _ => {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await?
            }
        }
    }
}

/// Reads from `tcp` until `needle` has arrived; returns what was read.
async fn read_until(tcp: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let read = async {
        while !got.windows(needle.len()).any(|w| w == needle) {
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("response in time");
    got
}

// ------------------------------------------------------------ HTTP/1.1 pool

#[tokio::test]
async fn a_burst_never_opens_more_than_max_connections() {
    let sb = sandbox().await;
    let up = TestUpstream::start("plain").await;
    let p = start_proxy(
        &config(&sb, &up.http_url())
            .with(|c| c.route_mut("up").max_connections = Some(2))
            .toml(),
    )
    .await;
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let (c, p_url) = (c.clone(), proxy_url(&p, &format!("/burst/{i}")));
        tasks.spawn(async move {
            let req = Request::get(p_url)
                .header("x-delay-ms", "50")
                .body(Full::default())
                .expect("request");
            send(&c, req).await.status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(
            status.expect("task"),
            200,
            "a request waited for a connection and got it"
        );
    }
    assert_eq!(up.requests().len(), 16);
    assert!(
        up.connections() <= 2,
        "{} upstream connections with max_connections = 2",
        up.connections()
    );
}

#[tokio::test]
async fn idle_connections_are_closed_by_the_reaper() {
    let sb = sandbox().await;
    let up = TestUpstream::start("plain").await;
    let relay = Relay::start(up.addr).await;
    let p = start_proxy(&config_for(&sb, &relay.url("http"))).await;
    p.state().upstreams.set_timings(PoolTimings {
        idle_timeout: Duration::from_millis(300),
        ..PoolTimings::default()
    });
    assert_eq!(get(&proxy_url(&p, "/once")).await.status, 200);
    assert_eq!(relay.accepted(), 1);
    // No further request: only the reaper can close it.
    eventually("the idle connection is closed", || relay.closed() == 1).await;
    assert_eq!(pool(&p).idle_connections(), 0);
    assert_eq!(pool(&p).open_connections(), 0);
}

#[tokio::test]
async fn a_reload_drops_the_pool_of_a_removed_upstream() {
    let sb = sandbox().await;
    let old = TestUpstream::start("old").await;
    let relay = Relay::start(old.addr).await;
    let new = TestUpstream::start("new").await;
    let p = start_proxy(&config_for(&sb, &relay.url("http"))).await;
    assert_eq!(get(&proxy_url(&p, "/before")).await.status, 200);
    let old_pool = pool(&p);
    eventually("the connection is pooled", || {
        old_pool.idle_connections() == 1
    })
    .await;
    drop(old_pool);
    let dir = std::env::temp_dir();
    p.reload(parse_config(&config_for(&sb, &new.http_url()), &dir))
        .expect("reload");
    eventually("the old upstream's connection is closed", || {
        relay.closed() == 1
    })
    .await;
    let r = get(&proxy_url(&p, "/after")).await;
    assert_eq!(r.header("x-upstream"), Some("new"));
}

#[tokio::test]
async fn an_early_answer_while_the_client_uploads_does_not_hold_up_the_next_request() {
    let sb = sandbox().await;
    let up = RawUpstream::start().await;
    let p = start_proxy(&config_for(&sb, &up.url())).await;
    // A client announces a large body, sends a little of it and stalls; the
    // upstream answers 413 without waiting for the rest.
    let mut uploader = TcpStream::connect(p.proxy_addr()).await.expect("connect");
    uploader
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\ncontent-length: 1000000\r\n\r\n")
        .await
        .expect("write head");
    uploader.write_all(&[b'x'; 1000]).await.expect("write body");
    let answer = read_until(&mut uploader, b"\r\n\r\n").await;
    assert!(
        answer.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The upload is still going; the next request must not wait for it.
    let r = get(&proxy_url(&p, "/next")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.accepted(), 2, "the uploading connection was not reused");
    drop(uploader);
}

#[tokio::test]
async fn a_client_leaving_mid_response_returns_the_connection_to_the_pool() {
    let sb = sandbox().await;
    let up = RawUpstream::start().await;
    let p = start_proxy(&config_for(&sb, &up.url())).await;
    let c = client();
    assert_eq!(get_with(&c, &proxy_url(&p, "/warm")).await.status, 200);
    // The client reads the head and the first chunk, then hangs up while the
    // upstream still owes the rest of the body.
    let mut tcp = TcpStream::connect(p.proxy_addr()).await.expect("connect");
    tcp.write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    read_until(&mut tcp, b"first").await;
    drop(tcp);
    let upstream = pool(&p);
    eventually("the rest of the body is drained in the background", || {
        upstream.pending_drains() == 1
    })
    .await;
    up.release.notify_one();
    eventually("the connection is back in the pool", || {
        upstream.pending_drains() == 0 && upstream.idle_connections() == 1
    })
    .await;
    for i in 0..10 {
        let r = get_with(&c, &proxy_url(&p, &format!("/after/{i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(up.accepted(), 1, "every request used the one connection");
}

// ------------------------------------------------------------ HTTP/2

#[tokio::test]
async fn a_black_holed_http2_connection_is_found_by_ping_and_replaced() {
    let sb = sandbox().await;
    let pki = Pki::new("ping");
    let up = TestUpstream::start_tls("h2", &pki.server()).await;
    let relay = Relay::start(up.addr).await;
    let (_dir, ca) = ca_file(&pki);
    let p = start_proxy(&config_with_ca(&sb, &relay.url("https"), &ca)).await;
    p.state()
        .upstreams
        .set_timings(fast_pings(Duration::from_millis(500)));
    let c = client();
    assert_eq!(get_with(&c, &proxy_url(&p, "/first")).await.status, 200);
    assert_eq!(up.requests()[0].version, http::Version::HTTP_2);
    relay.black_hole();
    // In flight when the PING goes unanswered: fails fast (502), or if the
    // connection was already found dead, goes to a new one (200); never
    // waits for the 10 s request timeout.
    let r = get_with(&c, &proxy_url(&p, "/during")).await;
    assert!(
        r.status == 502 || r.status == 200,
        "{}: {}",
        r.status,
        r.text()
    );
    eventually("the dead connection is closed", || relay.closed() >= 1).await;
    let r = get_with(&c, &proxy_url(&p, "/after")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(relay.accepted(), 2);
}

#[tokio::test]
async fn a_request_timeout_evicts_a_silent_http2_connection() {
    let sb = sandbox().await;
    let pki = Pki::new("silent");
    let up = TestUpstream::start_tls("h2", &pki.server()).await;
    let relay = Relay::start(up.addr).await;
    let (_dir, ca) = ca_file(&pki);
    let p = start_proxy(
        &config(&sb, &relay.url("https"))
            .with(|c| {
                c.server.request_timeout = Some(Duration::from_secs(2));
                c.route_mut("up").ca_file = Some(ca.clone());
            })
            .toml(),
    )
    .await;
    // PINGs every 200 ms, but hyper would wait a minute for the answer: only
    // the timeout's judgement can evict the connection within the test.
    p.state()
        .upstreams
        .set_timings(fast_pings(Duration::from_secs(60)));
    let c = client();
    assert_eq!(get_with(&c, &proxy_url(&p, "/first")).await.status, 200);
    relay.black_hole();
    assert_eq!(get_with(&c, &proxy_url(&p, "/lost")).await.status, 504);
    let r = get_with(&c, &proxy_url(&p, "/next")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(relay.accepted(), 2);
}

#[tokio::test]
async fn a_request_timeout_keeps_a_healthy_http2_connection() {
    let sb = sandbox().await;
    let pki = Pki::new("slow");
    let up = TestUpstream::start_tls("h2", &pki.server()).await;
    let (_dir, ca) = ca_file(&pki);
    let p = start_proxy(
        &config(&sb, &up.https_url())
            .with(|c| {
                c.server.request_timeout = Some(Duration::from_secs(2));
                c.route_mut("up").ca_file = Some(ca.clone());
            })
            .toml(),
    )
    .await;
    p.state()
        .upstreams
        .set_timings(fast_pings(Duration::from_secs(60)));
    let c = client();
    assert_eq!(get_with(&c, &proxy_url(&p, "/first")).await.status, 200);
    // One slow stream times out; the connection answered its PINGs meanwhile.
    assert_eq!(get_delayed(&c, &p, "/slow", 5000).await.status, 504);
    for i in 0..3 {
        let r = get_with(&c, &proxy_url(&p, &format!("/next/{i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(up.connections(), 1, "the healthy connection was kept");
}

#[tokio::test]
async fn a_cold_burst_to_an_http2_upstream_connects_once() {
    let sb = sandbox().await;
    let pki = Pki::new("burst");
    let up = H2Upstream::start(&pki, 100).await;
    let (_dir, ca) = ca_file(&pki);
    let p = start_proxy(&config_with_ca(&sb, &up.url(), &ca)).await;
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (c, url) = (c.clone(), proxy_url(&p, &format!("/cold/{i}")));
        tasks.spawn(async move { get_with(&c, &url).await.status });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task"), 200);
    }
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn http2_streams_above_a_goaway_are_sent_again_on_a_new_connection() {
    let sb = sandbox().await;
    let pki = Pki::new("goaway");
    let up = ScriptedH2::start(&pki, Refusal::GoAway).await;
    let (_dir, ca) = ca_file(&pki);
    let p = start_proxy(&config_with_ca(&sb, &up.url(), &ca)).await;
    let c = client();
    assert_eq!(get_with(&c, &proxy_url(&p, "/first")).await.status, 200);
    let r = get_with(&c, &proxy_url(&p, "/second")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.streams(), vec![(1, 1), (1, 3), (2, 1)]);
}

#[tokio::test]
async fn http2_refused_streams_are_sent_again_on_a_new_connection() {
    let sb = sandbox().await;
    let pki = Pki::new("refused");
    let up = ScriptedH2::start(&pki, Refusal::RefusedStream).await;
    let (_dir, ca) = ca_file(&pki);
    let p = start_proxy(&config_with_ca(&sb, &up.url(), &ca)).await;
    let c = client();
    assert_eq!(get_with(&c, &proxy_url(&p, "/first")).await.status, 200);
    let r = get_with(&c, &proxy_url(&p, "/second")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.streams(), vec![(1, 1), (1, 3), (2, 1)]);
}

#[tokio::test]
async fn a_second_http2_connection_opens_at_max_concurrent_streams() {
    let sb = sandbox().await;
    let pki = Pki::new("streams");
    let up = H2Upstream::start(&pki, 2).await;
    let (_dir, ca) = ca_file(&pki);
    let p = start_proxy(&config_with_ca(&sb, &up.url(), &ca)).await;
    let c = client();
    // The first exchange teaches the pool the upstream's limit.
    assert_eq!(get_with(&c, &proxy_url(&p, "/first")).await.status, 200);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6 {
        let (c, url) = (c.clone(), proxy_url(&p, &format!("/slow/{i}")));
        tasks.spawn(async move {
            let req = Request::get(url)
                .header("x-delay-ms", "1000")
                .body(Full::default())
                .expect("request");
            send(&c, req).await.status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task"), 200);
    }
    // Six streams at two per connection: three connections (two if some
    // finished before the last ones started), never one.
    let n = up.connections();
    assert!((2..=3).contains(&n), "{n} connections");
}

#[tokio::test]
async fn a_burst_waiting_on_a_failed_connect_shares_its_failure() {
    let sb = sandbox().await;
    // An upstream that accepts TCP and closes without a TLS handshake once
    // released: the connect the burst waits on fails.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let (a, r) = (Arc::clone(&accepted), Arc::clone(&release));
    let _server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            tokio::select! {
                Ok((tcp, _)) = listener.accept() => {
                    a.fetch_add(1, Ordering::SeqCst);
                    held.push(tcp);
                }
                () = r.notified() => held.clear(),
            }
        }
    });
    let warm = TestUpstream::start("warm").await;
    let toml = config(&sb, &format!("https://{addr}"))
        .route(
            "warm",
            Route::credential("/warm", &warm.http_url(), "flinks"),
        )
        .toml();
    let p = start_proxy(&toml).await;
    // A token first, so the burst goes straight to the upstream pool.
    assert_eq!(get(&proxy_url(&p, "/warm/x")).await.status, 200);
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (c, url) = (c.clone(), proxy_url(&p, &format!("/burst/{i}")));
        tasks.spawn(async move { get_with(&c, &url).await.status });
    }
    let metrics = p.state();
    eventually("the burst is in the proxy", || {
        metrics.metrics.inflight.get() == 8
    })
    .await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connect for the burst"
    );
    release.notify_one();
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task"), 502);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the waiters took the failure instead of connecting one after another"
    );
}
