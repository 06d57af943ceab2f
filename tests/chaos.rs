//! The fault-injection suite of issue 15: a seeded, reproducible,
//! time-bounded driver of the real binary (one proxy on SQLite; two
//! replicas on a throwaway PostgreSQL) against a sandbox that rotates
//! refresh tokens with no reuse grace and 2 s access tokens, so refreshes
//! run all the time. Background load runs throughout; the steps, drawn from
//! the seed, interleave: request bursts (some clients leave early, the
//! proxy's own deadline is 1 s), a slow token endpoint (up to 1.8 s, under
//! the 3 s token_timeout), a failing one (5xx, hangs, invalid_client), 602
//! answers (consent revoked, once with a late 602 racing a
//! re-authorization), re-authorizations, deletes (admin API and CLI), CLI
//! reads, `store rekey`, reloads with a wrong then the right client_secret,
//! a PostgreSQL outage, and kill -9 with a restart.
//!
//! Invariants, after every step and at the end (endpoint healthy, right
//! secret, store up, up to 15 s for backoffs to clear):
//! 1. every connection nothing legitimately ended (a delete, a revocation
//!    since its last re-authorization) still serves: never 401/404 nor any
//!    other refusal after a step, and 200 at the end;
//! 2. the token endpoint never receives a refresh token a rotation retired;
//! 3. a deleted connection stops serving within 5 s + 1 s (never 200 after
//!    that; 404 `connection_not_found` at the end);
//! 4. no issued secret (nor the client secret, store key, API token or
//!    database password) appears in the output of any process, CLI runs
//!    included.
//!
//! kill -9: the sandbox rotates with no grace, so a kill between its
//! answer and the proxy's commit legitimately loses that user. Such users
//! are told apart exactly: a user whose current refresh token came from a
//! rotation within 3 s before the kill, or during a store outage (its
//! commit may still be pending), is "at risk"; it is not checked (1) until
//! the sandbox rotates its token again or it is re-authorized, and one
//! presentation of the token that rotation retired is not counted (2).
//!
//! `CHAOS_SEED=N` runs one seed, `CHAOS_STEPS=N` sets the steps per seed,
//! `CHAOS_DURATION=30m` runs random seeds until the time is up
//! (benches/chaos.sh).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flinks_proxy::sandbox::{FailureMode, Sandbox, SandboxOptions, SandboxUser, DELAY_HEADER};
use support::chaos::{admin, cli, get_as, leaked, Answer, ConfigFile, Proc, Rng};
use support::connections::{new_key, API_TOKEN};
use support::postgres::{PgCluster, PASSWORD};
use support::TempDir;

/// Users u0..u5; u5's tokens live [`LONG_LIVED`] (a deletion must not wait
/// for its token to expire).
const USERS: usize = 6;
/// Access token lifetime: refreshed after half of it.
const LIFETIME_S: u64 = 2;
const LONG_LIVED: Duration = Duration::from_secs(30);
/// A deletion reaches every proxy within the 5 s CONNECTIONS.md promises
/// (the change feed: `CHANGE_POLL` and one read) + 1 s.
const DELETE_BOUND: Duration = Duration::from_secs(6);
/// A re-authorization on one replica reaches the other within the same bound.
const SETTLE: Duration = Duration::from_secs(6);
/// A rotation this close before a kill may not have been committed.
const KILL_WINDOW: Duration = Duration::from_secs(3);
/// At the end: how long backoffs may take to clear.
const END_POLL: Duration = Duration::from_secs(15);
const PROBE_DEADLINE: Duration = Duration::from_secs(4);
const WRONG_SECRET: &str = "chaos-wrong-client-secret";
const DEFAULT_STEPS: usize = 10;
const SQLITE_SEEDS: [u64; 2] = [1, 2];
const POSTGRES_SEEDS: [u64; 2] = [3, 4];
const ACCOUNTS: &str = "/api/fdx/5/accounts";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

/// What the driver knows about a user's connection.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// Must serve; checked from `checked_from` on (a re-authorization
    /// reaches the other replica within [`SETTLE`]).
    Live { checked_from: Instant },
    /// Consent revoked since the last re-authorization.
    Revoked,
    /// Deleted at `at`.
    Deleted { at: Instant },
    /// Its refresh token came from the rotation at `rotation`, which a
    /// kill -9 may have cut off before the commit.
    AtRisk { rotation: Instant },
}

struct Report {
    steps: Vec<String>,
    checks: u64,
    requests: u64,
    token_requests: u64,
    violations: Vec<String>,
}

struct World {
    backend: Backend,
    rng: Rng,
    sb: Sandbox,
    dir: TempDir,
    config: ConfigFile,
    store_url: String,
    key: String,
    pg: Option<PgCluster>,
    procs: Vec<Proc>,
    /// Proxy base URLs for the background load (updated on restart).
    urls: Arc<Mutex<Vec<String>>>,
    subs: Vec<String>,
    fates: BTreeMap<String, Fate>,
    steps: Vec<String>,
    /// Output of processes gone (killed, CLI runs).
    logs: Vec<String>,
    outages: Vec<(Instant, Option<Instant>)>,
    /// Per kill: the at-risk users and the rotation behind each.
    risky: Vec<(String, Instant)>,
    violations: Vec<String>,
    reported: HashSet<String>,
    checks: u64,
    races: u64,
    load_requests: Arc<AtomicU64>,
}

impl Fate {
    fn label(&self) -> &'static str {
        match self {
            Fate::Live { .. } => "live",
            Fate::Revoked => "revoked",
            Fate::Deleted { .. } => "deleted",
            Fate::AtRisk { .. } => "at risk",
        }
    }
}

impl World {
    async fn start(backend: Backend, seed: u64) -> World {
        let subs: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();
        let sb = Sandbox::start(SandboxOptions {
            users: subs.iter().map(|s| SandboxUser::new(s)).collect(),
            expires_in: Some(LIFETIME_S),
            rotate_refresh_tokens: true,
            ..SandboxOptions::default()
        })
        .await
        .expect("sandbox");
        // Like a real server: a request whose client left still rotates.
        sb.set_finish_abandoned(true);
        sb.set_user_token_lifetime(&subs[USERS - 1], Some(LONG_LIVED));
        let dir = TempDir::new();
        let (pg, store_url) = match backend {
            Backend::Sqlite => (None, format!("sqlite:{}", dir.join("c.db").display())),
            Backend::Postgres => {
                let pg = tokio::task::block_in_place(PgCluster::start);
                tokio::task::block_in_place(|| pg.create_database("chaos"));
                let url = pg.url("chaos");
                (Some(pg), url)
            }
        };
        let mut w = World {
            backend,
            rng: Rng::new(seed),
            config: ConfigFile(dir.join("proxy.toml")),
            dir,
            sb,
            store_url,
            key: new_key(),
            pg,
            procs: Vec::new(),
            urls: Arc::default(),
            subs,
            fates: BTreeMap::new(),
            steps: Vec::new(),
            logs: Vec::new(),
            outages: Vec::new(),
            risky: Vec::new(),
            violations: Vec::new(),
            reported: HashSet::new(),
            checks: 0,
            races: 0,
            load_requests: Arc::default(),
        };
        w.config
            .write(&w.config_text(&SandboxOptions::default().client_secret));
        let replicas = if backend == Backend::Sqlite { 1 } else { 2 };
        for _ in 0..replicas {
            let p = tokio::task::block_in_place(|| Proc::start(&w.config.0));
            w.procs.push(p);
        }
        w.publish_urls();
        for (i, sub) in w.subs.clone().iter().enumerate() {
            let url = w.procs[i % replicas].admin("/connections/users");
            let body = serde_json::json!({"code": format!("code-{sub}")});
            let a = admin(&url, "POST", Some(body), PROBE_DEADLINE).await;
            assert_eq!(a.status, 201, "connecting {sub}: {a}");
            w.fates.insert(sub.clone(), live_now());
        }
        w
    }

    fn config_text(&self, client_secret: &str) -> String {
        let o = SandboxOptions::default();
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "1s"

[admin]
listen = "127.0.0.1:0"
api_token = "{API_TOKEN}"

[store]
url = "{url}"
key = "{key}"

[connections.users]
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = "{client_secret}"
redirect_uri = "{redirect_uri}"
token_timeout = "3s"

[routes.ob]
path_prefix = "/"
upstream = "{api}"
connections = "users"
"#,
            url = self.store_url,
            key = self.key,
            token_url = self.sb.token_url(),
            client_id = o.client_id,
            redirect_uri = o.redirect_uri,
            api = self.sb.api_url(),
        )
    }

    fn publish_urls(&self) {
        *self.urls.lock().unwrap() = self.procs.iter().map(|p| p.url(ACCOUNTS)).collect();
    }

    fn proxy(&mut self) -> usize {
        self.rng.below(self.procs.len())
    }

    /// A random proxy's URL for `path`, proxy or admin listener.
    fn any_url(&mut self, path: &str, admin: bool) -> String {
        let i = self.proxy();
        let p = &self.procs[i];
        if admin {
            p.admin(path)
        } else {
            p.url(path)
        }
    }

    fn user(&mut self) -> String {
        let subs = self.subs.clone();
        self.rng.pick(&subs).clone()
    }

    /// A user that is not live, if any (re-authorizations bring them back).
    fn ended_user(&mut self) -> Option<String> {
        let ended: Vec<String> = self
            .fates
            .iter()
            .filter(|(_, f)| !matches!(f, Fate::Live { .. }))
            .map(|(s, _)| s.clone())
            .collect();
        (!ended.is_empty()).then(|| self.rng.pick(&ended).clone())
    }

    fn cli_args(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--config".to_owned(), self.config.arg()]);
        v
    }

    /// `n` concurrent requests for random users over `spread`, a third of
    /// them from clients that leave after 50-400 ms; returns a summary.
    async fn burst(&mut self, n: usize, spread: Duration) -> String {
        let mut set = tokio::task::JoinSet::new();
        let mut leaving = 0;
        for _ in 0..n {
            let url = self.any_url(ACCOUNTS, false);
            let sub = self.user();
            let deadline = if self.rng.percent(33) {
                leaving += 1;
                self.rng.millis(50, 400)
            } else {
                PROBE_DEADLINE
            };
            let start = self.rng.millis(0, spread.as_millis() as u64);
            set.spawn(async move {
                tokio::time::sleep(start).await;
                get_as(&url, &sub, &[], deadline).await.status
            });
        }
        let mut by_status = BTreeMap::<u16, u32>::new();
        while let Some(s) = set.join_next().await {
            *by_status.entry(s.expect("request task")).or_default() += 1;
        }
        format!("{n} requests ({leaving} leave early): {by_status:?}")
    }

    async fn reauthorize(&mut self, sub: &str) -> Answer {
        let code = self.sb.new_code(sub);
        let url = self.any_url("/connections/users", true);
        let body = serde_json::json!({"code": code, "id": sub});
        let a = admin(&url, "POST", Some(body), PROBE_DEADLINE).await;
        if a.status == 200 || a.status == 201 {
            let checked_from = match self.backend {
                Backend::Sqlite => Instant::now(),
                Backend::Postgres => Instant::now() + SETTLE,
            };
            self.fates
                .insert(sub.to_owned(), Fate::Live { checked_from });
        }
        a
    }

    /// Draws and runs one step; returns what it did.
    async fn step(&mut self) -> String {
        let roll = self.rng.below(100);
        match roll {
            0..=7 => {
                let n = 6 + self.rng.below(14);
                let spread = self.rng.millis(200, 1200);
                format!("requests: {}", self.burst(n, spread).await)
            }
            8..=17 => {
                let delay = self.rng.millis(200, 1800);
                self.sb.set_token_delay(delay);
                let out = self.burst(10, delay + Duration::from_millis(500)).await;
                self.sb.set_token_delay(Duration::ZERO);
                format!("slow token endpoint ({delay:?}): {out}")
            }
            18..=31 => {
                let modes = [
                    FailureMode::ServerError,
                    FailureMode::TemporarilyUnavailable,
                    FailureMode::InvalidClient,
                    FailureMode::Hang,
                ];
                let mode = *self.rng.pick(&modes);
                let spread = self.rng.millis(500, 2500);
                self.sb.set_failure(mode);
                let out = self.burst(10, spread).await;
                // Hanging requests answer 500 (no rotation) before the endpoint heals.
                self.sb.set_failure(FailureMode::ServerError);
                self.sb.set_failure(FailureMode::None);
                format!("token endpoint {mode:?} for {spread:?}: {out}")
            }
            32..=37 => {
                let sub = self.user();
                self.sb.revoke_consent(&sub);
                if !matches!(self.fates[&sub], Fate::Deleted { .. }) {
                    self.fates.insert(sub.clone(), Fate::Revoked);
                }
                let url = self.any_url(ACCOUNTS, false);
                let a = get_as(&url, &sub, &[], PROBE_DEADLINE).await;
                format!("revoke consent of {sub}; its request: {a}")
            }
            38..=47 => {
                let sub = match self.ended_user() {
                    Some(s) if self.rng.percent(75) => s,
                    _ => self.user(),
                };
                let a = self.reauthorize(&sub).await;
                format!("re-authorize {sub}: {a}")
            }
            48..=52 => self.stale_602().await,
            53..=57 => {
                let sub = self.user();
                let p = self.proxy();
                let url = self.procs[p].admin(&format!("/connections/users/{sub}"));
                let a = admin(&url, "DELETE", None, PROBE_DEADLINE).await;
                let was = self.fates[&sub];
                if a.status == 204 {
                    let at = Instant::now();
                    self.fates.insert(sub.clone(), Fate::Deleted { at });
                } else if a.is(404, "connection_not_found") && !matches!(was, Fate::Deleted { .. })
                {
                    self.violation(
                        1,
                        format!(
                            "admin DELETE of {sub} ({}) found no connection",
                            was.label()
                        ),
                    );
                }
                format!("admin DELETE {sub} on proxy {p}: {a}")
            }
            58..=62 => {
                let sub = self.user();
                let (code, out) = cli(self.cli_args(&["connections", "delete", &sub])).await;
                let was = self.fates[&sub];
                if code == 0 {
                    let at = Instant::now();
                    self.fates.insert(sub.clone(), Fate::Deleted { at });
                } else if out.contains("no connection") && !matches!(was, Fate::Deleted { .. }) {
                    self.violation(
                        1,
                        format!("CLI delete of {sub} ({}) found none", was.label()),
                    );
                }
                let summary = out.lines().last().unwrap_or("").to_owned();
                self.logs.push(out);
                format!("CLI connections delete {sub}: exit {code} {summary}")
            }
            63..=69 => {
                let sub = self.user();
                let args = if self.rng.percent(50) {
                    vec!["connections", "list"]
                } else {
                    vec!["connections", "show", &sub]
                };
                let (code, out) = cli(self.cli_args(&args)).await;
                self.logs.push(out);
                format!("CLI {}: exit {code}", args.join(" "))
            }
            70..=75 => {
                let (code, out) = cli(self.cli_args(&["store", "rekey"])).await;
                let summary = out.lines().last().unwrap_or("").to_owned();
                self.logs.push(out);
                format!("CLI store rekey: exit {code} {summary}")
            }
            76..=81 => {
                let spread = self.rng.millis(500, 2000);
                let wrong = self.reload(WRONG_SECRET);
                let out = self.burst(10, spread).await;
                let right = self.reload(&SandboxOptions::default().client_secret);
                if !right {
                    self.violation(0, "setup: the right client_secret was not reloaded".into());
                }
                format!("reload with a wrong client_secret (reloaded: {wrong}), {spread:?}: {out}; right one again (reloaded: {right})")
            }
            82..=88 if self.backend == Backend::Postgres => {
                let spread = self.rng.millis(800, 2500);
                let pg = self.pg.as_ref().expect("cluster");
                tokio::task::block_in_place(|| pg.stop());
                self.outages.push((Instant::now(), None));
                let out = self.burst(10, spread).await;
                let pg = self.pg.as_ref().expect("cluster");
                tokio::task::block_in_place(|| pg.start_server());
                if let Some(o) = self.outages.last_mut() {
                    o.1 = Some(Instant::now());
                }
                format!("database down for {spread:?}: {out}")
            }
            82..=89 => {
                let pause = self.rng.millis(300, 1500);
                tokio::time::sleep(pause).await;
                format!("quiet {pause:?} (background load only)")
            }
            _ => self.kill_and_restart().await,
        }
    }

    /// Rewrites the config with `secret` and reloads every proxy; true when
    /// all reloaded.
    fn reload(&mut self, secret: &str) -> bool {
        self.config.write(&self.config_text(secret));
        let mut all = true;
        for p in &self.procs {
            p.drain();
            all &= tokio::task::block_in_place(|| p.reload(Duration::from_secs(20)));
        }
        all
    }

    /// Consent revoked; a request with the old token is answered 602 late
    /// (decided on arrival, sent after 500 ms); meanwhile the user is
    /// re-authorized. The late 602 must not end the new authorization.
    async fn stale_602(&mut self) -> String {
        let Some(sub) = self
            .fates
            .iter()
            .find(|(_, f)| matches!(f, Fate::Live { .. }))
            .map(|(s, _)| s.clone())
        else {
            return "late 602: no live user".into();
        };
        self.races += 1;
        let path = format!("{ACCOUNTS}?race={}", self.races);
        let url = self.any_url(&path, false);
        self.sb.revoke_consent(&sub);
        self.fates.insert(sub.clone(), Fate::Revoked);
        let late = {
            let sub = sub.clone();
            tokio::spawn(async move {
                get_as(&url, &sub, &[(DELAY_HEADER, "500")], PROBE_DEADLINE).await
            })
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        let arrived = loop {
            if self.sb.recorded().iter().any(|r| r.path_and_query == path) {
                break true;
            }
            if Instant::now() > deadline || late.is_finished() {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let re = self.reauthorize(&sub).await;
        let late = late.await.expect("late request");
        format!("late 602 for {sub} (at the API: {arrived}) racing its re-authorization: {re}; the late answer: {late}")
    }

    async fn kill_and_restart(&mut self) -> String {
        let i = self.proxy();
        let p = self.procs.remove(i);
        let log = tokio::task::block_in_place(|| p.kill9());
        let killed = Instant::now();
        self.logs.push(log);
        // A handler still running for the dead process ends with its connection.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.sb.token_requests_in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut at_risk = Vec::new();
        for sub in self.subs.clone() {
            let Some(rotation) = self.sb.last_rotation(&sub) else {
                continue;
            };
            let recent = rotation + KILL_WINDOW >= killed;
            let in_outage = self
                .outages
                .iter()
                .any(|&(s, e)| rotation >= s && e.is_none_or(|e| rotation <= e + KILL_WINDOW));
            if recent || in_outage {
                self.risky.push((sub.clone(), rotation));
                if matches!(self.fates[&sub], Fate::Live { .. } | Fate::AtRisk { .. }) {
                    self.fates.insert(sub.clone(), Fate::AtRisk { rotation });
                }
                at_risk.push(sub);
            }
        }
        let p = tokio::task::block_in_place(|| Proc::start(&self.config.0));
        self.procs.insert(i, p);
        self.publish_urls();
        format!("kill -9 proxy {i} and restart (at risk: {at_risk:?})")
    }

    /// Records a finding once (the step it was first seen after).
    fn violation(&mut self, invariant: u8, what: String) {
        if self.reported.insert(format!("{invariant} {what}")) {
            let n = self.steps.len();
            self.violations
                .push(format!("invariant {invariant} after step {n}: {what}"));
        }
    }

    /// `from + bound`, pushed past every store outage overlapping it (a
    /// replica that could not read the store keeps what it had); `None`
    /// while one lasts.
    fn due(&self, from: Instant, bound: Duration) -> Option<Instant> {
        let mut due = from + bound;
        for &(start, end) in &self.outages {
            match end {
                None => return None,
                Some(end) if start <= due && end + bound >= from => {
                    due = due.max(end + bound);
                }
                Some(_) => {}
            }
        }
        Some(due)
    }

    /// Invariant 2; each presentation of a retired token is reported once.
    fn check_reuses(&mut self) {
        self.checks += 1;
        let reuses = self.sb.refresh_token_reuses();
        let total = self.sb.reused_refresh_tokens();
        let mut legit = 0u64;
        let mut bad = std::collections::BTreeSet::new();
        for r in &reuses {
            if self
                .risky
                .iter()
                .any(|(s, at)| *s == r.sub && *at == r.rotated_at)
            {
                legit += 1;
            } else {
                bad.insert(r.sub.clone());
            }
        }
        // Beyond the sandbox's memory of reuses, count them as findings.
        let unexplained = total - legit;
        if unexplained > 0 {
            self.violation(
                2,
                format!("the token endpoint received {unexplained} rotated-away refresh tokens (users {bad:?})"),
            );
        }
    }

    /// Invariant 4 over every process's output so far.
    fn check_logs(&mut self) {
        self.checks += 1;
        let mut text = self.logs.join("\n");
        for p in &self.procs {
            text.push_str(&p.log());
        }
        let mut secrets = self.sb.issued_secrets();
        secrets.extend([
            self.key.clone(),
            API_TOKEN.to_owned(),
            SandboxOptions::default().client_secret,
            WRONG_SECRET.to_owned(),
        ]);
        if self.pg.is_some() {
            secrets.push(PASSWORD.to_owned());
        }
        for s in leaked(&text, &secrets, &["eyJ", "rt-", "code-"]) {
            let shown: String = s.chars().take(24).collect();
            self.violation(4, format!("a secret is in a log: {shown}..."));
        }
    }

    /// Users whose fate asks for a probe now, and the probes' answers.
    async fn probe(&mut self, at_end: bool) -> Vec<(String, Fate, usize, Answer)> {
        let now = Instant::now();
        for (sub, fate) in self.fates.iter_mut() {
            if let Fate::AtRisk { rotation } = *fate {
                if self.sb.last_rotation(sub).is_some_and(|r| r > rotation) {
                    *fate = Fate::Live { checked_from: now };
                }
            }
        }
        let mut set = tokio::task::JoinSet::new();
        for (sub, fate) in &self.fates {
            let due = match *fate {
                Fate::Live { checked_from } => {
                    at_end
                        || self
                            .due(checked_from, Duration::ZERO)
                            .is_some_and(|t| t <= now)
                }
                Fate::Deleted { at } => {
                    at_end || self.due(at, DELETE_BOUND).is_some_and(|t| t <= now)
                }
                Fate::Revoked | Fate::AtRisk { .. } => false,
            };
            if !due {
                continue;
            }
            for (i, p) in self.procs.iter().enumerate() {
                let (url, sub, fate) = (p.url(ACCOUNTS), sub.clone(), *fate);
                set.spawn(async move {
                    let a = get_as(&url, &sub, &[], PROBE_DEADLINE).await;
                    (sub, fate, i, a)
                });
            }
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.expect("probe task"));
        }
        self.checks += out.len() as u64;
        out
    }

    /// The checks after a step: refusals of live users, deleted users
    /// served, reuses, leaks.
    async fn check(&mut self) {
        for (sub, fate, i, a) in self.probe(false).await {
            match fate {
                Fate::Live { .. } if !matches!(a.status, 200 | 502 | 503 | 504 | 0) => {
                    self.violation(1, format!("{sub} refused on proxy {i}: {a}"));
                }
                Fate::Deleted { at } if a.status == 200 => {
                    let ago = at.elapsed();
                    self.violation(3, format!("{sub} deleted {ago:?} ago served on proxy {i}"));
                }
                _ => {}
            }
        }
        self.check_reuses();
        self.check_logs();
    }

    /// The end: everything healthy; live users answer 200 and deleted ones
    /// 404 within [`END_POLL`].
    async fn finish(&mut self) {
        self.sb.set_failure(FailureMode::None);
        self.sb.set_token_delay(Duration::ZERO);
        // Let every re-authorization settle and every deletion's bound pass.
        let ready = self
            .fates
            .values()
            .filter_map(|f| match *f {
                Fate::Live { checked_from } => self.due(checked_from, Duration::ZERO),
                Fate::Deleted { at } => self.due(at, DELETE_BOUND),
                _ => None,
            })
            .max();
        if let Some(ready) = ready {
            tokio::time::sleep_until(ready.into()).await;
        }
        let deadline = Instant::now() + END_POLL;
        loop {
            let wrong: Vec<_> = self
                .probe(true)
                .await
                .into_iter()
                .filter(|(_, fate, _, a)| match fate {
                    Fate::Live { .. } => a.status != 200,
                    _ => !a.is(404, "connection_not_found"),
                })
                .collect();
            if wrong.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for (sub, fate, i, a) in wrong {
                    let n = if matches!(fate, Fate::Live { .. }) {
                        1
                    } else {
                        3
                    };
                    self.violation(
                        n,
                        format!("at the end, {sub} ({}) on proxy {i}: {a}", fate.label()),
                    );
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.check_reuses();
        for p in std::mem::take(&mut self.procs) {
            let log = tokio::task::block_in_place(|| p.kill9());
            self.logs.push(log);
        }
        self.check_logs();
    }
}

fn live_now() -> Fate {
    Fate::Live {
        checked_from: Instant::now(),
    }
}

/// Background load: three clients sending requests for random users to
/// random proxies until `stop`, one in ten leaving after 50-300 ms.
fn spawn_load(
    seed: u64,
    urls: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for worker in 0..3u64 {
        let (urls, stop, count) = (urls.clone(), stop.clone(), count.clone());
        set.spawn(async move {
            let mut rng = Rng::new(seed ^ (0xc0ffee + worker));
            while !stop.load(Ordering::Acquire) {
                let url = {
                    let urls = urls.lock().unwrap();
                    urls[rng.below(urls.len())].clone()
                };
                let sub = format!("u{}", rng.below(USERS));
                let deadline = if rng.percent(10) {
                    rng.millis(50, 300)
                } else {
                    PROBE_DEADLINE
                };
                get_as(&url, &sub, &[], deadline).await;
                count.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        });
    }
    set
}

async fn run(backend: Backend, seed: u64, steps: usize) -> Report {
    let mut w = World::start(backend, seed).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = spawn_load(seed, w.urls.clone(), stop.clone(), w.load_requests.clone());
    for n in 1..=steps {
        let what = w.step().await;
        w.steps.push(format!("{n:>3}. {what}"));
        w.check().await;
    }
    stop.store(true, Ordering::Release);
    while load.join_next().await.is_some() {}
    w.finish().await;
    if let (false, Ok(dir)) = (w.violations.is_empty(), std::env::var("CHAOS_LOGS")) {
        // The proxies' own lines, for reading a finding (they hold no secret:
        // invariant 4 checks that).
        let path = std::path::Path::new(&dir).join(format!("{backend:?}-{seed}.log"));
        std::fs::write(&path, w.logs.join("\n")).expect("write CHAOS_LOGS");
        eprintln!("chaos: proxy logs in {}", path.display());
    }
    let _ = &w.dir;
    Report {
        steps: std::mem::take(&mut w.steps),
        checks: w.checks,
        requests: w.load_requests.load(Ordering::Relaxed),
        token_requests: w.sb.token_requests(),
        violations: std::mem::take(&mut w.violations),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number: {v}"))
    })
}

/// Runs the seeds (or `CHAOS_SEED`, or random ones for `CHAOS_DURATION`);
/// panics with every failing seed's steps and findings.
async fn chaos(backend: Backend, fixed: &[u64], test: &str) {
    let steps = env_u64("CHAOS_STEPS").map_or(DEFAULT_STEPS, |n| n as usize);
    let duration = std::env::var("CHAOS_DURATION").ok().map(|d| {
        humantime::parse_duration(&d).unwrap_or_else(|e| panic!("CHAOS_DURATION {d}: {e}"))
    });
    let started = Instant::now();
    let mut seeds: Vec<u64> = match env_u64("CHAOS_SEED") {
        Some(s) => vec![s],
        None => fixed.to_vec(),
    };
    let mut random = Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    let (mut runs, mut total_steps, mut total_checks) = (0u64, 0usize, 0u64);
    let mut failures = Vec::new();
    let mut i = 0;
    loop {
        let seed = match seeds.get(i) {
            Some(&s) => s,
            None if duration.is_some_and(|d| started.elapsed() < d) => {
                let s = random.next_u64() % 1_000_000;
                seeds.push(s);
                s
            }
            None => break,
        };
        i += 1;
        let r = run(backend, seed, steps).await;
        runs += 1;
        total_steps += r.steps.len();
        total_checks += r.checks;
        eprintln!(
            "chaos {backend:?} seed {seed}: {} steps, {} invariant checks, {} background requests, {} token requests, {} findings",
            r.steps.len(),
            r.checks,
            r.requests,
            r.token_requests,
            r.violations.len()
        );
        if !r.violations.is_empty() {
            failures.push(format!(
                "seed {seed} (reproduce: CHAOS_SEED={seed} cargo test --test chaos {test}):\nsteps:\n{}\nfindings:\n{}",
                r.steps.join("\n"),
                r.violations.join("\n")
            ));
        }
    }
    eprintln!(
        "chaos {backend:?}: {runs} seeds {seeds:?}, {total_steps} steps, {total_checks} invariant checks in {:?}, {} failing",
        started.elapsed(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_on_sqlite_lose_no_connection() {
    chaos(
        Backend::Sqlite,
        &SQLITE_SEEDS,
        "seeded_faults_on_sqlite_lose_no_connection",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_on_two_postgres_replicas_lose_no_connection() {
    chaos(
        Backend::Postgres,
        &POSTGRES_SEEDS,
        "seeded_faults_on_two_postgres_replicas_lose_no_connection",
    )
    .await;
}

#[test]
fn the_secret_search_finds_secrets_inside_longer_text_only() {
    let secrets = vec!["rt-a-1".to_owned(), "rt-a-12".to_owned(), "pw".to_owned()];
    let mut found = leaked("x=rt-a-12, y", &secrets, &["rt-"]);
    found.sort_unstable();
    assert_eq!(found, vec!["rt-a-1", "rt-a-12"]);
    assert!(leaked("rt-b rt-a", &secrets, &["rt-"]).is_empty());
    assert_eq!(leaked("a pw b", &secrets, &["rt-"]), vec!["pw"]);
}

#[test]
fn the_same_seed_draws_the_same_steps() {
    let draw = |seed| {
        let mut r = Rng::new(seed);
        (0..20).map(|_| r.below(100)).collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
}
