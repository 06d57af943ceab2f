//! A credential's tokens kept in the `[store]` instead of a state file, so
//! several replicas share one credential: one row per credential, in a
//! reserved pool `credential:NAME` (`:` never appears in a pool name), keyed
//! by a keyed fingerprint (HMAC under the store key) of the configured code
//! or refresh token (an operator who configures a new one starts a new row),
//! sealed like connections. A row named under an old key, or by the
//! unkeyed fingerprint of earlier versions, is renamed on first use.
//!
//! A token request takes the row's lease ([`Store::lease`]): a replica that
//! finds a fresh token another one committed uses it; otherwise it calls
//! the endpoint and commits both tokens before using them. A replica that
//! finds the lease taken waits for the holder's commit (bounded by the
//! lease). This module does not schedule refreshes (see `token.rs`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::grant::{self, Endpoint, Grant, TokenError};
use super::{state, stored_token, Token};
use crate::config::{CredentialConfig, GrantType};
use crate::store::{
    Lease, Record, Store, StoreError, Tokens, Version, Written, CREDENTIAL_POOL_PREFIX,
};

/// A lease outlives the token request it covers by this much.
const LEASE_SLACK: Duration = Duration::from_secs(5);
/// First wait for another replica's commit; doubles up to [`POLL_MAX`].
const POLL: Duration = Duration::from_millis(25);
const POLL_MAX: Duration = Duration::from_millis(400);

/// Where one credential's tokens live in the store.
pub struct StoreSlot {
    store: Arc<Store>,
    pool: String,
    id: String,
    /// Names the row may have from before (an old key's fingerprint, the
    /// unkeyed one of earlier versions).
    old_ids: Vec<String>,
    /// Tokens a request obtained that the store did not take (it was
    /// down), with the refresh token they replace: a rotated refresh token
    /// must not be lost, so they are committed first at the next attempt.
    uncommitted: std::sync::Mutex<Option<(Tokens, Version)>>,
}

impl std::fmt::Debug for StoreSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSlot")
            .field("pool", &self.pool)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn store_err(e: StoreError) -> TokenError {
    TokenError::Store(Arc::new(e))
}

impl StoreSlot {
    /// The slot of credential `c` in `store`.
    pub fn new(store: Arc<Store>, c: &CredentialConfig) -> StoreSlot {
        let configured = match c.grant_type {
            GrantType::ClientCredentials => None,
            GrantType::RefreshToken => c.refresh_token.as_ref(),
            GrantType::AuthorizationCode => c.code.as_ref(),
        };
        let (id, old_ids) = match configured {
            None => ("client_credentials".to_owned(), Vec::new()),
            Some(secret) => {
                let mut names = store.fingerprints(secret).into_iter();
                let id = names.next().unwrap_or_else(|| state::fingerprint(secret));
                let mut old: Vec<String> = names.collect();
                old.push(state::fingerprint(secret));
                (id, old)
            }
        };
        StoreSlot {
            store,
            pool: format!("{CREDENTIAL_POOL_PREFIX}{}", c.name),
            id,
            old_ids,
            uncommitted: std::sync::Mutex::new(None),
        }
    }

    /// A token for `c`: one another replica committed if fresh, else one
    /// token request under the lease, committed before it is returned.
    pub async fn fetch(
        &self,
        c: &CredentialConfig,
        endpoint: &Endpoint,
    ) -> Result<Token, TokenError> {
        let record = self.take_lease(c).await?;
        let Some(mut record) = record else {
            // Another replica committed a fresh token while we waited.
            return self.adopted(c).await;
        };
        let pending = self.pending().clone();
        if let Some((tokens, seen)) = pending {
            // Committing frees the lease: take it again over the new row.
            self.commit(&tokens, &seen).await?;
            match self.take_lease(c).await? {
                Some(r) => record = r,
                None => return self.adopted(c).await,
            }
        }
        if let Some(t) = fresh(&record, c) {
            self.store
                .release(&self.pool, &self.id)
                .await
                .map_err(store_err)?;
            return Ok(t);
        }
        let result = self.request(c, endpoint, &record).await;
        if result.is_err() {
            if let Err(e) = self.store.release(&self.pool, &self.id).await {
                tracing::debug!(credential = %c.name, error = %e, "cannot free the lease; it expires by itself");
            }
        }
        result
    }

    /// Takes the lease (seeding the row on first use); `None` when another
    /// holder committed a fresh token meanwhile.
    async fn take_lease(&self, c: &CredentialConfig) -> Result<Option<Record>, TokenError> {
        let ttl = c.token_timeout + LEASE_SLACK;
        let deadline = Instant::now() + ttl + LEASE_SLACK;
        let mut poll = POLL;
        loop {
            match self
                .store
                .lease(&self.pool, &self.id, ttl)
                .await
                .map_err(store_err)?
            {
                Lease::Taken(r) | Lease::TakenOver(r) => return Ok(Some(r)),
                Lease::Busy(r) if fresh(&r, c).is_some() => return Ok(None),
                Lease::Busy(_) if Instant::now() >= deadline => {
                    return Err(TokenError::State(
                        "another replica holds this credential's lease past its expiry".into(),
                    ))
                }
                Lease::Busy(_) => {
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(POLL_MAX);
                }
                Lease::Gone if self.rename_old_row().await? => {}
                Lease::Gone => {
                    let seed = Tokens {
                        refresh_token: match c.grant_type {
                            GrantType::RefreshToken => c.refresh_token.clone(),
                            _ => None,
                        },
                        ..Tokens::default()
                    };
                    self.store
                        .seed(&self.pool, &self.id, &seed)
                        .await
                        .map_err(store_err)?;
                }
            }
        }
    }

    /// Finds the row under one of its older names and renames it.
    async fn rename_old_row(&self) -> Result<bool, TokenError> {
        for old in &self.old_ids {
            if self
                .store
                .rename(&self.pool, old, &self.id)
                .await
                .map_err(store_err)?
            {
                tracing::info!(pool = %self.pool, "the credential's stored tokens were renamed to their keyed fingerprint");
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn adopted(&self, c: &CredentialConfig) -> Result<Token, TokenError> {
        let record = self
            .store
            .get(&self.pool, &self.id)
            .await
            .map_err(store_err)?;
        record
            .as_ref()
            .and_then(|r| fresh(r, c))
            .ok_or_else(|| TokenError::State("the shared token vanished from the store".into()))
    }

    /// One token request with the stored refresh token (or the code, or the
    /// client credentials), both tokens committed before returning.
    async fn request(
        &self,
        c: &CredentialConfig,
        endpoint: &Endpoint,
        record: &Record,
    ) -> Result<Token, TokenError> {
        let using = record.tokens.refresh_token.clone();
        let grant = match (c.grant_type, &using) {
            (GrantType::ClientCredentials, _) => Grant::ClientCredentials,
            (_, Some(rt)) => Grant::RefreshToken {
                refresh_token: rt.expose(),
            },
            (GrantType::AuthorizationCode, None) => Grant::AuthorizationCode {
                code: c.code.as_ref().map_or("", |s| s.expose()),
                redirect_uri: c.redirect_uri.as_deref().unwrap_or(""),
                code_verifier: None,
            },
            (GrantType::RefreshToken, None) => {
                return Err(TokenError::State(
                    "the store holds no refresh token for this credential".into(),
                ))
            }
        };
        let g = grant::request(endpoint, grant).await?;
        let token = Token::from_granted(&g, c.refresh_before);
        let tokens = Tokens {
            refresh_token: g.refresh_token.clone().or(using),
            access_token: token.as_ref().ok().map(|_| g.access_token.clone()),
            access_expires_at: token.as_ref().ok().map(|_| g.expires_ms()),
        };
        // A rotated refresh token is committed even when the access token
        // is unusable.
        self.commit(&tokens, &record.version).await?;
        token
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<(Tokens, Version)>> {
        crate::ground::lock(&self.uncommitted)
    }

    /// Commits, conditional on the row still holding the refresh token
    /// sent; a store failure keeps the tokens for the next attempt.
    async fn commit(&self, tokens: &Tokens, seen: &Version) -> Result<(), TokenError> {
        match self
            .store
            .commit_refresh(&self.pool, &self.id, seen, tokens)
            .await
        {
            Ok(Written::Done(_)) => {
                *self.pending() = None;
                Ok(())
            }
            Ok(Written::Superseded(_)) => {
                // Another replica committed newer tokens: the store keeps
                // theirs; the access token just obtained is still good.
                *self.pending() = None;
                tracing::debug!(pool = %self.pool, "another replica committed newer tokens for this credential");
                let _ = self.store.release(&self.pool, &self.id).await;
                Ok(())
            }
            Ok(Written::Gone) => {
                *self.pending() = None;
                Err(TokenError::State(
                    "the credential's row vanished from the store; the next attempt starts it again".into(),
                ))
            }
            Err(e) => {
                *self.pending() = Some((tokens.clone(), seen.clone()));
                Err(store_err(e))
            }
        }
    }
}

/// The stored access token when it is usable and not yet due for renewal.
fn fresh(record: &Record, c: &CredentialConfig) -> Option<Token> {
    let t = stored_token(record, c.refresh_before, c.dpop_key.is_some())?;
    let now = Instant::now();
    (t.is_usable(now) && now < t.refresh_at).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::ground::metrics::Metrics;
    use crate::ground::secret::Secret;

    #[tokio::test]
    async fn a_row_named_by_the_old_unkeyed_fingerprint_is_renamed_not_replaced() {
        // Earlier versions named the row by an unsalted FNV-1a hash of the
        // configured refresh token. The row holds the rotated token now:
        // starting a new row from the configured (long rotated away) one
        // would lose the credential.
        let dir = std::env::temp_dir().join(format!("flinks-slot-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = crate::ground::crypto::generate_key().unwrap();
        let toml = format!(
            r#"
[store]
url = "sqlite:{db}"
key = "{key}"
[credentials.c]
token_url = "http://127.0.0.1:9/token"
client_id = "id"
client_secret = "s"
grant_type = "refresh_token"
refresh_token = "rt-configured"
"#,
            db = dir.join("c.db").display()
        );
        let config = Config::parse(&toml, &dir.join("proxy.toml")).unwrap();
        let store = Arc::new(
            Store::open(config.store.as_ref().unwrap(), Metrics::new().store())
                .await
                .unwrap(),
        );
        let c = config.credentials.get("c").unwrap();
        let legacy = state::fingerprint(c.refresh_token.as_ref().unwrap());
        let pool = format!("{CREDENTIAL_POOL_PREFIX}c");
        let rotated = Tokens {
            refresh_token: Some(Secret::new("rt-rotated".to_owned())),
            access_token: Some(Secret::new("at-stored".to_owned())),
            access_expires_at: Some(crate::ground::now_ms() + 3_600_000),
        };
        store.seed(&pool, &legacy, &rotated).await.unwrap();
        let slot = StoreSlot::new(Arc::clone(&store), c);
        assert_ne!(slot.id, legacy, "keyed now");
        assert!(!slot.id.contains("rt-configured"));
        let endpoint = Endpoint::from_credential(c).unwrap();
        let token = slot.fetch(c, &endpoint).await.expect("the stored token");
        assert_eq!(token.expose(), "at-stored");
        let row = store.get(&pool, &slot.id).await.unwrap().expect("renamed");
        assert_eq!(row.tokens.refresh_token.unwrap().expose(), "rt-rotated");
        assert!(store.get(&pool, &legacy).await.unwrap().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
