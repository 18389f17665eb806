//! The sentence encoder: a BERT model (all-MiniLM-L6-v2 by default) run with candle on the CPU,
//! mean-pooled over the tokens of a window and L2-normalised, as sentence-transformers does.
//!
//! Long texts are cut into windows of the encoder's trained length ([`WINDOW_TOKENS`]) that
//! overlap by [`WINDOW_OVERLAP`] tokens, so an instruction straddling a cut is still seen whole
//! in one window; the classifier scores every window and keeps the maximum.

use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::ClassifierError;

/// Tokens per window including `[CLS]` and `[SEP]`: the sequence length the encoder was
/// trained with (sentence-transformers' `max_seq_length`).
pub const WINDOW_TOKENS: usize = 256;
/// Tokens shared by consecutive windows of a long text.
pub const WINDOW_OVERLAP: usize = 64;
/// The most padded tokens one forward pass holds (windows x longest window).
const BATCH_TOKENS: usize = 4096;

/// The files of an encoder directory.
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// A loaded encoder.
pub struct Encoder {
    model: BertModel,
    tokenizer: Tokenizer,
    cls: u32,
    sep: u32,
    hidden: usize,
    device: Device,
    /// SHA-256 (hex) of the weights file, checked against the head's.
    pub weights_sha256: String,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("hidden", &self.hidden)
            .field("weights_sha256", &self.weights_sha256)
            .finish_non_exhaustive()
    }
}

fn file(dir: &Path, name: &str) -> Result<PathBuf, ClassifierError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ClassifierError::Missing { path })
    }
}

fn corrupt(path: &Path, detail: impl std::fmt::Display) -> ClassifierError {
    ClassifierError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

impl Encoder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`. Every failure
    /// names the file it came from.
    pub fn load(dir: &Path) -> Result<Self, ClassifierError> {
        Self::load_adapted(dir, None)
    }

    /// [`Encoder::load`], with an adapter merged into the base weights and vocabulary:
    /// - for every `NAME.lora_a` (`[r, in]`) and `NAME.lora_b` (`[out, r]`, already scaled by
    ///   alpha/r) in its weights (safetensors), `NAME.weight` becomes
    ///   `NAME.weight + lora_b · lora_a`;
    /// - its extended vocabulary: the tokens of [`Adapter::vocabulary`] (one per line, already
    ///   in the tokenizer's normalised form) join the WordPiece vocabulary with ids from the
    ///   base vocabulary's size on, and `embeddings.word_embeddings.extra` holds their rows.
    pub fn load_adapted(dir: &Path, adapter: Option<Adapter<'_>>) -> Result<Self, ClassifierError> {
        let config_path = file(dir, CONFIG_FILE)?;
        let tokenizer_path = file(dir, TOKENIZER_FILE)?;
        let weights_path = file(dir, WEIGHTS_FILE)?;

        let mut config: Config = std::fs::read_to_string(&config_path)
            .map_err(|e| corrupt(&config_path, e))
            .and_then(|s| serde_json::from_str(&s).map_err(|e| corrupt(&config_path, e)))?;

        let extra: Vec<&str> = adapter
            .map(|a| a.vocabulary.lines().filter(|l| !l.is_empty()).collect())
            .unwrap_or_default();
        let tokenizer = load_tokenizer(&tokenizer_path, &extra)?;
        let special = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| corrupt(&tokenizer_path, format!("no {token} token")))
        };
        let (cls, sep) = (special("[CLS]")?, special("[SEP]")?);

        let bytes = std::fs::read(&weights_path).map_err(|e| corrupt(&weights_path, e))?;
        let weights_sha256 = hex::encode(Sha256::digest(&bytes));
        let device = Device::Cpu;
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &device)
            .map_err(|e| corrupt(&weights_path, e))?;
        drop(bytes);
        if let Some(adapter) = adapter {
            let built_in = |detail| ClassifierError::Corrupt {
                path: "guard/model/adapter.safetensors (built in)".into(),
                detail,
            };
            let rows = merge_adapter(&mut tensors, adapter.weights).map_err(built_in)?;
            config.vocab_size =
                extend_embeddings(&mut tensors, rows, extra.len()).map_err(built_in)?;
        }
        column_major_linear_weights(&mut tensors).map_err(|e| corrupt(&weights_path, e))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let model = BertModel::load(vb, &config).map_err(|e| corrupt(&weights_path, e))?;
        if config.max_position_embeddings < WINDOW_TOKENS {
            return Err(corrupt(
                &config_path,
                format!(
                    "max_position_embeddings {} is shorter than a {WINDOW_TOKENS}-token window",
                    config.max_position_embeddings
                ),
            ));
        }
        Ok(Self {
            model,
            tokenizer,
            cls,
            sep,
            hidden: config.hidden_size,
            device,
            weights_sha256,
        })
    }

    /// The embedding width.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The windows of one text, each with `[CLS]` and `[SEP]`. An empty text is one window of
    /// just those two tokens, so every text gets a score.
    pub fn windows(&self, text: &str) -> Result<Vec<Vec<u32>>, ClassifierError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ClassifierError::Inference(format!("tokenizer: {e}")))?;
        Ok(
            super::windows(encoding.get_ids(), WINDOW_TOKENS - 2, WINDOW_OVERLAP)
                .into_iter()
                .map(|ids| {
                    let mut window = Vec::with_capacity(ids.len() + 2);
                    window.push(self.cls);
                    window.extend_from_slice(ids);
                    window.push(self.sep);
                    window
                })
                .collect(),
        )
    }

    /// Embeddings (L2-normalised mean of the last hidden states) of `windows`, in order.
    /// Windows of similar length share a forward pass, padded to the longest.
    pub fn embed(&self, windows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ClassifierError> {
        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by_key(|&i| windows[i].len());
        let mut out = vec![Vec::new(); windows.len()];
        let mut batch: Vec<usize> = Vec::new();
        for &i in &order {
            let longest = windows[i].len();
            if !batch.is_empty() && (batch.len() + 1) * longest > BATCH_TOKENS {
                self.embed_batch(windows, &batch, &mut out)?;
                batch.clear();
            }
            batch.push(i);
        }
        if !batch.is_empty() {
            self.embed_batch(windows, &batch, &mut out)?;
        }
        Ok(out)
    }

    fn embed_batch(
        &self,
        windows: &[Vec<u32>],
        batch: &[usize],
        out: &mut [Vec<f32>],
    ) -> Result<(), ClassifierError> {
        let inference = |e: candle_core::Error| ClassifierError::Inference(e.to_string());
        let len = batch.iter().map(|&i| windows[i].len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch.len() * len);
        let mut mask = Vec::with_capacity(batch.len() * len);
        for &i in batch {
            let w = &windows[i];
            ids.extend_from_slice(w);
            ids.extend(std::iter::repeat_n(0u32, len - w.len()));
            mask.extend(std::iter::repeat_n(1u32, w.len()));
            mask.extend(std::iter::repeat_n(0u32, len - w.len()));
        }
        let shape = (batch.len(), len);
        let ids = Tensor::from_vec(ids, shape, &self.device).map_err(inference)?;
        let mask = Tensor::from_vec(mask, shape, &self.device).map_err(inference)?;
        let types = ids.zeros_like().map_err(inference)?;
        let hidden = self
            .model
            .forward(&ids, &types, Some(&mask))
            .map_err(inference)?;
        // Mean over the window's real tokens, then unit length.
        let maskf = mask
            .to_dtype(DType::F32)
            .and_then(|m| m.unsqueeze(2))
            .map_err(inference)?;
        let summed = hidden
            .broadcast_mul(&maskf)
            .and_then(|h| h.sum(1))
            .map_err(inference)?;
        let counts = maskf.sum(1).map_err(inference)?;
        let mean = summed.broadcast_div(&counts).map_err(inference)?;
        let norm = mean
            .sqr()
            .and_then(|s| s.sum_keepdim(1))
            .and_then(|s| s.sqrt())
            .and_then(|s| s.clamp(1e-12f32, f32::MAX))
            .map_err(inference)?;
        let unit = mean.broadcast_div(&norm).map_err(inference)?;
        let rows: Vec<Vec<f32>> = unit.to_vec2().map_err(inference)?;
        for (&i, row) in batch.iter().zip(rows) {
            out[i] = row;
        }
        Ok(())
    }
}

/// Stores each linear layer's weight (`[out, in]`) transposed in memory, as the same logical
/// tensor. A linear layer multiplies by the weight's transpose; the matmul kernel (gemm)
/// repacks a right-hand side that is not row-major on every call, which for the few tokens of
/// one message cost more than the multiplication itself (all 11 M weights copied per forward
/// pass). With this layout the transpose it is given is row-major.
fn column_major_linear_weights(
    tensors: &mut std::collections::HashMap<String, Tensor>,
) -> candle_core::Result<()> {
    for (name, tensor) in tensors.iter_mut() {
        if name.ends_with(".weight")
            && name.starts_with("encoder.")
            && !name.contains("LayerNorm")
            && tensor.rank() == 2
        {
            *tensor = tensor.t()?.contiguous()?.t()?;
        }
    }
    Ok(())
}

/// A fine-tuned adapter for the base encoder: its weights (safetensors) and the tokens of its
/// extended vocabulary, one per line.
#[derive(Debug, Clone, Copy)]
pub struct Adapter<'a> {
    pub weights: &'a [u8],
    pub vocabulary: &'a str,
}

/// The name of the extended vocabulary's embedding rows in an adapter.
const EXTRA_EMBEDDINGS: &str = "embeddings.word_embeddings.extra";
const WORD_EMBEDDINGS: &str = "embeddings.word_embeddings.weight";

/// The encoder's tokenizer with `extra` appended to its WordPiece vocabulary (ids from the base
/// vocabulary's size on), without truncation or padding.
fn load_tokenizer(path: &Path, extra: &[&str]) -> Result<Tokenizer, ClassifierError> {
    let text = std::fs::read_to_string(path).map_err(|e| corrupt(path, e))?;
    let mut tokenizer = if extra.is_empty() {
        Tokenizer::from_str(&text).map_err(|e| corrupt(path, e))?
    } else {
        let mut spec: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(path, e))?;
        let vocab = spec
            .pointer_mut("/model/vocab")
            .and_then(serde_json::Value::as_object_mut)
            .ok_or_else(|| corrupt(path, "no WordPiece vocabulary (model.vocab)"))?;
        let base = vocab.len();
        for (n, token) in extra.iter().enumerate() {
            if vocab
                .insert((*token).to_string(), serde_json::Value::from(base + n))
                .is_some()
            {
                return Err(corrupt(
                    path,
                    format!("the classifier's extra token {token:?} is already in the vocabulary"),
                ));
            }
        }
        Tokenizer::from_str(&spec.to_string()).map_err(|e| corrupt(path, e))?
    };
    // Windows are cut here, not by the tokenizer's own truncation and padding settings.
    tokenizer
        .with_truncation(None)
        .map_err(|e| corrupt(path, e))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// Appends the adapter's extra embedding rows (one per extra token) to the word embeddings and
/// returns the new vocabulary size.
fn extend_embeddings(
    tensors: &mut std::collections::HashMap<String, Tensor>,
    rows: Option<Tensor>,
    extra_tokens: usize,
) -> Result<usize, String> {
    let word = tensors
        .get(WORD_EMBEDDINGS)
        .ok_or_else(|| format!("{WORD_EMBEDDINGS} is not a weight of the encoder"))?
        .to_dtype(DType::F32)
        .map_err(|e| e.to_string())?;
    let Some(rows) = rows else {
        return if extra_tokens == 0 {
            Ok(word.dims()[0])
        } else {
            Err(format!(
                "{extra_tokens} extra tokens but no {EXTRA_EMBEDDINGS}"
            ))
        };
    };
    let rows = rows.to_dtype(DType::F32).map_err(|e| e.to_string())?;
    if rows.dims().len() != 2 || rows.dims()[0] != extra_tokens || rows.dims()[1] != word.dims()[1]
    {
        return Err(format!(
            "{EXTRA_EMBEDDINGS} has shape {:?}, expected [{extra_tokens}, {}]",
            rows.dims(),
            word.dims()[1]
        ));
    }
    let joined = Tensor::cat(&[&word, &rows], 0).map_err(|e| e.to_string())?;
    let size = joined.dims()[0];
    tensors.insert(WORD_EMBEDDINGS.to_string(), joined);
    Ok(size)
}

/// Adds each adapter's `lora_b · lora_a` to the weight it names, and returns the adapter's
/// extra embedding rows, if it has them.
fn merge_adapter(
    tensors: &mut std::collections::HashMap<String, Tensor>,
    adapter: &[u8],
) -> Result<Option<Tensor>, String> {
    let mut adapter =
        candle_core::safetensors::load_buffer(adapter, &Device::Cpu).map_err(|e| e.to_string())?;
    let rows = adapter.remove(EXTRA_EMBEDDINGS);
    let mut merged = 0;
    for (name, a) in &adapter {
        let Some(base) = name.strip_suffix(".lora_a") else {
            continue;
        };
        let b = adapter
            .get(&format!("{base}.lora_b"))
            .ok_or_else(|| format!("{base}.lora_b is missing"))?;
        let key = format!("{base}.weight");
        let weight = tensors
            .get(&key)
            .ok_or_else(|| format!("{key} is not a weight of the encoder"))?;
        let delta = b
            .to_dtype(DType::F32)
            .and_then(|b| b.matmul(&a.to_dtype(DType::F32)?))
            .map_err(|e| format!("{base}: {e}"))?;
        if delta.dims() != weight.dims() {
            return Err(format!(
                "{base}: the adapter's shape {:?} is not the weight's {:?}",
                delta.dims(),
                weight.dims()
            ));
        }
        let updated = weight
            .to_dtype(DType::F32)
            .and_then(|w| w + delta)
            .map_err(|e| format!("{base}: {e}"))?;
        tensors.insert(key, updated);
        merged += 1;
    }
    if merged == 0 {
        return Err("no lora_a/lora_b pairs".into());
    }
    Ok(rows)
}
