//! The webhook queue on `GET /ui`: how many events wait and since when, the
//! pending ones and the ones given up, each given up one with a retry form
//! (`POST /ui/webhooks/retry`, the events API's
//! [`Store::retry_event`](crate::store::Store::retry_event)).

use http::{Response, StatusCode};

use super::auth::Session;
use super::html::{age, csrf_field, escape, hidden, page};
use super::{not_found, store_failed, Form};
use crate::ground::now_ms;
use crate::proxy::body::ProxyBody;
use crate::proxy::generation::AppState;
use crate::store::{rfc3339, EventState, StoreError, WebhookEvent};

/// Events listed per state.
const SHOWN: u32 = 20;

/// The section (empty without a store).
pub async fn section(state: &AppState, session: &Session) -> Result<String, StoreError> {
    let Some(store) = state.store.as_deref() else {
        return Ok(String::new());
    };
    let configured = state.generation.load().config.webhooks.is_some();
    let queue = store.webhook_queue().await?;
    let mut html = String::from("<h2>Webhooks</h2>\n");
    if !configured {
        html.push_str(
            "<p class=\"muted\">No <code>[webhooks]</code> receiver is configured.</p>\n",
        );
    }
    let oldest = queue
        .oldest
        .map_or("none".to_owned(), |t| age(now_ms().saturating_sub(t)));
    html.push_str(&format!(
        "<p id=\"webhook-queue\">{} pending; oldest {}</p>\n",
        queue.pending,
        escape(&oldest)
    ));
    for (state, title, retry) in [
        (EventState::Pending, "Pending", false),
        (EventState::Failed, "Given up", true),
    ] {
        let events = store.latest_events(state, SHOWN).await?;
        if events.is_empty() {
            continue;
        }
        html.push_str(&format!(
            "<h3>{title}</h3>\n<table id=\"webhooks-{}\"><tr><th>event</th><th>type</th>\
             <th>connection</th><th>occurred</th><th>attempts</th><th>last error</th><th></th></tr>\n",
            state.as_str()
        ));
        for ev in &events {
            html.push_str(&row(ev, retry.then(|| session.csrf())));
        }
        html.push_str("</table>\n");
    }
    Ok(html)
}

fn row(ev: &WebhookEvent, retry_csrf: Option<&str>) -> String {
    let subject = ev.data["id"]
        .as_str()
        .or(ev.data["session_id"].as_str())
        .unwrap_or("");
    let error = match (&ev.outcome, ev.last_status, &ev.last_error) {
        (Some(o), Some(s), _) => format!("{o} ({s})"),
        (Some(o), None, Some(e)) => format!("{o}: {e}"),
        (None, _, Some(e)) => e.clone(),
        _ => String::new(),
    };
    let form = retry_csrf.map_or(String::new(), |csrf| {
        format!(
            "<form method=\"post\" action=\"/ui/webhooks/retry\">{}{}\
             <button type=\"submit\">retry</button></form>",
            csrf_field(csrf),
            hidden("event", &ev.id)
        )
    });
    format!(
        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{form}</td></tr>\n",
        escape(&ev.id),
        escape(&ev.kind),
        escape(subject),
        escape(&rfc3339(ev.occurred_at)),
        ev.attempts,
        escape(&error),
    )
}

/// `POST /ui/webhooks/retry`: the event is pending and due now.
pub async fn retry(state: &AppState, session: &Session, form: &Form) -> Response<ProxyBody> {
    let csrf = Some(session.csrf());
    let Some(store) = state.store.as_deref() else {
        return not_found("There is no store.", csrf);
    };
    let id = form.get("event").unwrap_or("");
    match store.retry_event(id).await {
        Ok(Some(ev)) => {
            let body = format!(
                "<p>Event <code>{}</code> ({}) will be sent again now, with the same webhook-id.</p>\
                 <p><a href=\"/ui\">Back</a></p>",
                escape(&ev.id),
                escape(&ev.kind)
            );
            page(StatusCode::OK, "Webhook retried", &body, csrf)
        }
        Ok(None) => not_found(&format!("There is no webhook event {id}."), csrf),
        Err(e) => store_failed(&e, csrf),
    }
}
