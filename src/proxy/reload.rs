//! Config reload (SIGHUP): parse → validate → build → swap. A config that
//! fails anywhere leaves the running one untouched; in-flight requests keep
//! the generation they loaded.

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use crate::proxy::generation::{AppState, Generation};

/// Reloads the config file at `path`; counts the outcome. Reading the
/// config, its secrets, PEM files and state files happens on a blocking
/// thread, never on a runtime thread (with `workers = 1` a slow disk
/// would stall all traffic).
pub async fn reload_file(state: &Arc<AppState>, path: &Path) -> Result<(), String> {
    let (st, p) = (Arc::clone(state), path.to_path_buf());
    let result = tokio::task::spawn_blocking(move || {
        Config::load(&p)
            .map_err(|e| e.to_string())
            .and_then(|c| apply(&st, c))
    })
    .await
    .unwrap_or_else(|e| Err(format!("the reload task failed: {e}")));
    match &result {
        Ok(()) => tracing::info!(config = %path.display(), "config reloaded"),
        Err(e) => tracing::error!(error = %e, "config reload failed; keeping the running config"),
    }
    state.metrics.reload(result.is_ok());
    result
}

/// Swaps in a validated config: builds the new generation (carrying over
/// unchanged credentials), swaps it, then starts and stops refresh tasks.
/// Builds on the calling thread (it reads state files): from async code,
/// call it from a blocking thread as [`reload_file`] does.
pub fn apply(state: &AppState, config: Config) -> Result<(), String> {
    let old = state.generation.load_full();
    if config.server.listen != old.config.server.listen
        || config.admin_listen != old.config.admin_listen
        || config.server.max_connections != old.config.server.max_connections
        || config.server.workers != old.config.server.workers
    {
        tracing::warn!("server.listen, admin.listen, max_connections and workers take effect at the next restart");
    }
    let listener = |c: &Config| c.connect.as_ref().map(|c| (c.listen, c.tls.is_some()));
    if listener(&config) != listener(&old.config) {
        return Err("[connect] listen or TLS changed (or the table was added or removed): the connect listener is bound once; restart to change it".into());
    }
    if config.store != old.config.store {
        return Err("[store] changed: the store is opened once; restart to use the new one".into());
    }
    let new = Generation::build(
        Arc::new(config),
        Some(&old),
        &state.metrics,
        &state.upstreams,
        state.store.as_ref(),
        state.ledger.as_ref(),
    )
    .map_err(|e| e.to_string())?;
    state.generation.store(Arc::new(new));
    let current = state.generation.load();
    let used = current.route_list.iter();
    state
        .upstreams
        .retain(used.map(|r| (&r.upstream, r.config.max_connections)));
    state
        .generation
        .load()
        .start_new_sources(Some(&old), &state.metrics);
    Ok(())
}
