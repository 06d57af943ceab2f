//! RFC 9126 pushed authorization requests: the connect flow posts its
//! authorize parameters to a pool's `par_url`, the client authenticated as
//! at the token endpoint, and sends the browser to the authorization
//! endpoint with `client_id` and the `request_uri` answered, nothing else:
//! no parameter reaches the browser's address bar or can be changed there.

use http::Uri;
use serde::Deserialize;

use super::revoke::post_form;
use super::{refusal, Endpoint, Grant, TokenError};

#[derive(Deserialize)]
struct Pushed {
    request_uri: String,
}

/// Pushes `params` to `url`; the `request_uri` to send the browser with.
pub async fn push(
    endpoint: &Endpoint,
    url: &Uri,
    params: &[(&str, &str)],
) -> Result<String, TokenError> {
    let sent = post_form(endpoint, url, params, "pushed authorization").await?;
    if !sent.status.is_success() {
        // Nothing secret was sent but the client's own authentication,
        // which the scrubbing of an answer covers.
        return Err(refusal(
            endpoint,
            Grant::ClientCredentials,
            sent.status,
            &sent.body,
            sent.assertion.as_ref(),
        ));
    }
    let pushed: Pushed = serde_json::from_slice(&sent.body).map_err(|_| {
        TokenError::InvalidResponse("the pushed authorization answer has no request_uri".into())
    })?;
    if pushed.request_uri.is_empty() || pushed.request_uri.len() > 2048 {
        return Err(TokenError::InvalidResponse(
            "the pushed authorization answer's request_uri is empty or too long".into(),
        ));
    }
    Ok(pushed.request_uri)
}
