//! Criterion micro-benchmarks of the request path pieces, each in ns per
//! operation: route lookup over 1, 10 and 100 routes; token load plus
//! header injection; request header rewrite (hop-by-hop removal and
//! X-Forwarded-*); request id generation; metric recording; the token of a
//! pooled route's connection with a warm cache, next to a credential's;
//! what a DPoP route adds per request (a fresh ES256 or EdDSA proof, and
//! keeping the answer's nonce), next to a Bearer route's header.
//!
//! Run: `cargo bench --bench micro` (a filter narrows it, e.g.
//! `cargo bench --bench micro -- route_lookup`). The side-by-side load
//! comparison with nginx and HAProxy is `benches/compare.sh`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use flinks_proxy::config::AuthScheme;
use flinks_proxy::ground::metrics::Metrics;
use flinks_proxy::net::headers;
use flinks_proxy::proxy::generation::Route;
use flinks_proxy::proxy::routes::RouteTable;
use flinks_proxy::proxy::{handler, ConnInfo};
use flinks_proxy::tokens::Token;
use flinks_proxy::{AppState, Config};
use http::{header, HeaderMap, HeaderValue};

/// A JWT-sized access token (Flinks tokens are JWTs of this order).
const ACCESS_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJjbGllbnRfaWQiOiJkZW1vLWNsaWVudCIsInN1YiI6InVzZXItMTIzIiwiZXhwIjo0MTAyNDQ0ODAwLCJzY29wZSI6ImNsaWVudDphZG1pbiJ9.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2lnbmF0dXJl";

/// Routes `/` plus `/svc1/v1` … `/svc{n-1}/v1`, all without a host.
fn table(n: usize) -> RouteTable<usize> {
    RouteTable::new((0..n).map(|i| {
        let prefix = if i == 0 {
            "/".to_string()
        } else {
            format!("/svc{i}/v1")
        };
        (None, prefix, i)
    }))
}

fn route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for n in [1usize, 10, 100] {
        let t = table(n);
        // A path under the middle route, and one that only `/` matches
        // (every prefix is tried: the worst case).
        let hit = format!("/svc{}/v1/accounts/123", n / 2);
        let expect_hit = if n > 1 { n / 2 } else { 0 };
        assert_eq!(t.find(None, &hit), Some(&expect_hit));
        g.bench_with_input(BenchmarkId::new("hit", n), &hit, |b, path| {
            b.iter(|| t.find(black_box(None), black_box(path.as_str())))
        });
        assert_eq!(t.find(None, "/other/thing"), Some(&0));
        g.bench_with_input(BenchmarkId::new("fallback_root", n), &n, |b, _| {
            b.iter(|| t.find(black_box(None), black_box("/other/thing")))
        });
        let host = Some("api.example");
        g.bench_with_input(BenchmarkId::new("hit_unknown_host", n), &hit, |b, path| {
            b.iter(|| t.find(black_box(host), black_box(path.as_str())))
        });
    }
    g.finish();
}

/// An application state for one route to a loopback upstream (never
/// contacted) with a token installed; the refresh task is not started.
fn state() -> (
    Arc<AppState>,
    Arc<Route>,
    Arc<flinks_proxy::tokens::TokenSource>,
) {
    let toml = r#"
[server]
listen = "127.0.0.1:0"
[credentials.bench]
token_url = "http://127.0.0.1:9/token"
grant_type = "client_credentials"
client_id = "bench"
client_secret = "bench-secret"
[routes.api]
path_prefix = "/"
upstream = "http://127.0.0.1:9"
credential = "bench"
"#;
    let config = Config::parse(toml, Path::new("bench.toml")).expect("bench config");
    let state = AppState::new(config).expect("bench state");
    let (route, source) = {
        let rt = state.generation.load();
        let route = rt.routes.find(None, "/x").expect("route").clone();
        let source = Arc::clone(rt.sources.get("bench").expect("source"));
        source.install(Token::new(ACCESS_TOKEN, Duration::from_secs(24 * 3600)).expect("token"));
        (route, source)
    };
    (state, route, source)
}

/// What a typical client sends (curl-like, HTTP/1.1 keep-alive).
fn inbound_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
    h.insert(header::USER_AGENT, HeaderValue::from_static("curl/7.88.1"));
    h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    h
}

fn token_injection(c: &mut Criterion) {
    let (_state, route, source) = state();
    let mut g = c.benchmark_group("token");
    let mut headers = inbound_headers();
    g.bench_function("usable_and_insert_bearer", |b| {
        b.iter(|| {
            let token = source.usable().expect("usable token");
            headers.insert(
                route.header.clone(),
                token.header_value(black_box(&AuthScheme::Bearer)),
            );
        })
    });
    g.bench_function("usable_only", |b| b.iter(|| black_box(source.usable())));
    g.finish();
}

fn rewrite(c: &mut Criterion) {
    let (_state, route, _source) = state();
    let conn = ConnInfo::new(SocketAddr::from(([127, 0, 0, 1], 40000)), false);
    let rid = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    let base = inbound_headers();
    let mut with_xff = inbound_headers();
    with_xff.insert("x-forwarded-for", HeaderValue::from_static("10.1.2.3"));
    let mut g = c.benchmark_group("rewrite");
    g.bench_function("remove_hop_by_hop", |b| {
        b.iter_batched_ref(
            || base.clone(),
            headers::remove_hop_by_hop,
            BatchSize::SmallInput,
        )
    });
    g.bench_function("rewrite_headers", |b| {
        b.iter_batched_ref(
            || (base.clone(), base.get(header::HOST).cloned()),
            |(h, host)| handler::rewrite_headers(h, &route, &conn, host.take(), &rid),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("rewrite_headers_appending_xff", |b| {
        b.iter_batched_ref(
            || (with_xff.clone(), with_xff.get(header::HOST).cloned()),
            |(h, host)| handler::rewrite_headers(h, &route, &conn, host.take(), &rid),
            BatchSize::SmallInput,
        )
    });
    // The clone alone, to subtract from the batched numbers above when
    // reading them (criterion excludes setup, but not drop of the output).
    g.bench_function("headermap_clone_baseline", |b| {
        b.iter(|| black_box(base.clone()))
    });
    g.finish();
}

fn request_id(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_id");
    let none = HeaderMap::new();
    g.bench_function("generated", |b| {
        b.iter(|| headers::request_id(black_box(&none)))
    });
    let mut given = HeaderMap::new();
    given.insert(
        &headers::X_REQUEST_ID,
        HeaderValue::from_static("7f0c1e52-4b9a-4d0e-9a55-3c1f2e8d9b10"),
    );
    g.bench_function("client_supplied", |b| {
        b.iter(|| headers::request_id(black_box(&given)))
    });
    g.finish();
}

fn metrics(c: &mut Criterion) {
    let m = Metrics::new();
    let rm = m.route("api");
    rm.count(200);
    let mut g = c.benchmark_group("metrics");
    g.bench_function("count_and_observe", |b| {
        b.iter(|| {
            rm.count(black_box(200));
            rm.duration.observe(black_box(0.000_35));
        })
    });
    g.bench_function("count", |b| b.iter(|| rm.count(black_box(200))));
    g.bench_function("observe", |b| {
        b.iter(|| rm.duration.observe(black_box(0.000_35)))
    });
    g.bench_function("inflight_inc_dec", |b| {
        b.iter(|| {
            m.inflight.inc();
            m.inflight.dec();
        })
    });
    g.finish();
}

/// Connections in the pool benchmark's store (and cache).
const POOL_USERS: usize = 10_000;

/// A pool on an SQLite store in a temporary folder, `POOL_USERS`
/// connections stored and loaded into its cache (warm), plus a credential
/// source with a token, on one current-thread runtime.
fn pool_state() -> (
    tokio::runtime::Runtime,
    Arc<flinks_proxy::connections::Pool>,
    Arc<flinks_proxy::tokens::TokenSource>,
    std::path::PathBuf,
) {
    use flinks_proxy::ground::now_ms;
    use flinks_proxy::ground::secret::Secret;
    use flinks_proxy::store::{Store, Tokens};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("flinks-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let key = flinks_proxy::ground::crypto::generate_key().expect("key");
    let toml = format!(
        r#"
[credentials.bench]
token_url = "http://127.0.0.1:9/token"
grant_type = "client_credentials"
client_id = "bench"
client_secret = "bench-secret"
[store]
url = "sqlite:bench.db"
key = "{key}"
[connections.users]
token_url = "http://127.0.0.1:9/token"
client_id = "bench"
[routes.api]
path_prefix = "/"
upstream = "http://127.0.0.1:9"
connections = "users"
[routes.cred]
path_prefix = "/cred"
upstream = "http://127.0.0.1:9"
credential = "bench"
"#
    );
    let config = Config::parse(&toml, &dir.join("bench.toml")).expect("bench config");
    let (pool, source) = rt.block_on(async {
        let metrics = Metrics::new();
        let store = Store::open(config.store.as_ref().expect("store"), metrics.store())
            .await
            .expect("store");
        let state = AppState::with_store(config, metrics, Some(Arc::new(store))).expect("state");
        let runtime = state.generation.load();
        let pool = Arc::clone(&runtime.pools["users"]);
        let tokens = Tokens {
            refresh_token: Some(Secret::new("rt".to_owned())),
            access_token: Some(Secret::new(ACCESS_TOKEN.to_owned())),
            access_expires_at: Some(now_ms() + 24 * 3600 * 1000),
        };
        for i in 0..POOL_USERS {
            let id = format!("user-{i}");
            pool.store()
                .authorize("users", &id, None, &tokens)
                .await
                .expect("authorize");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            pool.token(&id, deadline).await.expect("warm");
        }
        let source = Arc::clone(&runtime.sources["bench"]);
        source.install(Token::new(ACCESS_TOKEN, Duration::from_secs(24 * 3600)).expect("token"));
        (pool, source)
    });
    (rt, pool, source, dir)
}

fn pooled_lookup(c: &mut Criterion) {
    let (rt, pool, source, dir) = pool_state();
    let ids: Vec<HeaderValue> = (0..POOL_USERS)
        .map(|i| HeaderValue::from_str(&format!("user-{i}")).expect("id"))
        .collect();
    let mut h = inbound_headers();
    let name = http::header::HeaderName::from_static("x-flinks-connection");
    let mut g = c.benchmark_group("pooled_token");
    let mut n = 0usize;
    // Both through `block_on`, so the difference is the lookup itself.
    g.bench_function("credential_usable", |b| {
        b.iter(|| rt.block_on(async { black_box(source.usable()) }))
    });
    g.bench_function("select_and_pool_token_warm", |b| {
        b.iter(|| {
            n = (n + 7919) % POOL_USERS;
            h.insert(&name, ids[n].clone());
            rt.block_on(async {
                // As the handler reads it (the rewrite leaves the header
                // out): the connection in memory first, without a future.
                let id = flinks_proxy::connections::named(&h, &name).expect("id");
                let now = tokio::time::Instant::now();
                let served = match pool.cached_token(id, now) {
                    Some(served) => served,
                    None => pool.token(id, now + Duration::from_secs(5)).await,
                };
                black_box(served.expect("token"))
            })
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(dir);
}

/// A DPoP route's work per request beyond a Bearer route's, as
/// `proxy::handler::send` does it: the proof of this method and URL with
/// the token's `ath` and the server's nonce, and the answer's
/// `DPoP-Nonce` kept. Side by side with the Bearer header alone.
fn dpop(c: &mut Criterion) {
    use flinks_proxy::ground::jose::{generate_pem, Alg, SigningKey};
    use flinks_proxy::tokens::dpop::{ath, Dpop, DPOP, DPOP_NONCE};
    let (_state, route, source) = state();
    let uri: http::Uri = "https://127.0.0.1:8443/v3/accounts?page=2".parse().unwrap();
    let ath = ath(ACCESS_TOKEN);
    let mut answer = HeaderMap::new();
    answer.insert(
        &DPOP_NONCE,
        HeaderValue::from_static("eyJ7S_zG.eyJH0-Z.HX4w-7v"),
    );
    let mut g = c.benchmark_group("dpop");
    let mut headers = inbound_headers();
    g.bench_function("bearer_header", |b| {
        b.iter(|| {
            let token = source.usable().expect("usable token");
            headers.insert(
                route.header.clone(),
                token.header_value(&AuthScheme::Bearer),
            );
        })
    });
    for (name, alg) in [("es256", Alg::Es256), ("eddsa", Alg::EdDsa)] {
        let key = SigningKey::from_pem(&generate_pem(alg).unwrap(), None).unwrap();
        let d = Dpop::new(Arc::new(key));
        d.remember(&uri, &answer);
        g.bench_function(format!("bearer_header_and_{name}_proof"), |b| {
            b.iter(|| {
                let token = source.usable().expect("usable token");
                headers.insert(
                    route.header.clone(),
                    token.header_value(&AuthScheme::Bearer),
                );
                let proof = d
                    .proof_header(black_box("GET"), black_box(&uri), Some(&ath))
                    .expect("proof");
                headers.insert(&DPOP, proof);
                d.remember(&uri, black_box(&answer));
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = route_lookup, token_injection, rewrite, request_id, metrics, pooled_lookup, dpop
}
criterion_main!(benches);
