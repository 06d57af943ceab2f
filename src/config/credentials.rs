//! `[credentials.NAME]`: one OAuth client and grant whose tokens the proxy
//! obtains and keeps, and the token endpoint settings (URL, client, body
//! format, client authentication, timeouts, extra fields, trust roots)
//! that `[connections.NAME]` pools share with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::ground::jose::{Alg, JoseError, SigningKey};
use crate::ground::secret::{Secret, SecretSource};
use crate::net::tls::ClientCert;

use super::discovery::Endpoints;
use super::units::{duration, parse_url};
use super::{ConfigError, Ctx, StoreConfig};

/// Renew a token this long before it expires (capped at half its lifetime).
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(60);
/// One token request, end to end.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// `client_id` in the body and the client certificate on the TLS
    /// connection (RFC 8705 §2): `client_cert`, `client_cert_key`.
    TlsClientAuth,
    /// A JWT signed with `client_key` (RFC 7523 §2.2, OIDC Core §9).
    PrivateKeyJwt,
    /// A JWT signed HS256 with `client_secret` (OIDC Core §9).
    ClientSecretJwt,
}

impl ClientAuth {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Body => "body",
            ClientAuth::Basic => "basic",
            ClientAuth::TlsClientAuth => "tls_client_auth",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::ClientSecretJwt => "client_secret_jwt",
        }
    }

    /// Whether the client authenticates with a signed assertion.
    pub fn is_jwt(self) -> bool {
        matches!(
            self,
            ClientAuth::PrivateKeyJwt | ClientAuth::ClientSecretJwt
        )
    }
}

/// The keys of `private_key_jwt` and `client_secret_jwt` (CLIENT_AUTH.md):
/// what signs the client assertion, and for whom.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAssertion {
    /// `client_key` (`private_key_jwt`); `None`: HS256 with the client secret.
    pub key: Option<Arc<SigningKey>>,
    /// `client_key_id`: the JWS `kid`.
    pub key_id: Option<String>,
    /// `client_assertion_audience`; `None`: the token URL.
    pub audience: Option<String>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    /// Optional only with `discovery = true` (the metadata's `token_endpoint`).
    token_url: Option<String>,
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
    client_cert: Option<PathBuf>,
    client_cert_key: Option<SecretSource>,
    client_key: Option<SecretSource>,
    client_key_id: Option<String>,
    client_assertion_alg: Option<String>,
    client_assertion_audience: Option<String>,
    #[serde(default)]
    dpop: bool,
    dpop_key: Option<SecretSource>,
    issuer: Option<String>,
    #[serde(default)]
    discovery: bool,
}

impl RawCredential {
    /// The keys discovery reads and fills (`discovery.rs`).
    pub(super) fn endpoints(&mut self) -> Endpoints<'_> {
        Endpoints {
            issuer: self.issuer.as_deref(),
            discovery: self.discovery,
            ca_file: self.ca_file.as_deref(),
            token_url: &mut self.token_url,
            authorize_url: None,
            par_url: None,
            revoke_url: None,
        }
    }
}

pub(super) fn d_refresh_before() -> Duration {
    DEFAULT_REFRESH_BEFORE
}
pub(super) fn d_token_timeout() -> Duration {
    DEFAULT_TOKEN_TIMEOUT
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
    /// The certificate presented to the token endpoint (`client_cert`).
    pub client_cert: Option<ClientCert>,
    /// `dpop = true`: the key its DPoP proofs are signed with (`dpop_key`).
    pub dpop_key: Option<Arc<SigningKey>>,
}

impl CredentialConfig {
    /// Whether the token URL is plain `http://` to a host beyond loopback:
    /// the client secret and refresh token then travel in clear.
    pub fn sends_secrets_in_clear(&self) -> bool {
        if self.token_url.scheme() != Some(&http::uri::Scheme::HTTP) {
            return false;
        }
        !super::units::is_loopback_host(self.token_url.host().unwrap_or(""))
    }
}

impl Ctx {
    /// Every `[credentials.NAME]`, before the `[store]` is known.
    pub(super) fn credentials(
        &self,
        raw: BTreeMap<String, RawCredential>,
    ) -> Result<BTreeMap<String, CredentialConfig>, ConfigError> {
        let mut credentials = BTreeMap::new();
        for (name, c) in raw {
            let cred = self.credential(&name, c)?;
            credentials.insert(name, cred);
        }
        Ok(credentials)
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
                token_url: c.token_url.as_deref(),
                client_id: &c.client_id,
                token_timeout: c.token_timeout,
                extra: &c.extra,
                ca_file: &c.ca_file,
            },
        )?;
        let client_cert = self.endpoint_client_cert(
            &key(""),
            c.client_auth,
            &token_url,
            &c.client_cert,
            &c.client_cert_key,
        )?;
        let client_secret = resolve("client_secret", &c.client_secret)?;
        let assertion = self.client_assertion(
            &key(""),
            &AssertionKeys {
                client_auth: c.client_auth,
                client_secret: client_secret.is_some(),
                client_key: &c.client_key,
                client_key_id: &c.client_key_id,
                client_assertion_alg: &c.client_assertion_alg,
                client_assertion_audience: &c.client_assertion_audience,
            },
        )?;
        let dpop_key = self.dpop_key(&key(""), c.dpop, &c.dpop_key)?;
        Ok(CredentialConfig {
            name: name.to_owned(),
            token_url,
            grant_type: c.grant_type,
            client_id: c.client_id,
            client_secret,
            scope: c.scope,
            client_auth: c.client_auth,
            assertion,
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
            client_cert,
            dpop_key,
        })
    }

    /// `client_cert` / `client_cert_key` of a credential or pool (`prefix`
    /// ends in a dot): required by `client_auth = "tls_client_auth"`, which
    /// also needs an `https://` token URL (the certificate travels in TLS).
    pub(super) fn endpoint_client_cert(
        &self,
        prefix: &str,
        client_auth: ClientAuth,
        token_url: &Uri,
        cert: &Option<PathBuf>,
        cert_key: &Option<SecretSource>,
    ) -> Result<Option<ClientCert>, ConfigError> {
        let key = |k: &str| format!("{prefix}{k}");
        if client_auth == ClientAuth::TlsClientAuth {
            if cert.is_none() {
                return Err(self.err(
                    &key("client_cert"),
                    "is required with client_auth = \"tls_client_auth\"".into(),
                ));
            }
            if token_url.scheme() != Some(&http::uri::Scheme::HTTPS) {
                return Err(self.err(
                    &key("token_url"),
                    "must be https:// with client_auth = \"tls_client_auth\" (the client certificate is presented in TLS)".into(),
                ));
            }
        }
        self.client_cert(prefix, cert, cert_key)
    }

    /// What credentials and pools share about their token endpoint:
    /// `token_url`, `client_id`, `token_timeout`, `extra`, `ca_file`.
    /// `prefix` is the table's key path ending in a dot.
    pub(super) fn endpoint(
        &self,
        prefix: &str,
        e: &EndpointKeys<'_>,
    ) -> Result<(Uri, Vec<CertificateDer<'static>>), ConfigError> {
        let key = |k: &str| format!("{prefix}{k}");
        let token_url = e.token_url.ok_or_else(|| {
            self.err(
                &key("token_url"),
                "is required (or issuer with discovery = true)".into(),
            )
        })?;
        let token_url = parse_url(token_url).map_err(|m| self.err(&key("token_url"), m))?;
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

    /// `client_key`, `client_key_id`, `client_assertion_alg` and
    /// `client_assertion_audience` for `client_auth`: the key loaded and
    /// checked against the algorithm, each error naming its key (and never
    /// showing the key). `prefix` is the table's key path ending in a dot.
    pub(super) fn client_assertion(
        &self,
        prefix: &str,
        a: &AssertionKeys<'_>,
    ) -> Result<Option<ClientAssertion>, ConfigError> {
        let key = |k: &str| format!("{prefix}{k}");
        let needs = |k: &str| {
            self.err(
                &key(k),
                format!(
                    "is required with client_auth = \"{}\"",
                    a.client_auth.as_str()
                ),
            )
        };
        let only = |k: &str, with: &str| {
            self.err(&key(k), format!("is only used with client_auth = {with}"))
        };
        const JWT: &str = "\"private_key_jwt\" or \"client_secret_jwt\"";
        const PKJ: &str = "\"private_key_jwt\"";
        let alg = a.client_assertion_alg.as_deref();
        match a.client_auth {
            ClientAuth::Body | ClientAuth::Basic | ClientAuth::TlsClientAuth => {
                for (k, set) in [
                    ("client_key", a.client_key.is_some()),
                    ("client_key_id", a.client_key_id.is_some()),
                    ("client_assertion_alg", alg.is_some()),
                    (
                        "client_assertion_audience",
                        a.client_assertion_audience.is_some(),
                    ),
                ] {
                    if set {
                        return Err(only(k, JWT));
                    }
                }
                Ok(None)
            }
            ClientAuth::ClientSecretJwt => {
                if a.client_key.is_some() {
                    return Err(only("client_key", PKJ));
                }
                if a.client_key_id.is_some() {
                    return Err(only("client_key_id", PKJ));
                }
                if !a.client_secret {
                    return Err(needs("client_secret"));
                }
                if let Some(alg) = alg.filter(|a| *a != "HS256") {
                    return Err(self.err(
                        &key("client_assertion_alg"),
                        format!("{alg:?} does not fit client_auth = \"client_secret_jwt\" (HS256 with client_secret)"),
                    ));
                }
                Ok(Some(ClientAssertion {
                    key: None,
                    key_id: None,
                    audience: a.client_assertion_audience.clone(),
                }))
            }
            ClientAuth::PrivateKeyJwt => {
                let source = a.client_key.as_ref().ok_or_else(|| needs("client_key"))?;
                let pem = source
                    .resolve(&self.base)
                    .map_err(|m| self.err(&key("client_key"), m))?;
                let signing = SigningKey::from_pem(pem.expose(), alg).map_err(|e| match e {
                    JoseError::AlgMismatch { .. } | JoseError::UnknownAlg(_) => {
                        self.err(&key("client_assertion_alg"), e.to_string())
                    }
                    _ => self.err(&key("client_key"), e.to_string()),
                })?;
                Ok(Some(ClientAssertion {
                    key: Some(Arc::new(signing)),
                    key_id: a.client_key_id.clone(),
                    audience: a.client_assertion_audience.clone(),
                }))
            }
        }
    }

    /// `dpop` and `dpop_key` of a credential or pool (`prefix` ends in a
    /// dot): with `dpop = true` the key is required, loaded and must be EC
    /// P-256 (ES256) or Ed25519 (EdDSA), the algorithms DPoP servers take
    /// (RSA proofs are kilobytes on every request); a key without `dpop`
    /// is refused rather than silently unused.
    pub(super) fn dpop_key(
        &self,
        prefix: &str,
        dpop: bool,
        source: &Option<SecretSource>,
    ) -> Result<Option<Arc<SigningKey>>, ConfigError> {
        let key = |k: &str| format!("{prefix}{k}");
        let Some(source) = source else {
            return match dpop {
                true => Err(self.err(
                    &key("dpop_key"),
                    "is required with dpop = true (a PKCS#8 PEM EC P-256 or Ed25519 key; \
                     `flinks-proxy keygen --dpop` prints one)"
                        .into(),
                )),
                false => Ok(None),
            };
        };
        if !dpop {
            return Err(self.err(&key("dpop_key"), "is only used with dpop = true".into()));
        }
        let pem = source
            .resolve(&self.base)
            .map_err(|m| self.err(&key("dpop_key"), m))?;
        let signing = SigningKey::from_pem(pem.expose(), None)
            .map_err(|e| self.err(&key("dpop_key"), e.to_string()))?;
        if !matches!(signing.alg(), Alg::Es256 | Alg::EdDsa) {
            return Err(self.err(
                &key("dpop_key"),
                format!(
                    "is an {} key: DPoP proofs are signed ES256 (EC P-256) or EdDSA (Ed25519)",
                    signing.describe()
                ),
            ));
        }
        Ok(Some(Arc::new(signing)))
    }

    /// Which keys each grant requires or refuses.
    fn grant_keys(&self, name: &str, c: &RawCredential) -> Result<(), ConfigError> {
        const REFRESH: &str = "\"refresh_token\"";
        const CODE: &str = "\"authorization_code\"";
        const REFRESH_OR_CODE: &str = "\"refresh_token\" or \"authorization_code\"";
        const NOT_CODE: &str = "\"client_credentials\" or \"refresh_token\"";
        let keys = GrantKeys { ctx: self, name };
        match c.grant_type {
            GrantType::ClientCredentials => {
                keys.only("refresh_token", c.refresh_token.is_some(), REFRESH)?;
                keys.only("code", c.code.is_some(), CODE)?;
                keys.only("redirect_uri", c.redirect_uri.is_some(), CODE)?;
                keys.only("state_file", c.state_file.is_some(), REFRESH_OR_CODE)?;
            }
            GrantType::RefreshToken => {
                keys.only("code", c.code.is_some(), CODE)?;
                keys.only("redirect_uri", c.redirect_uri.is_some(), CODE)?;
                keys.required("refresh_token", c.refresh_token.is_some(), "refresh_token")?;
            }
            GrantType::AuthorizationCode => {
                keys.only("scope", c.scope.is_some(), NOT_CODE)?;
                keys.only("refresh_token", c.refresh_token.is_some(), REFRESH)?;
                keys.required("code", c.code.is_some(), "authorization_code")?;
                keys.required(
                    "redirect_uri",
                    c.redirect_uri.is_some(),
                    "authorization_code",
                )?;
            }
        }
        if c.shared && c.grant_type != GrantType::ClientCredentials {
            return Err(self.err(
                &keys.key("shared"),
                "is only for grant_type = \"client_credentials\" (refresh grants share their tokens whenever there is a [store])".into(),
            ));
        }
        Ok(())
    }

    /// What the `[store]` changes for credentials: refresh grants (and
    /// `shared` client_credentials) keep their tokens there; without one,
    /// `authorization_code` needs a `state_file` and `shared` is an error.
    /// Then no two credentials may share a state file.
    pub(super) fn credentials_and_store(
        &self,
        mut credentials: BTreeMap<String, CredentialConfig>,
        store: Option<&StoreConfig>,
    ) -> Result<BTreeMap<String, Arc<CredentialConfig>>, ConfigError> {
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
        let credentials = credentials
            .into_iter()
            .map(|(n, c)| (n, Arc::new(c)))
            .collect();
        unique_state_files(&credentials).map_err(|(k, m)| self.err(&k, m))?;
        Ok(credentials)
    }
}

/// The keys of one `[credentials.NAME]`, for the grant rules' two errors.
struct GrantKeys<'a> {
    ctx: &'a Ctx,
    name: &'a str,
}

impl GrantKeys<'_> {
    fn key(&self, k: &str) -> String {
        format!("credentials.{}.{k}", self.name)
    }

    /// `k` is set, but only `grants` (quoted, as printed) use it.
    fn only(&self, k: &str, set: bool, grants: &str) -> Result<(), ConfigError> {
        if set {
            let message = format!("is only used with grant_type = {grants}");
            Err(self.ctx.err(&self.key(k), message))
        } else {
            Ok(())
        }
    }

    /// `k` is missing, and `grant` needs it.
    fn required(&self, k: &str, set: bool, grant: &str) -> Result<(), ConfigError> {
        if set {
            Ok(())
        } else {
            let message = format!("is required with grant_type = \"{grant}\"");
            Err(self.ctx.err(&self.key(k), message))
        }
    }
}

/// The token endpoint keys credentials and pools share, as written.
pub(super) struct EndpointKeys<'a> {
    pub(super) token_url: Option<&'a str>,
    pub(super) client_id: &'a str,
    pub(super) token_timeout: Duration,
    pub(super) extra: &'a BTreeMap<String, String>,
    pub(super) ca_file: &'a Option<PathBuf>,
}

/// The client assertion keys credentials and pools share, as written.
pub(super) struct AssertionKeys<'a> {
    pub(super) client_auth: ClientAuth,
    pub(super) client_secret: bool,
    pub(super) client_key: &'a Option<SecretSource>,
    pub(super) client_key_id: &'a Option<String>,
    pub(super) client_assertion_alg: &'a Option<String>,
    pub(super) client_assertion_audience: &'a Option<String>,
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
    "client_assertion",
    "client_assertion_type",
];

#[cfg(test)]
mod tests {
    use crate::config::tests::{parse, GOOD, KEY};

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

    /// A credential authenticating with `auth_lines`; its error, if any.
    fn with_auth(auth_lines: &str) -> Result<crate::config::Config, String> {
        parse(&credential(
            &format!("grant_type = \"client_credentials\"\n{auth_lines}"),
            "",
        ))
        .map_err(|e| e.to_string())
    }

    fn toml_key(pem: &str) -> String {
        format!("client_key = \"\"\"\n{pem}\"\"\"")
    }

    fn openssl_rsa(bits: u32) -> String {
        let out = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt"])
            .arg(format!("rsa_keygen_bits:{bits}"))
            .output()
            .expect("openssl");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn private_key_jwt_loads_the_key_and_defaults_the_algorithm() {
        use crate::ground::jose::{generate_pem, Alg};
        let pem = generate_pem(Alg::Es256).unwrap();
        let c = with_auth(&format!(
            "client_auth = \"private_key_jwt\"\n{}\nclient_key_id = \"k1\"",
            toml_key(&pem)
        ))
        .unwrap();
        let a = c.credentials["c"]
            .assertion
            .clone()
            .expect("assertion keys");
        assert_eq!(a.key.expect("a key").alg(), Alg::Es256);
        assert_eq!(a.key_id.as_deref(), Some("k1"));
        assert_eq!(a.audience, None, "the token URL, when sent");
    }

    #[test]
    fn each_bad_client_key_is_named_and_never_printed() {
        use crate::ground::jose::{generate_pem, Alg};
        let pkj = "client_auth = \"private_key_jwt\"";
        let e = with_auth(pkj).unwrap_err();
        assert!(
            e.contains(
                "credentials.c.client_key: is required with client_auth = \"private_key_jwt\""
            ),
            "{e}"
        );
        let e = with_auth(&format!("{pkj}\nclient_key = \"not a key\"")).unwrap_err();
        assert!(
            e.contains("credentials.c.client_key: is not a PKCS#8 PEM"),
            "{e}"
        );
        let small = openssl_rsa(1024);
        let e = with_auth(&format!("{pkj}\n{}", toml_key(&small))).unwrap_err();
        assert!(
            e.contains("credentials.c.client_key: is an RSA key under 2048 bits"),
            "{e}"
        );
        let body: String = small.lines().nth(1).unwrap().into();
        assert!(!e.contains(&body), "no key material: {e}");
        let rsa = openssl_rsa(2048);
        let e = with_auth(&format!(
            "{pkj}\n{}\nclient_assertion_alg = \"ES256\"",
            toml_key(&rsa)
        ))
        .unwrap_err();
        assert!(
            e.contains(
                "credentials.c.client_assertion_alg: algorithm ES256 does not fit a RSA key"
            ),
            "{e}"
        );
        let ec = generate_pem(Alg::Es256).unwrap();
        let e = with_auth(&format!(
            "{pkj}\n{}\nclient_assertion_alg = \"HS256\"",
            toml_key(&ec)
        ))
        .unwrap_err();
        assert!(
            e.contains("credentials.c.client_assertion_alg: algorithm HS256 does not fit"),
            "{e}"
        );
        assert!(!e.contains(ec.lines().nth(1).unwrap()), "{e}");
        let c = with_auth(&format!(
            "{pkj}\n{}\nclient_assertion_alg = \"RS256\"",
            toml_key(&rsa)
        ))
        .unwrap();
        let key = c.credentials["c"].assertion.clone().unwrap().key.unwrap();
        assert_eq!(key.alg(), Alg::Rs256);
    }

    #[test]
    fn client_secret_jwt_needs_the_secret_and_takes_no_key() {
        let csj = "client_auth = \"client_secret_jwt\"";
        let e = with_auth(csj).unwrap_err();
        assert!(
            e.contains(
                "credentials.c.client_secret: is required with client_auth = \"client_secret_jwt\""
            ),
            "{e}"
        );
        let ok = with_auth(&format!("{csj}\nclient_secret = \"s\"")).unwrap();
        assert!(ok.credentials["c"]
            .assertion
            .as_ref()
            .unwrap()
            .key
            .is_none());
        let e = with_auth(&format!(
            "{csj}\nclient_secret = \"s\"\nclient_assertion_alg = \"ES256\""
        ))
        .unwrap_err();
        assert!(e.contains("credentials.c.client_assertion_alg"), "{e}");
        let e =
            with_auth(&format!("{csj}\nclient_secret = \"s\"\nclient_key = \"k\"")).unwrap_err();
        assert!(
            e.contains(
                "credentials.c.client_key: is only used with client_auth = \"private_key_jwt\""
            ),
            "{e}"
        );
        let e = with_auth("client_secret = \"s\"\nclient_key_id = \"k\"").unwrap_err();
        assert!(
            e.contains("credentials.c.client_key_id: is only used with client_auth"),
            "{e}"
        );
    }

    #[test]
    fn a_pool_names_its_client_key() {
        use crate::config::tests::pooled;
        let store = format!("[store]\nkey = \"{KEY}\"");
        let text = pooled(&store, "", "connections = \"users\"").replace(
            "client_id = \"id\"",
            "client_id = \"id\"\nclient_auth = \"private_key_jwt\"",
        );
        assert!(text.contains("private_key_jwt"));
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("connections.users.client_key: is required"),
            "{e}"
        );
    }

    #[test]
    fn dpop_needs_an_ec_or_ed25519_key_and_the_default_header() {
        use crate::ground::jose::{generate_pem, Alg};
        let dpop_key = |pem: &str| format!("dpop = true\ndpop_key = \"\"\"\n{pem}\"\"\"");
        let ec = generate_pem(Alg::Es256).unwrap();
        let c = with_auth(&dpop_key(&ec)).unwrap();
        let key = c.credentials["c"].dpop_key.as_ref().expect("the key");
        assert_eq!(key.alg(), Alg::Es256);
        let ed = generate_pem(Alg::EdDsa).unwrap();
        let c = with_auth(&dpop_key(&ed)).unwrap();
        assert_eq!(
            c.credentials["c"].dpop_key.as_ref().unwrap().alg(),
            Alg::EdDsa
        );
        assert!(with_auth("").unwrap().credentials["c"].dpop_key.is_none());

        let e = with_auth("dpop = true").unwrap_err();
        assert!(
            e.contains("credentials.c.dpop_key: is required with dpop = true"),
            "{e}"
        );
        let e = with_auth(&dpop_key(&ec).replace("dpop = true\n", "")).unwrap_err();
        assert!(
            e.contains("credentials.c.dpop_key: is only used with dpop = true"),
            "{e}"
        );
        let rsa = openssl_rsa(2048);
        let e = with_auth(&dpop_key(&rsa)).unwrap_err();
        assert!(
            e.contains("credentials.c.dpop_key: is an RSA 2048 key"),
            "{e}"
        );
        let body: String = rsa.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!e.contains(&body[..40]), "no key material in {e}");
        let e = with_auth(&dpop_key("not a key")).unwrap_err();
        assert!(
            e.contains("credentials.c.dpop_key: is not a PKCS#8 PEM"),
            "{e}"
        );
        // A DPoP token only goes in `Authorization: DPoP`.
        for (line, k) in [
            ("header = \"X-Token\"", "header"),
            ("scheme = \"Token\"", "scheme"),
        ] {
            let text = credential(
                &format!("grant_type = \"client_credentials\"\n{}", dpop_key(&ec)),
                "",
            )
            .replace("credential = \"c\"", &format!("credential = \"c\"\n{line}"));
            assert!(text.contains(line), "{text}");
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains(&format!("routes.r.{k}: its credential c uses DPoP")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_pool_names_its_dpop_key() {
        use crate::config::tests::pooled;
        let store = format!("[store]\nkey = \"{KEY}\"");
        let text = pooled(&store, "", "connections = \"users\"")
            .replace("client_id = \"id\"", "client_id = \"id\"\ndpop = true");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("connections.users.dpop_key: is required"), "{e}");
    }
}
