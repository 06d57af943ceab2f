//! Why a token request failed: [`TokenError`], its classes (transient,
//! refusal, `invalid_grant`) and labels, and [`describe`], the short cause
//! read from a network error's source chain.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use super::Endpoint;

/// Why a token request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The endpoint refused with a 4xx OAuth error.
    #[error("token endpoint refused the request ({status}): {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Rejected {
        /// HTTP status.
        status: u16,
        /// OAuth `error`.
        error: String,
        /// OAuth `error_description`.
        description: Option<String>,
    },
    /// A 5xx.
    #[error("token endpoint failed ({status}){}", error.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    ServerError {
        /// HTTP status.
        status: u16,
        /// OAuth `error`, if any.
        error: Option<String>,
    },
    /// `token_timeout` passed.
    #[error("token request to {host} timed out after {after:?}")]
    Timeout {
        /// The token URL's host.
        host: String,
        /// The timeout.
        after: Duration,
    },
    /// Connect, TLS or I/O error.
    #[error("cannot reach the token endpoint at {host}: {cause}")]
    Network {
        /// The token URL's host.
        host: String,
        /// What went wrong, read from the source chain ("connection
        /// refused", "DNS lookup failed: ...", "TLS: invalid peer
        /// certificate: ...").
        cause: String,
        /// The error itself.
        #[source]
        source: Arc<dyn StdError + Send + Sync>,
    },
    /// A 200 without a usable token.
    #[error("token endpoint answered without a usable token: {0}")]
    InvalidResponse(String),
    /// The request could not be made from the configured settings.
    #[error("{0}")]
    State(String),
    /// The state file could not be written (retried like a transient failure).
    #[error("state file: {0}")]
    Persist(String),
    /// The store that keeps a shared credential's tokens failed (retried
    /// like a transient failure).
    #[error("{0}")]
    Store(#[source] Arc<crate::store::StoreError>),
}

impl TokenError {
    /// Transient failures are retried quickly; others wait long.
    pub fn is_transient(&self) -> bool {
        match self {
            TokenError::Rejected { status, error, .. } => {
                *status == 429 || error == "temporarily_unavailable"
            }
            TokenError::ServerError { .. }
            | TokenError::Timeout { .. }
            | TokenError::Network { .. }
            | TokenError::InvalidResponse(_)
            | TokenError::Persist(_)
            | TokenError::Store(_) => true,
            TokenError::State(_) => false,
        }
    }

    /// The endpoint says the grant itself (refresh token or code) is dead:
    /// `invalid_grant`. Only this ends a per-user connection.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, TokenError::Rejected { error, .. } if error == "invalid_grant")
    }

    /// 400/401/403 from the endpoint (not a "try later"): the refresh token
    /// or code is dead, or the client is not allowed.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            TokenError::Rejected {
                status: 400 | 401 | 403,
                ..
            }
        ) && !self.is_transient()
    }

    /// The `outcome` label of `flinks_proxy_token_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            TokenError::Rejected { .. } | TokenError::State(_) => "rejected",
            // The endpoint answered fine; the failure is ours (disk).
            TokenError::Persist(_) => "success",
            // No answer from the endpoint to count: a lease or commit failed.
            TokenError::Store(_) => "network",
            TokenError::ServerError { .. } => "server_error",
            TokenError::Timeout { .. } => "timeout",
            TokenError::Network { .. } => "network",
            TokenError::InvalidResponse(_) => "invalid_response",
        }
    }

    /// `error` and `error_description` for `/status`.
    pub fn oauth_fields(&self) -> (String, Option<String>) {
        match self {
            TokenError::Rejected {
                error, description, ..
            } => (error.clone(), description.clone()),
            TokenError::ServerError { error, .. } => (
                error.clone().unwrap_or_else(|| "server_error".into()),
                Some(self.to_string()),
            ),
            TokenError::Timeout { .. } => ("timeout".into(), Some(self.to_string())),
            TokenError::Network { .. } => ("network".into(), Some(self.to_string())),
            TokenError::InvalidResponse(_) => ("invalid_response".into(), Some(self.to_string())),
            TokenError::State(_) => ("invalid_configuration".into(), Some(self.to_string())),
            TokenError::Persist(_) => ("state_file".into(), Some(self.to_string())),
            TokenError::Store(_) => ("store_unavailable".into(), Some(self.to_string())),
        }
    }

    pub(super) fn network(
        endpoint: &Endpoint,
        source: Arc<dyn StdError + Send + Sync>,
    ) -> TokenError {
        TokenError::Network {
            host: endpoint.host(),
            cause: describe(&*source),
            source,
        }
    }
}

/// A short cause read from an error's source chain: what an operator needs
/// to tell DNS from a refused connection from a certificate problem.
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut chain: Vec<&(dyn StdError + 'static)> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        chain.push(e);
        // io::Error::source skips the error it wraps: look inside by hand
        // (hyper-rustls wraps the rustls::Error in io::Errors).
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|i| i as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    if let Some(tls) = chain.iter().find_map(|e| e.downcast_ref::<rustls::Error>()) {
        return format!("TLS: {tls}");
    }
    let io_kind = chain
        .iter()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind)
        .find(|k| *k != std::io::ErrorKind::Other);
    let innermost = chain.last().map(|e| e.to_string()).unwrap_or_default();
    if chain.iter().any(|e| e.to_string().starts_with("dns error")) {
        return format!("DNS lookup failed: {innermost}");
    }
    match io_kind {
        Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".into(),
        Some(std::io::ErrorKind::TimedOut) => "connect timed out".into(),
        Some(std::io::ErrorKind::ConnectionReset) => "connection reset".into(),
        _ => {
            let mut parts: Vec<String> = chain.iter().map(|e| e.to_string()).collect();
            parts.dedup();
            parts.join(": ")
        }
    }
}
