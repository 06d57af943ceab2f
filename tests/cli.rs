//! The real binary: config errors (SPEC §2, §3), `check`, and secrets that
//! must never reach the logs or `/status` (SPEC §4).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use flinks_proxy::sandbox::SandboxOptions;
use http::Request;
use http_body_util::Full;
use support::*;

/// Exit code of a config that cannot be used.
const EXIT_BAD_CONFIG: i32 = 64;
const SECRET_VAR: &str = "FLINKS_PROXY_CLI_TEST_SECRET";
const SECRET: &str = "cli-secret-5f0c2a9e71";

/// A valid config (nothing listens at the URLs: `check` does not connect);
/// the client secret comes from `SECRET_VAR`.
fn good_config() -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[credentials.flinks]
token_url = "http://127.0.0.1:9/api/v1/token"
grant_type = "client_credentials"
client_id = "cli-client-id"
client_secret = {{ env = "{SECRET_VAR}" }}
scope = "client:admin"
[routes.accounts]
path_prefix = "/api"
upstream = "http://127.0.0.1:9/base"
credential = "flinks"
"#
    )
}

/// `good_config` with one line replaced.
fn config_with(from: &str, to: &str) -> String {
    let good = good_config();
    assert!(good.contains(from), "{from:?} not in the config");
    good.replacen(from, to, 1)
}

/// Runs the proxy on `toml`, expects it to refuse to start with exit code
/// 64 and one line `error: FILE[:LINE]: KEY: ...` that names `key` and `detail`.
fn assert_refused(toml: &str, envs: &[(&str, &str)], key: &str, detail: &str) {
    let dir = TempDir::new();
    let path = dir.write("proxy.toml", toml);
    let path_s = path.display().to_string();
    let (code, stdout, stderr) = run_binary(&["--config", &path_s], envs);
    assert_eq!(code, EXIT_BAD_CONFIG, "stdout {stdout}\nstderr {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    let line = lines[0];
    assert!(
        line.starts_with(&format!("error: {path_s}")),
        "names the file: {line}"
    );
    assert!(line.contains(&format!(": {key}: ")), "names {key}: {line}");
    assert!(line.contains(detail), "says {detail:?}: {line}");
    assert!(!line.contains(SECRET), "{line}");
}

#[test]
fn unknown_key_is_refused_naming_it() {
    let toml = config_with("scope = ", "scopes = ");
    let key = "credentials.flinks.scopes";
    assert_refused(&toml, &[(SECRET_VAR, SECRET)], key, "unknown field");
    let toml = config_with("[server]\n", "[server]\nlisten_on = \"127.0.0.1:0\"\n");
    assert_refused(
        &toml,
        &[(SECRET_VAR, SECRET)],
        "server.listen_on",
        "unknown field",
    );
}

#[test]
fn missing_environment_variable_is_refused_naming_the_key() {
    let key = "credentials.flinks.client_secret";
    assert_refused(&good_config(), &[], key, SECRET_VAR);
}

#[test]
fn route_naming_a_missing_credential_is_refused() {
    let toml = config_with("credential = \"flinks\"", "credential = \"flink\"");
    let key = "routes.accounts.credential";
    assert_refused(&toml, &[(SECRET_VAR, SECRET)], key, "flink");
}

#[test]
fn bad_urls_are_refused_naming_the_key() {
    let envs = [(SECRET_VAR, SECRET)];
    let upstream = "upstream = \"http://127.0.0.1:9/base\"";
    let toml = config_with(upstream, "upstream = \"not a url\"");
    assert_refused(&toml, &envs, "routes.accounts.upstream", "not a url");
    let toml = config_with(upstream, "upstream = \"ftp://files.example\"");
    assert_refused(&toml, &envs, "routes.accounts.upstream", "ftp");
    let token_url = "token_url = \"http://127.0.0.1:9/api/v1/token\"";
    let toml = config_with(token_url, "token_url = \"/api/v1/token\"");
    assert_refused(
        &toml,
        &envs,
        "credentials.flinks.token_url",
        "/api/v1/token",
    );
}

#[test]
fn check_prints_routes_and_credentials_but_never_the_secret() {
    let dir = TempDir::new();
    let path = dir.write("proxy.toml", good_config());
    let path = path.display().to_string();
    let (code, stdout, stderr) = run_binary(&["check", "--config", &path], &[(SECRET_VAR, SECRET)]);
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    for needle in [
        "flinks",
        "client_credentials",
        "http://127.0.0.1:9/api/v1/token",
        "cli-client-id",
        "accounts",
        "/api",
        "http://127.0.0.1:9/base",
    ] {
        assert!(
            stdout.contains(needle),
            "check does not show {needle:?}:\n{stdout}"
        );
    }
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
}

#[test]
fn check_exits_1_on_a_bad_config() {
    let dir = TempDir::new();
    let toml = config_with("credential = \"flinks\"", "credential = \"nope\"");
    let path = dir.write("proxy.toml", toml).display().to_string();
    let (code, stdout, stderr) = run_binary(&["check", "--config", &path], &[(SECRET_VAR, SECRET)]);
    assert_eq!(code, 1, "stdout {stdout}\nstderr {stderr}");
    assert!(stderr.contains("routes.accounts.credential"), "{stderr}");
    let (code, _, stderr) = run_binary(
        &[
            "check",
            "--config",
            &dir.join("absent.toml").display().to_string(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
}

/// The names in `{ env = "NAME" }` anywhere in a config text.
fn env_names(toml: &str) -> Vec<String> {
    toml.split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name.to_owned()))
        .collect()
}

#[test]
fn shipped_proxy_toml_passes_check_with_its_variables_set() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("SKIPPED: {} does not exist yet", path.display());
        return;
    };
    let names = env_names(&text);
    assert!(
        !names.is_empty(),
        "the example should take its secret from the environment"
    );
    let envs: Vec<(&str, &str)> = names
        .iter()
        .map(|n| (n.as_str(), "example-value"))
        .collect();
    let path = path.display().to_string();
    let (code, stdout, stderr) = run_binary(&["check", "--config", &path], &envs);
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    assert!(stdout.contains("routes:"), "{stdout}");
    assert!(!stdout.contains("example-value"), "{stdout}");
    // Without its variables it is refused, naming one.
    let (code, _, stderr) = run_binary(&["check", "--config", &path], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        names.iter().any(|n| stderr.contains(n.as_str())),
        "{stderr}"
    );
}

// --------------------------------------------------------------- secrets

#[test]
fn token_client_secret_and_api_key_never_appear_in_debug_logs_or_status() {
    const API_KEY_VAR: &str = "FLINKS_PROXY_CLI_TEST_API_KEY";
    const API_KEY: &str = "cli-api-key-93be04d1c8";
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Short-lived tokens: the run includes renewals as well as a rejection.
    let opts = SandboxOptions {
        client_secret: SECRET.into(),
        expires_in: Some(2),
        ..Default::default()
    };
    let sb = rt.block_on(sandbox_with(opts.clone()));
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "10s"
[admin]
listen = "127.0.0.1:0"
[log]
level = "debug"
[access]
api_keys = [{{ env = "{API_KEY_VAR}" }}]
[credentials.flinks]
token_url = "{token_url}"
grant_type = "client_credentials"
client_id = "{client_id}"
client_secret = {{ env = "{SECRET_VAR}" }}
scope = "client:admin"
token_timeout = "5s"
[routes.flinks]
path_prefix = "/"
upstream = "{api}"
credential = "flinks"
"#,
        token_url = sb.token_url(),
        client_id = opts.client_id,
        api = sb.api_url(),
    );
    let dir = TempDir::new();
    let cfg = dir.write("proxy.toml", toml);
    let mut p = ProxyProcess::start(&cfg, &[(SECRET_VAR, SECRET), (API_KEY_VAR, API_KEY)]);

    let c = client();
    let request = |path: &str, key: Option<&str>| {
        let mut b = Request::get(p.url(path));
        if let Some(k) = key {
            b = b.header("proxy-authorization", format!("Bearer {k}"));
        }
        rt.block_on(send(&c, b.body(Full::default()).expect("request")))
    };
    for _ in 0..3 {
        let r = request("/api/v1/accounts", Some(API_KEY));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(request("/api/v1/accounts", None).status, 407);
    assert_eq!(request("/api/v1/accounts", Some("wrong-key")).status, 407);
    assert_eq!(request("/status/500", Some(API_KEY)).status, 500);
    // The upstream rejects the token: the proxy drops it, fetches another, replays.
    sb.revoke_access_tokens();
    assert_eq!(request("/v1/after-revoke", Some(API_KEY)).status, 200);
    // And a renewal ahead of expiry.
    let renewed = sb.token_requests() + 1;
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), sb.wait_for_token_requests(renewed)).await
    })
    .expect("a renewal within 20 s");
    assert_eq!(request("/api/v1/accounts", Some(API_KEY)).status, 200);

    let status = rt.block_on(get(&p.admin("/status")));
    assert_eq!(status.status, 200);
    let metrics = rt.block_on(get(&p.admin("/metrics")));
    assert_eq!(metrics.status, 200);

    // Stop it and read everything it logged, up to its last line.
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(20)), Some(0), "{}", p.log());
    let end = Instant::now() + Duration::from_secs(10);
    while !p.log().lines().any(|l| l.trim_end().ends_with(" stopped")) {
        assert!(Instant::now() < end, "no final log line:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = p.log();

    let mut tokens: Vec<String> = sb
        .recorded()
        .iter()
        .flat_map(|r| r.headers.clone())
        .filter(|(k, _)| k == "authorization")
        .filter_map(|(_, v)| v.strip_prefix("Bearer ").map(str::to_owned))
        .collect();
    tokens.sort();
    tokens.dedup();
    assert!(tokens.len() >= 2, "expected several tokens: {tokens:?}");
    // The log is worth searching: debug lines about requests and tokens.
    assert!(log.contains("token obtained"), "{log}");
    assert!(
        log.contains("407") && log.contains("/v1/after-revoke"),
        "{log}"
    );
    for (what, text) in [
        ("log", &log),
        ("/status", &status.text()),
        ("/metrics", &metrics.text()),
    ] {
        assert!(!text.contains(SECRET), "client secret in {what}");
        assert!(!text.contains(API_KEY), "API key in {what}");
        for t in &tokens {
            assert!(!text.contains(t.as_str()), "access token in {what}");
            // The claims part is unique to each token.
            let claims = t.split('.').nth(1).expect("JWT claims");
            assert!(!text.contains(claims), "access token claims in {what}");
        }
    }
}

#[test]
fn check_prints_the_effective_server_settings() {
    let dir = TempDir::new();
    let toml = config_with(
        "listen = \"127.0.0.1:0\"\n[admin]",
        "listen = \"127.0.0.1:0\"\nidle_timeout = \"45s\"\nreplay_buffer_limit = \"1MiB\"\nmax_connections = 77\n[admin]",
    );
    let path = dir.write("proxy.toml", toml).display().to_string();
    let (code, stdout, stderr) = run_binary(&["check", "--config", &path], &[(SECRET_VAR, SECRET)]);
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    for needle in [
        "request_timeout 30s",
        "header_read_timeout 10s",
        "idle_timeout 45s",
        "shutdown_grace 30s",
        "max_connections 77",
        "replay_buffer_limit 1MiB",
        "workers one per core",
    ] {
        assert!(
            stdout.contains(needle),
            "check does not show {needle:?}:\n{stdout}"
        );
    }
}

#[test]
fn a_host_name_as_listen_address_is_refused_asking_for_ip_port() {
    assert_refused(
        &config_with("listen = \"127.0.0.1:0\"", "listen = \"localhost:8080\""),
        &[(SECRET_VAR, SECRET)],
        "server.listen",
        "expected an ip:port",
    );
}

#[test]
fn demo_has_no_config_flag() {
    let (code, _, stderr) = run_binary(&["demo", "--config", "x.toml"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--config"), "{stderr}");
    let (code, _, stderr) = run_binary(&["--config", "x.toml", "demo"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--config is not used"), "{stderr}");
}

#[tokio::test]
async fn demo_prints_the_sandbox_users_and_redirect_uri_and_status_names_the_built_in_config() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(binary())
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .env_remove("FLINKS_PROXY_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let stdout = child.stdout.take().expect("stdout");
    // The banner, up to its last line; read off the thread pool.
    let banner = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let last = l.starts_with("Ctrl-C");
            lines.push(l);
            if last {
                break;
            }
        }
        lines
    });
    let banner = tokio::time::timeout(Duration::from_secs(30), banner).await;
    let banner = banner.ok().and_then(|r| r.ok()).unwrap_or_default();
    let admin = banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("admin").map(|a| a.trim().to_owned()));
    let status = match &admin {
        Some(a) => Some(get(&format!("{a}/status")).await),
        None => None,
    };
    let _ = child.kill();
    let _ = child.wait();
    let text = banner.join("\n");
    let status = status.unwrap_or_else(|| panic!("no admin address in:\n{text}"));
    assert_eq!(status.status, 200, "{}", status.text());
    assert_eq!(status.json()["config"], "(built-in demo)");
    // What a first pool config of one's own against the sandbox needs.
    let o = SandboxOptions::default();
    let line = |prefix: &str| {
        banner
            .iter()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{text}"))
            .clone()
    };
    assert!(
        line("redirect_uri").contains(&format!("\"{}\"", o.redirect_uri)),
        "{text}"
    );
    let users = line("users");
    assert!(users.contains("alice, bob"), "{users}");
    assert!(users.contains("code-alice, code-bob"), "{users}");
    let client = line("client ");
    assert!(
        client.contains(&o.client_id) && client.contains(&o.client_secret),
        "{client}"
    );
    assert!(
        line("a new code").contains("/sandbox/users/USER/code"),
        "{text}"
    );
}

/// A config whose secret variable is not set: only `[admin] listen` matters
/// to `healthcheck`.
fn config_for_healthcheck(admin: std::net::SocketAddr) -> String {
    config_with(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{admin}\""),
    )
}

#[tokio::test]
async fn healthcheck_needs_only_the_admin_address_or_a_url() {
    let sb = sandbox().await;
    let p = start_proxy(&ProxyToml::sandbox(&sb).toml()).await;
    let admin = p.admin_addr().expect("admin listener");
    let dir = TempDir::new();
    let path = dir
        .write("proxy.toml", config_for_healthcheck(admin))
        .display()
        .to_string();
    let url = admin_url(&p, "/healthz");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/healthz", l.local_addr().expect("addr"))
    };
    // The binary is run off the runtime that serves the proxy.
    let down_url = closed.clone();
    let results = tokio::task::spawn_blocking(move || {
        [
            run_binary(&["healthcheck", "--config", &path], &[]),
            run_binary(&["healthcheck", "--url", &url], &[]),
            run_binary(&["healthcheck", "--url", &down_url], &[]),
        ]
    })
    .await
    .expect("healthchecks ran");
    let [by_file, by_url, down] = results;
    assert_eq!(by_file.0, 0, "{by_file:?}");
    assert_eq!(by_url.0, 0, "{by_url:?}");
    assert_eq!(down.0, 1, "{down:?}");
    assert!(down.2.contains(&closed), "{down:?}");
}

/// Issue 15: `check` on a config with a `[store]` and a pool builds the
/// runtime over the store opened read-only: before the store exists (it
/// says so and creates nothing), against the store (the key is checked
/// against its canary), and with another key (refused, naming the key ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_works_with_a_store_and_checks_its_key_without_writing() {
    use support::connections::new_key;
    let sb = sandbox().await;
    let dir = TempDir::new();
    let db = dir.join("c.db");
    let key = new_key();
    let path = dir.write("proxy.toml", ProxyToml::pool(&sb, &db, &key).toml());
    let path_s = path.to_str().unwrap();
    let run = || tokio::task::block_in_place(|| run_binary(&["check", "--config", path_s], &[]));

    let (code, stdout, stderr) = run();
    assert_eq!(code, 0, "before the store exists: {stdout}{stderr}");
    assert!(stdout.contains("store   sqlite"), "{stdout}");
    assert!(stdout.contains("creates it at its first start"), "{stdout}");
    assert!(!db.exists(), "check created the store file");

    // The store made by another process (`store rekey` creates it), which
    // exits: its connections are closed and the file settled (an in-process
    // store's last checkpoint can land just after `close` returns).
    let (code, stdout, stderr) =
        tokio::task::block_in_place(|| run_binary(&["store", "rekey", "--config", path_s], &[]));
    assert_eq!(code, 0, "store rekey creates the store: {stdout}{stderr}");
    let wal = dir.join("c.db-wal");
    let files = || {
        (
            std::fs::metadata(&db).unwrap().modified().unwrap(),
            std::fs::read(&db).unwrap(),
            std::fs::read(&wal).unwrap_or_default(),
        )
    };
    let before = files();
    let (code, stdout, stderr) = run();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("matches the store"), "{stdout}");
    let after = files();
    assert!(
        after == before,
        "check wrote to the store or its write-ahead log"
    );

    let other = dir.write("other.toml", ProxyToml::pool(&sb, &db, &new_key()).toml());
    let (code, stdout, stderr) = tokio::task::block_in_place(|| {
        run_binary(&["check", "--config", other.to_str().unwrap()], &[])
    });
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("store key does not match"), "{stderr}");
    assert!(!stderr.contains(&key), "no key material in the error");
}

#[test]
fn a_busy_listen_port_is_one_error_and_exit_64() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr");
    let toml = config_with("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    let dir = TempDir::new();
    let path = dir.write("proxy.toml", toml).display().to_string();
    let (code, stdout, stderr) = run_binary(&["--config", &path], &[(SECRET_VAR, SECRET)]);
    assert_eq!(code, EXIT_BAD_CONFIG, "stdout {stdout}\nstderr {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(&addr.to_string()))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    assert!(errors[0].contains("cannot listen on"), "{stderr}");
    assert!(errors[0].contains("server.listen"), "{stderr}");
    drop(busy);
}

#[test]
fn check_warns_about_a_config_without_routes() {
    let good = good_config();
    let routes = good.find("[routes.accounts]").expect("a route table");
    let dir = TempDir::new();
    let path = dir
        .write("proxy.toml", &good[..routes])
        .display()
        .to_string();
    let (code, stdout, stderr) = run_binary(&["check", "--config", &path], &[(SECRET_VAR, SECRET)]);
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    assert!(stdout.contains(": OK"), "{stdout}");
    assert!(
        stderr.starts_with("warning: ") && stderr.contains("no [routes.*]"),
        "{stderr}"
    );
    // With its route, no warning.
    let path = dir.write("routed.toml", good).display().to_string();
    let (code, _, stderr) = run_binary(&["check", "--config", &path], &[(SECRET_VAR, SECRET)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn check_prints_sizes_as_a_config_writes_them() {
    let dir = TempDir::new();
    let path = dir.write("proxy.toml", good_config()).display().to_string();
    let (code, stdout, stderr) = run_binary(&["check", "--config", &path], &[(SECRET_VAR, SECRET)]);
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    assert!(stdout.contains("replay_buffer_limit 64MiB,"), "{stdout}");
    assert!(!stdout.contains("bytes"), "{stdout}");
}

#[tokio::test]
async fn connections_list_says_when_a_pool_has_none() {
    use support::connections::{connect, new_key, users_sandbox};
    let sb = users_sandbox(3600, false).await;
    let dir = TempDir::new();
    let toml = ProxyToml::pool(&sb, &dir.join("connections.db"), &new_key()).toml();
    let cfg = dir.write("proxy.toml", &toml).display().to_string();
    // The running proxy creates the store; the CLI reads it beside it.
    let p = start_proxy(&toml).await;
    let list = |cfg: String| {
        tokio::task::spawn_blocking(move || {
            run_binary(&["connections", "list", "--config", &cfg], &[])
        })
    };
    let (code, stdout, stderr) = list(cfg.clone()).await.expect("list ran");
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    assert_eq!(stdout, "", "{stdout}");
    assert!(stderr.contains("no connections in pool users"), "{stderr}");
    connect(&p, "alice").await;
    let (code, stdout, stderr) = list(cfg).await.expect("list ran");
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    assert!(stdout.starts_with("users\talice\tactive"), "{stdout}");
    assert!(!stderr.contains("no connections"), "{stderr}");
}

/// Issue 19: `keygen --client-key` prints a PKCS#8 key and its public JWK
/// (`kid` = the RFC 7638 thumbprint); `check` on a `private_key_jwt`
/// credential using that key (from a file) prints the method, key id and
/// the same thumbprint, and never the key.
#[test]
fn keygen_client_key_and_check_print_the_thumbprint_never_the_key() {
    let (code, stdout, stderr) = run_binary(&["keygen", "--client-key"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let end = "-----END PRIVATE KEY-----\n";
    let split = stdout.find(end).expect("a PEM private key") + end.len();
    let (pem, jwks) = stdout.split_at(split);
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    let jwks: serde_json::Value = serde_json::from_str(jwks).expect("a JWK set");
    let jwk = &jwks["keys"][0];
    assert_eq!(jwk["kty"], "EC", "{jwk}");
    assert_eq!(jwk["crv"], "P-256", "{jwk}");
    assert_eq!(jwk["alg"], "ES256", "{jwk}");
    assert_eq!(jwk["use"], "sig", "{jwk}");
    assert!(jwk.get("d").is_none(), "no private part: {jwk}");
    let thumbprint = jwk["kid"].as_str().expect("kid").to_owned();
    assert_eq!(thumbprint.len(), 43, "base64url SHA-256: {jwk}");

    let dir = TempDir::new();
    let key_file = dir.write("client.key", pem);
    let toml = config_with(
        "client_secret = { env = \"FLINKS_PROXY_CLI_TEST_SECRET\" }",
        &format!(
            "client_auth = \"private_key_jwt\"\nclient_key = {{ file = \"{}\" }}\nclient_key_id = \"key-2026\"",
            key_file.display()
        ),
    );
    let path = dir.write("proxy.toml", toml);
    let path = path.display().to_string();
    let (code, stdout, stderr) = run_binary(&["check", "--config", &path], &[]);
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    for needle in [
        "private_key_jwt",
        "EC P-256",
        "ES256",
        "kid key-2026",
        &thumbprint,
    ] {
        assert!(
            stdout.contains(needle),
            "check does not show {needle:?}:\n{stdout}"
        );
    }
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !stdout.contains(line) && !stderr.contains(line),
            "key material shown:\n{stdout}"
        );
    }

    let (code, _, stderr) = run_binary(&["keygen", "--client-key", "--alg", "PS256"], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("openssl genpkey"), "{stderr}");
}

/// Issue 19: `keygen --dpop [--alg EdDSA]` prints a PKCS#8 key, its public
/// JWK and thumbprint (`jkt`), and the key loads as a `dpop_key`: `check`
/// prints the same thumbprint and no key material.
#[test]
fn keygen_dpop_prints_a_key_whose_thumbprint_check_shows() {
    let (code, stdout, stderr) = run_binary(&["keygen", "--dpop", "--alg", "EdDSA"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let end = "-----END PRIVATE KEY-----\n";
    let split = stdout.find(end).expect("a PEM private key") + end.len();
    let (pem, public) = stdout.split_at(split);
    let public: serde_json::Value = serde_json::from_str(public).expect("JSON");
    assert_eq!(public["jwk"]["kty"], "OKP", "{public}");
    assert_eq!(public["jwk"]["crv"], "Ed25519", "{public}");
    assert!(
        public["jwk"].get("d").is_none(),
        "no private part: {public}"
    );
    let jkt = public["jkt"].as_str().expect("jkt").to_owned();
    assert_eq!(
        jkt,
        flinks_proxy::ground::jose::SigningKey::from_pem(pem, None)
            .unwrap()
            .thumbprint()
    );

    let dir = TempDir::new();
    let key_file = dir.write("dpop.key", pem);
    let toml = config_with(
        "client_secret = { env = \"FLINKS_PROXY_CLI_TEST_SECRET\" }",
        &format!(
            "dpop = true\ndpop_key = {{ file = \"{}\" }}",
            key_file.display()
        ),
    );
    let path = dir.write("proxy.toml", toml);
    let (code, stdout, stderr) = run_binary(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    assert!(
        stdout.contains(&format!("dpop: Ed25519 key (EdDSA), JWK thumbprint {jkt}")),
        "{stdout}"
    );
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!stdout.contains(line) && !stderr.contains(line), "{stdout}");
    }
    let (code, _, stderr) = run_binary(&["keygen", "--alg", "EdDSA"], &[]);
    assert_ne!(code, 0, "--alg needs --client-key or --dpop");
    assert!(stderr.contains("--alg"), "{stderr}");
}

#[test]
fn a_bad_client_key_file_stops_the_proxy_naming_the_key() {
    let dir = TempDir::new();
    let key_file = dir.write(
        "client.key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let toml = config_with(
        "client_secret = { env = \"FLINKS_PROXY_CLI_TEST_SECRET\" }",
        &format!(
            "client_auth = \"private_key_jwt\"\nclient_key = {{ file = \"{}\" }}",
            key_file.display()
        ),
    );
    assert_refused(&toml, &[], "credentials.flinks.client_key", "PKCS#8");
}
