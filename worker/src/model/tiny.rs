//! A tiny Qwen2 with deterministic random weights, for tests that need the real loading and
//! generation code but not a real model's answers. It is NOT a language model: its output is
//! noise. It has the layout of a Qwen2.5 checkpoint directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`) and loads through exactly
//! the code path real safetensors models use.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::ModelError;
use sluice_prompt::chat::template::CHATML;

/// The shape of the tiny model.
#[derive(Debug, Clone, Copy)]
pub struct TinyShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl Default for TinyShape {
    fn default() -> Self {
        Self {
            hidden: 64,
            intermediate: 160,
            layers: 2,
            heads: 4,
            kv_heads: 2,
        }
    }
}

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// splitmix64: a tiny, fixed PRNG so the same seed gives the same weights in every build,
/// whatever version of `rand` the workspace uses.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * scale
    }

    fn tensor(&mut self, shape: &[usize], scale: f32) -> Result<Tensor, ModelError> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.uniform(scale)).collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

/// A byte-level BPE over the 256 byte symbols with no merges, plus Qwen's three special
/// tokens: every text encodes, one token per byte.
fn tokenizer() -> Result<Tokenizer, ModelError> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}

/// Writes the tiny model into `dir` (created if needed). The same `seed` always writes the same
/// weights.
pub fn write_tiny_model(dir: &Path, seed: u64, shape: TinyShape) -> Result<(), ModelError> {
    let io = |source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tokenizer = tokenizer()?;
    let vocab = tokenizer.get_vocab_size(true);
    let head_dim = shape.hidden / shape.heads;
    let eos_id = tokenizer.token_to_id("<|im_end|>").unwrap_or(0);
    let bos_id = tokenizer.token_to_id("<|endoftext|>").unwrap_or(0);

    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "_comment": "Sluice tiny test model: random weights, not a real language model",
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": 32768,
        "sliding_window": 32768,
        "max_window_layers": shape.layers,
        "use_sliding_window": false,
        "tie_word_embeddings": false,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    });
    let tokenizer_config = serde_json::json!({
        "chat_template": CHATML,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": null,
        "model_max_length": 32768,
    });

    let mut rng = SplitMix(seed);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let h = shape.hidden;
    let scale = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        rng.tensor(&[vocab, h], 1.0)?,
    );
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        let q_out = shape.heads * head_dim;
        let kv_out = shape.kv_heads * head_dim;
        for (name, out) in [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)] {
            tensors.insert(
                format!("{p}.self_attn.{name}.weight"),
                rng.tensor(&[out, h], scale(h))?,
            );
            tensors.insert(
                format!("{p}.self_attn.{name}.bias"),
                rng.tensor(&[out], 0.02)?,
            );
        }
        tensors.insert(
            format!("{p}.self_attn.o_proj.weight"),
            rng.tensor(&[h, q_out], scale(q_out))?,
        );
        for name in ["gate_proj", "up_proj"] {
            tensors.insert(
                format!("{p}.mlp.{name}.weight"),
                rng.tensor(&[shape.intermediate, h], scale(h))?,
            );
        }
        tensors.insert(
            format!("{p}.mlp.down_proj.weight"),
            rng.tensor(&[h, shape.intermediate], scale(shape.intermediate))?,
        );
        for name in ["input_layernorm", "post_attention_layernorm"] {
            tensors.insert(
                format!("{p}.{name}.weight"),
                Tensor::ones(h, candle_core::DType::F32, &Device::Cpu)?,
            );
        }
    }
    tensors.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, candle_core::DType::F32, &Device::Cpu)?,
    );
    tensors.insert("lm_head.weight".into(), rng.tensor(&[vocab, h], scale(h))?);

    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    std::fs::write(dir.join("config.json"), pretty(&config)).map_err(io)?;
    std::fs::write(dir.join("tokenizer_config.json"), pretty(&tokenizer_config)).map_err(io)?;
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    std::fs::write(
        dir.join("README.md"),
        "Sluice tiny test model: a Qwen2-shaped network with deterministic random weights.\n\
         It is not a language model and its output is noise. Generated by `sluice-worker tiny-model`.\n",
    )
    .map_err(io)?;
    Ok(())
}

/// Writes the tiny model with `seed` into a fresh temporary directory and loads it on the CPU
/// (for tests).
#[cfg(test)]
pub fn load_tiny_model(seed: u64) -> super::LoadedModel {
    let dir = std::env::temp_dir().join(format!(
        "sluice-tiny-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    #[allow(clippy::expect_used)] // test set-up
    write_tiny_model(&dir, seed, TinyShape::default()).expect("tiny model");
    #[allow(clippy::expect_used)]
    let files = super::source::files_in_dir(&dir).expect("files");
    #[allow(clippy::expect_used)]
    super::LoadedModel::load(&super::source::LocalModel::Files(files), &Device::Cpu).expect("load")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes() {
        let a = tempdir("a");
        let b = tempdir("b");
        write_tiny_model(&a, 7, TinyShape::default()).expect("write a");
        write_tiny_model(&b, 7, TinyShape::default()).expect("write b");
        let read = |d: &Path| std::fs::read(d.join("model.safetensors")).expect("read");
        assert_eq!(read(&a), read(&b));
        let _ = std::fs::remove_dir_all(a);
        let _ = std::fs::remove_dir_all(b);
    }

    pub(crate) fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sluice-tiny-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }
}
