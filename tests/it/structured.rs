//! Structured output end to end: 50 varied JSON Schemas on the real Qwen2.5 GGUF, every output
//! parses and validates; invalid schemas are 400 before anything is queued; a tenant's
//! required schema applies to every job of that tenant.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;

/// Field kinds the schemas are built from. Every string is bounded, so greedy decoding of a
/// small model ends inside the token budget.
fn field(kind: usize) -> Value {
    match kind % 12 {
        0 => json!({"type": "string", "maxLength": 24}),
        1 => json!({"type": "integer", "minimum": 0, "maximum": 1000}),
        2 => json!({"type": "boolean"}),
        3 => json!({"enum": ["red", "green", "blue"]}),
        4 => json!({"type": "number", "minimum": -10, "maximum": 10}),
        5 => json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": 1, "maxItems": 3}),
        6 => json!({"type": "object", "properties": {
                        "city": {"type": "string", "maxLength": 16},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": false}),
        7 => json!({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                              {"type": "string", "maxLength": 8}]}),
        8 => json!({"type": ["string", "null"], "maxLength": 12}),
        9 => json!({"const": "v1"}),
        10 => json!({"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}),
        _ => json!({"type": "string", "format": "date"}),
    }
}

const NAMES: [&str; 12] = [
    "name", "count", "active", "color", "score", "digits", "address", "code", "nickname",
    "version", "tags", "date",
];

/// Schema number `i` of 50: one to five properties, required or not, strict or open.
fn schema(i: usize) -> Value {
    let n = 1 + i % 5;
    let mut props = serde_json::Map::new();
    let mut required = Vec::new();
    for j in 0..n {
        let kind = (i * 7 + j * 5) % 12;
        let name = NAMES[kind];
        if props.contains_key(name) {
            continue;
        }
        props.insert(name.to_string(), field(kind));
        if !(i + j).is_multiple_of(3) {
            required.push(name);
        }
    }
    let mut s = json!({"type": "object", "properties": props, "required": required});
    if i.is_multiple_of(2) {
        s["additionalProperties"] = json!(false);
    }
    s
}

fn format(i: usize, schema: Value) -> Value {
    json!({"type": "json_schema", "json_schema": {"name": format!("s{i}"), "schema": schema,
        "strict": true}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_schemas_on_the_real_gguf_all_parse_and_validate() {
    let ns = unique_namespace("schemas");
    let backends = Backends::connect(&ns).await;
    let model = real_model_path();
    let app = TestApp::spawn_full(&ns, &model, AMQP_URL, &[]).await;
    let worker = InProcessWorker::spawn(&ns, &model).await;
    // 51 submits and their polls in a burst: lift the per-key rate limit.
    let admin = app.admin_key().await;
    app.set_limits(
        &admin,
        "acme",
        json!({"requests_per_second": null, "requests_per_minute": null}),
    )
    .await;
    let key = app.key("acme").await;

    let topics = ["a user", "a city", "a product", "an event", "a book"];
    let mut jobs = Vec::new();
    for i in 0..50 {
        let s = schema(i);
        let mut body = chat(
            &format!(
                "Describe {} as JSON matching this schema: {s}",
                topics[i % topics.len()]
            ),
            json!({"max_tokens": 200, "response_format": format(i, s.clone())}),
        );
        // Greedy and sampled both.
        body["temperature"] = json!(if i % 3 == 0 { 0.8 } else { 0.0 });
        body["seed"] = json!(i);
        jobs.push((app.submit_ok(&key, &body).await, s));
    }
    // Plus `json_object`.
    let body = chat(
        "Give a JSON object with your favourite colour.",
        json!({"max_tokens": 120, "temperature": 0, "response_format": {"type": "json_object"}}),
    );
    jobs.push((app.submit_ok(&key, &body).await, json!({"type": "object"})));

    let mut failures = Vec::new();
    for (id, s) in &jobs {
        let job = app.wait_terminal(&key, id, Duration::from_secs(900)).await;
        let content = job["result"]["content"].as_str().unwrap_or_default();
        let ok = job["status"] == "succeeded"
            && job["result"]["finish_reason"] == "stop"
            && serde_json::from_str::<Value>(content)
                .ok()
                .is_some_and(|v| jsonschema::is_valid(s, &v));
        if !ok {
            failures.push(format!("{s} -> {job}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} outputs failed:\n{}",
        failures.len(),
        jobs.len(),
        failures.join("\n")
    );

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schemas_are_rejected_at_submit_and_enqueue_nothing() {
    let ns = unique_namespace("badschema");
    let mut backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;
    let bad = [
        json!({"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}),
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
        json!({"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"$ref": "https://example.com/remote.json"}}}),
        json!({"type": "json_schema"}),
        json!({"type": "yaml"}),
    ];
    for format in bad {
        let (status, v) = app
            .submit(&key, &chat("x", json!({"response_format": format})))
            .await;
        assert_eq!(status, 400, "{format}: {v}");
        let code = v["error"]["code"].as_str().unwrap_or_default();
        assert!(
            code == "invalid_response_format" || code == "invalid_request",
            "{format}: {v}"
        );
    }
    assert!(backends.job_keys().await.is_empty());
    let usage = app.usage(&key).await;
    assert_eq!(usage["usage"]["tokens_today"], 0, "{usage}");
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_required_schema_shapes_every_response() {
    let ns = unique_namespace("reqschema");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let worker =
        InProcessWorker::spawn_with(&ns, tiny_model_dir(), &["--redact-output", "false"]).await;
    let admin = app.admin_key().await;
    let required = json!({"type": "object", "properties": {
        "answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0,
        "maximum": 9}}, "required": ["answer", "confidence"], "additionalProperties": false});
    // An invalid schema is refused at registration.
    let r = app
        .http
        .patch(format!("{}/admin/tenants/acme/limits", app.base))
        .bearer_auth(&admin)
        .json(&json!({"required_output_schema": {"type": 5}}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status().as_u16(), 400);
    app.set_limits(&admin, "acme", json!({"required_output_schema": required}))
        .await;
    let key = app.key("acme").await;

    // No response_format: the tiny model's random weights still produce the schema.
    for seed in 0..3 {
        let id = app
            .submit_ok(
                &key,
                &chat(
                    "anything",
                    json!({"max_tokens": 60, "temperature": 1.0, "seed": seed}),
                ),
            )
            .await;
        let job = app.wait_terminal(&key, &id, Duration::from_secs(90)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["result"]["finish_reason"], "stop", "{job}");
        let v: Value = serde_json::from_str(job["result"]["content"].as_str().unwrap_or(""))
            .unwrap_or_else(|e| panic!("not JSON ({e}): {job}"));
        assert!(jsonschema::is_valid(&required, &v), "{v}");
    }
    // Another schema is refused; the same one is accepted.
    let other = format(0, json!({"type": "object"}));
    let (status, v) = app
        .submit(&key, &chat("x", json!({"response_format": other})))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_response_format");
    let same = format(1, required.clone());
    let (status, v) = app
        .submit(
            &key,
            &chat("x", json!({"response_format": same, "max_tokens": 60})),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    // Another tenant is not bound by it.
    let other_key = app.key("globex").await;
    let id = app
        .submit_ok(&other_key, &chat("free text", json!({"max_tokens": 8})))
        .await;
    let job = app
        .wait_terminal(&other_key, &id, Duration::from_secs(90))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");

    worker.stop().await;
    backends.cleanup().await;
}
