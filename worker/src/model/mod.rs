//! Loading a Qwen2 model and running its forward pass.
//!
//! - [`source`]: where a model comes from (a `.gguf` file, a safetensors directory, or a hub id
//!   downloaded with `hf-hub`);
//! - [`requant`]: Q5 GGUF tensors re-quantised to Q8_0 on CPU (candle has no SIMD Q5 kernel),
//!   per tensor at load or as a rewritten file for the benchmarks' candle reference;
//! - [`tiny`]: a deterministic random-weight Qwen2 for fast tests (not a real model);
//! - [`qwen`]: Sluice's own Qwen2 forward pass for continuous batching, its weight loading in
//!   `qwen/load.rs`;
//! - `graphs` (CUDA): decode steps recorded once and replayed as CUDA graphs.
//!
//! [`LoadedModel`] owns the weights (Sluice's own batched forward pass, [`crate::model::qwen`]) and the
//! chat codec (`sluice_prompt::chat`: tokenizer and template). KV caches belong to sequences,
//! not to the model, so no job can see another's context.

#[cfg(feature = "cuda")]
pub mod graphs;
pub mod qwen;
pub mod requant;
pub mod source;
pub mod tiny;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen2;
use sluice_prompt::chat::{ChatCodec, ChatError};
use sluice_prompt::structured::GrammarEnv;
use sluice_proto::Message;
use tokenizers::Tokenizer;

use crate::model::qwen::Qwen2;
pub use source::{LocalModel, ModelSource};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model format: {0}")]
    Format(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("model download: {0}")]
    Download(String),
}

/// What the rest of the worker needs to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Name reported in logs and to the API.
    pub name: String,
    /// Longest sequence (prompt plus output) the model handles.
    pub context_length: usize,
    /// Tokens that end the assistant's turn.
    pub eos_token_ids: Vec<u32>,
}

pub struct LoadedModel {
    model: Qwen2,
    codec: ChatCodec,
    info: ModelInfo,
    /// Structured output; `None` where the tokenizer is not one llguidance reads (jobs that
    /// ask for JSON then fail with `invalid_response_format`).
    grammar: Option<GrammarEnv>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The dtype safetensors weights are computed in: bf16 on GPUs; f32 on CPUs, which have no
/// fast bf16 matmul in candle.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// A Qwen2 `config.json`, as written by any transformers release: transformers 5 writes
/// `"sliding_window": null` (no sliding window) and nests `rope_theta` under
/// `rope_parameters`, both of which candle's `qwen2::Config` rejects as they are.
pub fn read_qwen2_config(text: &str) -> Result<qwen2::Config, ModelError> {
    let bad = |e: String| ModelError::Format(format!("config.json: {e}"));
    let mut v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    if obj.get("rope_theta").is_none_or(|t| t.is_null())
        && let Some(theta) = obj
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
            .cloned()
    {
        obj.insert("rope_theta".into(), theta);
    }
    if obj.get("sliding_window").is_none_or(|w| w.is_null())
        && let Some(max) = obj.get("max_position_embeddings").cloned()
    {
        obj.insert("sliding_window".into(), max);
    }
    serde_json::from_value(v).map_err(|e| bad(e.to_string()))
}

/// The network alone (no tokenizer) from a `config.json` and its safetensors files.
pub fn qwen2_from_safetensors(
    config: &Path,
    weights: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<Qwen2, ModelError> {
    let config = read_qwen2_config(&std::fs::read_to_string(config).map_err(io_err(config))?)?;
    // SAFETY: the files are memory-mapped read-only; Sluice never writes them while the
    // worker runs, and an operator replacing model files under a live worker is outside
    // what any inference server supports.
    #[allow(unsafe_code)]
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device)? };
    Ok(Qwen2::from_safetensors(&config, vb)?)
}

impl LoadedModel {
    /// Resolves `model` (as `--model` takes it: a .gguf file, a directory or a hub id), opens
    /// `device` and loads the model off the async runtime: what the worker's command-line
    /// tools do before they start an engine.
    pub async fn open(model: &str, device: crate::device::DeviceSpec) -> anyhow::Result<Self> {
        let source = source::ModelSource::parse(model).map_err(anyhow::Error::msg)?;
        let local = source.resolve().await?;
        let device = crate::device::device(device)?;
        Ok(tokio::task::spawn_blocking(move || Self::load(&local, &device)).await??)
    }

    /// Loads a model resolved to local files.
    pub fn load(local: &LocalModel, device: &Device) -> Result<Self, ModelError> {
        match local {
            LocalModel::Gguf(path) => Self::load_gguf(path, device),
            LocalModel::Files(files) => Self::load_safetensors(files, device),
        }
    }

    fn new(model: Qwen2, codec: ChatCodec) -> Self {
        let info = ModelInfo {
            name: codec.name.clone(),
            context_length: codec.context_length.min(model.dims().context),
            eos_token_ids: codec.eos_token_ids.clone(),
        };
        let started = std::time::Instant::now();
        let grammar = match GrammarEnv::new(codec.tokenizer(), model.vocab(), &codec.eos_token_ids)
        {
            Ok(g) => {
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "structured output ready"
                );
                Some(g)
            }
            Err(e) => {
                tracing::warn!(error = %e, "structured output unavailable for this tokenizer");
                None
            }
        };
        Self {
            model,
            codec,
            info,
            grammar,
        }
    }

    fn load_gguf(path: &Path, device: &Device) -> Result<Self, ModelError> {
        let mut file = std::fs::File::open(path).map_err(io_err(path))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "qwen2" {
            return Err(ModelError::Format(format!(
                "architecture {arch:?} is not supported (qwen2 only)"
            )));
        }
        let codec = ChatCodec::from_gguf(&content, &path.display().to_string())?;
        let model = Qwen2::from_gguf(&content, &mut file, device)?;
        // On CPU, Sluice's batched 8-bit kernel: measured in the same run as candle's kernels
        // (benches/llama-cpp/compare.sh) it is faster for prompt, single-stream and batched
        // decode. Every weight becomes Q8_0 once, here.
        let model = if device.is_cpu() {
            model.to_q8()?
        } else {
            model
        };
        Ok(Self::new(model, codec))
    }

    fn load_safetensors(files: &source::ModelFiles, device: &Device) -> Result<Self, ModelError> {
        let codec = ChatCodec::from_files(
            &files.tokenizer,
            files.tokenizer_config.as_deref(),
            &files.config,
            &files.name,
        )?;
        let model =
            qwen2_from_safetensors(&files.config, &files.weights, compute_dtype(device), device)?;
        Ok(Self::new(model, codec))
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.codec.tokenizer()
    }

    /// Token ids of a conversation, ending with the assistant's turn opened.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, ModelError> {
        Ok(self.codec.encode_chat(messages)?)
    }
    /// The grammar machinery for structured output, if this tokenizer supports it.
    pub fn grammar(&self) -> Option<&GrammarEnv> {
        self.grammar.as_ref()
    }

    /// The network, shared by every sequence.
    pub fn model(&self) -> &Qwen2 {
        &self.model
    }
}
