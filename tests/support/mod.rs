//! Test support: real servers on loopback, a plain HTTP client, a test PKI,
//! and a way to run the real binary as a child process.
//!
//! Every test file includes this with `mod support;` and uses what it needs.
#![allow(dead_code)]

pub mod chaos;
pub mod connections;
pub mod durability;
pub mod postgres;
pub mod prometheus;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flinks_proxy::sandbox::{Sandbox, SandboxOptions};
use flinks_proxy::{Config, Running};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A unique, empty temporary folder (removed when dropped).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "flinks-proxy-test-{}-{n}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// Writes a file and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sandbox with default options.
pub async fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions::default())
        .await
        .expect("sandbox")
}

/// A sandbox with options.
pub async fn sandbox_with(opts: SandboxOptions) -> Sandbox {
    Sandbox::start(opts).await.expect("sandbox")
}

/// The `[credentials.flinks]` table for a sandbox (client_credentials, JSON).
pub fn credential_toml(sb: &Sandbox) -> String {
    let o = SandboxOptions::default();
    format!(
        r#"
[credentials.flinks]
token_url = "{}"
grant_type = "client_credentials"
client_id = "{}"
client_secret = "{}"
scope = "client:admin"
token_timeout = "2s"
"#,
        sb.token_url(),
        o.client_id,
        o.client_secret
    )
}

/// A complete config: listeners on port 0, the sandbox credential, one
/// route `/` to the sandbox API, plus `extra` TOML appended.
pub fn config_toml(sb: &Sandbox, extra: &str) -> String {
    config_toml_with_server(sb, "", extra)
}

/// Like [`config_toml`], with `server` lines added to `[server]`.
pub fn config_toml_with_server(sb: &Sandbox, server: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "5s"
{server}
[admin]
listen = "127.0.0.1:0"
{cred}
[routes.flinks]
path_prefix = "/"
upstream = "{api}"
credential = "flinks"
{extra}
"#,
        cred = credential_toml(sb),
        api = sb.api_url(),
    )
}

/// Parses config text (relative paths resolve against `dir`).
pub fn parse_config(toml: &str, dir: &Path) -> Config {
    Config::parse(toml, &dir.join("proxy.toml")).unwrap_or_else(|e| panic!("config: {e}\n{toml}"))
}

/// Starts the proxy in this process.
pub async fn start_proxy(toml: &str) -> Running {
    let dir = std::env::temp_dir();
    flinks_proxy::start(parse_config(toml, &dir))
        .await
        .expect("proxy starts")
}

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A plain HTTP/1.1 client with keep-alive.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and reads the whole response.
pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Resp {
    let resp = client.request(req).await.expect("request sent");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body read").to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// GET a URL.
pub async fn get(url: &str) -> Resp {
    send(
        &client(),
        Request::get(url).body(Full::default()).expect("request"),
    )
    .await
}

/// GET a URL with the given client.
pub async fn get_with(client: &HttpClient, url: &str) -> Resp {
    send(
        client,
        Request::get(url).body(Full::default()).expect("request"),
    )
    .await
}

/// The admin URL of a running proxy.
pub fn admin_url(p: &Running, path: &str) -> String {
    format!("http://{}{path}", p.admin_addr().expect("admin listener"))
}

/// The proxy URL of a running proxy.
pub fn proxy_url(p: &Running, path: &str) -> String {
    format!("http://{}{path}", p.proxy_addr())
}

/// Reads one sample value from Prometheus text: `name{labels}` exactly as
/// rendered (labels in the order the registry prints them, sorted by name).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

// ------------------------------------------------------------------ PKI

/// A test certificate authority and the certificates it signs.
pub struct Pki {
    pub ca_pem: String,
    ca: rcgen::CertifiedKey,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        Pki {
            ca_pem: cert.pem(),
            ca: rcgen::CertifiedKey {
                cert,
                key_pair: key,
            },
        }
    }

    fn leaf(&self, names: &[&str], client: bool) -> Leaf {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.ca.cert, &self.ca.key_pair)
            .expect("signed");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        self.leaf(&["localhost", "127.0.0.1"], false)
    }

    /// A server certificate for exactly `names`.
    pub fn server_named(&self, names: &[&str]) -> Leaf {
        self.leaf(names, false)
    }

    /// A client certificate.
    pub fn client(&self, name: &str) -> Leaf {
        self.leaf(&[name], true)
    }
}

// ------------------------------------------------------------- child process

/// The real binary, running with a config file; its stderr is captured.
pub struct ProxyProcess {
    pub child: Child,
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub log: Arc<Mutex<String>>,
    lines: std::sync::mpsc::Receiver<String>,
}

/// Path of the built binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_flinks-proxy")
}

/// Runs the binary with `args` to completion; returns (exit code, stdout, stderr).
pub fn run_binary(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl ProxyProcess {
    /// Starts `flinks-proxy --config PATH` and waits for its listeners.
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> ProxyProcess {
        let mut child = Command::new(binary())
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push_str(&line);
                log2.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        let mut p = ProxyProcess {
            child,
            proxy_addr: "0.0.0.0:0".parse().unwrap(),
            admin_addr: None,
            log,
            lines: rx,
        };
        // `addr=A` in text lines, `"addr":"A"` in JSON ones (where it may be
        // the last field, before the closing brace).
        let addr_of = |line: &str| -> Option<SocketAddr> {
            line.split([' ', ','])
                .find_map(|w| w.strip_prefix("addr=").or(w.strip_prefix("\"addr\":")))
                .and_then(|a| a.trim_end_matches('}').trim_matches('"').parse().ok())
        };
        // The listener lines come before "flinks-proxy started".
        loop {
            let line = p
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("proxy did not start; log:\n{}", p.log()));
            if line.contains("admin listening") {
                p.admin_addr = addr_of(&line);
            }
            if line.contains("proxy listening") {
                p.proxy_addr = addr_of(&line).expect("proxy addr");
            }
            if line.contains("flinks-proxy started") {
                break;
            }
        }
        p
    }

    /// Waits (up to `limit`) for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let end = std::time::Instant::now() + limit;
        if self.log().contains(needle) {
            return true;
        }
        while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return true,
                Ok(_) => {}
                Err(_) => return self.log().contains(needle),
            }
        }
        false
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends a signal (`HUP`, `TERM`, `INT`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for exit (up to `limit`) and returns the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if std::time::Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy_addr)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr.expect("admin"))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------ test upstream

/// One request received by a [`TestUpstream`].
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub version: http::Version,
    /// The request target's authority (HTTP/2 `:authority`), if any.
    pub authority: Option<String>,
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A small upstream on 127.0.0.1 (plain, or TLS with h2 and http/1.1 by
/// ALPN) that accepts any request, records it, and answers 200 with the
/// `Authorization` header it received as the body, `x-upstream: NAME` and
/// `x-upstream-path: PATH?QUERY`. Over HTTP/1.1 the response also carries
/// hop-by-hop headers (`Connection: x-hop`, `x-hop`, `Keep-Alive`) that a
/// proxy must not pass on. Stops when dropped.
pub struct TestUpstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<UpstreamRequest>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestUpstream {
    /// A plain HTTP upstream (HTTP/1.1 and h2c).
    pub async fn start(name: &str) -> TestUpstream {
        Self::start_with(name, None).await
    }

    /// An HTTPS upstream serving `leaf` (e.g. `Pki::server()`).
    pub async fn start_tls(name: &str, leaf: &Leaf) -> TestUpstream {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start_with(name, Some(acceptor)).await
    }

    async fn start_with(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> TestUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test upstream");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let name = name.to_owned();
        let recorded = Arc::clone(&requests);
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted_count = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        accepted_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let (tls, name, recorded) = (tls.clone(), name.clone(), Arc::clone(&recorded));
                        connections.spawn(serve_upstream_connection(stream, tls, name, recorded));
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        TestUpstream {
            addr,
            requests,
            connections,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests received so far, oldest first.
    pub fn requests(&self) -> Vec<UpstreamRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_upstream_connection(
    stream: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    name: String,
    recorded: Arc<Mutex<Vec<UpstreamRequest>>>,
) {
    use hyper_util::rt::TokioIo;
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (name, recorded) = (name.clone(), Arc::clone(&recorded));
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let path_and_query = parts
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned();
            let authorization = parts
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| Bytes::copy_from_slice(v.as_bytes()))
                .unwrap_or_default();
            // `x-delay-ms: N` makes the answer wait N ms (recorded first).
            let delay = parts
                .headers
                .get("x-delay-ms")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            recorded.lock().unwrap().push(UpstreamRequest {
                version: parts.version,
                authority: parts.uri.authority().map(|a| a.to_string()),
                method: parts.method.to_string(),
                path_and_query: path_and_query.clone(),
                headers: parts.headers,
                body,
            });
            if let Some(ms) = delay {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let mut resp = http::Response::builder()
                .status(200)
                .header("content-type", "text/plain")
                .header("x-upstream", name)
                .header("x-upstream-path", path_and_query);
            if parts.version == http::Version::HTTP_11 {
                resp = resp
                    .header("connection", "x-hop")
                    .header("x-hop", "1")
                    .header("keep-alive", "timeout=30");
            }
            let resp = resp.body(Full::new(authorization)).expect("response");
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    match tls {
        Some(acceptor) => {
            if let Ok(stream) = acceptor.accept(stream).await {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        }
        None => {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    }
}
