//! `[connect]`: the browser-facing listener of the hosted connect flow
//! (CONNECT.md, "Config"), where browsers are sent at the end of it
//! (`allowed_redirects`, and the matcher every `redirect_to` goes
//! through), and the lifetime of a connect session. A pool's own
//! authorize settings (`authorize_url`, `pkce`, `issuer`,
//! `authorize_params`) are `connections.rs`'s.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use std::collections::BTreeMap;

use super::units::{duration, is_loopback_host, parse_secure_url, parse_url, socket_addr};
use super::{ConfigError, Ctx, PoolConfig, ServerConfig};

/// A connect session lives this long unless the config or the session says
/// otherwise: long enough to pick a bank and log in, short enough that a
/// forwarded link soon stops working.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(15 * 60);
/// The shortest session lifetime accepted.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(60);
/// The longest: a link is a bearer secret; a day is already generous.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Where the authorization server sends the browser back.
pub const CALLBACK_PATH: &str = "/connect/callback";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnect {
    #[serde(with = "socket_addr")]
    listen: SocketAddr,
    public_url: String,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    allowed_redirects: Vec<String>,
    #[serde(default = "d_session_ttl", with = "duration")]
    session_ttl: Duration,
}

fn d_session_ttl() -> Duration {
    DEFAULT_SESSION_TTL
}

/// `[connect]`, validated.
#[derive(Clone)]
pub struct ConnectConfig {
    /// Listener address.
    pub listen: SocketAddr,
    /// How browsers reach the listener: `scheme://host[:port]`, no slash
    /// at the end.
    pub public_url: String,
    /// TLS on the listener.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where a session may send the browser at the end.
    pub allowed_redirects: Vec<AllowedRedirect>,
    /// A session's lifetime when it names none.
    pub session_ttl: Duration,
}

impl std::fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("listen", &self.listen)
            .field("public_url", &self.public_url)
            .field("tls", &self.tls.is_some())
            .field("allowed_redirects", &self.allowed_redirects)
            .field("session_ttl", &self.session_ttl)
            .finish()
    }
}

impl PartialEq for ConnectConfig {
    fn eq(&self, other: &Self) -> bool {
        self.listen == other.listen
            && self.public_url == other.public_url
            && self.tls.is_some() == other.tls.is_some()
            && self.allowed_redirects == other.allowed_redirects
            && self.session_ttl == other.session_ttl
    }
}

impl ConnectConfig {
    /// The `redirect_uri` of the connect flow.
    pub fn redirect_uri(&self) -> String {
        format!("{}{CALLBACK_PATH}", self.public_url)
    }

    /// Whether the binding cookie is `Secure`: everything but a plain http
    /// `public_url` (which validation allows on loopback only).
    pub fn secure_cookies(&self) -> bool {
        self.public_url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    }

    /// A session's link.
    pub fn connect_url(&self, token: &str) -> String {
        format!("{}/connect/{token}", self.public_url)
    }

    /// Checks a session's `redirect_to` against `allowed_redirects`; the
    /// error says why it was refused.
    pub fn check_redirect(&self, url: &str) -> Result<(), String> {
        let target = Target::parse(url)?;
        if self.allowed_redirects.iter().any(|a| a.allows(&target)) {
            Ok(())
        } else {
            Err(format!(
                "{url:?} is not under any of [connect] allowed_redirects"
            ))
        }
    }
}

/// One `allowed_redirects` entry: scheme, host and port exact, the path a
/// prefix ending at a `/` boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedRedirect {
    scheme: String,
    host: String,
    port: u16,
    path: String,
}

impl AllowedRedirect {
    fn parse(s: &str) -> Result<AllowedRedirect, String> {
        let t = Target::parse(s)?;
        if t.has_query {
            return Err(format!("{s:?}: an allowed redirect has no query"));
        }
        Ok(AllowedRedirect {
            scheme: t.scheme,
            host: t.host,
            port: t.port,
            path: t.path,
        })
    }

    fn allows(&self, t: &Target) -> bool {
        if t.scheme != self.scheme || t.host != self.host || t.port != self.port {
            return false;
        }
        match t.path.strip_prefix(&self.path) {
            Some(rest) => self.path.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// A URL a browser may be sent to, taken apart for matching. Refused:
/// anything but absolute `https://` (`http://` on loopback), userinfo
/// (`https://app@evil.test/`), a fragment, backslashes, and dot segments
/// (plain or percent-encoded: browsers resolve them, so `/ok/../evil`
/// would leave the allowed prefix).
struct Target {
    scheme: String,
    host: String,
    port: u16,
    path: String,
    has_query: bool,
}

impl Target {
    fn parse(s: &str) -> Result<Target, String> {
        if s.contains('\\') || s.contains('#') || s.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "{s:?}: backslashes, fragments, spaces and control characters are not allowed"
            ));
        }
        let uri = parse_url(s)?;
        let scheme = uri.scheme_str().unwrap_or_default().to_ascii_lowercase();
        let host = uri.host().unwrap_or_default().to_ascii_lowercase();
        if scheme == "http" && !is_loopback_host(&host) {
            return Err(format!("{s:?}: only https:// (http:// on loopback)"));
        }
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        let path = if uri.path().is_empty() {
            "/".to_owned()
        } else {
            uri.path().to_owned()
        };
        if path.split('/').any(is_dot_segment) {
            return Err(format!("{s:?}: dot segments (. and ..) are not allowed"));
        }
        Ok(Target {
            scheme,
            host,
            port,
            path,
            has_query: uri.query().is_some(),
        })
    }
}

/// `.`, `..` and their percent-encoded spellings (`%2e`, `.%2E`, …).
fn is_dot_segment(segment: &str) -> bool {
    let lower = segment.to_ascii_lowercase().replace("%2e", ".");
    lower == "." || lower == ".."
}

impl Ctx {
    /// `[connect]`.
    pub(super) fn connect(
        &self,
        raw: Option<RawConnect>,
    ) -> Result<Option<ConnectConfig>, ConfigError> {
        let Some(c) = raw else { return Ok(None) };
        let public_url = self.public_url(&c.public_url)?;
        let mut allowed_redirects = Vec::new();
        for (i, r) in c.allowed_redirects.iter().enumerate() {
            let allowed = AllowedRedirect::parse(r)
                .map_err(|m| self.err(&format!("connect.allowed_redirects[{i}]"), m))?;
            allowed_redirects.push(allowed);
        }
        if !(MIN_SESSION_TTL..=MAX_SESSION_TTL).contains(&c.session_ttl) {
            return Err(self.err(
                "connect.session_ttl",
                "must be between 1 minute and 1 day".into(),
            ));
        }
        Ok(Some(ConnectConfig {
            listen: c.listen,
            public_url,
            tls: self.connect_tls(&c)?,
            allowed_redirects,
            session_ttl: c.session_ttl,
        }))
    }

    /// What `[connect]` must agree with: a pool with `authorize_url` needs
    /// it, and its listener is its own.
    pub(super) fn connect_fits(
        &self,
        connect: Option<&ConnectConfig>,
        pools: &BTreeMap<String, Arc<PoolConfig>>,
        server: &ServerConfig,
        admin: SocketAddr,
    ) -> Result<(), ConfigError> {
        let Some(c) = connect else {
            return match pools.values().find(|p| p.authorize.is_some()) {
                Some(p) => Err(self.err(
                    &format!("connections.{}.authorize_url", p.name),
                    "needs a [connect] table (the listener browsers are sent to)".into(),
                )),
                None => Ok(()),
            };
        };
        for (other, addr) in [("server.listen", server.listen), ("admin.listen", admin)] {
            if addr == c.listen {
                return Err(self.err(
                    "connect.listen",
                    format!(
                        "is also {other} ({addr}): the connect pages get a listener of their own"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `public_url`: an origin (the pages live at `/connect/`), https
    /// unless on loopback. Returns it without a trailing slash.
    fn public_url(&self, s: &str) -> Result<String, ConfigError> {
        let key = "connect.public_url";
        let uri: Uri = parse_secure_url(s)
            .map_err(|m| self.err(key, format!("{s:?}: {m} (browsers send secrets here)")))?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() || s.contains('#') {
            return Err(self.err(
                key,
                format!("{s:?}: must be an origin (scheme://host[:port]); the connect pages live at /connect/"),
            ));
        }
        Ok(s.trim_end_matches('/').to_owned())
    }

    fn connect_tls(
        &self,
        c: &RawConnect,
    ) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        match (&c.tls_cert, &c.tls_key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => {
                crate::net::tls::server_config(&self.base.join(cert), &self.base.join(key), None)
                    .map(Some)
                    .map_err(|m| self.err("connect.tls_cert", m))
            }
            (Some(_), None) => Err(self.err(
                "connect.tls_key",
                "is required with connect.tls_cert".into(),
            )),
            (None, Some(_)) => Err(self.err(
                "connect.tls_cert",
                "is required with connect.tls_key".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, KEY};

    /// A pool `users` with `pool_keys`, a store, and `connect` appended.
    fn with_connect(pool_keys: &str, connect: &str) -> String {
        format!(
            r#"
[store]
key = "{KEY}"
url = "sqlite:///tmp/unused.db"

[connections.users]
token_url = "https://api.flinks.io/api/v1/token"
client_id = "id"
{pool_keys}

[routes.ob]
upstream = "https://ob.flinksapp.com"
connections = "users"
{connect}
"#
        )
    }

    const AUTHORIZE: &str = r#"authorize_url = "https://ob.flinksapp.com/api/v1/authorize""#;
    const CONNECT: &str = r#"
[connect]
listen = "127.0.0.1:8443"
public_url = "https://connect.example.com/"
allowed_redirects = ["https://app.example.com/done"]
"#;

    #[test]
    fn a_connect_config_parses_with_its_defaults() {
        let c = parse(&with_connect(AUTHORIZE, CONNECT)).unwrap();
        let connect = c.connect.expect("[connect]");
        assert_eq!(connect.public_url, "https://connect.example.com");
        assert_eq!(
            connect.redirect_uri(),
            "https://connect.example.com/connect/callback"
        );
        assert_eq!(connect.session_ttl, DEFAULT_SESSION_TTL);
        assert!(connect.secure_cookies());
        let a = c.pools["users"].authorize.clone().expect("authorize");
        assert!(a.pkce, "PKCE by default");
        assert_eq!(a.issuer, None);
    }

    #[test]
    fn connect_mistakes_name_their_key() {
        let cases = [
            (
                with_connect(AUTHORIZE, ""),
                "connections.users.authorize_url: needs a [connect] table",
            ),
            (
                with_connect(r#"pkce = false"#, ""),
                "connections.users.pkce: needs authorize_url",
            ),
            (
                with_connect(r#"issuer = "https://x""#, CONNECT),
                "connections.users.issuer: needs authorize_url",
            ),
            (
                with_connect(
                    &format!("{AUTHORIZE}\nauthorize_params = {{ state = \"x\" }}"),
                    CONNECT,
                ),
                "connections.users.authorize_params.state: is set by the connect flow",
            ),
            (
                with_connect(
                    r#"authorize_url = "http://ob.example.com/authorize""#,
                    CONNECT,
                ),
                "connections.users.authorize_url: must be https://",
            ),
            (
                with_connect(
                    AUTHORIZE,
                    &CONNECT.replace("https://connect.example.com/", "http://connect.example.com"),
                ),
                "connect.public_url:",
            ),
            (
                with_connect(
                    AUTHORIZE,
                    &CONNECT.replace(
                        "https://connect.example.com/",
                        "https://connect.example.com/base",
                    ),
                ),
                "connect.public_url:",
            ),
            (
                with_connect(
                    AUTHORIZE,
                    &CONNECT.replace("https://app.example.com/done", "https://app@evil.test/"),
                ),
                "connect.allowed_redirects[0]:",
            ),
            (
                with_connect(
                    AUTHORIZE,
                    &CONNECT.replace("https://app.example.com/done", "http://app.example.com/"),
                ),
                "connect.allowed_redirects[0]:",
            ),
            (
                with_connect(AUTHORIZE, &format!("{CONNECT}session_ttl = \"10s\"\n")),
                "connect.session_ttl: must be between",
            ),
            (
                with_connect(
                    AUTHORIZE,
                    &CONNECT.replace("127.0.0.1:8443", "127.0.0.1:9901"),
                ),
                "connect.listen: is also admin.listen",
            ),
            (
                with_connect(AUTHORIZE, &format!("{CONNECT}surprise = 1\n")),
                "connect.surprise",
            ),
            (
                with_connect(r#"revoke_url = "http://ob.example.com/revoke""#, ""),
                "connections.users.revoke_url: must be https://",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(want), "want {want:?}, got {e:?}\n{text}");
        }
    }

    fn allowed(entries: &[&str]) -> ConnectConfig {
        ConnectConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url: "https://connect.example.com".into(),
            tls: None,
            allowed_redirects: entries
                .iter()
                .map(|e| AllowedRedirect::parse(e).unwrap())
                .collect(),
            session_ttl: DEFAULT_SESSION_TTL,
        }
    }

    #[test]
    fn redirects_match_scheme_host_port_and_a_slash_bounded_prefix() {
        let c = allowed(&["https://app.example.com/", "https://other.example.com/done"]);
        for ok in [
            "https://app.example.com/",
            "https://app.example.com",
            "https://APP.example.com/x/y?z=1",
            "https://app.example.com:443/cb",
            "https://other.example.com/done",
            "https://other.example.com/done?x=1",
            "https://other.example.com/done/more",
        ] {
            assert!(c.check_redirect(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://app.example.com.evil.test/",
            "https://app.example.com@evil.test/",
            "https://evil.test@app.example.com/",
            "//evil.test",
            "/relative",
            "http://app.example.com/",
            "https://app.example.com:8443/",
            "https://other.example.com/doneevil",
            "https://other.example.com/done/../../evil",
            "https://other.example.com/done/%2e%2E/evil",
            "https://other.example.com/done/.%2e/evil",
            "https://app.example.com/#frag",
            "https://app.example.com\\@evil.test/",
            "https://app.example.com/\t",
            "javascript:alert(1)",
            "data:text/html,hi",
            "https://evil.test/https://app.example.com/",
        ] {
            assert!(c.check_redirect(bad).is_err(), "{bad} was allowed");
        }
    }

    #[test]
    fn loopback_http_is_allowed_and_elsewhere_refused() {
        let c = allowed(&["http://127.0.0.1:3000/app/"]);
        assert!(c.check_redirect("http://127.0.0.1:3000/app/done").is_ok());
        assert!(c.check_redirect("http://127.0.0.1:3001/app/done").is_err());
        assert!(AllowedRedirect::parse("http://app.example.com/").is_err());
        assert!(AllowedRedirect::parse("http://[::1]:3000/").is_ok());
        assert!(AllowedRedirect::parse("http://localhost:3000/").is_ok());
        assert!(AllowedRedirect::parse("https://app.example.com/?q=1").is_err());
    }
}
