//! The sandbox's unit tests: most start a sandbox on loopback and talk to
//! it over HTTP.

use super::api::CHALLENGE;
use super::token::form_decode;
use super::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::task::JoinSet;

mod authorize;

type TestClient = Client<HttpConnector, Body>;

async fn start(opts: SandboxOptions) -> Sandbox {
    Sandbox::start(opts).await.expect("sandbox starts")
}

fn http1() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(client: &TestClient, req: Request<Body>) -> (u16, HeaderMap, Bytes) {
    let (parts, body) = client.request(req).await.expect("response").into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).expect("JSON body")
}

/// A grant with the demo client credentials in the body, plus `extra` fields.
fn grant(grant_type: &str, extra: Value) -> Value {
    let mut body = json!({"grant_type": grant_type, "client_id": "demo-client"});
    body["client_secret"] = "demo-secret".into();
    for (name, value) in extra.as_object().into_iter().flatten() {
        body[name] = value.clone();
    }
    body
}

fn client_credentials() -> Value {
    grant("client_credentials", json!({}))
}

fn refresh(token: &str) -> Value {
    grant("refresh_token", json!({ "refresh_token": token }))
}

async fn token(sb: &Sandbox, body: Value) -> (u16, Value) {
    let req = Request::post(sb.token_url()).header(CONTENT_TYPE, "application/json");
    let req = req.body(Body::from(body.to_string())).expect("request");
    let (status, headers, body) = send(&http1(), req).await;
    assert_eq!(headers[CONTENT_TYPE], "application/json");
    (status, json_of(&body))
}

async fn access_token(sb: &Sandbox) -> String {
    let (status, body) = token(sb, client_credentials()).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().expect("token").to_owned()
}

async fn api(sb: &Sandbox, method: Method, path: &str, token: &str) -> (u16, HeaderMap, Bytes) {
    let req = Request::builder().method(method);
    let req = req.uri(format!("{}{path}", sb.api_url()));
    let req = req.header(AUTHORIZATION, format!("Bearer {token}"));
    send(&http1(), req.body(Body::default()).expect("request")).await
}

async fn get_status(sb: &Sandbox, path: &str, token: &str) -> u16 {
    api(sb, Method::GET, path, token).await.0
}

#[tokio::test]
async fn client_credentials_returns_a_jwt_shaped_token() {
    let sb = start(SandboxOptions::default()).await;
    let (status, body) = token(&sb, client_credentials()).await;
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "client:admin");
    assert!(body.get("refresh_token").is_none());
    let access_token = body["access_token"].as_str().expect("token");
    let claims = decode_jwt_claims(access_token).expect("claims");
    assert_eq!(claims["client_id"], "demo-client");
    assert_eq!(claims["sub"], "user-123");
    let exp = claims["exp"].as_u64().expect("exp");
    assert!((3599..=3600).contains(&(exp - claims["iat"].as_u64().expect("iat"))));
    assert_ne!(super::tests::access_token(&sb).await, access_token);
    assert_eq!(sb.token_requests(), 2);
    assert_eq!(sb.token_requests_by_grant("client_credentials"), 2);
    assert_eq!(sb.successful_token_requests(), 2);
}

#[tokio::test]
async fn form_body_with_basic_auth_is_accepted() {
    let secret = "s3cr:t+/ é".to_owned();
    let sb = start(SandboxOptions {
        client_secret: secret,
        ..Default::default()
    })
    .await;
    let basic = STANDARD.encode("demo-client:s3cr%3At%2B%2F+%C3%A9");
    let req = Request::post(sb.token_url())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(AUTHORIZATION, format!("Basic {basic}"))
        .body(Body::from(
            "grant_type=client_credentials&scope=client%3Aadmin",
        ))
        .expect("request");
    let (status, _, body) = send(&http1(), req).await;
    assert_eq!(status, 200, "{body:?}");
}

#[tokio::test]
async fn bad_requests_get_flinks_format_errors() {
    let sb = start(SandboxOptions::default()).await;
    let wrong_secret = grant("client_credentials", json!({"client_secret": "no"}));
    let (status, body) = token(&sb, wrong_secret).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_client");
    assert!(body["error_description"].is_string());
    let (status, body) = token(&sb, json!({"client_id": "demo-client"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "unsupported_grant_type");
    let req = Request::post(sb.token_url()).header(CONTENT_TYPE, "application/json");
    let req = req.body(Body::from("{oops")).expect("request");
    let (status, _, body) = send(&http1(), req).await;
    assert_eq!(status, 400);
    assert_eq!(json_of(&body)["error"], "invalid_request");
    let req = Request::get(sb.token_url()).body(Body::default());
    assert_eq!(send(&http1(), req.expect("request")).await.0, 405);
    assert_eq!(sb.token_requests(), 4);
    assert_eq!(sb.successful_token_requests(), 0);
}

#[tokio::test]
async fn authorization_code_is_single_use_and_checks_redirect_uri() {
    let sb = start(SandboxOptions::default()).await;
    let exchange = |uri: &str| {
        let fields = json!({"code": "demo-code", "redirect_uri": uri});
        grant("authorization_code", fields)
    };
    let (status, body) = token(&sb, exchange("https://example.com/other")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    let (status, body) = token(&sb, exchange("https://example.com/callback")).await;
    assert_eq!(status, 200);
    assert_eq!(body["refresh_token"], "demo-refresh-token");
    let (status, body) = token(&sb, exchange("https://example.com/callback")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(sb.token_requests_by_grant("authorization_code"), 3);
}

#[tokio::test]
async fn flinks_refresh_token_never_changes_until_revoked() {
    let sb = start(SandboxOptions::default()).await;
    for _ in 0..2 {
        let (status, body) = token(&sb, refresh("demo-refresh-token")).await;
        assert_eq!(status, 200);
        assert!(body.get("refresh_token").is_none());
    }
    sb.revoke_refresh_token();
    let (status, body) = token(&sb, refresh("demo-refresh-token")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    let description = "The refresh token is invalid or has been revoked";
    assert_eq!(body["error_description"], description);
}

#[tokio::test]
async fn rotating_refresh_token_invalidates_the_old_one() {
    let opts = SandboxOptions {
        rotate_refresh_tokens: true,
        ..Default::default()
    };
    let sb = start(opts).await;
    let (status, body) = token(&sb, refresh("demo-refresh-token")).await;
    assert_eq!(status, 200);
    let rotated = body["refresh_token"].as_str().expect("new refresh token");
    assert_ne!(rotated, "demo-refresh-token");
    assert_eq!(sb.current_refresh_token(), rotated);
    let (status, body) = token(&sb, refresh("demo-refresh-token")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(token(&sb, refresh(rotated)).await.0, 200);
}

#[tokio::test]
async fn api_requires_a_live_token_and_records_requests() {
    let sb = start(SandboxOptions::default()).await;
    let req = Request::get(format!("{}/api/v1/accounts", sb.api_url()));
    let (status, headers, body) = send(&http1(), req.body(Body::default()).expect("req")).await;
    assert_eq!(status, 401);
    assert_eq!(headers[header::WWW_AUTHENTICATE], CHALLENGE);
    assert_eq!(json_of(&body)["error"], "invalid_token");
    assert_eq!(get_status(&sb, "/x", "forged").await, 401);

    let token = access_token(&sb).await;
    let (status, _, body) = api(&sb, Method::GET, "/api/v1/accounts", &token).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["Accounts"][0]["Currency"], "CAD");
    assert_eq!(api(&sb, Method::DELETE, "/status/418", &token).await.0, 418);
    let (status, headers, body) = api(&sb, Method::GET, "/v1/things?x=1", &token).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-echo-body-len"], "0");
    let echo = json_of(&body);
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/v1/things");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["headers"]["authorization"], format!("Bearer {token}"));

    assert_eq!(sb.api_requests(), 5);
    assert_eq!(sb.rejected_api_requests(), 2);
    assert_eq!(sb.expired_token_requests(), 0);
    let recorded = sb.recorded();
    assert_eq!(recorded.len(), 5);
    assert!(!recorded[0].token_valid && recorded[4].token_valid);
    assert_eq!(recorded[4].path_and_query, "/v1/things?x=1");
    sb.revoke_access_tokens();
    assert_eq!(get_status(&sb, "/api/v1/accounts", &token).await, 401);
}

#[tokio::test]
async fn token_expiry_makes_api_answer_401() {
    let lifetime = Duration::from_millis(300);
    let opts = SandboxOptions {
        expires_in: None,
        jwt_lifetime: lifetime,
        ..Default::default()
    };
    let sb = start(opts).await;
    let (status, body) = token(&sb, client_credentials()).await;
    assert_eq!(status, 200);
    assert!(body.get("expires_in").is_none());
    let token = body["access_token"].as_str().expect("token");
    assert!(decode_jwt_claims(token).expect("claims")["exp"].is_u64());
    assert_eq!(get_status(&sb, "/api/v1/accounts", token).await, 200);
    tokio::time::sleep(lifetime + Duration::from_millis(100)).await;
    assert_eq!(get_status(&sb, "/api/v1/accounts", token).await, 401);
    assert_eq!(sb.rejected_api_requests(), 1);
    assert_eq!(sb.expired_token_requests(), 1);
}

#[tokio::test]
async fn failure_modes_answer_like_broken_servers() {
    let sb = start(SandboxOptions::default()).await;
    let cases = [
        (FailureMode::ServerError, 500, Some("server_error")),
        (
            FailureMode::TemporarilyUnavailable,
            503,
            Some("temporarily_unavailable"),
        ),
        (FailureMode::InvalidClient, 400, Some("invalid_client")),
        (FailureMode::NoToken, 200, None),
    ];
    for (mode, status, error) in cases {
        sb.set_failure(mode);
        let (got, body) = token(&sb, client_credentials()).await;
        assert_eq!(got, status, "{mode:?}");
        assert_eq!(body["error"].as_str(), error, "{mode:?}");
        assert!(body.get("access_token").is_none());
    }
    sb.set_failure(FailureMode::Garbage);
    let req = Request::post(sb.token_url()).body(Body::from(client_credentials().to_string()));
    let (status, _, body) = send(&http1(), req.expect("request")).await;
    assert_eq!(status, 200);
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    assert_eq!(sb.successful_token_requests(), 0);
    assert_eq!(sb.token_requests_by_grant("client_credentials"), 5);
}

#[tokio::test]
async fn hang_holds_requests_until_the_mode_changes() {
    let sb = start(SandboxOptions::default()).await;
    sb.set_failure(FailureMode::Hang);
    let mut hanging = JoinSet::new();
    for _ in 0..3 {
        let sb = sb.clone();
        hanging.spawn(async move { token(&sb, client_credentials()).await.0 });
    }
    sb.wait_for_token_requests(3).await;
    assert_eq!(sb.token_requests_in_flight(), 3);
    sb.set_failure(FailureMode::None);
    while let Some(status) = hanging.join_next().await {
        assert_eq!(status.expect("task"), 200);
    }
    assert_eq!(sb.max_concurrent_token_requests(), 3);
    assert_eq!(sb.token_requests_in_flight(), 0);
}

#[tokio::test]
async fn client_giving_up_on_hang_ends_the_request() {
    let sb = start(SandboxOptions::default()).await;
    sb.set_failure(FailureMode::Hang);
    let request = token(&sb, client_credentials());
    let gave_up = tokio::time::timeout(Duration::from_millis(100), request).await;
    assert!(gave_up.is_err());
    for _ in 0..100 {
        if sb.token_requests_in_flight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the hanging handler outlived its client");
}

#[tokio::test]
async fn one_mib_body_round_trips_over_h2c_after_the_delay() {
    let sb = start(SandboxOptions::default()).await;
    let token = access_token(&sb).await;
    sb.set_api_delay(Duration::from_millis(100));
    let h2c: TestClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let payload: Bytes = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let req = Request::put(format!("{}/upload", sb.api_url()))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header("x-echo-body", "1")
        .body(Body::new(payload.clone()))
        .expect("request");
    let started = Instant::now();
    let (status, headers, body) = send(&h2c, req).await;
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(status, 200);
    assert_eq!(headers[CONTENT_TYPE], "application/octet-stream");
    assert_eq!(headers["x-echo-body-len"], "1048576");
    assert!(body == payload && sb.recorded()[0].body == payload);
}

fn user_opts() -> SandboxOptions {
    SandboxOptions {
        users: vec![SandboxUser::new("alice")],
        expires_in: Some(60),
        rotate_refresh_tokens: true,
        ..Default::default()
    }
}

fn code_grant(code: &str) -> Value {
    let fields = json!({"code": code, "redirect_uri": "https://example.com/callback"});
    grant("authorization_code", fields)
}

#[tokio::test]
async fn a_retired_refresh_token_presented_again_counts_as_a_reuse() {
    let sb = start(user_opts()).await;
    let (status, body) = token(&sb, code_grant("code-alice")).await;
    assert_eq!(status, 200, "{body}");
    let first = body["refresh_token"].as_str().expect("rt").to_owned();
    assert_eq!(
        sb.last_rotation("alice"),
        None,
        "a code exchange rotates nothing"
    );
    let (status, body) = token(&sb, refresh(&first)).await;
    assert_eq!(status, 200, "{body}");
    let rotated_at = sb.last_rotation("alice").expect("rotated");
    assert_eq!(sb.reused_refresh_tokens(), 0);
    // Counted whatever the endpoint answers: the presenter lost the new one.
    sb.set_failure(FailureMode::ServerError);
    assert_eq!(token(&sb, refresh(&first)).await.0, 500);
    sb.set_failure(FailureMode::None);
    let (status, body) = token(&sb, refresh(&first)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(sb.reused_refresh_tokens(), 2);
    let reuses = sb.refresh_token_reuses();
    assert_eq!(reuses.len(), 2);
    assert_eq!(reuses[0].sub, "alice");
    assert_eq!(reuses[0].rotated_at, rotated_at);
    assert!(reuses[1].presented_at >= reuses[0].presented_at);
    // An unknown token is no reuse.
    assert_eq!(token(&sb, refresh("rt-never-issued")).await.0, 400);
    assert_eq!(sb.reused_refresh_tokens(), 2);
}

#[tokio::test]
async fn issued_secrets_and_per_user_lifetimes() {
    let sb = start(user_opts()).await;
    sb.set_user_token_lifetime("alice", Some(Duration::from_secs(7)));
    let code = sb.new_code("alice");
    let (status, body) = token(&sb, code_grant(&code)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 7);
    let issued = sb.issued_secrets();
    for s in ["code-alice", code.as_str()] {
        assert!(issued.iter().any(|i| i == s), "{s} in {issued:?}");
    }
    for field in ["access_token", "refresh_token"] {
        let s = body[field].as_str().expect("token");
        assert!(issued.iter().any(|i| i == s), "{field}");
    }
    sb.set_user_token_lifetime("alice", None);
    let rt = body["refresh_token"].as_str().expect("rt");
    assert_eq!(token(&sb, refresh(rt)).await.1["expires_in"], 60);
}

#[tokio::test]
async fn a_delayed_request_of_a_revoked_user_answers_602_after_reauthorization() {
    let sb = start(user_opts()).await;
    let (_, body) = token(&sb, code_grant("code-alice")).await;
    let old = body["access_token"].as_str().expect("token").to_owned();
    sb.revoke_consent("alice");
    let late = {
        let sb = sb.clone();
        let old = old.clone();
        tokio::spawn(async move {
            let req = Request::get(format!("{}/api/fdx/5/accounts", sb.api_url()))
                .header(AUTHORIZATION, format!("Bearer {old}"))
                .header(DELAY_HEADER, "300")
                .body(Body::default())
                .expect("request");
            send(&http1(), req).await
        })
    };
    while sb.api_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, _) = token(&sb, code_grant(&sb.new_code("alice"))).await;
    assert_eq!(status, 200);
    let (status, _, body) = late.await.expect("task");
    assert_eq!(status, 401, "decided on arrival");
    assert_eq!(json_of(&body)["code"], "602");
    let (status, _, _) = api(&sb, Method::GET, "/api/fdx/5/accounts", &old).await;
    assert_eq!(status, 200, "without the header: decided now");
}

#[tokio::test]
async fn dropping_the_sandbox_stops_its_servers() {
    let sb = start(SandboxOptions::default()).await;
    let addr = sb.token_addr();
    drop(sb);
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("token endpoint still accepts connections after drop");
}

#[test]
fn form_decoding_follows_the_urlencoded_rules() {
    assert_eq!(form_decode("a+b%2Fc%3a").as_deref(), Some("a b/c:"));
    assert_eq!(form_decode("%C3%A9").as_deref(), Some("é"));
    for bad in ["%4", "%zz", "%FF"] {
        assert_eq!(form_decode(bad), None, "{bad}");
    }
}
