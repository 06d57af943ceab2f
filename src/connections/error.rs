//! The errors a pool answers with ([`PoolError`] for a request,
//! [`PoolBuildError`] for building a pool) and the small conversions into
//! them and into the store's [`LastError`]. Their mapping to HTTP status
//! and JSON is the proxy's, not this file's.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;

use crate::store::{LastError, StoreError};
use crate::tokens;

/// Why a pooled request gets no token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    /// The select header is missing, empty, repeated or malformed.
    #[error("name the connection in the {0} header (1-128 of A-Z a-z 0-9 . _ : @ -)")]
    ConnectionRequired(HeaderName),
    /// No such connection in the pool.
    #[error("connection {0} does not exist in this pool")]
    NotFound(String),
    /// The user must authorize again.
    #[error("connection {0} needs reauthorization: the user must authorize again")]
    Reauthorization(String),
    /// No token now; retry later.
    #[error("no access token is available for connection {id}: {reason}")]
    Unavailable {
        /// The connection.
        id: String,
        /// Secret-free reason.
        reason: String,
        /// When trying again makes sense.
        retry_after: Duration,
    },
    /// The store cannot be reached.
    #[error("{0}")]
    Store(#[source] Arc<StoreError>),
}

/// Why a pool could not be built.
#[derive(Debug, thiserror::Error)]
#[error("connections.{pool}: {source}")]
pub struct PoolBuildError {
    pub(super) pool: String,
    #[source]
    pub(super) source: tokens::grant::EndpointError,
}

pub(super) fn store_err(e: StoreError) -> PoolError {
    PoolError::Store(Arc::new(e))
}

pub(super) fn last_error(error: String, description: Option<String>) -> LastError {
    LastError {
        error,
        description,
        at: crate::ground::now_ms(),
    }
}
