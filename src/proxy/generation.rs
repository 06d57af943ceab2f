//! What a [`Config`] turns into when it runs: the [`Generation`] (route table,
//! access rules, token sources, listener TLS) and the [`AppState`] that holds
//! the current one in an `ArcSwap`.
//!
//! [`Generation::build`] makes everything first and fails whole; only then is
//! the result swapped in, so a reload never applies half a config. Token
//! sources whose settings did not change are carried over with their cached
//! token and refresh task.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, StatusCode};
use ipnet::IpNet;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::config::{AuthScheme, Config, RouteAuth, RouteConfig};
use crate::connections::{Ledger, Pool};
use crate::ground::metrics::{Metrics, RouteMetrics, NO_ROUTE};
use crate::ground::secret::Secret;
use crate::net::body::ReplayBudget;
use crate::net::upstream::{Upstream, UpstreamCache};
use crate::proxy::error::ProxyError;
use crate::proxy::routes::RouteTable;
use crate::store::Store;
use crate::tokens::dpop::Dpop;
use crate::tokens::refresh::StateKey;
use crate::tokens::TokenSource;

/// A route ready to serve: its settings plus resolved handles.
pub struct Route {
    /// Name (metrics label, logs).
    pub name: String,
    /// Upstream scheme.
    pub scheme: Scheme,
    /// Upstream authority.
    pub authority: Authority,
    /// Upstream base path ("" or "/base").
    pub base_path: String,
    /// `Host` sent upstream unless `preserve_host`.
    pub host_header: HeaderValue,
    /// Removed from the path before forwarding.
    pub strip_prefix: Option<String>,
    /// Keep the client's Host.
    pub preserve_host: bool,
    /// Header that carries the token.
    pub header: HeaderName,
    /// How the token is written.
    pub auth_scheme: AuthScheme,
    /// Statuses that mean "token rejected".
    pub reauth_on: Vec<StatusCode>,
    /// Where its tokens come from.
    pub tokens: RouteTokens,
    /// The DPoP proofs of its credential or pool (`dpop = true`): every
    /// request with a DPoP-bound token carries a fresh one.
    pub dpop: Option<Arc<Dpop>>,
    /// The upstream's connection pool.
    pub upstream: Arc<Upstream>,
    /// Metric handles.
    pub metrics: RouteMetrics,
    /// The settings, for `/status`.
    pub config: RouteConfig,
}

impl crate::proxy::access_log::RouteLabels for Route {
    fn name(&self) -> &str {
        &self.name
    }

    fn credential(&self) -> Option<&str> {
        match &self.config.auth {
            RouteAuth::Credential(name) => Some(name),
            RouteAuth::Connections(_) => None,
        }
    }

    fn pool(&self) -> Option<&str> {
        match &self.config.auth {
            RouteAuth::Connections(name) => Some(name),
            RouteAuth::Credential(_) => None,
        }
    }
}

/// A route's token provider.
pub enum RouteTokens {
    /// One credential's token source.
    Credential(Arc<TokenSource>),
    /// A pool of per-user connections.
    Pool(Arc<Pool>),
}

/// `[access]`, ready to check.
#[derive(Default)]
pub struct Access {
    api_keys: Vec<Secret>,
    allow: Vec<IpNet>,
}

impl Access {
    /// Whether anything is enforced.
    pub fn is_open(&self) -> bool {
        self.api_keys.is_empty() && self.allow.is_empty()
    }

    /// `403` for an address outside `allow`, `407` for a missing or wrong key.
    pub fn check(&self, peer: IpAddr, headers: &HeaderMap) -> Result<(), ProxyError> {
        if !self.allow.is_empty() {
            let ip = peer.to_canonical();
            if !self.allow.iter().any(|net| net.contains(&ip)) {
                return Err(ProxyError::Forbidden);
            }
        }
        if !self.api_keys.is_empty() {
            let presented = headers
                .get(http::header::PROXY_AUTHORIZATION)
                .map(|v| v.as_bytes())
                .and_then(|v| {
                    let (scheme, key) = v.split_at(v.iter().position(|&b| b == b' ')?);
                    scheme
                        .eq_ignore_ascii_case(b"bearer")
                        .then(|| key.trim_ascii())
                })
                .ok_or(ProxyError::ProxyAuthRequired)?;
            // Compare against every key, each in constant time, without
            // stopping at the first match.
            let matched = self
                .api_keys
                .iter()
                .fold(subtle::Choice::from(0), |acc, k| {
                    acc | k.expose().as_bytes().ct_eq(presented)
                });
            if !bool::from(matched) {
                return Err(ProxyError::ProxyAuthRequired);
            }
        }
        Ok(())
    }
}

/// Everything one config generation serves with.
pub struct Generation {
    /// The config it was built from.
    pub config: Arc<Config>,
    /// Route table.
    pub routes: RouteTable<Arc<Route>>,
    /// Routes in file order, for `/status`.
    pub route_list: Vec<Arc<Route>>,
    /// Access rules.
    pub access: Access,
    /// Token sources by credential name.
    pub sources: BTreeMap<String, Arc<TokenSource>>,
    /// Connection pools by name.
    pub pools: BTreeMap<String, Arc<Pool>>,
    /// Listener TLS.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Metric handles for requests that match no route.
    pub unrouted: RouteMetrics,
    /// Until the upstream's response headers.
    pub request_timeout: Duration,
    /// No body bytes moving for this long ends an exchange.
    pub idle_timeout: Duration,
    /// Bytes all replay buffers of this generation may hold at once.
    pub replay_budget: Arc<ReplayBudget>,
    /// Stops this generation's new refresh tasks (carried-over ones keep
    /// their own tokens).
    pub(crate) cancels: BTreeMap<String, CancellationToken>,
}

/// Errors building a generation.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

impl Generation {
    /// Builds a generation, reusing `previous`'s token sources where the
    /// credential is unchanged. New sources are created but not started;
    /// [`Generation::start_new_sources`] starts them once the generation is in use.
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Generation>,
        metrics: &Metrics,
        upstreams: &UpstreamCache,
        store: Option<&Arc<Store>>,
        ledger: Option<&Arc<Ledger>>,
    ) -> Result<Generation, BuildError> {
        let pools = build_pools(&config, previous, metrics, store, ledger)?;
        let (sources, cancels) = build_sources(&config, previous, metrics, store)?;
        let route_list = (config.routes.iter())
            .map(|r| build_route(r, &sources, &pools, upstreams, metrics))
            .collect::<Result<Vec<_>, _>>()?;
        let routes = RouteTable::new(route_list.iter().map(|r| {
            (
                r.config.host.clone(),
                r.config.path_prefix.clone(),
                Arc::clone(r),
            )
        }));
        Ok(Generation {
            routes,
            route_list,
            access: Access {
                api_keys: config.access.api_keys.clone(),
                allow: config.access.allow.clone(),
            },
            sources,
            pools,
            tls: config
                .server
                .tls
                .clone()
                .map(tokio_rustls::TlsAcceptor::from),
            unrouted: metrics.route(NO_ROUTE),
            request_timeout: config.server.request_timeout,
            idle_timeout: config.server.idle_timeout,
            replay_budget: ReplayBudget::new(config.server.replay_buffer_limit),
            cancels,
            config,
        })
    }

    /// Starts the refresh task of every source not carried over from
    /// `previous`, and stops those of `previous` that are gone or replaced
    /// (pools likewise).
    /// A replaced source's task stops between token requests, and its
    /// successor (sharing its refresh-token state) starts only once it has
    /// ended: never two token requests on one refresh token.
    pub fn start_new_sources(&self, previous: Option<&Generation>, metrics: &Metrics) {
        self.start_new_pools(previous);
        let mut stopped = Vec::new();
        if let Some(prev) = previous {
            for (name, old) in &prev.sources {
                let kept = self.sources.get(name).is_some_and(|s| Arc::ptr_eq(s, old));
                if !kept {
                    if let Some(c) = prev.cancels.get(name) {
                        c.cancel();
                    }
                    stopped.push((Arc::clone(old.refresh_state()), old.take_task()));
                    if !self.sources.contains_key(name) {
                        metrics.remove_credential(name);
                    }
                }
            }
        }
        for (name, source) in &self.sources {
            let carried = previous
                .and_then(|p| p.sources.get(name))
                .is_some_and(|old| Arc::ptr_eq(old, source));
            if carried {
                continue;
            }
            let after = stopped
                .iter_mut()
                .find(|(state, _)| *state.key() == *source.refresh_state().key())
                .and_then(|(_, task)| task.take());
            if let Some(cancel) = self.cancels.get(name) {
                source.spawn(cancel.clone(), after);
            }
        }
    }

    /// Starts the pools not carried over from `previous` and stops those of
    /// `previous` that are gone or replaced.
    fn start_new_pools(&self, previous: Option<&Generation>) {
        for (name, pool) in &self.pools {
            let carried = previous
                .and_then(|p| p.pools.get(name))
                .is_some_and(|old| Arc::ptr_eq(old, pool));
            if !carried {
                pool.spawn();
            }
        }
        if let Some(prev) = previous {
            for (name, old) in &prev.pools {
                if !self.pools.get(name).is_some_and(|p| Arc::ptr_eq(p, old)) {
                    old.stop();
                }
            }
        }
    }

    /// Stops every refresh task (shutdown).
    pub fn stop_sources(&self) {
        self.cancels.values().for_each(CancellationToken::cancel);
        self.pools.values().for_each(|p| p.stop());
    }
}

/// Token sources by credential name.
type Sources = BTreeMap<String, Arc<TokenSource>>;

/// The token sources of `config` and their refresh tasks' cancel tokens,
/// reusing `previous`'s where the credential is unchanged.
fn build_sources(
    config: &Config,
    previous: Option<&Generation>,
    metrics: &Metrics,
    store: Option<&Arc<Store>>,
) -> Result<(Sources, BTreeMap<String, CancellationToken>), BuildError> {
    let mut sources = BTreeMap::new();
    let mut cancels = BTreeMap::new();
    for (name, cred) in &config.credentials {
        let reused = previous.and_then(|p| {
            let s = p.sources.get(name)?;
            (s.config() == cred).then(|| (Arc::clone(s), p.cancels.get(name).cloned()))
        });
        let (source, cancel) = match reused {
            Some((s, Some(c))) => (s, c),
            _ => {
                // A changed credential keeps the refresh-token state of
                // the one it replaces (same state file, or same name).
                let key = StateKey::of(cred);
                let inherited = previous.and_then(|p| {
                    p.sources
                        .values()
                        .map(|s| s.refresh_state())
                        .find(|r| *r.key() == key)
                });
                let s = TokenSource::with_store(
                    Arc::clone(cred),
                    metrics.credential(name),
                    inherited,
                    store,
                )
                .map_err(|e| BuildError(format!("credentials.{name}: {e}")))?;
                (s, CancellationToken::new())
            }
        };
        sources.insert(name.clone(), source);
        cancels.insert(name.clone(), cancel);
    }
    Ok((sources, cancels))
}

/// Route `r` ready to serve: its token source or pool, its upstream's
/// connection pool (shared through `upstreams`) and its metric handles.
fn build_route(
    r: &RouteConfig,
    sources: &Sources,
    pools: &BTreeMap<String, Arc<Pool>>,
    upstreams: &UpstreamCache,
    metrics: &Metrics,
) -> Result<Arc<Route>, BuildError> {
    let tokens = match &r.auth {
        RouteAuth::Credential(c) => sources.get(c).cloned().map(RouteTokens::Credential),
        RouteAuth::Connections(p) => pools.get(p).cloned().map(RouteTokens::Pool),
    }
    .ok_or_else(|| BuildError(format!("routes.{}: unknown {}", r.name, r.auth)))?;
    let dpop = match &tokens {
        RouteTokens::Credential(s) => s.dpop().cloned(),
        RouteTokens::Pool(p) => p.endpoint().dpop.clone(),
    };
    let upstream = upstreams
        .get(
            &r.upstream_scheme,
            &r.upstream_authority,
            &r.ca_certs,
            r.client_cert.as_ref(),
            r.max_connections,
        )
        .map_err(|e| BuildError(format!("routes.{}.upstream: {e}", r.name)))?;
    let host_header = HeaderValue::from_str(r.upstream_authority.as_str())
        .map_err(|_| BuildError(format!("routes.{}.upstream: bad authority", r.name)))?;
    Ok(Arc::new(Route {
        name: r.name.clone(),
        scheme: r.upstream_scheme.clone(),
        authority: r.upstream_authority.clone(),
        base_path: r.upstream_base_path.clone(),
        host_header,
        strip_prefix: r.strip_prefix.clone(),
        preserve_host: r.preserve_host,
        header: r.header.clone(),
        auth_scheme: r.scheme.clone(),
        reauth_on: r.reauth_on.clone(),
        tokens,
        dpop,
        upstream,
        metrics: metrics.route(&r.name),
        config: r.clone(),
    }))
}

/// The pools of `config`, reusing `previous`'s where the settings are
/// unchanged (their cached tokens survive a reload).
fn build_pools(
    config: &Config,
    previous: Option<&Generation>,
    metrics: &Metrics,
    store: Option<&Arc<Store>>,
    ledger: Option<&Arc<Ledger>>,
) -> Result<BTreeMap<String, Arc<Pool>>, BuildError> {
    let mut pools = BTreeMap::new();
    for (name, pc) in &config.pools {
        let reused = previous
            .and_then(|p| p.pools.get(name))
            .filter(|p| p.config() == pc)
            .cloned();
        let pool = match reused {
            Some(p) => p,
            None => {
                let (Some(store), Some(ledger)) = (store, ledger) else {
                    return Err(BuildError(format!(
                        "connections.{name}: the store is not open"
                    )));
                };
                Pool::new(
                    Arc::clone(pc),
                    Arc::clone(store),
                    Arc::clone(ledger),
                    metrics.pool(name),
                )
                .map_err(|e| BuildError(e.to_string()))?
            }
        };
        pools.insert(name.clone(), pool);
    }
    Ok(pools)
}

/// Process-wide state shared by listeners, handlers and the admin endpoints.
pub struct AppState {
    /// The generation of the current config; loaded once per request.
    pub generation: ArcSwap<Generation>,
    /// Metrics registry and handles.
    pub metrics: Metrics,
    /// Upstream connection pools, kept across reloads.
    pub upstreams: UpstreamCache,
    /// Set when shutdown begins (`/readyz` answers 503).
    pub draining: AtomicBool,
    /// Set once every credential has had a first token; later failures
    /// (or credentials added by a reload) do not take readiness back.
    pub ready: AtomicBool,
    /// The connection store, opened once at start (`[store]` changes need a
    /// restart).
    pub store: Option<Arc<Store>>,
    /// Per-user refreshes in flight and tokens waiting for the store,
    /// shared by every generation's pools (with the store).
    pub ledger: Option<Arc<Ledger>>,
}

impl AppState {
    /// Builds the first generation from `config` and starts its token sources.
    pub fn new(config: Config) -> Result<Arc<AppState>, BuildError> {
        AppState::with_store(config, Metrics::new(), None)
    }

    /// Like [`AppState::new`], with the store its pools use (opened with
    /// handles from `metrics`).
    pub fn with_store(
        config: Config,
        metrics: Metrics,
        store: Option<Arc<Store>>,
    ) -> Result<Arc<AppState>, BuildError> {
        let upstreams = UpstreamCache::default();
        let ledger = store.as_ref().map(Ledger::new);
        let generation = Generation::build(
            Arc::new(config),
            None,
            &metrics,
            &upstreams,
            store.as_ref(),
            ledger.as_ref(),
        )?;
        Ok(Arc::new(AppState {
            generation: ArcSwap::from_pointee(generation),
            metrics,
            upstreams,
            draining: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            store,
            ledger,
        }))
    }

    /// Starts the refresh tasks of the first generation.
    pub fn start(&self) {
        self.generation
            .load()
            .start_new_sources(None, &self.metrics);
    }

    /// Whether the store has never been reached since the start (readiness
    /// waits for it; a later outage does not unready the proxy, whose
    /// in-memory tokens still serve).
    pub fn store_pending(&self) -> bool {
        self.store.as_ref().is_some_and(|s| !s.is_initialized())
    }

    /// Credentials still waiting for their first token; empty once the
    /// proxy has been ready (readiness is latched).
    pub fn not_ready(&self) -> Vec<String> {
        if self.ready.load(Ordering::Acquire) {
            return Vec::new();
        }
        let waiting: Vec<String> = self
            .generation
            .load()
            .sources
            .iter()
            .filter(|(_, s)| !s.is_ready())
            .map(|(n, _)| n.clone())
            .collect();
        if waiting.is_empty() {
            self.ready.store(true, Ordering::Release);
        }
        waiting
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
