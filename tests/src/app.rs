//! An API under test ([`TestApp`]), its metrics and the request bodies and flags tests send.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sluice_api::keys::ApiKeys;
use sluice_api::principal::Role;
use sluice_jobs::Keyspace;
use sluice_shared::Secret;
use tokio::sync::oneshot;

use crate::{AMQP_URL, free_port, tiny_model_dir, wait_for, workspace_bin};

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
    /// Whether `redis_url` names a Redis Cluster (the API runs with `--redis-cluster`).
    pub redis_cluster: bool,
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
        Self::spawn_on(ns, model, &crate::redis_url(), amqp_url, extra).await
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
        let cluster = crate::is_cluster_url(redis_url);
        if cluster && !extra.contains(&"--redis-cluster") {
            args.push("--redis-cluster");
        }
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
            redis_cluster: cluster,
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
            .env("SLUICE_REDIS_URL", crate::redis_url())
            .env("SLUICE_REDIS_CLUSTER", crate::on_cluster().to_string())
            .env("SLUICE_AMQP_URL", AMQP_URL)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn sluice-api");
        let app = Self {
            base: format!("http://127.0.0.1:{port}"),
            ns: ns.to_string(),
            http: reqwest::Client::new(),
            redis_url: crate::redis_url(),
            redis_cluster: crate::on_cluster(),
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
            Ok(r) => status_and_json(r).await,
            Err(e) => panic!("/readyz did not answer: {e}"),
        }
    }

    /// Creates an admin key (for `/admin`).
    pub async fn admin_key(&self) -> String {
        let pool = sluice_jobs::redis_pool::create_pool_for(
            &Secret::new(self.redis_url.clone()),
            self.redis_cluster,
            2,
        )
        .expect("pool");
        ApiKeys::new(pool, Keyspace::new(self.ns.clone()))
            .create("ops", "admin", Role::Admin, None)
            .await
            .expect("create key")
            .secret
    }

    /// `POST /v1/chat/completions` (not streamed): the status and the JSON body (`null` when
    /// the body is not JSON).
    pub async fn chat_completion(&self, key: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("send");
        status_and_json(r).await
    }

    /// The id of the first model `GET /v1/models` lists (what the OpenAI routes serve).
    pub async fn model_id(&self, key: &str) -> String {
        let r = self
            .http
            .get(format!("{}/v1/models", self.base))
            .bearer_auth(key)
            .send()
            .await
            .expect("models");
        assert_eq!(r.status().as_u16(), 200);
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["object"], "list");
        v["data"][0]["id"].as_str().expect("id").to_string()
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
        let pool = sluice_jobs::redis_pool::create_pool_for(
            &Secret::new(self.redis_url.clone()),
            self.redis_cluster,
            2,
        )
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
        status_and_json(r).await
    }

    pub async fn cancel(&self, key: &str, id: &str) -> (u16, Value) {
        let r = self
            .http
            .delete(format!("{}/v1/jobs/{id}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .expect("cancel");
        status_and_json(r).await
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

/// A response's status and its JSON body (`null` when the body is not JSON).
pub async fn status_and_json(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
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
