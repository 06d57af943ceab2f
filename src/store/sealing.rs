//! Sealing and opening a connection's tokens under the store's keys, and
//! the key canary that proves the configured key is this store's.
//!
//! The keys and the cipher are `ground::crypto`'s; this file decides what
//! each value is sealed to (its [`Place`]: pool, id and field, so a
//! ciphertext copied to another row or field does not open) and what a
//! failure to open says. It chooses no rows and writes none but the
//! canary (re-sealing every row is `rekey.rs`).

use super::{backend, Access, Backend, Record, SealedRow, SealedTokens, Store, StoreError};
use super::{Tokens, Version};
use crate::config::StoreConfig;
use crate::ground::crypto::{Key, Place, Sealer};
use crate::ground::secret::Secret;

/// What the canary row holds, sealed; opening it proves the key matches.
pub(super) const CANARY_PLAINTEXT: &[u8] = b"flinks-proxy store canary";
/// The canary's place: no pool or connection may be named this (pool names
/// and ids cannot contain `/`).
pub(super) const CANARY: Place<'static> = Place {
    pool: "/",
    id: "/",
    field: "canary",
};

/// The keys of a `[store]` table.
pub fn sealer(config: &StoreConfig) -> Result<Sealer, String> {
    let current = Key::from_base64(config.key.expose()).map_err(|m| format!("store.key: {m}"))?;
    let mut old = Vec::new();
    for (i, k) in config.old_keys.iter().enumerate() {
        old.push(Key::from_base64(k.expose()).map_err(|m| format!("store.old_keys[{i}]: {m}"))?);
    }
    Ok(Sealer::new(current, old))
}

impl Store {
    /// Opens the canary (sealing it first in a new store): the configured
    /// keys must be this store's.
    pub(super) async fn check_canary(&self) -> Result<(), StoreError> {
        let sealed = match backend!(self.get_meta("canary"))? {
            Some(sealed) => sealed,
            None if self.access == Access::ReadOnly => {
                return Err(StoreError::NotAStore(
                    "the store has never been opened by a proxy (no key canary yet)".into(),
                ))
            }
            None => {
                // Two replicas creating the store together: the first wins.
                let sealed = self.seal(CANARY, CANARY_PLAINTEXT)?;
                backend!(self.put_meta_if_absent("canary", &sealed))?;
                backend!(self.get_meta("canary"))?.unwrap_or(sealed)
            }
        };
        match self.sealer.open(CANARY, &sealed) {
            Ok(v) if v == CANARY_PLAINTEXT => Ok(()),
            _ => Err(StoreError::KeyMismatch {
                found: Sealer::key_id_of(&sealed).unwrap_or("?").to_owned(),
                known: self.sealer.known_ids().join(", "),
            }),
        }
    }

    /// Seals the canary's plaintext to its place.
    pub(super) fn seal(&self, place: Place<'_>, plaintext: &[u8]) -> Result<String, StoreError> {
        self.sealer
            .seal(place, plaintext)
            .map_err(|source| StoreError::Crypto {
                pool: place.pool.to_owned(),
                id: place.id.to_owned(),
                field: "canary",
                source,
            })
    }

    /// Seals a row's tokens, each to its own field of `pool/id`.
    pub(super) fn seal_tokens(
        &self,
        pool: &str,
        id: &str,
        tokens: &Tokens,
    ) -> Result<SealedTokens, StoreError> {
        let seal = |field: &'static str, s: &Option<Secret>| {
            s.as_ref()
                .map(|s| {
                    self.sealer
                        .seal(Place { pool, id, field }, s.expose().as_bytes())
                        .map_err(|source| StoreError::Crypto {
                            pool: pool.to_owned(),
                            id: id.to_owned(),
                            field,
                            source,
                        })
                })
                .transpose()
        };
        Ok(SealedTokens {
            refresh_token: seal("refresh_token", &tokens.refresh_token)?,
            access_token: seal("access_token", &tokens.access_token)?,
            access_expires_at: tokens.access_expires_at,
        })
    }

    /// Opens a row's tokens; its [`Version`] remembers the sealed refresh
    /// token a conditional write expects.
    pub(super) fn open_row(&self, row: SealedRow) -> Result<Record, StoreError> {
        let (pool, id) = (row.info.pool.as_str(), row.info.id.as_str());
        let open = |field: &'static str, s: &Option<String>| {
            s.as_deref()
                .map(|s| {
                    self.sealer
                        .open_secret(Place { pool, id, field }, s)
                        .map_err(|source| StoreError::Crypto {
                            pool: pool.to_owned(),
                            id: id.to_owned(),
                            field,
                            source,
                        })
                })
                .transpose()
        };
        let tokens = Tokens {
            refresh_token: open("refresh_token", &row.refresh_token)?,
            access_token: open("access_token", &row.access_token)?,
            access_expires_at: row.info.access_token_expires_at,
        };
        let version = Version {
            sealed: row.refresh_token,
            refresh_digest: tokens.refresh_token.as_ref().map(Version::digest),
        };
        Ok(Record {
            info: row.info,
            tokens,
            version,
        })
    }
}
