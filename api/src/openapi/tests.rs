//! The document against the router and the code: every route described, every description
//! answered, every schema true to the JSON it describes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use sluice_proto::ErrorCode;
use tower::ServiceExt;

use crate::state::AppState;

/// Routes that read no credentials.
const PUBLIC: [&str; 3] = ["/healthz", "/readyz", "/openapi.json"];

fn document() -> Value {
    serde_json::to_value(super::openapi()).expect("the document serializes")
}

/// Every operation: path, method (lowercase, as in the document) and the operation object.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            out.push((path.clone(), method.clone(), operation.clone()));
        }
    }
    out
}

/// Checks `instance` against the schema at `pointer` (a JSON pointer into the document), with
/// the document's components for its `$ref`s.
pub(crate) fn check_against(doc: &Value, pointer: &str, instance: &Value) -> Result<(), String> {
    let mut root = doc.clone();
    // A fragment is a URI part: the braces of path templates are escaped.
    let fragment = pointer.replace('{', "%7B").replace('}', "%7D");
    root["$ref"] = json!(format!("#{fragment}"));
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .map_err(|e| format!("the schema at {pointer} does not compile: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{instance} does not match {pointer}: {errors:?}"))
    }
}

/// Asserts that `instance` matches the component schema `name`.
pub(crate) fn assert_matches_schema(name: &str, instance: &Value) {
    let doc = document();
    assert!(
        doc["components"]["schemas"].get(name).is_some(),
        "no schema {name}"
    );
    if let Err(e) = check_against(&doc, &format!("/components/schemas/{name}"), instance) {
        panic!("{e}");
    }
}

/// Asserts that the component `name` lists exactly the keys of `instance` (an object whose
/// every field is present): a field added on either side is caught.
fn assert_same_fields(name: &str, instance: &Value) {
    let doc = document();
    let properties: Vec<&String> = doc["components"]["schemas"][name]["properties"]
        .as_object()
        .expect("an object schema")
        .keys()
        .collect();
    let fields: Vec<&String> = instance.as_object().expect("an object").keys().collect();
    let mut properties_sorted = properties.clone();
    properties_sorted.sort();
    let mut fields_sorted = fields.clone();
    fields_sorted.sort();
    assert_eq!(properties_sorted, fields_sorted, "{name}");
    assert_matches_schema(name, instance);
}

#[test]
fn declares_openapi_3_1_and_serializes_to_json() {
    let text = super::openapi().to_json().expect("JSON");
    let doc: Value = serde_json::from_str(&text).expect("parses back");
    let version = doc["openapi"].as_str().expect("a version");
    assert!(version.starts_with("3.1."), "{version}");
    assert_eq!(doc["info"]["title"], "Sluice");
    assert_eq!(
        doc["components"]["securitySchemes"][super::BEARER]["scheme"],
        "bearer"
    );
}

#[test]
fn every_error_code_is_in_the_error_code_schema() {
    let doc = document();
    let listed: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("an enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for code in ErrorCode::ALL {
        assert!(
            listed.contains(&code.as_str()),
            "{code} is not in the schema"
        );
    }
    assert_eq!(listed.len(), ErrorCode::ALL.len());
}

#[test]
fn every_operation_documents_a_client_error_with_the_error_schema() {
    let doc = document();
    for (path, method, operation) in operations(&doc) {
        let responses = operation["responses"].as_object().expect("responses");
        let documented = responses.iter().any(|(status, response)| {
            let schema = response["content"]["application/json"]["schema"].to_string();
            status.starts_with('4')
                && (schema.contains("#/components/schemas/ErrorResponse")
                    || schema.contains("#/components/schemas/OpenAiErrorResponse"))
        });
        assert!(documented, "{method} {path} documents no 4xx error body");
    }
}

#[test]
fn operations_have_unique_ids_and_name_the_credentials_they_need() {
    let doc = document();
    let mut ids = std::collections::BTreeSet::new();
    for (path, method, operation) in operations(&doc) {
        let id = operation["operationId"].as_str().expect("an operation id");
        assert!(ids.insert(id.to_string()), "{id} is not unique");
        let security = &operation["security"];
        if PUBLIC.contains(&path.as_str()) {
            assert!(security.is_null(), "{method} {path} needs no credentials");
        } else {
            let roles = if path.starts_with("/admin") {
                json!(["admin"])
            } else {
                json!([])
            };
            assert_eq!(
                security,
                &json!([{ super::BEARER: roles }]),
                "{method} {path}"
            );
            assert!(
                operation["responses"]["401"].is_object(),
                "{method} {path} does not document 401"
            );
        }
    }
}

#[test]
fn every_reference_resolves() {
    fn walk(doc: &Value, value: &Value, path: &str) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    if key == "$ref" {
                        let target = v.as_str().expect("a string").trim_start_matches('#');
                        assert!(
                            doc.pointer(target).is_some(),
                            "{path}: {target} does not resolve"
                        );
                    }
                    walk(doc, v, &format!("{path}/{key}"));
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(doc, v, &format!("{path}/{i}"));
                }
            }
            _ => {}
        }
    }
    let doc = document();
    walk(&doc, &doc, "");
}

/// Routes are registered only through `routes!` in `routes/mod.rs`, which documents them: a
/// plain registration anywhere in the crate's code (tests aside) is a route the document does
/// not describe.
#[test]
fn routes_are_registered_only_with_their_description() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.clone()];
    let mut sources = Vec::new();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read src") {
                files.push(entry.expect("entry").path());
            }
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            sources.push(path);
        }
    }
    assert!(sources.len() > 10, "{} files", sources.len());
    for path in sources {
        let text = std::fs::read_to_string(&path).expect("read");
        // Tests come last in a file and may build their own routers.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for plain in [
            ".route(",
            ".route_service(",
            ".nest(",
            ".nest_service(",
            ".merge(",
            "Router::new(",
            "routing::get",
            "routing::post",
            "routing::delete",
            "routing::patch",
            "routing::put",
            "routing::any",
        ] {
            assert!(
                !code.contains(plain),
                "{} registers a route with `{plain}`: register it with `routes!` in \
                 routes/mod.rs so that it is documented",
                path.display()
            );
        }
    }
    let router = include_str!("../routes/mod.rs");
    assert!(router.contains(".routes(routes!("));
}

/// An [`AppState`] whose Redis and RabbitMQ do not answer (nothing listens on port 1): enough
/// for every request that fails authentication, which touches neither.
fn unreachable_state(dir: &std::path::Path) -> AppState {
    use sluice_jobs::Keyspace;
    use sluice_shared::Secret;
    std::fs::create_dir_all(dir).expect("dir");
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": { "type": "Whitespace" },
        "post_processor": null,
        "decoder": null,
        "model": { "type": "WordLevel", "vocab": { "[UNK]": 0, "hi": 1 }, "unk_token": "[UNK]" },
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("write");
    std::fs::write(
        dir.join("config.json"),
        json!({ "max_position_embeddings": 64 }).to_string(),
    )
    .expect("write");
    let codec = sluice_prompt::chat::ChatCodec::load(dir).expect("codec");
    let redis = Secret::new("redis://127.0.0.1:1");
    let pool = sluice_jobs::redis_pool::create_pool(&redis, 1).expect("pool");
    let ks = Keyspace::new("openapi-test");
    let limits = crate::validate::Limits {
        max_tokens_limit: 64,
        max_messages: 4,
        max_message_chars: 100,
        default_timeout: Duration::from_secs(60),
        max_timeout: Duration::from_secs(60),
        completion_wait: Duration::from_secs(1),
        max_queued_jobs: None,
        session_ttl: Duration::from_secs(60),
        session_max_messages: 4,
        session_max_tokens: 64,
    };
    AppState {
        store: sluice_jobs::store::JobStore::new(pool.clone(), ks.clone(), 60),
        publisher: Arc::new(sluice_jobs::amqp::Publisher::new(
            Secret::new("amqp://127.0.0.1:1"),
            ks.clone(),
            sluice_jobs::amqp::QueueSettings::for_max_attempts(3),
            "openapi-test".to_string(),
        )),
        keys: crate::keys::ApiKeys::new(pool.clone(), ks.clone()),
        files: crate::files::FileStore::new(
            Arc::new(object_store::memory::InMemory::new()),
            object_store::path::Path::default(),
            pool.clone(),
            ks.clone(),
            crate::files::FileLimits {
                max_bytes: 1024,
                max_lines: 4,
                max_line_bytes: 512,
            },
        ),
        batches: crate::batches::store::BatchStore::new(pool.clone(), ks.clone(), 3600),
        tenants: crate::tenant::TenantStore::new(
            pool.clone(),
            ks.clone(),
            crate::tenant::TenantPolicy::default(),
        ),
        sessions: sluice_jobs::session::SessionStore::new(pool.clone(), ks.clone()),
        jwt: None,
        guard: Arc::new(sluice_guard::Guard::with_builtin(None)),
        classifier: None,
        codec: Arc::new(codec),
        limits: Arc::new(limits),
        ip_limits: (None, None),
        trusted_proxies: Arc::new(Vec::new()),
        anonymize_ips: false,
        webhooks: crate::webhooks::Webhooks::new(
            pool.clone(),
            ks.clone(),
            Secret::new("amqp://127.0.0.1:1"),
            &crate::webhooks::WebhookSettings {
                webhook_allow: Vec::new(),
                webhook_retry_delays: crate::webhooks::settings::RetryDelays::new(vec![
                    Duration::from_secs(1),
                ])
                .expect("delays"),
                webhook_timeout_secs: 1,
                webhook_deliveries: false,
            },
            "openapi-test".to_string(),
        ),
        stream_conns: crate::stream_conns::StreamConnections::new(
            redis::Client::open(redis.expose()).expect("client"),
        ),
        workers: sluice_jobs::workers::WorkerRegistry::new(pool, ks),
        metrics: Arc::new(crate::metrics::ApiMetrics::new()),
    }
}

/// The document's operations against the real router: each one is answered by its route (not
/// by the `not_found` or `method_not_allowed` fallback), with a status, headers and body the
/// document gives that operation. Without credentials every operation but the public ones
/// must answer 401.
#[tokio::test]
async fn the_router_answers_every_documented_operation_as_documented() {
    let dir = std::env::temp_dir().join(format!("sluice-openapi-{}", uuid::Uuid::now_v7()));
    let state = unreachable_state(&dir);
    let model = state.codec.name.clone();
    let app = crate::routes::router(state, 1 << 20);
    let doc = document();
    let operations = operations(&doc);
    assert!(operations.len() >= 17, "{} operations", operations.len());
    for (path, method, operation) in operations {
        let uri = path
            .replace("{id}", "0190f0c4-7d1b-7c3e-9a4f-1d2e3f4a5b6c")
            .replace("{key_id}", "0123456789abcdef")
            .replace("{tenant}", "acme");
        let mut request = Request::builder()
            .method(Method::from_bytes(method.to_uppercase().as_bytes()).expect("method"))
            .uri(&uri)
            .body(Body::empty())
            .expect("request");
        request
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let what = format!("{} {path} answered {status}", method.to_uppercase());
        assert!(
            status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
            "{what}: the route is missing from the router"
        );
        if !PUBLIC.contains(&path.as_str()) {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        }
        let key = status.as_u16().to_string();
        let documented = &operation["responses"][&key];
        assert!(documented.is_object(), "{what}, which it does not document");
        for name in documented["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|h| h.0)
        {
            let always = ["WWW-Authenticate"];
            if always.contains(&name.as_str()) {
                assert!(
                    response.headers().contains_key(name.as_str()),
                    "{what} without {name}"
                );
            }
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(
            documented["content"].get(&content_type).is_some(),
            "{what} with content-type {content_type:?}, which it does not document"
        );
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("a JSON body");
        let pointer = format!(
            "/paths/{}/{method}/responses/{key}/content/{}/schema",
            path.replace('~', "~0").replace('/', "~1"),
            content_type.replace('~', "~0").replace('/', "~1"),
        );
        if let Err(e) = check_against(&doc, &pointer, &body) {
            panic!("{what}: {e}");
        }
    }

    // What is served is the document with this deployment's limits and model.
    let request = Request::get("/openapi.json")
        .body(Body::empty())
        .expect("request");
    let response = app.oneshot(request).await.expect("infallible");
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
        .await
        .expect("body");
    let served: Value = serde_json::from_slice(&bytes).expect("JSON");
    let submit = &served["components"]["schemas"]["SubmitRequest"]["properties"];
    assert_eq!(submit["max_tokens"]["maximum"], 64);
    assert_eq!(submit["messages"]["maxItems"], 4);
    assert_eq!(submit["timeout_secs"]["maximum"], 60);
    let chat = &served["components"]["schemas"]["ChatCompletionRequest"]["properties"];
    assert_eq!(chat["model"]["enum"], json!([model]));
    assert_eq!(chat["max_completion_tokens"]["maximum"], 64);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn shared_types_match_their_doc_schemas() {
    use crate::tenant::{TenantPolicy, TenantUsage};
    use sluice_jobs::workers::WorkerInfo;

    let policy = TenantPolicy::default();
    assert_same_fields("TenantPolicy", &json!(policy));
    let overridden = TenantPolicy {
        requests_per_second: None,
        injection_judge_from: Some(0.2),
        required_output_schema: Some(json!({ "type": "object" })),
        ..TenantPolicy::default()
    };
    assert_same_fields("TenantPolicy", &json!(overridden));
    // Every field of the policy may be patched.
    let patch = &document()["components"]["schemas"]["TenantPolicyPatch"]["properties"];
    for field in json!(policy).as_object().expect("an object").keys() {
        assert!(patch.get(field).is_some(), "{field} cannot be patched");
    }
    assert_matches_schema("TenantPolicyPatch", &json!({ "tokens_per_day": null }));

    let usage = TenantUsage {
        tokens_today: 1,
        tokens_this_month: 2,
        active_jobs: 3,
    };
    assert_same_fields("TenantUsage", &json!(usage));

    let cpu = WorkerInfo {
        id: "w1".into(),
        model: "qwen".into(),
        device: "cpu".into(),
        capacity: 4,
        in_flight: 1,
        kv_usage: 0.25,
        gpu_memory_used_bytes: None,
        gpu_memory_total_bytes: None,
        gpu_utilization: None,
        version: "0.1.0".into(),
        started_at: 1,
        last_seen: 2,
    };
    assert_matches_schema("WorkerInfo", &json!(cpu));
    let gpu = WorkerInfo {
        device: "cuda:0".into(),
        gpu_memory_used_bytes: Some(1),
        gpu_memory_total_bytes: Some(2),
        gpu_utilization: Some(0.5),
        ..cpu
    };
    assert_same_fields("WorkerInfo", &json!(gpu));

    let key = crate::keys::KeyInfo {
        key_id: "0123456789abcdef".into(),
        tenant: "acme".into(),
        name: "default".into(),
        role: "user".into(),
        created_at: Some(1),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    };
    assert_same_fields("KeyInfo", &json!(key));
}

#[test]
fn error_responses_narrow_the_envelope_to_their_codes() {
    let doc = document();
    let path = "/paths/~1v1~1jobs/post/responses";
    let body = |code: &str| json!({ "error": { "code": code, "message": "m" } });
    let at = |status: &str| format!("{path}/{status}/content/application~1json/schema");
    assert!(check_against(&doc, &at("429"), &body("queue_full")).is_ok());
    assert!(check_against(&doc, &at("429"), &body("not_found")).is_err());
    assert!(check_against(&doc, &at("413"), &body("context_length_exceeded")).is_ok());
    assert!(
        doc.pointer(&format!("{path}/429/headers/RateLimit-Limit"))
            .is_some()
    );
    assert!(
        doc.pointer(&format!("{path}/503/headers/Retry-After"))
            .is_some()
    );
    // The OpenAI routes: their own envelope, but the framing check's in Sluice's.
    let chat = "/paths/~1v1~1chat~1completions/post/responses/413/content/application~1json/schema";
    let openai = json!({ "error": {
        "message": "m", "type": "invalid_request_error", "param": null,
        "code": "context_length_exceeded" } });
    check_against(&doc, chat, &openai).expect("OpenAI's envelope");
    assert!(check_against(&doc, chat, &body("payload_too_large")).is_ok());
    assert!(check_against(&doc, chat, &body("context_length_exceeded")).is_err());
}
