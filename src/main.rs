//! The `flinks-proxy` command: the command line (every subcommand, flag and
//! help text), dispatch, and serving the proxy until a signal (the default
//! command). The subcommands themselves are in the library's `cli` module.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use flinks_proxy::cli::{self, block_on, EXIT_BAD_CONFIG};
use flinks_proxy::config::Config;
use flinks_proxy::store::Access;

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
        /// Connect listener (the hosted connect flow's pages; browsers are
        /// sent to http://ADDR).
        #[arg(long, default_value = "127.0.0.1:8082")]
        connect: String,
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
    /// Print a new store key (base64 of 32 random bytes), or with
    /// --client-key a private_key_jwt key (PKCS#8 PEM) and its public JWK
    /// set for registration, or with --dpop a DPoP key (PKCS#8 PEM) and
    /// its public JWK and thumbprint. RSA keys (PS256, RS256) come from
    /// openssl: `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`.
    #[command(group(clap::ArgGroup::new("signing").args(["client_key", "dpop"])))]
    Keygen {
        /// A client assertion key instead of a store key.
        #[arg(long)]
        client_key: bool,
        /// A DPoP key (`dpop_key`) instead of a store key.
        #[arg(long)]
        dpop: bool,
        /// The key's algorithm: ES256 (EC P-256, the default) or EdDSA (Ed25519).
        #[arg(long, requires = "signing")]
        alg: Option<String>,
        /// The JWK's `kid` (default: its RFC 7638 thumbprint).
        #[arg(long, requires = "client_key")]
        kid: Option<String>,
    },
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
        /// Stateless bench users u0..u{N-1}, known by their tokens' form
        /// (seeded into a store with `bench-rows`).
        #[arg(long, default_value_t = 0)]
        bench_users: u64,
    },
    /// Write sealed connection rows of the sandbox's bench users as
    /// PostgreSQL COPY text to stdout (benches/scale.sh).
    #[command(hide = true)]
    BenchRows {
        #[command(flatten)]
        rows: cli::bench_rows::BenchRows,
        /// The store key (base64), as store.key.
        #[arg(long, env = "FLINKS_PROXY_STORE_KEY", hide_env_values = true)]
        key: String,
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

/// Parses the command line and runs the command it names (serving when none).
fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let args = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let top = args.config;
    match args.command {
        None => run(&ConfigPath { config: None }.or(&top)),
        Some(Command::Check { config }) => cli::check::check(&config.or(&top)),
        Some(Command::Healthcheck { url, config }) => {
            cli::healthcheck::healthcheck(url, &config.or(&top))
        }
        Some(Command::Token { name, show, config }) => {
            cli::token::token(&config.or(&top), &name, show)
        }
        Some(Command::Keygen {
            client_key,
            dpop,
            alg,
            kid,
        }) => cli::exit(cli::keygen::keygen(if client_key {
            cli::keygen::KeygenWhat::ClientKey { alg, kid }
        } else if dpop {
            cli::keygen::KeygenWhat::DpopKey { alg }
        } else {
            cli::keygen::KeygenWhat::StoreKey
        })),
        Some(Command::Store {
            command: StoreCommand::Rekey,
            config,
        }) => cli::store::store_command(&config.or(&top), Access::Write, None, |store, _| {
            Box::pin(cli::store::rekey(store))
        }),
        Some(Command::Connections {
            command,
            pool,
            config,
        }) => connections(command, pool, &config.or(&top)),
        Some(Command::Demo {
            listen,
            admin,
            connect,
            expires_in,
        }) => {
            let addrs = cli::demo::DemoAddrs {
                listen: &listen,
                admin: &admin,
                connect: &connect,
            };
            demo(&matches, &addrs, expires_in)
        }
        Some(Command::Sandbox {
            token_listen,
            api_listen,
            expires_in,
            users,
            bench_users,
        }) => cli::demo::sandbox(&token_listen, &api_listen, expires_in, users, bench_users),
        Some(Command::BenchRows { rows, key }) => {
            cli::exit(cli::bench_rows::bench_rows(&rows, &key))
        }
    }
}

/// `demo`, refused (a usage error) when `--config` is on the command line.
fn demo(matches: &ArgMatches, addrs: &cli::demo::DemoAddrs<'_>, expires_in: u64) -> ExitCode {
    if matches.value_source("config") == Some(ValueSource::CommandLine) {
        eprintln!("error: demo runs a built-in config; --config is not used");
        return ExitCode::from(EXIT_USAGE);
    }
    cli::demo::demo(addrs, expires_in)
}

/// `connections list|show|delete` on the store of the config at `path`.
fn connections(command: ConnectionsCommand, pool: Option<String>, path: &Path) -> ExitCode {
    // Reads never write, so they cannot disturb a running proxy.
    let access = match command {
        ConnectionsCommand::Delete { .. } => Access::Write,
        ConnectionsCommand::List | ConnectionsCommand::Show { .. } => Access::ReadOnly,
    };
    cli::store::store_command(path, access, pool, move |store, pool| match command {
        ConnectionsCommand::List => Box::pin(cli::store::list(store, pool)),
        ConnectionsCommand::Show { id } => Box::pin(cli::store::show(store, pool, id)),
        ConnectionsCommand::Delete { id } => Box::pin(cli::store::delete(store, pool, id)),
    })
}

fn run(path: &Path) -> ExitCode {
    let config = match cli::load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    cli::init_logging(&config.log.level, config.log.format);
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
