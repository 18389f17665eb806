//! The deployment artifacts, checked without Docker or a cluster (neither exists where Sluice is
//! developed), one submodule per concern:
//!
//! - `compose`: `compose/docker-compose.yml` against the Compose Specification's JSON schema
//!   (vendored in `tests/fixtures/compose-spec.json`) and against Sluice's hardening rules:
//!   read-only root, no capabilities, no-new-privileges, a non-root user, memory and CPU limits,
//!   no port published beyond loopback but the API's, RabbitMQ and Redis on internal networks
//!   only, every secret defined and every `*_FILE` pointing at a secret the service mounts;
//! - `k8s`: `deploy/k8s/`: every Deployment's security context and limits, the kustomization
//!   listing every manifest, the KEDA trigger on the queue the code declares;
//! - `variables`: every `SLUICE_*` and `OTEL_*` variable set in either against the variables the
//!   built binaries read (their `--help`);
//! - `monitoring`: `compose/prometheus/alerts.yml` and the Grafana dashboard against the metrics
//!   Sluice exports, and the Prometheus, Grafana and OpenTelemetry files against the compose file;
//! - `dockerfiles`: the Dockerfiles the compose file builds: portable code (no `native`, no
//!   RUSTFLAGS over `.cargo/config.toml`), a non-root user in every image, the CUDA worker on
//!   NVIDIA's images.
//!
//! Each submodule holds its checkers and its tests. Each checker returns its findings, so its
//! test can show that it catches a broken copy of the real file. What more than one submodule
//! uses is here: the repository's files, YAML, the compose file's services, the binaries, the
//! Kubernetes manifests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

mod compose;
mod dockerfiles;
mod k8s;
mod monitoring;
mod variables;

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

/// Which Sluice binary a compose service runs, from its command.
fn compose_binary(service: &Value) -> Option<Binary> {
    match strings(&service["command"]).first().copied() {
        Some("serve") => Some(Binary::Api),
        Some("run") => Some(Binary::Worker),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The binaries

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Binary {
    Api,
    Worker,
}

// ---------------------------------------------------------------------------------------------
// Users

fn is_root_user(user: &str) -> bool {
    let uid = user.split(':').next().unwrap_or_default();
    uid.is_empty() || uid == "0" || uid == "root"
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
