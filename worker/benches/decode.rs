//! Decode throughput of the engine's forward pass on a real model, single stream and batched.
//!
//! `SLUICE_BENCH_MODEL=/path/model.gguf cargo bench -p sluice-worker --bench decode`
//! (defaults to the test model cached by `scripts/fetch-test-model`). Prints prompt tokens/s,
//! single-stream decode tokens/s, and aggregate decode tokens/s at batch 2, 4 and 8.

use std::time::Instant;

use candle_core::{D, Device};
use sluice_worker::model::{LoadedModel, LocalModel};

fn main() -> anyhow::Result<()> {
    let path = std::env::var("SLUICE_BENCH_MODEL").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/sluice/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    });
    let steps: usize = std::env::var("SLUICE_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let started = Instant::now();
    let model = LoadedModel::load(&LocalModel::Gguf(path.clone().into()), &Device::Cpu)?;
    println!(
        "model {path} loaded in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let qwen = model.model();
    let prompt: Vec<u32> = (0..64u32).map(|i| 100 + i * 7).collect();

    // Prompt processing: 64 tokens.
    let mut cache = qwen.new_cache(256);
    let t = Instant::now();
    qwen.prefill(&prompt, &mut cache)?;
    let pp = prompt.len() as f64 / t.elapsed().as_secs_f64();
    println!("prompt processing (64 tokens): {pp:.1} tok/s");

    for batch in [1usize, 2, 4, 8] {
        let mut caches: Vec<_> = (0..batch).map(|_| qwen.new_cache(256)).collect();
        let mut next: Vec<u32> = Vec::with_capacity(batch);
        for (i, c) in caches.iter_mut().enumerate() {
            let p: Vec<u32> = prompt.iter().map(|t| t + i as u32).collect();
            let logits = qwen.prefill(&p, c)?;
            next.push(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
        }
        let t = Instant::now();
        for _ in 0..steps {
            let mut refs: Vec<_> = caches.iter_mut().collect();
            let logits = qwen.decode(&next, &mut refs)?;
            next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "decode batch {batch}: {:.1} tok/s aggregate ({:.1} per sequence, {steps} steps)",
            (batch * steps) as f64 / secs,
            steps as f64 / secs
        );
    }
    if std::env::var("SLUICE_BENCH_REFERENCE").is_ok() {
        // candle-transformers' quantized_qwen2 on the same (re-quantised) weights, single stream.
        let mut file = std::fs::File::open(&path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
        let bytes =
            sluice_worker::model::requant::q5_to_q8(&content, &mut file)?.unwrap_or_default();
        let mut reader = std::io::Cursor::new(bytes);
        let content = candle_core::quantized::gguf_file::Content::read(&mut reader)?;
        let mut reference = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
            content,
            &mut reader,
            &Device::Cpu,
        )?;
        let input = candle_core::Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = reference.forward(&input, 0)?;
        let mut next = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0];
        let t = Instant::now();
        for i in 0..steps {
            let input = candle_core::Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
            let logits = reference.forward(&input, prompt.len() + i)?;
            next = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0];
        }
        println!(
            "reference (candle quantized_qwen2) decode: {:.1} tok/s",
            steps as f64 / t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
