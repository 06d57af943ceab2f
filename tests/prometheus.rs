//! The metrics as a real Prometheus sees them (issue 12 points 1 and 2):
//! series scraped from the admin listener arrive with the expected labels
//! and values, the recording and alert rules load and evaluate against
//! them, and `promtool` checks and unit-tests the rules. These tests need
//! Debian's `prometheus` package and fail without it.

mod support;

use std::collections::BTreeSet;

use support::prometheus::{promtool, repo_file, Monitored, Sample, JOB, POOL_USERS, WRONG_SECRET};

/// The value of the only sample of `expr`, once it satisfies `done`.
async fn value(m: &Monitored, expr: &str, done: impl Fn(f64) -> bool) -> Sample {
    let sample = m.prometheus.wait_for_value(expr, done).await;
    assert_eq!(sample.label("job"), JOB, "{sample:?}");
    assert_eq!(sample.label("instance"), m.instance(), "{sample:?}");
    sample
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_arrive_in_a_real_prometheus_with_their_labels_and_values() {
    let m = Monitored::start().await;
    m.send_traffic().await;

    let requests = |route: &str, status: &str| {
        format!("flinks_proxy_requests_total{{route=\"{route}\",status=\"{status}\"}}")
    };
    value(&m, &requests("flinks", "200"), |v| v == 4.0).await;
    value(&m, &requests("status", "404"), |v| v == 1.0).await;
    value(&m, &requests("none", "404"), |v| v == 1.0).await;
    value(&m, &requests("dead", "502"), |v| v == 2.0).await;
    value(&m, &requests("broken", "503"), |v| v == 2.0).await;
    let upstream_errors = r#"flinks_proxy_upstream_errors_total{route="dead",kind="connect"}"#;
    value(&m, upstream_errors, |v| v == 2.0).await;
    let count = r#"flinks_proxy_request_duration_seconds_count{route="flinks"}"#;
    value(&m, count, |v| v == 4.0).await;
    value(
        &m,
        r#"flinks_proxy_token_replays_total{route="flinks"}"#,
        |v| v == 1.0,
    )
    .await;
    // The first token and the one after the revocation.
    let token = |credential: &str, outcome: &str| {
        format!("flinks_proxy_token_requests_total{{credential=\"{credential}\",outcome=\"{outcome}\"}}")
    };
    value(&m, &token("flinks", "success"), |v| v == 2.0).await;
    value(&m, &token("broken", "rejected"), |v| v >= 1.0).await;
    value(&m, &token("broken", "success"), |v| v == 0.0).await;
    let histogram = r#"flinks_proxy_token_request_duration_seconds_count{credential="flinks"}"#;
    value(&m, histogram, |v| v == 2.0).await;
    // The sandbox's tokens live an hour.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let expiry = r#"flinks_proxy_token_expiry_timestamp_seconds{credential="flinks"}"#;
    value(&m, expiry, |v| (now + 3000.0..now + 3700.0).contains(&v)).await;
    value(&m, "flinks_proxy_inflight_requests", |v| v == 0.0).await;
    let reloads = r#"flinks_proxy_config_reloads_total{outcome="success"}"#;
    value(&m, reloads, |v| v == 1.0).await;
    value(&m, "process_resident_memory_bytes", |v| v > 1e6).await;
    pooled_series_arrive(&m).await;

    // A recording rule from rules.yml, evaluated on these series.
    let p99 = r#"instance_route:flinks_proxy_request_duration_seconds:p99_5m{route="flinks"}"#;
    value(&m, p99, |v| v > 0.0 && v <= 30.0).await;

    // Alerts from alerts.yml turn pending on the real series.
    for (alert, route) in [
        ("FlinksProxyTokenUnavailable", "broken"),
        ("FlinksProxyUpstreamErrors", "dead"),
    ] {
        let pending = format!("ALERTS{{alertname=\"{alert}\",alertstate=\"pending\"}}");
        let s = value(&m, &pending, |v| v == 1.0).await;
        assert_eq!(s.label("route"), route, "{s:?}");
    }
    // The revoked consent: the gauge went from 0 to 1.
    let reauth =
        r#"ALERTS{alertname="FlinksProxyConnectionsNeedReauthorization",alertstate="pending"}"#;
    let s = m.prometheus.wait_for_value(reauth, |v| v == 1.0).await;
    assert_eq!(s.label("pool"), "users", "{s:?}");
    // The store works: its alert, evaluated on the same series for as long
    // as the one above, is not even pending.
    let store_alert = r#"ALERTS{alertname="FlinksProxyStoreUnavailable"}"#;
    let firing = m.prometheus.query(store_alert).await.expect("query");
    assert!(firing.is_empty(), "{firing:?}");

    // No label anywhere carries the refused client secret or a path.
    let every = m
        .prometheus
        .wait_for(r#"{__name__=~"flinks_proxy_.+"}"#, |s| !s.is_empty())
        .await;
    let values: BTreeSet<&str> = every
        .iter()
        .flat_map(|s| s.labels.values().map(String::as_str))
        .collect();
    for v in &values {
        assert!(!v.contains(WRONG_SECRET), "secret in a label: {v}");
        assert!(
            !v.contains("/nowhere") && !v.contains("accounts"),
            "path in a label: {v}"
        );
    }
    let routes: BTreeSet<&str> = every.iter().map(|s| s.label("route")).collect();
    for r in ["flinks", "status", "dead", "broken", "none", "users"] {
        assert!(routes.contains(r), "no series for route {r}: {routes:?}");
    }
}

/// The per-user connection and store series after [`Monitored::send_traffic`]:
/// three users connected, one of them turned `needs_reauthorization`, one
/// refresh.
async fn pooled_series_arrive(m: &Monitored) {
    let users = POOL_USERS.len() as f64;
    let requests = |status: &str| {
        format!("flinks_proxy_requests_total{{route=\"users\",status=\"{status}\"}}")
    };
    value(m, &requests("200"), |v| v == users + 1.0).await;
    value(m, &requests("401"), |v| v == 1.0).await;
    // The gauge is read from the store every 5 s.
    let state =
        |state: &str| format!("flinks_proxy_connections{{pool=\"users\",state=\"{state}\"}}");
    value(m, &state("active"), |v| v == users - 1.0).await;
    value(m, &state("needs_reauthorization"), |v| v == 1.0).await;
    let tokens = |source: &str| {
        format!("flinks_proxy_connection_tokens_total{{pool=\"users\",source=\"{source}\"}}")
    };
    value(m, &tokens("refresh"), |v| v == 1.0).await;
    // Each user's first request reads the store; alice's second and bob's
    // after the revocation find their token in memory.
    value(m, &tokens("store"), |v| v == users).await;
    value(m, &tokens("memory"), |v| v == 2.0).await;
    // One code exchange per user, then the refresh.
    let token_requests = |outcome: &str| {
        format!(
            "flinks_proxy_connection_token_requests_total{{pool=\"users\",outcome=\"{outcome}\"}}"
        )
    };
    value(m, &token_requests("success"), |v| v == users + 1.0).await;
    value(m, &token_requests("rejected"), |v| v == 0.0).await;

    // Store operations: counted by op with outcome ok or error, and timed.
    let ops = m
        .prometheus
        .wait_for("flinks_proxy_store_operations_total", |s| {
            s.iter()
                .any(|s| s.label("op") == "counts" && s.label("outcome") == "ok" && s.value > 0.0)
        })
        .await;
    for s in &ops {
        assert!(["ok", "error"].contains(&s.label("outcome")), "{s:?}");
        assert!(!s.label("op").is_empty(), "{s:?}");
        assert_eq!(s.label("instance"), m.instance(), "{s:?}");
    }
    let ok: f64 = ops
        .iter()
        .filter(|s| s.label("outcome") == "ok")
        .map(|s| s.value)
        .sum();
    assert!(
        ok >= users,
        "at least one write per connected user: {ops:?}"
    );
    let timed = r#"flinks_proxy_store_operation_duration_seconds_count{op="counts"}"#;
    value(m, timed, |v| v >= 1.0).await;

    // Webhook series exist from the start, at 0 (no [webhooks] here: the
    // queue is still the store's).
    for outcome in ["delivered", "retried", "rejected", "expired"] {
        let s = format!("flinks_proxy_webhook_deliveries_total{{outcome=\"{outcome}\"}}");
        value(m, &s, |v| v == 0.0).await;
    }
    value(m, "flinks_proxy_webhook_oldest_pending_seconds", |v| {
        v >= 0.0
    })
    .await;
    value(m, "flinks_proxy_webhook_queue", |v| v >= 0.0).await;
    // Keep-alive: the idle gauge for every pool (its users were connected
    // just now: under a minute), the refreshes counter at 0 without
    // keepalive.
    let idle = r#"flinks_proxy_connection_refresh_token_idle_seconds{pool="users"}"#;
    value(m, idle, |v| (0.0..60.0).contains(&v)).await;
    let keepalive = |outcome: &str| {
        format!("flinks_proxy_keepalive_refreshes_total{{pool=\"users\",outcome=\"{outcome}\"}}")
    };
    for outcome in flinks_proxy::ground::metrics::KEEPALIVE_OUTCOMES {
        value(m, &keepalive(outcome), |v| v == 0.0).await;
    }
}

#[test]
fn alert_and_recording_rules_pass_promtool_check() {
    let (ok, out) = promtool(&[
        "check",
        "rules",
        "deploy/prometheus/rules.yml",
        "deploy/prometheus/alerts.yml",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 13 rules found"), "{out}");
}

#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    let (ok, out) = promtool(&["test", "rules", "deploy/prometheus/alerts.test.yml"]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

// ----------------------------------------------------- the rule files' shape

fn yaml(path: &str) -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(repo_file(path)).expect("readable");
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every alert: name and annotations.
fn alerts() -> Vec<(String, serde_yaml_ng::Value)> {
    let doc = yaml("deploy/prometheus/alerts.yml");
    let groups = doc["groups"].as_sequence().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .filter_map(|r| Some((r["alert"].as_str()?.to_owned(), r["annotations"].clone())))
        .collect()
}

/// GitHub's anchor of a heading: lower case, spaces to '-', other
/// punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_says_what_to_do_and_links_its_runbook_entry() {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("README");
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    let all = alerts();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "FlinksProxyDown",
        "FlinksProxyTokenEndpointFailing",
        "FlinksProxyTokenExpiringWithoutRenewal",
        "FlinksProxyTokenUnavailable",
        "FlinksProxyUpstreamErrors",
        "FlinksProxyHighLatency",
        "FlinksProxyConnectionsNeedReauthorization",
        "FlinksProxyStoreUnavailable",
        "FlinksProxyConfigReloadFailed",
        "FlinksProxyRefreshTokenIdle",
    ] {
        assert!(names.contains(&wanted), "{wanted} missing: {names:?}");
    }
    for (name, annotations) in &all {
        let text = |k: &str| annotations[k].as_str().unwrap_or("").to_owned();
        assert!(!text("summary").is_empty(), "{name}: no summary");
        assert!(
            text("description").len() > 80,
            "{name}: description too thin"
        );
        let url = text("runbook_url");
        let fragment = url
            .strip_prefix("README.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url:?} is not README.md#anchor"));
        assert_eq!(
            fragment,
            name.to_lowercase(),
            "{name}: anchor is the alert name"
        );
        assert!(
            anchors.contains(fragment),
            "{name}: README has no heading #{fragment}"
        );
    }
}

#[test]
fn every_alert_is_unit_tested_firing_and_not_firing() {
    let doc = yaml("deploy/prometheus/alerts.test.yml");
    let cases: Vec<&serde_yaml_ng::Value> = doc["tests"]
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten())
        .collect();
    for (name, _) in alerts() {
        let of_this: Vec<_> = cases
            .iter()
            .filter(|c| c["alertname"].as_str() == Some(name.as_str()))
            .map(|c| c["exp_alerts"].as_sequence().map_or(0, Vec::len))
            .collect();
        assert!(
            of_this.iter().any(|&n| n > 0),
            "{name}: no case where it fires"
        );
        assert!(
            of_this.contains(&0),
            "{name}: no case where it must not fire"
        );
    }
}
