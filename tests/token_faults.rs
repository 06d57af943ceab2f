//! Token-side faults of issue 8: refresh storms on 401, absurd data from the
//! token endpoint, reloads during a refresh, blocking reloads, failure
//! detail, and privacy of `/status`. Real proxy, real sandbox, loopback.

mod support;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flinks_proxy::sandbox::{FailureMode, SandboxOptions, TokenOverride};
use support::*;

/// A proxy.toml with one credential (`grant` lines) and one route to `api`.
fn toml_with(token_url: &str, api: &str, grant: &str, admin: &str) -> String {
    let o = SandboxOptions::default();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
{admin}

[credentials.flinks]
token_url = "{token_url}"
client_id = "{}"
client_secret = "{}"
{grant}

[routes.flinks]
path_prefix = "/"
upstream = "{api}"
credential = "flinks"
"#,
        o.client_id, o.client_secret
    )
}

const CLIENT_CREDENTIALS: &str = "grant_type = \"client_credentials\"\ntoken_timeout = \"2s\"\n";

async fn status(p: &flinks_proxy::Running) -> serde_json::Value {
    get(&admin_url(p, "/status")).await.json()
}

/// Polls `cond` until it holds; panics after `limit`.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> F,
) {
    let end = Instant::now() + limit;
    while !cond().await {
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The credential's `last_error.error_description`, once there is one.
async fn last_error_description(p: &flinks_proxy::Running) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status(p).await;
        if let Some(d) = st["credentials"]["flinks"]["last_error"]["error_description"].as_str() {
            return d.to_owned();
        }
        assert!(Instant::now() < end, "no failure recorded: {st}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ------------------------------------------------------------ point 1

#[tokio::test]
async fn always_401_path_causes_at_most_two_token_requests() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let client = client();
    for i in 0..60 {
        let r = get_with(&client, &proxy_url(&p, "/status/401")).await;
        assert_eq!(
            r.status, 401,
            "request {i}: the upstream's answer passes through"
        );
    }
    assert!(
        sb.token_requests() <= 2,
        "60 rejections made {} token requests",
        sb.token_requests()
    );
    let m = get(&admin_url(&p, "/metrics")).await.text();
    let series = |a: &str| {
        metric(
            &m,
            &format!(r#"flinks_proxy_token_rejections_total{{action="{a}",credential="flinks"}}"#),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(series("refreshed"), 1.0, "{m}");
    assert!(series("ignored_fresh") >= 58.0, "{m}");
    // The token kept is good for other paths.
    assert_eq!(
        get_with(&client, &proxy_url(&p, "/api/v1/accounts"))
            .await
            .status,
        200
    );
}

// ------------------------------------------------------------ point 2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_lifetimes_are_capped_and_the_proxy_keeps_serving() {
    let huge: serde_json::Value = serde_json::from_str("18446744073709551616").unwrap();
    let cases = [
        TokenOverride {
            expires_in: Some(huge),
            exp: None,
        },
        TokenOverride {
            expires_in: Some(serde_json::json!(1e300)),
            exp: None,
        },
        TokenOverride {
            expires_in: Some(serde_json::Value::Null),
            exp: Some(u64::MAX),
        },
    ];
    for case in cases {
        let sb = sandbox().await;
        sb.set_token_override(case.clone());
        let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
        let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
        assert_eq!(r.status, 200, "{case:?}: {}", r.text());
        assert_eq!(get(&admin_url(&p, "/readyz")).await.status, 200, "{case:?}");
        let st = status(&p).await;
        let expires = st["credentials"]["flinks"]["expires_at"]
            .as_str()
            .unwrap()
            .to_owned();
        let at = humantime::parse_rfc3339(&expires).unwrap();
        let cap = std::time::SystemTime::now() + Duration::from_secs(24 * 3600 + 60);
        assert!(
            at < cap,
            "{case:?}: lifetime capped at a day, got {expires}"
        );
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_or_negative_expires_in_is_an_invalid_response_then_a_good_answer_recovers() {
    for bad in [
        serde_json::json!(-5),
        serde_json::json!(0),
        serde_json::json!("soon"),
    ] {
        let sb = sandbox().await;
        sb.set_token_override(TokenOverride {
            expires_in: Some(bad.clone()),
            exp: None,
        });
        let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
        sb.wait_for_token_requests(1).await;
        let url = proxy_url(&p, "/api/v1/accounts");
        eventually(
            "a 503 from the invalid answer",
            Duration::from_secs(10),
            || async {
                let r = get(&url).await;
                r.status == 503 && r.json()["error"] == "token_unavailable"
            },
        )
        .await;
        assert_eq!(get(&admin_url(&p, "/readyz")).await.status, 503, "{bad}");
        let st = status(&p).await;
        assert_eq!(
            st["credentials"]["flinks"]["last_error"]["error"], "invalid_response",
            "{st}"
        );
        sb.set_token_override(TokenOverride::default());
        eventually(
            "recovery after a good answer",
            Duration::from_secs(15),
            || async { get(&url).await.status == 200 },
        )
        .await;
        assert_eq!(get(&admin_url(&p, "/readyz")).await.status, 200, "{bad}");
        p.shutdown().await;
    }
}

// ------------------------------------------------------------ point 3

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_during_a_slow_refresh_never_runs_two_refreshes_and_keeps_the_rotated_token() {
    let sb = sandbox_with(SandboxOptions {
        rotate_refresh_tokens: true,
        ..SandboxOptions::default()
    })
    .await;
    let dir = TempDir::new();
    let state = dir.join("flinks.json");
    let grant = |timeout: &str| {
        format!(
            "grant_type = \"refresh_token\"\nrefresh_token = \"{}\"\nstate_file = \"{}\"\ntoken_timeout = \"{timeout}\"\n",
            SandboxOptions::default().refresh_token,
            state.display()
        )
    };
    let toml = |t: &str| toml_with(&sb.token_url(), &sb.api_url(), &grant(t), "");
    let p = flinks_proxy::start(parse_config(&toml("8s"), dir.path()))
        .await
        .unwrap();
    let url = proxy_url(&p, "/api/v1/accounts");
    eventually("a first token", Duration::from_secs(10), || async {
        get(&url).await.status == 200
    })
    .await;

    // A slow refresh on the wire (the upstream rejected the token)...
    sb.set_token_delay(Duration::from_millis(1500));
    sb.revoke_access_tokens();
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    eventually(
        "the slow refresh in flight",
        Duration::from_secs(10),
        || async { sb.token_requests_in_flight() == 1 },
    )
    .await;
    // ...when a reload changes the credential.
    p.reload(parse_config(&toml("9s"), dir.path())).unwrap();
    sb.set_token_delay(Duration::ZERO);
    assert_eq!(waiting.await.unwrap().status, 200);

    // The new generation works with the rotated token.
    sb.revoke_access_tokens();
    eventually(
        "the new generation's token",
        Duration::from_secs(15),
        || async { get(&url).await.status == 200 },
    )
    .await;
    assert_eq!(
        sb.max_concurrent_token_requests(),
        1,
        "two refreshes at once"
    );
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(
        st["refresh_token"],
        sb.current_refresh_token().as_str(),
        "{st}"
    );
    let m = get(&admin_url(&p, "/metrics")).await.text();
    let rejected = r#"flinks_proxy_token_requests_total{credential="flinks",outcome="rejected"}"#;
    assert_eq!(
        metric(&m, rejected),
        Some(0.0),
        "a used refresh token was presented"
    );
    p.shutdown().await;
}

// ------------------------------------------------------------ point 7

/// `mkfifo`: reading it blocks until a writer comes.
fn fifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn sighup_reload_reads_the_config_off_the_runtime_thread() {
    use std::os::unix::fs::OpenOptionsExt;
    // One runtime thread, as with `workers = 1`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = TempDir::new();
    let fifo_path = dir.join("proxy.toml");
    fifo(&fifo_path);
    rt.block_on(async {
        let sb = sandbox().await;
        let toml = ProxyToml::sandbox(&sb).toml();
        let p = start_proxy(&toml).await;
        assert_eq!(get(&proxy_url(&p, "/api/v1/accounts")).await.status, 200);

        // The writer waits until the reload is blocked reading the FIFO,
        // and gives up (releasing it) after 20 s if the test never asks.
        let released = Arc::new(AtomicBool::new(false));
        let (blocked_tx, blocked_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn({
            let (path, released) = (fifo_path.clone(), Arc::clone(&released));
            move || {
                let end = Instant::now() + Duration::from_secs(20);
                let mut f = loop {
                    // Opening a FIFO for writing without blocking fails
                    // until a reader has it open.
                    match std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc_o_nonblock())
                        .open(&path)
                    {
                        Ok(f) => break f,
                        Err(_) if Instant::now() < end => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(e) => panic!("no reader: {e}"),
                    }
                };
                let _ = blocked_tx.send(());
                let _ = go_rx.recv_timeout(Duration::from_secs(20));
                released.store(true, Ordering::SeqCst);
                f.write_all(toml.as_bytes()).unwrap();
            }
        });
        let state = Arc::clone(p.state());
        let reload = tokio::spawn({
            let path = fifo_path.clone();
            async move { flinks_proxy::proxy::reload::reload_file(&state, &path).await }
        });
        blocked_rx.await.unwrap();
        let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
        assert_eq!(r.status, 200);
        assert!(
            !released.load(Ordering::SeqCst),
            "the request waited for the reload to finish reading"
        );
        go_tx.send(()).unwrap();
        assert_eq!(reload.await.unwrap(), Ok(()));
        writer.join().unwrap();
        p.shutdown().await;
    });
}

/// `O_NONBLOCK` on Linux and the BSDs this runs on.
fn libc_o_nonblock() -> i32 {
    if cfg!(target_os = "linux") {
        0o4000
    } else {
        0x0004
    }
}

// ------------------------------------------------------------ point 11

#[tokio::test]
async fn a_closed_token_port_says_connection_refused_and_names_the_host() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/token");
    let p = start_proxy(&toml_with(
        &url,
        "http://127.0.0.1:9",
        CLIENT_CREDENTIALS,
        "",
    ))
    .await;
    let desc = last_error_description(&p).await;
    assert!(desc.contains("connection refused"), "{desc}");
    assert!(desc.contains("127.0.0.1"), "{desc}");
    let r = get(&proxy_url(&p, "/x")).await;
    assert_eq!(r.status, 503);
    assert!(r.text().contains("connection refused"), "{}", r.text());
}

#[tokio::test]
async fn a_token_endpoint_certificate_for_another_name_says_certificate() {
    let pki = Pki::new("token-ca");
    let upstream = TestUpstream::start_tls("token", &pki.server_named(&["other.example"])).await;
    let dir = TempDir::new();
    dir.write("ca.pem", &pki.ca_pem);
    let grant = format!("{CLIENT_CREDENTIALS}ca_file = \"ca.pem\"\n");
    let url = format!("{}/token", upstream.https_url());
    let p = flinks_proxy::start(parse_config(
        &toml_with(&url, "http://127.0.0.1:9", &grant, ""),
        dir.path(),
    ))
    .await
    .unwrap();
    let desc = last_error_description(&p).await;
    assert!(desc.contains("certificate"), "{desc}");
    assert!(desc.contains("127.0.0.1"), "{desc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_during_a_retry_waits_for_it_instead_of_answering_the_old_failure() {
    let sb = sandbox().await;
    sb.set_failure(FailureMode::ServerError);
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let url = proxy_url(&p, "/api/v1/accounts");
    eventually("the first failure", Duration::from_secs(10), || async {
        get(&url).await.status == 503
    })
    .await;
    // The retry hangs on the wire.
    sb.set_failure(FailureMode::Hang);
    eventually("the retry in flight", Duration::from_secs(10), || async {
        sb.token_requests_in_flight() == 1
    })
    .await;
    let mut req = tokio::spawn(async move { get(&url).await });
    let early = tokio::time::timeout(Duration::from_millis(300), &mut req).await;
    assert!(early.is_err(), "answered from the old failure: {early:?}");
    sb.set_failure(FailureMode::None);
    let r = req.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

// ------------------------------------------------------------ point 12

#[tokio::test]
async fn status_shows_subjects_only_when_asked_and_token_urls_without_query() {
    let sb = sandbox().await;
    let url = format!("{}?tenant=t-42", sb.token_url());
    for (admin, shown) in [("", false), ("show_subjects = true", true)] {
        let p = start_proxy(&toml_with(&url, &sb.api_url(), CLIENT_CREDENTIALS, admin)).await;
        assert_eq!(get(&proxy_url(&p, "/api/v1/accounts")).await.status, 200);
        let st = status(&p).await;
        let cred = &st["credentials"]["flinks"];
        assert_eq!(cred["token_url"], sb.token_url().as_str(), "{st}");
        assert!(!st.to_string().contains("t-42"), "{st}");
        if shown {
            assert_eq!(cred["sub"], "user-123", "{st}");
        } else {
            assert!(cred.get("sub").is_none(), "{st}");
            assert!(!st.to_string().contains("user-123"), "{st}");
        }
        p.shutdown().await;
    }
}

// ------------------------------------------------------------ friction

#[tokio::test]
async fn every_token_outcome_series_exists_from_the_start() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let m = get(&admin_url(&p, "/metrics")).await.text();
    for o in [
        "success",
        "rejected",
        "server_error",
        "timeout",
        "network",
        "invalid_response",
    ] {
        let s =
            format!(r#"flinks_proxy_token_requests_total{{credential="flinks",outcome="{o}"}}"#);
        assert!(metric(&m, &s).is_some(), "{s} missing:\n{m}");
    }
    for t in ["token_refresh", "code_exchange"] {
        let s = format!(r#"flinks_proxy_task_restarts_total{{credential="flinks",task="{t}"}}"#);
        assert_eq!(metric(&m, &s), Some(0.0), "{s}:\n{m}");
    }
}

#[test]
fn check_warns_about_a_cleartext_token_url_beyond_loopback() {
    let dir = TempDir::new();
    let toml = toml_with(
        "http://tokens.example.com/token",
        "http://127.0.0.1:9",
        CLIENT_CREDENTIALS,
        "",
    );
    let cfg = dir.write("proxy.toml", toml);
    let (code, _out, err) = run_binary(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("plain http://"), "{err}");
    let local = dir.write(
        "local.toml",
        toml_with(
            "http://127.0.0.1:1/token",
            "http://127.0.0.1:9",
            CLIENT_CREDENTIALS,
            "",
        ),
    );
    let (code, _out, err) = run_binary(&["check", "--config", local.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("plain http://"), "{err}");
}
