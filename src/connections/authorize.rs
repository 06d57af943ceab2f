//! (Re-)authorizing a connection ([`Pool::authorize`]): exchanging a code
//! or a refresh token the admin API presents, and storing the connection
//! it buys, in a task of its own so a spent code's tokens are not lost.
//! The admin API's request handling is not here.

use std::sync::Arc;
use std::time::Duration;

use super::{valid_id, Pool};
use crate::ground::secret::Secret;
use crate::store::retry_while_unavailable;
use crate::store::{ConnectionInfo, StoreError, Tokens};
use crate::tokens::{self, Grant, Granted, TokenError};

/// The admin API's code exchange keeps trying to store what it obtained
/// for this long (the code is spent; the tokens must not be).
const AUTHORIZE_STORE_RETRY: Duration = Duration::from_secs(10);

/// What an admin request exchanges for a connection.
#[derive(Clone, Copy)]
pub enum Exchange<'a> {
    /// An authorization code from the authorize redirect.
    Code {
        /// The code.
        code: &'a str,
        /// Overrides the pool's `redirect_uri`.
        redirect_uri: Option<&'a str>,
        /// The PKCE verifier of the authorization request.
        code_verifier: Option<&'a str>,
    },
    /// A refresh token the app already holds.
    RefreshToken(&'a str),
}

/// Why a connection could not be authorized.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    /// The endpoint refused the code or refresh token.
    #[error("the token endpoint refused the grant: {error}")]
    Rejected {
        /// OAuth `error`.
        error: String,
        /// OAuth `error_description`.
        description: Option<String>,
    },
    /// The endpoint could not be reached or failed.
    #[error("{0}")]
    EndpointUnavailable(#[source] TokenError),
    /// The store could not take the connection.
    #[error("{0}")]
    Store(#[source] StoreError),
}

impl Pool {
    /// Exchanges a code or refresh token now and stores the connection
    /// (replacing one with the same id: re-authorization). The id is
    /// `id`, else the token's `sub` if it is a valid id, else random.
    /// Returns the connection and whether it was created. Runs in a task
    /// of its own: an admin client that leaves does not lose the tokens a
    /// spent code bought.
    pub async fn authorize(
        self: &Arc<Self>,
        exchange: Exchange<'_>,
        id: Option<&str>,
    ) -> Result<(ConnectionInfo, bool), AuthorizeError> {
        let (grant, code_or_rt, redirect_uri, verifier) = match exchange {
            Exchange::Code {
                code,
                redirect_uri,
                code_verifier,
            } => (
                false,
                Secret::new(code.to_owned()),
                redirect_uri
                    .or(self.config.redirect_uri.as_deref())
                    .unwrap_or("")
                    .to_owned(),
                code_verifier.map(|v| Secret::new(v.to_owned())),
            ),
            Exchange::RefreshToken(rt) => (true, Secret::new(rt.to_owned()), String::new(), None),
        };
        let (pool, id) = (Arc::clone(self), id.map(str::to_owned));
        let task = self.ledger.tasks.spawn(async move {
            pool.authorize_owned(grant, code_or_rt, (redirect_uri, verifier), id)
                .await
        });
        task.await.unwrap_or_else(|e| {
            Err(AuthorizeError::EndpointUnavailable(
                TokenError::InvalidResponse(format!("the exchange ended abnormally: {e}")),
            ))
        })
    }

    async fn authorize_owned(
        &self,
        refresh: bool,
        presented: Secret,
        (redirect_uri, verifier): (String, Option<Secret>),
        id: Option<String>,
    ) -> Result<(ConnectionInfo, bool), AuthorizeError> {
        let grant = if refresh {
            Grant::RefreshToken {
                refresh_token: presented.expose(),
            }
        } else {
            Grant::AuthorizationCode {
                code: presented.expose(),
                redirect_uri: &redirect_uri,
                code_verifier: verifier.as_ref().map(Secret::expose),
            }
        };
        let g = self.exchange(grant).await?;
        let id = match id {
            Some(id) => id,
            None => g
                .sub
                .clone()
                .filter(|s| valid_id(s))
                .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>())),
        };
        let tokens = Tokens {
            refresh_token: g
                .refresh_token
                .clone()
                .or_else(|| refresh.then_some(presented)),
            access_token: Some(g.access_token.clone()),
            access_expires_at: Some(g.expires_ms()),
        };
        let stored = self
            .store_authorized(&id, g.sub.as_deref(), &tokens)
            .await?;
        let name = &self.config.name;
        self.forget(&id);
        tracing::info!(pool = %name, connection = %id, created = stored.1, "connection authorized");
        Ok(stored)
    }

    /// Spends the code or refresh token at the endpoint, once the store
    /// has shown it can take what the grant buys.
    async fn exchange(&self, grant: Grant<'_>) -> Result<Granted, AuthorizeError> {
        // A single-use code must not be spent on a grant the store cannot keep.
        self.store
            .probe_write()
            .await
            .map_err(AuthorizeError::Store)?;
        let result = tokens::grant::request(&self.endpoint, grant).await;
        self.metrics.token_request(
            result
                .as_ref()
                .map_or_else(TokenError::outcome, |_| "success"),
        );
        match result {
            Ok(g) => Ok(g),
            Err(e @ TokenError::Rejected { .. }) if !e.is_transient() => {
                let (error, description) = e.oauth_fields();
                Err(AuthorizeError::Rejected { error, description })
            }
            Err(e) => Err(AuthorizeError::EndpointUnavailable(e)),
        }
    }

    /// Stores a just-authorized connection, trying a store that is down
    /// again for up to [`AUTHORIZE_STORE_RETRY`].
    async fn store_authorized(
        &self,
        id: &str,
        sub: Option<&str>,
        tokens: &Tokens,
    ) -> Result<(ConnectionInfo, bool), AuthorizeError> {
        let name = &self.config.name;
        let write = || self.store.authorize(name, id, sub, tokens);
        retry_while_unavailable(AUTHORIZE_STORE_RETRY, write)
            .await
            .map_err(|e| {
                tracing::error!(pool = %name, connection = %id, error = %e, "the store did not take a just-authorized connection; the user must authorize again");
                AuthorizeError::Store(e)
            })
    }
}
