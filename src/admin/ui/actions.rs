//! What an operator does to one connection: create a re-authorize link (a
//! connect session for it, through the connect sessions API's
//! [`start_session`]) and delete it after a confirmation page (through
//! [`Pool::delete_revoking`], the connections API's path, so `revoke_url`
//! revokes first). The CSRF token is checked before any of this runs.

use std::sync::Arc;

use http::{Response, StatusCode};

use super::auth::Session;
use super::html::{csrf_field, escape, hidden, message, page};
use super::{not_found, store_failed, Form};
use crate::admin::sessions::start_session;
use crate::connections::connect::{ConnectError, SessionRequest};
use crate::connections::{valid_id, Deleted, Pool};
use crate::proxy::body::ProxyBody;
use crate::proxy::generation::Generation;
use crate::store::rfc3339;

/// The pool and connection a form names, both existing; else the 400 or
/// 404 page.
async fn target(
    g: &Generation,
    form: &Form,
    csrf: Option<&str>,
) -> Result<(Arc<Pool>, String), Response<ProxyBody>> {
    let name = form.get("pool").unwrap_or("");
    let Some(pool) = g.pools.get(name) else {
        return Err(not_found(&format!("No pool {name} is configured."), csrf));
    };
    let id = form.get("id").unwrap_or("");
    if !valid_id(id) {
        return Err(message(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "A connection id is 1-128 of A-Z a-z 0-9 . _ : @ -",
            csrf,
        ));
    }
    match pool.store().get(name, id).await {
        Ok(Some(_)) => Ok((Arc::clone(pool), id.to_owned())),
        Ok(None) => Err(not_found(
            &format!("Pool {name} has no connection {id}."),
            csrf,
        )),
        Err(e) => Err(store_failed(&e, csrf)),
    }
}

/// `POST /ui/reauthorize`: a connect session for the connection, and the
/// one page that shows its link.
pub async fn reauthorize(g: &Generation, session: &Session, form: &Form) -> Response<ProxyBody> {
    let csrf = Some(session.csrf());
    let (pool, id) = match target(g, form, csrf).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let request = SessionRequest {
        connection_id: Some(id.clone()),
        ..SessionRequest::default()
    };
    let created = match start_session(g, &pool, request).await {
        Ok(c) => c,
        Err(ConnectError::BadRequest(m)) => {
            return message(StatusCode::BAD_REQUEST, "No link", &m, csrf)
        }
        Err(ConnectError::Store(e)) => return store_failed(&e, csrf),
        Err(e @ (ConnectError::Random | ConnectError::Pushed(_))) => {
            return message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "No link",
                &e.to_string(),
                csrf,
            )
        }
    };
    let body = format!(
        "<p>Send this link to the user of <code>{id}</code> in pool <code>{pool}</code>. \
         It works once, until {expires}, and is shown only here.</p>\n\
         <p><label for=\"link\">Re-authorize link</label><br>\
         <input class=\"link\" id=\"link\" type=\"text\" readonly value=\"{link}\"></p>\n\
         <p class=\"muted\">Connect session <code id=\"session\">{session_id}</code>.</p>\n\
         <p><a href=\"/ui?{back}\">Back to the connections</a></p>\n",
        id = escape(&id),
        pool = escape(&pool.config().name),
        expires = rfc3339(created.session.expires_at),
        link = escape(created.connect_url.expose()),
        session_id = escape(&created.session.id),
        back = escape(&crate::ground::form::encode_pairs([(
            "pool",
            pool.config().name.as_str()
        )])),
    );
    page(StatusCode::OK, "Re-authorize link", &body, csrf)
}

/// `GET /ui/delete?pool=&id=`: the confirmation step, a POST form.
pub async fn confirm_delete(g: &Generation, session: &Session, form: &Form) -> Response<ProxyBody> {
    let csrf = Some(session.csrf());
    let (pool, id) = match target(g, form, csrf).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let revoke = if pool.config().revoke_url.is_some() {
        "Its refresh token is revoked at the provider first (<code>revoke_url</code>)."
    } else {
        "The pool has no <code>revoke_url</code>: the provider is not told."
    };
    let body = format!(
        "<p>Delete connection <code>{e_id}</code> of pool <code>{e_pool}</code>? {revoke} \
         The app's requests for it then fail until the user connects again.</p>\n\
         <form method=\"post\" action=\"/ui/delete\">{}{}{}\
         <button type=\"submit\" class=\"danger\" id=\"confirm\">Delete {e_id}</button> \
         <a href=\"/ui\">Cancel</a></form>\n",
        csrf_field(session.csrf()),
        hidden("pool", &pool.config().name),
        hidden("id", &id),
        e_id = escape(&id),
        e_pool = escape(&pool.config().name),
    );
    page(StatusCode::OK, "Delete a connection", &body, csrf)
}

/// `POST /ui/delete`: the connections API's delete, and what it did.
pub async fn delete(g: &Generation, session: &Session, form: &Form) -> Response<ProxyBody> {
    let csrf = Some(session.csrf());
    let (pool, id) = match target(g, form, csrf).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let text = match pool.delete_revoking(&id).await {
        Ok(Deleted { existed: false, .. }) => {
            let m = format!("Pool {} has no connection {id}.", pool.config().name);
            return not_found(&m, csrf);
        }
        Ok(Deleted { revoked: None, .. }) => format!("Connection {id} is deleted."),
        Ok(Deleted {
            revoked: Some(Ok(())),
            ..
        }) => {
            format!("Connection {id} is deleted; the provider revoked its refresh token.")
        }
        Ok(Deleted {
            revoked: Some(Err(e)),
            ..
        }) => {
            format!("Connection {id} is deleted; revocation at the provider failed: {e}")
        }
        Err(e) => return store_failed(&e, csrf),
    };
    message(StatusCode::OK, "Deleted", &text, csrf)
}
