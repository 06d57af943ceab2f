//! Connect sessions in the store (CONNECT.md, "Connect sessions"): the
//! rows behind connect links, shared by replicas so that any of them
//! serves any step, and the conditional writes that make each step happen
//! once fleet-wide: a link is opened by one browser, a `state` is spent
//! once, a session finishes once.
//!
//! Secrets are never kept in clear: the link's token, the `state` and the
//! browser cookie arrive here as SHA-256 hashes (see [`secret_hash`]), the
//! PKCE verifier is sealed like tokens. The SQL is the same for both
//! backends (`?` placeholders, numbered for PostgreSQL).
//!
//! What a session means to a browser or an app is `connections/connect.rs`'s.

use serde::Serialize;

use super::sql::run;
use super::{unavailable, Backend, Store, StoreError};
use crate::ground::crypto::Place;
use crate::ground::now_ms;
use crate::ground::secret::Secret;

/// Where a session stands, as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Waiting for the browser.
    Pending,
    /// The connection was created or re-authorized.
    Connected,
    /// The user denied, the provider answered an error, or the exchange
    /// failed.
    Failed,
    /// Not finished within its lifetime.
    Expired,
}

impl SessionStatus {
    /// The stored and JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Pending => "pending",
            SessionStatus::Connected => "connected",
            SessionStatus::Failed => "failed",
            SessionStatus::Expired => "expired",
        }
    }

    fn parse(s: &str) -> Option<SessionStatus> {
        Some(match s {
            "pending" => SessionStatus::Pending,
            "connected" => SessionStatus::Connected,
            "failed" => SessionStatus::Failed,
            "expired" => SessionStatus::Expired,
            _ => return None,
        })
    }
}

/// How far a pending session's browser got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionPhase {
    /// The link was not opened yet.
    New,
    /// The browser was sent to the authorization server.
    Opened,
    /// The callback spent the `state`; the code is being exchanged.
    Exchanging,
}

impl SessionPhase {
    fn parse(s: &str) -> Option<SessionPhase> {
        Some(match s {
            "new" => SessionPhase::New,
            "opened" => SessionPhase::Opened,
            "exchanging" => SessionPhase::Exchanging,
            _ => return None,
        })
    }
}

/// A session as the store holds it, its verifier opened.
#[derive(Debug, Clone)]
pub struct Session {
    /// Its id (not a secret: the app and the redirect see it).
    pub id: String,
    /// Its pool.
    pub pool: String,
    /// Where it stands.
    pub status: SessionStatus,
    /// How far the browser got.
    pub phase: SessionPhase,
    /// The connection to create or re-authorize (or the one created).
    pub connection_id: Option<String>,
    /// Where the browser goes at the end.
    pub redirect_to: Option<String>,
    /// The session's own authorize parameters.
    pub authorize_params: Vec<(String, String)>,
    /// SHA-256 of the cookie of the browser that opened the link.
    pub browser_hash: Option<String>,
    /// The PKCE verifier, opened.
    pub code_verifier: Option<Secret>,
    /// OAuth `error` when failed.
    pub error: Option<String>,
    /// OAuth `error_description` when failed.
    pub error_description: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub expires_at: i64,
    /// Unix milliseconds.
    pub finished_at: Option<i64>,
}

impl Session {
    /// The admin API's JSON (no secret: the link is shown only when made).
    pub fn to_json(&self, now: i64) -> serde_json::Value {
        let error = self
            .error
            .as_ref()
            .map(|e| serde_json::json!({"error": e, "description": self.error_description}));
        serde_json::json!({
            "session_id": self.id,
            "pool": self.pool,
            "state": self.status_at(now).as_str(),
            "connection_id": self.connection_id,
            "redirect_to": self.redirect_to,
            "error": error,
            "created_at": super::rfc3339(self.created_at),
            "expires_at": super::rfc3339(self.expires_at),
            "finished_at": self.finished_at.map(super::rfc3339),
        })
    }

    /// The status as of `now`: a pending session past its lifetime is
    /// expired even before a sweep writes so.
    pub fn status_at(&self, now: i64) -> SessionStatus {
        if self.status == SessionStatus::Pending && self.expires_at <= now {
            SessionStatus::Expired
        } else {
            self.status
        }
    }
}

/// A session to create.
#[derive(Debug)]
pub struct NewSession<'a> {
    /// Its id.
    pub id: &'a str,
    /// Its pool.
    pub pool: &'a str,
    /// SHA-256 of the link's token.
    pub token_hash: &'a str,
    /// The connection to create or re-authorize.
    pub connection_id: Option<&'a str>,
    /// Where the browser goes at the end.
    pub redirect_to: Option<&'a str>,
    /// Its own authorize parameters.
    pub authorize_params: &'a [(String, String)],
    /// Unix milliseconds.
    pub expires_at: i64,
}

/// How a session ends.
#[derive(Debug)]
pub struct SessionEnd<'a> {
    /// `connected` or `failed`.
    pub status: SessionStatus,
    /// The connection created or re-authorized.
    pub connection_id: Option<&'a str>,
    /// OAuth `error` (failed).
    pub error: Option<&'a str>,
    /// OAuth `error_description` (failed).
    pub description: Option<&'a str>,
}

/// SHA-256 hex of a high-entropy secret (a link token, a `state`, a
/// cookie): what the store keeps to find it by. 256 random bits cannot be
/// recovered from their hash, and the hash survives key rotation.
pub fn secret_hash(secret: &str) -> String {
    crate::ground::crypto::hex(
        ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref(),
    )
}

const COLUMNS: &str = "id, pool, status, phase, connection_id, redirect_to, authorize_params, \
     browser_hash, code_verifier, error, error_description, created_at, expires_at, finished_at";

/// A session row as both backends read it.
#[derive(sqlx::FromRow)]
struct SessionRow {
    id: String,
    pool: String,
    status: String,
    phase: String,
    connection_id: Option<String>,
    redirect_to: Option<String>,
    authorize_params: String,
    browser_hash: Option<String>,
    code_verifier: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    created_at: i64,
    expires_at: i64,
    finished_at: Option<i64>,
}

impl Store {
    /// Creates a pending session.
    pub async fn create_session(&self, s: &NewSession<'_>) -> Result<(), StoreError> {
        let params = serde_json::to_string(&s.authorize_params.iter().collect::<Vec<_>>())
            .unwrap_or_else(|_| "[]".into());
        self.timed("session_create", async {
            let sql = "INSERT INTO connect_sessions (id, pool, token_hash, status, phase, \
                 connection_id, redirect_to, authorize_params, created_at, expires_at) \
                 VALUES (?, ?, ?, 'pending', 'new', ?, ?, ?, ?, ?)";
            run!(exec self, "session_create", sql, [
                s.id, s.pool, s.token_hash, s.connection_id, s.redirect_to, &params, now_ms(), s.expires_at
            ])
            .map(drop)
        })
        .await
    }

    /// One session of `pool`, by id.
    pub async fn session(&self, pool: &str, id: &str) -> Result<Option<Session>, StoreError> {
        self.timed("session_get", async {
            let sql = format!("SELECT {COLUMNS} FROM connect_sessions WHERE pool = ? AND id = ?");
            let rows = run!(rows SessionRow, self, "session_get", sql, [pool, id])?;
            self.first_session(rows)
        })
        .await
    }

    /// The session a link's token hash names.
    pub async fn session_by_token(&self, token_hash: &str) -> Result<Option<Session>, StoreError> {
        self.timed("session_get", async {
            let sql = format!("SELECT {COLUMNS} FROM connect_sessions WHERE token_hash = ?");
            let rows = run!(rows SessionRow, self, "session_get", sql, [token_hash])?;
            self.first_session(rows)
        })
        .await
    }

    /// The session a `state` hash names (spent states name none).
    pub async fn session_by_state(&self, state_hash: &str) -> Result<Option<Session>, StoreError> {
        self.timed("session_get", async {
            let sql = format!("SELECT {COLUMNS} FROM connect_sessions WHERE state_hash = ?");
            let rows = run!(rows SessionRow, self, "session_get", sql, [state_hash])?;
            self.first_session(rows)
        })
        .await
    }

    /// Records that a browser opened the link and was given `state`: if the
    /// link is fresh, or was opened by this same browser before (a fresh
    /// `state` and verifier replace the old ones). Whether it was.
    pub async fn open_session(
        &self,
        session: &Session,
        browser_hash: &str,
        state_hash: &str,
        code_verifier: Option<&Secret>,
    ) -> Result<bool, StoreError> {
        let sealed = code_verifier
            .map(|v| {
                self.sealer
                    .seal(verifier_place(session), v.expose().as_bytes())
                    .map_err(|source| StoreError::Crypto {
                        pool: session.pool.clone(),
                        id: session.id.clone(),
                        field: "code_verifier",
                        source,
                    })
            })
            .transpose()?;
        self.timed("session_open", async {
            let now = now_ms();
            let sql = "UPDATE connect_sessions SET phase = 'opened', browser_hash = ?, \
                 state_hash = ?, code_verifier = ?, opened_at = ? \
                 WHERE id = ? AND status = 'pending' AND expires_at > ? \
                 AND (phase = 'new' OR (phase = 'opened' AND browser_hash = ?))";
            let n = run!(exec self, "session_open", sql, [
                browser_hash, state_hash, sealed.as_deref(), now, &session.id, now, browser_hash
            ])?;
            Ok(n == 1)
        })
        .await
    }

    /// Spends a `state`, if it is pending, unexpired and from the browser
    /// that opened the link: the session moves to exchanging and the state
    /// names nothing any more. Only one caller fleet-wide gets the session.
    pub async fn spend_state(
        &self,
        state_hash: &str,
        browser_hash: &str,
    ) -> Result<Option<Session>, StoreError> {
        self.timed("session_spend", async {
            let sql = format!(
                "UPDATE connect_sessions SET phase = 'exchanging', state_hash = NULL \
                 WHERE state_hash = ? AND browser_hash = ? AND status = 'pending' \
                 AND phase = 'opened' AND expires_at > ? RETURNING {COLUMNS}"
            );
            let rows = run!(rows SessionRow, self, "session_spend", sql, [state_hash, browser_hash, now_ms()])?;
            self.first_session(rows)
        })
        .await
    }

    /// Ends a pending session (its verifier is erased). Whether it was
    /// pending.
    pub async fn finish_session(&self, id: &str, end: &SessionEnd<'_>) -> Result<bool, StoreError> {
        self.timed("session_finish", async {
            let sql = "UPDATE connect_sessions SET status = ?, \
                 connection_id = COALESCE(?, connection_id), error = ?, error_description = ?, \
                 finished_at = ?, state_hash = NULL, code_verifier = NULL \
                 WHERE id = ? AND status = 'pending'";
            let n = run!(exec self, "session_finish", sql, [
                end.status.as_str(), end.connection_id, end.error, end.description, now_ms(), id
            ])?;
            Ok(n == 1)
        })
        .await
    }

    /// Deletes a session (its link stops working). Whether it existed.
    pub async fn delete_session(&self, pool: &str, id: &str) -> Result<bool, StoreError> {
        self.timed("session_delete", async {
            let sql = "DELETE FROM connect_sessions WHERE pool = ? AND id = ?";
            Ok(run!(exec self, "session_delete", sql, [pool, id])? > 0)
        })
        .await
    }

    /// Marks pending sessions past their lifetime expired, returning their
    /// pools (each session once fleet-wide). A session whose code is being
    /// exchanged is given `grace_ms` more (the exchange decides it).
    pub async fn expire_sessions(&self, grace_ms: i64) -> Result<Vec<String>, StoreError> {
        self.timed("session_expire", async {
            let now = now_ms();
            let sql = format!(
                "UPDATE connect_sessions SET status = 'expired', finished_at = ?, \
                 state_hash = NULL, code_verifier = NULL \
                 WHERE status = 'pending' AND expires_at <= ? \
                 AND (phase <> 'exchanging' OR expires_at <= ?) RETURNING {COLUMNS}"
            );
            let rows =
                run!(rows SessionRow, self, "session_expire", sql, [now, now, now.saturating_sub(grace_ms)])?;
            Ok(rows.into_iter().map(|r| r.pool).collect())
        })
        .await
    }

    /// Deletes sessions that ended before `before` (Unix milliseconds).
    pub async fn prune_sessions(&self, before: i64) -> Result<u64, StoreError> {
        self.timed("session_prune", async {
            let sql = "DELETE FROM connect_sessions WHERE status <> 'pending' AND finished_at < ?";
            run!(exec self, "session_prune", sql, [before])
        })
        .await
    }

    fn first_session(&self, rows: Vec<SessionRow>) -> Result<Option<Session>, StoreError> {
        rows.into_iter()
            .next()
            .map(|r| self.open_session_row(r))
            .transpose()
    }

    fn open_session_row(&self, r: SessionRow) -> Result<Session, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt {
            pool: r.pool.clone(),
            id: r.id.clone(),
            what: format!("connect session: {what}"),
        };
        let status = SessionStatus::parse(&r.status).ok_or_else(|| corrupt("status"))?;
        let phase = SessionPhase::parse(&r.phase).ok_or_else(|| corrupt("phase"))?;
        let authorize_params: Vec<(String, String)> =
            serde_json::from_str(&r.authorize_params).map_err(|_| corrupt("authorize_params"))?;
        let place = Place {
            pool: &r.pool,
            id: &r.id,
            field: "code_verifier",
        };
        let code_verifier = r
            .code_verifier
            .as_deref()
            .map(|s| self.sealer.open_secret(place, s))
            .transpose()
            .map_err(|source| StoreError::Crypto {
                pool: r.pool.clone(),
                id: r.id.clone(),
                field: "code_verifier",
                source,
            })?;
        Ok(Session {
            status,
            phase,
            authorize_params,
            code_verifier,
            id: r.id,
            pool: r.pool,
            connection_id: r.connection_id,
            redirect_to: r.redirect_to,
            browser_hash: r.browser_hash,
            error: r.error,
            error_description: r.error_description,
            created_at: r.created_at,
            expires_at: r.expires_at,
            finished_at: r.finished_at,
        })
    }
}

fn verifier_place(session: &Session) -> Place<'_> {
    Place {
        pool: &session.pool,
        id: &session.id,
        field: "code_verifier",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_hashes_are_sha256_hex() {
        assert_eq!(
            secret_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
