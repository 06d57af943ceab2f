//! An upstream's rejection of a pool's token ([`Pool::rejected`]): a
//! `revoked_codes` answer (Flinks' 602) turns the connection
//! `needs_reauthorization` if the store still holds the refresh token
//! behind that token; otherwise the token is dropped and replaced for one
//! replay. It does not read the upstream's answer beyond its JSON `code`.

use std::sync::Arc;

use tokio::time::Instant;

use super::{last_error, Conn, Pool};
use crate::ground::lock;
use crate::store::Written;
use crate::tokens::Token;

/// What to do with an upstream answer in `reauth_on`.
pub enum Rejected {
    /// Send the request again with this token.
    Replay(Arc<Token>),
    /// Pass the answer through (consent revoked, token too young to drop,
    /// or no new token).
    PassThrough,
}

impl Pool {
    /// The upstream answered `reauth_on` to `token`. A JSON `code` in
    /// `revoked_codes` turns the connection `needs_reauthorization` (no
    /// refresh, no replay) — if the store still holds the refresh token
    /// that token came from (a re-authorization since wins); otherwise the
    /// token is dropped (unless younger than the floor) and a new one
    /// obtained for one replay.
    pub async fn rejected(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        token: &Arc<Token>,
        body: &[u8],
        deadline: Instant,
        replay: bool,
    ) -> Rejected {
        if let Some(code) = self.revoked_code(body) {
            self.consent_revoked(conn, token, &code).await;
            return Rejected::PassThrough;
        }
        let now = Instant::now();
        // A fresh replacement of a rejected token, rejected again, points
        // at a permission problem: its answer passes through.
        if !token.rejectable(now) {
            return Rejected::PassThrough;
        }
        conn.drop_token(token);
        if !replay {
            return Rejected::PassThrough;
        }
        match conn.usable(now) {
            // Another request already replaced it.
            Some(t) if !Arc::ptr_eq(&t, token) => Rejected::Replay(t),
            _ => match self.refresh_now(conn, deadline).await {
                Ok(t) => Rejected::Replay(t),
                Err(_) => Rejected::PassThrough,
            },
        }
    }

    async fn consent_revoked(&self, conn: &Conn, token: &Arc<Token>, code: &str) {
        let (pool, id) = (self.config.name.as_str(), conn.id.as_str());
        let e = last_error(
            "consent_revoked".into(),
            Some(format!(
                "the API answered code {code}: the user's consent is revoked or expired"
            )),
        );
        let seen = {
            let held = lock(&conn.version);
            match &held.0 {
                Some(t) if Arc::ptr_eq(t, token) => Some(held.1.clone()),
                _ => None,
            }
        };
        let Some(seen) = seen else {
            // The connection holds another token by now (a refresh, or a
            // re-authorization): this answer is about the old one. Passed
            // through; a request with the current token tells.
            tracing::info!(pool, connection = id, code, "consent revoked for a token replaced since: passed through, the connection is left as it is");
            return;
        };
        match self
            .store
            .mark_needs_reauthorization(pool, id, &seen, &e)
            .await
        {
            Ok(Written::Superseded(_)) => {
                tracing::info!(pool, connection = id, code, "consent revoked for tokens replaced since (the user authorized again): ignored");
                return;
            }
            Ok(Written::Gone) => {
                conn.revoke(false);
                self.forget_local(id);
                return;
            }
            Ok(Written::Done(_)) => {
                tracing::info!(
                    pool,
                    connection = id,
                    code,
                    "consent revoked: the connection needs reauthorization"
                );
            }
            Err(err) => {
                tracing::warn!(pool, connection = id, code, error = %err, "consent revoked, but the store cannot record it; this process stops using the connection");
            }
        }
        conn.revoke(true);
        conn.rejected.store(None);
        self.recount.notify_one();
    }

    /// The `code` of a JSON error body when it is one of `revoked_codes`.
    fn revoked_code(&self, body: &[u8]) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let code = match v.get("code")? {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return None,
        };
        self.config.revoked_codes.contains(&code).then_some(code)
    }
}
