//! oidc-provider in tests (tests/oidc.rs, tests/client_auth.rs,
//! tests/dpop_server.rs): a launcher under node, its output read line by
//! line, the client_auth.mjs server as an [`AuthServer`], and its own
//! login and consent pages walked as a user would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::browser::Browser;

/// Hops from the authorize redirect back to the callback: /auth, the login
/// page, /auth again, the consent page, /auth once more.
pub const MAX_HOPS: usize = 12;

/// The log, even after a reader thread panicked.
pub fn lock(log: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    log.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Copies `from`'s lines into `log` (and `tx`) on a thread of its own.
pub fn read_lines(
    from: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<String>>,
    tx: Option<mpsc::UnboundedSender<String>>,
) {
    use std::io::BufRead;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            let mut l = lock(&log);
            l.push_str(&line);
            l.push('\n');
            drop(l);
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
    });
}

/// Walks oidc-provider's pages from `authorize` as a user would: follows
/// its redirects, signs in as `login` on the login form and approves the
/// consent form (their actions and hidden fields read from the HTML).
/// Returns where it finally sends the browser (the proxy's callback) and
/// the prompts it showed.
pub async fn sign_in_and_consent(
    b: &mut Browser,
    issuer: &str,
    authorize: &str,
    login: &str,
) -> (String, Vec<String>) {
    let mut next = authorize.to_owned();
    let mut prompts = Vec::new();
    for _ in 0..MAX_HOPS {
        if !next.starts_with(issuer) {
            return (next, prompts);
        }
        let r = b.get(&next).await;
        let r = match r.status.as_u16() {
            302 | 303 => r,
            200 => {
                let form = Form::parse(&r.text());
                let mut fields = form.hidden.clone();
                let prompt = fields.get("prompt").cloned().unwrap_or_default();
                if prompt == "login" {
                    fields.insert("login".into(), login.into());
                    fields.insert("password".into(), "any password".into());
                }
                prompts.push(prompt);
                let pairs: Vec<(&str, &str)> = fields
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let posted = b.post_form(&absolute(issuer, &form.action), &pairs).await;
                assert_eq!(
                    posted.status,
                    303,
                    "{} answered: {}",
                    form.action,
                    posted.text()
                );
                posted
            }
            _ => panic!("{next}: {} {}", r.status, r.text()),
        };
        next = absolute(issuer, r.header("location").expect("location"));
    }
    panic!("still at oidc-provider after {MAX_HOPS} hops: {next}")
}

/// A page's first form: its action and hidden fields.
struct Form {
    action: String,
    hidden: BTreeMap<String, String>,
}

impl Form {
    fn parse(html: &str) -> Form {
        let start = html
            .find("<form")
            .unwrap_or_else(|| panic!("no form in:\n{html}"));
        let end = start + html[start..].find("</form>").expect("</form>");
        let form = &html[start..end];
        let tag = |from: usize| &form[from..from + form[from..].find('>').expect("tag end")];
        let action = attr(tag(0), "action").expect("the form's action");
        let mut hidden = BTreeMap::new();
        let mut at = 0;
        while let Some(i) = form[at..].find("<input") {
            let input = tag(at + i);
            if attr(input, "type").as_deref() == Some("hidden") {
                let name = attr(input, "name").expect("a hidden input's name");
                hidden.insert(name, attr(input, "value").unwrap_or_default());
            }
            at += i + 6;
        }
        Form { action, hidden }
    }
}

/// The value of attribute `name="..."` in `tag`, entities decoded.
fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let v = tag.find(&needle)? + needle.len();
    let len = tag[v..].find('"')?;
    Some(
        tag[v..v + len]
            .replace("&#x2F;", "/")
            .replace("&quot;", "\"")
            .replace("&amp;", "&"),
    )
}

/// `location` made absolute against `origin` when it is a path.
fn absolute(origin: &str, location: &str) -> String {
    if location.starts_with('/') {
        format!("{origin}{location}")
    } else {
        location.to_owned()
    }
}

/// A node launcher (`tests/oidc/*.mjs`) running, its output being read.
pub struct Spawned {
    pub child: std::process::Child,
    /// What it printed after `listening `: its issuer URL.
    pub issuer: String,
    /// Its stdout lines after that one, as they come.
    pub lines: mpsc::UnboundedReceiver<String>,
    /// Everything it printed (stdout and stderr), for failure messages.
    pub log: Arc<Mutex<String>>,
}

/// Starts `node tests/oidc/{script}` with the arguments `configure` adds,
/// stdin piped (it exits when the test's end closes it), and waits for its
/// `listening URL` line. Fails, never skips, without node or the pinned
/// packages.
pub async fn spawn_node(
    script: &str,
    configure: impl FnOnce(&mut std::process::Command),
) -> Spawned {
    use std::process::{Command, Stdio};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
    assert!(
        dir.join("node_modules/oidc-provider/package.json")
            .is_file(),
        "tests/oidc/node_modules is missing: run `npm ci --prefix tests/oidc` \
         (it installs the pinned oidc-provider; .ci/run does it)"
    );
    let mut cmd = Command::new("node");
    cmd.arg(dir.join(script)).current_dir(&dir);
    configure(&mut cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run `node` ({e}): install Node.js (`apt-get install nodejs npm`)")
        });
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, mut lines) = mpsc::unbounded_channel();
    read_lines(
        child.stdout.take().expect("stdout"),
        Arc::clone(&log),
        Some(tx),
    );
    read_lines(child.stderr.take().expect("stderr"), Arc::clone(&log), None);
    let issuer = loop {
        let line = tokio::time::timeout(START_DEADLINE, lines.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{script} did not start:\n{}", lock(&log)));
        if let Some(url) = line.strip_prefix("listening ") {
            break url.to_owned();
        }
    };
    Spawned {
        child,
        issuer,
        lines,
        log,
    }
}

/// Starting node and loading oidc-provider takes well under a second;
/// this leaves room for a loaded CI machine.
pub const START_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// How long [`AuthServer::wait_for_line`] waits: a token request is
/// answered in milliseconds and its line follows it.
pub const LINE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// `tests/oidc/client_auth.mjs` under node (its usage and log lines are in
/// its header), stopped when dropped (and by itself when this process
/// ends: it exits when its stdin closes).
pub struct AuthServer {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub issuer: String,
    lines: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<String>>,
    _dir: super::TempDir,
}

impl AuthServer {
    /// Starts it with `clients` (a JSON array of oidc-provider client
    /// metadata) and the launcher's `flags` (`--dpop`,
    /// `--access-token-ttl N`).
    pub async fn start(clients: &serde_json::Value, flags: &[&str]) -> AuthServer {
        let dir = super::TempDir::new();
        let file = dir.write("clients.json", clients.to_string());
        let Spawned {
            child,
            issuer,
            lines,
            log,
        } = spawn_node("client_auth.mjs", |cmd| {
            cmd.args(["--port", "0", "--clients"])
                .arg(&file)
                .args(flags);
        })
        .await;
        AuthServer {
            child,
            issuer,
            lines,
            log,
            _dir: dir,
        }
    }

    /// Waits for a stdout line starting with `prefix`; returns it and the
    /// lines passed over on the way.
    pub async fn wait_for_line(&mut self, prefix: &str) -> (String, Vec<String>) {
        let deadline = tokio::time::Instant::now() + LINE_DEADLINE;
        let mut before = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line.starts_with(prefix) => return (line, before),
                Ok(Some(line)) => before.push(line),
                _ => panic!("no `{prefix}` line from oidc-provider:\n{}", self.log()),
            }
        }
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        lock(&self.log).clone()
    }

    /// `{issuer}/token`.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.issuer)
    }

    /// The provider's signing keys (`/jwks`) as JSON.
    pub async fn jwks_json(&self) -> serde_json::Value {
        let r = super::get(&format!("{}/jwks", self.issuer)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// The provider's signing keys, to verify its access tokens.
    pub async fn jwks(&self) -> super::jwks::Jwks {
        super::jwks::Jwks::from_json(&self.jwks_json().await)
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
