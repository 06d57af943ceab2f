//! The demo's connect flow in a real headless Chromium (issue 17): open the
//! link the demo prints, approve (or deny) on the sandbox bank's consent
//! page, land on the proxy's result page; then the app's request for that
//! user goes through. tests/connect.rs checks each step by scripted HTTP;
//! this is what a browser makes of them: its redirects, its cookies, its
//! enforcement of the pages' policies.
//!
//! Needs Debian's `chromium` and `chromium-driver`; fails (never skips)
//! without them.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::webdriver::Chromium;
use support::*;

/// How long the demo may take to print its banner.
const START: Duration = Duration::from_secs(30);

/// `flinks-proxy demo` as a child process, its banner read.
struct Demo {
    child: Child,
    /// Everything it printed (stdout and stderr), for failure messages.
    output: Arc<Mutex<String>>,
    banner: Vec<String>,
    /// `http://127.0.0.1:PORT` of the proxy, the admin and connect
    /// listeners, and of the sandbox bank's token listener (its consent
    /// page).
    proxy: String,
    admin: String,
    connect: String,
    bank: String,
}

impl Demo {
    fn start() -> Demo {
        let connect_port = free_port();
        let mut child = Command::new(binary())
            .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--connect")
            .arg(format!("127.0.0.1:{connect_port}"))
            .env_remove("RUST_LOG")
            .env_remove("FLINKS_PROXY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("demo starts");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, tx) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, Some(tx)),
            (Box::new(stderr), None),
        ] {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut o = output.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                    drop(o);
                    if let Some(tx) = &tx {
                        let _ = tx.send(line);
                    }
                }
            });
        }
        let mut demo = Demo {
            child,
            output,
            banner: Vec::new(),
            proxy: String::new(),
            admin: String::new(),
            connect: format!("http://127.0.0.1:{connect_port}"),
            bank: String::new(),
        };
        demo.read_banner(&lines);
        demo.proxy = demo.address("proxy");
        demo.admin = demo.address("admin");
        // "token endpoint  http://127.0.0.1:PORT/path": its origin.
        let token_url = demo.address("token endpoint");
        demo.bank = token_url.split('/').take(3).collect::<Vec<_>>().join("/");
        demo
    }

    /// Reads stdout up to the banner's last line ("Ctrl-C to stop.").
    fn read_banner(&mut self, lines: &Receiver<String>) {
        let deadline = Instant::now() + START;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    let last = line.starts_with("Ctrl-C");
                    self.banner.push(line);
                    if last {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "the demo printed no banner in {START:?}:\n{}",
                        self.output()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("wait");
                    panic!("the demo exited ({status}):\n{}", self.output())
                }
            }
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The `http://` address on the banner line `  NAME   http://...`.
    fn address(&self, name: &str) -> String {
        self.banner
            .iter()
            .find_map(|l| {
                let rest = l.trim_start().strip_prefix(name)?;
                rest.split_whitespace()
                    .next()
                    .filter(|a| a.starts_with("http://127.0.0.1:"))
            })
            .unwrap_or_else(|| panic!("no `{name} http://...` line in:\n{}", self.output()))
            .to_owned()
    }

    /// The connect link the banner prints: the connect listener's
    /// `/connect/` and a 43-character base64url token.
    fn link(&self) -> String {
        let prefix = format!("{}/connect/", self.connect);
        self.banner
            .iter()
            .flat_map(|l| l.split_whitespace())
            .find(|w| w.strip_prefix(&prefix).is_some_and(is_token))
            .unwrap_or_else(|| panic!("no {prefix}<token> link in:\n{}", self.output()))
            .to_owned()
    }

    /// A new link from the admin API: `POST /connect-sessions/users {}`.
    /// Returns (session id, link).
    async fn new_session(&self) -> (String, String) {
        let req = Request::post(format!("{}/connect-sessions/users", self.admin))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        let r = send(&client(), req).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let s = r.json();
        let link = s["connect_url"].as_str().expect("connect_url").to_owned();
        assert!(
            link.strip_prefix(&format!("{}/connect/", self.connect))
                .is_some_and(is_token),
            "{link}"
        );
        (
            s["session_id"].as_str().expect("session_id").to_owned(),
            link,
        )
    }

    /// The admin API's view of a connect session.
    async fn session(&self, id: &str) -> serde_json::Value {
        let r = get(&format!("{}/connect-sessions/users/{id}", self.admin)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// `GET /api/fdx/5/accounts` through the proxy as connection `user`.
    async fn accounts(&self, user: &str) -> Resp {
        let req = Request::get(format!("{}/api/fdx/5/accounts", self.proxy))
            .header("x-flinks-connection", user)
            .body(Full::default())
            .expect("request");
        send(&client(), req).await
    }
}

impl Drop for Demo {
    /// Ctrl-C, as a user stops it (it removes its temporary store), then
    /// a kill if it lingers.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 43 base64url characters: 256 bits.
fn is_token(s: &str) -> bool {
    s.len() == 43
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Opens `link`: the connect listener sends the browser on to the sandbox
/// bank's consent page. Asserts it shows the users and both buttons, and
/// takes a screenshot of it.
async fn open_consent_page(browser: &Chromium, demo: &Demo, link: &str) {
    browser.goto(link).await.expect("open the link");
    let consent = format!("{}/api/v1/authorize?", demo.bank);
    browser
        .wait_for_url("the consent page", |u| u.starts_with(&consent))
        .await;
    for id in ["#user-alice", "#user-bob", "#approve", "#deny"] {
        assert!(
            browser
                .element(id)
                .await
                .is_displayed()
                .await
                .expect("displayed"),
            "{id} is not shown"
        );
    }
    let shot = browser.screenshot("consent.png").await;
    let size = std::fs::metadata(&shot).expect("screenshot").len();
    // A blank page's screenshot is about 3 kB; this page's text and form
    // make several times that.
    assert!(size > 10_000, "{} is only {size} bytes", shot.display());
}

/// Waits for the result page on the connect listener's callback and
/// asserts what every result page is: no script, its own style applied
/// (the page's CSP allows it by hash), the browser's connect cookie gone.
/// Returns its title and text.
async fn result_page(browser: &Chromium, demo: &Demo) -> (String, String) {
    let callback = format!("{}/connect/callback?", demo.connect);
    let url = browser
        .wait_for_url("the connect callback", |u| u.starts_with(&callback))
        .await;
    let h1 = browser.element("h1").await.text().await.expect("h1");
    let title = browser.title().await.expect("title");
    assert_eq!(h1, title, "at {url}");
    assert!(
        browser.elements("script").await.is_empty(),
        "a script on the result page"
    );
    let source = browser.source().await.expect("source");
    assert!(!source.to_ascii_lowercase().contains("<script"), "{source}");
    let body = browser.element("body").await;
    let max_width = body.css_value("max-width").await.expect("max-width");
    assert_ne!(
        max_width, "none",
        "the page's own style did not apply (blocked by its CSP?)"
    );
    let cookies = browser.get_all_cookies().await.expect("cookies");
    let left: Vec<_> = cookies.iter().map(|c| c.name().to_owned()).collect();
    assert!(
        !left.iter().any(|n| n.starts_with("fp_connect_")),
        "the connect cookie outlived the flow: {left:?}"
    );
    browser.screenshot("result.png").await;
    (title, browser.text().await)
}

#[tokio::test]
async fn a_user_approves_in_chromium_and_the_app_reads_their_accounts() {
    // The demo first, so it is dropped last: with the browser gone, no
    // open connection holds up the demo's graceful shutdown.
    let demo = Demo::start();
    let browser = Chromium::start().await;
    let link = demo.link();
    let before = demo.accounts("alice").await;
    assert_ne!(before.status, 200, "alice is connected before she approved");

    open_consent_page(&browser, &demo, &link).await;
    browser.click("#user-alice").await;
    let alice = browser.element("#user-alice").await;
    assert!(alice.is_selected().await.expect("selected"));
    browser.click("#approve").await;

    let (title, text) = result_page(&browser, &demo).await;
    assert_eq!(title, "Your account is connected", "page text: {text}");
    assert!(text.contains("connected"), "{text}");
    assert!(!text.contains("not connected"), "{text}");
    browser.close().await;

    let r = demo.accounts("alice").await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), demo.output());
    assert!(r.text().contains("alice's chequing"), "{}", r.text());
}

#[tokio::test]
async fn a_user_denies_in_chromium_and_sees_not_connected() {
    // The demo first, so it is dropped last: with the browser gone, no
    // open connection holds up the demo's graceful shutdown.
    let demo = Demo::start();
    let browser = Chromium::start().await;
    let (session, link) = demo.new_session().await;

    open_consent_page(&browser, &demo, &link).await;
    browser.click("#user-bob").await;
    browser.click("#deny").await;

    let (title, text) = result_page(&browser, &demo).await;
    assert!(title.contains("not connected"), "page text: {text}");
    assert!(text.contains("not connected"), "{text}");
    browser.close().await;

    let s = demo.session(&session).await;
    assert_eq!(s["state"], "failed", "{s}");
    assert_eq!(s["error"]["error"], "access_denied", "{s}");
    let r = demo.accounts("bob").await;
    assert_ne!(r.status, 200, "{}", r.text());
}
