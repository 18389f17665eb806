//! The job record in Redis and its atomic state transitions.
//!
//! Generated text is also appended to a stream at [`Keyspace::job_events`], which `FINISH`
//! closes with a `done` event in the same script as the terminal write.
//!
//! A job is one hash at [`Keyspace::job`]: `tenant`, `status`, `created_at`, `deadline`,
//! `attempts`, and once known `started_at`, `finished_at`, `worker`, `result` (JSON),
//! `error` (JSON), `cancel_requested`. Every transition is a Lua script, so two API replicas
//! and any number of workers can race on a job and it still moves exactly once into a terminal
//! state, which never changes afterwards.

use crate::redis_pool::Pool;
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

/// Lua shared by the scripts that move a job:
/// - `listed(job, fields, score)`: removes the job from the sorted sets its record names in
///   `fields` (or, given a `score`, adds it back); `QUEUED` names the two queued-job sets;
/// - `settle(job, used)`, for every script that moves a job into a terminal state: refunds the
///   unused part of the token reservation to the day and month counters it came from and
///   removes the job from the tenant's active set and the queued sets, exactly once
///   (`settled` flips from 0 to 1).
const SETTLE: &str = include_str!("lua/settle.lua");

fn with_settle(body: &str) -> Script {
    Script::new(&format!("{SETTLE}\n{body}"))
}

// The `admit` transition: keys and arguments are described in `lua/admit.lua`.
static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/admit.lua")));

// The `rollback` transition: keys and arguments are described in `lua/rollback.lua`.
static ROLLBACK: LazyLock<Script> = LazyLock::new(|| with_settle(include_str!("lua/rollback.lua")));

// The `start` transition: keys and arguments are described in `lua/start.lua`.
static START: LazyLock<Script> = LazyLock::new(|| with_settle(include_str!("lua/start.lua")));

// The `finish` transition: keys and arguments are described in `lua/finish.lua`.
static FINISH: LazyLock<Script> = LazyLock::new(|| with_settle(include_str!("lua/finish.lua")));

// The `cancel` transition: keys and arguments are described in `lua/cancel.lua`.
static CANCEL: LazyLock<Script> = LazyLock::new(|| with_settle(include_str!("lua/cancel.lua")));

// The `release` transition: keys and arguments are described in `lua/release.lua`.
static RELEASE: LazyLock<Script> = LazyLock::new(|| with_settle(include_str!("lua/release.lua")));

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

    /// Admits a new job atomically: checks the tenant's active-job cap and token quotas,
    /// reserves `admission.reserve` tokens on the day and month counters, adds the job to the
    /// tenant's active set and writes its record as `queued`. A refusal changes nothing.
    #[tracing::instrument(level = "info", skip_all, name = "store.admit")]
    pub async fn admit(
        &self,
        job: &JobMessage,
        admission: &Admission,
    ) -> Result<AdmitOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.ks.job(&job.id);
        let (day, month) = crate::calendar::utc_day_and_month(job.created_at);
        let ttl = job.deadline.saturating_sub(job.created_at) / 1000 + self.result_ttl_secs;
        let limit = |l: Option<u64>| l.map_or(-1, |v| v as i64);
        let mut invocation = ADMIT.prepare_invoke();
        let (idem_key, fingerprint) = match &admission.idempotency {
            Some((k, f)) => (k.clone(), f.clone()),
            None => (key.clone(), String::new()),
        };
        invocation
            .key(&key)
            .key(self.ks.tenant_active(&job.tenant))
            .key(self.ks.tenant_tokens_day(&job.tenant, &day))
            .key(self.ks.tenant_tokens_month(&job.tenant, &month))
            .key(idem_key)
            .key(self.ks.queued())
            .key(self.ks.tenant_queued(&job.tenant))
            .arg(job.created_at)
            .arg(limit(admission.max_active.map(u64::from)))
            .arg(limit(admission.tokens_per_day))
            .arg(limit(admission.tokens_per_month))
            .arg(admission.reserve)
            .arg(ttl)
            .arg(fingerprint)
            .arg(IDEMPOTENCY_TTL_SECS)
            .arg(limit(admission.max_queued.map(u64::from)))
            .arg(limit(admission.max_queued_tenant.map(u64::from)))
            .arg(self.ks.drain_prefix());
        let mut fields = vec![
            ("id", job.id.to_string()),
            ("tenant", job.tenant.clone()),
            ("status", JobStatus::Queued.as_str().to_string()),
            ("created_at", job.created_at.to_string()),
            ("deadline", job.deadline.to_string()),
            ("priority", job.priority.as_str().to_string()),
            ("attempts", "0".to_string()),
        ];
        if !admission.flags.is_empty() {
            fields.push(("flags", admission.flags.join(",")));
        }
        for (k, v) in &fields {
            invocation.arg(*k).arg(v);
        }
        let (outcome, used, limit, existing): (String, u64, u64, String) =
            invocation.invoke_async(&mut conn).await?;
        Ok(match outcome.as_str() {
            "ok" => AdmitOutcome::Admitted,
            "duplicate" => AdmitOutcome::Duplicate(Uuid::parse_str(&existing).map_err(|e| {
                StoreError::Corrupt {
                    id: job.id,
                    detail: format!("idempotency record names {existing:?}: {e}"),
                }
            })?),
            "idempotency_mismatch" => AdmitOutcome::IdempotencyMismatch,
            "queue_full" | "tenant_queue_full" => AdmitOutcome::QueueFull {
                tenant: outcome == "tenant_queue_full",
                queued: used,
                limit,
                retry_after_secs: existing.parse().unwrap_or(30),
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
        })
    }

    /// Undoes an admission whose publish failed: refunds the reservation, frees the active
    /// slot and deletes the record, so nothing is left half-written.
    pub async fn rollback(&self, id: &Uuid) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        ROLLBACK
            .key(self.ks.job(id))
            .invoke_async::<i64>(&mut conn)
            .await?;
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

    /// Reads many jobs of one tenant in one round trip (a pipeline), in the order of `ids`;
    /// another tenant's job is `None`, like a missing one.
    pub async fn get_many(
        &self,
        tenant: &str,
        ids: &[Uuid],
    ) -> Result<Vec<Option<JobView>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(self.ks.job(id));
        }
        let mut conn = self.conn().await?;
        let all: Vec<std::collections::HashMap<String, String>> =
            pipe.query_async(&mut conn).await?;
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
        let outcome: String = CANCEL
            .key(self.ks.job(id))
            .arg(tenant)
            .arg(sluice_proto::now_ms())
            .arg(self.result_ttl_secs)
            .invoke_async(&mut conn)
            .await?;
        Ok(match outcome.as_str() {
            "missing" => CancelOutcome::NotFound,
            "cancelled_now" => CancelOutcome::Cancelled,
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
    #[tracing::instrument(level = "info", skip_all, name = "store.start")]
    pub async fn start(
        &self,
        id: &Uuid,
        max_attempts: u32,
        worker: &str,
    ) -> Result<StartOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let (status, attempt, ended_now): (String, u32, u8) = START
            .key(self.ks.job(id))
            .arg(sluice_proto::now_ms())
            .arg(max_attempts)
            .arg(worker)
            .invoke_async(&mut conn)
            .await?;
        if status == "missing" {
            return Ok(StartOutcome::Missing);
        }
        match JobStatus::parse(&status) {
            Some(JobStatus::Running) => Ok(StartOutcome::Run { attempt }),
            Some(s) if ended_now == 1 => Ok(StartOutcome::Ended(s)),
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
        let written: i64 = FINISH
            .key(self.ks.job(id))
            .key(self.ks.job_events(id))
            .arg(terminal.status.as_str())
            .arg(result)
            .arg(error)
            .arg(sluice_proto::now_ms())
            .arg(self.result_ttl_secs)
            .arg(used)
            .invoke_async(&mut conn)
            .await?;
        Ok(written == 1)
    }

    /// Puts a running job back to `queued` (the worker gives it back unfinished).
    #[tracing::instrument(level = "info", skip_all, name = "store.release")]
    pub async fn release(&self, id: &Uuid) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let released: i64 = RELEASE.key(self.ks.job(id)).invoke_async(&mut conn).await?;
        Ok(released == 1)
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
    /// enqueue time of the oldest of each class. One script walks the global queued set, whose
    /// size the queue caps bound; meant for a metrics scrape, not for every request.
    pub async fn queue_stats(&self, now_ms: u64) -> Result<Vec<QueueStats>, StoreError> {
        let mut conn = self.conn().await?;
        let flat: Vec<(String, u64, u64)> = QUEUE_STATS
            .key(self.ks.queued())
            .arg(now_ms)
            .arg(self.ks.job_prefix())
            .invoke_async(&mut conn)
            .await?;
        Ok(Priority::ALL
            .iter()
            .map(|&priority| {
                let found = flat.iter().find(|(p, _, _)| p == priority.as_str());
                QueueStats {
                    priority,
                    depth: found.map_or(0, |f| f.1),
                    oldest_created_ms: found.map(|f| f.2).filter(|&t| t > 0),
                }
            })
            .collect())
    }

    /// For each job, whether a client asked to cancel it (one round trip for all).
    pub async fn cancel_requested(&self, ids: &[Uuid]) -> Result<Vec<bool>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hget(self.ks.job(id), "cancel_requested");
        }
        let flags: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
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

// A read, not a transition: keys and arguments are described in `lua/queue_stats.lua`.
static QUEUE_STATS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/queue_stats.lua")));

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
