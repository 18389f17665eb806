//! Metrics, the worker registry and traces, end to end against the real RabbitMQ and Redis:
//! Prometheus `/metrics` on the API and the worker, `GET /admin/workers` and `/readyz`
//! following workers as they come and go, and one OpenTelemetry trace per job from the HTTP
//! request through the AMQP message into the worker (received by a real OTLP/HTTP endpoint
//! run by the test).

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_api::keys::ApiKeys;
use sluice_api::principal::Role;
use sluice_jobs::Keyspace;
use sluice_shared::Secret;
use sluice_tests::{
    AMQP_URL, Backends, InProcessWorker, REDIS_URL, TestApp, free_port, sample, scrape,
    tiny_model_dir, unique_namespace, wait_for, workspace_bin,
};

/// `GET /admin/workers` as JSON (`None` if it did not answer with JSON).
async fn admin_workers(app: &TestApp, admin: &str) -> Option<Value> {
    app.http
        .get(format!("{}/admin/workers", app.base))
        .bearer_auth(admin)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_the_worker_registry_follow_jobs_and_workers() {
    let ns = unique_namespace("obs");
    let api_port = free_port();
    let api_metrics = format!("127.0.0.1:{api_port}");
    let app = TestApp::spawn_full(
        &ns,
        tiny_model_dir(),
        AMQP_URL,
        &["--metrics-addr", &api_metrics],
    )
    .await;
    let backends = Backends::connect(&ns).await;
    let admin = app.admin_key().await;
    let key = app.key("acme").await;

    // No worker yet: ready to accept jobs, but degraded.
    let (http_status, ready) = app.readyz().await;
    assert_eq!(
        (http_status, &ready["status"]),
        (200, &json!("degraded")),
        "{ready}"
    );
    assert_eq!(ready["live_workers"], 0);

    // Queued while no worker runs: the depth and the age of the oldest job show it.
    let id = app
        .submit_ok(
            &key,
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let text = scrape(&app.http, api_port).await;
    assert_eq!(
        sample(&text, "sluice_queue_depth{priority=\"interactive\"}"),
        Some(1.0),
        "{text}"
    );
    let age = sample(
        &text,
        "sluice_queue_oldest_job_age_seconds{priority=\"interactive\"}",
    )
    .expect("age");
    assert!(age >= 1.0, "oldest job age {age}");
    assert_eq!(sample(&text, "sluice_live_workers"), Some(0.0));

    // Jobs that end without running are counted too: a queued job the API cancels, and one
    // whose deadline passes before a worker takes it (the worker's START expires it).
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let cancelled = app.submit_ok(&key, &body).await;
    assert_eq!(app.cancel(&key, &cancelled).await.0, 200);
    assert_eq!(
        app.cancel(&key, &cancelled).await.0,
        200,
        "a repeat is counted once"
    );
    let mut short = body.clone();
    short["timeout_secs"] = json!(1);
    let expiring = app.submit_ok(&key, &short).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let text = scrape(&app.http, api_port).await;
    assert_eq!(
        sample(&text, "sluice_jobs_finished_total{status=\"cancelled\"}"),
        Some(1.0),
        "{text}"
    );

    let worker_port = free_port();
    let worker_metrics = format!("127.0.0.1:{worker_port}");
    let worker = InProcessWorker::spawn_with(
        &ns,
        tiny_model_dir(),
        &[
            "--metrics-addr",
            &worker_metrics,
            "--heartbeat-secs",
            "1",
            "--worker-id",
            "obs-worker-1",
        ],
    )
    .await;
    let done = app.wait_terminal(&key, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let expired = app
        .wait_terminal(&key, &expiring, Duration::from_secs(60))
        .await;
    assert_eq!(expired["status"], "expired", "{expired}");

    // A rejected request is counted by its code, and nothing is enqueued for it.
    let (status, body) = app
        .submit(&key, &json!({"messages": [], "max_tokens": 4}))
        .await;
    assert_eq!(status, 400, "{body}");
    let code = body["error"]["code"].as_str().expect("code").to_string();

    // The registry lists the worker; readyz is ready.
    let workers: Value = wait_for(
        "the worker's heartbeat",
        Duration::from_secs(10),
        || async {
            let v = admin_workers(&app, &admin).await?;
            (v["workers"].as_array()?.len() == 1).then_some(v)
        },
    )
    .await;
    let w = &workers["workers"][0];
    assert_eq!(w["id"], "obs-worker-1", "{workers}");
    assert_eq!(w["device"], "cpu");
    assert!(w["capacity"].as_u64().expect("capacity") >= 1);
    assert!(w["model"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(
        w.get("gpu_memory_total_bytes").is_none(),
        "a CPU worker reports no GPU memory"
    );
    // Users cannot list workers.
    assert_eq!(app.status_of("/admin/workers", &key).await, 403);
    let (http_status, ready) = app.readyz().await;
    assert_eq!(
        (http_status, &ready["status"]),
        (200, &json!("ready")),
        "{ready}"
    );

    let text = scrape(&app.http, api_port).await;
    assert_eq!(
        sample(
            &text,
            "sluice_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"202\"}"
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "sluice_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"400\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("sluice_rejections_total{{code=\"{code}\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "sluice_jobs_enqueued_total{priority=\"interactive\"}"
        ),
        Some(3.0)
    );
    // Four submits and the polls of `wait_terminal`, all authenticated as acme.
    assert!(
        sample(&text, "sluice_tenant_requests_total{tenant=\"acme\"}").expect("acme") >= 3.0,
        "{text}"
    );
    // Polling `/v1/jobs/{id}` is counted under its pattern, never under the id.
    assert!(text.contains("route=\"/v1/jobs/{id}\""), "{text}");
    assert!(!text.contains(&id), "job ids never become labels");
    assert_eq!(
        sample(&text, "sluice_queue_depth{priority=\"interactive\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&text, "sluice_live_workers"), Some(1.0));

    let text = scrape(&app.http, worker_port).await;
    assert_eq!(
        sample(&text, "sluice_jobs_started_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sluice_jobs_finished_total{status=\"succeeded\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "sluice_jobs_finished_total{status=\"expired\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sluice_time_to_first_token_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "sluice_e2e_request_latency_seconds_count"),
        Some(1.0)
    );
    let generated = sample(&text, "sluice_generation_tokens_total").expect("tokens");
    assert!((1.0..=4.0).contains(&generated), "{generated}");
    assert_eq!(
        sample(
            &text,
            "sluice_tenant_tokens_total{kind=\"generated\",tenant=\"acme\"}"
        ),
        Some(generated)
    );
    assert!(sample(&text, "sluice_prompt_tokens_total").expect("prompt") > 0.0);
    assert!(sample(&text, "sluice_batch_size_count").expect("steps") >= generated - 1.0);
    assert_eq!(sample(&text, "sluice_num_requests_running"), Some(0.0));
    assert_eq!(
        sample(&text, "sluice_kv_cache_usage_ratio"),
        Some(0.0),
        "pages returned"
    );
    assert!(text.contains("sluice_worker_info{device=\"cpu\""), "{text}");

    // A worker that stops leaves the registry at once; readyz is degraded again.
    worker.stop().await;
    let v = admin_workers(&app, &admin)
        .await
        .expect("GET /admin/workers");
    assert_eq!(v["workers"], json!([]), "{v}");
    let (http_status, ready) = app.readyz().await;
    assert_eq!(
        (http_status, &ready["status"]),
        (200, &json!("degraded")),
        "{ready}"
    );
    backends.cleanup().await;
}

/// Collects what OTLP/HTTP exporters post to `/v1/traces`.
#[derive(Clone, Default)]
struct Collector {
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Collector {
    async fn start(self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let port = listener.local_addr().expect("addr").port();
        let bodies = self.bodies.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let bodies = bodies.clone();
                async move {
                    bodies.lock().expect("lock").push(body.to_vec());
                    axum::http::StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    }

    /// Whether some export from `service` carries `trace_id` (raw bytes, as protobuf does).
    fn saw(&self, service: &str, trace_id: &[u8]) -> bool {
        self.bodies
            .lock()
            .expect("lock")
            .iter()
            .any(|b| contains(b, service.as_bytes()) && contains(b, trace_id))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_runs_from_the_http_request_through_the_queue_into_the_worker() {
    let ns = unique_namespace("trace");
    let collector = Collector::default();
    let otlp = format!("http://127.0.0.1:{}", collector.clone().start().await);
    let api_port = free_port();
    let tokenizer = tiny_model_dir().to_str().expect("path").to_string();
    let common = |cmd: &mut Command| {
        cmd.env("SLUICE_REDIS_URL", REDIS_URL)
            .env("SLUICE_AMQP_URL", AMQP_URL)
            .env("SLUICE_NAMESPACE", &ns)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
    };
    let mut api = Command::new(workspace_bin("sluice-api"));
    api.args([
        "serve",
        "--addr",
        &format!("127.0.0.1:{api_port}"),
        "--tokenizer",
        &tokenizer,
    ]);
    common(&mut api);
    let _api = Killed(api.spawn().expect("spawn api"));
    let mut worker = Command::new(workspace_bin("sluice-worker"));
    worker.args(["run", "--model", &tokenizer]);
    common(&mut worker);
    let _worker = Killed(worker.spawn().expect("spawn worker"));

    let base = format!("http://127.0.0.1:{api_port}");
    let http = reqwest::Client::new();
    wait_for("the API", Duration::from_secs(30), || {
        let http = http.clone();
        let url = format!("{base}/healthz");
        async move { http.get(url).send().await.ok().map(|_| ()) }
    })
    .await;
    let pool = sluice_jobs::redis_pool::create_pool(&Secret::new(REDIS_URL), 2).expect("pool");
    let key = ApiKeys::new(pool, Keyspace::new(ns.clone()))
        .create("acme", "test", Role::User, None)
        .await
        .expect("key")
        .secret;

    let trace_hex = format!("{:032x}", rand::random::<u128>() | 1);
    let r = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&key)
        .header("traceparent", format!("00-{trace_hex}-00f067aa0ba902b7-01"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status().as_u16(), 202);
    let id = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    wait_for("the job", Duration::from_secs(60), || {
        let http = http.clone();
        let url = format!("{base}/v1/jobs/{id}");
        let key = key.clone();
        async move {
            let v: Value = http
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["status"] == "succeeded").then_some(())
        }
    })
    .await;

    let trace_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // The worker's spans include the job's terminal Redis write.
    let finish_traced = || {
        collector
            .bodies
            .lock()
            .expect("lock")
            .iter()
            .any(|b| contains(b, b"store.finish") && contains(b, &trace_id))
    };
    while !(collector.saw("sluice-api", &trace_id)
        && collector.saw("sluice-worker", &trace_id)
        && finish_traced())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no spans of the caller's trace from both processes: api {} ({} any), worker {} \
             ({} any), store.finish {}, {} exports",
            collector.saw("sluice-api", &trace_id),
            collector.saw("sluice-api", b""),
            collector.saw("sluice-worker", &trace_id),
            collector.saw("sluice-worker", b""),
            finish_traced(),
            collector.bodies.lock().expect("lock").len(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Backends::connect(&ns).await.cleanup().await;
}
