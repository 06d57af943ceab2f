//! The Grafana dashboard (issue 12 point 3): current schema, the
//! `datasource`, `instance` and `route` variables, and every PromQL
//! expression in it evaluated against a real Prometheus after traffic
//! (per-user connections and their store included), with the recording
//! rules loaded: each parses and returns data.

mod support;

use std::collections::BTreeSet;

use serde_json::Value;
use support::prometheus::{repo_file, Monitored};

/// Oldest Grafana dashboard schema accepted (Grafana 10.4 / 11).
const MIN_SCHEMA_VERSION: u64 = 39;

fn dashboard() -> Value {
    let path = repo_file("deploy/grafana/flinks-proxy.json");
    let text = std::fs::read_to_string(&path).expect("dashboard readable");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// (panel title, expression) for every query target.
fn expressions(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_owned();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_owned())))
        })
        .collect()
}

/// What Grafana substitutes: every instance and route ("All"), and a
/// rate window that covers several 1 s scrapes.
fn substitute(expr: &str) -> String {
    let e = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("$instance", ".+")
        .replace("$route", ".+");
    assert!(!e.contains('$'), "unknown variable left in {e}");
    e
}

/// Metric names an expression reads (histogram series by their family;
/// recorded series `level:metric:operation` by their metric).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter_map(|w| w.split(':').find(|part| part.starts_with("flinks_proxy_")))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

/// `label_values(SELECTOR, LABEL)` as PromQL that returns one sample per
/// value.
fn label_values_query(q: &str) -> String {
    let inner = q
        .trim()
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not label_values(...): {q}"));
    let (selector, label) = inner
        .rsplit_once(',')
        .expect("label_values(selector, label)");
    format!("count by ({}) ({})", label.trim(), selector.trim())
}

#[test]
fn dashboard_has_current_schema_variables_and_a_panel_per_concern() {
    let d = dashboard();
    let version = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(version >= MIN_SCHEMA_VERSION, "schemaVersion {version}");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));

    let vars = d["templating"]["list"].as_array().expect("variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["instance", "route"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert!(
            v["query"]["query"]
                .as_str()
                .is_some_and(|q| q.starts_with("label_values(") && q.ends_with(&format!("{name})"))),
            "{name}: {v}"
        );
    }

    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id: {p}"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "no gridPos: {p}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }

    // The concerns the issue lists, each read by some panel.
    let read: BTreeSet<String> = expressions(&d)
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    for family in [
        "flinks_proxy_requests_total",
        "flinks_proxy_request_duration_seconds",
        "flinks_proxy_upstream_errors_total",
        "flinks_proxy_token_requests_total",
        "flinks_proxy_token_expiry_timestamp_seconds",
        "flinks_proxy_token_replays_total",
        "flinks_proxy_inflight_requests",
        "flinks_proxy_connections",
        "flinks_proxy_store_operations_total",
        "flinks_proxy_webhook_deliveries_total",
        "flinks_proxy_webhook_queue",
        "flinks_proxy_webhook_oldest_pending_seconds",
        "flinks_proxy_connection_refresh_token_idle_seconds",
        "flinks_proxy_keepalive_refreshes_total",
    ] {
        assert!(read.contains(family), "no panel reads {family}: {read:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_parses_and_returns_data_from_a_real_prometheus() {
    let d = dashboard();
    let m = Monitored::start().await;
    m.send_traffic().await;

    let vars = d["templating"]["list"].as_array().expect("variables");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = label_values_query(v["query"]["query"].as_str().expect("query"));
        let q = substitute(&q);
        m.prometheus.wait_for(&q, |s| !s.is_empty()).await;
    }

    let exprs = expressions(&d);
    assert!(exprs.len() >= 15, "{} expressions", exprs.len());
    for (title, expr) in &exprs {
        let e = substitute(expr);
        let samples = m
            .prometheus
            .wait_for(&e, |s| s.iter().any(|s| s.value.is_finite()))
            .await;
        assert!(!samples.is_empty(), "{title}: {e}");
    }
}

#[test]
fn expression_helpers_find_metric_families_and_variables() {
    let e = r#"histogram_quantile(0.99, sum by (op, le) (rate(flinks_proxy_store_operation_duration_seconds_bucket{instance=~"$instance"}[$__rate_interval])))"#;
    assert_eq!(
        metric_names(e),
        BTreeSet::from(["flinks_proxy_store_operation_duration_seconds".to_owned()])
    );
    let recorded = "instance_route_le:flinks_proxy_request_duration_seconds_bucket:rate5m";
    assert_eq!(
        metric_names(recorded),
        BTreeSet::from(["flinks_proxy_request_duration_seconds".to_owned()])
    );
    assert_eq!(
        substitute(r#"x{instance=~"$instance"}[$__rate_interval]"#),
        r#"x{instance=~".+"}[1m]"#
    );
    assert_eq!(
        label_values_query(r#"label_values(m{instance=~"$instance"}, route)"#),
        r#"count by (route) (m{instance=~"$instance"})"#
    );
}
