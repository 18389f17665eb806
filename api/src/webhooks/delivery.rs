//! One delivery attempt end to end: decode → endpoint (Redis; deleted since → drop) → the
//! URL policy again → resolve and check the addresses → signed POST to exactly those
//! addresses, within the timeout, redirects not followed → record the attempt → on failure
//! schedule the retry (or the dead queue) → ack.

use std::sync::Arc;
use std::time::Duration;

use sluice_jobs::amqp::AmqpError;
use tracing::Instrument;

use super::queue::{DeliveryMessage, Route, WebhookQueue};
use super::registry::{DeliveryAttempt, DeliveryStatus, Endpoint, Registry};
use super::signing;
use super::target::{self, AllowList, Unreachable};

/// How long a delivery whose endpoint could not be read (Redis down) waits before it goes back
/// to the queue, so an outage does not spin.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// The longest error message kept in the delivery log.
const MAX_ERROR_CHARS: usize = 500;

/// What to do with the broker's message once a delivery is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Done: delivered, retry or dead letter published, or nothing left to deliver to.
    Ack,
    /// Not handled (the store or the broker failed): try the same attempt again.
    Requeue,
    /// Undecodable: the main queue dead-letters it to the dead queue.
    Reject,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Delivered { status: u16 },
    Failed { status: Option<u16>, error: String },
    Refused { error: String },
}

/// Delivers webhook messages; shared by the consumer's tasks.
pub struct Deliverer {
    pub(super) registry: Registry,
    pub(super) queue: Arc<WebhookQueue>,
    pub(super) allow: AllowList,
    pub(super) timeout: Duration,
    /// `sluice_webhook_attempts_total`, by outcome.
    pub(super) attempts: prometheus::IntCounterVec,
}

impl Deliverer {
    /// Handles one message from the delivery queue. Never panics; every path ends in a
    /// disposition.
    pub async fn handle(&self, payload: &[u8]) -> Disposition {
        let message = match DeliveryMessage::decode(payload) {
            Ok(message) => message,
            Err(error) => {
                tracing::error!(%error, "undecodable webhook delivery; dead-lettering it");
                return Disposition::Reject;
            }
        };
        let span = tracing::info_span!(
            "webhook_delivery",
            event_id = %message.event_id,
            endpoint_id = %message.endpoint_id,
            attempt = message.attempt,
        );
        self.deliver(message).instrument(span).await
    }

    async fn deliver(&self, message: DeliveryMessage) -> Disposition {
        let endpoint = match self
            .registry
            .get(&message.tenant, &message.endpoint_id)
            .await
        {
            Ok(Some(endpoint)) => endpoint,
            Ok(None) => {
                tracing::debug!("webhook endpoint deleted; dropping the delivery");
                return Disposition::Ack;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the webhook endpoint; requeueing");
                tokio::time::sleep(STORE_RETRY).await;
                return Disposition::Requeue;
            }
        };
        let at = sluice_proto::now_ms();
        let outcome = self.attempt(&endpoint, &message).await;
        let (status, http_status, error) = match outcome {
            Outcome::Delivered { status } => (DeliveryStatus::Delivered, Some(status), None),
            Outcome::Failed { status, error } => (DeliveryStatus::Failed, status, Some(error)),
            Outcome::Refused { error } => (DeliveryStatus::Refused, None, Some(error)),
        };
        let mut record = DeliveryAttempt {
            event_id: message.event_id.clone(),
            event_type: message.event_type.clone(),
            attempt: message.attempt,
            at,
            status,
            http_status,
            error,
            next_retry_at: None,
        };
        let mut disposition = Disposition::Ack;
        if status != DeliveryStatus::Delivered {
            match self.schedule_retry(&message).await {
                Ok(Some(delay)) => {
                    let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                    record.next_retry_at = Some(sluice_proto::now_ms().saturating_add(delay_ms));
                }
                Ok(None) => record.status = DeliveryStatus::Dead,
                Err(error) => {
                    tracing::warn!(%error, "cannot schedule the webhook retry; requeueing");
                    disposition = Disposition::Requeue;
                }
            }
        }
        let outcome = match record.status {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Refused => "refused",
            DeliveryStatus::Dead => "dead",
        };
        self.attempts.with_label_values(&[outcome]).inc();
        match record.status {
            DeliveryStatus::Delivered => tracing::debug!(http_status, "webhook delivered"),
            DeliveryStatus::Dead => {
                tracing::warn!(error = record.error.as_deref(), "webhook delivery is dead")
            }
            _ => tracing::info!(error = record.error.as_deref(), "webhook attempt failed"),
        }
        if let Err(error) = self
            .registry
            .record(&message.tenant, &message.endpoint_id, &record)
            .await
        {
            tracing::warn!(%error, "cannot record the webhook attempt");
        }
        disposition
    }

    /// Publishes the next attempt to the retry queue of this one, or past the last delay to
    /// the dead queue; returns the delay, or `None` for the dead queue.
    async fn schedule_retry(
        &self,
        message: &DeliveryMessage,
    ) -> Result<Option<Duration>, AmqpError> {
        let n = usize::try_from(message.attempt).unwrap_or(usize::MAX);
        match self.queue.delays().before_retry(n) {
            Some(delay) => {
                let next = DeliveryMessage {
                    attempt: message.attempt.saturating_add(1),
                    ..message.clone()
                };
                self.queue.publish(Route::Retry(n), &next).await?;
                Ok(Some(delay))
            }
            None => {
                self.queue.publish(Route::Dead, message).await?;
                Ok(None)
            }
        }
    }

    /// One signed POST, within the timeout (resolution included).
    async fn attempt(&self, endpoint: &Endpoint, message: &DeliveryMessage) -> Outcome {
        let target = match target::check_url(&endpoint.url, &self.allow) {
            Ok(target) => target,
            Err(refusal) => return refused(refusal.to_string()),
        };
        let key = match signing::key_of(&endpoint.secret) {
            Ok(key) => key,
            Err(e) => return failed(None, format!("the endpoint's secret is unreadable: {e}")),
        };
        let send = async {
            let addrs = match target::resolve(&target, &self.allow).await {
                Ok(addrs) => addrs,
                Err(Unreachable::Refused(refusal)) => return refused(refusal.to_string()),
                Err(lookup) => return failed(None, lookup.to_string()),
            };
            let mut client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .pool_max_idle_per_host(0)
                .user_agent(concat!("Sluice-Webhooks/", env!("CARGO_PKG_VERSION")));
            if let Some(host) = target.url.host_str() {
                // Connect to the checked addresses and nothing else, whatever DNS says now.
                client = client.resolve_to_addrs(host, &addrs);
            }
            let client = match client.build() {
                Ok(client) => client,
                Err(e) => return failed(None, error_chain(&e.without_url())),
            };
            let timestamp = sluice_proto::now_ms() / 1000;
            let signature =
                signing::sign(&key, &message.event_id, timestamp, message.body.as_bytes());
            let response = client
                .post(target.url.clone())
                .header("content-type", "application/json")
                .header("webhook-id", &message.event_id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(message.body.clone())
                .send()
                .await;
            match response {
                Ok(response) if response.status().is_success() => Outcome::Delivered {
                    status: response.status().as_u16(),
                },
                Ok(response) if response.status().is_redirection() => failed(
                    Some(response.status().as_u16()),
                    "redirects are not followed".to_string(),
                ),
                Ok(response) => failed(
                    Some(response.status().as_u16()),
                    format!("the endpoint answered {}", response.status()),
                ),
                // Without the URL: its query may hold a token, and the log names the endpoint.
                Err(e) => failed(None, error_chain(&e.without_url())),
            }
        };
        match tokio::time::timeout(self.timeout, send).await {
            Ok(outcome) => outcome,
            Err(_) => failed(
                None,
                format!("no answer within {} s", self.timeout.as_secs()),
            ),
        }
    }
}

fn failed(status: Option<u16>, error: String) -> Outcome {
    Outcome::Failed {
        status,
        error: truncate(error),
    }
}

fn refused(error: String) -> Outcome {
    Outcome::Refused {
        error: truncate(error),
    }
}

fn truncate(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(MAX_ERROR_CHARS) {
        text.truncate(cut);
    }
    text
}

/// An error and its causes, `: `-separated (reqwest's own message alone says only "error
/// sending request").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_on_a_character() {
        assert_eq!(truncate("short".into()), "short");
        let long = "é".repeat(MAX_ERROR_CHARS + 10);
        assert_eq!(truncate(long).chars().count(), MAX_ERROR_CHARS);
    }

    #[derive(Debug, thiserror::Error)]
    #[error("error sending request")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chains_name_every_cause() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(error_chain(&Outer(inner)), "error sending request: refused");
    }
}
