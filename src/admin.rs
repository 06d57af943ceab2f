//! The admin listener's endpoints: `/metrics` (Prometheus text),
//! `/healthz` (the process serves), `/readyz` (the store has been reached,
//! every credential has had a first token, and not draining) and `/status` (credentials and routes as
//! JSON, never a secret); `admin/connections.rs` serves the connections
//! API under `/connections`, `admin/sessions.rs` connect sessions under
//! `/connect-sessions`, `admin/webhooks.rs` webhook events under
//! `/webhooks/events`, `admin/ui.rs` the operator's HTML page under `/ui`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

pub mod connections;
pub mod sessions;
pub mod ui;
pub mod webhooks;

use crate::connections::Pool;
use crate::proxy::body::ProxyBody;
use crate::proxy::generation::{AppState, Route};
use crate::store::Store;

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
    let path = req.uri().path();
    if path == "/connections" || path.starts_with("/connections/") {
        return Ok(connections::handle(&state, req).await);
    }
    if path.starts_with("/connect-sessions/") {
        return Ok(sessions::handle(&state, req).await);
    }
    if path == "/webhooks/events" || path.starts_with("/webhooks/events/") {
        return Ok(webhooks::handle(&state, req).await);
    }
    if path == "/ui" || path.starts_with("/ui/") {
        return Ok(ui::handle(&state, req).await);
    }
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
    if state.store_pending() {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "waiting for the store: it cannot be reached yet\n",
        );
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
    let rt = state.generation.load();
    let credentials: serde_json::Map<String, serde_json::Value> = rt
        .sources
        .iter()
        .map(|(name, s)| (name.clone(), s.status_json(rt.config.show_subjects)))
        .collect();
    let routes: serde_json::Map<String, serde_json::Value> = rt
        .route_list
        .iter()
        .map(|r| (r.name.clone(), route_json(r)))
        .collect();
    let pools: serde_json::Map<String, serde_json::Value> = rt
        .pools
        .iter()
        .map(|(name, p)| (name.clone(), pool_json(p)))
        .collect();
    let store = state.store.as_ref().map(|s| store_json(s));
    serde_json::json!({
        "pools": pools,
        "store": store,
        "webhooks": webhooks_json(state),
        "version": env!("CARGO_PKG_VERSION"),
        "draining": state.is_draining(),
        "config": rt.config.source.display().to_string(),
        "credentials": credentials,
        "routes": routes,
    })
}

/// `[webhooks]` in `/status`: the receiver (without its query, which may
/// carry a token), the types delivered, and the queue as last read (the
/// store's, shared by replicas; `null` without a store).
fn webhooks_json(state: &AppState) -> serde_json::Value {
    let rt = state.generation.load();
    let queue = state.store.as_ref().map(|_| {
        let (pending, oldest) = state.metrics.webhooks().queue();
        serde_json::json!({"pending": pending, "oldest_pending_seconds": oldest})
    });
    match &rt.config.webhooks {
        Some(w) => serde_json::json!({
            "url": w.display_url(),
            "events": w.events,
            "queue": queue,
        }),
        None => serde_json::json!({"url": null, "queue": queue}),
    }
}

/// A route in `/status`: where it matches, its upstream, and its
/// credential or pool.
fn route_json(r: &Route) -> serde_json::Value {
    serde_json::json!({
        "host": r.config.host,
        "path_prefix": r.config.path_prefix,
        "upstream": r.config.upstream_url(),
        "credential": match &r.config.auth {
            crate::config::RouteAuth::Credential(c) => Some(c),
            crate::config::RouteAuth::Connections(_) => None,
        },
        "connections": match &r.config.auth {
            crate::config::RouteAuth::Connections(p) => Some(p),
            crate::config::RouteAuth::Credential(_) => None,
        },
    })
}

/// A pool in `/status`: its connections by state (every state, 0 too), its
/// cache size and selection header.
fn pool_json(p: &Pool) -> serde_json::Value {
    let counts: serde_json::Map<String, serde_json::Value> = crate::store::ConnectionState::ALL
        .iter()
        .map(|s| {
            let n = p.counts().iter().find(|c| c.0 == *s).map_or(0, |c| c.1);
            (s.as_str().to_owned(), n.into())
        })
        .collect();
    serde_json::json!({
        "connections": counts,
        "cache_size": p.cache_size(),
        "select_header": p.config().select_header.as_str(),
    })
}

/// The store in `/status`: its kind, health and key id.
fn store_json(s: &Store) -> serde_json::Value {
    serde_json::json!({
        "kind": s.kind(),
        "healthy": s.is_healthy() && s.is_initialized(),
        "initialized": s.is_initialized(),
        "key_id": s.key_id(),
    })
}
