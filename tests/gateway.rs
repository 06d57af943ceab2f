//! Gateway-grade operation (issue 4): access control, TLS and mTLS on the
//! listener, h2c, hot reload, graceful shutdown, connection limits, header
//! read timeout, and malformed or smuggling-shaped requests.
//!
//! In-process tests use `flinks_proxy::start`; reload and shutdown run the
//! real binary, because signals are what operators use.

mod support;
use support::*;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flinks_proxy::sandbox::Sandbox;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How long anything that should happen "soon" may take on a loaded box.
const PATIENCE: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ helpers

/// The sandbox config with TLS on the listener: a fresh server certificate
/// from `pki` (files written to `dir`), requiring client certificates from
/// `client_ca` when given.
fn tls_toml(sb: &Sandbox, dir: &TempDir, pki: &Pki, client_ca: Option<&Pki>) -> String {
    let leaf = pki.server();
    let mut c = ProxyToml::sandbox(sb);
    c.server.tls_cert = Some(dir.write("server.pem", &leaf.cert_pem));
    c.server.tls_key = Some(dir.write("server-key.pem", &leaf.key_pem));
    if let Some(ca) = client_ca {
        c.server.client_ca = Some(dir.write("clients-ca.pem", &ca.ca_pem));
    }
    c.toml()
}

/// A proxy whose listener serves TLS with a fresh certificate from `pki`.
async fn start_tls_proxy(sb: &Sandbox, dir: &TempDir, pki: &Pki) -> flinks_proxy::Running {
    start_proxy(&tls_toml(sb, dir, pki, None)).await
}

/// A TLS connector trusting `ca_pem`, offering `alpn`, presenting `leaf`
/// as client certificate when given.
fn tls_connector(ca_pem: &str, alpn: &[&[u8]], leaf: Option<&Leaf>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let mut config = match leaf {
        None => builder.with_no_client_auth(),
        Some(l) => {
            let chain = CertificateDer::pem_slice_iter(l.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("client cert PEM");
            let key = PrivateKeyDer::from_pem_slice(l.key_pem.as_bytes()).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert and key")
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    connector.connect(name, tcp).await
}

/// One HTTP/1.1 request on a fresh connection over `io`, with hyper's
/// client connection API.
async fn h1_request<I>(io: I, req: Request<Full<Bytes>>) -> Result<Resp, hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    read_resp(sender.send_request(req).await?).await
}

/// One HTTP/2 request on a fresh connection over `io`.
async fn h2_request<I>(io: I, req: Request<Full<Bytes>>) -> Result<Resp, hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.version(), Version::HTTP_2);
    read_resp(resp).await
}

async fn read_resp(resp: http::Response<hyper::body::Incoming>) -> Result<Resp, hyper::Error> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// `GET path` with a Host header, for hyper's connection-level clients.
fn get_req(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Full::default())
        .expect("request")
}

/// Polls `cond` every 20 ms until it holds or `PATIENCE` passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the proxy's credentials have their first token (`/readyz` 200).
async fn wait_ready(readyz_url: &str) {
    let end = Instant::now() + PATIENCE;
    loop {
        if get(readyz_url).await.status == StatusCode::OK {
            return;
        }
        assert!(Instant::now() < end, "{readyz_url} never turned 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a raw request got back.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// A status line; the code.
    Status(u16),
    /// The connection was closed (or reset) without a response.
    Closed,
}

/// Writes `bytes` on a fresh connection and reads until a complete
/// response head arrives or the connection closes.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> (Outcome, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // A server that refuses early may reset the connection mid-write.
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = Instant::now() + PATIENCE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => panic!(
                "neither an answer nor a close within {PATIENCE:?}; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    if buf.is_empty() {
        return (Outcome::Closed, buf);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let code = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {head:?}"));
    (Outcome::Status(code), buf)
}

/// Reads until the peer closes (or resets); panics after `PATIENCE`.
async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = Instant::now() + PATIENCE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => panic!(
                "connection still open after {PATIENCE:?}; read {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return buf,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Starts the binary and waits until both listeners are logged.
///
/// `ProxyProcess::start` stops reading at the first line with
/// `credential=`, which can be the refresh task's "token obtained" line
/// logged before "proxy listening"; it then returns `0.0.0.0:0` as the
/// proxy address. Wait for the startup route line and read the addresses
/// from the log instead.
fn recorded_paths(sb: &Sandbox) -> Vec<String> {
    sb.recorded()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect()
}

// ----------------------------------------------------------- access control

const KEY: &str = "k3y-for-legacy-app-0123456789";

/// The sandbox config with `[access] allow = allow`.
fn allowed_toml(sb: &Sandbox, allow: &[&str]) -> String {
    let allow = allow.iter().map(|a| a.to_string()).collect();
    ProxyToml::sandbox(sb)
        .with(|c| c.access_mut().allow = Some(allow))
        .toml()
}

fn keyed_toml(sb: &Sandbox) -> String {
    ProxyToml::sandbox(sb)
        .with(|c| c.access_mut().api_keys = Some(vec![KEY.into(), "other-key".into()]))
        .toml()
}

#[tokio::test]
async fn request_without_api_key_gets_407_with_proxy_authenticate() {
    let sb = sandbox().await;
    let p = start_proxy(&keyed_toml(&sb)).await;
    let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
    assert_eq!(r.status, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    assert!(
        r.header("proxy-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{:?}",
        r.headers
    );
    assert_eq!(r.json()["error"], "proxy_auth_required");
    assert_eq!(sb.api_requests(), 0);
}

#[tokio::test]
async fn request_with_wrong_api_key_gets_407() {
    let sb = sandbox().await;
    let p = start_proxy(&keyed_toml(&sb)).await;
    let c = client();
    for value in [
        "Bearer wrong".to_string(),
        format!("Bearer {KEY}x"),
        format!("Bearer {}", &KEY[..KEY.len() - 1]),
        format!("Basic {KEY}"),
        KEY.to_string(),
        "Bearer ".to_string(),
    ] {
        let req = Request::get(proxy_url(&p, "/api/v1/accounts"))
            .header("proxy-authorization", &value)
            .body(Full::default())
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(
            r.status,
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "Proxy-Authorization: {value}"
        );
        assert!(r.header("proxy-authenticate").is_some());
    }
    assert_eq!(sb.api_requests(), 0);
}

#[tokio::test]
async fn request_with_right_api_key_is_forwarded_without_the_key() {
    let sb = sandbox().await;
    let p = start_proxy(&keyed_toml(&sb)).await;
    let c = client();
    for key in [KEY, "other-key"] {
        let req = Request::get(proxy_url(&p, "/anything?x=1"))
            .header("proxy-authorization", format!("Bearer {key}"))
            .body(Full::default())
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let recorded = sb.recorded();
    assert_eq!(recorded.len(), 2);
    for rec in recorded {
        assert!(rec.token_valid, "the upstream got the proxy's token");
        for (name, value) in &rec.headers {
            assert_ne!(name, "proxy-authorization", "{:?}", rec.headers);
            assert!(
                !value.contains(KEY) && !value.contains("other-key"),
                "the API key leaked upstream in {name}: {value}"
            );
        }
    }
}

#[tokio::test]
async fn client_outside_allow_list_gets_403() {
    let sb = sandbox().await;
    let p = start_proxy(&allowed_toml(&sb, &["10.0.0.0/8", "::1"])).await;
    let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.json()["error"], "forbidden");
    assert_eq!(sb.api_requests(), 0);
}

#[tokio::test]
async fn client_inside_allow_list_is_served() {
    let sb = sandbox().await;
    let p = start_proxy(&allowed_toml(&sb, &["127.0.0.0/8"])).await;
    let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sb.api_requests(), 1);
}

#[tokio::test]
async fn allow_list_is_checked_before_the_api_key() {
    let sb = sandbox().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| {
            c.access_mut().allow = Some(vec!["10.0.0.0/8".to_owned()]);
            c.access_mut().api_keys = Some(vec![KEY.into()]);
        })
        .toml();
    let p = start_proxy(&toml).await;
    let req = Request::get(proxy_url(&p, "/api/v1/accounts"))
        .header("proxy-authorization", format!("Bearer {KEY}"))
        .body(Full::default())
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(sb.api_requests(), 0);
}

// ---------------------------------------------------------------------- TLS

#[tokio::test]
async fn tls_listener_serves_http1_by_alpn() {
    let sb = sandbox().await;
    let dir = TempDir::new();
    let pki = Pki::new("server");
    let p = start_tls_proxy(&sb, &dir, &pki).await;
    let tls = tls_connect(
        p.proxy_addr(),
        &tls_connector(&pki.ca_pem, &[b"http/1.1"], None),
    )
    .await
    .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let r = h1_request(tls, get_req("/anything"))
        .await
        .expect("response");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let rec = sb.recorded().pop().expect("recorded");
    assert!(rec
        .headers
        .iter()
        .any(|(k, v)| k == "x-forwarded-proto" && v == "https"));
}

#[tokio::test]
async fn tls_listener_serves_http2_by_alpn() {
    let sb = sandbox().await;
    let dir = TempDir::new();
    let pki = Pki::new("server");
    let p = start_tls_proxy(&sb, &dir, &pki).await;
    let tls = tls_connect(
        p.proxy_addr(),
        &tls_connector(&pki.ca_pem, &[b"h2", b"http/1.1"], None),
    )
    .await
    .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let req = Request::get(format!(
        "https://localhost:{}/api/v1/accounts",
        p.proxy_addr().port()
    ))
    .body(Full::default())
    .unwrap();
    let r = h2_request(tls, req).await.expect("response");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sb.api_requests(), 1);
}

#[tokio::test]
async fn tls_listener_without_alpn_speaks_http1() {
    let sb = sandbox().await;
    let dir = TempDir::new();
    let pki = Pki::new("server");
    let p = start_tls_proxy(&sb, &dir, &pki).await;
    let tls = tls_connect(p.proxy_addr(), &tls_connector(&pki.ca_pem, &[], None))
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let r = h1_request(tls, get_req("/api/v1/accounts"))
        .await
        .expect("response");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test]
async fn h2c_prior_knowledge_works_on_plain_tcp() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let tcp = TcpStream::connect(p.proxy_addr()).await.unwrap();
    let req = Request::get(proxy_url(&p, "/api/v1/accounts"))
        .body(Full::default())
        .unwrap();
    let r = h2_request(tcp, req).await.expect("response");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sb.api_requests(), 1);
}

/// Whether any HTTP response can be had over TLS with these client
/// settings. With TLS 1.3 the client finishes its handshake before the
/// server has checked the client certificate, so refusal may only show on
/// the first request: try both HTTP versions.
async fn mtls_gets_a_response(addr: SocketAddr, ca: &Pki, leaf: Option<&Leaf>) -> Option<Resp> {
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let Ok(tls) = tls_connect(addr, &tls_connector(&ca.ca_pem, &[alpn], leaf)).await else {
            continue;
        };
        let r = if alpn == b"h2" {
            let req = Request::get(format!("https://localhost:{}/anything", addr.port()))
                .body(Full::default())
                .unwrap();
            tokio::time::timeout(PATIENCE, h2_request(tls, req)).await
        } else {
            tokio::time::timeout(PATIENCE, h1_request(tls, get_req("/anything"))).await
        };
        match r {
            Ok(Ok(resp)) => return Some(resp),
            Ok(Err(_)) => {}
            Err(_) => panic!("the server neither answered nor closed the connection"),
        }
    }
    None
}

struct MtlsSetup {
    sb: Sandbox,
    proxy: flinks_proxy::Running,
    server_pki: Pki,
    client_pki: Pki,
    _dir: TempDir,
}

async fn mtls_proxy() -> MtlsSetup {
    let sb = sandbox().await;
    let dir = TempDir::new();
    let server_pki = Pki::new("server");
    let client_pki = Pki::new("clients");
    let proxy = start_proxy(&tls_toml(&sb, &dir, &server_pki, Some(&client_pki))).await;
    MtlsSetup {
        sb,
        proxy,
        server_pki,
        client_pki,
        _dir: dir,
    }
}

#[tokio::test]
async fn mtls_refuses_a_client_without_certificate() {
    let s = mtls_proxy().await;
    let r = mtls_gets_a_response(s.proxy.proxy_addr(), &s.server_pki, None).await;
    assert!(r.is_none(), "served without a client certificate: {r:?}");
    assert_eq!(s.sb.api_requests(), 0);
}

#[tokio::test]
async fn mtls_refuses_a_certificate_from_another_ca() {
    let s = mtls_proxy().await;
    let stranger = Pki::new("stranger").client("mallory");
    let r = mtls_gets_a_response(s.proxy.proxy_addr(), &s.server_pki, Some(&stranger)).await;
    assert!(r.is_none(), "served a foreign client certificate: {r:?}");
    assert_eq!(s.sb.api_requests(), 0);
}

#[tokio::test]
async fn mtls_serves_a_valid_client_certificate_over_http1_and_http2() {
    let s = mtls_proxy().await;
    let alice = s.client_pki.client("alice");
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let tls = tls_connect(
            s.proxy.proxy_addr(),
            &tls_connector(&s.server_pki.ca_pem, &[alpn], Some(&alice)),
        )
        .await
        .expect("TLS handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let r = if alpn == b"h2" {
            let req = Request::get(format!(
                "https://localhost:{}/api/v1/accounts",
                s.proxy.proxy_addr().port()
            ))
            .body(Full::default())
            .unwrap();
            h2_request(tls, req).await
        } else {
            h1_request(tls, get_req("/api/v1/accounts")).await
        }
        .expect("response");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(s.sb.api_requests(), 2);
}

#[tokio::test]
async fn reload_swaps_the_listener_certificate_for_new_connections() {
    let sb = sandbox().await;
    let dir = TempDir::new();
    let old_pki = Pki::new("old");
    let p = start_proxy(&tls_toml(&sb, &dir, &old_pki, None)).await;
    let new_pki = Pki::new("new");
    let new_dir = TempDir::new();
    let toml = tls_toml(&sb, &new_dir, &new_pki, None);
    p.reload(parse_config(&toml, new_dir.path()))
        .expect("reload");
    let old_client = tls_connector(&old_pki.ca_pem, &[b"http/1.1"], None);
    assert!(
        tls_connect(p.proxy_addr(), &old_client).await.is_err(),
        "the old certificate is still served"
    );
    let tls = tls_connect(
        p.proxy_addr(),
        &tls_connector(&new_pki.ca_pem, &[b"http/1.1"], None),
    )
    .await
    .expect("TLS handshake with the new certificate");
    let r = h1_request(tls, get_req("/api/v1/accounts"))
        .await
        .expect("response");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

// ------------------------------------------------------------------- reload

/// The reload scenario's first config: route `/` → sandbox 1.
fn reload_before(sb1: &Sandbox) -> String {
    ProxyToml::sandbox(sb1).toml()
}

/// The second config: route `/` → sandbox 2 with a new credential, plus a
/// new route `/added` → sandbox 1 with the unchanged credential.
fn reload_after(sb1: &Sandbox, sb2: &Sandbox) -> ProxyToml {
    ProxyToml::sandbox(sb1)
        .credential("second", Credential::sandbox(sb2))
        .with(|c| *c.route_mut("flinks") = Route::credential("/", &sb2.api_url(), "second"))
        .route(
            "added",
            Route::credential("/added", &sb1.api_url(), "flinks"),
        )
}

#[test]
fn sighup_reload_follows_the_new_file_and_keeps_unchanged_tokens() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (sb1, sb2) = rt.block_on(async { (sandbox().await, sandbox().await) });
    let dir = TempDir::new();
    let cfg = dir.write("proxy.toml", reload_before(&sb1));
    let p = ProxyProcess::start(&cfg, &[]);

    // Old config: everything goes to sandbox 1.
    rt.block_on(async {
        let r = get(&p.url("/api/v1/accounts")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let r = get(&p.url("/added/x")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    });
    assert_eq!(sb1.api_requests(), 2);
    assert_eq!(sb2.api_requests(), 0);
    let tokens_before = sb1.token_requests();
    assert_eq!(tokens_before, 1);

    dir.write("proxy.toml", reload_after(&sb1, &sb2).toml());
    p.signal("HUP");
    assert!(
        p.wait_for_log("config reloaded", PATIENCE),
        "no reload logged:\n{}",
        p.log()
    );

    // New config: `/` goes to sandbox 2 (new credential), `/added` to
    // sandbox 1 with the token it already had.
    rt.block_on(async {
        let r = get(&p.url("/api/v1/accounts")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(sb2.api_requests(), 1);
        let r = get(&p.url("/added/y")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(sb1.api_requests(), 3);
        assert_eq!(
            recorded_paths(&sb1).last().map(String::as_str),
            Some("/added/y")
        );
    });
    assert_eq!(
        sb1.token_requests(),
        tokens_before,
        "the unchanged credential fetched a new token on reload"
    );
    assert_eq!(sb2.token_requests(), 1);

    // A broken file: logged with the key at fault, the running config stays.
    let broken = reload_after(&sb1, &sb2)
        .route(
            "broken",
            Route::credential("/broken", &sb1.api_url(), "nope"),
        )
        .toml();
    dir.write("proxy.toml", broken);
    p.signal("HUP");
    assert!(
        p.wait_for_log("config reload failed", PATIENCE),
        "no failed reload logged:\n{}",
        p.log()
    );
    let failure_line = p
        .log()
        .lines()
        .find(|l| l.contains("config reload failed"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        failure_line.contains("routes.broken"),
        "the failure does not name the key: {failure_line}"
    );
    rt.block_on(async {
        let r = get(&p.url("/broken/z")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            sb2.api_requests(),
            2,
            "/broken still routes by `/` to sandbox 2"
        );
        let r = get(&p.url("/added/z")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(sb1.api_requests(), 4);
        let m = get(&p.admin("/metrics")).await.text();
        assert_eq!(
            metric(
                &m,
                r#"flinks_proxy_config_reloads_total{outcome="success"}"#
            ),
            Some(1.0),
            "{m}"
        );
        assert_eq!(
            metric(
                &m,
                r#"flinks_proxy_config_reloads_total{outcome="failure"}"#
            ),
            Some(1.0),
            "{m}"
        );
    });
    assert_eq!(sb1.token_requests(), tokens_before);
}

#[tokio::test]
async fn in_process_reload_keeps_in_flight_requests_on_their_config() {
    let (sb1, sb2) = (sandbox().await, sandbox().await);
    let dir = TempDir::new();
    let p = start_proxy(&reload_before(&sb1)).await;
    wait_ready(&admin_url(&p, "/readyz")).await;
    sb1.set_api_delay(Duration::from_millis(1500));
    let url = proxy_url(&p, "/api/v1/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    eventually("the slow request reaches sandbox 1", || {
        sb1.api_requests() == 1
    })
    .await;

    p.reload(parse_config(&reload_after(&sb1, &sb2).toml(), dir.path()))
        .expect("reload");
    let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sb2.api_requests(), 1, "new requests follow the new config");

    let r = in_flight.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(sb1.api_requests(), 1);
    assert_eq!(sb1.token_requests(), 1);
    let m = get(&admin_url(&p, "/metrics")).await.text();
    assert_eq!(
        metric(
            &m,
            r#"flinks_proxy_config_reloads_total{outcome="success"}"#
        ),
        Some(1.0)
    );
}

// ----------------------------------------------------------------- shutdown

#[test]
fn sigterm_lets_the_in_flight_request_finish_and_refuses_new_connections() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sb = rt.block_on(sandbox());
    let dir = TempDir::new();
    let cfg = dir.write(
        "proxy.toml",
        ProxyToml::sandbox(&sb)
            .with(|c| c.server.shutdown_grace = Some(Duration::from_secs(10)))
            .toml(),
    );
    let mut p = ProxyProcess::start(&cfg, &[]);
    rt.block_on(wait_ready(&p.admin("/readyz")));

    sb.set_api_delay(Duration::from_secs(2));
    let url = p.url("/api/v1/accounts");
    let in_flight = rt.spawn(async move { get(&url).await });
    rt.block_on(eventually("the request reaches the upstream", || {
        sb.api_requests() == 1
    }));

    let signalled = Instant::now();
    p.signal("TERM");
    assert!(
        p.wait_for_log("stopped accepting", PATIENCE),
        "no drain logged:\n{}",
        p.log()
    );
    assert!(
        !in_flight.is_finished(),
        "the 2 s request finished before the checks below could run"
    );
    // The admin listener stays up while draining and says so.
    let ready = rt.block_on(get(&p.admin("/readyz")));
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text()
    );
    // The proxy listener is closed: new connections are refused.
    let connect = rt.block_on(TcpStream::connect(p.proxy_addr));
    assert!(
        connect.is_err(),
        "a new connection was accepted after SIGTERM"
    );
    assert!(!in_flight.is_finished());

    let r = rt.block_on(in_flight).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(p.wait_exit(PATIENCE), Some(0), "log:\n{}", p.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exit took longer than the grace period"
    );
}

#[test]
fn idle_connections_do_not_hold_up_shutdown() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sb = rt.block_on(sandbox());
    let dir = TempDir::new();
    let cfg = dir.write(
        "proxy.toml",
        ProxyToml::sandbox(&sb)
            .with(|c| c.server.shutdown_grace = Some(Duration::from_secs(60)))
            .toml(),
    );
    let mut p = ProxyProcess::start(&cfg, &[]);
    let addr = p.proxy_addr;
    // One idle HTTP/1.1 keep-alive connection and one idle h2c connection,
    // each after a served request.
    let (h1_conn, h2_conn, _senders) = rt.block_on(async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut s1, c1) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let h1_conn = tokio::spawn(c1);
        let r = read_resp(s1.send_request(get_req("/api/v1/accounts")).await.unwrap())
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut s2, c2) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let h2_conn = tokio::spawn(c2);
        let req = Request::get(format!("http://{addr}/api/v1/accounts"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let r = read_resp(s2.send_request(req).await.unwrap())
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        (h1_conn, h2_conn, (s1, s2))
    });
    let signalled = Instant::now();
    p.signal("TERM");
    assert_eq!(p.wait_exit(PATIENCE), Some(0), "log:\n{}", p.log());
    assert!(
        signalled.elapsed() < PATIENCE,
        "idle connections held the drain"
    );
    // Both connections ended (HTTP/2 with GOAWAY, HTTP/1.1 by closing).
    rt.block_on(async {
        let h1 = tokio::time::timeout(PATIENCE, h1_conn)
            .await
            .expect("the HTTP/1.1 connection is still open")
            .unwrap();
        assert!(h1.is_ok(), "HTTP/1.1 connection: {h1:?}");
        let h2 = tokio::time::timeout(PATIENCE, h2_conn)
            .await
            .expect("the HTTP/2 connection is still open")
            .unwrap();
        assert!(h2.is_ok(), "HTTP/2 connection ended without GOAWAY: {h2:?}");
    });
}

// ------------------------------------------------------------------- limits

#[tokio::test]
async fn slow_header_client_is_cut_off_while_others_are_served() {
    let sb = sandbox().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| c.server.header_read_timeout = Some(Duration::from_millis(500)))
        .toml();
    let p = start_proxy(&toml).await;
    let mut slow = TcpStream::connect(p.proxy_addr()).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /api/v1/accounts HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let cut = tokio::spawn(async move {
        let got = tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut slow)).await;
        (got, started.elapsed())
    });
    // Meanwhile other clients are served, on fresh connections each time.
    let mut served = 0;
    while !cut.is_finished() {
        let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
        assert_eq!(r.status, StatusCode::OK);
        served += 1;
    }
    assert!(served >= 1);
    let (got, elapsed) = cut.await.unwrap();
    let got = got.expect("the slow client was still connected after 5 s");
    // Closed without an answer, or with a 4xx (408) at most.
    let text = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
    assert!(
        elapsed >= Duration::from_millis(450),
        "cut off after {elapsed:?}, before header_read_timeout"
    );
    assert_eq!(sb.api_requests(), served);
}

#[tokio::test]
async fn idle_connection_that_sends_nothing_is_closed() {
    let sb = sandbox().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| c.server.header_read_timeout = Some(Duration::from_millis(500)))
        .toml();
    let p = start_proxy(&toml).await;
    let mut idle = TcpStream::connect(p.proxy_addr()).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("the idle connection was still open after 5 s");
    assert!(matches!(r, Ok(0) | Err(_)), "got {r:?}");
    assert!(started.elapsed() >= Duration::from_millis(450));
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_header_read_timeout() {
    let sb = sandbox().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| c.server.header_read_timeout = Some(Duration::from_millis(500)))
        .toml();
    let p = start_proxy(&toml).await;
    let mut s = TcpStream::connect(p.proxy_addr()).await.unwrap();
    s.write_all(b"GET /api/v1/accounts HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut s))
        .await
        .expect("the idle keep-alive connection was still open after 5 s");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
}

/// A client that hangs up while its request waits on a slow upstream
/// abandons the request: the proxy drops it, and its upstream exchange,
/// within seconds of the close (hyper reads the socket mid-request and
/// sees the FIN), not when the upstream would answer.
#[tokio::test]
async fn a_request_whose_client_hung_up_is_abandoned_within_seconds() {
    let sb = sandbox().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| c.server.request_timeout = Some(Duration::from_secs(120)))
        .toml();
    let p = start_proxy(&toml).await;
    wait_ready(&admin_url(&p, "/readyz")).await;
    sb.set_api_delay(Duration::from_secs(100));
    let inflight = || async {
        let m = get(&admin_url(&p, "/metrics")).await.text();
        metric(&m, "flinks_proxy_inflight_requests").expect("the inflight gauge")
    };
    let mut s = TcpStream::connect(p.proxy_addr()).await.unwrap();
    s.write_all(b"GET /api/v1/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    eventually("the request reaches the upstream", || {
        sb.api_requests() == 1
    })
    .await;
    assert_eq!(inflight().await, 1.0);
    let hung_up = Instant::now();
    drop(s);
    let end = hung_up + Duration::from_secs(15);
    while inflight().await != 0.0 {
        assert!(
            Instant::now() < end,
            "the abandoned request was still in flight after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The proxy goes on serving.
    sb.set_api_delay(Duration::ZERO);
    assert_eq!(
        get(&proxy_url(&p, "/api/v1/accounts")).await.status,
        StatusCode::OK
    );
}

/// On HTTP/2 the head deadline ends with the first request: an HTTP/2
/// connection idle between requests stays up until `idle_timeout` (and then
/// gets a GOAWAY), where an HTTP/1.1 one is cut at `header_read_timeout`.
#[tokio::test]
async fn an_http2_connection_idle_after_a_request_outlives_header_read_timeout() {
    let sb = sandbox().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| c.server.header_read_timeout = Some(Duration::from_millis(300)))
        .toml();
    let p = start_proxy(&toml).await;
    let tcp = TcpStream::connect(p.proxy_addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = || {
        Request::get(proxy_url(&p, "/api/v1/accounts"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let r = read_resp(sender.send_request(req()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    // Nothing to await: the watchdog's check is what must not happen.
    // Three deadlines go by (each re-checked by the watchdog).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(!conn.is_finished(), "the HTTP/2 connection was cut");
    let r = read_resp(sender.send_request(req()).await.expect("a second request"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sb.api_requests(), 2);
}

#[tokio::test]
async fn max_connections_holds_back_a_third_connection_until_one_closes() {
    let sb = sandbox().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| {
            c.server.max_connections = Some(2);
            c.server.header_read_timeout = Some(Duration::from_secs(60));
        })
        .toml();
    let p = start_proxy(&toml).await;
    let addr = p.proxy_addr();
    // Two connections, each served once, then left idle but open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        let r = read_resp(
            sender
                .send_request(get_req("/api/v1/accounts"))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        held.push((sender, task));
    }

    // A third connection gets no answer while both are open.
    let tcp = TcpStream::connect(addr).await.expect("kernel backlog");
    let (mut third, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let pending = third.send_request(get_req("/api/v1/accounts"));
    tokio::pin!(pending);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut pending)
            .await
            .is_err(),
        "a third connection was served beyond max_connections = 2"
    );

    // The held connections are still served.
    for (sender, _) in &mut held {
        let r = read_resp(
            sender
                .send_request(get_req("/api/v1/accounts"))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }

    // Closing one lets the third in.
    let (sender, task) = held.pop().unwrap();
    drop(sender);
    task.abort();
    let r = tokio::time::timeout(PATIENCE, pending)
        .await
        .expect("the third connection was not served after one closed")
        .expect("response");
    assert_eq!(read_resp(r).await.unwrap().status, StatusCode::OK);
    assert_eq!(sb.api_requests(), 5);
}

// ------------------------------------------------------ malformed requests

/// Requests hyper or the handler must refuse: each gets a 4xx or a closed
/// connection, and none reaches the upstream. Every path contains
/// "smuggle" so a leak shows in the sandbox's record.
fn refused_requests() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases: Vec<(&'static str, Vec<u8>)> = vec![
        (
            "two different Content-Lengths",
            b"POST /smuggle/cl-cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
        ),
        (
            "Content-Length list with different values",
            b"POST /smuggle/cl-list HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!".to_vec(),
        ),
        (
            "Content-Length with a sign",
            b"POST /smuggle/cl-sign HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello".to_vec(),
        ),
        (
            "negative Content-Length",
            b"POST /smuggle/cl-neg HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(),
        ),
        (
            "bad chunk size",
            b"POST /smuggle/chunk-zz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "chunk size overflow",
            b"POST /smuggle/chunk-overflow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "chunk data longer than its size",
            b"POST /smuggle/chunk-long HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "Transfer-Encoding: xchunked",
            b"POST /smuggle/xchunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            b"POST /smuggle/chunked-identity HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST /smuggle/te-http10 HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "space before the colon of Transfer-Encoding",
            b"POST /smuggle/te-space HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "vertical tab in Transfer-Encoding",
            b"POST /smuggle/te-vtab HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\x0bchunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "NUL in a header value",
            b"GET /smuggle/nul HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".to_vec(),
        ),
        (
            "bare CR in a header value",
            b"GET /smuggle/bare-cr HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n".to_vec(),
        ),
        (
            "space before the colon of a header name",
            b"GET /smuggle/name-space HTTP/1.1\r\nHost : x\r\n\r\n".to_vec(),
        ),
        (
            "obs-fold line continuation",
            b"GET /smuggle/obs-fold HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n".to_vec(),
        ),
        (
            "whitespace before the first header",
            b"GET /smuggle/ws-first HTTP/1.1\r\n Host: x\r\n\r\n".to_vec(),
        ),
        (
            "bad method token",
            b"G(T /smuggle/method HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "NUL in the request target",
            b"GET /smuggle/\0target HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "garbage after the version",
            b"GET /smuggle/line HTTP/1.1 extra\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/2.0 in an HTTP/1 request line",
            b"GET /smuggle/h2-line HTTP/2.0\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "unknown HTTP version",
            b"GET /smuggle/version HTTP/1.7\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "missing Host on HTTP/1.1 (RFC 9112 3.2: MUST 400)",
            b"GET /smuggle/no-host HTTP/1.1\r\nX-A: a\r\n\r\n".to_vec(),
        ),
        (
            "two Host headers (RFC 9112 3.2: MUST 400)",
            b"GET /smuggle/two-hosts HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".to_vec(),
        ),
        (
            "asterisk target with GET",
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "absolute-form target with userinfo",
            b"GET http://user:pass@x/smuggle/userinfo HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "CONNECT",
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_vec(),
        ),
        (
            "dot segments in the path",
            b"GET /smuggle/../admin HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "encoded dot segments in the path",
            b"GET /smuggle/%2e%2E/admin HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "dot segment with a path parameter",
            b"GET /smuggle/..;/admin HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "encoded dot segment with an encoded path parameter",
            b"GET /smuggle/%2e%2e%3b/admin HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "dot segment before an encoded slash",
            b"GET /smuggle/..%2fadmin HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "dot segment before an encoded backslash",
            b"GET /smuggle/.%2e%5cadmin HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
    ];
    let mut long_line = b"GET /smuggle/long-header HTTP/1.1\r\nHost: x\r\nX-Long: ".to_vec();
    long_line.extend(std::iter::repeat_n(b'a', 100 * 1024));
    long_line.extend_from_slice(b"\r\n\r\n");
    cases.push(("a 100 KiB header line", long_line));
    let mut many = b"GET /smuggle/many-headers HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("X-H-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    cases.push(("200 headers", many));
    cases
}

#[tokio::test]
async fn malformed_and_smuggling_requests_are_refused_and_never_forwarded() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let addr = p.proxy_addr();
    // A first request, so every case below finds a token ready.
    assert_eq!(get(&proxy_url(&p, "/api/v1/accounts")).await.status, 200);
    let cases = refused_requests();
    // Control: the same exchange and verdict accept a well-formed request
    // (it is answered 200 and reaches the upstream), so a case can only
    // pass by being refused.
    let before = sb.api_requests();
    let (outcome, head) = raw_exchange(addr, b"GET /control HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        matches!(outcome, Outcome::Status(200)),
        "control request: {outcome:?} {:?}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(
        sb.api_requests(),
        before + 1,
        "control request not forwarded"
    );
    let mut report = Vec::new();
    for (name, bytes) in &cases {
        let before = sb.api_requests();
        let (outcome, head) = raw_exchange(addr, bytes).await;
        let ok = match outcome {
            Outcome::Closed => true,
            Outcome::Status(code) => (400..500).contains(&code),
        };
        if !ok || sb.api_requests() != before {
            report.push(format!(
                "{name}: {outcome:?}, upstream requests {} -> {}; got {:?}",
                before,
                sb.api_requests(),
                String::from_utf8_lossy(&head[..head.len().min(200)])
            ));
        }
        // The proxy keeps serving after each.
        let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
        assert_eq!(r.status, StatusCode::OK, "after {name}: {}", r.text());
    }
    let leaked: Vec<String> = recorded_paths(&sb)
        .into_iter()
        .filter(|p| p.contains("smuggle") || p.contains("admin"))
        .collect();
    assert!(
        report.is_empty() && leaked.is_empty(),
        "refused requests that were not refused:\n{}\nreached the upstream: {leaked:?}",
        report.join("\n")
    );
    // The first request, the control, and one after each case.
    assert_eq!(sb.api_requests(), 2 + cases.len() as u64);
}

/// RFC 9112 §6.3: with both Content-Length and Transfer-Encoding,
/// Transfer-Encoding wins, the message is at most forwarded once with the
/// chunked body (never Content-Length framing), and the connection is closed
/// after the response so leftover bytes are never read as a second request.
#[tokio::test]
async fn content_length_with_transfer_encoding_never_smuggles_a_second_request() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    assert_eq!(get(&proxy_url(&p, "/api/v1/accounts")).await.status, 200);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases = [
        // CL.TE: a CL-framing front end would see the smuggled request as body.
        format!(
            "POST /cl-te HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        ),
        // TE.CL: the chunk holds what a CL-framing back end would take as a
        // second request.
        format!(
            "POST /te-cl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
            smuggled.len()
        ),
    ];
    for (i, raw) in cases.iter().enumerate() {
        let before = sb.api_requests();
        let mut s = TcpStream::connect(p.proxy_addr()).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let got = read_to_close(&mut s).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.matches("HTTP/1.1 ").count() <= 1,
            "case {i}: more than one response on the connection: {text}"
        );
        let forwarded = sb.api_requests() - before;
        if text.starts_with("HTTP/1.1 4") {
            assert_eq!(forwarded, 0, "case {i}: refused yet forwarded");
        } else {
            assert!(text.starts_with("HTTP/1.1 200"), "case {i}: {text}");
            assert_eq!(forwarded, 1, "case {i}");
            let rec = sb.recorded().pop().unwrap();
            let expected_body: &[u8] = if i == 0 { b"" } else { smuggled.as_bytes() };
            assert_eq!(
                rec.body, expected_body,
                "case {i}: the body was not framed by Transfer-Encoding"
            );
            assert!(
                !rec.headers.iter().any(|(k, v)| k == "transfer-encoding"
                    || (k == "content-length" && v != &expected_body.len().to_string())),
                "case {i}: conflicting framing forwarded: {:?}",
                rec.headers
            );
        }
    }
    assert!(
        !recorded_paths(&sb).iter().any(|p| p == "/smuggled"),
        "the smuggled request reached the upstream"
    );
    assert_eq!(get(&proxy_url(&p, "/api/v1/accounts")).await.status, 200);
}

// ------------------------------------------------------------ startup warning

#[test]
fn loopback_listener_without_access_rules_logs_no_exposure_warning() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sb = rt.block_on(sandbox());
    let dir = TempDir::new();
    let cfg = dir.write("proxy.toml", ProxyToml::sandbox(&sb).toml());
    let p = ProxyProcess::start(&cfg, &[]);
    // A request line is logged after every startup line.
    let r = rt.block_on(get(&p.url("/api/v1/accounts")));
    assert_eq!(r.status, StatusCode::OK);
    assert!(p.wait_for_log("status=200", PATIENCE), "{}", p.log());
    let log = p.log();
    assert!(!log.contains("beyond loopback"), "{log}");
}

/// A route without `reauth_on` streams the request body, so the head may
/// already be upstream when the body turns out malformed. The client's
/// fault must still be answered as one (4xx or close, never a 502 that
/// blames the upstream), and the upstream never gets a complete request.
#[tokio::test]
async fn malformed_chunked_body_on_a_streaming_route_is_a_client_error() {
    let sb = sandbox().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| c.route_mut("flinks").reauth_on = Some(vec![]))
        .toml();
    let p = start_proxy(&toml).await;
    assert_eq!(get(&proxy_url(&p, "/api/v1/accounts")).await.status, 200);
    let cases: [&[u8]; 3] = [
        b"POST /stream/long HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
        b"POST /stream/zz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST /stream/overflow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
    ];
    for raw in cases {
        let (outcome, head) = raw_exchange(p.proxy_addr(), raw).await;
        assert!(
            matches!(outcome, Outcome::Closed | Outcome::Status(400..=499)),
            "{outcome:?} for {:?}: {:?}",
            String::from_utf8_lossy(raw),
            String::from_utf8_lossy(&head)
        );
    }
    assert_eq!(get(&proxy_url(&p, "/api/v1/accounts")).await.status, 200);
    for rec in sb.recorded() {
        if rec.path_and_query.starts_with("/stream") {
            assert!(
                rec.body.is_empty(),
                "the upstream read a complete body for {}: {:?}",
                rec.path_and_query,
                rec.body
            );
        }
    }
}
