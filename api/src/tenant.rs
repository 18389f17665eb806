//! Per-tenant policy: limits, quotas and guard settings, stored in Redis and set by admins.
//!
//! A tenant's record holds only what an admin overrode; every other value comes from the API's
//! defaults, so changing a default changes every tenant that did not override it.

use serde::{Deserialize, Serialize};
use sluice_guard::pipeline::{GuardConfig, InjectionAction, PiiAction};
use sluice_jobs::calendar::utc_day_and_month;
use sluice_jobs::redis_pool::Pool;
use sluice_proto::{JsonSchemaFormat, Priority, ResponseFormat};

use sluice_jobs::keyspace::Keyspace;
use sluice_jobs::store::StoreError;

/// Effective limits and guard settings of a tenant. `None` means unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantPolicy {
    /// Requests per second per key (or JWT subject), with a burst of the same size.
    pub requests_per_second: Option<u32>,
    /// Requests per minute per key (or JWT subject), with a burst of the same size.
    pub requests_per_minute: Option<u32>,
    /// Tokens (prompt + max_tokens reserved, unused part refunded) per UTC day.
    pub tokens_per_day: Option<u64>,
    /// Tokens per UTC calendar month.
    pub tokens_per_month: Option<u64>,
    /// Jobs queued plus running at once.
    pub max_active_jobs: Option<u32>,
    /// Jobs waiting in the queue at once (backpressure: 429 `queue_full` past it).
    #[serde(default)]
    pub max_queued_jobs: Option<u32>,
    /// Whether clients of this tenant may send `system` messages.
    pub allow_system_messages: bool,
    pub injection_action: InjectionAction,
    pub injection_threshold: f32,
    /// The learned classifier's threshold (0.5: at most 1 % false positives on its validation
    /// split); a hit is handled by `injection_action` like a rule's.
    #[serde(default = "default_classifier_threshold")]
    pub classifier_threshold: f32,
    /// The lower edge of the classifier's grey band, or `None` (the default) for no band: a
    /// request the classifier scores at or above it, but below `classifier_threshold`, is
    /// judged by the served model before it generates (the model's second opinion), and a
    /// "yes" ends the job as `prompt_injection_detected` with its reservation refunded.
    #[serde(default)]
    pub injection_judge_from: Option<f32>,
    pub pii_action: PiiAction,
    /// The class of this tenant's jobs that do not name one.
    #[serde(default)]
    pub default_priority: Priority,
    /// A JSON Schema every response of this tenant must match: jobs without a
    /// `response_format` get it, jobs with another one are refused.
    #[serde(default)]
    pub required_output_schema: Option<serde_json::Value>,
    /// This tenant's weight in the batch lane: it may have `--batch-lane-window` times this
    /// many batch lines queued or running at once (1 to 100).
    #[serde(default = "default_batch_weight")]
    pub batch_weight: u32,
    /// Whether workers may reuse this tenant's cached prompt prefixes (pages of KV cache that
    /// its earlier jobs computed; never another tenant's). Off, every job prefills its whole
    /// prompt.
    #[serde(default = "default_prefix_cache")]
    pub prefix_cache: bool,
    /// Whether the learned classifier scores this tenant's `system` messages as well as the
    /// rest (the default). Off, for a tenant whose system prompts are its own application's
    /// and never carry user text, it scores only the other messages; the rules still check
    /// every message.
    #[serde(default = "default_classify_system_messages")]
    pub classify_system_messages: bool,
}

fn default_prefix_cache() -> bool {
    true
}

fn default_classify_system_messages() -> bool {
    true
}

fn default_batch_weight() -> u32 {
    1
}

fn default_classifier_threshold() -> f32 {
    sluice_guard::pipeline::DEFAULT_CLASSIFIER_THRESHOLD
}

impl Default for TenantPolicy {
    fn default() -> Self {
        let guard = GuardConfig::default();
        Self {
            requests_per_second: Some(20),
            requests_per_minute: Some(600),
            tokens_per_day: Some(2_000_000),
            tokens_per_month: Some(40_000_000),
            max_active_jobs: Some(64),
            max_queued_jobs: Some(1000),
            allow_system_messages: true,
            injection_action: guard.injection_action,
            injection_threshold: guard.injection_threshold,
            classifier_threshold: guard.classifier_threshold,
            injection_judge_from: None,
            pii_action: guard.pii_action,
            required_output_schema: None,
            default_priority: Priority::Interactive,
            batch_weight: 1,
            prefix_cache: true,
            classify_system_messages: true,
        }
    }
}

impl TenantPolicy {
    /// Whether a classifier score sends the job to the model's second opinion: inside the
    /// grey band, below the threshold where `injection_action` takes over.
    pub fn judge_band_holds(&self, score: f32) -> bool {
        self.injection_judge_from
            .is_some_and(|from| score >= from && score < self.classifier_threshold)
    }

    pub fn guard_config(&self) -> GuardConfig {
        GuardConfig {
            injection_action: self.injection_action,
            injection_threshold: self.injection_threshold,
            classifier_threshold: self.classifier_threshold,
            pii_action: self.pii_action,
        }
    }

    /// The tenant's required output format, if it registered a schema.
    pub fn required_format(&self) -> Option<ResponseFormat> {
        self.required_output_schema
            .as_ref()
            .map(|schema| ResponseFormat::JsonSchema {
                json_schema: JsonSchemaFormat {
                    name: "tenant_required_schema".into(),
                    description: None,
                    schema: schema.clone(),
                    strict: Some(true),
                },
            })
    }

    /// Applies an admin's overrides (a JSON object of some fields; `null` means unlimited)
    /// and validates the result.
    pub fn merged(&self, overrides: &serde_json::Value) -> Result<Self, String> {
        // Checked as given: a tiny negative number would round to -0.0 as an `f32` and pass
        // the range checks below.
        for field in [
            "injection_threshold",
            "classifier_threshold",
            "injection_judge_from",
        ] {
            if let Some(value) = overrides.get(field).and_then(serde_json::Value::as_f64)
                && !(0.0..=1.0).contains(&value)
            {
                return Err(format!("{field} must be between 0 and 1"));
            }
        }
        let merged = self.apply(overrides)?;
        // One meaning of 0 everywhere would be "unlimited" (as in the `--default-*` flags), and
        // an admin who sets 0 to stop a tenant would get the opposite: refuse it instead.
        let zero = [
            (
                "requests_per_second",
                merged.requests_per_second.map(u64::from),
            ),
            (
                "requests_per_minute",
                merged.requests_per_minute.map(u64::from),
            ),
            ("tokens_per_day", merged.tokens_per_day),
            ("tokens_per_month", merged.tokens_per_month),
            ("max_active_jobs", merged.max_active_jobs.map(u64::from)),
            ("max_queued_jobs", merged.max_queued_jobs.map(u64::from)),
        ]
        .into_iter()
        .find(|(_, v)| *v == Some(0));
        if let Some((field, _)) = zero {
            return Err(format!(
                "{field} must be at least 1, or null for unlimited (0 means unlimited in the \
                 --default-* flags and is refused here); revoke the tenant's keys to stop it"
            ));
        }
        if !(1..=100).contains(&merged.batch_weight) {
            return Err("batch_weight must be from 1 to 100".into());
        }
        if !(0.0..=1.0).contains(&merged.injection_threshold) {
            return Err("injection_threshold must be between 0 and 1".into());
        }
        if !(0.0..=1.0).contains(&merged.classifier_threshold) {
            return Err("classifier_threshold must be between 0 and 1".into());
        }
        if let Some(from) = merged.injection_judge_from
            && !(0.0..=merged.classifier_threshold).contains(&from)
        {
            return Err(
                "injection_judge_from must be between 0 and classifier_threshold (or null)".into(),
            );
        }
        if let Some(format) = merged.required_format() {
            sluice_prompt::structured::check_format(&format)
                .map_err(|e| format!("required_output_schema: {e}"))?;
        }
        Ok(merged)
    }

    /// Applies overrides without validating the values (they were validated when stored).
    fn apply(&self, overrides: &serde_json::Value) -> Result<Self, String> {
        let mut base = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let (Some(base_map), Some(over)) = (base.as_object_mut(), overrides.as_object()) else {
            return Err("policy overrides must be a JSON object".into());
        };
        for (k, v) in over {
            if !base_map.contains_key(k) {
                return Err(format!("unknown policy field {k:?}"));
            }
            base_map.insert(k.clone(), v.clone());
        }
        serde_json::from_value(base).map_err(|e| e.to_string())
    }
}

/// Stored overrides as JSON (`{}` when there are none or they do not parse).
fn parse_overrides(raw: Option<&str>) -> serde_json::Value {
    raw.and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_else(|| serde_json::json!({}))
}

/// Tenant policies in Redis.
#[derive(Clone)]
pub struct TenantStore {
    pool: Pool,
    ks: Keyspace,
    defaults: TenantPolicy,
}

impl TenantStore {
    pub fn new(pool: Pool, ks: Keyspace, defaults: TenantPolicy) -> Self {
        Self { pool, ks, defaults }
    }

    pub fn defaults(&self) -> &TenantPolicy {
        &self.defaults
    }

    /// The tenant's stored overrides as written (`None`: it has none).
    async fn stored(&self, tenant: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.pool.get().await?;
        Ok(redis::cmd("GET")
            .arg(self.ks.tenant_policy(tenant))
            .query_async(&mut conn)
            .await?)
    }

    async fn overrides(&self, tenant: &str) -> Result<serde_json::Value, StoreError> {
        Ok(parse_overrides(self.stored(tenant).await?.as_deref()))
    }

    /// The Redis key of a tenant's overrides (to read them in a caller's pipeline, then
    /// [`TenantStore::policy_from`]).
    pub fn policy_key(&self, tenant: &str) -> String {
        self.ks.tenant_policy(tenant)
    }

    /// The effective policy: defaults with the tenant's overrides applied.
    pub async fn policy(&self, tenant: &str) -> Result<TenantPolicy, StoreError> {
        Ok(self.policy_from(self.stored(tenant).await?.as_deref()))
    }

    /// The effective policy from the stored overrides (`None`: the tenant has none).
    /// Overrides were validated when stored, so they are only merged here; a record that no
    /// longer parses (a field removed in a newer version) falls back to the defaults rather
    /// than failing requests.
    pub fn policy_from(&self, raw: Option<&str>) -> TenantPolicy {
        let overrides = parse_overrides(raw);
        if overrides.as_object().is_some_and(|o| o.is_empty()) {
            return self.defaults.clone();
        }
        self.defaults
            .apply(&overrides)
            .unwrap_or_else(|_| self.defaults.clone())
    }

    /// Merges `changes` into the tenant's overrides after validating them; returns the new
    /// effective policy.
    pub async fn update(
        &self,
        tenant: &str,
        changes: &serde_json::Value,
    ) -> Result<Result<TenantPolicy, String>, StoreError> {
        let mut overrides = self.overrides(tenant).await?;
        let (Some(o), Some(c)) = (overrides.as_object_mut(), changes.as_object()) else {
            return Ok(Err("policy changes must be a JSON object".into()));
        };
        for (k, v) in c {
            o.insert(k.clone(), v.clone());
        }
        let policy = match self.defaults.merged(&overrides) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let mut conn = self.pool.get().await?;
        redis::cmd("SET")
            .arg(self.ks.tenant_policy(tenant))
            .arg(overrides.to_string())
            .query_async::<()>(&mut conn)
            .await?;
        Ok(Ok(policy))
    }
}

/// A tenant's consumption now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantUsage {
    /// Tokens reserved or used today (UTC); reservations of running jobs count until settled.
    pub tokens_today: u64,
    pub tokens_this_month: u64,
    /// Jobs queued or running.
    pub active_jobs: u64,
}

impl TenantStore {
    pub async fn usage(&self, tenant: &str) -> Result<TenantUsage, StoreError> {
        let now = sluice_proto::now_ms();
        let (day, month) = utc_day_and_month(now);
        let mut conn = self.pool.get().await?;
        let (today, this_month, active): (Option<i64>, Option<i64>, u64) = redis::pipe()
            .get(self.ks.tenant_tokens_day(tenant, &day))
            .get(self.ks.tenant_tokens_month(tenant, &month))
            .zcount(self.ks.tenant_active(tenant), now, "+inf")
            .query_async(&mut conn)
            .await?;
        Ok(TenantUsage {
            tokens_today: today.unwrap_or(0).max(0) as u64,
            tokens_this_month: this_month.unwrap_or(0).max(0) as u64,
            active_jobs: active,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_merge_and_validate() {
        let d = TenantPolicy::default();
        let p = d
            .merged(&serde_json::json!({"tokens_per_day": 10, "max_active_jobs": null}))
            .expect("valid");
        assert_eq!(p.tokens_per_day, Some(10));
        assert_eq!(p.max_active_jobs, None);
        assert!(d.merged(&serde_json::json!({"nope": 1})).is_err());
        assert!(
            d.merged(&serde_json::json!({"tokens_per_day": "x"}))
                .is_err()
        );
        assert!(
            d.merged(&serde_json::json!({"injection_threshold": 3}))
                .is_err()
        );
        for field in ["requests_per_second", "tokens_per_day", "max_queued_jobs"] {
            let err = d
                .merged(&serde_json::json!({ field: 0 }))
                .expect_err("0 is refused");
            assert!(err.contains(field) && err.contains("null"), "{err}");
        }
        assert!(
            d.merged(&serde_json::json!({"pii_action": "reject"}))
                .expect("valid")
                .pii_action
                == PiiAction::Reject
        );
    }

    #[test]
    fn the_judge_band_sits_below_the_classifier_threshold() {
        let d = TenantPolicy::default();
        assert!(!d.judge_band_holds(0.4), "off by default");
        let p = d
            .merged(&serde_json::json!({"injection_judge_from": 0.2, "classifier_threshold": 0.6}))
            .expect("valid");
        assert!(!p.judge_band_holds(0.19));
        assert!(p.judge_band_holds(0.2));
        assert!(p.judge_band_holds(0.59));
        assert!(
            !p.judge_band_holds(0.6),
            "the threshold and above are the action's"
        );
        assert!(
            d.merged(&serde_json::json!({"injection_judge_from": 0.7}))
                .is_err(),
            "above the default threshold 0.5"
        );
        assert!(
            d.merged(&serde_json::json!({"injection_judge_from": -0.1}))
                .is_err()
        );
        assert_eq!(
            p.merged(&serde_json::json!({"injection_judge_from": null}))
                .expect("valid")
                .injection_judge_from,
            None
        );
    }
}
