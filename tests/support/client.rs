//! A plain HTTP client for tests: send a request, read the whole response,
//! build proxy and admin URLs, read a sample out of Prometheus text.

use bytes::Bytes;
use flinks_proxy::Running;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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
