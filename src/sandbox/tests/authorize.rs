//! The authorize endpoint's tests: the consent page over HTTP (its checks,
//! headers and escaping), its answers, and the exchange of its codes.

use super::super::authorize::{form_encode, origin, with_query};
use super::*;

const CALLBACK: &str = "http://127.0.0.1:9/connect/callback";
/// RFC 7636 appendix B: this verifier's S256 challenge.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

fn two_users() -> SandboxOptions {
    SandboxOptions {
        users: vec![SandboxUser::new("alice"), SandboxUser::new("bob")],
        issuer: Some("https://sandbox.example".into()),
        ..Default::default()
    }
}

/// A good authorize request's parameters (PKCE with `challenge`).
fn params(challenge: bool) -> Vec<(&'static str, &'static str)> {
    let mut p = vec![
        ("response_type", "code"),
        ("client_id", "demo-client"),
        ("redirect_uri", CALLBACK),
        ("scope", "ACCOUNT_BASIC TRANSACTIONS"),
        ("state", "st-1"),
    ];
    if challenge {
        p.extend([
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "S256"),
        ]);
    }
    p
}

fn without<'a>(mut p: Vec<(&'static str, &'a str)>, name: &str) -> Vec<(&'static str, &'a str)> {
    p.retain(|(n, _)| *n != name);
    p
}

fn encode(pairs: &[(&str, &str)]) -> String {
    let pairs = pairs.iter().map(|(n, v)| format!("{n}={}", form_encode(v)));
    pairs.collect::<Vec<_>>().join("&")
}

async fn get_page(sb: &Sandbox, pairs: &[(&str, &str)]) -> (u16, HeaderMap, String) {
    let url = format!("{}?{}", sb.authorize_url(), encode(pairs));
    let (status, headers, body) =
        send(&http1(), Request::get(url).body(Body::default()).unwrap()).await;
    (
        status,
        headers,
        String::from_utf8(body.to_vec()).expect("UTF-8"),
    )
}

async fn post_form(sb: &Sandbox, pairs: &[(&str, &str)]) -> (u16, HeaderMap, String) {
    let req = Request::post(sb.authorize_url())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(encode(pairs)))
        .expect("request");
    let (status, headers, body) = send(&http1(), req).await;
    (
        status,
        headers,
        String::from_utf8(body.to_vec()).expect("UTF-8"),
    )
}

/// The hidden `request` field of a consent page.
fn request_id(html: &str) -> String {
    let (_, rest) = html
        .split_once("name=\"request\" value=\"")
        .expect("request field");
    rest.split('"').next().expect("value").to_owned()
}

/// The redirect's target without its query, and the query's parameters.
fn location(status: u16, headers: &HeaderMap) -> (String, Params) {
    assert_eq!(status, 302);
    let location = headers[header::LOCATION].to_str().expect("ASCII");
    let (base, query) = location.split_once('?').expect("a query");
    let pairs = query
        .split('&')
        .map(|p| p.split_once('=').expect("name=value"));
    let decode = |s: &str| form_decode(s).expect("decodes");
    (
        base.to_owned(),
        pairs.map(|(n, v)| (decode(n), decode(v))).collect(),
    )
}

/// The consent page for `pairs`, approved as `user`: the code.
async fn approve(sb: &Sandbox, pairs: &[(&str, &str)], user: &str) -> String {
    let (status, _, html) = get_page(sb, pairs).await;
    assert_eq!(status, 200, "{html}");
    let id = request_id(&html);
    let form = [
        ("request", id.as_str()),
        ("user", user),
        ("decision", "approve"),
    ];
    let (status, headers, _) = post_form(sb, &form).await;
    location(status, &headers).1["code"].clone()
}

fn exchange(code: &str, redirect_uri: &str, verifier: Option<&str>) -> Value {
    let mut fields = json!({"code": code, "redirect_uri": redirect_uri});
    if let Some(v) = verifier {
        fields["code_verifier"] = v.into();
    }
    grant("authorization_code", fields)
}

async fn invalid_grant(sb: &Sandbox, body: Value) {
    let (status, body) = token(sb, body).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
}

#[tokio::test]
async fn the_consent_page_lists_the_users_and_is_locked_down() {
    let sb = start(two_users()).await;
    let hinted = [
        params(true),
        vec![("login_hint", "bob"), ("provider_id", "fbk")],
    ]
    .concat();
    let (status, headers, html) = get_page(&sb, &hinted).await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("Sandbox bank — demo-client asks for ACCOUNT_BASIC TRANSACTIONS"));
    assert!(html.contains(r#"<form method="post" action="/api/v1/authorize">"#));
    assert!(
        html.contains(r#"name="user" value="alice" id="user-alice">"#),
        "{html}"
    );
    assert!(html.contains(r#"name="user" value="bob" id="user-bob" checked>"#));
    for decision in ["approve", "deny"] {
        let button = format!(r#"name="decision" value="{decision}" id="{decision}">"#);
        assert!(html.contains(&button), "{decision}");
    }
    assert!(request_id(&html).len() >= 22 && !html.contains("<script"));
    // No form-action: Chromium would apply it to the redirects after the form.
    let csp = "default-src 'none'; style-src 'unsafe-inline'";
    assert_eq!(headers[header::CONTENT_SECURITY_POLICY], csp);
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
    assert_eq!(sb.authorize_requests(), 1);
    assert_eq!(sb.authorize_params()[0]["provider_id"], "fbk");
    assert_eq!(sb.token_requests(), 0, "page views are no token requests");

    let sb = start(SandboxOptions::default()).await;
    let html = get_page(&sb, &params(false)).await.2;
    assert!(
        html.contains(r#"value="user-123" id="user-user-123" checked>"#),
        "{html}"
    );
}

#[tokio::test]
async fn deny_redirects_with_access_denied_the_state_and_iss() {
    let sb = start(two_users()).await;
    let callback = format!("{CALLBACK}?app=1");
    let mut pairs = params(false);
    pairs[2].1 = &callback;
    let html = get_page(&sb, &pairs).await.2;
    let form = [("request", request_id(&html)), ("decision", "deny".into())];
    let form: Vec<(&str, &str)> = form.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let (status, headers, _) = post_form(&sb, &form).await;
    assert!(headers[header::LOCATION]
        .to_str()
        .unwrap()
        .starts_with(&format!(
            "{callback}&error=access_denied&error_description=The+user+denied+access&state=st-1"
        )));
    let (base, query) = location(status, &headers);
    assert_eq!(base, CALLBACK);
    assert_eq!(query["app"], "1");
    assert_eq!(query["state"], "st-1");
    assert_eq!(query["iss"], "https://sandbox.example");
    assert!(!query.contains_key("code"));
}

#[tokio::test]
async fn an_approved_code_with_its_verifier_reads_that_users_accounts() {
    let sb = start(two_users()).await;
    let (_, _, html) = get_page(&sb, &params(true)).await;
    let form = [
        ("request", request_id(&html).as_str()),
        ("user", "bob"),
        ("decision", "approve"),
    ]
    .map(|(n, v)| (n, v.to_owned()));
    let form: Vec<(&str, &str)> = form.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let (status, headers, _) = post_form(&sb, &form).await;
    let (base, query) = location(status, &headers);
    assert_eq!((base.as_str(), query["state"].as_str()), (CALLBACK, "st-1"));
    assert_eq!(query["iss"], "https://sandbox.example");
    let code = &query["code"];
    assert!(code.len() >= 22 && sb.issued_secrets().contains(code));

    let (status, body) = token(&sb, exchange(code, CALLBACK, Some(VERIFIER))).await;
    assert_eq!(status, 200, "{body}");
    let access = body["access_token"].as_str().expect("token");
    assert_eq!(decode_jwt_claims(access).expect("claims")["sub"], "bob");
    let (status, _, accounts) = api(&sb, Method::GET, "/api/fdx/5/accounts", access).await;
    assert_eq!(status, 200);
    let accounts = json_of(&accounts);
    assert_eq!(accounts["sub"], "bob");
    assert_eq!(accounts["accounts"][0]["nickname"], "bob's chequing");
    let rt = body["refresh_token"].as_str().expect("refresh token");
    assert_eq!(sb.user_refresh_tokens("bob"), [rt]);
    assert_eq!(token(&sb, refresh(rt)).await.0, 200);
    assert_eq!(sb.code_exchanges_with_verifier(), 1);
    assert_eq!(sb.verified_code_exchanges(), 1);
}

#[tokio::test]
async fn a_wrong_or_missing_verifier_is_invalid_grant_and_spends_the_code() {
    let sb = start(two_users()).await;
    let code = approve(&sb, &params(true), "alice").await;
    let wrong = "x".repeat(43);
    invalid_grant(&sb, exchange(&code, CALLBACK, Some(&wrong))).await;
    invalid_grant(&sb, exchange(&code, CALLBACK, Some(VERIFIER))).await;
    let code = approve(&sb, &params(true), "alice").await;
    invalid_grant(&sb, exchange(&code, CALLBACK, None)).await;
    assert_eq!(sb.code_exchanges_with_verifier(), 2);
    assert_eq!(sb.verified_code_exchanges(), 0);
    assert_eq!(sb.successful_token_requests(), 0);
}

#[tokio::test]
async fn a_verifier_for_a_code_without_challenge_is_a_downgrade() {
    let sb = start(two_users()).await;
    let code = approve(&sb, &params(false), "alice").await;
    invalid_grant(&sb, exchange(&code, CALLBACK, Some(VERIFIER))).await;
    let code = approve(&sb, &params(false), "alice").await;
    assert_eq!(token(&sb, exchange(&code, CALLBACK, None)).await.0, 200);
}

#[tokio::test]
async fn a_replayed_code_is_refused_and_revokes_what_it_gave() {
    let sb = start(two_users()).await;
    let code = approve(&sb, &params(true), "alice").await;
    let (status, body) = token(&sb, exchange(&code, CALLBACK, Some(VERIFIER))).await;
    assert_eq!(status, 200, "{body}");
    invalid_grant(&sb, exchange(&code, CALLBACK, Some(VERIFIER))).await;
    assert_eq!(sb.code_replays(), 1);
    let access = body["access_token"].as_str().expect("token");
    assert_eq!(get_status(&sb, "/api/fdx/5/accounts", access).await, 401);
    invalid_grant(&sb, refresh(body["refresh_token"].as_str().expect("rt"))).await;
    // The single-user code and the users' codes are as they were.
    assert_eq!(token(&sb, code_grant("code-alice")).await.0, 200);
    assert_eq!(token(&sb, code_grant("demo-code")).await.0, 200);
}

#[tokio::test]
async fn a_wrong_redirect_uri_is_invalid_grant() {
    let sb = start(two_users()).await;
    let code = approve(&sb, &params(true), "alice").await;
    let other = "http://127.0.0.1:9/connect/callback2";
    invalid_grant(&sb, exchange(&code, other, Some(VERIFIER))).await;
    invalid_grant(&sb, exchange(&code, CALLBACK, Some(VERIFIER))).await;
}

#[tokio::test]
async fn a_bad_client_or_redirect_uri_gets_a_page_and_no_redirect() {
    let sb = start(two_users()).await;
    let mut unknown = params(false);
    unknown[1].1 = "evil-client";
    let missing = without(params(false), "redirect_uri");
    let repeated = [
        params(false),
        vec![("redirect_uri", "https://evil.example/")],
    ]
    .concat();
    let mut cases = vec![unknown, missing, repeated];
    for bad in [
        "ftp://x/cb",
        "/connect/callback",
        "javascript:alert(1)",
        "http://a;b/cb",
        "http://x/#f",
    ] {
        let mut pairs = params(false);
        pairs[2].1 = bad;
        cases.push(pairs);
    }
    for pairs in cases {
        let (status, headers, html) = get_page(&sb, &pairs).await;
        assert_eq!(status, 400, "{pairs:?}");
        assert!(!headers.contains_key(header::LOCATION), "{pairs:?}");
        assert!(headers[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert!(html.contains("<h1>Sandbox bank</h1>"));
    }
    assert_eq!(sb.authorize_requests(), 8);
}

#[tokio::test]
async fn other_request_errors_redirect_with_the_state() {
    let sb = start(two_users()).await;
    let mut token_type = params(false);
    token_type[0].1 = "token";
    let plain = [
        params(false),
        vec![
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "plain"),
        ],
    ];
    let no_method = [params(false), vec![("code_challenge", CHALLENGE)]];
    let no_challenge = [params(false), vec![("code_challenge_method", "S256")]];
    let short = [
        params(false),
        vec![("code_challenge", "abc"), ("code_challenge_method", "S256")],
    ];
    let cases = [
        (token_type, "unsupported_response_type", Some("st-1")),
        (without(params(false), "state"), "invalid_request", None),
        (plain.concat(), "invalid_request", Some("st-1")),
        (no_method.concat(), "invalid_request", Some("st-1")),
        (no_challenge.concat(), "invalid_request", Some("st-1")),
        (short.concat(), "invalid_request", Some("st-1")),
    ];
    for (pairs, error, state) in cases {
        let (status, headers, _) = get_page(&sb, &pairs).await;
        let (base, query) = location(status, &headers);
        assert_eq!(
            (base.as_str(), query["error"].as_str()),
            (CALLBACK, error),
            "{pairs:?}"
        );
        assert!(query.contains_key("error_description"));
        assert_eq!(query.get("state").map(String::as_str), state, "{pairs:?}");
    }
}

#[tokio::test]
async fn reflected_values_are_escaped() {
    let sb = start(two_users()).await;
    let evil = "<script>alert('x')</script>\"&";
    let mut pairs = params(false);
    pairs[3].1 = evil;
    pairs[4].1 = evil;
    pairs.push(("provider_id", evil));
    let (status, _, html) = get_page(&sb, &pairs).await;
    assert_eq!(status, 200);
    assert!(!html.contains("<script") && !html.contains("'x'"), "{html}");
    assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;"));
    let form = [("request", request_id(&html)), ("decision", "deny".into())];
    let form: Vec<(&str, &str)> = form.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let (status, headers, _) = post_form(&sb, &form).await;
    assert_eq!(
        location(status, &headers).1["state"],
        evil,
        "the state round-trips"
    );
    let mut unknown = params(false);
    unknown[1].1 = evil;
    let (status, _, html) = get_page(&sb, &unknown).await;
    assert!(status == 400 && !html.contains("<script"));
}

#[tokio::test]
async fn a_request_is_single_use_and_requests_and_codes_expire() {
    let opts = SandboxOptions {
        authorize_lifetime: Duration::from_millis(300),
        ..two_users()
    };
    let sb = start(opts).await;
    let id = request_id(&get_page(&sb, &params(false)).await.2);
    for (user, decision) in [("carol", "approve"), ("alice", "approve")] {
        let form = [
            ("request", id.as_str()),
            ("user", user),
            ("decision", decision),
        ];
        let (status, headers, html) = post_form(&sb, &form).await;
        assert_eq!(status, 400, "spent by the first answer, even a bad one");
        assert!(!headers.contains_key(header::LOCATION) && html.contains("Sandbox bank"));
    }
    let id = request_id(&get_page(&sb, &params(false)).await.2);
    let code = approve(&sb, &params(false), "alice").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let form = [
        ("request", id.as_str()),
        ("user", "alice"),
        ("decision", "approve"),
    ];
    assert_eq!(post_form(&sb, &form).await.0, 400, "expired");
    invalid_grant(&sb, exchange(&code, CALLBACK, None)).await;
}

#[test]
fn origins_and_redirect_queries() {
    assert_eq!(
        origin("HTTPS://Example.COM:8443/x?y").as_deref(),
        Some("https://example.com:8443")
    );
    assert_eq!(origin("http://[::1]/cb").as_deref(), Some("http://[::1]"));
    for bad in [
        "http://a b/",
        "http://a;b/",
        "http://a,b/",
        "ftp://a/",
        "http:/a",
        "x",
        "http://a/#",
    ] {
        assert_eq!(origin(bad), None, "{bad}");
    }
    assert_eq!(with_query("https://a/cb", "code=1"), "https://a/cb?code=1");
    assert_eq!(with_query("https://a/cb?", "code=1"), "https://a/cb?code=1");
    assert_eq!(
        with_query("https://a/cb?x=1", "code=1"),
        "https://a/cb?x=1&code=1"
    );
    assert_eq!(
        with_query("https://a/cb?x=1&", "code=1"),
        "https://a/cb?x=1&code=1"
    );
    assert_eq!(form_encode("a b/é~"), "a+b%2F%C3%A9~");
}
