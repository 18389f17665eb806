//! Fault suite: under a steady submit rate, twenty workers are killed with SIGKILL in the
//! middle of generating and the API is restarted; afterwards every accepted job is terminal,
//! none is lost, none is duplicated, and none was completed twice.
//!
//! Restarting RabbitMQ and Redis is `restarts.rs`, on servers of its own: the shared broker and
//! store of the machine serve the tests running beside this one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sluice_tests::*;

/// An API without per-IP limits: the load and the polls all come from loopback.
async fn spawn_app(ns: &str) -> TestApp {
    TestApp::spawn_full(ns, tiny_model_dir(), AMQP_URL, &NO_IP_LIMITS).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_workers_and_a_restarted_api_lose_and_duplicate_nothing() {
    // A load test: never beside another one (see `load_test_lock`).
    let _load = crate::load_test_lock().await;
    let ns = unique_namespace("faults");
    let backends = Backends::connect(&ns).await;
    let app = spawn_app(&ns).await;
    let admin = app.admin_key().await;
    app.set_limits(&admin, "acme", unlimited_tenant()).await;
    let key = app.key("acme").await;

    let base = Arc::new(Mutex::new(app.base.clone()));
    let load = Load::start(
        app.http.clone(),
        Arc::clone(&base),
        key.clone(),
        Duration::from_millis(40),
        |n| {
            chat(
                &format!("job {n}"),
                json!({"max_tokens": 48, "temperature": 0, "ignore_eos": true}),
            )
        },
    );

    let mut app = Some(app);
    for i in 0..20 {
        let mut victim = WorkerProcess::spawn(&ns, tiny_model_dir(), &format!("victim-{i}"));
        let alive = Duration::from_millis(rand::random_range(600..1400));
        tokio::time::sleep(alive).await;
        victim.kill9();
        if i == 10 {
            // Restart the API: a new process-equivalent on the same namespace takes over.
            let fresh = spawn_app(&ns).await;
            *base.lock().expect("lock") = fresh.base.clone();
            drop(app.replace(fresh));
        }
    }
    let report = load.finish().await;
    let (accepted, statuses) = (report.accepted(), report.statuses());
    let app = app.expect("app");

    // One healthy worker finishes what is left.
    let _finisher = WorkerProcess::spawn(&ns, tiny_model_dir(), "finisher");
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let mut redelivered = 0;
    for id in &accepted {
        let job = app.wait_terminal(&key, id, Duration::from_secs(180)).await;
        let status = job["status"].as_str().unwrap_or("?").to_string();
        match status.as_str() {
            "succeeded" => assert_eq!(job["result"]["usage"]["completion_tokens"], 48, "{job}"),
            "failed" => assert_eq!(job["error"]["code"], "attempts_exhausted", "{job}"),
            other => panic!("job {id} ended {other}: {job}"),
        }
        if job["attempts"].as_u64().unwrap_or(0) > 1 {
            redelivered += 1;
        }
        *outcomes.entry(status).or_default() += 1;
        // Completed once: its event stream holds exactly one terminal event.
        let mut conn = backends.redis.clone();
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(backends.ks.job_events(&id.parse().expect("a job id")))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("xrange");
        let done = entries
            .iter()
            .filter(|(_, f)| f.get("type").map(String::as_str) == Some("done"))
            .count();
        assert_eq!(done, 1, "job {id} finished {done} times");
    }
    let unique: HashSet<&String> = accepted.iter().collect();
    assert_eq!(unique.len(), accepted.len(), "no id accepted twice");
    let mut conn = backends.redis.clone();
    let records = job_record_keys(&mut conn, backends.ks.namespace())
        .await
        .len();
    assert_eq!(
        records,
        accepted.len(),
        "a record per accepted job, no more"
    );
    assert!(
        statuses.keys().all(|s| [0, 202].contains(s)),
        "only accepted or (during the API restart) unreachable: {statuses:?}"
    );
    assert!(
        redelivered > 0,
        "some jobs were interrupted and redelivered"
    );
    eprintln!(
        "faults: {} accepted ({statuses:?}), outcomes {outcomes:?}, {redelivered} redelivered",
        accepted.len()
    );
    backends.cleanup().await;
}
