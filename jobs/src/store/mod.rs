//! The job record in Redis and its state transitions.
//!
//! Generated text is also appended to a stream at [`Keyspace::job_events`], which `FINISH`
//! closes with a `done` event in the same script as the terminal write.
//!
//! A job is one hash at [`Keyspace::job`]: `tenant`, `status`, `created_at`, `deadline`,
//! `attempts`, and once known `started_at`, `finished_at`, `worker`, `result` (JSON),
//! `error` (JSON), `cancel_requested`, `used`. Every change of a job's status is one Lua
//! script on its record, so two API replicas and any number of workers can race on a job and
//! it still moves exactly once into a terminal state, which never changes afterwards.
//!
//! What a job holds of its tenant's (a token reservation on the day and month counters, a
//! place in the active and queued sets) lives in the tenant's hash slot, and its place in the
//! namespace's queue in the namespace's slot, so on a Redis Cluster they cannot change in the
//! same script as the record. Each side changes atomically on its own, in an order that only
//! ever errs towards holding too much, and every step is idempotent:
//! - **admit**: a place in the namespace's queue and an entry in the in-flight index
//!   ([`Keyspace::inflight`]); then the tenant's checks and reservation, in one script (a
//!   refusal undoes the first step); then the record, unless one exists.
//! - **end** (finish, cancel, a start that ends the job, rollback): the record's terminal
//!   write; then the tenant's settlement, which refunds the unused tokens and removes the
//!   reservation's field in one script, so a second settlement refunds nothing; then off the
//!   namespace's queue and index.
//! - **reconcile** ([`JobStore::reconcile`]): a process that dies between two steps leaves the
//!   job in the in-flight index, where a reconciler (every API process runs one) finds it,
//!   compares the tenant's and the namespace's state with the record, and finishes the steps:
//!   an admission that never wrote its record is fenced with a terminal record and refunded; a
//!   job that ended is settled; a job still queued or running long past its deadline (its
//!   message was lost with the process that should have published it) is expired.
//!
//! Quotas are therefore exact: a reservation is taken before its job can run and refunded at
//! most once; for a moment after a crash it may stay held, never overspent.

use crate::redis_pool::{Connection, Pool, query_each};
use redis::Script;
use sluice_proto::{ErrorBody, JobMessage, JobResult, JobStatus, JobView, Priority};
use std::sync::LazyLock;
use uuid::Uuid;

use crate::keyspace::Keyspace;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis is unreachable: {0}")]
    Unavailable(String),
    #[error("redis command failed: {0}")]
    Command(#[from] redis::RedisError),
    #[error("corrupt job record {id}: {detail}")]
    Corrupt { id: Uuid, detail: String },
    /// Another record (a batch's, a file's) that does not parse.
    #[error("corrupt record: {0}")]
    CorruptRecord(String),
}

impl From<crate::redis_pool::PoolError> for StoreError {
    fn from(e: crate::redis_pool::PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// What a worker should do with a delivery, decided atomically by [`JobStore::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    /// Run it; this is attempt number `attempt` (1 on first delivery).
    Run { attempt: u32 },
    /// Do not run it: it was terminal already (an earlier delivery finished it).
    Skip(JobStatus),
    /// Do not run it: this call made it terminal (cancel requested, deadline passed, out of
    /// attempts).
    Ended(JobStatus),
    /// No record: it expired from Redis, or its submit was rolled back. Drop the message.
    Missing,
    /// Do not run it: the job is running and this is the first delivery of another copy of its
    /// message (an idempotent retry published it again); the worker running it is alive as far
    /// as the broker knows. Drop the message.
    Duplicate,
}

/// Outcome of a cancel request.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// No such job for this tenant.
    NotFound,
    /// The job was queued and this call cancelled it (it will never be generated).
    Cancelled,
    /// The job was cancelled before (a repeated cancel).
    AlreadyCancelled,
    /// The job is running; its worker stops at its next token.
    Cancelling,
    /// The job already ended otherwise.
    AlreadyFinished(JobStatus),
}

/// What admitting a job checks and reserves (from the tenant's policy).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// Tokens reserved: prompt tokens plus `max_tokens`.
    pub reserve: u64,
    pub max_active: Option<u32>,
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
    /// Guard categories that fired under a `flag` action, recorded on the job.
    pub flags: Vec<String>,
    /// The `Idempotency-Key` record ([`Keyspace::idempotency`]) and the request's fingerprint.
    pub idempotency: Option<(String, String)>,
    /// Queued jobs allowed in the whole namespace, and for this tenant.
    pub max_queued: Option<u32>,
    pub max_queued_tenant: Option<u32>,
}

/// How long an `Idempotency-Key` maps to its job.
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaPeriod {
    Day,
    Month,
}

impl QuotaPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitOutcome {
    Admitted,
    /// The same `Idempotency-Key` and request created this job earlier: nothing new was
    /// written or reserved.
    Duplicate(Uuid),
    /// The same `Idempotency-Key` came with a different request.
    IdempotencyMismatch,
    /// The queue (the namespace's, or the tenant's share) is at its cap; `retry_after_secs`
    /// comes from the rate jobs left the queue in the last minute.
    QueueFull {
        tenant: bool,
        queued: u64,
        limit: u64,
        retry_after_secs: u64,
    },
    ConcurrencyLimited {
        active: u64,
        limit: u64,
    },
    QuotaExceeded {
        period: QuotaPeriod,
        used: u64,
        limit: u64,
    },
}

/// The terminal write of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Terminal {
    pub status: JobStatus,
    pub result: Option<JobResult>,
    pub error: Option<ErrorBody>,
}

/// A script of `lua/`, compiled into the binary and hashed at first use.
macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| Script::new(include_str!(concat!("lua/", $file))))
    };
}

// Each script's keys and arguments are described at its top.
static JOB_CREATE: LazyLock<Script> = script!("job_create.lua");
static JOB_START: LazyLock<Script> = script!("job_start.lua");
static JOB_FINISH: LazyLock<Script> = script!("job_finish.lua");
static JOB_CANCEL: LazyLock<Script> = script!("job_cancel.lua");
static JOB_RELEASE: LazyLock<Script> = script!("job_release.lua");
static JOB_ROLLBACK: LazyLock<Script> = script!("job_rollback.lua");
static JOB_FENCE: LazyLock<Script> = script!("job_fence.lua");
static TENANT_ADMIT: LazyLock<Script> = script!("tenant_admit.lua");
static TENANT_SETTLE: LazyLock<Script> = script!("tenant_settle.lua");
static TENANT_MIRROR: LazyLock<Script> = script!("tenant_mirror.lua");
static GLOBAL_ENTER: LazyLock<Script> = script!("global_enter.lua");
static GLOBAL_UPDATE: LazyLock<Script> = script!("global_update.lua");
static GLOBAL_CLAIM: LazyLock<Script> = script!("global_claim.lua");
static QUEUE_STATS: LazyLock<Script> = script!("queue_stats.lua");

/// The reconciler first looks at an admitted job this long after its admission began: an
/// admission (three short scripts, each with a two-second timeout) is over by then.
pub const ADMISSION_GRACE_MS: u64 = 60_000;
/// Then it looks again this often while the job is in flight.
pub const RECHECK_MS: u64 = 30_000;
/// A job still queued or running this long past its deadline has no process left that will end
/// it (workers stop a job at its deadline): the reconciler expires it.
pub const EXPIRY_GRACE_MS: u64 = 120_000;
/// How long a retry that names a job by its idempotency key waits for that job's record
/// ([`JobStore::until_written`]): an admission writes it two script calls after the key.
pub const DUPLICATE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The job's identity as the tenant's and the namespace's sets name it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct JobRef {
    id: Uuid,
    tenant: String,
    created_at: u64,
    priority: Priority,
    deadline: u64,
}

impl JobRef {
    fn of(job: &JobMessage) -> Self {
        Self {
            id: job.id,
            tenant: job.tenant.clone(),
            created_at: job.created_at,
            priority: job.priority,
            deadline: job.deadline,
        }
    }

    /// From a script's reply: tenant, created_at, priority, deadline (absent when the record
    /// is missing).
    fn from_reply(id: Uuid, fields: &[Option<String>]) -> Option<Self> {
        let num = |i: usize| fields.get(i)?.as_deref()?.parse::<u64>().ok();
        Some(Self {
            id,
            tenant: fields.first()?.clone()?,
            created_at: num(1)?,
            // Records admitted before the priority was kept are interactive.
            priority: fields
                .get(2)
                .and_then(|p| p.as_deref())
                .and_then(Priority::parse)
                .unwrap_or(Priority::Interactive),
            deadline: num(3)?,
        })
    }

    /// Its member in the namespace's queued set: `{priority}|{created_at}|{id}`.
    fn queued_member(&self) -> String {
        format!("{}|{}|{}", self.priority.as_str(), self.created_at, self.id)
    }

    /// Its member in the in-flight index: `{id}|{priority}|{created_at}|{deadline}|{tenant}`.
    fn inflight_member(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.id,
            self.priority.as_str(),
            self.created_at,
            self.deadline,
            self.tenant
        )
    }

    fn parse_inflight(member: &str) -> Option<Self> {
        let mut parts = member.splitn(5, '|');
        let id = Uuid::parse_str(parts.next()?).ok()?;
        let priority = Priority::parse(parts.next()?)?;
        let created_at = parts.next()?.parse().ok()?;
        let deadline = parts.next()?.parse().ok()?;
        let tenant = parts.next()?.to_string();
        Some(Self {
            id,
            tenant,
            created_at,
            priority,
            deadline,
        })
    }
}

/// What one pass of [`JobStore::reconcile`] found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// In-flight entries looked at.
    pub examined: u64,
    /// Ended jobs whose reservation this pass refunded and settled.
    pub settled: u64,
    /// Admissions that never wrote their record, fenced and refunded.
    pub fenced: u64,
    /// Jobs queued or running long past their deadline, expired.
    pub expired: u64,
}

/// The job records of one namespace.
#[derive(Clone)]
pub struct JobStore {
    pool: Pool,
    ks: Keyspace,
    result_ttl_secs: u64,
}

impl JobStore {
    pub fn new(pool: Pool, ks: Keyspace, result_ttl_secs: u64) -> Self {
        Self {
            pool,
            ks,
            result_ttl_secs,
        }
    }

    pub fn keyspace(&self) -> &Keyspace {
        &self.ks
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn conn(&self) -> Result<crate::redis_pool::Connection, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Whether Redis answers a PING.
    pub async fn ping(&self) -> bool {
        let Ok(mut conn) = self.conn().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    /// Admits a new job: takes a place in the namespace's queue, then checks the tenant's
    /// idempotency record, queue share, active-job cap and token quotas and reserves
    /// `admission.reserve` tokens on the day and month counters (one script), then writes the
    /// record as `queued`. A refusal leaves nothing behind.
    #[tracing::instrument(level = "info", skip_all, name = "store.admit")]
    pub async fn admit(
        &self,
        job: &JobMessage,
        admission: &Admission,
    ) -> Result<AdmitOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let r = JobRef::of(job);
        let now = job.created_at;
        let limit = |l: Option<u64>| l.map_or(-1, |v| v as i64);

        // Each shard of the namespace's queue holds its share of the cap.
        let shards = u64::from(self.ks.queue_shards());
        let shard = self.ks.queue_shard_of(&job.id);
        let (outcome, queued, cap): (String, u64, u64) = GLOBAL_ENTER
            .key(self.ks.queued(shard))
            .key(self.ks.inflight(shard))
            .arg(now)
            .arg(limit(
                admission
                    .max_queued
                    .map(|cap| u64::from(cap).div_ceil(shards)),
            ))
            .arg(r.queued_member())
            .arg(r.deadline)
            .arg(r.inflight_member())
            .arg(now + ADMISSION_GRACE_MS)
            .invoke_async(&mut conn)
            .await?;
        if outcome != "ok" {
            // In the shard's terms: `queued` of the namespace's jobs, as far as this shard
            // tells, against the whole cap.
            return Ok(AdmitOutcome::QueueFull {
                tenant: false,
                queued: queued * shards,
                limit: admission.max_queued.map_or(cap, u64::from),
                retry_after_secs: self
                    .retry_after(&mut conn, (queued + 1 - cap) * shards, now)
                    .await,
            });
        }

        let (day, month) = crate::calendar::utc_day_and_month(job.created_at);
        let day_key = self.ks.tenant_tokens_day(&job.tenant, &day);
        let (idem_key, fingerprint) = match &admission.idempotency {
            Some((k, f)) => (k.clone(), f.clone()),
            None => (self.ks.tenant_active(&job.tenant), String::new()),
        };
        // If this fails, whether or not the script ran, the reconciler settles whatever it
        // reserved: its first look fences the record this admission never wrote.
        let (outcome, used, limit, existing): (String, u64, u64, String) = TENANT_ADMIT
            .key(self.ks.tenant_active(&job.tenant))
            .key(&day_key)
            .key(self.ks.tenant_tokens_month(&job.tenant, &month))
            .key(&idem_key)
            .key(self.ks.tenant_queued(&job.tenant))
            .key(self.ks.tenant_reservations(&job.tenant))
            .arg(now)
            .arg(limit(admission.max_active.map(u64::from)))
            .arg(limit(admission.tokens_per_day))
            .arg(limit(admission.tokens_per_month))
            .arg(admission.reserve)
            .arg(&fingerprint)
            .arg(IDEMPOTENCY_TTL_SECS)
            .arg(limit(admission.max_queued_tenant.map(u64::from)))
            .arg(job.id.to_string())
            .arg(job.deadline)
            .arg(reservation_record(
                admission.reserve,
                &day,
                &month,
                &fingerprint,
                &idem_key,
            ))
            .invoke_async(&mut conn)
            .await?;
        if outcome != "ok" {
            // Nothing of the tenant's was reserved: give the queue place back. If this fails,
            // the reconciler does it (and fences the id) at its first look.
            if let Err(e) = self.global(&mut conn, &r, "remove", now).await {
                tracing::warn!(error = %e, job = %job.id, "cannot release a refused job's queue place");
            }
            return Ok(match outcome.as_str() {
                "duplicate" => {
                    let id = Uuid::parse_str(&existing).map_err(|e| StoreError::Corrupt {
                        id: job.id,
                        detail: format!("idempotency record names {existing:?}: {e}"),
                    })?;
                    self.until_written(&mut conn, &id).await?;
                    AdmitOutcome::Duplicate(id)
                }
                "idempotency_mismatch" => AdmitOutcome::IdempotencyMismatch,
                "tenant_queue_full" => AdmitOutcome::QueueFull {
                    tenant: true,
                    queued: used,
                    limit,
                    retry_after_secs: self.retry_after(&mut conn, used + 1 - limit, now).await,
                },
                "concurrency" => AdmitOutcome::ConcurrencyLimited {
                    active: used,
                    limit,
                },
                "quota_day" => AdmitOutcome::QuotaExceeded {
                    period: QuotaPeriod::Day,
                    used,
                    limit,
                },
                _ => AdmitOutcome::QuotaExceeded {
                    period: QuotaPeriod::Month,
                    used,
                    limit,
                },
            });
        }

        let ttl = job.deadline.saturating_sub(job.created_at) / 1000 + self.result_ttl_secs;
        let mut fields = vec![
            ("id", job.id.to_string()),
            ("tenant", job.tenant.clone()),
            ("status", JobStatus::Queued.as_str().to_string()),
            ("created_at", job.created_at.to_string()),
            ("deadline", job.deadline.to_string()),
            ("priority", job.priority.as_str().to_string()),
            ("attempts", "0".to_string()),
            ("reserved", admission.reserve.to_string()),
        ];
        if !admission.flags.is_empty() {
            fields.push(("flags", admission.flags.join(",")));
        }
        if !fingerprint.is_empty() {
            fields.push(("idem_key", idem_key));
        }
        let mut create = JOB_CREATE.prepare_invoke();
        create.key(self.ks.job(&job.id)).arg(ttl);
        for (k, v) in &fields {
            create.arg(*k).arg(v);
        }
        let written: i64 = create.invoke_async(&mut conn).await?;
        if written != 1 {
            // The reconciler fenced this admission (it took longer than ADMISSION_GRACE_MS) and
            // refunds its reservation.
            return Err(StoreError::Unavailable(format!(
                "the admission of job {} took too long and was abandoned",
                job.id
            )));
        }
        Ok(AdmitOutcome::Admitted)
    }

    /// Waits until the record of `id`, a job named by an idempotency record, exists: its
    /// admission writes the idempotency record a moment before the job's, so a concurrent
    /// retry can find the first before the second. An admission that does not write it within
    /// [`DUPLICATE_WAIT`] is stalled or dead (the reconciler fences it and frees the key), and
    /// the retry is told to come back rather than given an id that reads as missing.
    async fn until_written(&self, conn: &mut Connection, id: &Uuid) -> Result<(), StoreError> {
        let key = self.ks.job(id);
        let started = std::time::Instant::now();
        loop {
            let (status, fenced): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(&key)
                .arg("status")
                .arg("fenced")
                .query_async(conn)
                .await?;
            if fenced.is_some() {
                // The admission died before its record; the reconciler's fence stands in for
                // it until the settlement frees the key (a moment later). The retry must not
                // get that failure: it comes back and is admitted afresh.
                return Err(StoreError::Unavailable(format!(
                    "job {id}, which this Idempotency-Key names, was abandoned by the process \
                     admitting it; retry"
                )));
            }
            if status.is_some() {
                return Ok(());
            }
            if started.elapsed() >= DUPLICATE_WAIT {
                return Err(StoreError::Unavailable(format!(
                    "job {id}, which this Idempotency-Key names, is still being admitted"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// `Retry-After` for `excess` jobs over a queue cap (the namespace's or a tenant's share),
    /// from the jobs that left the queue in the last minute: the time they take to drain at
    /// that rate, 1 s to 5 minutes; 30 s when none left, or when Redis does not say.
    async fn retry_after(&self, conn: &mut Connection, excess: u64, now: u64) -> u64 {
        let since = format!("({}", now.saturating_sub(60_000));
        let counts = (0..self.ks.queue_shards())
            .map(|shard| {
                let mut cmd = redis::cmd("ZCOUNT");
                cmd.arg(self.ks.drained(shard)).arg(&since).arg("+inf");
                cmd
            })
            .collect();
        let drained: Result<Vec<u64>, _> = query_each(conn, counts).await;
        match drained.map(|counts| counts.iter().sum::<u64>()) {
            Ok(d) if d > 0 => (excess.max(1) * 60).div_ceil(d).clamp(1, 300),
            _ => 30,
        }
    }

    /// One of `lua/global_update.lua`'s operations on the namespace's queued set and in-flight
    /// index.
    async fn global(
        &self,
        conn: &mut Connection,
        r: &JobRef,
        op: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        let shard = self.ks.queue_shard_of(&r.id);
        GLOBAL_UPDATE
            .key(self.ks.queued(shard))
            .key(self.ks.drained(shard))
            .key(self.ks.inflight(shard))
            .arg(now)
            .arg(op)
            .arg(r.queued_member())
            .arg(r.deadline)
            .arg(r.inflight_member())
            .invoke_async::<i64>(conn)
            .await?;
        Ok(())
    }

    /// Settles an ended job on its tenant's side (refunds `reserved - used`, at most once) and
    /// removes it from the namespace's queue and in-flight index. Returns whether this call
    /// refunded it. With `idempotency`, also drops that record if it names the job.
    async fn settle(
        &self,
        conn: &mut Connection,
        r: &JobRef,
        used: u64,
        idempotency: Option<&str>,
    ) -> Result<bool, StoreError> {
        let (day, month) = crate::calendar::utc_day_and_month(r.created_at);
        let reservations = self.ks.tenant_reservations(&r.tenant);
        let settled: i64 = TENANT_SETTLE
            .key(&reservations)
            .key(self.ks.tenant_active(&r.tenant))
            .key(self.ks.tenant_queued(&r.tenant))
            .key(self.ks.tenant_tokens_day(&r.tenant, &day))
            .key(self.ks.tenant_tokens_month(&r.tenant, &month))
            .key(idempotency.unwrap_or(&reservations))
            .arg(r.id.to_string())
            .arg(used)
            .arg(&day)
            .arg(&month)
            .arg(u8::from(idempotency.is_some()))
            .invoke_async(&mut *conn)
            .await?;
        if settled < 0 {
            return Err(StoreError::Corrupt {
                id: r.id,
                detail: "its reservation names other counters than its creation time's".into(),
            });
        }
        self.global(conn, r, "remove", sluice_proto::now_ms())
            .await?;
        Ok(settled == 1)
    }

    /// The idempotency record that a job's reservation names, if its admission had one.
    async fn reserved_idempotency(
        &self,
        conn: &mut Connection,
        r: &JobRef,
    ) -> Result<Option<String>, StoreError> {
        let record: Option<String> = redis::cmd("HGET")
            .arg(self.ks.tenant_reservations(&r.tenant))
            .arg(r.id.to_string())
            .query_async(conn)
            .await?;
        Ok(record
            .and_then(|v| v.splitn(4, '|').nth(3).map(str::to_string))
            .filter(|k| !k.is_empty()))
    }

    /// [`JobStore::settle`] after a transition that already happened: a failure is logged,
    /// not returned (the transition stands; the reconciler settles the job).
    async fn settle_after(&self, conn: &mut Connection, r: &JobRef, used: u64, idem: Option<&str>) {
        if let Err(e) = self.settle(conn, r, used, idem).await {
            tracing::warn!(error = %e, job = %r.id, "settlement left to the reconciler");
        }
    }

    /// Makes the tenant's sets and the namespace's queue say what the record says of a job in
    /// flight (`queued` or `running`); `counted` records a job leaving the queue as drained.
    async fn mirror(
        &self,
        conn: &mut Connection,
        r: &JobRef,
        status: JobStatus,
        counted: bool,
    ) -> Result<(), StoreError> {
        let queued = status == JobStatus::Queued;
        TENANT_MIRROR
            .key(self.ks.tenant_reservations(&r.tenant))
            .key(self.ks.tenant_active(&r.tenant))
            .key(self.ks.tenant_queued(&r.tenant))
            .arg(r.id.to_string())
            .arg(r.deadline)
            .arg(if queued { "queued" } else { "running" })
            .invoke_async::<i64>(&mut *conn)
            .await?;
        let op = match (queued, counted) {
            (true, _) => "enter",
            (false, true) => "leave",
            (false, false) => "drop",
        };
        self.global(conn, r, op, sluice_proto::now_ms()).await
    }

    /// Undoes an admission whose publish failed: deletes the record, refunds the reservation,
    /// frees the active slot and the queue place and the idempotency key, so nothing is left
    /// half-written.
    pub async fn rollback(&self, id: &Uuid) -> Result<(), StoreError> {
        self.undo(id, None).await
    }

    /// Undoes an admission whose answer was lost (Redis failed during `admit`) or whose publish
    /// failed: like [`JobStore::rollback`], and also when the record was never written, in
    /// which case whatever the tenant's step reserved is refunded now rather than at the
    /// reconciler's first look. `idempotency` is the admission's idempotency record, dropped if
    /// it names this job. A no-op for a job that was published and started.
    pub async fn abandon(
        &self,
        job: &JobMessage,
        idempotency: Option<&str>,
    ) -> Result<(), StoreError> {
        self.undo(&job.id, Some((JobRef::of(job), idempotency)))
            .await
    }

    /// [`JobStore::rollback`], and with `missing` (the job and its idempotency record) also the
    /// settlement of an admission whose record was never written.
    async fn undo(
        &self,
        id: &Uuid,
        missing: Option<(JobRef, Option<&str>)>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let reply: Vec<Option<String>> = JOB_ROLLBACK
            .key(self.ks.job(id))
            .invoke_async(&mut conn)
            .await?;
        match reply.first().and_then(|d| d.as_deref()) {
            Some("1") => {
                if let Some(r) = JobRef::from_reply(*id, &reply[1..]) {
                    let idem = reply.get(5).cloned().flatten();
                    self.settle(&mut conn, &r, 0, idem.as_deref()).await?;
                }
            }
            Some("-1") => {
                if let Some((r, idem)) = missing {
                    self.settle(&mut conn, &r, 0, idem).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads a job as its tenant sees it; another tenant's job is `None`, like a missing one.
    pub async fn get(&self, tenant: &str, id: &Uuid) -> Result<Option<JobView>, StoreError> {
        let mut conn = self.conn().await?;
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.ks.job(id))
            .query_async(&mut conn)
            .await?;
        if fields.get("tenant").map(String::as_str) != Some(tenant) {
            return Ok(None);
        }
        view_from_fields(*id, &fields).map(Some)
    }

    /// When a job of `tenant` that is still `queued` was accepted and when its deadline falls
    /// (ms since the epoch); `None` when it is not queued (or not the tenant's). An idempotent
    /// retry of a queued job publishes it again with these: its first publish may have died
    /// with the process that admitted it.
    pub async fn queued_schedule(
        &self,
        tenant: &str,
        id: &Uuid,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let mut conn = self.conn().await?;
        let (owner, status, created_at, deadline): (
            Option<String>,
            Option<String>,
            Option<u64>,
            Option<u64>,
        ) = redis::cmd("HMGET")
            .arg(self.ks.job(id))
            .arg("tenant")
            .arg("status")
            .arg("created_at")
            .arg("deadline")
            .query_async(&mut conn)
            .await?;
        if owner.as_deref() != Some(tenant) || status.as_deref() != Some("queued") {
            return Ok(None);
        }
        Ok(created_at.zip(deadline))
    }

    /// Reads many jobs of one tenant at once (one round trip on one server), in the order of
    /// `ids`; another tenant's job is `None`, like a missing one.
    pub async fn get_many(
        &self,
        tenant: &str,
        ids: &[Uuid],
    ) -> Result<Vec<Option<JobView>>, StoreError> {
        let cmds = ids
            .iter()
            .map(|id| redis::cmd("HGETALL").arg(self.ks.job(id)).to_owned())
            .collect();
        let mut conn = self.conn().await?;
        let all: Vec<std::collections::HashMap<String, String>> =
            query_each(&mut conn, cmds).await?;
        ids.iter()
            .zip(all)
            .map(|(id, fields)| {
                if fields.get("tenant").map(String::as_str) != Some(tenant) {
                    return Ok(None);
                }
                view_from_fields(*id, &fields).map(Some)
            })
            .collect()
    }

    /// Cancels a job for its tenant (see [`CancelOutcome`]).
    pub async fn cancel(&self, tenant: &str, id: &Uuid) -> Result<CancelOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let reply: Vec<Option<String>> = JOB_CANCEL
            .key(self.ks.job(id))
            .arg(tenant)
            .arg(sluice_proto::now_ms())
            .arg(self.result_ttl_secs)
            .invoke_async(&mut conn)
            .await?;
        let outcome = reply.first().cloned().flatten().unwrap_or_default();
        Ok(match outcome.as_str() {
            "missing" => CancelOutcome::NotFound,
            "cancelled_now" => {
                if let Some(r) = JobRef::from_reply(*id, &reply[1..]) {
                    self.settle_after(&mut conn, &r, 0, None).await;
                }
                CancelOutcome::Cancelled
            }
            "cancelling" => CancelOutcome::Cancelling,
            other => match JobStatus::parse(other) {
                Some(JobStatus::Cancelled) => CancelOutcome::AlreadyCancelled,
                Some(status) => CancelOutcome::AlreadyFinished(status),
                None => {
                    return Err(StoreError::Corrupt {
                        id: *id,
                        detail: format!("unknown status {other:?}"),
                    });
                }
            },
        })
    }

    /// Decides atomically whether a delivered job runs, and marks it `running` if so.
    /// `redelivered` is the broker's flag: the message was delivered before (its worker died
    /// or gave it back), so a `running` job runs again; on a first delivery a `running` job
    /// is a [`StartOutcome::Duplicate`], unless this same delivery started it (`delivery`, a
    /// token the worker keeps for one delivery: a retry whose first reply was lost).
    #[tracing::instrument(level = "info", skip_all, name = "store.start")]
    pub async fn start(
        &self,
        id: &Uuid,
        max_attempts: u32,
        worker: &str,
        redelivered: bool,
        delivery: &str,
    ) -> Result<StartOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let reply: Vec<Option<String>> = JOB_START
            .key(self.ks.job(id))
            .arg(sluice_proto::now_ms())
            .arg(max_attempts)
            .arg(worker)
            .arg(u8::from(redelivered))
            .arg(delivery)
            .invoke_async(&mut conn)
            .await?;
        let field = |i: usize| reply.get(i).cloned().flatten().unwrap_or_default();
        let status = field(0);
        match status.as_str() {
            "missing" => return Ok(StartOutcome::Missing),
            "duplicate" => return Ok(StartOutcome::Duplicate),
            _ => {}
        }
        let attempt: u32 = field(1).parse().unwrap_or(0);
        let ended_now = field(2) == "1";
        let left_queue = field(3) == "1";
        let r = JobRef::from_reply(*id, reply.get(4..).unwrap_or_default());
        let parsed = JobStatus::parse(&status);
        if let Some(r) = &r {
            if ended_now {
                if left_queue {
                    let _ = self
                        .global(&mut conn, r, "leave", sluice_proto::now_ms())
                        .await;
                }
                self.settle_after(&mut conn, r, 0, None).await;
            } else if parsed == Some(JobStatus::Running)
                && left_queue
                && let Err(e) = self.mirror(&mut conn, r, JobStatus::Running, true).await
            {
                tracing::warn!(error = %e, job = %id, "queue bookkeeping left to the reconciler");
            }
        }
        match parsed {
            Some(JobStatus::Running) => Ok(StartOutcome::Run { attempt }),
            Some(s) if ended_now => Ok(StartOutcome::Ended(s)),
            Some(s) => Ok(StartOutcome::Skip(s)),
            None => Err(StoreError::Corrupt {
                id: *id,
                detail: format!("unknown status {status:?}"),
            }),
        }
    }

    /// Writes the terminal state unless the job is terminal already. Returns whether this call
    /// wrote it: a job is never completed twice.
    #[tracing::instrument(level = "info", skip_all, name = "store.finish")]
    pub async fn finish(&self, id: &Uuid, terminal: &Terminal) -> Result<bool, StoreError> {
        // Tokens actually consumed: a job that generated pays for its prompt and output; a job
        // that failed pays nothing.
        let used = match (&terminal.result, terminal.status) {
            (Some(r), JobStatus::Succeeded | JobStatus::Cancelled | JobStatus::Expired) => {
                u64::from(r.usage.prompt_tokens) + u64::from(r.usage.completion_tokens)
            }
            _ => 0,
        };
        let mut conn = self.conn().await?;
        let result = terminal
            .result
            .as_ref()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
            .unwrap_or_default();
        let error = terminal
            .error
            .as_ref()
            .map(|e| serde_json::to_string(e).unwrap_or_default())
            .unwrap_or_default();
        let written = self
            .finish_record(
                &mut conn,
                id,
                terminal.status.as_str(),
                &result,
                &error,
                used,
            )
            .await?;
        Ok(written)
    }

    /// The terminal write and, if this call made it, the settlement.
    async fn finish_record(
        &self,
        conn: &mut Connection,
        id: &Uuid,
        status: &str,
        result: &str,
        error: &str,
        used: u64,
    ) -> Result<bool, StoreError> {
        let reply: Vec<Option<String>> = JOB_FINISH
            .key(self.ks.job(id))
            .key(self.ks.job_events(id))
            .arg(status)
            .arg(result)
            .arg(error)
            .arg(sluice_proto::now_ms())
            .arg(self.result_ttl_secs)
            .arg(used)
            .invoke_async(&mut *conn)
            .await?;
        let written = reply.first().and_then(|w| w.as_deref()) == Some("1");
        if written && let Some(r) = JobRef::from_reply(*id, &reply[1..]) {
            self.settle_after(conn, &r, used, None).await;
        }
        Ok(written)
    }

    /// Puts a running job back to `queued` (the worker gives it back unfinished).
    #[tracing::instrument(level = "info", skip_all, name = "store.release")]
    pub async fn release(&self, id: &Uuid) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let reply: Vec<Option<String>> = JOB_RELEASE
            .key(self.ks.job(id))
            .invoke_async(&mut conn)
            .await?;
        let released = reply.first().and_then(|w| w.as_deref()) == Some("1");
        if released
            && let Some(r) = JobRef::from_reply(*id, &reply[1..])
            && let Err(e) = self.mirror(&mut conn, &r, JobStatus::Queued, false).await
        {
            tracing::warn!(error = %e, job = %id, "queue bookkeeping left to the reconciler");
        }
        Ok(released)
    }

    /// One pass of the reconciler over the in-flight index: each job due for a look (at most
    /// `limit` per queue shard) has its tenant's and the namespace's state made to agree with
    /// its record, and is settled if it ended (see the module's documentation). Every API
    /// process runs this every few seconds; concurrent passes share the entries and every step
    /// is idempotent.
    #[tracing::instrument(level = "debug", skip_all, name = "store.reconcile")]
    pub async fn reconcile(&self, now: u64, limit: usize) -> Result<Reconciled, StoreError> {
        let mut conn = self.conn().await?;
        let mut due = Vec::new();
        for shard in 0..self.ks.queue_shards() {
            let claimed: Vec<String> = GLOBAL_CLAIM
                .key(self.ks.inflight(shard))
                .arg(now)
                .arg(now + RECHECK_MS)
                .arg(limit.max(1))
                .invoke_async(&mut conn)
                .await?;
            due.extend(claimed.into_iter().map(|m| (shard, m)));
        }
        let mut report = Reconciled::default();
        for (shard, member) in due {
            report.examined += 1;
            let Some(r) = JobRef::parse_inflight(&member) else {
                tracing::error!(member, "malformed in-flight entry dropped");
                let _: Result<i64, _> = redis::cmd("ZREM")
                    .arg(self.ks.inflight(shard))
                    .arg(&member)
                    .query_async(&mut conn)
                    .await;
                continue;
            };
            let (status, reserved, used, fenced): (
                Option<String>,
                Option<u64>,
                Option<u64>,
                Option<String>,
            ) = redis::cmd("HMGET")
                .arg(self.ks.job(&r.id))
                .arg("status")
                .arg("reserved")
                .arg("used")
                .arg("fenced")
                .query_async(&mut conn)
                .await?;
            match status.as_deref().and_then(JobStatus::parse) {
                None => {
                    let error = serde_json::to_string(&ErrorBody::new(
                        sluice_proto::ErrorCode::Internal,
                        "the job's admission did not finish",
                    ))
                    .unwrap_or_default();
                    let fenced: i64 = JOB_FENCE
                        .key(self.ks.job(&r.id))
                        .arg(&r.tenant)
                        .arg(now)
                        .arg(self.result_ttl_secs)
                        .arg(error)
                        .invoke_async(&mut conn)
                        .await?;
                    if fenced == 1 {
                        // A retry with the admission's idempotency key must not get this
                        // failed job: its record goes with the refund.
                        let idem = self.reserved_idempotency(&mut conn, &r).await?;
                        self.settle(&mut conn, &r, 0, idem.as_deref()).await?;
                        report.fenced += 1;
                    } else if status.is_some() {
                        tracing::error!(job = %r.id, ?status, "job record with an unknown status");
                    }
                }
                Some(s @ (JobStatus::Queued | JobStatus::Running)) => {
                    if now > r.deadline + EXPIRY_GRACE_MS {
                        // A running job may have generated: it pays its whole reservation.
                        let used = if s == JobStatus::Running {
                            reserved.unwrap_or(0)
                        } else {
                            0
                        };
                        let error = serde_json::to_string(&ErrorBody::new(
                            sluice_proto::ErrorCode::DeadlineExceeded,
                            "the job did not end by its deadline",
                        ))
                        .unwrap_or_default();
                        if self
                            .finish_record(&mut conn, &r.id, "expired", "", &error, used)
                            .await?
                        {
                            report.expired += 1;
                        }
                    } else {
                        self.mirror(&mut conn, &r, s, false).await?;
                    }
                }
                Some(_) => {
                    // A fence whose settlement a crash cut off still frees its key.
                    let idem = match fenced {
                        Some(_) => self.reserved_idempotency(&mut conn, &r).await?,
                        None => None,
                    };
                    if self
                        .settle(&mut conn, &r, used.unwrap_or(0), idem.as_deref())
                        .await?
                    {
                        report.settled += 1;
                    }
                }
            }
        }
        Ok(report)
    }

    /// Appends generated text to the job's event stream (read by `GET /v1/jobs/{id}/events`).
    /// With `expire_secs`, the stream also gets that time to live (one more command in the
    /// same round trip): a pump sets it on its first append only, since `FINISH` sets the
    /// stream's final TTL with the terminal write.
    pub async fn append_text(
        &self,
        id: &Uuid,
        text: &str,
        expire_secs: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let key = self.ks.job_events(id);
        let mut pipe = redis::pipe();
        pipe.cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("type")
            .arg("text")
            .arg("text")
            .arg(text)
            .ignore();
        if let Some(ttl) = expire_secs {
            pipe.expire(&key, i64::try_from(ttl).unwrap_or(i64::MAX))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Queued jobs (accepted, not yet started, deadline not passed) by priority, and the
    /// enqueue time of the oldest of each class. One script reads the namespace's queued set,
    /// whose size the queue caps bound; meant for a metrics scrape, not for every request.
    pub async fn queue_stats(&self, now_ms: u64) -> Result<Vec<QueueStats>, StoreError> {
        let mut conn = self.conn().await?;
        let mut stats: Vec<QueueStats> = Priority::ALL
            .iter()
            .map(|&priority| QueueStats {
                priority,
                depth: 0,
                oldest_created_ms: None,
            })
            .collect();
        for shard in 0..self.ks.queue_shards() {
            let flat: Vec<(String, u64, u64)> = QUEUE_STATS
                .key(self.ks.queued(shard))
                .arg(now_ms)
                .invoke_async(&mut conn)
                .await?;
            for s in &mut stats {
                if let Some((_, depth, oldest)) = flat.iter().find(|f| f.0 == s.priority.as_str()) {
                    s.depth += depth;
                    if *oldest > 0 {
                        s.oldest_created_ms =
                            Some(s.oldest_created_ms.map_or(*oldest, |o| o.min(*oldest)));
                    }
                }
            }
        }
        Ok(stats)
    }

    /// Records this process's queue shard count as the namespace's, or checks it against the
    /// one recorded by the first process: processes that split the per-job indexes
    /// differently would not find each other's entries. `Ok(Some(n))` names a different
    /// count already in use.
    async fn claim_queue_shards(&self) -> Result<Option<u16>, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.ks.queue_shards_record();
        let mine = self.ks.queue_shards();
        let _: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(mine)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        let recorded: Option<u16> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        Ok(recorded.filter(|&n| n != mine))
    }

    /// At a process's start: [`JobStore::claim_queue_shards`], an error naming the fix on a
    /// mismatch; a warning only if Redis does not answer yet (the process starts anyway, as
    /// it does without Redis).
    pub async fn check_queue_shards(&self) -> Result<(), String> {
        match self.claim_queue_shards().await {
            Ok(None) => Ok(()),
            Ok(Some(recorded)) => Err(format!(
                "namespace {ns:?} keeps its queue indexes in {recorded} shard(s), this process \
                 is set to {mine} (--queue-shards, SLUICE_QUEUE_SHARDS): set the same count \
                 everywhere, or drain the namespace's queues and delete {key} to change it",
                ns = self.ks.namespace(),
                mine = self.ks.queue_shards(),
                key = self.ks.queue_shards_record(),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the namespace's queue shard count yet");
                Ok(())
            }
        }
    }

    /// For each job, whether a client asked to cancel it (one round trip on one server).
    pub async fn cancel_requested(&self, ids: &[Uuid]) -> Result<Vec<bool>, StoreError> {
        let cmds = ids
            .iter()
            .map(|id| {
                redis::cmd("HGET")
                    .arg(self.ks.job(id))
                    .arg("cancel_requested")
                    .to_owned()
            })
            .collect();
        let mut conn = self.conn().await?;
        let flags: Vec<Option<String>> = query_each(&mut conn, cmds).await?;
        Ok(flags
            .into_iter()
            .map(|f| f.as_deref() == Some("1"))
            .collect())
    }
}

/// Queued jobs of one priority class ([`JobStore::queue_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    pub priority: Priority,
    pub depth: u64,
    /// `created_at` (ms) of the oldest queued job of the class, if any.
    pub oldest_created_ms: Option<u64>,
}

/// A reservation as `tenant_admit.lua` records it and `tenant_settle.lua` reads it:
/// `{reserve}|{day}|{month}`, then `|{idempotency record}` when the admission has one, so that
/// the reconciler can drop that record with the reservation of an admission it fences.
fn reservation_record(
    reserve: u64,
    day: &str,
    month: &str,
    fingerprint: &str,
    idem: &str,
) -> String {
    if fingerprint.is_empty() {
        format!("{reserve}|{day}|{month}")
    } else {
        format!("{reserve}|{day}|{month}|{idem}")
    }
}

fn view_from_fields(
    id: Uuid,
    fields: &std::collections::HashMap<String, String>,
) -> Result<JobView, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { id, detail };
    let num = |name: &str| -> Result<Option<u64>, StoreError> {
        fields
            .get(name)
            .map(|v| v.parse::<u64>())
            .transpose()
            .map_err(|e| corrupt(format!("{name}: {e}")))
    };
    let status = fields
        .get("status")
        .and_then(|s| JobStatus::parse(s))
        .ok_or_else(|| corrupt("missing or unknown status".into()))?;
    let result = fields
        .get("result")
        .map(|r| serde_json::from_str::<JobResult>(r))
        .transpose()
        .map_err(|e| corrupt(format!("result: {e}")))?;
    let error = fields
        .get("error")
        .map(|r| serde_json::from_str::<ErrorBody>(r))
        .transpose()
        .map_err(|e| corrupt(format!("error: {e}")))?;
    Ok(JobView {
        id,
        status,
        created_at: num("created_at")?.unwrap_or(0),
        started_at: num("started_at")?,
        finished_at: num("finished_at")?,
        attempts: num("attempts")?.unwrap_or(0) as u32,
        result,
        error,
    })
}

#[cfg(test)]
mod tests;
