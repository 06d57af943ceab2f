//! `flinks-proxy demo`: the sandbox token endpoint and API with the proxy in
//! front, on loopback, with a built-in config; and the hidden `sandbox`
//! command that runs only the sandbox (for benchmarks).

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::cli::{block_on, exit, init_logging};
use crate::config::{Config, LogFormat};
use crate::sandbox::{Sandbox, SandboxOptions, SandboxUser};

/// What `/status` and errors call the demo's config.
const DEMO_CONFIG: &str = "(built-in demo)";

/// Where the demo listens.
pub struct DemoAddrs<'a> {
    /// The proxy listener.
    pub listen: &'a str,
    /// The admin listener.
    pub admin: &'a str,
    /// The `[connect]` listener (browsers are sent to `http://` it).
    pub connect: &'a str,
}

/// Runs the demo until Ctrl-C.
pub fn demo(addrs: &DemoAddrs<'_>, expires_in: u64) -> ExitCode {
    init_logging("info", LogFormat::Text);
    exit(block_on(0, demo_inner(addrs, expires_in)))
}

/// The demo's proxy.toml: one credential route on the sandbox and one
/// per-user pool over an SQLite store at `db`.
fn demo_toml(
    addrs: &DemoAddrs<'_>,
    sandbox: &Sandbox,
    opts: &SandboxOptions,
    db: &Path,
    key: &str,
) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
[admin]
listen = "{admin}"
[connect]
listen = "{connect}"
public_url = "http://{connect}"
[credentials.flinks]
token_url = "{token_url}"
grant_type = "client_credentials"
client_id = "{client_id}"
client_secret = "{client_secret}"
scope = "{scope}"
[routes.flinks]
path_prefix = "/"
upstream = "{api}"
credential = "flinks"
[store]
url = "sqlite:{db}"
key = "{key}"
[connections.users]
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = "{client_secret}"
redirect_uri = "{redirect_uri}"
authorize_url = "{authorize_url}"
scope = "ACCOUNT_BASIC TRANSACTIONS"
[routes.fdx]
path_prefix = "/api/fdx"
upstream = "{api}"
connections = "users"
"#,
        listen = addrs.listen,
        admin = addrs.admin,
        connect = addrs.connect,
        authorize_url = sandbox.authorize_url(),
        db = db.display(),
        redirect_uri = opts.redirect_uri,
        token_url = sandbox.token_url(),
        client_id = opts.client_id,
        client_secret = opts.client_secret,
        scope = opts.scope,
        api = sandbox.api_url(),
    )
}

/// What the demo prints: where everything listens and what to try.
fn print_demo_guide(
    running: &crate::Running,
    sandbox: &Sandbox,
    opts: &SandboxOptions,
    folder: &Path,
) {
    let p = running.proxy_addr();
    println!();
    println!("flinks-proxy demo: a Flinks-like sandbox with the proxy in front.");
    println!("  token endpoint  {}", sandbox.token_url());
    println!(
        "  sandbox API     {}   (answers 401 without a valid token)",
        sandbox.api_url()
    );
    println!("  proxy           http://{p}");
    if let Some(a) = running.admin_addr() {
        println!("  admin           http://{a}");
    }
    println!();
    println!("Try (no credentials in these requests; the proxy adds the token):");
    println!("  curl -s http://{p}/api/v1/accounts");
    println!("  curl -s http://{p}/anything?x=1        # echoes what the API received, Authorization included");
    println!(
        "  curl -s {}/api/v1/accounts   # straight to the API: 401",
        sandbox.api_url()
    );
    if let Some(a) = running.admin_addr() {
        println!("  curl -s http://{a}/status");
        println!("  curl -s http://{a}/metrics | grep flinks_proxy_");
        println!();
        print_connections_walkthrough(p, a, sandbox, folder);
        println!();
        print_sandbox_bank(sandbox, opts);
    }
    println!();
}

/// A connect session of pool `users`: its link.
async fn connect_link(running: &crate::Running) -> anyhow::Result<crate::ground::secret::Secret> {
    let generation = running.state().generation.load_full();
    let connect = generation.config.connect.as_ref().context("[connect]")?;
    let pool = generation.pools.get("users").context("pool users")?;
    let request = crate::connections::connect::SessionRequest::default();
    Ok(pool.create_session(connect, request).await?.connect_url)
}

/// The hosted connect flow part of the guide, printed last so the link is
/// the first thing a newcomer sees.
fn print_connect_guide(running: &crate::Running, link: &str) {
    let p = running.proxy_addr();
    println!("Connect a user the way an app does (the hosted connect flow):");
    println!("  open this link to connect a user (one browser, 15 minutes):");
    println!("    {link}");
    println!(
        "  pick alice or bob on the sandbox bank's page and Approve, then read their accounts:"
    );
    println!("    curl -s -H 'X-Flinks-Connection: alice' http://{p}/api/fdx/5/accounts");
    if let Some(a) = running.admin_addr() {
        println!("  a new link (what an app calls):");
        println!("    curl -s -X POST http://{a}/connect-sessions/users -d '{{}}'");
    }
    println!();
}

/// The per-user connections part of the guide: connect, use, revoke and
/// authorize again, through the admin API at `a` and the proxy at `p`.
fn print_connections_walkthrough(p: SocketAddr, a: SocketAddr, sandbox: &Sandbox, folder: &Path) {
    println!("Per-user connections (store: {}):", folder.display());
    println!("  # connect two users with the codes their bank redirect gave the app");
    println!("  curl -s -X POST http://{a}/connections/users -d '{{\"code\": \"code-alice\"}}'");
    println!("  curl -s -X POST http://{a}/connections/users -d '{{\"code\": \"code-bob\"}}'");
    println!("  # read each one's accounts: name the user, the proxy adds their token");
    println!("  curl -s -H 'X-Flinks-Connection: alice' http://{p}/api/fdx/5/accounts");
    println!("  curl -s -H 'X-Flinks-Connection: bob' http://{p}/api/fdx/5/accounts");
    println!("  # alice revokes her consent at the bank");
    println!(
        "  curl -s -X POST {}/sandbox/users/alice/revoke",
        sandbox.api_url()
    );
    println!("  curl -s -H 'X-Flinks-Connection: alice' http://{p}/api/fdx/5/accounts   # 401 code 602, passed through");
    println!("  curl -s -H 'X-Flinks-Connection: alice' http://{p}/api/fdx/5/accounts   # 401 reauthorization_required");
    println!("  curl -s http://{a}/connections/users/alice");
    println!("  # she authorizes again: a new code for the same id");
    println!("  CODE=$(curl -s -X POST {}/sandbox/users/alice/code | sed 's/.*\"code\":\"\\([^\"]*\\)\".*/\\1/')", sandbox.api_url());
    println!("  curl -s -X POST http://{a}/connections/users -d \"{{\\\"code\\\": \\\"$CODE\\\", \\\"id\\\": \\\"alice\\\"}}\"");
}

/// The sandbox bank's settings, for a `[connections.*]` pool against it.
fn print_sandbox_bank(sandbox: &Sandbox, opts: &SandboxOptions) {
    println!("The sandbox bank, for a [connections.*] pool of your own against it:");
    println!("  token_url       {}", sandbox.token_url());
    println!(
        "  client          client_id \"{}\", client_secret \"{}\"",
        opts.client_id, opts.client_secret
    );
    println!(
        "  redirect_uri    \"{}\"   (a code exchange must repeat it exactly, else 422)",
        opts.redirect_uri
    );
    let users: Vec<&str> = opts.users.iter().map(|u| u.sub.as_str()).collect();
    println!(
        "  users (sub)     {}   (first codes: {}; each code works once)",
        users.join(", "),
        opts.users
            .iter()
            .map(|u| u.code.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  a new code      curl -s -X POST {}/sandbox/users/USER/code",
        sandbox.api_url()
    );
}

async fn demo_inner(addrs: &DemoAddrs<'_>, expires_in: u64) -> anyhow::Result<()> {
    let opts = SandboxOptions {
        expires_in: Some(expires_in),
        users: vec![SandboxUser::new("alice"), SandboxUser::new("bob")],
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::start(opts.clone())
        .await
        .context("starting the sandbox")?;
    // The per-user connections live in an SQLite store in a temporary
    // folder, sealed with a fresh key.
    let folder = std::env::temp_dir().join(format!("flinks-proxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&folder).context("demo folder")?;
    let key = crate::ground::crypto::generate_key().context("store key")?;
    let db = folder.join("connections.db");
    let toml = demo_toml(addrs, &sandbox, &opts, &db, &key);
    // Named for what it is: there is no file (shows in /status and errors).
    let config = Config::parse(&toml, Path::new(DEMO_CONFIG)).context("demo config")?;
    let running = crate::start(config).await.context("starting the proxy")?;
    let link = connect_link(&running).await.context("a connect link")?;
    print_demo_guide(&running, &sandbox, &opts, &folder);
    print_connect_guide(&running, link.expose());
    println!("Ctrl-C to stop.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    running.shutdown().await;
    drop(sandbox);
    let _ = std::fs::remove_dir_all(&folder);
    Ok(())
}

/// Runs only the sandbox until Ctrl-C, printing its two URLs.
pub fn sandbox(
    token_listen: &str,
    api_listen: &str,
    expires_in: u64,
    users: usize,
    bench_users: u64,
) -> ExitCode {
    init_logging("warn", LogFormat::Text);
    exit(block_on(1, async {
        let opts = SandboxOptions {
            expires_in: Some(expires_in),
            users: (0..users)
                .map(|i| SandboxUser::new(&format!("u{i}")))
                .collect(),
            bench_users,
            ..SandboxOptions::default()
        };
        let sb = Sandbox::start_on(opts, token_listen.parse()?, api_listen.parse()?).await?;
        println!("token_url {}", sb.token_url());
        println!("api_url {}", sb.api_url());
        tokio::signal::ctrl_c().await?;
        Ok(())
    }))
}
