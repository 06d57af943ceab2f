//! The DPoP test infrastructure itself (CLIENT_AUTH.md, "DPoP"): the
//! resource server of tests/support/dpop.rs and the `--dpop` mode of
//! tests/oidc/client_auth.mjs (node's `oidc-provider`), driven by hand with
//! proofs this file signs with `flinks_proxy::ground::jose`. A DPoP-bound
//! token is obtained from oidc-provider after its nonce challenge, then
//! every check RFC 9449 §4.3 and §7.1 asks of a resource server is shown
//! to refuse what it must, each with the exact reason, so that the proxy's
//! end-to-end tests can trust an acceptance.
//!
//! Needs `node` and `npm ci --prefix tests/oidc`; without either the tests
//! fail saying so (they never skip).

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use bytes::Bytes;
use flinks_proxy::ground::jose::{generate_pem, Alg, SigningKey};
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use support::dpop::{normalize_htu, DpopOptions, DpopServer, Reason};
use support::jwks::{thumbprint, Jwks};
use support::oidc::AuthServer;
use support::*;

const SECRET: &str = "dpop-test-client-secret-4b9e1f7a2c";
/// A client whose access tokens must be DPoP-bound.
const BOUND: &str = "dpop-bound";
/// A client without `dpop_bound_access_tokens`: its tokens, fetched
/// without a proof, are plain Bearer JWTs.
const UNBOUND: &str = "plain-bearer";

fn clients() -> Value {
    let client = |id: &str, bound: bool| {
        json!({
            "client_id": id,
            "client_secret": SECRET,
            "token_endpoint_auth_method": "client_secret_post",
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
            "dpop_bound_access_tokens": bound,
        })
    };
    json!([client(BOUND, true), client(UNBOUND, false)])
}

async fn provider() -> AuthServer {
    AuthServer::start(&clients(), &["--dpop"]).await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn ath(token: &str) -> String {
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

/// A DPoP key and the proofs it signs.
struct Prover {
    key: SigningKey,
}

impl Prover {
    fn new(alg: Alg) -> Prover {
        let pem = generate_pem(alg).expect("key");
        Prover {
            key: SigningKey::from_pem(&pem, None).expect("key"),
        }
    }

    /// The public key as the proofs' header `jwk`.
    fn jwk(&self) -> Value {
        self.key.public_jwk(None)
    }

    /// The claims of a good proof: fresh `jti`, `iat` now, and `nonce`
    /// and `ath` (of `token`) when given.
    fn claims(&self, htm: &str, htu: &str, nonce: Option<&str>, token: Option<&str>) -> Value {
        let mut c = json!({
            "jti": B64.encode(rand::random::<[u8; 16]>()),
            "htm": htm,
            "htu": htu,
            "iat": now(),
        });
        if let Some(n) = nonce {
            c["nonce"] = n.into();
        }
        if let Some(t) = token {
            c["ath"] = ath(t).into();
        }
        c
    }

    /// `claims` signed as a DPoP proof with this key in the header.
    fn sign(&self, claims: &Value) -> String {
        self.sign_with("dpop+jwt", self.jwk(), claims)
    }

    /// `claims` signed with header `typ` and `jwk`.
    fn sign_with(&self, typ: &str, jwk: Value, claims: &Value) -> String {
        self.key
            .sign(typ, None, &[("jwk", jwk)], claims)
            .expect("signed")
    }

    fn proof(&self, htm: &str, htu: &str, nonce: Option<&str>, token: Option<&str>) -> String {
        self.sign(&self.claims(htm, htu, nonce, token))
    }
}

/// A compact JWS with `header` and `claims` and signature bytes `sig`
/// (for algorithms the crate does not sign with: `none`, HS256 with a
/// header `jwk`).
fn raw_jws(header: &Value, claims: &Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(sig)
    )
}

/// POSTs a form to `url`, with a `DPoP` proof when given.
async fn post_form(url: &str, form: &str, proof: Option<&str>) -> Resp {
    let mut req = Request::post(url).header("content-type", "application/x-www-form-urlencoded");
    if let Some(p) = proof {
        req = req.header("dpop", p);
    }
    send(
        &client(),
        req.body(Full::new(Bytes::from(form.to_owned()))).unwrap(),
    )
    .await
}

fn client_credentials(client_id: &str) -> String {
    format!("grant_type=client_credentials&client_id={client_id}&client_secret={SECRET}")
}

/// A DPoP-bound access token for `prover`'s key from oidc-provider, by
/// hand: the first proof (no nonce) gets `400 use_dpop_nonce` and a
/// `DPoP-Nonce`; the proof with it gets the token, `token_type` `DPoP`.
async fn bound_token(op: &mut AuthServer, prover: &Prover) -> String {
    let url = op.token_url();
    let form = client_credentials(BOUND);
    let first = prover.proof("POST", &url, None, None);
    let r = post_form(&url, &form, Some(&first)).await;
    assert_eq!(r.status, 400, "{}\n{}", r.text(), op.log());
    assert_eq!(r.json()["error"], "use_dpop_nonce", "{}", r.text());
    let nonce = r.header("dpop-nonce").expect("DPoP-Nonce").to_owned();
    let proof = prover.proof("POST", &url, Some(&nonce), None);
    let r = post_form(&url, &form, Some(&proof)).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), op.log());
    let body = r.json();
    assert_eq!(body["token_type"], "DPoP", "{body}");
    let token = body["access_token"].as_str().expect("access_token");
    token.to_owned()
}

/// A request to the resource server: `authorization` as given, each of
/// `proofs` as a `DPoP` header.
async fn call(url: &str, method: &str, authorization: Option<&str>, proofs: &[&str]) -> Resp {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    for p in proofs {
        req = req.header("dpop", *p);
    }
    send(&client(), req.body(Full::default()).unwrap()).await
}

/// The resource server's JSON answer of an accepted request.
fn accepted(r: &Resp, what: &str) -> Value {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    r.json()
}

/// A 401 whose `WWW-Authenticate: DPoP` challenge has `reason`'s `error`
/// (none for a request without credentials) and whose body names
/// `reason` (the check that failed).
fn assert_refused(r: &Resp, reason: Reason, what: &str) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text());
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("DPoP "), "{what}: {challenge}");
    match reason.error() {
        Some(e) => assert!(
            challenge.contains(&format!("error=\"{e}\"")),
            "{what}: {challenge}"
        ),
        None => assert!(!challenge.contains("error="), "{what}: {challenge}"),
    }
    assert!(
        r.text().starts_with(&format!("{reason}: ")),
        "{what}: expected {reason}, got {}",
        r.text()
    );
}

/// oidc-provider's nonce challenge and a bound token, then a good proof at
/// the resource server after its own nonce challenge; the query is not
/// part of `htu`; what was sent is recorded; the token's `cnf.jkt` is the
/// key's thumbprint by this crate and by tests/support/jwks.rs alike; the
/// launcher logged one nonce retry and fresh proof jtis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_token_after_one_nonce_retry_is_accepted_with_a_good_proof() {
    let mut op = provider().await;
    let prover = Prover::new(Alg::Es256);
    let token = bound_token(&mut op, &prover).await;
    let jwks = op.jwks().await;
    let claims = jwks.verify(&token).expect("the token verifies");
    assert_eq!(claims["cnf"]["jkt"], prover.key.thumbprint(), "{claims}");
    assert_eq!(
        thumbprint(&prover.jwk()).unwrap(),
        prover.key.thumbprint(),
        "RFC 7638 by two implementations"
    );
    assert_eq!(claims["client_id"], BOUND, "{claims}");

    // The launcher's lines: the nonce challenge, then the accepted proof.
    let (line, _) = op.wait_for_line("dpop POST /token").await;
    assert!(line.ends_with(" nonce=- 400 use_dpop_nonce"), "{line}");
    let (line, _) = op.wait_for_line("dpop jti ").await;
    assert!(line.ends_with(" fresh"), "{line}");
    let (line, _) = op.wait_for_line("token client_credentials").await;
    assert!(
        line.starts_with(&format!(
            "token client_credentials {BOUND} token_type=DPoP assertion=-"
        )),
        "{line}"
    );
    let (line, _) = op.wait_for_line("dpop POST /token").await;
    assert!(line.ends_with(" 200 ok"), "{line}");
    assert!(!line.contains("nonce=- "), "{line}");

    let api = DpopServer::start(jwks).await;
    let url = format!("{}/accounts", api.url());
    let auth = format!("DPoP {token}");
    // No nonce yet: use_dpop_nonce with the current one.
    let r = call(
        &url,
        "GET",
        Some(&auth),
        &[&prover.proof("GET", &url, None, Some(&token))],
    )
    .await;
    assert_refused(&r, Reason::NonceMissing, "first proof");
    let nonce = r.header("dpop-nonce").expect("DPoP-Nonce").to_owned();
    assert_eq!(nonce, api.nonce());
    let r = call(
        &format!("{url}?page=2"),
        "GET",
        Some(&auth),
        &[&prover.proof("GET", &url, Some(&nonce), Some(&token))],
    )
    .await;
    let body = accepted(&r, "with the nonce, a query not in htu");
    assert_eq!(body["path"], "/accounts");
    assert_eq!(body["claims"]["client_id"], BOUND, "{body}");
    assert_eq!(r.header("dpop-nonce"), Some(nonce.as_str()));

    // A query and fragment in htu are ignored too, and htu is compared
    // after normalization (scheme and host case, the percent-encoding of
    // an unreserved character).
    let htu = url
        .replace("http://", "HTTP://")
        .replace("/accounts", "/%61ccounts");
    let proof = prover.proof("POST", &format!("{htu}?x=1#f"), Some(&nonce), Some(&token));
    let r = call(&url, "POST", Some(&auth), &[&proof]).await;
    accepted(&r, "normalized htu");

    let seen = api.wait_requests(3).await;
    assert_eq!(
        seen.iter().map(|s| s.reason()).collect::<Vec<_>>(),
        [Some(Reason::NonceMissing), None, None]
    );
    assert_eq!(api.accepted(), 2);
    assert_eq!(
        api.refusals(),
        [(StatusCode::UNAUTHORIZED, Reason::NonceMissing)]
    );
    let last = api.last_accepted().expect("accepted");
    assert_eq!(last.method, "POST");
    assert_eq!(last.path_and_query, "/accounts");
    assert_eq!(last.headers["authorization"], auth.as_str());
    assert_eq!(last.headers["dpop"], proof.as_str());
    let proof_claims = last.proof_claims.expect("proof claims");
    assert_eq!(proof_claims["ath"], ath(&token));
}

/// Every check refuses a request that differs from a good one in that
/// check only, with the reason and `error` of that check; good requests
/// before and after show that the rest was right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_check_refuses_what_rfc_9449_refuses() {
    use Reason::*;
    let mut op = provider().await;
    let prover = Prover::new(Alg::Es256);
    let other = Prover::new(Alg::Es256);
    let token = bound_token(&mut op, &prover).await;
    // An unbound token: oidc-provider's Bearer JWT for a client that asks
    // no proof, fetched without one.
    let r = post_form(&op.token_url(), &client_credentials(UNBOUND), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["token_type"], "Bearer", "{}", r.text());
    let unbound = r.json()["access_token"].as_str().unwrap().to_owned();
    let api = DpopServer::start(op.jwks().await).await;
    let nonce = api.nonce();
    let url = format!("{}/accounts", api.url());
    let auth = format!("DPoP {token}");
    let good = || prover.claims("GET", &url, Some(&nonce), Some(&token));
    let sign = |claims: &Value| prover.sign(claims);
    let with = |field: &str, value: Value| {
        let mut c = good();
        c[field] = value;
        sign(&c)
    };
    let without = |field: &str| {
        let mut c = good();
        c.as_object_mut().unwrap().remove(field);
        sign(&c)
    };
    let mut jwk_with_d = prover.jwk();
    jwk_with_d["d"] = B64.encode([7u8; 32]).into();
    // The checks before the signature's refuse these whatever they are
    // signed with.
    let junk_sig = [1u8; 64];
    let no_jwk_header = json!({"typ": "dpop+jwt", "alg": "ES256"});
    let no_typ_header = json!({"alg": "ES256", "jwk": prover.jwk()});
    let none_header = json!({"typ": "dpop+jwt", "alg": "none", "jwk": prover.jwk()});
    let hs_header = json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": prover.jwk()});
    let hs_sig = {
        let input = raw_jws(&hs_header, &good(), b"");
        let input = input.trim_end_matches('.');
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"shared");
        ring::hmac::sign(&key, input.as_bytes()).as_ref().to_vec()
    };
    // A signature over other claims: tampered after signing.
    let tampered = {
        let signed = sign(&good());
        let (_, sig) = signed.rsplit_once('.').unwrap();
        let (head, _) = signed.split_once('.').unwrap();
        format!("{head}.{}.{sig}", B64.encode(good().to_string()))
    };
    // Signed by another key under this key's jwk.
    let foreign_signature = other.sign_with("dpop+jwt", prover.jwk(), &good());
    // The bound token with a claim changed after the provider signed it.
    let forged_token = {
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        claims["scope"] = "admin".into();
        format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(claims.to_string()),
            parts[2]
        )
    };
    let unbound_auth = format!("DPoP {unbound}");
    let unbound_proof = prover.proof("GET", &url, Some(&nonce), Some(&unbound));
    let forged_auth = format!("DPoP {forged_token}");
    let forged_proof = prover.proof("GET", &url, Some(&nonce), Some(&forged_token));
    let bearer = format!("Bearer {token}");
    let unbound_bearer = format!("Bearer {unbound}");
    let basic = "Basic dXNlcjpwYXNz".to_owned();
    let other_key_proof = other.proof("GET", &url, Some(&nonce), Some(&token));

    // (what, Authorization, DPoP headers, reason): each differs from a
    // good request in what it names only. One case a line reads better
    // than rustfmt's seven.
    let a = Some(auth.as_str());
    #[rustfmt::skip]
    let cases: Vec<(&str, Option<&str>, Vec<String>, Reason)> = vec![
        ("no Authorization", None, vec![sign(&good())], NoAuthorization),
        ("Basic", Some(&basic), vec![sign(&good())], WrongScheme),
        ("bound token as Bearer", Some(&bearer), vec![sign(&good())], BoundTokenAsBearer),
        ("bound token as Bearer, no proof", Some(&bearer), vec![], BoundTokenAsBearer),
        ("unbound token as Bearer", Some(&unbound_bearer), vec![], BearerNotAccepted),
        ("no proof", a, vec![], NoProof),
        ("two proofs", a, vec![sign(&good()), sign(&good())], MultipleProofs),
        ("not a JWS", a, vec!["not.a-jws".into()], MalformedProof),
        ("typ JWT", a, vec![prover.sign_with("JWT", prover.jwk(), &good())], WrongTyp),
        ("no typ", a, vec![raw_jws(&no_typ_header, &good(), &junk_sig)], WrongTyp),
        ("alg none", a, vec![raw_jws(&none_header, &good(), b"")], UnacceptableAlg),
        ("alg HS256", a, vec![raw_jws(&hs_header, &good(), &hs_sig)], UnacceptableAlg),
        ("no jwk", a, vec![raw_jws(&no_jwk_header, &good(), &junk_sig)], NoJwk),
        ("jwk with d", a, vec![prover.sign_with("dpop+jwt", jwk_with_d, &good())], PrivateKeyInJwk),
        ("tampered claims", a, vec![tampered], BadSignature),
        ("signed by another key", a, vec![foreign_signature], BadSignature),
        ("no jti", a, vec![without("jti")], MissingJti),
        ("htm POST for GET", a, vec![with("htm", "POST".into())], WrongHtm),
        ("htm get", a, vec![with("htm", "get".into())], WrongHtm),
        ("htu other path", a, vec![with("htu", format!("{}/other", api.url()).into())], WrongHtu),
        ("htu a path prefix", a, vec![with("htu", format!("{}/", api.url()).into())], WrongHtu),
        ("htu https", a, vec![with("htu", url.replace("http:", "https:").into())], WrongHtu),
        ("htu other port", a, vec![with("htu", "http://127.0.0.1:1/accounts".into())], WrongHtu),
        ("htu localhost", a, vec![with("htu", url.replace("127.0.0.1", "localhost").into())], WrongHtu),
        ("htu relative", a, vec![with("htu", "/accounts".into())], WrongHtu),
        ("no iat", a, vec![without("iat")], MissingIat),
        ("iat 120 s old", a, vec![with("iat", (now() - 120).into())], IatOutOfWindow),
        ("iat 120 s ahead", a, vec![with("iat", (now() + 120).into())], IatOutOfWindow),
        ("no ath", a, vec![without("ath")], WrongAth),
        ("ath of another token", a, vec![with("ath", ath(&unbound).into())], WrongAth),
        ("no nonce", a, vec![without("nonce")], NonceMissing),
        ("stale nonce", a, vec![with("nonce", "not-the-nonce".into())], NonceStale),
        ("forged token", Some(&forged_auth), vec![forged_proof], InvalidToken),
        ("unbound token as DPoP", Some(&unbound_auth), vec![unbound_proof], TokenNotBound),
        ("proof by another key", a, vec![other_key_proof], KeyMismatch),
    ];
    let r = call(&url, "GET", Some(&auth), &[&sign(&good())]).await;
    accepted(&r, "good, before");
    for (what, authorization, proofs, reason) in &cases {
        let proofs: Vec<&str> = proofs.iter().map(String::as_str).collect();
        let r = call(&url, "GET", *authorization, &proofs).await;
        assert_refused(&r, *reason, what);
        let last = api.requests().pop().unwrap();
        assert_eq!(last.reason(), Some(*reason), "{what}: {:?}", last.refused);
        let nonce_header = r.header("dpop-nonce");
        if reason.error() == Some("use_dpop_nonce") {
            assert_eq!(nonce_header, Some(nonce.as_str()), "{what}");
        } else {
            assert_eq!(nonce_header, None, "{what}");
        }
    }
    // A replayed proof: accepted once, refused after.
    let once = sign(&good());
    let r = call(&url, "GET", Some(&auth), &[&once]).await;
    accepted(&r, "good, after");
    let r = call(&url, "GET", Some(&auth), &[&once]).await;
    assert_refused(&r, Reason::Replay, "replayed jti");
    let seen = api.wait_requests(cases.len() + 3).await;
    assert_eq!(seen.len(), cases.len() + 3);
    assert_eq!(api.accepted(), 2);
    assert_eq!(api.refusals().len(), cases.len() + 1);
}

/// Nonces rotate every N accepted requests (the Nth answer carries the
/// new one) and on demand; a proof with the old one is refused as stale
/// with the new one in `DPoP-Nonce`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_nonce_rotates_every_n_requests_and_on_demand() {
    let mut op = provider().await;
    let prover = Prover::new(Alg::Es256);
    let token = bound_token(&mut op, &prover).await;
    let api = DpopServer::start_with(
        op.jwks().await,
        DpopOptions {
            rotate_nonce_every: Some(2),
            ..DpopOptions::default()
        },
    )
    .await;
    let url = format!("{}/x", api.url());
    let auth = format!("DPoP {token}");
    let get = |nonce: String| {
        let proof = prover.proof("GET", &url, Some(&nonce), Some(&token));
        let (url, auth) = (url.clone(), auth.clone());
        async move { call(&url, "GET", Some(&auth), &[&proof]).await }
    };
    let first = api.nonce();
    let r = get(first.clone()).await;
    accepted(&r, "1st");
    assert_eq!(r.header("dpop-nonce"), Some(first.as_str()));
    let r = get(first.clone()).await;
    accepted(&r, "2nd");
    let second = r.header("dpop-nonce").expect("DPoP-Nonce").to_owned();
    assert_ne!(second, first, "rotated after 2");
    assert_eq!(second, api.nonce());
    let r = get(first.clone()).await;
    assert_refused(&r, Reason::NonceStale, "the old nonce");
    assert_eq!(r.header("dpop-nonce"), Some(second.as_str()));
    let r = get(second.clone()).await;
    accepted(&r, "3rd");
    let third = api.rotate_nonce();
    assert_ne!(third, second);
    let r = get(second.clone()).await;
    assert_refused(&r, Reason::NonceStale, "rotated on demand");
    assert_eq!(r.header("dpop-nonce"), Some(third.as_str()));
    let r = get(third.clone()).await;
    accepted(&r, "4th");
    assert_eq!(r.header("dpop-nonce"), Some(third.as_str()));
    assert_eq!(api.wait_requests(6).await.len(), 6);

    // Without nonces: no DPoP-Nonce, a proof without one accepted.
    let plain = DpopServer::start_with(
        op.jwks().await,
        DpopOptions {
            require_nonce: false,
            ..DpopOptions::default()
        },
    )
    .await;
    let url = format!("{}/x", plain.url());
    let proof = prover.proof("GET", &url, None, Some(&token));
    let r = call(&url, "GET", Some(&auth), &[&proof]).await;
    accepted(&r, "no nonce required");
    assert_eq!(r.header("dpop-nonce"), None);
}

/// `refuse_next(n)`: the next n requests that pass every check are
/// refused as `RefusedOnDemand` (`invalid_token`, as a revoked token);
/// a defective request in between is refused for its defect and does not
/// count; the jti of a refused good proof is spent; then good requests are
/// accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_next_refuses_good_requests_as_invalid_token_then_accepts_again() {
    let mut op = provider().await;
    let prover = Prover::new(Alg::Es256);
    let token = bound_token(&mut op, &prover).await;
    let api = DpopServer::start_with(
        op.jwks().await,
        DpopOptions {
            require_nonce: false,
            ..DpopOptions::default()
        },
    )
    .await;
    let url = format!("{}/x", api.url());
    let auth = format!("DPoP {token}");
    let good = || prover.proof("GET", &url, None, Some(&token));
    api.refuse_next(2);
    let first = good();
    let r = call(&url, "GET", Some(&auth), &[&first]).await;
    assert_refused(&r, Reason::RefusedOnDemand, "1st good request");
    let wrong_htm = prover.proof("POST", &url, None, Some(&token));
    let r = call(&url, "GET", Some(&auth), &[&wrong_htm]).await;
    assert_refused(&r, Reason::WrongHtm, "a defect is refused for itself");
    let r = call(&url, "GET", Some(&auth), &[&good()]).await;
    assert_refused(&r, Reason::RefusedOnDemand, "2nd good request");
    let r = call(&url, "GET", Some(&auth), &[&first]).await;
    assert_refused(&r, Reason::Replay, "a refused good proof's jti is spent");
    let r = call(&url, "GET", Some(&auth), &[&good()]).await;
    accepted(&r, "after the two refusals");
    assert_eq!(
        api.refusals(),
        [
            (StatusCode::UNAUTHORIZED, Reason::RefusedOnDemand),
            (StatusCode::UNAUTHORIZED, Reason::WrongHtm),
            (StatusCode::UNAUTHORIZED, Reason::RefusedOnDemand),
            (StatusCode::UNAUTHORIZED, Reason::Replay),
        ]
    );
    assert_eq!(api.accepted(), 1);
}

/// The EdDSA path: an Ed25519 key gets a bound token from oidc-provider
/// and its proofs verify; an ES256 proof for that token is another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ed25519_key_gets_a_bound_token_and_its_proofs_verify() {
    let mut op = provider().await;
    let prover = Prover::new(Alg::EdDsa);
    assert_eq!(prover.jwk()["kty"], "OKP");
    let token = bound_token(&mut op, &prover).await;
    let api = DpopServer::start(op.jwks().await).await;
    let url = format!("{}/ed", api.url());
    let auth = format!("DPoP {token}");
    let nonce = api.nonce();
    let r = call(
        &url,
        "GET",
        Some(&auth),
        &[&prover.proof("GET", &url, Some(&nonce), Some(&token))],
    )
    .await;
    let body = accepted(&r, "EdDSA");
    assert_eq!(body["claims"]["cnf"]["jkt"], prover.key.thumbprint());
    let es = Prover::new(Alg::Es256);
    let r = call(
        &url,
        "GET",
        Some(&auth),
        &[&es.proof("GET", &url, Some(&nonce), Some(&token))],
    )
    .await;
    assert_refused(
        &r,
        Reason::KeyMismatch,
        "ES256 proof for an EdDSA-bound token",
    );
    // An EdDSA signature under an EC jwk, and the other way round.
    let r = call(
        &url,
        "GET",
        Some(&auth),
        &[&prover.sign_with(
            "dpop+jwt",
            es.jwk(),
            &prover.claims("GET", &url, Some(&nonce), Some(&token)),
        )],
    )
    .await;
    assert_refused(&r, Reason::BadSignature, "EdDSA under an EC key");
}

/// Token lifetime, without waiting for one to end: an authorization
/// server key of the test's own signs a bound token whose `exp` has
/// passed, and one that is not yet expired as the control.
#[tokio::test]
async fn an_expired_bound_token_is_refused() {
    let issuer = Prover::new(Alg::Es256);
    let jwks = Jwks::from_json(&json!({ "keys": [issuer.key.public_jwk(Some("as-1"))] }));
    let prover = Prover::new(Alg::Es256);
    let api = DpopServer::start(jwks).await;
    let url = format!("{}/x", api.url());
    for (exp, reason) in [(now() + 60, None), (now() - 1, Some(Reason::TokenExpired))] {
        let claims = json!({"sub": "s", "exp": exp, "cnf": {"jkt": prover.key.thumbprint()}});
        let token = issuer
            .key
            .sign("at+jwt", Some("as-1"), &[], &claims)
            .unwrap();
        let proof = prover.proof("GET", &url, Some(&api.nonce()), Some(&token));
        let r = call(&url, "GET", Some(&format!("DPoP {token}")), &[&proof]).await;
        match reason {
            None => {
                accepted(&r, "unexpired");
            }
            Some(reason) => assert_refused(&r, reason, "expired"),
        }
    }
    assert_eq!(
        api.refusals(),
        [(StatusCode::UNAUTHORIZED, Reason::TokenExpired)]
    );
}

/// A client of the authorization_code and refresh_token grants.
const CODE_CLIENT: &str = "dpop-code";
const CALLBACK: &str = "http://127.0.0.1:9/callback";

/// POSTs `form` to `url` with a fresh proof carrying the provider's
/// latest nonce (`nonce`, updated from each `DPoP-Nonce`); once more with
/// the new nonce after `400 use_dpop_nonce`, never more.
async fn dpop_post(prover: &Prover, url: &str, form: &str, nonce: &mut Option<String>) -> Resp {
    let mut retried = false;
    loop {
        let proof = prover.proof("POST", url, nonce.as_deref(), None);
        let r = post_form(url, form, Some(&proof)).await;
        if let Some(n) = r.header("dpop-nonce") {
            *nonce = Some(n.to_owned());
        }
        let use_nonce = r.status == 400 && r.json()["error"] == "use_dpop_nonce";
        if !use_nonce || retried {
            return r;
        }
        retried = true;
    }
}

/// The launcher's other grants under `--dpop`: a code obtained through
/// oidc-provider's login and consent pages, exchanged with a proof for a
/// bound token and a refresh token; the refresh token rotates on use (the
/// old one is then refused) and the refreshed token is bound to the same
/// key; after revocation the current refresh token is refused too. One
/// nonce retry in all: the nonce learnt first is used from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_and_rotating_refresh_tokens_are_dpop_bound_and_revocable() {
    let client = json!([{
        "client_id": CODE_CLIENT,
        "client_secret": SECRET,
        "token_endpoint_auth_method": "client_secret_post",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "redirect_uris": [CALLBACK],
        "dpop_bound_access_tokens": true,
    }]);
    let mut op = AuthServer::start(&client, &["--dpop"]).await;
    let prover = Prover::new(Alg::Es256);
    let verifier = B64.encode(rand::random::<[u8; 32]>());
    let challenge = B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ));
    let query = flinks_proxy::ground::form::encode_pairs([
        ("client_id", CODE_CLIENT),
        ("response_type", "code"),
        ("redirect_uri", CALLBACK),
        ("scope", "openid offline_access api:read"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
        ("state", "s1"),
        ("prompt", "consent"),
    ]);
    let authorize = format!("{}/auth?{query}", op.issuer);
    let mut b = support::browser::Browser::new();
    let (back, _) =
        support::oidc::sign_in_and_consent(&mut b, &op.issuer, &authorize, "alice").await;
    assert!(back.starts_with(CALLBACK), "{back}\n{}", op.log());
    let code = support::browser::query_params(&back)["code"].clone();

    let url = op.token_url();
    let mut nonce = None;
    let form = flinks_proxy::ground::form::encode_pairs([
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", CALLBACK),
        ("code_verifier", verifier.as_str()),
        ("client_id", CODE_CLIENT),
        ("client_secret", SECRET),
    ]);
    let r = dpop_post(&prover, &url, &form, &mut nonce).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), op.log());
    let first = r.json();
    assert_eq!(first["token_type"], "DPoP", "{first}");
    let rt1 = first["refresh_token"].as_str().expect("refresh_token");

    let refresh = |rt: &str| {
        flinks_proxy::ground::form::encode_pairs([
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("client_id", CODE_CLIENT),
            ("client_secret", SECRET),
        ])
    };
    let r = dpop_post(&prover, &url, &refresh(rt1), &mut nonce).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), op.log());
    let second = r.json();
    assert_eq!(second["token_type"], "DPoP", "{second}");
    let rt2 = second["refresh_token"]
        .as_str()
        .expect("a rotated refresh token");
    assert_ne!(rt2, rt1, "rotateRefreshToken");
    let access = second["access_token"].as_str().unwrap();
    let jwks = op.jwks().await;
    let claims = jwks.verify(access).expect("the refreshed token verifies");
    assert_eq!(claims["cnf"]["jkt"], prover.key.thumbprint(), "{claims}");
    assert_eq!(claims["sub"], "alice", "{claims}");
    let api = DpopServer::start(jwks).await;
    let api_url = format!("{}/me", api.url());
    let proof = prover.proof("GET", &api_url, Some(&api.nonce()), Some(access));
    let r = call(&api_url, "GET", Some(&format!("DPoP {access}")), &[&proof]).await;
    accepted(&r, "the refreshed token");

    // The rotated-out refresh token is refused (oidc-provider then revokes
    // the grant; revoke the current one explicitly first).
    let revoke = flinks_proxy::ground::form::encode_pairs([
        ("token", rt2),
        ("token_type_hint", "refresh_token"),
        ("client_id", CODE_CLIENT),
        ("client_secret", SECRET),
    ]);
    let r = post_form(&format!("{}/token/revocation", op.issuer), &revoke, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    op.wait_for_line("revoked").await;
    for (what, rt) in [("revoked", rt2), ("rotated out", rt1)] {
        let r = dpop_post(&prover, &url, &refresh(rt), &mut nonce).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_grant", "{what}: {}", r.text());
    }

    let log = op.log();
    let outcomes: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("dpop POST /token "))
        .map(|l| l.rsplit_once(' ').unwrap().1)
        .collect();
    assert_eq!(
        outcomes,
        [
            "use_dpop_nonce",
            "ok",
            "ok",
            "invalid_grant",
            "invalid_grant"
        ],
        "{log}"
    );
    for grant in ["authorization_code", "refresh_token"] {
        let line = format!("token {grant} {CODE_CLIENT} token_type=DPoP ");
        assert!(log.contains(&line), "{line}\n{log}");
    }
}

/// `htu` normalization, alone.
#[test]
fn htu_normalization_follows_rfc_3986_syntax_rules() {
    let n = |s: &str| normalize_htu(s);
    assert_eq!(
        n("http://127.0.0.1:8080/a"),
        n("HTTP://127.0.0.1:8080/a?q#f")
    );
    assert_eq!(n("http://Example.COM/a"), n("http://example.com:80/a"));
    assert_eq!(n("https://example.com:443"), n("https://example.com/"));
    assert_eq!(n("http://h/%7euser/%2f"), n("http://h/~user/%2F"));
    assert_ne!(n("http://h/a"), n("http://h/A"));
    assert_ne!(n("http://h/a"), n("https://h/a"));
    assert_ne!(n("http://h:81/a"), n("http://h/a"));
    assert_eq!(n("/a"), None);
    assert_eq!(n("ftp://h/a"), None);
    assert_eq!(n("http://user@h/a"), None);
}

/// The challenge's `error` of each refusal (RFC 9449 §7.1 and §9, RFC
/// 6750 §3.1), pinned here so that `assert_refused` checks the RFC's codes
/// and not only the server's own mapping.
#[test]
fn refusals_map_to_rfc_9449_error_codes() {
    use Reason::*;
    assert_eq!(NoAuthorization.error(), None);
    for r in [NonceMissing, NonceStale] {
        assert_eq!(r.error(), Some("use_dpop_nonce"), "{r}");
    }
    for r in [
        WrongScheme,
        BoundTokenAsBearer,
        BearerNotAccepted,
        InvalidToken,
        TokenExpired,
        TokenNotBound,
        KeyMismatch,
        RefusedOnDemand,
    ] {
        assert_eq!(r.error(), Some("invalid_token"), "{r}");
    }
    for r in [
        NoProof,
        MultipleProofs,
        MalformedProof,
        WrongTyp,
        UnacceptableAlg,
        NoJwk,
        PrivateKeyInJwk,
        BadSignature,
        MissingJti,
        WrongHtm,
        WrongHtu,
        MissingIat,
        IatOutOfWindow,
        WrongAth,
        Replay,
    ] {
        assert_eq!(r.error(), Some("invalid_dpop_proof"), "{r}");
    }
}
