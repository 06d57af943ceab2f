//! proxy.toml for tests: one typed builder ([`ProxyToml`]) rendered to TOML
//! once, with presets for the sandbox (a credential, or a pool on a store).
//!
//! Typed fields, not text templates: a setting a test changes is a field
//! that exists, so a change cannot silently miss and test the default
//! instead. Rare keys go through [`ProxyToml::extra`], which panics when the
//! table it targets is not in the rendered config. Fields left `None` are
//! not written (the proxy's default applies). Tests whose subject is the
//! TOML text itself (parse errors naming a key) keep literal TOML.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flinks_proxy::sandbox::{Sandbox, SandboxOptions};
use serde::{Serialize, Serializer};

/// The admin API token of [`ProxyToml::pool`].
pub const API_TOKEN: &str = "admin-test-token";

/// A secret value: literal, `{ env = NAME }` or `{ file = PATH }`.
#[derive(Debug, Clone)]
pub enum Secret {
    Literal(String),
    Env(String),
    File(PathBuf),
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (key, value) = match self {
            Secret::Literal(v) => return s.serialize_str(v),
            Secret::Env(name) => ("env", name.clone()),
            Secret::File(path) => ("file", path.display().to_string()),
        };
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(key, &value)?;
        m.end()
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret::Literal(s.to_owned())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret::Literal(s)
    }
}

/// Durations as proxy.toml writes them: `"5s"`, `"250ms"`.
fn duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    let d = d.expect("skipped when None");
    let text = if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        humantime::format_duration(d).to_string()
    };
    s.serialize_str(&text)
}

/// `[server]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Server {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub request_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub header_read_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    /// A byte size as the proxy reads it (`"64KiB"`, or a number of bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_buffer_limit: Option<toml::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub shutdown_grace: Option<Duration>,
}

/// `[admin]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Admin {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_subjects: Option<bool>,
}

/// `[log]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Log {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// `"text"` or `"json"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<bool>,
}

/// `[access]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Access {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<Vec<Secret>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
}

/// `[store]`.
#[derive(Debug, Clone, Serialize)]
pub struct Store {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<Secret>,
    pub key: Secret,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_keys: Option<Vec<Secret>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl Store {
    /// An SQLite store in the file `db`.
    pub fn sqlite(db: &Path, key: &str) -> Store {
        Store {
            url: Some(format!("sqlite:{}", db.display()).into()),
            key: key.into(),
            old_keys: None,
            max_connections: None,
        }
    }
}

/// `[credentials.NAME]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Credential {
    /// Left out when empty (`discovery = true` supplies it).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub token_url: String,
    pub grant_type: String,
    pub client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// `"body"` or `"basic"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<String>,
    /// `"json"` or `"form"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub refresh_before: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub token_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// `private_key_jwt`: the PKCS#8 PEM key (a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_assertion_alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_assertion_audience: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpop: Option<bool>,
    /// The PKCS#8 PEM DPoP key (a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpop_key: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<bool>,
}

impl Credential {
    /// The sandbox's client (default options): `client_credentials`, JSON,
    /// scope `client:admin`, 2 s token timeout.
    pub fn sandbox(sb: &Sandbox) -> Credential {
        let o = SandboxOptions::default();
        Credential {
            token_url: sb.token_url(),
            grant_type: "client_credentials".to_owned(),
            client_id: o.client_id,
            client_secret: Some(o.client_secret.into()),
            scope: Some("client:admin".to_owned()),
            token_timeout: Some(Duration::from_secs(2)),
            ..Credential::default()
        }
    }
}

/// `[connections.NAME]`: a pool.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pool {
    /// Left out when empty (`discovery = true` supplies it).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub token_url: String,
    pub client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub refresh_before: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub token_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub select_header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_codes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_concurrency: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorize_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pkce: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorize_params: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoke_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub par_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_rate: Option<f64>,
    /// `private_key_jwt`: the PKCS#8 PEM key (a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_assertion_alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_assertion_audience: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpop: Option<bool>,
    /// The PKCS#8 PEM DPoP key (a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpop_key: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<bool>,
}

impl Pool {
    /// The sandbox's client (default options) as a pool: 2 s token timeout.
    pub fn sandbox(sb: &Sandbox) -> Pool {
        let o = SandboxOptions::default();
        Pool {
            token_url: sb.token_url(),
            client_id: o.client_id,
            client_secret: Some(o.client_secret.into()),
            redirect_uri: Some(o.redirect_uri),
            token_timeout: Some(Duration::from_secs(2)),
            ..Pool::default()
        }
    }
}

/// `[routes.NAME]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Route {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    pub upstream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strip_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reauth_on: Option<Vec<u16>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preserve_host: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
}

impl Route {
    /// `path_prefix = prefix`, `upstream`, `credential`.
    pub fn credential(prefix: &str, upstream: &str, credential: &str) -> Route {
        Route {
            path_prefix: Some(prefix.to_owned()),
            upstream: upstream.to_owned(),
            credential: Some(credential.to_owned()),
            ..Route::default()
        }
    }

    /// `path_prefix = prefix`, `upstream`, `connections = pool`.
    pub fn pool(prefix: &str, upstream: &str, pool: &str) -> Route {
        Route {
            path_prefix: Some(prefix.to_owned()),
            upstream: upstream.to_owned(),
            connections: Some(pool.to_owned()),
            ..Route::default()
        }
    }
}

/// `[connect]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Connect {
    pub listen: String,
    pub public_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_redirects: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub session_ttl: Option<Duration>,
}

impl Connect {
    /// A plain-http listener on a free loopback port, browsers sent to
    /// `http://127.0.0.1:PORT`, allowed to end on `allowed`.
    pub fn loopback(allowed: &[&str]) -> Connect {
        let port = super::free_port();
        Connect {
            listen: format!("127.0.0.1:{port}"),
            public_url: format!("http://127.0.0.1:{port}"),
            allowed_redirects: allowed.iter().map(|s| (*s).to_owned()).collect(),
            ..Connect::default()
        }
    }
}

/// `[webhooks]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Webhooks {
    pub url: String,
    pub secret: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub max_age: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    pub refresh_failing_after: Option<Duration>,
}

/// A whole proxy.toml.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProxyToml {
    pub server: Server,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<Log>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<Store>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub credentials: BTreeMap<String, Credential>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub connections: BTreeMap<String, Pool>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, Route>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<Connect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<Webhooks>,
    /// `(table, key, TOML value)` added by [`ProxyToml::extra`].
    #[serde(skip)]
    extra: Vec<(String, String, String)>,
}

impl ProxyToml {
    /// Proxy and admin listeners on `127.0.0.1:0`, nothing else.
    pub fn listeners() -> ProxyToml {
        ProxyToml {
            server: Server {
                listen: Some("127.0.0.1:0".to_owned()),
                ..Server::default()
            },
            admin: Some(Admin {
                listen: Some("127.0.0.1:0".to_owned()),
                ..Admin::default()
            }),
            ..ProxyToml::default()
        }
    }

    /// Listeners, a 5 s request timeout, the sandbox credential `flinks`
    /// and route `flinks`: `/` to the sandbox API with it.
    pub fn sandbox(sb: &Sandbox) -> ProxyToml {
        let mut c = ProxyToml::listeners()
            .credential("flinks", Credential::sandbox(sb))
            .route("flinks", Route::credential("/", &sb.api_url(), "flinks"));
        c.server.request_timeout = Some(Duration::from_secs(5));
        c
    }

    /// Listeners, a 5 s request timeout, an admin [`API_TOKEN`], an SQLite
    /// store at `db` sealed with `key`, the sandbox's pool `users` and route
    /// `ob`: `/` to the sandbox API with `connections = "users"`.
    pub fn pool(sb: &Sandbox, db: &Path, key: &str) -> ProxyToml {
        let mut c = ProxyToml::listeners()
            .pool_table("users", Pool::sandbox(sb))
            .route("ob", Route::pool("/", &sb.api_url(), "users"));
        c.server.request_timeout = Some(Duration::from_secs(5));
        c.admin_mut().api_token = Some(API_TOKEN.into());
        c.store = Some(Store::sqlite(db, key));
        c
    }

    /// `pool` as `users`, routed at `/` to `upstream`, on an SQLite store
    /// at `db` (a new key), with the admin API token and the connect flow
    /// on `connect`: the connect-flow tests' proxy.
    pub fn connect_flow(pool: Pool, upstream: &str, db: &Path, connect: Connect) -> ProxyToml {
        let mut c = ProxyToml::listeners()
            .pool_table("users", pool)
            .route("api", Route::pool("/", upstream, "users"));
        c.admin_mut().api_token = Some(API_TOKEN.into());
        c.store = Some(Store::sqlite(db, &super::connections::new_key()));
        c.connect = Some(connect);
        c
    }

    /// Applies `f` (for chaining).
    pub fn with(mut self, f: impl FnOnce(&mut ProxyToml)) -> ProxyToml {
        f(&mut self);
        self
    }

    /// Adds `[credentials.NAME]`; panics if it exists.
    pub fn credential(mut self, name: &str, c: Credential) -> ProxyToml {
        let old = self.credentials.insert(name.to_owned(), c);
        assert!(old.is_none(), "[credentials.{name}] is already set");
        self
    }

    /// Adds `[connections.NAME]`; panics if it exists.
    pub fn pool_table(mut self, name: &str, p: Pool) -> ProxyToml {
        let old = self.connections.insert(name.to_owned(), p);
        assert!(old.is_none(), "[connections.{name}] is already set");
        self
    }

    /// Adds `[routes.NAME]`; panics if it exists.
    pub fn route(mut self, name: &str, r: Route) -> ProxyToml {
        let old = self.routes.insert(name.to_owned(), r);
        assert!(old.is_none(), "[routes.{name}] is already set");
        self
    }

    /// `[credentials.NAME]`; panics if there is none.
    pub fn credential_mut(&mut self, name: &str) -> &mut Credential {
        self.credentials
            .get_mut(name)
            .unwrap_or_else(|| panic!("no [credentials.{name}]"))
    }

    /// `[connections.NAME]`; panics if there is none.
    pub fn pool_mut(&mut self, name: &str) -> &mut Pool {
        self.connections
            .get_mut(name)
            .unwrap_or_else(|| panic!("no [connections.{name}]"))
    }

    /// `[routes.NAME]`; panics if there is none.
    pub fn route_mut(&mut self, name: &str) -> &mut Route {
        self.routes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no [routes.{name}]"))
    }

    /// `[admin]`; panics if there is none.
    pub fn admin_mut(&mut self) -> &mut Admin {
        self.admin.as_mut().expect("no [admin]")
    }

    /// `[store]`; panics if there is none.
    pub fn store_mut(&mut self) -> &mut Store {
        self.store.as_mut().expect("no [store]")
    }

    /// `[access]`, created empty if absent.
    pub fn access_mut(&mut self) -> &mut Access {
        self.access.get_or_insert_with(Access::default)
    }

    /// `[log]`, created empty if absent.
    pub fn log_mut(&mut self) -> &mut Log {
        self.log.get_or_insert_with(Log::default)
    }

    /// A key with no typed field: `value` is TOML (`"\"x\""`, `"3"`,
    /// `"[401]"`) set in `table` (dotted: `"credentials.main"`). Rendering
    /// panics if the table does not exist or already has the key.
    pub fn extra(mut self, table: &str, key: &str, value: &str) -> ProxyToml {
        self.extra
            .push((table.to_owned(), key.to_owned(), value.to_owned()));
        self
    }

    /// The TOML text.
    pub fn toml(&self) -> String {
        let mut root = toml::Table::try_from(self).expect("config renders as TOML");
        for (table, key, value) in &self.extra {
            let mut t = &mut root;
            for part in table.split('.') {
                t = t
                    .get_mut(part)
                    .and_then(toml::Value::as_table_mut)
                    .unwrap_or_else(|| panic!("extra {key}: no [{table}] in the config"));
            }
            let parsed: toml::Table = toml::from_str(&format!("v = {value}"))
                .unwrap_or_else(|e| panic!("extra {key} = {value}: not a TOML value: {e}"));
            let old = t.insert(key.clone(), parsed["v"].clone());
            assert!(old.is_none(), "extra {key}: [{table}] already has it");
        }
        toml::to_string(&root).expect("TOML text")
    }

    /// Writes the TOML text to `dir/proxy.toml` and returns its path.
    pub fn write(&self, dir: &super::TempDir) -> PathBuf {
        dir.write("proxy.toml", self.toml())
    }
}
