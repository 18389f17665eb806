//! A Redis server and a RabbitMQ node of a test's own, to kill and restart.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{TempDir, free_port, wait_for};

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
