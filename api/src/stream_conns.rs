//! Redis connections for event streams, kept for reuse.
//!
//! An event stream waits in `XREAD BLOCK`, which holds its connection until the read returns,
//! so streams can't share the API's pooled connections. Opening a connection per stream cost
//! a TCP connect and a round trip of handshake on every `GET /v1/jobs/{id}/events`; instead a
//! connection goes back to this pool when its stream ends, but only if its last command
//! completed: a stream dropped while its read was blocked (the client went away) leaves the
//! read pending on the server, and the next user of that connection would wait behind it, so
//! that connection is closed. A failed command closes the connection and empties the pool (a
//! Redis restart breaks every idle connection at once).
//!
//! On a Redis Cluster a stream's connection is a cluster connection of its own (one socket per
//! node, following `MOVED` and failovers), kept for reuse the same way.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::{FromRedisValue, RedisResult};
use sluice_jobs::redis_pool::DirectConnection as StreamConn;

/// Idle connections kept at most.
const MAX_IDLE: usize = 64;

/// The default response timeout (500 ms) is shorter than a blocking read.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where stream connections go: one server, or a cluster.
pub enum StreamTarget {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
}

impl StreamTarget {
    /// From the Redis URL setting: one server's URL, or (`cluster`) some of a cluster's node
    /// URLs separated by commas.
    pub fn from_url(url: &str, cluster: bool) -> RedisResult<Self> {
        if cluster {
            let nodes: Vec<&str> = url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect();
            return Ok(Self::Cluster(Box::new(
                ClusterClient::builder(nodes)
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()?,
            )));
        }
        Ok(Self::Single(redis::Client::open(url)?))
    }
}

/// Hands out dedicated connections for blocking stream reads.
pub struct StreamConnections {
    target: StreamTarget,
    idle: Mutex<Vec<StreamConn>>,
}

impl std::fmt::Debug for StreamConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConnections")
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl StreamConnections {
    pub fn new(client: redis::Client) -> Arc<Self> {
        Self::to(StreamTarget::Single(client))
    }

    pub fn to(target: StreamTarget) -> Arc<Self> {
        Arc::new(Self {
            target,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection, or a new one.
    pub async fn get(self: &Arc<Self>) -> RedisResult<StreamConnection> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => self.open().await?,
        };
        Ok(StreamConnection {
            conn: Some(conn),
            home: Arc::clone(self),
            reusable: true,
        })
    }

    async fn open(&self) -> RedisResult<StreamConn> {
        Ok(match &self.target {
            StreamTarget::Single(client) => {
                let mut conn = client.get_multiplexed_async_connection().await?;
                conn.set_response_timeout(RESPONSE_TIMEOUT);
                StreamConn::Single(conn)
            }
            StreamTarget::Cluster(client) => {
                StreamConn::Cluster(client.get_async_connection().await?)
            }
        })
    }

    /// Connections waiting for reuse.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }

    fn put_back(&self, conn: StreamConn) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(conn);
        }
    }

    fn forget_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

/// One stream's connection; back to the pool when dropped, if its last command completed.
pub struct StreamConnection {
    conn: Option<StreamConn>,
    home: Arc<StreamConnections>,
    reusable: bool,
}

impl StreamConnection {
    /// Runs `cmd`. After a failure the connection is replaced by a new one (so the stream's
    /// next command can succeed once Redis is back); if that can't be opened either, the next
    /// command tries again.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        let conn = match self.conn.as_mut() {
            Some(conn) => conn,
            None => self.conn.insert(self.home.open().await?),
        };
        // Not reusable while the command is in flight: a drop here (the stream's future
        // cancelled) closes the connection.
        self.reusable = false;
        let result = cmd.query_async(conn).await;
        match &result {
            Ok(_) => self.reusable = true,
            Err(_) => {
                self.conn = None;
                self.reusable = true;
                self.home.forget_idle();
            }
        }
        result
    }
}

impl Drop for StreamConnection {
    fn drop(&mut self) {
        if self.reusable
            && let Some(conn) = self.conn.take()
        {
            self.home.put_back(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_url() -> &'static str {
        "redis://127.0.0.1:6379"
    }

    async fn client_id(c: &mut StreamConnection) -> i64 {
        c.query(&redis::cmd("CLIENT").arg("ID").to_owned())
            .await
            .expect("CLIENT ID")
    }

    #[tokio::test]
    async fn a_finished_connection_is_reused_and_a_cancelled_read_is_not() {
        let pool = StreamConnections::new(redis::Client::open(redis_url()).expect("client"));
        let mut a = pool.get().await.expect("connection");
        let first = client_id(&mut a).await;
        drop(a);
        assert_eq!(pool.idle_count(), 1);
        let mut b = pool.get().await.expect("connection");
        assert_eq!(
            client_id(&mut b).await,
            first,
            "the idle connection is handed out again"
        );

        // A read cancelled while it blocks: the connection is not put back.
        let key = format!("sluice-test:stream-conns:{}", uuid::Uuid::now_v7());
        let read = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(2000)
            .arg("STREAMS")
            .arg(&key)
            .arg("$")
            .to_owned();
        let blocked = tokio::time::timeout(
            Duration::from_millis(100),
            b.query::<Option<redis::Value>>(&read),
        )
        .await;
        assert!(blocked.is_err(), "the read is still blocked when cancelled");
        drop(b);
        assert_eq!(
            pool.idle_count(),
            0,
            "a connection with a pending read is closed"
        );
        let mut c = pool.get().await.expect("connection");
        assert_ne!(client_id(&mut c).await, first, "a new connection");
    }

    #[tokio::test]
    async fn a_failed_command_replaces_the_connection() {
        let pool = StreamConnections::new(redis::Client::open(redis_url()).expect("client"));
        let mut a = pool.get().await.expect("connection");
        let first = client_id(&mut a).await;
        // Closes this connection from the server side, as a Redis restart would.
        let mut killer = pool.open().await.expect("connection");
        let _: () = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(first)
            .query_async(&mut killer)
            .await
            .expect("CLIENT KILL");
        let failed: RedisResult<String> = a.query(&redis::cmd("PING").to_owned()).await;
        assert!(failed.is_err(), "the killed connection fails");
        let second = client_id(&mut a).await;
        assert_ne!(second, first, "the stream goes on with a new connection");
        drop(a);
        assert_eq!(pool.idle_count(), 1);
    }
}
