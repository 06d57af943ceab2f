//! proxy.toml: parsing and validation into an immutable [`Config`].
//!
//! Parsing is strict (`deny_unknown_fields` everywhere: a typo must not
//! silently disable a setting). Validation resolves secrets, loads TLS
//! material and checks cross-references, so a `Config` that exists is one the
//! proxy can run. Errors name the file, the key and, where the parser knows
//! it, the line. This module builds nothing that runs: see `runtime`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use http::{StatusCode, Uri};
use ipnet::IpNet;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::ground::secret::{Secret, SecretSource};

/// Where the proxy listens when `server.listen` is not set.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where the admin listener listens when `[admin]` is not set: loopback only,
/// because `/status` and `/metrics` describe the deployment.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
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
/// Renew a token this long before it expires (capped at half its lifetime).
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(60);
/// One token request, end to end.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one upstream pool may hold open (`routes.NAME.max_connections`):
/// above the concurrency one replica sees in steady load, so it only bites
/// when an upstream slows down and requests pile up, and well below the
/// file-descriptor limits of both sides.
pub const DEFAULT_UPSTREAM_MAX_CONNECTIONS: usize = 1024;
/// The store when `[store] url` is not set: one SQLite file next to the
/// config, so a single instance needs no database server.
pub const DEFAULT_STORE_URL: &str = "sqlite:connections.db";
/// `[store] max_connections`: enough for a busy replica's refreshes and
/// cold reads (a warm cache makes no store round trip), small enough that
/// a few replicas fit PostgreSQL's default `max_connections` of 100.
pub const DEFAULT_STORE_MAX_CONNECTIONS: u32 = 10;
/// The header that names a connection on a pooled route.
pub const DEFAULT_SELECT_HEADER: &str = "x-flinks-connection";
/// Flinks answers 401 with `"code": "602"` when the user's consent is gone.
pub const DEFAULT_REVOKED_CODES: &[&str] = &["602"];
/// Access tokens kept in memory per pool: 10,000 users fit in a few MiB.
pub const DEFAULT_CACHE_SIZE: u64 = 10_000;
/// Refreshes per pool in flight at once: a thousand connections entering
/// their refresh window together must not send a thousand token requests
/// (nor exhaust the store's connections). Refreshes a request waits for
/// queue for a slot; background ones skip when none is free and are tried
/// at a later request (the token is still good).
pub const DEFAULT_REFRESH_CONCURRENCY: usize = 32;
/// More would defeat the bound.
pub const MAX_REFRESH_CONCURRENCY: usize = 4096;

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

/// How the token request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// `application/json` (Flinks).
    #[default]
    Json,
    /// `application/x-www-form-urlencoded` (RFC 6749).
    Form,
}

impl BodyFormat {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyFormat::Json => "json",
            BodyFormat::Form => "form",
        }
    }
}

/// Where the client credentials go in a token request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` as body fields (Flinks).
    #[default]
    Body,
    /// HTTP Basic authentication (RFC 6749 §2.3.1).
    Basic,
}

impl ClientAuth {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Body => "body",
            ClientAuth::Basic => "basic",
        }
    }
}

/// The OAuth 2.0 grant a credential uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    /// Application tokens from client id and secret.
    ClientCredentials,
    /// Access tokens from a long-lived refresh token.
    RefreshToken,
    /// A one-time code exchanged for a refresh token, then `RefreshToken`.
    AuthorizationCode,
}

impl GrantType {
    /// The `grant_type` value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::ClientCredentials => "client_credentials",
            GrantType::RefreshToken => "refresh_token",
            GrantType::AuthorizationCode => "authorization_code",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

// ---------------------------------------------------------------- raw file

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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<SecretSource>,
    key: SecretSource,
    #[serde(default)]
    old_keys: Vec<SecretSource>,
    max_connections: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    token_url: String,
    client_id: String,
    client_secret: Option<SecretSource>,
    scope: Option<String>,
    redirect_uri: Option<String>,
    #[serde(default)]
    client_auth: ClientAuth,
    #[serde(default)]
    body_format: BodyFormat,
    #[serde(default = "d_refresh_before", with = "humantime_serde")]
    refresh_before: Duration,
    #[serde(default = "d_token_timeout", with = "humantime_serde")]
    token_timeout: Duration,
    #[serde(default)]
    extra: BTreeMap<String, String>,
    ca_file: Option<PathBuf>,
    select_header: Option<String>,
    revoked_codes: Option<Vec<String>>,
    cache_size: Option<u64>,
    refresh_concurrency: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
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
fn d_refresh_before() -> Duration {
    DEFAULT_REFRESH_BEFORE
}
fn d_token_timeout() -> Duration {
    DEFAULT_TOKEN_TIMEOUT
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen", with = "socket_addr")]
    listen: SocketAddr,
    api_token: Option<SecretSource>,
    /// `/status` shows each credential's `sub` claim (personal data).
    #[serde(default)]
    show_subjects: bool,
}

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN.parse().expect("constant address")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default = "default_level")]
    level: String,
    #[serde(default)]
    format: LogFormat,
    #[serde(default = "d_access_log")]
    access: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: default_level(),
            format: LogFormat::Text,
            access: true,
        }
    }
}

/// The access log is on unless turned off: it is what an operator reads
/// first, and what Flinks support asks for (`ob-correlation-id`).
fn d_access_log() -> bool {
    true
}

fn default_level() -> String {
    "info".to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    #[serde(default)]
    api_keys: Vec<SecretSource>,
    #[serde(default)]
    allow: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    token_url: String,
    grant_type: GrantType,
    client_id: String,
    client_secret: Option<SecretSource>,
    scope: Option<String>,
    #[serde(default)]
    client_auth: ClientAuth,
    #[serde(default)]
    body_format: BodyFormat,
    #[serde(default = "d_refresh_before", with = "duration")]
    refresh_before: Duration,
    #[serde(default = "d_token_timeout", with = "duration")]
    token_timeout: Duration,
    refresh_token: Option<SecretSource>,
    code: Option<SecretSource>,
    redirect_uri: Option<String>,
    state_file: Option<PathBuf>,
    #[serde(default)]
    shared: bool,
    #[serde(default)]
    extra: BTreeMap<String, String>,
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default = "default_prefix")]
    path_prefix: String,
    upstream: String,
    credential: Option<String>,
    connections: Option<String>,
    host: Option<String>,
    strip_prefix: Option<String>,
    header: Option<String>,
    scheme: Option<String>,
    reauth_on: Option<Vec<u16>>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    preserve_host: bool,
    max_connections: Option<usize>,
}

fn default_prefix() -> String {
    "/".to_owned()
}

// ----------------------------------------------------------- validated

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
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreLocation {
    /// An SQLite file (absolute, or resolved against the config folder).
    Sqlite(PathBuf),
    /// A PostgreSQL URL (a secret: it may carry a password).
    Postgres(Secret),
}

impl StoreLocation {
    /// `sqlite` or `postgres`, for `/status` and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreLocation::Sqlite(_) => "sqlite",
            StoreLocation::Postgres(_) => "postgres",
        }
    }
}

/// `[store]`: where connections are kept, and the keys that seal them.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// The database.
    pub location: StoreLocation,
    /// Base64 of 32 bytes; seals and opens (checked at load).
    pub key: Secret,
    /// Keys that only open.
    pub old_keys: Vec<Secret>,
    /// Database connections this process keeps at most (PostgreSQL; one
    /// more is held for LISTEN).
    pub max_connections: u32,
}

/// One `[connections.NAME]`: an OAuth client whose users' tokens are kept
/// in the store. Compared whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// The table name.
    pub name: String,
    /// The token endpoint.
    pub token_url: Uri,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Option<Secret>,
    /// Requested scope on refresh.
    pub scope: Option<String>,
    /// Sent with codes when the admin request names none.
    pub redirect_uri: Option<String>,
    /// Body fields or HTTP Basic.
    pub client_auth: ClientAuth,
    /// JSON or form body.
    pub body_format: BodyFormat,
    /// Renew this long before expiry (capped at half the lifetime).
    pub refresh_before: Duration,
    /// One token request, end to end.
    pub token_timeout: Duration,
    /// Extra token request fields.
    pub extra: Vec<(String, String)>,
    /// Extra trust roots for the token endpoint.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// The request header naming the connection (removed before forwarding).
    pub select_header: HeaderName,
    /// Upstream error `code`s meaning the user's consent is gone.
    pub revoked_codes: Vec<String>,
    /// Access tokens kept in memory.
    pub cache_size: u64,
    /// Refreshes of this pool's connections in flight at once, at most.
    pub refresh_concurrency: usize,
}

/// Where a route's token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAuth {
    /// `credential = "NAME"`: one token for every request.
    Credential(String),
    /// `connections = "NAME"`: the token of the connection each request names.
    Connections(String),
}

impl fmt::Display for RouteAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteAuth::Credential(n) => write!(f, "credential {n}"),
            RouteAuth::Connections(n) => write!(f, "connections {n}"),
        }
    }
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

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `tracing` filter directive (`RUST_LOG` overrides it).
    pub level: String,
    /// Text or JSON lines.
    pub format: LogFormat,
    /// One line per request (`[log] access`).
    pub access: bool,
}

/// `[access]`: who may use the proxy.
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    /// Accepted `Proxy-Authorization: Bearer` keys; empty = no key needed.
    pub api_keys: Vec<Secret>,
    /// Client networks allowed; empty = any.
    pub allow: Vec<IpNet>,
}

/// One `[credentials.NAME]`: everything needed to obtain its tokens.
/// Compared whole on reload: an unchanged credential keeps its token.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialConfig {
    /// The table name.
    pub name: String,
    /// The token endpoint.
    pub token_url: Uri,
    /// Which grant.
    pub grant_type: GrantType,
    /// OAuth client id (not secret, printed by `check`).
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Option<Secret>,
    /// Requested scope.
    pub scope: Option<String>,
    /// Body fields or HTTP Basic.
    pub client_auth: ClientAuth,
    /// JSON or form body.
    pub body_format: BodyFormat,
    /// Renew this long before expiry (capped at half the lifetime).
    pub refresh_before: Duration,
    /// One token request, end to end.
    pub token_timeout: Duration,
    /// The configured refresh token (`refresh_token` grant).
    pub refresh_token: Option<Secret>,
    /// The authorization code (`authorization_code` grant).
    pub code: Option<Secret>,
    /// The redirect URI sent with the code.
    pub redirect_uri: Option<String>,
    /// Where the refresh token is kept across restarts (without a store).
    pub state_file: Option<PathBuf>,
    /// `shared = true` (client_credentials): one token for every replica,
    /// kept in the store.
    pub shared: bool,
    /// Its tokens live in the `[store]` (refresh grants whenever there is a
    /// store; client_credentials with `shared = true`), under the store's
    /// cross-replica lease, instead of `state_file`.
    pub in_store: bool,
    /// Extra token request fields.
    pub extra: Vec<(String, String)>,
    /// Extra trust roots for the token endpoint.
    pub ca_certs: Vec<CertificateDer<'static>>,
}

impl CredentialConfig {
    /// Whether the token URL is plain `http://` to a host beyond loopback:
    /// the client secret and refresh token then travel in clear.
    pub fn sends_secrets_in_clear(&self) -> bool {
        if self.token_url.scheme() != Some(&http::uri::Scheme::HTTP) {
            return false;
        }
        let host = self.token_url.host().unwrap_or("");
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        !loopback
    }
}

/// How the token is written into the injected header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthScheme {
    /// `Bearer TOKEN`.
    Bearer,
    /// The bare token.
    Bare,
    /// `SCHEME TOKEN`.
    Other(String),
}

/// One `[routes.NAME]`.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The table name (metrics label).
    pub name: String,
    /// Lower-case host to match, without port.
    pub host: Option<String>,
    /// Path prefix, matched at a `/` boundary.
    pub path_prefix: String,
    /// Removed from the path before forwarding.
    pub strip_prefix: Option<String>,
    /// `http` or `https`.
    pub upstream_scheme: Scheme,
    /// Upstream host and port.
    pub upstream_authority: Authority,
    /// Upstream base path ("" or "/base", no trailing slash).
    pub upstream_base_path: String,
    /// The credential or pool that gives it tokens.
    pub auth: RouteAuth,
    /// Header that carries the token.
    pub header: HeaderName,
    /// How the token is written in it.
    pub scheme: AuthScheme,
    /// Upstream statuses that mean "token rejected".
    pub reauth_on: Vec<StatusCode>,
    /// Extra trust roots for this upstream.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Forward the client's Host header.
    pub preserve_host: bool,
    /// Most connections open to the upstream; routes sharing an upstream
    /// share one pool, which takes the largest of their limits.
    pub max_connections: usize,
}

impl RouteConfig {
    /// The upstream URL as configured, for humans.
    pub fn upstream_url(&self) -> String {
        format!(
            "{}://{}{}",
            self.upstream_scheme, self.upstream_authority, self.upstream_base_path
        )
    }
}

/// A proxy listener beyond loopback that serves per-user connections must
/// say who may use it (`[access]` keys or networks, or client
/// certificates): otherwise anyone who reaches it acts as any user by
/// naming their id (by default the token's guessable `sub`). Like the admin
/// `api_token` rule, this is an error, not a warning.
fn open_pooled_listener(
    server: &ServerConfig,
    access: &AccessConfig,
    routes: &[RouteConfig],
) -> Result<(), String> {
    let pooled = routes
        .iter()
        .find(|r| matches!(r.auth, RouteAuth::Connections(_)));
    let open = access.api_keys.is_empty() && access.allow.is_empty() && !server.mtls;
    match pooled {
        Some(r) if open && !server.listen.ip().is_loopback() => Err(format!(
            "is required: server.listen ({}) is beyond loopback and routes.{} serves per-user connections, so without [access] api_keys or allow (or client certificates) anyone who reaches the proxy can act as any user by naming their connection id",
            server.listen, r.name
        )),
        _ => Ok(()),
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Validates config text; `path` names it in errors and anchors relative
    /// file paths (secrets, certificates, state files).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let ctx = Ctx::new(path);
        let raw = ctx.deserialize(text)?;
        let server = ctx.server(raw.server)?;
        tracing_subscriber::EnvFilter::try_new(&raw.log.level)
            .map_err(|e| ctx.err("log.level", format!("not a valid level or filter: {e}")))?;
        let access = ctx.access(raw.access)?;
        let mut raw_credentials = BTreeMap::new();
        for (name, c) in raw.credentials {
            let cred = ctx.credential(&name, c)?;
            raw_credentials.insert(name, cred);
        }
        let mut pools = BTreeMap::new();
        for (name, p) in raw.connections {
            let pool = ctx.pool(&name, p)?;
            pools.insert(name, Arc::new(pool));
        }
        let store = ctx.store(raw.store, &pools)?;
        ctx.credentials_and_store(&mut raw_credentials, store.as_ref())?;
        let credentials: BTreeMap<String, Arc<CredentialConfig>> = raw_credentials
            .into_iter()
            .map(|(n, c)| (n, Arc::new(c)))
            .collect();
        unique_state_files(&credentials).map_err(|(k, m)| ctx.err(&k, m))?;
        let mut routes = Vec::new();
        for (name, r) in raw.routes {
            let route = ctx.route(&name, r, &credentials, &pools, &routes)?;
            routes.push(route);
        }
        open_pooled_listener(&server, &access, &routes).map_err(|m| ctx.err("access", m))?;
        let show_subjects = raw.admin.as_ref().is_some_and(|a| a.show_subjects);
        let (admin_listen, admin_api_token) = ctx.admin(raw.admin, &pools)?;
        Ok(Config {
            source: path.to_path_buf(),
            server,
            admin_listen: Some(admin_listen),
            admin_api_token,
            show_subjects,
            store,
            pools,
            log: LogConfig {
                level: raw.log.level,
                format: raw.log.format,
                access: raw.log.access,
            },
            access,
            credentials,
            routes,
        })
    }
}

/// Reads only `[admin] listen` from a config file (default
/// [`DEFAULT_ADMIN_LISTEN`]): other tables are not validated and secrets
/// are not resolved, so `healthcheck` works without them.
pub fn admin_listen(path: &Path) -> Result<SocketAddr, ConfigError> {
    #[derive(Deserialize)]
    struct File {
        admin: Option<Admin>,
    }
    #[derive(Deserialize)]
    struct Admin {
        #[serde(default, with = "socket_addr::option")]
        listen: Option<SocketAddr>,
    }
    let ctx = Ctx::new(path);
    let text =
        std::fs::read_to_string(path).map_err(|e| ctx.err("", format!("cannot read: {e}")))?;
    let file: File =
        serde_path_to_error::deserialize(toml::Deserializer::new(&text)).map_err(|e| {
            ctx.err(
                &e.path().to_string(),
                e.into_inner().message().trim().to_owned(),
            )
        })?;
    Ok(file
        .admin
        .and_then(|a| a.listen)
        .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.parse().expect("constant address")))
}

/// What validation needs to know about the file: its name for errors and
/// its folder for relative paths. One method per table.
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

    /// `[server]`.
    fn server(&self, s: RawServer) -> Result<ServerConfig, ConfigError> {
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

    /// `[access]`.
    fn access(&self, raw: Option<RawAccess>) -> Result<AccessConfig, ConfigError> {
        let mut access = AccessConfig::default();
        let Some(a) = raw else {
            return Ok(access);
        };
        for (i, k) in a.api_keys.iter().enumerate() {
            access.api_keys.push(
                k.resolve(&self.base)
                    .map_err(|m| self.err(&format!("access.api_keys[{i}]"), m))?,
            );
        }
        for (i, net) in a.allow.iter().enumerate() {
            let parsed = net
                .parse::<IpNet>()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    self.err(
                        &format!("access.allow[{i}]"),
                        format!("{net:?} is not an address or CIDR network"),
                    )
                })?;
            access.allow.push(parsed);
        }
        Ok(access)
    }

    /// One `[credentials.NAME]`.
    fn credential(&self, name: &str, c: RawCredential) -> Result<CredentialConfig, ConfigError> {
        let key = |k: &str| format!("credentials.{name}.{k}");
        let resolve = |k: &str, s: &Option<SecretSource>| {
            s.as_ref()
                .map(|s| s.resolve(&self.base))
                .transpose()
                .map_err(|m| self.err(&key(k), m))
        };
        self.grant_keys(name, &c)?;
        let (token_url, ca_certs) = self.endpoint(
            &key(""),
            &EndpointKeys {
                token_url: &c.token_url,
                client_id: &c.client_id,
                token_timeout: c.token_timeout,
                extra: &c.extra,
                ca_file: &c.ca_file,
            },
        )?;
        Ok(CredentialConfig {
            name: name.to_owned(),
            token_url,
            grant_type: c.grant_type,
            client_id: c.client_id,
            client_secret: resolve("client_secret", &c.client_secret)?,
            scope: c.scope,
            client_auth: c.client_auth,
            body_format: c.body_format,
            refresh_before: c.refresh_before,
            token_timeout: c.token_timeout,
            refresh_token: resolve("refresh_token", &c.refresh_token)?,
            code: resolve("code", &c.code)?,
            redirect_uri: c.redirect_uri,
            state_file: c.state_file.map(|p| self.base.join(p)),
            shared: c.shared,
            in_store: false,
            extra: c.extra.into_iter().collect(),
            ca_certs,
        })
    }

    /// What credentials and pools share about their token endpoint:
    /// `token_url`, `client_id`, `token_timeout`, `extra`, `ca_file`.
    /// `prefix` is the table's key path ending in a dot.
    fn endpoint(
        &self,
        prefix: &str,
        e: &EndpointKeys<'_>,
    ) -> Result<(Uri, Vec<CertificateDer<'static>>), ConfigError> {
        let key = |k: &str| format!("{prefix}{k}");
        let token_url = parse_url(e.token_url).map_err(|m| self.err(&key("token_url"), m))?;
        if e.client_id.is_empty() {
            return Err(self.err(&key("client_id"), "is empty".into()));
        }
        if e.token_timeout.is_zero() {
            return Err(self.err(&key("token_timeout"), "must be greater than zero".into()));
        }
        for k in e.extra.keys() {
            if RESERVED_TOKEN_FIELDS.contains(&k.as_str()) {
                return Err(self.err(
                    &key(&format!("extra.{k}")),
                    "is set by the proxy itself; use the dedicated key".into(),
                ));
            }
        }
        let ca_certs = self.load_certs(&key("ca_file"), e.ca_file)?;
        Ok((token_url, ca_certs))
    }

    /// One `[connections.NAME]` pool.
    fn pool(&self, name: &str, p: RawPool) -> Result<PoolConfig, ConfigError> {
        let key = |k: &str| format!("connections.{name}.{k}");
        if !valid_pool_name(name) {
            return Err(self.err(
                &format!("connections.{name}"),
                "a pool name is 1-64 of A-Z a-z 0-9 . _ - (it appears in admin URLs)".into(),
            ));
        }
        let (token_url, ca_certs) = self.endpoint(
            &key(""),
            &EndpointKeys {
                token_url: &p.token_url,
                client_id: &p.client_id,
                token_timeout: p.token_timeout,
                extra: &p.extra,
                ca_file: &p.ca_file,
            },
        )?;
        let client_secret = p
            .client_secret
            .as_ref()
            .map(|s| s.resolve(&self.base))
            .transpose()
            .map_err(|m| self.err(&key("client_secret"), m))?;
        let select = p
            .select_header
            .unwrap_or_else(|| DEFAULT_SELECT_HEADER.to_owned());
        let select_header = HeaderName::from_bytes(select.as_bytes()).map_err(|_| {
            self.err(
                &key("select_header"),
                format!("{select:?} is not a header name"),
            )
        })?;
        if crate::net::headers::is_reserved_header(&select_header)
            || select_header == http::header::AUTHORIZATION
        {
            return Err(self.err(
                &key("select_header"),
                format!("{select_header} is managed by the proxy"),
            ));
        }
        let cache_size = p.cache_size.unwrap_or(DEFAULT_CACHE_SIZE);
        if cache_size == 0 {
            return Err(self.err(&key("cache_size"), "must be at least 1".into()));
        }
        let refresh_concurrency = p.refresh_concurrency.unwrap_or(DEFAULT_REFRESH_CONCURRENCY);
        if !(1..=MAX_REFRESH_CONCURRENCY).contains(&refresh_concurrency) {
            return Err(self.err(
                &key("refresh_concurrency"),
                format!("must be 1 to {MAX_REFRESH_CONCURRENCY}"),
            ));
        }
        let revoked_codes = p.revoked_codes.unwrap_or_else(|| {
            DEFAULT_REVOKED_CODES
                .iter()
                .map(|c| (*c).to_owned())
                .collect()
        });
        Ok(PoolConfig {
            name: name.to_owned(),
            token_url,
            client_id: p.client_id,
            client_secret,
            scope: p.scope,
            redirect_uri: p.redirect_uri,
            client_auth: p.client_auth,
            body_format: p.body_format,
            refresh_before: p.refresh_before,
            token_timeout: p.token_timeout,
            extra: p.extra.into_iter().collect(),
            ca_certs,
            select_header,
            revoked_codes,
            cache_size,
            refresh_concurrency,
        })
    }

    /// `[store]`: required once a pool exists.
    fn store(
        &self,
        raw: Option<RawStore>,
        pools: &BTreeMap<String, Arc<PoolConfig>>,
    ) -> Result<Option<StoreConfig>, ConfigError> {
        let Some(s) = raw else {
            return match pools.keys().next() {
                Some(p) => Err(self.err(
                    "store",
                    format!("[connections.{p}] keeps its users' tokens in a store: add a [store] table with a key (`flinks-proxy keygen` prints one)"),
                )),
                None => Ok(None),
            };
        };
        let check_key = |k: &str, src: &SecretSource| {
            let secret = src.resolve(&self.base).map_err(|m| self.err(k, m))?;
            crate::ground::crypto::Key::from_base64(secret.expose()).map_err(|m| self.err(k, m))?;
            Ok::<_, ConfigError>(secret)
        };
        let key = check_key("store.key", &s.key)?;
        let mut old_keys = Vec::new();
        for (i, k) in s.old_keys.iter().enumerate() {
            old_keys.push(check_key(&format!("store.old_keys[{i}]"), k)?);
        }
        let url = match &s.url {
            Some(u) => u
                .resolve(&self.base)
                .map_err(|m| self.err("store.url", m))?,
            None => Secret::new(DEFAULT_STORE_URL.to_owned()),
        };
        let max_connections = s.max_connections.unwrap_or(DEFAULT_STORE_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(self.err("store.max_connections", "must be at least 1".into()));
        }
        Ok(Some(StoreConfig {
            location: self.store_location(url)?,
            key,
            old_keys,
            max_connections,
        }))
    }

    /// `sqlite:PATH` (relative to the config folder), `sqlite://PATH` or
    /// `postgres://...`. Errors never echo a PostgreSQL URL (it may hold a
    /// password).
    fn store_location(&self, url: Secret) -> Result<StoreLocation, ConfigError> {
        let u = url.expose();
        if u.starts_with("postgres://") || u.starts_with("postgresql://") {
            // The driver's parse errors name the part, never the URL.
            return match <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(u) {
                Ok(_) => Ok(StoreLocation::Postgres(url)),
                Err(e) => Err(self.err("store.url", format!("not a valid PostgreSQL URL: {e}"))),
            };
        }
        let Some(rest) = u.strip_prefix("sqlite:") else {
            return Err(self.err(
                "store.url",
                "must start with sqlite: (for example sqlite:connections.db)".into(),
            ));
        };
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() || path.contains('?') || path == ":memory:" {
            return Err(self.err(
                "store.url",
                format!("{u:?}: name a file, without options (for example sqlite:connections.db)"),
            ));
        }
        Ok(StoreLocation::Sqlite(self.base.join(path)))
    }

    /// `[admin]`: its listener, and the API token the connections API needs
    /// beyond loopback.
    fn admin(
        &self,
        raw: Option<RawAdmin>,
        pools: &BTreeMap<String, Arc<PoolConfig>>,
    ) -> Result<(SocketAddr, Option<Secret>), ConfigError> {
        let (listen, token) = match raw {
            Some(a) => (a.listen, a.api_token),
            None => (default_admin_listen(), None),
        };
        let token = token
            .map(|t| t.resolve(&self.base))
            .transpose()
            .map_err(|m| self.err("admin.api_token", m))?;
        if token.is_none() && !pools.is_empty() && !listen.ip().is_loopback() {
            return Err(self.err(
                "admin.api_token",
                format!("is required: admin.listen ({listen}) is beyond loopback and the connections API can add and delete users"),
            ));
        }
        Ok((listen, token))
    }

    /// Which keys each grant requires or refuses.
    fn grant_keys(&self, name: &str, c: &RawCredential) -> Result<(), ConfigError> {
        let key = |k: &str| format!("credentials.{name}.{k}");
        let only = |k: &str, set: bool, grants: &str| {
            if set {
                Err(self.err(&key(k), format!("is only used with grant_type = {grants}")))
            } else {
                Ok(())
            }
        };
        let required = |k: &str, set: bool, grant: &str| {
            if set {
                Ok(())
            } else {
                Err(self.err(
                    &key(k),
                    format!("is required with grant_type = \"{grant}\""),
                ))
            }
        };
        const CODE: &str = "\"authorization_code\"";
        match c.grant_type {
            GrantType::ClientCredentials => {
                only(
                    "refresh_token",
                    c.refresh_token.is_some(),
                    "\"refresh_token\"",
                )?;
                only("code", c.code.is_some(), CODE)?;
                only("redirect_uri", c.redirect_uri.is_some(), CODE)?;
                only(
                    "state_file",
                    c.state_file.is_some(),
                    "\"refresh_token\" or \"authorization_code\"",
                )?;
            }
            GrantType::RefreshToken => {
                only("code", c.code.is_some(), CODE)?;
                only("redirect_uri", c.redirect_uri.is_some(), CODE)?;
                required("refresh_token", c.refresh_token.is_some(), "refresh_token")?;
            }
            GrantType::AuthorizationCode => {
                only(
                    "scope",
                    c.scope.is_some(),
                    "\"client_credentials\" or \"refresh_token\"",
                )?;
                only(
                    "refresh_token",
                    c.refresh_token.is_some(),
                    "\"refresh_token\"",
                )?;
                required("code", c.code.is_some(), "authorization_code")?;
                required(
                    "redirect_uri",
                    c.redirect_uri.is_some(),
                    "authorization_code",
                )?;
            }
        }
        if c.shared && c.grant_type != GrantType::ClientCredentials {
            return Err(self.err(
                &key("shared"),
                "is only for grant_type = \"client_credentials\" (refresh grants share their tokens whenever there is a [store])".into(),
            ));
        }
        Ok(())
    }

    /// What the `[store]` changes for credentials: refresh grants (and
    /// `shared` client_credentials) keep their tokens there; without one,
    /// `authorization_code` needs a `state_file` and `shared` is an error.
    fn credentials_and_store(
        &self,
        credentials: &mut BTreeMap<String, CredentialConfig>,
        store: Option<&StoreConfig>,
    ) -> Result<(), ConfigError> {
        for (name, c) in credentials.iter_mut() {
            let key = format!("credentials.{name}");
            if store.is_none() && c.shared {
                return Err(self.err(
                    &format!("{key}.shared"),
                    "needs a [store] to share the token in".into(),
                ));
            }
            if store.is_none()
                && c.grant_type == GrantType::AuthorizationCode
                && c.state_file.is_none()
            {
                return Err(self.err(
                    &format!("{key}.state_file"),
                    "is required with grant_type = \"authorization_code\" (or a [store])".into(),
                ));
            }
            c.in_store =
                store.is_some() && (c.grant_type != GrantType::ClientCredentials || c.shared);
        }
        Ok(())
    }

    /// One `[routes.NAME]`; `earlier` are the routes validated so far.
    fn route(
        &self,
        name: &str,
        r: RawRoute,
        credentials: &BTreeMap<String, Arc<CredentialConfig>>,
        pools: &BTreeMap<String, Arc<PoolConfig>>,
        earlier: &[RouteConfig],
    ) -> Result<RouteConfig, ConfigError> {
        let key = |k: &str| format!("routes.{name}.{k}");
        let auth = match (r.credential, r.connections) {
            (Some(c), None) if credentials.contains_key(&c) => RouteAuth::Credential(c),
            (Some(c), None) => {
                return Err(self.err(
                    &key("credential"),
                    format!("no [credentials.{c}] is defined"),
                ))
            }
            (None, Some(p)) if pools.contains_key(&p) => RouteAuth::Connections(p),
            (None, Some(p)) => {
                return Err(self.err(
                    &key("connections"),
                    format!("no [connections.{p}] is defined"),
                ))
            }
            (Some(_), Some(_)) | (None, None) => {
                return Err(self.err(
                    &key("credential"),
                    "set exactly one of credential and connections".into(),
                ))
            }
        };
        let upstream: Uri = parse_url(&r.upstream).map_err(|m| self.err(&key("upstream"), m))?;
        if upstream.query().is_some() {
            return Err(self.err(&key("upstream"), "must not have a query string".into()));
        }
        let parts = upstream.into_parts();
        let base_path = parts
            .path_and_query
            .map(|p| p.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        let prefix = r.path_prefix;
        if !prefix.starts_with('/') {
            return Err(self.err(&key("path_prefix"), "must start with '/'".into()));
        }
        if let Some(strip) = &r.strip_prefix {
            // strip_prefix must be a '/'-bounded prefix of path_prefix.
            if !strip.starts_with('/') || !prefix_matches(strip, &prefix) {
                return Err(self.err(
                    &key("strip_prefix"),
                    format!("must be a '/'-bounded prefix of path_prefix {prefix:?}"),
                ));
            }
        }
        let host = match r.host {
            Some(h) => {
                let h = h.to_ascii_lowercase();
                if h.parse::<Authority>().is_err() || h.contains('/') || h.is_empty() {
                    return Err(self.err(&key("host"), format!("{h:?} is not a host name")));
                }
                Some(h)
            }
            None => None,
        };
        let header = self.token_header(&key("header"), r.header)?;
        let scheme = match r.scheme.as_deref() {
            None | Some("Bearer") => AuthScheme::Bearer,
            Some("") => AuthScheme::Bare,
            Some(s) if s.bytes().all(|b| b.is_ascii_graphic()) => AuthScheme::Other(s.to_owned()),
            Some(s) => return Err(self.err(&key("scheme"), format!("{s:?} is not a valid scheme"))),
        };
        let mut reauth_on = Vec::new();
        for code in r.reauth_on.unwrap_or_else(|| vec![401]) {
            match StatusCode::from_u16(code) {
                Ok(s) if (400..600).contains(&code) => reauth_on.push(s),
                _ => {
                    return Err(self.err(
                        &key("reauth_on"),
                        format!("{code} is not an HTTP error status (400-599)"),
                    ))
                }
            }
        }
        let ca_certs = self.load_certs(&key("ca_file"), &r.ca_file)?;
        let max_connections = r
            .max_connections
            .unwrap_or(DEFAULT_UPSTREAM_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(self.err(&key("max_connections"), "must be at least 1".into()));
        }
        if let Some(other) = earlier
            .iter()
            .find(|o| o.host == host && o.path_prefix == prefix)
        {
            return Err(self.err(
                &key("path_prefix"),
                format!(
                    "route {} already matches the same host and prefix",
                    other.name
                ),
            ));
        }
        Ok(RouteConfig {
            name: name.to_owned(),
            host,
            path_prefix: prefix,
            strip_prefix: r.strip_prefix,
            upstream_scheme: parts.scheme.unwrap_or(Scheme::HTTP),
            upstream_authority: parts
                .authority
                .ok_or_else(|| self.err(&key("upstream"), "has no host".into()))?,
            upstream_base_path: base_path,
            auth,
            header,
            scheme,
            reauth_on,
            ca_certs,
            preserve_host: r.preserve_host,
            max_connections,
        })
    }

    /// The header a route puts its token in (default `Authorization`).
    fn token_header(&self, key: &str, name: Option<String>) -> Result<HeaderName, ConfigError> {
        let name = name.unwrap_or_else(|| "authorization".to_owned());
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| self.err(key, format!("{name:?} is not a header name")))?;
        if crate::net::headers::is_reserved_header(&header) {
            return Err(self.err(
                key,
                format!("{header} is managed by the proxy and cannot carry the token"),
            ));
        }
        Ok(header)
    }
}

/// The token endpoint keys credentials and pools share, as written.
struct EndpointKeys<'a> {
    token_url: &'a str,
    client_id: &'a str,
    token_timeout: Duration,
    extra: &'a BTreeMap<String, String>,
    ca_file: &'a Option<PathBuf>,
}

/// Pool names appear in admin URLs and the store: keep them plain.
fn valid_pool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Two credentials writing one state file would overwrite each other's
/// refresh tokens. The error is `(key, message)`.
fn unique_state_files(
    credentials: &BTreeMap<String, Arc<CredentialConfig>>,
) -> Result<(), (String, String)> {
    let mut seen: BTreeMap<&Path, &str> = BTreeMap::new();
    for (name, c) in credentials {
        let Some(path) = c.state_file.as_deref() else {
            continue;
        };
        if let Some(first) = seen.insert(path, name) {
            return Err((
                format!("credentials.{name}.state_file"),
                format!(
                    "{} is also the state_file of [credentials.{first}]; each credential needs its own",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Token request fields the proxy fills in; `extra` may not override them.
const RESERVED_TOKEN_FIELDS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "code",
    "redirect_uri",
    "refresh_token",
];

/// `prefix` matches `path` at a `/` boundary: `/api` matches `/api` and
/// `/api/x`, not `/apix`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

fn parse_url(s: &str) -> Result<Uri, String> {
    // Checked first, so that no error below echoes a password.
    if s.split(['/', '?', '#'])
        .nth(2)
        .is_some_and(|authority| authority.contains('@'))
    {
        return Err("credentials in the URL are not supported (use a credential table)".into());
    }
    let uri: Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        Some(other) => return Err(format!("{s:?}: scheme {other:?} is not http or https")),
        None => return Err(format!("{s:?} is not an absolute http(s) URL")),
    }
    match uri.authority() {
        Some(a) if !a.host().is_empty() => {}
        _ => return Err(format!("{s:?} has no host")),
    }

    Ok(uri)
}

/// Durations in the config: strings like `"30s"`; anything else says what
/// is expected.
mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};

    const EXPECTED: &str = r#"a duration like "30s", "250ms", "5m""#;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v)
                    .map_err(|_| E::custom(format!("{v:?} is not a duration: expected {EXPECTED}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Listener addresses: `ip:port`, never a host name (nothing is resolved).
mod socket_addr {
    use std::fmt;
    use std::net::SocketAddr;

    use serde::de::{self, Deserializer, Visitor};

    const EXPECTED: &str =
        r#"an ip:port like "127.0.0.1:8080" or "[::]:8080" (host names are not resolved)"#;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SocketAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
                v.parse()
                    .map_err(|_| E::custom(format!("{v:?} is not an address: expected {EXPECTED}")))
            }
        }
        d.deserialize_any(V)
    }

    /// The same for an optional key.
    pub mod option {
        use std::net::SocketAddr;

        use serde::de::Deserializer;

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SocketAddr>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

/// A size as a config would say it: `"64MiB"`, `"512KiB"`, `"1000B"`.
pub fn format_size(bytes: usize) -> String {
    byte_size::format(bytes)
}

/// Sizes in bytes: a number, or a string with a binary unit (`"64MiB"`).
pub(crate) mod byte_size {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};

    const EXPECTED: &str = r#"a size like "64MiB", "512KiB", "1GiB" or a number of bytes"#;

    /// Parses `"64MiB"`, `"512 KiB"`, `"100B"`, `"100"`.
    pub fn parse(s: &str) -> Option<usize> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: usize = num.parse().ok()?;
        let mult: usize = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(mult)
    }

    /// The way a user writes `n`: the largest binary unit that divides it
    /// (`"64MiB"`), else bytes (`"1000B"`); `parse` reads it back.
    pub fn format(n: usize) -> String {
        const UNITS: [(usize, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        match UNITS.iter().find(|(size, _)| n != 0 && n % size == 0) {
            Some((size, unit)) => format!("{}{unit}", n / size),
            None => format!("{n}B"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = usize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
                usize::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not a size: expected {EXPECTED}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
                usize::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is too large: expected {EXPECTED}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
                parse(v)
                    .ok_or_else(|| E::custom(format!("{v:?} is not a size: expected {EXPECTED}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("proxy.toml"))
    }

    const GOOD: &str = r#"
[credentials.flinks]
token_url = "https://api.flinks.io/api/v1/token"
grant_type = "client_credentials"
client_id = "id"
client_secret = "s3cret"

[routes.flinks]
upstream = "https://ob.flinksapp.com/base/"
credential = "flinks"
"#;

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
    fn access_log_is_on_by_default_and_can_be_turned_off() {
        assert!(parse(GOOD).unwrap().log.access);
        let off = parse(&format!("[log]\naccess = false\n{GOOD}")).unwrap();
        assert!(!off.log.access);
        let e = parse(&format!("[log]\naccess = \"no\"\n{GOOD}")).unwrap_err();
        assert!(e.to_string().contains("log.access"), "{e}");
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
    fn bad_duration_names_the_key() {
        let text = format!("[server]\nrequest_timeout = \"soon\"\n{GOOD}");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("server.request_timeout"), "{e}");
    }

    #[test]
    fn upstream_max_connections_defaults_and_must_be_positive() {
        assert_eq!(
            parse(GOOD).unwrap().routes[0].max_connections,
            DEFAULT_UPSTREAM_MAX_CONNECTIONS
        );
        let c = parse(&format!("{GOOD}max_connections = 8\n")).unwrap();
        assert_eq!(c.routes[0].max_connections, 8);
        let e = parse(&format!("{GOOD}max_connections = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes.flinks.max_connections"), "{e}");
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn bad_durations_say_what_is_expected() {
        for (bad, shown) in [
            ("\"30x\"", "\"30x\""),
            ("\"30\"", "\"30\""),
            ("30", "integer"),
        ] {
            let text = format!("[server]\nidle_timeout = {bad}\n{GOOD}");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("server.idle_timeout"), "{bad}: {e}");
            assert!(
                e.contains(r#"expected a duration like "30s", "250ms", "5m""#),
                "{bad}: {e}"
            );
            assert!(e.contains(shown), "{bad}: {e}");
        }
        let text = GOOD.replace(
            "client_id = \"id\"",
            "client_id = \"id\"\ntoken_timeout = 5",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("credentials.flinks.token_timeout"), "{e}");
        assert!(e.contains("expected a duration like"), "{e}");
    }

    #[test]
    fn a_host_name_as_listen_address_names_the_key_and_asks_for_ip_port() {
        let text = format!("[server]\nlisten = \"localhost:8080\"\n{GOOD}");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("server.listen"), "{e}");
        assert!(e.contains("\"localhost:8080\""), "{e}");
        assert!(e.contains("expected an ip:port"), "{e}");
        let text = format!("[admin]\nlisten = \"localhost:9901\"\n{GOOD}");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("admin.listen"), "{e}");
        assert!(e.contains("expected an ip:port"), "{e}");
    }

    #[test]
    fn sizes_are_printed_as_written_and_read_back() {
        for (n, text) in [
            (64 << 20, "64MiB"),
            (512 << 10, "512KiB"),
            (1 << 30, "1GiB"),
            (3 << 30, "3GiB"),
            (1536 << 10, "1536KiB"),
            (1000, "1000B"),
            (0, "0B"),
        ] {
            assert_eq!(format_size(n), text);
            assert_eq!(byte_size::parse(text), Some(n), "{text}");
        }
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

    #[test]
    fn strip_prefix_may_be_a_shorter_prefix_of_path_prefix() {
        let text = GOOD.replace(
            "credential = \"flinks\"",
            "credential = \"flinks\"\npath_prefix = \"/deep/er\"\nstrip_prefix = \"/deep\"",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.routes[0].strip_prefix.as_deref(), Some("/deep"));
        for bad in ["/deeper", "/deep/er/x", "deep"] {
            let text = GOOD.replace(
                "credential = \"flinks\"",
                &format!(
                    "credential = \"flinks\"\npath_prefix = \"/deep/er\"\nstrip_prefix = \"{bad}\""
                ),
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("routes.flinks.strip_prefix"), "{bad}: {e}");
        }
    }

    #[test]
    fn route_with_missing_credential() {
        let text = GOOD.replace("credential = \"flinks\"", "credential = \"nope\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("routes.flinks.credential"), "{e}");
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn bad_urls_are_refused() {
        for bad in [
            "ftp://x/",
            "not a url",
            "/relative",
            "https://user:pw@host/",
        ] {
            let text = GOOD.replace("https://ob.flinksapp.com/base/", bad);
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("routes.flinks.upstream"), "{bad}: {e}");
            assert!(!e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn grant_specific_keys_are_checked() {
        let text = GOOD.replace(
            "grant_type = \"client_credentials\"",
            "grant_type = \"authorization_code\"",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("credentials.flinks.code"), "{e}");
        let text = GOOD.replace("client_id = \"id\"", "client_id = \"id\"\ncode = \"c\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("credentials.flinks.code: is only used"), "{e}");
    }

    #[test]
    fn secret_values_never_appear_in_errors() {
        let text = GOOD.replace("https://ob.flinksapp.com/base/", "nope");
        let e = parse(&text).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("s3cret"));
    }

    #[test]
    fn prefix_matching_respects_segment_boundaries() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api/", "/api/x"));
    }

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn pooled(store: &str, admin: &str, route: &str) -> String {
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

    fn credential(grant_lines: &str, store: &str) -> String {
        format!(
            r#"
{store}
[credentials.c]
token_url = "https://api.flinks.io/api/v1/token"
client_id = "id"
{grant_lines}

[routes.r]
upstream = "https://ob.flinksapp.com"
credential = "c"
"#
        )
    }

    #[test]
    fn a_store_keeps_refresh_grants_and_shared_client_credentials() {
        let store = format!("[store]\nkey = \"{KEY}\"");
        let code =
            "grant_type = \"authorization_code\"\ncode = \"x\"\nredirect_uri = \"https://a/cb\"";
        let e = parse(&credential(code, "")).unwrap_err().to_string();
        assert!(e.contains("credentials.c.state_file"), "{e}");
        let c = parse(&credential(code, &store)).unwrap();
        assert!(
            c.credentials["c"].in_store,
            "no state_file needed with a store"
        );
        let cc = "grant_type = \"client_credentials\"";
        assert!(!parse(&credential(cc, &store)).unwrap().credentials["c"].in_store);
        let shared = format!("{cc}\nshared = true");
        assert!(parse(&credential(&shared, &store)).unwrap().credentials["c"].in_store);
        let e = parse(&credential(&shared, "")).unwrap_err().to_string();
        assert!(
            e.contains("credentials.c.shared") && e.contains("[store]"),
            "{e}"
        );
        let rt = "grant_type = \"refresh_token\"\nrefresh_token = \"rt\"\nshared = true";
        let e = parse(&credential(rt, &store)).unwrap_err().to_string();
        assert!(e.contains("credentials.c.shared"), "{e}");
    }

    #[test]
    fn pools_need_a_store_with_a_32_byte_key() {
        let store = format!("[store]\nkey = \"{KEY}\"");
        let c = parse(&pooled(&store, "", "connections = \"users\"")).unwrap();
        assert_eq!(
            c.store.as_ref().unwrap().location,
            StoreLocation::Sqlite(PathBuf::from("./connections.db")),
            "the default file sits next to the config"
        );
        let pool = &c.pools["users"];
        assert_eq!(pool.select_header, "x-flinks-connection");
        assert_eq!(pool.revoked_codes, ["602"]);
        assert_eq!(pool.cache_size, DEFAULT_CACHE_SIZE);
        assert_eq!(c.routes[0].auth, RouteAuth::Connections("users".into()));

        let e = parse(&pooled("", "", "connections = \"users\"")).unwrap_err();
        assert!(e.to_string().contains("store: [connections.users]"), "{e}");
        let e = parse(&pooled(
            "[store]\nkey = \"c2hvcnQ=\"",
            "",
            "connections = \"users\"",
        ));
        let e = e.unwrap_err().to_string();
        assert!(e.contains("store.key: must be 32 bytes"), "{e}");
        assert!(!e.contains("c2hvcnQ"), "{e}");
        let bad_old = format!("{store}\nold_keys = [\"nope!\"]");
        let e = parse(&pooled(&bad_old, "", "connections = \"users\"")).unwrap_err();
        assert!(e.to_string().contains("store.old_keys[0]"), "{e}");
        let relative = format!("[store]\nkey = \"{KEY}\"\nurl = \"sqlite:data/c.db\"");
        let c = Config::parse(
            &pooled(&relative, "", "connections = \"users\""),
            Path::new("/etc/fp/proxy.toml"),
        )
        .unwrap();
        assert_eq!(
            c.store.unwrap().location,
            StoreLocation::Sqlite(PathBuf::from("/etc/fp/data/c.db"))
        );
        let pg = format!("[store]\nkey = \"{KEY}\"\nurl = \"postgres://u:hunter2@db/x?sslmode=verify-full\"\nmax_connections = 3");
        let c = parse(&pooled(&pg, "", "connections = \"users\"")).unwrap();
        let sc = c.store.unwrap();
        assert_eq!(sc.location.kind(), "postgres");
        assert_eq!(sc.max_connections, 3);
        assert!(!format!("{:?}", sc.location).contains("hunter2"));
        let bad = format!(
            "[store]\nkey = \"{KEY}\"\nurl = \"postgres://u:hunter2@db/x?sslmode=sometimes\""
        );
        let e = parse(&pooled(&bad, "", "connections = \"users\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.url"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let zero = format!("[store]\nkey = \"{KEY}\"\nmax_connections = 0");
        let e = parse(&pooled(&zero, "", "connections = \"users\"")).unwrap_err();
        assert!(e.to_string().contains("store.max_connections"), "{e}");
    }

    #[test]
    fn routes_name_exactly_one_of_credential_and_connections() {
        let store = format!("[store]\nkey = \"{KEY}\"");
        for route in ["", "connections = \"users\"\ncredential = \"users\""] {
            let e = parse(&pooled(&store, "", route)).unwrap_err().to_string();
            assert!(e.contains("routes.ob.credential: set exactly one"), "{e}");
        }
        let e = parse(&pooled(&store, "", "connections = \"nope\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("routes.ob.connections: no [connections.nope]"),
            "{e}"
        );
        let typo =
            pooled(&store, "", "connections = \"users\"").replace("redirect_uri", "redirect_url");
        let e = parse(&typo).unwrap_err().to_string();
        assert!(e.contains("redirect_url"), "{e}");
    }

    #[test]
    fn a_proxy_listener_beyond_loopback_with_pools_needs_access_rules() {
        let store = format!("[store]\nkey = \"{KEY}\"");
        let open = "[server]\nlisten = \"0.0.0.0:8080\"";
        let e = parse(&pooled(&store, open, "connections = \"users\"")).unwrap_err();
        assert!(e.to_string().contains("access: is required"), "{e}");
        assert!(e.to_string().contains("routes.ob"), "{e}");
        let keyed = format!("{open}\n[access]\napi_keys = [\"k-0123456789abcdef\"]");
        parse(&pooled(&store, &keyed, "connections = \"users\"")).expect("keys make it fine");
        let networks = format!("{open}\n[access]\nallow = [\"10.0.0.0/8\"]");
        parse(&pooled(&store, &networks, "connections = \"users\"")).expect("networks too");
        let lo = "[server]\nlisten = \"127.0.0.1:8080\"";
        parse(&pooled(&store, lo, "connections = \"users\"")).expect("loopback is fine");
    }

    #[test]
    fn an_admin_listener_beyond_loopback_with_pools_needs_an_api_token() {
        let store = format!("[store]\nkey = \"{KEY}\"");
        let open = "[admin]\nlisten = \"0.0.0.0:9901\"";
        let e = parse(&pooled(&store, open, "connections = \"users\"")).unwrap_err();
        assert!(
            e.to_string().contains("admin.api_token: is required"),
            "{e}"
        );
        let guarded = format!("{open}\napi_token = \"t0ken\"");
        let c = parse(&pooled(&store, &guarded, "connections = \"users\"")).unwrap();
        assert_eq!(c.admin_api_token.unwrap().expose(), "t0ken");
        let loopback = "[admin]\nlisten = \"127.0.0.1:9901\"";
        assert!(parse(&pooled(&store, loopback, "connections = \"users\"")).is_ok());
    }

    #[test]
    fn cidrs_and_addresses_are_accepted() {
        let text = format!("[access]\nallow = [\"10.0.0.0/8\", \"::1\"]\n{GOOD}");
        let c = parse(&text).unwrap();
        assert_eq!(c.access.allow.len(), 2);
        let text = format!("[access]\nallow = [\"10.0.0.0/33\"]\n{GOOD}");
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("access.allow[0]"));
    }
}
