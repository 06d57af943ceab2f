//! `[access]`: who may use the proxy listener (API keys, client networks),
//! and the rule that a listener beyond loopback serving per-user
//! connections must say who.

use ipnet::IpNet;
use serde::Deserialize;

use crate::ground::secret::{Secret, SecretSource};

use super::{ConfigError, Ctx, RouteAuth, RouteConfig, ServerConfig};

/// `[access]`: who may use the proxy.
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    /// Accepted `Proxy-Authorization: Bearer` keys; empty = no key needed.
    pub api_keys: Vec<Secret>,
    /// Client networks allowed; empty = any.
    pub allow: Vec<IpNet>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    #[serde(default)]
    api_keys: Vec<SecretSource>,
    #[serde(default)]
    allow: Vec<String>,
}

impl Ctx {
    /// `[access]`.
    pub(super) fn access(&self, raw: Option<RawAccess>) -> Result<AccessConfig, ConfigError> {
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
}

/// A proxy listener beyond loopback that serves per-user connections must
/// say who may use it (`[access]` keys or networks, or client
/// certificates): otherwise anyone who reaches it acts as any user by
/// naming their id (by default the token's guessable `sub`). Like the admin
/// `api_token` rule, this is an error, not a warning.
pub(super) fn open_pooled_listener(
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

#[cfg(test)]
mod tests {
    use crate::config::tests::{parse, pooled, GOOD, KEY};

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
