//! The refresh token of one `refresh_token` / `authorization_code`
//! credential, shared by every config generation that serves it: the
//! current refresh token (memory wins over the file, which may lag after a
//! failed write), the "refresh in progress" lock that makes token requests
//! on it one at a time, and committing a rotated token to the state file.
//!
//! A reload that changes a credential builds a new
//! [`crate::tokens::TokenSource`]; when it keys the same state (same
//! `state_file`, or same credential name without one) and descends from
//! the same configured secret, it shares this state with the old source,
//! so a refresh token the old task rotated is never lost or presented
//! twice. This module does not make token requests.
//!
//! Where the tokens persist is a [`Persistence`]: the state file (this
//! process alone), or the `[store]` ([`super::shared`]) when several
//! replicas share the credential.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use super::grant::{Granted, TokenError};
use super::shared::StoreSlot;
use super::state;
use crate::config::{CredentialConfig, GrantType};
use crate::ground::secret::Secret;
use crate::store::Store;

/// Where a credential's tokens persist.
#[derive(Debug)]
pub enum Persistence {
    /// In memory and the `state_file` (if any): this process alone.
    StateFile,
    /// In the store, shared by every replica under its lease.
    Store(StoreSlot),
}

/// What identifies a credential's refresh-token state across reloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateKey {
    /// The `state_file` path (config validation keeps it unique).
    File(PathBuf),
    /// The credential name, when it has no state file.
    Credential(String),
}

impl StateKey {
    /// The key of `c`.
    pub fn of(c: &CredentialConfig) -> StateKey {
        match &c.state_file {
            Some(p) => StateKey::File(p.clone()),
            None => StateKey::Credential(c.name.clone()),
        }
    }
}

struct Lineage {
    refresh_token: Option<Secret>,
    sub: Option<String>,
    /// Unix time the refresh token was obtained.
    obtained_at: u64,
}

/// The configured secret `c`'s refresh tokens descend from: its
/// `refresh_token` or `code`, none for `client_credentials`.
fn configured_secret(c: &CredentialConfig) -> Option<&Secret> {
    match c.grant_type {
        GrantType::ClientCredentials => None,
        GrantType::RefreshToken => c.refresh_token.as_ref(),
        GrantType::AuthorizationCode => c.code.as_ref(),
    }
}

impl Lineage {
    /// The lineage of a state-file credential: its state file's, when it
    /// has a file and a configured secret (`configured`) and the file
    /// descends from that secret (`origin`, its fingerprint); else the
    /// configured `refresh_token` (none for a `code`), logged when the
    /// configured secret changed since the file was written.
    fn load(
        c: &CredentialConfig,
        configured: Option<&Secret>,
        origin: &str,
    ) -> Result<Lineage, String> {
        let mut lineage = Lineage {
            refresh_token: match c.grant_type {
                GrantType::RefreshToken => c.refresh_token.clone(),
                _ => None,
            },
            sub: None,
            obtained_at: state::unix_now(),
        };
        if let (Some(path), Some(_)) = (&c.state_file, configured) {
            if let Some(st) = state::load(path)? {
                if st.origin == origin {
                    lineage = Lineage {
                        refresh_token: Some(Secret::new(st.refresh_token)),
                        sub: st.sub,
                        obtained_at: st.obtained_at,
                    };
                } else {
                    tracing::info!(
                        credential = %c.name,
                        "configured {} changed since the state file was written; using the new one",
                        if c.grant_type == GrantType::AuthorizationCode { "code" } else { "refresh_token" }
                    );
                }
            }
        }
        Ok(lineage)
    }
}

/// One credential's refresh token and the lock of its token requests.
pub struct RefreshState {
    key: StateKey,
    /// Fingerprint of the configured `code` / `refresh_token` it descends from.
    origin: String,
    lineage: Mutex<Lineage>,
    in_progress: tokio::sync::Mutex<()>,
    persistence: Persistence,
}

impl RefreshState {
    /// The state of `c`: `previous` when it keys the same state and
    /// descends from the same configured secret, else read from the
    /// config and the state file (a blocking read: call it off runtime
    /// threads). Fails on an unreadable or corrupt state file.
    pub fn inherit_or_load(
        c: &CredentialConfig,
        previous: Option<&Arc<RefreshState>>,
        store: Option<&Arc<Store>>,
    ) -> Result<Arc<RefreshState>, String> {
        if c.in_store {
            let store = store.ok_or("keeps its tokens in the store, which is not open")?;
            return Ok(RefreshState::in_store(c, store));
        }
        let configured = configured_secret(c);
        let origin = configured.map(state::fingerprint).unwrap_or_default();
        let key = StateKey::of(c);
        let same = |p: &&Arc<RefreshState>| {
            p.key == key && p.origin == origin && matches!(p.persistence, Persistence::StateFile)
        };
        if let Some(p) = previous.filter(same) {
            return Ok(Arc::clone(p));
        }
        let lineage = Lineage::load(c, configured, &origin)?;
        Ok(Arc::new(RefreshState {
            key,
            origin,
            lineage: Mutex::new(lineage),
            in_progress: tokio::sync::Mutex::new(()),
            persistence: Persistence::StateFile,
        }))
    }

    /// The state of a credential that keeps its tokens in `store`: nothing
    /// in memory yet, the store's slot for `c` to read and commit them.
    fn in_store(c: &CredentialConfig, store: &Arc<Store>) -> Arc<RefreshState> {
        Arc::new(RefreshState {
            key: StateKey::of(c),
            origin: String::new(),
            lineage: Mutex::new(Lineage {
                refresh_token: None,
                sub: None,
                obtained_at: state::unix_now(),
            }),
            in_progress: tokio::sync::Mutex::new(()),
            persistence: Persistence::Store(StoreSlot::new(Arc::clone(store), c)),
        })
    }

    /// Where its tokens persist.
    pub fn persistence(&self) -> &Persistence {
        &self.persistence
    }

    /// The key.
    pub fn key(&self) -> &StateKey {
        &self.key
    }

    fn lineage(&self) -> MutexGuard<'_, Lineage> {
        crate::ground::lock(&self.lineage)
    }

    /// The refresh token to present next.
    pub fn refresh_token(&self) -> Option<Secret> {
        self.lineage().refresh_token.clone()
    }

    /// The last `sub` seen.
    pub fn sub(&self) -> Option<String> {
        self.lineage().sub.clone()
    }

    /// Held for a token request and its commit: requests on one refresh
    /// token are one at a time, across config generations.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.in_progress.lock().await
    }

    /// Commits the refresh token of `granted` (a new one from a code
    /// exchange or a server that rotates; else the one presented, `using`)
    /// before its access token is used: in memory at once (the server may
    /// already have retired the old one), then in the state file off the
    /// runtime threads. A failed write is an error (the access token is
    /// not used; the retry rotates and writes again).
    pub async fn commit(
        &self,
        c: &CredentialConfig,
        granted: &Granted,
        using: Option<&Secret>,
    ) -> Result<(), TokenError> {
        let new_refresh = granted.refresh_token.as_ref();
        let rotated = match (new_refresh, using) {
            (Some(n), Some(old)) => n.expose() != old.expose(),
            (Some(_), None) => true,
            (None, _) => false,
        };
        let Some(rt) = new_refresh.or(using) else {
            return Ok(());
        };
        let now = state::unix_now();
        let st = {
            let mut l = self.lineage();
            if rotated {
                l.refresh_token = Some(rt.clone());
                l.obtained_at = now;
            }
            if granted.sub.is_some() {
                l.sub.clone_from(&granted.sub);
            }
            state::State {
                refresh_token: rt.expose().to_owned(),
                sub: l.sub.clone(),
                obtained_at: l.obtained_at,
                last_used_at: Some(now),
                origin: self.origin.clone(),
            }
        };
        if rotated && c.state_file.is_none() && c.grant_type == GrantType::RefreshToken {
            tracing::warn!(
                credential = %c.name,
                "the token endpoint rotated the refresh token and no state_file is set: \
                 a restart will use the configured one, which the server no longer accepts"
            );
        }
        let Some(path) = c.state_file.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || state::store(&path, &st))
            .await
            .map_err(|e| TokenError::Persist(format!("the write task failed: {e}")))?
            .map_err(TokenError::Persist)
    }
}
