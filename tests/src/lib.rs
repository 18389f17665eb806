//! Helpers for Sluice's integration tests: every test gets its own namespace (queues, exchanges
//! and Redis keys), its own API on port 0, and workers in-process or as real processes, all
//! against the real RabbitMQ and Redis.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use sluice_api::auth::{ApiKeys, Role};
use sluice_shared::{Keyspace, Secret};
use tokio::sync::oneshot;

pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A namespace no other test (or test run) uses.
pub fn unique_namespace(tag: &str) -> String {
    format!(
        "t-{tag}-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

/// The tiny random-weight model, written once per test process.
pub fn tiny_model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sluice-tiny-model-{}", std::process::id()));
        sluice_worker::model::tiny::write_tiny_model(
            &dir,
            42,
            sluice_worker::model::tiny::TinyShape::default(),
        )
        .expect("write tiny model");
        dir
    })
}

/// The real Qwen2.5 GGUF: `SLUICE_TEST_MODEL`, else what `scripts/fetch-test-model` caches.
pub fn real_model_path() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/fetch-test-model"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/fetch-test-model");
    assert!(out.status.success(), "scripts/fetch-test-model failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A binary of the workspace, built next to the test executables.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target dir");
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// Waits until `check` returns `Some`, polling, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads a streamed response (SSE) to its end, failing if it does not end within `timeout`.
/// Bytes are decoded once at the end, so a character split across chunks stays whole.
pub async fn read_to_end(resp: reqwest::Response, timeout: Duration) -> String {
    use futures_util::StreamExt;
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.expect("chunk"));
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .expect("stream ends");
    String::from_utf8(body).expect("utf-8 body")
}

/// An API server running in this process on a free port.
pub struct TestApp {
    pub base: String,
    pub ns: String,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
}

impl TestApp {
    /// An API serving the tiny model's tokenizer.
    pub async fn spawn(ns: &str) -> Self {
        Self::spawn_with(ns, AMQP_URL).await
    }

    /// Spawns against the given broker (e.g. one that is not there).
    pub async fn spawn_with(ns: &str, amqp_url: &str) -> Self {
        Self::spawn_full(ns, tiny_model_dir(), amqp_url, &[]).await
    }

    /// Spawns for a given model's tokenizer, broker and extra flags.
    pub async fn spawn_full(ns: &str, model: &Path, amqp_url: &str, extra: &[&str]) -> Self {
        let tokenizer = model.to_str().expect("utf-8 path").to_string();
        let mut args = vec![
            "sluice-api",
            "--addr",
            "127.0.0.1:0",
            "--namespace",
            ns,
            "--redis-url",
            REDIS_URL,
            "--amqp-url",
            amqp_url,
            "--tokenizer",
            &tokenizer,
        ];
        args.extend_from_slice(extra);
        let settings = sluice_api::ApiSettings::parse_from(args).expect("settings");
        let app = sluice_api::Application::build(settings)
            .await
            .expect("build api");
        let addr = app.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Self {
            base: format!("http://{addr}"),
            ns: ns.to_string(),
            http: reqwest::Client::new(),
            stop: Some(tx),
        }
    }

    /// Creates an admin key (for `/admin`).
    pub async fn admin_key(&self) -> String {
        let pool =
            sluice_shared::redis_pool::create_pool(&Secret::new(REDIS_URL), 2).expect("pool");
        ApiKeys::new(pool, Keyspace::new(self.ns.clone()))
            .create("ops", "admin", Role::Admin, None)
            .await
            .expect("create key")
            .secret
    }

    /// `PATCH /admin/tenants/{tenant}/limits` with an admin key; panics unless 200.
    pub async fn set_limits(&self, admin: &str, tenant: &str, limits: Value) {
        let r = self
            .http
            .patch(format!("{}/admin/tenants/{tenant}/limits", self.base))
            .bearer_auth(admin)
            .json(&limits)
            .send()
            .await
            .expect("set limits");
        let status = r.status().as_u16();
        assert_eq!(status, 200, "{}", r.text().await.unwrap_or_default());
    }

    /// The status of `GET path` with a bearer token.
    pub async fn status_of(&self, path: &str, token: &str) -> u16 {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    }

    /// `GET /v1/usage`.
    pub async fn usage(&self, key: &str) -> Value {
        self.http
            .get(format!("{}/v1/usage", self.base))
            .bearer_auth(key)
            .send()
            .await
            .expect("usage")
            .json()
            .await
            .expect("usage json")
    }

    /// Creates an API key for `tenant` straight in Redis (as `sluice-api keys create` does).
    pub async fn key(&self, tenant: &str) -> String {
        let pool =
            sluice_shared::redis_pool::create_pool(&Secret::new(REDIS_URL), 2).expect("pool");
        ApiKeys::new(pool, Keyspace::new(self.ns.clone()))
            .create(tenant, "test", Role::User, None)
            .await
            .expect("create key")
            .secret
    }

    pub async fn submit(&self, key: &str, body: &Value) -> (u16, Value) {
        let (status, v, _) = self.submit_with_headers(key, body, &[]).await;
        (status, v)
    }

    /// `POST /v1/jobs` with extra request headers; returns the response's headers too.
    pub async fn submit_with_headers(
        &self,
        key: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .bearer_auth(key)
            .json(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let r = req.send().await.expect("submit");
        let status = r.status().as_u16();
        let response_headers = r.headers().clone();
        (
            status,
            r.json().await.unwrap_or(Value::Null),
            response_headers,
        )
    }

    /// Submits and expects 202; returns the job id.
    pub async fn submit_ok(&self, key: &str, body: &Value) -> String {
        let (status, v) = self.submit(key, body).await;
        assert_eq!(status, 202, "submit answered {status}: {v}");
        v["id"].as_str().expect("id").to_string()
    }

    pub async fn get(&self, key: &str, id: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}/v1/jobs/{id}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .expect("get");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn cancel(&self, key: &str, id: &str) -> (u16, Value) {
        let r = self
            .http
            .delete(format!("{}/v1/jobs/{id}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .expect("cancel");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Polls until the job is terminal.
    pub async fn wait_terminal(&self, key: &str, id: &str, timeout: Duration) -> Value {
        wait_for("a terminal job status", timeout, || async {
            let (status, v) = self.get(key, id).await;
            assert_eq!(status, 200, "poll answered {status}: {v}");
            let s = v["status"].as_str().unwrap_or_default().to_string();
            (!matches!(s.as_str(), "queued" | "running")).then_some(v)
        })
        .await
    }

    /// Polls until the job has the given status.
    pub async fn wait_status(&self, key: &str, id: &str, want: &str, timeout: Duration) -> Value {
        wait_for(&format!("job status {want}"), timeout, || async {
            let (_, v) = self.get(key, id).await;
            (v["status"] == want).then_some(v)
        })
        .await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A worker running in this process.
pub struct InProcessWorker {
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessWorker {
    pub async fn spawn(ns: &str, model: &Path) -> Self {
        Self::spawn_with(ns, model, &[]).await
    }

    pub async fn spawn_with(ns: &str, model: &Path, extra: &[&str]) -> Self {
        let model = model.to_str().expect("utf-8 path").to_string();
        let mut args = vec![
            "sluice-worker",
            "--namespace",
            ns,
            "--model",
            &model,
            "--redis-url",
            REDIS_URL,
            "--amqp-url",
            AMQP_URL,
        ];
        args.extend_from_slice(extra);
        let settings = sluice_worker::WorkerSettings::parse_from(args).expect("settings");
        let worker = sluice_worker::Worker::build(settings)
            .await
            .expect("build worker");
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(worker.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            done: Some(done),
        }
    }

    /// Stops consuming and waits for the worker to drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            done.await.expect("join").expect("worker result");
        }
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A `sluice-worker` process (for kill -9).
pub struct WorkerProcess {
    pub child: Child,
    pub id: String,
}

impl WorkerProcess {
    pub fn spawn(ns: &str, model: &Path, id: &str) -> Self {
        let child = Command::new(workspace_bin("sluice-worker"))
            .args(["--namespace", ns, "--worker-id", id, "--model"])
            .arg(model)
            .env("SLUICE_REDIS_URL", REDIS_URL)
            .env("SLUICE_AMQP_URL", AMQP_URL)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn sluice-worker");
        Self {
            child,
            id: id.to_string(),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Direct access to the broker and the store of one namespace, for assertions.
pub struct Backends {
    pub ks: Keyspace,
    pub amqp: lapin::Connection,
    pub channel: lapin::Channel,
    pub redis: redis::aio::MultiplexedConnection,
}

impl Backends {
    pub async fn connect(ns: &str) -> Self {
        let amqp = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
            .await
            .expect("amqp");
        let channel = amqp.create_channel().await.expect("channel");
        let ks = Keyspace::new(ns);
        sluice_shared::amqp::declare_topology(
            &channel,
            &ks,
            sluice_shared::amqp::QueueSettings::for_max_attempts(3),
        )
        .await
        .expect("topology");
        let redis = redis::Client::open(REDIS_URL)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        Self {
            ks,
            amqp,
            channel,
            redis,
        }
    }

    /// Messages ready in a queue (not counting unacked deliveries).
    pub async fn ready_count(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare")
            .message_count()
    }

    /// Job records of this namespace in Redis.
    pub async fn job_keys(&mut self) -> Vec<String> {
        redis::cmd("KEYS")
            .arg(format!("{}:job:*", self.ks.namespace()))
            .query_async(&mut self.redis)
            .await
            .expect("keys")
    }

    /// Takes one message off a queue (acked), if any.
    pub async fn get_one(&self, queue: &str) -> Option<Vec<u8>> {
        self.channel
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
            .map(|m| m.delivery.data)
    }

    /// One field of a job record.
    pub async fn job_field(&self, id: &str, field: &str) -> Option<String> {
        let mut conn = self.redis.clone();
        redis::cmd("HGET")
            .arg(format!("{}:job:{id}", self.ks.namespace()))
            .arg(field)
            .query_async(&mut conn)
            .await
            .expect("hget")
    }

    pub async fn publish_raw(&self, payload: &[u8]) {
        self.channel
            .basic_publish(
                self.ks.jobs_exchange().into(),
                self.ks.jobs_routing_key().into(),
                BasicPublishOptions::default(),
                payload,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    /// Deletes this namespace's queues, exchanges and keys.
    pub async fn cleanup(mut self) {
        for q in [
            self.ks.jobs_queue(),
            self.ks.jobs_queue_for(sluice_proto::Priority::Batch),
            self.ks.dead_letter_queue(),
        ] {
            let _ = self
                .channel
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [self.ks.jobs_exchange(), self.ks.dead_letter_exchange()] {
            let _ = self
                .channel
                .exchange_delete(x.into(), lapin::options::ExchangeDeleteOptions::default())
                .await;
        }
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.ks.namespace()))
            .query_async(&mut self.redis)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _ = redis::cmd("DEL")
                .arg(keys)
                .query_async::<()>(&mut self.redis)
                .await;
        }
        let _ = self.amqp.close(200, "done".into()).await;
    }
}

/// A chat body with one user message.
pub fn chat(content: &str, extra: Value) -> Value {
    let mut body = serde_json::json!({
        "messages": [{"role": "user", "content": content}],
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}
