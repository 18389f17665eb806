//! Every `SLUICE_*` and `OTEL_*` variable set in the compose file or `deploy/k8s/` against the
//! variables the built binaries read (their `--help`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::{Value, json};
use sluice_tests::workspace_bin;

use super::{
    Binary, compose, compose_binary, compose_env, k8s_manifests, objects_of_kind, strings,
};

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

/// The binary a Kubernetes container runs, from its args.
fn k8s_binary(container: &Value) -> Option<Binary> {
    match strings(&container["args"]).first().copied() {
        Some("serve") => Some(Binary::Api),
        Some("run") => Some(Binary::Worker),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

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
