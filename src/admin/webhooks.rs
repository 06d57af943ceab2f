//! The webhook events API on the admin listener (CONNECT.md, "Lifecycle
//! events"): `GET /webhooks/events?state=pending|delivered|failed&after=&limit=`
//! pages through the outbox in order, `GET /webhooks/events/{id}` shows one,
//! `POST /webhooks/events/{id}/retry` makes one pending and due now (an
//! operator asks again after fixing the receiver). Bearer `api_token` as
//! for the connections API; answers never carry a token.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::connections::{
    check_bearer, error, page_answer, page_query, respond, store_error, Answer,
};
use crate::proxy::body::ProxyBody;
use crate::proxy::generation::AppState;
use crate::store::{EventState, Store};

const USAGE: &str = "use GET /webhooks/events, GET /webhooks/events/{id} or \
                     POST /webhooks/events/{id}/retry";

/// Serves one `/webhooks/...` request.
pub async fn handle(state: &AppState, req: Request<Incoming>) -> Response<ProxyBody> {
    respond(answer(state, req).await)
}

async fn answer(state: &AppState, req: Request<Incoming>) -> Answer {
    let generation = state.generation.load_full();
    if let Err(a) = check_bearer(&generation, &req, "webhook events API") {
        return a;
    }
    let Some(store) = state.store.as_deref() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no [store]: there are no events",
        );
    };
    let path = req.uri().path().trim_end_matches('/');
    let rest = path.strip_prefix("/webhooks/events");
    match (req.method(), rest) {
        (&Method::GET, Some("")) => list(store, req.uri().query().unwrap_or("")).await,
        (&Method::GET, Some(r)) => match r.strip_prefix('/').filter(|id| valid_event_id(id)) {
            Some(id) => match store.webhook_event(id).await {
                Ok(Some(ev)) => ok(ev.to_json()),
                Ok(None) => not_found(id),
                Err(e) => store_error(&e),
            },
            None => error(StatusCode::NOT_FOUND, "not_found", USAGE),
        },
        (&Method::POST, Some(r)) => {
            let id = r.strip_prefix('/').and_then(|r| r.strip_suffix("/retry"));
            match id.filter(|id| valid_event_id(id)) {
                Some(id) => match store.retry_event(id).await {
                    Ok(Some(ev)) => ok(ev.to_json()),
                    Ok(None) => not_found(id),
                    Err(e) => store_error(&e),
                },
                None => error(StatusCode::NOT_FOUND, "not_found", USAGE),
            }
        }
        (_, Some(_)) => error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", USAGE),
        (_, None) => error(StatusCode::NOT_FOUND, "not_found", USAGE),
    }
}

fn ok(body: serde_json::Value) -> Answer {
    Answer {
        status: StatusCode::OK,
        body,
    }
}

fn not_found(id: &str) -> Answer {
    error(
        StatusCode::NOT_FOUND,
        "event_not_found",
        format!("there is no webhook event {id}"),
    )
}

/// `msg_` and 1 to 64 ASCII letters and digits.
fn valid_event_id(id: &str) -> bool {
    id.strip_prefix("msg_").is_some_and(|r| {
        (1..=64).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

fn list_query(query: &str) -> Result<(Option<EventState>, Option<String>, u32), Answer> {
    page_query(
        query,
        (EventState::parse, "state: pending, delivered or failed"),
        (valid_event_id, "after: an event id (msg_...)"),
    )
}

async fn list(store: &Store, query: &str) -> Answer {
    let (state, after, limit) = match list_query(query) {
        Ok(q) => q,
        Err(a) => return a,
    };
    match store.list_events(state, after.as_deref(), limit + 1).await {
        Ok(page) => page_answer("events", page, limit, |e| e.id.clone(), |e| e.to_json()),
        Err(e) => store_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_ids_are_checked() {
        assert!(valid_event_id("msg_0a1B"));
        for bad in ["msg_", "msg", "evt_1", "msg_a-b", "msg_a/b"] {
            assert!(!valid_event_id(bad), "{bad}");
        }
        let (s, a, l) = list_query("state=failed&after=msg_ab&limit=5")
            .ok()
            .unwrap();
        assert_eq!(
            (s, a.as_deref(), l),
            (Some(EventState::Failed), Some("msg_ab"), 5)
        );
        for bad in ["state=done", "limit=0", "limit=1001", "after=x", "y=1"] {
            assert!(list_query(bad).is_err(), "{bad}");
        }
    }
}
