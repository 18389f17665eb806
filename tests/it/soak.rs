//! Load test: a steady submit rate for 60 s against a `sluice-api` process and two worker
//! processes (tiny model), with a client polling results beside it. Asserted: no 5xx and no
//! refusal at all (every limit is lifted for the tenant and the client IP; the queue caps are
//! the defaults, which a keeping-up pair of workers never reaches), no submit or poll hangs,
//! every accepted job succeeds exactly once, and memory stays bounded: the resident set of
//! each process over the last 20 s exceeds its size at 20 s by at most `RSS_SLACK_MIB`.
//! Everything measured is printed (`--nocapture`); nothing about speed is asserted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_tests::*;

/// Submits per second. Every submit now runs the learned injection classifier (a MiniLM
/// forward pass, about 7 ms of CPU per short message in batches on these 2 shared cores,
/// against 0.2 ms for the rest of the submit path): at the earlier 100/s the classifier's
/// queue overflowed into 503 `guard_unavailable` beside two workers, Redis and RabbitMQ.
/// 40/s leaves it about a third of a core, so the test still checks stability, not capacity
/// (the measurements are in docs/results/guard.md).
const RATE: u64 = 40;
const DURATION: Duration = Duration::from_secs(60);
const MAX_TOKENS: u64 = 8;
/// Growth allowed between the sample at 20 s and any sample in the last 20 s.
const RSS_SLACK_MIB: u64 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_steady_rate_for_60_s_has_no_5xx_and_bounded_memory() {
    // A load test: never beside another one (see `load_test_lock`).
    let _load = crate::load_test_lock().await;
    let ns = unique_namespace("soak");
    let app = TestApp::spawn_process(&ns, tiny_model_dir(), &NO_IP_LIMITS).await;
    let admin = app.admin_key().await;
    app.set_limits(&admin, "acme", unlimited_tenant()).await;
    let key = app.key("acme").await;
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|i| WorkerProcess::spawn(&ns, tiny_model_dir(), &format!("soak-{i}")))
        .collect();
    let backends = Backends::connect(&ns).await;
    backends
        .wait_for_consumers(2, Duration::from_secs(60))
        .await;

    let mut pids: Vec<(String, u32)> = vec![("api".into(), app.pid().expect("api pid"))];
    pids.extend(workers.iter().map(|w| (w.id.clone(), w.child.id())));

    let started = Instant::now();
    let load = Load::start(
        app.http.clone(),
        Arc::new(Mutex::new(app.base.clone())),
        key.clone(),
        Duration::from_micros(1_000_000 / RATE),
        |n| {
            chat(
                &format!("soak job {n}: say something"),
                json!({"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true}),
            )
        },
    );

    // A client polling the newest jobs, as clients of a queue do.
    let polling = Arc::new(AtomicBool::new(true));
    let poller = {
        let live = load.live_accepted();
        let (http, base, key, polling) = (
            app.http.clone(),
            app.base.clone(),
            key.clone(),
            Arc::clone(&polling),
        );
        tokio::spawn(async move {
            let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while polling.load(Ordering::Relaxed) {
                tick.tick().await;
                let newest: Vec<String> = {
                    let l = live.lock().expect("lock");
                    l[l.len().saturating_sub(3)..].to_vec()
                };
                for id in newest {
                    let status = match http
                        .get(format!("{base}/v1/jobs/{id}"))
                        .bearer_auth(&key)
                        .timeout(SUBMIT_TIMEOUT)
                        .send()
                        .await
                    {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    *statuses.entry(status).or_default() += 1;
                }
            }
            statuses
        })
    };

    // Resident memory of every process, every 2 s.
    let mut series: Vec<(Duration, Vec<u64>)> = Vec::new();
    while started.elapsed() < DURATION {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss: Vec<u64> = pids
            .iter()
            .map(|(name, pid)| rss_kib(*pid).unwrap_or_else(|| panic!("{name} exited")))
            .collect();
        series.push((started.elapsed(), rss));
    }
    let report = load.finish().await;
    let load_secs = started.elapsed().as_secs_f64();
    polling.store(false, Ordering::Relaxed);
    let polls = poller.await.expect("poller");

    let accepted = report.accepted();
    let mut redis = backends.redis.clone();
    let drain_started = Instant::now();
    let records = await_terminal_once(&mut redis, &ns, &accepted, Duration::from_secs(120)).await;
    let drain = drain_started.elapsed();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_worker: BTreeMap<String, usize> = BTreeMap::new();
    for r in records.values() {
        *outcomes.entry(r["status"].clone()).or_default() += 1;
        *per_worker
            .entry(r.get("worker").cloned().unwrap_or_default())
            .or_default() += 1;
    }

    eprintln!(
        "soak: {} submits in {load_secs:.1} s ({:.1}/s, target {RATE}/s), statuses {:?} {:?}, \
         {} timeouts; accepted {}; submit latency p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms max \
         {:.1} ms; polls {polls:?}; all terminal {:.1} s after the load stopped; outcomes \
         {outcomes:?}; jobs per worker {per_worker:?}",
        report.submissions.len(),
        report.submissions.len() as f64 / load_secs,
        report.statuses(),
        report.codes(),
        report.timeouts(),
        accepted.len(),
        report.latency_ms(0.5),
        report.latency_ms(0.9),
        report.latency_ms(0.99),
        report.latency_ms(1.0),
        drain.as_secs_f64(),
    );
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!("soak RSS (MiB) of {names:?}:");
    for (at, rss) in &series {
        let mib: Vec<String> = rss
            .iter()
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect();
        eprintln!("  {:>5.1} s  {}", at.as_secs_f64(), mib.join("  "));
    }

    assert_eq!(report.timeouts(), 0, "no submit hung");
    assert!(
        report.statuses().keys().all(|s| *s == 202),
        "every submit accepted (no 5xx, no refusal): {:?} {:?}",
        report.statuses(),
        report.codes()
    );
    assert!(
        polls.keys().all(|s| *s == 200),
        "every poll answered 200: {polls:?}"
    );
    assert_eq!(
        outcomes.get("succeeded"),
        Some(&accepted.len()),
        "{outcomes:?}"
    );
    assert_eq!(
        job_record_keys(&mut redis, &ns).await.len(),
        accepted.len(),
        "a record per accepted job"
    );
    // Bounded memory: after warm-up (20 s), no process keeps growing.
    let at_20 = series
        .iter()
        .find(|(at, _)| *at >= Duration::from_secs(20))
        .expect("a sample at 20 s")
        .1
        .clone();
    let last_from = DURATION - Duration::from_secs(20);
    for (i, name) in names.iter().enumerate() {
        let peak = series
            .iter()
            .filter(|(at, _)| *at >= last_from)
            .map(|(_, rss)| rss[i])
            .max()
            .expect("samples in the last 20 s");
        assert!(
            peak <= at_20[i] + RSS_SLACK_MIB * 1024,
            "{name}: RSS {} KiB in the last 20 s, {} KiB at 20 s",
            peak,
            at_20[i]
        );
    }
    drop(workers);
    drop(app);
    backends.cleanup().await;
}
