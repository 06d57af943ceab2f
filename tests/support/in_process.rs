//! The sandbox and the proxy running inside the test process.

use std::path::Path;

use flinks_proxy::sandbox::{Sandbox, SandboxOptions};
use flinks_proxy::{Config, Running};

/// A sandbox with default options.
pub async fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions::default())
        .await
        .expect("sandbox")
}

/// A sandbox with options.
pub async fn sandbox_with(opts: SandboxOptions) -> Sandbox {
    Sandbox::start(opts).await.expect("sandbox")
}

/// Parses config text (relative paths resolve against `dir`).
pub fn parse_config(toml: &str, dir: &Path) -> Config {
    Config::parse(toml, &dir.join("proxy.toml")).unwrap_or_else(|e| panic!("config: {e}\n{toml}"))
}

/// Starts the proxy in this process.
pub async fn start_proxy(toml: &str) -> Running {
    let dir = std::env::temp_dir();
    flinks_proxy::start(parse_config(toml, &dir))
        .await
        .expect("proxy starts")
}
