//! `sluice-worker bench`: the engine's forward pass measured on a real model, no broker needed.
//!
//! Shipped in the worker binary so a GPU machine with no Rust toolchain can run it
//! (`benches/gpu/`), and called by `cargo bench -p sluice-worker --bench decode` on CPU. It
//! prints one line per figure (`name: value unit`, which `benches/llama-cpp/compare.sh` reads)
//! and, with `--json`, one JSON report at the end.
//!
//! Figures: prompt processing (tokens/s), time to first token of an idle engine (prefill plus
//! the first sampled token), decode tokens/s single-stream and aggregate at each batch size,
//! and memory per sequence (KV bytes per token, and the whole cache at prompt + steps).
//! `--logits-out` writes the logits after the prompt (little-endian f32) and the greedy tokens
//! of the single-stream run, so another implementation can be compared token for token.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{D, DType, Device, Tensor};
use serde::Serialize;

use crate::model::qwen::Qwen2;
use crate::model::source::safetensors_in;
use crate::model::{compute_dtype, qwen2_from_safetensors};

/// Arguments of `sluice-worker bench`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "sluice-worker bench")]
pub struct BenchArgs {
    /// A .gguf file, or a directory with config.json and *.safetensors (no tokenizer needed).
    #[arg(long)]
    pub model: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu", value_parser = crate::device::parse_device)]
    pub device: crate::device::DeviceSpec,
    /// Prompt length in tokens (synthetic token ids, the same on every run).
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Decode steps measured per batch size.
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub batches: Vec<usize>,
    /// safetensors weights in bf16 (GPU default) or f32 (CPU default).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Write the logits after the prompt (raw little-endian f32) to this file, and the greedy
    /// tokens of the single-stream run to the same path with `.tokens.json` appended.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    /// CPU matmul kernels: `sluice` (the batched 8-bit kernel of `crate::kernels::qmm`, what CPU
    /// workers run) or `candle` (candle's quantized kernels, for comparison).
    #[arg(long, default_value = "sluice", value_parser = ["candle", "sluice"])]
    pub kernel: String,
    /// Print a JSON report as the last line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchFigure {
    pub batch: usize,
    pub aggregate_tok_s: f64,
    pub per_sequence_tok_s: f64,
    /// The median decode step: on a shared VM, less moved by other tenants than the mean.
    pub median_step_ms: f64,
    /// Whether the batch's first sequence (the prompt of the batch-1 run) decoded the same
    /// greedy tokens as it did alone: isolation inside the batch.
    pub first_sequence_matches_batch_1: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub load_s: f64,
    pub prompt_tokens: usize,
    pub prompt_tok_s: f64,
    pub ttft_ms: f64,
    pub decode: Vec<BatchFigure>,
    pub kv_bytes_per_token: usize,
    pub kv_bytes_per_sequence: usize,
    pub threads: usize,
    /// Device memory in use and in total at the end (CUDA only), as the worker's metrics read it.
    pub gpu_memory_used_bytes: Option<u64>,
    pub gpu_memory_total_bytes: Option<u64>,
    pub gpu_utilization: Option<f64>,
}

/// The token ids every run uses (also what `benches/` scripts feed the other implementations).
pub fn prompt_ids(n: usize, shift: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 100 + i * 7 + shift).collect()
}

fn load(args: &BenchArgs, device: &Device) -> anyhow::Result<Qwen2> {
    if args.model.is_file() {
        let mut file = std::fs::File::open(&args.model)?;
        let content = gguf_file::Content::read(&mut file)?;
        return Ok(Qwen2::from_gguf(&content, &mut file, device)?);
    }
    let dtype = match args.dtype.as_deref() {
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some("f32") => DType::F32,
        Some(other) => anyhow::bail!("dtype must be bf16, f16 or f32, got {other}"),
        None => compute_dtype(device),
    };
    let weights = safetensors_in(&args.model)?;
    Ok(qwen2_from_safetensors(
        &args.model.join("config.json"),
        &weights,
        dtype,
        device,
    )?)
}

fn argmax_rows(logits: &Tensor) -> anyhow::Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Runs the benchmark, printing each figure as it is measured.
pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    // On the engine's compute threads, as a worker runs it (see `engine::compute_pool`).
    if std::env::var("SLUICE_BENCH_OUTSIDE_POOL").is_ok_and(|v| v == "1") {
        return run_on_this_thread(args);
    }
    crate::engine::compute_pool()?.install(|| run_on_this_thread(args))
}

fn run_on_this_thread(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let device = crate::device::device(args.device)?;
    let started = Instant::now();
    let mut model = load(args, &device)?;
    if args.kernel == "sluice" && device.is_cpu() {
        model = model.to_q8()?;
    }
    let load_s = started.elapsed().as_secs_f64();
    let kernels = if args.kernel == "sluice" && device.is_cpu() {
        format!("sluice kernels, {}", crate::kernels::qmm::kernel_name())
    } else {
        format!("{} kernels", args.kernel)
    };
    println!(
        "model {} loaded in {load_s:.1}s ({kernels})",
        args.model.display()
    );
    let prompt = prompt_ids(args.prompt_tokens, 0);
    let per_seq = args.prompt_tokens + args.steps + 16;
    let max_batch = args.batches.iter().copied().max().unwrap_or(1).max(1);
    let pool = model.new_pool(per_seq * max_batch)?;
    println!(
        "KV pool: {} tokens, {:.1} MiB",
        pool.capacity(),
        (pool.capacity() * model.dims().kv_bytes_per_token(pool.dtype())) as f64 / (1 << 20) as f64
    );

    // Warm-up: one prefill and a few decode steps (page in weights, compile kernels).
    let mut warm = pool.new_cache();
    let logits = model.prefill(&prompt, &mut warm)?;
    let mut tok = argmax_rows(&logits.unsqueeze(0)?)?[0];
    for _ in 0..4 {
        tok = argmax_rows(&model.decode(&[tok], &mut [&mut warm])?)?[0];
    }
    drop(warm);

    // Prompt processing and time to first token: prefill plus sampling the first token.
    let mut cache = pool.new_cache();
    let t = Instant::now();
    let logits = model.prefill(&prompt, &mut cache)?;
    argmax_rows(&logits.unsqueeze(0)?)?;
    let ttft = t.elapsed().as_secs_f64();
    let prompt_tok_s = prompt.len() as f64 / ttft;
    println!(
        "prompt processing ({} tokens): {prompt_tok_s:.1} tok/s",
        prompt.len()
    );
    println!(
        "time to first token ({} tokens): {:.1} ms",
        prompt.len(),
        ttft * 1e3
    );
    if let Some(path) = &args.logits_out {
        let values = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(path, bytes)?;
    }
    drop(cache);

    let mut decode = Vec::new();
    let mut alone: Option<Vec<u32>> = None;
    for &batch in &args.batches {
        let mut caches: Vec<_> = (0..batch).map(|_| pool.new_cache()).collect();
        let mut next = Vec::with_capacity(batch);
        for (i, c) in caches.iter_mut().enumerate() {
            let p = prompt_ids(args.prompt_tokens, i as u32);
            next.push(argmax_rows(&model.prefill(&p, c)?.unsqueeze(0)?)?[0]);
        }
        // One untimed step per batch size (GPU kernels and buffers of this shape get set up),
        // then forgotten: it wrote only past the caches' lengths, which the timed steps
        // overwrite, so they start from the same state.
        let lens: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        model.decode(&next, &mut refs)?;
        for (c, len) in caches.iter_mut().zip(lens) {
            c.truncate(len)?;
        }
        let mut greedy = vec![next[0]];
        let mut step_s = Vec::with_capacity(args.steps);
        let t = Instant::now();
        for _ in 0..args.steps {
            let step = Instant::now();
            let mut refs: Vec<_> = caches.iter_mut().collect();
            next = argmax_rows(&model.decode(&next, &mut refs)?)?;
            greedy.push(next[0]);
            step_s.push(step.elapsed().as_secs_f64());
        }
        let secs = t.elapsed().as_secs_f64();
        step_s.sort_by(f64::total_cmp);
        let median_step_s = step_s.get(step_s.len() / 2).copied().unwrap_or(secs);
        let first_sequence_matches_batch_1 = alone.as_ref().map(|a| *a == greedy);
        if batch == 1 {
            alone = Some(greedy.clone());
        }
        let figure = BatchFigure {
            batch,
            aggregate_tok_s: (batch * args.steps) as f64 / secs,
            per_sequence_tok_s: args.steps as f64 / secs,
            median_step_ms: median_step_s * 1e3,
            first_sequence_matches_batch_1,
        };
        println!(
            "decode batch {batch}: {:.1} tok/s aggregate ({:.1} per sequence, {} steps; median \
             step {:.2} ms, {:.1} tok/s at the median){}",
            figure.aggregate_tok_s,
            figure.per_sequence_tok_s,
            args.steps,
            figure.median_step_ms,
            batch as f64 / median_step_s,
            match first_sequence_matches_batch_1 {
                Some(true) => ", first sequence's tokens identical to batch 1",
                Some(false) => ", first sequence's tokens DIFFER from batch 1",
                None => "",
            }
        );
        decode.push(figure);
        if let (1, Some(path)) = (batch, &args.logits_out) {
            let mut p = path.clone().into_os_string();
            p.push(".tokens.json");
            std::fs::write(p, serde_json::to_vec(&greedy)?)?;
        }
    }

    let dims = model.dims();
    let kv_bytes_per_token = dims.kv_bytes_per_token(model.dtype());
    let kv_bytes_per_sequence = kv_bytes_per_token * (args.prompt_tokens + args.steps);
    println!(
        "memory per sequence: {kv_bytes_per_token} B/token KV, {:.2} MiB at {} tokens",
        kv_bytes_per_sequence as f64 / (1 << 20) as f64,
        args.prompt_tokens + args.steps
    );
    // Right after the decode loops, so NVML's last sample period saw them.
    let utilization = crate::metrics::gpu_utilization(&device);
    if let Some(u) = utilization {
        println!(
            "GPU utilisation (NVML, last sample period): {:.0} %",
            u * 100.0
        );
    }
    if let Some(graphs) = model.decode_graphs_summary() {
        println!("CUDA graphs of decode steps: {graphs}");
    }
    let memory = crate::metrics::gpu_memory(&device);
    if let Some((used, total)) = memory {
        println!(
            "GPU memory: {:.2} GiB used of {:.2} GiB",
            used as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
    }
    let report = BenchReport {
        model: args.model.display().to_string(),
        device: format!("{:?}", args.device),
        load_s,
        prompt_tokens: args.prompt_tokens,
        prompt_tok_s,
        ttft_ms: ttft * 1e3,
        decode,
        kv_bytes_per_token,
        kv_bytes_per_sequence,
        threads: rayon::current_num_threads(),
        gpu_memory_used_bytes: memory.map(|m| m.0),
        gpu_memory_total_bytes: memory.map(|m| m.1),
        gpu_utilization: utilization,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(report)
}
