//! The events webhooks carry: the types an endpoint may subscribe to, and the body every
//! attempt sends, in OpenAI's webhook shape:
//! `{"id": "evt_...", "object": "event", "type", "created_at" (unix seconds), "data"}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The type of the event `POST /admin/tenants/{tenant}/webhooks/{id}/test` sends. Endpoints
/// do not subscribe to it: it goes to the one endpoint named.
pub const TEST_EVENT: &str = "webhook.test";

/// An event type an endpoint may subscribe to.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[schema(as = WebhookEventType)]
pub enum EventType {
    #[serde(rename = "batch.completed")]
    BatchCompleted,
    #[serde(rename = "batch.failed")]
    BatchFailed,
    #[serde(rename = "batch.expired")]
    BatchExpired,
    #[serde(rename = "batch.cancelled")]
    BatchCancelled,
    #[serde(rename = "job.succeeded")]
    JobSucceeded,
    #[serde(rename = "job.failed")]
    JobFailed,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        Self::BatchCompleted,
        Self::BatchFailed,
        Self::BatchExpired,
        Self::BatchCancelled,
        Self::JobSucceeded,
        Self::JobFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BatchCompleted => "batch.completed",
            Self::BatchFailed => "batch.failed",
            Self::BatchExpired => "batch.expired",
            Self::BatchCancelled => "batch.cancelled",
            Self::JobSucceeded => "job.succeeded",
            Self::JobFailed => "job.failed",
        }
    }

    /// The type named `s`, if endpoints may subscribe to it.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A new event: its id (`evt_` and a UUID v7 without dashes, so ids sort by time) and its
/// body, serialized once so every attempt signs and sends the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub body: String,
}

impl Event {
    pub fn new(event_type: &str, data: Value) -> Self {
        let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
        let body = serde_json::json!({
            "id": id,
            "object": "event",
            "type": event_type,
            "created_at": sluice_proto::now_ms() / 1000,
            "data": data,
        });
        Self {
            id,
            event_type: event_type.to_string(),
            body: body.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_round_trip_and_unknown_ones_are_none() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            assert_eq!(
                serde_json::to_value(t).expect("serialize"),
                Value::from(t.as_str())
            );
        }
        for unknown in [TEST_EVENT, "batch.done", "", "BATCH.COMPLETED"] {
            assert_eq!(EventType::parse(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn the_body_has_openai_s_event_shape() {
        let event = Event::new("batch.completed", serde_json::json!({"id": "batch_1"}));
        let body: Value = serde_json::from_str(&event.body).expect("JSON");
        assert_eq!(body["id"], Value::from(event.id.clone()));
        assert_eq!(body["object"], "event");
        assert_eq!(body["type"], "batch.completed");
        assert_eq!(body["data"], serde_json::json!({"id": "batch_1"}));
        let now = sluice_proto::now_ms() / 1000;
        let created = body["created_at"].as_u64().expect("seconds");
        assert!(now.abs_diff(created) <= 1, "{created} vs {now}");
        let hex = event.id.strip_prefix("evt_").expect("evt_ prefix");
        assert_eq!(hex.len(), 32);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
