//! The job record in Redis and its atomic state transitions.
//!
//! A job is one hash at [`Keyspace::job`]: `tenant`, `status`, `created_at`, `deadline`,
//! `attempts`, and once known `started_at`, `finished_at`, `worker`, `result` (JSON),
//! `error` (JSON), `cancel_requested`. Every transition is a Lua script, so two API replicas
//! and any number of workers can race on a job and it still moves exactly once into a terminal
//! state, which never changes afterwards.

use deadpool_redis::Pool;
use redis::Script;
use sluice_proto::{ErrorBody, JobMessage, JobResult, JobStatus, JobView};
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
}

impl From<deadpool_redis::PoolError> for StoreError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// What a worker should do with a delivery, decided atomically by [`JobStore::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    /// Run it; this is attempt number `attempt` (1 on first delivery).
    Run { attempt: u32 },
    /// Do not run it: it is terminal (maybe just now: expired, cancelled, out of attempts).
    Skip(JobStatus),
    /// No record: it expired from Redis, or its submit was rolled back. Drop the message.
    Missing,
}

/// Outcome of a cancel request.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// No such job for this tenant.
    NotFound,
    /// The job was queued and is now cancelled (it will never be generated), or it was
    /// cancelled before.
    Cancelled,
    /// The job is running; its worker stops at its next token.
    Cancelling,
    /// The job already ended otherwise.
    AlreadyFinished(JobStatus),
}

/// The terminal write of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Terminal {
    pub status: JobStatus,
    pub result: Option<JobResult>,
    pub error: Option<ErrorBody>,
}

// KEYS[1] job; ARGV: now, max_attempts, worker
static START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {'missing', 0} end
if s ~= 'queued' and s ~= 'running' then return {s, 0} end
local now = tonumber(ARGV[1])
local function finish(status, code, msg)
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', ARGV[1])
  if code then
    redis.call('HSET', KEYS[1], 'error', cjson.encode({code = code, message = msg}))
  end
  return {status, 0}
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  return finish('cancelled', nil, nil)
end
if now > tonumber(redis.call('HGET', KEYS[1], 'deadline') or '0') then
  return finish('expired', 'deadline_exceeded', 'the job deadline passed before it could run')
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'attempts', attempts - 1)
  return finish('failed', 'attempts_exhausted',
    'the job was started ' .. (attempts - 1) .. ' times without finishing')
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[3])
return {'running', attempts}
"#,
    )
});

// KEYS[1] job; ARGV: status, result json or '', error json or '', now, ttl seconds
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[4])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return 1
"#,
    )
});

// KEYS[1] job; ARGV: tenant, now, ttl seconds
static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('HGET', KEYS[1], 'tenant')
if t ~= ARGV[1] then return 'missing' end
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2], 'cancel_requested', '1')
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 'cancelled'
end
if s == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return s
"#,
    )
});

// KEYS[1] job. A job given back unfinished (worker shutdown) is queued again and its attempt
// is not counted against it.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '1')
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', math.max(attempts - 1, 0))
redis.call('HDEL', KEYS[1], 'worker')
return 1
"#,
    )
});

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

    async fn conn(&self) -> Result<deadpool_redis::Connection, StoreError> {
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

    /// Writes the record of a new job as `queued`. It lives until its deadline plus the result
    /// TTL, so a job nobody ever runs still disappears.
    pub async fn create(&self, job: &JobMessage) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let key = self.ks.job(&job.id);
        let ttl = job.deadline.saturating_sub(job.created_at) / 1000 + self.result_ttl_secs;
        redis::pipe()
            .atomic()
            .hset_multiple(
                &key,
                &[
                    ("tenant", job.tenant.clone()),
                    ("status", JobStatus::Queued.as_str().to_string()),
                    ("created_at", job.created_at.to_string()),
                    ("deadline", job.deadline.to_string()),
                    ("attempts", "0".to_string()),
                ],
            )
            .ignore()
            .expire(&key, ttl as i64)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Removes a record whose publish failed, so nothing is left half-written.
    pub async fn delete(&self, id: &Uuid) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("DEL")
            .arg(self.ks.job(id))
            .query_async::<()>(&mut conn)
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
            "cancelled" => CancelOutcome::Cancelled,
            "cancelling" => CancelOutcome::Cancelling,
            other => match JobStatus::parse(other) {
                Some(JobStatus::Cancelled) => CancelOutcome::Cancelled,
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
    pub async fn start(
        &self,
        id: &Uuid,
        max_attempts: u32,
        worker: &str,
    ) -> Result<StartOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let (status, attempt): (String, u32) = START
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
            Some(s) => Ok(StartOutcome::Skip(s)),
            None => Err(StoreError::Corrupt {
                id: *id,
                detail: format!("unknown status {status:?}"),
            }),
        }
    }

    /// Writes the terminal state unless the job is terminal already. Returns whether this call
    /// wrote it: a job is never completed twice.
    pub async fn finish(&self, id: &Uuid, terminal: &Terminal) -> Result<bool, StoreError> {
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
            .arg(terminal.status.as_str())
            .arg(result)
            .arg(error)
            .arg(sluice_proto::now_ms())
            .arg(self.result_ttl_secs)
            .invoke_async(&mut conn)
            .await?;
        Ok(written == 1)
    }

    /// Puts a running job back to `queued` (the worker gives it back unfinished).
    pub async fn release(&self, id: &Uuid) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let released: i64 = RELEASE.key(self.ks.job(id)).invoke_async(&mut conn).await?;
        Ok(released == 1)
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
