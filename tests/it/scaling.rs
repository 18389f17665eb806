//! Scaling out: 1, 2 and 4 worker processes on one queue (tiny model). With any number of
//! workers every job succeeds exactly once and none is lost; with two or more, each worker
//! takes a share (RabbitMQ hands deliveries round-robin to consumers with room, and each job
//! record names the worker whose `START` ran it). Throughput per worker count is printed
//! (`--nocapture`), not asserted: the machine's cores are shared with the tests beside it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_tests::*;

const JOBS: usize = 80;
const MAX_TOKENS: u64 = 128;

/// Runs `JOBS` jobs on `workers` worker processes; returns (jobs/s, jobs per worker).
async fn run_with(workers: usize) -> (f64, BTreeMap<String, usize>) {
    let ns = unique_namespace(&format!("scale{workers}"));
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn_full(&ns, tiny_model_dir(), AMQP_URL, &NO_IP_LIMITS).await;
    let admin = app.admin_key().await;
    app.set_limits(&admin, "acme", unlimited_tenant()).await;
    let key = app.key("acme").await;
    let procs: Vec<WorkerProcess> = (0..workers)
        .map(|i| WorkerProcess::spawn(&ns, tiny_model_dir(), &format!("{ns}-w{i}")))
        .collect();
    backends
        .wait_for_consumers(workers, Duration::from_secs(60))
        .await;

    let started = Instant::now();
    let submits = (0..JOBS).map(|n| {
        let body = chat(
            &format!("scaling job {n}"),
            json!({"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true}),
        );
        let (app, key) = (&app, &key);
        async move { app.submit_ok(key, &body).await }
    });
    let ids: Vec<String> = futures_util::future::join_all(submits).await;
    let mut redis = backends.redis.clone();
    let records = await_terminal_once(&mut redis, &ns, &ids, Duration::from_secs(180)).await;
    let elapsed = started.elapsed();

    let mut per_worker: BTreeMap<String, usize> = procs.iter().map(|p| (p.id.clone(), 0)).collect();
    for (id, r) in &records {
        assert_eq!(
            r.get("status").map(String::as_str),
            Some("succeeded"),
            "job {id}: {r:?}"
        );
        assert_eq!(
            r.get("attempts").map(String::as_str),
            Some("1"),
            "job {id}: {r:?}"
        );
        let worker = r.get("worker").cloned().unwrap_or_default();
        let count = per_worker.get_mut(&worker).unwrap_or_else(|| {
            panic!("job {id} ran on {worker:?}, not one of this test's workers")
        });
        *count += 1;
    }
    assert_eq!(records.len(), JOBS, "every job terminal");
    assert_eq!(
        job_record_keys(&mut redis, &ns).await.len(),
        JOBS,
        "a record per job, no more"
    );
    assert_eq!(per_worker.values().sum::<usize>(), JOBS);
    if workers >= 2 {
        assert!(
            per_worker.values().all(|&n| n >= 1),
            "every worker took a share: {per_worker:?}"
        );
    }
    drop(procs);
    drop(app);
    backends.cleanup().await;
    (JOBS as f64 / elapsed.as_secs_f64(), per_worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_two_and_four_workers_share_one_queue() {
    // A load test: never beside another one (see `load_test_lock`).
    let _load = crate::load_test_lock().await;
    let mut lines = Vec::new();
    // One after another: the runs must not compete for the cores.
    for workers in [1, 2, 4] {
        let (rate, per_worker) = run_with(workers).await;
        lines.push(format!(
            "{workers} worker(s): {rate:.1} jobs/s ({JOBS} jobs of {MAX_TOKENS} tokens), per worker {:?}",
            per_worker.values().collect::<Vec<_>>()
        ));
    }
    for line in lines {
        eprintln!("scaling: {line}");
    }
}
