//! Every Redis key and AMQP name Sluice uses, derived from one namespace.

use sluice_proto::Priority;
use uuid::Uuid;

/// The names of one Sluice deployment (or one test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    ns: String,
}

impl Keyspace {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            ns: namespace.into(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    // Redis.

    /// Hash: the job record (tenant, status, timestamps, attempts, result, error).
    pub fn job(&self, id: &Uuid) -> String {
        format!("{}:job:{id}", self.ns)
    }

    /// Stream: a job's generated text as it is produced, then its terminal status.
    pub fn job_events(&self, id: &Uuid) -> String {
        format!("{}:job:{id}:events", self.ns)
    }

    /// Hash: one API key's metadata and the SHA-256 of its secret.
    pub fn api_key(&self, key_id: &str) -> String {
        format!("{}:apikey:{key_id}", self.ns)
    }

    /// Set: the key ids of a tenant.
    pub fn tenant_keys(&self, tenant: &str) -> String {
        format!("{}:tenant:{tenant}:keys", self.ns)
    }

    /// String: a tenant's policy overrides (JSON).
    pub fn tenant_policy(&self, tenant: &str) -> String {
        format!("{}:tenant:{tenant}:policy", self.ns)
    }

    /// List: a session's turns (JSON messages, oldest first), after output redaction.
    pub fn session(&self, tenant: &str, session: &str) -> String {
        format!("{}:tenant:{tenant}:session:{session}", self.ns)
    }

    /// String: a session's system prompt, kept apart so trimming never drops it.
    pub fn session_system(&self, tenant: &str, session: &str) -> String {
        format!("{}:tenant:{tenant}:session:{session}:system", self.ns)
    }

    /// String: the job an `Idempotency-Key` (by its SHA-256, hex) created, and the request's
    /// fingerprint, as `{job id}|{fingerprint}`; expires after 24 h.
    pub fn idempotency(&self, tenant: &str, key_hash: &str) -> String {
        format!("{}:tenant:{tenant}:idem:{key_hash}", self.ns)
    }

    /// Sorted set: every queued job of the namespace (scored by deadline), for the global cap.
    pub fn queued(&self) -> String {
        format!("{}:queued", self.ns)
    }

    /// Sorted set: a tenant's queued jobs (scored by deadline), for its cap.
    pub fn tenant_queued(&self, tenant: &str) -> String {
        format!("{}:tenant:{tenant}:queued", self.ns)
    }

    /// Prefix of per-second counters of jobs leaving the queue (`{prefix}{unix second}`): the
    /// measured drain rate behind `Retry-After`.
    pub fn drain_prefix(&self) -> String {
        format!("{}:drain:", self.ns)
    }

    /// Counter: a tenant's jobs queued plus running.
    pub fn tenant_active(&self, tenant: &str) -> String {
        format!("{}:tenant:{tenant}:active", self.ns)
    }

    /// Counter: tokens a tenant reserved or used in a UTC day (`YYYYMMDD`).
    pub fn tenant_tokens_day(&self, tenant: &str, day: &str) -> String {
        format!("{}:tenant:{tenant}:tokens:d:{day}", self.ns)
    }

    /// Counter: tokens a tenant reserved or used in a UTC month (`YYYYMM`).
    pub fn tenant_tokens_month(&self, tenant: &str, month: &str) -> String {
        format!("{}:tenant:{tenant}:tokens:m:{month}", self.ns)
    }

    /// String (JSON, expiring): one worker's latest heartbeat.
    pub fn worker(&self, id: &str) -> String {
        format!("{}:worker:{id}", self.ns)
    }

    /// Set: the ids of workers that have written a heartbeat (pruned as their keys expire).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.ns)
    }

    /// Prefix of job records (`{prefix}{id}` = [`Keyspace::job`]), for scripts that walk jobs.
    pub fn job_prefix(&self) -> String {
        format!("{}:job:", self.ns)
    }

    /// GCRA state of one rate limit (`scope` is e.g. `key:<id>:s` or `ip:<addr>:m`).
    pub fn rate_limit(&self, scope: &str) -> String {
        format!("{}:rl:{scope}", self.ns)
    }

    // AMQP.

    /// The direct exchange jobs are published to.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.ns)
    }

    /// The quorum queue of interactive jobs.
    pub fn jobs_queue(&self) -> String {
        self.jobs_queue_for(Priority::Interactive)
    }

    /// The quorum queue of one class (`{ns}.jobs.interactive`, `{ns}.jobs.batch`); its routing
    /// key is the class name.
    pub fn jobs_queue_for(&self, priority: Priority) -> String {
        format!("{}.jobs.{}", self.ns, priority.as_str())
    }

    /// The dead-letter exchange (fanout) and the queue where dead letters wait for an operator.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.ns)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.jobs.dead", self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_namespace() {
        let ks = Keyspace::new("t1");
        let id = Uuid::nil();
        assert_eq!(ks.job(&id), format!("t1:job:{id}"));
        assert_eq!(ks.jobs_queue(), "t1.jobs.interactive");
        assert_eq!(ks.dead_letter_queue(), "t1.jobs.dead");
        assert!(ks.api_key("k").starts_with("t1:"));
    }
}
