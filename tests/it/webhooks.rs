//! Webhooks end to end against the real RabbitMQ and Redis: endpoints registered through the
//! admin API, events delivered by the API's own consumer to a small receiver on loopback
//! (allowed with `--webhook-allow 127.0.0.1`), signatures checked here with `hmac` apart from
//! the API's code, retries through the delayed queues with a short schedule, the dead queue,
//! redirects, a slow endpoint beside a fast one, and the URL policy at registration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use sluice_tests::*;

const TENANT: &str = "acme";
/// The retry schedule of these tests: three attempts in about a second.
const DELAYS: &str = "300ms,600ms";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

/// A webhook receiver on loopback. Its answer depends on the path: `/ok...` 200, `/flaky`
/// 500 twice then 200, `/fail` always 500, `/slow` 200 after 5 s, `/redirect` 302 to `/ok`.
struct Receiver {
    base: String,
    seen: Arc<Seen>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<Received>>,
    hits: Mutex<HashMap<String, u32>>,
}

async fn receive(
    State(seen): State<Arc<Seen>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    seen.requests.lock().expect("lock").push(Received {
        path: path.clone(),
        headers,
        body,
        at: Instant::now(),
    });
    let hit = {
        let mut hits = seen.hits.lock().expect("lock");
        let n = hits.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    match path.as_str() {
        ok if ok.starts_with("/ok") => StatusCode::OK.into_response(),
        "/flaky" if hit <= 2 => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        "/flaky" => StatusCode::OK.into_response(),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            StatusCode::OK.into_response()
        }
        "/redirect" => (StatusCode::FOUND, [("location", "/ok")]).into_response(),
        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Seen::default());
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&seen));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base, seen, server }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn requests(&self, path: &str) -> Vec<Received> {
        self.seen
            .requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    async fn wait_requests(&self, path: &str, n: usize, timeout: Duration) -> Vec<Received> {
        wait_for(&format!("{n} requests on {path}"), timeout, || async {
            let got = self.requests(path);
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The API under test and its namespace's backends, removed (webhook queues included) when
/// dropped (a test that passes leaves nothing behind either).
struct Fixture {
    app: Option<TestApp>,
    admin: String,
    backends: Backends,
}

impl Fixture {
    async fn spawn(tag: &str, allow_loopback: bool) -> Self {
        let ns = unique_namespace(tag);
        let backends = Backends::connect(&ns).await;
        let mut flags = vec![
            "--webhook-retry-delays",
            DELAYS,
            "--default-requests-per-second",
            "0",
            "--default-requests-per-minute",
            "0",
        ];
        flags.extend_from_slice(&NO_IP_LIMITS);
        if allow_loopback {
            flags.extend_from_slice(&["--webhook-allow", "127.0.0.1"]);
        }
        let app = TestApp::spawn_full(&ns, tiny_model_dir(), AMQP_URL, &flags).await;
        let admin = app.admin_key().await;
        Self {
            app: Some(app),
            admin,
            backends,
        }
    }

    fn app(&self) -> &TestApp {
        self.app.as_ref().expect("app")
    }

    fn backends(&self) -> &Backends {
        &self.backends
    }

    fn url(&self, path: &str) -> String {
        format!("{}/admin/tenants/{TENANT}/webhooks{path}", self.app().base)
    }

    /// `POST /admin/tenants/acme/webhooks`.
    async fn register(&self, url: &str, event_types: &[&str]) -> (u16, Value) {
        let r = self
            .app()
            .http
            .post(self.url(""))
            .bearer_auth(&self.admin)
            .json(&json!({ "url": url, "event_types": event_types }))
            .send()
            .await
            .expect("register");
        status_and_json(r).await
    }

    /// Registers and expects 201; returns the endpoint (with its secret).
    async fn register_ok(&self, url: &str, event_types: &[&str]) -> Value {
        let (status, endpoint) = self.register(url, event_types).await;
        assert_eq!(status, 201, "{endpoint}");
        endpoint
    }

    /// `POST .../{id}/test`, expecting 202; returns the event id.
    async fn send_test(&self, id: &str) -> String {
        let r = self
            .app()
            .http
            .post(self.url(&format!("/{id}/test")))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("test event");
        assert_eq!(r.status().as_u16(), 202);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["event_type"], "webhook.test");
        assert_eq!(body["endpoint_id"], id);
        body["event_id"].as_str().expect("event id").to_string()
    }

    /// `GET .../{id}/deliveries`: status and body.
    async fn deliveries(&self, id: &str) -> (u16, Value) {
        let r = self
            .app()
            .http
            .get(self.url(&format!("/{id}/deliveries")))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("deliveries");
        status_and_json(r).await
    }

    /// Waits until the endpoint's log has `n` attempts and the newest has `last` status.
    async fn wait_deliveries(&self, id: &str, n: usize, last: &str) -> Vec<Value> {
        wait_for(
            &format!("{n} attempts, the newest {last}"),
            Duration::from_secs(20),
            || async {
                let (status, body) = self.deliveries(id).await;
                assert_eq!(status, 200, "{body}");
                let list = body["deliveries"].as_array().cloned().unwrap_or_default();
                (list.len() >= n && list[0]["status"] == last).then_some(list)
            },
        )
        .await
    }
}

impl Drop for Fixture {
    /// Stops the API before the backends' drop removes the namespace (webhook queues
    /// included), so its consumer does not declare the queues again.
    fn drop(&mut self) {
        drop(self.app.take());
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn header<'a>(request: &'a Received, name: &str) -> &'a str {
    request
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
}

/// The Standard Webhooks signature of a request, computed here from the secret.
fn expected_signature(secret: &str, request: &Received) -> String {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("hmac key");
    mac.update(header(request, "webhook-id").as_bytes());
    mac.update(b".");
    mac.update(header(request, "webhook-timestamp").as_bytes());
    mac.update(b".");
    mac.update(&request.body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_event_arrives_signed_and_the_endpoint_can_be_listed_and_deleted() {
    let fixture = Fixture::spawn("webhooks-signed", true).await;
    let receiver = Receiver::start().await;
    let endpoint = fixture
        .register_ok(
            &receiver.url("/ok"),
            &["batch.completed", "job.failed", "batch.completed"],
        )
        .await;
    let id = endpoint["id"].as_str().expect("id").to_string();
    let secret = endpoint["secret"].as_str().expect("secret").to_string();
    assert_eq!(endpoint["tenant"], TENANT);
    assert_eq!(
        endpoint["event_types"],
        json!(["batch.completed", "job.failed"])
    );
    assert_eq!(
        STANDARD
            .decode(&secret["whsec_".len()..])
            .map(|k| k.len())
            .ok(),
        Some(32)
    );

    let event_id = fixture.send_test(&id).await;
    let request = receiver
        .wait_requests("/ok", 1, Duration::from_secs(20))
        .await
        .remove(0);
    assert_eq!(header(&request, "webhook-id"), event_id);
    assert_eq!(header(&request, "content-type"), "application/json");
    let timestamp: u64 = header(&request, "webhook-timestamp")
        .parse()
        .expect("seconds");
    let now = sluice_proto::now_ms() / 1000;
    assert!(now.abs_diff(timestamp) <= 60, "{timestamp} vs {now}");
    assert_eq!(
        header(&request, "webhook-signature"),
        expected_signature(&secret, &request)
    );
    let body: Value = serde_json::from_slice(&request.body).expect("JSON body");
    assert_eq!(body["id"], event_id.as_str());
    assert_eq!(body["object"], "event");
    assert_eq!(body["type"], "webhook.test");
    assert_eq!(body["data"], json!({ "id": id }));
    assert!(
        body["created_at"]
            .as_u64()
            .is_some_and(|t| t.abs_diff(now) <= 60)
    );

    let log = fixture.wait_deliveries(&id, 1, "delivered").await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["event_id"], event_id.as_str());
    assert_eq!(log[0]["event_type"], "webhook.test");
    assert_eq!(log[0]["attempt"], 1);
    assert_eq!(log[0]["http_status"], 200);
    assert!(log[0]["error"].is_null() && log[0]["next_retry_at"].is_null());

    let list: Value = fixture
        .app()
        .http
        .get(fixture.url(""))
        .bearer_auth(&fixture.admin)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let listed = list["webhooks"].as_array().expect("webhooks");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(listed[0].get("secret").is_none(), "{list}");

    let delete = |id: String| {
        let request = fixture
            .app()
            .http
            .delete(fixture.url(&format!("/{id}")))
            .bearer_auth(&fixture.admin);
        async move { request.send().await.expect("delete").status().as_u16() }
    };
    assert_eq!(delete(id.clone()).await, 204);
    assert_eq!(delete(id.clone()).await, 404);
    assert_eq!(fixture.deliveries(&id).await.0, 404);
    // A user key is not an admin key.
    let user = fixture.app().key(TENANT).await;
    assert_eq!(
        fixture
            .app()
            .status_of(&format!("/admin/tenants/{TENANT}/webhooks"), &user)
            .await,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_retried_until_it_answers() {
    let fixture = Fixture::spawn("webhooks-retry", true).await;
    let receiver = Receiver::start().await;
    let endpoint = fixture
        .register_ok(&receiver.url("/flaky"), &["job.failed"])
        .await;
    let id = endpoint["id"].as_str().expect("id");
    let event_id = fixture.send_test(id).await;

    let log = fixture.wait_deliveries(id, 3, "delivered").await;
    let statuses: Vec<&str> = log.iter().filter_map(|a| a["status"].as_str()).collect();
    assert_eq!(statuses, ["delivered", "failed", "failed"], "{log:?}");
    let attempts: Vec<u64> = log.iter().filter_map(|a| a["attempt"].as_u64()).collect();
    assert_eq!(attempts, [3, 2, 1]);
    for failed in &log[1..] {
        assert_eq!(failed["http_status"], 500);
        assert!(failed["error"].is_string());
        let at = failed["at"].as_u64().expect("at");
        let next = failed["next_retry_at"]
            .as_u64()
            .expect("a retry is scheduled");
        assert!(next >= at + 300, "{failed}");
    }
    assert!(log[0]["next_retry_at"].is_null());
    // Every attempt carries the same event id, each freshly signed.
    let requests = receiver
        .wait_requests("/flaky", 3, Duration::from_secs(5))
        .await;
    assert_eq!(requests.len(), 3);
    let secret = endpoint["secret"].as_str().expect("secret");
    for request in &requests {
        assert_eq!(header(request, "webhook-id"), event_id);
        assert_eq!(
            header(request, "webhook-signature"),
            expected_signature(secret, request)
        );
    }
    // The second attempt waited out the first delay (300 ms), the third the second (600 ms).
    assert!(requests[1].at - requests[0].at >= Duration::from_millis(300));
    assert!(requests[2].at - requests[1].at >= Duration::from_millis(600));
    assert_eq!(
        fixture
            .backends()
            .ready_count(&fixture.backends().ks.webhooks_dead_queue())
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_always_fails_ends_in_the_dead_queue() {
    let fixture = Fixture::spawn("webhooks-dead", true).await;
    let receiver = Receiver::start().await;
    let endpoint = fixture
        .register_ok(&receiver.url("/fail"), &["job.failed"])
        .await;
    let id = endpoint["id"].as_str().expect("id");
    let event_id = fixture.send_test(id).await;

    let log = fixture.wait_deliveries(id, 3, "dead").await;
    let statuses: Vec<&str> = log.iter().filter_map(|a| a["status"].as_str()).collect();
    assert_eq!(statuses, ["dead", "failed", "failed"], "{log:?}");
    assert_eq!(log[0]["attempt"], 3);
    assert_eq!(log[0]["http_status"], 500);
    assert!(log[0]["next_retry_at"].is_null());

    let dead = fixture.backends().ks.webhooks_dead_queue();
    wait_for("the dead letter", Duration::from_secs(5), || async {
        (fixture.backends().ready_count(&dead).await == 1).then_some(())
    })
    .await;
    let message = fixture
        .backends()
        .get_one(&dead)
        .await
        .expect("a dead delivery");
    let message: Value = serde_json::from_slice(&message).expect("JSON");
    assert_eq!(message["event_id"], event_id.as_str());
    assert_eq!(message["endpoint_id"], id);
    assert_eq!(message["attempt"], 3);
    // No fourth attempt.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.requests("/fail").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_does_not_hold_up_another() {
    let fixture = Fixture::spawn("webhooks-slow", true).await;
    let receiver = Receiver::start().await;
    let slow = fixture
        .register_ok(&receiver.url("/slow"), &["job.failed"])
        .await;
    let fast = fixture
        .register_ok(&receiver.url("/ok"), &["job.failed"])
        .await;
    fixture.send_test(slow["id"].as_str().expect("id")).await;
    let slow_request = receiver
        .wait_requests("/slow", 1, Duration::from_secs(20))
        .await
        .remove(0);
    let sent = Instant::now();
    fixture.send_test(fast["id"].as_str().expect("id")).await;
    let fast_request = receiver
        .wait_requests("/ok", 1, Duration::from_secs(20))
        .await
        .remove(0);
    assert!(
        fast_request.at - sent < Duration::from_secs(3),
        "the fast endpoint waited {:?}",
        fast_request.at - sent
    );
    assert!(
        fast_request.at < slow_request.at + Duration::from_secs(5),
        "the fast endpoint was reached only after the slow one answered"
    );
    // The slow one is delivered too, once it answers (within the 10 s timeout).
    let log = fixture
        .wait_deliveries(slow["id"].as_str().expect("id"), 1, "delivered")
        .await;
    assert_eq!(log.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed_and_counts_as_failed() {
    let fixture = Fixture::spawn("webhooks-redirect", true).await;
    let receiver = Receiver::start().await;
    let endpoint = fixture
        .register_ok(&receiver.url("/redirect"), &["job.failed"])
        .await;
    let id = endpoint["id"].as_str().expect("id");
    fixture.send_test(id).await;
    let log = fixture.wait_deliveries(id, 3, "dead").await;
    for attempt in &log {
        assert_eq!(attempt["http_status"], 302, "{attempt}");
        assert!(
            attempt["error"]
                .as_str()
                .is_some_and(|e| e.contains("redirect")),
            "{attempt}"
        );
    }
    assert_eq!(receiver.requests("/redirect").len(), 3);
    assert!(
        receiver.requests("/ok").is_empty(),
        "the redirect was followed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_reaches_only_the_endpoints_subscribed_to_the_type() {
    let fixture = Fixture::spawn("webhooks-emit", true).await;
    let receiver = Receiver::start().await;
    let batches = fixture
        .register_ok(&receiver.url("/ok-batches"), &["batch.completed"])
        .await;
    let jobs = fixture
        .register_ok(&receiver.url("/ok-jobs"), &["job.failed"])
        .await;
    // The handle the batch code uses, over the API's namespace (same retry schedule, since
    // the queues' TTLs must match).
    let ns = fixture.backends().ks.namespace().to_string();
    let settings = sluice_api::webhooks::WebhookSettings {
        webhook_allow: Vec::new(),
        webhook_retry_delays: sluice_api::webhooks::settings::parse_retry_delays(DELAYS)
            .expect("delays"),
        webhook_timeout_secs: 10,
        webhook_deliveries: false,
    };
    let pool = sluice_jobs::redis_pool::create_pool(&sluice_shared::Secret::new(REDIS_URL), 2)
        .expect("pool");
    let webhooks = sluice_api::webhooks::Webhooks::new(
        pool,
        sluice_jobs::Keyspace::new(ns),
        sluice_shared::Secret::new(AMQP_URL),
        &settings,
        "webhooks-test".to_string(),
    );
    let unknown = webhooks.emit(TENANT, "batch.done", json!({})).await;
    assert!(unknown.is_err());
    webhooks
        .emit(TENANT, "batch.completed", json!({ "id": "batch_1" }))
        .await
        .expect("emit");
    let request = receiver
        .wait_requests("/ok-batches", 1, Duration::from_secs(20))
        .await
        .remove(0);
    let body: Value = serde_json::from_slice(&request.body).expect("JSON");
    assert_eq!(body["type"], "batch.completed");
    assert_eq!(body["data"], json!({ "id": "batch_1" }));
    let secret = batches["secret"].as_str().expect("secret");
    assert_eq!(
        header(&request, "webhook-signature"),
        expected_signature(secret, &request)
    );
    // The job endpoint got nothing (its log is empty), then gets its own type.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.requests("/ok-jobs").is_empty());
    let jobs_id = jobs["id"].as_str().expect("id");
    assert_eq!(fixture.deliveries(jobs_id).await.1["deliveries"], json!([]));
    webhooks
        .emit(TENANT, "job.failed", json!({ "id": "job_1" }))
        .await
        .expect("emit");
    fixture.wait_deliveries(jobs_id, 1, "delivered").await;
    let request = receiver
        .wait_requests("/ok-jobs", 1, Duration::from_secs(5))
        .await;
    let body: Value = serde_json::from_slice(&request[0].body).expect("JSON");
    assert_eq!(body["type"], "job.failed");
    // Another tenant's event reaches neither.
    webhooks
        .emit("other", "job.failed", json!({ "id": "job_2" }))
        .await
        .expect("emit");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.requests("/ok-batches").len(), 1);
    assert_eq!(receiver.requests("/ok-jobs").len(), 1);
    webhooks.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_refuses_internal_and_non_https_urls() {
    // No allow list: loopback is as forbidden as the rest.
    let fixture = Fixture::spawn("webhooks-policy", false).await;
    for (url, why) in [
        ("http://10.0.0.1/x", "scheme"),
        ("https://10.0.0.1/x", "private"),
        ("https://127.0.0.1/x", "loopback"),
        ("https://169.254.169.254/", "link-local"),
        ("https://[::1]/x", "loopback"),
        ("https://[::ffff:192.168.1.1]/x", "private"),
        ("https://localhost:8443/x", "loopback"),
        ("ftp://x", "scheme"),
        ("https://user:secret@example.com/x", "user name"),
        ("not a url", "valid URL"),
    ] {
        let (status, body) = fixture.register(url, &["job.failed"]).await;
        assert_eq!(status, 400, "{url}: {body}");
        assert_eq!(body["error"]["code"], "invalid_parameter", "{url}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{url}: {message}");
    }
    let (status, body) = fixture
        .register("https://example.com/x", &["batch.done"])
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("invalid_parameter"))
    );
    let (status, body) = fixture.register("https://example.com/x", &[]).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("invalid_parameter"))
    );
    // Without DNS at registration, a public name is accepted; 16 per tenant at most.
    for n in 0..16 {
        fixture
            .register_ok(&format!("https://hooks.example.com/{n}"), &["batch.failed"])
            .await;
    }
    let (status, body) = fixture
        .register("https://hooks.example.com/16", &["batch.failed"])
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("16"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_jobs_that_ask_send_their_end_events() {
    let fixture = Fixture::spawn("webhooks-ends", true).await;
    let receiver = Receiver::start().await;
    let app = fixture.app();
    let endpoint = fixture
        .register_ok(
            &receiver.url("/ok-ends"),
            &["batch.completed", "job.succeeded", "job.failed"],
        )
        .await;
    let worker = InProcessWorker::spawn(&app.ns, tiny_model_dir()).await;
    let key = app.key(TENANT).await;

    // A job that asks for its event, and one that does not.
    let asked = app
        .submit_ok(
            &key,
            &chat("Say hi.", json!({"max_tokens": 4, "webhook": true})),
        )
        .await;
    let quiet = app
        .submit_ok(&key, &chat("Say hi.", json!({"max_tokens": 4})))
        .await;
    app.wait_terminal(&key, &quiet, Duration::from_secs(60))
        .await;
    let request = receiver
        .wait_requests("/ok-ends", 1, Duration::from_secs(30))
        .await
        .remove(0);
    let body: Value = serde_json::from_slice(&request.body).expect("JSON");
    assert_eq!(body["type"], "job.succeeded", "{body}");
    assert_eq!(body["data"]["id"], asked.as_str(), "{body}");
    assert_eq!(body["data"]["status"], "succeeded", "{body}");
    let secret = endpoint["secret"].as_str().expect("secret");
    assert_eq!(
        header(&request, "webhook-signature"),
        expected_signature(secret, &request)
    );

    // A batch's end.
    let model: Value = app
        .http
        .get(format!("{}/v1/models", app.base))
        .bearer_auth(&key)
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let model = model["data"][0]["id"].as_str().expect("model");
    let line = json!({
        "custom_id": "one", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    });
    let boundary = "webhook-test-boundary";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n\
         {line}\r\n--{boundary}--\r\n"
    );
    let file: Value = app
        .http
        .post(format!("{}/v1/files", app.base))
        .bearer_auth(&key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(form)
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("json");
    let batch: Value = app
        .http
        .post(format!("{}/v1/batches", app.base))
        .bearer_auth(&key)
        .json(
            &json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                      "completion_window": "1h"}),
        )
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let requests = receiver
        .wait_requests("/ok-ends", 2, Duration::from_secs(60))
        .await;
    let body: Value = serde_json::from_slice(&requests[1].body).expect("JSON");
    assert_eq!(body["type"], "batch.completed", "{body}");
    assert_eq!(body["data"]["id"], batch["id"], "{body}");
    // Nothing for the quiet job, nor twice for the others.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.requests("/ok-ends").len(), 2);
    worker.stop().await;
}
