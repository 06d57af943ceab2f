//! The hosted connect flow on a pool (CONNECT.md, "Connect sessions" and
//! "The browser's way"), without HTTP: creating a session and its link,
//! opening the link (a `state`, a PKCE verifier, the browser's binding
//! secret, the authorize URL), and the callback (the `state` spent before
//! the code is exchanged, then the connection created or re-authorized
//! and the session finished). The `[connect]` listener's pages and the
//! admin API's JSON are `crate::connect`'s and `crate::admin`'s.
//!
//! Every secret here is 256 bits from the OS RNG (`ring`'s
//! `SystemRandom`), kept in the store only as a SHA-256 hash (the verifier
//! sealed), and never logged.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::{valid_id, AuthorizeError, Exchange, Pool};
use crate::config::{
    AuthorizeConfig, ConnectConfig, MAX_SESSION_TTL, MIN_SESSION_TTL, SESSION_AUTHORIZE_PARAMS,
};
use crate::ground::crypto::{hex, random_bytes};
use crate::ground::form;
use crate::ground::now_ms;
use crate::ground::secret::Secret;
use crate::store::retry_while_unavailable;
use crate::store::{
    secret_hash, NewSession, Session, SessionEnd, SessionPhase, SessionStatus, StoreError,
};
use crate::tokens::grant::TokenError;

/// Longest authorize parameter value a session may set.
const MAX_PARAM_LEN: usize = 512;
/// A session's ending is retried this long against a store that is down
/// (the code is spent; the app must learn what it bought).
const FINISH_RETRY: Duration = Duration::from_secs(10);
/// A callback whose exchange is running when the session expires has this
/// long to finish it before a sweep calls the session expired.
pub const EXCHANGE_GRACE: Duration = Duration::from_secs(5 * 60);

/// What an app asks for (`POST /connect-sessions/{pool}`).
#[derive(Debug, Default)]
pub struct SessionRequest {
    /// The connection to create or re-authorize.
    pub connection_id: Option<String>,
    /// Where the browser goes at the end.
    pub redirect_to: Option<String>,
    /// The session's lifetime.
    pub ttl: Option<Duration>,
    /// Extra authorize parameters.
    pub authorize_params: Vec<(String, String)>,
}

/// Why a session was not created or a step not taken.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The request is wrong; the text says how (it names no secret).
    #[error("{0}")]
    BadRequest(String),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The OS RNG failed.
    #[error("the system random number generator failed")]
    Random,
    /// The authorization server's pushed authorization endpoint failed or
    /// refused (the text is the scrubbed token error: no secret).
    #[error("pushed authorization request: {0}")]
    Pushed(String),
}

/// A created session and its link (the link is shown once).
pub struct Created {
    /// The session.
    pub session: Session,
    /// `public_url/connect/{token}`: a bearer secret.
    pub connect_url: Secret,
}

/// The link opened: where to send the browser and the cookie binding it.
pub struct Opened {
    /// The authorize URL (carries the `state`).
    pub location: Secret,
    /// The binding cookie's value (new, or the one the browser showed).
    pub browser: Secret,
}

/// Why a link does not lead to the bank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkRefusal {
    /// Opened by another browser already, or its code is being exchanged.
    Used,
    /// Past its lifetime; `newly`: this call ended it (count it once).
    Expired {
        /// Whether this call marked it expired.
        newly: bool,
    },
    /// It ended already.
    Finished(SessionStatus),
    /// The authorization server refused the pushed authorization request
    /// (`invalid_client`, `invalid_request`, …): no browser could go on,
    /// so the session ended failed with its error, as a denied consent.
    Refused(Finished),
}

/// What the callback brought (`GET /connect/callback?...`).
#[derive(Debug, Default)]
pub struct Callback {
    /// `code`.
    pub code: Option<Secret>,
    /// `error`.
    pub error: Option<String>,
    /// `error_description`.
    pub error_description: Option<String>,
    /// `iss` (RFC 9207).
    pub iss: Option<String>,
}

/// How a callback ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// Nothing was exchanged and the session is unchanged: the browser is
    /// not the one that opened the link, or `iss` is wrong.
    Rejected(&'static str),
    /// The state was spent already (a replay), or the session ended.
    Used,
    /// The session is past its lifetime; `newly` as for links.
    Expired {
        /// Whether this call marked it expired.
        newly: bool,
    },
    /// The session ended: connected or failed.
    Finished(Finished),
}

/// A finished session as the browser's last page or redirect shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The session.
    pub session_id: String,
    /// Its pool.
    pub pool: String,
    /// `connected` or `failed`.
    pub status: SessionStatus,
    /// The connection (connected).
    pub connection_id: Option<String>,
    /// OAuth `error` (failed).
    pub error: Option<String>,
    /// OAuth `error_description` (failed).
    pub description: Option<String>,
    /// Where the browser goes.
    pub redirect_to: Option<String>,
}

impl Finished {
    /// `redirect_to` with the outcome in its query, if there is one.
    pub fn redirect(&self) -> Option<String> {
        let to = self.redirect_to.as_deref()?;
        let mut pairs = vec![
            ("session_id", self.session_id.as_str()),
            ("status", self.status.as_str()),
        ];
        if let Some(id) = &self.connection_id {
            if self.status == SessionStatus::Connected {
                pairs.push(("connection_id", id));
            }
        }
        if let Some(e) = &self.error {
            pairs.push(("error", e));
        }
        Some(form::with_query(to, &form::encode_pairs(pairs)))
    }
}

/// 256 bits from the OS RNG, base64url without padding (43 characters).
pub fn random_secret() -> Result<String, ConnectError> {
    let bytes = random_bytes::<32>().map_err(|_| ConnectError::Random)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// 128 bits from the OS RNG as hex: a session id.
fn random_id() -> Result<String, ConnectError> {
    let bytes = random_bytes::<16>().map_err(|_| ConnectError::Random)?;
    Ok(hex(&bytes))
}

/// RFC 7636 S256: BASE64URL(SHA256(verifier)).
pub fn code_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// An OAuth `error` from the network, kept only if it looks like one.
fn clean_error(e: &str) -> String {
    let ok = (1..=64).contains(&e.len())
        && e.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        e.to_owned()
    } else {
        "invalid_error".to_owned()
    }
}

/// An `error_description` from the network: no control characters, bounded.
fn clean_text(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(300).collect()
}

impl Pool {
    /// The pool's authorize settings, if it has the connect flow.
    pub fn authorize_config(&self) -> Option<&AuthorizeConfig> {
        self.config.authorize.as_ref()
    }

    /// Creates a pending session and its link.
    pub async fn create_session(
        &self,
        connect: &ConnectConfig,
        req: SessionRequest,
    ) -> Result<Created, ConnectError> {
        let bad = |m: String| Err(ConnectError::BadRequest(m));
        let Some(authorize) = self.authorize_config() else {
            return bad(format!(
                "pool {} has no authorize_url: set connections.{}.authorize_url for the connect flow",
                self.config.name, self.config.name
            ));
        };
        if let Some(id) = &req.connection_id {
            if !valid_id(id) {
                return bad("connection_id: 1-128 of A-Z a-z 0-9 . _ : @ -".into());
            }
        }
        if let Some(to) = &req.redirect_to {
            connect
                .check_redirect(to)
                .map_err(|m| ConnectError::BadRequest(format!("redirect_to: {m}")))?;
        }
        let ttl = req.ttl.unwrap_or(connect.session_ttl);
        if !(MIN_SESSION_TTL..=MAX_SESSION_TTL).contains(&ttl) {
            return bad("ttl: must be between 1 minute and 1 day".into());
        }
        check_session_params(authorize, &req.authorize_params)?;
        let (id, token) = (random_id()?, random_secret()?);
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let new = NewSession {
            id: &id,
            pool: &self.config.name,
            token_hash: &secret_hash(&token),
            connection_id: req.connection_id.as_deref(),
            redirect_to: req.redirect_to.as_deref(),
            authorize_params: &req.authorize_params,
            expires_at: now_ms().saturating_add(ttl_ms),
        };
        self.store.create_session(&new).await?;
        let session = self
            .store
            .session(&self.config.name, &id)
            .await?
            .ok_or_else(|| {
                ConnectError::BadRequest("the session vanished as it was created".into())
            })?;
        tracing::info!(pool = %self.config.name, session = %id, "connect session created");
        Ok(Created {
            session,
            connect_url: Secret::new(connect.connect_url(&token)),
        })
    }

    /// One of this pool's sessions.
    pub async fn session(&self, id: &str) -> Result<Option<Session>, StoreError> {
        self.store.session(&self.config.name, id).await
    }

    /// Deletes a session; its link stops working.
    pub async fn delete_session(&self, id: &str) -> Result<bool, StoreError> {
        self.store.delete_session(&self.config.name, id).await
    }

    /// A browser opened `session`'s link, showing `browser` (its binding
    /// cookie for this session, if any): a fresh `state` and verifier, and
    /// the authorize URL. The browser that opened the link may open it
    /// again (the old `state` stops working); another may not.
    pub async fn open_link(
        &self,
        connect: &ConnectConfig,
        session: &Session,
        browser: Option<&str>,
    ) -> Result<Result<Opened, LinkRefusal>, ConnectError> {
        if let Some(refusal) = self.link_refusal(session, browser).await? {
            return Ok(Err(refusal));
        }
        let Some(authorize) = self.authorize_config() else {
            return Err(ConnectError::BadRequest(
                "the pool has no authorize_url any more".into(),
            ));
        };
        let browser = match browser {
            Some(b) if session.phase == SessionPhase::Opened => b.to_owned(),
            _ => random_secret()?,
        };
        let state = random_secret()?;
        let verifier = if authorize.pkce {
            Some(Secret::new(random_secret()?))
        } else {
            None
        };
        let opened = self
            .store
            .open_session(
                session,
                &secret_hash(&browser),
                &secret_hash(&state),
                verifier.as_ref(),
            )
            .await?;
        if !opened {
            return Ok(Err(LinkRefusal::Used));
        }
        let location = match self
            .authorize_location(connect, authorize, session, &state, verifier.as_ref())
            .await
        {
            Ok(l) => l,
            Err(TokenError::Rejected {
                error, description, ..
            }) => {
                let outcome = self
                    .finish(session, Ended::failed(error, description))
                    .await?;
                return Ok(Err(match outcome {
                    CallbackOutcome::Finished(f) => LinkRefusal::Refused(f),
                    _ => LinkRefusal::Finished(SessionStatus::Failed),
                }));
            }
            Err(e) => return Err(ConnectError::Pushed(e.to_string())),
        };
        Ok(Ok(Opened {
            location: Secret::new(location),
            browser: Secret::new(browser),
        }))
    }

    /// Why the link cannot be opened now, if it cannot.
    async fn link_refusal(
        &self,
        session: &Session,
        browser: Option<&str>,
    ) -> Result<Option<LinkRefusal>, ConnectError> {
        let now = now_ms();
        if session.status_at(now) == SessionStatus::Expired {
            return Ok(Some(LinkRefusal::Expired {
                newly: self.expire(session).await?,
            }));
        }
        if session.status != SessionStatus::Pending {
            return Ok(Some(LinkRefusal::Finished(session.status)));
        }
        let same_browser = browser
            .zip(session.browser_hash.as_deref())
            .is_some_and(|(b, h)| secret_hash(b) == h);
        Ok(match session.phase {
            SessionPhase::New => None,
            SessionPhase::Opened if same_browser => None,
            SessionPhase::Opened | SessionPhase::Exchanging => Some(LinkRefusal::Used),
        })
    }

    /// Marks a pending session expired; whether this call did.
    async fn expire(&self, session: &Session) -> Result<bool, StoreError> {
        let end = SessionEnd {
            status: SessionStatus::Expired,
            connection_id: None,
            error: None,
            description: None,
        };
        self.store.finish_session(&session.id, &end).await
    }

    /// Where the browser goes: the authorize URL with every parameter, or,
    /// with `par_url`, with `client_id` and the `request_uri` the pushed
    /// request was answered with (RFC 9126 §4).
    async fn authorize_location(
        &self,
        connect: &ConnectConfig,
        authorize: &AuthorizeConfig,
        session: &Session,
        state: &str,
        verifier: Option<&Secret>,
    ) -> Result<String, TokenError> {
        let redirect_uri = connect.redirect_uri();
        let challenge = verifier.map(|v| code_challenge(v.expose()));
        let mut pairs: Vec<(&str, &str)> = vec![
            ("response_type", "code"),
            ("client_id", &self.config.client_id),
            ("redirect_uri", &redirect_uri),
        ];
        if let Some(scope) = &self.config.scope {
            pairs.push(("scope", scope));
        }
        pairs.push(("state", state));
        if let Some(c) = &challenge {
            pairs.push(("code_challenge", c));
            pairs.push(("code_challenge_method", "S256"));
        }
        // RFC 9449 §10: the code is bound to the pool's DPoP key, so only
        // a token request proving that key can exchange it.
        if let Some(d) = &self.endpoint.dpop {
            pairs.push(("dpop_jkt", d.thumbprint()));
        }
        let session_keys: Vec<&str> = session
            .authorize_params
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        for (k, v) in &authorize.params {
            if !session_keys.contains(&k.as_str()) {
                pairs.push((k, v));
            }
        }
        for (k, v) in &session.authorize_params {
            pairs.push((k, v));
        }
        let url = authorize.url.to_string();
        let Some(par_url) = &authorize.par_url else {
            return Ok(form::with_query(&url, &form::encode_pairs(pairs)));
        };
        let request_uri = crate::tokens::grant::push(&self.endpoint, par_url, &pairs).await?;
        let pairs = [
            ("client_id", self.config.client_id.as_str()),
            ("request_uri", request_uri.as_str()),
        ];
        Ok(form::with_query(&url, &form::encode_pairs(pairs)))
    }

    /// The callback for `session` (found by its `state`), from a browser
    /// showing `browser`: checks the browser and `iss`, spends the state,
    /// then ends the session with the provider's error or the exchange's
    /// result.
    pub async fn callback(
        self: &Arc<Self>,
        connect: &ConnectConfig,
        session: &Session,
        state_hash: &str,
        browser: Option<&str>,
        cb: Callback,
    ) -> Result<CallbackOutcome, ConnectError> {
        let now = now_ms();
        if session.status_at(now) == SessionStatus::Expired {
            return Ok(CallbackOutcome::Expired {
                newly: self.expire(session).await?,
            });
        }
        let browser_hash = match (browser, &session.browser_hash) {
            (Some(b), Some(h)) if secret_hash(b) == *h => h.clone(),
            _ => {
                return Ok(CallbackOutcome::Rejected(
                    "this browser did not open the link",
                ))
            }
        };
        if let Some(issuer) = self.authorize_config().and_then(|a| a.issuer.as_deref()) {
            if cb.iss.as_deref() != Some(issuer) {
                return Ok(CallbackOutcome::Rejected(
                    "the callback's iss is not the configured issuer",
                ));
            }
        }
        let Some(spent) = self.store.spend_state(state_hash, &browser_hash).await? else {
            return Ok(CallbackOutcome::Used);
        };
        let end = self.exchange_callback(connect, &spent, cb).await;
        self.finish(&spent, end).await
    }

    /// The provider's error, or the code exchanged.
    async fn exchange_callback(
        self: &Arc<Self>,
        connect: &ConnectConfig,
        s: &Session,
        cb: Callback,
    ) -> Ended {
        if let Some(error) = &cb.error {
            return Ended::failed(
                clean_error(error),
                cb.error_description.as_deref().map(clean_text),
            );
        }
        let Some(code) = cb.code.filter(|c| !c.expose().is_empty()) else {
            return Ended::failed(
                "invalid_request".into(),
                Some("the callback carried no code".into()),
            );
        };
        let redirect_uri = connect.redirect_uri();
        let exchange = Exchange::Code {
            code: code.expose(),
            redirect_uri: Some(&redirect_uri),
            code_verifier: s.code_verifier.as_ref().map(Secret::expose),
        };
        match self.authorize(exchange, s.connection_id.as_deref()).await {
            Ok((info, _)) => Ended {
                status: SessionStatus::Connected,
                connection_id: Some(info.id),
                error: None,
                description: None,
            },
            Err(AuthorizeError::Rejected { error, description }) => {
                Ended::failed(clean_error(&error), description.as_deref().map(clean_text))
            }
            Err(AuthorizeError::EndpointUnavailable(e)) => Ended::failed(
                "token_endpoint_unavailable".into(),
                Some(format!("the token endpoint failed: {e}")),
            ),
            Err(AuthorizeError::Store(_)) => Ended::failed(
                "store_unavailable".into(),
                Some("the connection could not be stored".into()),
            ),
        }
    }

    /// Writes the session's end, trying a store that is down again for a
    /// while: the code is spent, and the app must learn what it bought.
    async fn finish(&self, s: &Session, end: Ended) -> Result<CallbackOutcome, ConnectError> {
        let write = SessionEnd {
            status: end.status,
            connection_id: end.connection_id.as_deref(),
            error: end.error.as_deref(),
            description: end.description.as_deref(),
        };
        retry_while_unavailable(FINISH_RETRY, || self.store.finish_session(&s.id, &write)).await?;
        tracing::info!(
            pool = %self.config.name,
            session = %s.id,
            status = end.status.as_str(),
            error = end.error.as_deref().unwrap_or(""),
            "connect session finished"
        );
        Ok(CallbackOutcome::Finished(Finished {
            session_id: s.id.clone(),
            pool: s.pool.clone(),
            status: end.status,
            connection_id: end.connection_id.or_else(|| s.connection_id.clone()),
            error: end.error,
            description: end.description,
            redirect_to: s.redirect_to.clone(),
        }))
    }
}

/// A session's end, before it is written.
struct Ended {
    status: SessionStatus,
    connection_id: Option<String>,
    error: Option<String>,
    description: Option<String>,
}

impl Ended {
    fn failed(error: String, description: Option<String>) -> Ended {
        Ended {
            status: SessionStatus::Failed,
            connection_id: None,
            error: Some(error),
            description,
        }
    }
}

/// A session's own authorize parameters: the well-known per-user ones and
/// the keys the pool lists.
fn check_session_params(
    authorize: &AuthorizeConfig,
    params: &[(String, String)],
) -> Result<(), ConnectError> {
    for (k, v) in params {
        let allowed = SESSION_AUTHORIZE_PARAMS.contains(&k.as_str())
            || authorize.params.iter().any(|(pk, _)| pk == k);
        if !allowed {
            return Err(ConnectError::BadRequest(format!(
                "authorize_params.{k}: not allowed per session (allowed: {}, and the pool's authorize_params keys)",
                SESSION_AUTHORIZE_PARAMS.join(", ")
            )));
        }
        if v.len() > MAX_PARAM_LEN || v.chars().any(char::is_control) {
            return Err(ConnectError::BadRequest(format!(
                "authorize_params.{k}: at most {MAX_PARAM_LEN} bytes, no control characters"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_s256_challenge_is_rfc_7636s_example() {
        // RFC 7636, Appendix B.
        assert_eq!(
            code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn secrets_are_256_bits_and_differ() {
        let (a, b) = (random_secret().unwrap(), random_secret().unwrap());
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
    }

    #[test]
    fn network_errors_are_kept_only_when_they_look_like_oauth_errors() {
        assert_eq!(clean_error("access_denied"), "access_denied");
        assert_eq!(clean_error("<script>"), "invalid_error");
        assert_eq!(clean_error(""), "invalid_error");
        assert_eq!(clean_text("a\nb\u{7}c"), "abc");
    }

    #[test]
    fn the_redirect_carries_the_outcome() {
        let mut f = Finished {
            session_id: "s1".into(),
            pool: "users".into(),
            status: SessionStatus::Connected,
            connection_id: Some("u 1".into()),
            error: None,
            description: None,
            redirect_to: Some("https://app.example.com/done?x=1".into()),
        };
        assert_eq!(
            f.redirect().unwrap(),
            "https://app.example.com/done?x=1&session_id=s1&status=connected&connection_id=u+1"
        );
        f.status = SessionStatus::Failed;
        f.error = Some("access_denied".into());
        assert_eq!(
            f.redirect().unwrap(),
            "https://app.example.com/done?x=1&session_id=s1&status=failed&error=access_denied"
        );
        f.redirect_to = None;
        assert_eq!(f.redirect(), None);
    }
}
