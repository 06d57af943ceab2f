//! The operator page `GET /ui` on the admin listener (issue 18): in a real
//! headless Chromium, an operator logs in, finds a connection with the
//! search box, makes a re-authorize link (a working connect link), deletes
//! a connection through the confirmation step and logs out; by plain HTTP,
//! what a request without the session or a forged POST gets.
//!
//! Needs Debian's `chromium` and `chromium-driver`; fails (never skips)
//! without them. With `FLINKS_PROXY_SCREENSHOT=1` the page is saved as
//! `docs/ui.png` (the README's picture).

mod support;

use flinks_proxy::sandbox::{Sandbox, SandboxOptions, SandboxUser};
use flinks_proxy::Running;
use support::browser::Browser;
use support::connections::{admin, connect, users_sandbox, API_TOKEN};
use support::webdriver::Chromium;
use support::*;

const APP: &str = "https://app.example.com/";

/// A proxy with pool `users` (connect flow, `revoke_url`) on the sandbox,
/// an admin `api_token`, and connections alice, bob and carol.
struct Ui {
    proxy: Running,
    sb: Sandbox,
    /// The `[connect]` listener's public URL.
    public: String,
    _dir: TempDir,
}

impl Ui {
    /// The proxy on `sb`, with no connection yet.
    async fn on(sb: Sandbox) -> Ui {
        Ui::on_with(sb, |_| {}).await
    }

    /// [`Ui::on`] with the config changed by `f`.
    async fn on_with(sb: Sandbox, f: impl FnOnce(&mut ProxyToml)) -> Ui {
        let dir = TempDir::new();
        let toml = ProxyToml::pool(&sb, &dir.path().join("store.db"), &connections::new_key())
            .with(|c| {
                let p = c.pool_mut("users");
                p.authorize_url = Some(sb.authorize_url());
                p.scope = Some("ACCOUNT_BASIC".into());
                p.revoke_url = Some(sb.revoke_url());
                c.connect = Some(Connect::loopback(&[APP]));
            })
            .with(f);
        let public = toml.connect.as_ref().expect("[connect]").public_url.clone();
        let proxy = start_proxy(&toml.toml()).await;
        Ui {
            proxy,
            sb,
            public,
            _dir: dir,
        }
    }

    /// Alice, bob and carol connected; carol needs re-authorization.
    async fn start() -> Ui {
        let ui = Ui::on(users_sandbox(3600, false).await).await;
        for user in ["alice", "bob", "carol"] {
            connect(&ui.proxy, user).await;
        }
        // Carol's consent ends at the bank; her next request says so.
        ui.sb.revoke_consent("carol");
        let r = connections::get_as(&ui.proxy, "/api/fdx/5/accounts", "carol").await;
        assert_eq!(r.status, 401, "{}", r.text());
        let c = admin(&ui.proxy, "GET", "/connections/users/carol", None).await;
        assert_eq!(c.json()["state"], "needs_reauthorization", "{}", c.text());
        ui
    }

    fn url(&self, path: &str) -> String {
        admin_url(&self.proxy, path)
    }

    async fn status_of(&self, id: &str) -> u16 {
        let path = format!("/connections/users/{id}");
        admin(&self.proxy, "GET", &path, None).await.status.as_u16()
    }

    /// Asserts that `html` shows no secret: not the `api_token`, no token
    /// or code the sandbox issued, not `cookie` (the session's value).
    fn assert_no_secret(&self, html: &str, cookie: &str) {
        assert!(!html.contains(API_TOKEN), "the api_token is on the page");
        assert!(
            !cookie.is_empty() && !html.contains(cookie),
            "the cookie is on the page"
        );
        let secrets = self.sb.issued_secrets();
        assert!(secrets.len() >= 6, "the sandbox issued tokens: {secrets:?}");
        for s in secrets {
            assert!(
                !html.contains(&s),
                "a token the sandbox issued is on the page"
            );
        }
    }
}

/// The value of the first `name="csrf"` field in `html`.
fn csrf_in(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[at..].split('"').next().expect("a value").to_owned()
}

/// Logs in through the form in Chromium; returns the session cookie value.
async fn log_in(ui: &Ui, browser: &Chromium) -> String {
    browser.goto(&ui.url("/ui")).await.expect("open /ui");
    browser
        .wait_for_url("the login form", |u| u.ends_with("/ui/login"))
        .await;
    browser
        .element("#api_token")
        .await
        .send_keys(API_TOKEN)
        .await
        .expect("type the token");
    browser.click("#login").await;
    browser
        .wait_for_url("the page", |u| u.ends_with("/ui"))
        .await;
    let cookie = browser
        .get_named_cookie("flinks_ui")
        .await
        .expect("a session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    assert_eq!(cookie.path(), Some("/ui"));
    assert!(!cookie.value().contains(API_TOKEN));
    cookie.value().to_owned()
}

/// The ids of the connection rows shown now.
async fn rows(browser: &Chromium) -> Vec<String> {
    let mut ids = Vec::new();
    for row in browser.elements("#connections tr[data-id]").await {
        ids.push(row.attr("data-id").await.expect("attr").expect("data-id"));
    }
    ids
}

/// Saves the page as `docs/ui.png` when `FLINKS_PROXY_SCREENSHOT=1`.
async fn screenshot_for_the_readme(browser: &Chromium) {
    if std::env::var("FLINKS_PROXY_SCREENSHOT").as_deref() != Ok("1") {
        return;
    }
    let shot = browser.screenshot("ui.png").await;
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::create_dir_all(&docs).expect("docs/");
    std::fs::copy(shot, docs.join("ui.png")).expect("docs/ui.png");
}

/// Makes bob's re-authorize link on the page; returns it.
async fn reauthorize_bob(ui: &Ui, browser: &Chromium) -> String {
    browser
        .click("#connections tr[data-id=bob] button.reauthorize")
        .await;
    browser
        .wait_for_url("the link page", |u| u.ends_with("/ui/reauthorize"))
        .await;
    let link = browser
        .element("#link")
        .await
        .prop("value")
        .await
        .expect("value");
    let link = link.expect("a link");
    assert!(
        link.starts_with(&format!("{}/connect/", ui.public)),
        "{link}"
    );
    let session = browser.element("#session").await.text().await.expect("id");
    let path = format!("/connect-sessions/users/{session}");
    let s = admin(&ui.proxy, "GET", &path, None).await;
    assert_eq!(s.status, 200, "{}", s.text());
    assert_eq!(s.json()["connection_id"], "bob", "{}", s.text());
    assert_eq!(s.json()["state"], "pending", "{}", s.text());
    link
}

#[tokio::test]
async fn an_operator_finds_reauthorizes_and_deletes_connections_in_a_browser() {
    let ui = Ui::start().await;
    let browser = Chromium::start().await;
    let cookie = log_in(&ui, &browser).await;
    assert_eq!(rows(&browser).await, ["alice", "bob", "carol"]);
    let pools = browser
        .element("#pools tr[data-pool=users]")
        .await
        .text()
        .await;
    assert!(
        pools.expect("text").contains("users 2 1"),
        "the counts by state"
    );
    assert!(browser.elements("script").await.is_empty(), "no script");
    screenshot_for_the_readme(&browser).await;
    ui.assert_no_secret(&browser.source().await.expect("source"), &cookie);

    browser
        .element("#q")
        .await
        .send_keys("OB")
        .await
        .expect("type");
    browser.click("#search button").await;
    browser
        .wait_for_url("the search", |u| u.contains("q=OB"))
        .await;
    assert_eq!(rows(&browser).await, ["bob"], "ids containing ob, any case");

    let link = reauthorize_bob(&ui, &browser).await;
    let opened = get(&link).await;
    assert_eq!(opened.status, 302, "the link works: {}", opened.text());
    let to = opened.header("location").expect("to the bank");
    assert!(to.starts_with(&ui.sb.authorize_url()), "{to}");

    browser.goto(&ui.url("/ui")).await.expect("back");
    let page = browser.source().await.expect("source");
    ui.assert_no_secret(&page, &cookie);
    assert!(!page.contains(&link), "the link is shown only once");
    let carol = browser.element("#connections tr[data-id=carol]").await;
    let carol = carol.text().await.expect("text");
    assert!(carol.contains("needs_reauthorization"), "{carol}");
    assert!(carol.contains("consent_revoked"), "the last error: {carol}");
    browser
        .click("#connections tr[data-id=alice] a.delete")
        .await;
    browser
        .wait_for_url("the confirmation", |u| u.contains("/ui/delete?"))
        .await;
    assert_eq!(
        ui.status_of("alice").await,
        200,
        "not deleted before confirming"
    );
    browser.click("#confirm").await;
    browser
        .wait_for_url("the result", |u| u.ends_with("/ui/delete"))
        .await;
    assert!(browser.text().await.contains("revoked its refresh token"));
    assert_eq!(ui.status_of("alice").await, 404);
    assert_eq!(
        rows(&browser).await,
        Vec::<String>::new(),
        "a result page, no table"
    );
    assert_eq!(ui.sb.revocations(), 1, "deleted through revoke_url");

    browser.click("#logout").await;
    browser
        .wait_for_url("the login form", |u| u.ends_with("/ui/login"))
        .await;
    browser.goto(&ui.url("/ui")).await.expect("open /ui");
    browser
        .wait_for_url("the login form", |u| u.ends_with("/ui/login"))
        .await;
    browser.close().await;
}

/// Logs `b` in by plain HTTP; returns the `/ui` page.
async fn http_log_in(ui: &Ui, b: &mut Browser) -> String {
    let form = b.get(&ui.url("/ui/login")).await;
    assert_eq!(form.status, 200, "{}", form.text());
    let csrf = csrf_in(&form.text());
    let wrong = b
        .post_form(
            &ui.url("/ui/login"),
            &[("csrf", &csrf), ("api_token", "nope")],
        )
        .await;
    assert_eq!(wrong.status, 401, "a wrong token: {}", wrong.text());
    let csrf = csrf_in(&wrong.text());
    let ok = b
        .post_form(
            &ui.url("/ui/login"),
            &[("csrf", &csrf), ("api_token", API_TOKEN)],
        )
        .await;
    assert_eq!(ok.status, 303, "{}", ok.text());
    assert_eq!(ok.header("location"), Some("/ui"));
    let line = b
        .set_cookie_lines
        .iter()
        .find(|l| l.starts_with("flinks_ui="));
    let line = line.expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(line.contains(attr), "{line}");
    }
    let page = b.get(&ui.url("/ui")).await;
    assert_eq!(page.status, 200, "{}", page.text());
    page.text()
}

#[tokio::test]
async fn without_a_session_or_a_csrf_token_nothing_happens() {
    let ui = Ui::start().await;
    let mut b = Browser::new();
    for path in ["/ui", "/ui/", "/ui/delete?pool=users&id=alice", "/ui/nope"] {
        let r = b.get(&ui.url(path)).await;
        assert_eq!(r.status, 303, "{path}: {}", r.text());
        assert_eq!(r.header("location"), Some("/ui/login"), "{path}");
    }
    let fields = [("pool", "users"), ("id", "alice")];
    let r = b.post_form(&ui.url("/ui/delete"), &fields).await;
    assert_eq!(r.status, 303, "no session: {}", r.text());
    let r = b
        .post_form(&ui.url("/ui/login"), &[("api_token", API_TOKEN)])
        .await;
    assert_eq!(
        r.status,
        403,
        "a login without its csrf token: {}",
        r.text()
    );

    let page = http_log_in(&ui, &mut b).await;
    let cookie = b.cookies["flinks_ui"].clone();
    ui.assert_no_secret(&page, &cookie);
    let csrf = csrf_in(&page);
    for forged in [
        vec![],
        vec![("csrf", "0".repeat(64))],
        vec![("csrf", format!("{csrf}0"))],
    ] {
        let mut pairs: Vec<(&str, &str)> = fields.to_vec();
        pairs.extend(forged.iter().map(|(k, v)| (*k, v.as_str())));
        let r = b.post_form(&ui.url("/ui/delete"), &pairs).await;
        assert_eq!(r.status, 403, "{pairs:?}: {}", r.text());
        assert_eq!(ui.status_of("alice").await, 200, "alice is still there");
    }
    b.cookies.insert("flinks_ui".into(), format!("{cookie}0"));
    assert_eq!(b.get(&ui.url("/ui")).await.status, 303, "a tampered cookie");
    b.cookies.insert("flinks_ui".into(), cookie);

    for (path, status) in [
        ("/ui?pool=nope", 404),
        ("/ui/delete?pool=users&id=nobody", 404),
        ("/ui/delete?pool=nope&id=alice", 404),
        ("/ui/delete?pool=users&id=a%20b", 400),
        ("/ui?q=%zz", 400),
        ("/ui?after=a%20b", 400),
    ] {
        let r = b.get(&ui.url(path)).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
    }
    let mut pairs: Vec<(&str, &str)> = fields.to_vec();
    pairs.push(("csrf", &csrf));
    let r = b.post_form(&ui.url("/ui/delete"), &pairs).await;
    assert_eq!(r.status, 200, "with the session's csrf token: {}", r.text());
    assert_eq!(ui.status_of("alice").await, 404);
}

/// The ids of the connection rows in `html`.
fn row_ids(html: &str) -> Vec<&str> {
    html.split("<tr data-id=\"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .collect()
}

/// The `href` of the link with `id` in `html`, unescaped (`&amp;`).
fn href(html: &str, id: &str) -> Option<String> {
    let pattern = format!("id=\"{id}\" href=\"");
    let at = html.find(&pattern)? + pattern.len();
    Some(html[at..].split('"').next()?.replace("&amp;", "&"))
}

#[tokio::test]
async fn connections_come_in_pages_of_fifty_and_the_search_spans_them() {
    let users: Vec<String> = (0..55).map(|i| format!("user{i:02}")).collect();
    let sb = Sandbox::start(SandboxOptions {
        users: users.iter().map(|u| SandboxUser::new(u)).collect(),
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox");
    let ui = Ui::on(sb).await;
    for u in &users {
        connect(&ui.proxy, u).await;
    }
    let mut b = Browser::new();
    let first = http_log_in(&ui, &mut b).await;
    assert_eq!(
        row_ids(&first),
        users[..50].iter().map(String::as_str).collect::<Vec<_>>()
    );
    let next = href(&first, "next").expect("a next page link");
    let second = b.get(&ui.url(&next)).await;
    assert_eq!(second.status, 200, "{next}: {}", second.text());
    assert_eq!(
        row_ids(&second.text()),
        ["user50", "user51", "user52", "user53", "user54"]
    );
    assert!(href(&second.text(), "next").is_none(), "the last page");
    let found = b.get(&ui.url("/ui?pool=users&q=USER0")).await.text();
    let expected: Vec<String> = (0..10).map(|i| format!("user0{i}")).collect();
    assert_eq!(row_ids(&found), expected);
    let found = b.get(&ui.url("/ui?pool=users&q=5")).await.text();
    assert_eq!(
        row_ids(&found),
        [
            "user05", "user15", "user25", "user35", "user45", "user50", "user51", "user52",
            "user53", "user54"
        ]
    );
    let none = b.get(&ui.url("/ui?pool=users&q=nobody")).await.text();
    assert!(row_ids(&none).is_empty() && none.contains("No connection matches."));
}

#[tokio::test]
async fn the_page_shows_the_webhook_queue_and_sends_a_given_up_event_again() {
    use support::receiver::{Receiver, Reply};
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(410, None));
    let ui = Ui::on_with(users_sandbox(3600, false).await, |c| {
        c.webhooks = Some(support::Webhooks {
            url: rx.url(),
            secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            ..support::Webhooks::default()
        })
    })
    .await;
    connect(&ui.proxy, "alice").await;
    let first = rx.wait_for(1, std::time::Duration::from_secs(20)).await;
    let id = first[0].id().to_owned();
    // The deliverer records the 410 just after the receiver answered it.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while admin(&ui.proxy, "GET", "/webhooks/events?state=failed", None)
        .await
        .json()["events"]
        .as_array()
        .is_none_or(|e| e.is_empty())
    {
        assert!(std::time::Instant::now() < end, "the event never failed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut b = Browser::new();
    let page = http_log_in(&ui, &mut b).await;
    assert!(page.contains("id=\"webhook-queue\">0 pending"), "{page}");
    assert!(page.contains("id=\"webhooks-failed\""), "{page}");
    assert!(page.contains(&id), "{page}");
    assert!(page.contains("rejected (410)"), "{page}");
    let forged = b
        .post_form(&ui.url("/ui/webhooks/retry"), &[("event", &id)])
        .await;
    assert_eq!(forged.status, 403, "{}", forged.text());
    assert_eq!(rx.deliveries().len(), 1, "a forged form sends nothing");

    rx.set_default(Reply::Status(200, None));
    let csrf = csrf_in(&page);
    let r = b
        .post_form(
            &ui.url("/ui/webhooks/retry"),
            &[("csrf", &csrf), ("event", &id)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let again = rx.wait_for(2, std::time::Duration::from_secs(20)).await;
    assert_eq!(again[1].id(), id, "sent again with its webhook-id");
    let r = b
        .post_form(
            &ui.url("/ui/webhooks/retry"),
            &[("csrf", &csrf), ("event", "msg_nothere")],
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
}

#[tokio::test]
async fn without_an_api_token_the_login_asks_nothing_but_the_csrf_check_stays() {
    // The config allows no api_token only with the admin listener on
    // loopback (it is, here).
    let ui = Ui::on_with(users_sandbox(3600, false).await, |c| {
        c.admin_mut().api_token = None;
    })
    .await;
    connect(&ui.proxy, "alice").await;
    let mut b = Browser::new();
    let r = b.get(&ui.url("/ui")).await;
    assert_eq!(r.status, 303, "a session is still needed: {}", r.text());
    let form = b.get(&ui.url("/ui/login")).await;
    assert_eq!(form.status, 200, "{}", form.text());
    assert!(
        !form.text().contains("name=\"api_token\""),
        "{}",
        form.text()
    );
    assert!(
        form.text().contains("No <code>admin.api_token</code>"),
        "{}",
        form.text()
    );
    let forged = b.post_form(&ui.url("/ui/login"), &[]).await;
    assert_eq!(forged.status, 403, "no CSRF token: {}", forged.text());
    let csrf = csrf_in(&form.text());
    let ok = b.post_form(&ui.url("/ui/login"), &[("csrf", &csrf)]).await;
    assert_eq!(ok.status, 303, "{}", ok.text());
    let page = b.get(&ui.url("/ui")).await;
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(row_ids(&page.text()), ["alice"]);
}
