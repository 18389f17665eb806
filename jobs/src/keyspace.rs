//! Every Redis key and AMQP name Sluice uses, derived from one namespace.
//!
//! Redis keys carry a hash tag (the part in braces), so that what one script or transaction
//! touches lies in one hash slot of a Redis Cluster, while the load spreads over the slots:
//! - a job's keys (its record, its event stream) under `{job id}`;
//! - a tenant's keys (quota counters, active and queued sets, reservations, idempotency
//!   records, sessions, files, policy) under `{tenant}`;
//! - a batch's keys under its tenant's tag too (a finished line is counted against the
//!   tenant's share of the batch lane in the same script), one rate limit's under its scope;
//! - the namespace's per-job indexes (queued jobs, drain record, in-flight jobs) in
//!   [`Keyspace::queue_shards`] shards, a job's under its shard's tag (`{namespace}` for
//!   shard 0, `{namespace.N}` for shard N), so that on a cluster they spread over as many
//!   slots; they change three times per job, never per token;
//! - the namespace's other global keys (worker registry, batch and webhook indexes, the shard
//!   count) under `{namespace}`; they change per heartbeat or per batch.
//!
//! The namespace itself must not contain braces.

use sluice_proto::Priority;
use uuid::Uuid;

/// The names of one Sluice deployment (or one test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    ns: String,
    queue_shards: u16,
}

impl Keyspace {
    /// The names of `namespace`, its per-job indexes in one shard.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            ns: namespace.into(),
            queue_shards: 1,
        }
    }

    /// The same names with the per-job indexes in `shards` shards (at least 1). Every process
    /// of a namespace must use the same count ([`Keyspace::queue_shards_record`]).
    pub fn with_queue_shards(mut self, shards: u16) -> Self {
        self.queue_shards = shards.max(1);
        self
    }

    /// How many shards the per-job indexes (queued, drained, in flight) are split into.
    pub fn queue_shards(&self) -> u16 {
        self.queue_shards
    }

    /// The shard of a job's entries in the per-job indexes.
    pub fn queue_shard_of(&self, id: &Uuid) -> u16 {
        (id.as_u128() % u128::from(self.queue_shards)) as u16
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    // Redis.

    /// A global key of the namespace, under the namespace's hash tag.
    fn global(&self, name: &str) -> String {
        format!("{ns}:{{{ns}}}:{name}", ns = self.ns)
    }

    /// A per-job index of one shard: shard 0 under the namespace's tag, shard N under
    /// `{namespace.N}`.
    fn sharded(&self, shard: u16, name: &str) -> String {
        if shard == 0 {
            self.global(name)
        } else {
            format!("{ns}:{{{ns}.{shard}}}:{name}", ns = self.ns)
        }
    }

    /// String: the namespace's queue shard count, written by the first process to start, so
    /// that a process configured with another count refuses to start.
    pub fn queue_shards_record(&self) -> String {
        self.global("queue-shards")
    }

    /// Hash: the job record (tenant, status, timestamps, attempts, result, error).
    pub fn job(&self, id: &Uuid) -> String {
        format!("{}:job:{{{id}}}", self.ns)
    }

    /// Stream: a job's generated text as it is produced, then its terminal status.
    pub fn job_events(&self, id: &Uuid) -> String {
        format!("{}:job:{{{id}}}:events", self.ns)
    }

    /// Hash: one API key's metadata and the SHA-256 of its secret.
    pub fn api_key(&self, key_id: &str) -> String {
        format!("{}:apikey:{{{key_id}}}", self.ns)
    }

    /// Set: the key ids of a tenant.
    pub fn tenant_keys(&self, tenant: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:keys", self.ns)
    }

    /// String: a tenant's policy overrides (JSON).
    pub fn tenant_policy(&self, tenant: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:policy", self.ns)
    }

    /// List: a session's turns (JSON messages, oldest first), after output redaction.
    pub fn session(&self, tenant: &str, session: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:session:{session}", self.ns)
    }

    /// String: a session's system prompt, kept apart so trimming never drops it.
    pub fn session_system(&self, tenant: &str, session: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:session:{session}:system", self.ns)
    }

    /// String: the job an `Idempotency-Key` (by its SHA-256, hex) created, and the request's
    /// fingerprint, as `{job id}|{fingerprint}`; expires after 24 h.
    pub fn idempotency(&self, tenant: &str, key_hash: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:idem:{key_hash}", self.ns)
    }

    /// Sorted set: the queued jobs of one shard of the namespace, as
    /// `{priority}|{created_at}|{id}`, scored by deadline: the global queue cap (each shard
    /// holds its share) and the queue metrics.
    pub fn queued(&self, shard: u16) -> String {
        self.sharded(shard, "queued")
    }

    /// Sorted set: a tenant's queued jobs (scored by deadline), for its cap.
    pub fn tenant_queued(&self, tenant: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:queued", self.ns)
    }

    /// Sorted set: one shard's jobs that left the queue, scored by when (ms), kept for a
    /// minute: the measured drain rate behind `Retry-After`.
    pub fn drained(&self, shard: u16) -> String {
        self.sharded(shard, "drained")
    }

    /// Sorted set: one shard's jobs admitted and not yet settled, scored by when
    /// its tenant-side state is next compared with its record (ms). The reconciler walks it, so
    /// that a process that dies between a job's transition and its tenant's bookkeeping never
    /// leaves a reservation unsettled or a job short of a terminal state.
    pub fn inflight(&self, shard: u16) -> String {
        self.sharded(shard, "inflight")
    }

    /// Sorted set: a tenant's jobs queued or running, scored by deadline (its concurrency cap).
    pub fn tenant_active(&self, tenant: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:active", self.ns)
    }

    /// Hash: a tenant's unsettled token reservations, job id → `{tokens}|{day}|{month}`.
    /// Settling a job removes its field, so it is refunded at most once.
    pub fn tenant_reservations(&self, tenant: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:reserved", self.ns)
    }

    /// Counter: tokens a tenant reserved or used in a UTC day (`YYYYMMDD`).
    pub fn tenant_tokens_day(&self, tenant: &str, day: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:tokens:d:{day}", self.ns)
    }

    /// Counter: tokens a tenant reserved or used in a UTC month (`YYYYMM`).
    pub fn tenant_tokens_month(&self, tenant: &str, month: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:tokens:m:{month}", self.ns)
    }

    /// String (JSON, expiring): one worker's latest heartbeat.
    pub fn worker(&self, id: &str) -> String {
        self.global(&format!("worker:{id}"))
    }

    /// Set: the ids of workers that have written a heartbeat (pruned as their keys expire).
    pub fn workers(&self) -> String {
        self.global("workers")
    }

    /// GCRA state of one rate limit: `scope` is the subject or client (`sub:<tenant>:<key id>`,
    /// `ip:<addr>`), the hash tag, so that its limits share a slot; `window` names the limit
    /// (`s`, `m`).
    pub fn rate_limit(&self, scope: &str, window: &str) -> String {
        format!("{}:rl:{{{scope}}}:{window}", self.ns)
    }

    /// String (JSON): a tenant's file's metadata. The tenant is part of the key, so another
    /// tenant's lookup finds nothing.
    pub fn file(&self, tenant: &str, id: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:file:{id}", self.ns)
    }

    /// Sorted set: a tenant's file ids, scored by creation time (ms).
    pub fn tenant_files(&self, tenant: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:files", self.ns)
    }

    /// Hash: a batch (its tenant, request, status, timestamps, counts and cursor).
    pub fn batch(&self, tenant: &str, id: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:batch:{id}", self.ns)
    }

    /// Hash: a batch's finished lines, line index → its output or error line (JSON).
    pub fn batch_lines(&self, tenant: &str, id: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:batch:{id}:lines", self.ns)
    }

    /// Hash: a batch's lines in the queue or running, line index → job id.
    pub fn batch_inflight(&self, tenant: &str, id: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:batch:{id}:inflight", self.ns)
    }

    /// String (expiring): which API process drives the batch now (its lease).
    pub fn batch_lease(&self, tenant: &str, id: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:batch:{id}:lease", self.ns)
    }

    /// Sorted set: a tenant's batch ids, scored by creation time (ms).
    pub fn tenant_batches(&self, tenant: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:batches", self.ns)
    }

    /// Set: `{batch}:{line}` of a tenant's batch lines in the queue or running, across its
    /// batches: the tenant's share of the batch lane.
    pub fn tenant_batch_inflight(&self, tenant: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:batch-inflight", self.ns)
    }

    /// Sorted set: `{tenant}/{job id}` of jobs whose end is a webhook event, scored by when
    /// they were accepted (ms), until the event is queued.
    pub fn webhook_jobs(&self) -> String {
        self.global("webhook-jobs")
    }

    /// String (expiring): which API process is queueing a job's end event.
    pub fn webhook_job_claim(&self, id: &Uuid) -> String {
        format!("{}:webhook-jobs:{{{id}}}:claim", self.ns)
    }

    /// Sorted set: `{batch id}|{tenant}` of batches not yet terminal, which API processes
    /// drive, scored by creation time (ms).
    pub fn batches_active(&self) -> String {
        self.global("batches:active")
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

    // Webhooks.

    /// Hash: a tenant's webhook endpoints, endpoint id → its record (JSON, with the secret).
    pub fn webhook_endpoints(&self, tenant: &str) -> String {
        format!("{}:tenant:{{{tenant}}}:webhooks", self.ns)
    }

    /// List: the latest delivery attempts to one webhook endpoint (JSON, newest first).
    pub fn webhook_deliveries(&self, tenant: &str, endpoint_id: &str) -> String {
        format!(
            "{}:tenant:{{{tenant}}}:webhook:{endpoint_id}:deliveries",
            self.ns
        )
    }

    /// The direct exchange webhook deliveries are published to (routing keys `deliver`,
    /// `retry.{n}`, `dead`).
    pub fn webhooks_exchange(&self) -> String {
        format!("{}.webhooks", self.ns)
    }

    /// The quorum queue of webhook deliveries due now.
    pub fn webhooks_queue(&self) -> String {
        format!("{}.webhooks", self.ns)
    }

    /// The queue where a delivery waits out its `n`-th retry delay (1-based), then returns to
    /// [`Keyspace::webhooks_queue`].
    pub fn webhooks_retry_queue(&self, n: usize) -> String {
        format!("{}.webhooks.retry.{n}", self.ns)
    }

    /// The quorum queue of deliveries whose last attempt failed, kept for an operator.
    pub fn webhooks_dead_queue(&self) -> String {
        format!("{}.webhooks.dead", self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_namespace() {
        let ks = Keyspace::new("t1");
        let id = Uuid::nil();
        assert_eq!(ks.job(&id), format!("t1:job:{{{id}}}"));
        assert_eq!(ks.job_events(&id), format!("t1:job:{{{id}}}:events"));
        assert_eq!(ks.tenant_active("acme"), "t1:tenant:{acme}:active");
        assert_eq!(ks.queued(0), "t1:{t1}:queued");
        assert_eq!(ks.worker("w"), "t1:{t1}:worker:w");
        assert_eq!(ks.jobs_queue(), "t1.jobs.interactive");
        assert_eq!(ks.dead_letter_queue(), "t1.jobs.dead");
        assert!(ks.api_key("k").starts_with("t1:"));
    }

    #[test]
    fn per_job_indexes_spread_over_their_shards() {
        let one = Keyspace::new("t1");
        assert_eq!(one.queue_shard_of(&Uuid::now_v7()), 0);
        let ks = Keyspace::new("t1").with_queue_shards(4);
        assert_eq!(ks.queued(0), "t1:{t1}:queued");
        assert_eq!(ks.inflight(3), "t1:{t1.3}:inflight");
        let mut seen = [0u32; 4];
        for _ in 0..400 {
            seen[usize::from(ks.queue_shard_of(&Uuid::now_v7()))] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        assert_eq!(Keyspace::new("t1").with_queue_shards(0).queue_shards(), 1);
    }
}
