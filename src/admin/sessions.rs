//! Connect sessions on the admin API (CONNECT.md, "Connect sessions"):
//! `POST /connect-sessions/{pool}` (201 with the link, shown only here),
//! `GET /connect-sessions/{pool}/{id}` and `DELETE` (204; the link stops
//! working). Behind `api_token` like the connections API, whose JSON
//! helpers it shares.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::connections::{
    bad_request, error, parse_json, pool_request, read_body, respond, store_error, Answer,
};
use crate::connections::connect::{ConnectError, Created, SessionRequest};
use crate::connections::Pool;
use crate::ground::now_ms;
use crate::proxy::body::ProxyBody;
use crate::proxy::generation::{AppState, Generation};

/// Serves one `/connect-sessions...` request.
pub async fn handle(state: &AppState, req: Request<Incoming>) -> Response<ProxyBody> {
    respond(answer(state, req).await)
}

async fn answer(state: &AppState, req: Request<Incoming>) -> Answer {
    let r = match pool_request(
        state,
        &req,
        (
            "connect-sessions",
            "connect sessions API",
            "use /connect-sessions/{pool} or /connect-sessions/{pool}/{session_id}",
        ),
    ) {
        Ok(r) => r,
        Err(a) => return a,
    };
    let (pool, id) = (&r.pool, r.id.as_deref());
    if id.is_some_and(|id| id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit())) {
        return session_not_found(&pool.config().name);
    }
    match (req.method().clone(), id) {
        (Method::POST, None) => create(&r.generation, pool, req).await,
        (Method::GET, Some(id)) => get(pool, id).await,
        (Method::DELETE, Some(id)) => delete(pool, id).await,
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "POST /connect-sessions/{pool}; GET and DELETE /connect-sessions/{pool}/{session_id}",
        ),
    }
}

fn session_not_found(pool: &str) -> Answer {
    error(
        StatusCode::NOT_FOUND,
        "session_not_found",
        format!("pool {pool} has no such connect session"),
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PostBody {
    connection_id: Option<String>,
    redirect_to: Option<String>,
    /// `"15m"`-style, or seconds.
    ttl: Option<Ttl>,
    #[serde(default)]
    authorize_params: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Ttl {
    Seconds(u64),
    Text(String),
}

impl Ttl {
    fn duration(&self) -> Result<Duration, String> {
        match self {
            Ttl::Seconds(s) => Ok(Duration::from_secs(*s)),
            Ttl::Text(t) => humantime::parse_duration(t)
                .map_err(|_| format!("ttl: {t:?} is not a duration like \"15m\" or 900")),
        }
    }
}

/// Creates a connect session on `pool` with the generation's `[connect]`
/// settings: the one path of `POST /connect-sessions/{pool}` and of the
/// operator page's re-authorize link (`admin/ui`).
pub(super) async fn start_session(
    generation: &Generation,
    pool: &Pool,
    request: SessionRequest,
) -> Result<Created, ConnectError> {
    let Some(connect) = &generation.config.connect else {
        return Err(ConnectError::BadRequest(
            "the connect flow needs a [connect] table in the config".into(),
        ));
    };
    pool.create_session(connect, request).await
}

async fn create(generation: &Generation, pool: &Pool, req: Request<Incoming>) -> Answer {
    let bytes = match read_body(req).await {
        Ok(b) => b,
        Err(a) => return a,
    };
    // An empty body asks for a session with every default.
    let body: PostBody = if bytes.is_empty() {
        PostBody::default()
    } else {
        match parse_json(&bytes) {
            Ok(b) => b,
            Err(a) => return a,
        }
    };
    let ttl = match body.ttl.as_ref().map(Ttl::duration).transpose() {
        Ok(t) => t,
        Err(m) => return bad_request(m),
    };
    let request = SessionRequest {
        connection_id: body.connection_id,
        redirect_to: body.redirect_to,
        ttl,
        authorize_params: body.authorize_params.into_iter().collect(),
    };
    match start_session(generation, pool, request).await {
        Ok(created) => {
            let mut json = created.session.to_json(now_ms());
            json["connect_url"] = created.connect_url.expose().into();
            Answer {
                status: StatusCode::CREATED,
                body: json,
            }
        }
        Err(ConnectError::BadRequest(m)) => bad_request(m),
        Err(ConnectError::Store(e)) => store_error(&e),
        Err(e @ (ConnectError::Random | ConnectError::Pushed(_))) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
    }
}

async fn get(pool: &Pool, id: &str) -> Answer {
    match pool.session(id).await {
        Ok(Some(s)) => Answer {
            status: StatusCode::OK,
            body: s.to_json(now_ms()),
        },
        Ok(None) => session_not_found(&pool.config().name),
        Err(e) => store_error(&e),
    }
}

async fn delete(pool: &Pool, id: &str) -> Answer {
    match pool.delete_session(id).await {
        Ok(true) => Answer {
            status: StatusCode::NO_CONTENT,
            body: serde_json::Value::Null,
        },
        Ok(false) => session_not_found(&pool.config().name),
        Err(e) => store_error(&e),
    }
}
