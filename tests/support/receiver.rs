//! A webhook receiver on loopback: records every delivery (headers and
//! body) and answers from a script a test changes while it runs: a
//! status (with `Retry-After`), hanging up without an answer, or holding
//! the answer until released. Deliveries are awaited, never slept for.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

/// How the receiver answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// This status, with `Retry-After: secs` when given.
    Status(u16, Option<u64>),
    /// Closes the connection without an answer (a network error).
    HangUp,
    /// Waits until [`Receiver::release`], then answers 200.
    Hold,
}

/// One delivery as received.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// What it was answered.
    pub reply: Reply,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn id(&self) -> &str {
        self.header("webhook-id").expect("webhook-id")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }

    /// Verifies the signature with the Standard Webhooks reference
    /// implementation (never our own code), and the headers it implies.
    pub fn verify(&self, secret: &str) {
        let wh = standardwebhooks::Webhook::new(secret).expect("a Standard Webhooks secret");
        let mut headers = http::HeaderMap::new();
        for (k, v) in &self.headers {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                http::HeaderValue::from_str(v).expect("header value"),
            );
        }
        wh.verify(self.body.as_bytes(), &headers)
            .unwrap_or_else(|e| panic!("signature refused: {e:?}; {self:?}"));
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert!(self.id().starts_with("msg_"), "{}", self.id());
    }

    pub fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap_or_default().to_owned()
    }
}

struct Shared {
    /// Replies for the next deliveries, then `default`.
    script: Mutex<(VecDeque<Reply>, Reply)>,
    deliveries: watch::Sender<Vec<Delivery>>,
    release: Notify,
}

/// The receiver; stops with the test's runtime.
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Receiver {
    /// Listens on 127.0.0.1 (a free port), answering 200.
    pub async fn start() -> Receiver {
        Receiver::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Listens on `addr`.
    pub async fn start_on(addr: SocketAddr) -> Receiver {
        let listener = TcpListener::bind(addr).await.expect("receiver binds");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            script: Mutex::new((VecDeque::new(), Reply::Status(200, None))),
            deliveries: watch::channel(Vec::new()).0,
            release: Notify::new(),
        });
        let s = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(Arc::clone(&s), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Receiver { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// The next deliveries get these replies, in order.
    pub fn script(&self, replies: &[Reply]) {
        self.shared
            .script
            .lock()
            .unwrap()
            .0
            .extend(replies.iter().cloned());
    }

    /// Deliveries after the script get `reply`.
    pub fn set_default(&self, reply: Reply) {
        self.shared.script.lock().unwrap().1 = reply;
    }

    /// Lets every held delivery answer 200.
    pub fn release(&self) {
        self.shared.release.notify_waiters();
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared.deliveries.borrow().clone()
    }

    /// Waits until `n` deliveries have arrived (panics after `limit`).
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Delivery> {
        let mut rx = self.shared.deliveries.subscribe();
        let r = tokio::time::timeout(limit, rx.wait_for(|d| d.len() >= n)).await;
        match r {
            Ok(Ok(d)) => d.clone(),
            _ => panic!(
                "{n} deliveries expected within {limit:?}, got {:#?}",
                self.deliveries()
                    .iter()
                    .map(|d| (d.kind(), d.reply.clone()))
                    .collect::<Vec<_>>()
            ),
        }
    }

    /// Waits until a delivery answered 2xx has arrived for each of `n`
    /// distinct webhook ids; the first such delivery of each, in order.
    pub async fn wait_delivered(&self, n: usize, limit: Duration) -> Vec<Delivery> {
        let mut rx = self.shared.deliveries.subscribe();
        let ok = |d: &Vec<Delivery>| -> Vec<Delivery> {
            let mut seen = std::collections::HashSet::new();
            d.iter()
                .filter(|x| {
                    matches!(x.reply, Reply::Status(200..=299, _)) || x.reply == Reply::Hold
                })
                .filter(|x| seen.insert(x.id().to_owned()))
                .cloned()
                .collect()
        };
        let r = tokio::time::timeout(limit, rx.wait_for(|d| ok(d).len() >= n)).await;
        match r {
            Ok(Ok(d)) => ok(&d),
            _ => panic!(
                "{n} delivered events expected within {limit:?}, got {:#?}",
                self.deliveries()
                    .iter()
                    .map(|d| (d.kind(), d.reply.clone()))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

async fn handle(
    s: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reply = {
        let mut script = s.script.lock().unwrap();
        let default = script.1.clone();
        script.0.pop_front().unwrap_or(default)
    };
    let release = s.release.notified();
    s.deliveries.send_modify(|d| {
        d.push(Delivery {
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            reply: reply.clone(),
        })
    });
    let (status, retry_after) = match reply {
        Reply::Status(s, ra) => (s, ra),
        // An error makes hyper close the connection without answering.
        Reply::HangUp => return Err(std::io::Error::other("hang up")),
        Reply::Hold => {
            release.await;
            (200, None)
        }
    };
    let mut r = Response::builder().status(status);
    if let Some(secs) = retry_after {
        r = r.header("retry-after", secs.to_string());
    }
    Ok(r.body(Full::default()).expect("response"))
}
