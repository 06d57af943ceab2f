//! The proxy's Prometheus metrics: an owned [`prometheus::Registry`] (no
//! global registry, so parallel tests and reloads never collide) and typed
//! handles. Per-route and per-credential handles are resolved once when a
//! config is built, never per request.

mod keepalive;

use std::sync::OnceLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Request latency buckets: a proxy on the path of API calls lives in the
/// sub-millisecond to tens-of-seconds range (bank aggregation is slow).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `kind` labels of `flinks_proxy_upstream_errors_total` (SPEC §7).
pub const UPSTREAM_ERROR_KINDS: [&str; 4] = ["connect", "tls", "timeout", "protocol"];

/// Label value for requests that matched no route.
pub const NO_ROUTE: &str = "none";

/// Every metric family of SPEC §7.
pub struct Metrics {
    registry: Registry,
    routes: RouteFamilies,
    credentials: CredentialFamilies,
    /// Requests being handled now.
    pub inflight: IntGauge,
    config_reloads: IntCounterVec,
    connections: ConnectionFamilies,
    webhooks: WebhookMetrics,
    keepalive: keepalive::KeepaliveFamilies,
}

pub use keepalive::{KeepaliveMetrics, KEEPALIVE_OUTCOMES};

impl Metrics {
    /// Creates the registry and registers every family (and process metrics
    /// on Linux).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let routes = RouteFamilies::register(&registry);
        let credentials = CredentialFamilies::register(&registry);
        let inflight = IntGauge::new("flinks_proxy_inflight_requests", "Requests being handled")
            .expect("valid metric");
        let inflight = register(&registry, inflight);
        let config_reloads = counter(
            &registry,
            "flinks_proxy_config_reloads_total",
            "Config reloads, by outcome",
            &["outcome"],
        );
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            // Registration only fails on a duplicate; one collector per registry.
            let _ = registry.register(Box::new(pc));
        }
        // Series alerts are written against exist from the start, at 0.
        for outcome in ["success", "failure"] {
            config_reloads.with_label_values(&[outcome]);
        }
        let connections = ConnectionFamilies::register(&registry);
        let webhooks = WebhookMetrics::register(&registry);
        let keepalive = keepalive::KeepaliveFamilies::register(&registry);
        Metrics {
            webhooks,
            connections,
            keepalive,
            registry,
            routes,
            credentials,
            inflight,
            config_reloads,
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        let families = self.registry.gather();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        buf
    }

    /// Handles for one route (or [`NO_ROUTE`]).
    pub fn route(&self, route: &str) -> RouteMetrics {
        // Every documented kind exists at 0 from the start, so alerts on a
        // rate see a series; requests matching no route reach no upstream.
        if route != NO_ROUTE {
            for kind in UPSTREAM_ERROR_KINDS {
                self.routes
                    .upstream_errors
                    .with_label_values(&[route, kind]);
            }
        }
        RouteMetrics {
            name: route.to_owned(),
            requests: self.routes.requests.clone(),
            by_status: (0..STATUS_SLOTS).map(|_| OnceLock::new()).collect(),
            duration: self.routes.duration.with_label_values(&[route]),
            replays: self.routes.replays.with_label_values(&[route]),
            dpop_nonce_retries: self.routes.dpop_nonce_retries.with_label_values(&[route]),
            upstream_errors: self.routes.upstream_errors.clone(),
        }
    }

    /// Handles for one credential. Every series a dashboard or alert may
    /// name exists (at 0) from here on.
    pub fn credential(&self, credential: &str) -> CredentialMetrics {
        let f = &self.credentials;
        let outcome = |o: &str| f.token_requests.with_label_values(&[credential, o]);
        let rejection = |a: &str| f.token_rejections.with_label_values(&[credential, a]);
        let restarts = |t: &str| f.task_restarts.with_label_values(&[t, credential]);
        CredentialMetrics {
            success: outcome("success"),
            rejected: outcome("rejected"),
            server_error: outcome("server_error"),
            timeout: outcome("timeout"),
            network: outcome("network"),
            invalid_response: outcome("invalid_response"),
            duration: f.token_request_duration.with_label_values(&[credential]),
            expiry: f.token_expiry.with_label_values(&[credential]),
            rejections_refreshed: rejection("refreshed"),
            rejections_already_refreshed: rejection("already_refreshed"),
            rejections_ignored_fresh: rejection("ignored_fresh"),
            refresh_task_restarts: restarts("token_refresh"),
            code_exchange_restarts: restarts("code_exchange"),
        }
    }

    /// Forgets the series of a credential that a reload removed.
    pub fn remove_credential(&self, credential: &str) {
        let _ = self
            .credentials
            .token_expiry
            .remove_label_values(&[credential]);
    }

    /// Handles for the store (series initialised at 0 for every operation).
    pub fn store(&self) -> StoreMetrics {
        self.store_kind("")
    }

    /// [`Metrics::store`] for a store of `kind` (`sqlite`, `postgres`): its
    /// `flinks_proxy_store_up` series.
    pub fn store_kind(&self, kind: &str) -> StoreMetrics {
        let f = &self.connections;
        for op in STORE_OPS {
            for outcome in ["ok", "error"] {
                f.store_ops.with_label_values(&[op, outcome]);
            }
            f.store_duration.with_label_values(&[op]);
        }
        let up = (!kind.is_empty()).then(|| f.store_up.with_label_values(&[kind]));
        if let Some(u) = &up {
            u.set(1);
        }
        StoreMetrics {
            ops: f.store_ops.clone(),
            duration: f.store_duration.clone(),
            up,
        }
    }

    /// Handles for one connection pool (series initialised at 0).
    pub fn pool(&self, pool: &str) -> PoolMetrics {
        let f = &self.connections;
        let source = |s: &str| f.tokens.with_label_values(&[pool, s]);
        for outcome in TOKEN_OUTCOMES {
            f.token_requests.with_label_values(&[pool, outcome]);
        }
        for state in ["active", "needs_reauthorization"] {
            f.connections.with_label_values(&[pool, state]);
        }
        PoolMetrics {
            pool: pool.to_owned(),
            from_memory: source("memory"),
            from_store: source("store"),
            from_refresh: source("refresh"),
            token_requests: f.token_requests.clone(),
            connections: f.connections.clone(),
            connect_sessions: f.connect_sessions.clone(),
            keepalive: self.keepalive.pool(pool),
        }
    }

    /// Counts a connect session's outcome (`pool` empty: a callback whose
    /// state named no session).
    pub fn connect_session(&self, pool: &str, outcome: &str) {
        self.connections
            .connect_sessions
            .with_label_values(&[pool, outcome])
            .inc();
    }

    /// The webhook deliverer's handles.
    pub fn webhooks(&self) -> WebhookMetrics {
        self.webhooks.clone()
    }

    /// Counts a reload.
    pub fn reload(&self, success: bool) {
        self.config_reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Status codes 100..=599 each get a lazily resolved counter slot.
const STATUS_SLOTS: usize = 500;

/// Per-route handles, resolved at config load.
pub struct RouteMetrics {
    name: String,
    requests: IntCounterVec,
    by_status: Vec<OnceLock<IntCounter>>,
    /// `flinks_proxy_request_duration_seconds{route}`.
    pub duration: Histogram,
    /// `flinks_proxy_token_replays_total{route}`.
    pub replays: IntCounter,
    /// `flinks_proxy_dpop_nonce_retries_total{route}`.
    pub dpop_nonce_retries: IntCounter,
    upstream_errors: IntCounterVec,
}

impl RouteMetrics {
    /// Counts one answered request.
    pub fn count(&self, status: u16) {
        let slot = (status as usize).wrapping_sub(100);
        match self.by_status.get(slot) {
            Some(cell) => cell
                .get_or_init(|| {
                    self.requests
                        .with_label_values(&[&self.name, &status.to_string()])
                })
                .inc(),
            None => self
                .requests
                .with_label_values(&[&self.name, &status.to_string()])
                .inc(),
        }
    }

    /// Counts one upstream failure (rare: resolved on use).
    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors
            .with_label_values(&[&self.name, kind])
            .inc();
    }
}

/// Per-credential handles.
pub struct CredentialMetrics {
    /// Token obtained.
    pub success: IntCounter,
    /// A 4xx OAuth error.
    pub rejected: IntCounter,
    /// A 5xx.
    pub server_error: IntCounter,
    /// `token_timeout` passed.
    pub timeout: IntCounter,
    /// Connect or I/O failure.
    pub network: IntCounter,
    /// A 200 without a usable token.
    pub invalid_response: IntCounter,
    /// Token request latency.
    pub duration: Histogram,
    /// Unix expiry of the cached token.
    pub expiry: prometheus::IntGauge,
    /// Upstream rejections that dropped the token.
    pub rejections_refreshed: IntCounter,
    /// Upstream rejections of a token already dropped (the request is
    /// replayed with its successor).
    pub rejections_already_refreshed: IntCounter,
    /// Upstream rejections of a token younger than the no-storm floor
    /// (passed through, token kept).
    pub rejections_ignored_fresh: IntCounter,
    /// Panics of the refresh task.
    pub refresh_task_restarts: IntCounter,
    /// Panics of the startup code exchange.
    pub code_exchange_restarts: IntCounter,
}

/// Store operations, each a label value of the store metrics.
const STORE_OPS: &[&str] = &[
    "get",
    "list",
    "authorize",
    "seed",
    "delete",
    "lease",
    "commit",
    "release",
    "record_failure",
    "counts",
    "probe",
    "webhook_claim",
    "webhook_record",
    "webhook_list",
    "webhook_retry",
    "webhook_queue",
    "webhook_prune",
    "idle_scan",
    "idle_oldest",
];

/// Outcomes of token requests, as for credentials.
const TOKEN_OUTCOMES: &[&str] = &[
    "success",
    "rejected",
    "server_error",
    "timeout",
    "network",
    "invalid_response",
];

/// Store latency buckets: a local SQLite file answers in microseconds, a
/// database across a network in milliseconds.
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// The families labelled by route: requests, their latency, upstream
/// errors, replays.
struct RouteFamilies {
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    replays: IntCounterVec,
    dpop_nonce_retries: IntCounterVec,
}

impl RouteFamilies {
    fn register(registry: &Registry) -> RouteFamilies {
        RouteFamilies {
            requests: counter(
                registry,
                "flinks_proxy_requests_total",
                "Requests answered, by route and status",
                &["route", "status"],
            ),
            duration: histogram(
                registry,
                "flinks_proxy_request_duration_seconds",
                "Time from request received to response headers sent",
                &["route"],
            ),
            upstream_errors: counter(
                registry,
                "flinks_proxy_upstream_errors_total",
                "Failed upstream exchanges, by kind (connect, tls, timeout, protocol)",
                &["route", "kind"],
            ),
            replays: counter(
                registry,
                "flinks_proxy_token_replays_total",
                "Requests replayed with a new token after the upstream rejected one",
                &["route"],
            ),
            dpop_nonce_retries: counter(
                registry,
                "flinks_proxy_dpop_nonce_retries_total",
                "Requests sent again with the DPoP nonce the upstream asked for",
                &["route"],
            ),
        }
    }
}

/// The families labelled by credential: token requests, their latency, the
/// cached token's expiry, upstream rejections, task restarts.
struct CredentialFamilies {
    token_requests: IntCounterVec,
    token_request_duration: HistogramVec,
    token_expiry: IntGaugeVec,
    token_rejections: IntCounterVec,
    task_restarts: IntCounterVec,
}

impl CredentialFamilies {
    fn register(registry: &Registry) -> CredentialFamilies {
        let token_expiry = IntGaugeVec::new(
            Opts::new(
                "flinks_proxy_token_expiry_timestamp_seconds",
                "Unix time at which the cached token expires",
            ),
            &["credential"],
        )
        .expect("valid metric");
        CredentialFamilies {
            token_requests: counter(
                registry,
                "flinks_proxy_token_requests_total",
                "Token endpoint requests, by outcome",
                &["credential", "outcome"],
            ),
            token_request_duration: histogram(
                registry,
                "flinks_proxy_token_request_duration_seconds",
                "Token endpoint request latency",
                &["credential"],
            ),
            token_expiry: register(registry, token_expiry),
            token_rejections: counter(
                registry,
                "flinks_proxy_token_rejections_total",
                "Upstream rejections (reauth_on) of an injected token, by what the proxy did: \
                 refreshed, already_refreshed, ignored_fresh",
                &["credential", "action"],
            ),
            task_restarts: counter(
                registry,
                "flinks_proxy_task_restarts_total",
                "Background tasks restarted after a panic, by task (token_refresh, code_exchange)",
                &["task", "credential"],
            ),
        }
    }
}

/// Registers `metric` in `registry` and returns it.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

/// A registered counter family.
fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    register(registry, c)
}

/// A registered histogram family with the request latency buckets.
fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    register(registry, h)
}

/// The families of per-user connections and the store (CONNECTIONS.md).
/// No connection id is ever a label.
struct ConnectionFamilies {
    connections: IntGaugeVec,
    token_requests: IntCounterVec,
    tokens: IntCounterVec,
    store_ops: IntCounterVec,
    store_duration: HistogramVec,
    store_up: IntGaugeVec,
    connect_sessions: IntCounterVec,
}

/// The `outcome` labels of `flinks_proxy_connect_sessions_total`
/// (CONNECT.md): a connection made, an error from the provider or the
/// exchange, a session past its lifetime, a callback refused (bad state,
/// cookie or `iss`).
pub const CONNECT_OUTCOMES: [&str; 4] = ["connected", "failed", "expired", "rejected"];

impl ConnectionFamilies {
    /// Registers the connection and store families in `registry`.
    fn register(registry: &Registry) -> ConnectionFamilies {
        let connections = IntGaugeVec::new(
            Opts::new(
                "flinks_proxy_connections",
                "Connections in the store, by pool and state",
            ),
            &["pool", "state"],
        )
        .expect("valid metric");
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "flinks_proxy_store_operation_duration_seconds",
                "Store operation latency",
            )
            .buckets(STORE_BUCKETS.to_vec()),
            &["op"],
        )
        .expect("valid metric");
        let store_up = IntGaugeVec::new(
            Opts::new(
                "flinks_proxy_store_up",
                "1 while the store answers (its last operation succeeded), else 0",
            ),
            &["kind"],
        )
        .expect("valid metric");
        ConnectionFamilies {
            connections: register(registry, connections),
            store_duration: register(registry, store_duration),
            store_up: register(registry, store_up),
            token_requests: counter(
                registry,
                "flinks_proxy_connection_token_requests_total",
                "Token endpoint requests for pooled connections, by outcome",
                &["pool", "outcome"],
            ),
            tokens: counter(
                registry,
                "flinks_proxy_connection_tokens_total",
                "Access tokens handed to requests, by where they came from",
                &["pool", "source"],
            ),
            store_ops: counter(
                registry,
                "flinks_proxy_store_operations_total",
                "Store operations, by outcome",
                &["op", "outcome"],
            ),
            connect_sessions: counter(
                registry,
                "flinks_proxy_connect_sessions_total",
                "Connect sessions ended, by pool and outcome (connected, failed, expired, rejected); \
                 pool=\"\" for callbacks whose state named no session",
                &["pool", "outcome"],
            ),
        }
    }
}

/// Store handles.
#[derive(Clone)]
pub struct StoreMetrics {
    ops: IntCounterVec,
    duration: HistogramVec,
    up: Option<IntGauge>,
}

impl StoreMetrics {
    /// Records whether the store answers.
    pub fn set_up(&self, up: bool) {
        if let Some(u) = &self.up {
            u.set(i64::from(up));
        }
    }

    /// Counts and times one operation.
    pub fn observe(&self, op: &str, ok: bool, elapsed: std::time::Duration) {
        self.ops
            .with_label_values(&[op, if ok { "ok" } else { "error" }])
            .inc();
        self.duration
            .with_label_values(&[op])
            .observe(elapsed.as_secs_f64());
    }
}

/// Per-pool handles.
pub struct PoolMetrics {
    pool: String,
    /// A token from memory.
    pub from_memory: IntCounter,
    /// A token read from the store.
    pub from_store: IntCounter,
    /// A token obtained by a refresh.
    pub from_refresh: IntCounter,
    token_requests: IntCounterVec,
    connections: IntGaugeVec,
    connect_sessions: IntCounterVec,
    /// Keep-alive handles.
    pub keepalive: KeepaliveMetrics,
}

impl PoolMetrics {
    /// Puts this pool's connect session series at 0 (a pool with the
    /// connect flow).
    pub fn init_connect_sessions(&self) {
        for outcome in CONNECT_OUTCOMES {
            self.connect_sessions
                .with_label_values(&[&self.pool, outcome]);
        }
    }

    /// Counts one token request by outcome.
    pub fn token_request(&self, outcome: &str) {
        self.token_requests
            .with_label_values(&[&self.pool, outcome])
            .inc();
    }

    /// Sets the number of connections in `state`.
    pub fn set_connections(&self, state: &str, n: u64) {
        self.connections
            .with_label_values(&[&self.pool, state])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// The `outcome` labels of `flinks_proxy_webhook_deliveries_total`
/// (CONNECT.md): a 2xx, an attempt to be made again, a 4xx that ended it,
/// an event given up after `max_age`.
pub const WEBHOOK_OUTCOMES: [&str; 4] = ["delivered", "retried", "rejected", "expired"];

/// The webhook outbox's families: attempts by outcome, and the queue
/// (pending events, the oldest one's age) as the store holds it.
#[derive(Clone)]
pub struct WebhookMetrics {
    deliveries: IntCounterVec,
    queue: IntGauge,
    oldest: prometheus::Gauge,
}

impl WebhookMetrics {
    fn register(registry: &Registry) -> WebhookMetrics {
        let deliveries = counter(
            registry,
            "flinks_proxy_webhook_deliveries_total",
            "Webhook delivery attempts, by outcome (delivered, retried, rejected, expired)",
            &["outcome"],
        );
        for outcome in WEBHOOK_OUTCOMES {
            deliveries.with_label_values(&[outcome]);
        }
        let queue = IntGauge::new(
            "flinks_proxy_webhook_queue",
            "Webhook events not yet delivered (the store's, shared by replicas)",
        )
        .expect("valid metric");
        let oldest = prometheus::Gauge::new(
            "flinks_proxy_webhook_oldest_pending_seconds",
            "Age of the oldest webhook event not yet delivered (0: none)",
        )
        .expect("valid metric");
        WebhookMetrics {
            deliveries,
            queue: register(registry, queue),
            oldest: register(registry, oldest),
        }
    }

    /// Counts one attempt's outcome.
    pub fn delivery(&self, outcome: &str) {
        self.deliveries.with_label_values(&[outcome]).inc();
    }

    /// The queue as last read: pending events and the oldest one's age in
    /// seconds.
    pub fn queue(&self) -> (i64, f64) {
        (self.queue.get(), self.oldest.get())
    }

    /// Sets the queue's gauges.
    pub fn set_queue(&self, pending: u64, oldest_age: std::time::Duration) {
        self.queue.set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.oldest.set(oldest_age.as_secs_f64());
    }
}
