//! `flinks-proxy store` and `flinks-proxy connections`: maintenance and
//! per-user connections straight from the store (without the admin API).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::cli::{block_on, exit, load, EXIT_BAD_CONFIG};
use crate::store::{Access, Store};

/// What a store command does once the store is open.
pub type StoreJob = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>>;

/// Opens the config's store (checking its key) and runs `job` on it with
/// the pool named by `--pool` (or the config's only pool).
pub fn store_command(
    path: &Path,
    access: Access,
    pool: Option<String>,
    job: impl FnOnce(Arc<Store>, Option<String>) -> StoreJob,
) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(store_config) = config.store.clone() else {
        eprintln!("error: {}: no [store] table", path.display());
        return ExitCode::from(EXIT_BAD_CONFIG);
    };
    let pool = pool.or_else(|| {
        (config.pools.len() == 1)
            .then(|| config.pools.keys().next().cloned())
            .flatten()
    });
    exit(block_on(1, async move {
        let metrics = crate::ground::metrics::Metrics::new();
        let store = Store::open_for(&store_config, metrics.store(), access)
            .await
            .context("store")?;
        job(Arc::new(store), pool).await
    }))
}

/// `store rekey`: re-seals every token under `store.key`.
pub async fn rekey(store: Arc<Store>) -> anyhow::Result<()> {
    let r = store.rekey().await?;
    println!(
        "re-sealed {} connections under key {} ({} already were; {} changed while being re-sealed and were read again)",
        r.resealed,
        store.key_id(),
        r.current,
        r.raced
    );
    Ok(())
}

/// `connections list`: one line per connection (pool, id, state, sub) of
/// `pool`, or of every pool in the store.
pub async fn list(store: Arc<Store>, pool: Option<String>) -> anyhow::Result<()> {
    let pools = match &pool {
        Some(p) => vec![p.clone()],
        None => store.pools().await?,
    };
    if pools.is_empty() {
        eprintln!("no connections in the store");
    }
    for p in pools {
        let mut after: Option<String> = None;
        loop {
            let page = store.list(&p, None, after.as_deref(), 500).await?;
            if page.is_empty() && after.is_none() {
                // On stderr: stdout stays one line per connection.
                eprintln!("no connections in pool {p}");
            }
            for c in &page {
                println!(
                    "{}\t{}\t{}\t{}",
                    p,
                    c.id,
                    c.state.as_str(),
                    c.sub.as_deref().unwrap_or("-")
                );
            }
            match page.last() {
                Some(last) if page.len() == 500 => after = Some(last.id.clone()),
                _ => break,
            }
        }
    }
    Ok(())
}

/// `connections show`: one connection as JSON (never a token).
pub async fn show(store: Arc<Store>, pool: Option<String>, id: String) -> anyhow::Result<()> {
    let p = need_pool(pool)?;
    let record = store
        .get(&p, &id)
        .await?
        .with_context(|| format!("pool {p} has no connection {id}"))?;
    println!("{}", serde_json::to_string_pretty(&record.info.to_json())?);
    Ok(())
}

/// `connections delete`: one connection and its tokens.
pub async fn delete(store: Arc<Store>, pool: Option<String>, id: String) -> anyhow::Result<()> {
    let p = need_pool(pool)?;
    anyhow::ensure!(
        store.delete(&p, &id).await?,
        "pool {p} has no connection {id}"
    );
    println!("deleted {p}/{id} (a running proxy stops using it within 5 seconds)");
    Ok(())
}

/// The pool `show` and `delete` need named.
fn need_pool(pool: Option<String>) -> anyhow::Result<String> {
    pool.context("name the pool with --pool")
}
