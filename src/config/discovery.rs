//! `issuer` + `discovery = true` on a `[credentials.NAME]` or
//! `[connections.NAME]` table: its token endpoint (and a pool's authorize,
//! pushed authorization request and revocation endpoints) read from the
//! authorization server's metadata (RFC 8414; OpenID Connect Discovery 1.0).
//!
//! Two halves. **Fetching** ([`Ctx::discover`], called by
//! [`Config::load`](super::Config::load) only): each distinct issuer once
//! per load, `/.well-known/oauth-authorization-server` first and
//! `/.well-known/openid-configuration` when that is 404 or not JSON. It
//! runs on a thread of its own with a current-thread runtime, because
//! `load` is synchronous and may itself run inside a runtime (a reload's
//! blocking task), and is bounded by [`DISCOVERY_TIMEOUT`] and
//! [`MAX_METADATA`]: a server that is down, slow or odd is a config error
//! naming the `issuer` key and the URL, never a hang. **Merging**
//! ([`Ctx::merge_discovered`], pure, also behind
//! [`Config::parse_with`](super::Config::parse_with)): the document's
//! `issuer` must equal the configured one; then each endpoint key the table
//! leaves out is filled from the document *before* the table is validated,
//! so a discovered URL passes exactly the checks a written one does.
//! Explicit keys win.
//!
//! A pool's `authorize_url` (and `par_url`) are only discovered when the
//! config has a `[connect]` table: without one the connect flow is off, and
//! a discovered authorization endpoint would only make the pool an error.
//!
//! This module does not decide what the endpoints are used for (`tokens`
//! and `connect` do) and sends no secret: metadata is public.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::net::upstream::{build_client, HttpClient};

use super::{ConfigError, Ctx, RawConfig};

/// One issuer's discovery, both well-known URLs together: a metadata
/// document is a few KiB served from memory; this is the token request's
/// own default bound (`DEFAULT_TOKEN_TIMEOUT`), so a reload never waits
/// longer on discovery than it would on one token request.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Real metadata documents are 2-10 KiB; a larger answer is not one.
pub const MAX_METADATA: usize = 64 * 1024;

/// The keys of one table that discovery reads and fills, borrowed from its
/// raw struct (`RawCredential::endpoints`, `RawPool::endpoints`). The
/// pool-only keys are `None` for a credential.
pub(super) struct Endpoints<'a> {
    pub(super) issuer: Option<&'a str>,
    pub(super) discovery: bool,
    pub(super) ca_file: Option<&'a Path>,
    pub(super) token_url: &'a mut Option<String>,
    pub(super) authorize_url: Option<&'a mut Option<String>>,
    pub(super) par_url: Option<&'a mut Option<String>>,
    pub(super) revoke_url: Option<&'a mut Option<String>>,
}

impl Endpoints<'_> {
    /// Pools have an authorize URL; credentials do not.
    fn is_pool(&self) -> bool {
        self.authorize_url.is_some()
    }
}

/// The metadata fields the proxy uses (RFC 8414 §2); others are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Metadata {
    /// Must equal the configured issuer exactly (RFC 8414 §3.3).
    pub issuer: String,
    /// → `token_url`.
    pub token_endpoint: String,
    /// → a pool's `authorize_url` (with a `[connect]` table).
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    /// → a pool's `par_url` (RFC 9126 §5), with its `authorize_url`.
    #[serde(default)]
    pub pushed_authorization_request_endpoint: Option<String>,
    /// → a pool's `revoke_url` (RFC 7009).
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    /// Where the document was read (for messages).
    #[serde(skip)]
    pub url: String,
}

/// Metadata by configured issuer: what [`Config::parse_with`] merges.
///
/// [`Config::parse_with`]: super::Config::parse_with
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    by_issuer: BTreeMap<String, Metadata>,
}

impl Discovered {
    /// Records `metadata` as read for the configured `issuer` (its own
    /// `issuer` field is checked against it when merged).
    pub fn insert(&mut self, issuer: impl Into<String>, metadata: Metadata) {
        self.by_issuer.insert(issuer.into(), metadata);
    }

    /// The metadata read for `issuer`.
    pub fn get(&self, issuer: &str) -> Option<&Metadata> {
        self.by_issuer.get(issuer)
    }
}

/// The endpoint keys of one table that came from its issuer's metadata
/// (`check` shows them).
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredKeys {
    /// The configured issuer.
    pub issuer: String,
    /// Where the metadata was read.
    pub url: String,
    /// `(key, value)` for each key filled from it, in the table's terms
    /// (`token_url`, `authorize_url`, `par_url`, `revoke_url`).
    pub keys: Vec<(&'static str, String)>,
}

/// Why an issuer's metadata could not be read. Messages name the URL.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connection refused, DNS, TLS, a reset.
    #[error("{url}: {}", chain(cause.as_ref()))]
    Network {
        url: String,
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// 404 or 410: the other well-known URL is tried.
    #[error("{url} answered {status}")]
    NotFound { url: String, status: StatusCode },
    /// Any other status but 2xx.
    #[error("{url} answered {status}")]
    Status { url: String, status: StatusCode },
    /// Over [`MAX_METADATA`].
    #[error("{url}: the answer is over {} KiB: not a metadata document", MAX_METADATA / 1024)]
    TooLarge { url: String },
    /// Not a JSON object: the other well-known URL is tried.
    #[error("{url}: the answer is not a JSON object ({cause})")]
    NotJson {
        url: String,
        cause: serde_json::Error,
    },
    /// JSON, but without `issuer` or `token_endpoint` as strings.
    #[error("{url}: not usable metadata: {cause}")]
    Invalid {
        url: String,
        cause: serde_json::Error,
    },
    /// No answer within [`DISCOVERY_TIMEOUT`].
    #[error("{url}: no answer within {}s", DISCOVERY_TIMEOUT.as_secs())]
    Timeout { url: String },
    /// Neither well-known URL served metadata.
    #[error("{then}; before that, {first}")]
    Both {
        first: Box<FetchError>,
        then: Box<FetchError>,
    },
    /// The client or the runtime could not be set up.
    #[error("{0}")]
    Setup(String),
}

impl FetchError {
    /// Whether the other well-known URL may still have the metadata.
    fn falls_back(&self) -> bool {
        matches!(
            self,
            FetchError::NotFound { .. } | FetchError::NotJson { .. }
        )
    }
}

/// `e` and its causes, `: `-joined (hyper's errors say what failed one
/// level at a time: "client error (Connect): tcp connect error: ...").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

/// The two metadata URLs of `issuer`: RFC 8414 §3.1 inserts the well-known
/// path between the host and the issuer's path; OpenID Connect Discovery
/// §4 appends it. For an issuer without a path the two agree in form.
pub fn well_known_urls(issuer: &Uri) -> [String; 2] {
    let origin = format!(
        "{}://{}",
        issuer.scheme_str().unwrap_or("https"),
        issuer.authority().map(|a| a.as_str()).unwrap_or_default()
    );
    let path = issuer.path().trim_end_matches('/');
    [
        format!("{origin}/.well-known/oauth-authorization-server{path}"),
        format!("{origin}{path}/.well-known/openid-configuration"),
    ]
}

/// Every credential and pool with the keys discovery concerns, named by
/// table (`credentials.NAME`, `connections.NAME`).
fn tables(raw: &mut RawConfig) -> Vec<(String, Endpoints<'_>)> {
    let credentials = raw
        .credentials
        .iter_mut()
        .map(|(n, c)| (format!("credentials.{n}"), c.endpoints()));
    let pools = raw
        .connections
        .iter_mut()
        .map(|(n, p)| (format!("connections.{n}"), p.endpoints()));
    credentials.chain(pools).collect()
}

impl Ctx {
    /// The issuer `table` discovers its endpoints from, if it does: a
    /// `discovery` without `issuer` is an error, as is a credential's
    /// `issuer` without `discovery` (a pool's names the callback's `iss`).
    /// The issuer is where the proxy learns where to send its secrets:
    /// https unless on loopback, and no query or fragment (RFC 8414 §2).
    fn issuer_of<'e>(
        &self,
        table: &str,
        e: &Endpoints<'e>,
    ) -> Result<Option<&'e str>, ConfigError> {
        let key = |k: &str| format!("{table}.{k}");
        match (e.discovery, e.issuer) {
            (false, Some(_)) if !e.is_pool() => {
                Err(self.err(&key("issuer"), "is only used with discovery = true".into()))
            }
            (false, _) => Ok(None),
            (true, None) => Err(self.err(
                &key("discovery"),
                "needs issuer (the authorization server whose metadata names the endpoints)".into(),
            )),
            (true, Some(issuer)) => {
                super::units::parse_secure_url(issuer).map_err(|m| self.err(&key("issuer"), m))?;
                if issuer.contains(['?', '#']) {
                    return Err(self.err(
                        &key("issuer"),
                        "must have no query or fragment (RFC 8414 §2)".into(),
                    ));
                }
                Ok(Some(issuer))
            }
        }
    }

    /// Fetches the metadata of every issuer `raw`'s tables discover from,
    /// each once (trusting the `ca_file`s of the tables naming it). The
    /// first failure is an error naming the `issuer` key of the first
    /// table with that issuer.
    pub(super) fn discover(&self, raw: &mut RawConfig) -> Result<Discovered, ConfigError> {
        // issuer → (the first table naming it, the trust roots of all).
        let mut wanted: BTreeMap<String, (String, Vec<CertificateDer<'static>>)> = BTreeMap::new();
        for (table, e) in tables(raw) {
            let Some(issuer) = self.issuer_of(&table, &e)? else {
                continue;
            };
            let roots =
                self.load_certs(&format!("{table}.ca_file"), &e.ca_file.map(PathBuf::from))?;
            let entry = wanted
                .entry(issuer.to_owned())
                .or_insert_with(|| (table.clone(), Vec::new()));
            entry.1.extend(roots);
        }
        let mut discovered = Discovered::default();
        if wanted.is_empty() {
            return Ok(discovered);
        }
        let jobs = wanted
            .iter()
            .map(|(issuer, (_, roots))| (issuer.clone(), roots.clone()))
            .collect();
        for (issuer, result) in fetch_all(jobs) {
            let table = &wanted[&issuer].0;
            match result {
                Ok(metadata) => discovered.insert(issuer, metadata),
                Err(e) => {
                    return Err(self.err(
                        &format!("{table}.issuer"),
                        format!("cannot discover the endpoints of {issuer}: {e}"),
                    ))
                }
            }
        }
        Ok(discovered)
    }

    /// Fills the endpoint keys each discovering table leaves out from its
    /// issuer's metadata in `discovered` (explicit keys win), after
    /// checking that the document is that issuer's. Returns what was
    /// filled, by table. Fetches nothing.
    pub(super) fn merge_discovered(
        &self,
        raw: &mut RawConfig,
        discovered: &Discovered,
    ) -> Result<BTreeMap<String, DiscoveredKeys>, ConfigError> {
        let connect = raw.connect.is_some();
        let mut found = BTreeMap::new();
        for (table, e) in tables(raw) {
            let Some(issuer) = self.issuer_of(&table, &e)? else {
                continue;
            };
            let key = format!("{table}.issuer");
            let m = discovered.get(issuer).ok_or_else(|| {
                self.err(
                    &key,
                    format!("the metadata of {issuer} was not fetched (Config::load fetches it; Config::parse does not)"),
                )
            })?;
            if m.issuer != issuer {
                return Err(self.err(
                    &key,
                    format!(
                        "is {issuer:?}, but the metadata at {} names issuer {:?}: they must be equal (RFC 8414 §3.3)",
                        m.url, m.issuer
                    ),
                ));
            }
            found.insert(table, fill(e, m, connect, issuer));
        }
        Ok(found)
    }
}

/// Fills `e`'s unset endpoint keys from `m`; what was filled.
fn fill(e: Endpoints<'_>, m: &Metadata, connect: bool, issuer: &str) -> DiscoveredKeys {
    let mut keys = Vec::new();
    let mut set = |key: &'static str, slot: &mut Option<String>, value: Option<&String>| {
        if let (None, Some(v)) = (&slot, value) {
            *slot = Some(v.clone());
            keys.push((key, v.clone()));
        }
    };
    set("token_url", e.token_url, Some(&m.token_endpoint));
    if let Some(authorize) = e.authorize_url.filter(|_| connect) {
        set(
            "authorize_url",
            authorize,
            m.authorization_endpoint.as_ref(),
        );
        // PAR only with an authorize endpoint to send the browser to.
        if let Some(par) = e.par_url.filter(|_| authorize.is_some()) {
            set(
                "par_url",
                par,
                m.pushed_authorization_request_endpoint.as_ref(),
            );
        }
    }
    if let Some(revoke) = e.revoke_url {
        set("revoke_url", revoke, m.revocation_endpoint.as_ref());
    }
    DiscoveredKeys {
        issuer: issuer.to_owned(),
        url: m.url.clone(),
        keys,
    }
}

/// `e` with ` (discovered from URL)` when it is about a key discovery
/// filled: the operator did not write that value.
pub(super) fn blame(mut e: ConfigError, found: &BTreeMap<String, DiscoveredKeys>) -> ConfigError {
    for (table, d) in found {
        for (key, _) in &d.keys {
            if e.message.starts_with(&format!("{table}.{key}:")) {
                e.message.push_str(&format!(" (discovered from {})", d.url));
                return e;
            }
        }
    }
    e
}

/// An issuer and what reading its metadata gave.
type Fetched = (String, Result<Metadata, FetchError>);

/// Fetches each issuer's metadata, all at once, on a thread of its own
/// with a current-thread runtime: the caller may be inside a runtime (a
/// blocking task on reload), where starting another would panic. Results
/// come in `jobs`' order.
fn fetch_all(jobs: Vec<(String, Vec<CertificateDer<'static>>)>) -> Vec<Fetched> {
    let issuers: Vec<String> = jobs.iter().map(|(i, _)| i.clone()).collect();
    let run = move || -> Result<Vec<Fetched>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the discovery runtime: {e}"))?;
        Ok(
            rt.block_on(futures_util::future::join_all(jobs.into_iter().map(
                |(issuer, roots)| async move {
                    let result = fetch(&issuer, &roots).await;
                    (issuer, result)
                },
            ))),
        )
    };
    let outcome = std::thread::Builder::new()
        .name("flinks-proxy-discovery".into())
        .spawn(run)
        .map_err(|e| format!("cannot start the discovery thread: {e}"))
        .and_then(|t| {
            t.join()
                .unwrap_or_else(|_| Err("the discovery thread panicked".into()))
        });
    outcome.unwrap_or_else(|why| {
        issuers
            .into_iter()
            .map(|i| (i, Err(FetchError::Setup(why.clone()))))
            .collect()
    })
}

/// One issuer's metadata: RFC 8414's URL, then OpenID Connect's when that
/// is 404 or not JSON; both within one [`DISCOVERY_TIMEOUT`].
async fn fetch(issuer: &str, roots: &[CertificateDer<'static>]) -> Result<Metadata, FetchError> {
    let uri: Uri = issuer
        .parse()
        .map_err(|e| FetchError::Setup(format!("{issuer:?} is not a URL: {e}")))?;
    let client = build_client::<Empty<Bytes>>(roots, None).map_err(FetchError::Setup)?;
    let deadline = tokio::time::Instant::now() + DISCOVERY_TIMEOUT;
    let [oauth, openid] = well_known_urls(&uri);
    match get(&client, &oauth, deadline).await {
        Err(first) if first.falls_back() => {
            get(&client, &openid, deadline)
                .await
                .map_err(|then| FetchError::Both {
                    first: Box::new(first),
                    then: Box::new(then),
                })
        }
        result => result,
    }
}

/// GET `url` as metadata, by `deadline`.
async fn get(
    client: &HttpClient<Empty<Bytes>>,
    url: &str,
    deadline: tokio::time::Instant,
) -> Result<Metadata, FetchError> {
    let network = |cause: Box<dyn std::error::Error + Send + Sync>| FetchError::Network {
        url: url.to_owned(),
        cause,
    };
    let req = Request::get(url)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| network(Box::new(e)))?;
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| network(Box::new(e)))?;
        let status = resp.status();
        if matches!(status, StatusCode::NOT_FOUND | StatusCode::GONE) {
            return Err(FetchError::NotFound {
                url: url.to_owned(),
                status,
            });
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status,
            });
        }
        let body = Limited::new(resp.into_body(), MAX_METADATA)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge {
                        url: url.to_owned(),
                    }
                } else {
                    network(e)
                }
            })?
            .to_bytes();
        parse(url, &body)
    };
    tokio::time::timeout_at(deadline, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(FetchError::Timeout {
                url: url.to_owned(),
            })
        })
}

/// A metadata document read at `url`.
fn parse(url: &str, body: &[u8]) -> Result<Metadata, FetchError> {
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|cause| FetchError::NotJson {
            url: url.to_owned(),
            cause,
        })?;
    let mut m: Metadata =
        serde_json::from_value(serde_json::Value::Object(object)).map_err(|cause| {
            FetchError::Invalid {
                url: url.to_owned(),
                cause,
            }
        })?;
    m.url = url.to_owned();
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::KEY;
    use crate::config::Config;

    const ISSUER: &str = "https://as.example.com";

    fn metadata(issuer: &str) -> Metadata {
        Metadata {
            issuer: issuer.into(),
            token_endpoint: "https://as.example.com/token".into(),
            authorization_endpoint: Some("https://as.example.com/authorize".into()),
            pushed_authorization_request_endpoint: Some("https://as.example.com/par".into()),
            revocation_endpoint: Some("https://as.example.com/revoke".into()),
            url: format!("{issuer}/.well-known/oauth-authorization-server"),
        }
    }

    fn parse_with(text: &str, d: &Discovered) -> Result<Config, String> {
        Config::parse_with(text, Path::new("proxy.toml"), d).map_err(|e| e.to_string())
    }

    fn found(issuer: &str) -> Discovered {
        let mut d = Discovered::default();
        d.insert(ISSUER, metadata(issuer));
        d
    }

    /// A client_credentials credential `c` with `keys`, and a route to it.
    fn credential(keys: &str) -> String {
        format!(
            r#"
[credentials.c]
grant_type = "client_credentials"
client_id = "id"
client_secret = "s3cret"
{keys}

[routes.r]
upstream = "https://api.example.com"
credential = "c"
"#
        )
    }

    /// Pool `users` with `keys`, its route, a store and (`connect`) a
    /// `[connect]` table.
    fn pool(keys: &str, connect: bool) -> String {
        let connect = if connect {
            "[connect]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:8443\"\nallowed_redirects = [\"https://app.example.com/done\"]"
        } else {
            ""
        };
        format!(
            r#"
[store]
key = "{KEY}"
{connect}

[connections.users]
client_id = "id"
client_secret = "s3cret"
redirect_uri = "https://app.example.com/cb"
{keys}

[routes.ob]
upstream = "https://api.example.com"
connections = "users"
"#
        )
    }

    #[test]
    fn discovered_endpoints_fill_what_the_table_leaves_out_and_explicit_keys_win() {
        let disc = format!("issuer = \"{ISSUER}\"\ndiscovery = true");
        let c = parse_with(&credential(&disc), &found(ISSUER)).unwrap();
        assert_eq!(
            c.credentials["c"].token_url.to_string(),
            "https://as.example.com/token"
        );
        assert_eq!(
            c.discovered["credentials.c"].keys,
            [("token_url", "https://as.example.com/token".to_owned())]
        );
        let explicit = format!("{disc}\ntoken_url = \"https://mine.example.com/t\"");
        let c = parse_with(&credential(&explicit), &found(ISSUER)).unwrap();
        assert_eq!(
            c.credentials["c"].token_url.to_string(),
            "https://mine.example.com/t"
        );
        assert!(c.discovered["credentials.c"].keys.is_empty());

        // A pool: every endpoint, the authorize ones with [connect] only.
        let c = parse_with(&pool(&disc, true), &found(ISSUER)).unwrap();
        let p = &c.pools["users"];
        let a = p.authorize.as_ref().expect("the connect flow");
        assert_eq!(a.url.to_string(), "https://as.example.com/authorize");
        assert_eq!(
            a.par_url.as_ref().map(ToString::to_string).as_deref(),
            Some("https://as.example.com/par")
        );
        assert_eq!(a.issuer.as_deref(), Some(ISSUER), "the callback's iss");
        assert_eq!(
            p.revoke_url.as_ref().map(ToString::to_string).as_deref(),
            Some("https://as.example.com/revoke")
        );
        let explicit = format!("{disc}\nrevoke_url = \"https://mine.example.com/r\"\nauthorize_url = \"https://mine.example.com/a\"");
        let c = parse_with(&pool(&explicit, true), &found(ISSUER)).unwrap();
        let p = &c.pools["users"];
        assert_eq!(
            p.authorize.as_ref().unwrap().url.to_string(),
            "https://mine.example.com/a"
        );
        assert_eq!(
            p.revoke_url.as_ref().unwrap().to_string(),
            "https://mine.example.com/r"
        );
        let keys: Vec<&str> = c.discovered["connections.users"]
            .keys
            .iter()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(keys, ["token_url", "par_url"]);
        let c = parse_with(&pool(&disc, false), &found(ISSUER)).unwrap();
        assert!(c.pools["users"].authorize.is_none(), "no [connect]");
    }

    #[test]
    fn discovery_needs_an_issuer_and_the_document_must_be_its() {
        let e = parse_with(&credential("discovery = true"), &found(ISSUER)).unwrap_err();
        assert!(e.contains("credentials.c.discovery: needs issuer"), "{e}");
        let e = parse_with(&pool("discovery = true", false), &found(ISSUER)).unwrap_err();
        assert!(
            e.contains("connections.users.discovery: needs issuer"),
            "{e}"
        );
        let disc = format!("issuer = \"{ISSUER}\"\ndiscovery = true");
        let e = parse_with(&credential(&disc), &found("https://other.example.com")).unwrap_err();
        assert!(e.contains("credentials.c.issuer: "), "{e}");
        assert!(
            e.contains(ISSUER) && e.contains("https://other.example.com"),
            "both values: {e}"
        );
        let e = parse_with(&credential(&disc), &Discovered::default()).unwrap_err();
        assert!(e.contains("credentials.c.issuer: "), "{e}");
        let e = parse_with(
            &credential(&format!("issuer = \"{ISSUER}\"")),
            &found(ISSUER),
        )
        .unwrap_err();
        assert!(
            e.contains("credentials.c.issuer: is only used with discovery = true"),
            "{e}"
        );
        let e = parse_with(
            &credential("issuer = \"http://as.example.com\"\ndiscovery = true"),
            &found(ISSUER),
        )
        .unwrap_err();
        assert!(e.contains("credentials.c.issuer: must be https"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn a_missing_token_url_without_discovery_is_named() {
        let e = parse_with(&credential(""), &Discovered::default()).unwrap_err();
        assert!(e.contains("credentials.c.token_url: is required"), "{e}");
        let e = parse_with(&pool("", false), &Discovered::default()).unwrap_err();
        assert!(
            e.contains("connections.users.token_url: is required"),
            "{e}"
        );
    }

    #[test]
    fn a_discovered_endpoint_is_validated_as_if_written_and_says_where_it_came_from() {
        let mut m = metadata(ISSUER);
        m.token_endpoint = "http://as.example.com/token".into();
        m.revocation_endpoint = Some("ftp://as.example.com/revoke".into());
        let mut d = Discovered::default();
        d.insert(ISSUER, m);
        let disc = format!("issuer = \"{ISSUER}\"\ndiscovery = true");
        let e = parse_with(&pool(&disc, false), &d).unwrap_err();
        assert!(e.contains("connections.users.revoke_url: "), "{e}");
        assert!(
            e.contains(
                "(discovered from https://as.example.com/.well-known/oauth-authorization-server)"
            ),
            "{e}"
        );
    }

    #[test]
    fn well_known_urls_follow_rfc_8414_and_openid_discovery() {
        let u = |s: &str| well_known_urls(&s.parse().unwrap());
        assert_eq!(
            u("https://as.example.com"),
            [
                "https://as.example.com/.well-known/oauth-authorization-server",
                "https://as.example.com/.well-known/openid-configuration"
            ]
        );
        assert_eq!(
            u("https://as.example.com/realms/x/"),
            [
                "https://as.example.com/.well-known/oauth-authorization-server/realms/x",
                "https://as.example.com/realms/x/.well-known/openid-configuration"
            ]
        );
    }

    #[test]
    fn metadata_without_a_token_endpoint_or_not_json_is_refused() {
        let e = parse("u", br#"{"issuer":"x"}"#).unwrap_err();
        assert!(matches!(e, FetchError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("token_endpoint"), "{e}");
        let e = parse("u", b"<html>").unwrap_err();
        assert!(e.falls_back(), "{e}");
        let m = parse("u", br#"{"issuer":"x","token_endpoint":"t","extra":1}"#).unwrap();
        assert_eq!((m.token_endpoint.as_str(), m.url.as_str()), ("t", "u"));
    }
}
