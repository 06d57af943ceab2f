//! Who may use the operator page: the login form (`GET`/`POST /ui/login`)
//! that trades `admin.api_token` for a session cookie, the check of that
//! cookie, the CSRF token of every POST form, and logout.
//!
//! # The session: a signed cookie, no table
//!
//! The cookie holds `{expires}.{nonce}.{tag}`: an expiry (Unix seconds,
//! [`SESSION_TTL`] after login), 128 random bits, and HMAC-SHA256 of both
//! and of the `api_token` in force, under a key drawn from the OS RNG once
//! per process ([`KEY`]). Chosen over a table of random session ids
//! because:
//! - the cookie says nothing about the token: the key is random, so a
//!   cookie is no offline oracle for guessing a weak `api_token` (an HMAC
//!   keyed with the token itself would be);
//! - nothing to keep: no table to bound, expire or lock, and `AppState`
//!   (the proxy layer's) stays as it is; the one process-wide value is this
//!   immutable key, like the connect pages' CSP;
//! - a changed `api_token` (a reload) ends every session, since the tag
//!   covers it; a restart does too (a new key): operators log in again.
//!
//! The price: logout clears the browser's cookie but cannot revoke a copy
//! of it, which works until it expires ([`SESSION_TTL`]), the token
//! changes or the process restarts.
//!
//! CSRF: every POST form carries HMAC(key, "csrf", cookie value), compared
//! in constant time; the login form's is bound the same way to a random
//! pre-login cookie that the login page sets. Cookies are `HttpOnly;
//! SameSite=Strict` and scoped to `/ui`. They are never `Secure`: the admin
//! listener has no TLS setting, so an operator reaching it over HTTPS does
//! so through a terminating proxy this process cannot see.
//!
//! Without `admin.api_token` the connections API asks nothing (the config
//! allows that only on a loopback `admin.listen`); the login form then asks
//! for nothing either, and one click gets the session the CSRF tokens need.

use std::sync::OnceLock;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use ring::hmac;
use subtle::ConstantTimeEq;

use super::html::{csrf_field, message, page, see_other};
use super::Form;
use crate::ground::crypto::{hex, random_bytes};
use crate::ground::now_ms;
use crate::ground::secret::Secret;
use crate::proxy::body::ProxyBody;

/// The session cookie.
const COOKIE: &str = "flinks_ui";
/// The pre-login cookie the login form's CSRF token is bound to.
const LOGIN_COOKIE: &str = "flinks_ui_login";
/// A session's lifetime: a working day; a copied cookie dies with it.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// How long a login form may stay open before it is submitted.
const LOGIN_TTL: Duration = Duration::from_secs(3600);

/// The per-process MAC key of sessions and CSRF tokens (see the module
/// doc): drawn once, never shown, never changed.
static KEY: OnceLock<hmac::Key> = OnceLock::new();

/// The key, drawn on first use; `None` if the OS RNG fails.
fn key() -> Option<&'static hmac::Key> {
    if let Some(k) = KEY.get() {
        return Some(k);
    }
    let bytes = random_bytes::<32>().ok()?;
    Some(KEY.get_or_init(|| hmac::Key::new(hmac::HMAC_SHA256, &bytes)))
}

/// HMAC of `parts`, each length-prefixed (so no two lists collide), as hex.
fn mac(parts: &[&[u8]]) -> Option<String> {
    let mut ctx = hmac::Context::with_key(key()?);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    Some(hex(ctx.sign().as_ref()))
}

/// Constant-time equality (the length is not secret).
fn same(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn now_secs() -> u64 {
    u64::try_from(now_ms() / 1000).unwrap_or(0)
}

/// A signed-in operator: the cookie checked, its CSRF token derived.
pub struct Session {
    csrf: String,
}

impl Session {
    /// The CSRF token of this session's forms.
    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    /// Whether `presented` is this session's CSRF token.
    pub fn csrf_ok(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| same(p, &self.csrf))
    }
}

/// The tag over a session's expiry and nonce and the token in force.
fn session_tag(token: Option<&Secret>, expires: &str, nonce: &str) -> Option<String> {
    let (flag, t): (&[u8], &[u8]) = match token {
        Some(t) => (b"token", t.expose().as_bytes()),
        None => (b"open", b""),
    };
    mac(&[b"session", flag, t, expires.as_bytes(), nonce.as_bytes()])
}

/// A new session cookie value.
fn new_session(token: Option<&Secret>) -> Option<String> {
    let expires = (now_secs() + SESSION_TTL.as_secs()).to_string();
    let nonce = hex(&random_bytes::<16>().ok()?);
    let tag = session_tag(token, &expires, &nonce)?;
    Some(format!("{expires}.{nonce}.{tag}"))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// The request's session, if its cookie is one this process signed for
/// `token` and has not expired.
pub fn session(headers: &HeaderMap, token: Option<&Secret>) -> Option<Session> {
    let value = cookie(headers, COOKIE)?;
    let (expires, rest) = value.split_once('.')?;
    let (nonce, tag) = rest.split_once('.')?;
    if expires.parse::<u64>().ok()? <= now_secs() {
        return None;
    }
    if !same(&session_tag(token, expires, nonce)?, tag) {
        return None;
    }
    let csrf = mac(&[b"csrf", value.as_bytes()])?;
    Some(Session { csrf })
}

/// A `Set-Cookie` for `name` on `path` living `max_age` seconds (0 clears).
fn set_cookie(name: &str, value: &str, path: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict"
    ))
    .expect("hex and ASCII")
}

/// A 500 page for a failed OS RNG.
fn no_randomness() -> Response<ProxyBody> {
    message(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "The system random number generator failed.",
        None,
    )
}

/// `GET /ui/login`: the form (with `note` above it), bound to a new
/// pre-login cookie.
pub fn login_page(token: Option<&Secret>, status: StatusCode, note: &str) -> Response<ProxyBody> {
    let Some(nonce) = random_bytes::<16>().ok().map(|b| hex(&b)) else {
        return no_randomness();
    };
    let Some(csrf) = mac(&[b"login", nonce.as_bytes()]) else {
        return no_randomness();
    };
    let field = if token.is_some() {
        "<p><label for=\"api_token\">Admin API token (<code>admin.api_token</code>)</label><br>\
         <input type=\"password\" id=\"api_token\" name=\"api_token\" autocomplete=\"off\" required autofocus></p>"
    } else {
        "<p class=\"muted\">No <code>admin.api_token</code> is configured: like the \
         connections API, this page is open to whoever reaches the admin listener \
         (which the config then keeps on loopback).</p>"
    };
    let note = if note.is_empty() {
        String::new()
    } else {
        format!("<p class=\"err\">{}</p>", super::html::escape(note))
    };
    let body = format!(
        "{note}<form method=\"post\" action=\"/ui/login\">{}{field}\
         <p><button type=\"submit\" id=\"login\">Log in</button></p></form>\n",
        csrf_field(&csrf)
    );
    let mut r = page(status, "Log in", &body, None);
    let c = set_cookie(LOGIN_COOKIE, &nonce, "/ui/login", LOGIN_TTL.as_secs());
    r.headers_mut().append(header::SET_COOKIE, c);
    r
}

/// `POST /ui/login`: the CSRF token bound to the pre-login cookie, then
/// the token; a session cookie and a 303 to `/ui`, or the form again.
pub fn login(token: Option<&Secret>, headers: &HeaderMap, form: &Form) -> Response<ProxyBody> {
    let expected = cookie(headers, LOGIN_COOKIE).and_then(|n| mac(&[b"login", n.as_bytes()]));
    let csrf_ok = match (expected, form.get("csrf")) {
        (Some(e), Some(p)) => same(&e, p),
        _ => false,
    };
    if !csrf_ok {
        return forbidden(None);
    }
    if let Some(t) = token {
        let presented = form.get("api_token").unwrap_or("");
        if !same(presented, t.expose()) {
            tracing::warn!("operator page: login refused (not the admin api_token)");
            let note = "That is not the admin API token.";
            return login_page(token, StatusCode::UNAUTHORIZED, note);
        }
    }
    let Some(value) = new_session(token) else {
        return no_randomness();
    };
    tracing::info!("operator page: signed in");
    see_other(
        "/ui",
        &[
            set_cookie(COOKIE, &value, "/ui", SESSION_TTL.as_secs()),
            set_cookie(LOGIN_COOKIE, "", "/ui/login", 0),
        ],
    )
}

/// `POST /ui/logout` (its CSRF token checked): the cookie cleared.
pub fn logout() -> Response<ProxyBody> {
    see_other("/ui/login", &[set_cookie(COOKIE, "", "/ui", 0)])
}

/// The 403 page of a POST without this session's CSRF token.
pub fn forbidden(csrf: Option<&str>) -> Response<ProxyBody> {
    message(
        StatusCode::FORBIDDEN,
        "Refused",
        "This form did not carry a valid CSRF token (it is stale, or was sent by another site). Reload the page and try again.",
        csrf,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn sessions_are_bound_to_the_token_and_expire() {
        let token = Secret::new("t0ken".to_owned());
        let value = new_session(Some(&token)).unwrap();
        assert!(!value.contains("t0ken"));
        let h = with_cookie(&format!("other=1; {COOKIE}={value}"));
        let s = session(&h, Some(&token)).expect("a session");
        assert!(s.csrf_ok(Some(s.csrf())));
        assert!(!s.csrf_ok(Some("00")) && !s.csrf_ok(None));
        let other = Secret::new("other".to_owned());
        assert!(session(&h, Some(&other)).is_none(), "another token");
        assert!(session(&h, None).is_none(), "no token");
        let (_, rest) = value.split_once('.').unwrap();
        let past = format!("{COOKIE}=1.{rest}");
        assert!(
            session(&with_cookie(&past), Some(&token)).is_none(),
            "expired"
        );
        let forged = format!("{COOKIE}=99999999999.{rest}");
        assert!(
            session(&with_cookie(&forged), Some(&token)).is_none(),
            "re-dated"
        );
        assert!(session(&with_cookie(&format!("{COOKIE}=x")), Some(&token)).is_none());
    }
}
