//! The real binary as a child process: run it to completion, or keep it
//! serving a config with its stderr captured and its listeners read from
//! the log.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The real binary, running with a config file; its stderr is captured.
pub struct ProxyProcess {
    pub child: Child,
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub log: Arc<Mutex<String>>,
    lines: std::sync::mpsc::Receiver<String>,
}

/// Path of the built binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_flinks-proxy")
}

/// Runs the binary with `args` to completion; returns (exit code, stdout, stderr).
pub fn run_binary(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl ProxyProcess {
    /// Starts `flinks-proxy --config PATH` and waits for its listeners.
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> ProxyProcess {
        let mut child = Command::new(binary())
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push_str(&line);
                log2.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        let mut p = ProxyProcess {
            child,
            proxy_addr: "0.0.0.0:0".parse().unwrap(),
            admin_addr: None,
            log,
            lines: rx,
        };
        // `addr=A` in text lines, `"addr":"A"` in JSON ones (where it may be
        // the last field, before the closing brace).
        let addr_of = |line: &str| -> Option<SocketAddr> {
            line.split([' ', ','])
                .find_map(|w| w.strip_prefix("addr=").or(w.strip_prefix("\"addr\":")))
                .and_then(|a| a.trim_end_matches('}').trim_matches('"').parse().ok())
        };
        // The listener lines come before "flinks-proxy started".
        loop {
            let line = p
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("proxy did not start; log:\n{}", p.log()));
            if line.contains("admin listening") {
                p.admin_addr = addr_of(&line);
            }
            if line.contains("proxy listening") {
                p.proxy_addr = addr_of(&line).expect("proxy addr");
            }
            if line.contains("flinks-proxy started") {
                break;
            }
        }
        p
    }

    /// Waits (up to `limit`) for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let end = std::time::Instant::now() + limit;
        if self.log().contains(needle) {
            return true;
        }
        while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return true,
                Ok(_) => {}
                Err(_) => return self.log().contains(needle),
            }
        }
        false
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends a signal (`HUP`, `TERM`, `INT`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for exit (up to `limit`) and returns the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if std::time::Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy_addr)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr.expect("admin"))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
