//! The deployment artifacts, checked without Docker or a cluster (neither exists where Sluice is
//! developed):
//!
//! - `compose/docker-compose.yml` against the Compose Specification's JSON schema (vendored in
//!   `tests/fixtures/compose-spec.json`) and against Sluice's hardening rules: read-only root,
//!   no capabilities, no-new-privileges, a non-root user, memory and CPU limits, no port
//!   published beyond loopback but the API's, RabbitMQ and Redis on internal networks only,
//!   every secret defined and every `*_FILE` pointing at a secret the service mounts;
//! - `deploy/k8s/`: every Deployment's security context and limits, the kustomization listing
//!   every manifest, the KEDA trigger on the queue the code declares;
//! - every `SLUICE_*` and `OTEL_*` variable set in either against the variables the built
//!   binaries read (their `--help`);
//! - `compose/prometheus/alerts.yml` and the Grafana dashboard against the metrics Sluice
//!   exports, and the Prometheus, Grafana and OpenTelemetry files against the compose file;
//! - the Dockerfiles the compose file builds: portable code (no `native`, no RUSTFLAGS over
//!   `.cargo/config.toml`), a non-root user in every image, the CUDA worker on NVIDIA's images.
//!
//! Each checker returns its findings, so the tests at the end can show that each one catches a
//! broken copy of the real file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sluice_proto::Priority;
use sluice_shared::Keyspace;
use sluice_tests::workspace_bin;

/// Every metric Sluice exports, and whether it is a histogram (then `_bucket`, `_sum` and
/// `_count` are its series).
const METRICS: &[(&str, bool)] = &[
    // API
    ("sluice_http_requests_total", false),
    ("sluice_http_request_duration_seconds", true),
    ("sluice_rejections_total", false),
    ("sluice_jobs_enqueued_total", false),
    ("sluice_queue_depth", false),
    ("sluice_queue_oldest_job_age_seconds", false),
    ("sluice_tenant_requests_total", false),
    ("sluice_live_workers", false),
    // Worker
    ("sluice_jobs_started_total", false),
    ("sluice_jobs_finished_total", false),
    ("sluice_time_to_first_token_seconds", true),
    ("sluice_inter_token_latency_seconds", true),
    ("sluice_e2e_request_latency_seconds", true),
    ("sluice_queue_wait_seconds", true),
    ("sluice_prompt_tokens_total", false),
    ("sluice_generation_tokens_total", false),
    ("sluice_tenant_tokens_total", false),
    ("sluice_num_requests_running", false),
    ("sluice_num_requests_waiting", false),
    ("sluice_batch_size", true),
    ("sluice_kv_cache_usage_ratio", false),
    ("sluice_gpu_memory_used_bytes", false),
    ("sluice_gpu_memory_total_bytes", false),
    ("sluice_worker_info", false),
];

/// The alerts the deployment promises (README.md, "Deployment").
const REQUIRED_ALERTS: &[&str] = &[
    "SluiceHighErrorRate",
    "SluiceHttpLatencyHigh",
    "SluiceQueueBacklogGrowing",
    "SluiceNoLiveWorkers",
    "SluiceTenantRequestSpike",
    "SluiceTimeToFirstTokenHigh",
    "SluiceGpuMemoryHigh",
    "SluiceTargetDown",
];

/// Where Sluice's processes serve `/metrics` in both deployments.
const METRICS_PORT: &str = "9464";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// YAML

/// Resolves YAML merge keys (`<<: *anchor`, `<<: [*a, *b]`) the way Compose does, nested ones
/// included (an anchor that itself merges another). Keys already present win, then the merged
/// mappings in order. (`serde_norway::Value::apply_merge` does one level only.)
fn resolve_merges(value: &mut serde_norway::Value) {
    use serde_norway::Value as Y;
    match value {
        Y::Mapping(mapping) => {
            while let Some(merged) = mapping.remove("<<") {
                let sources = match merged {
                    Y::Sequence(items) => items,
                    other => vec![other],
                };
                for source in sources {
                    let Y::Mapping(source) = source else {
                        panic!("a merge key must name mappings, got {source:?}");
                    };
                    for (k, v) in source {
                        if !mapping.contains_key(&k) {
                            mapping.insert(k, v);
                        }
                    }
                }
            }
            for v in mapping.values_mut() {
                resolve_merges(v);
            }
        }
        Y::Sequence(items) => items.iter_mut().for_each(resolve_merges),
        Y::Tagged(tagged) => resolve_merges(&mut tagged.value),
        _ => {}
    }
}

/// Every document of a YAML text, merge keys resolved, as JSON values.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|doc| {
            let mut value = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"));
            resolve_merges(&mut value);
            serde_json::to_value(&value)
                .unwrap_or_else(|e| panic!("{what} does not map to JSON: {e}"))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml_file(path: &Path) -> Value {
    let mut docs = yaml_docs(&read(path), &path.display().to_string());
    assert_eq!(docs.len(), 1, "{} holds one document", path.display());
    docs.remove(0)
}

fn compose() -> Value {
    yaml_file(&repo().join("compose/docker-compose.yml"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// A Compose `environment:` (a mapping or a list of `KEY=value`) as name → value.
fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|item| match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (item.to_string(), String::new()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The networks a service joins (a list or a mapping).
fn compose_networks(service: &Value) -> Vec<String> {
    match &service["networks"] {
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Value::Object(map) => map.keys().cloned().collect(),
        _ => vec!["default".to_string()],
    }
}

/// Which Sluice binary a compose service runs, from its command.
fn compose_binary(service: &Value) -> Option<Binary> {
    match strings(&service["command"]).first().copied() {
        Some("serve") => Some(Binary::Api),
        Some("run") => Some(Binary::Worker),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The binaries' variables

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Binary {
    Api,
    Worker,
}

/// The variables each binary reads: every `[env: NAME...]` in `sluice-api serve --help` and
/// `sluice-worker run --help`.
fn binary_env() -> BTreeMap<Binary, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for (binary, name, subcommand) in [
        (Binary::Api, "sluice-api", "serve"),
        (Binary::Worker, "sluice-worker", "run"),
    ] {
        let output = Command::new(workspace_bin(name))
            .args([subcommand, "--help"])
            .output()
            .unwrap_or_else(|e| panic!("run {name} {subcommand} --help: {e}"));
        assert!(output.status.success(), "{name} {subcommand} --help failed");
        let help = String::from_utf8_lossy(&output.stdout);
        let vars = env_names_in_help(&help);
        out.insert(binary, vars);
    }
    // A broken parser would make every check below vacuous.
    for var in [
        "SLUICE_REDIS_URL_FILE",
        "SLUICE_AMQP_URL_FILE",
        "SLUICE_METRICS_ADDR",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SERVICE_NAME",
    ] {
        for (binary, vars) in &out {
            assert!(
                vars.contains(var),
                "{binary:?} --help has no {var}: {vars:?}"
            );
        }
    }
    assert!(out[&Binary::Api].contains("SLUICE_TOKENIZER"));
    assert!(out[&Binary::Worker].contains("SLUICE_MODEL"));
    assert!(!out[&Binary::Worker].contains("SLUICE_TOKENIZER"));
    out
}

fn env_names_in_help(help: &str) -> BTreeSet<String> {
    help.split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .collect()
}

/// Variables of Sluice's own (`SLUICE_*`, `OTEL_*`) that `binary` does not read.
fn unknown_vars<'a>(
    names: impl IntoIterator<Item = &'a String>,
    known: &BTreeSet<String>,
) -> Vec<String> {
    names
        .into_iter()
        .filter(|name| name.starts_with("SLUICE_") || name.starts_with("OTEL_"))
        .filter(|name| !known.contains(*name))
        .cloned()
        .collect()
}

fn compose_env_findings(
    compose: &Value,
    known: &BTreeMap<Binary, BTreeSet<String>>,
) -> Vec<String> {
    let mut findings = Vec::new();
    let mut sluice_services = 0;
    for (name, service) in compose["services"].as_object().expect("services") {
        let env = compose_env(service);
        let Some(binary) = compose_binary(service) else {
            // Not a Sluice process: it must not carry Sluice's variables either.
            let stray = unknown_vars(env.keys(), &BTreeSet::new());
            if !stray.is_empty() {
                findings.push(format!(
                    "service {name} runs no Sluice binary but sets {stray:?}"
                ));
            }
            continue;
        };
        sluice_services += 1;
        let unknown = unknown_vars(env.keys(), &known[&binary]);
        if !unknown.is_empty() {
            findings.push(format!(
                "service {name} ({binary:?}) sets variables the binary does not read: {unknown:?}"
            ));
        }
    }
    if sluice_services == 0 {
        findings.push("no service runs a Sluice binary (command serve or run)".to_string());
    }
    findings
}

// ---------------------------------------------------------------------------------------------
// Compose hardening

fn is_root_user(user: &str) -> bool {
    let uid = user.split(':').next().unwrap_or_default();
    uid.is_empty() || uid == "0" || uid == "root"
}

/// A published port's host address, for the short (`[HOST:]HOST_PORT:CONTAINER_PORT`) and the
/// long (`host_ip`) syntax; `None` when it binds every interface.
fn published_host_ip(port: &Value) -> Option<String> {
    match port {
        Value::String(short) => {
            let parts: Vec<&str> = short.split(':').collect();
            (parts.len() == 3).then(|| parts[0].to_string())
        }
        Value::Object(long) => long
            .get("host_ip")
            .and_then(Value::as_str)
            .map(str::to_string),
        // A bare number publishes on every interface.
        _ => None,
    }
}

fn service_secrets(service: &Value) -> Vec<String> {
    service["secrets"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|s| s.as_str().or_else(|| s["source"].as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn hardening_findings(compose: &Value) -> Vec<String> {
    let mut findings = Vec::new();
    let services = compose["services"].as_object().expect("services");
    let networks = &compose["networks"];
    let secrets = &compose["secrets"];
    for (name, s) in services {
        let mut bad = |what: String| findings.push(format!("service {name}: {what}"));
        if s["read_only"] != json!(true) {
            bad("read_only is not true".into());
        }
        if !strings(&s["cap_drop"]).contains(&"ALL") {
            bad("cap_drop does not hold ALL".into());
        }
        let no_new_privileges = strings(&s["security_opt"])
            .iter()
            .any(|o| *o == "no-new-privileges:true" || *o == "no-new-privileges");
        if !no_new_privileges {
            bad("security_opt lacks no-new-privileges:true".into());
        }
        if s["privileged"] == json!(true) {
            bad("runs privileged".into());
        }
        if s["network_mode"] == json!("host") || s["pid"] == json!("host") {
            bad("shares the host's network or pid namespace".into());
        }
        match s["user"].as_str() {
            Some(user) if !is_root_user(user) => {}
            other => bad(format!("user {other:?} is not a non-root user")),
        }
        let limits = &s["deploy"]["resources"]["limits"];
        if limits["memory"].is_null() && s["mem_limit"].is_null() {
            bad("has no memory limit".into());
        }
        if limits["cpus"].is_null() && s["cpus"].is_null() {
            bad("has no CPU limit".into());
        }
        let is_api = compose_binary(s) == Some(Binary::Api);
        for port in s["ports"].as_array().into_iter().flatten() {
            let host_ip = published_host_ip(port);
            if !is_api && host_ip.as_deref() != Some("127.0.0.1") {
                bad(format!("publishes {port} beyond 127.0.0.1"));
            }
        }
        if name == "rabbitmq" || name == "redis" {
            if s["ports"].as_array().is_some_and(|p| !p.is_empty()) {
                bad("publishes a port".into());
            }
            for network in compose_networks(s) {
                if networks[&network]["internal"] != json!(true) {
                    bad(format!("joins network {network}, which is not internal"));
                }
            }
        }
        let mounted = service_secrets(s);
        for secret in &mounted {
            match secrets[secret]["file"].as_str() {
                Some(file) if file.starts_with("./secrets/") => {}
                Some(file) => bad(format!("secret {secret} comes from {file}, not ./secrets/")),
                None => bad(format!(
                    "uses secret {secret}, which the secrets block lacks"
                )),
            }
        }
        // SLUICE_REDIS_URL_FILE, GF_..._PASSWORD__FILE: the file must be a secret it mounts.
        for (var, value) in compose_env(s) {
            if !var.ends_with("_FILE") {
                continue;
            }
            match value.strip_prefix("/run/secrets/") {
                Some(secret) if mounted.iter().any(|m| m == secret) => {}
                Some(secret) => bad(format!("{var} points at secret {secret}, not mounted")),
                None => bad(format!("{var}={value} is not a file under /run/secrets")),
            }
        }
    }
    findings
}

// ---------------------------------------------------------------------------------------------
// Metric names in PromQL

/// The `sluice_*` names a PromQL expression uses (label values like `job="sluice-api"` and
/// words inside other names are not names).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut in_string: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if let Some(quote) = in_string {
            if c == b'\\' {
                i += 1;
            } else if c == quote {
                in_string = None;
            }
            i += 1;
            continue;
        }
        if c == b'"' || c == b'\'' || c == b'`' {
            in_string = Some(c);
            i += 1;
            continue;
        }
        let starts_word =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || b"_:".contains(&bytes[i - 1]));
        if starts_word && expr[i..].starts_with("sluice_") {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(expr.len(), |n| i + n);
            names.insert(expr[i..end].to_string());
            i = end;
            continue;
        }
        i += 1;
    }
    names
}

/// Names used in `exprs` that Sluice does not export.
fn unknown_metrics<'a>(exprs: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let known = |name: &str| {
        METRICS.iter().any(|(metric, histogram)| {
            name == *metric
                || (*histogram
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(metric)))
        })
    };
    exprs
        .into_iter()
        .flat_map(metric_names)
        .filter(|name| !known(name))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn alert_findings(rules: &Value) -> Vec<String> {
    let mut findings = Vec::new();
    let mut exprs = Vec::new();
    let groups = rules["groups"].as_array().cloned().unwrap_or_default();
    if groups.is_empty() {
        findings.push("no rule groups".to_string());
    }
    for group in &groups {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let Some(alert) = rule["alert"].as_str() else {
                findings.push(format!("a rule of group {} has no `alert`", group["name"]));
                continue;
            };
            match rule["expr"].as_str() {
                Some(expr) if !expr.trim().is_empty() => exprs.push(expr.to_string()),
                _ => findings.push(format!("{alert} has no `expr`")),
            }
            if rule["for"].is_null() && rule["labels"]["severity"].is_null() {
                findings.push(format!("{alert} has neither `for` nor labels.severity"));
            }
            if !["critical", "warning", "info"]
                .contains(&rule["labels"]["severity"].as_str().unwrap_or(""))
            {
                findings.push(format!(
                    "{alert}: severity is not critical, warning or info"
                ));
            }
            if rule["annotations"]["summary"].as_str().is_none() {
                findings.push(format!("{alert} has no summary annotation"));
            }
        }
    }
    let unknown = unknown_metrics(exprs.iter().map(String::as_str));
    if !unknown.is_empty() {
        findings.push(format!(
            "alerts use metrics Sluice does not export: {unknown:?}"
        ));
    }
    findings
}

/// Every `expr` string anywhere in a dashboard.
fn dashboard_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn k8s_dir() -> PathBuf {
    repo().join("deploy/k8s")
}

/// Every manifest in deploy/k8s but the kustomization, by file name.
fn k8s_manifests() -> BTreeMap<String, Vec<Value>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(k8s_dir()).expect("deploy/k8s") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if is_yaml && name != "kustomization.yaml" {
            out.insert(name.clone(), yaml_docs(&read(&path), &name));
        }
    }
    out
}

fn objects_of_kind<'a>(manifests: &'a BTreeMap<String, Vec<Value>>, kind: &str) -> Vec<&'a Value> {
    manifests
        .values()
        .flatten()
        .filter(|doc| doc["kind"] == json!(kind))
        .collect()
}

/// A container's setting, from its own securityContext or else the pod's.
fn effective<'a>(container: &'a Value, pod: &'a Value, key: &str) -> &'a Value {
    let own = &container["securityContext"][key];
    if own.is_null() {
        &pod["securityContext"][key]
    } else {
        own
    }
}

fn deployment_findings(deployment: &Value) -> Vec<String> {
    let name = deployment["metadata"]["name"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    let pod = &deployment["spec"]["template"]["spec"];
    let mut findings = Vec::new();
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .collect();
    if containers.is_empty() {
        findings.push(format!("{name}: no containers"));
    }
    for c in containers {
        let cname = format!("{name}/{}", c["name"].as_str().unwrap_or("?"));
        let mut bad = |what: &str| findings.push(format!("{cname}: {what}"));
        if effective(c, pod, "runAsNonRoot") != &json!(true) {
            bad("runAsNonRoot is not true");
        }
        if effective(c, pod, "runAsUser") == &json!(0) {
            bad("runs as uid 0");
        }
        if c["securityContext"]["readOnlyRootFilesystem"] != json!(true) {
            bad("readOnlyRootFilesystem is not true");
        }
        if c["securityContext"]["allowPrivilegeEscalation"] != json!(false) {
            bad("allowPrivilegeEscalation is not false");
        }
        if c["securityContext"]["privileged"] == json!(true) {
            bad("privileged");
        }
        if !strings(&c["securityContext"]["capabilities"]["drop"]).contains(&"ALL") {
            bad("capabilities.drop does not hold ALL");
        }
        if !strings(&c["securityContext"]["capabilities"]["add"]).is_empty() {
            bad("adds capabilities");
        }
        if effective(c, pod, "seccompProfile")["type"] != json!("RuntimeDefault") {
            bad("seccompProfile is not RuntimeDefault");
        }
        for resource in ["cpu", "memory"] {
            if c["resources"]["limits"][resource].is_null() {
                bad(&format!("no {resource} limit"));
            }
            if c["resources"]["requests"][resource].is_null() {
                bad(&format!("no {resource} request"));
            }
        }
    }
    if pod["hostNetwork"] == json!(true) || pod["hostPID"] == json!(true) {
        findings.push(format!("{name}: shares a host namespace"));
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        if !volume["hostPath"].is_null() {
            findings.push(format!("{name}: hostPath volume {}", volume["name"]));
        }
    }
    findings
}

/// The binary a Kubernetes container runs, from its args.
fn k8s_binary(container: &Value) -> Option<Binary> {
    match strings(&container["args"]).first().copied() {
        Some("serve") => Some(Binary::Api),
        Some("run") => Some(Binary::Worker),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Dockerfiles

/// A Dockerfile's stages: name (or index) → (base, the USER in force at its end).
fn dockerfile_stages(text: &str) -> Vec<(String, String, Option<String>)> {
    let mut stages: Vec<(String, String, Option<String>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("FROM") => {
                let base = words.next().expect("FROM base").to_string();
                let name = match (words.next(), words.next()) {
                    (Some(as_), Some(name)) if as_.eq_ignore_ascii_case("as") => name.to_string(),
                    _ => stages.len().to_string(),
                };
                // A stage built on another stage starts with that stage's user.
                let user = stages
                    .iter()
                    .find(|(n, _, _)| *n == base)
                    .and_then(|(_, _, u)| u.clone());
                stages.push((name, base, user));
            }
            Some("USER") => {
                let stage = stages.last_mut().expect("USER before FROM");
                stage.2 = words.next().map(str::to_string);
            }
            _ => {}
        }
    }
    stages
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn compose_file_matches_the_compose_specification() {
    let mut schema: Value =
        serde_json::from_str(&read(&repo().join("tests/fixtures/compose-spec.json")))
            .expect("compose-spec.json is JSON");
    // The schema names draft-07 as https://json-schema.org/draft-07/schema; the jsonschema crate
    // knows draft-07 by its canonical http:// id only and would try to download the https one
    // (no network here, and the crate is built without HTTP). Same draft, canonical name.
    assert_eq!(schema["$schema"], "https://json-schema.org/draft-07/schema");
    schema["$schema"] = json!("http://json-schema.org/draft-07/schema#");
    let validator = jsonschema::draft7::options()
        .build(&schema)
        .expect("the Compose Specification schema compiles");
    let errors = |doc: &Value| -> Vec<String> {
        validator
            .iter_errors(doc)
            .map(|e| format!("{} (at {})", e, e.instance_path))
            .collect()
    };

    let compose = compose();
    let found = errors(&compose);
    assert!(found.is_empty(), "compose/docker-compose.yml: {found:#?}");

    // The schema is strict enough to matter: a misspelt key, a wrong type and an unresolved
    // merge key all fail, and merges are resolved before it looks.
    let mut typo = compose.clone();
    typo["services"]["redis"]["read_onyl"] = json!(true);
    assert!(
        !errors(&typo).is_empty(),
        "a misspelt service key passes the schema"
    );
    let mut wrong_type = compose.clone();
    wrong_type["services"]["api-1"]["cap_drop"] = json!("ALL");
    assert!(
        !errors(&wrong_type).is_empty(),
        "cap_drop as a string passes the schema"
    );
    let unresolved = json!({"services": {"a": {"<<": {"image": "x"}}}});
    assert!(
        !errors(&unresolved).is_empty(),
        "`<<` passes as a service key"
    );
    let resolved = yaml_docs(
        "x-base: &base {image: x, read_only: true}\nservices:\n  a:\n    <<: *base\n",
        "a merge",
    );
    assert_eq!(
        resolved[0]["services"]["a"],
        json!({"image": "x", "read_only": true})
    );
    assert!(errors(&resolved[0]).is_empty());
}

#[test]
fn compose_services_are_hardened() {
    let compose = compose();
    let findings = hardening_findings(&compose);
    assert!(
        findings.is_empty(),
        "compose/docker-compose.yml: {findings:#?}"
    );

    let services = &compose["services"];
    // Two API replicas, a CPU worker, and the CUDA worker behind the gpu profile.
    let apis = services
        .as_object()
        .expect("services")
        .values()
        .filter(|s| compose_binary(s) == Some(Binary::Api))
        .count();
    assert!(apis >= 2, "{apis} API services, want 2 or more");
    let env = |name: &str| compose_env(&services[name]);
    assert_eq!(
        env("worker").get("SLUICE_DEVICE").map(String::as_str),
        Some("cpu")
    );
    let gpu = &services["worker-gpu"];
    assert_eq!(
        env("worker-gpu").get("SLUICE_DEVICE").map(String::as_str),
        Some("cuda")
    );
    assert_eq!(strings(&gpu["profiles"]), ["gpu"]);
    let device = &gpu["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!(device["driver"], "nvidia");
    assert!(strings(&device["capabilities"]).contains(&"gpu"));
    assert!(
        services["worker"]["profiles"].is_null(),
        "the CPU worker runs without a profile"
    );
    // Redis: append-only, and its password from the ACL the entrypoint writes.
    let redis_conf = read(&repo().join("compose/redis/redis.conf"));
    assert!(redis_conf.lines().any(|l| l.trim() == "appendonly yes"));
    assert!(!redis_conf.contains("requirepass"));
    assert!(strings(&services["redis"]["secrets"]).contains(&"redis_password"));
    // Every Sluice service reads its URLs from secrets, and none carries a URL in the open.
    for (name, service) in services.as_object().expect("services") {
        if compose_binary(service).is_none() {
            continue;
        }
        let env = compose_env(service);
        for var in ["SLUICE_REDIS_URL", "SLUICE_AMQP_URL"] {
            assert!(
                !env.contains_key(var),
                "{name} sets {var} in the environment"
            );
            assert!(
                env.contains_key(&format!("{var}_FILE")),
                "{name} lacks {var}_FILE"
            );
        }
    }

    // The checker catches what it is for.
    let mut broken = compose.clone();
    broken["services"]["redis"]["read_only"] = json!(false);
    broken["services"]["rabbitmq"]["ports"] = json!(["5672:5672"]);
    broken["services"]["grafana"]["ports"] = json!(["3000:3000"]);
    broken["services"]["worker"]["user"] = json!("0:0");
    broken["services"]["jaeger"]["cap_drop"] = json!([]);
    broken["services"]["prometheus"]["deploy"] = json!({});
    broken["services"]["api-1"]["secrets"] = json!(["amqp_url"]);
    broken["networks"]["backend"]["internal"] = json!(false);
    let found = hardening_findings(&broken).join("\n");
    for expected in [
        "service redis: read_only is not true",
        "service rabbitmq: publishes \"5672:5672\" beyond 127.0.0.1",
        "service rabbitmq: publishes a port",
        "service grafana: publishes \"3000:3000\" beyond 127.0.0.1",
        "service worker: user Some(\"0:0\") is not a non-root user",
        "service jaeger: cap_drop does not hold ALL",
        "service prometheus: has no memory limit",
        "service api-1: SLUICE_REDIS_URL_FILE points at secret redis_url, not mounted",
        "service redis: joins network backend, which is not internal",
    ] {
        assert!(found.contains(expected), "missed {expected:?} in:\n{found}");
    }
}

#[test]
fn every_sluice_variable_is_one_the_binaries_read() {
    let known = binary_env();
    let compose = compose();
    let findings = compose_env_findings(&compose, &known);
    assert!(
        findings.is_empty(),
        "compose/docker-compose.yml: {findings:#?}"
    );

    let manifests = k8s_manifests();
    let config_maps: BTreeMap<&str, Vec<String>> = objects_of_kind(&manifests, "ConfigMap")
        .into_iter()
        .map(|cm| {
            let name = cm["metadata"]["name"].as_str().expect("ConfigMap name");
            let keys = cm["data"].as_object().map(|d| d.keys().cloned().collect());
            (name, keys.unwrap_or_default())
        })
        .collect();
    let mut findings = Vec::new();
    let mut containers = 0;
    for deployment in objects_of_kind(&manifests, "Deployment") {
        let deployment_name = deployment["metadata"]["name"].as_str().unwrap_or("?");
        for c in deployment["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(binary) = k8s_binary(c) else {
                findings.push(format!(
                    "{deployment_name}: a container runs neither serve nor run"
                ));
                continue;
            };
            containers += 1;
            let mut names: Vec<String> = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["name"].as_str().map(str::to_string))
                .collect();
            for source in c["envFrom"].as_array().into_iter().flatten() {
                let cm = source["configMapRef"]["name"].as_str().unwrap_or_default();
                match config_maps.get(cm) {
                    Some(keys) => names.extend(keys.iter().cloned()),
                    None => findings.push(format!("{deployment_name}: no ConfigMap {cm:?} here")),
                }
            }
            let unknown = unknown_vars(&names, &known[&binary]);
            if !unknown.is_empty() {
                findings.push(format!(
                    "{deployment_name} ({binary:?}) sets variables the binary does not read: {unknown:?}"
                ));
            }
        }
    }
    assert_eq!(containers, 2, "an api and a worker container");
    assert!(findings.is_empty(), "deploy/k8s: {findings:#?}");

    // The check catches a variable no binary reads, and one only the other binary reads.
    let mut broken = compose.clone();
    broken["services"]["api-2"]["environment"]["SLUICE_NOT_A_SETTING"] = json!("1");
    broken["services"]["worker"]["environment"]["SLUICE_TOKENIZER"] = json!("/models/x");
    broken["services"]["grafana"]["environment"]["SLUICE_NAMESPACE"] = json!("x");
    let found = compose_env_findings(&broken, &known).join("\n");
    assert!(
        found.contains(
            "api-2 (Api) sets variables the binary does not read: [\"SLUICE_NOT_A_SETTING\"]"
        ),
        "{found}"
    );
    assert!(
        found.contains(
            "worker (Worker) sets variables the binary does not read: [\"SLUICE_TOKENIZER\"]"
        ),
        "{found}"
    );
    assert!(
        found.contains("grafana runs no Sluice binary but sets [\"SLUICE_NAMESPACE\"]"),
        "{found}"
    );
}

#[test]
fn kubernetes_manifests_are_restricted_limited_and_all_listed() {
    let manifests = k8s_manifests();

    // The kustomization lists exactly the manifests of the folder.
    let kustomization = yaml_file(&k8s_dir().join("kustomization.yaml"));
    let listed: BTreeSet<&str> = strings(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<&str> = manifests.keys().map(String::as_str).collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources vs the files in deploy/k8s"
    );
    assert_eq!(kustomization["namespace"], "sluice");

    let namespace = objects_of_kind(&manifests, "Namespace");
    assert_eq!(namespace.len(), 1);
    let labels = &namespace[0]["metadata"]["labels"];
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted");

    let deployments = objects_of_kind(&manifests, "Deployment");
    assert_eq!(deployments.len(), 2, "the api and the worker Deployments");
    let findings: Vec<String> = deployments
        .iter()
        .flat_map(|d| deployment_findings(d))
        .collect();
    assert!(findings.is_empty(), "deploy/k8s: {findings:#?}");

    let by_name = |name: &str| {
        *deployments
            .iter()
            .find(|d| d["metadata"]["name"] == json!(name))
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    };
    let api = &by_name("sluice-api")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(api["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(api["livenessProbe"]["httpGet"]["path"], "/healthz");
    let worker = &by_name("sluice-worker")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(worker["resources"]["limits"]["nvidia.com/gpu"], json!(1));

    let hpa = objects_of_kind(&manifests, "HorizontalPodAutoscaler");
    assert_eq!(hpa.len(), 1);
    assert_eq!(hpa[0]["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa[0]["spec"]["scaleTargetRef"]["name"], "sluice-api");
    assert_eq!(hpa[0]["spec"]["metrics"][0]["resource"]["name"], "cpu");

    // KEDA scales the workers on the interactive queue, named as the code names it, in the
    // namespace the ConfigMap sets.
    let config = objects_of_kind(&manifests, "ConfigMap");
    let namespace = config[0]["data"]["SLUICE_NAMESPACE"]
        .as_str()
        .expect("SLUICE_NAMESPACE");
    let interactive = Keyspace::new(namespace).jobs_queue_for(Priority::Interactive);
    let scaled = objects_of_kind(&manifests, "ScaledObject");
    assert_eq!(scaled.len(), 1);
    assert_eq!(scaled[0]["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(scaled[0]["spec"]["scaleTargetRef"]["name"], "sluice-worker");
    let queues: Vec<&str> = scaled[0]["spec"]["triggers"]
        .as_array()
        .expect("triggers")
        .iter()
        .filter(|t| t["type"] == json!("rabbitmq"))
        .filter_map(|t| t["metadata"]["queueName"].as_str())
        .collect();
    assert!(
        queues.contains(&interactive.as_str()),
        "{queues:?} lacks {interactive}"
    );
    for queue in &queues {
        assert!(
            Priority::ALL
                .iter()
                .any(|p| Keyspace::new(namespace).jobs_queue_for(*p) == *queue),
            "KEDA watches {queue}, which Sluice does not declare"
        );
    }

    // Default deny, and no secret values in the folder.
    let policies = objects_of_kind(&manifests, "NetworkPolicy");
    assert!(
        policies
            .iter()
            .any(|p| p["spec"]["podSelector"] == json!({})
                && strings(&p["spec"]["policyTypes"]) == ["Ingress", "Egress"]
                && p["spec"]["ingress"].is_null()
                && p["spec"]["egress"].is_null()),
        "no default-deny NetworkPolicy"
    );
    assert!(
        objects_of_kind(&manifests, "Secret").is_empty(),
        "a Secret with values in deploy/k8s"
    );

    // The checker catches what it is for.
    let mut broken = by_name("sluice-worker").clone();
    let c = &mut broken["spec"]["template"]["spec"]["containers"][0];
    c["securityContext"]["readOnlyRootFilesystem"] = json!(false);
    c["securityContext"]["capabilities"]["drop"] = json!([]);
    c["resources"]["limits"] = json!({"nvidia.com/gpu": 1});
    broken["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = json!(false);
    let found = deployment_findings(&broken).join("\n");
    for expected in [
        "sluice-worker/worker: readOnlyRootFilesystem is not true",
        "sluice-worker/worker: capabilities.drop does not hold ALL",
        "sluice-worker/worker: no memory limit",
        "sluice-worker/worker: no cpu limit",
    ] {
        assert!(found.contains(expected), "missed {expected:?} in:\n{found}");
    }
    // runAsNonRoot is also on the container itself: the pod's false does not undo it; without
    // the container's, the pod's counts.
    assert!(!found.contains("runAsNonRoot"), "{found}");
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        .as_object_mut()
        .expect("securityContext")
        .remove("runAsNonRoot");
    let found = deployment_findings(&broken).join("\n");
    assert!(
        found.contains("sluice-worker/worker: runAsNonRoot is not true"),
        "{found}"
    );
}

#[test]
fn alert_rules_and_dashboard_use_only_exported_metrics() {
    let rules = yaml_file(&repo().join("compose/prometheus/alerts.yml"));
    let findings = alert_findings(&rules);
    assert!(
        findings.is_empty(),
        "compose/prometheus/alerts.yml: {findings:#?}"
    );
    let alerts: BTreeSet<&str> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for required in REQUIRED_ALERTS {
        assert!(alerts.contains(required), "no alert {required}");
    }

    let dashboard: Value = serde_json::from_str(&read(
        &repo().join("compose/grafana/dashboards/sluice.json"),
    ))
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 20,
        "only {} queries in the dashboard",
        exprs.len()
    );
    let unknown = unknown_metrics(exprs.iter().map(String::as_str));
    assert!(
        unknown.is_empty(),
        "the dashboard uses metrics Sluice does not export: {unknown:?}"
    );
    // Every metric Sluice exports is on the dashboard.
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for (metric, histogram) in METRICS {
        let series = if *histogram {
            format!("{metric}_bucket")
        } else {
            metric.to_string()
        };
        assert!(
            used.contains(&series),
            "the dashboard does not show {series}"
        );
    }
    // Its panels query the provisioned Prometheus data source.
    let datasources =
        yaml_file(&repo().join("compose/grafana/provisioning/datasources/datasources.yml"));
    let prometheus_uid = datasources["datasources"]
        .as_array()
        .expect("datasources")
        .iter()
        .find(|d| d["type"] == json!("prometheus"))
        .and_then(|d| d["uid"].as_str())
        .expect("a provisioned Prometheus data source with a uid");
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == json!("row") {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], prometheus_uid,
            "panel {}",
            panel["title"]
        );
    }

    // The name scanner and the checks catch what they are for.
    assert_eq!(
        metric_names(
            r#"sum(rate(sluice_batch_size_bucket{job="sluice-api", x="sluice_no"}[5m])) / other_sluice_x"#
        ),
        BTreeSet::from(["sluice_batch_size_bucket".to_string()])
    );
    assert_eq!(
        unknown_metrics([
            "sluice_batch_size_sum + sluice_prompt_tokens_total_bucket + sluice_typo_total"
        ]),
        ["sluice_prompt_tokens_total_bucket", "sluice_typo_total"]
    );
    let mut broken = rules.clone();
    broken["groups"][0]["rules"][0]["expr"] = json!("rate(sluice_http_requests_totl[5m]) > 1");
    broken["groups"][0]["rules"][1]["labels"] = json!({});
    broken["groups"][0]["rules"][1]
        .as_object_mut()
        .expect("rule")
        .remove("for");
    let found = alert_findings(&broken).join("\n");
    assert!(found.contains("sluice_http_requests_totl"), "{found}");
    assert!(
        found.contains("has neither `for` nor labels.severity"),
        "{found}"
    );
}

#[test]
fn prometheus_grafana_and_collector_point_at_the_compose_services() {
    let compose = compose();
    let services = compose["services"].as_object().expect("services");

    // Every Sluice process serves /metrics on the port Prometheus scrapes.
    for (name, service) in services {
        if compose_binary(service).is_some() {
            let addr = compose_env(service)
                .get("SLUICE_METRICS_ADDR")
                .cloned()
                .unwrap_or_else(|| panic!("{name} has no SLUICE_METRICS_ADDR"));
            assert_eq!(addr, format!("0.0.0.0:{METRICS_PORT}"), "{name}");
        }
    }
    let prometheus = yaml_file(&repo().join("compose/prometheus/prometheus.yml"));
    for file in strings(&prometheus["rule_files"]) {
        assert!(
            repo().join("compose/prometheus").join(file).is_file(),
            "rule file {file}"
        );
    }
    let mut scraped = BTreeSet::new();
    for job in prometheus["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
    {
        let path = job["metrics_path"].as_str().unwrap_or("/metrics");
        for target in job["static_configs"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| strings(&s["targets"]))
        {
            let (host, port) = target.rsplit_once(':').expect("host:port");
            if host != "localhost" {
                assert_eq!((port, path), (METRICS_PORT, "/metrics"), "{target}");
                scraped.insert(host.to_string());
            }
        }
        for sd in job["dns_sd_configs"].as_array().into_iter().flatten() {
            assert_eq!(sd["port"], json!(9464));
            assert_eq!(path, "/metrics");
            scraped.extend(strings(&sd["names"]).into_iter().map(str::to_string));
        }
    }
    let sluice_services: BTreeSet<String> = services
        .iter()
        .filter(|(_, s)| compose_binary(s).is_some())
        .map(|(name, _)| name.clone())
        .collect();
    assert_eq!(
        scraped, sluice_services,
        "scraped hosts vs the Sluice services"
    );

    // Traces: Sluice → the collector's OTLP/HTTP receiver → Jaeger's OTLP receiver.
    let collector = yaml_file(&repo().join("compose/otel/collector.yaml"));
    // Off unless the `observability` profile runs, when scripts/stack points it at the collector.
    let endpoint = compose_env(&services["api-1"])["OTEL_EXPORTER_OTLP_ENDPOINT"].clone();
    assert_eq!(endpoint, "${SLUICE_OTLP_ENDPOINT:-}");
    let stack = read(&repo().join("scripts/stack"));
    assert!(
        stack.contains("SLUICE_OTLP_ENDPOINT:-http://otel-collector:4318"),
        "scripts/stack does not point traces at the collector"
    );
    assert_eq!(
        services["otel-collector"]["profiles"],
        json!(["observability"])
    );
    assert_eq!(
        collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"],
        "0.0.0.0:4318"
    );
    let pipeline = &collector["service"]["pipelines"]["traces"];
    for (section, key) in [
        ("receivers", "receivers"),
        ("processors", "processors"),
        ("exporters", "exporters"),
    ] {
        for name in strings(&pipeline[key]) {
            assert!(
                !collector[section][name].is_null(),
                "the traces pipeline names undefined {section} {name}"
            );
        }
    }
    let exporter = strings(&pipeline["exporters"])[0];
    let target = collector["exporters"][exporter]["endpoint"]
        .as_str()
        .expect("exporter endpoint");
    let host = target.split(':').next().expect("host");
    assert!(
        services.contains_key(host),
        "the collector exports to {target}, not a service"
    );
    assert_eq!(target, "jaeger:4317");

    // Grafana's data sources are services of the stack.
    let datasources =
        yaml_file(&repo().join("compose/grafana/provisioning/datasources/datasources.yml"));
    for ds in datasources["datasources"].as_array().expect("datasources") {
        let url = ds["url"].as_str().expect("url");
        let host = url
            .trim_start_matches("http://")
            .split(':')
            .next()
            .expect("host");
        assert!(
            services.contains_key(host),
            "data source {url} is no service"
        );
    }
}

#[test]
fn images_build_portable_code_and_run_as_non_root() {
    let cargo_config = read(&repo().join(".cargo/config.toml"));
    assert!(
        cargo_config.contains("target-cpu=x86-64-v3"),
        ".cargo/config.toml lost x86-64-v3"
    );
    let compose = compose();
    let mut built = BTreeSet::new();
    for (name, service) in compose["services"].as_object().expect("services") {
        let Some(dockerfile) = service["build"]["dockerfile"].as_str() else {
            continue;
        };
        assert_eq!(
            service["build"]["context"], "..",
            "{name} builds from the repository root"
        );
        let text = read(&repo().join(dockerfile));
        let code: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        for line in &code {
            assert!(
                !line.contains("target-cpu=native") && !line.contains("-march=native"),
                "{dockerfile}: {line}"
            );
            // RUSTFLAGS would replace .cargo/config.toml's target-cpu instead of adding to it.
            assert!(!line.contains("RUSTFLAGS"), "{dockerfile}: {line}");
        }
        // The Rust images build from the lock file; the services' image installs packages only.
        let builds_rust = code.iter().any(|l| l.contains("cargo build"));
        assert!(
            !builds_rust || code.iter().any(|l| l.contains("--locked")),
            "{dockerfile} builds without --locked"
        );
        let stages = dockerfile_stages(&text);
        if dockerfile == "compose/Dockerfile.services" {
            assert!(!builds_rust, "{dockerfile} builds Rust");
            // Only Debian's packages: every stage starts from the Debian base or another stage.
            for (stage, base, _) in &stages {
                assert!(
                    base.starts_with("debian:") || stages.iter().any(|(n, _, _)| n == base),
                    "{dockerfile}: stage {stage} builds on {base}"
                );
            }
        }
        let image = match service["build"]["target"].as_str() {
            Some(target) => stages.iter().find(|(n, _, _)| n == target),
            None => stages.last(),
        }
        .unwrap_or_else(|| {
            panic!(
                "{name}: {dockerfile} has no stage {}",
                service["build"]["target"]
            )
        });
        match image.2.as_deref() {
            Some(user) if !is_root_user(user) => {}
            other => panic!("{name}: the image of {dockerfile} runs as {other:?}"),
        }
        built.insert(dockerfile.to_string());
        if compose_env(service)
            .get("SLUICE_DEVICE")
            .map(String::as_str)
            == Some("cuda")
        {
            assert!(
                text.contains("--features cuda"),
                "{dockerfile} builds no CUDA worker"
            );
            assert!(
                text.contains("ARG CUDA_COMPUTE_CAP=90"),
                "{dockerfile}: CUDA_COMPUTE_CAP"
            );
            let bases: Vec<&str> = stages.iter().map(|(_, base, _)| base.as_str()).collect();
            assert_eq!(
                bases,
                [
                    "nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU}",
                    "nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}"
                ],
                "{dockerfile}: build on the devel image, run on the matching runtime image"
            );
        }
    }
    assert_eq!(
        built,
        BTreeSet::from([
            "compose/Dockerfile".to_string(),
            "compose/Dockerfile.cuda".to_string(),
            "compose/Dockerfile.services".to_string(),
        ])
    );
    // The stage parser follows users through stages.
    let stages =
        dockerfile_stages("FROM a AS build\nFROM b AS runtime\nUSER 10001\nFROM runtime AS api\n");
    assert_eq!(
        stages[2],
        ("api".into(), "runtime".into(), Some("10001".into()))
    );
    assert_eq!(stages[0].2, None);
}
