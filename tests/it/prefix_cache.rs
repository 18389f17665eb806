//! Prefix caching end to end, on the real Qwen2.5 GGUF: a tenant's second job with the same
//! system prompt reuses its pages (`usage.cached_tokens`, and OpenAI's
//! `prompt_tokens_details.cached_tokens`) and answers token for token as without the cache; a
//! conversation's next turn reuses the pages of the previous turn's answer too;
//! another tenant sending the same request reuses nothing; a tenant whose policy turns the
//! cache off reuses nothing either.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;

const T: Duration = Duration::from_secs(180);

const SYSTEM: &str = "You are the support assistant of Hedgerow, a shop that sells garden \
    tools. Answer briefly and politely, in the customer's language. Never promise a delivery \
    date. A refund needs the order number and the reason. Anything about an injury goes to a \
    human colleague at once. Do not discuss competitors or prices of other shops.";

fn body(question: &str) -> Value {
    json!({
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
        "temperature": 0, "max_tokens": 12,
    })
}

/// Runs `body` as a job: its content, cached tokens and prompt tokens.
async fn answer(app: &TestApp, key: &str, body: &Value) -> (String, u64, u64) {
    let id = app.submit_ok(key, body).await;
    let job = app.wait_terminal(key, &id, T).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let usage = &job["result"]["usage"];
    (
        job["result"]["content"]
            .as_str()
            .expect("content")
            .to_string(),
        usage["cached_tokens"].as_u64().expect("cached_tokens"),
        usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_reuses_its_own_prefix_and_nobody_elses() {
    let ns = unique_namespace("prefix");
    let backends = Backends::connect(&ns).await;
    let model = real_model_path();
    let app = TestApp::spawn_full(&ns, &model, AMQP_URL, &[]).await;
    // A canary period far longer than the test, so it cannot roll over between two jobs.
    let worker =
        InProcessWorker::spawn_with(&ns, &model, &["--canary-rotation-secs", "315360000"]).await;
    let admin = app.admin_key().await;
    app.set_limits(&admin, "initech", json!({"prefix_cache": false}))
        .await;
    // The guard flags rather than blocks: this test is about the cache, and the classifier
    // has scored a conversation of this kind (a refund question, its answer, a follow-up) as
    // an injection (a false positive the guard's own tests and results account for).
    app.set_limits(&admin, "acme", json!({"injection_action": "flag"}))
        .await;
    let (acme, globex, initech) = (
        app.key("acme").await,
        app.key("globex").await,
        app.key("initech").await,
    );

    let question = "Can I return a spade I bought last week?";
    let (first, cached, prompt) = answer(&app, &acme, &body(question)).await;
    assert_eq!(cached, 0, "the cache starts empty");
    let (again, cached, _) = answer(&app, &acme, &body(question)).await;
    assert!(cached >= 64 && cached < prompt, "{cached} of {prompt}");
    assert_eq!(again, first, "the same greedy answer from cached pages");
    // Another question after the same system prompt reuses the system prompt's pages.
    let (_, cached, _) = answer(&app, &acme, &body("Do you sell hedge trimmers?")).await;
    assert!(cached >= 64, "{cached}");

    // The next turn of a conversation repeats the first turn's prompt and answer: it reuses
    // the pages of both, not only the prompt's.
    let mut turn = body(question);
    turn["max_tokens"] = json!(48);
    let (answer_text, _, first_prompt) = answer(&app, &acme, &turn).await;
    let next = json!({
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer_text},
            {"role": "user", "content": "Thank you. And a rake?"},
        ],
        "temperature": 0, "max_tokens": 4,
    });
    let (_, cached, _) = answer(&app, &acme, &next).await;
    assert!(
        cached > first_prompt,
        "{cached} cached; the first turn's prompt alone had {first_prompt} tokens"
    );

    // Another tenant, the same request: nothing of acme's.
    let (_, cached, _) = answer(&app, &globex, &body(question)).await;
    assert_eq!(cached, 0);
    // A tenant that turned the cache off: nothing, even the second time.
    let (off_first, cached, _) = answer(&app, &initech, &body(question)).await;
    assert_eq!(cached, 0);
    let (off_again, cached, _) = answer(&app, &initech, &body(question)).await;
    assert_eq!(cached, 0);
    assert_eq!(off_again, off_first);

    // OpenAI's shape of the same figure.
    let mut openai = body(question);
    openai["model"] = json!(app.model_id(&acme).await);
    let (status, completion) = app.chat_completion(&acme, &openai).await;
    assert_eq!(status, 200, "{completion}");
    let cached = completion["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens");
    assert!(cached >= 64, "{completion}");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        first.as_str()
    );

    worker.stop().await;
    backends.cleanup().await;
}
