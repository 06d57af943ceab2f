//! The operator's page on the admin listener (CONNECT.md, "Keeping
//! connections alive, and letting go"): `GET /ui`, server-rendered HTML
//! with no script and no external asset, listing the pools, their counts
//! by state and a searchable, paged list of one pool's connections, with a
//! re-authorize link and a delete (after a confirmation page) for each.
//!
//! Behind `admin.api_token` like the rest of the admin API, through a
//! login form and a signed session cookie; every POST form carries a CSRF
//! token (`ui/auth.rs` says how both are made and why). A request without
//! a valid session is sent (303) to `/ui/login`; a POST without the
//! session's CSRF token gets a 403 page; an unknown pool or connection a
//! 404 page. No page shows a token, the `api_token` or a cookie's value;
//! the one exception is the page made to show a new re-authorize link.
//!
//! Files: `html` (layout, headers, escaping), `auth` (login, session,
//! CSRF, logout), `list` (the main page), `actions` (re-authorize link,
//! delete). The work itself is the connections and connect sessions
//! APIs': this module only speaks HTML and forms.

mod actions;
mod auth;
mod html;
mod list;
mod webhooks;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::connections::read_body;
use crate::ground::form;
use crate::proxy::body::ProxyBody;
use crate::proxy::generation::AppState;
use crate::store::StoreError;

/// A form body or query string, decoded with the crate's one urlencoding.
pub struct Form(Vec<(String, String)>);

impl Form {
    /// `None` when a pair is malformed.
    fn parse(text: &str) -> Option<Form> {
        form::decode_pairs(text).map(Form)
    }

    /// The first value of `key`.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The 404 page.
fn not_found(text: &str, csrf: Option<&str>) -> Response<ProxyBody> {
    html::message(StatusCode::NOT_FOUND, "Not found", text, csrf)
}

/// The page of a store that failed: 503 when it is down, else 500.
fn store_failed(e: &StoreError, csrf: Option<&str>) -> Response<ProxyBody> {
    if e.is_unavailable() {
        let text = "The connection store is unavailable; try again shortly.";
        html::message(
            StatusCode::SERVICE_UNAVAILABLE,
            "Store unavailable",
            text,
            csrf,
        )
    } else {
        let text = format!("The connection store failed: {e}");
        html::message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Store error",
            &text,
            csrf,
        )
    }
}

/// A POST's form body (at most the admin API's 16 KiB); else the 400 page.
async fn read_form(req: Request<Incoming>) -> Result<Form, Response<ProxyBody>> {
    let bad = |text: &str| html::message(StatusCode::BAD_REQUEST, "Bad request", text, None);
    let bytes = read_body(req)
        .await
        .map_err(|_| bad("The form is larger than 16 KiB."))?;
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(Form::parse)
        .ok_or_else(|| bad("The form is not valid urlencoding."))
}

/// Serves one `/ui` or `/ui/...` request.
pub async fn handle(state: &AppState, req: Request<Incoming>) -> Response<ProxyBody> {
    let generation = state.generation.load_full();
    let token = generation.config.admin_api_token.as_ref();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let get = method == Method::GET || method == Method::HEAD;
    match (get, method == Method::POST, path.as_str()) {
        (true, _, "/ui/login") => return auth::login_page(token, StatusCode::OK, ""),
        (_, true, "/ui/login") => {
            let headers = req.headers().clone();
            return match read_form(req).await {
                Ok(form) => auth::login(token, &headers, &form),
                Err(r) => r,
            };
        }
        _ => {}
    }
    let Some(session) = auth::session(req.headers(), token) else {
        return html::see_other("/ui/login", &[]);
    };
    if get {
        let query = req.uri().query().unwrap_or("").to_owned();
        return serve_get(state, &session, &path, &query).await;
    }
    if method != Method::POST {
        let text = "The operator page takes GET and POST.";
        let csrf = Some(session.csrf());
        return html::message(StatusCode::METHOD_NOT_ALLOWED, "Not allowed", text, csrf);
    }
    let form = match read_form(req).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !session.csrf_ok(form.get("csrf")) {
        tracing::warn!("operator page: a POST without this session's CSRF token was refused");
        return auth::forbidden(Some(session.csrf()));
    }
    let g = &generation;
    match path.as_str() {
        "/ui/logout" => auth::logout(),
        "/ui/reauthorize" => actions::reauthorize(g, &session, &form).await,
        "/ui/delete" => actions::delete(g, &session, &form).await,
        "/ui/webhooks/retry" => webhooks::retry(state, &session, &form).await,
        _ => not_found("No such form.", Some(session.csrf())),
    }
}

async fn serve_get(
    state: &AppState,
    session: &auth::Session,
    path: &str,
    query: &str,
) -> Response<ProxyBody> {
    let csrf = Some(session.csrf());
    match path {
        "/ui" | "/ui/" => list::show(state, session, query).await,
        "/ui/delete" => match Form::parse(query) {
            Some(form) => {
                let g = state.generation.load_full();
                actions::confirm_delete(&g, session, &form).await
            }
            None => html::message(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "The query string is not valid urlencoding.",
                csrf,
            ),
        },
        _ => not_found("No such page: try /ui.", csrf),
    }
}
