//! API keys.
//!
//! A key looks like `sk-<key id>_<secret>`: 8 random bytes of id and 32 of secret, hex. Redis
//! keeps, under the key id, the tenant, role, name, expiry, revocation and the SHA-256 of the
//! whole token, never the token. Verification looks the record up by id and compares digests in
//! constant time, so neither the secret nor its digest leaks through timing. Revocation is a
//! field on that record, read on every request, so it takes effect on every replica at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::tenant::TenantStore;
use sha2::{Digest, Sha256};
use sluice_jobs::Keyspace;
use sluice_jobs::redis_pool::Pool;
use sluice_jobs::store::StoreError;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

use crate::principal::{Principal, Role};

/// A key as listed to admins (never the secret or its digest). Times are ms since the epoch.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    pub key_id: String,
    pub tenant: String,
    pub name: String,
    /// `user` or `admin`, as stored.
    pub role: String,
    #[schema(required = true)]
    pub created_at: Option<u64>,
    #[schema(required = true)]
    pub expires_at: Option<u64>,
    #[schema(required = true)]
    pub revoked_at: Option<u64>,
    #[schema(required = true)]
    pub last_used_at: Option<u64>,
}

/// A freshly created key: the secret is shown once and never stored.
#[derive(Debug)]
pub struct CreatedKey {
    pub key_id: String,
    pub secret: String,
}

/// The longest lifetime a key may be given: ten years.
pub const MAX_KEY_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

/// Whether a key lifetime can be honoured: 1 second to [`MAX_KEY_LIFETIME_SECS`] (a bigger
/// number would wrap into a key that is dead on arrival).
pub fn check_key_lifetime(expires_in_secs: Option<u64>) -> Result<(), String> {
    match expires_in_secs {
        Some(secs) if secs == 0 || secs > MAX_KEY_LIFETIME_SECS => Err(format!(
            "expires_in_secs must be between 1 and {MAX_KEY_LIFETIME_SECS} (ten years), got {secs}"
        )),
        _ => Ok(()),
    }
}

/// API keys in Redis.
#[derive(Clone)]
pub struct ApiKeys {
    pool: Pool,
    ks: Keyspace,
    /// What this replica remembers of each key it verified, by key id.
    seen: Arc<Mutex<HashMap<String, SeenKey>>>,
}

/// A verified key as one replica remembers it.
struct SeenKey {
    /// Its tenant (a key's tenant never changes), so the next request reads the key record and
    /// the tenant's policy in one round trip.
    tenant: String,
    /// When this replica last wrote its `last_used_at` (ms): at most once a minute, not on
    /// every request.
    last_used_written: u64,
}

/// How stale a key's `last_used_at` may get (per API replica).
const LAST_USED_RESOLUTION_MS: u64 = 60_000;
/// Past this many remembered keys the memo starts over (each key then costs one more write and
/// one more round trip).
const MEMO_MAX_KEYS: usize = 100_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Splits `sk-<16 hex>_<64 hex>` into the key id; anything else is not a key.
fn key_id_of(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("sk-")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some(id)
}

impl ApiKeys {
    pub fn new(pool: Pool, ks: Keyspace) -> Self {
        Self {
            pool,
            ks,
            seen: Arc::default(),
        }
    }

    /// Remembers a verified use of `key_id` by `tenant` at `now`; returns whether its
    /// `last_used_at` is due for a write (and notes it as written).
    fn note_use(&self, key_id: &str, tenant: &str, now: u64) -> bool {
        let mut seen = lock(&self.seen);
        match seen.get_mut(key_id) {
            Some(key) => {
                if key.tenant != tenant {
                    key.tenant = tenant.to_string();
                }
                let due = now.saturating_sub(key.last_used_written) >= LAST_USED_RESOLUTION_MS;
                if due {
                    key.last_used_written = now;
                }
                due
            }
            None => {
                if seen.len() >= MEMO_MAX_KEYS {
                    seen.clear();
                }
                let key = SeenKey {
                    tenant: tenant.to_string(),
                    last_used_written: now,
                };
                seen.insert(key_id.to_string(), key);
                true
            }
        }
    }

    async fn conn(&self) -> Result<sluice_jobs::redis_pool::Connection, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Creates a key; `expires_in_secs` must pass [`check_key_lifetime`] (callers check it
    /// first, to answer with their own error).
    pub async fn create(
        &self,
        tenant: &str,
        name: &str,
        role: Role,
        expires_in_secs: Option<u64>,
    ) -> Result<CreatedKey, StoreError> {
        let key_id = hex::encode(rand::random::<[u8; 8]>());
        let secret = format!("sk-{key_id}_{}", hex::encode(rand::random::<[u8; 32]>()));
        let now = sluice_proto::now_ms();
        let mut fields = vec![
            ("tenant", tenant.to_string()),
            ("name", name.to_string()),
            ("role", role.as_str().to_string()),
            ("sha256", hex::encode(digest(&secret))),
            ("created_at", now.to_string()),
        ];
        if let Some(secs) = expires_in_secs {
            let expires_at = now.saturating_add(secs.saturating_mul(1000));
            fields.push(("expires_at", expires_at.to_string()));
        }
        let mut conn = self.conn().await?;
        // The tenant's list first, then the key (their own hash slots on a cluster): a key
        // that exists is always listed; a listed id without a record is skipped.
        redis::cmd("SADD")
            .arg(self.ks.tenant_keys(tenant))
            .arg(&key_id)
            .query_async::<()>(&mut conn)
            .await?;
        redis::cmd("HSET")
            .arg(self.ks.api_key(&key_id))
            .arg(&fields)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(CreatedKey { key_id, secret })
    }

    /// Revokes a key; returns whether it existed.
    pub async fn revoke(&self, key_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.ks.api_key(key_id);
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        if exists {
            redis::cmd("HSET")
                .arg(&key)
                .arg("revoked_at")
                .arg(sluice_proto::now_ms())
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(exists)
    }

    /// The keys of a tenant, oldest first.
    pub async fn list(&self, tenant: &str) -> Result<Vec<KeyInfo>, StoreError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.ks.tenant_keys(tenant))
            .query_async(&mut conn)
            .await?;
        let mut keys = Vec::with_capacity(ids.len());
        for id in ids {
            let r: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.ks.api_key(&id))
                .query_async(&mut conn)
                .await?;
            if r.is_empty() {
                continue;
            }
            let num = |f: &str| r.get(f).and_then(|v| v.parse::<u64>().ok());
            keys.push(KeyInfo {
                tenant: r.get("tenant").cloned().unwrap_or_default(),
                name: r.get("name").cloned().unwrap_or_default(),
                role: r.get("role").cloned().unwrap_or_default(),
                created_at: num("created_at"),
                expires_at: num("expires_at"),
                revoked_at: num("revoked_at"),
                last_used_at: num("last_used_at"),
                key_id: id,
            });
        }
        keys.sort_by_key(|k| k.created_at);
        Ok(keys)
    }

    /// Checks a bearer token and reads its tenant's policy. Every failure is the same
    /// `Unauthorized` to the client; the reason is only logged. For a key this replica has
    /// seen before, the key record and the policy come in one pipelined round trip.
    pub async fn verify(&self, token: &str, tenants: &TenantStore) -> Result<Principal, ApiError> {
        let key_id = key_id_of(token).ok_or(ApiError::Unauthorized("malformed key"))?;
        let known_tenant = lock(&self.seen).get(key_id).map(|k| k.tenant.clone());
        let mut conn = self.conn().await?;
        let (record, prefetched): (HashMap<String, String>, Option<Option<String>>) =
            match &known_tenant {
                Some(tenant) => {
                    // Different hash slots: one round trip on one server, two at once on a
                    // cluster.
                    let replies: Vec<redis::Value> = sluice_jobs::redis_pool::query_each(
                        &mut conn,
                        vec![
                            redis::cmd("HGETALL")
                                .arg(self.ks.api_key(key_id))
                                .to_owned(),
                            redis::cmd("GET").arg(tenants.policy_key(tenant)).to_owned(),
                        ],
                    )
                    .await
                    .map_err(StoreError::from)?;
                    let [record, policy]: [redis::Value; 2] = replies
                        .try_into()
                        .map_err(|_| ApiError::Internal("two replies expected".into()))?;
                    let parse_err =
                        |e: redis::ParsingError| StoreError::from(redis::RedisError::from(e));
                    (
                        redis::from_redis_value(record).map_err(parse_err)?,
                        Some(redis::from_redis_value(policy).map_err(parse_err)?),
                    )
                }
                None => {
                    let record = redis::cmd("HGETALL")
                        .arg(self.ks.api_key(key_id))
                        .query_async(&mut conn)
                        .await
                        .map_err(StoreError::from)?;
                    (record, None)
                }
            };
        drop(conn);
        let stored = record
            .get("sha256")
            .and_then(|h| hex::decode(h).ok())
            .ok_or(ApiError::Unauthorized("unknown key"))?;
        if !bool::from(stored.as_slice().ct_eq(&digest(token))) {
            return Err(ApiError::Unauthorized("wrong secret"));
        }
        if record.contains_key("revoked_at") {
            return Err(ApiError::Unauthorized("revoked key"));
        }
        let now = sluice_proto::now_ms();
        if let Some(expires_at) = record.get("expires_at").and_then(|v| v.parse::<u64>().ok())
            && now >= expires_at
        {
            return Err(ApiError::Unauthorized("expired key"));
        }
        let role = match record.get("role").map(String::as_str) {
            Some("admin") => Role::Admin,
            Some("user") => Role::User,
            _ => {
                return Err(ApiError::Internal(format!(
                    "key {key_id} has no valid role"
                )));
            }
        };
        let tenant = record
            .get("tenant")
            .cloned()
            .ok_or_else(|| ApiError::Internal(format!("key {key_id} has no tenant")))?;
        // Last-used time is bookkeeping: it must not slow down or fail the request, and a
        // minute's resolution is plenty.
        if self.note_use(key_id, &tenant, now) {
            let pool = self.pool.clone();
            let key = self.ks.api_key(key_id);
            tokio::spawn(async move {
                if let Ok(mut conn) = pool.get().await {
                    let _ = redis::cmd("HSET")
                        .arg(key)
                        .arg("last_used_at")
                        .arg(now)
                        .query_async::<()>(&mut conn)
                        .await;
                }
            });
        }
        let policy = match prefetched {
            Some(raw) if known_tenant.as_deref() == Some(tenant.as_str()) => {
                tenants.policy_from(raw.as_deref())
            }
            _ => tenants.policy(&tenant).await?,
        };
        Ok(Principal {
            tenant,
            key_id: key_id.to_string(),
            role,
            policy: Some(policy),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lifetimes_that_would_wrap_are_refused() {
        assert!(check_key_lifetime(None).is_ok());
        assert!(check_key_lifetime(Some(1)).is_ok());
        assert!(check_key_lifetime(Some(MAX_KEY_LIFETIME_SECS)).is_ok());
        for bad in [0, MAX_KEY_LIFETIME_SECS + 1, u64::MAX / 1000 + 1, u64::MAX] {
            assert!(check_key_lifetime(Some(bad)).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn last_used_is_written_at_most_once_a_minute_per_key() {
        let pool = sluice_jobs::redis_pool::create_pool(
            &sluice_shared::Secret::new("redis://127.0.0.1:6379"),
            1,
        )
        .expect("pool");
        let keys = ApiKeys::new(pool, Keyspace::new("unit-last-used"));
        assert!(keys.note_use("a", "t", 1_000));
        assert!(!keys.note_use("a", "t", 1_000 + LAST_USED_RESOLUTION_MS - 1));
        assert!(keys.note_use("b", "t", 1_000));
        assert!(keys.note_use("a", "t", 1_000 + LAST_USED_RESOLUTION_MS));
        assert!(!keys.note_use("a", "t", 1_000 + LAST_USED_RESOLUTION_MS + 5));
        // The tenant is remembered for the next request's pipelined read.
        assert_eq!(
            lock(&keys.seen).get("a").map(|k| k.tenant.as_str()),
            Some("t")
        );
    }

    #[test]
    fn parses_only_well_formed_tokens() {
        let good = format!("sk-{}_{}", "a".repeat(16), "b".repeat(64));
        assert_eq!(key_id_of(&good), Some("aaaaaaaaaaaaaaaa"));
        for bad in [
            "",
            "sk-",
            "Bearer x",
            &format!("sk-{}_{}", "a".repeat(15), "b".repeat(64)),
            &format!("sk-{}-{}", "a".repeat(16), "b".repeat(64)),
            &format!("sk-{}_{}", "g".repeat(16), "b".repeat(64)),
        ] {
            assert_eq!(key_id_of(bad), None, "{bad}");
        }
    }
}
