//! `[admin]`: where the admin listener listens, the API token the
//! connections API requires, and what `/status` may show.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::ground::secret::{Secret, SecretSource};

use super::units::socket_addr;
use super::{ConfigError, Ctx, PoolConfig};

/// Where the admin listener listens when `[admin]` is not set: loopback only,
/// because `/status` and `/metrics` describe the deployment.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
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

/// `[admin]` validated; `Config` keeps its fields flat.
pub(super) struct AdminSettings {
    pub(super) listen: SocketAddr,
    pub(super) api_token: Option<Secret>,
    pub(super) show_subjects: bool,
}

impl Ctx {
    /// `[admin]`: its listener, and the API token the connections API needs
    /// beyond loopback.
    pub(super) fn admin(
        &self,
        raw: Option<RawAdmin>,
        pools: &BTreeMap<String, Arc<PoolConfig>>,
    ) -> Result<AdminSettings, ConfigError> {
        let (listen, token, show_subjects) = match raw {
            Some(a) => (a.listen, a.api_token, a.show_subjects),
            None => (default_admin_listen(), None, false),
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
        Ok(AdminSettings {
            listen,
            api_token: token,
            show_subjects,
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

#[cfg(test)]
mod tests {
    use crate::config::tests::{parse, pooled, KEY};

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
}
