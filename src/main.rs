//! The `flinks-proxy` command: CLI, logging, runtime, signals, exit codes.
//! Everything else lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use flinks_proxy::config::{Config, LogFormat};
use flinks_proxy::store::Access;

/// Exit code for a config that cannot be used (sysexits EX_USAGE-style).
const EXIT_BAD_CONFIG: u8 = 64;
/// Exit code for a command line that cannot be used (clap's).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "flinks-proxy",
    version,
    about = "Authenticating reverse proxy for the Flinks API and OAuth 2.0 protected APIs"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigPath,
    #[command(subcommand)]
    command: Option<Command>,
}

/// `--config`, on the commands that read a config file (not on `demo`).
#[derive(Args)]
struct ConfigPath {
    /// Config file [default: proxy.toml].
    #[arg(long, short, env = "FLINKS_PROXY_CONFIG")]
    config: Option<PathBuf>,
}

impl ConfigPath {
    /// The subcommand's `--config`, else the top-level one, else `proxy.toml`.
    fn or(self, top: &ConfigPath) -> PathBuf {
        self.config
            .or_else(|| top.config.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    }
}

/// `--config` on a command with subcommands (`store rekey`,
/// `connections list`): accepted after the subcommand too.
#[derive(Args)]
struct NestedConfigPath {
    /// Config file [default: proxy.toml].
    #[arg(long, short, global = true, env = "FLINKS_PROXY_CONFIG")]
    config: Option<PathBuf>,
}

impl NestedConfigPath {
    fn or(self, top: &ConfigPath) -> PathBuf {
        ConfigPath {
            config: self.config,
        }
        .or(top)
    }
}

/// The config file when none is named.
const DEFAULT_CONFIG: &str = "proxy.toml";

#[derive(Subcommand)]
enum Command {
    /// Validate the config and the secrets it names; print the effective
    /// server settings, routes and credentials.
    Check {
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Fetch one token for a credential and describe it.
    Token {
        /// The credential's name.
        name: String,
        /// Also print the access token itself.
        #[arg(long)]
        show: bool,
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Start a sandbox token endpoint and API with the proxy in front, on
    /// loopback, with a built-in config.
    Demo {
        /// Proxy listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Admin listener.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
        /// Access token lifetime the sandbox grants, in seconds.
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
    },
    /// Exit 0 if the running proxy's admin `/healthz` answers 200 (container
    /// HEALTHCHECK). Reads only `[admin] listen` from the config.
    Healthcheck {
        /// The URL to ask instead, e.g. http://127.0.0.1:9901/healthz.
        #[arg(long)]
        url: Option<String>,
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Print a new store key (base64 of 32 random bytes).
    Keygen,
    /// Store maintenance.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
        #[command(flatten)]
        config: NestedConfigPath,
    },
    /// Per-user connections, straight from the store (without the admin API).
    Connections {
        #[command(subcommand)]
        command: ConnectionsCommand,
        /// The pool (default: every pool in the store for `list`; required
        /// for `show` and `delete` when the config has several pools).
        #[arg(long, global = true)]
        pool: Option<String>,
        #[command(flatten)]
        config: NestedConfigPath,
    },
    /// Run only the sandbox (token endpoint and API), for benchmarks.
    #[command(hide = true)]
    Sandbox {
        /// Token endpoint address.
        #[arg(long, default_value = "127.0.0.1:0")]
        token_listen: String,
        /// API address.
        #[arg(long, default_value = "127.0.0.1:0")]
        api_listen: String,
        /// Access token lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
        /// End users u0..u{N-1}, each with code `code-uI` (per-user
        /// connections benchmark).
        #[arg(long, default_value_t = 0)]
        users: usize,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Re-seal every token under `store.key` (after moving the old key to
    /// `store.old_keys`).
    Rekey,
}

#[derive(Subcommand)]
enum ConnectionsCommand {
    /// List connections (id, state, sub).
    List,
    /// Show one connection as JSON (never a token).
    Show {
        /// The connection id.
        id: String,
    },
    /// Delete one connection and its tokens.
    Delete {
        /// The connection id.
        id: String,
    },
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let top = cli.config;
    match cli.command {
        None => run(&ConfigPath { config: None }.or(&top)),
        Some(Command::Check { config }) => check(&config.or(&top)),
        Some(Command::Healthcheck { url, config }) => healthcheck(url, &config.or(&top)),
        Some(Command::Token { name, show, config }) => token(&config.or(&top), &name, show),
        Some(Command::Keygen) => exit(
            flinks_proxy::ground::crypto::generate_key()
                .map(|k| println!("{k}"))
                .context("cannot generate a key"),
        ),
        Some(Command::Store {
            command: StoreCommand::Rekey,
            config,
        }) => store_command(&config.or(&top), Access::Write, None, |store, _| {
            Box::pin(async move {
                let r = store.rekey().await?;
                println!(
                    "re-sealed {} connections under key {} ({} already were; {} changed while being re-sealed and were read again)",
                    r.resealed,
                    store.key_id(),
                    r.current,
                    r.raced
                );
                Ok(())
            })
        }),
        Some(Command::Connections {
            command,
            pool,
            config,
        }) => {
            // Reads never write, so they cannot disturb a running proxy.
            let access = match command {
                ConnectionsCommand::Delete { .. } => Access::Write,
                ConnectionsCommand::List | ConnectionsCommand::Show { .. } => Access::ReadOnly,
            };
            store_command(&config.or(&top), access, pool, move |store, pool| {
                Box::pin(connections_command(store, pool, command))
            })
        }
        Some(Command::Demo {
            listen,
            admin,
            expires_in,
        }) => {
            if matches.value_source("config") == Some(ValueSource::CommandLine) {
                eprintln!("error: demo runs a built-in config; --config is not used");
                return ExitCode::from(EXIT_USAGE);
            }
            demo(&listen, &admin, expires_in)
        }
        Some(Command::Sandbox {
            token_listen,
            api_listen,
            expires_in,
            users,
        }) => sandbox(&token_listen, &api_listen, expires_in, users),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// `log.level` applies to this crate; dependencies stay at `warn` unless the
/// level is a full filter (has `=` or `,`). `RUST_LOG` overrides both.
fn init_logging(level: &str, format: LogFormat) {
    let directive = if level.contains('=') || level.contains(',') {
        level.to_owned()
    } else {
        format!("warn,flinks_proxy={level}")
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(directive));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

/// Runs `fut` on a new runtime: `workers` threads, 0 = one per core. One
/// worker gets tokio's current-thread scheduler, which skips the
/// work-stealing machinery a single thread does not need (measured in
/// benches/compare.sh).
fn block_on<T>(
    workers: usize,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        b.worker_threads(workers);
    }
    b.enable_all()
        .thread_name("flinks-proxy")
        .build()
        .context("cannot start the async runtime")?
        .block_on(fut)
}

/// Exit 0, or print the error chain on one line and exit 1.
fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.log.level, config.log.format);
    match block_on(config.server.workers, serve(config, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, as a log line in the configured format (not again on
            // stderr by `exit`).
            tracing::error!("{e:#}");
            ExitCode::from(serve_exit_code(&e))
        }
    }
}

/// A listen address that cannot be bound (in use, not local) is the
/// config's to fix, like any other bad value: 64; anything else 1.
fn serve_exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<flinks_proxy::StartError>() {
        Some(flinks_proxy::StartError::Bind(_)) => EXIT_BAD_CONFIG,
        _ => 1,
    }
}

async fn serve(config: Config, path: &Path) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let running = flinks_proxy::start(config).await?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let _ = flinks_proxy::proxy::reload::reload_file(running.state(), path).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down: draining in-flight requests (signal again to stop at once)");
    tokio::select! {
        _ = running.shutdown() => tracing::info!("stopped"),
        _ = term.recv() => tracing::warn!("second signal: stopping without waiting"),
        _ = int.recv() => tracing::warn!("second signal: stopping without waiting"),
    }
    Ok(())
}

fn check(path: &Path) -> ExitCode {
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
    let s = &config.server;
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
        flinks_proxy::config::format_size(s.replay_buffer_limit),
        if s.workers == 0 {
            "one per core".to_owned()
        } else {
            s.workers.to_string()
        }
    );
    if let Some(a) = config.admin_listen {
        println!("admin   {a}");
    }
    if !config.access.api_keys.is_empty() || !config.access.allow.is_empty() {
        println!(
            "access  {} API key(s); allow {}",
            config.access.api_keys.len(),
            if config.access.allow.is_empty() {
                "any address".to_string()
            } else {
                config
                    .access
                    .allow
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    println!("credentials:");
    for (name, c) in &config.credentials {
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
        if c.sends_secrets_in_clear() {
            eprintln!("warning: credentials.{name}.token_url is plain http:// beyond loopback: the client secret and tokens travel in clear; use https://");
        }
    }
    println!("routes:");
    for r in &config.routes {
        println!(
            "  {}: {}{}* -> {} with {}",
            r.name,
            r.host.as_deref().unwrap_or(""),
            r.path_prefix,
            r.upstream_url(),
            r.auth
        );
    }
    ExitCode::SUCCESS
}

fn token(path: &Path, name: &str, show: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging("warn", LogFormat::Text);
    let Some(cred) = config.credentials.get(name).cloned() else {
        eprintln!(
            "error: {}: no [credentials.{name}] (have: {})",
            path.display(),
            config
                .credentials
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        return ExitCode::from(EXIT_BAD_CONFIG);
    };
    let metrics = flinks_proxy::ground::metrics::Metrics::new();
    exit(block_on(1, async {
        let source = flinks_proxy::tokens::TokenSource::new(cred.clone(), metrics.credential(name))
            .map_err(|e| anyhow::anyhow!("credentials.{name}: {e}"))?;
        let t = source
            .fetch()
            .await
            .with_context(|| format!("credentials.{name}"))?;
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(t.expires_unix);
        println!("credential  {name}");
        println!("grant       {}", cred.grant_type.as_str());
        println!(
            "expires     {} (in {}s)",
            humantime::format_rfc3339_seconds(expires),
            t.lifetime.as_secs()
        );
        println!("scope       {}", t.scope.as_deref().unwrap_or("-"));
        println!("sub         {}", t.sub.as_deref().unwrap_or("-"));
        if show {
            println!("token       {}", t.secret().expose());
        }
        Ok(())
    }))
}

/// What `/status` and errors call the demo's config.
const DEMO_CONFIG: &str = "(built-in demo)";

fn demo(listen: &str, admin: &str, expires_in: u64) -> ExitCode {
    init_logging("info", LogFormat::Text);
    exit(block_on(0, demo_inner(listen, admin, expires_in)))
}

/// The demo's proxy.toml: one credential route on the sandbox and one
/// per-user pool over an SQLite store at `db`.
fn demo_toml(
    listen: &str,
    admin: &str,
    sandbox: &flinks_proxy::sandbox::Sandbox,
    opts: &flinks_proxy::sandbox::SandboxOptions,
    db: &Path,
    key: &str,
) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
[admin]
listen = "{admin}"
[credentials.flinks]
token_url = "{token_url}"
grant_type = "client_credentials"
client_id = "{client_id}"
client_secret = "{client_secret}"
scope = "{scope}"
[routes.flinks]
path_prefix = "/"
upstream = "{api}"
credential = "flinks"
[store]
url = "sqlite:{db}"
key = "{key}"
[connections.users]
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = "{client_secret}"
redirect_uri = "{redirect_uri}"
[routes.fdx]
path_prefix = "/api/fdx"
upstream = "{api}"
connections = "users"
"#,
        db = db.display(),
        redirect_uri = opts.redirect_uri,
        token_url = sandbox.token_url(),
        client_id = opts.client_id,
        client_secret = opts.client_secret,
        scope = opts.scope,
        api = sandbox.api_url(),
    )
}

/// What the demo prints: where everything listens and what to try.
fn print_demo_guide(
    running: &flinks_proxy::Running,
    sandbox: &flinks_proxy::sandbox::Sandbox,
    opts: &flinks_proxy::sandbox::SandboxOptions,
    folder: &Path,
) {
    let p = running.proxy_addr();
    println!();
    println!("flinks-proxy demo: a Flinks-like sandbox with the proxy in front.");
    println!("  token endpoint  {}", sandbox.token_url());
    println!(
        "  sandbox API     {}   (answers 401 without a valid token)",
        sandbox.api_url()
    );
    println!("  proxy           http://{p}");
    if let Some(a) = running.admin_addr() {
        println!("  admin           http://{a}");
    }
    println!();
    println!("Try (no credentials in these requests; the proxy adds the token):");
    println!("  curl -s http://{p}/api/v1/accounts");
    println!("  curl -s http://{p}/anything?x=1        # echoes what the API received, Authorization included");
    println!(
        "  curl -s {}/api/v1/accounts   # straight to the API: 401",
        sandbox.api_url()
    );
    if let Some(a) = running.admin_addr() {
        println!("  curl -s http://{a}/status");
        println!("  curl -s http://{a}/metrics | grep flinks_proxy_");
        println!();
        println!("Per-user connections (store: {}):", folder.display());
        println!("  # connect two users with the codes their bank redirect gave the app");
        println!(
            "  curl -s -X POST http://{a}/connections/users -d '{{\"code\": \"code-alice\"}}'"
        );
        println!("  curl -s -X POST http://{a}/connections/users -d '{{\"code\": \"code-bob\"}}'");
        println!("  # read each one's accounts: name the user, the proxy adds their token");
        println!("  curl -s -H 'X-Flinks-Connection: alice' http://{p}/api/fdx/5/accounts");
        println!("  curl -s -H 'X-Flinks-Connection: bob' http://{p}/api/fdx/5/accounts");
        println!("  # alice revokes her consent at the bank");
        println!(
            "  curl -s -X POST {}/sandbox/users/alice/revoke",
            sandbox.api_url()
        );
        println!("  curl -s -H 'X-Flinks-Connection: alice' http://{p}/api/fdx/5/accounts   # 401 code 602, passed through");
        println!("  curl -s -H 'X-Flinks-Connection: alice' http://{p}/api/fdx/5/accounts   # 401 reauthorization_required");
        println!("  curl -s http://{a}/connections/users/alice");
        println!("  # she authorizes again: a new code for the same id");
        println!("  CODE=$(curl -s -X POST {}/sandbox/users/alice/code | sed 's/.*\"code\":\"\\([^\"]*\\)\".*/\\1/')", sandbox.api_url());
        println!("  curl -s -X POST http://{a}/connections/users -d \"{{\\\"code\\\": \\\"$CODE\\\", \\\"id\\\": \\\"alice\\\"}}\"");
        println!();
        println!("The sandbox bank, for a [connections.*] pool of your own against it:");
        println!("  token_url       {}", sandbox.token_url());
        println!(
            "  client          client_id \"{}\", client_secret \"{}\"",
            opts.client_id, opts.client_secret
        );
        println!(
            "  redirect_uri    \"{}\"   (a code exchange must repeat it exactly, else 422)",
            opts.redirect_uri
        );
        let users: Vec<&str> = opts.users.iter().map(|u| u.sub.as_str()).collect();
        println!(
            "  users (sub)     {}   (first codes: {}; each code works once)",
            users.join(", "),
            opts.users
                .iter()
                .map(|u| u.code.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "  a new code      curl -s -X POST {}/sandbox/users/USER/code",
            sandbox.api_url()
        );
    }
    println!();
}

async fn demo_inner(listen: &str, admin: &str, expires_in: u64) -> anyhow::Result<()> {
    use flinks_proxy::sandbox::{Sandbox, SandboxOptions, SandboxUser};
    let opts = SandboxOptions {
        expires_in: Some(expires_in),
        users: vec![SandboxUser::new("alice"), SandboxUser::new("bob")],
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::start(opts.clone())
        .await
        .context("starting the sandbox")?;
    // The per-user connections live in an SQLite store in a temporary
    // folder, sealed with a fresh key.
    let folder = std::env::temp_dir().join(format!("flinks-proxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&folder).context("demo folder")?;
    let key = flinks_proxy::ground::crypto::generate_key().context("store key")?;
    let db = folder.join("connections.db");
    let toml = demo_toml(listen, admin, &sandbox, &opts, &db, &key);
    // Named for what it is: there is no file (shows in /status and errors).
    let config = Config::parse(&toml, Path::new(DEMO_CONFIG)).context("demo config")?;
    let running = flinks_proxy::start(config)
        .await
        .context("starting the proxy")?;
    print_demo_guide(&running, &sandbox, &opts, &folder);
    println!("Ctrl-C to stop.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    running.shutdown().await;
    drop(sandbox);
    let _ = std::fs::remove_dir_all(&folder);
    Ok(())
}

/// Builds the runtime of `config` as `check` does, and what it has to say
/// about the store: its key checked against the store's canary when the
/// store can be reached (a wrong key or a newer schema is an error; a store
/// not created yet or not reachable now is only said).
async fn check_runtime(config: Config) -> anyhow::Result<Option<String>> {
    use flinks_proxy::store::{Access, Store, StoreError};
    let Some(sc) = config.store.clone() else {
        flinks_proxy::AppState::new(config)?;
        return Ok(None);
    };
    let metrics = flinks_proxy::ground::metrics::Metrics::new();
    let store = std::sync::Arc::new(
        Store::new_for(&sc, metrics.store(), Access::ReadOnly)
            .await
            .context("store")?,
    );
    flinks_proxy::AppState::with_store(config, metrics, Some(std::sync::Arc::clone(&store)))?;
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

type StoreJob = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>>;

/// Opens the config's store (checking its key) and runs `job` on it with
/// the pool named by `--pool` (or the config's only pool).
fn store_command(
    path: &Path,
    access: flinks_proxy::store::Access,
    pool: Option<String>,
    job: impl FnOnce(std::sync::Arc<flinks_proxy::store::Store>, Option<String>) -> StoreJob,
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
        let metrics = flinks_proxy::ground::metrics::Metrics::new();
        let store = flinks_proxy::store::Store::open_for(&store_config, metrics.store(), access)
            .await
            .context("store")?;
        job(std::sync::Arc::new(store), pool).await
    }))
}

async fn connections_command(
    store: std::sync::Arc<flinks_proxy::store::Store>,
    pool: Option<String>,
    command: ConnectionsCommand,
) -> anyhow::Result<()> {
    let need_pool = || pool.clone().context("name the pool with --pool");
    match command {
        ConnectionsCommand::List => {
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
        }
        ConnectionsCommand::Show { id } => {
            let p = need_pool()?;
            let record = store
                .get(&p, &id)
                .await?
                .with_context(|| format!("pool {p} has no connection {id}"))?;
            println!("{}", serde_json::to_string_pretty(&record.info.to_json())?);
        }
        ConnectionsCommand::Delete { id } => {
            let p = need_pool()?;
            anyhow::ensure!(
                store.delete(&p, &id).await?,
                "pool {p} has no connection {id}"
            );
            println!("deleted {p}/{id} (a running proxy stops using it within 5 seconds)");
        }
    }
    Ok(())
}

fn sandbox(token_listen: &str, api_listen: &str, expires_in: u64, users: usize) -> ExitCode {
    init_logging("warn", LogFormat::Text);
    exit(block_on(1, async {
        use flinks_proxy::sandbox::{Sandbox, SandboxOptions, SandboxUser};
        let opts = SandboxOptions {
            expires_in: Some(expires_in),
            users: (0..users)
                .map(|i| SandboxUser::new(&format!("u{i}")))
                .collect(),
            ..SandboxOptions::default()
        };
        let sb = Sandbox::start_on(opts, token_listen.parse()?, api_listen.parse()?).await?;
        println!("token_url {}", sb.token_url());
        println!("api_url {}", sb.api_url());
        tokio::signal::ctrl_c().await?;
        Ok(())
    }))
}

fn healthcheck(url: Option<String>, path: &Path) -> ExitCode {
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let url = match url {
        Some(u) => u,
        None => match flinks_proxy::config::admin_listen(path) {
            Ok(mut addr) => {
                if addr.ip().is_unspecified() {
                    addr.set_ip(if addr.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                format!("http://{addr}/healthz")
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        },
    };
    let healthy = block_on(1, async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
        let uri: http::Uri = url.parse()?;
        let resp = tokio::time::timeout(Duration::from_secs(3), client.get(uri)).await??;
        Ok(resp.status() == http::StatusCode::OK)
    });
    if healthy.unwrap_or(false) {
        ExitCode::SUCCESS
    } else {
        eprintln!("unhealthy: {url} did not answer 200");
        ExitCode::FAILURE
    }
}
