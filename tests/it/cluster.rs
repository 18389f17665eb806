//! The spine on a Redis Cluster of 3 primaries and 3 replicas (`SLUICE_TEST_REDIS_CLUSTER`,
//! started by `scripts/test`): an API and a worker process run with `--redis-cluster`, and a
//! primary fails over to its replica while jobs run. The job store's own cases (quota
//! exactness, idempotency, every transition, the reconciler, a failover under concurrent
//! admissions) run on the same cluster in `jobs/src/store/tests.rs`.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_jobs::Keyspace;
use sluice_tests::*;

const T: Duration = Duration::from_secs(120);

fn greedy(max_tokens: u32) -> Value {
    json!({"temperature": 0, "max_tokens": max_tokens, "ignore_eos": true})
}

/// Polls until the job is terminal; a poll answered other than 200 (a failover in progress)
/// is polled again.
async fn terminal(app: &TestApp, key: &str, id: &str) -> Value {
    wait_for("a terminal job status", T, || async {
        let (status, v) = app.get(key, id).await;
        let s = v["status"].as_str().unwrap_or_default().to_string();
        (status == 200 && !matches!(s.as_str(), "queued" | "running")).then_some(v)
    })
    .await
}

/// Deletes the namespace's keys from every node (one key at a time: a DEL may not span slots;
/// replicas refuse it and follow their primaries).
async fn clean_cluster(urls: &str, ns: &str) {
    for url in urls.split(',') {
        let Ok(client) = redis::Client::open(url) else {
            continue;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{ns}:*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for key in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_worker_on_a_redis_cluster_lose_nothing_through_a_failover() {
    let urls = cluster_urls();
    let nodes: Vec<String> = urls.split(',').map(str::to_string).collect();
    let ns = unique_namespace("cluster");
    let backends = Backends::connect(&ns).await;
    let flags = ["--redis-cluster"];
    let app = TestApp::spawn_on(&ns, tiny_model_dir(), &urls, AMQP_URL, &flags).await;
    let mut worker =
        WorkerProcess::spawn_on(&ns, tiny_model_dir(), "cluster-w1", &urls, AMQP_URL, &flags);
    let key = app.key("acme").await;
    let (status, ready) = app.readyz().await;
    assert_eq!(status, 200, "{ready}");

    // An Idempotency-Key: the retry gets the same job (tenant slot), and its text streams from
    // the job's slot.
    let body = chat("the first job", greedy(12));
    let (s1, v1, _) = app
        .submit_with_headers(&key, &body, &[("Idempotency-Key", "cluster-1")])
        .await;
    let (s2, v2, _) = app
        .submit_with_headers(&key, &body, &[("Idempotency-Key", "cluster-1")])
        .await;
    assert_eq!((s1, s2), (202, 202), "{v1} {v2}");
    assert_eq!(v1["id"], v2["id"]);
    let first = v1["id"].as_str().expect("id").to_string();
    let events = app
        .http
        .get(format!("{}/v1/jobs/{first}/events", app.base))
        .bearer_auth(&key)
        .send()
        .await
        .expect("events");
    assert_eq!(events.status().as_u16(), 200);
    let stream = read_to_end(events, T).await;
    assert!(stream.contains("event: text"), "{stream}");
    assert!(stream.contains("event: done"), "{stream}");

    // Jobs submitted while the primary of the tenant's slot hands over to its replica, and
    // after.
    let tenant_key = Keyspace::new(ns.as_str()).tenant_reservations("acme");
    let mut failover = Some({
        let nodes = nodes.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            sluice_jobs::cluster_admin::fail_over_primary_of(&nodes, &tenant_key).await
        })
    });
    let mut ids = vec![first];
    for i in 0..40 {
        if i == 30
            && let Some(failover) = failover.take()
        {
            failover.await.expect("join").expect("failover");
        }
        // A submit that meets the failover may be refused with a 503 (nothing admitted); the
        // client retries it, as clients do.
        let body = chat(&format!("job {i}"), greedy(8 + i % 8));
        let id = wait_for("an accepted submit", T, || async {
            let (status, v) = app.submit(&key, &body).await;
            match status {
                202 => v["id"].as_str().map(str::to_string),
                503 => None,
                other => panic!("submit answered {other}: {v}"),
            }
        })
        .await;
        ids.push(id);
    }

    // Every job succeeds, once; the tenant's day counter then holds exactly the tokens the
    // jobs used, and no job is active.
    let mut used = 0u64;
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let job = terminal(&app, &key, id).await;
        let status = job["status"].as_str().unwrap_or_default().to_string();
        if status == "succeeded" {
            let usage = &job["result"]["usage"];
            used += usage["prompt_tokens"].as_u64().unwrap_or(0)
                + usage["completion_tokens"].as_u64().unwrap_or(0);
        }
        *outcomes.entry(status).or_default() += 1;
    }
    assert_eq!(outcomes.get("succeeded"), Some(&ids.len()), "{outcomes:?}");
    let usage = wait_for("every reservation settled", T, || async {
        let u = app.usage(&key).await;
        (u["usage"]["active_jobs"] == 0).then_some(u)
    })
    .await;
    assert_eq!(
        usage["usage"]["tokens_today"].as_u64(),
        Some(used),
        "{usage}"
    );

    worker.terminate();
    backends.cleanup().await;
    clean_cluster(&urls, &ns).await;
}
