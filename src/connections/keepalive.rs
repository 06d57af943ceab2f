//! Keep-alive (CONNECT.md, "Keeping connections alive"): Flinks' refresh
//! tokens die after 30 days unused, so a connection whose user simply had
//! no traffic would be lost. For a pool with `keepalive`, the active
//! connections whose refresh token is unused for that long are refreshed
//! in the background, through the pool's normal refresh path (lease,
//! commit, failure tail: a refusal turns the connection
//! `needs_reauthorization`, a transient failure is recorded and tried
//! again at a later scan).
//!
//! - **When**: each pool is scanned every [`scan_interval`] of its
//!   `keepalive` (a hundredth of it, 1 s to 60 s), at a random phase and
//!   with ±20 % jitter, so replicas do not scan in step.
//! - **How fast**: refreshes start at most `keepalive_rate` per second per
//!   pool and process (a pacer spaces them `1/rate` apart, across scans),
//!   and only when one of the pool's `refresh_concurrency` slots is free.
//! - **Once per fleet**: the candidates come from the store (oldest
//!   first); the refresh takes the row's lease and re-reads it: once
//!   another replica's keep-alive committed, `last_refresh_at` has moved
//!   and its token is used instead of a second token request.
//! - **The gauge**: every pool, with keep-alive or not, publishes the age
//!   of its oldest unused refresh token
//!   (`flinks_proxy_connection_refresh_token_idle_seconds`) every
//!   [`IDLE_GAUGE_INTERVAL`]: without keep-alive, that is what an alert
//!   watches before connections die.
//!
//! One task ([`spawn`]) follows the config generations: each current pool
//! gets a task of its own, stopped when a reload replaces the pool or at
//! shutdown. Only the serving process starts it (`lib.rs`), never a CLI
//! command. It does not own the refresh itself (`refresh.rs`) nor the
//! store's SQL (`store/idle.rs`).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Conn, Outcome, Pool, PoolError};
use crate::config::Keepalive;
use crate::ground::now_ms;
use crate::store::idle::IdleCursor;

/// How often the current generation's pools are compared with those
/// being watched (a reload is followed within this).
const RECONCILE: Duration = Duration::from_secs(1);
/// How often each pool's oldest unused refresh token is read for the
/// gauge: one index seek per pool, as often as the per-state counts.
pub const IDLE_GAUGE_INTERVAL: Duration = Duration::from_secs(5);
/// A scan runs every `keepalive / SCAN_FRACTION`: a connection is
/// refreshed at most 1 % of its margin late.
const SCAN_FRACTION: u32 = 100;
/// Scans never run more often than this (a tiny `keepalive` must not
/// hammer the store)…
const SCAN_MIN: Duration = Duration::from_secs(1);
/// …nor less often (a restart or a new idle connection is picked up
/// within a minute).
const SCAN_MAX: Duration = Duration::from_secs(60);
/// Candidates read per store query.
const PAGE: u32 = 100;

/// The time between two scans of a pool whose `keepalive` is `idle`
/// (before jitter).
pub fn scan_interval(idle: Duration) -> Duration {
    (idle / SCAN_FRACTION).clamp(SCAN_MIN, SCAN_MAX)
}

/// Starts the keep-alive task: `pools` lists the current generation's
/// pools; everything stops when `shutdown` is cancelled.
pub fn spawn<F>(pools: F, shutdown: CancellationToken) -> JoinHandle<()>
where
    F: Fn() -> Vec<Arc<Pool>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut watched: Vec<(Arc<Pool>, CancellationToken)> = Vec::new();
        loop {
            let current = pools();
            watched.retain(|(p, stop)| {
                let keep = current.iter().any(|c| Arc::ptr_eq(c, p));
                if !keep {
                    stop.cancel();
                    let name = &p.config.name;
                    if !current.iter().any(|c| &c.config.name == name) {
                        p.metrics.keepalive.forget();
                    }
                }
                keep
            });
            for pool in current {
                if !watched.iter().any(|(p, _)| Arc::ptr_eq(p, &pool)) {
                    let stop = shutdown.child_token();
                    tokio::spawn(watch(Arc::clone(&pool), stop.clone()));
                    watched.push((pool, stop));
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RECONCILE) => {}
            }
        }
    })
}

/// One pool's gauge and, with `keepalive`, its scans, until `stop` or the
/// pool is stopped (a reload replaced it).
async fn watch(pool: Arc<Pool>, stop: CancellationToken) {
    let stop = &stop;
    let stopped = || async {
        tokio::select! {
            () = stop.cancelled() => {}
            () = pool.cancel.cancelled() => {}
        }
    };
    let gauge = async {
        loop {
            pool.publish_idle_age().await;
            tokio::select! {
                () = stopped() => return,
                () = tokio::time::sleep(IDLE_GAUGE_INTERVAL) => {}
            }
        }
    };
    let scans = async {
        let Some(keepalive) = pool.config.keepalive else {
            return;
        };
        let interval = scan_interval(keepalive.idle);
        let mut pacer = Pacer::new(keepalive.rate);
        // A random phase: replicas started together do not scan together.
        let mut wait = interval.mul_f64(rand::random::<f64>());
        loop {
            tokio::select! {
                () = stopped() => return,
                () = tokio::time::sleep(wait) => {}
            }
            tokio::select! {
                () = stopped() => return,
                () = pool.scan(keepalive, &mut pacer) => {}
            }
            wait = interval.mul_f64(0.8 + 0.4 * rand::random::<f64>());
        }
    };
    tokio::join!(gauge, scans);
}

/// Spaces refresh starts `1/rate` apart, across scans.
struct Pacer {
    spacing: Duration,
    next: Instant,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        Pacer {
            spacing: Duration::from_secs_f64(1.0 / rate),
            next: Instant::now(),
        }
    }

    /// Waits for the next start's turn and books it.
    async fn turn(&mut self) {
        tokio::time::sleep_until(self.next).await;
        self.next = self.next.max(Instant::now()) + self.spacing;
    }
}

impl Pool {
    /// Reads the oldest unused refresh token's age into the gauge (0 when
    /// the pool has no active connection). A store outage leaves the last
    /// value.
    async fn publish_idle_age(&self) {
        if let Ok(since) = self.store.oldest_idle(&self.config.name).await {
            let age_ms = since.map_or(0, |s| now_ms().saturating_sub(s).max(0));
            self.metrics
                .keepalive
                .set_idle_seconds(u64::try_from(age_ms / 1000).unwrap_or(0));
        }
    }

    /// One scan: every connection idle since the cutoff, oldest first,
    /// paced. Returns when all were tried (or the store failed: the next
    /// scan tries again).
    async fn scan(self: &Arc<Self>, keepalive: Keepalive, pacer: &mut Pacer) {
        let name = self.config.name.as_str();
        let idle_ms = i64::try_from(keepalive.idle.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(idle_ms);
        let mut after = IdleCursor::start();
        let (mut started, mut skipped) = (0u64, 0u64);
        loop {
            let page = match self
                .store
                .idle_connections(name, cutoff, &after, PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::debug!(pool = name, error = %e, "keep-alive scan stopped: the store failed; the next scan tries again");
                    break;
                }
            };
            for idle in &page {
                pacer.turn().await;
                if self.keep_alive(&idle.id, cutoff).await {
                    started += 1;
                } else {
                    skipped += 1;
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => {
                    after = IdleCursor {
                        idle_since: last.idle_since,
                        id: last.id.clone(),
                    };
                }
                _ => break,
            }
        }
        if started + skipped > 0 {
            tracing::info!(pool = name, started, skipped, keepalive = %humantime::format_duration(keepalive.idle), "keep-alive: refreshed connections whose refresh token was unused for that long");
        }
    }

    /// Starts one connection's keep-alive refresh and counts its outcome
    /// when it ends; `false` when it was skipped (backing off, no refresh
    /// slot free, or already gone from memory's point of view).
    async fn keep_alive(self: &Arc<Self>, id: &str, cutoff: i64) -> bool {
        // A connection in memory is refreshed as itself (its backoff
        // counts, it gets the new token); another is not loaded into the
        // cache, so keep-alive never evicts the users being served.
        let conn = match self.cache.get(id) {
            Some(c) => c,
            None => Arc::new(Conn::new(id.to_owned())),
        };
        let Some(mut rx) = self.refresh_idle(&conn, cutoff) else {
            tracing::debug!(pool = %self.config.name, connection = id, "keep-alive skipped: backing off or no refresh slot free");
            return false;
        };
        let metrics = self.metrics.keepalive.clone();
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                done = rx.wait_for(Option::is_some) => {
                    if let Ok(done) = done {
                        if let Some(outcome) = &*done {
                            metrics.refreshed(outcome_label(outcome));
                        }
                    }
                }
            }
        });
        true
    }
}

/// The `outcome` label of a keep-alive refresh's end.
fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Ok(_) => "success",
        Err(PoolError::Reauthorization(_)) => "needs_reauthorization",
        Err(PoolError::NotFound(_)) => "gone",
        Err(PoolError::Store(_)) => "store_unavailable",
        Err(_) => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_run_a_hundredth_of_keepalive_apart_within_bounds() {
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(scan_interval(day * 20), SCAN_MAX);
        assert_eq!(
            scan_interval(Duration::from_secs(300)),
            Duration::from_secs(3)
        );
        assert_eq!(scan_interval(Duration::from_secs(10)), SCAN_MIN);
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_spaces_starts_one_over_rate_apart() {
        let mut pacer = Pacer::new(4.0);
        let start = Instant::now();
        for _ in 0..9 {
            pacer.turn().await;
        }
        // The first start is immediate; eight more, 250 ms apart.
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // A pause longer than the spacing does not build up a burst.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t = Instant::now();
        pacer.turn().await;
        pacer.turn().await;
        assert_eq!(t.elapsed(), Duration::from_millis(250));
    }
}
