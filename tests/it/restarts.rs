//! Fault suite, part two: RabbitMQ and Redis restart under a steady submit rate.
//!
//! Each test runs its own `redis-server` or RabbitMQ node (never the shared ones, which the
//! tests running beside it use), an API and worker processes against it, and the tiny model.
//! While the load runs the server goes away and comes back on the same port and data:
//! Redis is killed with kill -9 for 20 s (append-only file fsynced on every write) with a
//! backlog of running and queued jobs, and a third worker starts during the outage; RabbitMQ
//! is stopped gracefully, then killed with kill -9. Asserted: during an outage submits get a
//! clean 503 with a stable code (never a hang, never a 500) and `/readyz` names the missing
//! backend; afterwards `/readyz` recovers, the workers consume again, every job that got a 202
//! succeeds exactly once (one record, one terminal event, one `START` that ran it, from the
//! workers' logs), and refused submits left nothing behind (no record, no tokens, no slot).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::*;

const MAX_TOKENS: u64 = 32;
/// Jobs submitted at once right before Redis dies, and their length: more than the two
/// workers hold (2 x 8), each a second or two of generating on the tiny model.
const BACKLOG: usize = 40;
const BACKLOG_TOKENS: u64 = 256;
/// Longer than a worker's retries of a result write used to last (about 16 s).
const REDIS_OUTAGE: Duration = Duration::from_secs(20);

fn job_body(n: u64) -> Value {
    chat(
        &format!("job {n}"),
        json!({"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true}),
    )
}

/// Polls `/readyz` until it answers 200, returning how long that took.
async fn await_ready(app: &TestApp, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (status, body) = app.readyz().await;
        if status == 200 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "/readyz not ready {timeout:?} after the restart: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `/readyz` during an outage until it reports `backend` down (and the other one up).
async fn await_reported_down(app: &TestApp, backend: &str, other: &str) -> Value {
    let start = Instant::now();
    loop {
        let (status, body) = app.readyz().await;
        if status == 503 {
            assert_eq!(body["status"], "unavailable", "{body}");
            if body[backend] == false {
                assert_eq!(body[other], true, "only {backend} is down: {body}");
                return body;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "/readyz did not report {backend} down: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Which backend went away.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outage {
    Redis,
    RabbitMq,
}

/// The checks shared by both tests, once the load has stopped. `extra` are jobs accepted
/// besides the load's, with their `max_tokens`; `log_dir` holds the workers' logs.
async fn assert_nothing_lost_or_duplicated(
    redis: &mut TestRedis,
    app: &TestApp,
    key: &str,
    report: &LoadReport,
    extra: &HashMap<String, u64>,
    outage: Outage,
    log_dir: &std::path::Path,
) -> HashMap<String, HashMap<String, String>> {
    let outage_code = match outage {
        Outage::Redis => "store_unavailable",
        Outage::RabbitMq => "queue_unavailable",
    };
    let statuses = report.statuses();
    assert_eq!(report.timeouts(), 0, "no submit hung: {statuses:?}");
    assert!(
        statuses.keys().all(|s| [202, 503].contains(s)),
        "only accepted or a clean 503: {statuses:?} {:?}",
        report.codes()
    );
    assert!(
        report.codes().keys().all(|c| c == outage_code),
        "every refusal is {outage_code}: {:?}",
        report.codes()
    );
    assert!(
        statuses.get(&503).copied().unwrap_or(0) > 0,
        "the outage was seen: {statuses:?}"
    );
    let mut accepted = report.accepted();
    accepted.extend(extra.keys().cloned());
    let unique: HashSet<&String> = accepted.iter().collect();
    assert_eq!(unique.len(), accepted.len(), "no id accepted twice");

    let records = await_terminal_once(redis, &app.ns, &accepted, Duration::from_secs(120)).await;
    let mut used = 0u64;
    for (id, r) in &records {
        assert_eq!(
            r.get("status").map(String::as_str),
            Some("succeeded"),
            "job {id}: {r:?}"
        );
        let result: Value = serde_json::from_str(r.get("result").expect("result")).expect("json");
        let want = extra.get(id).copied().unwrap_or(MAX_TOKENS);
        assert_eq!(
            result["usage"]["completion_tokens"], want,
            "job {id}: {result}"
        );
        used += result["usage"]["prompt_tokens"]
            .as_u64()
            .expect("prompt tokens")
            + result["usage"]["completion_tokens"]
                .as_u64()
                .expect("completion tokens");
    }
    // Generated once: exactly one `START` let each job run (the `attempts` field can count
    // one more, when Redis died after running a `START` but before answering it).
    let started = jobs_started(log_dir);
    for id in &accepted {
        assert_eq!(started.get(id), Some(&1), "job {id} started to run once");
    }
    assert_eq!(started.len(), accepted.len(), "only accepted jobs ran");
    // A record per accepted job, none for a refused one. When Redis itself is killed, an
    // admission it committed (and wrote to its append-only file) just before it died may have
    // lost its answer: the API answered 503, published nothing, and rolls the admission back
    // in the background once Redis answers again. Such a record may be seen for a while
    // (`queued`, never started); it must be gone within the API's retry backoff.
    let accepted_set: HashSet<&String> = accepted.iter().collect();
    let rolled_back_by = Instant::now() + Duration::from_secs(30);
    loop {
        let mut orphans = Vec::new();
        for k in job_record_keys(redis, &app.ns).await {
            // `{ns}:job:{<id>}`: the id is the key's hash tag.
            let id = k
                .rsplit(':')
                .next()
                .expect("id")
                .trim_matches(['{', '}'])
                .to_string();
            if accepted_set.contains(&id) {
                continue;
            }
            let r: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(&k)
                .query_async(redis)
                .await
                .expect("record");
            if r.is_empty() {
                continue; // rolled back between the two reads
            }
            assert!(
                outage == Outage::Redis
                    && r["status"] == "queued"
                    && r.get("attempts").is_none_or(|a| a == "0"),
                "a record for a job that was not accepted: {r:?}"
            );
            orphans.push(r);
        }
        if orphans.is_empty() {
            break;
        }
        assert!(
            Instant::now() < rolled_back_by,
            "admissions answered 503 were not rolled back: {orphans:?}"
        );
        eprintln!(
            "waiting for {} admission(s) answered 503 to be rolled back",
            orphans.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Refused submits consumed nothing: the tenant's counters hold exactly what the accepted
    // jobs used, and no slot is left taken.
    let usage = app.usage(key).await;
    assert_eq!(usage["usage"]["active_jobs"], 0, "{usage}");
    assert_eq!(usage["usage"]["tokens_today"], used, "{usage}");
    records
}

/// Refusals and acceptances inside a window of the load (seconds from its start).
fn window(report: &LoadReport, from: Duration, to: Duration) -> BTreeMap<u16, usize> {
    let mut m = BTreeMap::new();
    for s in report
        .submissions
        .iter()
        .filter(|s| s.at >= from && s.at < to)
    {
        *m.entry(s.status).or_default() += 1;
    }
    m
}

/// An API and two logged worker processes against the given Redis and RabbitMQ, ready, and the
/// steady load started (one job every 40 ms).
struct Stage {
    app: TestApp,
    key: String,
    logs: TempDir,
    _workers: Vec<WorkerProcess>,
    t0: Instant,
    load: Load,
}

async fn stage(ns: &str, redis: &str, amqp: &str) -> Stage {
    let app = TestApp::spawn_on(ns, tiny_model_dir(), redis, amqp, &NO_IP_LIMITS).await;
    let admin = app.admin_key().await;
    app.set_limits(&admin, "acme", unlimited_tenant()).await;
    let key = app.key("acme").await;
    let logs = TempDir::new("restart-logs");
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|i| {
            let id = format!("w{i}");
            WorkerProcess::spawn_logged(ns, tiny_model_dir(), &id, redis, amqp, logs.path())
        })
        .collect();
    await_ready(&app, Duration::from_secs(30)).await;
    let t0 = Instant::now();
    let load = Load::start(
        app.http.clone(),
        Arc::new(Mutex::new(app.base.clone())),
        key.clone(),
        Duration::from_millis(40),
        job_body,
    );
    Stage {
        app,
        key,
        logs,
        _workers: workers,
        t0,
        load,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_with_aof_loses_and_duplicates_nothing() {
    // A load test: never beside another one (see `load_test_lock`).
    let _load = crate::load_test_lock().await;
    let mut redis = RedisServer::start_with_aof().await;
    let url = redis.url();
    let ns = unique_namespace("redis-restart");
    let Stage {
        app,
        key,
        logs,
        _workers,
        t0,
        load,
    } = stage(&ns, &url, AMQP_URL).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A backlog at the moment Redis dies: jobs running (they finish generating during the
    // outage and must wait to write their result) and jobs still queued in the broker.
    let burst = (0..BACKLOG).map(|n| {
        let body = chat(
            &format!("backlog job {n}"),
            json!({"max_tokens": BACKLOG_TOKENS, "temperature": 0, "ignore_eos": true}),
        );
        let (app, key) = (&app, &key);
        async move { app.submit_ok(key, &body).await }
    });
    let backlog: HashMap<String, u64> = futures_util::future::join_all(burst)
        .await
        .into_iter()
        .map(|id| (id, BACKLOG_TOKENS))
        .collect();
    let at_kill: Vec<Option<String>> = {
        let mut conn = redis.connection().await;
        let mut pipe = redis::pipe();
        for id in backlog.keys() {
            pipe.hget(
                sluice_jobs::keyspace::Keyspace::new(ns.as_str()).job(&id.parse().expect("id")),
                "status",
            );
        }
        pipe.query_async(&mut conn).await.expect("statuses")
    };
    let down = t0.elapsed();
    redis.kill9();
    // A worker that starts during the outage: it takes queued jobs it cannot start yet.
    let _late =
        WorkerProcess::spawn_logged(&ns, tiny_model_dir(), "w2", &url, AMQP_URL, logs.path());
    let during = await_reported_down(&app, "redis", "rabbitmq").await;
    tokio::time::sleep(REDIS_OUTAGE.saturating_sub(t0.elapsed() - down)).await;
    redis.start().await;
    let up = t0.elapsed();
    let up_ms = sluice_proto::now_ms();
    let recovery = await_ready(&app, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = load.finish().await;

    let mut conn = TestRedis::Single(redis.connection().await);
    let records = assert_nothing_lost_or_duplicated(
        &mut conn,
        &app,
        &key,
        &report,
        &backlog,
        Outage::Redis,
        logs.path(),
    )
    .await;
    let recounted = records.values().filter(|r| r["attempts"] != "1").count();
    let start_retries = log_lines(logs.path(), "cannot start job; retrying").len();
    let finish_retries = log_lines(logs.path(), "cannot write job result; retrying").len();
    let after = window(&report, up + recovery, Duration::MAX);
    assert!(
        after.get(&202).copied().unwrap_or(0) > 0,
        "submits succeed again: {after:?}"
    );
    let mut kill_states: BTreeMap<String, usize> = BTreeMap::new();
    for s in at_kill {
        *kill_states.entry(s.unwrap_or_default()).or_default() += 1;
    }
    let workers: BTreeMap<String, usize> = records.values().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.get("worker").cloned().unwrap_or_default())
            .or_default() += 1;
        m
    });
    let last_backlog_done = backlog
        .keys()
        .filter_map(|id| records[id].get("finished_at")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    eprintln!(
        "redis restart: backlog of {BACKLOG} jobs x {BACKLOG_TOKENS} tokens {kill_states:?} at the \
         kill, the last finished {:.1} s after Redis was back; down {:.1} s (readyz during: \
         {during}), readyz ready {:.2} s after the restart; {} submits {:?} {:?}, {} accepted \
         (+{BACKLOG} backlog), {} succeeded, each started once (per worker {workers:?}; \
         {recounted} with attempts 2: a START run as Redis died, its answer lost; \
         {start_retries} START and {finish_retries} FINISH retries held their deliveries); before {:?}, \
         during {:?}, after {:?}",
        (last_backlog_done as f64 - up_ms as f64) / 1000.0,
        (up - down).as_secs_f64(),
        recovery.as_secs_f64(),
        report.submissions.len(),
        report.statuses(),
        report.codes(),
        report.accepted().len(),
        records.len(),
        window(&report, Duration::ZERO, down),
        window(&report, down, up + recovery),
        after,
    );
    Backends::connect_on(&ns, &url, AMQP_URL)
        .await
        .cleanup()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restarts_lose_and_duplicate_nothing() {
    // A load test: never beside another one (see `load_test_lock`).
    let _load = crate::load_test_lock().await;
    assert!(RabbitNode::available(), "rabbitmq-server is not installed");
    let mut node = RabbitNode::start_new().await;
    let amqp = node.url();
    let ns = unique_namespace("rabbit-restart");
    let Stage {
        app,
        key,
        logs,
        _workers,
        t0,
        load,
    } = stage(&ns, REDIS_URL, &amqp).await;
    let mut outages = Vec::new();
    for graceful in [true, false] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let down = t0.elapsed();
        if graceful {
            node.stop().await;
        } else {
            node.kill9();
        }
        let during = await_reported_down(&app, "rabbitmq", "redis").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        node.start().await;
        let up = t0.elapsed();
        let recovery = await_ready(&app, Duration::from_secs(30)).await;
        // The workers reconnect (their backoff between tries grows to 10 s) and re-declare:
        // a job accepted after the restart runs.
        let live = load.live_accepted();
        let seen = live.lock().expect("lock").len();
        let id = wait_for(
            "a job accepted after the restart",
            Duration::from_secs(30),
            || {
                let next = live.lock().expect("lock").get(seen).cloned();
                async move { next }
            },
        )
        .await;
        app.wait_status(&key, &id, "succeeded", Duration::from_secs(60))
            .await;
        let resumed = t0.elapsed() - up;
        outages.push((graceful, down, up, recovery, resumed, during));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await;

    let mut conn = connect_redis(REDIS_URL).await.expect("redis");
    let records = assert_nothing_lost_or_duplicated(
        &mut conn,
        &app,
        &key,
        &report,
        &HashMap::new(),
        Outage::RabbitMq,
        logs.path(),
    )
    .await;
    // Redis never went away here: every START was answered, so each job counts one attempt.
    for (id, r) in &records {
        assert_eq!(r["attempts"], "1", "job {id}: {r:?}");
    }
    let (_, _, last_up, last_recovery, _, _) = outages[1].clone();
    let after = window(&report, last_up + last_recovery, Duration::MAX);
    assert!(
        after.get(&202).copied().unwrap_or(0) > 0,
        "submits succeed again: {after:?}"
    );
    // The workers reconnected and consumed after the last restart (jobs accepted then are
    // among the succeeded ones above); every job ran on one of them.
    let workers: BTreeMap<String, usize> = records.values().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.get("worker").cloned().unwrap_or_default())
            .or_default() += 1;
        m
    });
    assert!(
        workers.keys().all(|w| w == "w0" || w == "w1"),
        "{workers:?}"
    );
    let mut prev = Duration::ZERO;
    for (graceful, down, up, recovery, resumed, during) in &outages {
        eprintln!(
            "rabbitmq {}: before {:?}, down {:.1} s (readyz during: {during}), readyz ready \
             {:.2} s and a job submitted after the restart succeeded {:.2} s after the node was \
             up; during {:?}",
            if *graceful {
                "graceful stop"
            } else {
                "kill -9"
            },
            window(&report, prev, *down),
            (*up - *down).as_secs_f64(),
            recovery.as_secs_f64(),
            resumed.as_secs_f64(),
            window(&report, *down, *up + *recovery),
        );
        prev = *up + *recovery;
    }
    eprintln!(
        "rabbitmq restarts: {} submits {:?} {:?}, {} accepted, {} succeeded, each started once, \
         after the last restart {after:?}; jobs per worker {workers:?}",
        report.submissions.len(),
        report.statuses(),
        report.codes(),
        report.accepted().len(),
        records.len(),
    );
    // Redis is the shared one: remove this namespace's keys (the node goes with its data).
    delete_namespace_keys(&mut conn, &ns).await;
}
