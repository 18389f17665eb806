//! The Redis connection pool, with timeouts so an outage answers fast instead of hanging.
//!
//! deadpool-redis's manager checks every connection on every checkout with a `PING` round trip.
//! A request that takes a connection four times (auth, tenant policy, rate limit, admission)
//! paid four extra round trips for it: under the submit benchmark, `PING` was the most frequent
//! command Redis served. [`Manager`] wraps deadpool-redis's and skips the check for a
//! connection that was checked or used within the last second and has not failed since; a
//! connection whose command failed at the transport level (dropped, I/O error, timeout) is
//! discarded at its next checkout instead of being pinged, so a Redis restart still replaces
//! every connection.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{self, Metrics, Object, RecycleError, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use sluice_shared::settings::Secret;

/// A pool of multiplexed Redis connections.
pub type Pool = managed::Pool<Manager, Connection>;
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

/// A connection checked out of the pool; use it like any async Redis connection.
pub struct Connection {
    obj: Object<Manager>,
}

impl From<Object<Manager>> for Connection {
    fn from(obj: Object<Manager>) -> Self {
        Self { obj }
    }
}

impl Deref for Connection {
    type Target = MultiplexedConnection;

    fn deref(&self) -> &MultiplexedConnection {
        &self.obj.conn
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut MultiplexedConnection {
        &mut self.obj.conn
    }
}

/// Errors after which the connection must not be reused.
fn breaks_connection(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.obj.conn.req_packed_command(cmd).await;
            if let Err(e) = &result {
                self.obj.broken |= breaks_connection(e);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.obj.conn.req_packed_commands(cmd, offset, count).await;
            if let Err(e) = &result {
                self.obj.broken |= breaks_connection(e);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.obj.conn.get_db()
    }
}

/// Builds a pool. No connection is made until the first `get`, so a process starts (and reports
/// not-ready) while Redis is down.
pub fn create_pool(url: &Secret, max_size: usize) -> Result<Pool, CreatePoolError> {
    let inner = deadpool_redis::Manager::new(url.expose()).map_err(CreatePoolError::Url)?;
    let timeout = Some(Duration::from_secs(2));
    Ok(Pool::builder(Manager { inner })
        .max_size(max_size)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout)
        .runtime(Runtime::Tokio1)
        .build()?)
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
