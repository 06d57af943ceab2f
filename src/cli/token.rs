//! `flinks-proxy token`: fetches one token for a credential and describes it.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use crate::cli::{block_on, exit, init_logging, load, EXIT_BAD_CONFIG};
use crate::config::LogFormat;

/// Fetches a token for credential `name` of the config at `path` and prints
/// its grant, expiry, scope and subject (and the token itself with `show`).
pub fn token(path: &Path, name: &str, show: bool) -> ExitCode {
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
    let metrics = crate::ground::metrics::Metrics::new();
    exit(block_on(1, async {
        let source = crate::tokens::TokenSource::new(cred.clone(), metrics.credential(name))
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
            println!("token       {}", t.expose());
        }
        Ok(())
    }))
}
