//! Deleting a connection ([`Pool::delete_revoking`]): with a pool
//! `revoke_url`, its refresh token is revoked at the provider (RFC 7009)
//! first; the erase happens whether revocation worked or not (CONNECT.md,
//! "letting go"). Runs in a task of its own, so an admin client that
//! leaves does not stop it between the two steps.

use std::sync::Arc;

use super::Pool;
use crate::store::StoreError;
use crate::tokens::grant;

/// What a delete did.
#[derive(Debug)]
pub struct Deleted {
    /// Whether the connection existed.
    pub existed: bool,
    /// With `revoke_url`: `Ok` when the provider took the revocation, else
    /// why not (never the token). `None` without `revoke_url`.
    pub revoked: Option<Result<(), String>>,
}

impl Pool {
    /// Revokes the connection's refresh token (with `revoke_url`), then
    /// deletes the connection and forgets it.
    pub async fn delete_revoking(self: &Arc<Self>, id: &str) -> Result<Deleted, StoreError> {
        let (pool, id) = (Arc::clone(self), id.to_owned());
        let task = self
            .ledger
            .tasks
            .spawn(async move { pool.delete_owned(&id).await });
        task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "a connection delete ended abnormally");
            Ok(Deleted {
                existed: false,
                revoked: Some(Err("the delete ended abnormally".into())),
            })
        })
    }

    async fn delete_owned(&self, id: &str) -> Result<Deleted, StoreError> {
        let name = &self.config.name;
        let revoked = match &self.config.revoke_url {
            None => None,
            Some(url) => Some(self.revoke_at(url, id).await?),
        };
        let existed = self.store.delete(name, id).await?;
        if existed {
            self.forget(id);
            let ok = revoked.as_ref().map(Result::is_ok);
            tracing::info!(pool = %name, connection = id, revoked = ?ok, "connection deleted");
        }
        Ok(Deleted { existed, revoked })
    }

    /// Revokes the stored refresh token at `url`; the error text for the
    /// answer (a connection without a refresh token counts as not revoked).
    async fn revoke_at(&self, url: &http::Uri, id: &str) -> Result<Result<(), String>, StoreError> {
        let Some(record) = self.store.get(&self.config.name, id).await? else {
            return Ok(Ok(()));
        };
        let Some(rt) = &record.tokens.refresh_token else {
            return Ok(Err("the connection has no refresh token".into()));
        };
        let r = grant::revoke(&self.endpoint, url, rt.expose()).await;
        if let Err(e) = &r {
            tracing::warn!(pool = %self.config.name, connection = id, error = %e, "revocation failed; the connection is deleted anyway");
        }
        Ok(r.map_err(|e| e.to_string()))
    }
}
