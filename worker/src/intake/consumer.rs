//! Handling one delivery: decode → start (Redis) → engine → finish (Redis) → ack.
//!
//! The delivery is acknowledged only after the terminal state is in Redis. Every path ends in
//! one [`Disposition`], applied in one place: ack, dead-letter (undecodable), or requeue (the
//! worker could not finish it: shutdown, also while Redis is unreachable; an outage alone is
//! waited out with the delivery held). Dead letters come back through
//! [`JobRunner::handle_dead_letter`], which fails the job they carry.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use sluice_jobs::session::SessionStore;
use sluice_jobs::store::{JobStore, StartOutcome, Terminal};
use sluice_proto::{
    ErrorBody, ErrorCode, FinishReason, JobMessage, JobResult, JobStatus, Message, Role, Timings,
    Usage,
};
use tokio::sync::watch;
use tracing::Instrument;

use crate::engine::generate::{GenerateError, Generation, JobControl};
use crate::engine::judge::{JudgeError, Verdict};
use crate::engine::{EngineError, EngineHandle};
use crate::metrics::WorkerMetrics;

/// What to tell the broker about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    /// Reject without requeue: the queue's dead-letter exchange takes it.
    DeadLetter,
    Requeue,
}

/// Everything a delivery handler needs; cheap to clone into each handler task.
#[derive(Clone)]
pub struct JobRunner {
    pub store: JobStore,
    pub engine: EngineHandle,
    pub worker_id: String,
    pub max_attempts: u32,
    pub max_tokens_limit: u32,
    pub cancel_poll: Duration,
    /// Run the PII redactor over generated text before it is stored or streamed.
    pub redact_output: bool,
    /// The least time between two appends to a job's event stream (`--stream-flush-ms`).
    pub stream_flush: Duration,
    /// How long finished jobs (and their event streams) stay readable, in seconds.
    pub result_ttl_secs: u64,
    /// Flips to `true` when in-flight jobs must be given back (shutdown grace expired).
    pub preempt: watch::Receiver<bool>,
    pub metrics: Arc<WorkerMetrics>,
    /// Deliveries being handled now (reported in the heartbeat).
    pub in_flight: Arc<AtomicUsize>,
}

impl JobRunner {
    /// Handles a delivery end to end and acknowledges it.
    pub async fn handle(&self, delivery: Delivery) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        // One token per delivery: `START` tells this delivery's own retries from a second copy.
        let token = uuid::Uuid::now_v7().to_string();
        let disposition = self
            .process(&delivery.data, delivery.redelivered, &token)
            .await;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        settle(&delivery, disposition).await;
    }

    /// Handles a message from the dead-letter queue: the job it carries becomes `failed /
    /// dead_lettered` with the broker's reason (unless it is terminal already), so a client
    /// never waits on a job the broker gave up on. The job is found by the message's id
    /// property (set on every publish), or, failing that, by its body; a message naming no
    /// job is logged and dropped. Counted once per message as `dead_lettered`, whoever sent
    /// it there (this worker's nack, the broker's delivery limit).
    pub async fn handle_dead_letter(&self, delivery: Delivery) {
        self.metrics.ended("dead_lettered");
        let death = sluice_jobs::amqp::death_of(&delivery.properties);
        let (reason, deliveries) = death
            .as_ref()
            .map_or(("unknown", 0), |d| (d.reason.as_str(), d.count));
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|m| uuid::Uuid::parse_str(m.as_str()).ok())
            .or_else(|| JobMessage::decode(&delivery.data).ok().map(|j| j.id));
        let Some(id) = id else {
            tracing::warn!(
                reason,
                bytes = delivery.data.len(),
                "dropping a dead letter that names no job"
            );
            settle(&delivery, Disposition::Ack).await;
            return;
        };
        let span = tracing::info_span!("dead_letter", job_id = %id, reason);
        let terminal = failed(ErrorBody::new(
            ErrorCode::DeadLettered,
            format!(
                "the broker dead-lettered the job's message (reason: {reason}, {deliveries} \
                 time(s) in {})",
                death.as_ref().map_or("its queue", |d| d.queue.as_str())
            ),
        ));
        let disposition = match self.finish_retrying(&id, &terminal).instrument(span).await {
            Some(true) => {
                tracing::warn!(job_id = %id, reason, "dead-lettered job failed");
                Disposition::Ack
            }
            Some(false) => Disposition::Ack,
            None => Disposition::Requeue,
        };
        settle(&delivery, disposition).await;
    }
}

/// Applies a disposition to a delivery.
async fn settle(delivery: &Delivery, disposition: Disposition) {
    let result = match disposition {
        Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
        Disposition::DeadLetter => {
            delivery
                .nack(BasicNackOptions {
                    requeue: false,
                    multiple: false,
                })
                .await
        }
        Disposition::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
        }
    };
    if let Err(e) = result {
        // The channel is gone; the broker redelivers the message, and the job record
        // (terminal or not) decides what the next worker does with it.
        tracing::warn!(error = %e, ?disposition, "could not settle delivery");
    }
}

impl JobRunner {
    /// Decides a delivery's fate. Never panics and never leaves a started job without either a
    /// terminal state or a requeue.
    pub async fn process(&self, payload: &[u8], redelivered: bool, token: &str) -> Disposition {
        let job = match JobMessage::decode(payload) {
            Ok(job) => job,
            Err(reason) => {
                tracing::warn!(%reason, bytes = payload.len(), "dead-lettering undecodable message");
                return Disposition::DeadLetter;
            }
        };
        let span = tracing::info_span!(
            "job",
            otel.kind = "consumer",
            job_id = %job.id,
            tenant = %job.tenant,
            traceparent = job.trace.traceparent.as_deref().unwrap_or(""),
        );
        if let Some(tp) = &job.trace.traceparent {
            sluice_shared::telemetry::set_remote_parent(&span, tp, job.trace.tracestate.as_deref());
        }
        self.process_job(job, redelivered, token)
            .instrument(span)
            .await
    }

    async fn process_job(&self, job: JobMessage, redelivered: bool, token: &str) -> Disposition {
        if let Err(error) = job.params.validate(self.max_tokens_limit) {
            return self.write_terminal(&job, failed(error)).await;
        }
        let attempt = match self.start(&job, redelivered, token).await {
            Ok(attempt) => attempt,
            Err(disposition) => return disposition,
        };
        tracing::info!(attempt, "job started");
        let started_ms = sluice_proto::now_ms();
        self.metrics.jobs_started.inc();
        self.metrics
            .queue_wait
            .observe(started_ms.saturating_sub(job.created_at) as f64 / 1000.0);
        let deadline =
            Instant::now() + Duration::from_millis(job.deadline.saturating_sub(started_ms));
        let control = JobControl::new(deadline);
        let watchers = self.watch(&job, &control);
        if job.judge
            && let Some(terminal) = self.judge(&job, &control).await
        {
            watchers.abort();
            return self.write_terminal(&job, terminal).await;
        }
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let ttl = job.deadline.saturating_sub(started_ms) / 1000 + self.result_ttl_secs;
        let pump = tokio::spawn(crate::intake::stream::pump(
            self.store.clone(),
            job.id,
            crate::intake::stream::PumpConfig {
                ttl_secs: ttl,
                redact: self.redact_output,
                flush_interval: self.stream_flush,
            },
            events_rx,
        ));
        let result = self
            .engine
            .run(job.clone(), control, Some(events_tx))
            .instrument(tracing::info_span!("generate"))
            .await;
        if let Ok(generation) = &result {
            self.metrics.observe_generation(&job.tenant, generation);
        }
        watchers.abort();
        // Every streamed piece is in Redis before the terminal event that closes the stream.
        let _ = pump.await;

        let terminal = match result {
            Ok(mut generation) => {
                if self.redact_output {
                    generation.content = sluice_guard::pii::redact(&generation.content);
                }
                let format = &job.params.response_format;
                let check = if generation.finish_reason == FinishReason::Stop {
                    sluice_prompt::structured::validate_output(format, &generation.content)
                } else {
                    // Cut short (length, cancel, deadline, content filter): the finish
                    // reason already says the output is incomplete.
                    Ok(())
                };
                match check {
                    Ok(()) => succeeded(&job, started_ms, generation),
                    Err(e) => {
                        tracing::error!(error = %e, "structured output failed its final check");
                        failed(ErrorBody::new(ErrorCode::OutputValidationFailed, e))
                    }
                }
            }
            Err(EngineError::Generate(GenerateError::Format(e))) => {
                failed(ErrorBody::new(ErrorCode::InvalidResponseFormat, e))
            }
            Err(EngineError::Generate(GenerateError::Constraint(e))) => {
                tracing::error!(error = %e, "structured output failed");
                failed(ErrorBody::new(
                    ErrorCode::OutputValidationFailed,
                    format!("structured output failed: {e}"),
                ))
            }
            Err(EngineError::Generate(GenerateError::Preempted)) => {
                tracing::info!("job given back to the queue unfinished");
                if let Err(e) = self.store.release(&job.id).await {
                    tracing::warn!(error = %e, "could not mark the job queued again");
                }
                return Disposition::Requeue;
            }
            Err(EngineError::Generate(GenerateError::PromptTooLong { prompt, context })) => {
                failed(ErrorBody::new(
                    ErrorCode::ContextLengthExceeded,
                    format!("the prompt has {prompt} tokens; the model's context holds {context}"),
                ))
            }
            Err(EngineError::Generate(GenerateError::TooLarge { tokens, budget })) => {
                failed(ErrorBody::new(
                    ErrorCode::JobTooLarge,
                    format!(
                        "the job needs up to {tokens} KV cache tokens; this worker holds {budget}"
                    ),
                ))
            }
            Err(EngineError::Generate(GenerateError::Model(e))) => {
                tracing::error!(error = %e, "generation failed");
                failed(ErrorBody::new(
                    ErrorCode::ModelError,
                    "the model failed while generating",
                ))
            }
            Err(EngineError::Stopped) => {
                tracing::error!("engine stopped; requeueing");
                return Disposition::Requeue;
            }
        };
        self.write_terminal(&job, terminal).await
    }

    /// The served model's second opinion on a job in its tenant's classifier grey band
    /// ([`crate::engine::judge`]): the terminal state that ends the job here, or `None` to generate it.
    /// A judge that cannot answer fails the job closed (`guard_unavailable`); one that was
    /// interrupted (cancel, deadline, shutdown, a stopped engine) lets the generation meet the
    /// same interruption and end the job the way it always does.
    async fn judge(&self, job: &JobMessage, control: &JobControl) -> Option<Terminal> {
        let started = Instant::now();
        let verdict = crate::engine::judge::judge(&self.engine, job, control.clone())
            .instrument(tracing::info_span!("judge"))
            .await;
        self.metrics
            .judge_duration
            .observe(started.elapsed().as_secs_f64());
        let label = match &verdict {
            Ok(v) => v.as_str(),
            Err(_) => "error",
        };
        self.metrics
            .judge_verdicts
            .with_label_values(&[label])
            .inc();
        match verdict {
            Ok(Verdict::Clean) => {
                tracing::info!("the injection judge let the job through");
                None
            }
            Ok(Verdict::Injection) => {
                tracing::warn!("the injection judge stopped the job");
                Some(failed(ErrorBody::new(
                    ErrorCode::PromptInjectionDetected,
                    "the input looks like a prompt injection (the model's second opinion)",
                )))
            }
            Err(
                JudgeError::Interrupted
                | JudgeError::Engine(
                    EngineError::Stopped | EngineError::Generate(GenerateError::Preempted),
                ),
            ) => None,
            Err(e) => {
                tracing::error!(error = %e, "the injection judge failed; the job fails closed");
                Some(failed(ErrorBody::new(
                    ErrorCode::GuardUnavailable,
                    "the injection judge could not run on this job",
                )))
            }
        }
    }

    /// Appends a succeeded job's turn (its new messages and the redacted reply) to its
    /// session. Runs once per job: only for the write that made the job terminal. A failure
    /// here loses the turn from the history, never the job's result.
    async fn record_turn(&self, job: &JobMessage, terminal: &Terminal) {
        let (Some(session_id), Some(turn), Some(result)) =
            (&job.session_id, &job.session, &terminal.result)
        else {
            return;
        };
        if terminal.status != JobStatus::Succeeded
            || result.finish_reason == FinishReason::ContentFilter
        {
            return;
        }
        let system = turn
            .system
            .then(|| job.messages.iter().find(|m| m.role == Role::System))
            .flatten()
            .map(|m| m.content.as_str());
        let mut messages: Vec<Message> = job
            .messages
            .iter()
            .skip(turn.turn_start as usize)
            .filter(|m| m.role != Role::System)
            .cloned()
            .collect();
        messages.push(Message {
            role: Role::Assistant,
            content: result.content.clone(),
        });
        let sessions = SessionStore::new(self.store.pool().clone(), self.store.keyspace().clone());
        if let Err(e) = sessions
            .append(
                &job.tenant,
                session_id,
                system,
                &messages,
                turn.ttl_secs,
                turn.max_messages,
            )
            .await
        {
            tracing::warn!(error = %e, "could not record the turn in its session");
        }
    }

    /// Polls Redis for a cancel request and forwards shutdown preemption, until aborted.
    fn watch(&self, job: &JobMessage, control: &JobControl) -> WatcherGuard {
        let store = self.store.clone();
        let id = job.id;
        let cancel = control.cancel.clone();
        let every = self.cancel_poll;
        let cancel_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Ok(flags) = store.cancel_requested(&[id]).await
                    && flags.first() == Some(&true)
                {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            }
        });
        let mut preempt_rx = self.preempt.clone();
        let preempt = control.preempt.clone();
        let preempt_task = tokio::spawn(async move {
            if preempt_rx.wait_for(|p| *p).await.is_ok() {
                preempt.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        WatcherGuard(vec![cancel_task, preempt_task])
    }

    /// Runs `START`: the job's attempt number if it is to run, else what to do with the
    /// delivery. While Redis is unreachable it retries with backoff, holding the delivery, for
    /// as long as the outage lasts. Requeueing instead would hand the job straight back (to
    /// this worker or another, whose `START` fails the same way), and every requeue counts
    /// against the quorum queue's `x-delivery-limit`: within seconds of a Redis outage the job
    /// would be dead-lettered, accepted but never run. The unacked delivery is safe: if this
    /// worker dies, the broker redelivers it. Gives it back only when shutdown preempts.
    async fn start(
        &self,
        job: &JobMessage,
        redelivered: bool,
        token: &str,
    ) -> Result<u32, Disposition> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self
                .store
                .start(
                    &job.id,
                    self.max_attempts,
                    &self.worker_id,
                    redelivered,
                    token,
                )
                .await
            {
                Ok(StartOutcome::Run { attempt }) => return Ok(attempt),
                Ok(StartOutcome::Skip(status)) => {
                    tracing::info!(status = status.as_str(), "job not run: already terminal");
                    return Err(Disposition::Ack);
                }
                Ok(StartOutcome::Ended(status)) => {
                    tracing::info!(status = status.as_str(), "job not run: ended at start");
                    self.metrics.ended(status.as_str());
                    return Err(Disposition::Ack);
                }
                Ok(StartOutcome::Missing) => {
                    tracing::info!("job not run: no record (expired or rolled back)");
                    return Err(Disposition::Ack);
                }
                Ok(StartOutcome::Duplicate) => {
                    tracing::info!("job not run: a second copy of a running job's message");
                    return Err(Disposition::Ack);
                }
                Err(e) => tracing::warn!(error = %e, "cannot start job; retrying"),
            }
            if !self.retry_after(delay).await {
                return Err(Disposition::Requeue);
            }
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }

    /// Waits `delay` before the next try of a Redis write; `false` if shutdown preempts the
    /// in-flight jobs first (the caller then gives the job back to the queue).
    async fn retry_after(&self, delay: Duration) -> bool {
        let mut preempt = self.preempt.clone();
        let preempted = async move {
            // (The guard `wait_for` returns is dropped in this statement: the future stays
            // `Send`.)
            let preempted = preempt.wait_for(|p| *p).await.is_ok();
            if !preempted {
                // The worker is gone without preempting: only the delay ends the wait.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = preempted => false,
        }
    }

    /// Writes a terminal state, retrying with backoff while Redis is unreachable, for as long
    /// as the outage lasts: the delivery stays unacked meanwhile (a worker that dies loses
    /// nothing), while a requeue would generate the job a second time and count against the
    /// queue's delivery limit. Requeues only when shutdown preempts it.
    async fn write_terminal(&self, job: &JobMessage, terminal: Terminal) -> Disposition {
        match self.finish_retrying(&job.id, &terminal).await {
            Some(true) => {
                tracing::info!(status = terminal.status.as_str(), "job finished");
                self.metrics
                    .finished(terminal.status.as_str(), job.created_at);
                self.record_turn(job, &terminal).await;
                Disposition::Ack
            }
            Some(false) => {
                tracing::info!("job was already terminal; result discarded");
                Disposition::Ack
            }
            None => Disposition::Requeue,
        }
    }

    /// `FINISH` with the retry policy of [`Self::write_terminal`]: whether this call made the
    /// job terminal, or `None` if shutdown preempted the wait for Redis.
    async fn finish_retrying(&self, id: &uuid::Uuid, terminal: &Terminal) -> Option<bool> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.store.finish(id, terminal).await {
                Ok(written) => return Some(written),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write job result; retrying");
                    if !self.retry_after(delay).await {
                        return None;
                    }
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
    }
}

/// The longest pause between two tries of a Redis write during an outage.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

struct WatcherGuard(Vec<tokio::task::JoinHandle<()>>);

impl WatcherGuard {
    fn abort(self) {
        for t in self.0 {
            t.abort();
        }
    }
}

fn failed(error: ErrorBody) -> Terminal {
    Terminal {
        status: JobStatus::Failed,
        result: None,
        error: Some(error),
    }
}

fn succeeded(job: &JobMessage, started_ms: u64, g: Generation) -> Terminal {
    let status = match g.finish_reason {
        FinishReason::Cancelled => JobStatus::Cancelled,
        FinishReason::Deadline => JobStatus::Expired,
        _ => JobStatus::Succeeded,
    };
    let error = (status == JobStatus::Expired).then(|| {
        ErrorBody::new(
            ErrorCode::DeadlineExceeded,
            "the job deadline passed while it was running",
        )
    });
    Terminal {
        status,
        result: Some(JobResult {
            content: g.content,
            finish_reason: g.finish_reason,
            usage: Usage {
                prompt_tokens: g.prompt_tokens as u32,
                completion_tokens: g.completion_tokens as u32,
                cached_tokens: g.cached_tokens as u32,
            },
            timings: Timings {
                queued_ms: started_ms.saturating_sub(job.created_at),
                time_to_first_token_ms: g.time_to_first_token.as_millis() as u64,
                generation_ms: g.total.as_millis() as u64,
                generation_us: g.total.as_micros() as u64,
            },
        }),
        error,
    }
}
