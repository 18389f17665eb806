//! Helpers for Sluice's integration tests: every test gets its own namespace (queues, exchanges
//! and Redis keys), its own API on port 0, and workers in-process or as real processes, all
//! against the real RabbitMQ and Redis.
//!
//! Files: `lib.rs` (URLs, namespaces, waiting, ports, temp dirs), `models.rs` (models and
//! binaries), `app.rs` (the API and its requests), `workers.rs`, `backends.rs` (broker and
//! store), `servers.rs` (own Redis and RabbitMQ), `load.rs` (load generator and log checks).

mod app;
mod backends;
mod load;
mod models;
mod redis;
mod servers;
mod workers;

pub use app::{
    NO_IP_LIMITS, TestApp, chat, read_to_end, sample, scrape, status_and_json, unlimited_tenant,
};
pub use backends::{Backends, delete_namespace_keys, job_record_keys};
pub use load::{
    Load, LoadReport, SUBMIT_TIMEOUT, Submission, await_terminal_once, jobs_started, log_lines,
    rss_kib,
};
pub use models::{real_model_path, tiny_model_dir, workspace_bin};
pub use redis::{TestRedis, TestRedisExt, connect_redis, is_cluster_url, on_cluster, redis_url};
pub use servers::{RabbitNode, RedisServer};
pub use workers::{InProcessWorker, WorkerProcess};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The URLs of the test Redis Cluster's nodes (`SLUICE_TEST_REDIS_CLUSTER`, comma-separated:
/// `scripts/redis-cluster start` prints them, and `scripts/test` exports them); a test that
/// needs the cluster fails without it.
pub fn cluster_urls() -> String {
    std::env::var("SLUICE_TEST_REDIS_CLUSTER").expect(
        "SLUICE_TEST_REDIS_CLUSTER names no Redis Cluster: start one with \
         `scripts/redis-cluster start` and export what it prints (scripts/test does both)",
    )
}

/// A namespace no other test (or test run) uses.
pub fn unique_namespace(tag: &str) -> String {
    format!(
        "t-{tag}-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
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
