//! `[webhooks]`: where lifecycle events go (CONNECT.md, "Lifecycle events
//! (webhooks)"): the receiver's URL, the Standard Webhooks signing secret,
//! which event types, how long one attempt and one event may take, extra
//! trust roots; and how long transient refresh failures last before
//! `connection.refresh_failing` is reported.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::Uri;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::ground::secret::SecretSource;

use super::units::{duration, is_loopback_host, parse_url};
use super::{ConfigError, Ctx};

/// Every event type, as the receiver sees it.
pub const EVENT_TYPES: [&str; 7] = [
    "connection.created",
    "connection.reauthorized",
    "connection.reauthorization_required",
    "connection.refresh_failing",
    "connection.recovered",
    "connection.deleted",
    "connect_session.failed",
];

/// Transient refresh failures last this long before they are reported.
pub const DEFAULT_REFRESH_FAILING_AFTER: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhooks {
    url: String,
    secret: SecretSource,
    events: Option<Vec<String>>,
    #[serde(default = "d_timeout", with = "duration")]
    timeout: Duration,
    #[serde(default = "d_max_age", with = "duration")]
    max_age: Duration,
    ca_file: Option<std::path::PathBuf>,
    #[serde(default = "d_failing_after", with = "duration")]
    refresh_failing_after: Duration,
}

fn d_timeout() -> Duration {
    Duration::from_secs(10)
}

fn d_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn d_failing_after() -> Duration {
    DEFAULT_REFRESH_FAILING_AFTER
}

/// `[webhooks]`, validated.
#[derive(Clone)]
pub struct WebhooksConfig {
    /// The receiver.
    pub url: Uri,
    /// The HMAC key: the secret's bytes after `whsec_`, base64-decoded.
    pub key: std::sync::Arc<[u8]>,
    /// Patterns of the types delivered (`connection.*`, an exact type).
    pub events: Vec<String>,
    /// One attempt's limit.
    pub timeout: Duration,
    /// An event not delivered this long after it happened is given up.
    pub max_age: Duration,
    /// Trust roots beyond webpki's.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// When transient refresh failures are reported.
    pub refresh_failing_after: Duration,
}

impl std::fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("url", &self.display_url())
            .field("key", &"<redacted>")
            .field("events", &self.events)
            .field("timeout", &self.timeout)
            .field("max_age", &self.max_age)
            .field("ca_certs", &self.ca_certs.len())
            .field("refresh_failing_after", &self.refresh_failing_after)
            .finish()
    }
}

impl PartialEq for WebhooksConfig {
    fn eq(&self, o: &Self) -> bool {
        self.url == o.url
            && self.key == o.key
            && self.events == o.events
            && self.timeout == o.timeout
            && self.max_age == o.max_age
            && self.ca_certs == o.ca_certs
            && self.refresh_failing_after == o.refresh_failing_after
    }
}

impl WebhooksConfig {
    /// The URL without its query (which may carry a receiver's token), for
    /// logs and `check`.
    pub fn display_url(&self) -> String {
        let scheme = self.url.scheme_str().unwrap_or("http");
        let authority = self.url.authority().map_or("", |a| a.as_str());
        let query = if self.url.query().is_some() {
            "?…"
        } else {
            ""
        };
        format!("{scheme}://{authority}{}{query}", self.url.path())
    }

    /// Whether events of type `kind` are delivered.
    pub fn wants(&self, kind: &str) -> bool {
        self.events.iter().any(|p| pattern_matches(p, kind))
    }
}

/// `*`, `prefix.*` or an exact type.
fn pattern_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

/// The HMAC key of a Standard Webhooks secret: `whsec_` then base64 of 24
/// to 64 bytes.
fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret
        .strip_prefix("whsec_")
        .ok_or("must start with \"whsec_\" (a Standard Webhooks secret)")?;
    let key = STANDARD
        .decode(b64)
        .map_err(|_| "the part after \"whsec_\" is not base64")?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!(
            "must hold 24 to 64 bytes after \"whsec_\" (it holds {})",
            key.len()
        ));
    }
    Ok(key)
}

impl Ctx {
    /// `[webhooks]`.
    pub(super) fn webhooks(
        &self,
        raw: Option<RawWebhooks>,
    ) -> Result<Option<WebhooksConfig>, ConfigError> {
        let Some(w) = raw else { return Ok(None) };
        let url = parse_url(&w.url).map_err(|m| self.err("webhooks.url", m))?;
        let host = url.host().unwrap_or_default();
        if url.scheme_str() == Some("http") && !is_loopback_host(host) {
            tracing::warn!(
                host,
                "webhooks.url is plain http beyond loopback: events and their signatures travel in clear"
            );
        }
        let secret = w
            .secret
            .resolve(&self.base)
            .map_err(|m| self.err("webhooks.secret", m))?;
        let key = secret_key(secret.expose()).map_err(|m| self.err("webhooks.secret", m))?;
        let events = w.events.unwrap_or_else(|| vec!["*".to_owned()]);
        for (i, p) in events.iter().enumerate() {
            if !EVENT_TYPES.iter().any(|t| pattern_matches(p, t)) {
                return Err(self.err(
                    &format!("webhooks.events[{i}]"),
                    format!(
                        "{p:?} matches no event type (known: {})",
                        EVENT_TYPES.join(", ")
                    ),
                ));
            }
        }
        if w.timeout.is_zero() || w.timeout > Duration::from_secs(300) {
            return Err(self.err(
                "webhooks.timeout",
                "must be between 1ms and 5 minutes".into(),
            ));
        }
        if w.max_age < w.timeout {
            return Err(self.err(
                "webhooks.max_age",
                "must be at least webhooks.timeout".into(),
            ));
        }
        Ok(Some(WebhooksConfig {
            url,
            key: key.into(),
            events,
            timeout: w.timeout,
            max_age: w.max_age,
            ca_certs: self.load_certs("webhooks.ca_file", &w.ca_file)?,
            refresh_failing_after: w.refresh_failing_after,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "connect_session.failed"));
        assert!(pattern_matches("connection.*", "connection.created"));
        assert!(!pattern_matches("connection.*", "connect_session.failed"));
        assert!(pattern_matches("connection.deleted", "connection.deleted"));
        assert!(!pattern_matches("connection.delete", "connection.deleted"));
    }

    /// A config with a store and `[webhooks]` holding `body`.
    fn parse(body: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let key = crate::ground::crypto::generate_key().unwrap();
        let text = format!("[store]\nurl = \"sqlite:x.db\"\nkey = \"{key}\"\n[webhooks]\n{body}\n");
        crate::config::Config::parse(&text, std::path::Path::new("p.toml"))
    }

    #[test]
    fn bad_values_name_their_key() {
        let secret = format!("whsec_{}", STANDARD.encode([1u8; 32]));
        let good = format!("url = \"http://127.0.0.1:9/h\"\nsecret = \"{secret}\"");
        let w = parse(&good).unwrap().webhooks.unwrap();
        assert_eq!(w.events, ["*"]);
        assert_eq!(w.max_age, Duration::from_secs(86400));
        assert_eq!(w.refresh_failing_after, DEFAULT_REFRESH_FAILING_AFTER);
        for (extra, key) in [
            ("events = [\"connection.create\"]", "webhooks.events[0]"),
            ("events = [\"*\", \"session.*\"]", "webhooks.events[1]"),
            ("timeout = \"0s\"", "webhooks.timeout"),
            ("timeout = \"10s\"\nmax_age = \"5s\"", "webhooks.max_age"),
            ("colour = \"red\"", "colour"),
        ] {
            let err = parse(&format!("{good}\n{extra}")).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let err =
            parse("url = \"http://127.0.0.1:9/h\"\nsecret = \"hunter2hunter2hunter2hunter2\"")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("webhooks.secret") && !err.contains("hunter2"),
            "{err}"
        );
        let err = parse(&format!("url = \"ftp://x/\"\nsecret = \"{secret}\"")).unwrap_err();
        assert!(err.to_string().contains("webhooks.url"), "{err}");
    }

    #[test]
    fn a_query_token_in_the_url_is_not_shown() {
        let text = format!(
            "[webhooks]\nurl = \"https://hooks.example.com/in?token=s3cr3t\"\nsecret = \"whsec_{}\"\n",
            STANDARD.encode([1u8; 32])
        );
        let c = crate::config::Config::parse(&text, std::path::Path::new("p.toml"));
        let err = c.expect_err("webhooks needs a store");
        assert!(err.to_string().contains("webhooks"), "{err}");
        let text = format!(
            "[store]\nurl = \"sqlite:x.db\"\nkey = \"{}\"\n{text}",
            crate::ground::crypto::generate_key().unwrap()
        );
        let c = crate::config::Config::parse(&text, std::path::Path::new("p.toml")).unwrap();
        let w = c.webhooks.unwrap();
        assert_eq!(w.display_url(), "https://hooks.example.com/in?…");
        assert!(!format!("{w:?}").contains("s3cr3t"));
    }

    #[test]
    fn secrets() {
        let good = format!("whsec_{}", STANDARD.encode([7u8; 32]));
        assert_eq!(secret_key(&good).unwrap(), vec![7u8; 32]);
        assert!(secret_key(&STANDARD.encode([7u8; 32]))
            .unwrap_err()
            .contains("whsec_"));
        assert!(secret_key("whsec_%%%").unwrap_err().contains("base64"));
        let short = format!("whsec_{}", STANDARD.encode([7u8; 8]));
        assert!(secret_key(&short).unwrap_err().contains("holds 8"));
    }
}
