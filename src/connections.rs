//! Per-user connection pools: one [`Pool`] per `[connections.NAME]`, and
//! the process-wide [`Ledger`] of refreshes in flight that every config
//! generation's pools share.
//!
//! A request names its connection in the pool's select header; its access
//! token comes from memory (a bounded cache with CLOCK eviction, `cache`),
//! else the store (one read, coalesced per connection), else one refresh.
//! Per connection and process there is one refresh at a time, whichever
//! generation's pool asks: it runs in a task of its own ([`Ledger`]), so a
//! request that leaves (its deadline, its client, a reload or shutdown)
//! never cancels a refresh the provider may already have answered with a
//! rotated refresh token. The
//! refresh takes the row's lease in the store (one token request per
//! expiry across replicas), re-reads it, uses a token another holder just
//! committed if it is fresh, else calls the endpoint and commits both
//! tokens before the access token is used. A token inside its refresh
//! window is served while one background refresh runs.
//!
//! The rule this module keeps: a connection ends only when the provider
//! says its grant is dead (`invalid_grant` on a refresh, a `revoked_codes`
//! answer for the token in use) or someone deletes it; nothing ever erases
//! a refresh token. Every store write says which refresh token it expects
//! ([`Version`](crate::store::Version)) and does nothing when the row has moved on, so a stale
//! answer never undoes a re-authorization. Tokens a refresh obtained that
//! the store could not take are parked in the ledger (not in the evictable
//! cache) and committed as soon as it can. A refusal of the *client*
//! (`invalid_client`, other 4xx) is the pool's problem, not the users':
//! 503 `token_unavailable` for everyone, no state change.
//!
//! This module does not parse HTTP requests beyond the select header, and
//! does not own the store's SQL.
//!
//! The layer owns per-user pools: selection of the connection a request
//! names, the bounded cache of connections in memory, the process-wide
//! refresh ledger, re-authorization (the admin API's code exchange), and
//! the failure tail (dead grants, refused clients, backoff). It may use
//! `ground`, `net`, `config`, `store` and `tokens`; it must not import
//! `proxy`, `admin`, `server` or `sandbox` (tests/architecture.rs).
//!
//! Files: `select` (the id contract and the select header), `error`,
//! `conn` (one connection in memory), `ledger` (flights and parked
//! tokens), `pool` (construction, cache, entry points, change
//! announcements, counts), `refresh` (the refresh path and its failure
//! tail), `rejected` (upstream rejections, `revoked_codes`), `authorize`
//! (the code exchange), `connect` (the hosted connect flow's sessions,
//! links and callbacks), `revoke` (delete, revoking at the provider first),
//! `keepalive` (background refreshes of idle refresh tokens, and their
//! age as a gauge).

mod authorize;
mod cache;
mod conn;
pub mod connect;
mod error;
pub mod keepalive;
mod ledger;
mod pool;
mod refresh;
mod rejected;
mod revoke;
mod select;

pub use authorize::{AuthorizeError, Exchange};
pub use conn::Conn;
pub use error::PoolBuildError;
pub use error::PoolError;
pub use ledger::Ledger;
pub use pool::Pool;
pub use rejected::Rejected;
pub use revoke::Deleted;
pub use select::{named, valid_id, MAX_ID_LEN};

use conn::{Failure, Fresh};
use error::{last_error, store_err};
use ledger::{FlightGuard, Outcome, Parked};
