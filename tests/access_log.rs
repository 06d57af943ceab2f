//! The access log of the real binary (issue 12 point 5): one JSON line per
//! request with every field, bytes counted on streamed bodies, latencies in
//! whole microseconds, Flinks's correlation ids, and never a query string
//! or a token. `[log] access = false` turns it off.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

/// Size of each chunk of the streamed answer, and how many there are.
const CHUNK: usize = 16 * 1024;
const CHUNKS: usize = 7;
const CORRELATION_ID: &str = "corr-7a1c";
const TRACE_ID: &str = "trace-42bd";

/// A response body of `CHUNKS` chunks with no announced length (chunked).
struct Chunks(usize);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0 == 0 {
            return Poll::Ready(None);
        }
        self.0 -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; CHUNK])))))
    }
}

type Either = http_body_util::Either<Full<Bytes>, Chunks>;

/// A Flinks-like upstream: answers with `ob-correlation-id` and
/// `ob-trace-id`; `/stream` streams `CHUNKS * CHUNK` bytes, anything else
/// answers `hello` with a length. Records the `Authorization` it got.
async fn flinks_like_upstream(tokens: Arc<Mutex<Vec<String>>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tokens = Arc::clone(&tokens);
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                if let Some(v) = req.headers().get("authorization") {
                    let v = v.to_str().unwrap_or("").trim_start_matches("Bearer ");
                    tokens.lock().unwrap().push(v.to_owned());
                }
                let body = if req.uri().path() == "/stream" {
                    Either::Right(Chunks(CHUNKS))
                } else {
                    Either::Left(Full::new(Bytes::from_static(b"hello")))
                };
                let resp = Response::builder()
                    .header("ob-correlation-id", CORRELATION_ID)
                    .header("ob-trace-id", TRACE_ID)
                    .body(body)
                    .expect("response");
                async move { Ok::<_, Infallible>(resp) }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn config(
    sb: &flinks_proxy::sandbox::Sandbox,
    upstream: std::net::SocketAddr,
    access: bool,
) -> String {
    let log = Log {
        format: Some("json".to_owned()),
        access: Some(access),
        ..Log::default()
    };
    let route = Route {
        strip_prefix: Some("/ob".to_owned()),
        ..Route::credential("/ob", &format!("http://{upstream}"), "flinks")
    };
    ProxyToml::listeners()
        .credential("flinks", Credential::sandbox(sb))
        .route("ob", route)
        .with(|c| c.log = Some(log))
        .toml()
}

/// The JSON access log line of the request with id `rid`.
fn line_of(p: &ProxyProcess, rid: &str) -> serde_json::Value {
    let needle = format!("\"request_id\":\"{rid}\"");
    assert!(
        p.wait_for_log(&needle, Duration::from_secs(30)),
        "no access log line for {rid}:\n{}",
        p.log()
    );
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains(&needle) && l.contains("\"message\":\"request\""))
        .unwrap_or_else(|| panic!("no line for {rid}:\n{log}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn request(
    rt: &tokio::runtime::Runtime,
    c: &HttpClient,
    method: &str,
    url: &str,
    rid: &str,
    body: &'static [u8],
) -> Resp {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("x-request-id", rid)
        .body(Full::new(Bytes::from_static(body)))
        .expect("request");
    rt.block_on(send(c, req))
}

#[test]
fn json_access_log_has_every_field_and_no_query_or_token() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sb = rt.block_on(sandbox());
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let upstream = rt.block_on(flinks_like_upstream(Arc::clone(&tokens)));
    let dir = TempDir::new();
    let cfg = dir.write("proxy.toml", config(&sb, upstream, true));
    let p = ProxyProcess::start(&cfg, &[]);
    let c = client();

    let r = request(
        &rt,
        &c,
        "GET",
        &p.url("/ob/accounts?code=query-secret-1"),
        "rid-get",
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(
        &rt,
        &c,
        "POST",
        &p.url("/ob/upload"),
        "rid-post",
        b"12345678",
    );
    assert_eq!(r.status, 200);
    let r = request(&rt, &c, "GET", &p.url("/ob/stream"), "rid-stream", b"");
    assert_eq!(r.body.len(), CHUNK * CHUNKS);
    let r = request(&rt, &c, "GET", &p.url("/nowhere?x=1"), "rid-404", b"");
    assert_eq!(r.status, 404);
    let error_body_len = r.body.len() as u64;

    let get = line_of(&p, "rid-get");
    assert_eq!(get["route"], "ob");
    assert_eq!(get["credential"], "flinks");
    assert_eq!(get["method"], "GET");
    assert_eq!(get["path"], "/ob/accounts");
    assert_eq!(get["status"], 200);
    assert_eq!(get["upstream_status"], 200);
    assert_eq!(get["bytes_in"], 0);
    assert_eq!(get["bytes_out"], 5);
    assert_eq!(get["ob_correlation_id"], CORRELATION_ID);
    assert_eq!(get["ob_trace_id"], TRACE_ID);
    let upstream_us = get["upstream_us"]
        .as_u64()
        .expect("upstream_us is an integer");
    let total_us = get["total_us"].as_u64().expect("total_us is an integer");
    assert!(upstream_us > 0 && total_us >= upstream_us, "{get}");

    let post = line_of(&p, "rid-post");
    assert_eq!(post["method"], "POST");
    assert_eq!(post["bytes_in"], 8);

    // A streamed body of unannounced length is counted as it goes.
    let stream = line_of(&p, "rid-stream");
    assert_eq!(stream["bytes_out"], (CHUNK * CHUNKS) as u64, "{stream}");

    // An error the proxy made: no upstream fields, its own body counted.
    let missing = line_of(&p, "rid-404");
    assert_eq!(missing["status"], 404);
    assert_eq!(missing["path"], "/nowhere");
    assert_eq!(missing["route"], "");
    assert_eq!(missing["bytes_out"], error_body_len);
    for absent in [
        "upstream_status",
        "upstream_us",
        "ob_correlation_id",
        "credential",
    ] {
        assert!(missing.get(absent).is_none(), "{absent} in {missing}");
    }

    let log = p.log();
    assert!(
        !log.contains("query-secret-1"),
        "query string logged:\n{log}"
    );
    let tokens = tokens.lock().unwrap().clone();
    assert!(!tokens.is_empty());
    for t in &tokens {
        assert!(!log.contains(t.as_str()), "token logged:\n{log}");
    }
}

#[test]
fn access_false_writes_no_request_lines() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sb = rt.block_on(sandbox());
    let upstream = rt.block_on(flinks_like_upstream(Arc::default()));
    let dir = TempDir::new();
    let cfg = dir.write("proxy.toml", config(&sb, upstream, false));
    let mut p = ProxyProcess::start(&cfg, &[]);
    let c = client();
    let r = request(&rt, &c, "GET", &p.url("/ob/accounts"), "rid-quiet", b"");
    assert_eq!(r.status, 200);
    let r = request(&rt, &c, "GET", &p.url("/nowhere"), "rid-quiet-404", b"");
    assert_eq!(r.status, 404);
    // Everything the process logs is in once it has stopped.
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(20)), Some(0), "{}", p.log());
    assert!(
        p.wait_for_log("\"message\":\"stopped\"", Duration::from_secs(10)),
        "{}",
        p.log()
    );
    let log = p.log();
    assert!(!log.contains("\"message\":\"request\""), "{log}");
    assert!(!log.contains("rid-quiet"), "{log}");
}

/// A pooled route's revoked-consent answer (401, JSON `code` 602) is the
/// upstream's, passed back: its line says so with `upstream_status` and
/// `upstream_us`, unlike the proxy's own `reauthorization_required` that
/// follows.
#[test]
fn passed_through_602_is_logged_as_the_upstreams_answer() {
    use support::connections::{new_key, users_sandbox, API_TOKEN, SELECT};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sb = rt.block_on(users_sandbox(3600, false));
    let dir = TempDir::new();
    let toml = ProxyToml::pool(&sb, &dir.join("connections.db"), &new_key())
        .with(|c| c.log_mut().format = Some("json".to_owned()))
        .toml();
    let cfg = dir.write("proxy.toml", toml);
    let p = ProxyProcess::start(&cfg, &[]);
    let c = client();
    let connect = Request::post(p.admin("/connections/users"))
        .header("authorization", format!("Bearer {API_TOKEN}"))
        .body(Full::new(Bytes::from_static(br#"{"code": "code-alice"}"#)))
        .expect("request");
    let r = rt.block_on(send(&c, connect));
    assert_eq!(r.status, 201, "{}", r.text());
    let as_alice = |rid: &str| {
        let req = Request::get(p.url("/api/fdx/5/accounts"))
            .header(SELECT, "alice")
            .header("x-request-id", rid)
            .body(Full::default())
            .expect("request");
        rt.block_on(send(&c, req))
    };
    assert_eq!(as_alice("rid-alice").status, 200);
    sb.revoke_consent("alice");
    let r = as_alice("rid-602");
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["code"], "602", "{}", r.text());
    let r = as_alice("rid-reauth");
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "reauthorization_required");

    let passed = line_of(&p, "rid-602");
    assert_eq!(passed["pool"], "users", "{passed}");
    assert_eq!(passed["status"], 401, "{passed}");
    assert_eq!(passed["upstream_status"], 401, "{passed}");
    assert_eq!(passed["ob_correlation_id"], "sandbox-602", "{passed}");
    let upstream_us = passed["upstream_us"].as_u64().expect("upstream_us");
    let total_us = passed["total_us"].as_u64().expect("total_us");
    assert!(upstream_us > 0 && total_us >= upstream_us, "{passed}");

    let own = line_of(&p, "rid-reauth");
    assert_eq!(own["status"], 401, "{own}");
    for absent in ["upstream_status", "upstream_us", "ob_correlation_id"] {
        assert!(own.get(absent).is_none(), "{absent} in {own}");
    }
}
