//! The deployment files (issue 12 point 4) against the proxy.toml each
//! ships with: the config parses with `Config::parse` (its secret files
//! stood in by temporary ones), and ports, paths, probe URLs, secret names
//! and the shutdown budget agree between the config and the manifests.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flinks_proxy::Config;
use serde_yaml_ng::Value;
use support::prometheus::repo_file;
use support::TempDir;

/// The binary's exit code for a bad config (src/cli.rs).
const EXIT_BAD_CONFIG: &str = "64";
/// RSS measured at 256 concurrent connections (README, Performance:
/// `benches/compare.sh`, commit 04711df, flinks-proxy at 256 connections).
const MEASURED_RSS_MIB: f64 = 23.1;

// ------------------------------------------------------------ helpers

/// Every `{ file = "..." }` secret path in a proxy.toml.
fn file_secrets(toml_text: &str) -> Vec<String> {
    fn walk(v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                if let (1, Some(toml::Value::String(p))) = (t.len(), t.get("file")) {
                    out.push(p.clone());
                }
                t.values().for_each(|v| walk(v, out));
            }
            toml::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let value: toml::Value = toml::from_str(toml_text).expect("proxy.toml is TOML");
    let mut out = Vec::new();
    walk(&value, &mut out);
    out
}

/// Parses a shipped proxy.toml whose secret files live under `secrets_dir`
/// on the target machine: each is stood in by a file in a temporary folder.
/// Returns the config and the secret file names.
fn parse_shipped(toml_text: &str, secrets_dir: &str) -> (Config, Vec<String>) {
    let tmp = TempDir::new();
    let mut text = toml_text.to_owned();
    let mut names = Vec::new();
    for path in file_secrets(toml_text) {
        let name = path
            .strip_prefix(secrets_dir)
            .and_then(|n| n.strip_prefix('/'))
            .unwrap_or_else(|| panic!("secret {path} is not under {secrets_dir}"));
        let stand_in = tmp.write(name, "test-secret-value");
        let quoted = format!("\"{path}\"");
        assert!(text.contains(&quoted), "{quoted}");
        text = text.replace(&quoted, &format!("\"{}\"", stand_in.display()));
        names.push(name.to_owned());
    }
    let config = Config::parse(&text, &tmp.join("proxy.toml"))
        .unwrap_or_else(|e| panic!("shipped proxy.toml: {e}\n{text}"));
    (config, names)
}

fn manifest(name: &str) -> Value {
    let path = repo_file(&format!("deploy/kubernetes/{name}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn text<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {v:?}"))
}

fn int(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what}: not a number: {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what}: not a list: {v:?}"))
}

/// `64Mi` / `1Gi` in MiB.
fn mebibytes(q: &str) -> f64 {
    let (n, unit) = q.split_at(q.find(|c: char| c.is_alphabetic()).unwrap_or(q.len()));
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    match unit {
        "Mi" => n,
        "Gi" => n * 1024.0,
        _ => panic!("use Mi or Gi: {q}"),
    }
}

// --------------------------------------------------------- Kubernetes

struct Kubernetes {
    config: Config,
    secret_names: Vec<String>,
    deployment: Value,
    container: Value,
    service: Value,
}

const K8S_SECRETS_DIR: &str = "/var/run/secrets/flinks-proxy";

fn kubernetes() -> Kubernetes {
    let cm = manifest("configmap.yaml");
    assert_eq!(cm["kind"], "ConfigMap");
    let toml_text = text(&cm["data"]["proxy.toml"], "ConfigMap data proxy.toml");
    let (config, secret_names) = parse_shipped(toml_text, K8S_SECRETS_DIR);
    let deployment = manifest("deployment.yaml");
    let containers = seq(
        &deployment["spec"]["template"]["spec"]["containers"],
        "containers",
    );
    assert_eq!(containers.len(), 1);
    Kubernetes {
        config,
        secret_names,
        container: containers[0].clone(),
        deployment,
        service: manifest("service.yaml"),
    }
}

impl Kubernetes {
    fn container_port(&self, name: &str) -> u64 {
        let ports = seq(&self.container["ports"], "container ports");
        let port = ports
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"));
        int(&port["containerPort"], name)
    }

    fn volume_of_mount(&self, mount_path: &str) -> Value {
        let mounts = seq(&self.container["volumeMounts"], "volumeMounts");
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"] == mount_path)
            .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
        let volumes = seq(
            &self.deployment["spec"]["template"]["spec"]["volumes"],
            "volumes",
        );
        volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {:?}", mount["name"]))
            .clone()
    }

    fn pod_labels(&self) -> &Value {
        &self.deployment["spec"]["template"]["metadata"]["labels"]
    }
}

/// Every `selector` key/value is a label of the pods.
fn selects(selector: &Value, labels: &Value) {
    let map = selector.as_mapping().expect("selector map");
    assert!(!map.is_empty());
    for (k, v) in map {
        assert_eq!(&labels[k.as_str().expect("key")], v, "selector {k:?}");
    }
}

#[test]
fn kubernetes_ports_and_probes_match_the_shipped_config() {
    let k = kubernetes();
    let (proxy, admin) = (
        k.config.server.listen,
        k.config.admin_listen.expect("admin"),
    );
    assert!(
        proxy.ip().is_unspecified() && admin.ip().is_unspecified(),
        "listen on 0.0.0.0"
    );
    assert_eq!(k.container_port("http"), u64::from(proxy.port()));
    assert_eq!(k.container_port("admin"), u64::from(admin.port()));

    let probe = |name: &str| {
        let get = &k.container[name]["httpGet"];
        (
            text(&get["path"], name).to_owned(),
            text(&get["port"], name).to_owned(),
        )
    };
    assert_eq!(probe("livenessProbe"), ("/healthz".into(), "admin".into()));
    assert_eq!(probe("readinessProbe"), ("/readyz".into(), "admin".into()));
    assert_eq!(probe("startupProbe"), ("/healthz".into(), "admin".into()));

    // The Service sends traffic to the proxy port and exposes the admin
    // port by name for the ServiceMonitor.
    selects(&k.service["spec"]["selector"], k.pod_labels());
    let ports = seq(&k.service["spec"]["ports"], "service ports");
    let target = |name: &str| {
        ports
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| text(&p["targetPort"], name).to_owned())
    };
    assert_eq!(target("http").as_deref(), Some("http"));
    assert_eq!(target("admin").as_deref(), Some("admin"));

    let monitor = manifest("servicemonitor.yaml");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["kind"], "ServiceMonitor");
    selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &k.service["metadata"]["labels"],
    );
    let endpoints = seq(&monitor["spec"]["endpoints"], "endpoints");
    assert_eq!(endpoints[0]["port"], "admin");
    assert_eq!(endpoints[0]["path"], "/metrics");
}

#[test]
fn kubernetes_shutdown_budget_covers_the_pre_stop_sleep_and_the_drain() {
    let k = kubernetes();
    let spec = &k.deployment["spec"];
    assert_eq!(int(&spec["replicas"], "replicas"), 3);
    let grace = int(
        &spec["template"]["spec"]["terminationGracePeriodSeconds"],
        "grace",
    );
    let pre_stop = int(
        &k.container["lifecycle"]["preStop"]["sleep"]["seconds"],
        "preStop",
    );
    let drain = k.config.server.shutdown_grace;
    assert!(pre_stop > 0);
    assert!(
        Duration::from_secs(grace) > drain + Duration::from_secs(pre_stop),
        "terminationGracePeriodSeconds {grace} <= shutdown_grace {drain:?} + preStop {pre_stop}s"
    );

    let pdb = manifest("pdb.yaml");
    assert_eq!(pdb["kind"], "PodDisruptionBudget");
    selects(&pdb["spec"]["selector"]["matchLabels"], k.pod_labels());
    let min = int(&pdb["spec"]["minAvailable"], "minAvailable");
    assert!(min >= 1 && min < int(&spec["replicas"], "replicas"));
}

#[test]
fn kubernetes_pod_is_non_root_read_only_and_sized_from_measured_rss() {
    let k = kubernetes();
    let pod = &k.deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(int(&pod["securityContext"]["runAsUser"], "runAsUser") > 0);
    let sc = &k.container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(seq(&sc["capabilities"]["drop"], "drop")[0], "ALL");

    let res = &k.container["resources"];
    let request = mebibytes(text(&res["requests"]["memory"], "memory request"));
    let limit = mebibytes(text(&res["limits"]["memory"], "memory limit"));
    assert!(request >= 1.5 * MEASURED_RSS_MIB, "request {request} MiB");
    assert!(
        limit >= 4.0 * MEASURED_RSS_MIB && limit >= request,
        "limit {limit} MiB"
    );
    assert!(res["requests"]["cpu"].as_str().is_some());
}

#[test]
fn kubernetes_config_and_secrets_are_mounted_where_the_config_reads_them() {
    let k = kubernetes();
    let args: Vec<&str> = seq(&k.container["args"], "args")
        .iter()
        .map(|a| text(a, "arg"))
        .collect();
    let config_path = Path::new(
        args[args
            .iter()
            .position(|a| *a == "--config")
            .expect("--config")
            + 1],
    );
    let config_volume =
        k.volume_of_mount(config_path.parent().expect("dir").to_str().expect("utf-8"));
    assert_eq!(
        config_volume["configMap"]["name"],
        manifest("configmap.yaml")["metadata"]["name"]
    );
    assert_eq!(config_path.file_name().expect("file"), "proxy.toml");

    let secret = manifest("secret.example.yaml");
    let secret_volume = k.volume_of_mount(K8S_SECRETS_DIR);
    assert_eq!(
        secret_volume["secret"]["secretName"],
        secret["metadata"]["name"]
    );
    let keys: Vec<&str> = secret["stringData"]
        .as_mapping()
        .expect("stringData")
        .keys()
        .map(|k| text(k, "key"))
        .collect();
    assert!(!k.secret_names.is_empty());
    for name in &k.secret_names {
        assert!(
            keys.contains(&name.as_str()),
            "secret file {name} not in the Secret: {keys:?}"
        );
    }
    for wanted in ["client-secret", "store-key", "store-url"] {
        assert!(keys.contains(&wanted), "the Secret example has no {wanted}");
    }
    // Writable state (state files, SQLite) and nothing else writable.
    assert!(k.volume_of_mount("/var/lib/flinks-proxy")["emptyDir"].is_mapping());

    let kustomization = manifest("kustomization.yaml");
    let listed: Vec<&str> = seq(&kustomization["resources"], "resources")
        .iter()
        .map(|r| text(r, "resource"))
        .collect();
    for f in [
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "servicemonitor.yaml",
    ] {
        assert!(listed.contains(&f), "kustomization lacks {f}");
    }
    assert!(!listed.contains(&"secret.example.yaml"));
}

// ------------------------------------------------------------ systemd

const UNIT: &str = "deploy/systemd/flinks-proxy.service";
/// `%d` of a system service: `/run/credentials/UNIT`.
const CREDENTIALS_DIR: &str = "/run/credentials/flinks-proxy.service";

/// `Key=value` lines of a unit file, every value of repeated keys in order.
fn unit_settings(path: &Path) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(path).expect("unit readable");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        out.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    out
}

fn one<'a>(s: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match s.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{key}: expected one value, got {other:?}"),
    }
}

#[test]
fn systemd_unit_matches_its_config_and_is_hardened() {
    let unit: PathBuf = repo_file(UNIT);
    let s = unit_settings(&unit);
    let exec: Vec<&str> = one(&s, "ExecStart").split_whitespace().collect();
    assert_eq!(exec[1..3][0], "--config");
    let config_path = exec[2];
    assert_eq!(
        config_path,
        format!("/etc/{}/proxy.toml", one(&s, "ConfigurationDirectory"))
    );
    let shipped = std::fs::read_to_string(repo_file("deploy/systemd/proxy.toml")).expect("toml");
    let (config, secret_names) = parse_shipped(&shipped, CREDENTIALS_DIR);

    // Every secret the config reads is loaded as a credential.
    let loaded: Vec<&str> = s["LoadCredential"]
        .iter()
        .map(|v| v.split_once(':').expect("NAME:PATH").0)
        .collect();
    assert!(secret_names.iter().any(|n| n == "client-secret"));
    for name in &secret_names {
        assert!(
            loaded.contains(&name.as_str()),
            "{name} not in LoadCredential=: {loaded:?}"
        );
    }
    // State files go to the StateDirectory.
    let state_dir = format!("/var/lib/{}", one(&s, "StateDirectory"));
    assert!(
        shipped.contains(&state_dir),
        "proxy.toml does not mention {state_dir}"
    );
    for c in config.credentials.values() {
        if let Some(p) = &c.state_file {
            assert!(p.starts_with(&state_dir), "{}", p.display());
        }
    }

    assert_eq!(one(&s, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one(&s, "KillSignal"), "SIGTERM");
    let stop: u64 = one(&s, "TimeoutStopSec").parse().expect("seconds");
    assert!(Duration::from_secs(stop) > config.server.shutdown_grace);
    assert_eq!(one(&s, "RestartPreventExitStatus"), EXIT_BAD_CONFIG);
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
    ] {
        assert_eq!(one(&s, key), value, "{key}");
    }
    // The admin listener stays on the host; Prometheus scrapes it there.
    assert!(config.admin_listen.expect("admin").ip().is_loopback());
}

// ------------------------------------------------------------ container

/// The sources of the Dockerfile's build-stage `COPY` lines (up to the
/// second `FROM`), as paths in the repository.
fn build_stage_copies() -> Vec<String> {
    let text = std::fs::read_to_string(repo_file("Dockerfile")).expect("Dockerfile");
    let mut out = Vec::new();
    let mut stages = 0;
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("FROM") => {
                stages += 1;
                if stages > 1 {
                    break;
                }
            }
            Some("COPY") => {
                let args: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
                assert!(args.len() >= 2, "COPY without a destination: {line}");
                let sources = &args[..args.len() - 1];
                out.extend(
                    sources
                        .iter()
                        .map(|s| s.trim_start_matches("./").to_owned()),
                );
            }
            _ => {}
        }
    }
    out
}

/// The quick half of `.ci/docker-context` (which builds from a copy): what
/// the compiler reads beyond `src/` — every `sqlx::migrate!` folder, every
/// target path in Cargo.toml and the build script — is under a build-stage
/// `COPY`.
#[test]
fn dockerfile_copies_everything_the_build_reads() {
    let copies = build_stage_copies();
    let copied = |path: &str| {
        copies
            .iter()
            .any(|c| path == c || path.starts_with(&format!("{}/", c.trim_end_matches('/'))))
    };
    let mut read = vec!["Cargo.toml".to_owned(), "Cargo.lock".to_owned()];
    // Cargo runs a build.rs at the package root when there is one.
    if repo_file("build.rs").exists() {
        read.push("build.rs".to_owned());
    }
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo_file("Cargo.toml")).expect("Cargo.toml"))
            .expect("Cargo.toml parses");
    read.extend(manifest["lib"]["path"].as_str().map(str::to_owned));
    for kind in ["bin", "bench"] {
        for target in manifest[kind].as_array().into_iter().flatten() {
            let name = target["name"].as_str().expect("target name");
            read.push(
                target
                    .get("path")
                    .and_then(|p| p.as_str())
                    .map_or_else(|| format!("benches/{name}.rs"), str::to_owned),
            );
        }
    }
    let mut stack = vec![repo_file("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for rest in text.split("sqlx::migrate!(\"").skip(1) {
                read.extend(rest.split_once('"').map(|(dir, _)| dir.to_owned()));
            }
        }
    }
    assert!(
        read.iter().any(|r| r.starts_with("migrations/")),
        "no sqlx::migrate! found: {read:?}"
    );
    for path in &read {
        assert!(
            copied(path),
            "the Dockerfile's build stage does not COPY {path} (copies {copies:?})"
        );
    }
}
