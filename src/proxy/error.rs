//! Errors the proxy answers itself, and the one place that maps them to a
//! status code and the JSON body of SPEC §6.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::proxy::body::ProxyBody;

/// Why the proxy answered a request itself instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Malformed or refused request target.
    #[error("{0}")]
    BadRequest(&'static str),
    /// Client address not in `access.allow`.
    #[error("client address is not allowed")]
    Forbidden,
    /// No route matches.
    #[error("no route matches this request")]
    RouteNotFound,
    /// `CONNECT`.
    #[error("CONNECT is not supported: this is a reverse proxy")]
    MethodNotAllowed,
    /// `access.api_keys` set and key missing or wrong.
    #[error("a valid API key is required (Proxy-Authorization: Bearer KEY)")]
    ProxyAuthRequired,
    /// Connect, TLS or protocol failure to the upstream.
    #[error("the upstream could not be reached ({0})")]
    UpstreamUnavailable(crate::net::upstream::ErrorKind),
    /// No valid token can be had now.
    #[error("no access token is available for credential {credential}: {reason}")]
    TokenUnavailable {
        /// The credential's name.
        credential: String,
        /// Short, secret-free reason.
        reason: String,
        /// When the next attempt is due.
        retry_after: Duration,
    },
    /// `request_timeout` passed.
    #[error("the upstream did not answer within the request timeout")]
    UpstreamTimeout,
    /// A pooled route's select header is missing, empty, repeated or malformed.
    #[error("{0}")]
    ConnectionRequired(String),
    /// The connection the request named does not exist.
    #[error("connection {0} does not exist")]
    ConnectionNotFound(String),
    /// The connection's user must authorize again.
    #[error("connection {0} needs reauthorization: the user must authorize again, then POST the new code to the connections API")]
    ReauthorizationRequired(String),
    /// The connection store cannot be reached.
    #[error("the connection store is unavailable")]
    StoreUnavailable {
        /// When trying again makes sense.
        retry_after: Duration,
    },
}

/// A store outage is retried after this long (the pool reconnects by itself).
const STORE_RETRY_AFTER: Duration = Duration::from_secs(5);

impl From<crate::connections::PoolError> for ProxyError {
    fn from(e: crate::connections::PoolError) -> ProxyError {
        use crate::connections::PoolError;
        match e {
            PoolError::ConnectionRequired(_) => ProxyError::ConnectionRequired(e.to_string()),
            PoolError::NotFound(id) => ProxyError::ConnectionNotFound(id),
            PoolError::Reauthorization(id) => ProxyError::ReauthorizationRequired(id),
            PoolError::Unavailable {
                id,
                reason,
                retry_after,
            } => ProxyError::TokenUnavailable {
                credential: format!("connection {id}"),
                reason,
                retry_after,
            },
            PoolError::Store(_) => ProxyError::StoreUnavailable {
                retry_after: STORE_RETRY_AFTER,
            },
        }
    }
}

impl ProxyError {
    /// The status code the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::RouteNotFound => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ConnectionRequired(_) => StatusCode::BAD_REQUEST,
            ProxyError::ConnectionNotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::ReauthorizationRequired(_) => StatusCode::UNAUTHORIZED,
            ProxyError::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable `error` code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::Forbidden => "forbidden",
            ProxyError::RouteNotFound => "route_not_found",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::ProxyAuthRequired => "proxy_auth_required",
            ProxyError::UpstreamUnavailable(_) => "upstream_unavailable",
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::ConnectionRequired(_) => "connection_required",
            ProxyError::ConnectionNotFound(_) => "connection_not_found",
            ProxyError::ReauthorizationRequired(_) => "reauthorization_required",
            ProxyError::StoreUnavailable { .. } => "store_unavailable",
        }
    }

    /// The response: `{"error", "message", "request_id"}` plus the headers
    /// the status calls for (`Retry-After`, `Proxy-Authenticate`, `Allow`).
    pub fn into_response(self, request_id: &HeaderValue) -> Response<ProxyBody> {
        let mut body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "request_id": request_id.to_str().unwrap_or(""),
        });
        if let ProxyError::ConnectionNotFound(id) | ProxyError::ReauthorizationRequired(id) = &self
        {
            body["connection"] = id.as_str().into();
        }
        let mut resp = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match &self {
            ProxyError::TokenUnavailable { retry_after, .. }
            | ProxyError::StoreUnavailable { retry_after } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            ProxyError::ProxyAuthRequired => {
                h.insert(
                    header::PROXY_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"flinks-proxy\""),
                );
            }
            ProxyError::MethodNotAllowed => {
                h.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::upstream::ErrorKind;
    use http_body_util::BodyExt;

    #[test]
    fn every_error_maps_to_its_status_and_code() {
        let cases = [
            (ProxyError::BadRequest("x"), 400, "bad_request"),
            (ProxyError::Forbidden, 403, "forbidden"),
            (ProxyError::RouteNotFound, 404, "route_not_found"),
            (ProxyError::MethodNotAllowed, 405, "method_not_allowed"),
            (ProxyError::ProxyAuthRequired, 407, "proxy_auth_required"),
            (
                ProxyError::UpstreamUnavailable(ErrorKind::Connect),
                502,
                "upstream_unavailable",
            ),
            (
                ProxyError::TokenUnavailable {
                    credential: "c".into(),
                    reason: "r".into(),
                    retry_after: Duration::from_millis(1500),
                },
                503,
                "token_unavailable",
            ),
            (ProxyError::UpstreamTimeout, 504, "upstream_timeout"),
            (
                ProxyError::ConnectionRequired("x".into()),
                400,
                "connection_required",
            ),
            (
                ProxyError::ConnectionNotFound("a".into()),
                404,
                "connection_not_found",
            ),
            (
                ProxyError::ReauthorizationRequired("a".into()),
                401,
                "reauthorization_required",
            ),
            (
                ProxyError::StoreUnavailable {
                    retry_after: Duration::from_secs(5),
                },
                503,
                "store_unavailable",
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.code(), code);
        }
    }

    #[tokio::test]
    async fn response_is_json_with_retry_after() {
        let e = ProxyError::TokenUnavailable {
            credential: "c".into(),
            reason: "r".into(),
            retry_after: Duration::from_millis(1500),
        };
        let resp = e.into_response(&HeaderValue::from_static("rid-1"));
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "token_unavailable");
        assert_eq!(v["request_id"], "rid-1");
    }

    #[tokio::test]
    async fn reauthorization_names_the_connection_and_store_outages_say_when() {
        let rid = HeaderValue::from_static("rid-2");
        let resp = ProxyError::ReauthorizationRequired("alice".into()).into_response(&rid);
        assert_eq!(resp.status(), 401);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "reauthorization_required");
        assert_eq!(v["connection"], "alice");
        let resp = ProxyError::StoreUnavailable {
            retry_after: Duration::from_secs(5),
        }
        .into_response(&rid);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
    }
}
