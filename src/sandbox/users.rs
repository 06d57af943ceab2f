//! The sandbox bank's end users ([`SandboxOptions::users`]): their codes
//! and refresh tokens (each user's own, rotating like the single-user
//! one), consent and its revocation, the retired refresh tokens a reuse is
//! detected by, per-user counters, and the admin endpoints the demo's curl
//! lines call (`POST /sandbox/users/{sub}/revoke|code`). The consent
//! page's codes are `authorize.rs`'s; the tokens they give are made here.

use std::collections::{HashMap, VecDeque};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};

use super::server::{error_json, json_response};
use super::token::{Grant, MAX_TOKENS};
use super::{bump, lock, Body, Counters, Params, RefreshReuse, Shared, RECORD_CAPACITY};
#[cfg(doc)]
use super::{Sandbox, SandboxOptions};

/// Rotated-away refresh tokens remembered for [`Sandbox::reused_refresh_tokens`];
/// past it the memory starts over (benches only get there).
const RETIRED_CAPACITY: usize = 100_000;

/// Per-user grants: codes, refresh tokens, consent, and whose each access
/// token is.
#[derive(Default)]
pub(super) struct Users {
    /// Unused codes -> sub.
    pub(super) codes: HashMap<String, String>,
    /// Live refresh tokens -> sub.
    pub(super) refresh: HashMap<String, String>,
    /// Access tokens -> sub.
    pub(super) tokens: HashMap<String, String>,
    /// Subs whose consent is revoked.
    pub(super) revoked: std::collections::HashSet<String>,
    /// Token requests per sub.
    pub(super) requests: HashMap<String, u64>,
    /// Token requests per sub being handled now.
    pub(super) in_flight: HashMap<String, u64>,
    /// The most token requests ever handled at once for one sub.
    pub(super) max_in_flight: u64,
    /// Refresh tokens a rotation retired -> (sub, when).
    pub(super) retired: HashMap<String, (String, Instant)>,
    /// Presentations of retired refresh tokens (the last 1000).
    pub(super) reuses: VecDeque<RefreshReuse>,
    /// When each sub's refresh token was last rotated.
    pub(super) last_rotation: HashMap<String, Instant>,
    /// Per-sub token lifetimes ([`Sandbox::set_user_token_lifetime`]).
    pub(super) lifetimes: HashMap<String, Duration>,
}

impl Users {
    /// Counts a refresh grant presenting a token a rotation retired.
    pub(super) fn note_presentation(&mut self, n: &Counters, params: &Params) {
        if params.get("grant_type").map(String::as_str) != Some("refresh_token") {
            return;
        }
        let retired = params
            .get("refresh_token")
            .and_then(|rt| self.retired.get(rt));
        let Some((sub, rotated_at)) = retired.cloned() else {
            return;
        };
        bump(&n.reused);
        if self.reuses.len() >= RECORD_CAPACITY {
            self.reuses.pop_front();
        }
        self.reuses.push_back(RefreshReuse {
            sub,
            rotated_at,
            presented_at: Instant::now(),
        });
    }

    /// Retires `old` (rotated away from `sub` now).
    fn retire(&mut self, old: String, sub: &str) {
        if self.retired.len() >= RETIRED_CAPACITY {
            self.retired.clear();
        }
        let now = Instant::now();
        self.retired.insert(old, (sub.to_owned(), now));
        self.last_rotation.insert(sub.to_owned(), now);
    }
}

/// Counts a token request for one user while it is handled.
pub(super) struct UserFlight<'a> {
    shared: &'a Shared,
    sub: Option<String>,
}

impl<'a> UserFlight<'a> {
    /// The sub whose code or refresh token `params` presents, if any.
    pub(super) fn enter(shared: &'a Shared, params: Option<&Params>) -> UserFlight<'a> {
        let mut users = lock(&shared.users);
        let sub = params.and_then(|p| {
            p.get("refresh_token")
                .and_then(|rt| users.refresh.get(rt))
                .or_else(|| p.get("code").and_then(|c| users.codes.get(c)))
                .cloned()
        });
        if let Some(sub) = &sub {
            let n = users.in_flight.entry(sub.clone()).or_default();
            *n += 1;
            let n = *n;
            users.max_in_flight = users.max_in_flight.max(n);
        }
        UserFlight { shared, sub }
    }
}

impl Drop for UserFlight<'_> {
    fn drop(&mut self) {
        if let Some(sub) = &self.sub {
            if let Some(n) = lock(&self.shared.users).in_flight.get_mut(sub) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl Shared {
    /// A grant for one of [`SandboxOptions::users`]: `None` when the code
    /// or refresh token is not a user's (the single-user grants apply).
    pub(super) fn issue_for_user(
        &self,
        grant: Grant,
        params: &Params,
    ) -> Option<Result<Value, &'static str>> {
        let mut users = lock(&self.users);
        let (sub, refresh_token) = match grant {
            Grant::ClientCredentials => return None,
            Grant::AuthorizationCode => {
                let sub = users.codes.remove(params.get("code")?)?;
                if params.get("redirect_uri") != Some(&self.opts.redirect_uri) {
                    return Some(Err(
                        "The redirect_uri does not match the authorization request",
                    ));
                }
                let rt = self.consent_again(&mut users, &sub);
                (sub, rt)
            }
            Grant::RefreshToken => {
                let presented = params.get("refresh_token")?;
                let sub = users.refresh.get(presented)?.clone();
                if users.revoked.contains(&sub) {
                    return Some(Err("The refresh token is invalid or has been revoked"));
                }
                let rt = if self.opts.rotate_refresh_tokens {
                    users.refresh.remove(presented);
                    users.retire(presented.clone(), &sub);
                    let rt = format!("rt-{sub}-{}", self.unique_id());
                    users.refresh.insert(rt.clone(), sub.clone());
                    rt
                } else {
                    presented.clone()
                };
                (sub, rt)
            }
        };
        Some(Ok(self.mint_user(users, sub, refresh_token)))
    }

    /// Tokens for `sub` from a code of the consent page (`authorize.rs`):
    /// a new authorization, as for the users' other codes.
    pub(super) fn issue_consented(&self, sub: &str) -> Value {
        let mut users = lock(&self.users);
        let refresh_token = self.consent_again(&mut users, sub);
        self.mint_user(users, sub.to_owned(), refresh_token)
    }

    /// A new authorization of `sub`: their consent back (if revoked) and a
    /// new refresh token of their own.
    fn consent_again(&self, users: &mut Users, sub: &str) -> String {
        users.revoked.remove(sub);
        let rt = format!("rt-{sub}-{}", self.unique_id());
        users.refresh.insert(rt.clone(), sub.to_owned());
        rt
    }

    /// Mints an access token of `sub` (their own lifetime, if set) that the
    /// API knows as theirs, counting the request.
    fn mint_user(&self, mut users: MutexGuard<'_, Users>, sub: String, rt: String) -> Value {
        *users.requests.entry(sub.clone()).or_default() += 1;
        let lifetime = users.lifetimes.get(&sub).copied();
        let body = self.mint_for(self.grants(), &sub, Some(rt), lifetime);
        if let Some(at) = body["access_token"].as_str() {
            if users.tokens.len() >= MAX_TOKENS {
                users.tokens.clear();
            }
            users.tokens.insert(at.to_owned(), sub);
        }
        body
    }

    pub(super) fn revoke_consent(&self, sub: &str) {
        lock(&self.users).revoked.insert(sub.to_owned());
    }

    pub(super) fn new_code(&self, sub: &str) -> String {
        let code = format!("code-{sub}-{}", self.unique_id());
        self.note_issued(&code);
        lock(&self.users).codes.insert(code.clone(), sub.to_owned());
        code
    }
}

/// `POST /sandbox/users/{sub}/revoke` (consent revoked) and
/// `POST /sandbox/users/{sub}/code` (a new code): for the demo's curl lines.
pub(super) fn user_admin(shared: &Shared, method: &Method, path: &str) -> Option<Response<Body>> {
    let rest = path.strip_prefix("/sandbox/users/")?;
    let (sub, action) = rest.split_once('/')?;
    if method != Method::POST || !shared.opts.users.iter().any(|u| u.sub == sub) {
        return Some(error_json(StatusCode::NOT_FOUND, "unknown_user"));
    }
    match action {
        "revoke" => {
            shared.revoke_consent(sub);
            Some(json_response(
                StatusCode::OK,
                &json!({"sub": sub, "consent": "revoked"}),
            ))
        }
        "code" => Some(json_response(
            StatusCode::OK,
            &json!({"code": shared.new_code(sub)}),
        )),
        _ => Some(error_json(StatusCode::NOT_FOUND, "not_found")),
    }
}
