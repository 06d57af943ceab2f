//! A throwaway PostgreSQL cluster for tests: `initdb` and `pg_ctl` from
//! Debian's `postgresql` package, in a temporary folder, listening on a free
//! loopback port. When the tests run as root (CI containers), the server runs
//! as the `postgres` user through `runuser`, since PostgreSQL refuses root.
//! Nothing needs to be running beforehand; a missing installation fails the
//! test with the command that installs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::free_port;

/// The superuser password set by `initdb` (host connections need it, so a
/// URL with a password is exercised like in production).
pub const PASSWORD: &str = "pg-test-secret";

/// A running cluster; stopped and deleted on drop.
pub struct PgCluster {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
}

/// The folder holding `initdb`, `pg_ctl`, `createdb`: `$FLINKS_PG_BINDIR`, else
/// the newest `/usr/lib/postgresql/*/bin`.
fn bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLINKS_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and \
             $FLINKS_PG_BINDIR). Install them with: apt-get update && apt-get install -y postgresql"
        ),
    }
}

fn is_root() -> bool {
    // The uid of this process is the owner of /proc/self.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

impl PgCluster {
    /// Creates and starts a cluster. Panics with a clear message when the
    /// binaries are missing or the server does not start.
    pub fn start() -> PgCluster {
        let bin = bindir();
        let root = std::env::temp_dir().join(format!(
            "flinks-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&root).expect("create the cluster folder");
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, PASSWORD).expect("write the password file");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&root)
                .status()
                .expect("chown");
            assert!(
                status.success(),
                "chown of {} to postgres failed",
                root.display()
            );
        }
        let cluster = PgCluster {
            port: free_port(),
            root,
            bin,
        };
        let data = cluster.root.join("data");
        let out = cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                path_str(&pwfile),
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.start_server();
        cluster
    }

    /// Starts (or restarts after [`PgCluster::stop`]) the server on the same
    /// port and data folder, waiting until it accepts connections. `fsync`
    /// is off (the OS keeps what a killed server wrote), but commits wait
    /// for their WAL write: an immediate stop must not lose them.
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -h 127.0.0.1 -k {} -c fsync=off -c full_page_writes=off -c max_connections=200",
            self.port,
            path_str(&self.root)
        );
        let log = self.root.join("server.log");
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.root.join("data")),
                "-o",
                &opts,
                "-l",
                path_str(&log),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server at once (an outage; `start_server` brings it back).
    pub fn stop(&self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.root.join("data")),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// Turns TLS on with `cert_pem`/`key_pem` and refuses plaintext host
    /// connections (`hostssl` only), then restarts the server.
    pub fn require_tls(&self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        let data = self.root.join("data");
        std::fs::write(data.join("server.crt"), cert_pem).expect("write server.crt");
        std::fs::write(data.join("server.key"), key_pem).expect("write server.key");
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod server.key");
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).expect("write postgresql.conf");
        let hba = data.join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        let text: String = text
            .lines()
            .map(|l| match l.strip_prefix("host ") {
                Some(rest) => format!("hostssl {rest}\n"),
                None => format!("{l}\n"),
            })
            .collect();
        std::fs::write(&hba, text).expect("write pg_hba.conf");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .expect("chown");
            assert!(status.success(), "chown of {} failed", data.display());
        }
        self.stop();
        self.start_server();
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `db` (with the superuser's password).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// Creates database `db`.
    pub fn create_database(&self, db: &str) {
        let out = self.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                db,
            ],
        );
        assert!(
            out.status.success(),
            "createdb {db} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs one of the cluster's binaries, as `postgres` when we are root.
    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .env("PGPASSWORD", PASSWORD)
            .current_dir(&self.root)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
    }
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
