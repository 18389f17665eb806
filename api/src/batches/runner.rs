//! The batch runner: in every API process (unless `--batch-runner off`), a loop that takes the
//! lease of each active batch no process drives and drives it, one task per batch.
//!
//! A driver's tick: read the batch; on `validating`, read its input file and start it; while
//! `in_progress`, collect the lines whose jobs ended (each written once to the batch's lines
//! in Redis), then submit more lines, while the tenant has fewer than its share of the batch
//! lane (`--batch-lane-window` times its `batch_weight`) queued or running across its batches;
//! when every line has ended, write the output and error files and complete. A cancel or the
//! end of the completion window stops submitting, cancels the jobs in flight, waits for them,
//! and writes every finished line to the files before the batch ends.
//!
//! Nothing is lost or doubled when a driver dies: each line is submitted with an
//! `Idempotency-Key` of the batch and line, so resubmitting a line whose cursor move was lost
//! returns the same job; finished lines are written with `HSETNX`; the files have fixed ids,
//! so writing them again replaces them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use serde_json::{Value, json};
use sluice_proto::{ErrorBody, ErrorCode, JobStatus, JobView, Priority};
use tokio::sync::watch;
use uuid::Uuid;

use super::store::{ActiveBatch, BatchRecord};
use super::{BatchError, BatchErrors, BatchSettings, BatchStatus};
use crate::error::ApiError;
use crate::files::{FileError, lines};
use crate::principal::{Principal, Role};
use crate::routes::openai::{completion, error_json};
use crate::state::AppState;

/// How long a driver's lease lasts without renewal: another process takes a batch over this
/// long after its driver died.
const LEASE_MS: u64 = 10_000;
/// A batch listed as active without a record this long is an orphan of a creation that died.
const ORPHAN_AFTER_MS: u64 = 60_000;

/// One input line, as the driver keeps it: its `custom_id` and where it is in the file (the
/// bytes are read again, a window at a time, when the line is submitted, so a driver holds
/// about a hundred bytes per line, not the file).
struct InputLine {
    custom_id: String,
    start: u64,
    len: u64,
}

/// Starts the runner; it stops when `stopping` turns true, giving its leases back.
pub fn spawn(
    state: AppState,
    settings: BatchSettings,
    stopping: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let owner = format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
            Uuid::now_v7().simple()
        );
        let driving: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut stop = stopping.clone();
        loop {
            if *stop.borrow() {
                return;
            }
            match state.batches.active().await {
                Ok(active) => {
                    for ActiveBatch {
                        id,
                        tenant,
                        since_ms,
                    } in active
                    {
                        let taken = driving.lock().map(|d| d.contains(&id)).unwrap_or(true);
                        if taken {
                            continue;
                        }
                        match state.batches.lease(&tenant, &id, &owner, LEASE_MS).await {
                            Ok(true) => {
                                if let Ok(mut d) = driving.lock() {
                                    d.insert(id.clone());
                                }
                                let driver = Driver {
                                    state: state.clone(),
                                    settings: settings.clone(),
                                    owner: owner.clone(),
                                    id: id.clone(),
                                    tenant,
                                    since_ms,
                                    input: None,
                                    cancels_sent: false,
                                };
                                let driving = Arc::clone(&driving);
                                let stopping = stopping.clone();
                                tokio::spawn(async move {
                                    driver.run(stopping).await;
                                    if let Ok(mut d) = driving.lock() {
                                        d.remove(&id);
                                    }
                                });
                            }
                            Ok(false) => {}
                            Err(e) => tracing::warn!(error = %e, batch = %id, "batch lease"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list active batches"),
            }
            tokio::select! {
                () = tokio::time::sleep(settings.poll()) => {}
                _ = stop.changed() => {}
            }
        }
    })
}

/// What a tick decided.
enum Tick {
    Again,
    Ended,
}

struct Driver {
    state: AppState,
    settings: BatchSettings,
    owner: String,
    id: String,
    tenant: String,
    /// When the batch was listed as active (ms).
    since_ms: u64,
    input: Option<Arc<Vec<InputLine>>>,
    /// Whether the jobs in flight were asked to stop (cancel or expiry).
    cancels_sent: bool,
}

impl Driver {
    #[tracing::instrument(skip_all, fields(batch = %self.id))]
    async fn run(mut self, mut stopping: watch::Receiver<bool>) {
        loop {
            if *stopping.borrow() {
                break;
            }
            match self.tick().await {
                Ok(Tick::Ended) => break,
                Ok(Tick::Again) => {}
                Err(e) => tracing::warn!(error = %e, "batch tick failed; retrying"),
            }
            match self
                .state
                .batches
                .lease(&self.tenant, &self.id, &self.owner, LEASE_MS)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("batch lease lost to another process");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "batch lease renewal failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.settings.poll()) => {}
                _ = stopping.changed() => {}
            }
        }
        if let Err(e) = self
            .state
            .batches
            .release(&self.tenant, &self.id, &self.owner)
            .await
        {
            tracing::warn!(error = %e, "batch lease release failed");
        }
    }

    async fn tick(&mut self) -> Result<Tick, ApiError> {
        let store = &self.state.batches;
        let Some(batch) = store.load(&self.tenant, &self.id).await? else {
            // Listed before its record is written: a creation still under way, or one whose
            // process died in between (then, after a minute, it is retired).
            if sluice_proto::now_ms().saturating_sub(self.since_ms) < ORPHAN_AFTER_MS {
                return Ok(Tick::Again);
            }
            store.retire(&self.tenant, &self.id).await?;
            return Ok(Tick::Ended);
        };
        let status = batch.view.status;
        if status.is_terminal() {
            store.retire(&self.tenant, &self.id).await?;
            return Ok(Tick::Ended);
        }
        if self.input.is_none() {
            match self.read_input(&batch).await? {
                Ok(input) => self.input = Some(Arc::new(input)),
                Err(error) => return self.fail(&batch, error).await,
            }
        }
        let input = Arc::clone(self.input.as_ref().expect("read above"));
        if batch.view.request_counts.total != input.len() as u64 {
            store
                .set(
                    &self.tenant,
                    &self.id,
                    &[("total", input.len().to_string())],
                )
                .await?;
        }
        if status == BatchStatus::Validating {
            store
                .transition(
                    &self.tenant,
                    &self.id,
                    &[BatchStatus::Validating],
                    BatchStatus::InProgress,
                )
                .await?;
            return Ok(Tick::Again);
        }
        if status == BatchStatus::Finalizing {
            return self.end(&batch, BatchStatus::Completed).await;
        }
        let expired = sluice_proto::now_ms() / 1000 >= batch.view.expires_at;
        let winding_down = match status {
            BatchStatus::Cancelling => Some(BatchStatus::Cancelled),
            _ if expired => Some(BatchStatus::Expired),
            _ => None,
        };
        let in_flight = self.collect(&batch, &input, winding_down).await?;
        if let Some(end) = winding_down {
            if !self.cancels_sent {
                for (_, job) in store.inflight(&self.tenant, &self.id).await? {
                    self.state.store.cancel(&batch.tenant, &job).await?;
                }
                self.cancels_sent = true;
            }
            if in_flight > 0 {
                return Ok(Tick::Again);
            }
            let code = ended_code(end);
            let batch = store.load(&self.tenant, &self.id).await?.unwrap_or(batch);
            for index in batch.cursor..input.len() as u64 {
                let line = ended_line(&input[index as usize].custom_id, code);
                if store.skipped(&self.id, &batch.tenant, index, &line).await? {
                    self.count_line(false);
                }
            }
            return self.end(&batch, end).await;
        }
        let cursor = self.submit_more(&batch, &input).await?;
        if cursor == input.len() as u64
            && in_flight == 0
            && store.inflight(&self.tenant, &self.id).await?.is_empty()
        {
            let moved = store
                .transition(
                    &self.tenant,
                    &self.id,
                    &[BatchStatus::InProgress],
                    BatchStatus::Finalizing,
                )
                .await?;
            if matches!(moved, Some(Ok(_))) {
                return self.end(&batch, BatchStatus::Completed).await;
            }
        }
        Ok(Tick::Again)
    }

    /// The input file's lines, or why the batch cannot run (`Ok(Err)`).
    async fn read_input(
        &self,
        batch: &BatchRecord,
    ) -> Result<Result<Vec<InputLine>, String>, ApiError> {
        let files = &self.state.files;
        let file_id = &batch.view.input_file_id;
        if files.get(&batch.tenant, file_id).await?.is_none() {
            return Ok(Err(format!("the input file {file_id} was deleted")));
        }
        let mut stream = match files.content(&batch.tenant, file_id).await {
            Ok(stream) => stream,
            Err(FileError::Objects(object_store::Error::NotFound { .. })) => {
                return Ok(Err(format!("the input file {file_id} was deleted")));
            }
            Err(e) => return Err(e.into()),
        };
        #[derive(serde::Deserialize)]
        struct Id {
            custom_id: String,
        }
        let mut input = Vec::new();
        let mut partial: Vec<u8> = Vec::new();
        let (mut offset, mut number) = (0u64, 0u64);
        let mut line_start = 0u64;
        let mut index_line = |line: &[u8], start: u64, number: u64| -> Result<(), String> {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                return Ok(());
            }
            let Ok(Id { custom_id }) = serde_json::from_slice::<Id>(line) else {
                return Err(format!("line {number} of the input file has no custom_id"));
            };
            input.push(InputLine {
                custom_id,
                start,
                len: line.len() as u64,
            });
            Ok(())
        };
        while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
            let chunk = chunk.map_err(FileError::from)?;
            let mut rest: &[u8] = &chunk;
            while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                partial.extend_from_slice(&rest[..end]);
                number += 1;
                if let Err(why) = index_line(&partial, line_start, number) {
                    return Ok(Err(why));
                }
                offset += end as u64 + 1;
                line_start = offset;
                partial.clear();
                rest = &rest[end + 1..];
            }
            offset += rest.len() as u64;
            partial.extend_from_slice(rest);
        }
        if !partial.is_empty()
            && let Err(why) = index_line(&partial, line_start, number + 1)
        {
            return Ok(Err(why));
        }
        Ok(Ok(input))
    }

    /// The bytes of `lines`, consecutive lines of the input file, in one read.
    async fn read_lines(
        &self,
        batch: &BatchRecord,
        lines: &[InputLine],
    ) -> Result<Vec<bytes::Bytes>, ApiError> {
        let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
            return Ok(Vec::new());
        };
        let range = first.start..last.start + last.len;
        let bytes = self
            .state
            .files
            .read_range(&batch.tenant, &batch.view.input_file_id, range)
            .await?;
        Ok(lines
            .iter()
            .map(|l| {
                let from = (l.start - first.start) as usize;
                bytes.slice(from..from + l.len as usize)
            })
            .collect())
    }

    /// Ends a batch that cannot run (its input file is gone).
    async fn fail(&self, batch: &BatchRecord, message: String) -> Result<Tick, ApiError> {
        let errors = BatchErrors {
            object: "list".into(),
            data: vec![BatchError {
                code: "invalid_file".into(),
                message,
                param: Some("input_file_id".into()),
                line: None,
            }],
        };
        let errors =
            serde_json::to_string(&errors).map_err(|e| ApiError::Internal(e.to_string()))?;
        let store = &self.state.batches;
        store
            .set(&self.tenant, &self.id, &[("errors", errors)])
            .await?;
        let moved = store
            .transition(
                &self.tenant,
                &self.id,
                &[BatchStatus::Validating],
                BatchStatus::Failed,
            )
            .await?;
        if matches!(moved, Some(Ok(_))) {
            self.notify(batch, BatchStatus::Failed).await;
        } else if matches!(
            moved,
            Some(Err(BatchStatus::InProgress | BatchStatus::Cancelling))
        ) {
            // The input went away mid-run: the lines that ran are kept, the rest fail.
            let code = "invalid_file";
            for index in batch.cursor..batch.view.request_counts.total {
                let line = json!({
                    "id": format!("batch_req_{}", Uuid::now_v7().simple()),
                    "custom_id": Value::Null,
                    "response": Value::Null,
                    "error": {"code": code, "message": "the input file was deleted before this line ran"},
                })
                .to_string();
                if store.skipped(&self.id, &batch.tenant, index, &line).await? {
                    self.count_line(false);
                }
            }
            let end = if batch.view.status == BatchStatus::Cancelling {
                BatchStatus::Cancelled
            } else {
                BatchStatus::Failed
            };
            return self.end(batch, end).await;
        }
        store.retire(&self.tenant, &self.id).await?;
        Ok(Tick::Ended)
    }

    /// Writes the finished lines of jobs that ended; returns how many are still in flight.
    async fn collect(
        &self,
        batch: &BatchRecord,
        input: &[InputLine],
        winding_down: Option<BatchStatus>,
    ) -> Result<usize, ApiError> {
        let store = &self.state.batches;
        let mut in_flight = 0;
        let lines = store.inflight(&self.tenant, &self.id).await?;
        let jobs: Vec<Uuid> = lines.iter().map(|(_, job)| *job).collect();
        let views = self.state.store.get_many(&batch.tenant, &jobs).await?;
        for ((index, job), view) in lines.into_iter().zip(views) {
            let custom_id = input
                .get(index as usize)
                .map(|l| l.custom_id.as_str())
                .unwrap_or_default();
            let (line, completed) = match view {
                Some(view) if view.status.is_terminal() => {
                    job_line(custom_id, &view, &self.state.codec.name, winding_down)
                }
                Some(_) => {
                    in_flight += 1;
                    continue;
                }
                None => (
                    failed_line(
                        custom_id,
                        Some(job),
                        &ErrorBody::new(
                            ErrorCode::Internal,
                            "the job's record expired before the batch collected its result",
                        ),
                    ),
                    false,
                ),
            };
            if store
                .record_line(&self.id, &batch.tenant, index, &line, completed)
                .await?
            {
                self.count_line(completed);
            }
        }
        Ok(in_flight)
    }

    /// Submits lines while the tenant has room in the batch lane; returns the cursor.
    async fn submit_more(&self, batch: &BatchRecord, input: &[InputLine]) -> Result<u64, ApiError> {
        let store = &self.state.batches;
        let tenant = &batch.tenant;
        let policy = self.state.tenants.policy(tenant).await?;
        let window = u64::from(self.settings.batch_lane_window.max(1))
            * u64::from(policy.batch_weight.max(1));
        let mut in_lane = store.tenant_inflight(tenant).await?;
        let mut cursor = batch.cursor;
        let peer: SocketAddr = batch
            .peer
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        // The lines this tick may submit, read in one range request.
        let room = window.saturating_sub(in_lane) as usize;
        let upto = (cursor as usize + room).min(input.len());
        let texts = self
            .read_lines(batch, &input[cursor as usize..upto])
            .await?;
        while cursor < input.len() as u64 && in_lane < window {
            let line = &input[cursor as usize];
            let Some(text) = texts.get((cursor - batch.cursor) as usize) else {
                break;
            };
            let parsed = lines::parse_line(text, &self.state.codec.name, &self.state.limits);
            let mut job = match parsed {
                Ok(parsed) => parsed.job,
                Err(e) => {
                    let refused = failed_line(&line.custom_id, None, &e.body());
                    if store.skipped(&self.id, tenant, cursor, &refused).await? {
                        self.count_line(false);
                    }
                    cursor += 1;
                    continue;
                }
            };
            job.priority = Some(Priority::Batch);
            let left = batch
                .view
                .expires_at
                .saturating_sub(sluice_proto::now_ms() / 1000)
                .max(1);
            job.timeout = self.state.limits.max_timeout.min(Duration::from_secs(left));
            let mut headers = HeaderMap::new();
            let key = format!("{}:{cursor}", self.id);
            headers.insert(
                crate::submit::IDEMPOTENCY_KEY,
                HeaderValue::from_str(&key).map_err(|e| ApiError::Internal(e.to_string()))?,
            );
            let principal = Principal {
                tenant: tenant.clone(),
                key_id: batch.key_id.clone(),
                role: Role::User,
                policy: Some(policy.clone()),
            };
            match crate::submit::submit(&self.state, principal, peer, job, &headers).await {
                Ok(submitted) => {
                    store
                        .enqueued(&self.id, tenant, cursor, &submitted.id)
                        .await?;
                    in_lane += 1;
                }
                Err(e) if retry_later(&e) => {
                    tracing::debug!(error = %e, "batch line waits for room");
                    break;
                }
                Err(e) => {
                    let refused = failed_line(&line.custom_id, None, &e.body());
                    if store.skipped(&self.id, tenant, cursor, &refused).await? {
                        self.count_line(false);
                    }
                }
            }
            cursor += 1;
        }
        Ok(cursor)
    }

    /// Writes the output and error files, sends the webhook and ends the batch as `end`.
    async fn end(&self, batch: &BatchRecord, end: BatchStatus) -> Result<Tick, ApiError> {
        let store = &self.state.batches;
        let finished = store.lines(&self.tenant, &self.id).await?;
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        let (mut output_lines, mut error_lines) = (0u64, 0u64);
        for line in finished.values() {
            let completed = serde_json::from_str::<Value>(line)
                .is_ok_and(|v| v["response"]["status_code"] == 200 && v["error"].is_null());
            let (file, count) = if completed {
                (&mut output, &mut output_lines)
            } else {
                (&mut errors, &mut error_lines)
            };
            file.extend_from_slice(line.as_bytes());
            file.push(b'\n');
            *count += 1;
        }
        let digits = self.id.trim_start_matches("batch_");
        let mut fields = Vec::new();
        if output_lines > 0 {
            let id = format!("file-{digits}-output");
            self.state
                .files
                .put_output(
                    &batch.tenant,
                    &id,
                    format!("{}_output.jsonl", self.id),
                    output,
                    output_lines,
                )
                .await?;
            fields.push(("output_file_id", id));
        }
        if error_lines > 0 {
            let id = format!("file-{digits}-errors");
            self.state
                .files
                .put_output(
                    &batch.tenant,
                    &id,
                    format!("{}_errors.jsonl", self.id),
                    errors,
                    error_lines,
                )
                .await?;
            fields.push(("error_file_id", id));
        }
        if !fields.is_empty() {
            store.set(&self.tenant, &self.id, &fields).await?;
        }
        let from: &[BatchStatus] = match end {
            BatchStatus::Completed => &[BatchStatus::Finalizing],
            BatchStatus::Cancelled => &[BatchStatus::Cancelling],
            _ => &[BatchStatus::InProgress, BatchStatus::Cancelling],
        };
        let moved = store.transition(&self.tenant, &self.id, from, end).await?;
        if matches!(moved, Some(Ok(_))) {
            tracing::info!(
                status = end.as_str(),
                completed = output_lines,
                failed = error_lines,
                "batch ended"
            );
            self.notify(batch, end).await;
        }
        store.retire(&self.tenant, &self.id).await?;
        Ok(Tick::Ended)
    }

    fn count_line(&self, completed: bool) {
        self.state
            .metrics
            .batch_lines
            .with_label_values(&[if completed { "completed" } else { "failed" }])
            .inc();
    }

    /// Sends the batch's webhook event to the tenant's endpoints (delivery is durable from
    /// here on; a failure to enqueue it is logged, the batch's own state is already final).
    async fn notify(&self, batch: &BatchRecord, end: BatchStatus) {
        self.state
            .metrics
            .batches_finished
            .with_label_values(&[end.as_str()])
            .inc();
        let Some(event) = end.event_type() else {
            return;
        };
        if let Err(e) = self
            .state
            .webhooks
            .emit(&batch.tenant, event, json!({ "id": self.id }))
            .await
        {
            tracing::error!(error = %e, event, "batch webhook not enqueued");
        }
    }
}

/// Refusals that clear up on their own: the line waits for the next tick.
fn retry_later(e: &ApiError) -> bool {
    match e {
        ApiError::ConcurrencyLimited { .. }
        | ApiError::QueueFull { .. }
        | ApiError::RateLimited(_)
        | ApiError::Store(_)
        | ApiError::Queue(_)
        | ApiError::Guard(_)
        | ApiError::Internal(_) => true,
        ApiError::Client(body) => matches!(
            body.code,
            ErrorCode::GuardUnavailable | ErrorCode::QueueUnavailable | ErrorCode::StoreUnavailable
        ),
        _ => false,
    }
}

fn ended_code(end: BatchStatus) -> &'static str {
    if end == BatchStatus::Expired {
        "batch_expired"
    } else {
        "batch_cancelled"
    }
}

fn request_id() -> String {
    format!("batch_req_{}", Uuid::now_v7().simple())
}

/// The error line of a line that never ran: OpenAI's shape for cancelled and expired lines.
fn ended_line(custom_id: &str, code: &str) -> String {
    let message = if code == "batch_expired" {
        "This request could not be executed before the completion window expired."
    } else {
        "This request was not executed because the batch was cancelled."
    };
    json!({
        "id": request_id(),
        "custom_id": custom_id,
        "response": Value::Null,
        "error": {"code": code, "message": message},
    })
    .to_string()
}

/// The error line of a line refused at submit (`job` `None`) or whose job failed.
fn failed_line(custom_id: &str, job: Option<Uuid>, error: &ErrorBody) -> String {
    json!({
        "id": request_id(),
        "custom_id": custom_id,
        "response": {
            "status_code": error.code.http_status(),
            "request_id": job.map(|j| j.to_string()),
            "body": error_json(error),
        },
        "error": Value::Null,
    })
    .to_string()
}

/// The line of a job that ended: its completion (`true`), or its error line.
fn job_line(
    custom_id: &str,
    view: &JobView,
    model: &str,
    winding_down: Option<BatchStatus>,
) -> (String, bool) {
    if view.status == JobStatus::Succeeded
        && let Ok(body) = completion(view, model)
    {
        let line = json!({
            "id": format!("batch_req_{}", view.id.simple()),
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": view.id.to_string(), "body": body},
            "error": Value::Null,
        });
        return (line.to_string(), true);
    }
    if view.status == JobStatus::Cancelled {
        let end = winding_down.unwrap_or(BatchStatus::Cancelled);
        return (ended_line(custom_id, ended_code(end)), false);
    }
    let error = view.error.clone().unwrap_or_else(|| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("the job ended with status {}", view.status.as_str()),
        )
    });
    (failed_line(custom_id, Some(view.id), &error), false)
}
