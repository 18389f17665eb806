//! The Redis connection pool, with timeouts so an outage answers fast instead of hanging, over
//! one Redis server or a Redis Cluster.
//!
//! **One server.** deadpool-redis's manager checks every connection on every checkout with a
//! `PING` round trip. A request that takes a connection four times (auth, tenant policy, rate
//! limit, admission) paid four extra round trips for it: under the submit benchmark, `PING` was
//! the most frequent command Redis served. [`Manager`] wraps deadpool-redis's and skips the
//! check for a connection that was checked or used within the last second and has not failed
//! since; a connection whose command failed at the transport level (dropped, I/O error,
//! timeout) is discarded at its next checkout instead of being pinged, so a Redis restart still
//! replaces every connection.
//!
//! **A cluster.** redis-rs's cluster connection is itself multiplexed over one connection per
//! node and follows `MOVED`/`ASK` redirections and failovers, so the pool holds one and hands
//! out clones of it. A command, a script or a pipeline must name keys of one hash slot; the
//! keyspace ([`crate::keyspace`]) puts what one script touches under one hash tag, and
//! [`query_each`] runs commands on keys of different slots.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{self, Metrics, Object, RecycleError, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::OnceCell;

use sluice_shared::settings::Secret;

/// Why a connection could not be had (timeout, or Redis unreachable).
pub type PoolError = managed::PoolError<RedisError>;
/// Why a pool could not be built (a malformed URL).
#[derive(Debug, thiserror::Error)]
pub enum CreatePoolError {
    #[error("invalid Redis URL: {0}")]
    Url(RedisError),
    #[error("cannot build the Redis pool: {0}")]
    Build(#[from] managed::BuildError),
}

/// A connection that was checked or used this recently is handed out without a `PING`.
const TRUSTED_FOR: Duration = Duration::from_secs(1);
/// How long a connect, a checkout or a command may take before it fails.
const TIMEOUT: Duration = Duration::from_secs(2);

/// A pooled connection and whether a command on it failed at the transport level.
pub struct Tracked {
    conn: MultiplexedConnection,
    broken: bool,
}

/// deadpool-redis's manager, without the per-checkout `PING` for connections in use.
pub struct Manager {
    inner: deadpool_redis::Manager,
}

impl managed::Manager for Manager {
    type Type = Tracked;
    type Error = RedisError;

    async fn create(&self) -> Result<Tracked, RedisError> {
        Ok(Tracked {
            conn: managed::Manager::create(&self.inner).await?,
            broken: false,
        })
    }

    async fn recycle(&self, obj: &mut Tracked, metrics: &Metrics) -> RecycleResult<RedisError> {
        if obj.broken {
            return Err(RecycleError::message("a command failed on this connection"));
        }
        if metrics.last_used() < TRUSTED_FOR {
            return Ok(());
        }
        managed::Manager::recycle(&self.inner, &mut obj.conn, metrics).await
    }
}

/// A connection to one Redis server, checked out of the pool.
pub struct SingleConnection {
    obj: Object<Manager>,
}

impl From<Object<Manager>> for SingleConnection {
    fn from(obj: Object<Manager>) -> Self {
        Self { obj }
    }
}

impl Deref for SingleConnection {
    type Target = MultiplexedConnection;

    fn deref(&self) -> &MultiplexedConnection {
        &self.obj.conn
    }
}

impl DerefMut for SingleConnection {
    fn deref_mut(&mut self) -> &mut MultiplexedConnection {
        &mut self.obj.conn
    }
}

/// The pool: one server's connections, or one cluster connection (made at the first `get`).
#[derive(Clone)]
pub struct Pool {
    inner: PoolInner,
}

#[derive(Clone)]
enum PoolInner {
    Single(managed::Pool<Manager, SingleConnection>),
    Cluster {
        client: Arc<ClusterClient>,
        conn: Arc<OnceCell<ClusterConnection>>,
    },
}

impl Pool {
    /// A connection, waiting at most two seconds for one.
    pub async fn get(&self) -> Result<Connection, PoolError> {
        match &self.inner {
            PoolInner::Single(pool) => Ok(Connection::Single(pool.get().await?)),
            PoolInner::Cluster { client, conn } => {
                let c = conn
                    .get_or_try_init(|| async {
                        match tokio::time::timeout(TIMEOUT, client.get_async_connection()).await {
                            Ok(r) => r,
                            Err(_) => Err(RedisError::from(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no answer from the Redis Cluster",
                            ))),
                        }
                    })
                    .await
                    .map_err(PoolError::Backend)?;
                Ok(Connection::Cluster(c.clone()))
            }
        }
    }

    /// Whether this pool talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner, PoolInner::Cluster { .. })
    }
}

/// A connection checked out of the pool; use it like any async Redis connection.
pub enum Connection {
    Single(SingleConnection),
    Cluster(ClusterConnection),
}

/// Errors after which the connection must not be reused.
fn breaks_connection(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => Box::pin(async move {
                let result = c.obj.conn.req_packed_command(cmd).await;
                if let Err(e) = &result {
                    c.obj.broken |= breaks_connection(e);
                }
                result
            }),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => Box::pin(async move {
                let result = c.obj.conn.req_packed_commands(cmd, offset, count).await;
                if let Err(e) = &result {
                    c.obj.broken |= breaks_connection(e);
                }
                result
            }),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.obj.conn.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection of its own, outside the pool (for a blocking read, or a test's assertions): to
/// one server, or to a cluster. Clones share it.
#[derive(Clone)]
pub enum DirectConnection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for DirectConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            DirectConnection::Single(c) => c.req_packed_command(cmd),
            DirectConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            DirectConnection::Single(c) => c.req_packed_commands(cmd, offset, count),
            DirectConnection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            DirectConnection::Single(c) => c.get_db(),
            DirectConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// Runs commands whose keys may lie in different hash slots and returns their replies in
/// order: one pipelined round trip on one server; on a cluster, each command on its own, all at
/// once (redis-rs sends each to its slot's primary). Not atomic either way.
pub async fn query_each<T: FromRedisValue>(
    conn: &mut Connection,
    cmds: Vec<Cmd>,
) -> Result<Vec<T>, RedisError> {
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    match conn {
        Connection::Single(_) => {
            let mut pipe = redis::pipe();
            for cmd in cmds {
                pipe.add_command(cmd);
            }
            pipe.query_async(conn).await
        }
        Connection::Cluster(c) => {
            let c = c.clone();
            futures_util::future::try_join_all(cmds.into_iter().map(|cmd| {
                let mut c = c.clone();
                async move { cmd.query_async::<T>(&mut c).await }
            }))
            .await
        }
    }
}

/// A pool over the one Redis server at `url`.
pub fn create_pool(url: &Secret, max_size: usize) -> Result<Pool, CreatePoolError> {
    create_pool_for(url, false, max_size)
}

/// A pool over one server (`cluster` false: `url` is its URL) or over a Redis Cluster
/// (`url` holds the URLs of some of its nodes, separated by commas; any one that answers is
/// enough to find the rest).
pub fn create_pool_for(
    url: &Secret,
    cluster: bool,
    max_size: usize,
) -> Result<Pool, CreatePoolError> {
    if cluster {
        let urls: Vec<&str> = url
            .expose()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let client = ClusterClient::builder(urls)
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            .build()
            .map_err(CreatePoolError::Url)?;
        return Ok(Pool {
            inner: PoolInner::Cluster {
                client: Arc::new(client),
                conn: Arc::new(OnceCell::new()),
            },
        });
    }
    let inner = deadpool_redis::Manager::new(url.expose()).map_err(CreatePoolError::Url)?;
    let timeout = Some(TIMEOUT);
    Ok(Pool {
        inner: PoolInner::Single(
            managed::Pool::builder(Manager { inner })
                .max_size(max_size)
                .wait_timeout(timeout)
                .create_timeout(timeout)
                .recycle_timeout(timeout)
                .runtime(Runtime::Tokio1)
                .build()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_break_a_connection_and_replies_do_not() {
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert!(breaks_connection(&io));
        let reply = RedisError::from((redis::ErrorKind::UnexpectedReturnType, "a type mismatch"));
        assert!(!breaks_connection(&reply));
    }

    #[test]
    fn a_malformed_url_is_an_error_not_a_panic() {
        assert!(matches!(
            create_pool(&Secret::new("not a url"), 1),
            Err(CreatePoolError::Url(_))
        ));
    }
}
