//! `sluice-guard-embed DIR`: the classifier's encoder over JSON lines, for the trainer
//! (`guard/train/train.py`), so the head is trained on exactly the embeddings the API computes.
//!
//! Input on stdin: one `{"text": "..."}` per line. Output on stdout, per line: a little-endian
//! `u32` window count, then that many rows of the encoder's width in little-endian `f32`.
//! The encoder is checked (file presence, shapes) but no head is loaded.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

use serde::Deserialize;
use sluice_guard::classifier::Encoder;

#[derive(Deserialize)]
struct Line {
    text: String,
}

/// Lines embedded per call (their windows share forward passes).
const CHUNK: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .ok_or("usage: sluice-guard-embed ENCODER_DIR < lines.jsonl > embeddings.bin")?
        .into();
    let encoder = Encoder::load(&dir)?;
    eprintln!(
        "encoder {} (sha256 {}), width {}",
        dir.display(),
        encoder.weights_sha256,
        encoder.hidden_size()
    );
    let stdin = std::io::stdin().lock();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut texts = Vec::new();
    let mut done = 0usize;
    let flush = |texts: &mut Vec<String>,
                 out: &mut BufWriter<_>|
     -> Result<usize, Box<dyn std::error::Error>> {
        let mut windows = Vec::new();
        let mut counts = Vec::new();
        for t in texts.iter() {
            let w = encoder.windows(t)?;
            counts.push(w.len() as u32);
            windows.extend(w);
        }
        let embeddings = encoder.embed(&windows)?;
        let mut rows = embeddings.iter();
        for count in counts {
            out.write_all(&count.to_le_bytes())?;
            for _ in 0..count {
                let row = rows.next().ok_or("fewer embeddings than windows")?;
                for v in row {
                    out.write_all(&v.to_le_bytes())?;
                }
            }
        }
        let n = texts.len();
        texts.clear();
        Ok(n)
    };
    for line in stdin.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Line { text } = serde_json::from_str(&line)?;
        texts.push(text);
        if texts.len() == CHUNK {
            done += flush(&mut texts, &mut out)?;
            if done.is_multiple_of(1024) {
                eprintln!("{done} lines");
            }
        }
    }
    flush(&mut texts, &mut out)?;
    out.flush()?;
    Ok(())
}
