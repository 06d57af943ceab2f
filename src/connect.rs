//! The `[connect]` listener (CONNECT.md, "The browser's way"): the only
//! pages browsers are sent to. `GET /connect/{token}` opens a session's
//! link (a binding cookie, then a 302 to the pool's authorize URL) and
//! `GET /connect/callback` takes the authorization server's answer (the
//! state spent, the code exchanged, then a 302 to the session's
//! `redirect_to` or a result page). Nothing else is served here: proxy
//! routes and admin paths are 404s.
//!
//! This layer speaks HTTP: cookies, query strings, pages
//! (`connect/pages.rs`), metrics. The flow's steps are
//! `connections::connect`'s; it sits above `proxy` (it reads the current
//! generation) and below `admin` and `server`.

pub mod pages;

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::CALLBACK_PATH;
use crate::connections::connect::{Callback, CallbackOutcome, ConnectError, Finished, LinkRefusal};
use crate::ground::form;
use crate::ground::now_ms;
use crate::ground::secret::Secret;
use crate::proxy::body::ProxyBody;
use crate::proxy::generation::{AppState, Generation};
use crate::store::{secret_hash, SessionStatus};
use pages::{page, redirect};

/// The binding cookie of session `id` is `fp_connect_{id}`.
const COOKIE_PREFIX: &str = "fp_connect_";
/// Longest query a callback may have (codes and states are short).
const MAX_QUERY: usize = 8 * 1024;

/// Serves one request on the connect listener.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Not allowed",
            &["Only links are served here."],
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let path = req.uri().path();
    if path == CALLBACK_PATH {
        return Ok(callback(&state, &req).await);
    }
    match path.strip_prefix("/connect/") {
        Some(token) if is_token_shaped(token) => Ok(open_link(&state, token, req.headers()).await),
        Some(_) => Ok(not_a_link()),
        None => Ok(page(
            StatusCode::NOT_FOUND,
            "Not found",
            &["There is nothing here."],
        )),
    }
}

/// Link tokens are 43 base64url characters.
fn is_token_shaped(s: &str) -> bool {
    s.len() == 43
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn not_a_link() -> Response<ProxyBody> {
    page(
        StatusCode::NOT_FOUND,
        "This link is not valid",
        &["Check that you opened the whole link, or ask the app for a new one."],
    )
}

fn unavailable() -> Response<ProxyBody> {
    let mut r = page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Please try again",
        &["We cannot continue right now. Reload this page in a minute."],
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
    r
}

fn connect_error(e: &ConnectError) -> Response<ProxyBody> {
    match e {
        ConnectError::Store(e) if e.is_unavailable() => unavailable(),
        ConnectError::BadRequest(_) => not_a_link(),
        ConnectError::Pushed(cause) => {
            tracing::warn!(%cause, "connect: the pushed authorization request failed");
            let mut r = page(
                StatusCode::BAD_GATEWAY,
                "Please try again",
                &["Your bank could not be reached. Reload this page in a minute."],
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            r
        }
        _ => {
            tracing::error!(error = %e, "connect page failed");
            page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                &["Ask the app for a new link."],
            )
        }
    }
}

/// The value of the binding cookie of session `id`, if the browser sent it.
fn browser_cookie(headers: &HeaderMap, id: &str) -> Option<String> {
    let name = format!("{COOKIE_PREFIX}{id}");
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

/// `Set-Cookie` binding session `id` to this browser for `max_age_s`
/// (0 clears it).
fn set_cookie(id: &str, value: &str, max_age_s: i64, secure: bool) -> Option<HeaderValue> {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE_PREFIX}{id}={value}; Path=/connect; Max-Age={max_age_s}; HttpOnly; SameSite=Lax{secure}"
    ))
    .ok()
}

/// `GET /connect/{token}`.
async fn open_link(state: &AppState, token: &str, headers: &HeaderMap) -> Response<ProxyBody> {
    let generation = state.generation.load_full();
    let (Some(connect), Some(store)) = (&generation.config.connect, &state.store) else {
        return not_a_link();
    };
    let session = match store.session_by_token(&secret_hash(token)).await {
        Ok(Some(s)) => s,
        Ok(None) => return not_a_link(),
        Err(_) => return unavailable(),
    };
    let Some(pool) = generation.pools.get(&session.pool) else {
        return not_a_link();
    };
    let browser = browser_cookie(headers, &session.id);
    let opened = match pool.open_link(connect, &session, browser.as_deref()).await {
        Ok(o) => o,
        Err(e) => return connect_error(&e),
    };
    match opened {
        Ok(o) => {
            let mut r = redirect(o.location.expose());
            let max_age = (session.expires_at - now_ms()).max(0) / 1000;
            if let Some(c) = set_cookie(
                &session.id,
                o.browser.expose(),
                max_age,
                connect.secure_cookies(),
            ) {
                r.headers_mut().insert(header::SET_COOKIE, c);
            }
            r
        }
        Err(refusal) => link_refused(state, &generation, &session.pool, refusal),
    }
}

fn link_refused(
    state: &AppState,
    generation: &Generation,
    pool: &str,
    refusal: LinkRefusal,
) -> Response<ProxyBody> {
    match refusal {
        LinkRefusal::Refused(f) => finished(state, generation, &f),
        LinkRefusal::Used => {
            state.metrics.connect_session(pool, "rejected");
            page(
                StatusCode::CONFLICT,
                "This link has already been used",
                &["It was opened in another browser. Ask the app for a new link."],
            )
        }
        LinkRefusal::Expired { newly } => expired(state, pool, newly),
        LinkRefusal::Finished(status) => page(
            StatusCode::CONFLICT,
            "This link has already been used",
            &[if status == SessionStatus::Connected {
                "Your account is already connected. You can close this window."
            } else {
                "The connection it started has ended. Ask the app for a new link."
            }],
        ),
    }
}

fn expired(state: &AppState, pool: &str, newly: bool) -> Response<ProxyBody> {
    if newly {
        state.metrics.connect_session(pool, "expired");
    }
    page(
        StatusCode::GONE,
        "This link has expired",
        &["Ask the app for a new link."],
    )
}

fn rejected(state: &AppState, pool: &str, why: &str) -> Response<ProxyBody> {
    state.metrics.connect_session(pool, "rejected");
    page(
        StatusCode::BAD_REQUEST,
        "This sign-in cannot be completed",
        &[why, "Nothing was connected. Start again from the app."],
    )
}

/// The callback's parameters; `None` when the query is malformed, too
/// long or repeats a parameter (RFC 6749 §3.1).
fn callback_params(req: &Request<Incoming>) -> Option<(Secret, Callback)> {
    let query = req.uri().query().unwrap_or("");
    if query.len() > MAX_QUERY {
        return None;
    }
    let pairs = form::decode_pairs(query)?;
    let mut seen: Vec<&str> = Vec::new();
    let mut state = None;
    let mut cb = Callback::default();
    for (k, v) in &pairs {
        if seen.contains(&k.as_str()) {
            return None;
        }
        seen.push(k);
        match k.as_str() {
            "state" => state = Some(Secret::new(v.clone())),
            "code" => cb.code = Some(Secret::new(v.clone())),
            "error" => cb.error = Some(v.clone()),
            "error_description" => cb.error_description = Some(v.clone()),
            "iss" => cb.iss = Some(v.clone()),
            _ => {}
        }
    }
    Some((state?, cb))
}

/// `GET /connect/callback`.
async fn callback(state: &AppState, req: &Request<Incoming>) -> Response<ProxyBody> {
    let Some((oauth_state, cb)) = callback_params(req) else {
        return rejected(
            state,
            "",
            "The answer from your bank is incomplete or malformed.",
        );
    };
    let generation = state.generation.load_full();
    let (Some(connect), Some(store)) = (&generation.config.connect, &state.store) else {
        return not_a_link();
    };
    let state_hash = secret_hash(oauth_state.expose());
    let session = match store.session_by_state(&state_hash).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return rejected(
                state,
                "",
                "This sign-in is not known, or it was completed already.",
            )
        }
        Err(_) => return unavailable(),
    };
    let Some(pool) = generation.pools.get(&session.pool) else {
        return not_a_link();
    };
    let browser = browser_cookie(req.headers(), &session.id);
    let outcome = pool
        .callback(connect, &session, &state_hash, browser.as_deref(), cb)
        .await;
    match outcome {
        Ok(CallbackOutcome::Rejected(why)) => rejected(state, &session.pool, why),
        Ok(CallbackOutcome::Used) => {
            rejected(state, &session.pool, "This sign-in was completed already.")
        }
        Ok(CallbackOutcome::Expired { newly }) => expired(state, &session.pool, newly),
        Ok(CallbackOutcome::Finished(f)) => finished(state, &generation, &f),
        Err(e) => connect_error(&e),
    }
}

/// The session ended: count it, clear the cookie, and send the browser to
/// `redirect_to` (if the current config still allows it) or the result page.
fn finished(state: &AppState, generation: &Generation, f: &Finished) -> Response<ProxyBody> {
    let outcome = f.status.as_str();
    state.metrics.connect_session(&f.pool, outcome);
    let allowed = |to: &str| {
        generation
            .config
            .connect
            .as_ref()
            .is_some_and(|c| c.check_redirect(to).is_ok())
    };
    let mut r = match f
        .redirect()
        .filter(|_| f.redirect_to.as_deref().is_some_and(allowed))
    {
        Some(to) => redirect(&to),
        None if f.status == SessionStatus::Connected => page(
            StatusCode::OK,
            "Your account is connected",
            &["You can close this window and return to the app."],
        ),
        None => {
            let error = f.error.as_deref().unwrap_or("failed");
            let why = if error == "access_denied" {
                "You declined to share your account.".to_owned()
            } else {
                format!("Your bank answered: {error}.")
            };
            page(
                StatusCode::OK,
                "Your account was not connected",
                &[
                    &why,
                    "You can close this window and start again from the app.",
                ],
            )
        }
    };
    let secure = generation
        .config
        .connect
        .as_ref()
        .is_some_and(|c| c.secure_cookies());
    if let Some(c) = set_cookie(&f.session_id, "", 0, secure) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_cookie_is_found_by_the_sessions_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; fp_connect_abc=secret; fp_connect_abcd=other"),
        );
        assert_eq!(browser_cookie(&h, "abc").as_deref(), Some("secret"));
        assert_eq!(browser_cookie(&h, "abcd").as_deref(), Some("other"));
        assert_eq!(browser_cookie(&h, "ab"), None);
        let c = set_cookie("abc", "v", 60, true).unwrap();
        assert_eq!(
            c,
            "fp_connect_abc=v; Path=/connect; Max-Age=60; HttpOnly; SameSite=Lax; Secure"
        );
    }

    #[test]
    fn only_token_shaped_paths_are_links() {
        assert!(is_token_shaped(&"a".repeat(43)));
        assert!(!is_token_shaped(&"a".repeat(42)));
        assert!(!is_token_shaped(&format!("{}%", "a".repeat(42))));
    }
}
