//! The subcommands of the `flinks-proxy` command, one file each, and what
//! they share: loading the config, logging, the async runtime and the exit
//! codes. `main.rs` parses the command line and calls them.

pub mod bench_rows;
pub mod check;
pub mod demo;
pub mod healthcheck;
pub mod keygen;
pub mod store;
pub mod token;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::config::{Config, LogFormat};

/// Exit code for a config that cannot be used (sysexits EX_USAGE-style).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// The config at `path`, or its error printed and exit code 64.
pub fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// `log.level` applies to this crate; dependencies stay at `warn` unless the
/// level is a full filter (has `=` or `,`). `RUST_LOG` overrides both.
pub fn init_logging(level: &str, format: LogFormat) {
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
pub fn block_on<T>(
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
pub fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
