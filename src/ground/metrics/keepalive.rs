//! The keep-alive families (CONNECT.md, "Keeping connections alive"): the
//! age of each pool's oldest unused refresh token, and keep-alive refreshes
//! by outcome. Every series exists at 0 from the moment its pool is built.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::{counter, register};

/// The `outcome` labels of `flinks_proxy_keepalive_refreshes_total`, as
/// the refresh path ends: fresh tokens committed (`success`), the provider
/// refused the grant (`needs_reauthorization`), a transient failure
/// recorded on the connection (`failed`), the connection deleted
/// meanwhile (`gone`), the store unreachable (`store_unavailable`).
pub const KEEPALIVE_OUTCOMES: [&str; 5] = [
    "success",
    "needs_reauthorization",
    "failed",
    "gone",
    "store_unavailable",
];

pub(super) struct KeepaliveFamilies {
    idle: IntGaugeVec,
    refreshes: IntCounterVec,
}

impl KeepaliveFamilies {
    pub(super) fn register(registry: &Registry) -> KeepaliveFamilies {
        let idle = IntGaugeVec::new(
            Opts::new(
                "flinks_proxy_connection_refresh_token_idle_seconds",
                "Age of the oldest unused refresh token among a pool's active connections \
                 (0 when none); Flinks refresh tokens die after 30 days unused",
            ),
            &["pool"],
        )
        .expect("valid metric");
        KeepaliveFamilies {
            idle: register(registry, idle),
            refreshes: counter(
                registry,
                "flinks_proxy_keepalive_refreshes_total",
                "Keep-alive refreshes of idle connections, by pool and outcome",
                &["pool", "outcome"],
            ),
        }
    }

    /// One pool's handles, its series put at 0.
    pub(super) fn pool(&self, pool: &str) -> KeepaliveMetrics {
        let outcome = |o: &str| self.refreshes.with_label_values(&[pool, o]);
        KeepaliveMetrics {
            pool: pool.to_owned(),
            family: self.idle.clone(),
            idle: self.idle.with_label_values(&[pool]),
            success: outcome("success"),
            needs_reauthorization: outcome("needs_reauthorization"),
            failed: outcome("failed"),
            gone: outcome("gone"),
            store_unavailable: outcome("store_unavailable"),
        }
    }
}

/// A pool's keep-alive handles.
#[derive(Clone)]
pub struct KeepaliveMetrics {
    pool: String,
    family: IntGaugeVec,
    idle: IntGauge,
    success: IntCounter,
    needs_reauthorization: IntCounter,
    failed: IntCounter,
    gone: IntCounter,
    store_unavailable: IntCounter,
}

impl KeepaliveMetrics {
    /// Sets the oldest unused refresh token's age.
    pub fn set_idle_seconds(&self, seconds: u64) {
        self.idle.set(i64::try_from(seconds).unwrap_or(i64::MAX));
    }

    /// Drops the pool's idle gauge (a reload removed the pool: a last
    /// value left behind would keep an alert firing for nothing).
    pub fn forget(&self) {
        let _ = self.family.remove_label_values(&[&self.pool]);
    }

    /// Counts one keep-alive refresh's outcome (one of
    /// [`KEEPALIVE_OUTCOMES`]; anything else counts as `failed`).
    pub fn refreshed(&self, outcome: &str) {
        match outcome {
            "success" => &self.success,
            "needs_reauthorization" => &self.needs_reauthorization,
            "gone" => &self.gone,
            "store_unavailable" => &self.store_unavailable,
            _ => &self.failed,
        }
        .inc();
    }
}
