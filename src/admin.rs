//! The admin listener's endpoints: `/metrics` (Prometheus text),
//! `/healthz` (the process serves), `/readyz` (every credential has had a
//! first token, and not draining) and `/status` (credentials and routes as
//! JSON, never a secret).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::runtime::AppState;

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Serves one admin request.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n",
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => readyz(&state),
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            status(&state).to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics /healthz /readyz /status\n",
        ),
    })
}

fn readyz(state: &AppState) -> Response<ProxyBody> {
    if state.is_draining() {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n");
    }
    let waiting = state.not_ready();
    if waiting.is_empty() {
        reply(StatusCode::OK, "text/plain", "ready\n")
    } else {
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("waiting for a first token: {}\n", waiting.join(", ")),
        )
    }
}

/// The `/status` document.
pub fn status(state: &AppState) -> serde_json::Value {
    let rt = state.runtime.load();
    let credentials: serde_json::Map<String, serde_json::Value> = rt
        .sources
        .iter()
        .map(|(name, s)| (name.clone(), s.status_json(rt.config.show_subjects)))
        .collect();
    let routes: serde_json::Map<String, serde_json::Value> = rt
        .route_list
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                serde_json::json!({
                    "host": r.config.host,
                    "path_prefix": r.config.path_prefix,
                    "upstream": r.config.upstream_url(),
                    "credential": r.config.credential,
                }),
            )
        })
        .collect();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "draining": state.is_draining(),
        "config": rt.config.source.display().to_string(),
        "credentials": credentials,
        "routes": routes,
    })
}
