//! `[store]`: where connections and shared tokens are kept (SQLite or
//! PostgreSQL) and the keys that seal them; required once a
//! `[connections.NAME]` pool exists.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::ground::secret::{Secret, SecretSource};

use super::{ConfigError, Ctx, PoolConfig};

/// The store when `[store] url` is not set: one SQLite file next to the
/// config, so a single instance needs no database server.
pub const DEFAULT_STORE_URL: &str = "sqlite:connections.db";
/// `[store] max_connections`: enough for a busy replica's refreshes and
/// cold reads (a warm cache makes no store round trip), small enough that
/// a few replicas fit PostgreSQL's default `max_connections` of 100.
pub const DEFAULT_STORE_MAX_CONNECTIONS: u32 = 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    url: Option<SecretSource>,
    key: SecretSource,
    #[serde(default)]
    old_keys: Vec<SecretSource>,
    max_connections: Option<u32>,
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

impl Ctx {
    /// `[store]`: required once a pool exists.
    pub(super) fn store(
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
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::config::tests::{parse, pooled, KEY};
    use crate::config::{Config, RouteAuth, DEFAULT_CACHE_SIZE};

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
}
