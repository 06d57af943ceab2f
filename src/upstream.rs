//! Pooled HTTP clients towards upstreams and token endpoints: hyper-util's
//! client over hyper-rustls, HTTP/1.1 or HTTP/2 by ALPN, verified TLS only.
//!
//! One client per distinct set of extra trust roots, kept in a [`ClientCache`]
//! that survives reloads, so a reload does not throw away warm connections.
//! This module does not decide what to send; `proxy` and `token` do.

use std::collections::HashMap;
use std::error::Error as _;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use http_body::Body;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;

use crate::body::RequestBody;

/// Idle upstream connections are kept this long: shorter than the usual
/// 60-120 s keep-alive of servers and load balancers, so the proxy closes
/// first and never sends on a connection the other side is closing.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Bound on idle connections per upstream host; above the largest client
/// concurrency we expect, so steady load opens no new connections.
pub const POOL_MAX_IDLE_PER_HOST: usize = 1024;
/// TCP connect bound; the overall bound is `request_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client used for upstream requests.
pub type HttpClient<B> = Client<HttpsConnector<HttpConnector>, B>;
/// The client used to forward requests.
pub type UpstreamClient = HttpClient<RequestBody>;

/// Builds a pooled client trusting webpki roots plus `extra_roots`.
pub fn build_client<B>(extra_roots: &[CertificateDer<'static>]) -> Result<HttpClient<B>, String>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = crate::tls::client_config(extra_roots)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .build(connector))
}

/// Upstream clients by trust roots, shared by routes and kept across reloads.
#[derive(Default)]
pub struct ClientCache {
    clients: Mutex<HashMap<Vec<CertificateDer<'static>>, UpstreamClient>>,
}

impl ClientCache {
    /// The client for these extra roots, built on first use.
    pub fn get(&self, extra_roots: &[CertificateDer<'static>]) -> Result<UpstreamClient, String> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(extra_roots) {
            return Ok(c.clone());
        }
        let c = build_client(extra_roots)?;
        clients.insert(extra_roots.to_vec(), c.clone());
        Ok(c)
    }
}

/// What went wrong talking to an upstream (the `kind` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP connect failed or was refused.
    Connect,
    /// TLS handshake or certificate verification failed.
    Tls,
    /// The request timeout passed.
    Timeout,
    /// The exchange broke after connecting.
    Protocol,
}

impl ErrorKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Protocol => "protocol",
        }
    }

    /// Classifies a client error by walking its source chain.
    pub fn of(err: &hyper_util::client::legacy::Error) -> ErrorKind {
        let mut source = err.source();
        while let Some(e) = source {
            if e.downcast_ref::<rustls::Error>().is_some() {
                return ErrorKind::Tls;
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                // hyper-rustls wraps tokio-rustls' io::Error (which wraps the
                // rustls::Error) in another io::Error, and io::Error::source
                // skips the error it wraps: look inside by hand.
                let mut inner = io.get_ref();
                while let Some(i) = inner {
                    if i.is::<rustls::Error>() {
                        return ErrorKind::Tls;
                    }
                    inner = i
                        .downcast_ref::<std::io::Error>()
                        .and_then(std::io::Error::get_ref);
                }
                if io.kind() == std::io::ErrorKind::TimedOut {
                    return ErrorKind::Timeout;
                }
            }
            source = e.source();
        }
        if err.is_connect() {
            ErrorKind::Connect
        } else {
            ErrorKind::Protocol
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Connect => "connection failed",
            ErrorKind::Tls => "TLS handshake failed",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Protocol => "protocol error",
        })
    }
}
