//! Fault-injection support (issue 15): a seeded PRNG, the real binary as a
//! child process with stdout and stderr captured (so every line it writes
//! can be searched for secrets), one-shot HTTP requests with a client-side
//! deadline, and a fast search of log text for issued secrets.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

use super::{binary, client, HttpClient};

/// SplitMix64: small, fast, and the same sequence for a seed everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next_u64() % (hi - lo + 1))
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The real binary serving a config, both output streams captured into
/// one log; killed (SIGKILL) when dropped.
pub struct Proc {
    child: Child,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    log: Arc<Mutex<String>>,
    /// stderr lines, for awaiting reload outcomes.
    lines: Receiver<String>,
}

fn capture(
    stream: impl Read + Send + 'static,
    log: Arc<Mutex<String>>,
    tx: Option<Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
    });
}

impl Proc {
    /// Starts `flinks-proxy --config PATH` and waits for its listeners.
    pub fn start(config: &Path) -> Proc {
        let mut cmd = Command::new(binary());
        cmd.arg("--config").arg(config).env_remove("RUST_LOG");
        // CHAOS_RUST_LOG=debug: more of the proxies' lines for reading a finding.
        if let Ok(filter) = std::env::var("CHAOS_RUST_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = std::sync::mpsc::channel();
        capture(child.stdout.take().expect("stdout"), log.clone(), None);
        capture(child.stderr.take().expect("stderr"), log.clone(), Some(tx));
        let addr_of = |line: &str| -> Option<SocketAddr> {
            line.split([' ', ','])
                .find_map(|w| w.strip_prefix("addr=").or(w.strip_prefix("\"addr\":")))
                .and_then(|a| a.trim_matches('"').parse().ok())
        };
        let (mut proxy_addr, mut admin_addr) = (None, None);
        loop {
            let Ok(line) = lines.recv_timeout(Duration::from_secs(30)) else {
                panic!("proxy did not start; log:\n{}", log.lock().unwrap());
            };
            if line.contains("admin listening") {
                admin_addr = addr_of(&line);
            }
            if line.contains("proxy listening") {
                proxy_addr = addr_of(&line);
            }
            if line.contains("flinks-proxy started") {
                break;
            }
        }
        Proc {
            child,
            proxy_addr: proxy_addr.expect("proxy address logged"),
            admin_addr: admin_addr.expect("admin address logged"),
            log,
            lines,
        }
    }

    /// `kill -9`, waiting for the process to be gone; returns its log.
    pub fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }

    /// Sends SIGHUP (reload) and waits (up to `limit`) for the outcome line
    /// (`config reloaded` or `config reload failed`); true if reloaded.
    pub fn reload(&self, limit: Duration) -> bool {
        let ok = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -HUP failed");
        let end = Instant::now() + limit;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains("config reloaded") => return true,
                Ok(l) if l.contains("config reload failed") => return false,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no reload outcome within {limit:?}; log:\n{}", self.log());
    }

    /// Everything written so far (stdout and stderr, interleaved by line).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Drains the line channel (only reload outcomes are awaited on it).
    pub fn drain(&self) {
        while self.lines.try_recv().is_ok() {}
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy_addr)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an HTTP exchange came to: `status` 0 when no answer arrived
/// within the client's deadline (or the connection failed).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The JSON body's `error` (or `code`) field, else the body's start.
    pub error: String,
}

impl Answer {
    pub fn is(&self, status: u16, error: &str) -> bool {
        self.status == status && self.error == error
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.error)
    }
}

/// Sends `req`, giving up after `deadline` (the client leaves: the
/// connection is dropped).
pub async fn exchange(c: &HttpClient, req: Request<Full<Bytes>>, deadline: Duration) -> Answer {
    let work = async {
        let resp = c.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((status, body.to_bytes()))
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok((status, _))) if (200..300).contains(&status) => Answer {
            status,
            error: String::new(),
        },
        Ok(Ok((status, body))) => {
            let error = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    let e = v.get("error").or(v.get("code"))?;
                    e.as_str().map(str::to_owned)
                })
                .unwrap_or_else(|| {
                    let text = String::from_utf8_lossy(&body);
                    text.chars().take(60).collect()
                });
            Answer { status, error }
        }
        Ok(Err(e)) => Answer {
            status: 0,
            error: e,
        },
        Err(_) => Answer {
            status: 0,
            error: "no answer in time".into(),
        },
    }
}

/// A GET through the proxy naming connection `id`, with extra headers.
pub async fn get_as(url: &str, id: &str, headers: &[(&str, &str)], deadline: Duration) -> Answer {
    let mut req = Request::get(url).header(super::connections::SELECT, id);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    exchange(&client(), req.body(Full::default()).unwrap(), deadline).await
}

/// An admin API call with the API token.
pub async fn admin(
    url: &str,
    method: &str,
    body: Option<serde_json::Value>,
    deadline: Duration,
) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header(
            "authorization",
            format!("Bearer {}", super::connections::API_TOKEN),
        )
        .body(Full::new(
            body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
        ))
        .unwrap();
    exchange(&client(), req, deadline).await
}

/// Runs the binary with `args` (a CLI command) on a blocking thread;
/// returns (exit code, stdout + stderr).
pub async fn cli(args: Vec<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = super::run_binary(&args, &[]);
        (code, format!("{out}{err}"))
    })
    .await
    .expect("cli task")
}

/// The secrets of `secrets` that occur in `text`. Issued tokens all start
/// with one of `prefixes`; every occurrence of a prefix is compared with
/// the secrets of each length there is, so the cost is one scan of the text
/// per prefix, not one per secret.
pub fn leaked<'a>(text: &str, secrets: &'a [String], prefixes: &[&str]) -> Vec<&'a str> {
    let set: HashSet<&str> = secrets.iter().map(String::as_str).collect();
    let mut lengths: Vec<usize> = secrets.iter().map(String::len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut found = HashSet::new();
    for prefix in prefixes {
        for (at, _) in text.match_indices(prefix) {
            for &len in &lengths {
                if let Some(candidate) = text.get(at..at + len) {
                    if let Some(s) = set.get(candidate) {
                        found.insert(*s);
                    }
                }
            }
        }
    }
    // Secrets with none of the prefixes: plain search (there are few).
    for s in secrets
        .iter()
        .filter(|s| !prefixes.iter().any(|p| s.starts_with(p)))
    {
        if text.contains(s.as_str()) {
            found.insert(s.as_str());
        }
    }
    found.into_iter().collect()
}

/// A config file rewritten in place (reloads read it again).
pub struct ConfigFile(pub PathBuf);

impl ConfigFile {
    pub fn write(&self, text: &str) {
        // Write then rename: a reload never reads half a file.
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.0).expect("rename config");
    }

    pub fn arg(&self) -> String {
        self.0.to_str().expect("UTF-8 path").to_owned()
    }
}
