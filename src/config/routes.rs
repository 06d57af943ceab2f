//! `[routes.NAME]`: which requests go where (host, path prefix), with
//! whose token (a credential, or a pool's per-user connections) and in
//! which header; and `prefix_matches`, the one prefix rule the route
//! table also uses.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use http::{StatusCode, Uri};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use super::units::parse_url;
use super::{ConfigError, CredentialConfig, Ctx, PoolConfig};

/// Connections one upstream pool may hold open (`routes.NAME.max_connections`):
/// above the concurrency one replica sees in steady load, so it only bites
/// when an upstream slows down and requests pile up, and well below the
/// file-descriptor limits of both sides.
pub const DEFAULT_UPSTREAM_MAX_CONNECTIONS: usize = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
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
    client_cert: Option<PathBuf>,
    client_cert_key: Option<crate::ground::secret::SecretSource>,
    #[serde(default)]
    preserve_host: bool,
    max_connections: Option<usize>,
}

fn default_prefix() -> String {
    "/".to_owned()
}

/// Where a route's token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAuth {
    /// `credential = "NAME"`: one token for every request.
    Credential(String),
    /// `connections = "NAME"`: the token of the connection each request names.
    Connections(String),
}

impl RouteAuth {
    /// The credential's or pool's name.
    pub fn name(&self) -> &str {
        match self {
            RouteAuth::Credential(n) | RouteAuth::Connections(n) => n,
        }
    }
}

impl fmt::Display for RouteAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteAuth::Credential(n) => write!(f, "credential {n}"),
            RouteAuth::Connections(n) => write!(f, "connections {n}"),
        }
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
    /// The certificate presented to the upstream (mutual TLS); routes to
    /// one origin share a connection pool only with the same certificate.
    pub client_cert: Option<crate::net::tls::ClientCert>,
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

impl Ctx {
    /// Every `[routes.NAME]`, in name order.
    pub(super) fn routes(
        &self,
        raw: BTreeMap<String, RawRoute>,
        credentials: &BTreeMap<String, Arc<CredentialConfig>>,
        pools: &BTreeMap<String, Arc<PoolConfig>>,
    ) -> Result<Vec<RouteConfig>, ConfigError> {
        let mut routes = Vec::new();
        for (name, r) in raw {
            let route = self.route(&name, r, credentials, pools, &routes)?;
            routes.push(route);
        }
        Ok(routes)
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
        let auth = self.route_auth(name, r.credential, r.connections, credentials, pools)?;
        let upstream = self.upstream(&key("upstream"), &r.upstream)?;
        let prefix = r.path_prefix;
        self.path_prefix(name, &prefix, r.strip_prefix.as_deref())?;
        let host = self.route_host(&key("host"), r.host)?;
        let header = self.token_header(&key("header"), r.header)?;
        let scheme = self.auth_scheme(&key("scheme"), r.scheme.as_deref())?;
        let reauth_on = self.reauth_on(&key("reauth_on"), r.reauth_on)?;
        let ca_certs = self.load_certs(&key("ca_file"), &r.ca_file)?;
        let client_cert = self.client_cert(&key(""), &r.client_cert, &r.client_cert_key)?;
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
        let dpop = match &auth {
            RouteAuth::Credential(c) => credentials.get(c).is_some_and(|c| c.dpop_key.is_some()),
            RouteAuth::Connections(p) => pools.get(p).is_some_and(|p| p.dpop_key.is_some()),
        };
        if dpop && (header != http::header::AUTHORIZATION || scheme != AuthScheme::Bearer) {
            let k = if header != http::header::AUTHORIZATION {
                "header"
            } else {
                "scheme"
            };
            return Err(self.err(
                &key(k),
                format!(
                    "its {auth} uses DPoP, whose tokens go in `Authorization: DPoP <token>` \
                     with a proof: leave header and scheme unset"
                ),
            ));
        }
        let upstream_scheme = upstream.scheme.unwrap_or(Scheme::HTTP);
        if client_cert.is_some() && upstream_scheme != Scheme::HTTPS {
            return Err(self.err(
                &key("client_cert"),
                "needs an https:// upstream (the certificate is presented in TLS)".into(),
            ));
        }
        Ok(RouteConfig {
            name: name.to_owned(),
            host,
            path_prefix: prefix,
            strip_prefix: r.strip_prefix,
            upstream_scheme,
            upstream_authority: upstream
                .authority
                .ok_or_else(|| self.err(&key("upstream"), "has no host".into()))?,
            upstream_base_path: upstream.base_path,
            auth,
            header,
            scheme,
            reauth_on,
            ca_certs,
            client_cert,
            preserve_host: r.preserve_host,
            max_connections,
        })
    }

    /// `credential` or `connections`: exactly one, naming a table that
    /// exists.
    fn route_auth(
        &self,
        name: &str,
        credential: Option<String>,
        connections: Option<String>,
        credentials: &BTreeMap<String, Arc<CredentialConfig>>,
        pools: &BTreeMap<String, Arc<PoolConfig>>,
    ) -> Result<RouteAuth, ConfigError> {
        let key = |k: &str| format!("routes.{name}.{k}");
        match (credential, connections) {
            (Some(c), None) if credentials.contains_key(&c) => Ok(RouteAuth::Credential(c)),
            (Some(c), None) => Err(self.err(
                &key("credential"),
                format!("no [credentials.{c}] is defined"),
            )),
            (None, Some(p)) if pools.contains_key(&p) => Ok(RouteAuth::Connections(p)),
            (None, Some(p)) => Err(self.err(
                &key("connections"),
                format!("no [connections.{p}] is defined"),
            )),
            (Some(_), Some(_)) | (None, None) => Err(self.err(
                &key("credential"),
                "set exactly one of credential and connections".into(),
            )),
        }
    }

    /// `upstream`: an http(s) URL without a query string. The caller
    /// checks its authority, last (`parse_url` already requires a host).
    fn upstream(&self, key: &str, url: &str) -> Result<Upstream, ConfigError> {
        let upstream: Uri = parse_url(url).map_err(|m| self.err(key, m))?;
        if upstream.query().is_some() {
            return Err(self.err(key, "must not have a query string".into()));
        }
        let parts = upstream.into_parts();
        let base_path = parts
            .path_and_query
            .map(|p| p.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        Ok(Upstream {
            scheme: parts.scheme,
            authority: parts.authority,
            base_path,
        })
    }

    /// `path_prefix` starts with '/'; `strip_prefix`, when set, is a
    /// '/'-bounded prefix of it.
    fn path_prefix(
        &self,
        name: &str,
        prefix: &str,
        strip: Option<&str>,
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("routes.{name}.{k}");
        if !prefix.starts_with('/') {
            return Err(self.err(&key("path_prefix"), "must start with '/'".into()));
        }
        if let Some(strip) = strip {
            // strip_prefix must be a '/'-bounded prefix of path_prefix.
            if !strip.starts_with('/') || !prefix_matches(strip, prefix) {
                return Err(self.err(
                    &key("strip_prefix"),
                    format!("must be a '/'-bounded prefix of path_prefix {prefix:?}"),
                ));
            }
        }
        Ok(())
    }

    /// `host`: a host name, lower-cased.
    fn route_host(&self, key: &str, host: Option<String>) -> Result<Option<String>, ConfigError> {
        let Some(h) = host else {
            return Ok(None);
        };
        let h = h.to_ascii_lowercase();
        if h.parse::<Authority>().is_err() || h.contains('/') || h.is_empty() {
            return Err(self.err(key, format!("{h:?} is not a host name")));
        }
        Ok(Some(h))
    }

    /// `scheme`: how the token is written (default `Bearer`; "" for bare).
    fn auth_scheme(&self, key: &str, scheme: Option<&str>) -> Result<AuthScheme, ConfigError> {
        match scheme {
            None | Some("Bearer") => Ok(AuthScheme::Bearer),
            Some("") => Ok(AuthScheme::Bare),
            Some(s) if s.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(AuthScheme::Other(s.to_owned()))
            }
            Some(s) => Err(self.err(key, format!("{s:?} is not a valid scheme"))),
        }
    }

    /// `reauth_on`: HTTP error statuses (default 401).
    fn reauth_on(
        &self,
        key: &str,
        codes: Option<Vec<u16>>,
    ) -> Result<Vec<StatusCode>, ConfigError> {
        let mut reauth_on = Vec::new();
        for code in codes.unwrap_or_else(|| vec![401]) {
            match StatusCode::from_u16(code) {
                Ok(s) if (400..600).contains(&code) => reauth_on.push(s),
                _ => {
                    return Err(
                        self.err(key, format!("{code} is not an HTTP error status (400-599)"))
                    )
                }
            }
        }
        Ok(reauth_on)
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

/// A route's `upstream` URL, split.
struct Upstream {
    scheme: Option<Scheme>,
    authority: Option<Authority>,
    /// "" or "/base", no trailing slash.
    base_path: String,
}

/// `prefix` matches `path` at a `/` boundary: `/api` matches `/api` and
/// `/api/x`, not `/apix`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, pooled, GOOD, KEY};

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
    fn prefix_matching_respects_segment_boundaries() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api/", "/api/x"));
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
}
