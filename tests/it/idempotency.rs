//! `Idempotency-Key` on submit: a retry gets the same job, never a second one, also when the
//! retries race; a different request under the same key is refused; a submit that failed
//! frees its key.

use serde_json::{Value, json};
use sluice_tests::*;

async fn submit(app: &TestApp, key: &str, idem: &str, body: &Value) -> (u16, Value, bool) {
    let (status, v, headers) = app
        .submit_with_headers(key, body, &[("Idempotency-Key", idem)])
        .await;
    let replayed = headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    (status, v, replayed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_get_the_same_job_even_when_they_race() {
    let ns = unique_namespace("idem");
    let mut backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;
    let body = chat("hello", json!({"max_tokens": 16}));

    let (status, first, replayed) = submit(&app, &key, "order-1", &body).await;
    assert_eq!(status, 202, "{first}");
    assert!(!replayed);
    let tokens = app.usage(&key).await["usage"]["tokens_today"].clone();
    let (status, again, replayed) = submit(&app, &key, "order-1", &body).await;
    assert_eq!(status, 202, "{again}");
    assert!(replayed, "marked as a replay");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(backends.job_keys().await.len(), 1, "one job");
    assert_eq!(
        app.usage(&key).await["usage"]["tokens_today"],
        tokens,
        "the retry reserved nothing"
    );
    assert_eq!(backends.ready_count(&backends.ks.jobs_queue()).await, 1);

    // Eight racing retries of a new key: one job.
    let racing = (0..8).map(|_| submit(&app, &key, "order-2", &body));
    let answers = futures_util::future::join_all(racing).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(status, v, _)| {
            assert_eq!(*status, 202, "{v}");
            v["id"].as_str().expect("id").to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(
        answers.iter().filter(|(_, _, r)| !r).count(),
        1,
        "one creator"
    );
    assert_eq!(backends.job_keys().await.len(), 2);
    assert_eq!(backends.ready_count(&backends.ks.jobs_queue()).await, 2);

    // The same key for another request: refused, nothing written.
    let other = chat("something else", json!({"max_tokens": 16}));
    let (status, v, _) = submit(&app, &key, "order-1", &other).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "idempotency_key_reused");
    assert_eq!(backends.job_keys().await.len(), 2);

    // Keys are per tenant.
    let globex = app.key("globex").await;
    let (status, theirs, replayed) = submit(&app, &globex, "order-1", &body).await;
    assert_eq!(status, 202, "{theirs}");
    assert!(!replayed);
    assert_ne!(theirs["id"], first["id"]);

    // A malformed key is a 400.
    let (status, v, _) = submit(&app, &key, &"k".repeat(256), &body).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_parameter");
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_that_failed_frees_its_key() {
    let ns = unique_namespace("idem-fail");
    let mut backends = Backends::connect(&ns).await;
    let body = chat("hello", json!({"max_tokens": 16}));
    // No broker: the publish fails, the admission is rolled back, the key with it.
    let down = TestApp::spawn_with(&ns, "amqp://guest:guest@127.0.0.1:1/%2f").await;
    let key = down.key("acme").await;
    let (status, v, _) = submit(&down, &key, "retry-me", &body).await;
    assert_eq!(status, 503, "{v}");
    assert!(backends.job_keys().await.is_empty());

    let up = TestApp::spawn(&ns).await;
    let (status, v, replayed) = submit(&up, &key, "retry-me", &body).await;
    assert_eq!(status, 202, "{v}");
    assert!(!replayed, "the retry created the job");
    assert_eq!(backends.job_keys().await.len(), 1);
    backends.cleanup().await;
}
