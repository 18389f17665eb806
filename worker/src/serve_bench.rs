//! `sluice-worker serve-bench`: the serving benchmark at the engine level. Jobs arrive through
//! the real engine loop (admission against the KV budget, chunked prefill, the prefix cache,
//! continuous batching, the leak canary, streamed text), from N closed-loop clients, with no
//! broker, Redis or HTTP in between, so it runs on a GPU machine with nothing but the binary.
//!
//! The requests are those of `benches/serving/client.py` (16 "Write a long, detailed essay
//! about X." prompts, optionally after a shared system prompt of about `--system-tokens`
//! tokens, temperature 0, `--max-tokens` each, end of text ignored so every request generates
//! the same length). Per concurrency level it prints one JSON line: output tokens per second
//! over the level's wall time, TTFT (from handing the job to the engine to its first streamed
//! text) and time per output token after the first, p50 and p99, and the prompt tokens the
//! prefix cache supplied.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use sluice_proto::{GenerationParams, JobMessage, Message, Role};
use tokio::sync::mpsc;

use crate::engine::generate::JobControl;
use crate::engine::{EngineConfig, EngineHandle};
use crate::metrics::WorkerMetrics;

/// Arguments of `sluice-worker serve-bench`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "sluice-worker serve-bench")]
pub struct ServeBenchArgs {
    /// The served model, as `sluice-worker --model` takes it.
    #[arg(long)]
    pub model: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu", value_parser = crate::device::parse_device)]
    pub device: crate::device::DeviceSpec,
    /// Concurrent clients per level, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub clients: Vec<usize>,
    /// Requests per level (at least the level's clients).
    #[arg(long, default_value_t = 16)]
    pub requests: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// A shared system prompt of about this many tokens before every request (0: none).
    #[arg(long, default_value_t = 0)]
    pub system_tokens: usize,
    /// The engine's batch (`--max-batch-size` of the worker); default: the largest level.
    #[arg(long)]
    pub batch: Option<usize>,
    /// The engine's KV token budget (`--max-batch-total-tokens`).
    #[arg(long, default_value_t = 65_536)]
    pub kv_tokens: usize,
    /// Prompt tokens prefilled per engine step (`--prefill-chunk`).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Whether jobs reuse cached prompt prefixes (`--prefix-cache`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
}

/// The prompts of `benches/serving/client.py`, in the same order.
const TOPICS: [&str; 16] = [
    "the history of lighthouses",
    "how bridges are designed",
    "the water cycle",
    "the invention of the printing press",
    "how compilers work",
    "the migration of birds",
    "the economics of railways",
    "the chemistry of baking bread",
    "the geology of volcanoes",
    "the architecture of medieval cathedrals",
    "how vaccines train the immune system",
    "the mathematics of music",
    "the life cycle of stars",
    "the origins of chess",
    "how cities manage traffic",
    "the ecology of coral reefs",
];

/// The system prompt line of `benches/serving/client.py` (19 tokens with the Qwen2.5 tokenizer).
const SYSTEM_LINE: &str =
    "You are a careful assistant for a library; answer clearly, cite no sources, stay polite. ";

/// One concurrency level's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    pub server: &'static str,
    pub device: String,
    pub concurrency: usize,
    pub requests: usize,
    pub system_tokens: usize,
    pub output_tokens: usize,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub tpot_p50_ms: f64,
    pub tpot_p99_ms: f64,
    pub cached_prompt_tokens: usize,
    pub prompt_tokens: usize,
}

/// What one request measured.
struct Sample {
    ttft: Duration,
    tpot: Option<Duration>,
    tokens: usize,
    prompt: usize,
    cached: usize,
}

/// The nearest-rank `q` quantile (0..=1) of `values`, in milliseconds.
fn quantile_ms(values: &mut [Duration], q: f64) -> f64 {
    sluice_shared::metrics::nearest_rank(values, q).as_secs_f64() * 1000.0
}

fn request(i: usize, system: &str, max_tokens: u32) -> JobMessage {
    let mut messages = Vec::with_capacity(2);
    if !system.is_empty() {
        messages.push(Message {
            role: Role::System,
            content: system.to_string(),
        });
    }
    messages.push(Message {
        role: Role::User,
        content: format!(
            "Write a long, detailed essay about {}.",
            TOPICS[i % TOPICS.len()]
        ),
    });
    JobMessage::local(
        "bench",
        messages,
        GenerationParams {
            max_tokens,
            temperature: 0.0,
            ignore_eos: true,
            seed: Some(1000 + i as u64),
            ..GenerationParams::default()
        },
    )
}

/// Runs one request through the engine, timing its streamed text.
async fn one(engine: &EngineHandle, job: JobMessage) -> anyhow::Result<Sample> {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let started = Instant::now();
    let control = JobControl::new(started + Duration::from_secs(3600));
    let run = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.run(job, control, Some(tx)).await })
    };
    let mut first = None;
    while let Some(text) = rx.recv().await {
        if first.is_none() && !text.is_empty() {
            first = Some(Instant::now());
        }
    }
    let ended = Instant::now();
    let generation = run.await??;
    let first = first.ok_or_else(|| anyhow::anyhow!("a request streamed no text"))?;
    let tokens = generation.completion_tokens;
    Ok(Sample {
        ttft: first - started,
        tpot: (tokens > 1).then(|| (ended - first) / (tokens as u32 - 1)),
        tokens,
        prompt: generation.prompt_tokens,
        cached: generation.cached_tokens,
    })
}

async fn level(
    engine: &EngineHandle,
    args: &ServeBenchArgs,
    clients: usize,
    system: &str,
) -> anyhow::Result<LevelReport> {
    let requests = args.requests.max(clients);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (engine, next, system) = (engine.clone(), Arc::clone(&next), system.to_string());
            let max_tokens = args.max_tokens;
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return anyhow::Ok(samples);
                    }
                    samples.push(one(&engine, request(i, &system, max_tokens)).await?);
                }
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(requests);
    for task in tasks {
        samples.extend(task.await??);
    }
    let wall = started.elapsed().as_secs_f64();
    let output_tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttfts: Vec<Duration> = samples.iter().map(|s| s.ttft).collect();
    let mut tpots: Vec<Duration> = samples.iter().filter_map(|s| s.tpot).collect();
    Ok(LevelReport {
        server: "sluice-engine",
        device: format!("{:?}", args.device),
        concurrency: clients,
        requests,
        system_tokens: args.system_tokens,
        output_tokens,
        wall_s: wall,
        tokens_per_s: output_tokens as f64 / wall,
        ttft_p50_ms: quantile_ms(&mut ttfts, 0.5),
        ttft_p99_ms: quantile_ms(&mut ttfts, 0.99),
        tpot_p50_ms: quantile_ms(&mut tpots, 0.5),
        tpot_p99_ms: quantile_ms(&mut tpots, 0.99),
        cached_prompt_tokens: samples.iter().map(|s| s.cached).sum(),
        prompt_tokens: samples.iter().map(|s| s.prompt).sum(),
    })
}

/// Loads the model, starts one engine, and measures each level in turn (after one untimed
/// warm-up request), printing a JSON line per level.
pub fn run(args: &ServeBenchArgs) -> anyhow::Result<Vec<LevelReport>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let model = crate::model::LoadedModel::open(&args.model, args.device).await?;
        let largest = args.clients.iter().copied().max().unwrap_or(1);
        let engine = EngineHandle::start(
            model,
            EngineConfig {
                max_batch: args.batch.unwrap_or(largest).max(1),
                kv_token_budget: args.kv_tokens,
                prefill_chunk: args.prefill_chunk.max(1),
                canary_key: rand::random(),
                prefix_cache: args.prefix_cache,
                canary_rotation: Some(Duration::from_secs(3600)),
            },
            Arc::new(WorkerMetrics::new(!matches!(
                args.device,
                crate::device::DeviceSpec::Cpu
            ))),
        )?;
        let system = SYSTEM_LINE.repeat(args.system_tokens / 19);
        one(&engine, request(0, "", 8)).await?;
        let mut reports = Vec::new();
        for &clients in &args.clients {
            let report = level(&engine, args, clients.max(1), &system).await?;
            println!("{}", serde_json::to_string(&report)?);
            reports.push(report);
        }
        Ok(reports)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_runs_every_request_through_the_engine() {
        let dir = std::env::temp_dir().join(format!(
            "sluice-serve-bench-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        crate::model::tiny::write_tiny_model(&dir, 5, crate::model::tiny::TinyShape::default())
            .expect("tiny model");
        let args = ServeBenchArgs {
            model: dir.to_string_lossy().into_owned(),
            device: crate::device::DeviceSpec::Cpu,
            clients: vec![1, 3],
            requests: 5,
            max_tokens: 6,
            system_tokens: 100,
            batch: None,
            kv_tokens: 8192,
            prefill_chunk: 64,
            prefix_cache: true,
        };
        let reports = run(&args).expect("bench");
        assert_eq!(reports.len(), 2);
        for r in &reports {
            assert_eq!(r.requests, 5);
            assert_eq!(r.output_tokens, 5 * 6, "every request generated max_tokens");
            assert!(r.ttft_p50_ms > 0.0 && r.ttft_p99_ms >= r.ttft_p50_ms);
            assert!(r.tokens_per_s > 0.0);
        }
        // The shared system prompt came from the prefix cache after the first request.
        assert!(reports[1].cached_prompt_tokens > 0);
    }
}
