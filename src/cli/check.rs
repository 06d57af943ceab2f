//! `flinks-proxy check`: validates a config and the secrets it names, builds
//! its runtime as the proxy would (the store opened read-only) and prints the
//! effective server settings, credentials and pools (with their client
//! assertion key's thumbprint, never the key; the endpoints discovered from
//! an issuer's metadata, marked so) and routes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::cli::block_on;
use crate::config::{
    AccessConfig, Config, CredentialConfig, DiscoveredKeys, PoolConfig, RouteConfig, ServerConfig,
};
use crate::net::tls::ClientCert;

/// Checks the config at `path`: exit 0 with a summary, or 1 with the error.
pub fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Building the runtime also reads state files; with a [store], it is
    // built over the store opened read-only (nothing is created or written,
    // so checking next to a running proxy disturbs nothing).
    let store_note = match block_on(1, check_runtime(config.clone())) {
        Ok(note) => note,
        Err(e) => {
            eprintln!("error: {}: {e:#}", path.display());
            return ExitCode::FAILURE;
        }
    };
    println!("{}: OK", path.display());
    if let Some(note) = store_note {
        println!("{note}");
    }
    if config.routes.is_empty() {
        eprintln!(
            "warning: {}: no [routes.*]: the proxy would answer every request 404 route_not_found",
            path.display()
        );
    }
    print_server(&config.server);
    if let Some(a) = config.admin_listen {
        println!("admin   {a}");
    }
    print_access(&config.access);
    print_credentials(&config.credentials, &config.discovered);
    print_pools(&config.pools, &config.discovered);
    print_routes(&config.routes);
    print_pool_client_certs(&config.pools);
    if let Some(w) = &config.webhooks {
        println!(
            "webhooks {} (events {}; timeout {}, max_age {})",
            w.display_url(),
            w.events.join(", "),
            humantime::format_duration(w.timeout),
            humantime::format_duration(w.max_age),
        );
    }
    ExitCode::SUCCESS
}

/// The `listen` and `server` lines: the listener and its limits.
fn print_server(s: &ServerConfig) {
    println!(
        "listen  {}{}{}",
        s.listen,
        if s.tls.is_some() { " (TLS)" } else { "" },
        if s.mtls {
            " (client certificates required)"
        } else {
            ""
        }
    );
    println!(
        "server  request_timeout {}, header_read_timeout {}, idle_timeout {}, shutdown_grace {}",
        humantime::format_duration(s.request_timeout),
        humantime::format_duration(s.header_read_timeout),
        humantime::format_duration(s.idle_timeout),
        humantime::format_duration(s.shutdown_grace),
    );
    println!(
        "        max_connections {}, replay_buffer_limit {}, workers {}",
        s.max_connections,
        crate::config::format_size(s.replay_buffer_limit),
        if s.workers == 0 {
            "one per core".to_owned()
        } else {
            s.workers.to_string()
        }
    );
}

/// The `access` line, when there are API keys or an allow-list.
fn print_access(access: &AccessConfig) {
    if !access.api_keys.is_empty() || !access.allow.is_empty() {
        println!(
            "access  {} API key(s); allow {}",
            access.api_keys.len(),
            if access.allow.is_empty() {
                "any address".to_string()
            } else {
                access
                    .allow
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
}

/// One line per credential (never a secret), and a warning on stderr for
/// each that sends its secret in clear.
fn print_credentials(
    credentials: &BTreeMap<String, Arc<CredentialConfig>>,
    discovered: &BTreeMap<String, DiscoveredKeys>,
) {
    println!("credentials:");
    for (name, c) in credentials {
        println!(
            "  {name}: {} at {} (client_id {}, client secret {}, {} body, {} client auth{})",
            c.grant_type.as_str(),
            c.token_url,
            c.client_id,
            if c.client_secret.is_some() {
                "set"
            } else {
                "not set"
            },
            c.body_format.as_str(),
            c.client_auth.as_str(),
            c.scope
                .as_deref()
                .map(|s| format!(", scope {s}"))
                .unwrap_or_default()
        );
        print_discovered(discovered.get(&format!("credentials.{name}")));
        print_client_cert(c.client_cert.as_ref());
        if let Some(line) = assertion_line(c.client_auth, c.assertion.as_ref()) {
            println!("{line}");
        }
        if let Some(line) = dpop_line(c.dpop_key.as_deref()) {
            println!("{line}");
        }
        if c.sends_secrets_in_clear() {
            eprintln!("warning: credentials.{name}.token_url is plain http:// beyond loopback: the client secret and tokens travel in clear; use https://");
        }
    }
}

/// The client assertion of a credential or pool: its method, key type,
/// algorithm, key id and the key's RFC 7638 JWK thumbprint (the public
/// key's hash, what the authorization server has registered), never the
/// key itself.
pub fn assertion_line(
    auth: crate::config::ClientAuth,
    assertion: Option<&crate::config::ClientAssertion>,
) -> Option<String> {
    let a = assertion?;
    let audience = a
        .audience
        .as_deref()
        .map(|aud| format!(", audience {aud}"))
        .unwrap_or_else(|| ", audience the token URL".to_owned());
    Some(match &a.key {
        Some(key) => format!(
            "    {}: {} key ({}), kid {}, JWK thumbprint {}{audience}",
            auth.as_str(),
            key.describe(),
            key.alg().as_str(),
            a.key_id.as_deref().unwrap_or("(none)"),
            key.thumbprint(),
        ),
        None => format!(
            "    {}: HS256 with the client secret{audience}",
            auth.as_str()
        ),
    })
}

/// One line per pool (never a secret): its token endpoint and client
/// authentication.
fn print_pools(
    pools: &BTreeMap<String, Arc<crate::config::PoolConfig>>,
    discovered: &BTreeMap<String, DiscoveredKeys>,
) {
    if pools.is_empty() {
        return;
    }
    println!("connections:");
    for (name, p) in pools {
        println!(
            "  {name}: at {} (client_id {}, {} body, {} client auth)",
            p.token_url,
            p.client_id,
            p.body_format.as_str(),
            p.client_auth.as_str(),
        );
        print_discovered(discovered.get(&format!("connections.{name}")));
        if let Some(line) = assertion_line(p.client_auth, p.assertion.as_ref()) {
            println!("{line}");
        }
        if let Some(line) = dpop_line(p.dpop_key.as_deref()) {
            println!("{line}");
        }
    }
}

/// The DPoP key of a credential or pool: its type, algorithm and RFC 7638
/// JWK thumbprint (the `jkt` its tokens are bound to), never the key.
pub fn dpop_line(key: Option<&crate::ground::jose::SigningKey>) -> Option<String> {
    let key = key?;
    Some(format!(
        "    dpop: {} key ({}), JWK thumbprint {}",
        key.describe(),
        key.alg().as_str(),
        key.thumbprint()
    ))
}

/// A table's endpoint keys read from its issuer's metadata: one line each,
/// or one saying every endpoint key was written.
fn print_discovered(d: Option<&DiscoveredKeys>) {
    let Some(d) = d else { return };
    if d.keys.is_empty() {
        println!(
            "    discovery: {} (every endpoint key set in the file)",
            d.url
        );
    }
    for (key, value) in &d.keys {
        println!("    {key} {value} (discovered from {})", d.issuer);
    }
}

/// One line per route: where it matches, where it goes, how it authenticates.
fn print_routes(routes: &[RouteConfig]) {
    println!("routes:");
    for r in routes {
        println!(
            "  {}: {}{}* -> {} with {}",
            r.name,
            r.host.as_deref().unwrap_or(""),
            r.path_prefix,
            r.upstream_url(),
            r.auth
        );
        print_client_cert(r.client_cert.as_ref());
    }
}

/// One line per pool that presents a client certificate to its token
/// endpoint: the client-auth method and the certificate.
fn print_pool_client_certs(pools: &BTreeMap<String, Arc<PoolConfig>>) {
    for (name, p) in pools.iter().filter(|(_, p)| p.client_cert.is_some()) {
        println!(
            "connections {name}: {} client auth at {}",
            p.client_auth.as_str(),
            p.token_url
        );
        print_client_cert(p.client_cert.as_ref());
    }
}

/// The client certificate's subject and SHA-256 fingerprint (never the key).
fn print_client_cert(cert: Option<&ClientCert>) {
    if let Some(c) = cert {
        println!(
            "    client certificate {} (SHA-256 {})",
            c.subject(),
            c.fingerprint()
        );
    }
}

/// Builds the runtime of `config` as `check` does, and what it has to say
/// about the store: its key checked against the store's canary when the
/// store can be reached (a wrong key or a newer schema is an error; a store
/// not created yet or not reachable now is only said).
async fn check_runtime(config: Config) -> anyhow::Result<Option<String>> {
    use crate::store::{Access, Store, StoreError};
    let Some(sc) = config.store.clone() else {
        crate::proxy::generation::AppState::new(config)?;
        return Ok(None);
    };
    let metrics = crate::ground::metrics::Metrics::new();
    let store = std::sync::Arc::new(
        Store::new_for(&sc, metrics.store(), Access::ReadOnly)
            .await
            .context("store")?,
    );
    crate::proxy::generation::AppState::with_store(
        config,
        metrics,
        Some(std::sync::Arc::clone(&store)),
    )?;
    let kind = sc.location.kind();
    Ok(Some(match store.init().await {
        Ok(()) => format!(
            "store   {kind}, key id {} matches the store",
            store.key_id()
        ),
        Err(e @ (StoreError::KeyMismatch { .. } | StoreError::SchemaTooNew { .. })) => {
            return Err(anyhow::Error::new(e).context("store"))
        }
        Err(StoreError::NotAStore(why)) => {
            format!("store   {kind}, key id {}: {why}", store.key_id())
        }
        Err(e) => format!(
            "store   {kind}, key id {}: warning: not checked against the store ({e})",
            store.key_id()
        ),
    }))
}
