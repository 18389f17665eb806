//! RabbitMQ: connecting, the job topology, and a confirming publisher that reconnects.
//!
//! Topology (all durable, names from [`Keyspace`]):
//! - `{ns}.jobs` (direct exchange) → `{ns}.jobs.interactive` and `{ns}.jobs.batch` (quorum
//!   queues, routing keys `interactive` and `batch`: quorum queues have no priorities, so each
//!   class has its queue and workers take batch jobs only when no interactive job waits), each
//!   with `x-delivery-limit`, `x-max-length` + `x-overflow: reject-publish`, and
//!   `x-dead-letter-exchange: {ns}.dlx`;
//! - `{ns}.dlx` (fanout) → `{ns}.jobs.dead` (quorum queue): workers consume it and fail the
//!   job each dead letter carries (`failed / dead_lettered`, with the broker's reason), so no
//!   client waits on a job the broker gave up on.
//!
//! Every process declares the same topology with the same arguments, so whichever starts first
//! creates it and a broker restart loses nothing (durable queues, persistent messages).

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

use crate::keyspace::Keyspace;
use sluice_proto::{JobMessage, Priority};
use sluice_shared::settings::Secret;

/// How long connecting (TCP + AMQP handshake) may take before it counts as an outage.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a publish may wait for the broker's confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(String),
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
    #[error("declaring the job topology failed: {0}")]
    Topology(lapin::Error),
    #[error("publishing failed: {0}")]
    Publish(lapin::Error),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ could not route the message to a queue")]
    Unroutable,
}

/// Queue arguments; they must be identical in every process that declares the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// Broker-side redelivery limit: a backstop behind the worker's own attempt count.
    pub delivery_limit: u32,
    /// Broker-side cap on queued messages; past it publishes are nacked (`reject-publish`).
    pub max_length: u64,
}

impl QueueSettings {
    /// The broker limit sits above the application's attempt limit, so the worker normally
    /// sees the last attempt and fails the job visibly instead of the broker dropping it.
    pub fn for_max_attempts(max_attempts: u32) -> Self {
        Self {
            delivery_limit: max_attempts + 2,
            max_length: 1_000_000,
        }
    }
}

/// Connects with a timeout, naming the connection for the management UI.
pub async fn connect(url: &Secret, connection_name: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(connection_name.to_string()));
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url.expose(), props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(AmqpError::Connect(e.to_string())),
        Err(_) => Err(AmqpError::Timeout(CONNECT_TIMEOUT)),
    }
}

fn str_arg(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.to_string()))
}

/// Declares the exchanges and queues of the job topology (idempotent).
pub async fn declare_topology(
    channel: &Channel,
    ks: &Keyspace,
    settings: QueueSettings,
) -> Result<(), AmqpError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let queue_opts = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let declare = async {
        channel
            .exchange_declare(
                ks.dead_letter_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), str_arg("quorum"));
        channel
            .queue_declare(ks.dead_letter_queue().into(), queue_opts, dead_args)
            .await?;
        channel
            .queue_bind(
                ks.dead_letter_queue().into(),
                ks.dead_letter_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        channel
            .exchange_declare(
                ks.jobs_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), str_arg("quorum"));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(settings.delivery_limit)),
        );
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(settings.max_length as i64),
        );
        args.insert("x-overflow".into(), str_arg("reject-publish"));
        args.insert(
            "x-dead-letter-exchange".into(),
            str_arg(&ks.dead_letter_exchange()),
        );
        for priority in Priority::ALL {
            channel
                .queue_declare(ks.jobs_queue_for(priority).into(), queue_opts, args.clone())
                .await?;
            channel
                .queue_bind(
                    ks.jobs_queue_for(priority).into(),
                    ks.jobs_exchange().into(),
                    priority.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok::<(), lapin::Error>(())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, declare).await {
        Ok(result) => result.map_err(AmqpError::Topology),
        Err(_) => Err(AmqpError::Timeout(CONNECT_TIMEOUT)),
    }
}

/// The AMQP properties of a job message: persistent, message id = job id, JSON, trace headers.
pub fn job_properties(job: &JobMessage) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(tp) = &job.trace.traceparent {
        headers.insert("traceparent".into(), str_arg(tp));
    }
    if let Some(ts) = &job.trace.tracestate {
        headers.insert("tracestate".into(), str_arg(ts));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(job.id.to_string()))
        .with_timestamp(job.created_at / 1000)
        .with_headers(headers)
}

/// Why the broker dead-lettered a message: the first entry of RabbitMQ's `x-death` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// `rejected` (a consumer nacked it without requeue), `delivery_limit` (a quorum queue's
    /// `x-delivery-limit`), `expired` or `maxlen`.
    pub reason: String,
    /// The queue it died in.
    pub queue: String,
    /// How many times it died there for that reason.
    pub count: u64,
}

/// Reads the `x-death` header of a dead-lettered message, if it has one.
pub fn death_of(properties: &BasicProperties) -> Option<Death> {
    let headers = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let text = |field: &str| match first.inner().get(field) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_string(),
        _ => String::new(),
    };
    let count = match first.inner().get("count") {
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        _ => 0,
    };
    Some(Death {
        reason: text("reason"),
        queue: text("queue"),
        count,
    })
}

struct Link {
    connection: Connection,
    channel: Channel,
}

/// One connection with a confirm-mode channel on it, opened on first use and again after it
/// died (the caller's topology declared on every new channel), and publishing on it with the
/// broker's confirm. The job [`Publisher`] holds one; so does the API's webhook queue.
pub struct ConfirmingLink {
    url: Secret,
    connection_name: String,
    link: Mutex<Option<Link>>,
}

impl ConfirmingLink {
    /// Creates the link without connecting.
    pub fn new(url: Secret, connection_name: String) -> Self {
        Self {
            url,
            connection_name,
            link: Mutex::new(None),
        }
    }

    pub fn url(&self) -> &Secret {
        &self.url
    }

    /// A usable channel, reconnecting if the last one died; `declare` runs on every new
    /// channel before it is used.
    pub async fn channel<F, Fut>(&self, declare: F) -> Result<Channel, AmqpError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<(), AmqpError>>,
    {
        let mut link = self.link.lock().await;
        if let Some(l) = link.as_ref()
            && l.connection.status().connected()
            && l.channel.status().connected()
        {
            return Ok(l.channel.clone());
        }
        *link = None;
        let connection = connect(&self.url, &self.connection_name).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| AmqpError::Connect(e.to_string()))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| AmqpError::Connect(e.to_string()))?;
        declare(channel.clone()).await?;
        *link = Some(Link {
            connection,
            channel: channel.clone(),
        });
        Ok(channel)
    }

    /// Publishes one persistent, `mandatory` message on `channel` (from [`Self::channel`])
    /// and waits for the broker's confirm: `Ok` means a durable queue holds it; any error
    /// means it is not enqueued. A failure that may have left the link broken drops it, so
    /// the next publish reconnects and declares the topology again (a queue deleted under a
    /// live channel is unroutable until then).
    pub async fn publish(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let publish = async {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    properties,
                )
                .await
                .map_err(AmqpError::Publish)?;
            match confirm.await.map_err(AmqpError::Publish)? {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) => Err(AmqpError::Unroutable),
                Confirmation::Nack(_) => Err(AmqpError::Nacked),
                // The channel is always in confirm mode; if not, nothing is known: refuse.
                Confirmation::NotRequested => Err(AmqpError::Nacked),
            }
        };
        let result = match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
            Ok(result) => result,
            Err(_) => Err(AmqpError::Timeout(CONFIRM_TIMEOUT)),
        };
        if matches!(
            result,
            Err(AmqpError::Publish(_) | AmqpError::Timeout(_) | AmqpError::Unroutable)
        ) {
            *self.link.lock().await = None;
        }
        result
    }

    /// Closes the connection (graceful shutdown), waiting at most 2 s for the broker.
    pub async fn close(&self) {
        if let Some(link) = self.link.lock().await.take() {
            let close = link.connection.close(200, "shutdown".into());
            let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
        }
    }
}

/// Publishes jobs with publisher confirms over one channel, reconnecting lazily: a publish
/// after an outage opens a fresh connection and re-declares the topology. Cheap to share.
pub struct Publisher {
    ks: Keyspace,
    queue: QueueSettings,
    link: ConfirmingLink,
}

impl Publisher {
    /// Creates the publisher without connecting; the first publish (or [`Publisher::ready`])
    /// connects.
    pub fn new(url: Secret, ks: Keyspace, queue: QueueSettings, connection_name: String) -> Self {
        Self {
            ks,
            queue,
            link: ConfirmingLink::new(url, connection_name),
        }
    }

    /// A usable channel, reconnecting (and declaring the job topology) if the last one died.
    async fn channel(&self) -> Result<Channel, AmqpError> {
        let (ks, queue) = (self.ks.clone(), self.queue);
        self.link
            .channel(|channel| async move { declare_topology(&channel, &ks, queue).await })
            .await
    }

    /// Whether the broker is reachable now (connects if needed).
    pub async fn ready(&self) -> bool {
        self.channel().await.is_ok()
    }

    /// Publishes one job and waits for the broker's confirm. `Ok` means the broker has the
    /// message on a durable queue; any error means the caller must treat it as not enqueued.
    pub async fn publish_job(&self, job: &JobMessage) -> Result<(), AmqpError> {
        let channel = self.channel().await?;
        self.link
            .publish(
                &channel,
                &self.ks.jobs_exchange(),
                job.priority.as_str(),
                &job.encode(),
                job_properties(job),
            )
            .await
    }

    /// Closes the connection (graceful shutdown).
    pub async fn close(&self) {
        self.link.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;
    use std::collections::BTreeMap;

    fn with_death(death: Option<AMQPValue>) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(d) = death {
            headers.insert("x-death".into(), d);
        }
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn reads_the_first_death_of_a_dead_letter() {
        let entry = |reason: &str, count: i64| {
            let mut t = BTreeMap::new();
            t.insert(ShortString::from("reason"), str_arg(reason));
            t.insert(ShortString::from("queue"), str_arg("ns.jobs.interactive"));
            t.insert(ShortString::from("count"), AMQPValue::LongLongInt(count));
            AMQPValue::FieldTable(FieldTable::from(t))
        };
        let props = with_death(Some(AMQPValue::FieldArray(FieldArray::from(vec![
            entry("delivery_limit", 1),
            entry("rejected", 3),
        ]))));
        assert_eq!(
            death_of(&props),
            Some(Death {
                reason: "delivery_limit".into(),
                queue: "ns.jobs.interactive".into(),
                count: 1,
            })
        );
    }

    #[test]
    fn a_message_that_never_died_has_no_death() {
        assert_eq!(death_of(&BasicProperties::default()), None);
        assert_eq!(death_of(&with_death(None)), None);
        assert_eq!(death_of(&with_death(Some(str_arg("junk")))), None);
    }
}
