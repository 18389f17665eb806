//! Sessions: history per tenant and session in Redis, put before each new turn, trimmed,
//! stored after redaction, never readable or extendable by another tenant, and erasable.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;

const T: Duration = Duration::from_secs(90);

async fn run(app: &TestApp, key: &str, body: &Value) -> Value {
    let id = app.submit_ok(key, body).await;
    let job = app.wait_terminal(key, &id, T).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

fn prompt_tokens(job: &Value) -> u64 {
    job["result"]["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt tokens")
}

async fn stored(backends: &Backends, tenant: &str, session: &str) -> Vec<Value> {
    let mut conn = backends.redis.clone();
    let raw: Vec<String> = redis::cmd("LRANGE")
        .arg(backends.ks.session(tenant, session))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("lrange");
    raw.iter()
        .map(|m| serde_json::from_str(m).expect("json"))
        .collect()
}

async fn delete(app: &TestApp, key: &str, session: &str) -> u16 {
    app.http
        .delete(format!("{}/v1/sessions/{session}", app.base))
        .bearer_auth(key)
        .send()
        .await
        .expect("delete")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_carry_history_per_tenant_and_can_be_erased() {
    let ns = unique_namespace("sessions");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn_full(
        &ns,
        tiny_model_dir(),
        AMQP_URL,
        &["--session-max-messages", "4"],
    )
    .await;
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    let acme = app.key("acme").await;
    let globex = app.key("globex").await;
    let params = json!({"max_tokens": 6, "temperature": 0});
    let with = |content: &str, session: Option<&str>, system: bool| -> Value {
        let mut messages = Vec::new();
        if system {
            messages.push(json!({"role": "system", "content": "Be brief."}));
        }
        messages.push(json!({"role": "user", "content": content}));
        let mut body = params.clone();
        body["messages"] = json!(messages);
        if let Some(s) = session {
            body["session_id"] = json!(s);
        }
        body
    };

    // Turn 1, with a system prompt.
    run(&app, &acme, &with("first question", Some("chat-1"), true)).await;
    let history = stored(&backends, "acme", "chat-1").await;
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0]["role"], "user");
    assert_eq!(history[0]["content"], "first question");
    assert_eq!(history[1]["role"], "assistant");

    // Turn 2 without one: the stored system prompt and turn 1 come first.
    let fresh = run(&app, &acme, &with("second question", None, true)).await;
    let turn2 = run(&app, &acme, &with("second question", Some("chat-1"), false)).await;
    assert!(
        prompt_tokens(&turn2) > prompt_tokens(&fresh),
        "history is in the prompt: {} vs {}",
        prompt_tokens(&turn2),
        prompt_tokens(&fresh)
    );
    assert_eq!(stored(&backends, "acme", "chat-1").await.len(), 4);

    // Another tenant naming the same session gets a fresh conversation, and its turn does
    // not extend acme's.
    let alone = run(&app, &globex, &with("second question", None, false)).await;
    let other = run(
        &app,
        &globex,
        &with("second question", Some("chat-1"), false),
    )
    .await;
    assert_eq!(prompt_tokens(&other), prompt_tokens(&alone));
    assert_eq!(stored(&backends, "acme", "chat-1").await.len(), 4);
    assert_eq!(stored(&backends, "globex", "chat-1").await.len(), 2);

    // Stored after redaction (the input guard redacts personal data by default), trimmed to
    // the newest 4 messages, the system prompt kept apart.
    run(
        &app,
        &acme,
        // (Not a request to send something to an address, such as "send it to ... please":
        // the classifier can read that as data exfiltration; docs/results/guard.md.)
        &with("my email is jane.doe@example.com", Some("chat-1"), false),
    )
    .await;
    let history = stored(&backends, "acme", "chat-1").await;
    assert_eq!(history.len(), 4, "{history:?}");
    assert_eq!(history[0]["content"], "second question");
    let all = serde_json::to_string(&history).expect("json");
    assert!(!all.contains("jane.doe@example.com"), "{all}");
    let mut conn = backends.redis.clone();
    let system: Option<String> = redis::cmd("GET")
        .arg(backends.ks.session_system("acme", "chat-1"))
        .query_async(&mut conn)
        .await
        .expect("get");
    assert_eq!(system.as_deref(), Some("Be brief."));
    let ttl: i64 = redis::cmd("TTL")
        .arg(backends.ks.session("acme", "chat-1"))
        .query_async(&mut conn)
        .await
        .expect("ttl");
    assert!(ttl > 0, "history expires");

    // Erasing: acme's is gone, globex's stays.
    assert_eq!(delete(&app, &acme, "chat-1").await, 204);
    assert_eq!(delete(&app, &acme, "chat-1").await, 404);
    assert!(stored(&backends, "acme", "chat-1").await.is_empty());
    assert_eq!(stored(&backends, "globex", "chat-1").await.len(), 2);
    assert_eq!(delete(&app, &acme, "bad id!").await, 400);

    worker.stop().await;
    backends.cleanup().await;
}
