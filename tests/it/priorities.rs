//! Priorities: interactive jobs are served before batch jobs, whatever order they came in;
//! a tenant's default class applies to jobs that name none.

use std::time::Duration;

use serde_json::json;
use sluice_proto::Priority;
use sluice_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_jobs_go_first() {
    let ns = unique_namespace("priorities");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let admin = app.admin_key().await;
    app.set_limits(&admin, "globex", json!({"default_priority": "batch"}))
        .await;
    let (acme, globex) = (app.key("acme").await, app.key("globex").await);
    let job = |priority: Option<&str>| {
        let mut body = chat(
            "tell me more",
            json!({"max_tokens": 12, "temperature": 0, "ignore_eos": true}),
        );
        if let Some(p) = priority {
            body["priority"] = json!(p);
        }
        body
    };

    // Batch work first, then interactive, all before any worker runs.
    let mut batch = Vec::new();
    for _ in 0..4 {
        batch.push(app.submit_ok(&acme, &job(Some("batch"))).await);
    }
    batch.push(app.submit_ok(&globex, &job(None)).await);
    let mut interactive = Vec::new();
    for _ in 0..2 {
        interactive.push(app.submit_ok(&acme, &job(None)).await);
    }
    let batch_queue = backends.ks.jobs_queue_for(Priority::Batch);
    assert_eq!(
        backends.ready_count(&batch_queue).await,
        5,
        "globex's default is batch"
    );
    assert_eq!(backends.ready_count(&backends.ks.jobs_queue()).await, 2);

    let worker =
        InProcessWorker::spawn_with(&ns, tiny_model_dir(), &["--max-batch-size", "1"]).await;
    let started = |ids: Vec<String>| {
        let backends = &backends;
        let app = &app;
        let (acme, globex) = (&acme, &globex);
        async move {
            let mut at = Vec::new();
            for id in ids {
                let key = if app.get(acme, &id).await.0 == 200 {
                    acme
                } else {
                    globex
                };
                let job = app.wait_terminal(key, &id, Duration::from_secs(90)).await;
                assert_eq!(job["status"], "succeeded", "{job}");
                let ms: u64 = backends
                    .job_field(&id, "started_at")
                    .await
                    .and_then(|v| v.parse().ok())
                    .expect("started_at");
                at.push(ms);
            }
            at
        }
    };
    let first = started(interactive).await;
    let later = started(batch).await;
    let last_interactive = first.iter().max().expect("interactive");
    let first_batch = later.iter().min().expect("batch");
    assert!(
        last_interactive <= first_batch,
        "interactive started at {first:?}, batch at {later:?}"
    );

    worker.stop().await;
    backends.cleanup().await;
}
