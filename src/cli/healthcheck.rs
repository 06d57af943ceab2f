//! `flinks-proxy healthcheck`: exit 0 if the running proxy's admin
//! `/healthz` answers 200 (a container HEALTHCHECK).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{block_on, EXIT_BAD_CONFIG};

/// Asks `url`, else the `/healthz` of `[admin] listen` in the config at
/// `path` (an unspecified address asked on loopback).
pub fn healthcheck(url: Option<String>, path: &Path) -> ExitCode {
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let url = match url {
        Some(u) => u,
        None => match crate::config::admin_listen(path) {
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
