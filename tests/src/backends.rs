//! Direct access to a namespace's queues, exchanges and Redis keys, and their cleanup.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use sluice_jobs::Keyspace;

use crate::{AMQP_URL, TestRedis, TestRedisExt, connect_redis, redis_url, wait_for};

/// Direct access to the broker and the store of one namespace, for assertions.
pub struct Backends {
    pub ks: Keyspace,
    pub amqp: lapin::Connection,
    pub channel: lapin::Channel,
    pub redis: TestRedis,
    redis_url: String,
    amqp_url: String,
    /// Set by [`Backends::cleanup`]; otherwise (a test that failed or returned early) the
    /// namespace is cleaned up when the fixture is dropped.
    cleaned: bool,
}

impl Backends {
    pub async fn connect(ns: &str) -> Self {
        Self::connect_on(ns, &redis_url(), AMQP_URL).await
    }

    /// Connects to the given Redis and broker (dedicated ones a test restarts).
    pub async fn connect_on(ns: &str, redis_url: &str, amqp_url: &str) -> Self {
        let amqp = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
            .await
            .expect("amqp");
        let channel = amqp.create_channel().await.expect("channel");
        let ks = Keyspace::new(ns).with_queue_shards(queue_shards());
        sluice_jobs::amqp::declare_topology(
            &channel,
            &ks,
            sluice_jobs::amqp::QueueSettings::for_max_attempts(3),
        )
        .await
        .expect("topology");
        let redis = connect_redis(redis_url).await.expect("redis");
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
        self.redis
            .keys(&format!("{}:job:*", self.ks.namespace()))
            .await
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
            .arg(self.ks.job(&id.parse().expect("a job id")))
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
async fn remove_namespace(ks: &Keyspace, channel: &lapin::Channel, redis: &mut TestRedis) {
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
    // Every API declares the webhook topology when its delivery consumer starts; how many
    // retry queues depends on its `--webhook-retry-delays` (deleting one that is not there is
    // a no-op).
    let retries =
        (1..=sluice_api::webhooks::settings::MAX_RETRIES).map(|n| ks.webhooks_retry_queue(n));
    for q in [ks.webhooks_queue(), ks.webhooks_dead_queue()]
        .into_iter()
        .chain(retries)
    {
        let delete = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default());
        let _ = tokio::time::timeout(CLEANUP_STEP, delete).await;
    }
    let delete = channel.exchange_delete(
        ks.webhooks_exchange().as_str().into(),
        lapin::options::ExchangeDeleteOptions::default(),
    );
    let _ = tokio::time::timeout(CLEANUP_STEP, delete).await;
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
                    let mut redis = connect_redis(&redis_url).await.ok()?;
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

/// Deletes every Redis key of a namespace (best effort: a test's cleanup).
pub async fn delete_namespace_keys(redis: &mut TestRedis, ns: &str) {
    let keys = redis.keys(&format!("{ns}:*")).await;
    redis.delete(keys).await;
}

/// Job records (not event streams) of a namespace.
pub async fn job_record_keys(redis: &mut TestRedis, ns: &str) -> Vec<String> {
    let keys = redis.keys(&format!("{ns}:job:*")).await;
    keys.into_iter()
        .filter(|k| !k.ends_with(":events"))
        .collect()
}

/// The queue shard count that the APIs and workers of this run use: `SLUICE_QUEUE_SHARDS`,
/// which they read too, else 1.
pub fn queue_shards() -> u16 {
    std::env::var("SLUICE_QUEUE_SHARDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}
