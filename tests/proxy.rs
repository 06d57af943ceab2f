//! End to end through the proxy, in process: real sandbox token endpoint and
//! API (or small test upstreams) on loopback, real HTTP clients.
//!
//! Covers SPEC §4 (token caching, single flight, refresh ahead, failures),
//! §5 (forwarding, header rewrites, routing, not an open proxy), §6 (errors
//! the proxy answers itself) and §7 (`/metrics`, `/readyz`, `/healthz`).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flinks_proxy::sandbox::{decode_jwt_claims, FailureMode, RecordedRequest, SandboxOptions};
use flinks_proxy::Running;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound for anything that should happen "soon" on a loaded 2-core box.
const PATIENCE: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ helpers

/// The sandbox config with other request and token timeouts.
fn with_timeouts(
    sb: &flinks_proxy::sandbox::Sandbox,
    request_timeout: Duration,
    token_timeout: Duration,
) -> String {
    ProxyToml::sandbox(sb)
        .with(|c| {
            c.server.request_timeout = Some(request_timeout);
            c.credential_mut("flinks").token_timeout = Some(token_timeout);
        })
        .toml()
}

/// Listeners and the sandbox credential `flinks`, with only the given routes.
fn config_with_routes(sb: &flinks_proxy::sandbox::Sandbox, routes: Vec<(&str, Route)>) -> String {
    let mut c = ProxyToml::listeners().credential("flinks", Credential::sandbox(sb));
    c.server.request_timeout = Some(Duration::from_secs(10));
    routes
        .into_iter()
        .fold(c, |c, (name, r)| c.route(name, r))
        .toml()
}

/// A route from `prefix` to `upstream` using the sandbox credential.
fn route(prefix: &str, upstream: &str) -> Route {
    Route::credential(prefix, upstream, "flinks")
}

/// Polls `/readyz` until it answers 200.
async fn wait_ready(p: &Running) {
    let end = Instant::now() + PATIENCE;
    loop {
        if get(&admin_url(p, "/readyz")).await.status == 200 {
            return;
        }
        assert!(Instant::now() < end, "proxy not ready after {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Values of one header as the sandbox API recorded them.
fn recorded_header<'a>(r: &'a RecordedRequest, name: &str) -> Vec<&'a str> {
    r.headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The access token the upstream received, checked to be one the sandbox's
/// token endpoint issued to our client.
fn bearer_token_of(r: &RecordedRequest) -> String {
    let auth = recorded_header(r, "authorization");
    assert_eq!(auth.len(), 1, "one Authorization header upstream: {auth:?}");
    let token = auth[0]
        .strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("not a bearer token: {}", auth[0]));
    assert!(r.token_valid, "the upstream got a token it did not issue");
    let claims = decode_jwt_claims(token).expect("a JWT from the token endpoint");
    assert_eq!(claims["client_id"], SandboxOptions::default().client_id);
    token.to_owned()
}

/// Sends raw bytes to the proxy (with `Connection: close` in `request`) and
/// returns the status code and the whole response text.
async fn raw_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("response within the deadline")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, text)
}

/// The JSON body of a raw response.
fn raw_json(text: &str) -> serde_json::Value {
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts a proxy-made error: status, JSON `error` code, and the
/// `request_id` of the body equal to the `x-request-id` header.
fn assert_proxy_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(
        body["request_id"].as_str(),
        r.header("x-request-id"),
        "{body}"
    );
}

// ------------------------------------------------------ Prometheus parsing

/// One sample line of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses Prometheus text exposition (version 0.0.4); panics naming the
/// first line that is not `# HELP|TYPE ...` or `name{labels} value [ts]`.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = |why: &str| -> ! { panic!("bad exposition line ({why}): {line:?}") };
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            match words.as_slice() {
                ["TYPE", name, kind] => {
                    if !is_metric_name(name) {
                        bad("metric name");
                    }
                    let kinds = ["counter", "gauge", "histogram", "summary", "untyped"];
                    if !kinds.contains(kind) {
                        bad("type");
                    }
                }
                ["HELP", name, ..] if is_metric_name(name) => {}
                ["HELP", ..] | ["TYPE", ..] => bad("comment"),
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad("no value"));
        let name = &line[..name_end];
        if !is_metric_name(name) {
            bad("metric name");
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            let end = loop {
                let start = match chars.peek() {
                    Some(&(i, '}')) => break i + 1,
                    Some(&(i, _)) => i,
                    None => bad("unterminated labels"),
                };
                let eq = after[start..].find('=').unwrap_or_else(|| bad("label")) + start;
                let label = &after[start..eq];
                if !is_metric_name(label) || label.contains(':') {
                    bad("label name");
                }
                while chars.next_if(|&(i, _)| i <= eq).is_some() {}
                if chars.next().map(|(_, c)| c) != Some('"') {
                    bad("label value must be quoted");
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            _ => bad("escape"),
                        },
                        Some((_, c)) => value.push(c),
                        None => bad("unterminated label value"),
                    }
                }
                labels.insert(label.to_owned(), value);
                if chars.next_if(|&(_, c)| c == ',').is_none()
                    && chars.peek().map(|p| p.1) != Some('}')
                {
                    bad("expected , or }");
                }
            };
            rest = &after[end..];
        }
        let mut fields = rest.split_whitespace();
        let value: f64 = fields
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| bad("value is not a float"));
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().unwrap_or_else(|_| bad("timestamp"));
        }
        if fields.next().is_some() || !rest.starts_with(' ') {
            bad("trailing text");
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

/// The value of the sample with exactly this name and these labels.
fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

async fn scrape(p: &Running) -> Vec<Sample> {
    let r = get(&admin_url(p, "/metrics")).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    parse_prometheus(&r.text())
}

#[test]
fn prometheus_parser_rejects_malformed_lines() {
    let good =
        "# HELP a_b help text\n# TYPE a_b counter\na_b{x=\"1\",y=\"q\\\"\"} 2.5\nc 1e3\nd +Inf\n";
    let s = parse_prometheus(good);
    assert_eq!(s.len(), 3);
    assert_eq!(sample(&s, "a_b", &[("x", "1"), ("y", "q\"")]), Some(2.5));
    assert_eq!(sample(&s, "c", &[]), Some(1000.0));
    for bad in [
        "a_b{x=1} 2",
        "a_b{x=\"1\"}",
        "a_b{x=\"1\"} two",
        "9x 1",
        "a{x=\"1\" 1",
    ] {
        let r = std::panic::catch_unwind(|| parse_prometheus(bad));
        assert!(r.is_err(), "accepted {bad:?}");
    }
}

// ------------------------------------------------------------ forwarding

#[tokio::test]
async fn get_carries_the_token_and_drops_client_credentials_and_hop_by_hop_headers() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let request = |url: String| {
        Request::get(url)
            .header("authorization", "Bearer the-clients-own-token")
            .header("proxy-authorization", "Basic Y2xpZW50OnNlY3JldA==")
            .header("connection", "x-foo")
            .header("x-foo", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("x-request-id", "client-rid-42")
            .header("x-custom", "kept")
            .body(Full::default())
            .expect("request")
    };
    // Control: the client really sends all of these (straight to the API).
    let direct = send(&client(), request(format!("{}/v1/x", sb.api_url()))).await;
    assert_eq!(direct.status, 401);
    let control = sb.recorded().remove(0);
    for h in [
        "authorization",
        "proxy-authorization",
        "connection",
        "x-foo",
    ] {
        assert_eq!(recorded_header(&control, h).len(), 1, "control lacks {h}");
    }
    for h in ["keep-alive", "te"] {
        assert_eq!(recorded_header(&control, h).len(), 1, "control lacks {h}");
    }

    let r = send(&client(), request(proxy_url(&p, "/v1/things?x=1"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let recorded = sb.recorded();
    assert_eq!(recorded.len(), 2);
    let up = &recorded[1];
    assert_eq!(up.method, "GET");
    assert_eq!(up.path_and_query, "/v1/things?x=1");
    let token = bearer_token_of(up);
    assert_ne!(token, "the-clients-own-token");
    for h in [
        "proxy-authorization",
        "connection",
        "x-foo",
        "keep-alive",
        "te",
    ] {
        assert_eq!(
            recorded_header(up, h),
            Vec::<&str>::new(),
            "{h} reached the upstream"
        );
    }
    assert_eq!(recorded_header(up, "x-custom"), ["kept"]);
    assert_eq!(recorded_header(up, "host"), [sb.api_addr().to_string()]);
    assert_eq!(recorded_header(up, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(recorded_header(up, "x-forwarded-proto"), ["http"]);
    assert_eq!(
        recorded_header(up, "x-forwarded-host"),
        [p.proxy_addr().to_string()]
    );
    assert_eq!(recorded_header(up, "x-request-id"), ["client-rid-42"]);

    // The client gets the upstream's status, headers and body.
    assert_eq!(r.header("x-request-id"), Some("client-rid-42"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-echo-body-len"), Some("0"));
    let echo = r.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/v1/things");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["headers"]["authorization"], format!("Bearer {token}"));
    assert_eq!(sb.token_requests(), 1);
}

#[tokio::test]
async fn every_x_forwarded_for_header_is_kept_in_order_and_forwarded_is_removed() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let (status, text) = raw_request(
        p.proxy_addr(),
        "GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n\
         Forwarded: for=6.6.6.6;host=evil.example;proto=https\r\n\
         X-Forwarded-For: 10.0.0.2, 10.0.0.3\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let up = sb.recorded().pop().expect("one request upstream");
    assert_eq!(
        recorded_header(&up, "x-forwarded-for"),
        ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
    );
    assert_eq!(recorded_header(&up, "forwarded"), Vec::<&str>::new());
    assert_eq!(recorded_header(&up, "x-forwarded-host"), ["x"]);
}

#[tokio::test]
async fn preserved_host_is_also_the_http2_authority() {
    let sb = sandbox().await;
    let pki = Pki::new("upstream");
    let up = TestUpstream::start_tls("h2", &pki.server()).await;
    let dir = TempDir::new();
    let ca = dir.write("upstream-ca.pem", &pki.ca_pem);
    let routes = vec![(
        "h2",
        Route {
            ca_file: Some(ca),
            preserve_host: Some(true),
            ..route("/", &up.https_url())
        },
    )];
    let p = start_proxy(&config_with_routes(&sb, routes)).await;
    let b = Request::get(proxy_url(&p, "/x")).header("host", "public.example:8443");
    let r = send(&client(), b.body(Full::default()).expect("request")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = up.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].version, http::Version::HTTP_2);
    assert_eq!(got[0].authority.as_deref(), Some("public.example:8443"));
    let hosts: Vec<_> = got[0].headers.get_all("host").iter().collect();
    assert!(
        hosts.is_empty() || hosts == ["public.example:8443"],
        "Host differs from :authority: {hosts:?}"
    );
}

#[tokio::test]
async fn post_with_a_one_mib_body_round_trips_intact() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let payload: Bytes = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(31) % 251) as u8)
        .collect();
    let req = Request::post(proxy_url(&p, "/v1/upload"))
        .header("authorization", "Bearer the-clients-own-token")
        .header("content-type", "application/octet-stream")
        .header("x-echo-body", "1")
        .body(Full::new(payload.clone()))
        .expect("request");
    let r = send(&client(), req).await;
    assert_eq!(
        r.status,
        200,
        "{}",
        String::from_utf8_lossy(&r.body[..200.min(r.body.len())])
    );
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("x-echo-body-len"), Some("1048576"));
    assert!(
        r.body == payload,
        "response body differs ({} bytes)",
        r.body.len()
    );
    let recorded = sb.recorded();
    assert_eq!(recorded.len(), 1);
    let up = &recorded[0];
    assert_eq!(up.method, "POST");
    assert!(
        up.body == payload,
        "upstream body differs ({} bytes)",
        up.body.len()
    );
    bearer_token_of(up);
    assert!(recorded_header(up, "proxy-authorization").is_empty());
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_not_passed_to_the_client() {
    let sb = sandbox().await;
    let up = TestUpstream::start("plain").await;
    // Control: the upstream does send them.
    let direct = get(&format!("{}/x", up.http_url())).await;
    assert_eq!(direct.header("x-hop"), Some("1"));
    assert!(direct.headers.contains_key("keep-alive"));

    let routes = vec![("plain", route("/", &up.http_url()))];
    let p = start_proxy(&config_with_routes(&sb, routes)).await;
    let r = get(&proxy_url(&p, "/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("plain"));
    assert!(r.text().starts_with("Bearer "), "{}", r.text());
    assert!(!r.headers.contains_key("x-hop"), "{:?}", r.headers);
    assert!(!r.headers.contains_key("keep-alive"), "{:?}", r.headers);
    assert!(
        r.header("connection").is_none_or(|c| !c.contains("x-hop")),
        "{:?}",
        r.headers
    );
}

#[tokio::test]
async fn request_id_is_kept_when_sane_and_made_otherwise() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let c = client();
    let with_id = |id: Option<&str>| {
        let mut b = Request::get(proxy_url(&p, "/v1/id"));
        if let Some(id) = id {
            b = b.header("x-request-id", id);
        }
        b.body(Full::default()).expect("request")
    };
    let kept = send(&c, with_id(Some("req-abc.123"))).await;
    assert_eq!(kept.header("x-request-id"), Some("req-abc.123"));
    let made = send(&c, with_id(None)).await;
    let insane = send(&c, with_id(Some("two words"))).await;
    let long = "a".repeat(300);
    let too_long = send(&c, with_id(Some(&long))).await;
    let mut ids = Vec::new();
    for r in [&made, &insane, &too_long] {
        assert_eq!(r.status, 200);
        let id = r.header("x-request-id").expect("x-request-id").to_owned();
        assert!(
            (8..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()),
            "{id:?}"
        );
        assert!(id != "two words" && id != long);
        ids.push(id);
    }
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    // The upstream got the same ids, in order.
    let upstream: Vec<String> = sb
        .recorded()
        .iter()
        .map(|r| recorded_header(r, "x-request-id").join(","))
        .collect();
    assert_eq!(upstream, ["req-abc.123", &ids[0], &ids[1], &ids[2]]);
}

// ---------------------------------------------------------------- tokens

#[tokio::test]
async fn sequential_requests_share_one_token_request() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let c = client();
    for i in 0..100 {
        let r = get_with(&c, &proxy_url(&p, "/api/v1/accounts")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    assert_eq!(sb.token_requests(), 1);
    assert_eq!(sb.api_requests(), 100);
    assert_eq!(sb.rejected_api_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_burst_of_500_makes_one_token_request() {
    let sb = sandbox().await;
    // The first token request hangs until all 500 requests wait for it.
    sb.set_failure(FailureMode::Hang);
    let toml = with_timeouts(&sb, Duration::from_secs(60), Duration::from_secs(60));
    let p = start_proxy(&toml).await;
    sb.wait_for_token_requests(1).await;
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500 {
        let (c, url) = (c.clone(), proxy_url(&p, &format!("/v1/burst/{i}")));
        tasks.spawn(async move { get_with(&c, &url).await.status });
    }
    let end = Instant::now() + Duration::from_secs(30);
    while p.state().metrics.inflight.get() < 500 {
        assert!(
            Instant::now() < end,
            "only {} requests reached the proxy",
            p.state().metrics.inflight.get()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sb.token_requests(),
        1,
        "a waiting request asked for a token"
    );
    sb.set_failure(FailureMode::None);
    let mut ok = 0;
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task"), 200);
        ok += 1;
    }
    assert_eq!(ok, 500);
    assert_eq!(sb.token_requests(), 1);
    assert_eq!(sb.max_concurrent_token_requests(), 1);
    assert_eq!(sb.api_requests(), 500);
    assert_eq!(sb.rejected_api_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_renewed_before_expiry_under_continuous_load() {
    let sb = sandbox_with(SandboxOptions {
        expires_in: Some(2),
        ..Default::default()
    })
    .await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    wait_ready(&p).await;
    let first_token_requests = sb.token_requests();
    let c = client();
    let url = proxy_url(&p, "/api/v1/accounts");
    let end = Instant::now() + Duration::from_secs(7);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (c, url) = (c.clone(), url.clone());
        workers.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut sent, mut failed) = (0u32, Vec::new());
            while Instant::now() < end {
                tick.tick().await;
                let r = get_with(&c, &url).await;
                sent += 1;
                if r.status != 200 {
                    failed.push(format!("{} {}", r.status, r.text()));
                }
            }
            (sent, failed)
        });
    }
    let mut sent = 0;
    while let Some(result) = workers.join_next().await {
        let (n, failed) = result.expect("worker");
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        sent += n;
    }
    assert!(sent >= 100, "only {sent} requests sent");
    assert_eq!(sb.expired_token_requests(), 0, "expired tokens were sent");
    assert_eq!(sb.rejected_api_requests(), 0);
    assert_eq!(u64::from(sent), sb.api_requests());
    // Refresh at half of a 2 s lifetime: about 7 renewals in 7 s; a
    // renewal loop would show as many more.
    let renewals = sb.token_requests() - first_token_requests;
    assert!((4..=15).contains(&renewals), "{renewals} renewals in 7 s");
    assert_eq!(sb.token_requests(), sb.successful_token_requests());
}

#[tokio::test]
async fn token_endpoint_failure_answers_503_at_once_then_recovers() {
    let sb = sandbox().await;
    sb.set_failure(FailureMode::ServerError);
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    sb.wait_for_token_requests(1).await;
    let c = client();
    let url = proxy_url(&p, "/api/v1/accounts");
    let before = sb.token_requests();
    for _ in 0..20 {
        let started = Instant::now();
        let r = get_with(&c, &url).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "503 took {:?}",
            started.elapsed()
        );
        assert_proxy_error(&r, 503, "token_unavailable");
        let retry_after: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("Retry-After: {:?}", r.headers));
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
        assert!(r.json()["message"].as_str().unwrap().contains("flinks"));
    }
    // Waiting requests do not each cause a token request (the background
    // retries, 0.5 s then 1 s apart at the least, may have made some).
    assert!(sb.token_requests() <= before + 2);
    assert_eq!(sb.api_requests(), 0);
    assert_eq!(get(&admin_url(&p, "/readyz")).await.status, 503);

    sb.set_failure(FailureMode::None);
    let n = sb.token_requests();
    tokio::time::timeout(Duration::from_secs(30), sb.wait_for_token_requests(n + 1))
        .await
        .expect("the proxy retries the token endpoint");
    let end = Instant::now() + PATIENCE;
    loop {
        let r = get_with(&c, &url).await;
        if r.status == 200 {
            break;
        }
        assert_proxy_error(&r, 503, "token_unavailable");
        assert!(Instant::now() < end, "no recovery within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sb.successful_token_requests(), 1);
    assert_eq!(get(&admin_url(&p, "/readyz")).await.status, 200);
}

// ------------------------------------------------------------- TLS upstream

#[tokio::test]
async fn tls_upstream_signed_by_the_route_ca_file_is_trusted() {
    let sb = sandbox().await;
    let pki = Pki::new("upstream");
    let up = TestUpstream::start_tls("tls", &pki.server()).await;
    let dir = TempDir::new();
    let ca = dir.write("upstream-ca.pem", &pki.ca_pem);
    let routes = vec![(
        "tls",
        Route {
            ca_file: Some(ca),
            ..route("/", &up.https_url())
        },
    )];
    let p = start_proxy(&config_with_routes(&sb, routes)).await;
    let r = get(&proxy_url(&p, "/secure/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("tls"));
    let auth = r.text();
    let token = auth
        .strip_prefix("Bearer ")
        .expect("a bearer token upstream");
    assert_eq!(
        decode_jwt_claims(token).expect("JWT")["client_id"],
        SandboxOptions::default().client_id
    );
    let got = up.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path_and_query, "/secure/x");
    // The upstream offers h2 by ALPN, so the proxy speaks HTTP/2 to it.
    assert_eq!(got[0].version, http::Version::HTTP_2);
}

#[tokio::test]
async fn tls_upstream_without_its_ca_is_502_upstream_unavailable() {
    let sb = sandbox().await;
    let pki = Pki::new("upstream");
    let up = TestUpstream::start_tls("tls", &pki.server()).await;
    let routes = vec![("tls", route("/", &up.https_url()))];
    let p = start_proxy(&config_with_routes(&sb, routes)).await;
    let r = get(&proxy_url(&p, "/secure/x")).await;
    assert_proxy_error(&r, 502, "upstream_unavailable");
    assert!(
        up.requests().is_empty(),
        "a request reached an untrusted upstream"
    );
    let m = scrape(&p).await;
    let errors = [("route", "tls"), ("kind", "tls")];
    assert_eq!(
        sample(&m, "flinks_proxy_upstream_errors_total", &errors),
        Some(1.0)
    );
}

// ---------------------------------------------------------------- routing

/// Four test upstreams behind one proxy:
/// `/api` → api, `/api/v2` → v2, host `internal.example` `/api` → host,
/// `/svc` (strip `/svc`) → strip with base path `/base`.
struct Routed {
    p: Running,
    api: TestUpstream,
    v2: TestUpstream,
    host: TestUpstream,
    strip: TestUpstream,
    _sb: flinks_proxy::sandbox::Sandbox,
}

impl Routed {
    async fn start() -> Routed {
        let sb = sandbox().await;
        let api = TestUpstream::start("api").await;
        let v2 = TestUpstream::start("v2").await;
        let host = TestUpstream::start("host").await;
        let strip = TestUpstream::start("strip").await;
        // Listed host route last and shortest: order in the file must not matter.
        let routes = vec![
            ("v2", route("/api/v2", &v2.http_url())),
            ("api", route("/api", &api.http_url())),
            (
                "strip",
                Route {
                    strip_prefix: Some("/svc".to_owned()),
                    ..route("/svc", &format!("{}/base/", strip.http_url()))
                },
            ),
            (
                "internal",
                Route {
                    host: Some("internal.example".to_owned()),
                    ..route("/api", &host.http_url())
                },
            ),
        ];
        let p = start_proxy(&config_with_routes(&sb, routes)).await;
        Routed {
            p,
            api,
            v2,
            host,
            strip,
            _sb: sb,
        }
    }

    async fn get(&self, host: Option<&str>, path: &str) -> Resp {
        let mut b = Request::get(proxy_url(&self.p, path));
        if let Some(h) = host {
            b = b.header("host", h);
        }
        send(&client(), b.body(Full::default()).expect("request")).await
    }

    /// Requests each upstream received: (api, v2, host, strip).
    fn counts(&self) -> [usize; 4] {
        [&self.api, &self.v2, &self.host, &self.strip].map(|u| u.requests().len())
    }
}

#[tokio::test]
async fn host_routes_beat_host_less_ones_and_the_longest_prefix_wins() {
    let r = Routed::start().await;
    let cases = [
        (None, "/api/v2/x", "v2", "/api/v2/x"),
        (None, "/api/v1/x?q=1", "api", "/api/v1/x?q=1"),
        (None, "/api", "api", "/api"),
        (None, "/api/v2", "v2", "/api/v2"),
        (Some("internal.example"), "/api/v2/x", "host", "/api/v2/x"),
        (Some("INTERNAL.example:8080"), "/api/x", "host", "/api/x"),
        (Some("other.example"), "/api/v2/x", "v2", "/api/v2/x"),
    ];
    for (host, path, upstream, upstream_path) in cases {
        let resp = r.get(host, path).await;
        assert_eq!(resp.status, 200, "{host:?} {path}: {}", resp.text());
        assert_eq!(resp.header("x-upstream"), Some(upstream), "{host:?} {path}");
        assert_eq!(resp.header("x-upstream-path"), Some(upstream_path));
        assert!(resp.text().starts_with("Bearer "), "no token for {path}");
    }
    assert_eq!(r.counts(), [2, 3, 2, 0]);
}

#[tokio::test]
async fn prefixes_match_at_segment_boundaries_and_unrouted_paths_get_404() {
    let r = Routed::start().await;
    for path in ["/apix", "/apix/v2", "/", "/other", "/svcx/a"] {
        let resp = r.get(None, path).await;
        assert_proxy_error(&resp, 404, "route_not_found");
    }
    let resp = r.get(Some("internal.example"), "/internal").await;
    assert_proxy_error(&resp, 404, "route_not_found");
    assert_eq!(r.counts(), [0, 0, 0, 0]);
    let m = scrape(&r.p).await;
    let unrouted = sample(
        &m,
        "flinks_proxy_requests_total",
        &[("route", "none"), ("status", "404")],
    );
    assert_eq!(unrouted, Some(6.0));
}

#[tokio::test]
async fn strip_prefix_and_upstream_base_path_are_applied() {
    let r = Routed::start().await;
    let resp = r.get(None, "/svc/a/b?q=1&r=%2F").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-upstream"), Some("strip"));
    assert_eq!(resp.header("x-upstream-path"), Some("/base/a/b?q=1&r=%2F"));
    let got = r.strip.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path_and_query, "/base/a/b?q=1&r=%2F");
    assert_eq!(
        got[0].headers["host"].to_str().unwrap(),
        r.strip.addr.to_string()
    );
}

#[tokio::test]
async fn strip_prefix_shorter_than_path_prefix_is_accepted_and_stripped() {
    let sb = sandbox().await;
    let up = TestUpstream::start("deep").await;
    let routes = vec![(
        "deep",
        Route {
            strip_prefix: Some("/deep".to_owned()),
            ..route("/deep/er", &up.http_url())
        },
    )];
    let p = start_proxy(&config_with_routes(&sb, routes)).await;
    let r = get(&proxy_url(&p, "/deep/er/x?q=1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = up.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path_and_query, "/er/x?q=1");
    // Only /deep/er is routed.
    assert_proxy_error(
        &get(&proxy_url(&p, "/deep/x")).await,
        404,
        "route_not_found",
    );
}

#[tokio::test]
async fn connect_is_refused_with_405() {
    let r = Routed::start().await;
    let (status, text) = raw_request(
        r.p.proxy_addr(),
        "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405, "{text}");
    assert_eq!(raw_json(&text)["error"], "method_not_allowed");
    assert_eq!(r.counts(), [0, 0, 0, 0]);
}

#[tokio::test]
async fn absolute_form_target_never_picks_the_destination() {
    let r = Routed::start().await;
    // A decoy listening where the absolute-form target points.
    let decoy = TestUpstream::start("decoy").await;
    let addr = r.p.proxy_addr();
    let request = format!(
        "GET http://{}/api/v1/x HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        decoy.addr, decoy.addr
    );
    let (status, text) = raw_request(addr, &request).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("x-upstream: api"), "{text}");
    let request = "GET http://evil.example/api/v2/x HTTP/1.1\r\nHost: evil.example\r\n\
                   Connection: close\r\n\r\n";
    let (status, text) = raw_request(addr, request).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("x-upstream: v2"), "{text}");
    assert!(decoy.requests().is_empty(), "the decoy was contacted");
    let api = r.api.requests();
    assert_eq!(api.len(), 1);
    assert_eq!(api[0].path_and_query, "/api/v1/x");
    assert_eq!(
        api[0].headers["host"].to_str().unwrap(),
        r.api.addr.to_string()
    );
    assert_eq!(r.v2.requests()[0].path_and_query, "/api/v2/x");
    // No route for the absolute target's path: 404, never a forward.
    let request = format!(
        "GET http://{}/elsewhere HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        decoy.addr, decoy.addr
    );
    let (status, text) = raw_request(addr, &request).await;
    assert_eq!(status, 404, "{text}");
    assert!(decoy.requests().is_empty());
}

#[tokio::test]
async fn dot_segments_in_the_path_get_400() {
    let r = Routed::start().await;
    for path in [
        "/api/../admin",
        "/api/./x",
        "/api/%2e%2e/admin",
        "/api/v2/..",
        "/api/..;/admin",
        "/api/.%2e/admin",
        "/api/%2e%2e%3b/admin",
        "/api/..%2fadmin",
        "/api%2f..%2fadmin",
        "/api/..%5cadmin",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, text) = raw_request(r.p.proxy_addr(), &request).await;
        assert_eq!(status, 400, "{path}: {text}");
        assert_eq!(raw_json(&text)["error"], "bad_request", "{path}");
    }
    assert_eq!(r.counts(), [0, 0, 0, 0]);
}

// ------------------------------------------------------- upstream failures

#[tokio::test]
async fn refused_upstream_connection_is_502_and_counted() {
    let sb = sandbox().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let toml = ProxyToml::sandbox(&sb)
        .route("down", route("/down", &format!("http://127.0.0.1:{port}")))
        .toml();
    let p = start_proxy(&toml).await;
    let r = get(&proxy_url(&p, "/down/x")).await;
    assert_proxy_error(&r, 502, "upstream_unavailable");
    let r = get(&proxy_url(&p, "/down/y")).await;
    assert_proxy_error(&r, 502, "upstream_unavailable");
    let m = scrape(&p).await;
    let connect = [("route", "down"), ("kind", "connect")];
    assert_eq!(
        sample(&m, "flinks_proxy_upstream_errors_total", &connect),
        Some(2.0)
    );
    let status = [("route", "down"), ("status", "502")];
    assert_eq!(
        sample(&m, "flinks_proxy_requests_total", &status),
        Some(2.0)
    );
    // The other route is unaffected.
    assert_eq!(get(&proxy_url(&p, "/api/v1/accounts")).await.status, 200);
}

/// A request the upstream holds for 5 s, past the proxy's
/// `request_timeout`: its 504, when it was sent and how long it took.
async fn held_past_request_timeout(
    p: &Running,
    sb: &flinks_proxy::sandbox::Sandbox,
) -> (Instant, Duration) {
    sb.set_api_delay(Duration::from_secs(5));
    let started = Instant::now();
    let r = get(&proxy_url(p, "/api/v1/accounts")).await;
    let took = started.elapsed();
    assert_proxy_error(&r, 504, "upstream_timeout");
    (started, took)
}

#[tokio::test]
async fn upstream_slower_than_request_timeout_is_504_and_counted() {
    let sb = sandbox().await;
    let p = start_proxy(&with_timeouts(
        &sb,
        Duration::from_millis(300),
        Duration::from_secs(2),
    ))
    .await;
    wait_ready(&p).await;
    let (_, took) = held_past_request_timeout(&p, &sb).await;
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(4),
        "answered after {took:?}"
    );
    assert_eq!(sb.api_requests(), 1);
    let m = scrape(&p).await;
    let timeout = [("route", "flinks"), ("kind", "timeout")];
    assert_eq!(
        sample(&m, "flinks_proxy_upstream_errors_total", &timeout),
        Some(1.0)
    );
    let status = [("route", "flinks"), ("status", "504")];
    assert_eq!(
        sample(&m, "flinks_proxy_requests_total", &status),
        Some(1.0)
    );
}

/// An upstream connection's timer is armed at its first request's deadline
/// and re-armed lazily: a later request on the same connection gets its
/// whole `request_timeout`, not what was left of the first one's.
#[tokio::test]
async fn a_request_on_a_reused_upstream_connection_gets_its_whole_request_timeout() {
    let sb = sandbox().await;
    let timeout = Duration::from_millis(800);
    let p = start_proxy(&with_timeouts(&sb, timeout, Duration::from_secs(2))).await;
    wait_ready(&p).await;
    let first = Instant::now();
    assert_eq!(get(&proxy_url(&p, "/api/v1/accounts")).await.status, 200);
    // Not an event to await: the second request must start while the
    // first one's deadline is still ahead, and well after the first.
    tokio::time::sleep_until((first + timeout / 2).into()).await;
    let (started, took) = held_past_request_timeout(&p, &sb).await;
    assert!(
        took >= timeout - Duration::from_millis(10) && took < Duration::from_secs(4),
        "answered after {took:?} (the first request's deadline was {:?} after this one started)",
        (first + timeout).saturating_duration_since(started)
    );
    assert_eq!(sb.api_requests(), 2);
}

// ------------------------------------------------------------------ admin

#[tokio::test]
async fn metrics_parse_and_show_request_and_token_counters_moving() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    wait_ready(&p).await;
    let requests = |m: &[Sample]| {
        sample(
            m,
            "flinks_proxy_requests_total",
            &[("route", "flinks"), ("status", "200")],
        )
        .unwrap_or(0.0)
    };
    let tokens = |m: &[Sample]| {
        sample(
            m,
            "flinks_proxy_token_requests_total",
            &[("credential", "flinks"), ("outcome", "success")],
        )
    };
    let m0 = scrape(&p).await;
    assert_eq!(requests(&m0), 0.0);
    assert_eq!(tokens(&m0), Some(1.0));

    let c = client();
    for _ in 0..3 {
        assert_eq!(
            get_with(&c, &proxy_url(&p, "/api/v1/accounts"))
                .await
                .status,
            200
        );
    }
    // A rejected token makes the proxy fetch a new one and replay.
    sb.revoke_access_tokens();
    assert_eq!(
        get_with(&c, &proxy_url(&p, "/api/v1/accounts"))
            .await
            .status,
        200
    );

    let m1 = scrape(&p).await;
    assert_eq!(requests(&m1), 4.0);
    assert_eq!(tokens(&m1), Some(2.0));
    assert_eq!(sb.token_requests(), 2);
    let route = [("route", "flinks")];
    assert_eq!(
        sample(&m1, "flinks_proxy_request_duration_seconds_count", &route),
        Some(4.0)
    );
    assert_eq!(
        sample(&m1, "flinks_proxy_token_replays_total", &route),
        Some(1.0)
    );
    let credential = [("credential", "flinks")];
    assert_eq!(
        sample(
            &m1,
            "flinks_proxy_token_request_duration_seconds_count",
            &credential
        ),
        Some(2.0)
    );
    let expiry = sample(
        &m1,
        "flinks_proxy_token_expiry_timestamp_seconds",
        &credential,
    )
    .expect("token expiry gauge");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now + 3500.0..=now + 3601.0).contains(&expiry),
        "expiry {expiry}, now {now}"
    );
    assert_eq!(
        sample(&m1, "flinks_proxy_inflight_requests", &[]),
        Some(0.0)
    );
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(sample(&m1, process, &[]).is_some(), "no {process}");
    }
    // The values describe this process: it holds memory and open sockets,
    // and started within the last hour.
    assert!(sample(&m1, "process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(sample(&m1, "process_open_fds", &[]).unwrap() >= 3.0);
    let started = sample(&m1, "process_start_time_seconds", &[]).unwrap();
    assert!(
        (now - 3600.0..=now + 1.0).contains(&started),
        "start time {started}, now {now}"
    );
}

#[tokio::test]
async fn readyz_is_503_naming_the_credential_until_the_first_token() {
    let sb = sandbox().await;
    sb.set_failure(FailureMode::Hang);
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    sb.wait_for_token_requests(1).await;
    let r = get(&admin_url(&p, "/readyz")).await;
    assert_eq!(r.status, 503);
    assert!(r.text().contains("flinks"), "{}", r.text());
    assert_eq!(get(&admin_url(&p, "/healthz")).await.status, 200);

    sb.set_failure(FailureMode::None);
    wait_ready(&p).await;
    assert_eq!(get(&admin_url(&p, "/healthz")).await.status, 200);
    assert_eq!(sb.successful_token_requests(), 1);
}

#[tokio::test]
async fn inflight_gauge_returns_to_zero_when_a_client_hangs_up_mid_request() {
    use tokio::io::AsyncWriteExt;
    let sb = sandbox().await;
    sb.set_api_delay(std::time::Duration::from_secs(3));
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let mut tcp = tokio::net::TcpStream::connect(p.proxy_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let inflight = |text: &str| metric(text, "flinks_proxy_inflight_requests");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while inflight(&get(&admin_url(&p, "/metrics")).await.text()) != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "request never in flight"
        );
        tokio::task::yield_now().await;
    }
    drop(tcp);
    while inflight(&get(&admin_url(&p, "/metrics")).await.text()) != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "gauge stuck after the client left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------ idle timeout

/// An HTTP/1.1 upstream that answers every request with its headers and
/// part of a 1000-byte body, then goes silent. Each connection the proxy
/// closes is reported on the returned channel.
async fn stalling_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let partial = "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial";
                if s.write_all(partial.as_bytes()).await.is_err() {
                    return;
                }
                // Silent from here on; wait for the proxy to hang up.
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = closed.send(());
            });
        }
    });
    (addr, closed_rx)
}

#[tokio::test]
async fn stalled_upstream_body_ends_after_idle_timeout_and_frees_everything() {
    let sb = sandbox().await;
    let (stall, mut closed) = stalling_upstream().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| {
            c.server.idle_timeout = Some(Duration::from_millis(300));
            c.server.max_connections = Some(1);
            c.server.header_read_timeout = Some(Duration::from_secs(30));
        })
        .route("stall", route("/stall", &format!("http://{stall}")))
        .toml();
    let p = start_proxy(&toml).await;
    wait_ready(&p).await;
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(p.proxy_addr())
        .await
        .expect("connect");
    s.write_all(b"GET /stall/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    // The client's connection is closed: its response cannot be completed.
    let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut got)).await;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(
        read.is_ok(),
        "the stalled response was never ended: {text:?}"
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("partial"), "{text}");
    assert!(took >= Duration::from_millis(300), "ended after {took:?}");
    // The upstream connection is closed too.
    tokio::time::timeout(PATIENCE, closed.recv())
        .await
        .expect("the upstream connection was never closed");
    // The only connection slot is free again: a new connection is served.
    let r = tokio::time::timeout(PATIENCE, get(&proxy_url(&p, "/api/v1/accounts")))
        .await
        .expect("the next connection was never served");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// An HTTP/1.1 upstream that answers with an endless chunked body, as fast
/// as it is taken; reports on the channel when the proxy hangs up.
async fn endless_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                let mut chunk = b"10000\r\n".to_vec();
                chunk.extend(std::iter::repeat_n(b'x', 0x10000));
                chunk.extend_from_slice(b"\r\n");
                if s.write_all(start).await.is_ok() {
                    while s.write_all(&chunk).await.is_ok() {}
                }
                let _ = closed.send(());
            });
        }
    });
    (addr, closed_rx)
}

#[tokio::test]
async fn client_that_stops_reading_is_disconnected_after_idle_timeout() {
    let sb = sandbox().await;
    let (endless, mut closed) = endless_upstream().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| {
            c.server.idle_timeout = Some(Duration::from_millis(300));
            c.server.max_connections = Some(1);
            c.server.header_read_timeout = Some(Duration::from_secs(30));
        })
        .route("endless", route("/endless", &format!("http://{endless}")))
        .toml();
    let p = start_proxy(&toml).await;
    wait_ready(&p).await;
    let mut s = tokio::net::TcpStream::connect(p.proxy_addr())
        .await
        .expect("connect");
    s.write_all(b"GET /endless/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    // The client never reads: once the buffers are full nothing moves, and
    // the proxy ends the exchange, upstream connection included.
    tokio::time::timeout(PATIENCE, closed.recv())
        .await
        .expect("the upstream connection was never closed");
    // The slot is free: the next connection is served.
    let r = tokio::time::timeout(PATIENCE, get(&proxy_url(&p, "/api/v1/accounts")))
        .await
        .expect("the next connection was never served");
    assert_eq!(r.status, 200, "{}", r.text());
    drop(s);
}

#[tokio::test]
async fn idle_http1_keep_alive_connection_is_closed_after_idle_timeout() {
    let sb = sandbox().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| {
            c.server.idle_timeout = Some(Duration::from_millis(300));
            c.server.header_read_timeout = Some(Duration::from_secs(30));
        })
        .toml();
    let p = start_proxy(&toml).await;
    wait_ready(&p).await;
    let mut s = tokio::net::TcpStream::connect(p.proxy_addr())
        .await
        .expect("connect");
    s.write_all(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        read.is_ok(),
        "idle keep-alive connection left open: {text:?}"
    );
    // One whole response, then the close.
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
}

#[tokio::test]
async fn idle_http2_connection_gets_goaway_after_idle_timeout() {
    let sb = sandbox().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| {
            c.server.idle_timeout = Some(Duration::from_millis(300));
            c.server.header_read_timeout = Some(Duration::from_secs(30));
        })
        .toml();
    let p = start_proxy(&toml).await;
    wait_ready(&p).await;
    let tcp = tokio::net::TcpStream::connect(p.proxy_addr())
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = Request::get(proxy_url(&p, "/v1/x"))
        .body(Full::<Bytes>::default())
        .expect("request");
    let sent = Instant::now();
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    resp.into_body().collect().await.expect("body");
    // The server's GOAWAY and close end the client's connection task, no
    // sooner than idle_timeout after the request.
    let ended = tokio::time::timeout(PATIENCE, conn).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection left open");
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "{:?}",
        sent.elapsed()
    );
    assert!(sender.is_closed());
}

// ---------------------------------------------------------- replay budget

/// An upstream that answers 401 to the first token it sees and 200 to any
/// other, reports each request head as it arrives (before reading the
/// body), and holds first attempts marked `x-hold` until `release` is
/// notified.
struct JudgingUpstream {
    addr: SocketAddr,
    heads: tokio::sync::mpsc::UnboundedReceiver<String>,
    release: std::sync::Arc<tokio::sync::Notify>,
}

async fn judging_upstream() -> JudgingUpstream {
    use std::sync::{Arc, Mutex};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (heads_tx, heads) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let first_token: Arc<Mutex<Option<String>>> = Arc::default();
    let hold = Arc::clone(&release);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (heads_tx, hold, first_token) = (
                heads_tx.clone(),
                Arc::clone(&hold),
                Arc::clone(&first_token),
            );
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (heads_tx, hold, first_token) = (
                    heads_tx.clone(),
                    Arc::clone(&hold),
                    Arc::clone(&first_token),
                );
                async move {
                    use http_body_util::BodyExt;
                    let name = req.uri().path().to_owned();
                    let _ = heads_tx.send(name);
                    let token = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let held = req.headers().contains_key("x-hold");
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    let first = first_token.lock().unwrap().get_or_insert(token.clone()) == &token;
                    // Only first attempts are held; a replay is answered at once.
                    if held && first {
                        hold.notified().await;
                    }
                    let status = if first { 401 } else { 200 };
                    let len = body.map_or(0, |b| b.len());
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .status(status)
                            .header("x-body-len", len.to_string())
                            .body(Full::<Bytes>::default())
                            .expect("response"),
                    )
                }
            });
            tokio::spawn(
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                    .into_owned(),
            );
        }
    });
    JudgingUpstream {
        addr,
        heads,
        release,
    }
}

#[tokio::test]
async fn bodies_over_the_global_replay_budget_stream_and_only_budgeted_ones_replay() {
    let sb = sandbox().await;
    let mut up = judging_upstream().await;
    let toml = ProxyToml::sandbox(&sb)
        .with(|c| c.server.replay_buffer_limit = Some(100.into()))
        .route("judged", route("/judged", &format!("http://{}", up.addr)))
        .toml();
    let p = start_proxy(&toml).await;
    wait_ready(&p).await;
    let body = "a".repeat(60);
    // A: buffered (60 of 100 bytes), held by the upstream.
    let a = {
        let req = Request::post(proxy_url(&p, "/judged/a"))
            .header("x-hold", "1")
            .body(Full::new(Bytes::from(body.clone())))
            .expect("request");
        tokio::spawn(async move { send(&client(), req).await })
    };
    let head = tokio::time::timeout(PATIENCE, up.heads.recv()).await;
    assert_eq!(
        head.expect("A reached the upstream").as_deref(),
        Some("/judged/a")
    );
    // B: 60 more bytes do not fit, so B streams: the upstream sees its
    // head while the client has sent only half of the body.
    let mut b = tokio::net::TcpStream::connect(p.proxy_addr())
        .await
        .expect("connect");
    let b_head =
        "POST /judged/b HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\nConnection: close\r\n\r\n";
    b.write_all(format!("{b_head}{}", &body[..30]).as_bytes())
        .await
        .expect("write");
    let head = tokio::time::timeout(PATIENCE, up.heads.recv()).await;
    assert_eq!(
        head.expect("B was held back for buffering over the budget")
            .as_deref(),
        Some("/judged/b")
    );
    b.write_all(&body.as_bytes()[30..]).await.expect("write");
    let mut b_resp = Vec::new();
    tokio::time::timeout(PATIENCE, b.read_to_end(&mut b_resp))
        .await
        .expect("B answered")
        .expect("read");
    let b_resp = String::from_utf8_lossy(&b_resp);
    // Streamed, so not replayable: the upstream's 401 comes back as is.
    assert!(b_resp.starts_with("HTTP/1.1 401"), "{b_resp}");
    assert!(b_resp.contains("x-body-len: 60"), "{b_resp}");
    up.release.notify_one();
    let a = tokio::time::timeout(PATIENCE, a)
        .await
        .expect("A answered")
        .expect("A's task");
    // A was buffered: replayed with a new token.
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("x-body-len"), Some("60"));
    let m = scrape(&p).await;
    assert_eq!(
        sample(
            &m,
            "flinks_proxy_token_replays_total",
            &[("route", "judged")]
        ),
        Some(1.0)
    );
}

// ---------------------------------------------------------------- metrics

#[tokio::test]
async fn documented_series_exist_at_zero_right_after_start() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let m = scrape(&p).await;
    for kind in ["connect", "tls", "timeout", "protocol"] {
        let labels = [("route", "flinks"), ("kind", kind)];
        assert_eq!(
            sample(&m, "flinks_proxy_upstream_errors_total", &labels),
            Some(0.0),
            "{kind}"
        );
    }
    assert_eq!(
        sample(
            &m,
            "flinks_proxy_token_replays_total",
            &[("route", "flinks")]
        ),
        Some(0.0)
    );
    for outcome in ["success", "failure"] {
        assert_eq!(
            sample(
                &m,
                "flinks_proxy_config_reloads_total",
                &[("outcome", outcome)]
            ),
            Some(0.0),
            "{outcome}"
        );
    }
    // Requests that match no route never reach an upstream.
    let none = [("route", "none"), ("kind", "connect")];
    assert_eq!(
        sample(&m, "flinks_proxy_upstream_errors_total", &none),
        None
    );
}
