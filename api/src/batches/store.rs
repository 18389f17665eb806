//! A batch's state in Redis: one hash per batch (its request, status, timestamps, counts and
//! cursor), a hash of its finished lines, a hash of its lines in flight, a lease naming the
//! process that drives it, all in its tenant's hash slot, and the namespace's set of batches
//! not yet ended.
//!
//! Every status change is one script that checks the status it leaves, so a cancel from the
//! API and the driver's own transitions never overwrite each other. A finished line is written
//! once (`HSETNX`) and counted in the same script, so a driver that resumes after a crash never
//! counts or writes a line twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use redis::Script;
use sluice_jobs::keyspace::Keyspace;
use sluice_jobs::redis_pool::Pool;
use sluice_jobs::store::StoreError;

use super::{Batch, BatchErrors, BatchStatus, RequestCounts};

/// Moves a batch to `ARGV[1]` (setting the timestamp field `ARGV[2]` to `ARGV[3]`, if given)
/// when its status is one of `ARGV[4..]`. Returns `{1, old}` when it moved, `{0, current}`
/// when not, `{0, false}` for no batch.
static TRANSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, false} end
for i = 4, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
    return {1, current}
  end
end
return {0, current}
",
    )
});

/// Records a finished line once: `HSETNX` of its output or error line, the count it adds to,
/// and it leaves the in-flight hash and the tenant's lane share.
/// KEYS: batch, lines, in flight, tenant's in flight. ARGV: line index, record, `completed`
/// or `failed`, lane member.
static RECORD_LINE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local added = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
if added == 1 then redis.call('HINCRBY', KEYS[1], ARGV[3], 1) end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[4])
return added
",
    )
});

/// Renews a lease held by `ARGV[1]` for `ARGV[2]` ms, or takes it if free. 1 if held.
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
",
    )
});

/// Gives a lease back if `ARGV[1]` holds it.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// What a new batch is made of.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub id: String,
    pub tenant: String,
    pub key_id: String,
    pub peer: String,
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    pub metadata: Option<BTreeMap<String, String>>,
    pub created_at: u64,
    pub expires_at: u64,
}

/// A batch as its driver sees it: the client's view and what it needs to run it.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub view: Batch,
    pub tenant: String,
    pub key_id: String,
    pub peer: String,
    /// The next line (index into the input's non-blank lines) to enqueue.
    pub cursor: u64,
}

/// What a cancel request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    NotFound,
    /// Now (or already) cancelling or cancelled.
    Cancelling,
    /// It already ended otherwise (or is writing its files).
    AlreadyFinished(BatchStatus),
}

#[derive(Clone)]
pub struct BatchStore {
    pool: Pool,
    ks: Keyspace,
    /// The longest completion window, in seconds.
    pub max_window_secs: u64,
}

fn secs(fields: &HashMap<String, String>, name: &str) -> Option<u64> {
    fields.get(name).and_then(|v| v.parse().ok())
}

fn count(fields: &HashMap<String, String>, name: &str) -> u64 {
    secs(fields, name).unwrap_or(0)
}

fn record(id: &str, fields: HashMap<String, String>) -> Result<BatchRecord, StoreError> {
    let corrupt = |what: &str| StoreError::CorruptRecord(format!("batch {id}: {what}"));
    let text = |name: &str| fields.get(name).cloned().ok_or_else(|| corrupt(name));
    let status = BatchStatus::parse(&text("status")?).ok_or_else(|| corrupt("status"))?;
    let metadata = match fields.get("metadata") {
        Some(m) if !m.is_empty() => Some(serde_json::from_str(m).map_err(|_| corrupt("metadata"))?),
        _ => None,
    };
    let errors: Option<BatchErrors> = match fields.get("errors") {
        Some(e) if !e.is_empty() => Some(serde_json::from_str(e).map_err(|_| corrupt("errors"))?),
        _ => None,
    };
    let view = Batch {
        id: id.to_string(),
        object: "batch".into(),
        endpoint: text("endpoint")?,
        errors,
        input_file_id: text("input_file_id")?,
        completion_window: text("completion_window")?,
        status,
        output_file_id: fields.get("output_file_id").cloned(),
        error_file_id: fields.get("error_file_id").cloned(),
        created_at: secs(&fields, "created_at").ok_or_else(|| corrupt("created_at"))?,
        in_progress_at: secs(&fields, "in_progress_at"),
        expires_at: secs(&fields, "expires_at").ok_or_else(|| corrupt("expires_at"))?,
        finalizing_at: secs(&fields, "finalizing_at"),
        completed_at: secs(&fields, "completed_at"),
        failed_at: secs(&fields, "failed_at"),
        expired_at: secs(&fields, "expired_at"),
        cancelling_at: secs(&fields, "cancelling_at"),
        cancelled_at: secs(&fields, "cancelled_at"),
        request_counts: RequestCounts {
            total: count(&fields, "total"),
            completed: count(&fields, "completed"),
            failed: count(&fields, "failed"),
        },
        metadata,
    };
    Ok(BatchRecord {
        view,
        tenant: text("tenant")?,
        key_id: text("key_id")?,
        peer: fields.get("peer").cloned().unwrap_or_default(),
        cursor: count(&fields, "cursor"),
    })
}

/// The timestamp field a status sets when a batch enters it.
fn stamp_field(status: BatchStatus) -> &'static str {
    match status {
        BatchStatus::Validating => "",
        BatchStatus::Failed => "failed_at",
        BatchStatus::InProgress => "in_progress_at",
        BatchStatus::Finalizing => "finalizing_at",
        BatchStatus::Completed => "completed_at",
        BatchStatus::Expired => "expired_at",
        BatchStatus::Cancelling => "cancelling_at",
        BatchStatus::Cancelled => "cancelled_at",
    }
}

impl BatchStore {
    pub fn new(pool: Pool, ks: Keyspace, max_window_secs: u64) -> Self {
        Self {
            pool,
            ks,
            max_window_secs,
        }
    }

    pub fn keyspace(&self) -> &Keyspace {
        &self.ks
    }

    /// Writes a new batch (`validating`) and puts it where drivers look.
    pub async fn create(&self, batch: &NewBatch) -> Result<(), StoreError> {
        let metadata = match &batch.metadata {
            Some(m) => {
                serde_json::to_string(m).map_err(|e| StoreError::CorruptRecord(e.to_string()))?
            }
            None => String::new(),
        };
        let mut conn = self.pool.get().await?;
        // Where drivers look first (a driver leaves a member without a record alone for a
        // minute), then the batch itself, in its tenant's hash slot.
        let _: () = redis::cmd("ZADD")
            .arg(self.ks.batches_active())
            .arg(sluice_proto::now_ms())
            .arg(active_member(&batch.id, &batch.tenant))
            .query_async(&mut conn)
            .await?;
        let _: () = redis::pipe()
            .atomic()
            .hset_multiple(
                self.ks.batch(&batch.tenant, &batch.id),
                &[
                    ("tenant", batch.tenant.as_str()),
                    ("key_id", batch.key_id.as_str()),
                    ("peer", batch.peer.as_str()),
                    ("input_file_id", batch.input_file_id.as_str()),
                    ("endpoint", batch.endpoint.as_str()),
                    ("completion_window", batch.completion_window.as_str()),
                    ("metadata", metadata.as_str()),
                    ("status", BatchStatus::Validating.as_str()),
                    ("created_at", &batch.created_at.to_string()),
                    ("expires_at", &batch.expires_at.to_string()),
                ],
            )
            .zadd(
                self.ks.tenant_batches(&batch.tenant),
                &batch.id,
                sluice_proto::now_ms(),
            )
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The batch, whoever's it is (for its driver).
    pub async fn load(&self, tenant: &str, id: &str) -> Result<Option<BatchRecord>, StoreError> {
        let mut conn = self.pool.get().await?;
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.ks.batch(tenant, id))
            .query_async(&mut conn)
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        record(id, fields).map(Some)
    }

    /// The tenant's batch, or `None` (also for another tenant's).
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Option<Batch>, StoreError> {
        if !super::plausible_batch_id(id) {
            return Ok(None);
        }
        Ok(self
            .load(tenant, id)
            .await?
            .filter(|r| r.tenant == tenant)
            .map(|r| r.view))
    }

    /// The tenant's batches, newest first: up to `limit` after the batch `after`, and whether
    /// there are more.
    pub async fn list(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Batch>, bool), StoreError> {
        let index = self.ks.tenant_batches(tenant);
        let mut conn = self.pool.get().await?;
        let Some(max) = crate::files::page_start(&mut conn, &index, after).await? else {
            return Ok((Vec::new(), false));
        };
        let ids: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
            .arg(&index)
            .arg(&max)
            .arg("-inf")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1)
            .query_async(&mut conn)
            .await?;
        drop(conn);
        let more = ids.len() > limit;
        let mut batches = Vec::with_capacity(limit);
        for id in ids.iter().take(limit) {
            if let Some(batch) = self.get(tenant, id).await? {
                batches.push(batch);
            }
        }
        Ok((batches, more))
    }

    /// Moves the batch to `to` if its status is one of `from`; the status it had (`Ok(Err)`:
    /// it did not move, and this is its status; `None`: no batch).
    pub async fn transition(
        &self,
        tenant: &str,
        id: &str,
        from: &[BatchStatus],
        to: BatchStatus,
    ) -> Result<Option<Result<BatchStatus, BatchStatus>>, StoreError> {
        let mut conn = self.pool.get().await?;
        let mut invocation = TRANSITION.prepare_invoke();
        invocation
            .key(self.ks.batch(tenant, id))
            .arg(to.as_str())
            .arg(stamp_field(to))
            .arg(sluice_proto::now_ms() / 1000);
        for status in from {
            invocation.arg(status.as_str());
        }
        let (moved, status): (u8, Option<String>) = invocation.invoke_async(&mut conn).await?;
        let Some(status) = status else {
            return Ok(None);
        };
        let status = BatchStatus::parse(&status)
            .ok_or_else(|| StoreError::CorruptRecord(format!("batch {id}: status {status}")))?;
        Ok(Some(if moved == 1 { Ok(status) } else { Err(status) }))
    }

    /// The tenant's cancel request.
    pub async fn cancel(&self, tenant: &str, id: &str) -> Result<CancelOutcome, StoreError> {
        if self.get(tenant, id).await?.is_none() {
            return Ok(CancelOutcome::NotFound);
        }
        let moved = self
            .transition(
                tenant,
                id,
                &[BatchStatus::Validating, BatchStatus::InProgress],
                BatchStatus::Cancelling,
            )
            .await?;
        Ok(match moved {
            None => CancelOutcome::NotFound,
            Some(Ok(_)) => CancelOutcome::Cancelling,
            Some(Err(BatchStatus::Cancelling | BatchStatus::Cancelled)) => {
                CancelOutcome::Cancelling
            }
            Some(Err(status)) => CancelOutcome::AlreadyFinished(status),
        })
    }

    /// Sets plain fields of the batch (its total, file ids, errors).
    pub async fn set(
        &self,
        tenant: &str,
        id: &str,
        fields: &[(&str, String)],
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let _: () = redis::cmd("HSET")
            .arg(self.ks.batch(tenant, id))
            .arg(fields)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Records that line `index` is now job `job` and moves the cursor past it.
    pub async fn enqueued(
        &self,
        id: &str,
        tenant: &str,
        index: u64,
        job: &uuid::Uuid,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let _: () = redis::pipe()
            .atomic()
            .hset(self.ks.batch_inflight(tenant, id), index, job.to_string())
            .sadd(
                self.ks.tenant_batch_inflight(tenant),
                lane_member(id, index),
            )
            .hset(self.ks.batch(tenant, id), "cursor", index + 1)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Records line `index` as done without a job (refused at submit, or never run) and moves
    /// the cursor past it; `true` if this call recorded it.
    pub async fn skipped(
        &self,
        id: &str,
        tenant: &str,
        index: u64,
        line: &str,
    ) -> Result<bool, StoreError> {
        let added = self.record_line(id, tenant, index, line, false).await?;
        self.set(tenant, id, &[("cursor", (index + 1).to_string())])
            .await?;
        Ok(added)
    }

    /// Records a finished line once (its output line if `completed`, else its error line);
    /// `true` if this call recorded it.
    pub async fn record_line(
        &self,
        id: &str,
        tenant: &str,
        index: u64,
        line: &str,
        completed: bool,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        let added: u8 = RECORD_LINE
            .key(self.ks.batch(tenant, id))
            .key(self.ks.batch_lines(tenant, id))
            .key(self.ks.batch_inflight(tenant, id))
            .key(self.ks.tenant_batch_inflight(tenant))
            .arg(index)
            .arg(line)
            .arg(if completed { "completed" } else { "failed" })
            .arg(lane_member(id, index))
            .invoke_async(&mut conn)
            .await?;
        Ok(added == 1)
    }

    /// The batch's lines in flight: line index → job id.
    pub async fn inflight(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Vec<(u64, uuid::Uuid)>, StoreError> {
        let mut conn = self.pool.get().await?;
        let raw: HashMap<u64, String> = redis::cmd("HGETALL")
            .arg(self.ks.batch_inflight(tenant, id))
            .query_async(&mut conn)
            .await?;
        let mut lines: Vec<(u64, uuid::Uuid)> = raw
            .into_iter()
            .filter_map(|(index, job)| job.parse().ok().map(|job| (index, job)))
            .collect();
        lines.sort_unstable();
        Ok(lines)
    }

    /// How many of the tenant's batch lines are queued or running, across its batches.
    pub async fn tenant_inflight(&self, tenant: &str) -> Result<u64, StoreError> {
        let mut conn = self.pool.get().await?;
        Ok(redis::cmd("SCARD")
            .arg(self.ks.tenant_batch_inflight(tenant))
            .query_async(&mut conn)
            .await?)
    }

    /// Every finished line, by index: `(completed, record)`.
    pub async fn lines(&self, tenant: &str, id: &str) -> Result<BTreeMap<u64, String>, StoreError> {
        let mut conn = self.pool.get().await?;
        let raw: HashMap<u64, String> = redis::cmd("HGETALL")
            .arg(self.ks.batch_lines(tenant, id))
            .query_async(&mut conn)
            .await?;
        Ok(raw.into_iter().collect())
    }

    /// After a batch ended: its per-line hashes go, then it leaves the active set.
    pub async fn retire(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let _: () = redis::pipe()
            .atomic()
            .del(self.ks.batch_lines(tenant, id))
            .del(self.ks.batch_inflight(tenant, id))
            .query_async(&mut conn)
            .await?;
        let _: () = redis::cmd("ZREM")
            .arg(self.ks.batches_active())
            .arg(active_member(id, tenant))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Batches not yet ended.
    pub async fn active(&self) -> Result<Vec<ActiveBatch>, StoreError> {
        let mut conn = self.pool.get().await?;
        let members: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.ks.batches_active())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        Ok(members
            .into_iter()
            .filter_map(|(member, since)| {
                let (id, tenant) = member.split_once('|')?;
                Some(ActiveBatch {
                    id: id.to_string(),
                    tenant: tenant.to_string(),
                    since_ms: since as u64,
                })
            })
            .collect())
    }

    /// How many batches have not ended.
    pub async fn active_count(&self) -> Result<u64, StoreError> {
        let mut conn = self.pool.get().await?;
        Ok(redis::cmd("ZCARD")
            .arg(self.ks.batches_active())
            .query_async(&mut conn)
            .await?)
    }

    /// Takes or renews the batch's lease for `owner`; `false` if another process holds it.
    pub async fn lease(
        &self,
        tenant: &str,
        id: &str,
        owner: &str,
        ttl_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await?;
        let held: u8 = LEASE
            .key(self.ks.batch_lease(tenant, id))
            .arg(owner)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    pub async fn release(&self, tenant: &str, id: &str, owner: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let _: u8 = RELEASE
            .key(self.ks.batch_lease(tenant, id))
            .arg(owner)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// A batch not yet ended, as the active set lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveBatch {
    pub id: String,
    pub tenant: String,
    /// When it was created (ms).
    pub since_ms: u64,
}

/// A batch's member in the active set: `{id}|{tenant}` (batch ids hold no `|`).
fn active_member(id: &str, tenant: &str) -> String {
    format!("{id}|{tenant}")
}

/// A line's member in its tenant's lane share.
fn lane_member(id: &str, index: u64) -> String {
    format!("{id}:{index}")
}
