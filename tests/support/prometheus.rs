//! A real Prometheus (Debian's `prometheus` package) for the tests: started
//! on a free loopback port with a generated config in a temporary folder,
//! scraping given targets every second, queried through its HTTP API, and
//! killed when dropped. Also `promtool`, and a monitored proxy with the
//! traffic the operations tests look at.
//!
//! A missing binary fails the test with the command that installs it: the
//! tests never pass by skipping.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flinks_proxy::sandbox::{SandboxOptions, SandboxUser};

use super::config::{Credential, Pool, ProxyToml, Route, Store};
use super::connections::{connect, get_as, new_key, API_TOKEN};
use super::TempDir;

/// The scrape job name; the alert rules expect it (`up{job="flinks-proxy"}`).
pub const JOB: &str = "flinks-proxy";
/// How long to wait for Prometheus to start or a series to arrive: a
/// loaded 2-core machine with parallel builds can be slow.
const PATIENCE: Duration = Duration::from_secs(90);
/// Between two polls of the query API.
const POLL: Duration = Duration::from_millis(250);

/// The path of a tool from the `prometheus` package, or a failing test.
pub fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: these tests run a real Prometheus. \
                 Install it with `apt-get install prometheus` (Debian/Ubuntu; \
                 .ci/run does this), then run the tests again"
            )
        })
}

/// A file of this repository.
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// One sample of an instant query.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Prometheus refused the query (it does not parse, or failed).
#[derive(Debug)]
pub struct QueryError(pub String);

/// A running Prometheus; killed and its folder removed when dropped.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second as job [`JOB`],
    /// evaluating `rule_files` every second, and waits until it is ready.
    pub async fn start(targets: &[SocketAddr], rule_files: &[PathBuf]) -> Prometheus {
        let binary = tool("prometheus");
        let mut dir = TempDir::new();
        dir.write("prometheus.yml", config(targets, rule_files));
        // The free port is found by binding and letting go; another process
        // can take it in between, so a start that fails is tried again.
        for _ in 0..3 {
            let addr = free_port();
            let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
            let child = Command::new(&binary)
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
            let mut p = Prometheus { child, addr, dir };
            if p.wait_ready().await {
                return p;
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
            eprintln!("prometheus did not start on {addr}:\n{}", p.log());
            dir = std::mem::replace(&mut p.dir, TempDir::new());
            let _ = std::fs::remove_dir_all(dir.join("data"));
        }
        panic!("prometheus did not start three times; see the output above")
    }

    /// What Prometheus logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) -> bool {
        let end = Instant::now() + PATIENCE;
        let url = format!("http://{}/-/ready", self.addr);
        while Instant::now() < end {
            if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if let Ok(Ok(resp)) = tokio::time::timeout(POLL * 4, try_get(&url)).await {
                if resp.status == 200 {
                    return true;
                }
            }
            tokio::time::sleep(POLL).await;
        }
        false
    }

    /// An instant query: the samples of a vector (or a scalar as one
    /// unlabelled sample), or why Prometheus refused it.
    pub async fn query(&self, expr: &str) -> Result<Vec<Sample>, QueryError> {
        let url = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            percent_encode(expr)
        );
        let resp = try_get(&url)
            .await
            .map_err(|e| QueryError(format!("prometheus unreachable: {e}")))?;
        let body: serde_json::Value = serde_json::from_slice(&resp.body)
            .map_err(|e| QueryError(format!("not JSON ({e}): {}", resp.text())))?;
        if body["status"] != "success" {
            return Err(QueryError(format!("{} {}", resp.status, body)));
        }
        let data = &body["data"];
        let result = &data["result"];
        match data["resultType"].as_str() {
            Some("vector") => Ok(result
                .as_array()
                .map(|a| a.iter().map(sample).collect())
                .unwrap_or_default()),
            Some("scalar") => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: value_of(result),
            }]),
            other => Err(QueryError(format!("unexpected result type {other:?}"))),
        }
    }

    /// Polls `expr` until `done` holds for its samples; fails the test
    /// with the last answer after [`PATIENCE`].
    pub async fn wait_for(&self, expr: &str, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
        let end = Instant::now() + PATIENCE;
        loop {
            let answer = self.query(expr).await;
            if let Ok(samples) = &answer {
                if done(samples) {
                    return samples.clone();
                }
            }
            assert!(
                Instant::now() < end,
                "{expr}: still {answer:?} after {PATIENCE:?}; prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `expr` has exactly one sample and returns it.
    pub async fn wait_for_value(&self, expr: &str, done: impl Fn(f64) -> bool) -> Sample {
        let samples = self
            .wait_for(expr, |s| s.len() == 1 && done(s[0].value))
            .await;
        samples[0].clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(targets: &[SocketAddr], rule_files: &[PathBuf]) -> String {
    let quoted = |items: Vec<String>| {
        items
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files: [{rules}]\n\
         scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [{targets}]\n",
        rules = quoted(rule_files.iter().map(|p| p.display().to_string()).collect()),
        targets = quoted(targets.iter().map(ToString::to_string).collect()),
    )
}

/// GET without panicking (Prometheus may not listen yet).
async fn try_get(url: &str) -> Result<super::Resp, String> {
    use http_body_util::BodyExt;
    let req = http::Request::get(url)
        .body(http_body_util::Full::default())
        .map_err(|e| e.to_string())?;
    let resp = super::client()
        .request(req)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(super::Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr")
}

fn sample(v: &serde_json::Value) -> Sample {
    let labels = v["metric"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default();
    Sample {
        labels,
        value: value_of(&v["value"]),
    }
}

/// `[time, "value"]` → value (`NaN` stays NaN).
fn value_of(pair: &serde_json::Value) -> f64 {
    pair[1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `promtool ARGS` from the repository root: (success, stdout + stderr).
pub fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new(tool("promtool"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// ------------------------------------------------------- a monitored proxy

/// The client secret of the `broken` credential, which the token endpoint
/// refuses; must never reach a metric.
pub const WRONG_SECRET: &str = "wrong-secret-3c9f1e7d";

/// The users [`Monitored::send_traffic`] connects to pool `users`; the
/// first has their consent revoked.
pub const POOL_USERS: [&str; 3] = ["alice", "bob", "carol"];

/// A proxy in this process, its sandbox (with [`POOL_USERS`]), and a real
/// Prometheus scraping its admin listener with this repository's recording
/// and alert rules loaded. Routes: `flinks` (`/api`, works), `status`
/// (`/status`, the sandbox answers the status in the path), `dead`
/// (`/dead`, nothing listens upstream), `broken` (`/broken`, a credential
/// the token endpoint refuses), `users` (`/api/fdx`, per-user connections
/// of pool `users` on an SQLite store in a temporary folder).
pub struct Monitored {
    pub prometheus: Prometheus,
    pub proxy: flinks_proxy::Running,
    pub sandbox: flinks_proxy::sandbox::Sandbox,
    toml: String,
    /// Holds the store; removed after the proxy stopped.
    _store_dir: TempDir,
    /// Holds route `dead`'s port (see [`refused_addr`]).
    _dead: tokio::net::TcpSocket,
}

/// An address that refuses connections for as long as the socket lives: it
/// is bound but never listens, so no later bind (the sandbox's, Prometheus's,
/// the proxy's, all on port 0) can be given its port. A port taken from a
/// listener that was dropped again could be, and a request meant to fail
/// then reached that server (a 404 from the sandbox instead of a 502).
fn refused_addr() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind a loopback port");
    (socket.local_addr().expect("local addr"), socket)
}

impl Monitored {
    /// Starts everything and waits for Prometheus's first scrape.
    pub async fn start() -> Monitored {
        // Fail before starting anything when Prometheus is missing.
        tool("prometheus");
        let sandbox = super::sandbox_with(SandboxOptions {
            users: POOL_USERS.iter().map(|s| SandboxUser::new(s)).collect(),
            ..SandboxOptions::default()
        })
        .await;
        let store_dir = TempDir::new();
        let (dead, dead_socket) = refused_addr();
        let api = sandbox.api_url();
        let broken = Credential {
            client_id: "demo-client".to_owned(),
            client_secret: Some(WRONG_SECRET.into()),
            scope: None,
            ..Credential::sandbox(&sandbox)
        };
        let toml = ProxyToml::listeners()
            .with(|c| {
                c.server.request_timeout = Some(Duration::from_secs(5));
                c.admin_mut().api_token = Some(API_TOKEN.into());
                let db = store_dir.join("connections.db");
                c.store = Some(Store::sqlite(&db, &new_key()));
            })
            .credential("flinks", Credential::sandbox(&sandbox))
            .credential("broken", broken)
            .route("flinks", Route::credential("/api", &api, "flinks"))
            .route("status", Route::credential("/status", &api, "flinks"))
            .route(
                "dead",
                Route::credential("/dead", &format!("http://{dead}"), "flinks"),
            )
            .route("broken", Route::credential("/broken", &api, "broken"))
            .pool_table(
                "users",
                Pool {
                    authorize_url: Some(sandbox.authorize_url()),
                    ..Pool::sandbox(&sandbox)
                },
            )
            .route("users", Route::pool("/api/fdx", &api, "users"))
            .with(|c| c.connect = Some(super::config::Connect::loopback(&[])))
            .toml();
        let proxy = super::start_proxy(&toml).await;
        let admin = proxy.admin_addr().expect("admin listener");
        let rules = [
            repo_file("deploy/prometheus/rules.yml"),
            repo_file("deploy/prometheus/alerts.yml"),
        ];
        let prometheus = Prometheus::start(&[admin], &rules).await;
        prometheus
            .wait_for_value(&format!("up{{job=\"{JOB}\"}}"), |v| v == 1.0)
            .await;
        Monitored {
            prometheus,
            proxy,
            sandbox,
            toml,
            _store_dir: store_dir,
            _dead: dead_socket,
        }
    }

    /// `host:port` of the admin listener, Prometheus's `instance` label.
    pub fn instance(&self) -> String {
        self.proxy.admin_addr().expect("admin").to_string()
    }

    async fn get(&self, path: &str) -> u16 {
        super::get(&super::proxy_url(&self.proxy, path))
            .await
            .status
            .as_u16()
    }

    /// Sends the traffic the operations tests look at: 4 successes on
    /// `flinks` (one replayed after the sandbox revoked the token), a 404
    /// from the upstream and one with no route, two 502 from the dead
    /// upstream and two 503 `token_unavailable`, the second of each after
    /// Prometheus saw the first (so rates see an increase), and one reload.
    /// On route `users`: [`POOL_USERS`] connected and read once each, the
    /// first then gets a 401 for revoked consent (its connection turns
    /// `needs_reauthorization`), and the second, after the access-token
    /// revocation, is served by a refresh and a replay.
    pub async fn send_traffic(&self) {
        for _ in 0..3 {
            assert_eq!(self.get("/api/v1/accounts").await, 200);
        }
        self.send_pooled_traffic().await;
        self.sandbox.revoke_access_tokens();
        assert_eq!(self.get("/api/v1/accounts").await, 200);
        let refreshed = get_as(&self.proxy, POOL_PATH, POOL_USERS[1]).await;
        assert_eq!(refreshed.status, 200, "{}", refreshed.text());
        assert_eq!(self.get("/status/404").await, 404);
        assert_eq!(self.get("/nowhere").await, 404);
        assert_eq!(self.get("/dead/x").await, 502);
        assert_eq!(self.get("/broken/x").await, 503);
        let config = super::parse_config(&self.toml, &std::env::temp_dir());
        self.proxy.reload(config).expect("reload");
        for (route, status) in [("dead", 502), ("broken", 503)] {
            let seen =
                format!("flinks_proxy_requests_total{{route=\"{route}\",status=\"{status}\"}}");
            self.prometheus.wait_for_value(&seen, |v| v >= 1.0).await;
            assert_eq!(self.get(&format!("/{route}/again")).await, status);
        }
    }

    /// Connects [`POOL_USERS`] through the admin API, reads as each, then
    /// revokes the first one's consent and reads as them again (401).
    async fn send_pooled_traffic(&self) {
        for user in POOL_USERS {
            assert_eq!(connect(&self.proxy, user).await["state"], "active");
            let r = get_as(&self.proxy, POOL_PATH, user).await;
            assert_eq!(r.status, 200, "{user}: {}", r.text());
        }
        self.sandbox.revoke_consent(POOL_USERS[0]);
        let r = get_as(&self.proxy, POOL_PATH, POOL_USERS[0]).await;
        assert_eq!(r.status, 401, "{}", r.text());
    }
}

/// A user's accounts in the sandbox, through route `users`.
const POOL_PATH: &str = "/api/fdx/5/accounts";
