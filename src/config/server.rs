//! `[server]`: the proxy listener (address, TLS and client certificates)
//! and the limits and timeouts every connection and request runs under.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::units::{byte_size, duration, socket_addr};
use super::{ConfigError, Ctx};

/// Where the proxy listens when `server.listen` is not set.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Until the upstream's response headers; long enough for slow bank
/// aggregation calls, short enough that a stuck upstream frees its client.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Slowloris bound: a client has this long to send its request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// No bytes on a body in either direction, or an idle keep-alive
/// connection, for this long ends it: longer than any pause a healthy
/// streaming upstream makes, short enough that a stalled one does not hold a
/// client, an upstream connection and a connection slot for long. Matches
/// the usual 60 s idle timeout of load balancers in front of the proxy.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// All request bodies buffered for a replay at once: 1024 bodies of the
/// 64 KiB maximum, a ceiling a small container can afford.
pub const DEFAULT_REPLAY_BUFFER_LIMIT: usize = 64 * 1024 * 1024;
/// Far above what one proxy replica normally holds, far below fd limits.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Longest server timeout accepted: far beyond any sensible value, and keeps
/// every deadline computed from one far from overflowing.
const MAX_SERVER_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Far beyond any file descriptor limit; keeps the connection semaphore in
/// range.
const MAX_CONNECTIONS_CEILING: usize = 1_000_000;
/// Load balancers usually wait 30 s between deregistration and SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    #[serde(default = "default_listen", with = "socket_addr")]
    listen: SocketAddr,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    #[serde(default = "d_request_timeout", with = "duration")]
    request_timeout: Duration,
    #[serde(default = "d_header_read_timeout", with = "duration")]
    header_read_timeout: Duration,
    #[serde(default = "d_idle_timeout", with = "duration")]
    idle_timeout: Duration,
    #[serde(default = "d_replay_buffer_limit", with = "byte_size")]
    replay_buffer_limit: usize,
    #[serde(default = "d_max_connections")]
    max_connections: usize,
    #[serde(default)]
    workers: usize,
    #[serde(default = "d_shutdown_grace", with = "duration")]
    shutdown_grace: Duration,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: default_listen(),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            replay_buffer_limit: DEFAULT_REPLAY_BUFFER_LIMIT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            workers: 0,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("constant address")
}
fn d_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}
fn d_header_read_timeout() -> Duration {
    DEFAULT_HEADER_READ_TIMEOUT
}
fn d_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn d_replay_buffer_limit() -> usize {
    DEFAULT_REPLAY_BUFFER_LIMIT
}
fn d_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn d_shutdown_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}

/// `[server]`.
#[derive(Clone)]
pub struct ServerConfig {
    /// Listener address.
    pub listen: SocketAddr,
    /// TLS on the listener, loaded (certificate, key, client CA).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether client certificates are required.
    pub mtls: bool,
    /// Until the upstream's response headers (includes waiting for a token).
    pub request_timeout: Duration,
    /// A client must send its request headers within this.
    pub header_read_timeout: Duration,
    /// No body bytes in either direction, or an idle connection, this long
    /// ends the exchange or closes the connection.
    pub idle_timeout: Duration,
    /// Bytes of request bodies buffered for replays at once, all requests
    /// together; over it a request streams and is not replayed.
    pub replay_buffer_limit: usize,
    /// Connections served at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// Runtime worker threads; 0 = one per core.
    pub workers: usize,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("tls", &self.tls.is_some())
            .field("mtls", &self.mtls)
            .field("request_timeout", &self.request_timeout)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("replay_buffer_limit", &self.replay_buffer_limit)
            .field("max_connections", &self.max_connections)
            .field("workers", &self.workers)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

impl Ctx {
    /// `[server]`.
    pub(super) fn server(&self, s: RawServer) -> Result<ServerConfig, ConfigError> {
        let tls = self.server_tls(&s)?;
        self.server_limits(&s)?;
        Ok(ServerConfig {
            listen: s.listen,
            mtls: s.client_ca.is_some(),
            tls,
            request_timeout: s.request_timeout,
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
            replay_buffer_limit: s.replay_buffer_limit,
            max_connections: s.max_connections,
            workers: s.workers,
            shutdown_grace: s.shutdown_grace,
        })
    }

    /// `tls_cert` and `tls_key` together, `client_ca` only with them;
    /// loaded here so that a bad file fails the config.
    fn server_tls(&self, s: &RawServer) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        let base = &self.base;
        let tls = match (&s.tls_cert, &s.tls_key) {
            (None, None) => {
                if s.client_ca.is_some() {
                    return Err(self.err(
                        "server.client_ca",
                        "needs server.tls_cert and server.tls_key".into(),
                    ));
                }
                None
            }
            (Some(cert), Some(key)) => {
                let ca = s.client_ca.as_ref().map(|p| base.join(p));
                Some(
                    crate::net::tls::server_config(
                        &base.join(cert),
                        &base.join(key),
                        ca.as_deref(),
                    )
                    .map_err(|m| self.err("server.tls_cert", m))?,
                )
            }
            (Some(_), None) => {
                return Err(self.err("server.tls_key", "is required with server.tls_cert".into()))
            }
            (None, Some(_)) => {
                return Err(self.err("server.tls_cert", "is required with server.tls_key".into()))
            }
        };
        Ok(tls)
    }

    /// Connection and timeout bounds: positive, and far from overflowing.
    fn server_limits(&self, s: &RawServer) -> Result<(), ConfigError> {
        if s.max_connections == 0 {
            return Err(self.err("server.max_connections", "must be at least 1".into()));
        }
        if s.max_connections > MAX_CONNECTIONS_CEILING {
            return Err(self.err(
                "server.max_connections",
                format!("must be at most {MAX_CONNECTIONS_CEILING}"),
            ));
        }
        for (key, d) in [
            ("server.request_timeout", s.request_timeout),
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.idle_timeout", s.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(self.err(key, "must be greater than zero".into()));
            }
        }
        for (key, d) in [
            ("server.request_timeout", s.request_timeout),
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.idle_timeout", s.idle_timeout),
            ("server.shutdown_grace", s.shutdown_grace),
        ] {
            if d > MAX_SERVER_DURATION {
                return Err(self.err(key, "must be at most 1 day".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, GOOD};

    #[test]
    fn bad_duration_names_the_key() {
        let text = format!("[server]\nrequest_timeout = \"soon\"\n{GOOD}");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("server.request_timeout"), "{e}");
    }

    #[test]
    fn idle_timeout_and_replay_buffer_limit_have_defaults_and_parse() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.server.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(c.server.replay_buffer_limit, 64 * 1024 * 1024);
        let text =
            format!("[server]\nidle_timeout = \"300ms\"\nreplay_buffer_limit = \"512KiB\"\n{GOOD}");
        let c = parse(&text).unwrap();
        assert_eq!(c.server.idle_timeout, Duration::from_millis(300));
        assert_eq!(c.server.replay_buffer_limit, 512 * 1024);
        let c = parse(&format!("[server]\nreplay_buffer_limit = 100\n{GOOD}")).unwrap();
        assert_eq!(c.server.replay_buffer_limit, 100);
        for bad in ["\"64MB\"", "\"lots\"", "-1"] {
            let text = format!("[server]\nreplay_buffer_limit = {bad}\n{GOOD}");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("server.replay_buffer_limit"), "{bad}: {e}");
            assert!(e.contains("expected a size like"), "{bad}: {e}");
        }
        let e = parse(&format!("[server]\nidle_timeout = \"0s\"\n{GOOD}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.idle_timeout: must be greater than zero"),
            "{e}"
        );
    }
}
