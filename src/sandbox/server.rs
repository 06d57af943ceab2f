//! The two servers' plumbing: accept loops and connections (HTTP/1.1 and
//! h2c on one port, each connection a task of the loop's `JoinSet`; the
//! token listener also serves the authorize endpoint), and the small
//! response helpers the token endpoint, the authorize page and the API use.

use std::convert::Infallible;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::api::handle_api;
use super::authorize::handle_authorize;
use super::token::handle_token;
use super::{Body, Shared, AUTHORIZE_PATH};

#[derive(Clone, Copy)]
pub(super) enum Role {
    Token,
    Api,
}

/// Accepts connections until aborted; dropping the `JoinSet` aborts them all.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, role: Role) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(stream, shared.clone(), role));
                }
                Err(error) => {
                    // Usually EMFILE under a benchmark: back off instead of spinning.
                    tracing::debug!(%error, "sandbox accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, shared: Arc<Shared>, role: Role) {
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move {
            Ok::<_, Infallible>(match role {
                Role::Token if req.uri().path() == AUTHORIZE_PATH => {
                    handle_authorize(&shared, req).await
                }
                Role::Token if req.uri().path() == super::REVOKE_PATH => {
                    super::revoke::handle_revoke(&shared, req).await
                }
                Role::Token if shared.n.finish_abandoned.load(SeqCst) => {
                    // Its own task: a client that leaves does not stop it.
                    let task = tokio::spawn(async move { handle_token(&shared, req).await });
                    task.await.unwrap_or_else(|_| {
                        error_json(StatusCode::INTERNAL_SERVER_ERROR, "handler_failed")
                    })
                }
                Role::Token => handle_token(&shared, req).await,
                Role::Api => handle_api(&shared, req).await,
            })
        }
    });
    let builder = Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(error) = connection.await {
        tracing::debug!(%error, "sandbox connection ended with an error");
    }
}

/// The credentials of an `Authorization: <scheme> <credentials>` header.
pub(super) fn credentials<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (given, token) = value.split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then(|| token.trim())
}

pub(super) fn response(
    status: StatusCode,
    mime: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = with_header(Response::new(Full::new(body.into())), CONTENT_TYPE, mime);
    *resp.status_mut() = status;
    resp
}

pub(super) fn with_header(
    mut resp: Response<Body>,
    name: HeaderName,
    value: &'static str,
) -> Response<Body> {
    resp.headers_mut()
        .insert(name, HeaderValue::from_static(value));
    resp
}

/// RFC 6749 §5.1: token responses must not be cached.
pub(super) fn no_store(resp: Response<Body>) -> Response<Body> {
    with_header(resp, header::CACHE_CONTROL, "no-store")
}

pub(super) fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    response(status, "application/json", body.to_string())
}

/// `{"error": CODE}`, the API's error format.
pub(super) fn error_json(status: StatusCode, error: &str) -> Response<Body> {
    json_response(status, &json!({ "error": error }))
}
