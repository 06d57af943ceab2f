//! flinks-proxy: an authenticating reverse proxy for the Flinks Open Banking
//! API and any HTTP API behind an OAuth 2.0 token endpoint. Clients send
//! plain requests; the proxy obtains bearer tokens, keeps them fresh,
//! injects them and forwards the requests upstream.
//!
//! # Layout
//! Each top-level module is a layer, listed bottom first; a layer imports
//! only layers earlier in the list, and no files import each other in a
//! circle (a module's own file and its folder's
//! files excepted). `tests/architecture.rs` keeps both true.
//!
//! 1. [`ground`]: the lock helper, the clock, secrets, the metric registry
//!    and its handles, the store's sealing key. Knows no request.
//! 2. [`net`]: transport that knows no tokens: bodies, header policy, TLS,
//!    the upstream connection pools (HTTP/1.1 wire, HTTP/2), also the
//!    token endpoints' client.
//! 3. [`config`]: proxy.toml → validated, immutable [`Config`] (the
//!    endpoints of `discovery = true` tables read from issuers' metadata).
//! 4. [`store`]: the connection store and its SQLite and PostgreSQL
//!    backends (sealed tokens, leases, change notifications); shared by
//!    per-user connections and by credentials kept for replicas.
//! 5. [`tokens`]: one token request (`tokens::grant`), the JWT decoder, a
//!    credential's `TokenSource` (cache, single flight, refresh task, state
//!    file, shared slots).
//! 6. [`connections`]: per-user connection pools: selection, bounded cache,
//!    the process-wide refresh ledger, re-authorization.
//! 7. [`webhooks`]: lifecycle events: the deliverer of the store's
//!    outbox, Standard Webhooks signatures.
//! 8. [`proxy`]: the request path: a config `Generation` and the
//!    `AppState` that swaps it on reload, routes, the handler, errors, the
//!    response body and the access log.
//! 9. [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/status`, the
//!    connections API.
//! 10. [`server`]: accept loops for the proxy and admin listeners, limits,
//!     TLS handshakes, graceful shutdown.
//! 11. [`sandbox`]: the Flinks-like token endpoint and API for the demo,
//!     tests and benchmarks.
//! 12. This file: [`start`] and [`Running`] (listeners, shutdown).
//! 13. [`cli`]: the subcommands of the `flinks-proxy` command (`check`,
//!     `token`, `demo`, `store`, `connections`, `healthcheck`) and what
//!     they share: config loading, logging, the runtime, exit codes.
//!
//! `main.rs` (the command line, dispatch, serving until a signal) sits on
//! top.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod connect;
pub mod connections;
pub mod ground;
pub mod net;
pub mod proxy;
pub mod sandbox;
pub mod server;
pub mod store;
pub mod tokens;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;

pub use proxy::generation::AppState;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config could not be turned into a generation.
    #[error("{0}")]
    Build(String),
    /// A listener could not be bound.
    #[error("{0}")]
    Bind(std::io::Error),
    /// The connection store could not be opened (or its key does not match).
    #[error("store: {0}")]
    Store(#[source] store::StoreError),
    /// An authorization code was refused and there is no stored refresh token.
    #[error("credentials.{credential}: the authorization code was refused ({reason}). The code is single-use and short-lived: have the user authorize again, put the new code in credentials.{credential}.code and restart")]
    CodeRejected {
        /// The credential.
        credential: String,
        /// The endpoint's answer.
        reason: String,
    },
}

/// A running proxy: listeners bound, refresh tasks started.
pub struct Running {
    state: Arc<AppState>,
    proxy_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    connect_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    admin_shutdown: CancellationToken,
    proxy_task: Option<JoinHandle<()>>,
}

/// Opens the store. A database that cannot be reached does not stop the
/// start: the proxy serves (in-memory tokens, `/readyz` naming the store)
/// while a task retries with backoff, logging why. A store that answers but
/// is wrong (key, schema) stops the start.
async fn open_store(
    sc: &config::StoreConfig,
    metrics: &ground::metrics::Metrics,
) -> Result<Arc<store::Store>, StartError> {
    let store = Arc::new(
        store::Store::new(sc, metrics.store_kind(sc.location.kind()))
            .await
            .map_err(StartError::Store)?,
    );
    store.spawn_listener();
    match store.init().await {
        Ok(()) => {}
        Err(e) if e.is_unavailable() => {
            tracing::warn!(kind = store.kind(), error = %e, "the store cannot be reached; retrying in the background");
            tokio::spawn(retry_store_init(Arc::downgrade(&store)));
        }
        Err(e) => return Err(StartError::Store(e)),
    }
    Ok(store)
}

/// Retries [`store::Store::init`] with backoff until it succeeds (or the
/// store is dropped).
async fn retry_store_init(store: std::sync::Weak<store::Store>) {
    let mut delay = std::time::Duration::from_millis(500);
    loop {
        tokio::time::sleep(delay).await;
        let Some(s) = store.upgrade() else { return };
        match s.init().await {
            Ok(()) => {
                tracing::info!(kind = s.kind(), "store reached and initialized");
                return;
            }
            Err(e) => {
                tracing::warn!(kind = s.kind(), error = %e, retry_in = %humantime::format_duration(delay), "the store is still unavailable");
            }
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(10));
    }
}

/// Binds the listeners, starts the token sources and serves. Credentials
/// with an authorization code to exchange do so before listening, so a
/// refused code is a clear startup error.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let listen = config.server.listen;
    let admin_listen = config.admin_listen;
    let grace = config.server.shutdown_grace;
    let metrics = ground::metrics::Metrics::new();
    let store = match &config.store {
        Some(sc) => Some(open_store(sc, &metrics).await?),
        None => None,
    };
    let state = AppState::with_store(config, metrics, store)
        .map_err(|e| StartError::Build(e.to_string()))?;
    exchange_codes(&state).await?;
    let (listener, proxy_addr, admin) = bind_listeners(listen, admin_listen).await?;
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let shutdown = CancellationToken::new();
    let admin_shutdown = CancellationToken::new();
    let connect_addr = start_connect(&state, &shutdown).await?;
    log_start(&state, proxy_addr, admin_addr);
    if let Some(l) = admin {
        tokio::spawn(server::serve_admin(
            l,
            Arc::clone(&state),
            admin_shutdown.clone(),
        ));
    }
    state.start();
    start_webhooks(&state, &shutdown);
    start_keepalive(&state, &shutdown);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "flinks-proxy started");
    let proxy_task = tokio::spawn(server::serve_proxy(
        listener,
        Arc::clone(&state),
        shutdown.clone(),
        grace,
    ));
    Ok(Running {
        state,
        proxy_addr,
        admin_addr,
        connect_addr,
        shutdown,
        admin_shutdown,
        proxy_task: Some(proxy_task),
    })
}

/// Starts the webhook deliverer (with a store): it follows `[webhooks]`
/// through reloads, and keeps the queue gauges even without it.
fn start_webhooks(state: &Arc<AppState>, shutdown: &CancellationToken) {
    let Some(store) = state.store.clone() else {
        return;
    };
    let current = {
        let state = Arc::downgrade(state);
        move || {
            state
                .upgrade()
                .and_then(|s| s.generation.load().config.webhooks.clone())
        }
    };
    tokio::spawn(webhooks::run(
        store,
        current,
        state.metrics.webhooks(),
        shutdown.clone(),
    ));
}

/// Starts the keep-alive task (`connections::keepalive`): it follows the
/// current generation's pools and stops with `shutdown`.
fn start_keepalive(state: &Arc<AppState>, shutdown: &CancellationToken) {
    if state.store.is_none() {
        return;
    }
    let st = Arc::clone(state);
    let pools = move || st.generation.load().pools.values().cloned().collect();
    connections::keepalive::spawn(pools, shutdown.child_token());
}

/// How often expired connect sessions are marked so (and counted), and
/// old ones pruned.
const CONNECT_SWEEP: std::time::Duration = std::time::Duration::from_secs(30);
/// Ended connect sessions are kept this long for the admin API.
const CONNECT_KEEP_MS: i64 = 7 * 24 * 3600 * 1000;

/// Binds and serves the `[connect]` listener, if configured, with the task
/// that expires its sessions.
async fn start_connect(
    state: &Arc<AppState>,
    shutdown: &CancellationToken,
) -> Result<Option<SocketAddr>, StartError> {
    let Some(connect) = state.generation.load().config.connect.clone() else {
        return Ok(None);
    };
    let listener = server::bind(connect.listen, "connect.listen")
        .await
        .map_err(StartError::Bind)?;
    let addr = listener.local_addr().map_err(StartError::Bind)?;
    let tls = connect.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    tracing::info!(addr = %addr, public_url = %connect.public_url, tls = tls.is_some(), "connect listening");
    tokio::spawn(server::serve_connect(
        listener,
        tls,
        Arc::clone(state),
        shutdown.clone(),
    ));
    tokio::spawn(sweep_connect_sessions(Arc::clone(state), shutdown.clone()));
    Ok(Some(addr))
}

/// Marks pending sessions past their lifetime expired (each counted once
/// fleet-wide) and prunes ended ones, every [`CONNECT_SWEEP`].
async fn sweep_connect_sessions(state: Arc<AppState>, shutdown: CancellationToken) {
    let Some(store) = state.store.clone() else {
        return;
    };
    let grace = i64::try_from(connections::connect::EXCHANGE_GRACE.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = tokio::time::sleep(CONNECT_SWEEP) => {}
            () = shutdown.cancelled() => return,
        }
        if let Ok(pools) = store.expire_sessions(grace).await {
            for pool in pools {
                state.metrics.connect_session(&pool, "expired");
            }
        }
        let _ = store
            .prune_sessions(ground::now_ms().saturating_sub(CONNECT_KEEP_MS))
            .await;
    }
}

/// Binds the proxy listener (returned with its address) and, when
/// configured, the admin listener.
async fn bind_listeners(
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
) -> Result<(TcpListener, SocketAddr, Option<TcpListener>), StartError> {
    let listener = server::bind(listen, "server.listen")
        .await
        .map_err(StartError::Bind)?;
    let proxy_addr = listener.local_addr().map_err(StartError::Bind)?;
    let admin = match admin_listen {
        Some(a) => Some(
            server::bind(a, "admin.listen")
                .await
                .map_err(StartError::Bind)?,
        ),
        None => None,
    };
    Ok((listener, proxy_addr, admin))
}

/// Logs what starts: the listeners, routes, store and credentials, with a
/// warning for a secret sent in clear and for an open proxy beyond loopback.
fn log_start(state: &AppState, proxy_addr: SocketAddr, admin_addr: Option<SocketAddr>) {
    let rt = state.generation.load();
    let c = &rt.config;
    tracing::info!(addr = %proxy_addr, tls = c.server.tls.is_some(), mtls = c.server.mtls, "proxy listening");
    if let Some(a) = admin_addr {
        tracing::info!(addr = %a, "admin listening");
    }
    for r in &c.routes {
        tracing::info!(route = %r.name, host = r.host.as_deref().unwrap_or("*"), path_prefix = %r.path_prefix, upstream = %r.upstream_url(), auth = %r.auth, "route");
    }
    if let Some(store) = &state.store {
        tracing::info!(kind = store.kind(), key_id = store.key_id(), "store open");
    }
    for (name, cred) in &c.credentials {
        tracing::info!(credential = %name, grant = cred.grant_type.as_str(), token_url = %cred.token_url, client_id = %cred.client_id, "credential");
        if cred.sends_secrets_in_clear() {
            tracing::warn!(credential = %name, token_url = %cred.token_url, "the token URL is plain http:// beyond loopback: the client secret and tokens travel in clear; use https://");
        }
    }
    if !proxy_addr.ip().is_loopback() && rt.access.is_open() && !c.server.mtls {
        tracing::warn!(addr = %proxy_addr, "the proxy listens beyond loopback with no [access] rules and no client certificates: anyone who reaches it can spend these credentials");
    }
}

async fn exchange_codes(state: &AppState) -> Result<(), StartError> {
    let rt = state.generation.load_full();
    for (name, source) in &rt.sources {
        if !source.needs_code_exchange() {
            continue;
        }
        tracing::info!(credential = %name, "exchanging the authorization code");
        // In a task of its own so that a panic (a bug) is caught, logged and
        // counted; the refresh task then retries.
        let s = Arc::clone(source);
        let result = match tokio::spawn(async move { s.fetch().await }).await {
            Ok(r) => r,
            Err(e) => {
                state.metrics.credential(name).code_exchange_restarts.inc();
                tracing::error!(credential = %name, error = %e, "the code exchange panicked (a bug: please report it); retrying in the background");
                continue;
            }
        };
        match result {
            Ok(token) => source.install(token),
            Err(e) if !e.is_transient() => {
                return Err(StartError::CodeRejected {
                    credential: name.clone(),
                    reason: e.to_string(),
                })
            }
            // Transient: the refresh task retries with backoff.
            Err(e) => {
                tracing::warn!(credential = %name, error = %e, "code exchange failed; retrying in the background")
            }
        }
    }
    Ok(())
}

impl Running {
    /// The proxy listener's address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The `[connect]` listener's address.
    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.connect_addr
    }

    /// Shared state (metrics, the current generation).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Swaps in a new config (what SIGHUP does with the file).
    pub fn reload(&self, config: Config) -> Result<(), String> {
        let r = proxy::reload::apply(&self.state, config);
        self.state.metrics.reload(r.is_ok());
        r
    }

    /// Graceful shutdown: `/readyz` turns 503, the proxy listener stops
    /// accepting, in-flight requests get `shutdown_grace` to finish; the
    /// admin listener serves until then, so the drain can be watched.
    pub async fn shutdown(mut self) {
        self.state.draining.store(true, Ordering::Release);
        self.shutdown.cancel();
        if let Some(task) = self.proxy_task.take() {
            let _ = task.await;
        }
        self.admin_shutdown.cancel();
        self.state.generation.load().stop_sources();
        // Per-user refreshes in flight finish and commit (a rotated refresh
        // token must reach the store), within the grace.
        if let (Some(ledger), Some(store)) = (&self.state.ledger, &self.state.store) {
            let grace = self.state.generation.load().config.server.shutdown_grace;
            ledger.drain(store, grace).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.admin_shutdown.cancel();
        self.state.generation.load().stop_sources();
    }
}
