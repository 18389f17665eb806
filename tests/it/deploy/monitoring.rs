//! `compose/prometheus/alerts.yml` and the Grafana dashboard against the metrics Sluice exports,
//! and the Prometheus, Grafana and OpenTelemetry files against the compose file.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::{compose, compose_binary, compose_env, read, repo, strings, yaml_file};

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
// Tests

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
