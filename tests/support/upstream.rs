//! A small recording upstream on loopback (plain, or TLS with h2 and
//! http/1.1 by ALPN) built on hyper.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;

use super::Leaf;

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

    /// The `Authorization` header of the last request received; panics
    /// without one.
    pub fn last_authorization(&self) -> String {
        let requests = self.requests.lock().unwrap();
        let last = requests.last().expect("a request upstream");
        let auth = last.headers.get("authorization").expect("Authorization");
        auth.to_str().expect("ASCII").to_owned()
    }

    /// The bearer token of the last request received; panics when it
    /// has none.
    pub fn last_bearer(&self) -> String {
        let auth = self.last_authorization();
        auth.strip_prefix("Bearer ")
            .unwrap_or_else(|| panic!("not a bearer token: {auth}"))
            .to_owned()
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
