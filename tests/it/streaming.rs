//! Token streaming: generated text in the job's Redis stream, served as Server-Sent Events,
//! resumable with `Last-Event-ID`, ending with the terminal job.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;
use sluice_worker::intake::stream::PumpConfig;

const T: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: Value,
}

/// Reads a whole SSE response (it ends after the `done` event).
async fn read_events(app: &TestApp, key: &str, id: &str, last: Option<&str>) -> Vec<SseEvent> {
    let mut req = app
        .http
        .get(format!("{}/v1/jobs/{id}/events", app.base))
        .bearer_auth(key);
    if let Some(last) = last {
        req = req.header("last-event-id", last);
    }
    let resp = req.send().await.expect("events");
    assert_eq!(resp.status().as_u16(), 200);
    let body = read_to_end(resp, T).await;
    body.split("\n\n")
        .filter_map(|block| {
            let mut e = SseEvent {
                event: String::new(),
                id: None,
                data: Value::Null,
            };
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    e.event = v.to_string();
                } else if let Some(v) = line.strip_prefix("id: ") {
                    e.id = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    e.data = serde_json::from_str(v).expect("json data");
                }
            }
            (!e.event.is_empty()).then_some(e)
        })
        .collect()
}

fn text_of(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.event == "text")
        .map(|e| e.data["text"].as_str().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_the_text_then_the_terminal_job_and_resume() {
    let ns = unique_namespace("sse");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let worker =
        InProcessWorker::spawn_with(&ns, tiny_model_dir(), &["--redact-output", "false"]).await;
    let key = app.key("acme").await;

    let body = chat(
        "stream this",
        json!({"temperature": 0, "max_tokens": 400, "ignore_eos": true}),
    );
    let id = app.submit_ok(&key, &body).await;
    let events = read_events(&app, &key, &id, None).await;
    let done = events.last().expect("events");
    assert_eq!(done.event, "done");
    assert_eq!(done.data["job"]["status"], "succeeded");
    let content = done.data["job"]["result"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(
        text_of(&events),
        content,
        "the stream carries exactly the result text"
    );
    let texts: Vec<&SseEvent> = events.iter().filter(|e| e.event == "text").collect();
    assert!(texts.len() > 1, "streamed in pieces, got {}", texts.len());

    // Resume after the first piece: the rest, and nothing twice.
    let first_id = texts[0].id.clone().expect("id");
    let rest = read_events(&app, &key, &id, Some(&first_id)).await;
    assert_eq!(
        format!("{}{}", text_of(&events[..1]), text_of(&rest)),
        content
    );
    assert_eq!(rest.last().map(|e| e.event.as_str()), Some("done"));

    // Resume after the last event, as a browser's EventSource does on reconnect: the stream
    // ends at once with the terminal job instead of waiting for events that never come.
    let done_id = done.id.clone().expect("the done event has an id");
    // (`read_events` fails if the stream has not ended within a minute.)
    let after = read_events(&app, &key, &id, Some(&done_id)).await;
    assert_eq!(
        after.len(),
        1,
        "{:?}",
        after.iter().map(|e| &e.event).collect::<Vec<_>>()
    );
    assert_eq!(after[0].event, "done");
    assert_eq!(after[0].data["job"]["status"], "succeeded");

    // A malformed id is refused, not retried against Redis.
    for bad in ["nonsense", "99999999999999999999-0"] {
        let r = app
            .http
            .get(format!("{}/v1/jobs/{id}/events", app.base))
            .bearer_auth(&key)
            .header("last-event-id", bad)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 400, "{bad}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], "invalid_parameter", "{bad}");
    }

    // Another tenant cannot read it.
    let other = app.key("other").await;
    let r = app
        .http
        .get(format!("{}/v1/jobs/{id}/events", app.base))
        .bearer_auth(&other)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 404);

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_never_ran_ends_its_stream_with_its_status() {
    let ns = unique_namespace("sse-cancel");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;
    let id = app.submit_ok(&key, &chat("never", json!({}))).await;
    assert_eq!(app.cancel(&key, &id).await.0, 200);
    let events = read_events(&app, &key, &id, None).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "done");
    assert_eq!(events[0].data["job"]["status"], "cancelled");
    backends.cleanup().await;
}

/// A worker stream pump for a new job id of `backends`' namespace (a stream TTL of 300 s, no
/// redaction), fed through the returned sender.
fn spawn_pump(
    backends: &Backends,
    flush_interval: Duration,
) -> (
    uuid::Uuid,
    tokio::sync::mpsc::UnboundedSender<String>,
    tokio::task::JoinHandle<()>,
) {
    let pool = sluice_jobs::redis_pool::create_pool_for(
        &sluice_shared::Secret::new(redis_url()),
        on_cluster(),
        2,
    )
    .expect("pool");
    let store = sluice_jobs::store::JobStore::new(pool, backends.ks.clone(), 600);
    let id = uuid::Uuid::now_v7();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let config = PumpConfig {
        ttl_secs: 300,
        redact: false,
        flush_interval,
    };
    let pump = tokio::spawn(sluice_worker::intake::stream::pump(store, id, config, rx));
    (id, tx, pump)
}

/// The worker's stream pump on the real Redis: the text arrives whole and in order, the stream
/// gets its time to live with the first append, and the later appends leave the TTL alone (a
/// single `XADD` each; `FINISH` sets the final TTL): a TTL removed after the first append stays
/// removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pump_appends_in_order_and_sets_the_ttl_once() {
    let ns = unique_namespace("pump");
    let backends = Backends::connect(&ns).await;
    let (id, tx, pump) = spawn_pump(&backends, Duration::ZERO);
    let key = backends.ks.job_events(&id);
    let mut redis = backends.redis.clone();
    let mut sent = String::new();
    for i in 0..40 {
        let word = format!("word{i} ");
        sent.push_str(&word);
        tx.send(word).expect("send");
        // One append per delta: wait until this one is in the stream before the next.
        wait_for("the append", T, || {
            let mut redis = redis.clone();
            let key = key.clone();
            async move {
                let n: usize = redis::cmd("XLEN")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .expect("xlen");
                (n > i).then_some(())
            }
        })
        .await;
        if i == 0 {
            let ttl: i64 = redis::cmd("TTL")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .expect("ttl");
            assert!(
                (1..=300).contains(&ttl),
                "the first append set the TTL: {ttl}"
            );
            let _: i64 = redis::cmd("PERSIST")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .expect("persist");
        }
    }
    drop(tx);
    pump.await.expect("pump");

    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .expect("xrange");
    let text: String = entries
        .iter()
        .map(|(_, fields)| {
            assert_eq!(fields[0], ("type".to_string(), "text".to_string()));
            fields[1].1.clone()
        })
        .collect();
    assert_eq!(text, sent, "the stream holds the text whole and in order");
    assert!(
        entries.len() >= 40,
        "one entry per delta sent apart: {}",
        entries.len()
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("ttl");
    assert_eq!(ttl, -1, "no later append set the TTL again");
    backends.cleanup().await;
}

/// With a flush interval, the pump sends a job's first text at once, holds what follows until
/// the interval since the last append has passed, and never holds the end of a job: here the
/// interval is longer than the test, so the 39 words after the first arrive as one append when
/// the job's channel closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pump_coalesces_appends_within_its_interval() {
    let ns = unique_namespace("pump-window");
    let backends = Backends::connect(&ns).await;
    let (id, tx, pump) = spawn_pump(&backends, Duration::from_secs(3600));
    let key = backends.ks.job_events(&id);
    let redis = backends.redis.clone();
    let xlen = move || {
        let mut redis = redis.clone();
        let key = key.clone();
        async move {
            redis::cmd("XLEN")
                .arg(&key)
                .query_async::<usize>(&mut redis)
                .await
                .expect("xlen")
        }
    };
    tx.send("word0 ".to_string()).expect("send");
    wait_for("the first append", T, || {
        let n = xlen();
        async move { (n.await == 1).then_some(()) }
    })
    .await;
    let mut sent = "word0 ".to_string();
    for i in 1..40 {
        let word = format!("word{i} ");
        sent.push_str(&word);
        tx.send(word).expect("send");
    }
    // Without the interval the pump would have appended these long before this (it appends
    // what it receives at once); with it, nothing more is in the stream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(xlen().await, 1, "held within the interval");
    drop(tx);
    pump.await.expect("pump");
    assert_eq!(
        xlen().await,
        2,
        "the first word, then the rest in one append"
    );
    let mut redis = backends.redis.clone();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(backends.ks.job_events(&id))
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .expect("xrange");
    let text: String = entries.iter().map(|(_, f)| f[1].1.clone()).collect();
    assert_eq!(text, sent);
    backends.cleanup().await;
}
