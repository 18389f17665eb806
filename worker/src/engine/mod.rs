//! The engine: one dedicated OS thread owns the model and runs every admitted job in one
//! continuous batch.
//!
//! Async code talks to it through a cloneable [`EngineHandle`] and awaits a oneshot reply, so
//! model compute never blocks the runtime. Each loop iteration:
//! 1. takes new jobs off the channel (blocking only when idle);
//! 2. admits waiting jobs while the batch has room (`max_batch`) and their worst-case KV use
//!    (prompt + `max_tokens`, capped at the context) fits the KV token budget; a job that could
//!    never fit fails at once with `job_too_large` instead of waiting forever;
//! 3. prefills one chunk (`prefill_chunk` tokens) of one new sequence, so a long prompt never
//!    stalls the running sequences for more than one chunk;
//! 4. runs one batched decode step for every sequence that has a next token;
//! 5. replies for the sequences that finished and drops their KV caches (their pages go back
//!    to the pool, which was allocated once at start for the whole budget).
//!
//! Beside the loop:
//! - [`generate`]: one sequence (sampling, stop sequences, incremental UTF-8-safe
//!   detokenization, cancellation, deadline);
//! - [`kv`]: the paged KV pool and each sequence's pages;
//! - [`leak`]: the leak check of each job's output (canary, verbatim system-prompt spans);
//! - [`judge`]: the served model's second opinion on a request in its tenant's classifier grey
//!   band, run before the job generates.

pub mod generate;
pub mod judge;
pub mod kv;
pub mod leak;

use std::collections::VecDeque;
use std::sync::Arc;

use sluice_proto::{JobMessage, Priority};
use tokio::sync::{mpsc, oneshot};

use crate::engine::generate::{GenerateError, Generation, Guards, JobControl, Sequence, Step};
use crate::engine::kv::KvPool;
use crate::engine::leak::LeakGuard;
use crate::metrics::WorkerMetrics;
use crate::model::{LoadedModel, ModelInfo};

/// Scheduling limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences decoded together (and the worker's prefetch).
    pub max_batch: usize,
    /// KV cache tokens all admitted sequences may hold together (worst case).
    pub kv_token_budget: usize,
    /// Prompt tokens prefilled per loop iteration.
    pub prefill_chunk: usize,
    /// Key of the leak canary ([`LeakGuard::install`]).
    pub canary_key: [u8; 32],
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            kv_token_budget: 65_536,
            prefill_chunk: 256,
            canary_key: rand::random(),
        }
    }
}

struct EngineJob {
    job: JobMessage,
    control: JobControl,
    /// Receives generated text as it becomes final.
    events: Option<mpsc::UnboundedSender<String>>,
    reply: oneshot::Sender<Result<Generation, GenerateError>>,
    span: tracing::Span,
    /// Set once the job was prepared but had to wait for KV budget.
    prepared: Option<Prepared>,
}

/// A job turned into what the engine runs: prompt tokens (the system prompt carrying the leak
/// canary) and the output guards.
struct Prepared {
    prompt: Vec<u32>,
    guards: Guards,
}

fn prepare(
    model: &LoadedModel,
    job: &JobMessage,
    key: &[u8; 32],
) -> Result<Prepared, GenerateError> {
    let mut messages = job.messages.clone();
    let leak = LeakGuard::install(&mut messages, key, &job.tenant, job.params.seed);
    let prompt = model.encode_chat(&messages)?;
    let format = &job.params.response_format;
    let constraint = if format.is_text() {
        None
    } else {
        let grammar = model.grammar().ok_or_else(|| {
            GenerateError::Format(
                "this model's tokenizer does not support structured output".into(),
            )
        })?;
        grammar
            .constraint(format)
            .map_err(|e| GenerateError::Format(e.to_string()))?
    };
    Ok(Prepared {
        prompt,
        guards: Guards { constraint, leak },
    })
}

/// A handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<EngineJob>,
    info: ModelInfo,
    config: EngineConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("the engine thread has stopped")]
    Stopped,
}

impl EngineHandle {
    /// Moves the model onto its own thread. The thread ends when every handle is dropped.
    /// The KV pool (the whole token budget, plus a page per sequence for rounding) is
    /// allocated here, once.
    pub fn start(
        model: LoadedModel,
        config: EngineConfig,
        metrics: Arc<WorkerMetrics>,
    ) -> std::io::Result<Self> {
        let info = model.info().clone();
        let pool = model
            .model()
            .new_pool(config.kv_token_budget + config.max_batch * crate::engine::kv::PAGE)
            .map_err(std::io::Error::other)?;
        tracing::info!(
            tokens = pool.capacity(),
            bytes = pool.capacity() * model.model().dims().kv_bytes_per_token(pool.dtype()),
            "KV pool allocated"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let compute = compute_pool()?;
        std::thread::Builder::new()
            .name("sluice-engine".into())
            .spawn(move || compute.install(|| engine_loop(&model, &pool, rx, config, &metrics)))?;
        Ok(Self { tx, info, config })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// How many jobs the engine runs at once (the worker's prefetch).
    pub fn capacity(&self) -> usize {
        self.config.max_batch
    }

    /// Runs a job to completion on the engine thread.
    pub async fn run(
        &self,
        job: JobMessage,
        control: JobControl,
        events: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<Generation, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(EngineJob {
                job,
                control,
                events,
                reply,
                span: tracing::Span::current(),
                prepared: None,
            })
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx.await.map_err(|_| EngineError::Stopped)??)
    }
}

struct Running<'m> {
    seq: Sequence<'m>,
    events: Option<mpsc::UnboundedSender<String>>,
    reply: oneshot::Sender<Result<Generation, GenerateError>>,
    span: tracing::Span,
    next: Option<u32>,
    outcome: Option<Result<Step, GenerateError>>,
}

/// The threads model compute runs on (`RAYON_NUM_THREADS`, else one per core). The engine
/// loop runs on one of them, inside [`rayon::ThreadPool::install`], so every parallel kernel of
/// a forward pass (Sluice's matmuls, candle's CPU ops) starts on a thread that is already part
/// of the pool and finds the others still spinning from the last one. Run from a thread outside
/// the pool, each of the hundreds of parallel regions per decode step parked the caller and
/// woke sleeping workers through the kernel: 15 to 20 % of a batch-8 step's CPU time on a
/// 2-core VM went to futex wake-ups and `sched_yield`.
pub fn compute_pool() -> std::io::Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("sluice-compute-{i}"))
        .build()
        .map_err(std::io::Error::other)
}

fn engine_loop(
    model: &LoadedModel,
    pool: &Arc<KvPool>,
    mut rx: mpsc::UnboundedReceiver<EngineJob>,
    config: EngineConfig,
    metrics: &WorkerMetrics,
) {
    let mut waiting: VecDeque<EngineJob> = VecDeque::new();
    let mut running: Vec<Running<'_>> = Vec::new();
    loop {
        if running.is_empty() && waiting.is_empty() {
            match rx.blocking_recv() {
                Some(work) => waiting.push_back(work),
                None => return,
            }
        }
        while let Ok(work) = rx.try_recv() {
            waiting.push_back(work);
        }
        admit(model, pool, &config, &mut waiting, &mut running);
        prefill_one_chunk(model, &config, &mut running);
        let started = std::time::Instant::now();
        let decoded = decode_step(model, &mut running);
        if decoded > 0 {
            metrics.batch_size.observe(decoded as f64);
            let step = started.elapsed().as_secs_f64();
            for _ in 0..decoded {
                metrics.inter_token_latency.observe(step);
            }
        }
        finish_done(&mut running);
        metrics.running.set(running.len() as i64);
        metrics.waiting.set(waiting.len() as i64);
        let pages = pool.capacity() / crate::engine::kv::PAGE;
        if pages > 0 {
            let used = pages.saturating_sub(pool.free_pages());
            metrics.kv_usage.set(used as f64 / pages as f64);
        }
    }
}

fn admit<'m>(
    model: &'m LoadedModel,
    pool: &Arc<KvPool>,
    config: &EngineConfig,
    waiting: &mut VecDeque<EngineJob>,
    running: &mut Vec<Running<'m>>,
) {
    let mut used: usize = running.iter().map(|r| r.seq.max_tokens_in_cache()).sum();
    while running.len() < config.max_batch {
        // Interactive jobs first; within a class, arrival order.
        let next = waiting
            .iter()
            .position(|w| w.job.priority == Priority::Interactive)
            .unwrap_or(0);
        let Some(mut work) = waiting.remove(next) else {
            return;
        };
        if work.reply.is_closed() {
            continue;
        }
        let _entered = work.span.clone().entered();
        let prepared = match work.prepared.take() {
            Some(p) => p,
            None => match prepare(model, &work.job, &config.canary_key) {
                Ok(p) => p,
                Err(e) => {
                    let _ = work.reply.send(Err(e));
                    continue;
                }
            },
        };
        let need = (prepared.prompt.len() + work.job.params.max_tokens as usize)
            .min(model.info().context_length);
        if need > config.kv_token_budget {
            let _ = work.reply.send(Err(GenerateError::TooLarge {
                tokens: need,
                budget: config.kv_token_budget,
            }));
            continue;
        }
        if used + need > config.kv_token_budget {
            // Waits until running sequences free enough KV budget.
            work.prepared = Some(prepared);
            waiting.push_front(work);
            return;
        }
        match Sequence::new(
            model,
            prepared.prompt,
            work.job.params.clone(),
            work.control.clone(),
            pool.new_cache(),
            prepared.guards,
        ) {
            Ok(seq) => {
                used += need;
                running.push(Running {
                    seq,
                    events: work.events,
                    reply: work.reply,
                    span: work.span,
                    next: None,
                    outcome: None,
                });
            }
            Err(e) => {
                let _ = work.reply.send(Err(e));
            }
        }
    }
}

fn prefill_one_chunk(model: &LoadedModel, config: &EngineConfig, running: &mut [Running<'_>]) {
    let Some(r) = running
        .iter_mut()
        .find(|r| r.outcome.is_none() && r.seq.is_prefilling())
    else {
        return;
    };
    let _entered = r.span.clone().entered();
    match r.seq.interrupted() {
        Ok(None) => {}
        Ok(Some(reason)) => {
            r.outcome = Some(Ok(Step::Finished(reason)));
            return;
        }
        Err(e) => {
            r.outcome = Some(Err(e));
            return;
        }
    }
    let pending = r.seq.pending_prompt();
    let chunk: Vec<u32> = pending[..pending.len().min(config.prefill_chunk)].to_vec();
    match model.model().prefill(&chunk, &mut r.seq.cache) {
        Ok(logits) => {
            r.seq.mark_prefilled(chunk.len());
            if !r.seq.is_prefilling() {
                let step = r_step(&mut r.seq, r.events.as_ref(), &logits);
                apply(r, step);
            }
        }
        Err(e) => r.outcome = Some(Err(GenerateError::Model(e.into()))),
    }
}

fn r_step(
    seq: &mut Sequence<'_>,
    events: Option<&mpsc::UnboundedSender<String>>,
    logits: &candle_core::Tensor,
) -> Result<Step, GenerateError> {
    seq.step(logits, &mut |text| {
        if let Some(tx) = events {
            let _ = tx.send(text.to_string());
        }
    })
}

fn apply(r: &mut Running<'_>, step: Result<Step, GenerateError>) {
    match step {
        Ok(Step::Continue(token)) => r.next = Some(token),
        other => {
            r.next = None;
            r.outcome = Some(other);
        }
    }
}

/// One batched decode step; returns how many sequences it decoded.
fn decode_step(model: &LoadedModel, running: &mut [Running<'_>]) -> usize {
    let mut batch: Vec<&mut Running<'_>> = running
        .iter_mut()
        .filter(|r| r.outcome.is_none() && r.next.is_some())
        .collect();
    if batch.is_empty() {
        return 0;
    }
    let size = batch.len();
    let tokens: Vec<u32> = batch.iter().filter_map(|r| r.next).collect();
    let result = {
        let mut caches: Vec<&mut crate::model::qwen::SeqCache> =
            batch.iter_mut().map(|r| &mut r.seq.cache).collect();
        model.model().decode(&tokens, &mut caches)
    };
    match result {
        Ok(logits) => {
            for (i, r) in batch.iter_mut().enumerate() {
                let step = logits
                    .get(i)
                    .map_err(|e| GenerateError::Model(e.into()))
                    .and_then(|row| r_step(&mut r.seq, r.events.as_ref(), &row));
                apply(r, step);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, batch = batch.len(), "decode step failed");
            for r in batch {
                r.outcome = Some(Err(GenerateError::Model(
                    candle_core::Error::msg(e.to_string()).into(),
                )));
            }
        }
    }
    size
}

fn finish_done(running: &mut Vec<Running<'_>>) {
    let mut i = 0;
    while i < running.len() {
        if running[i].outcome.is_none() {
            i += 1;
            continue;
        }
        let r = running.swap_remove(i);
        let _entered = r.span.clone().entered();
        let result = match r.outcome {
            Some(Ok(Step::Finished(reason))) => {
                let events = r.events;
                let g = r.seq.finish(reason, &mut |text| {
                    if let Some(tx) = &events {
                        let _ = tx.send(text.to_string());
                    }
                });
                tracing::info!(
                    prompt_tokens = g.prompt_tokens,
                    completion_tokens = g.completion_tokens,
                    finish_reason = ?g.finish_reason,
                    ttft_ms = g.time_to_first_token.as_millis() as u64,
                    generation_ms = g.total.as_millis() as u64,
                    decode_tokens_per_s = decode_rate(&g),
                    "generation finished"
                );
                Ok(g)
            }
            Some(Err(e)) => Err(e),
            // A `Continue` never becomes an outcome.
            Some(Ok(Step::Continue(_))) | None => continue,
        };
        let _ = r.reply.send(result);
    }
}

/// Decode tokens per second after the first token (prefill excluded).
pub fn decode_rate(g: &Generation) -> f64 {
    let decode = g.total.saturating_sub(g.time_to_first_token).as_secs_f64();
    if g.completion_tokens > 1 && decode > 0.0 {
        (g.completion_tokens - 1) as f64 / decode
    } else {
        0.0
    }
}
