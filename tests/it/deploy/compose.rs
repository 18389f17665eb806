//! `compose/docker-compose.yml` against the Compose Specification's JSON schema and against
//! Sluice's hardening rules.

use serde_json::{Value, json};

use super::{
    Binary, compose, compose_binary, compose_env, is_root_user, read, repo, strings, yaml_docs,
};

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
