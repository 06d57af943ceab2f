//! `issuer` + `discovery = true` (CLIENT_AUTH.md, "Pushed authorization
//! requests (RFC 9126) and discovery"): the token endpoint read from the
//! authorization server's metadata at start, by `check` and on reload.
//!
//! Against node's oidc-provider (tests/oidc/client_auth.mjs: it serves
//! only `/.well-known/openid-configuration`, so the RFC 8414 URL's 404
//! exercises the fallback), and against a small metadata server on
//! loopback whose document the test changes, serves under the wrong
//! issuer, or takes away. Needs `node` and `npm ci --prefix tests/oidc`.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use support::oidc::{lock, spawn_node, Spawned};
use support::*;

/// Exit code of a config that cannot be used.
const EXIT_BAD_CONFIG: i32 = 64;
/// A refused connection fails at once; this leaves room for a loaded
/// machine while staying well under the 10 s discovery timeout.
const PROMPTLY: Duration = Duration::from_secs(5);
/// A reload (with its metadata fetch) or a log line.
const PATIENCE: Duration = Duration::from_secs(15);
const CLIENT_ID: &str = "discovery-client";
const CLIENT_SECRET: &str = "discovery-secret-0b7c1e5d9a";

/// A metadata server on 127.0.0.1: serves `document` (when set) at the
/// RFC 8414 URL and 404 everywhere else; counts requests. Stops when
/// dropped.
struct MetadataServer {
    addr: SocketAddr,
    document: Arc<Mutex<Option<serde_json::Value>>>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl MetadataServer {
    async fn start() -> MetadataServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let document = Arc::new(Mutex::new(None::<serde_json::Value>));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (doc, seen) = (Arc::clone(&document), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (doc, seen) = (Arc::clone(&doc), Arc::clone(&seen));
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let path = req.uri().path().to_owned();
                    seen.lock().unwrap().push(path.clone());
                    let current = doc.lock().unwrap().clone();
                    let resp = match current {
                        Some(d) if path == "/.well-known/oauth-authorization-server" => {
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(d.to_string())))
                        }
                        _ => Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::new())),
                    };
                    async move { Ok::<_, Infallible>(resp.expect("response")) }
                });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        MetadataServer {
            addr,
            document,
            requests,
            task,
        }
    }

    fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves a document naming `issuer` and `token_endpoint`.
    fn serve(&self, issuer: &str, token_endpoint: &str) {
        *self.document.lock().unwrap() = Some(json!({
            "issuer": issuer,
            "token_endpoint": token_endpoint,
            "grant_types_supported": ["client_credentials"],
        }));
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the binary with `args`; returns its exit code (-1: still running
/// after `limit`, then killed) and stderr. Bounded, so that a proxy that
/// wrongly starts fails the test instead of hanging it.
fn run_within(limit: Duration, args: &[&str]) -> (i32, String) {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(binary())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code().unwrap_or(-1);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break -1;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, reader.join().expect("stderr reader"))
}

/// A credential `main` with only `issuer` and `discovery = true` for its
/// endpoint, `client_auth`/`body_format` as given, and route `/` with it to
/// `upstream`.
fn discovering(issuer: &str, cred: Credential, upstream: &str) -> ProxyToml {
    ProxyToml::listeners()
        .credential(
            "main",
            Credential {
                token_url: String::new(),
                issuer: Some(issuer.to_owned()),
                discovery: Some(true),
                token_timeout: Some(Duration::from_secs(5)),
                ..cred
            },
        )
        .route("main", Route::credential("/", upstream, "main"))
}

/// The bearer token of the last request `upstream` received.
fn last_bearer(upstream: &TestUpstream) -> String {
    let seen = upstream.requests().last().expect("a request").clone();
    let auth = seen.headers.get("authorization").expect("Authorization");
    auth.to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .expect("a bearer token")
        .to_owned()
}

/// A credential whose only endpoint key is the issuer gets its token from
/// oidc-provider's discovered token endpoint (through the OpenID fallback:
/// oidc-provider has no RFC 8414 URL), and a proxied request carries it;
/// `check` says the endpoint was discovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_with_only_an_issuer_gets_its_token_from_the_discovered_endpoint() {
    let tmp = TempDir::new();
    let clients = tmp.write(
        "clients.json",
        json!([{
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
        }])
        .to_string(),
    );
    let Spawned {
        mut child,
        issuer,
        mut lines,
        log,
    } = spawn_node("client_auth.mjs", |cmd| {
        cmd.args(["--port", "0", "--clients"]).arg(&clients);
    })
    .await;
    let upstream = TestUpstream::start("api").await;
    let toml = discovering(
        &issuer,
        Credential {
            grant_type: "client_credentials".into(),
            client_id: CLIENT_ID.into(),
            client_secret: Some(CLIENT_SECRET.into()),
            client_auth: Some("basic".into()),
            body_format: Some("form".into()),
            ..Credential::default()
        },
        &upstream.http_url(),
    );
    let text = toml.toml();
    assert!(!text.contains("token_url"), "{text}");
    let dir = TempDir::new();
    let cfg = toml.write(&dir);

    let cfg_s = cfg.display().to_string();
    let (code, stdout, stderr) = run_binary(&["check", "--config", &cfg_s], &[]);
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    let discovered = format!("token_url {issuer}/token (discovered from {issuer})");
    assert!(stdout.contains(&discovered), "{discovered:?} in:\n{stdout}");
    assert!(!stdout.contains(CLIENT_SECRET) && !stderr.contains(CLIENT_SECRET));

    let p = ProxyProcess::start(&cfg, &[]);
    let r = get(&p.url("/accounts")).await;
    assert_eq!(r.status, 200, "{}\n{}\n{}", r.text(), p.log(), lock(&log));
    let token = last_bearer(&upstream);
    assert_eq!(token.split('.').count(), 3, "oidc-provider's JWT: {token}");
    let line = loop {
        let line = tokio::time::timeout(PATIENCE, lines.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no token line from oidc-provider:\n{}", lock(&log)));
        if line.starts_with("token ") {
            break line;
        }
    };
    assert!(
        line.starts_with(&format!("token client_credentials {CLIENT_ID} ")),
        "{line}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A document naming another issuer is refused at start (exit 64, one line
/// naming the key and both values) and by `check`; an issuer nobody
/// listens on is refused promptly, naming the key and the URL tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_of_another_issuer_or_an_unreachable_issuer_is_a_named_config_error() {
    let sb = sandbox().await;
    let upstream = TestUpstream::start("api").await;
    let md = MetadataServer::start().await;
    let impostor = "http://127.0.0.1:1/impostor";
    md.serve(impostor, &sb.token_url());
    let dir = TempDir::new();
    let cfg = discovering(&md.issuer(), Credential::sandbox(&sb), &upstream.http_url()).write(&dir);
    let cfg_s = cfg.display().to_string();

    let (code, stderr) = run_within(PATIENCE, &["--config", &cfg_s]);
    assert_eq!(code, EXIT_BAD_CONFIG, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    assert!(
        lines[0].starts_with(&format!("error: {cfg_s}: credentials.main.issuer: ")),
        "{stderr}"
    );
    assert!(
        lines[0].contains(&md.issuer()) && lines[0].contains(impostor),
        "names both issuers: {stderr}"
    );
    // `check` exits 1 on any bad config (tests/cli.rs), saying the same.
    let (code, stderr) = run_within(PATIENCE, &["check", "--config", &cfg_s]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("credentials.main.issuer: "), "{stderr}");
    assert!(stderr.contains(impostor), "{stderr}");
    let secret = flinks_proxy::sandbox::SandboxOptions::default().client_secret;
    assert!(!stderr.contains(&secret), "{stderr}");
    assert_eq!(
        sb.token_requests(),
        0,
        "no token from an impostor's endpoint"
    );

    // Nobody listens there: refused at once, never a hang.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = TempDir::new();
    let cfg = discovering(
        &format!("http://{closed}"),
        Credential::sandbox(&sb),
        &upstream.http_url(),
    )
    .write(&dir);
    let cfg_s = cfg.display().to_string();
    let started = Instant::now();
    let (code, stderr) = run_within(PATIENCE, &["--config", &cfg_s]);
    assert!(started.elapsed() < PROMPTLY, "{:?}", started.elapsed());
    assert_eq!(code, EXIT_BAD_CONFIG, "{stderr}");
    assert!(stderr.contains("credentials.main.issuer: "), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "http://{closed}/.well-known/oauth-authorization-server"
        )),
        "names the URL tried: {stderr}"
    );
}

/// An issuer that accepts connections and never answers is a config error
/// after the discovery timeout (10 s), not a hang.
#[test]
fn an_issuer_that_never_answers_is_an_error_after_the_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let dir = TempDir::new();
    let cfg = discovering(
        &format!("http://{addr}"),
        Credential {
            grant_type: "client_credentials".into(),
            client_id: "id".into(),
            ..Credential::default()
        },
        "http://127.0.0.1:9",
    )
    .write(&dir);
    let started = Instant::now();
    let cfg_s = cfg.display().to_string();
    let (code, stderr) = run_within(Duration::from_secs(20), &["check", "--config", &cfg_s]);
    let took = started.elapsed();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("credentials.main.issuer: "), "{stderr}");
    assert!(stderr.contains("no answer within 10s"), "{stderr}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "{took:?}"
    );
    drop(silent);
}

/// SIGHUP fetches the metadata again: a changed token endpoint is used
/// from then on; a reload while the issuer is down fails, counted, and
/// the running config (with its endpoint and token) stays.
#[test]
fn reload_follows_a_changed_token_endpoint_and_keeps_the_config_when_the_issuer_is_down() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (sb1, sb2, upstream, md) = rt.block_on(async {
        (
            sandbox().await,
            sandbox().await,
            TestUpstream::start("api").await,
            MetadataServer::start().await,
        )
    });
    md.serve(&md.issuer(), &sb1.token_url());
    let dir = TempDir::new();
    let toml = discovering(
        &md.issuer(),
        Credential::sandbox(&sb1),
        &upstream.http_url(),
    );
    let cfg = toml.write(&dir);
    let p = ProxyProcess::start(&cfg, &[]);
    let fetches = md.requests().len();
    assert_eq!(
        md.requests(),
        ["/.well-known/oauth-authorization-server"],
        "one fetch at start"
    );

    rt.block_on(async {
        let r = get(&p.url("/a")).await;
        assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    });
    assert_eq!((sb1.token_requests(), sb2.token_requests()), (1, 0));

    // The document moves the token endpoint: the reload follows it.
    md.serve(&md.issuer(), &sb2.token_url());
    p.signal("HUP");
    assert!(
        p.wait_for_log("config reloaded", PATIENCE),
        "no reload:\n{}",
        p.log()
    );
    assert_eq!(md.requests().len(), fetches + 1, "fetched again on reload");
    rt.block_on(async {
        let r = get(&p.url("/b")).await;
        assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    });
    assert_eq!((sb1.token_requests(), sb2.token_requests()), (1, 1));

    // The issuer goes away: the reload fails naming the key, the running
    // config stays (sandbox 2's token keeps being used).
    let gone = md.addr;
    rt.block_on(async move { drop(md) });
    // The listener closes with its task: wait until it refuses.
    let end = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(gone).is_ok() {
        assert!(Instant::now() < end, "the metadata server still listens");
        std::thread::sleep(Duration::from_millis(20));
    }
    p.signal("HUP");
    assert!(
        p.wait_for_log("config reload failed", PATIENCE),
        "no failed reload:\n{}",
        p.log()
    );
    let failure = p
        .log()
        .lines()
        .find(|l| l.contains("config reload failed"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        failure.contains("credentials.main.issuer"),
        "names the key: {failure}"
    );
    rt.block_on(async {
        let r = get(&p.url("/c")).await;
        assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
        let m = get(&p.admin("/metrics")).await.text();
        for (outcome, n) in [("success", 1.0), ("failure", 1.0)] {
            let series = format!(r#"flinks_proxy_config_reloads_total{{outcome="{outcome}"}}"#);
            assert_eq!(metric(&m, &series), Some(n), "{series}\n{m}");
        }
    });
    assert_eq!((sb1.token_requests(), sb2.token_requests()), (1, 1));
}

/// A pool with only `issuer` and `discovery = true` for its endpoints,
/// and a `[connect]` table, against oidc-provider requiring pushed
/// authorization requests: the discovered PAR and authorization endpoints
/// take the user through its login and consent, the code is exchanged at
/// the discovered token endpoint, and the user's token reaches the API.
/// `Config::load` runs on a runtime thread here: discovery has a thread of
/// its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_discovers_its_authorize_par_and_token_endpoints_and_connects_a_user() {
    use support::browser::{query_params, Browser};
    use support::oidc::sign_in_and_consent;
    const POOL_CLIENT: &str = "discovery-pool";
    let dir = TempDir::new();
    let connect = Connect::loopback(&[]);
    let public = connect.public_url.clone();
    let Spawned {
        mut child,
        issuer,
        log,
        ..
    } = spawn_node("server.mjs", |cmd| {
        cmd.args(["--port", "0", "--client-id", POOL_CLIENT])
            .args(["--client-secret", CLIENT_SECRET])
            .arg("--redirect-uri")
            .arg(format!("{public}/connect/callback"))
            .arg("--require-par");
    })
    .await;
    let upstream = TestUpstream::start("api").await;
    let pool = Pool {
        issuer: Some(issuer.clone()),
        discovery: Some(true),
        client_id: POOL_CLIENT.into(),
        client_secret: Some(CLIENT_SECRET.into()),
        scope: Some("openid offline_access".into()),
        client_auth: Some("basic".into()),
        body_format: Some("form".into()),
        token_timeout: Some(Duration::from_secs(5)),
        authorize_params: Some([("prompt".to_owned(), "consent".to_owned())].into()),
        ..Pool::default()
    };
    let toml = ProxyToml::connect_flow(
        pool,
        &upstream.http_url(),
        &dir.path().join("store.db"),
        connect,
    );
    let path = toml.write(&dir);
    let config = flinks_proxy::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let found = &config.discovered["connections.users"];
    let keys: Vec<&str> = found.keys.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys,
        ["token_url", "authorize_url", "par_url"],
        "server.mjs has no revocation endpoint: {found:?}"
    );
    let proxy = flinks_proxy::start(config).await.expect("proxy starts");

    let r = support::connections::admin(&proxy, "POST", "/connect-sessions/users", Some(json!({})))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let session = r.json();
    let link = session["connect_url"].as_str().expect("link").to_owned();
    let session_id = session["session_id"].as_str().expect("id").to_owned();
    let mut b = Browser::new();
    let r = b.get(&link).await;
    assert_eq!(r.status, 302, "{}\n{}", r.text(), lock(&log));
    let authorize = r.header("location").expect("location").to_owned();
    assert!(
        authorize.starts_with(&format!("{issuer}/auth?")),
        "{authorize}"
    );
    assert!(
        query_params(&authorize).contains_key("request_uri"),
        "pushed first: {authorize}"
    );
    let (callback, _) = sign_in_and_consent(&mut b, &issuer, &authorize, "alice").await;
    let done = b.get(&callback).await;
    assert_eq!(done.status, 200, "{}\n{}", done.text(), lock(&log));
    let path = format!("/connect-sessions/users/{session_id}");
    let st = support::connections::admin(&proxy, "GET", &path, None)
        .await
        .json();
    assert_eq!(st["state"], "connected", "{st}");
    let conn = st["connection_id"]
        .as_str()
        .expect("connection_id")
        .to_owned();
    let req = http::Request::get(proxy_url(&proxy, "/accounts"))
        .header(support::connections::SELECT, &conn)
        .body(Default::default())
        .expect("request");
    let r = send(&client(), req).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), lock(&log));
    assert_eq!(
        last_bearer(&upstream).split('.').count(),
        3,
        "oidc-provider's JWT access token"
    );
    let _ = child.kill();
    let _ = child.wait();
}
