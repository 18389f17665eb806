//! Signed, durable webhooks (Standard Webhooks): a tenant's admin registers HTTPS endpoints
//! for event types; [`Webhooks::emit`] queues one delivery per subscribed endpoint on
//! RabbitMQ; the consumer in every API process POSTs each one, signed, and retries failures on
//! a schedule through delayed queues until the dead queue.
//!
//! - [`settings`]: `--webhook-*`, flattened into [`crate::settings::ApiSettings`];
//! - [`target`]: the URL and address policy (no internal addresses unless the operator allows
//!   them), checked at registration and before every attempt, with the connection pinned to
//!   the addresses checked;
//! - [`signing`]: `whsec_` secrets and the `webhook-signature` header;
//! - [`events`]: the event types and the event body (OpenAI's webhook shape);
//! - [`registry`]: endpoints and their delivery log in Redis;
//! - [`queue`]: the RabbitMQ topology (main, retry and dead queues) and the confirming
//!   publisher;
//! - [`delivery`]: one attempt end to end; [`consumer`]: the loop that runs them.
//!
//! An event flows: `emit` → endpoints subscribed to its type (Redis) → one persistent message
//! each on `{ns}.webhooks` (publisher confirms) → a consumer task → signed POST → 2xx:
//! delivered; otherwise the message is republished to `{ns}.webhooks.retry.{n}` with the next
//! attempt number, and returns to `{ns}.webhooks` when its TTL expires; after the last delay,
//! to `{ns}.webhooks.dead`. Every attempt is logged per endpoint (the admin's deliveries
//! route). Delivery is at least once: a receiver deduplicates by `webhook-id`.

pub mod consumer;
pub mod delivery;
pub mod events;
pub mod job_events;
pub mod queue;
pub mod registry;
pub mod settings;
pub mod signing;
pub mod target;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice_jobs::Keyspace;
use sluice_jobs::amqp::AmqpError;
use sluice_jobs::redis_pool::Pool;
use sluice_jobs::store::StoreError;
use sluice_proto::ErrorCode;
use sluice_shared::Secret;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::ApiError;
use delivery::Deliverer;
use events::{Event, EventType, TEST_EVENT};
use queue::{DeliveryMessage, Route, WebhookQueue};
use registry::{DeliveryAttempt, Endpoint, MAX_ENDPOINTS, Registry};
use target::{AllowList, Refusal};

pub use settings::WebhookSettings;

/// Why a webhook operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("url: {0}")]
    Url(#[from] Refusal),
    #[error("event_types: {0:?} is not an event type (one of {types})", types = type_list())]
    UnknownEventType(String),
    #[error("event_types must name at least one event type")]
    NoEventTypes,
    #[error("a tenant may have at most {MAX_ENDPOINTS} webhook endpoints")]
    TooManyEndpoints,
    #[error("no such webhook endpoint")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] AmqpError),
    #[error("corrupt webhook record: {0}")]
    Corrupt(String),
}

fn type_list() -> String {
    EventType::ALL.map(EventType::as_str).join(", ")
}

impl From<WebhookError> for ApiError {
    fn from(error: WebhookError) -> Self {
        match error {
            WebhookError::Url(_)
            | WebhookError::UnknownEventType(_)
            | WebhookError::NoEventTypes
            | WebhookError::TooManyEndpoints => {
                ApiError::client(ErrorCode::InvalidParameter, error.to_string())
            }
            WebhookError::NotFound => ApiError::client(ErrorCode::NotFound, error.to_string()),
            WebhookError::Store(e) => ApiError::Store(e),
            WebhookError::Queue(e) => ApiError::Queue(e),
            WebhookError::Corrupt(e) => ApiError::Internal(format!("corrupt webhook record: {e}")),
        }
    }
}

struct Inner {
    registry: Registry,
    queue: Arc<WebhookQueue>,
    allow: AllowList,
    timeout: Duration,
    deliveries: bool,
}

/// The webhooks of one API process: registration, emitting, and the delivery consumer. Cheap
/// to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

impl Webhooks {
    /// Builds the handle without connecting to anything.
    pub fn new(
        pool: Pool,
        ks: Keyspace,
        amqp_url: Secret,
        settings: &WebhookSettings,
        connection_name: String,
    ) -> Self {
        let queue = WebhookQueue::new(
            amqp_url,
            ks.clone(),
            settings.webhook_retry_delays.clone(),
            connection_name,
        );
        Self {
            inner: Arc::new(Inner {
                registry: Registry::new(pool, ks),
                queue: Arc::new(queue),
                allow: AllowList::new(settings.webhook_allow.clone()),
                timeout: settings.timeout(),
                deliveries: settings.webhook_deliveries,
            }),
        }
    }

    /// Queues `event_type` (one of [`EventType`]) with `data` for every endpoint of `tenant`
    /// subscribed to it. `Ok` means the broker holds every delivery (none if no endpoint is
    /// subscribed); on an error some deliveries may have been queued and others not.
    pub async fn emit(
        &self,
        tenant: &str,
        event_type: &str,
        data: Value,
    ) -> Result<(), WebhookError> {
        let kind = EventType::parse(event_type)
            .ok_or_else(|| WebhookError::UnknownEventType(event_type.to_string()))?;
        let endpoints = self.inner.registry.list(tenant).await?;
        let subscribed: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| e.event_types.contains(&kind))
            .collect();
        if subscribed.is_empty() {
            return Ok(());
        }
        let event = Event::new(event_type, data);
        for endpoint in subscribed {
            let message = DeliveryMessage::new(tenant, &endpoint.id, &event);
            self.inner.queue.publish(Route::Deliver, &message).await?;
        }
        tracing::debug!(tenant, event_type, event_id = %event.id, "webhook event queued");
        Ok(())
    }

    /// Queues a `webhook.test` event for one endpoint; returns the event's id.
    pub async fn send_test(&self, tenant: &str, id: &str) -> Result<String, WebhookError> {
        let endpoint = self
            .inner
            .registry
            .get(tenant, id)
            .await?
            .ok_or(WebhookError::NotFound)?;
        let event = Event::new(TEST_EVENT, serde_json::json!({ "id": endpoint.id }));
        let message = DeliveryMessage::new(tenant, &endpoint.id, &event);
        self.inner.queue.publish(Route::Deliver, &message).await?;
        Ok(event.id)
    }

    /// Registers an endpoint after checking its URL against the policy and its event types;
    /// the answer holds the new signing secret.
    pub async fn register(
        &self,
        tenant: &str,
        url: &str,
        event_types: &[String],
    ) -> Result<Endpoint, WebhookError> {
        target::check_url(url, &self.inner.allow)?;
        let mut types = event_types
            .iter()
            .map(|t| EventType::parse(t).ok_or_else(|| WebhookError::UnknownEventType(t.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        types.sort_unstable();
        types.dedup();
        if types.is_empty() {
            return Err(WebhookError::NoEventTypes);
        }
        let endpoint = Endpoint {
            id: format!("whk_{}", uuid::Uuid::now_v7().simple()),
            tenant: tenant.to_string(),
            url: url.to_string(),
            event_types: types,
            created_at: sluice_proto::now_ms(),
            secret: signing::generate_secret(),
        };
        self.inner.registry.create(&endpoint).await?;
        Ok(endpoint)
    }

    /// A tenant's endpoints, oldest first.
    pub async fn list(&self, tenant: &str) -> Result<Vec<Endpoint>, WebhookError> {
        self.inner.registry.list(tenant).await
    }

    /// Deletes an endpoint; deliveries still queued for it are dropped when their turn comes.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), WebhookError> {
        if self.inner.registry.delete(tenant, id).await? {
            Ok(())
        } else {
            Err(WebhookError::NotFound)
        }
    }

    /// An endpoint's latest delivery attempts, newest first.
    pub async fn deliveries(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Vec<DeliveryAttempt>, WebhookError> {
        let registry = &self.inner.registry;
        if registry.get(tenant, id).await?.is_none() {
            return Err(WebhookError::NotFound);
        }
        registry.deliveries(tenant, id).await
    }

    /// Starts the delivery consumer, unless this process does not deliver
    /// (`--webhook-deliveries false`), counting its attempts by outcome in `attempts`. It
    /// stops when `stop` turns `true`, after the deliveries in flight finish or `grace` passes.
    pub fn spawn_consumer(
        &self,
        stop: watch::Receiver<bool>,
        grace: Duration,
        attempts: prometheus::IntCounterVec,
    ) -> Option<JoinHandle<()>> {
        if !self.inner.deliveries {
            tracing::info!("webhook deliveries off in this process");
            return None;
        }
        let deliverer = Arc::new(Deliverer {
            registry: self.inner.registry.clone(),
            queue: Arc::clone(&self.inner.queue),
            allow: self.inner.allow.clone(),
            timeout: self.inner.timeout,
            attempts,
        });
        Some(tokio::spawn(consumer::run(deliverer, stop, grace)))
    }

    /// Closes the publisher's connection (graceful shutdown).
    pub async fn close(&self) {
        self.inner.queue.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_stable_codes() {
        let cases = [
            (
                WebhookError::Url(Refusal::Userinfo),
                400,
                "invalid_parameter",
            ),
            (
                WebhookError::UnknownEventType("x".into()),
                400,
                "invalid_parameter",
            ),
            (WebhookError::TooManyEndpoints, 400, "invalid_parameter"),
            (WebhookError::NotFound, 404, "not_found"),
            (
                WebhookError::Queue(AmqpError::Nacked),
                503,
                "queue_unavailable",
            ),
            (
                WebhookError::Store(StoreError::Unavailable("down".into())),
                503,
                "store_unavailable",
            ),
            (WebhookError::Corrupt("x".into()), 500, "internal"),
        ];
        for (error, status, code) in cases {
            let body = ApiError::from(error).body();
            assert_eq!(body.code.as_str(), code);
            assert_eq!(body.code.http_status(), status);
        }
        let message = WebhookError::UnknownEventType("batch.done".into()).to_string();
        assert!(message.contains("batch.completed"), "{message}");
    }
}
