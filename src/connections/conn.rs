//! One connection in memory ([`Conn`]): the token it holds and the row
//! version that token belongs to, the token dropped after a rejection,
//! its flags and its refresh [`Failure`]; and [`Fresh`], what a refresh
//! hands it. It does not talk to the store or the token endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use super::PoolError;
use crate::ground::lock;
use crate::store::Version;
use crate::tokens::Token;

/// Refresh-ahead moments are spread over up to this share of a token's
/// lifetime, so connections authorized together do not refresh together.
const REFRESH_JITTER: f64 = 0.1;

/// The last failure of a connection's refresh (or of the pool's client):
/// requests answer at once until `retry_at`.
pub(super) struct Failure {
    pub(super) retry_at: Instant,
    pub(super) attempts: u32,
    pub(super) reason: String,
}

impl Failure {
    pub(super) fn after(
        prev: Option<&Failure>,
        delay: impl FnOnce(u32) -> Duration,
        reason: String,
    ) -> Failure {
        let attempts = prev.map_or(0, |f| f.attempts).saturating_add(1);
        let now = Instant::now();
        Failure {
            retry_at: now.checked_add(delay(attempts)).unwrap_or(now),
            attempts,
            reason,
        }
    }

    /// While it holds: the answer for a request.
    pub(super) fn pending(&self, id: &str) -> Option<PoolError> {
        let now = Instant::now();
        (now < self.retry_at).then(|| PoolError::Unavailable {
            id: id.to_owned(),
            reason: self.reason.clone(),
            retry_after: self.retry_at.saturating_duration_since(now),
        })
    }
}

/// A token a refresh obtained, with the row version it was committed as.
#[derive(Clone)]
pub(super) struct Fresh {
    pub(super) token: Arc<Token>,
    pub(super) version: Version,
}

/// One connection in memory.
pub struct Conn {
    pub(super) id: String,
    pub(super) held: ArcSwapOption<Token>,
    /// The row version the held token belongs to (with that token): what a
    /// `revoked_codes` answer for it expects to find in the store. A
    /// refresh another request shares installs its token and version here
    /// together, so an answer for an older token is told apart.
    pub(super) version: Mutex<(Option<Arc<Token>>, Version)>,
    /// The token dropped after an upstream rejection, until the next one is
    /// installed: that one is subject to the no-storm floor
    /// ([`Token::rejectable`]), and a stored copy of this one is not used.
    pub(super) rejected: ArcSwapOption<Token>,
    pub(super) needs_reauthorization: AtomicBool,
    /// This connection started the refresh in flight (a cheap check before
    /// the ledger's map).
    pub(super) refreshing: AtomicBool,
    pub(super) failure: Mutex<Option<Failure>>,
    /// A shared store announced a change (or may have): read it again at
    /// its next use.
    pub(super) stale: AtomicBool,
    pub(super) revalidating: AtomicBool,
    /// Looked up since the cache's eviction hand last passed it.
    pub(super) used: AtomicBool,
}

impl Conn {
    pub(super) fn new(id: String) -> Conn {
        Conn {
            id,
            held: ArcSwapOption::empty(),
            version: Mutex::new((None, Version::default())),
            rejected: ArcSwapOption::empty(),
            needs_reauthorization: AtomicBool::new(false),
            refreshing: AtomicBool::new(false),
            failure: Mutex::new(None),
            stale: AtomicBool::new(false),
            revalidating: AtomicBool::new(false),
            used: AtomicBool::new(false),
        }
    }

    /// Whether a shared store's row must be read again.
    pub(super) fn due_for_check(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// The connection was deleted or turned needs_reauthorization
    /// elsewhere: its token must not be used any more.
    pub(super) fn revoke(&self, needs_reauthorization: bool) {
        self.needs_reauthorization
            .store(needs_reauthorization, Ordering::Release);
        self.held.store(None);
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn usable(&self, now: Instant) -> Option<Arc<Token>> {
        let held = self.held.load();
        held.as_ref().filter(|t| t.is_usable(now)).map(Arc::clone)
    }

    /// Installs a token just obtained or read, its refresh moment spread
    /// by a little jitter.
    pub(super) fn install(&self, mut token: Token, version: Version) -> Fresh {
        token.replaces_rejected = self.rejected.swap(None).is_some();
        let window = token
            .refresh_at
            .saturating_duration_since(token.obtained_at);
        let jitter = window.mul_f64(REFRESH_JITTER * rand::random::<f64>());
        if let Some(at) = token.refresh_at.checked_sub(jitter) {
            token.refresh_at = at.max(token.obtained_at);
        }
        let fresh = Fresh {
            token: Arc::new(token),
            version,
        };
        self.install_fresh(&fresh);
        fresh
    }

    /// Installs what a refresh (maybe another generation's) obtained.
    pub(super) fn install_fresh(&self, fresh: &Fresh) {
        self.held.store(Some(Arc::clone(&fresh.token)));
        *lock(&self.version) = (Some(Arc::clone(&fresh.token)), fresh.version.clone());
        self.needs_reauthorization.store(false, Ordering::Release);
        *lock(&self.failure) = None;
    }

    /// Drops `token` if it is still the current one.
    pub(super) fn drop_token(&self, token: &Arc<Token>) {
        let cur = self.held.load();
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) {
            let prev = self.held.compare_and_swap(&*cur, None);
            if prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, token)) {
                self.rejected.store(Some(Arc::clone(token)));
            }
        }
    }

    pub(super) fn failure(&self) -> MutexGuard<'_, Option<Failure>> {
        lock(&self.failure)
    }
}
