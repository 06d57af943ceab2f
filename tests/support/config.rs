//! proxy.toml for tests.

use flinks_proxy::sandbox::{Sandbox, SandboxOptions};

/// The `[credentials.flinks]` table for a sandbox (client_credentials, JSON).
pub fn credential_toml(sb: &Sandbox) -> String {
    let o = SandboxOptions::default();
    format!(
        r#"
[credentials.flinks]
token_url = "{}"
grant_type = "client_credentials"
client_id = "{}"
client_secret = "{}"
scope = "client:admin"
token_timeout = "2s"
"#,
        sb.token_url(),
        o.client_id,
        o.client_secret
    )
}

/// A complete config: listeners on port 0, the sandbox credential, one
/// route `/` to the sandbox API, plus `extra` TOML appended.
pub fn config_toml(sb: &Sandbox, extra: &str) -> String {
    config_toml_with_server(sb, "", extra)
}

/// Like [`config_toml`], with `server` lines added to `[server]`.
pub fn config_toml_with_server(sb: &Sandbox, server: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "5s"
{server}
[admin]
listen = "127.0.0.1:0"
{cred}
[routes.flinks]
path_prefix = "/"
upstream = "{api}"
credential = "flinks"
{extra}
"#,
        cred = credential_toml(sb),
        api = sb.api_url(),
    )
}
