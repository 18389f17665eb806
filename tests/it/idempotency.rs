//! `Idempotency-Key` on submit: a retry gets the same job, never a second one, also when the
//! retries race; a different request under the same key is refused; a submit that failed
//! frees its key; a retry of a job whose message was lost publishes it again, and it runs
//! once.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_publishes_again_a_queued_job_whose_message_was_lost() {
    let ns = unique_namespace("idem-lost");
    let mut backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;
    let body = chat("hello", json!({"max_tokens": 8}));
    let (status, first, _) = submit(&app, &key, "lost-1", &body).await;
    assert_eq!(status, 202, "{first}");
    let id = first["id"].as_str().expect("id").to_string();
    let queue = backends.ks.jobs_queue();
    // A retry soon after the admission publishes nothing: the first publish may be under way.
    let (_, again, replayed) = submit(&app, &key, "lost-1", &body).await;
    assert!(replayed);
    assert_eq!(again["id"], first["id"]);
    assert_eq!(backends.ready_count(&queue).await, 1);

    // The message is lost, as when the admitting process died before its publish, and the
    // admission is older than any publish takes.
    backends
        .channel
        .queue_purge(queue.as_str().into(), Default::default())
        .await
        .expect("purge");
    let created: u64 = backends
        .job_field(&id, "created_at")
        .await
        .expect("created_at")
        .parse()
        .expect("ms");
    let mut redis = backends.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(backends.ks.job(&id.parse().expect("uuid")))
        .arg("created_at")
        .arg(created - 60_000)
        .query_async(&mut redis)
        .await
        .expect("hset");
    // The retry gets the same job and publishes it again; a second retry adds a second copy.
    for _ in 0..2 {
        let (status, again, replayed) = submit(&app, &key, "lost-1", &body).await;
        assert_eq!(status, 202, "{again}");
        assert!(replayed);
        assert_eq!(again["id"], first["id"]);
    }
    assert_eq!(backends.ready_count(&queue).await, 2);
    assert_eq!(backends.job_keys().await.len(), 1, "no second job");

    // A worker runs it once: the copy that comes second is dropped, and counts no attempt.
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    let job = app
        .wait_status(&key, &id, "succeeded", std::time::Duration::from_secs(120))
        .await;
    assert_eq!(job["attempts"], 1, "{job}");
    wait_for(
        "both copies consumed",
        std::time::Duration::from_secs(60),
        || async { (backends.ready_count(&queue).await == 0).then_some(()) },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        backends.job_field(&id, "attempts").await.as_deref(),
        Some("1")
    );
    worker.stop().await;
    backends.cleanup().await;
}
