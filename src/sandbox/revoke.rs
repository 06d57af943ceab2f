//! The sandbox's RFC 7009 revocation endpoint, `POST /api/v1/revoke` on
//! the token listener: the client authenticated as at the token endpoint,
//! then the refresh token named by `token` stops working (a user's, or
//! the single-user one). Unknown tokens are a success too (RFC 7009 §2.2).

use std::sync::atomic::Ordering::SeqCst;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::server::json_response;
use super::token::{client_auth_ok, oauth_error, read_params};
use super::{lock, Body, Sandbox, Shared};

/// Path of the revocation endpoint.
pub const REVOKE_PATH: &str = "/api/v1/revoke";

/// `POST /api/v1/revoke`.
pub(super) async fn handle_revoke(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let (parts, params) = read_params(req, 16 << 10).await;
    let params = match params {
        Ok(p) => p,
        Err(d) => return oauth_error("invalid_request", d),
    };
    if !client_auth_ok(shared, &parts.headers, &params) {
        return oauth_error("invalid_client", "Client authentication failed");
    }
    let Some(token) = params.get("token") else {
        return oauth_error("invalid_request", "The token parameter is missing");
    };
    shared.n.revocations.fetch_add(1, SeqCst);
    if lock(&shared.users).refresh.remove(token).is_none() {
        let mut state = shared.grants();
        if *token == state.refresh_token {
            state.refresh_revoked = true;
        }
    }
    json_response(StatusCode::OK, &serde_json::json!({}))
}

impl Sandbox {
    /// Revocation requests answered (any token, known or not).
    pub fn revocations(&self) -> u64 {
        self.shared.n.revocations.load(SeqCst)
    }

    /// The revocation endpoint's URL.
    pub fn revoke_url(&self) -> String {
        format!("http://{}{REVOKE_PATH}", self.token_addr())
    }
}
