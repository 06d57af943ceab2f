//! What the store holds and hands out: a connection's state and public
//! face ([`ConnectionInfo`]), its opened [`Tokens`], a [`Record`] with the
//! [`Version`] a conditional write expects, and the outcomes of leases and
//! conditional writes ([`Lease`], [`Written`]).
//!
//! Also the sealed forms backends move ([`SealedRow`], [`SealedTokens`])
//! and the one reader of a `connections` row both backends share. Nothing
//! here seals, opens or writes (see `sealing.rs` and the backends).

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::StoreError;
use crate::ground::secret::Secret;

/// Whether a connection can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    /// Tokens can be had.
    Active,
    /// The refresh token was refused or consent revoked: the user must
    /// authorize again.
    NeedsReauthorization,
}

impl ConnectionState {
    /// The stored and JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Active => "active",
            ConnectionState::NeedsReauthorization => "needs_reauthorization",
        }
    }

    /// Every state, for metrics initialised at 0.
    pub const ALL: [ConnectionState; 2] = [
        ConnectionState::Active,
        ConnectionState::NeedsReauthorization,
    ];

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<ConnectionState> {
        match s {
            "active" => Some(ConnectionState::Active),
            "needs_reauthorization" => Some(ConnectionState::NeedsReauthorization),
            _ => None,
        }
    }
}

/// The last failure recorded on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// OAuth `error` or a proxy code (`consent_revoked`).
    pub error: String,
    /// Human text (never a token).
    pub description: Option<String>,
    /// Unix milliseconds.
    pub at: i64,
}

/// A connection as the admin API shows it: never a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Its pool.
    pub pool: String,
    /// Its id, unique in the pool.
    pub id: String,
    /// The token's `sub` claim, when it had one.
    pub sub: Option<String>,
    /// Active or needing re-authorization.
    pub state: ConnectionState,
    /// The last failure.
    pub last_error: Option<LastError>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds of the last code or refresh token exchange.
    pub authorized_at: i64,
    /// Unix milliseconds of the last refresh.
    pub last_refresh_at: Option<i64>,
    /// Unix milliseconds at which the stored access token expires.
    pub access_token_expires_at: Option<i64>,
}

impl ConnectionInfo {
    /// The admin API's JSON (CONNECTIONS.md): times in RFC 3339.
    pub fn to_json(&self) -> serde_json::Value {
        let t = |ms: Option<i64>| ms.map(rfc3339);
        serde_json::json!({
            "id": self.id,
            "pool": self.pool,
            "sub": self.sub,
            "state": self.state.as_str(),
            "created_at": rfc3339(self.created_at),
            "authorized_at": rfc3339(self.authorized_at),
            "last_refresh_at": t(self.last_refresh_at),
            "access_token_expires_at": t(self.access_token_expires_at),
            "last_error": self.last_error.as_ref().map(|e| serde_json::json!({
                "error": e.error,
                "description": e.description,
                "at": rfc3339(e.at),
            })),
        })
    }
}

/// RFC 3339 (UTC, seconds) of Unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A connection's tokens, opened.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// The refresh token.
    pub refresh_token: Option<Secret>,
    /// The current access token.
    pub access_token: Option<Secret>,
    /// When it expires (Unix milliseconds).
    pub access_expires_at: Option<i64>,
}

/// A connection with its tokens.
#[derive(Debug, Clone)]
pub struct Record {
    /// What the admin API shows.
    pub info: ConnectionInfo,
    /// The tokens.
    pub tokens: Tokens,
    /// What a conditional write of this row expects to find.
    pub version: Version,
}

/// The refresh token a row held when it was read: every write that
/// replaces a connection's tokens or state says which refresh token it
/// expects to find (STYLE: "writes are conditional on what was read"), and
/// does nothing when the row moved on (re-authorized, or refreshed by
/// another holder). The sealed text is compared in SQL; the opened
/// token's SHA-256 tells a rekey (same token, new sealing) from a real
/// change (a digest, not the token: a cached connection keeps only this).
#[derive(Clone, Default)]
pub struct Version {
    pub(super) sealed: Option<String>,
    pub(super) refresh_digest: Option<[u8; 32]>,
}

impl std::fmt::Debug for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Version")
            .field("sealed", &self.sealed)
            .field("refresh_token", &self.refresh_digest.map(|_| "***"))
            .finish()
    }
}

impl Version {
    /// Whether both name the same refresh token (whatever its sealing).
    pub fn same_refresh_token(&self, other: &Version) -> bool {
        self.refresh_digest == other.refresh_digest
    }

    pub(super) fn digest(token: &Secret) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, token.expose().as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// The outcome of a conditional write ([`Store::commit_refresh`],
/// [`Store::mark_needs_reauthorization`], [`Store::record_failure`]).
#[derive(Debug)]
pub enum Written {
    /// Written; the row as it is now.
    Done(Record),
    /// Nothing written: the row holds another refresh token than expected
    /// (re-authorized, or another holder committed a rotation). The row as
    /// it is now.
    Superseded(Record),
    /// No such connection.
    Gone,
}

/// A row as backends move it: tokens still sealed.
#[derive(Debug, Clone)]
pub(crate) struct SealedRow {
    pub(crate) info: ConnectionInfo,
    pub(crate) refresh_token: Option<String>,
    pub(crate) access_token: Option<String>,
}

/// Reads a row of the `connections` table (both backends select the same
/// columns under the same names).
pub(crate) fn sealed_row<'r, R>(r: &'r R) -> Result<SealedRow, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let read = |source| StoreError::Unavailable { op: "read", source };
    let get_i = |c: &str| r.try_get::<Option<i64>, _>(c).map_err(read);
    let get_s = |c: &str| r.try_get::<Option<String>, _>(c).map_err(read);
    let pool: String = r.try_get("pool").map_err(read)?;
    let id: String = r.try_get("id").map_err(read)?;
    let state_text: String = r.try_get("state").map_err(read)?;
    let state = ConnectionState::parse(&state_text).ok_or_else(|| StoreError::Corrupt {
        pool: pool.clone(),
        id: id.clone(),
        what: format!("unknown state {state_text:?}"),
    })?;
    let last_error = match (get_s("last_error")?, get_i("last_error_at")?) {
        (Some(error), Some(at)) => Some(LastError {
            error,
            description: get_s("last_error_description")?,
            at,
        }),
        _ => None,
    };
    Ok(SealedRow {
        info: ConnectionInfo {
            sub: get_s("sub")?,
            state,
            last_error,
            created_at: get_i("created_at")?.unwrap_or(0),
            authorized_at: get_i("authorized_at")?.unwrap_or(0),
            last_refresh_at: get_i("last_refresh_at")?,
            access_token_expires_at: get_i("access_token_expires_at")?,
            pool,
            id,
        },
        refresh_token: get_s("refresh_token")?,
        access_token: get_s("access_token")?,
    })
}

/// Tokens sealed for one row, ready to write.
#[derive(Debug, Clone)]
pub(crate) struct SealedTokens {
    pub(crate) refresh_token: Option<String>,
    pub(crate) access_token: Option<String>,
    pub(crate) access_expires_at: Option<i64>,
}

/// The outcome of [`Store::lease`].
#[derive(Debug)]
pub enum Lease {
    /// This process holds the refresh lease; the record is as of now.
    Taken(Record),
    /// This process holds the lease, taken over from another holder whose
    /// lease had expired: that holder may be alive with tokens the store
    /// could not take yet (it commits them as soon as it can), so a
    /// refresh with the stored refresh token should wait for that a little.
    TakenOver(Record),
    /// Another holder refreshes right now; the record is as of now.
    Busy(Record),
    /// No such connection (deleted meanwhile).
    Gone,
}

/// How a backend's lease attempt went.
pub(crate) enum Took {
    /// Free (or already this holder's).
    Free,
    /// Another holder's, expired.
    Over,
    /// Another holder's, live.
    Busy,
}
