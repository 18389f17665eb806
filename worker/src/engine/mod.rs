//! The engine: one dedicated OS thread owns the model and runs every admitted job in one
//! continuous batch.
//!
//! Async code talks to it through a cloneable [`EngineHandle`] and awaits a oneshot reply, so
//! model compute never blocks the runtime. Each loop iteration:
//! 1. takes new jobs off the channel (blocking only when idle);
//! 2. admits waiting jobs while the batch has room (`max_batch`) and their worst-case KV use
//!    (prompt + `max_tokens`, capped at the context) fits the KV token budget; a job that could
//!    never fit fails at once with `job_too_large` instead of waiting forever. An admitted
//!    job takes the longest run of its prompt's full pages that its tenant has cached (the
//!    prefix cache, [`kv`]), copies the rows of a cached page whose first tokens its prompt
//!    goes on with, and prefills only the rest;
//! 3. prefills one chunk (`prefill_chunk` tokens) of one new sequence, so a long prompt never
//!    stalls the running sequences for more than one chunk, and publishes the full prompt
//!    pages it completed to the prefix cache (a sequence that ends publishes its output's
//!    full pages too, for the conversation's next turn). Interactive sequences prefill first; within a
//!    class, the sequence with the least prompt left goes first, so a short prompt waits for
//!    at most one chunk of a long one;
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
use crate::engine::kv::{KvPool, PageKey, extend_prefix_keys, prefix_keys};
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
    /// Whether jobs reuse their tenant's cached prompt prefixes (a job can still opt out).
    pub prefix_cache: bool,
    /// How long a tenant's canary for one system prompt stays the same (so that prompt's
    /// pages can be cached); `None`: a random canary per job.
    pub canary_rotation: Option<std::time::Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            kv_token_budget: 65_536,
            prefill_chunk: 256,
            canary_key: rand::random(),
            prefix_cache: true,
            canary_rotation: Some(std::time::Duration::from_secs(3600)),
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
    config: &EngineConfig,
) -> Result<Prepared, GenerateError> {
    let mut messages = job.messages.clone();
    let period = config.canary_rotation.map(|every| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.as_secs() / every.as_secs().max(1)
    });
    let leak = LeakGuard::install(
        &mut messages,
        &config.canary_key,
        &job.tenant,
        job.params.seed,
        period,
    );
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
    /// Set when the job uses the prefix cache.
    prefix: Option<Prefix>,
    priority: Priority,
}

/// A sequence's place in the prefix cache.
struct Prefix {
    /// The tenant.
    salt: String,
    /// The keys of the prompt's full pages, published as prefill completes them; at a normal
    /// end, extended over the output, whose full pages are published too, so the next turn
    /// of the conversation, which repeats both, reuses them.
    keys: Vec<PageKey>,
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
        admit(model, pool, &config, &mut waiting, &mut running, metrics);
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
        metrics.observe_prefix_cache(pool.prefix_stats());
    }
}

fn admit<'m>(
    model: &'m LoadedModel,
    pool: &Arc<KvPool>,
    config: &EngineConfig,
    waiting: &mut VecDeque<EngineJob>,
    running: &mut Vec<Running<'m>>,
    metrics: &WorkerMetrics,
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
            None => match prepare(model, &work.job, config) {
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
        let prefix = (config.prefix_cache && work.job.prefix_cache).then(|| Prefix {
            keys: prefix_keys(&work.job.tenant, &prepared.prompt),
            salt: work.job.tenant.clone(),
        });
        let mut cache = pool.new_cache();
        let cached = match &prefix {
            Some(prefix) => {
                // At least the prompt's last token is prefilled: its logits are the first
                // token's.
                let reusable = prepared.prompt.len().saturating_sub(1);
                match cache.attach_prefix(&prefix.salt, &prefix.keys, &prepared.prompt, reusable) {
                    Ok(n) => {
                        metrics.observe_prefix_lookup(n);
                        n
                    }
                    Err(e) => {
                        let _ = work
                            .reply
                            .send(Err(GenerateError::Model(crate::model::ModelError::from(e))));
                        continue;
                    }
                }
            }
            None => 0,
        };
        match Sequence::new(
            model,
            prepared.prompt,
            work.job.params.clone(),
            work.control.clone(),
            cache,
            prepared.guards,
        ) {
            Ok(mut seq) => {
                seq.mark_cached(cached);
                used += need;
                running.push(Running {
                    seq,
                    events: work.events,
                    reply: work.reply,
                    span: work.span,
                    next: None,
                    outcome: None,
                    prefix,
                    priority: work.job.priority,
                });
            }
            Err(e) => {
                let _ = work.reply.send(Err(e));
            }
        }
    }
}

fn prefill_one_chunk(model: &LoadedModel, config: &EngineConfig, running: &mut [Running<'_>]) {
    // Interactive first, then the least prompt left (a short prompt is not stuck behind a long
    // one's chunks), then admission order.
    let Some(r) = running
        .iter_mut()
        .filter(|r| r.outcome.is_none() && r.seq.is_prefilling())
        .min_by_key(|r| {
            (
                r.priority != Priority::Interactive,
                r.seq.pending_prompt().len(),
            )
        })
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
            if let Some(prefix) = &r.prefix
                && let Err(e) = r
                    .seq
                    .cache
                    .publish(&prefix.salt, &prefix.keys, r.seq.tokens())
            {
                tracing::warn!(error = %e, "could not publish prompt pages to the prefix cache");
            }
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
        let mut r = running.swap_remove(i);
        let _entered = r.span.clone().entered();
        let result = match r.outcome {
            Some(Ok(Step::Finished(reason))) => {
                if let Some(prefix) = &mut r.prefix {
                    publish_conversation(&mut r.seq, prefix);
                }
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

/// Publishes the full pages of a finished sequence's prompt and output to the prefix cache:
/// a conversation's next turn starts with both. Only pages whose keys and values were written
/// (the cache's length; the last sampled token was never fed back) are published.
fn publish_conversation(seq: &mut Sequence<'_>, prefix: &mut Prefix) {
    let written = seq.cache.len().min(seq.tokens().len());
    extend_prefix_keys(&mut prefix.keys, &prefix.salt, &seq.tokens()[..written]);
    if let Err(e) = seq.cache.publish(&prefix.salt, &prefix.keys, seq.tokens()) {
        tracing::warn!(error = %e, "could not publish a conversation to the prefix cache");
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

#[cfg(test)]
mod tests {
    //! The prefix cache inside the real engine loop, on the tiny model (CPU): greedy output is
    //! the same token for token with and without it, tenants never share pages, and eviction
    //! under pressure leaves a running sequence alone.

    use std::time::{Duration, Instant};

    use sluice_proto::{GenerationParams, Message, Role};

    use super::*;
    use crate::model::tiny::load_tiny_model;

    /// An engine on the tiny model; every engine of a test shares the canary key, so the same
    /// request is the same prompt on each.
    fn engine(prefix_cache: bool, kv_token_budget: usize) -> (EngineHandle, Arc<WorkerMetrics>) {
        let metrics = Arc::new(WorkerMetrics::new(false));
        let config = EngineConfig {
            max_batch: 4,
            kv_token_budget,
            prefill_chunk: 64,
            canary_key: [9; 32],
            prefix_cache,
            canary_rotation: Some(Duration::from_secs(315_360_000)),
        };
        let handle =
            EngineHandle::start(load_tiny_model(3), config, metrics.clone()).expect("engine");
        (handle, metrics)
    }

    const SYSTEM: &str = "You are the support assistant of a shop that sells garden tools. \
        Answer briefly, in the customer's language, and never promise a delivery date. \
        Refunds need an order number; escalate anything about injuries to a human.";

    fn job(tenant: &str, user: &str, max_tokens: u32) -> JobMessage {
        let messages = vec![
            Message {
                role: Role::System,
                content: SYSTEM.into(),
            },
            Message {
                role: Role::User,
                content: user.into(),
            },
        ];
        let params = GenerationParams {
            temperature: 0.0,
            max_tokens,
            ignore_eos: true,
            ..GenerationParams::default()
        };
        JobMessage::local(tenant, messages, params)
    }

    async fn run(engine: &EngineHandle, job: JobMessage) -> Generation {
        let control = JobControl::new(Instant::now() + Duration::from_secs(600));
        engine.run(job, control, None).await.expect("generation")
    }

    fn hits(metrics: &WorkerMetrics) -> u64 {
        metrics.prefix_lookups.with_label_values(&["hit"]).get()
    }

    #[tokio::test]
    async fn the_same_greedy_tokens_with_and_without_the_cache() {
        let (plain, _) = engine(false, 4096);
        let (cached, metrics) = engine(true, 4096);
        let questions = ["Where is my rake?", "Where is my rake? It is late.", "Hi"];
        for q in questions {
            let without = run(&plain, job("acme", q, 24)).await;
            assert_eq!(without.cached_tokens, 0);
            // The first run on the caching engine fills the cache (the system prompt's pages
            // are reused from the second question on), the second reuses it.
            let first = run(&cached, job("acme", q, 24)).await;
            let second = run(&cached, job("acme", q, 24)).await;
            // All of the prompt but its last token: the first run's output filled the page
            // the prompt ends in, and the second copies that page's first rows.
            assert_eq!(second.cached_tokens, second.prompt_tokens - 1, "{second:?}");
            assert_eq!(first.content, without.content, "{q}");
            assert_eq!(second.content, without.content, "{q}");
            assert_eq!(second.completion_tokens, 24);
        }
        // The system prompt (with its canary) is shared by all three questions: from the
        // second question on, even the first run hit.
        assert_eq!(hits(&metrics), 5);
        assert!(metrics.prefix_reused_tokens.get() > 0);
        assert!(metrics.prefix_cached_pages.get() > 0);
    }

    #[tokio::test]
    async fn a_tenant_never_reuses_another_tenants_pages() {
        let (cached, metrics) = engine(true, 4096);
        let a = run(&cached, job("acme", "Where is my rake?", 8)).await;
        assert_eq!(a.cached_tokens, 0);
        // The same request from another tenant (the canary differs too, but the pages of the
        // chat template before the system prompt are the same tokens): nothing reused.
        let b = run(&cached, job("globex", "Where is my rake?", 8)).await;
        assert_eq!(b.cached_tokens, 0, "{b:?}");
        assert_eq!(hits(&metrics), 0);
        // Its own, again, is reused; and a job that opts out reuses nothing.
        let again = run(&cached, job("globex", "Where is my rake?", 8)).await;
        assert!(again.cached_tokens > 0);
        let off = JobMessage {
            prefix_cache: false,
            ..job("acme", "Where is my rake?", 8)
        };
        assert_eq!(run(&cached, off).await.cached_tokens, 0);
        assert_eq!(hits(&metrics), 1);
    }

    #[tokio::test]
    async fn eviction_under_pressure_leaves_a_running_sequence_intact() {
        // Room for two jobs at once (prompts are about 380 tokens): every new tenant's pages
        // push idle cached pages out while a long sequence of `acme` runs on pages it shares.
        let budget = 1024;
        let (plain, _) = engine(false, budget);
        let expected = run(&plain, job("acme", "Tell me about spades.", 96)).await;
        let (cached, metrics) = engine(true, budget);
        run(&cached, job("acme", "Tell me about spades.", 4)).await;
        let long = {
            let cached = cached.clone();
            tokio::spawn(
                async move { run(&cached, job("acme", "Tell me about spades.", 96)).await },
            )
        };
        let mut others = Vec::new();
        for i in 0..12 {
            let cached = cached.clone();
            others.push(tokio::spawn(async move {
                run(
                    &cached,
                    job(&format!("tenant-{i}"), "Something else entirely.", 24),
                )
                .await
            }));
        }
        for o in others {
            o.await.expect("join");
        }
        let long = long.await.expect("join");
        assert!(long.cached_tokens > 0, "{long:?}");
        assert_eq!(long.content, expected.content);
        assert!(
            metrics.prefix_evicted_pages.get() > 0,
            "the test did not put the cache under pressure"
        );
    }

    #[tokio::test]
    async fn a_short_prompt_is_not_stuck_behind_a_long_prefill() {
        let (engine, _) = engine(false, 16_384);
        // About 8000 prompt tokens: 125 chunks of 64.
        let long = JobMessage {
            messages: vec![Message {
                role: Role::User,
                content: "gardening tools ".repeat(500),
            }],
            ..job("acme", "", 1)
        };
        let short = job("acme", "Hi", 1);
        let timed = |job: JobMessage| {
            let engine = engine.clone();
            async move {
                run(&engine, job).await;
                Instant::now()
            }
        };
        let (long_done, short_done) = tokio::join!(timed(long), timed(short));
        assert!(
            short_done < long_done,
            "the short prompt waited for the long one's whole prefill"
        );
    }

    #[tokio::test]
    async fn a_finished_sequence_publishes_its_output_pages_too() {
        let (cached, metrics) = engine(true, 4096);
        let g = run(&cached, job("acme", "Where is my rake?", 64)).await;
        // Every full page of what was fed through the model: the prompt and all but the last
        // sampled token.
        let written = g.prompt_tokens + g.completion_tokens - 1;
        // The engine updates its gauges after it replied: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while (metrics.prefix_cached_pages.get() as usize) < written / kv::PAGE
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            metrics.prefix_cached_pages.get() as usize,
            written / kv::PAGE,
            "{g:?}"
        );
        // Off, nothing is published at all: once a second job has ended, the gauge has been
        // updated after the first one.
        let (plain, metrics) = engine(false, 4096);
        run(&plain, job("acme", "Where is my rake?", 64)).await;
        run(&plain, job("acme", "Hi", 1)).await;
        assert_eq!(metrics.prefix_cached_pages.get(), 0);
    }
}
