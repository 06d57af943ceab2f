//! Issue 3: every grant and every failure. The `authorization_code` and
//! `refresh_token` grants, the state file (0600, atomic, never lost across a
//! `kill -9`), revocation, rotating refresh tokens, replay after the upstream
//! rejects a token, token endpoint outages, JWT lifetimes and secret hygiene.
//!
//! Everything runs against the sandbox on loopback; a few tests run the real
//! binary. Where the test must see a request the moment it arrives (to read
//! the state file then), a small forwarder sits between the proxy and the
//! sandbox.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flinks_proxy::sandbox::{decode_jwt_claims, FailureMode, SandboxOptions, TOKEN_PATH};
use flinks_proxy::StartError;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::*;

const CLIENT_SECRET: &str = "cs-9Xq2-client-secret-value";
const REFRESH: &str = "rt-7Hk4-refresh-token-value";
const CODE: &str = "code-3Lm8-authorization-code";
const REDIRECT: &str = "https://example.com/callback";
/// Every sandbox access token starts with this (base64 of `{"alg":"none","typ":"JWT"}`).
const JWT_HEADER: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
/// Every sandbox access token ends with this.
const JWT_SIGNATURE: &str = ".sandbox-signature";

/// Sandbox options with secrets distinctive enough to search logs for.
fn opts() -> SandboxOptions {
    SandboxOptions {
        client_secret: CLIENT_SECRET.into(),
        refresh_token: REFRESH.into(),
        code: CODE.into(),
        redirect_uri: REDIRECT.into(),
        ..SandboxOptions::default()
    }
}

/// A whole proxy.toml: listeners on port 0, `[credentials.flinks]` with the
/// sandbox's client and `grant` lines, one route `/` to `upstream`, `extra`.
fn proxy_toml(token_url: &str, upstream: &str, grant: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
# These tests follow the user a token belongs to.
show_subjects = true

[credentials.flinks]
token_url = "{token_url}"
client_id = "demo-client"
client_secret = "{CLIENT_SECRET}"
{grant}

[routes.flinks]
path_prefix = "/"
upstream = "{upstream}"
credential = "flinks"
{extra}
"#
    )
}

fn auth_code_grant(code: &str, state: &Path) -> String {
    format!(
        "grant_type = \"authorization_code\"\ncode = \"{code}\"\nredirect_uri = \"{REDIRECT}\"\nstate_file = \"{}\"\n",
        state.display()
    )
}

fn refresh_grant(state: Option<&Path>) -> String {
    let mut s = format!("grant_type = \"refresh_token\"\nrefresh_token = \"{REFRESH}\"\n");
    if let Some(p) = state {
        s.push_str(&format!("state_file = \"{}\"\n", p.display()));
    }
    s
}

async fn start_in(dir: &TempDir, toml: &str) -> Result<flinks_proxy::Running, StartError> {
    flinks_proxy::start(parse_config(toml, dir.path())).await
}

/// The state file as JSON.
fn state_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("state file is not JSON ({e}): {text}"))
}

/// The refresh token in the state file.
fn state_refresh_token(path: &Path) -> String {
    state_json(path)["refresh_token"]
        .as_str()
        .expect("refresh_token in the state file")
        .to_owned()
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

fn unix_now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// The bearer token of a request, if any.
fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(str::to_owned)
}

async fn status_json(p: &flinks_proxy::Running) -> serde_json::Value {
    get(&admin_url(p, "/status")).await.json()
}

async fn metrics_text(p: &flinks_proxy::Running) -> String {
    get(&admin_url(p, "/metrics")).await.text()
}

/// Polls `cond` every few milliseconds until it holds; panics after `limit`.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Blocking version of [`eventually`] for tests that drive the binary.
fn eventually_blocking(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls `url` until it answers 200.
async fn wait_for_200(url: &str, limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        let r = get(url).await;
        if r.status == StatusCode::OK {
            return;
        }
        assert!(
            Instant::now() < end,
            "{url} still answers {} after {limit:?}: {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the binary with `args` until it exits (at most 30 s); returns the
/// exit code and stdout + stderr.
async fn run_to_exit(args: &[&str]) -> (Option<i32>, String, String) {
    let child = tokio::process::Command::new(binary())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("binary starts");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("flinks-proxy {args:?} did not exit within 30 s"))
        .expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the binary with `cfg` and waits for both listeners.
/// (`ProxyProcess::start` stops reading at the first line that names a
/// credential, which a code exchange logs before the listeners are up.)
type Observe = dyn Fn(&http::request::Parts, &Bytes) + Send + Sync;

/// An HTTP/1.1 server on loopback that shows every request to `observe` the
/// moment it arrives, then forwards it to `target` (`http://host:port`) and
/// relays the answer. Lives as long as the test's runtime.
async fn forwarder(
    target: String,
    observe: impl Fn(&http::request::Parts, &Bytes) + Send + Sync + 'static,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind forwarder");
    let addr = listener.local_addr().expect("addr");
    let observe: Arc<Observe> = Arc::new(observe);
    let client = client();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (observe, client, target) = (observe.clone(), client.clone(), target.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (observe, client, target) =
                        (observe.clone(), client.clone(), target.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes());
                        let body = body.unwrap_or_default();
                        observe(&parts, &body);
                        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                        let mut out = Request::builder()
                            .method(parts.method.clone())
                            .uri(format!("{target}{pq}"));
                        for (k, v) in &parts.headers {
                            if !matches!(
                                k.as_str(),
                                "host" | "content-length" | "transfer-encoding" | "connection"
                            ) {
                                out = out.header(k, v);
                            }
                        }
                        let out = out.body(Full::new(body)).expect("forwarded request");
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        match client.request(out).await {
                            Ok(r) => {
                                let (p, b) = r.into_parts();
                                let b = b.collect().await.map(|b| b.to_bytes());
                                *resp.status_mut() = p.status;
                                for (k, v) in &p.headers {
                                    if k != "content-length" && k != "transfer-encoding" {
                                        resp.headers_mut().append(k, v.clone());
                                    }
                                }
                                *resp.body_mut() = Full::new(b.unwrap_or_default());
                            }
                            Err(_) => *resp.status_mut() = StatusCode::BAD_GATEWAY,
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

// ------------------------------------------------------- authorization_code

#[tokio::test]
async fn authorization_code_is_exchanged_once_and_restarts_use_the_stored_refresh_token() {
    let dir = TempDir::new();
    let sb = sandbox_with(opts()).await;
    // The state file's folder does not exist yet: the proxy creates it.
    let state = dir.join("var/lib/flinks.json");
    let toml = proxy_toml(
        &sb.token_url(),
        &sb.api_url(),
        &auth_code_grant(CODE, &state),
        "",
    );

    let p = start_in(&dir, &toml).await.expect("first start");
    assert_eq!(sb.token_requests_by_grant("authorization_code"), 1);
    let st = state_json(&state);
    assert_eq!(st["refresh_token"], REFRESH, "{st}");
    assert_eq!(st["sub"], "user-123", "{st}");
    assert!(st["obtained_at"].as_u64().is_some_and(|t| t > 0), "{st}");
    assert_eq!(mode_of(&state), 0o600);
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        !text.contains(CODE),
        "the code itself is not stored: {text}"
    );
    let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    p.shutdown().await;

    let refreshes = sb.token_requests_by_grant("refresh_token");
    let p = start_in(&dir, &toml).await.expect("second start");
    let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sb.token_requests_by_grant("authorization_code"),
        1,
        "a restart must not send the code again"
    );
    assert!(sb.token_requests_by_grant("refresh_token") > refreshes);
    let last = sb.recorded().pop().expect("the API saw the request");
    assert!(last.token_valid);
    let status = status_json(&p).await;
    let cred = &status["credentials"]["flinks"];
    assert_eq!(cred["grant"], "authorization_code", "{status}");
    assert_eq!(cred["state"], "valid", "{status}");
    assert_eq!(cred["sub"], "user-123", "{status}");
    assert_eq!(state_refresh_token(&state), REFRESH);
    assert_eq!(mode_of(&state), 0o600);
    p.shutdown().await;
}

#[tokio::test]
async fn refused_code_without_state_file_stops_the_start_with_a_reauthorization_message() {
    let dir = TempDir::new();
    let sb = sandbox_with(opts()).await;
    let state = dir.join("flinks.json");
    let toml = proxy_toml(
        &sb.token_url(),
        &sb.api_url(),
        &auth_code_grant("code-that-expired", &state),
        "",
    );
    let message = match start_in(&dir, &toml).await {
        Ok(_) => panic!("the proxy started with a refused code"),
        Err(e @ StartError::CodeRejected { .. }) => e.to_string(),
        Err(e) => panic!("wrong error: {e:?}"),
    };
    assert!(message.contains("credentials.flinks"), "{message}");
    assert!(message.contains("credentials.flinks.code"), "{message}");
    assert!(message.contains("authorize again"), "{message}");
    assert!(message.contains("invalid_grant"), "{message}");
    assert!(!message.contains("code-that-expired"), "{message}");
    assert_eq!(sb.token_requests_by_grant("authorization_code"), 1);
    assert!(!state.exists());

    let cfg = dir.write("proxy.toml", &toml);
    let (code, stdout, stderr) = run_to_exit(&["--config", cfg.to_str().unwrap()]).await;
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}\n{stderr}");
    assert!(stderr.contains("credentials.flinks.code"), "{stderr}");
    assert!(stderr.contains("authorize again"), "{stderr}");
    assert!(!stderr.contains("proxy listening"), "{stderr}");
    assert!(!format!("{stdout}{stderr}").contains("code-that-expired"));
    assert_eq!(sb.token_requests_by_grant("authorization_code"), 2);
    assert!(!state.exists());
}

// ----------------------------------------------------------- revocation

#[tokio::test]
async fn revoked_refresh_token_needs_reauthorization_without_hammering_the_endpoint() {
    let dir = TempDir::new();
    let sb = sandbox_with(opts()).await;
    let toml = proxy_toml(&sb.token_url(), &sb.api_url(), &refresh_grant(None), "");
    let p = start_in(&dir, &toml).await.expect("start");
    let url = proxy_url(&p, "/api/v1/accounts");
    assert_eq!(get(&url).await.status, 200);
    assert_eq!(sb.token_requests_by_grant("refresh_token"), 1);

    sb.revoke_refresh_token();
    sb.revoke_access_tokens();
    // The cached token is rejected upstream; the refresh that follows is
    // refused. This request can only get the upstream's 401 or a 503.
    let r = get(&url).await;
    assert!(
        r.status == 401 || r.status == 503,
        "{} {}",
        r.status,
        r.text()
    );
    eventually("the refused refresh", Duration::from_secs(10), || {
        sb.token_requests() >= 2
    })
    .await;
    let after_refusal = sb.token_requests();

    let client = client();
    let until = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let r = get_with(&client, &url).await;
        let took = started.elapsed();
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"], "token_unavailable", "{}", r.text());
        let retry_after: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!(retry_after >= 60, "Retry-After {retry_after}");
        assert!(took < Duration::from_secs(1), "a 503 took {took:?}");
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(n > 100, "only {n} requests in 10 s");
    assert!(
        sb.token_requests() <= after_refusal + 1,
        "{} token requests after the refusal, for {n} client requests",
        sb.token_requests() - after_refusal
    );

    let status = status_json(&p).await;
    let cred = &status["credentials"]["flinks"];
    assert_eq!(cred["state"], "needs_reauthorization", "{status}");
    assert_eq!(cred["last_error"]["error"], "invalid_grant", "{status}");
    assert!(
        cred["token_requests"]["rejected"].as_u64() >= Some(1),
        "{status}"
    );
    let metrics = metrics_text(&p).await;
    let rejected = metric(
        &metrics,
        r#"flinks_proxy_token_requests_total{credential="flinks",outcome="rejected"}"#,
    );
    assert!(rejected >= Some(1.0), "{metrics}");
    // Readiness is not withdrawn for later failures (SPEC §7).
    assert_eq!(get(&admin_url(&p, "/readyz")).await.status, 200);
}

// --------------------------------------------------- rotating refresh tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_refresh_token_is_persisted_before_its_access_token_is_used() {
    let dir = TempDir::new();
    let sb = sandbox_with(SandboxOptions {
        rotate_refresh_tokens: true,
        expires_in: Some(2),
        ..opts()
    })
    .await;
    let state = dir.join("flinks.json");

    // What the token endpoint receives: form body, client in Basic auth.
    let token_requests = Arc::new(Mutex::new(Vec::<(String, String, String)>::new()));
    let seen = token_requests.clone();
    let token_fwd = forwarder(format!("http://{}", sb.token_addr()), move |parts, body| {
        let h = |n: &str| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let body = String::from_utf8_lossy(body).into_owned();
        seen.lock()
            .unwrap()
            .push((h("content-type"), h("authorization"), body));
    })
    .await;

    // What the API receives: the first time it sees an access token, the
    // state file must already hold the refresh token the server now accepts.
    let checks = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let seen_tokens = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let (sb2, state2, checks2, seen2) = (
        sb.clone(),
        state.clone(),
        checks.clone(),
        seen_tokens.clone(),
    );
    let api_fwd = forwarder(sb.api_url(), move |parts, _| {
        let Some(token) = bearer(&parts.headers) else {
            return;
        };
        if seen2.lock().unwrap().insert(token) {
            let in_file = state_refresh_token(&state2);
            checks2
                .lock()
                .unwrap()
                .push((in_file, sb2.current_refresh_token()));
        }
    })
    .await;

    let grant = format!(
        "{}body_format = \"form\"\nclient_auth = \"basic\"\n",
        refresh_grant(Some(&state))
    );
    let toml = proxy_toml(&format!("{token_fwd}{TOKEN_PATH}"), &api_fwd, &grant, "");
    let p = start_in(&dir, &toml).await.expect("start");
    let url = proxy_url(&p, "/api/v1/accounts");
    let client = client();
    let end = Instant::now() + Duration::from_secs(20);
    while checks.lock().unwrap().len() < 5 {
        assert!(Instant::now() < end, "fewer than 5 access tokens in 20 s");
        let r = get_with(&client, &url).await;
        assert_eq!(r.status, 200, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.shutdown().await;

    for (i, (in_file, current)) in checks.lock().unwrap().iter().enumerate() {
        assert_eq!(
            in_file, current,
            "access token #{i} was used before its refresh token was persisted"
        );
    }
    assert_ne!(state_refresh_token(&state), REFRESH);
    assert_eq!(state_refresh_token(&state), sb.current_refresh_token());
    assert_eq!(mode_of(&state), 0o600);
    assert_eq!(sb.rejected_api_requests(), 0);
    assert_eq!(sb.successful_token_requests(), sb.token_requests());
    let token_requests = token_requests.lock().unwrap();
    assert!(token_requests.len() >= 5);
    for (content_type, authorization, body) in token_requests.iter() {
        assert_eq!(content_type, "application/x-www-form-urlencoded");
        assert!(authorization.starts_with("Basic "), "{authorization}");
        assert!(body.contains("grant_type=refresh_token"), "{body}");
        assert!(!body.contains("client_secret"), "{body}");
    }
}

/// Where in the refresh cycle the binary is killed.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// While a token request is on the wire (the server has not answered).
    RequestOnTheWire,
    /// Right after the server rotated the refresh token, before the proxy
    /// can have committed it: the window a reuse grace exists for.
    JustRotated,
    /// At a random point of the cycle.
    Random,
}

/// Okta/Auth0-like server: access tokens live 1 s (a refresh every 0.5 s),
/// refresh tokens rotate, and the previous one is still accepted for a
/// short grace. The binary is killed at random moments, including
/// mid-refresh; after each restart the user must still work.
#[test]
fn killing_the_binary_at_random_moments_including_mid_refresh_never_loses_the_user() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = TempDir::new();
    let sb = rt.block_on(sandbox_with(SandboxOptions {
        rotate_refresh_tokens: true,
        expires_in: Some(1),
        refresh_reuse_grace: Duration::from_secs(30),
        ..opts()
    }));
    let state = dir.join("flinks.json");
    let grant = format!(
        "{}body_format = \"form\"\nclient_auth = \"basic\"\n",
        refresh_grant(Some(&state))
    );
    let cfg = dir.write(
        "proxy.toml",
        proxy_toml(&sb.token_url(), &sb.api_url(), &grant, ""),
    );
    let request_ok = |p: &ProxyProcess, when: &str| {
        let r = rt.block_on(get(&p.url("/api/v1/accounts")));
        assert_eq!(r.status, 200, "{when}: {}\nlog:\n{}", r.text(), p.log());
    };
    let moments = [
        Moment::RequestOnTheWire,
        Moment::JustRotated,
        Moment::Random,
        Moment::JustRotated,
        Moment::RequestOnTheWire,
        Moment::Random,
        Moment::JustRotated,
        Moment::Random,
    ];
    for (round, moment) in moments.into_iter().enumerate() {
        // A token request takes 0-150 ms on the server side.
        sb.set_token_delay(Duration::from_millis(rand::random::<u64>() % 150));
        let mut p = ProxyProcess::start(&cfg, &[]);
        rt.block_on(wait_for_200(&p.admin("/readyz"), Duration::from_secs(15)));
        request_ok(&p, &format!("after restart {round}"));
        match moment {
            Moment::RequestOnTheWire => {
                sb.set_token_delay(Duration::from_millis(300));
                eventually_blocking("a refresh on the wire", Duration::from_secs(10), || {
                    sb.token_requests_in_flight() > 0
                });
            }
            Moment::JustRotated => {
                let answered = sb.successful_token_requests();
                eventually_blocking("a rotation", Duration::from_secs(10), || {
                    sb.successful_token_requests() > answered
                });
            }
            Moment::Random => {
                std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 1500));
            }
        }
        p.child.kill().expect("kill -9");
        p.child.wait().expect("reaped");
        // Whatever the moment, the file is whole (old or new, never torn).
        let st = state_json(&state);
        assert!(
            st["refresh_token"].as_str().is_some_and(|t| !t.is_empty()),
            "state file after kill -9 at {moment:?}: {st}"
        );
        assert_eq!(mode_of(&state), 0o600);
    }

    sb.set_token_delay(Duration::ZERO);
    let p = ProxyProcess::start(&cfg, &[]);
    rt.block_on(wait_for_200(&p.admin("/readyz"), Duration::from_secs(15)));
    request_ok(&p, "after the last restart");
    // Renewals keep working on the rotated lineage.
    let answered = sb.successful_token_requests();
    eventually_blocking("two more renewals", Duration::from_secs(10), || {
        sb.successful_token_requests() >= answered + 2
    });
    request_ok(&p, "after renewals");
    eventually_blocking(
        "the state file catching up",
        Duration::from_secs(10),
        || state_refresh_token(&state) == sb.current_refresh_token(),
    );
    drop(p);
    assert_eq!(sb.rejected_api_requests(), 0);
}

// ------------------------------------------------------------------ replay

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_access_token_is_replaced_once_and_concurrent_requests_are_replayed() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let url = proxy_url(&p, "/api/v1/accounts");
    assert_eq!(get(&url).await.status, 200);
    assert_eq!(sb.token_requests(), 1);

    sb.revoke_access_tokens();
    let client = client();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (client, url) = (client.clone(), url.clone());
        set.spawn(async move { get_with(&client, &url).await });
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    while let Some(r) = set.join_next().await {
        *statuses.entry(r.unwrap().status.as_u16()).or_default() += 1;
    }
    assert_eq!(statuses.get(&200), Some(&200), "{statuses:?}");
    assert_eq!(
        sb.token_requests(),
        2,
        "one token request for the rejection"
    );

    let rejected = sb.rejected_api_requests();
    assert!(rejected >= 1, "the revoked token was never sent");
    let metrics = metrics_text(&p).await;
    let replays = metric(
        &metrics,
        r#"flinks_proxy_token_replays_total{route="flinks"}"#,
    );
    assert_eq!(
        replays,
        Some(rejected as f64),
        "every request that met the 401 was replayed once"
    );
    // Every 401 was answered with a replay carrying the new token.
    assert_eq!(sb.api_requests(), 1 + 200 + rejected);
}

#[tokio::test]
async fn post_body_up_to_64_kib_is_replayed_and_a_larger_one_gets_the_401() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    assert_eq!(get(&proxy_url(&p, "/api/v1/accounts")).await.status, 200);
    let post = |len: usize| {
        let body: Bytes = (0..len).map(|i| (i % 251) as u8).collect();
        let req = Request::post(proxy_url(&p, "/upload"))
            .header("x-echo-body", "1")
            .body(Full::new(body.clone()))
            .unwrap();
        (req, body)
    };
    let client = client();

    sb.revoke_access_tokens();
    let (req, body) = post(64 * 1024);
    let r = send(&client, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, body, "the replay carries the same body");
    assert_eq!(sb.token_requests(), 2);

    sb.revoke_access_tokens();
    let api_before = sb.api_requests();
    let (req, body) = post(1 << 20);
    let r = send(&client, req).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer error="invalid_token""#)
    );
    let json = r.json();
    assert_eq!(json["error"], "invalid_token", "the upstream's own answer");
    assert!(
        json.get("request_id").is_none(),
        "not a proxy error: {json}"
    );
    assert_eq!(sb.api_requests(), api_before + 1, "not replayed");
    assert_eq!(sb.recorded().pop().unwrap().body, body);

    // That token replaced a rejected one moments ago: its rejection is
    // the upstream's answer, and the token is kept (no storm).
    assert_eq!(sb.token_requests(), 2);
    let metrics = metrics_text(&p).await;
    let replays = metric(
        &metrics,
        r#"flinks_proxy_token_replays_total{route="flinks"}"#,
    );
    assert_eq!(replays, Some(1.0));
    let ignored =
        r#"flinks_proxy_token_rejections_total{action="ignored_fresh",credential="flinks"}"#;
    assert_eq!(metric(&metrics, ignored), Some(1.0), "{metrics}");
}

// --------------------------------------------------------------- outages

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_token_endpoint_never_sends_expired_tokens_or_parallel_token_requests() {
    const USABLE: Duration = Duration::from_millis(1800); // 2 s minus a tenth
    const SLACK: Duration = Duration::from_millis(250);
    let dir = TempDir::new();
    let sb = sandbox_with(SandboxOptions {
        expires_in: Some(2),
        ..opts()
    })
    .await;
    let grant = "grant_type = \"client_credentials\"\nscope = \"client:admin\"\ntoken_timeout = \"500ms\"\n";
    let toml = proxy_toml(&sb.token_url(), &sb.api_url(), grant, "");
    let p = start_in(&dir, &toml).await.expect("start");
    let url = proxy_url(&p, "/api/v1/accounts");
    wait_for_200(&url, Duration::from_secs(10)).await;

    // When each token was issued, as seen from here (within 2 ms).
    let issued = Arc::new(Mutex::new(vec![Instant::now()]));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (sb, issued, stop) = (sb.clone(), issued.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = sb.successful_token_requests();
            while !stop.load(Ordering::Relaxed) {
                let now = sb.successful_token_requests();
                if now != seen {
                    seen = now;
                    issued.lock().unwrap().push(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Two clients sending a request every 20 ms each.
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (url, stop) = (url.clone(), stop.clone());
        load.spawn(async move {
            let client = client();
            let mut results = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                let r = get_with(&client, &url).await;
                results.push((at, r.status, r.text()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            results
        });
    }

    let modes = [
        FailureMode::ServerError,
        FailureMode::Hang,
        FailureMode::Garbage,
        FailureMode::None,
    ];
    let flapping_until = Instant::now() + Duration::from_secs(10);
    for mode in modes.iter().cycle() {
        if Instant::now() >= flapping_until {
            break;
        }
        sb.set_failure(*mode);
        tokio::time::sleep(Duration::from_millis(750)).await;
    }
    // Healthy again: requests succeed once the backoff lets a request out.
    sb.set_failure(FailureMode::None);
    let issued_before = sb.successful_token_requests();
    eventually("a token after the outage", Duration::from_secs(70), || {
        sb.successful_token_requests() > issued_before
    })
    .await;
    // Allow for the token's way from the endpoint into the cache.
    let recovered = Instant::now() + SLACK;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let mut results = Vec::new();
    while let Some(r) = load.join_next().await {
        results.extend(r.unwrap());
    }
    results.sort_by_key(|r| r.0);

    let issued = issued.lock().unwrap().clone();
    let (mut ok, mut unavailable) = (0, 0);
    for (at, status, body) in &results {
        if *status == StatusCode::OK {
            ok += 1;
            continue;
        }
        assert_eq!(*status, 503, "only token_unavailable may fail: {body}");
        assert!(body.contains("token_unavailable"), "{body}");
        unavailable += 1;
        // A 503 only when no token issued recently enough is usable. The
        // slack covers a token on its way into the cache, the request's own
        // transit and the watcher's polling.
        if let Some(t) = issued.iter().rev().find(|t| *t <= at) {
            let since = at.duration_since(*t);
            assert!(
                since < SLACK || since >= USABLE - SLACK,
                "503 {since:?} after a token was issued, while it was still usable"
            );
        }
        assert!(
            *at < recovered,
            "a request failed after the endpoint recovered: {body}"
        );
    }
    let after_recovery = results.iter().filter(|r| r.0 >= recovered).count();
    assert!(
        after_recovery > 10,
        "{after_recovery} requests after recovery"
    );
    assert!(ok > 0 && ok + unavailable == results.len());
    assert_eq!(sb.expired_token_requests(), 0, "an expired token was sent");
    assert_eq!(sb.rejected_api_requests(), 0);
    assert_eq!(sb.max_concurrent_token_requests(), 1);
    assert!(
        sb.token_requests() >= 5,
        "{} token requests",
        sb.token_requests()
    );
}

// --------------------------------------------------------- JWT lifetimes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_expires_in_is_renewed_before_its_jwt_exp() {
    let sb = sandbox_with(SandboxOptions {
        expires_in: None,
        jwt_lifetime: Duration::from_secs(3),
        ..SandboxOptions::default()
    })
    .await;
    // (arrival time, exp claim) of every request the API receives.
    let arrivals = Arc::new(Mutex::new(Vec::<(f64, u64)>::new()));
    let seen = arrivals.clone();
    let api = forwarder(sb.api_url(), move |parts, _| {
        let exp = bearer(&parts.headers)
            .and_then(|t| decode_jwt_claims(&t))
            .and_then(|c| c["exp"].as_u64())
            .unwrap_or(0);
        seen.lock().unwrap().push((unix_now_f64(), exp));
    })
    .await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| c.route_mut("flinks").upstream = api.clone())
        .toml();
    let p = start_proxy(&toml).await;
    let url = proxy_url(&p, "/api/v1/accounts");
    let client = client();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let r = get_with(&client, &url).await;
        assert_eq!(r.status, 200, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sb.rejected_api_requests(), 0);
    assert!(
        sb.token_requests() >= 3,
        "{} token requests in 5 s",
        sb.token_requests()
    );
    for (at, exp) in arrivals.lock().unwrap().iter() {
        assert!(*at < *exp as f64, "token sent at {at}, its exp is {exp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_token_is_never_sent_after_its_exp_while_renewal_fails() {
    let sb = sandbox_with(SandboxOptions {
        expires_in: None,
        jwt_lifetime: Duration::from_secs(3),
        ..SandboxOptions::default()
    })
    .await;
    let arrivals = Arc::new(Mutex::new(Vec::<(f64, u64)>::new()));
    let seen = arrivals.clone();
    let api = forwarder(sb.api_url(), move |parts, _| {
        let exp = bearer(&parts.headers)
            .and_then(|t| decode_jwt_claims(&t))
            .and_then(|c| c["exp"].as_u64())
            .unwrap_or(0);
        seen.lock().unwrap().push((unix_now_f64(), exp));
    })
    .await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| c.route_mut("flinks").upstream = api.clone())
        .toml();
    // `exp` has whole seconds: a token issued late in a second expires up to
    // a second before `iat + 3`. Start there, so that is the case tested.
    let frac = unix_now_f64().fract();
    let wait = if frac < 0.8 { 0.8 - frac } else { 1.8 - frac };
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    let p = start_proxy(&toml).await;
    let url = proxy_url(&p, "/api/v1/accounts");
    let client = client();
    let r = get_with(&client, &url).await;
    assert_eq!(r.status, 200, "{}", r.text());
    sb.set_failure(FailureMode::ServerError);
    let mut unavailable = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let r = get_with(&client, &url).await;
        if r.status != 200 {
            assert_eq!(r.status, 503, "{}", r.text());
            unavailable += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(unavailable > 0, "the token outlived its 3 s lifetime");
    assert_eq!(sb.successful_token_requests(), 1);
    assert_eq!(sb.rejected_api_requests(), 0);
    for (at, exp) in arrivals.lock().unwrap().iter() {
        assert!(
            *at < *exp as f64,
            "token sent at {at:.3}, after its exp claim {exp}"
        );
    }
}

// ----------------------------------------------------------------- secrets

#[test]
fn secrets_never_appear_in_logs_status_metrics_or_token_output() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = TempDir::new();
    // Renewed every 3 s, so the refused refresh below comes by itself.
    let sb = rt.block_on(sandbox_with(SandboxOptions {
        expires_in: Some(6),
        ..opts()
    }));
    let state = dir.join("flinks.json");
    let cfg = dir.write(
        "proxy.toml",
        proxy_toml(
            &sb.token_url(),
            &sb.api_url(),
            &auth_code_grant(CODE, &state),
            "[log]\nlevel = \"debug\"\n",
        ),
    );
    let mut p = ProxyProcess::start(&cfg, &[]);
    rt.block_on(wait_for_200(&p.admin("/readyz"), Duration::from_secs(15)));
    let r = rt.block_on(get(&p.url("/api/v1/accounts")));
    assert_eq!(r.status, 200, "{}", r.text());
    // A rejection and a replay (both log).
    sb.revoke_access_tokens();
    let r = rt.block_on(get(&p.url("/anything?x=1")));
    assert_eq!(r.status, 200, "{}", r.text());

    let cfg_arg = cfg.to_str().unwrap();
    let (code, quiet, quiet_err) =
        rt.block_on(run_to_exit(&["token", "flinks", "--config", cfg_arg]));
    assert_eq!(code, Some(0), "{quiet}{quiet_err}");
    assert!(quiet.contains("authorization_code"), "{quiet}");
    assert!(quiet.contains("user-123"), "the sub claim: {quiet}");
    assert!(quiet.contains("client:admin"), "the scope: {quiet}");
    let (code, shown, shown_err) = rt.block_on(run_to_exit(&[
        "token", "flinks", "--show", "--config", cfg_arg,
    ]));
    assert_eq!(code, Some(0), "{shown}{shown_err}");
    let shown_token = shown
        .split_whitespace()
        .find(|w| w.starts_with(JWT_HEADER))
        .unwrap_or_else(|| panic!("--show prints the token: {shown}"));
    assert_eq!(decode_jwt_claims(shown_token).unwrap()["sub"], "user-123");

    // A refused refresh logs the endpoint's error and description.
    sb.revoke_refresh_token();
    assert!(
        p.wait_for_log("invalid_grant", Duration::from_secs(10)),
        "{}",
        p.log()
    );
    let status = rt.block_on(get(&p.admin("/status"))).text();
    let metrics = rt.block_on(get(&p.admin("/metrics"))).text();
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(30)), Some(0), "{}", p.log());
    assert!(
        p.wait_for_log("stopped", Duration::from_secs(5)),
        "{}",
        p.log()
    );
    let log = p.log();

    let mut secrets = vec![
        CLIENT_SECRET.to_owned(),
        REFRESH.to_owned(),
        CODE.to_owned(),
        JWT_HEADER.to_owned(),
        JWT_SIGNATURE.to_owned(),
        shown_token.to_owned(),
    ];
    secrets.extend(
        sb.recorded()
            .iter()
            .filter_map(|r| r.headers.iter().find(|(k, _)| k == "authorization"))
            .map(|(_, v)| v.trim_start_matches("Bearer ").to_owned()),
    );
    assert!(secrets.len() > 6, "the API saw the tokens");
    for (what, text) in [
        ("the log", &log),
        ("/status", &status),
        ("/metrics", &metrics),
        ("token without --show", &format!("{quiet}{quiet_err}")),
    ] {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "{what} contains {s}:\n{text}");
        }
    }
}

#[test]
fn token_command_exchanges_the_code_once_and_keeps_the_state_file_current() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = TempDir::new();
    let sb = rt.block_on(sandbox_with(SandboxOptions {
        rotate_refresh_tokens: true,
        ..opts()
    }));
    let state = dir.join("state/flinks.json");
    let cfg = dir.write(
        "proxy.toml",
        proxy_toml(
            &sb.token_url(),
            &sb.api_url(),
            &auth_code_grant(CODE, &state),
            "",
        ),
    );
    let token = || {
        let (code, out, err) = rt.block_on(run_to_exit(&[
            "token",
            "flinks",
            "--config",
            cfg.to_str().unwrap(),
        ]));
        assert_eq!(code, Some(0), "{out}{err}");
    };

    token();
    assert_eq!(sb.token_requests_by_grant("authorization_code"), 1);
    assert_eq!(state_refresh_token(&state), REFRESH);
    assert_eq!(mode_of(&state), 0o600);

    token();
    assert_eq!(sb.token_requests_by_grant("authorization_code"), 1);
    assert_eq!(sb.token_requests_by_grant("refresh_token"), 1);
    let rotated = state_refresh_token(&state);
    assert_ne!(rotated, REFRESH);
    assert_eq!(rotated, sb.current_refresh_token());

    // The server picks up where the command left off.
    let p = ProxyProcess::start(&cfg, &[]);
    rt.block_on(wait_for_200(&p.admin("/readyz"), Duration::from_secs(15)));
    let r = rt.block_on(get(&p.url("/api/v1/accounts")));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    assert_eq!(sb.token_requests_by_grant("authorization_code"), 1);
    assert_eq!(sb.successful_token_requests(), sb.token_requests());
}

// -------------------------------------------------------------- state file

#[tokio::test]
async fn corrupt_or_unreadable_state_file_is_a_startup_error_and_is_left_untouched() {
    let dir = TempDir::new();
    let sb = sandbox_with(opts()).await;
    let corrupt = r#"{"refresh_token": "rt-half-writ"#;
    let state = dir.write("flinks.json", corrupt);
    let toml = proxy_toml(
        &sb.token_url(),
        &sb.api_url(),
        &auth_code_grant(CODE, &state),
        "",
    );
    let message = match start_in(&dir, &toml).await {
        Ok(_) => panic!("started with a corrupt state file"),
        Err(e) => e.to_string(),
    };
    assert!(message.contains(&state.display().to_string()), "{message}");
    assert!(message.contains("credentials.flinks"), "{message}");
    assert_eq!(std::fs::read_to_string(&state).unwrap(), corrupt);

    let cfg = dir.write("proxy.toml", &toml);
    let cfg_arg = cfg.to_str().unwrap();
    let (code, _, stderr) = run_to_exit(&["--config", cfg_arg]).await;
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}\n{stderr}");
    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
    assert!(!stderr.contains("proxy listening"), "{stderr}");
    let (code, _, stderr) = run_to_exit(&["check", "--config", cfg_arg]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
    assert_eq!(std::fs::read_to_string(&state).unwrap(), corrupt);
    assert_eq!(sb.token_requests(), 0, "the code was not spent");

    // A state file that cannot be read (here: a folder) is an error too.
    let unreadable: PathBuf = dir.join("folder.json");
    std::fs::create_dir(&unreadable).unwrap();
    let toml = proxy_toml(
        &sb.token_url(),
        &sb.api_url(),
        &auth_code_grant(CODE, &unreadable),
        "",
    );
    let message = match start_in(&dir, &toml).await {
        Ok(_) => panic!("started with an unreadable state file"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.contains(&unreadable.display().to_string()),
        "{message}"
    );
    assert!(unreadable.is_dir());
    assert_eq!(sb.token_requests(), 0);
}
