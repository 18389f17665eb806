//! Speed of the engine's forward pass on a real model: prompt tokens/s, time to first token,
//! decode tokens/s single-stream and aggregate at batch 2, 4 and 8, memory per sequence.
//!
//! `SLUICE_BENCH_MODEL=/path/model.gguf cargo bench -p sluice-worker --bench decode`
//! (defaults to the test model cached by `scripts/fetch-test-model`; `SLUICE_BENCH_STEPS`,
//! `SLUICE_BENCH_BATCHES=1,2,4,8`). The same code runs as `sluice-worker bench` where there is
//! no toolchain (GPU machines). With `SLUICE_BENCH_REFERENCE=1` it also times candle-transformers'
//! `quantized_qwen2` single stream on the same file (Q5 re-quantised to Q8_0 for it).

use std::time::Instant;

use candle_core::{D, Device};
use clap::Parser;
use sluice_worker::bench::{BenchArgs, prompt_ids};

fn main() -> anyhow::Result<()> {
    let path = std::env::var("SLUICE_BENCH_MODEL").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/sluice/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    });
    let steps = std::env::var("SLUICE_BENCH_STEPS").unwrap_or_else(|_| "64".into());
    let batches = std::env::var("SLUICE_BENCH_BATCHES").unwrap_or_else(|_| "1,2,4,8".into());
    let args = BenchArgs::try_parse_from([
        "bench",
        "--model",
        &path,
        "--steps",
        &steps,
        "--batches",
        &batches,
    ])?;
    sluice_worker::bench::run(&args)?;

    if std::env::var("SLUICE_BENCH_REFERENCE").is_ok() {
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
        let prompt = prompt_ids(args.prompt_tokens, 0);
        let input = candle_core::Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = reference.forward(&input, 0)?;
        let mut next = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0];
        let t = Instant::now();
        for i in 0..args.steps {
            let input = candle_core::Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
            let logits = reference.forward(&input, prompt.len() + i)?;
            next = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0];
        }
        println!(
            "reference (candle quantized_qwen2) decode: {:.1} tok/s",
            args.steps as f64 / t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
