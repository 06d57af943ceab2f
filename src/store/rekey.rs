//! Rekeying (`flinks-proxy store rekey`): re-sealing every token, and the
//! canary, under the current key once a new one is configured (the old
//! one moved to `store.old_keys`).
//!
//! Each row is rewritten only if it still holds the sealed values read, so
//! a rekey racing a live fleet's refreshes never puts back a rotated-away
//! token. Opening and sealing are `sealing.rs`'s.

use super::sealing::{CANARY, CANARY_PLAINTEXT};
use super::{backend, Backend, SealedRow, Store, StoreError, CONDITIONAL_TRIES};
use crate::ground::crypto::Sealer;

/// What [`Store::rekey`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rekeyed {
    /// Rows re-sealed under the current key.
    pub resealed: u64,
    /// Rows already under the current key.
    pub current: u64,
    /// Rows that changed between reading and rewriting (read again).
    pub raced: u64,
}

impl Store {
    /// Re-seals every token not yet under the current key, and the canary.
    /// Each row is rewritten only if it still holds the sealed values read
    /// (a refresh that committed meanwhile wins; the row is read again), so
    /// a rekey on a live fleet never puts back a rotated-away token.
    pub async fn rekey(&self) -> Result<Rekeyed, StoreError> {
        self.timed("rekey", async {
            let canary = self.seal(CANARY, CANARY_PLAINTEXT)?;
            let mut report = Rekeyed::default();
            let mut after: Option<(String, String)> = None;
            loop {
                let page = backend!(self.page_all(after.as_ref(), 500))?;
                let Some(last) = page.last() else { break };
                after = Some((last.info.pool.clone(), last.info.id.clone()));
                for row in page {
                    self.rekey_row(row, &mut report).await?;
                }
            }
            backend!(self.put_meta("canary", &canary))?;
            Ok(report)
        })
        .await
    }

    pub(super) async fn rekey_row(
        &self,
        mut row: SealedRow,
        report: &mut Rekeyed,
    ) -> Result<(), StoreError> {
        let current = self.sealer.current_id();
        let is_current = |s: &Option<String>| {
            s.as_deref()
                .is_none_or(|s| Sealer::key_id_of(s) == Some(current))
        };
        for _ in 0..CONDITIONAL_TRIES {
            if is_current(&row.refresh_token) && is_current(&row.access_token) {
                report.current += 1;
                return Ok(());
            }
            let (pool, id) = (row.info.pool.clone(), row.info.id.clone());
            let (rt, at) = (row.refresh_token.clone(), row.access_token.clone());
            let record = self.open_row(row)?;
            let sealed = self.seal_tokens(&pool, &id, &record.tokens)?;
            if backend!(self.rewrite_tokens(&pool, &id, rt.as_deref(), at.as_deref(), &sealed))? {
                report.resealed += 1;
                return Ok(());
            }
            report.raced += 1;
            match backend!(self.get(&pool, &id))? {
                Some(r) => row = r,
                None => return Ok(()),
            }
        }
        Err(StoreError::Contended {
            pool: row.info.pool,
            id: row.info.id,
        })
    }
}
