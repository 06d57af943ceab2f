//! Mutual TLS (issue 19, CLIENT_AUTH.md): routes presenting `client_cert`
//! to upstreams that require one, upstream pools keyed by origin and
//! certificate, `client_auth = "tls_client_auth"` at a real authorization
//! server (node's `oidc-provider` behind tests/oidc/mtls.mjs) with RFC 8705
//! certificate-bound access tokens checked by a resource server here, and
//! the config errors that name the key at fault.
//!
//! The oidc-provider tests need `node` and `npm ci --prefix tests/oidc`;
//! without either they fail saying so (they never skip).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::jwks::Jwks;
use support::oidc::{spawn_node, Spawned};
use support::*;
use tokio::sync::{mpsc, Notify};

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// RFC 8705's `x5t#S256` of a PEM certificate: base64url(SHA-256(DER)).
fn x5t_of_pem(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM");
    b64url(ring::digest::digest(&ring::digest::SHA256, &der).as_ref())
}

/// The base64 body of a PEM key: what must never appear anywhere.
fn key_material(key_pem: &str) -> Vec<String> {
    key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_owned)
        .collect()
}

fn assert_no_key(text: &str, leaf: &Leaf, what: &str) {
    for line in key_material(&leaf.key_pem) {
        assert!(
            !text.contains(&line),
            "{what} shows the client key:\n{text}"
        );
    }
}

/// An HTTPS upstream on loopback that requires a client certificate signed
/// by the test CA (rustls `WebPkiClientVerifier`) and answers 200 with the
/// presented certificate's `x5t#S256` as the body and `x-connection: N`.
/// With a [`Jwks`], it is a resource server for certificate-bound tokens
/// (RFC 8705 §3): the `Bearer` JWT must verify and its `cnf.x5t#S256` must
/// be the presented certificate's, or it answers 401 with the reason.
struct MtlsUpstream {
    addr: SocketAddr,
    /// As a token endpoint ([`MtlsUpstream::token_endpoint`]): each request
    /// to `/token` or `/revoke` as (path, presented `x5t#S256`, body).
    recorded: Recorded,
    /// Handshakes that failed (no or a bad client certificate), and a wake-up for each.
    failed: Arc<(AtomicUsize, Notify)>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MtlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Recorded = Arc<Mutex<Vec<(String, String, String)>>>;

impl MtlsUpstream {
    async fn start(pki: &Pki, jwks: Option<Arc<Jwks>>) -> MtlsUpstream {
        Self::start_with(pki, jwks, false).await
    }

    /// A token endpoint requiring client certificates: `/token` answers a
    /// Bearer token `at-N` and refresh token `rt-N`, `/revoke` answers 200;
    /// every request is recorded.
    async fn token_endpoint(pki: &Pki) -> MtlsUpstream {
        Self::start_with(pki, None, true).await
    }

    async fn start_with(pki: &Pki, jwks: Option<Arc<Jwks>>, tokens: bool) -> MtlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).expect("CA"))
            .expect("CA root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .expect("client verifier");
        let leaf = pki.server();
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server cert");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let failed = Arc::new((AtomicUsize::new(0), Notify::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let recorded: Recorded = Arc::default();
        let (failed2, connections2) = (Arc::clone(&failed), Arc::clone(&connections));
        let recorded2 = Arc::clone(&recorded);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, failed, jwks) =
                    (acceptor.clone(), Arc::clone(&failed2), jwks.clone());
                let recorded = tokens.then(|| Arc::clone(&recorded2));
                let n = connections2.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(_) => {
                            failed.0.fetch_add(1, Ordering::SeqCst);
                            failed.1.notify_one();
                            return;
                        }
                    };
                    let cert = tls.get_ref().1.peer_certificates().expect("verified")[0].clone();
                    let x5t = b64url(ring::digest::digest(&ring::digest::SHA256, &cert).as_ref());
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        let (x5t, jwks, recorded) = (x5t.clone(), jwks.clone(), recorded.clone());
                        async move {
                            let answer = match recorded {
                                Some(r) => token_answer(req, &x5t, &r).await,
                                None => answer(&req, &x5t, n, jwks.as_deref()),
                            };
                            Ok::<_, std::convert::Infallible>(answer)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        MtlsUpstream {
            addr,
            recorded,
            failed,
            connections,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Waits for the `n`th failed handshake.
    async fn failed_handshakes(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let notified = self.failed.1.notified();
                if self.failed.0.load(Ordering::SeqCst) >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("a failed client-certificate handshake");
    }
}

/// The token endpoint's answer (see [`MtlsUpstream::token_endpoint`]).
async fn token_answer(
    req: Request<hyper::body::Incoming>,
    x5t: &str,
    recorded: &Mutex<Vec<(String, String, String)>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut r = recorded.lock().unwrap();
    r.push((
        path.clone(),
        x5t.to_owned(),
        String::from_utf8_lossy(&body).into_owned(),
    ));
    let n = r.len();
    let body = if path == "/token" {
        serde_json::json!({
            "access_token": format!("at-{n}"),
            "token_type": "Bearer",
            "expires_in": 300,
            "refresh_token": format!("rt-{n}"),
        })
        .to_string()
    } else {
        String::new()
    };
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::from(body))
        .expect("response")
}

fn answer(
    req: &Request<hyper::body::Incoming>,
    x5t: &str,
    connection: usize,
    jwks: Option<&Jwks>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("x-connection", connection.to_string())
            .body(Full::from(body))
            .expect("response")
    };
    let Some(jwks) = jwks else {
        return reply(StatusCode::OK, x5t.to_owned());
    };
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return reply(StatusCode::UNAUTHORIZED, "no bearer token".into());
    };
    match jwks.verify(token) {
        Err(e) => reply(StatusCode::UNAUTHORIZED, e),
        Ok(claims) => match claims["cnf"]["x5t#S256"].as_str() {
            Some(bound) if bound == x5t => reply(StatusCode::OK, x5t.to_owned()),
            Some(bound) => reply(
                StatusCode::UNAUTHORIZED,
                format!("token bound to {bound}, presented {x5t}"),
            ),
            None => reply(StatusCode::UNAUTHORIZED, "token not bound".into()),
        },
    }
}

/// Writes the PKI's CA and the client leaves to `dir`: `ca.pem`,
/// `NAME.pem`, `NAME.key`.
fn write_pems(dir: &TempDir, pki: &Pki, leaves: &[(&str, &Leaf)]) {
    dir.write("ca.pem", &pki.ca_pem);
    for (name, leaf) in leaves {
        dir.write(&format!("{name}.pem"), &leaf.cert_pem);
        dir.write(&format!("{name}.key"), &leaf.key_pem);
    }
}

/// `client_cert` / `client_cert_key` (a `{file=..}` secret) and `ca_file`
/// on `table`.
fn with_cert(toml: ProxyToml, table: &str, dir: &TempDir, name: &str) -> ProxyToml {
    let path = |f: String| format!("{:?}", dir.path().join(f).display().to_string());
    toml.extra(table, "client_cert", &path(format!("{name}.pem")))
        .extra(
            table,
            "client_cert_key",
            &format!("{{ file = {} }}", path(format!("{name}.key"))),
        )
}

fn ca_file(dir: &TempDir) -> PathBuf {
    dir.path().join("ca.pem")
}

#[tokio::test]
async fn routes_present_their_own_client_certificates_and_never_share_connections() {
    let pki = Pki::new("mtls");
    let (a, b) = (pki.client("app-a"), pki.client("app-b"));
    let dir = TempDir::new();
    write_pems(&dir, &pki, &[("a", &a), ("b", &b)]);
    let sb = sandbox().await;
    let upstream = MtlsUpstream::start(&pki, None).await;
    let route = |prefix: &str| Route {
        ca_file: Some(ca_file(&dir)),
        ..Route::credential(prefix, &upstream.url(), "flinks")
    };
    let toml = ProxyToml::sandbox(&sb)
        .route("a", route("/a"))
        .route("b", route("/b"))
        .route("none", route("/none"));
    let toml = with_cert(toml, "routes.a", &dir, "a");
    let toml = with_cert(toml, "routes.b", &dir, "b");
    let p = start_proxy(&toml.toml()).await;

    let mut seen = Vec::new();
    for prefix in ["/a", "/b", "/a", "/b"] {
        let r = get(&proxy_url(&p, &format!("{prefix}/x"))).await;
        assert_eq!(r.status, 200, "{prefix}: {}", r.text());
        let expected = if prefix == "/a" { &a } else { &b };
        assert_eq!(r.text(), x5t_of_pem(&expected.cert_pem), "{prefix}");
        seen.push((prefix, r.header("x-connection").unwrap().to_owned()));
    }
    // Each route's pool reuses its own connection: two connections, one per
    // certificate, and never one for both.
    assert_eq!(seen[0].1, seen[2].1, "{seen:?}");
    assert_eq!(seen[1].1, seen[3].1, "{seen:?}");
    assert_ne!(seen[0].1, seen[1].1, "{seen:?}");
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);

    // Without a certificate the upstream refuses the handshake: 502.
    let r = get(&proxy_url(&p, "/none/x")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("upstream_unavailable"), "{}", r.text());
    upstream.failed_handshakes(1).await;

    let status = get(&admin_url(&p, "/status")).await.text();
    let metrics = get(&admin_url(&p, "/metrics")).await.text();
    for (what, text) in [("/status", &status), ("/metrics", &metrics)] {
        assert_no_key(text, &a, what);
        assert_no_key(text, &b, what);
    }
    p.shutdown().await;
}

/// A config with credential `c` (its lines `cred`) and route `r` (`route`).
fn config_text(cred: &str, route: &str) -> String {
    format!(
        r#"
[credentials.c]
token_url = "https://as.example/token"
grant_type = "client_credentials"
client_id = "id"
{cred}

[routes.r]
upstream = "https://api.example"
credential = "c"
{route}
"#
    )
}

fn config_error(dir: &TempDir, text: &str) -> String {
    match flinks_proxy::Config::parse(text, &dir.path().join("proxy.toml")) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_client_certificate_settings_are_config_errors_naming_the_key() {
    let pki = Pki::new("mtls");
    let (a, b) = (pki.client("app-a"), pki.client("app-b"));
    let dir = TempDir::new();
    write_pems(&dir, &pki, &[("a", &a), ("b", &b)]);
    dir.write(
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    dir.write("empty.pem", "nothing here\n");
    dir.write(
        "bad.key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let tls = "client_auth = \"tls_client_auth\"";
    let cert =
        |c: &str, k: &str| format!("client_cert = \"{c}\"\nclient_cert_key = {{ file = \"{k}\" }}");
    let cases: Vec<(String, String, &str)> = vec![
        // tls_client_auth without a certificate.
        (
            config_text(tls, ""),
            "credentials.c.client_cert: is required with client_auth = \"tls_client_auth\"".into(),
            "no cert",
        ),
        // A certificate without its key, a key without its certificate.
        (
            config_text("", "client_cert = \"a.pem\""),
            "routes.r.client_cert_key: is required".into(),
            "cert without key",
        ),
        (
            config_text("client_cert_key = { file = \"a.key\" }", ""),
            "credentials.c.client_cert: is required with client_cert_key".into(),
            "key without cert",
        ),
        // Unparsable certificate and key.
        (
            config_text("", &cert("garbage.pem", "a.key")),
            "routes.r.client_cert".into(),
            "bad cert",
        ),
        (
            config_text("", &cert("empty.pem", "a.key")),
            "routes.r.client_cert: ".into(),
            "no cert in file",
        ),
        (
            config_text(&format!("{tls}\n{}", cert("a.pem", "bad.key")), ""),
            "credentials.c.client_cert_key: is not a usable private key".into(),
            "bad key",
        ),
        (
            config_text(
                "",
                "client_cert = \"a.pem\"\nclient_cert_key = \"not a key\"",
            ),
            "routes.r.client_cert_key: is not a PEM private key".into(),
            "not PEM",
        ),
        // A key that is not the certificate's.
        (
            config_text(&format!("{tls}\n{}", cert("a.pem", "b.key")), ""),
            "credentials.c.client_cert_key: does not match the certificate".into(),
            "mismatch",
        ),
        (
            config_text("", &cert("b.pem", "a.key")),
            "routes.r.client_cert_key: does not match the certificate".into(),
            "route mismatch",
        ),
        // mTLS needs TLS.
        (
            config_text(&format!("{tls}\n{}", cert("a.pem", "a.key")), "")
                .replace("https://as.example", "http://as.example"),
            "credentials.c.token_url: must be https://".into(),
            "http token url",
        ),
        (
            config_text("", &cert("a.pem", "a.key"))
                .replace("https://api.example", "http://api.example"),
            "routes.r.client_cert: needs an https:// upstream".into(),
            "http upstream",
        ),
    ];
    for (text, expected, what) in &cases {
        let e = config_error(&dir, text);
        assert!(e.contains(expected.as_str()), "{what}: {e}");
        assert_no_key(&e, &a, what);
        assert_no_key(&e, &b, what);
    }
    // A pool says the same, under its own name.
    let pool = r#"
[store]
key = "0000000000000000000000000000000000000000000000000000000000000000"
[connections.p]
token_url = "https://as.example/token"
client_id = "id"
client_auth = "tls_client_auth"
"#;
    let e = config_error(&dir, pool);
    assert!(e.contains("connections.p.client_cert: is required"), "{e}");

    // The good one parses.
    let good = config_text(
        &format!("{tls}\n{}", cert("a.pem", "a.key")),
        &cert("b.pem", "b.key"),
    );
    flinks_proxy::Config::parse(&good, &dir.path().join("proxy.toml")).expect("good config");
}

#[test]
fn check_prints_the_method_and_the_certificate_never_the_key() {
    let pki = Pki::new("mtls");
    let (a, b) = (pki.client("app-a"), pki.client("app-b"));
    let dir = TempDir::new();
    write_pems(&dir, &pki, &[("a", &a), ("b", &b)]);
    let text = config_text(
        "client_auth = \"tls_client_auth\"\nclient_cert = \"a.pem\"\nclient_cert_key = { file = \"a.key\" }",
        "client_cert = \"b.pem\"\nclient_cert_key = { env = \"MTLS_TEST_KEY\" }",
    );
    let path = dir.write("proxy.toml", &text);
    let (code, stdout, stderr) = run_binary(
        &["check", "--config", path.to_str().unwrap()],
        &[("MTLS_TEST_KEY", b.key_pem.as_str())],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("tls_client_auth client auth"), "{stdout}");
    let hex = |leaf: &Leaf| {
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        ring::digest::digest(&ring::digest::SHA256, &der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    for (leaf, cn) in [(&a, "CN=app-a"), (&b, "CN=app-b")] {
        let line = format!("client certificate {cn} (SHA-256 {})", hex(leaf));
        assert!(stdout.contains(&line), "{line}\n{stdout}");
    }
    assert_no_key(&stdout, &a, "check");
    assert_no_key(&stdout, &b, "check");
    assert_no_key(&stderr, &b, "check");
}

const OIDC_CLIENT_ID: &str = "flinks-proxy-mtls";

/// `tests/oidc/mtls.mjs` under node, stopped when dropped (and by itself
/// when this process ends: it exits when its stdin closes).
struct MtlsProvider {
    child: Child,
    /// `https://127.0.0.1:PORT`.
    issuer: String,
    lines: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<String>>,
}

impl Drop for MtlsProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MtlsProvider {
    /// Starts the provider with its TLS files in `dir` (`server.pem`,
    /// `server.key`, `ca.pem`); its one client is the certificate whose SAN
    /// is `san_dns`.
    async fn start(dir: &Path, san_dns: &str) -> MtlsProvider {
        let Spawned {
            child,
            issuer,
            lines,
            log,
        } = spawn_node("mtls.mjs", |cmd| {
            cmd.arg("--cert")
                .arg(dir.join("server.pem"))
                .arg("--key")
                .arg(dir.join("server.key"))
                .arg("--ca")
                .arg(dir.join("ca.pem"))
                .args([
                    "--client-id",
                    OIDC_CLIENT_ID,
                    "--san-dns",
                    san_dns,
                    "--port",
                    "0",
                ]);
        })
        .await;
        MtlsProvider {
            child,
            issuer,
            lines,
            log,
        }
    }

    /// Waits for a stdout line starting with `prefix`.
    async fn wait_for_line(&mut self, prefix: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line.starts_with(prefix) => return line,
                Ok(Some(_)) => {}
                _ => panic!(
                    "no `{prefix}` line from mtls.mjs:\n{}",
                    self.log.lock().unwrap()
                ),
            }
        }
    }
}

/// GET over HTTPS trusting the test CA, no client certificate.
async fn get_tls(url: &str, ca_pem: &str) -> (StatusCode, Bytes) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Full<Bytes>>(https);
    let resp = client
        .request(Request::get(url).body(Full::default()).unwrap())
        .await
        .expect("GET");
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

/// `tls_client_auth` at oidc-provider: the credential's token is bound to
/// its certificate (`cnf.x5t#S256`), the resource server accepts it on the
/// route presenting that certificate and refuses it on a route presenting
/// another; a credential whose certificate is not the client's is refused
/// by the token endpoint. No key material in the log, /status or /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_auth_obtains_certificate_bound_tokens_from_oidc_provider() {
    let pki = Pki::new("mtls");
    let (a, b, server) = (pki.client("app-a"), pki.client("app-b"), pki.server());
    let dir = TempDir::new();
    write_pems(&dir, &pki, &[("a", &a), ("b", &b)]);
    dir.write("server.pem", &server.cert_pem);
    dir.write("server.key", &server.key_pem);
    let mut op = MtlsProvider::start(dir.path(), "app-a").await;
    let (status, jwks) = get_tls(&format!("{}/jwks", op.issuer), &pki.ca_pem).await;
    assert_eq!(status, 200);
    let jwks = Jwks::from_json(&serde_json::from_slice(&jwks).unwrap());
    let api = MtlsUpstream::start(&pki, Some(Arc::new(jwks))).await;

    let credential = Credential {
        token_url: format!("{}/token", op.issuer),
        grant_type: "client_credentials".to_owned(),
        client_id: OIDC_CLIENT_ID.to_owned(),
        client_auth: Some("tls_client_auth".to_owned()),
        body_format: Some("form".to_owned()),
        token_timeout: Some(Duration::from_secs(5)),
        ca_file: Some(ca_file(&dir)),
        ..Credential::default()
    };
    let route = |prefix: &str, credential: &str| Route {
        ca_file: Some(ca_file(&dir)),
        ..Route::credential(prefix, &api.url(), credential)
    };
    let mut toml = ProxyToml::listeners()
        .credential("op", credential.clone())
        .credential("wrong", credential)
        .route("good", route("/good", "op"))
        .route("other", route("/other", "op"))
        .route("wrong", route("/wrong", "wrong"));
    toml.server.request_timeout = Some(Duration::from_secs(5));
    toml.log = Some(Log {
        level: Some("debug".to_owned()),
        ..Log::default()
    });
    let toml = with_cert(toml, "credentials.op", &dir, "a");
    let toml = with_cert(toml, "credentials.wrong", &dir, "b");
    let toml = with_cert(toml, "routes.good", &dir, "a");
    let toml = with_cert(toml, "routes.other", &dir, "b");
    let toml = with_cert(toml, "routes.wrong", &dir, "b");
    let path = toml.write(&dir);
    let p = ProxyProcess::start(&path, &[]);

    // The token was obtained with the certificate; the resource server
    // checked its signature against the provider's JWKS and its
    // `cnf.x5t#S256` against the certificate the route presented.
    let r = get(&p.url("/good/accounts")).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    assert_eq!(r.text(), x5t_of_pem(&a.cert_pem));
    // The same token from a route presenting another certificate: refused.
    let r = get(&p.url("/other/accounts")).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(
        r.text()
            .contains(&format!("token bound to {}", x5t_of_pem(&a.cert_pem))),
        "{}",
        r.text()
    );
    // A certificate that is not the client's: the token endpoint refuses it.
    op.wait_for_line("token error client_credentials invalid_client")
        .await;
    let r = get(&p.url("/wrong/accounts")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("token_unavailable"), "{}", r.text());

    let status = get(&p.admin("/status")).await.text();
    assert!(status.contains("invalid_client"), "{status}");
    let metrics = get(&p.admin("/metrics")).await.text();
    for (what, text) in [
        ("log", &p.log()),
        ("/status", &status),
        ("/metrics", &metrics),
    ] {
        assert_no_key(text, &a, what);
        assert_no_key(text, &b, what);
    }
}

/// A pool with `tls_client_auth`: its refresh and its revocation both
/// present the pool's certificate and send `client_id` without a secret.
#[tokio::test]
async fn a_pool_refreshes_and_revokes_with_its_client_certificate() {
    let pki = Pki::new("mtls");
    let a = pki.client("app-a");
    let dir = TempDir::new();
    write_pems(&dir, &pki, &[("a", &a)]);
    let op = MtlsUpstream::token_endpoint(&pki).await;
    let api = TestUpstream::start("api").await;
    let pool = Pool {
        token_url: format!("{}/token", op.url()),
        client_id: "pool-client".to_owned(),
        client_auth: Some("tls_client_auth".to_owned()),
        body_format: Some("form".to_owned()),
        token_timeout: Some(Duration::from_secs(5)),
        ca_file: Some(ca_file(&dir)),
        revoke_url: Some(format!("{}/revoke", op.url())),
        ..Pool::default()
    };
    let mut toml = ProxyToml::listeners()
        .pool_table("users", pool)
        .route("u", Route::pool("/", &api.http_url(), "users"));
    toml.server.request_timeout = Some(Duration::from_secs(5));
    toml.admin_mut().api_token = Some(API_TOKEN.into());
    toml.store = Some(Store::sqlite(
        &dir.path().join("store.db"),
        &connections::new_key(),
    ));
    let toml = with_cert(toml, "connections.users", &dir, "a");
    let p = start_proxy(&toml.toml()).await;

    let r = connections::admin(
        &p,
        "POST",
        "/connections/users",
        Some(serde_json::json!({"id": "alice", "refresh_token": "rt-0"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let req = Request::get(proxy_url(&p, "/x"))
        .header("x-flinks-connection", "alice")
        .body(Full::default())
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(api.requests()[0].headers["authorization"], "Bearer at-1");
    let r = connections::admin(&p, "DELETE", "/connections/users/alice", None).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let recorded = op.recorded.lock().unwrap().clone();
    let x5t = x5t_of_pem(&a.cert_pem);
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    for ((path, presented, body), (want_path, want_token)) in recorded
        .iter()
        .zip([("/token", "refresh_token=rt-0"), ("/revoke", "token=rt-1")])
    {
        assert_eq!(path, want_path);
        assert_eq!(presented, &x5t, "{path}: the pool's certificate");
        assert!(body.contains("client_id=pool-client"), "{path}: {body}");
        assert!(body.contains(want_token), "{path}: {body}");
        assert!(!body.contains("client_secret"), "{path}: {body}");
    }
    p.shutdown().await;
}
