//! Stateless bench users ([`SandboxOptions::bench_users`]): `u0..u{N-1}`,
//! whose refresh tokens and access tokens the sandbox recognises by their
//! form (a keyed tag), with no per-user state. A bench can then seal a
//! million of them straight into a store ([`refresh_token`],
//! [`access_token`]; `flinks-proxy bench-rows`, `benches/scale.sh`)
//! instead of a million code exchanges, and a proxy's first request for
//! any of them works as it would against Flinks: the stored access token
//! is accepted until its `exp`, the refresh token always (Flinks does not
//! rotate). They have no accounts and cannot be revoked.
//!
//! The tag key is a constant: the sandbox is not a security component.

use ring::hmac;
use serde_json::{json, Value};

use super::token::Grant;
use super::{Params, SandboxOptions, Shared};
use crate::ground::crypto::hex;
use crate::ground::unix_now;

/// Keys the tags (not a secret: anyone may mint sandbox bench tokens).
const TAG_KEY: &[u8] = b"flinks-proxy sandbox bench users";
/// What bench access tokens end with before their tag.
const SIGNATURE_PREFIX: &str = "bench-";

fn tag(what: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, TAG_KEY);
    hex(&hmac::sign(&key, what.as_bytes()).as_ref()[..12])
}

/// Bench user `i`'s refresh token: `brt-u<i>-<tag>`.
pub fn refresh_token(i: u64) -> String {
    let sub = format!("u{i}");
    let t = tag(&format!("refresh:{sub}"));
    format!("brt-{sub}-{t}")
}

/// An access token of `sub` for `client_id`, valid until `exp` (Unix
/// seconds): JWT-shaped like the sandbox's others, its signature a tag.
pub fn access_token(client_id: &str, sub: &str, exp: u64, jti: &str) -> String {
    let signed = super::token::unsigned_jwt(client_id, sub, exp, exp.saturating_sub(300), jti);
    let t = tag(&signed);
    format!("{signed}.{SIGNATURE_PREFIX}{t}")
}

/// Whether `sub` is `u<i>` with `i < users`.
fn is_user(users: u64, sub: &str) -> bool {
    let digits = sub.strip_prefix('u').unwrap_or("");
    !digits.starts_with('+') && digits.parse::<u64>().is_ok_and(|i| i < users)
}

/// For a token the sandbox did not record: `Some(true)` for a live bench
/// access token, `Some(false)` for an expired one, `None` for anything
/// else.
pub(super) fn check(opts: &SandboxOptions, token: &str) -> Option<bool> {
    if opts.bench_users == 0 {
        return None;
    }
    let (signed, t) = token.rsplit_once('.')?;
    if t.strip_prefix(SIGNATURE_PREFIX)? != tag(signed) {
        return None;
    }
    let claims = crate::sandbox::decode_jwt_claims(token)?;
    if !is_user(opts.bench_users, claims["sub"].as_str()?) {
        return None;
    }
    Some(unix_now() < claims["exp"].as_u64()?)
}

impl Shared {
    /// A refresh grant presenting a bench user's refresh token: a new
    /// bench access token (the configured lifetime) and the same refresh
    /// token. `None` when it is not one.
    pub(super) fn issue_for_bench_user(&self, grant: Grant, params: &Params) -> Option<Value> {
        let opts = &self.opts;
        if opts.bench_users == 0 || !matches!(grant, Grant::RefreshToken) {
            return None;
        }
        let presented = params.get("refresh_token")?;
        let sub = presented.strip_prefix("brt-")?.rsplit_once('-')?.0;
        let i: u64 = sub.strip_prefix('u')?.parse().ok()?;
        if i >= opts.bench_users || *presented != refresh_token(i) {
            return None;
        }
        let lifetime = opts.expires_in.unwrap_or(opts.jwt_lifetime.as_secs());
        let jti = self.unique_id();
        let access = access_token(&opts.client_id, sub, unix_now() + lifetime, &jti);
        Some(json!({
            "access_token": access,
            "token_type": "Bearer",
            "scope": opts.scope,
            "expires_in": lifetime,
            "refresh_token": presented,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(users: u64) -> SandboxOptions {
        SandboxOptions {
            bench_users: users,
            ..SandboxOptions::default()
        }
    }

    #[test]
    fn access_tokens_are_known_by_their_tag_until_they_expire() {
        let live = access_token("demo-client", "u7", unix_now() + 60, "j");
        let dead = access_token("demo-client", "u7", unix_now() - 1, "j");
        assert_eq!(check(&opts(10), &live), Some(true));
        assert_eq!(check(&opts(10), &dead), Some(false));
        assert_eq!(check(&opts(0), &live), None, "only with bench users");
        assert_eq!(check(&opts(7), &live), None, "u7 is not among u0..u6");
        let forged = live.replace(".bench-", ".bench-0");
        assert_eq!(check(&opts(10), &forged), None);
    }

    #[test]
    fn refresh_tokens_are_per_user_and_stable() {
        assert_eq!(refresh_token(3), refresh_token(3));
        assert_ne!(refresh_token(3), refresh_token(4));
        assert!(refresh_token(3).starts_with("brt-u3-"));
        assert!(is_user(5, "u4") && !is_user(5, "u5") && !is_user(5, "u+1"));
    }
}
