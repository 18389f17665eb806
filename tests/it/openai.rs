//! The OpenAI-compatible surface: `/v1/models`, `/v1/chat/completions` plain and streamed,
//! errors in OpenAI's shape, and the official OpenAI Python SDK against it unchanged.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;

const T: Duration = Duration::from_secs(90);

/// The `data:` payloads of an SSE response, in order.
async fn sse_data(resp: reqwest::Response) -> Vec<String> {
    let body = read_to_end(resp, T).await;
    body.split("\n\n")
        .flat_map(|block| {
            block
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_plain_and_streamed_give_the_same_text() {
    let ns = unique_namespace("oai");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    let key = app.key("acme").await;
    let model = app.model_id(&key).await;

    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "tell me about rivers"}],
        "max_tokens": 40, "temperature": 0.7, "seed": 5,
    });
    let (status, plain) = app.chat_completion(&key, &body).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["choices"][0]["message"]["role"], "assistant");
    let text = plain["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    let completion_tokens = plain["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!(completion_tokens > 0);
    assert_eq!(
        plain["usage"]["total_tokens"].as_u64(),
        Some(plain["usage"]["prompt_tokens"].as_u64().expect("prompt") + completion_tokens)
    );
    // The completion is the job: readable on /v1/jobs too.
    let job_id = plain["id"]
        .as_str()
        .and_then(|s| s.strip_prefix("chatcmpl-"))
        .expect("id");
    let (_, job) = app.get(&key, job_id).await;
    assert_eq!(job["result"]["content"].as_str(), Some(text.as_str()));

    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    streamed_body["stream_options"] = json!({"include_usage": true});
    let resp = app
        .http
        .post(format!("{}/v1/chat/completions", app.base))
        .bearer_auth(&key)
        .json(&streamed_body)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let data = sse_data(resp).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text, "same seed, same text, streamed or not");
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&plain["choices"][0]["finish_reason"]]);
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"]["completion_tokens"].as_u64(),
        Some(completion_tokens)
    );

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_in_openai_shape_and_enqueue_nothing() {
    let ns = unique_namespace("oai-err");
    let mut backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;
    let model = app.model_id(&key).await;
    let msgs = json!([{"role": "user", "content": "x"}]);
    let cases = [
        (
            json!({"model": "gpt-4o", "messages": msgs}),
            404,
            "model_not_found",
        ),
        (
            json!({"model": model, "messages": msgs, "n": 3}),
            400,
            "unsupported_parameter",
        ),
        (
            json!({"model": model, "messages": msgs, "response_format": {"type": "xml"}}),
            400,
            "invalid_response_format",
        ),
        (
            json!({"model": model, "messages": msgs, "response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}),
            400,
            "invalid_response_format",
        ),
        (
            json!({"model": model, "messages": msgs, "max_tokens": 0}),
            400,
            "invalid_parameter",
        ),
        (
            json!({"model": model, "messages": []}),
            400,
            "invalid_parameter",
        ),
        (json!({"model": model}), 400, "invalid_request"),
        (
            json!({"model": model, "messages": [{"role": "user", "content": "x", "colour": 1}]}),
            400,
            "invalid_request",
        ),
        (
            json!({"model": model, "messages": [{"role": "assistant", "content": "x",
                "tool_calls": [{"id": "c1"}]}, {"role": "user", "content": "y"}]}),
            400,
            "unsupported_parameter",
        ),
    ];
    for (body, want_status, want_code) in cases {
        let (status, v) = app.chat_completion(&key, &body).await;
        assert_eq!(status, want_status, "{body}: {v}");
        assert_eq!(v["error"]["code"], want_code, "{body}: {v}");
        assert_eq!(
            v["error"]["type"],
            if status == 404 {
                "not_found_error"
            } else {
                "invalid_request_error"
            }
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let (status, v) = app
        .chat_completion("sk-nope", &json!({"model": model, "messages": msgs}))
        .await;
    assert_eq!(status, 401);
    assert_eq!(v["error"]["type"], "authentication_error");
    // Nothing was enqueued and no quota was spent by any rejection.
    assert!(backends.job_keys().await.is_empty());
    let usage = app.usage(&key).await;
    assert_eq!(usage["usage"]["tokens_today"], 0, "{usage}");
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_sdk_works_unchanged() {
    let python = std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_sdk = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_sdk,
        "{python} cannot import the openai package: run the tests with scripts/test, which \
         installs it into a virtualenv, or set SLUICE_TEST_PYTHON"
    );
    let ns = unique_namespace("oai-sdk");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    let key = app.key("acme").await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_sdk.py");
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .arg(&app.base)
        .arg(&key)
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("report");
    assert!(report["chunks"].as_u64().is_some_and(|n| n > 2), "{report}");
    worker.stop().await;
    backends.cleanup().await;
}
