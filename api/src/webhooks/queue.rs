//! The webhook deliveries on RabbitMQ: their topology, their message, and a confirming
//! publisher that reconnects.
//!
//! Topology (all durable, names from [`Keyspace`]):
//! - `{ns}.webhooks` (direct exchange): routing key `deliver` → `{ns}.webhooks` (quorum
//!   queue), which the consumers read; `retry.{n}` → `{ns}.webhooks.retry.{n}`; `dead` →
//!   `{ns}.webhooks.dead` (quorum queue, for an operator);
//! - `{ns}.webhooks.retry.{n}` (classic queue, no consumer): `x-message-ttl` = the `n`-th
//!   retry delay and `x-dead-letter-exchange` back to `deliver`: a message waits out its delay
//!   there, then is due again. Every message of a retry queue has the same TTL, so they expire
//!   in order; the queue's arguments must match in every process, hence the same
//!   `--webhook-retry-delays` everywhere;
//! - a message the main queue's consumer rejects (one it cannot decode) is dead-lettered to
//!   `dead` too.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde::{Deserialize, Serialize};
use sluice_jobs::Keyspace;
use sluice_jobs::amqp::{AmqpError, CONNECT_TIMEOUT, ConfirmingLink};
use sluice_shared::Secret;

use super::settings::RetryDelays;

/// The version of [`DeliveryMessage`] this code writes.
const MESSAGE_VERSION: u8 = 1;

/// One delivery of one event to one endpoint, as queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryMessage {
    pub v: u8,
    pub tenant: String,
    pub endpoint_id: String,
    pub event_id: String,
    pub event_type: String,
    /// The event body exactly as signed and sent, the same bytes on every attempt.
    pub body: String,
    /// The attempt this message is for: 1, then one more per retry.
    pub attempt: u32,
}

impl DeliveryMessage {
    pub fn new(tenant: &str, endpoint_id: &str, event: &super::events::Event) -> Self {
        Self {
            v: MESSAGE_VERSION,
            tenant: tenant.to_string(),
            endpoint_id: endpoint_id.to_string(),
            event_id: event.id.clone(),
            event_type: event.event_type.clone(),
            body: event.body.clone(),
            attempt: 1,
        }
    }

    pub fn decode(payload: &[u8]) -> Result<Self, String> {
        let message: Self = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        if message.v != MESSAGE_VERSION {
            return Err(format!("unknown message version {}", message.v));
        }
        Ok(message)
    }
}

/// Where a message is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Due now.
    Deliver,
    /// To wait out the `n`-th retry delay (1-based).
    Retry(usize),
    /// Out of retries.
    Dead,
}

impl Route {
    fn key(self) -> String {
        match self {
            Route::Deliver => "deliver".to_string(),
            Route::Retry(n) => format!("retry.{n}"),
            Route::Dead => "dead".to_string(),
        }
    }
}

fn str_arg(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.to_string()))
}

/// Declares the webhook exchange and queues (idempotent).
pub async fn declare_topology(
    channel: &Channel,
    ks: &Keyspace,
    delays: &RetryDelays,
) -> Result<(), AmqpError> {
    let exchange = ks.webhooks_exchange();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let declare = async {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut main = FieldTable::default();
        main.insert("x-queue-type".into(), str_arg("quorum"));
        main.insert("x-dead-letter-exchange".into(), str_arg(&exchange));
        main.insert(
            "x-dead-letter-routing-key".into(),
            str_arg(&Route::Dead.key()),
        );
        let mut dead = FieldTable::default();
        dead.insert("x-queue-type".into(), str_arg("quorum"));
        let mut queues = vec![
            (ks.webhooks_queue(), Route::Deliver, main),
            (ks.webhooks_dead_queue(), Route::Dead, dead),
        ];
        for (i, delay) in delays.as_slice().iter().enumerate() {
            let mut retry = FieldTable::default();
            let ttl_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            retry.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
            retry.insert("x-dead-letter-exchange".into(), str_arg(&exchange));
            retry.insert(
                "x-dead-letter-routing-key".into(),
                str_arg(&Route::Deliver.key()),
            );
            queues.push((ks.webhooks_retry_queue(i + 1), Route::Retry(i + 1), retry));
        }
        for (queue, route, args) in queues {
            channel
                .queue_declare(queue.as_str().into(), durable, args)
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    route.key().as_str().into(),
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

/// Publishes deliveries with publisher confirms over one channel, reconnecting lazily
/// ([`ConfirmingLink`], as the job [`sluice_jobs::amqp::Publisher`] does). Shared by `emit`
/// and the consumer's retries.
pub struct WebhookQueue {
    ks: Keyspace,
    delays: RetryDelays,
    link: ConfirmingLink,
}

impl WebhookQueue {
    /// Creates the publisher without connecting.
    pub fn new(url: Secret, ks: Keyspace, delays: RetryDelays, connection_name: String) -> Self {
        Self {
            ks,
            delays,
            link: ConfirmingLink::new(url, connection_name),
        }
    }

    pub fn keyspace(&self) -> &Keyspace {
        &self.ks
    }

    pub fn delays(&self) -> &RetryDelays {
        &self.delays
    }

    pub fn url(&self) -> &Secret {
        self.link.url()
    }

    /// Publishes one delivery and waits for the broker's confirm: `Ok` means a durable queue
    /// holds it.
    pub async fn publish(&self, route: Route, message: &DeliveryMessage) -> Result<(), AmqpError> {
        let (ks, delays) = (self.ks.clone(), self.delays.clone());
        let channel = self
            .link
            .channel(|channel| async move { declare_topology(&channel, &ks, &delays).await })
            .await?;
        let Ok(payload) = serde_json::to_vec(message) else {
            unreachable!("strings and integers always serialize");
        };
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(message.event_id.clone()));
        self.link
            .publish(
                &channel,
                &self.ks.webhooks_exchange(),
                &route.key(),
                &payload,
                properties,
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

    #[test]
    fn messages_round_trip_and_refuse_other_versions() {
        let event = super::super::events::Event::new("webhook.test", serde_json::json!({}));
        let message = DeliveryMessage::new("acme", "whk_1", &event);
        assert_eq!(message.attempt, 1);
        let bytes = serde_json::to_vec(&message).expect("encode");
        assert_eq!(DeliveryMessage::decode(&bytes), Ok(message.clone()));
        let other = DeliveryMessage { v: 2, ..message };
        let bytes = serde_json::to_vec(&other).expect("encode");
        assert!(DeliveryMessage::decode(&bytes).is_err());
        assert!(DeliveryMessage::decode(b"junk").is_err());
    }

    #[test]
    fn routes_have_their_binding_keys() {
        assert_eq!(Route::Deliver.key(), "deliver");
        assert_eq!(Route::Retry(3).key(), "retry.3");
        assert_eq!(Route::Dead.key(), "dead");
    }
}
