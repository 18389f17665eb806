//! The spine, end to end: HTTP → RabbitMQ → candle worker → Redis → client, against the real
//! RabbitMQ and Redis, one namespace per test.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::*;

const T: Duration = Duration::from_secs(60);

fn greedy(max_tokens: u32) -> Value {
    json!({"temperature": 0, "max_tokens": max_tokens, "ignore_eos": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_poll_result_on_the_tiny_model() {
    let ns = unique_namespace("basic");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    let key = app.key("acme").await;

    let id = app.submit_ok(&key, &chat("hello", greedy(24))).await;
    let job = app.wait_terminal(&key, &id, T).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1);
    let result = &job["result"];
    assert_eq!(result["finish_reason"], "length");
    assert_eq!(result["usage"]["completion_tokens"], 24);
    // ChatML framing plus one byte-level token per byte of "hello".
    assert!(result["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 5);
    let (ms, us) = (
        result["timings"]["generation_ms"].as_u64(),
        result["timings"]["generation_us"].as_u64(),
    );
    // 24 tokens take some microseconds, and both fields count the same span.
    assert!(
        matches!((ms, us), (Some(ms), Some(us)) if us > 0 && us / 1000 == ms),
        "{result}"
    );

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_gguf_answers_paris() {
    let ns = unique_namespace("paris");
    let backends = Backends::connect(&ns).await;
    let model = real_model_path();
    let app = TestApp::spawn_full(&ns, &model, AMQP_URL, &[]).await;
    let worker = InProcessWorker::spawn(&ns, &model).await;
    let key = app.key("acme").await;

    let body = chat(
        "What is the capital of France? Answer in one word.",
        json!({"temperature": 0, "max_tokens": 16}),
    );
    let id = app.submit_ok(&key, &body).await;
    let job = app.wait_terminal(&key, &id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let content = job["result"]["content"].as_str().unwrap_or_default();
    assert_eq!(content.trim().trim_end_matches('.'), "Paris", "{job}");
    assert_eq!(job["result"]["finish_reason"], "stop");

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_jobs_are_isolated_and_repeatable() {
    let ns = unique_namespace("isolation");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    let key = app.key("acme").await;

    let a1 = app
        .submit_ok(&key, &chat("the opening prompt", greedy(32)))
        .await;
    let b = app
        .submit_ok(&key, &chat("a different, longer prompt", greedy(48)))
        .await;
    let a2 = app
        .submit_ok(&key, &chat("the opening prompt", greedy(32)))
        .await;
    let mut contents = Vec::new();
    for id in [&a1, &b, &a2] {
        let job = app.wait_terminal(&key, id, T).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        contents.push(
            job["result"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    // The same job before and after another one: identical, so nothing of `b` leaked in.
    assert_eq!(contents[0], contents[2]);
    assert_ne!(contents[0], contents[1]);

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_end_the_output_before_the_match() {
    let ns = unique_namespace("stop");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    // The tiny model's noise can look like a secret to the output redactor; this test is about
    // stop sequences, so it compares raw text.
    let worker =
        InProcessWorker::spawn_with(&ns, tiny_model_dir(), &["--redact-output", "false"]).await;
    let key = app.key("acme").await;

    let id = app.submit_ok(&key, &chat("stop here", greedy(64))).await;
    let full = app.wait_terminal(&key, &id, T).await["result"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 20, "tiny model output too short: {full:?}");
    // A stop string taken from the middle of the greedy output.
    let stop: String = chars[10..13].iter().collect();
    let expected = &full[..full.find(&stop).expect("stop occurs")];

    let mut body = chat("stop here", greedy(64));
    body["stop"] = json!([stop]);
    let id = app.submit_ok(&key, &body).await;
    let job = app.wait_terminal(&key, &id, T).await;
    assert_eq!(job["result"]["finish_reason"], "stop", "{job}");
    assert_eq!(job["result"]["content"], expected);

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_tenant_isolation() {
    let ns = unique_namespace("auth");
    let mut backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let alice = app.key("alice").await;
    let bob = app.key("bob").await;
    let body = chat("hi", json!({}));

    // No key, a malformed key, a well-formed unknown key, a wrong secret: all 401, same body.
    let no_key = app
        .http
        .post(format!("{}/v1/jobs", app.base))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(no_key.status().as_u16(), 401);
    let first: Value = no_key.json().await.expect("json");
    assert_eq!(first["error"]["code"], "unauthorized");
    let forged = format!(
        "{}{}",
        &alice[..alice.len() - 1],
        if alice.ends_with('0') { '1' } else { '0' }
    );
    let unknown = format!("sk-{}_{}", "0".repeat(16), "0".repeat(64));
    for bad in ["nope", unknown.as_str(), forged.as_str()] {
        let (status, v) = app.submit(bad, &body).await;
        assert_eq!(status, 401, "{bad}");
        assert_eq!(v, first, "the 401 must not say which part was wrong");
    }
    let r = app
        .http
        .get(format!("{}/v1/jobs/x", app.base))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);

    // Another tenant's job answers 404, for reading and for cancelling.
    let id = app.submit_ok(&alice, &body).await;
    let (status, v) = app.get(&bob, &id).await;
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (404, json!("not_found"))
    );
    let (status, _) = app.cancel(&bob, &id).await;
    assert_eq!(status, 404);
    let (status, v) = app.get(&alice, &id).await;
    assert_eq!((status, v["status"].clone()), (200, json!("queued")));
    assert_eq!(backends.ready_count(&backends.ks.jobs_queue()).await, 1);
    assert_eq!(backends.job_keys().await.len(), 1);

    // Health needs no key.
    let r = app
        .http
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);

    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_4xx_with_a_code_and_leaves_nothing_behind() {
    let ns = unique_namespace("badinput");
    let mut backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;
    let url = format!("{}/v1/jobs", app.base);

    let huge = "x".repeat(70 * 1024);
    let many: Vec<Value> = (0..10_000)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid_json"),
        (b"\xff\xfe\x00".to_vec(), 400, "invalid_json"),
        (
            br#"{"messages":[{"role":"user","content":"\xff"}]}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (br#"{"messages":"hi"}"#.to_vec(), 400, "invalid_request"),
        (
            br#"{"messages":[{"role":"robot","content":"x"}]}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"bogus":1}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (br#"{"messages":[]}"#.to_vec(), 400, "invalid_parameter"),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#.to_vec(),
            400,
            "invalid_parameter",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":8193}"#.to_vec(),
            400,
            "invalid_parameter",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"temperature":-1}"#.to_vec(),
            400,
            "invalid_parameter",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"top_p":1.5}"#.to_vec(),
            400,
            "invalid_parameter",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"top_k":0}"#.to_vec(),
            400,
            "invalid_parameter",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"repetition_penalty":9}"#.to_vec(),
            400,
            "invalid_parameter",
        ),
        (
            format!(r#"{{"messages":[{{"role":"user","content":"{huge}"}}]}}"#).into_bytes(),
            413,
            "payload_too_large",
        ),
        (
            serde_json::to_vec(&json!({"messages": many})).expect("json"),
            413,
            "payload_too_large",
        ),
        (
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            400,
            "invalid_json",
        ),
    ];
    for (body, status, code) in cases {
        let r = app
            .http
            .post(&url)
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("send");
        let got = r.status().as_u16();
        let v: Value = r.json().await.expect("json error body");
        assert_eq!(
            got,
            status,
            "{}: {v}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Unknown route and wrong method are JSON errors too.
    let r = app
        .http
        .get(format!("{}/v2/nothing", app.base))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 404);
    let r = app
        .http
        .put(&url)
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 405);

    assert_eq!(
        backends.ready_count(&backends.ks.jobs_queue()).await,
        0,
        "nothing enqueued"
    );
    assert!(
        backends.job_keys().await.is_empty(),
        "no job record written"
    );
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_queued_job_is_never_generated() {
    let ns = unique_namespace("cancelq");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;

    // No worker yet: the job waits in the queue.
    let id = app.submit_ok(&key, &chat("never run me", greedy(16))).await;
    let (status, v) = app.cancel(&key, &id).await;
    assert_eq!(
        (status, v["status"].clone()),
        (200, json!("cancelled")),
        "{v}"
    );

    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    // A job behind it proves the worker has consumed (and skipped) the cancelled one.
    let after = app.submit_ok(&key, &chat("run me", greedy(4))).await;
    assert_eq!(
        app.wait_terminal(&key, &after, T).await["status"],
        "succeeded"
    );

    let (_, job) = app.get(&key, &id).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["attempts"], 0, "never started: {job}");
    assert!(
        job.get("started_at").is_none() && job.get("result").is_none(),
        "{job}"
    );
    assert_eq!(backends.ready_count(&backends.ks.jobs_queue()).await, 0);
    // Cancelling again is idempotent; a finished job cannot be cancelled.
    assert_eq!(app.cancel(&key, &id).await.0, 200);
    let (status, v) = app.cancel(&key, &after).await;
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (409, json!("job_already_finished"))
    );

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_stops_at_its_next_token_when_cancelled() {
    let ns = unique_namespace("cancelr");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    let key = app.key("acme").await;

    let id = app.submit_ok(&key, &chat("long", greedy(8192))).await;
    app.wait_status(&key, &id, "running", T).await;
    let (status, _) = app.cancel(&key, &id).await;
    assert_eq!(status, 200);
    let job = app.wait_terminal(&key, &id, T).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(job["result"]["finish_reason"], "cancelled");
    let generated = job["result"]["usage"]["completion_tokens"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(generated < 8192, "stopped early: {generated}");

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_is_expired_not_run() {
    let ns = unique_namespace("deadline");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;

    let mut body = chat("too late", greedy(4));
    body["timeout_secs"] = json!(1);
    let id = app.submit_ok(&key, &body).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    let job = app.wait_terminal(&key, &id, T).await;
    assert_eq!(job["status"], "expired", "{job}");
    assert_eq!(job["error"]["code"], "deadline_exceeded");
    assert_eq!(job["attempts"], 0);

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_generation_leaves_the_job_to_another() {
    let ns = unique_namespace("kill9");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;
    let mut first = WorkerProcess::spawn(&ns, tiny_model_dir(), "victim");

    let id = app
        .submit_ok(&key, &chat("survive this", greedy(2048)))
        .await;
    app.wait_status(&key, &id, "running", T).await;
    first.kill9();
    assert_eq!(app.get(&key, &id).await.1["status"], "running");

    let _second = WorkerProcess::spawn(&ns, tiny_model_dir(), "rescuer");
    let job = app.wait_terminal(&key, &id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2, "redelivered once: {job}");
    assert_eq!(job["result"]["usage"]["completion_tokens"], 2048);

    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let ns = unique_namespace("sigterm");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;
    let mut worker = WorkerProcess::spawn(&ns, tiny_model_dir(), "drainer");

    let id = app.submit_ok(&key, &chat("finish me", greedy(2048))).await;
    app.wait_status(&key, &id, "running", T).await;
    let status = worker.terminate();
    assert!(status.success(), "exit status {status:?}");
    // The in-flight job was finished within the grace period, not abandoned.
    let (_, job) = app.get(&key, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_dead_lettered_and_the_worker_keeps_serving() {
    let ns = unique_namespace("poison");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let worker =
        InProcessWorker::spawn_with(&ns, tiny_model_dir(), &["--metrics-addr", &addr]).await;
    let key = app.key("acme").await;

    backends.publish_raw(b"\x00 this is not a job").await;
    backends.publish_raw(br#"{"v": 99, "id": "x"}"#).await;
    // The worker rejects both into the dead-letter queue, takes them from there, and drops
    // them (they name no job): each is counted once.
    let series = "sluice_jobs_finished_total{status=\"dead_lettered\"}";
    wait_for("two dead letters counted", T, || async {
        (sample(&scrape(&app.http, port).await, series) == Some(2.0)).then_some(())
    })
    .await;
    let dead = backends.ks.dead_letter_queue();
    wait_for("dead-letter queue settled", T, || async {
        (backends.ready_count(&dead).await == 0).then_some(())
    })
    .await;

    let id = app.submit_ok(&key, &chat("still there?", greedy(4))).await;
    assert_eq!(app.wait_terminal(&key, &id, T).await["status"], "succeeded");

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_broker_dead_letters_ends_failed_with_the_reason_and_is_refunded() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let ns = unique_namespace("dlimit");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let key = app.key("acme").await;
    let id = app.submit_ok(&key, &chat("never run", greedy(4))).await;
    assert!(app.usage(&key).await["usage"]["tokens_today"].as_u64() > Some(0));

    // A consumer that keeps giving the message back, past the queue's delivery limit (three
    // attempts plus two): the broker dead-letters it; no worker ever started it.
    let queue = backends.ks.jobs_queue();
    let dead = backends.ks.dead_letter_queue();
    let mut returns = 0;
    while backends.ready_count(&dead).await == 0 {
        assert!(returns < 20, "not dead-lettered after {returns} returns");
        let got = backends
            .channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get");
        match got {
            Some(message) => {
                message
                    .delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await
                    .expect("nack");
                returns += 1;
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let (_, job) = app.get(&key, &id).await;
    assert_eq!(job["status"], "queued", "{job}");

    // A worker takes the dead letter and fails the job with the broker's reason.
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    let job = app.wait_terminal(&key, &id, T).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "dead_lettered", "{job}");
    let message = job["error"]["message"].as_str().expect("message");
    assert!(message.contains("delivery_limit"), "{job}");
    assert_eq!(job["attempts"], 0, "{job}");
    let usage = app.usage(&key).await;
    assert_eq!(usage["usage"]["tokens_today"], 0, "{usage}");
    assert_eq!(usage["usage"]["active_jobs"], 0, "{usage}");
    wait_for("dead-letter queue settled", T, || async {
        (backends.ready_count(&dead).await == 0).then_some(())
    })
    .await;

    worker.stop().await;
    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unreachable_at_submit_is_503_and_nothing_is_left_behind() {
    let ns = unique_namespace("nobroker");
    let mut backends = Backends::connect(&ns).await;
    // Port 1 on loopback: nothing listens, connections are refused at once.
    let app = TestApp::spawn_with(&ns, "amqp://guest:guest@127.0.0.1:1/%2f").await;
    let key = app.key("acme").await;

    let (status, v) = app.submit(&key, &chat("hi", json!({}))).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "queue_unavailable");
    assert!(backends.job_keys().await.is_empty(), "record rolled back");

    let r = app
        .http
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = r.json().await.expect("json");
    assert_eq!(
        (body["redis"].clone(), body["rabbitmq"].clone()),
        (json!(true), json!(false))
    );

    backends.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_creates_and_revokes_keys() {
    let ns = unique_namespace("cli");
    let backends = Backends::connect(&ns).await;
    let app = TestApp::spawn(&ns).await;
    let bin = workspace_bin("sluice-api");

    let out = std::process::Command::new(&bin)
        .args([
            "keys",
            "create",
            "--tenant",
            "acme",
            "--namespace",
            &ns,
            "--redis-url",
            &redis_url(),
        ])
        .env("SLUICE_REDIS_CLUSTER", on_cluster().to_string())
        .output()
        .expect("run keys create");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let secret = stdout
        .lines()
        .find(|l| l.starts_with("sk-"))
        .expect("the secret on its own line")
        .to_string();
    assert_eq!(stdout.trim(), secret, "stdout holds only the secret");
    let id = app.submit_ok(&secret, &chat("hi", json!({}))).await;

    let key_id = &secret[3..secret.find('_').expect("key id")];
    let out = std::process::Command::new(&bin)
        .args([
            "keys",
            "revoke",
            key_id,
            "--namespace",
            &ns,
            "--redis-url",
            &redis_url(),
        ])
        .env("SLUICE_REDIS_CLUSTER", on_cluster().to_string())
        .output()
        .expect("run keys revoke");
    assert!(out.status.success());
    assert_eq!(app.get(&secret, &id).await.0, 401, "revoked at once");

    backends.cleanup().await;
}

/// The fixture cleans up after a failed test too: dropping `Backends` without calling
/// `cleanup` (as a panicking test does) removes the namespace's queues and Redis keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_dropped_without_cleanup_remove_their_namespace() {
    let ns = unique_namespace("dropclean");
    let backends = Backends::connect(&ns).await;
    let queue = backends.ks.jobs_queue();
    let mut redis = backends.redis.clone();
    let _: () = redis::cmd("SET")
        .arg(format!("{ns}:leftover"))
        .arg(1)
        .query_async(&mut redis)
        .await
        .expect("set");
    drop(backends);
    let keys = redis.keys(&format!("{ns}:*")).await;
    assert!(keys.is_empty(), "{keys:?}");
    let amqp = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("amqp");
    let channel = amqp.create_channel().await.expect("channel");
    let passive = channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await;
    assert!(passive.is_err(), "the queue {queue} is still there");
    let _ = amqp.close(200, "done".into()).await;
}
