//! Which Redis the tests run against, and a direct connection to it for assertions.
//!
//! By default every stack of a test uses the shared Redis server ([`crate::REDIS_URL`]). With
//! `SLUICE_TEST_REDIS=cluster` they use the test Redis Cluster instead ([`crate::cluster_urls`]):
//! APIs and workers get `--redis-cluster`, and [`TestRedis`] reads through a cluster
//! connection. `scripts/test` runs the spine, security, idempotency, quota, fault and
//! streaming suites a second time that way.

use redis::{Cmd, FromRedisValue};
pub use sluice_jobs::redis_pool::DirectConnection;

/// Whether this run's stacks use the test Redis Cluster.
pub fn on_cluster() -> bool {
    std::env::var("SLUICE_TEST_REDIS").as_deref() == Ok("cluster")
}

/// The Redis URL (or the cluster's node URLs) this run's stacks use.
pub fn redis_url() -> String {
    if on_cluster() {
        crate::cluster_urls()
    } else {
        crate::REDIS_URL.to_string()
    }
}

/// Whether a Redis URL setting names a cluster (several node URLs).
pub fn is_cluster_url(url: &str) -> bool {
    url.contains(',')
}

/// A direct connection for assertions: to one server, or to the test cluster.
pub type TestRedis = DirectConnection;

/// Connects to `url`: the test cluster if it holds several node URLs.
pub async fn connect_redis(url: &str) -> redis::RedisResult<TestRedis> {
    if is_cluster_url(url) {
        let nodes: Vec<&str> = url.split(',').collect();
        return Ok(TestRedis::Cluster(
            redis::cluster::ClusterClient::new(nodes)?
                .get_async_connection()
                .await?,
        ));
    }
    Ok(TestRedis::Single(
        redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?,
    ))
}

/// What the tests do on either kind of Redis that differs between the two.
#[allow(async_fn_in_trait)]
pub trait TestRedisExt {
    /// `KEYS pattern`, on every node of the test cluster.
    async fn keys(&mut self, pattern: &str) -> Vec<String>;
    /// Deletes keys (one `DEL` on one server, one per key on a cluster); best effort.
    async fn delete(&mut self, keys: Vec<String>);
    /// Runs commands whose keys may lie in different slots: one pipeline on one server, one
    /// after another on a cluster. Replies in order.
    async fn each<T: FromRedisValue>(&mut self, cmds: Vec<Cmd>) -> redis::RedisResult<Vec<T>>;
}

impl TestRedisExt for TestRedis {
    async fn keys(&mut self, pattern: &str) -> Vec<String> {
        match self {
            Self::Single(c) => redis::cmd("KEYS")
                .arg(pattern)
                .query_async(c)
                .await
                .unwrap_or_default(),
            Self::Cluster(_) => {
                let mut all = Vec::new();
                for url in crate::cluster_urls().split(',') {
                    let Ok(client) = redis::Client::open(url) else {
                        continue;
                    };
                    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                        continue;
                    };
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(pattern)
                        .query_async(&mut c)
                        .await
                        .unwrap_or_default();
                    all.extend(keys);
                }
                // A replica lists its primary's keys too.
                all.sort();
                all.dedup();
                all
            }
        }
    }

    async fn delete(&mut self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        match self {
            Self::Single(c) => {
                let _ = redis::cmd("DEL").arg(keys).query_async::<()>(c).await;
            }
            Self::Cluster(c) => {
                for key in keys {
                    let _ = redis::cmd("DEL").arg(key).query_async::<()>(c).await;
                }
            }
        }
    }

    async fn each<T: FromRedisValue>(&mut self, cmds: Vec<Cmd>) -> redis::RedisResult<Vec<T>> {
        match self {
            Self::Single(c) => {
                if cmds.is_empty() {
                    return Ok(Vec::new());
                }
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query_async(c).await
            }
            Self::Cluster(c) => {
                let mut out = Vec::with_capacity(cmds.len());
                for cmd in cmds {
                    out.push(cmd.query_async(c).await?);
                }
                Ok(out)
            }
        }
    }
}
