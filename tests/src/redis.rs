//! Which Redis the tests run against, and a direct connection to it for assertions.
//!
//! By default every stack of a test uses the shared Redis server ([`crate::REDIS_URL`]). With
//! `SLUICE_TEST_REDIS=cluster` they use the test Redis Cluster instead ([`crate::cluster_urls`]):
//! APIs and workers get `--redis-cluster`, and [`TestRedis`] reads through a cluster
//! connection. `scripts/test` runs the spine, security, idempotency, quota, fault and
//! streaming suites a second time that way.

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Value};

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

/// A direct connection: to one server, or to a cluster (with its nodes' URLs, to reach every
/// node where a command must).
#[derive(Clone)]
pub enum TestRedis {
    Single(MultiplexedConnection),
    Cluster {
        conn: ClusterConnection,
        nodes: Vec<String>,
    },
}

impl TestRedis {
    /// Connects to `url`: a cluster if it holds several node URLs.
    pub async fn connect(url: &str) -> redis::RedisResult<Self> {
        if is_cluster_url(url) {
            let nodes: Vec<String> = url.split(',').map(str::to_string).collect();
            let conn = redis::cluster::ClusterClient::new(nodes.clone())?
                .get_async_connection()
                .await?;
            return Ok(Self::Cluster { conn, nodes });
        }
        Ok(Self::Single(
            redis::Client::open(url)?
                .get_multiplexed_async_connection()
                .await?,
        ))
    }

    /// `KEYS pattern`, on every node of a cluster.
    pub async fn keys(&mut self, pattern: &str) -> Vec<String> {
        match self {
            Self::Single(c) => redis::cmd("KEYS")
                .arg(pattern)
                .query_async(c)
                .await
                .unwrap_or_default(),
            Self::Cluster { nodes, .. } => {
                let mut all = Vec::new();
                for url in nodes.iter() {
                    let Ok(client) = redis::Client::open(url.as_str()) else {
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

    /// Deletes keys (one `DEL` on one server, one per key on a cluster); best effort.
    pub async fn delete(&mut self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        match self {
            Self::Single(c) => {
                let _ = redis::cmd("DEL").arg(keys).query_async::<()>(c).await;
            }
            Self::Cluster { conn, .. } => {
                for key in keys {
                    let _ = redis::cmd("DEL").arg(key).query_async::<()>(conn).await;
                }
            }
        }
    }

    /// Runs commands whose keys may lie in different slots: one pipeline on one server, one
    /// after another on a cluster. Replies in order.
    pub async fn each<T: FromRedisValue>(&mut self, cmds: Vec<Cmd>) -> redis::RedisResult<Vec<T>> {
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
            Self::Cluster { conn, .. } => {
                let mut out = Vec::with_capacity(cmds.len());
                for cmd in cmds {
                    out.push(cmd.query_async(conn).await?);
                }
                Ok(out)
            }
        }
    }
}

impl ConnectionLike for TestRedis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster { conn, .. } => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster { conn, .. } => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster { conn, .. } => conn.get_db(),
        }
    }
}
