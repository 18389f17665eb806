//! Backpressure: caps on queued jobs for the deployment and per tenant answer 429
//! `queue_full` with a `Retry-After` from the measured drain rate, and write nothing.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;

async fn submit(app: &TestApp, key: &str) -> (u16, Value, Option<u64>) {
    let body = chat("hello", json!({"max_tokens": 4, "temperature": 0}));
    let (status, v, headers) = app.submit_with_headers(key, &body, &[]).await;
    let retry = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (status, v, retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_say_when_to_retry_and_write_nothing() {
    let ns = unique_namespace("backpressure");
    let mut backends = Backends::connect(&ns).await;
    let app =
        TestApp::spawn_full(&ns, tiny_model_dir(), AMQP_URL, &["--max-queued-jobs", "4"]).await;
    let admin = app.admin_key().await;
    app.set_limits(&admin, "globex", json!({"max_queued_jobs": 1}))
        .await;
    let (acme, globex) = (app.key("acme").await, app.key("globex").await);

    // The tenant's cap.
    assert_eq!(submit(&app, &globex).await.0, 202);
    let (status, v, retry) = submit(&app, &globex).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("tenant")
    );
    // Nothing has left the queue yet: no rate to go by, the default guess.
    assert_eq!(retry, Some(30));

    // The deployment's cap: 1 + 3 queued, the next is refused.
    for _ in 0..3 {
        assert_eq!(submit(&app, &acme).await.0, 202);
    }
    let tokens = app.usage(&acme).await["usage"]["tokens_today"].clone();
    let (status, v, _) = submit(&app, &acme).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");
    assert_eq!(
        backends.job_keys().await.len(),
        4,
        "the refusals wrote nothing"
    );
    assert_eq!(app.usage(&acme).await["usage"]["tokens_today"], tokens);
    assert_eq!(backends.ready_count(&backends.ks.jobs_queue()).await, 4);

    // A worker drains the queue: submits are accepted again.
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    wait_for("the queue to drain", Duration::from_secs(60), || async {
        (backends.ready_count(&backends.ks.jobs_queue()).await == 0).then_some(())
    })
    .await;
    // Delivered is not yet started: a job counts as queued until the worker's start script
    // takes it out of the queued set, and a worker stopped before that gives it back.
    let queued: Vec<String> = (0..backends.ks.queue_shards())
        .map(|shard| backends.ks.queued(shard))
        .collect();
    wait_for("the jobs to start", Duration::from_secs(60), || {
        let mut redis = backends.redis.clone();
        let queued = queued.clone();
        async move {
            let mut n = 0u64;
            for key in &queued {
                n += redis::cmd("ZCARD")
                    .arg(key)
                    .query_async::<u64>(&mut redis)
                    .await
                    .expect("zcard");
            }
            (n == 0).then_some(())
        }
    })
    .await;
    worker.stop().await;
    for _ in 0..4 {
        assert_eq!(submit(&app, &acme).await.0, 202);
    }
    // Full again; now 4 or more jobs left the queue in the last minute, so the estimate is at
    // most 60 s / 4 per job over the cap.
    let (status, v, retry) = submit(&app, &acme).await;
    assert_eq!(status, 429, "{v}");
    let retry = retry.expect("Retry-After");
    assert!((1..=15).contains(&retry), "Retry-After {retry}");
    backends.cleanup().await;
}
