//! Per-user connection helpers: a sandbox with users and admin API calls
//! (the config with a store and a pool is [`super::ProxyToml::pool`]).

use bytes::Bytes;
use flinks_proxy::sandbox::{Sandbox, SandboxOptions, SandboxUser};
use flinks_proxy::Running;
use http::Request;
use http_body_util::Full;

use super::{client, send, Resp};

pub use super::config::API_TOKEN;
/// The select header's default name.
pub const SELECT: &str = "x-flinks-connection";

/// A sandbox with users alice, bob and carol, tokens living `expires_in`.
pub async fn users_sandbox(expires_in: u64, rotate: bool) -> Sandbox {
    Sandbox::start(SandboxOptions {
        users: ["alice", "bob", "carol"]
            .iter()
            .map(|s| SandboxUser::new(s))
            .collect(),
        expires_in: Some(expires_in),
        rotate_refresh_tokens: rotate,
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox")
}

/// A new store key.
pub fn new_key() -> String {
    flinks_proxy::ground::crypto::generate_key().expect("key")
}

/// An admin API request with the API token.
pub async fn admin(p: &Running, method: &str, path: &str, body: Option<serde_json::Value>) -> Resp {
    admin_as(p, method, path, body, Some(API_TOKEN)).await
}

/// An admin API request with the given bearer token (or none).
pub async fn admin_as(
    p: &Running,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    token: Option<&str>,
) -> Resp {
    let mut req = Request::builder()
        .method(method)
        .uri(super::admin_url(p, path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    send(&client(), req.body(Full::new(body)).expect("request")).await
}

/// Connects a sandbox user with their first code; asserts 201.
pub async fn connect(p: &Running, sub: &str) -> serde_json::Value {
    let r = admin(
        p,
        "POST",
        "/connections/users",
        Some(serde_json::json!({"code": format!("code-{sub}")})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

/// Re-authorizes sandbox user `sub` (connection id `sub`) with a new code;
/// the caller asserts on the answer (200: an existing connection replaced).
pub async fn reauthorize(p: &Running, sb: &Sandbox, sub: &str) -> Resp {
    let code = sb.new_code(sub);
    admin(
        p,
        "POST",
        "/connections/users",
        Some(serde_json::json!({"code": code, "id": sub})),
    )
    .await
}

/// A proxied GET naming connection `id`.
pub async fn get_as(p: &Running, path: &str, id: &str) -> Resp {
    let req = Request::get(super::proxy_url(p, path))
        .header(SELECT, id)
        .body(Full::default())
        .expect("request");
    send(&client(), req).await
}
