//! [`Token`], a cached access token with its header values built once,
//! made from a token request's answer or from a stored record. The token's
//! bytes are held once: the bare value is a slice of the `Bearer` (or
//! `DPoP`) header's buffer, so a cached connection costs one copy of its
//! access token, not three.

use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use super::grant::{Granted, TokenError, MAX_LIFETIME};
use super::state;
use crate::config::AuthScheme;
use crate::ground::secret::Secret;

/// Never renew sooner than this after obtaining a token, whatever the
/// endpoint says, so a zero lifetime cannot turn into a request loop.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(500);
/// A token is not sent in the last part of its life (a tenth, at most
/// this), so clock drift and transit time cannot make it arrive expired.
const EXPIRY_MARGIN_MAX: Duration = Duration::from_secs(5);
/// An upstream rejection of a token younger than this (or a tenth of its
/// lifetime, if less) is the upstream's answer, not a sign the token is bad:
/// dropping it again would let one client hammer the token endpoint.
pub const REJECT_FLOOR_MAX: Duration = Duration::from_secs(30);

/// A cached access token with its prebuilt header values.
pub struct Token {
    /// `Bearer <token>`, or `DPoP <token>` for a DPoP-bound token.
    bearer: HeaderValue,
    /// The token alone: a slice of `bearer`'s buffer.
    bare: HeaderValue,
    /// A DPoP-bound token's `ath` (base64url SHA-256 of it), which every
    /// proof sent with it carries; `None` for a Bearer token.
    pub ath: Option<Box<str>>,
    /// When the request that obtained it was sent.
    pub obtained_at: Instant,
    /// It was fetched because the upstream rejected its predecessor: while
    /// fresh, a rejection of it is the upstream's answer.
    pub replaces_rejected: bool,
    /// The last instant the token may be sent.
    pub usable_until: Instant,
    /// When the refresh task renews it.
    pub refresh_at: Instant,
    /// Unix time the endpoint says it expires.
    pub expires_unix: u64,
    /// Granted scope, when the endpoint says.
    pub scope: Option<String>,
    /// The JWT `sub` claim, when present.
    pub sub: Option<String>,
    /// Lifetime granted.
    pub lifetime: Duration,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"***")
            .field("expires_unix", &self.expires_unix)
            .field("scope", &self.scope)
            .field("sub", &self.sub)
            .field("dpop", &self.ath.is_some())
            .finish()
    }
}

impl Token {
    /// The header value for `scheme`: prebuilt for `Bearer` and bare
    /// tokens. A DPoP-bound token is `DPoP <token>` under the `Bearer`
    /// scheme (config allows DPoP only with the default header and scheme).
    pub fn header_value(&self, scheme: &AuthScheme) -> HeaderValue {
        match scheme {
            AuthScheme::Bearer => self.bearer.clone(),
            AuthScheme::Bare => self.bare.clone(),
            AuthScheme::Other(s) => {
                let mut v = HeaderValue::from_str(&format!("{s} {}", self.expose()))
                    .unwrap_or_else(|_| self.bare.clone());
                v.set_sensitive(true);
                v
            }
        }
    }

    /// The token itself (for `flinks-proxy token --show`, and to compare
    /// two tokens).
    pub fn expose(&self) -> &str {
        // Built from a `String`, so UTF-8 (`to_str` would refuse obs-text).
        std::str::from_utf8(self.bare.as_bytes()).unwrap_or("")
    }

    /// Whether it may still be sent.
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    /// Whether an upstream rejection at `now` may drop it: not when it
    /// replaces a rejected token and is younger than `min(30s,
    /// lifetime/10)`. A fresh token refused right after its predecessor
    /// was refused points at a permission problem, not a bad token, and
    /// fetching yet another would only hammer the token endpoint.
    pub fn rejectable(&self, now: Instant) -> bool {
        let floor = REJECT_FLOOR_MAX.min(self.lifetime / 10);
        !self.replaces_rejected || now.saturating_duration_since(self.obtained_at) >= floor
    }

    /// A token obtained just now with `lifetime`, refreshed and retired as a
    /// fetched one would be (with the default `refresh_before`). For
    /// benchmarks and tests that put a token in a source with
    /// [`TokenSource::install`](super::TokenSource::install).
    pub fn new(access: &str, lifetime: Duration) -> Result<Token, TokenError> {
        let granted = Granted {
            access_token: Secret::new(access.to_owned()),
            refresh_token: None,
            lifetime: lifetime.min(MAX_LIFETIME),
            scope: None,
            sub: None,
            sent_at: Instant::now(),
            expires_unix: state::unix_now().saturating_add(lifetime.as_secs()),
            dpop: false,
        };
        Token::from_granted(&granted, crate::config::DEFAULT_REFRESH_BEFORE)
    }

    /// The cached form of a token request's answer: header values built
    /// once (marked sensitive), renewal due `refresh_before` ahead of expiry
    /// (at most half the lifetime), and retired a margin before expiry.
    /// Times count from when the request was sent.
    pub fn from_granted(g: &Granted, refresh_before: Duration) -> Result<Token, TokenError> {
        let access = g.access_token.expose();
        let invalid = || {
            TokenError::InvalidResponse(
                "access_token has characters not allowed in a header".into(),
            )
        };
        let scheme = if g.dpop { "DPoP " } else { "Bearer " };
        let mut buf = bytes::BytesMut::with_capacity(scheme.len() + access.len());
        buf.extend_from_slice(scheme.as_bytes());
        buf.extend_from_slice(access.as_bytes());
        let buf = buf.freeze();
        // `from_maybe_shared` of `Bytes` keeps the buffer: both values
        // share one allocation.
        let mut bearer = HeaderValue::from_maybe_shared(buf.clone()).map_err(|_| invalid())?;
        bearer.set_sensitive(true);
        let mut bare =
            HeaderValue::from_maybe_shared(buf.slice(scheme.len()..)).map_err(|_| invalid())?;
        bare.set_sensitive(true);
        let lifetime = g.lifetime.min(MAX_LIFETIME);
        let margin = (lifetime / 10).min(EXPIRY_MARGIN_MAX);
        let ahead = refresh_before.min(lifetime / 2);
        let refresh_in = lifetime.saturating_sub(ahead).max(MIN_REFRESH_INTERVAL);
        let at = |d: Duration| {
            g.sent_at
                .checked_add(d)
                .ok_or_else(|| TokenError::InvalidResponse("lifetime out of range".into()))
        };
        Ok(Token {
            obtained_at: g.sent_at,
            replaces_rejected: false,
            bearer,
            bare,
            ath: g.dpop.then(|| super::dpop::ath(access).into()),
            usable_until: at(lifetime.saturating_sub(margin))?,
            refresh_at: at(refresh_in)?,
            expires_unix: g.expires_unix,
            scope: g.scope.clone(),
            sub: g.sub.clone(),
            lifetime,
        })
    }
}

/// The stored access token as a cached [`Token`], if it has not expired.
/// Its renewal is placed as if it had been fetched at the last refresh (or
/// authorization), so a cold read schedules it like a warm one. `dpop`:
/// the credential or pool sends DPoP proofs, so its stored tokens are
/// DPoP-bound (see `Granted::dpop`).
pub fn stored_token(
    record: &crate::store::Record,
    refresh_before: Duration,
    dpop: bool,
) -> Option<Token> {
    let access = record.tokens.access_token.clone()?;
    let expires = record.tokens.access_expires_at?;
    let issued = record
        .info
        .last_refresh_at
        .unwrap_or(record.info.authorized_at)
        .min(expires);
    let now_ms = crate::ground::now_ms();
    let since_issue = Duration::from_millis(u64::try_from(now_ms - issued).ok()?);
    let lifetime = Duration::from_millis(u64::try_from(expires - issued).ok()?);
    if now_ms >= expires || lifetime.is_zero() {
        return None;
    }
    let granted = Granted {
        access_token: access,
        refresh_token: None,
        lifetime,
        scope: None,
        sub: record.info.sub.clone(),
        sent_at: Instant::now().checked_sub(since_issue)?,
        expires_unix: u64::try_from(expires / 1000).ok()?,
        dpop,
    };
    Token::from_granted(&granted, refresh_before).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(access: &str, lifetime: Duration) -> Granted {
        Granted {
            access_token: Secret::new(access.to_owned()),
            refresh_token: None,
            lifetime,
            scope: None,
            sub: None,
            sent_at: Instant::now(),
            expires_unix: 0,
            dpop: false,
        }
    }

    #[test]
    fn refresh_ahead_is_capped_at_half_the_lifetime() {
        let sixty = Duration::from_secs(60);
        let g = granted("a", Duration::from_secs(2));
        let t = Token::from_granted(&g, sixty).unwrap();
        assert_eq!(t.refresh_at - g.sent_at, Duration::from_secs(1));
        assert!(t.usable_until - g.sent_at >= Duration::from_millis(1800));
        let g = granted("a", Duration::from_secs(3600));
        let t = Token::from_granted(&g, sixty).unwrap();
        assert_eq!(t.refresh_at - g.sent_at, Duration::from_secs(3540));
        assert!(t.usable_until > t.refresh_at);
        let g = granted("a", Duration::ZERO);
        let t = Token::from_granted(&g, sixty).unwrap();
        assert_eq!(t.refresh_at - g.sent_at, MIN_REFRESH_INTERVAL);
    }

    #[test]
    fn lifetimes_beyond_the_cap_are_capped() {
        let g = granted("a", Duration::MAX);
        let t = Token::from_granted(&g, Duration::from_secs(60)).unwrap();
        assert_eq!(t.lifetime, MAX_LIFETIME);
        assert!(t.usable_until - g.sent_at <= MAX_LIFETIME);
    }

    #[test]
    fn header_unsafe_tokens_are_invalid_responses() {
        let g = granted("a\nb", Duration::from_secs(60));
        assert!(matches!(
            Token::from_granted(&g, Duration::from_secs(1)),
            Err(TokenError::InvalidResponse(_))
        ));
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::from_granted(
            &granted("tok-123", Duration::from_secs(9)),
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(!format!("{t:?}").contains("tok-123"));
        assert!(t.bearer.is_sensitive());
    }

    #[test]
    fn the_token_is_held_once() {
        for dpop in [false, true] {
            let access = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyJ9.c2ln-é";
            let g = Granted {
                dpop,
                ..granted(access, Duration::from_secs(60))
            };
            let t = Token::from_granted(&g, Duration::from_secs(1)).unwrap();
            let scheme = if dpop { "DPoP " } else { "Bearer " };
            let bearer = t.header_value(&AuthScheme::Bearer);
            assert_eq!(bearer.as_bytes(), format!("{scheme}{access}").as_bytes());
            assert_eq!(
                t.header_value(&AuthScheme::Bare).as_bytes(),
                access.as_bytes()
            );
            assert_eq!(t.expose(), access);
            assert!(t.header_value(&AuthScheme::Bare).is_sensitive());
            // One allocation: the bare value points into the header's bytes.
            let start = t.bearer.as_bytes().as_ptr() as usize;
            assert_eq!(t.bare.as_bytes().as_ptr() as usize, start + scheme.len());
            let other = t.header_value(&AuthScheme::Other("Token".into()));
            assert_eq!(other.as_bytes(), format!("Token {access}").as_bytes());
        }
    }
}
