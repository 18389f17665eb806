//! Webhook endpoints and their delivery log, in Redis.
//!
//! - `{ns}:tenant:{tenant}:webhooks` (hash): endpoint id → the endpoint as JSON, with its
//!   signing secret (needed to sign every attempt, so stored as given; it is shown to the admin
//!   once, at registration, and never listed);
//! - `{ns}:tenant:{tenant}:webhook:{id}:deliveries` (list): the latest [`MAX_DELIVERIES`]
//!   attempts, newest first, expiring [`DELIVERIES_TTL_SECS`] after the last one (so the log of
//!   an endpoint deleted while an attempt was in flight does not stay forever).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sluice_jobs::Keyspace;
use sluice_jobs::redis_pool::{Connection, Pool};
use sluice_jobs::store::StoreError;
use sluice_shared::Secret;

use super::WebhookError;
use super::events::EventType;

/// Endpoints one tenant may register.
pub const MAX_ENDPOINTS: usize = 16;
/// Attempts kept per endpoint.
pub const MAX_DELIVERIES: isize = 100;
/// How long an endpoint's delivery log outlives its last attempt.
const DELIVERIES_TTL_SECS: u64 = 30 * 24 * 3600;

/// Adds an endpoint unless the tenant has [`MAX_ENDPOINTS`] already: one step, so two
/// concurrent registrations cannot both take the last place.
const CREATE: &str = r"
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// A registered endpoint as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    /// `whk_` and a UUID v7 without dashes.
    pub id: String,
    pub tenant: String,
    pub url: String,
    pub event_types: Vec<EventType>,
    /// Milliseconds since the epoch.
    pub created_at: u64,
    #[serde(serialize_with = "expose", deserialize_with = "secret")]
    pub secret: Secret,
}

fn expose<S: Serializer>(secret: &Secret, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(secret.expose())
}

fn secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
    String::deserialize(deserializer).map(Secret::new)
}

/// What became of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = WebhookDeliveryStatus)]
pub enum DeliveryStatus {
    /// The endpoint answered 2xx.
    Delivered,
    /// It could not be reached, timed out or answered otherwise (3xx included: redirects are
    /// not followed); a retry is scheduled.
    Failed,
    /// The URL, or an address its host resolved to, is not allowed; a retry is scheduled (the
    /// host's addresses may change).
    Refused,
    /// The last attempt failed or was refused: the delivery went to the dead queue.
    Dead,
}

/// One delivery attempt, as the deliveries route lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = WebhookDelivery)]
pub struct DeliveryAttempt {
    pub event_id: String,
    pub event_type: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When the attempt started, in milliseconds since the epoch.
    pub at: u64,
    pub status: DeliveryStatus,
    /// The endpoint's HTTP status, if it answered.
    #[schema(required = true)]
    pub http_status: Option<u16>,
    /// Why the attempt failed or was refused.
    #[schema(required = true)]
    pub error: Option<String>,
    /// When the retry is due (milliseconds since the epoch), if one is scheduled.
    #[schema(required = true)]
    pub next_retry_at: Option<u64>,
}

/// The endpoints and delivery logs of every tenant.
#[derive(Clone)]
pub struct Registry {
    pool: Pool,
    ks: Keyspace,
}

impl Registry {
    pub fn new(pool: Pool, ks: Keyspace) -> Self {
        Self { pool, ks }
    }

    async fn conn(&self) -> Result<Connection, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Stores a new endpoint, unless the tenant has [`MAX_ENDPOINTS`].
    pub async fn create(&self, endpoint: &Endpoint) -> Result<(), WebhookError> {
        let record =
            serde_json::to_string(endpoint).map_err(|e| WebhookError::Corrupt(e.to_string()))?;
        let mut conn = self.conn().await?;
        let added: i64 = redis::Script::new(CREATE)
            .key(self.ks.webhook_endpoints(&endpoint.tenant))
            .arg(&endpoint.id)
            .arg(record)
            .arg(MAX_ENDPOINTS)
            .invoke_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        if added == 0 {
            return Err(WebhookError::TooManyEndpoints);
        }
        Ok(())
    }

    /// A tenant's endpoints, oldest first.
    pub async fn list(&self, tenant: &str) -> Result<Vec<Endpoint>, WebhookError> {
        let mut conn = self.conn().await?;
        let records: Vec<String> = redis::cmd("HVALS")
            .arg(self.ks.webhook_endpoints(tenant))
            .query_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        let mut endpoints = records
            .iter()
            .map(|r| parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        endpoints.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(endpoints)
    }

    pub async fn get(&self, tenant: &str, id: &str) -> Result<Option<Endpoint>, WebhookError> {
        let mut conn = self.conn().await?;
        let record: Option<String> = redis::cmd("HGET")
            .arg(self.ks.webhook_endpoints(tenant))
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        record.as_deref().map(parse).transpose()
    }

    /// Deletes an endpoint and its delivery log; returns whether it existed.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<bool, WebhookError> {
        let mut conn = self.conn().await?;
        let (removed, _): (i64, i64) = redis::pipe()
            .atomic()
            .hdel(self.ks.webhook_endpoints(tenant), id)
            .del(self.ks.webhook_deliveries(tenant, id))
            .query_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        Ok(removed > 0)
    }

    /// Adds an attempt to the endpoint's log, keeping the latest [`MAX_DELIVERIES`].
    pub async fn record(
        &self,
        tenant: &str,
        id: &str,
        attempt: &DeliveryAttempt,
    ) -> Result<(), WebhookError> {
        let entry =
            serde_json::to_string(attempt).map_err(|e| WebhookError::Corrupt(e.to_string()))?;
        let key = self.ks.webhook_deliveries(tenant, id);
        let mut conn = self.conn().await?;
        redis::pipe()
            .atomic()
            .lpush(&key, entry)
            .ignore()
            .ltrim(&key, 0, MAX_DELIVERIES - 1)
            .ignore()
            .expire(&key, DELIVERIES_TTL_SECS as i64)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    /// The endpoint's latest attempts, newest first.
    pub async fn deliveries(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Vec<DeliveryAttempt>, WebhookError> {
        let mut conn = self.conn().await?;
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg(self.ks.webhook_deliveries(tenant, id))
            .arg(0)
            .arg(MAX_DELIVERIES - 1)
            .query_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        entries
            .iter()
            .map(|e| serde_json::from_str(e).map_err(|e| WebhookError::Corrupt(e.to_string())))
            .collect()
    }
}

fn parse(record: &str) -> Result<Endpoint, WebhookError> {
    serde_json::from_str(record).map_err(|e| WebhookError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_round_trips_with_its_secret_and_never_prints_it() {
        let endpoint = Endpoint {
            id: "whk_1".into(),
            tenant: "acme".into(),
            url: "https://example.com/hook".into(),
            event_types: vec![EventType::BatchCompleted, EventType::JobFailed],
            created_at: 1,
            secret: Secret::new("whsec_c2VjcmV0"),
        };
        let json = serde_json::to_string(&endpoint).expect("serialize");
        assert!(json.contains("whsec_c2VjcmV0"), "{json}");
        assert!(json.contains(r#""event_types":["batch.completed","job.failed"]"#));
        let back = parse(&json).expect("parse");
        assert_eq!(back.secret.expose(), "whsec_c2VjcmV0");
        assert!(!format!("{back:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn attempts_serialize_with_every_field() {
        let attempt = DeliveryAttempt {
            event_id: "evt_1".into(),
            event_type: "webhook.test".into(),
            attempt: 2,
            at: 3,
            status: DeliveryStatus::Failed,
            http_status: Some(500),
            error: None,
            next_retry_at: Some(4),
        };
        let json = serde_json::to_value(&attempt).expect("serialize");
        assert_eq!(json["status"], "failed");
        assert!(json["error"].is_null());
        assert_eq!(json.as_object().map(|o| o.len()), Some(8));
    }
}
