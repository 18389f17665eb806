//! Helpers for Sluice's integration tests: every test gets its own namespace (queues, exchanges
//! and Redis keys), its own API on port 0, and workers in-process or as real processes, all
//! against the real RabbitMQ and Redis.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use sluice_api::keys::ApiKeys;
use sluice_api::principal::Role;
use sluice_jobs::Keyspace;
use sluice_shared::Secret;
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

/// The tiny random-weight model, written once per test process. Under cargo-nextest every test
/// is a process of its own: the folders of processes that have exited are removed first.
pub fn tiny_model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        remove_exited_tiny_models();
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

/// Removes `sluice-tiny-model-<pid>` folders whose process is gone (Linux: no `/proc/<pid>`).
fn remove_exited_tiny_models() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("sluice-tiny-model-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The real Qwen2.5 GGUF: `SLUICE_TEST_MODEL`, else what `scripts/fetch-test-model` caches.
/// Resolved once per test process: the model tests of the one test binary run in parallel, and
/// each running the script on an empty cache would download the model once each.
pub fn real_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
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
    })
    .clone()
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
    /// The Redis this API uses (keys are created there).
    pub redis_url: String,
    stop: Option<oneshot::Sender<()>>,
    /// Set when the API runs as a `sluice-api` process ([`TestApp::spawn_process`]).
    process: Option<Child>,
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
        Self::spawn_on(ns, model, REDIS_URL, amqp_url, extra).await
    }

    /// Spawns in this process against the given Redis and broker (e.g. dedicated ones a test
    /// restarts), with extra flags.
    pub async fn spawn_on(
        ns: &str,
        model: &Path,
        redis_url: &str,
        amqp_url: &str,
        extra: &[&str],
    ) -> Self {
        let tokenizer = model.to_str().expect("utf-8 path").to_string();
        let mut args = vec![
            "sluice-api",
            "--addr",
            "127.0.0.1:0",
            "--namespace",
            ns,
            "--redis-url",
            redis_url,
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
            redis_url: redis_url.to_string(),
            stop: Some(tx),
            process: None,
        }
    }

    /// Runs the API as a real `sluice-api` process (its memory is its own, and it can be
    /// killed), on a free port, against the shared Redis and broker; waits for `/healthz`.
    pub async fn spawn_process(ns: &str, model: &Path, extra: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new(workspace_bin("sluice-api"))
            .args(["--addr", &format!("127.0.0.1:{port}"), "--namespace", ns])
            .arg("--tokenizer")
            .arg(model)
            .args(extra)
            .env("SLUICE_REDIS_URL", REDIS_URL)
            .env("SLUICE_AMQP_URL", AMQP_URL)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn sluice-api");
        let app = Self {
            base: format!("http://127.0.0.1:{port}"),
            ns: ns.to_string(),
            http: reqwest::Client::new(),
            redis_url: REDIS_URL.to_string(),
            stop: None,
            process: Some(child),
        };
        wait_for("sluice-api to listen", Duration::from_secs(60), || async {
            let up = app
                .http
                .get(format!("{}/healthz", app.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            (up).then_some(())
        })
        .await;
        app
    }

    /// The process id of a [`TestApp::spawn_process`] API.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// `GET /readyz`: its status and body.
    pub async fn readyz(&self) -> (u16, Value) {
        match self
            .http
            .get(format!("{}/readyz", self.base))
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(e) => panic!("/readyz did not answer: {e}"),
        }
    }

    /// Creates an admin key (for `/admin`).
    pub async fn admin_key(&self) -> String {
        let pool = sluice_jobs::redis_pool::create_pool(&Secret::new(self.redis_url.clone()), 2)
            .expect("pool");
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
        let pool = sluice_jobs::redis_pool::create_pool(&Secret::new(self.redis_url.clone()), 2)
            .expect("pool");
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
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET /metrics` on a loopback port (asserts 200).
pub async fn scrape(http: &reqwest::Client, port: u16) -> String {
    let r = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status().as_u16(), 200);
    r.text().await.expect("metrics body")
}

/// The value of one sample (`name{labels} value`), matching the whole series text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
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
        Self::spawn_on(ns, model, id, REDIS_URL, AMQP_URL, &[])
    }

    /// A worker process against the given Redis and broker, with extra flags.
    pub fn spawn_on(
        ns: &str,
        model: &Path,
        id: &str,
        redis_url: &str,
        amqp_url: &str,
        extra: &[&str],
    ) -> Self {
        let mut cmd = Command::new(workspace_bin("sluice-worker"));
        cmd.args(["--namespace", ns, "--worker-id", id, "--model"])
            .arg(model)
            .args(extra)
            .env("SLUICE_REDIS_URL", redis_url)
            .env("SLUICE_AMQP_URL", amqp_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        Self {
            child: cmd.spawn().expect("spawn sluice-worker"),
            id: id.to_string(),
        }
    }

    /// Like [`WorkerProcess::spawn_on`], logging JSON lines to `<log_dir>/<id>.log`, with the
    /// consumer at `info`: one `job started` line per `START` that let a job run, which
    /// [`jobs_started`] counts.
    pub fn spawn_logged(
        ns: &str,
        model: &Path,
        id: &str,
        redis_url: &str,
        amqp_url: &str,
        log_dir: &Path,
    ) -> Self {
        let log = std::fs::File::create(log_dir.join(format!("{id}.log"))).expect("log file");
        let child = Command::new(workspace_bin("sluice-worker"))
            .args([
                "--namespace",
                ns,
                "--worker-id",
                id,
                "--log-format",
                "json",
                "--model",
            ])
            .arg(model)
            .env("SLUICE_REDIS_URL", redis_url)
            .env("SLUICE_AMQP_URL", amqp_url)
            .env("RUST_LOG", "warn,sluice_worker::intake::consumer=info")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
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
    redis_url: String,
    amqp_url: String,
    /// Set by [`Backends::cleanup`]; otherwise (a test that failed or returned early) the
    /// namespace is cleaned up when the fixture is dropped.
    cleaned: bool,
}

impl Backends {
    pub async fn connect(ns: &str) -> Self {
        Self::connect_on(ns, REDIS_URL, AMQP_URL).await
    }

    /// Connects to the given Redis and broker (dedicated ones a test restarts).
    pub async fn connect_on(ns: &str, redis_url: &str, amqp_url: &str) -> Self {
        let amqp = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
            .await
            .expect("amqp");
        let channel = amqp.create_channel().await.expect("channel");
        let ks = Keyspace::new(ns);
        sluice_jobs::amqp::declare_topology(
            &channel,
            &ks,
            sluice_jobs::amqp::QueueSettings::for_max_attempts(3),
        )
        .await
        .expect("topology");
        let redis = redis::Client::open(redis_url)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        Self {
            ks,
            amqp,
            channel,
            redis,
            redis_url: redis_url.to_string(),
            amqp_url: amqp_url.to_string(),
            cleaned: false,
        }
    }

    /// Messages ready in a queue (not counting unacked deliveries).
    pub async fn ready_count(&self, queue: &str) -> u32 {
        self.peek(queue)
            .await
            .expect("passive declare")
            .message_count()
    }

    /// A queue's counters (passive declare), `None` if it is not there.
    async fn peek(&self, queue: &str) -> Option<lapin::Queue> {
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
            .ok()
    }

    /// Waits until `n` consumers (workers) consume the interactive jobs queue.
    pub async fn wait_for_consumers(&self, n: usize, timeout: Duration) {
        let queue = self.ks.jobs_queue();
        wait_for(&format!("{n} workers consuming"), timeout, || async {
            let q = self.peek(&queue).await?;
            (q.consumer_count() as usize == n).then_some(())
        })
        .await;
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
                // Routing key = the class: an interactive job.
                sluice_proto::Priority::Interactive.as_str().into(),
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
        self.cleaned = true;
        remove_namespace(&self.ks, &self.channel, &mut self.redis).await;
        let _ = tokio::time::timeout(CLEANUP_STEP, self.amqp.close(200, "done".into())).await;
    }
}

/// The longest a cleanup waits for one broker call: best effort, and bounded, since a call
/// that never answers (seen once: a `queue.delete` after a long test) must not hang a test.
const CLEANUP_STEP: Duration = Duration::from_secs(10);

/// Deletes a namespace's queues, exchanges and Redis keys.
async fn remove_namespace(
    ks: &Keyspace,
    channel: &lapin::Channel,
    redis: &mut redis::aio::MultiplexedConnection,
) {
    for q in [
        ks.jobs_queue(),
        ks.jobs_queue_for(sluice_proto::Priority::Batch),
        ks.dead_letter_queue(),
    ] {
        let delete = channel.queue_delete(q.into(), QueueDeleteOptions::default());
        let _ = tokio::time::timeout(CLEANUP_STEP, delete).await;
    }
    for x in [ks.jobs_exchange(), ks.dead_letter_exchange()] {
        let delete =
            channel.exchange_delete(x.into(), lapin::options::ExchangeDeleteOptions::default());
        let _ = tokio::time::timeout(CLEANUP_STEP, delete).await;
    }
    delete_namespace_keys(redis, ks.namespace()).await;
}

impl Drop for Backends {
    /// A test that failed (or returned without calling [`Backends::cleanup`]) still leaves
    /// nothing behind: the namespace is removed over fresh connections, on a thread of its own
    /// (the test's runtime may be the one unwinding).
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (ks, redis_url, amqp_url) = (
            self.ks.clone(),
            self.redis_url.clone(),
            self.amqp_url.clone(),
        );
        let cleaner = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let work = async {
                    let amqp = lapin::Connection::connect(
                        &amqp_url,
                        lapin::ConnectionProperties::default(),
                    )
                    .await
                    .ok()?;
                    let channel = amqp.create_channel().await.ok()?;
                    let mut redis = redis::Client::open(redis_url.as_str())
                        .ok()?
                        .get_multiplexed_async_connection()
                        .await
                        .ok()?;
                    remove_namespace(&ks, &channel, &mut redis).await;
                    let _ = amqp.close(200, "done".into()).await;
                    Some(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(60), work).await;
            });
        });
        let _ = cleaner.join();
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

/// A free TCP port on loopback (bound, then released: good enough for a test's own servers).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A temporary directory, removed on drop (also when the test panics).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sluice-{tag}-{}-{}",
            std::process::id(),
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills a child with SIGKILL and reaps it, if it is still running.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A `redis-server` of a test's own (never the shared one), on a free port, with the
/// append-only file fsynced on every write, so it can be killed and restarted without losing
/// an acknowledged write. Killed on drop; its directory is removed.
pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start_with_aof() -> Self {
        let mut server = Self {
            port: free_port(),
            dir: TempDir::new("redis"),
            child: None,
        };
        server.start().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port and directory) and waits until it answers
    /// PING (that is, after it has loaded its append-only file).
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let dir = self.dir.path();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it installed?)");
        self.child = Some(child);
        let url = self.url();
        wait_for("redis-server to answer", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url).ok()?;
                let mut conn = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.get_multiplexed_async_connection(),
                )
                .await
                .ok()?
                .ok()?;
                let pong: String = redis::cmd("PING").query_async(&mut conn).await.ok()?;
                (pong == "PONG").then_some(())
            }
        })
        .await;
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        kill_child(&mut self.child);
    }

    /// A fresh connection (connections do not survive a restart).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// A RabbitMQ node of a test's own (never the shared one): its own node name, AMQP and
/// distribution ports, Mnesia directory and Erlang cookie, no plugins. Durable quorum queues
/// and persistent messages survive [`RabbitNode::kill9`] or [`RabbitNode::stop`] followed by
/// [`RabbitNode::start`]. Killed on drop; its directory is removed.
pub struct RabbitNode {
    pub port: u16,
    dist_port: u16,
    pub name: String,
    dir: TempDir,
    child: Option<Child>,
}

impl RabbitNode {
    /// Whether `rabbitmq-server` can be run here.
    pub fn available() -> bool {
        Self::server_script().is_some()
    }

    fn server_script() -> Option<PathBuf> {
        // The package's wrapper in /usr/sbin re-runs itself as the `rabbitmq` user and drops
        // our environment; the script it wraps takes it as is.
        ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    }

    /// Starts a fresh node and waits until it accepts AMQP connections.
    pub async fn start_new() -> Self {
        let dir = TempDir::new("rabbit");
        let port = free_port();
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .expect("config file");
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "").expect("env file");
        let mut node = Self {
            port,
            dist_port: free_port(),
            name: format!(
                "sluice-t{}-{}@localhost",
                std::process::id(),
                &uuid::Uuid::now_v7().simple().to_string()[24..]
            ),
            dir,
            child: None,
        };
        node.start().await;
        node
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (again, with the same name, ports and data) and waits for AMQP.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stdout.log"))
            .expect("log file");
        let child = Command::new(Self::server_script().expect("rabbitmq-server"))
            // `exec`s the VM instead of supervising it from a shell: our child is the node.
            .env("RUNNING_UNDER_SYSTEMD", "1")
            .env("HOME", dir)
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn rabbitmq-server");
        self.child = Some(child);
        let url = self.url();
        let child = self.child.as_mut().expect("child");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "rabbitmq-server exited ({status}): {}",
                    std::fs::read_to_string(dir.join("stdout.log")).unwrap_or_default()
                );
            }
            let props = lapin::ConnectionProperties::default();
            if let Ok(Ok(conn)) = tokio::time::timeout(
                Duration::from_secs(5),
                lapin::Connection::connect(&url, props),
            )
            .await
            {
                let _ = conn.close(200, "up".into()).await;
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "RabbitMQ node {} did not start within 120 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// kill -9 of the node.
    pub fn kill9(&mut self) {
        kill_child(&mut self.child);
    }

    /// A graceful stop (SIGTERM: the node closes its connections and shuts down); waits for
    /// the node to exit (kills it after 60 s).
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// What one submit of a load generator got back.
#[derive(Debug, Clone)]
pub struct Submission {
    /// When it was sent, from the start of the load.
    pub at: Duration,
    /// How long the answer took.
    pub latency: Duration,
    /// The HTTP status; 0 when no answer came (connection refused or reset).
    pub status: u16,
    /// The error code of a refusal (`queue_unavailable`, ...).
    pub code: Option<String>,
    /// The job id of a 202.
    pub id: Option<String>,
    /// The request did not get an answer within the client timeout (a hang).
    pub timed_out: bool,
}

/// What a load generator saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub submissions: Vec<Submission>,
}

impl LoadReport {
    /// Ids of accepted jobs, in the order they were submitted.
    pub fn accepted(&self) -> Vec<String> {
        self.submissions
            .iter()
            .filter_map(|s| s.id.clone())
            .collect()
    }

    /// Count per HTTP status (0: no answer).
    pub fn statuses(&self) -> std::collections::BTreeMap<u16, usize> {
        let mut m = std::collections::BTreeMap::new();
        for s in &self.submissions {
            *m.entry(s.status).or_default() += 1;
        }
        m
    }

    /// Count per error code of the refusals.
    pub fn codes(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for s in &self.submissions {
            if let Some(c) = &s.code {
                *m.entry(c.clone()).or_default() += 1;
            }
        }
        m
    }

    pub fn timeouts(&self) -> usize {
        self.submissions.iter().filter(|s| s.timed_out).count()
    }

    /// The `q` quantile (0..=1) of the submit latency, in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        let mut l: Vec<f64> = self
            .submissions
            .iter()
            .filter(|s| s.status != 0)
            .map(|s| s.latency.as_secs_f64() * 1000.0)
            .collect();
        if l.is_empty() {
            return 0.0;
        }
        l.sort_by(f64::total_cmp);
        let i = ((l.len() - 1) as f64 * q).round() as usize;
        l[i]
    }
}

/// An open-loop load generator: submits one job every `every` (each in its own task, so a
/// slow answer never lowers the rate) to whichever API `base` names at that moment, until
/// [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<LoadReport>,
    live: Arc<Mutex<Vec<String>>>,
}

/// Client timeout of one submit: an answer later than this counts as a hang.
pub const SUBMIT_TIMEOUT: Duration = Duration::from_secs(15);

impl Load {
    /// `body(n)` is the n-th request body (n from 1).
    pub fn start(
        http: reqwest::Client,
        base: Arc<Mutex<String>>,
        key: String,
        every: Duration,
        body: impl Fn(u64) -> Value + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let live = Arc::new(Mutex::new(Vec::new()));
        let live_ids = Arc::clone(&live);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(every);
            let mut tasks = tokio::task::JoinSet::new();
            let mut report = LoadReport::default();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                tick.tick().await;
                while let Some(done) = tasks.try_join_next() {
                    report.submissions.push(done.expect("submit task"));
                }
                n += 1;
                let url = format!("{}/v1/jobs", base.lock().expect("lock"));
                let request = http
                    .post(url)
                    .bearer_auth(&key)
                    .json(&body(n))
                    .timeout(SUBMIT_TIMEOUT);
                let at = started.elapsed();
                let live = Arc::clone(&live_ids);
                tasks.spawn(async move {
                    let sent = Instant::now();
                    let mut s = Submission {
                        at,
                        latency: Duration::ZERO,
                        status: 0,
                        code: None,
                        id: None,
                        timed_out: false,
                    };
                    match request.send().await {
                        Ok(r) => {
                            s.status = r.status().as_u16();
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            s.latency = sent.elapsed();
                            if s.status == 202 {
                                let id = v["id"].as_str().expect("id of a 202").to_string();
                                live.lock().expect("lock").push(id.clone());
                                s.id = Some(id);
                            } else {
                                s.code = v["error"]["code"].as_str().map(str::to_string);
                            }
                        }
                        Err(e) => {
                            s.latency = sent.elapsed();
                            s.timed_out = e.is_timeout();
                        }
                    }
                    s
                });
            }
            while let Some(done) = tasks.join_next().await {
                report.submissions.push(done.expect("submit task"));
            }
            report.submissions.sort_by_key(|s| s.at);
            report
        });
        Self { stop, task, live }
    }

    /// The ids accepted so far, growing while the load runs (for a poller beside it).
    pub fn live_accepted(&self) -> Arc<Mutex<Vec<String>>> {
        Arc::clone(&self.live)
    }

    /// Stops submitting and waits for the answers still outstanding.
    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load generator")
    }
}

/// Waits (reading Redis directly, in pipelines) until every job in `ids` is terminal, then
/// checks each was completed exactly once: one `done` event in its stream. Returns the
/// records (`status`, `attempts`, `worker`, `result`) by id.
pub async fn await_terminal_once(
    redis: &mut redis::aio::MultiplexedConnection,
    ns: &str,
    ids: &[String],
    timeout: Duration,
) -> HashMap<String, HashMap<String, String>> {
    let start = Instant::now();
    let mut pending: Vec<String> = ids.to_vec();
    let mut records = HashMap::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for chunk in pending.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.hgetall(format!("{ns}:job:{id}"));
            }
            let rows: Vec<HashMap<String, String>> =
                pipe.query_async(redis).await.expect("read job records");
            for (id, row) in chunk.iter().zip(rows) {
                let status = row.get("status").map(String::as_str).unwrap_or("");
                if matches!(status, "queued" | "running" | "") {
                    assert!(!row.is_empty(), "accepted job {id} has no record");
                    still.push(id.clone());
                } else {
                    records.insert(id.clone(), row);
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < timeout,
            "{} of {} accepted jobs not terminal after {timeout:?}, e.g. {}",
            pending.len(),
            ids.len(),
            pending[0]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for chunk in ids.chunks(500) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("XRANGE")
                .arg(format!("{ns}:job:{id}:events"))
                .arg("-")
                .arg("+");
        }
        let streams: Vec<Vec<(String, HashMap<String, String>)>> =
            pipe.query_async(redis).await.expect("read event streams");
        for (id, entries) in chunk.iter().zip(streams) {
            let done = entries
                .iter()
                .filter(|(_, f)| f.get("type").map(String::as_str) == Some("done"))
                .count();
            assert_eq!(done, 1, "job {id} finished {done} times");
        }
    }
    records
}

/// Deletes every Redis key of a namespace (best effort: a test's cleanup).
pub async fn delete_namespace_keys(redis: &mut redis::aio::MultiplexedConnection, ns: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:*"))
        .query_async(redis)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _ = redis::cmd("DEL").arg(keys).query_async::<()>(redis).await;
    }
}

/// Job records (not event streams) of a namespace.
pub async fn job_record_keys(
    redis: &mut redis::aio::MultiplexedConnection,
    ns: &str,
) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:job:*"))
        .query_async(redis)
        .await
        .expect("keys");
    keys.into_iter()
        .filter(|k| !k.ends_with(":events"))
        .collect()
}

/// The log lines with `message`, over the JSON logs of [`WorkerProcess::spawn_logged`]
/// workers in `log_dir`.
pub fn log_lines(log_dir: &Path, message: &str) -> Vec<Value> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(log_dir).expect("log dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("log") {
            continue;
        }
        for line in std::fs::read_to_string(&path).expect("read log").lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            // Flattened (`--log-format json`) or not.
            if v["message"] == message || v["fields"]["message"] == message {
                lines.push(v);
            }
        }
    }
    lines
}

/// How many times each job was started to run (its `job started` log lines), over the JSON
/// logs of [`WorkerProcess::spawn_logged`] workers in `log_dir`.
pub fn jobs_started(log_dir: &Path) -> HashMap<String, usize> {
    let mut started = HashMap::new();
    for v in log_lines(log_dir, "job started") {
        {
            let id = v["span"]["job_id"]
                .as_str()
                .or_else(|| {
                    v["spans"]
                        .as_array()?
                        .iter()
                        .find_map(|s| s["job_id"].as_str())
                })
                .unwrap_or_else(|| panic!("a job id in {v}"));
            *started.entry(id.to_string()).or_default() += 1;
        }
    }
    started
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Unlimited rate limits, quotas and active-job caps for a tenant (load and fault tests). The
/// guard still runs in full, rules and classifier at their whole cost, but flags instead of
/// blocking: these tests are about limits and faults, and a classifier false positive on one
/// of their machine-made prompts (`job 123`) is not what they test (the guard's own tests do).
pub fn unlimited_tenant() -> Value {
    serde_json::json!({
        "requests_per_second": null, "requests_per_minute": null,
        "max_active_jobs": null, "tokens_per_day": null, "tokens_per_month": null,
        "injection_action": "flag",
    })
}

/// API flags lifting the per-client-IP limits: load and polls all come from loopback.
pub const NO_IP_LIMITS: [&str; 4] = [
    "--ip-requests-per-second",
    "0",
    "--ip-requests-per-minute",
    "0",
];
