//! RFC 7009 token revocation, and the authenticated form POST it shares
//! with pushed authorization requests (`par.rs`): one request to a pool's
//! `revoke_url` with the refresh token, the client authenticated as at the
//! token endpoint (the same body fields, a fresh assertion for
//! `private_key_jwt` and `client_secret_jwt`, the Basic header, or the
//! client certificate: the same HTTP client), bounded by `token_timeout`.
//! The endpoint's answer text goes through the same scrubbing as token
//! answers (the token and the assertion sent never appear in an error).

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::Full;

use super::{
    basic_auth, client_assertion, client_fields, form_encode, refusal, send, Endpoint, Grant,
    TokenError,
};
use crate::ground::secret::Secret;

/// Revokes `refresh_token` at `url`. A 2xx answer is success (RFC 7009
/// §2.2: also for a token the server no longer knows); anything else is
/// the endpoint's refusal or failure.
pub async fn revoke(endpoint: &Endpoint, url: &Uri, refresh_token: &str) -> Result<(), TokenError> {
    let fields = [
        ("token", refresh_token),
        ("token_type_hint", "refresh_token"),
    ];
    let sent = post_form(endpoint, url, &fields, "revocation").await?;
    if sent.status.is_success() {
        return Ok(());
    }
    // Scrubbed as a refresh grant's answer is: the token sent is replaced.
    Err(refusal(
        endpoint,
        Grant::RefreshToken { refresh_token },
        sent.status,
        &sent.body,
        sent.assertion.as_ref(),
    ))
}

/// What [`post_form`] got back, with the assertion it sent (for scrubbing
/// the answer).
pub(super) struct Posted {
    pub(super) status: StatusCode,
    pub(super) body: Bytes,
    pub(super) assertion: Option<Secret>,
}

/// POSTs `fields` as a form to `url` with the endpoint's client
/// authentication, bounded by `token_timeout`; `what` names the request in
/// errors. Revocation and pushed authorization requests.
pub(super) async fn post_form(
    endpoint: &Endpoint,
    url: &Uri,
    fields: &[(&str, &str)],
    what: &str,
) -> Result<Posted, TokenError> {
    let assertion = client_assertion(endpoint)?;
    let mut fields = fields.to_vec();
    client_fields(endpoint, assertion.as_ref(), &mut fields);
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
        .collect();
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(url.clone())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("flinks-proxy/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::from(body.join("&")))
        .map_err(|e| TokenError::State(format!("cannot build the {what} request: {e}")))?;
    if let Some(v) = basic_auth(endpoint)? {
        req.headers_mut().insert(header::AUTHORIZATION, v);
    }
    let sent = tokio::time::timeout(endpoint.token_timeout, send(endpoint, req)).await;
    let (status, body) = sent.map_err(|_| TokenError::Timeout {
        host: url.host().unwrap_or("?").to_owned(),
        after: endpoint.token_timeout,
    })??;
    Ok(Posted {
        status,
        body,
        assertion,
    })
}
