//! `[connections.NAME]`: per-user connection pools. One OAuth client
//! whose users' tokens are kept in the `[store]`; a request names its
//! connection in a header. Shares its token endpoint settings with
//! `[credentials.NAME]`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::Uri;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::ground::jose::SigningKey;
use crate::ground::secret::{Secret, SecretSource};

use super::credentials::{
    d_refresh_before, d_token_timeout, AssertionKeys, ClientAssertion, EndpointKeys,
};
use super::discovery::Endpoints;
use super::{BodyFormat, ClientAuth, ConfigError, Ctx};

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
/// Keep-alive refreshes per second and pool (and process), by default:
/// a million idle connections take under three days, well inside any
/// sensible `keepalive` margin, while the token endpoint sees a trickle.
pub const DEFAULT_KEEPALIVE_RATE: f64 = 5.0;
/// More is no longer a trickle for a token endpoint.
pub const MAX_KEEPALIVE_RATE: f64 = 1000.0;
/// Flinks' refresh tokens die after 30 days unused: a `keepalive` of that
/// or more refreshes them after they are dead, so it is refused.
pub const KEEPALIVE_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    /// Optional only with `discovery = true` (the metadata's `token_endpoint`).
    token_url: Option<String>,
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
    client_cert: Option<PathBuf>,
    client_cert_key: Option<SecretSource>,
    select_header: Option<String>,
    revoked_codes: Option<Vec<String>>,
    cache_size: Option<u64>,
    refresh_concurrency: Option<usize>,
    authorize_url: Option<String>,
    pkce: Option<bool>,
    issuer: Option<String>,
    authorize_params: Option<BTreeMap<String, String>>,
    revoke_url: Option<String>,
    par_url: Option<String>,
    keepalive: Option<String>,
    keepalive_rate: Option<f64>,
    client_key: Option<SecretSource>,
    client_key_id: Option<String>,
    client_assertion_alg: Option<String>,
    client_assertion_audience: Option<String>,
    #[serde(default)]
    dpop: bool,
    dpop_key: Option<SecretSource>,
    #[serde(default)]
    discovery: bool,
}

impl RawPool {
    /// The keys discovery reads and fills (`discovery.rs`).
    pub(super) fn endpoints(&mut self) -> Endpoints<'_> {
        Endpoints {
            issuer: self.issuer.as_deref(),
            discovery: self.discovery,
            ca_file: self.ca_file.as_deref(),
            token_url: &mut self.token_url,
            authorize_url: Some(&mut self.authorize_url),
            par_url: Some(&mut self.par_url),
            revoke_url: Some(&mut self.revoke_url),
        }
    }
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
    /// Body fields, HTTP Basic or a signed assertion.
    pub client_auth: ClientAuth,
    /// The assertion's key and audience (`private_key_jwt`, `client_secret_jwt`).
    pub assertion: Option<ClientAssertion>,
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
    /// The certificate presented to the token endpoint (`client_cert`).
    pub client_cert: Option<crate::net::tls::ClientCert>,
    /// The request header naming the connection (removed before forwarding).
    pub select_header: HeaderName,
    /// Upstream error `code`s meaning the user's consent is gone.
    pub revoked_codes: Vec<String>,
    /// Access tokens kept in memory.
    pub cache_size: u64,
    /// Refreshes of this pool's connections in flight at once, at most.
    pub refresh_concurrency: usize,
    /// The connect flow's authorize settings, when `authorize_url` is set.
    pub authorize: Option<AuthorizeConfig>,
    /// RFC 7009 revocation endpoint: a deleted connection's refresh token
    /// is revoked there first.
    pub revoke_url: Option<Uri>,
    /// Background refreshes of refresh tokens left unused (`keepalive`).
    pub keepalive: Option<Keepalive>,
    /// `dpop = true`: the key its DPoP proofs are signed with (`dpop_key`).
    pub dpop_key: Option<Arc<SigningKey>>,
}

/// A pool's `keepalive` and `keepalive_rate` (CONNECT.md, "Keeping
/// connections alive").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keepalive {
    /// A refresh token unused for this long is refreshed in the background.
    pub idle: Duration,
    /// At most this many keep-alive refreshes start per second.
    pub rate: f64,
}

/// A pool's `authorize_url` and what goes with it (CONNECT.md, "Config").
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizeConfig {
    /// The authorization endpoint, maybe with a query of its own.
    pub url: Uri,
    /// PKCE S256 on every authorization (default true).
    pub pkce: bool,
    /// When set, the callback's `iss` must equal it (RFC 9207).
    pub issuer: Option<String>,
    /// Fixed extra authorize parameters.
    pub params: Vec<(String, String)>,
    /// RFC 9126: the parameters are pushed here first and the browser
    /// gets only `client_id` and `request_uri`.
    pub par_url: Option<Uri>,
}

/// Authorize parameters the flow sets itself: neither the config nor a
/// session may.
pub const RESERVED_AUTHORIZE_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "dpop_jkt",
    "request_uri",
    "request",
];

/// Authorize parameters any session may set; a pool's `authorize_params`
/// keys may be set per session too.
pub const SESSION_AUTHORIZE_PARAMS: &[&str] = &["provider_id", "correlation_id", "login_hint"];

impl Ctx {
    /// Every `[connections.NAME]` pool.
    pub(super) fn pools(
        &self,
        raw: BTreeMap<String, RawPool>,
    ) -> Result<BTreeMap<String, Arc<PoolConfig>>, ConfigError> {
        let mut pools = BTreeMap::new();
        for (name, p) in raw {
            let pool = self.pool(&name, p)?;
            pools.insert(name, Arc::new(pool));
        }
        Ok(pools)
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
                token_url: p.token_url.as_deref(),
                client_id: &p.client_id,
                token_timeout: p.token_timeout,
                extra: &p.extra,
                ca_file: &p.ca_file,
            },
        )?;
        let client_cert = self.endpoint_client_cert(
            &key(""),
            p.client_auth,
            &token_url,
            &p.client_cert,
            &p.client_cert_key,
        )?;
        let client_secret = p
            .client_secret
            .as_ref()
            .map(|s| s.resolve(&self.base))
            .transpose()
            .map_err(|m| self.err(&key("client_secret"), m))?;
        let assertion = self.client_assertion(
            &key(""),
            &AssertionKeys {
                client_auth: p.client_auth,
                client_secret: client_secret.is_some(),
                client_key: &p.client_key,
                client_key_id: &p.client_key_id,
                client_assertion_alg: &p.client_assertion_alg,
                client_assertion_audience: &p.client_assertion_audience,
            },
        )?;
        let dpop_key = self.dpop_key(&key(""), p.dpop, &p.dpop_key)?;
        let authorize = self.authorize(name, &p)?;
        let revoke_url = self.revoke_url(name, p.revoke_url.as_deref())?;
        let select_header = self.select_header(&key("select_header"), p.select_header)?;
        let cache_size = self.cache_size(&key("cache_size"), p.cache_size)?;
        let refresh_concurrency =
            self.refresh_concurrency(&key("refresh_concurrency"), p.refresh_concurrency)?;
        let revoked_codes = revoked_codes(p.revoked_codes);
        let keepalive = self.keepalive(name, p.keepalive.as_deref(), p.keepalive_rate)?;
        Ok(PoolConfig {
            name: name.to_owned(),
            token_url,
            client_id: p.client_id,
            client_secret,
            scope: p.scope,
            redirect_uri: p.redirect_uri,
            client_auth: p.client_auth,
            assertion,
            body_format: p.body_format,
            refresh_before: p.refresh_before,
            token_timeout: p.token_timeout,
            extra: p.extra.into_iter().collect(),
            ca_certs,
            client_cert,
            select_header,
            revoked_codes,
            cache_size,
            refresh_concurrency,
            authorize,
            revoke_url,
            keepalive,
            dpop_key,
        })
    }

    /// `keepalive` (off by default; more than zero, less than
    /// [`KEEPALIVE_LIMIT`]) and `keepalive_rate` (default
    /// [`DEFAULT_KEEPALIVE_RATE`], only with `keepalive`).
    fn keepalive(
        &self,
        name: &str,
        idle: Option<&str>,
        rate: Option<f64>,
    ) -> Result<Option<Keepalive>, ConfigError> {
        let key = |k: &str| format!("connections.{name}.{k}");
        let Some(idle) = idle else {
            return match rate {
                Some(_) => Err(self.err(&key("keepalive_rate"), "needs keepalive".into())),
                None => Ok(None),
            };
        };
        let idle = humantime::parse_duration(idle).map_err(|_| {
            self.err(
                &key("keepalive"),
                format!(r#"{idle:?} is not a duration: expected a duration like "20d""#),
            )
        })?;
        if idle.is_zero() {
            return Err(self.err(&key("keepalive"), "must be more than zero".into()));
        }
        if idle >= KEEPALIVE_LIMIT {
            return Err(self.err(
                &key("keepalive"),
                format!(
                    "must be under 30d: Flinks refresh tokens die after 30 days unused, so a \
                     keep-alive at {} would come too late (\"20d\" leaves room for outages)",
                    humantime::format_duration(idle)
                ),
            ));
        }
        let rate = rate.unwrap_or(DEFAULT_KEEPALIVE_RATE);
        if !(rate > 0.0 && rate <= MAX_KEEPALIVE_RATE) {
            return Err(self.err(
                &key("keepalive_rate"),
                format!("must be more than 0 and at most {MAX_KEEPALIVE_RATE} (per second)"),
            ));
        }
        Ok(Some(Keepalive { idle, rate }))
    }

    /// `revoke_url`: https (http only on loopback), as the token endpoint
    /// it authenticates the client to.
    fn revoke_url(&self, name: &str, url: Option<&str>) -> Result<Option<Uri>, ConfigError> {
        let Some(url) = url else { return Ok(None) };
        let key = format!("connections.{name}.revoke_url");
        super::units::parse_secure_url(url)
            .map(Some)
            .map_err(|m| self.err(&key, m))
    }

    /// `authorize_url` and the keys that only make sense with it.
    fn authorize(&self, name: &str, p: &RawPool) -> Result<Option<AuthorizeConfig>, ConfigError> {
        let key = |k: &str| format!("connections.{name}.{k}");
        let Some(url) = &p.authorize_url else {
            for (k, set) in [
                ("pkce", p.pkce.is_some()),
                // With discovery, the issuer names the metadata too.
                ("issuer", p.issuer.is_some() && !p.discovery),
                ("authorize_params", p.authorize_params.is_some()),
                ("par_url", p.par_url.is_some()),
            ] {
                if set {
                    return Err(self.err(&key(k), "needs authorize_url (the connect flow)".into()));
                }
            }
            return Ok(None);
        };
        let uri =
            super::units::parse_secure_url(url).map_err(|m| self.err(&key("authorize_url"), m))?;
        if url.contains('#') {
            return Err(self.err(&key("authorize_url"), "must not have a fragment".into()));
        }
        let mut params = Vec::new();
        for (k, v) in p.authorize_params.clone().unwrap_or_default() {
            if RESERVED_AUTHORIZE_PARAMS.contains(&k.as_str()) {
                return Err(self.err(
                    &key(&format!("authorize_params.{k}")),
                    "is set by the connect flow itself".into(),
                ));
            }
            params.push((k, v));
        }
        if let Some(issuer) = &p.issuer {
            super::units::parse_url(issuer).map_err(|m| self.err(&key("issuer"), m))?;
        }
        // Client authentication goes there as to the token endpoint.
        let par_url = p
            .par_url
            .as_deref()
            .map(super::units::parse_secure_url)
            .transpose()
            .map_err(|m| self.err(&key("par_url"), m))?;
        Ok(Some(AuthorizeConfig {
            url: uri,
            pkce: p.pkce.unwrap_or(true),
            issuer: p.issuer.clone(),
            params,
            par_url,
        }))
    }

    /// `select_header` (default [`DEFAULT_SELECT_HEADER`]): a header the
    /// proxy does not manage itself.
    fn select_header(&self, key: &str, name: Option<String>) -> Result<HeaderName, ConfigError> {
        let select = name.unwrap_or_else(|| DEFAULT_SELECT_HEADER.to_owned());
        let select_header = HeaderName::from_bytes(select.as_bytes())
            .map_err(|_| self.err(key, format!("{select:?} is not a header name")))?;
        if crate::net::headers::is_reserved_header(&select_header)
            || select_header == http::header::AUTHORIZATION
        {
            return Err(self.err(key, format!("{select_header} is managed by the proxy")));
        }
        Ok(select_header)
    }

    /// `cache_size` (default [`DEFAULT_CACHE_SIZE`]): at least 1.
    fn cache_size(&self, key: &str, size: Option<u64>) -> Result<u64, ConfigError> {
        let cache_size = size.unwrap_or(DEFAULT_CACHE_SIZE);
        if cache_size == 0 {
            return Err(self.err(key, "must be at least 1".into()));
        }
        Ok(cache_size)
    }

    /// `refresh_concurrency` (default [`DEFAULT_REFRESH_CONCURRENCY`]): 1 to
    /// [`MAX_REFRESH_CONCURRENCY`].
    fn refresh_concurrency(&self, key: &str, n: Option<usize>) -> Result<usize, ConfigError> {
        let refresh_concurrency = n.unwrap_or(DEFAULT_REFRESH_CONCURRENCY);
        if !(1..=MAX_REFRESH_CONCURRENCY).contains(&refresh_concurrency) {
            return Err(self.err(key, format!("must be 1 to {MAX_REFRESH_CONCURRENCY}")));
        }
        Ok(refresh_concurrency)
    }
}

/// `revoked_codes`, default [`DEFAULT_REVOKED_CODES`].
fn revoked_codes(codes: Option<Vec<String>>) -> Vec<String> {
    codes.unwrap_or_else(|| {
        DEFAULT_REVOKED_CODES
            .iter()
            .map(|c| (*c).to_owned())
            .collect()
    })
}

/// Pool names appear in admin URLs and the store: keep them plain.
fn valid_pool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, pooled, KEY};

    /// The `users` pool with `keys` added to its table.
    fn pool_with(keys: &str) -> Result<crate::config::Config, ConfigError> {
        let store = format!("[store]\nkey = \"{KEY}\"");
        let text = pooled(&store, "", "connections = \"users\"").replace(
            "redirect_uri = \"https://app.example.com/cb\"",
            &format!("redirect_uri = \"https://app.example.com/cb\"\n{keys}"),
        );
        assert!(keys.is_empty() || text.contains(keys), "the keys went in");
        parse(&text)
    }

    #[test]
    fn keepalive_is_off_by_default_and_its_rate_defaults_to_five_per_second() {
        assert_eq!(pool_with("").unwrap().pools["users"].keepalive, None);
        let c = pool_with("keepalive = \"20d\"").unwrap();
        assert_eq!(
            c.pools["users"].keepalive,
            Some(Keepalive {
                idle: Duration::from_secs(20 * 24 * 3600),
                rate: DEFAULT_KEEPALIVE_RATE,
            })
        );
        let c = pool_with("keepalive = \"12h\"\nkeepalive_rate = 0.5").unwrap();
        assert_eq!(c.pools["users"].keepalive.unwrap().rate, 0.5);
        let c = pool_with("keepalive = \"12h\"\nkeepalive_rate = 20").unwrap();
        assert_eq!(c.pools["users"].keepalive.unwrap().rate, 20.0);
    }

    #[test]
    fn par_url_needs_authorize_url_and_https_beyond_loopback() {
        // (A good par_url is tests/oidc.rs's: a pool with authorize_url
        // also needs [connect].)
        let authorize = "authorize_url = \"https://bank.example.com/auth\"";
        for (keys, says) in [
            (
                "par_url = \"https://bank.example.com/par\"".to_owned(),
                "needs authorize_url",
            ),
            (
                format!("{authorize}\npar_url = \"http://bank.example.com/par\""),
                "https",
            ),
        ] {
            let e = pool_with(&keys).unwrap_err().to_string();
            assert!(e.contains("connections.users.par_url: "), "{keys}: {e}");
            assert!(e.contains(says), "{keys}: {e}");
        }
    }

    #[test]
    fn bad_keepalive_values_name_the_key() {
        for (keys, key, says) in [
            ("keepalive = \"soon\"", "keepalive", "is not a duration"),
            ("keepalive = \"0s\"", "keepalive", "more than zero"),
            ("keepalive = \"30d\"", "keepalive", "under 30d"),
            ("keepalive = \"45d\"", "keepalive", "under 30d"),
            ("keepalive_rate = 5", "keepalive_rate", "needs keepalive"),
            (
                "keepalive = \"20d\"\nkeepalive_rate = 0",
                "keepalive_rate",
                "more than 0",
            ),
            (
                "keepalive = \"20d\"\nkeepalive_rate = -1",
                "keepalive_rate",
                "more than 0",
            ),
            (
                "keepalive = \"20d\"\nkeepalive_rate = 5000",
                "keepalive_rate",
                "at most",
            ),
        ] {
            let e = pool_with(keys).unwrap_err().to_string();
            assert!(
                e.contains(&format!("connections.users.{key}: ")),
                "{keys}: {e}"
            );
            assert!(e.contains(says), "{keys}: {e}");
        }
    }
}
