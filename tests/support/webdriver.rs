//! A real headless Chromium, driven over WebDriver by `chromedriver`
//! (Debian's `chromium` and `chromium-driver`), for tests that must see
//! what a browser does: the redirects it follows, the cookies it keeps and
//! sends, the policies it enforces, the forms it submits.
//!
//! A missing program fails the test, naming the packages to install: it
//! never skips. `chromedriver` runs on a free loopback port in a process
//! group of its own, so dropping it (a panic included) ends Chromium too.

use std::fs::File;
use std::ops::Deref;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;

use super::tempdir::TempDir;

/// What to run when a program is missing.
const INSTALL: &str = "apt-get install chromium chromium-driver";

/// The longest any one wait on the driver or the browser may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(25);

/// Chromium's flags: headless as root on a machine without a display, and
/// none of the background traffic (updates, sync, field trials) that a
/// closed network refuses.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1024,768",
];

/// `name` on `PATH`, or a panic saying what to install.
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not on PATH: this test drives a real headless Chromium; {INSTALL}")
        })
}

/// `chromedriver --port=N` on loopback, in its own process group.
struct Driver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Driver {
    fn start(dir: &Path) -> Driver {
        let chromedriver = program("chromedriver");
        let port = super::free_port();
        let log = dir.join("chromedriver.log");
        let out = File::create(dir.join("chromedriver.out")).expect("chromedriver output file");
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            // Chromium's own files (crash reports, caches) stay in `dir`.
            .env("HOME", dir)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_CACHE_HOME")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("output file"))
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{} does not start ({e}); {INSTALL}", chromedriver.display())
            });
        Driver { child, port, log }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until `/status` answers `"ready": true`.
    async fn wait_ready(&mut self) {
        let client = super::client();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "chromedriver exited ({status}) before it answered; {INSTALL}\n{}",
                    self.log_tail()
                );
            }
            let req = Request::get(format!("{}/status", self.url()))
                .body(Full::<Bytes>::default())
                .expect("request");
            if let Ok(resp) = client.request(req).await {
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                let ready = body
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some_and(|v| v["value"]["ready"] == true);
                if ready {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver on port {} not ready after {WAIT:?}\n{}",
                self.port,
                self.log_tail()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The end of the driver's log, for a failure message.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!(
            "chromedriver log ({}), last lines:\n{tail}",
            self.log.display()
        )
    }
}

impl Drop for Driver {
    /// Kills the driver's whole group: Chromium and its helpers with it.
    fn drop(&mut self) {
        // `-s KILL -- -PGID`: procps' `kill -KILL -PGID` reads the group
        // as a second signal and kills nothing.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--"])
            .arg(format!("-{}", self.child.id()))
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium with a fresh profile, behind its own chromedriver.
/// Derefs to the WebDriver client. Its folder (profile, driver log,
/// screenshots) is removed on drop, or kept and named when the test panics.
pub struct Chromium {
    client: Client,
    driver: Driver,
    dir: Option<TempDir>,
}

impl Deref for Chromium {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Chromium {
    /// Starts chromedriver, waits until it is ready, and opens a session.
    pub async fn start() -> Chromium {
        let chromium = program("chromium");
        let dir = TempDir::new();
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile).expect("profile folder");
        let mut driver = Driver::start(dir.path());
        driver.wait_ready().await;
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!("an object")
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no Chromium session ({e}); {INSTALL}\n{}",
                    driver.log_tail()
                )
            });
        Chromium {
            client,
            driver,
            dir: Some(dir),
        }
    }

    /// The browser's folder: profile, driver log, screenshots.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    /// The current URL, as text.
    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("current URL")
            .to_string()
    }

    /// Polls the current URL until `ready` holds (at most `WAIT`); returns it.
    pub async fn wait_for_url(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let url = self.url().await;
            if ready(&url) {
                return url;
            }
            assert!(
                Instant::now() < deadline,
                "the browser did not reach {what} within {WAIT:?}; it is at {url}\n{}",
                self.page_summary().await
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits (at most `WAIT`) for the element that `css` selects.
    pub async fn element(&self, css: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(WAIT)
            .every(POLL)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(e) => e,
            Err(e) => panic!(
                "no element `{css}` ({e}) at {}\n{}",
                self.url().await,
                self.page_summary().await
            ),
        }
    }

    /// Every element that `css` selects now (no wait).
    pub async fn elements(&self, css: &str) -> Vec<Element> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .expect("find elements")
    }

    /// Clicks the element that `css` selects (waiting for it first).
    pub async fn click(&self, css: &str) {
        self.element(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking `{css}`: {e}"));
    }

    /// The text a user sees on the page (`<body>`'s rendered text).
    pub async fn text(&self) -> String {
        self.element("body").await.text().await.expect("body text")
    }

    /// A PNG of the viewport, written to `name` in the browser's folder.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "the screenshot is no PNG"
        );
        let path = self.dir().join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// The URL, title and start of the source, for a failure message.
    async fn page_summary(&self) -> String {
        let title = self.client.title().await.unwrap_or_default();
        let source = self.client.source().await.unwrap_or_default();
        let cut: String = source.chars().take(2000).collect();
        format!("title: {title:?}\nsource:\n{cut}")
    }

    /// Ends the session (Chromium quits), then the driver.
    pub async fn close(self) {
        self.client.clone().close().await.expect("session closed");
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = self.dir.take().expect("dir");
            eprintln!(
                "browser folder kept for a look (driver log, screenshots): {}\n{}",
                dir.path().display(),
                self.driver.log_tail()
            );
            std::mem::forget(dir);
        }
    }
}
