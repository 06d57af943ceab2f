//! The upstream connection pool: keep-alive reuse, no more connections than
//! concurrent requests, HTTP/2 multiplexing, and recovery from pooled
//! connections the upstream closed.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config_for(sb: &flinks_proxy::sandbox::Sandbox, upstream: &str, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"10s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n{}\n\
         [routes.up]\ncredential = \"flinks\"\nupstream = \"{upstream}\"\n{extra}\n",
        credential_toml(sb)
    )
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let sb = sandbox().await;
    let up = TestUpstream::start("plain").await;
    let p = start_proxy(&config_for(&sb, &up.http_url(), "")).await;
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
    let p = start_proxy(&config_for(&sb, &up.http_url(), "")).await;
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
    let extra = format!("ca_file = \"{}\"", ca.display());
    let p = start_proxy(&config_for(&sb, &up.https_url(), &extra)).await;
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
    let p = start_proxy(&config_for(&sb, &url, "")).await;
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

#[tokio::test]
async fn a_client_leaving_mid_response_does_not_poison_the_pool() {
    let sb = sandbox().await;
    let up = TestUpstream::start("plain").await;
    let p = start_proxy(&config_for(&sb, &up.http_url(), "")).await;
    // A client that sends a request and hangs up before reading anything.
    for _ in 0..5 {
        let mut tcp = tokio::net::TcpStream::connect(p.proxy_addr())
            .await
            .expect("connect");
        tcp.write_all(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        drop(tcp);
    }
    let c = client();
    for i in 0..20 {
        let req = Request::get(proxy_url(&p, &format!("/after/{i}")))
            .body(Full::default())
            .expect("request");
        let r = send(&c, req).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

#[tokio::test]
async fn a_client_leaving_before_the_response_keeps_the_upstream_connection() {
    let sb = sandbox().await;
    let up = TestUpstream::start("plain").await;
    let p = start_proxy(&config_for(&sb, &up.http_url(), "")).await;
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
        p.state().runtime.load().route_list[0]
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
