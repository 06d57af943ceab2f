//! proxy.toml: parsing and validation into an immutable [`Config`].
//!
//! Parsing is strict (`deny_unknown_fields` everywhere: a typo must not
//! silently disable a setting). Validation resolves secrets, loads TLS
//! material and checks cross-references, so a `Config` that exists is one the
//! proxy can run. Errors name the file, the key and, where the parser knows
//! it, the line. This module builds nothing that runs: see `runtime`.
//!
//! One file per table, each holding the table as written (its serde
//! struct), as validated, its defaults and the `Ctx` method between the
//! two: `server`, `admin`, `log`, `access`, `store`, `credentials` (with
//! the token endpoint settings `connections` shares), `connections`,
//! `routes`; `units` holds the value syntaxes several tables use;
//! `discovery` reads and merges issuers' metadata (`discovery = true`).
//! This file holds `Config` and the order the tables are validated in.
//!
//! Below `config` are only the ground helpers (secrets, the store key's
//! decoder) and the transport helpers (header policy, TLS loading, the
//! HTTP client discovery fetches metadata with); it
//! imports nothing above it: no tokens, store or store backends,
//! connections, proxy, server or admin.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::ground::secret::Secret;

mod access;
mod admin;
mod connect;
mod connections;
mod credentials;
mod discovery;
mod log;
mod routes;
mod server;
mod store;
mod units;
pub mod webhooks;

pub use access::AccessConfig;
pub use admin::{admin_listen, DEFAULT_ADMIN_LISTEN};
pub use connect::{
    AllowedRedirect, ConnectConfig, CALLBACK_PATH, DEFAULT_SESSION_TTL, MAX_SESSION_TTL,
    MIN_SESSION_TTL,
};
pub use connections::{
    AuthorizeConfig, PoolConfig, DEFAULT_CACHE_SIZE, DEFAULT_REFRESH_CONCURRENCY,
    DEFAULT_REVOKED_CODES, DEFAULT_SELECT_HEADER, MAX_REFRESH_CONCURRENCY,
    RESERVED_AUTHORIZE_PARAMS, SESSION_AUTHORIZE_PARAMS,
};
pub use connections::{Keepalive, DEFAULT_KEEPALIVE_RATE, KEEPALIVE_LIMIT, MAX_KEEPALIVE_RATE};
pub use credentials::{
    BodyFormat, ClientAssertion, ClientAuth, CredentialConfig, GrantType, DEFAULT_REFRESH_BEFORE,
    DEFAULT_TOKEN_TIMEOUT,
};
pub use discovery::{
    well_known_urls, Discovered, DiscoveredKeys, FetchError, Metadata, DISCOVERY_TIMEOUT,
    MAX_METADATA,
};
pub use log::{LogConfig, LogFormat};
pub use routes::{
    prefix_matches, AuthScheme, RouteAuth, RouteConfig, DEFAULT_UPSTREAM_MAX_CONNECTIONS,
};
pub use server::{
    ServerConfig, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_LISTEN,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_REPLAY_BUFFER_LIMIT, DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE,
};
pub use store::{StoreConfig, StoreLocation, DEFAULT_STORE_MAX_CONNECTIONS, DEFAULT_STORE_URL};
pub use units::format_size;

use access::{open_pooled_listener, RawAccess};
use admin::RawAdmin;
use connect::RawConnect;
use connections::RawPool;
use credentials::RawCredential;
use log::RawLog;
use routes::RawRoute;
use server::RawServer;
use store::RawStore;
use webhooks::RawWebhooks;
pub use webhooks::{WebhooksConfig, EVENT_TYPES};

/// A config error: one line naming the file, the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The config file.
    pub file: String,
    /// The line, when the parser knows it.
    pub line: Option<usize>,
    /// `key: what is wrong`.
    pub message: String,
}

/// A validated, immutable configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[admin]`: where the admin listener listens.
    pub admin_listen: Option<SocketAddr>,
    /// `[admin] api_token`: required by the connections API when set.
    pub admin_api_token: Option<Secret>,
    /// `[admin] show_subjects`: whether `/status` shows `sub` claims.
    pub show_subjects: bool,
    /// `[log]`.
    pub log: LogConfig,
    /// `[access]`.
    pub access: AccessConfig,
    /// `[credentials.NAME]`, by name.
    pub credentials: BTreeMap<String, Arc<CredentialConfig>>,
    /// `[routes.NAME]`, by name.
    pub routes: Vec<RouteConfig>,
    /// `[store]`, required once a pool exists.
    pub store: Option<StoreConfig>,
    /// `[connections.NAME]` pools, by name.
    pub pools: BTreeMap<String, Arc<PoolConfig>>,
    /// `[connect]`: the hosted connect flow's listener.
    pub connect: Option<ConnectConfig>,
    /// `[webhooks]`: where lifecycle events are delivered.
    pub webhooks: Option<WebhooksConfig>,
    /// The endpoint keys read from issuers' metadata (`discovery = true`),
    /// by table (`credentials.NAME`, `connections.NAME`).
    pub discovered: BTreeMap<String, DiscoveredKeys>,
}

/// The file as written: one raw struct per table, each in its table's file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    admin: Option<RawAdmin>,
    #[serde(default)]
    log: RawLog,
    access: Option<RawAccess>,
    #[serde(default)]
    credentials: BTreeMap<String, RawCredential>,
    #[serde(default)]
    routes: BTreeMap<String, RawRoute>,
    store: Option<RawStore>,
    #[serde(default)]
    connections: BTreeMap<String, RawPool>,
    connect: Option<RawConnect>,
    webhooks: Option<RawWebhooks>,
}

impl Config {
    /// Reads and validates a config file, fetching the metadata of the
    /// issuers its tables discover their endpoints from (`discovery =
    /// true`; at most [`DISCOVERY_TIMEOUT`] per issuer, all at once).
    /// Blocking: from async code, call it on a blocking thread.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        let ctx = Ctx::new(path);
        let mut raw = ctx.deserialize(&text)?;
        let discovered = ctx.discover(&mut raw)?;
        Config::validate(&ctx, raw, path, &discovered)
    }

    /// Validates config text; `path` names it in errors and anchors relative
    /// file paths (secrets, certificates, state files). Fetches nothing: a
    /// table with `discovery = true` is an error (use [`Config::load`] or
    /// [`Config::parse_with`]).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_with(text, path, &Discovered::default())
    }

    /// [`Config::parse`] with issuers' metadata already read: the endpoints
    /// of tables with `discovery = true` come from `discovered`.
    pub fn parse_with(
        text: &str,
        path: &Path,
        discovered: &Discovered,
    ) -> Result<Config, ConfigError> {
        let ctx = Ctx::new(path);
        let raw = ctx.deserialize(text)?;
        Config::validate(&ctx, raw, path, discovered)
    }

    /// Discovered endpoints merged into the tables as if written, then the
    /// tables validated; an error about a discovered value says so.
    fn validate(
        ctx: &Ctx,
        mut raw: RawConfig,
        path: &Path,
        discovered: &Discovered,
    ) -> Result<Config, ConfigError> {
        let found = ctx.merge_discovered(&mut raw, discovered)?;
        match Config::validate_tables(ctx, raw, path) {
            Ok(config) => Ok(Config {
                discovered: found,
                ..config
            }),
            Err(e) => Err(discovery::blame(e, &found)),
        }
    }

    /// One step per table, each after the tables it refers to; the first
    /// error is the one reported.
    fn validate_tables(ctx: &Ctx, raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let server = ctx.server(raw.server)?;
        let log = ctx.log(raw.log)?;
        let access = ctx.access(raw.access)?;
        let credentials = ctx.credentials(raw.credentials)?;
        let pools = ctx.pools(raw.connections)?;
        let store = ctx.store(raw.store, &pools)?;
        let credentials = ctx.credentials_and_store(credentials, store.as_ref())?;
        let routes = ctx.routes(raw.routes, &credentials, &pools)?;
        open_pooled_listener(&server, &access, &routes).map_err(|m| ctx.err("access", m))?;
        let admin = ctx.admin(raw.admin, &pools)?;
        let connect = ctx.connect(raw.connect)?;
        ctx.connect_fits(connect.as_ref(), &pools, &server, admin.listen)?;
        let webhooks = ctx.webhooks(raw.webhooks)?;
        if webhooks.is_some() && store.is_none() {
            return Err(ctx.err(
                "webhooks",
                "needs a [store]: events are kept there until delivered".into(),
            ));
        }
        Ok(Config {
            source: path.to_path_buf(),
            server,
            admin_listen: Some(admin.listen),
            admin_api_token: admin.api_token,
            show_subjects: admin.show_subjects,
            store,
            pools,
            log,
            access,
            credentials,
            routes,
            connect,
            webhooks,
            discovered: BTreeMap::new(),
        })
    }
}

/// What validation needs to know about the file: its name for errors and
/// its folder for relative paths. Each table's file adds its methods.
struct Ctx {
    file: String,
    base: PathBuf,
}

impl Ctx {
    fn new(path: &Path) -> Ctx {
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        Ctx {
            file: path.display().to_string(),
            base: if base.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                base
            },
        }
    }

    /// An error about `key` (empty: about the file).
    fn err(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: None,
            message: if key.is_empty() {
                message
            } else {
                format!("{key}: {message}")
            },
        }
    }

    /// TOML → raw structs; errors carry the key path and the line.
    fn deserialize(&self, text: &str) -> Result<RawConfig, ConfigError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let key = if key == "." { String::new() } else { key };
            ConfigError {
                line,
                ..self.err(&key, inner.message().trim().to_owned())
            }
        })
    }

    fn load_certs(
        &self,
        key: &str,
        file: &Option<PathBuf>,
    ) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        match file {
            Some(p) => {
                crate::net::tls::load_certs(&self.base.join(p)).map_err(|m| self.err(key, m))
            }
            None => Ok(Vec::new()),
        }
    }

    /// `{prefix}client_cert` (a PEM file) and `{prefix}client_cert_key` (a
    /// secret): both or neither; the key must be the certificate's. Errors
    /// name the key at fault and never quote the key's text.
    fn client_cert(
        &self,
        prefix: &str,
        cert: &Option<PathBuf>,
        key: &Option<crate::ground::secret::SecretSource>,
    ) -> Result<Option<crate::net::tls::ClientCert>, ConfigError> {
        use crate::net::tls::{CertError, ClientCert};
        let (cert_key, key_key) = (
            format!("{prefix}client_cert"),
            format!("{prefix}client_cert_key"),
        );
        let (cert, key) = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(self.err(&key_key, "is required with client_cert".into()))
            }
            (None, Some(_)) => {
                return Err(self.err(&cert_key, "is required with client_cert_key".into()))
            }
            (Some(c), Some(k)) => (c, k),
        };
        let chain = self.load_certs(&cert_key, &Some(cert.clone()))?;
        let key = key.resolve(&self.base).map_err(|m| self.err(&key_key, m))?;
        ClientCert::new(chain, key.expose())
            .map(Some)
            .map_err(|e| match e {
                CertError::Cert(m) => self.err(&cert_key, m),
                CertError::Key(m) => self.err(&key_key, m),
            })
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("proxy.toml"))
    }

    pub(super) const GOOD: &str = r#"
[credentials.flinks]
token_url = "https://api.flinks.io/api/v1/token"
grant_type = "client_credentials"
client_id = "id"
client_secret = "s3cret"

[routes.flinks]
upstream = "https://ob.flinksapp.com/base/"
credential = "flinks"
"#;

    pub(super) const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    pub(super) fn pooled(store: &str, admin: &str, route: &str) -> String {
        format!(
            r#"
{admin}
{store}
[connections.users]
token_url = "https://api.flinks.io/api/v1/token"
client_id = "id"
redirect_uri = "https://app.example.com/cb"

[routes.ob]
upstream = "https://ob.flinksapp.com"
{route}
"#
        )
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.server.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.server.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        let r = &c.routes[0];
        assert_eq!(r.path_prefix, "/");
        assert_eq!(r.upstream_base_path, "/base");
        assert_eq!(r.reauth_on, vec![StatusCode::UNAUTHORIZED]);
        assert_eq!(r.scheme, AuthScheme::Bearer);
        assert_eq!(
            c.credentials["flinks"]
                .client_secret
                .as_ref()
                .unwrap()
                .expose(),
            "s3cret"
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = GOOD.replace("client_secret =", "clinet_secret =");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("proxy.toml:"), "{e}");
        assert!(e.contains("credentials.flinks"), "{e}");
        assert!(e.contains("clinet_secret"), "{e}");
        assert!(e.contains(":6:") || e.contains(":2:"), "line expected: {e}");
    }

    #[test]
    fn secret_values_never_appear_in_errors() {
        let text = GOOD.replace("https://ob.flinksapp.com/base/", "nope");
        let e = parse(&text).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("s3cret"));
    }
}
