//! One token request: the body (JSON or form), client authentication (body
//! fields, HTTP Basic, a fresh signed assertion from `assertion`, or the
//! client certificate on the connection), the HTTP exchange bounded by
//! `token_timeout`, parsing and validation of the answer (lifetime capped, header-safe
//! token, JWT `exp` fallback), and the error classes (in `error`).
//!
//! Shared by credentials ([`crate::tokens::TokenSource`]) and per-user
//! connection pools. It never persists anything and keeps no state between
//! requests: rotation of refresh tokens, caching and single flight belong to
//! the caller.

mod assertion;
mod error;
mod par;
mod revoke;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use tokio::time::Instant;

use super::dpop::{Dpop, DPOP};
use super::jwt::{jwt_claims, Claims};
use crate::config::{
    BodyFormat, ClientAssertion, ClientAuth, CredentialConfig, DEFAULT_TOKEN_TIMEOUT,
};
use crate::ground::form::encode as form_encode;
use crate::ground::secret::Secret;
use crate::net::tls::ClientCert;
use crate::net::upstream::HttpClient;
pub use assertion::{client_assertion, ASSERTION_TYPE};
pub use error::{describe, TokenError};
pub use par::push;
pub use revoke::revoke;

/// Lifetime assumed when the endpoint gives neither `expires_in` nor a JWT `exp`.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Longest lifetime believed. Access tokens live minutes to hours; a day is
/// plenty, and the cap keeps absurd values (`1e300`, a JWT `exp` of
/// `u64::MAX`) away from clock arithmetic.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Largest token endpoint response read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Longest piece of endpoint text (`error`, `error_description`) kept.
const MAX_ENDPOINT_TEXT: usize = 300;

/// How to talk to one token endpoint (from a credential or a pool's settings).
pub struct Endpoint {
    /// Credential or pool name, for logs.
    pub name: String,
    /// The token endpoint.
    pub token_url: Uri,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Option<Secret>,
    /// Body fields, HTTP Basic or a signed assertion.
    pub client_auth: ClientAuth,
    /// The assertion's key and audience (`private_key_jwt`, `client_secret_jwt`).
    pub assertion: Option<ClientAssertion>,
    /// JSON or form body.
    pub body_format: BodyFormat,
    /// Scope sent with `client_credentials` and `refresh_token` grants.
    pub scope: Option<String>,
    /// Extra body fields.
    pub extra: Vec<(String, String)>,
    /// One request, end to end.
    pub token_timeout: Duration,
    /// `dpop = true`: the proofs sent with each token request, and the
    /// token endpoint's latest nonce.
    pub dpop: Option<Arc<Dpop>>,
    client: HttpClient<Full<Bytes>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// The endpoint's HTTP client could not be built (trust roots).
#[derive(Debug, thiserror::Error)]
#[error("token endpoint client: {0}")]
pub struct EndpointError(String);

impl Endpoint {
    /// An endpoint with body client authentication, a JSON body, no client
    /// secret, no scope, no extra fields and the default `token_timeout`;
    /// set the public fields for anything else. Trusts the webpki roots
    /// plus `ca_certs`; presents `client_cert` on every connection to the
    /// endpoint (`tls_client_auth`, certificate-bound tokens).
    pub fn new(
        name: impl Into<String>,
        token_url: Uri,
        client_id: impl Into<String>,
        ca_certs: &[CertificateDer<'static>],
        client_cert: Option<&ClientCert>,
    ) -> Result<Endpoint, EndpointError> {
        Ok(Endpoint {
            name: name.into(),
            token_url,
            client_id: client_id.into(),
            client_secret: None,
            client_auth: ClientAuth::default(),
            assertion: None,
            body_format: BodyFormat::default(),
            scope: None,
            extra: Vec::new(),
            token_timeout: DEFAULT_TOKEN_TIMEOUT,
            dpop: None,
            client: crate::net::upstream::build_client(ca_certs, client_cert)
                .map_err(EndpointError)?,
        })
    }

    /// The endpoint of a `[credentials.NAME]` table.
    pub fn from_credential(c: &CredentialConfig) -> Result<Endpoint, EndpointError> {
        let mut e = Endpoint::new(
            &c.name,
            c.token_url.clone(),
            &c.client_id,
            &c.ca_certs,
            c.client_cert.as_ref(),
        )?;
        e.client_secret = c.client_secret.clone();
        e.client_auth = c.client_auth;
        e.assertion = c.assertion.clone();
        e.body_format = c.body_format;
        e.scope = c.scope.clone();
        e.extra = c.extra.clone();
        e.token_timeout = c.token_timeout;
        e.dpop = c.dpop_key.clone().map(|k| Arc::new(Dpop::new(k)));
        Ok(e)
    }

    /// The token URL's host, for messages.
    pub fn host(&self) -> String {
        self.token_url.host().unwrap_or("?").to_owned()
    }
}

/// What one request asks for.
#[derive(Clone, Copy)]
pub enum Grant<'a> {
    /// An application token from the client id and secret.
    ClientCredentials,
    /// Exchange a one-time code; the answer must carry a refresh token.
    AuthorizationCode {
        /// The code.
        code: &'a str,
        /// The redirect URI the code was issued for (empty: not sent).
        redirect_uri: &'a str,
        /// The PKCE verifier (RFC 7636) of the authorization request.
        code_verifier: Option<&'a str>,
    },
    /// A new access token from a refresh token.
    RefreshToken {
        /// The refresh token.
        refresh_token: &'a str,
    },
}

impl Grant<'_> {
    /// The `grant_type` value on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::AuthorizationCode { .. } => "authorization_code",
            Grant::RefreshToken { .. } => "refresh_token",
        }
    }

    /// The secret this grant sends besides the client secret.
    fn secret(&self) -> Option<&str> {
        match self {
            Grant::ClientCredentials => None,
            Grant::AuthorizationCode { code, .. } => Some(code),
            Grant::RefreshToken { refresh_token } => Some(refresh_token),
        }
    }
}

/// A successful answer, validated (lifetime capped, header-safe token).
pub struct Granted {
    /// The access token.
    pub access_token: Secret,
    /// A refresh token, when the endpoint sent one (new or the same).
    pub refresh_token: Option<Secret>,
    /// Lifetime granted, capped at [`MAX_LIFETIME`], never zero.
    pub lifetime: Duration,
    /// Granted scope, when the endpoint says.
    pub scope: Option<String>,
    /// The JWT `sub` claim, when present.
    pub sub: Option<String>,
    /// When the request was sent: lifetimes count from here, conservative
    /// by the request's own latency.
    pub sent_at: Instant,
    /// Unix time the token expires.
    pub expires_unix: u64,
    /// `token_type` DPoP: the token is bound to the endpoint's DPoP key
    /// and is sent as `Authorization: DPoP` with a proof.
    pub dpop: bool,
}

impl Granted {
    /// When the access token expires, in Unix milliseconds: counted from
    /// when its request was sent (as the endpoint counts), not from when
    /// the answer arrived, so that another replica adopting it from the
    /// store never sends it past its real expiry after a slow token request.
    pub fn expires_ms(&self) -> i64 {
        let lifetime = i64::try_from(self.lifetime.as_millis()).unwrap_or(i64::MAX);
        let waited = Instant::now().saturating_duration_since(self.sent_at);
        let waited = i64::try_from(waited.as_millis()).unwrap_or(i64::MAX);
        crate::ground::now_ms()
            .saturating_sub(waited)
            .saturating_add(lifetime)
    }
}

impl std::fmt::Debug for Granted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Granted")
            .field("lifetime", &self.lifetime)
            .field("scope", &self.scope)
            .field("sub", &self.sub)
            .field("dpop", &self.dpop)
            .finish_non_exhaustive()
    }
}

/// Makes one request, bounded by `endpoint.token_timeout`; never persists
/// anything.
///
/// A refresh token in the answer may replace the one sent (rotation): the
/// caller must commit it durably **before** the access token is used, and
/// keep it even if that fails, since the endpoint may already have retired
/// the old one. A code exchange that returns no refresh token is an
/// [`TokenError::InvalidResponse`].
pub async fn request(endpoint: &Endpoint, grant: Grant<'_>) -> Result<Granted, TokenError> {
    request_within(endpoint, grant, endpoint.token_timeout).await
}

/// [`request`], bounded by `limit` instead of `token_timeout`: for a refresh
/// whose answer must not be abandoned (an endpoint that answers late still
/// rotates the refresh token sent).
pub async fn request_within(
    endpoint: &Endpoint,
    grant: Grant<'_>,
    limit: Duration,
) -> Result<Granted, TokenError> {
    let sent_at = Instant::now();
    match tokio::time::timeout(limit, exchange(endpoint, grant)).await {
        Ok(Ok((status, body, assertion))) => {
            parse(endpoint, grant, status, &body, sent_at, assertion.as_ref())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(TokenError::Timeout {
            host: endpoint.host(),
            after: limit,
        }),
    }
}

/// Sends the request and reads the answer's status and body; with the
/// client assertion sent, so that an answer quoting it is scrubbed. With
/// DPoP, a `400 use_dpop_nonce` answer (RFC 9449 §8) is retried once with
/// the nonce it gave, a fresh assertion and a fresh proof.
async fn exchange(
    endpoint: &Endpoint,
    grant: Grant<'_>,
) -> Result<(StatusCode, Bytes, Option<Secret>), TokenError> {
    let mut challenged = false;
    loop {
        let assertion = client_assertion(endpoint)?;
        let req = build(endpoint, grant, assertion.as_ref())?;
        let (status, body) = send(endpoint, req).await?;
        if endpoint.dpop.is_some() && !challenged && asks_for_nonce(status, &body) {
            challenged = true;
            continue;
        }
        return Ok((status, body, assertion));
    }
}

/// Whether a token endpoint's answer is RFC 9449 §8's nonce challenge.
fn asks_for_nonce(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::BAD_REQUEST
        && serde_json::from_slice::<OAuthError>(body).is_ok_and(|e| e.error == "use_dpop_nonce")
}

/// Sends `req` with the endpoint's client and reads the answer's status and
/// body (at most [`MAX_TOKEN_RESPONSE`] bytes).
async fn send(
    endpoint: &Endpoint,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), TokenError> {
    let uri = endpoint.dpop.as_ref().map(|_| req.uri().clone());
    let resp = endpoint
        .client
        .request(req)
        .await
        .map_err(|e| TokenError::network(endpoint, Arc::new(e)))?;
    if let (Some(dpop), Some(uri)) = (&endpoint.dpop, &uri) {
        dpop.remember(uri, resp.headers());
    }
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
        .collect()
        .await
        .map_err(|e| {
            if status.is_success() {
                TokenError::InvalidResponse(format!("cannot read body: {e}"))
            } else {
                TokenError::network(endpoint, Arc::from(e))
            }
        })?
        .to_bytes();
    Ok((status, body))
}

/// The client authentication body fields: `client_id` and `client_secret`
/// (`body`), `client_id` and the assertion (`private_key_jwt`,
/// `client_secret_jwt`), `client_id` alone (`tls_client_auth`: the
/// certificate on the connection authenticates); none for `basic`. Shared
/// with revocation and pushed authorization requests.
fn client_fields<'a>(
    endpoint: &'a Endpoint,
    assertion: Option<&'a Secret>,
    fields: &mut Vec<(&'a str, &'a str)>,
) {
    match endpoint.client_auth {
        ClientAuth::Basic => {}
        ClientAuth::Body => {
            fields.push(("client_id", endpoint.client_id.as_str()));
            if let Some(s) = &endpoint.client_secret {
                fields.push(("client_secret", s.expose()));
            }
        }
        ClientAuth::TlsClientAuth => fields.push(("client_id", endpoint.client_id.as_str())),
        ClientAuth::PrivateKeyJwt | ClientAuth::ClientSecretJwt => {
            fields.push(("client_id", endpoint.client_id.as_str()));
            if let Some(a) = assertion {
                fields.push(("client_assertion_type", ASSERTION_TYPE));
                fields.push(("client_assertion", a.expose()));
            }
        }
    }
}

/// The body fields of `grant`, in wire order.
fn fields<'a>(
    endpoint: &'a Endpoint,
    grant: &Grant<'a>,
    assertion: Option<&'a Secret>,
) -> Vec<(&'a str, &'a str)> {
    let mut fields = Vec::with_capacity(8 + endpoint.extra.len());
    fields.push(("grant_type", grant.as_str()));
    client_fields(endpoint, assertion, &mut fields);
    if !matches!(grant, Grant::AuthorizationCode { .. }) {
        if let Some(scope) = &endpoint.scope {
            fields.push(("scope", scope.as_str()));
        }
    }
    match *grant {
        Grant::ClientCredentials => {}
        Grant::RefreshToken { refresh_token } => fields.push(("refresh_token", refresh_token)),
        Grant::AuthorizationCode {
            code,
            redirect_uri,
            code_verifier,
        } => {
            fields.push(("code", code));
            if !redirect_uri.is_empty() {
                fields.push(("redirect_uri", redirect_uri));
            }
            if let Some(v) = code_verifier {
                fields.push(("code_verifier", v));
            }
        }
    }
    for (k, v) in &endpoint.extra {
        fields.push((k.as_str(), v.as_str()));
    }
    fields
}

fn build(
    endpoint: &Endpoint,
    grant: Grant<'_>,
    assertion: Option<&Secret>,
) -> Result<Request<Full<Bytes>>, TokenError> {
    let fields = fields(endpoint, &grant, assertion);
    let (content_type, body) = match endpoint.body_format {
        BodyFormat::Json => {
            let map: serde_json::Map<String, serde_json::Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
                .collect();
            (
                "application/json",
                serde_json::Value::Object(map).to_string(),
            )
        }
        BodyFormat::Form => {
            let body = fields
                .iter()
                .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
                .collect::<Vec<_>>()
                .join("&");
            ("application/x-www-form-urlencoded", body)
        }
    };
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(endpoint.token_url.clone())
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("flinks-proxy/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| TokenError::State(format!("cannot build the token request: {e}")))?;
    if let Some(v) = basic_auth(endpoint)? {
        req.headers_mut().insert(header::AUTHORIZATION, v);
    }
    if let Some(dpop) = &endpoint.dpop {
        let proof = dpop
            .proof_header("POST", &endpoint.token_url, None)
            .map_err(|e| TokenError::State(e.to_string()))?;
        req.headers_mut().insert(&DPOP, proof);
    }
    Ok(req)
}

/// HTTP Basic client authentication (RFC 6749 §2.3.1: id and secret
/// form-encoded), when the endpoint uses it.
fn basic_auth(endpoint: &Endpoint) -> Result<Option<HeaderValue>, TokenError> {
    if endpoint.client_auth != ClientAuth::Basic {
        return Ok(None);
    }
    let secret = endpoint.client_secret.as_ref().map_or("", |s| s.expose());
    let creds = format!(
        "{}:{}",
        form_encode(&endpoint.client_id),
        form_encode(secret)
    );
    let mut v = HeaderValue::from_str(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(creds)
    ))
    .map_err(|_| TokenError::State("client id or secret cannot be sent in a header".into()))?;
    v.set_sensitive(true);
    Ok(Some(v))
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    error_description: Option<String>,
}

/// The [`Granted`] of an answer, validated: a token response whose access
/// token can be sent, with a refresh token after a code exchange, and a
/// lifetime that makes sense.
fn parse(
    endpoint: &Endpoint,
    grant: Grant<'_>,
    status: StatusCode,
    body: &[u8],
    sent_at: Instant,
    assertion: Option<&Secret>,
) -> Result<Granted, TokenError> {
    let parsed = token_response(endpoint, grant, status, body, assertion)?;
    let (access, dpop) = access_token(
        endpoint,
        grant,
        parsed.access_token,
        parsed.token_type.as_deref(),
    )?;
    let refresh_token = parsed.refresh_token.filter(|t| !t.is_empty());
    if matches!(grant, Grant::AuthorizationCode { .. }) && refresh_token.is_none() {
        return Err(TokenError::InvalidResponse(
            "the code exchange returned no refresh_token".into(),
        ));
    }
    let claims = jwt_claims(&access);
    let now = SystemTime::now();
    let lifetime = lifetime_or_default(endpoint, parsed.expires_in.as_ref(), claims.as_ref(), now)?;
    let now_unix = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    Ok(Granted {
        access_token: Secret::new(access),
        refresh_token: refresh_token.map(Secret::new),
        lifetime,
        scope: parsed.scope,
        sub: claims.and_then(|c| c.sub),
        sent_at,
        expires_unix: now_unix.saturating_add(lifetime.as_secs()),
        dpop,
    })
}

/// The body of a 200 answer as a [`TokenResponse`]: a non-2xx status is
/// the endpoint's [`refusal`], another 2xx or a body that is not a token
/// response is an invalid response.
fn token_response(
    endpoint: &Endpoint,
    grant: Grant<'_>,
    status: StatusCode,
    body: &[u8],
    assertion: Option<&Secret>,
) -> Result<TokenResponse, TokenError> {
    if !status.is_success() {
        return Err(refusal(endpoint, grant, status, body, assertion));
    }
    if status != StatusCode::OK {
        return Err(TokenError::InvalidResponse(format!(
            "unexpected status {status}"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| TokenError::InvalidResponse(format!("not a token response: {e}")))
}

/// The answer's access token: present and not empty, of `token_type`
/// Bearer when one is given (or DPoP, when the endpoint sent a proof), and
/// fit for an `Authorization` header; and whether it is DPoP-bound.
fn access_token(
    endpoint: &Endpoint,
    grant: Grant<'_>,
    access_token: Option<String>,
    token_type: Option<&str>,
) -> Result<(String, bool), TokenError> {
    let access = access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenError::InvalidResponse("no access_token".into()))?;
    let dpop = match token_type {
        Some(tt) if tt.eq_ignore_ascii_case("dpop") && endpoint.dpop.is_some() => true,
        Some(tt) if !tt.eq_ignore_ascii_case("bearer") => {
            return Err(TokenError::InvalidResponse(format!(
                "token_type {:?} is not {}",
                scrub(endpoint, grant, None, tt),
                if endpoint.dpop.is_some() {
                    "DPoP or Bearer"
                } else {
                    "Bearer (a DPoP token needs dpop = true)"
                }
            )));
        }
        _ => false,
    };
    if endpoint.dpop.is_some() && !dpop {
        tracing::warn!(
            credential = %endpoint.name,
            "the token endpoint answered a DPoP request with a Bearer token: using it as Bearer"
        );
    }
    if HeaderValue::from_str(&format!("Bearer {access}")).is_err() {
        return Err(TokenError::InvalidResponse(
            "access_token has characters not allowed in a header".into(),
        ));
    }
    Ok((access, dpop))
}

/// The [`lifetime`] the answer grants, or [`DEFAULT_LIFETIME`] (with a
/// warning) when it says nothing.
fn lifetime_or_default(
    endpoint: &Endpoint,
    expires_in: Option<&serde_json::Value>,
    claims: Option<&Claims>,
    now: SystemTime,
) -> Result<Duration, TokenError> {
    Ok(match lifetime(expires_in, claims, now)? {
        Some(l) => l,
        None => {
            tracing::warn!(
                credential = %endpoint.name,
                "token response has neither expires_in nor a JWT exp; assuming {}s",
                DEFAULT_LIFETIME.as_secs()
            );
            DEFAULT_LIFETIME
        }
    })
}

/// The error of a non-2xx answer.
fn refusal(
    endpoint: &Endpoint,
    grant: Grant<'_>,
    status: StatusCode,
    body: &[u8],
    assertion: Option<&Secret>,
) -> TokenError {
    let err: Option<OAuthError> = serde_json::from_slice(body).ok();
    let error = err
        .as_ref()
        .map(|e| scrub(endpoint, grant, assertion, &e.error));
    let description = err
        .and_then(|e| e.error_description)
        .map(|d| scrub(endpoint, grant, assertion, &d));
    if status.is_server_error() {
        return TokenError::ServerError {
            status: status.as_u16(),
            error,
        };
    }
    TokenError::Rejected {
        status: status.as_u16(),
        error: error.unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
                .replace(' ', "_")
        }),
        description,
    }
}

/// The lifetime the answer grants, capped at [`MAX_LIFETIME`]; `None` when
/// it says nothing. `expires_in` wins over a JWT `exp`.
fn lifetime(
    expires_in: Option<&serde_json::Value>,
    claims: Option<&Claims>,
    now: SystemTime,
) -> Result<Option<Duration>, TokenError> {
    if let Some(v) = expires_in.filter(|v| !v.is_null()) {
        let secs = match v {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        return match secs {
            Some(s) if s.is_finite() && s > 0.0 => Ok(Some(
                Duration::try_from_secs_f64(s)
                    .unwrap_or(MAX_LIFETIME)
                    .min(MAX_LIFETIME),
            )),
            _ => Err(TokenError::InvalidResponse(format!(
                "expires_in {} is not a positive number of seconds",
                short(&v.to_string())
            ))),
        };
    }
    let Some(exp) = claims.and_then(|c| c.exp) else {
        return Ok(None);
    };
    // `exp` is whole seconds: measure from the precise time, not from the
    // floored Unix seconds, or a token obtained late in a second would be
    // used up to a second after its `exp`.
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    match Duration::from_secs(exp).checked_sub(since_epoch) {
        Some(d) if !d.is_zero() => Ok(Some(d.min(MAX_LIFETIME))),
        _ => Err(TokenError::InvalidResponse(
            "the JWT exp is in the past (check the clocks) and there is no expires_in".into(),
        )),
    }
}

fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Endpoint text without control characters, bounded, and with the
/// secrets we sent (the client secret, the grant's code or refresh token,
/// the PKCE verifier, the client assertion) replaced by `***`.
fn scrub(endpoint: &Endpoint, grant: Grant<'_>, assertion: Option<&Secret>, text: &str) -> String {
    // Replaced before the text is cut short: a secret the cut went through
    // would otherwise survive as a prefix of itself.
    let mut out: String = text.chars().filter(|c| !c.is_control()).collect();
    let verifier = match grant {
        Grant::AuthorizationCode { code_verifier, .. } => code_verifier,
        _ => None,
    };
    let secrets = [
        endpoint.client_secret.as_ref().map(Secret::expose),
        grant.secret(),
        verifier,
        assertion.map(Secret::expose),
    ];
    for s in secrets.into_iter().flatten().filter(|s| !s.is_empty()) {
        out = out.replace(s, "***");
    }
    out.chars().take(MAX_ENDPOINT_TEXT).collect()
}
