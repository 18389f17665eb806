//! Loading a Qwen2 model and running its forward pass.
//!
//! - [`source`]: where a model comes from (a `.gguf` file, a safetensors directory, or a hub id
//!   downloaded with `hf-hub`);
//! - [`requant`]: Q5 GGUF tensors re-quantised to Q8_0 on CPU (candle has no SIMD Q5 kernel),
//!   per tensor at load or as a rewritten file for the benchmarks' candle reference;
//! - [`tiny`]: a deterministic random-weight Qwen2 for fast tests (not a real model).
//!
//! [`LoadedModel`] owns the weights (Sluice's own batched forward pass, [`crate::qwen`]) and the
//! chat codec (`sluice_shared::chat`: tokenizer and template). KV caches belong to sequences,
//! not to the model, so no job can see another's context.

pub mod requant;
pub mod source;
pub mod tiny;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen2;
use sluice_proto::Message;
use sluice_shared::chat::{ChatCodec, ChatError};
use tokenizers::Tokenizer;

use crate::qwen::Qwen2;
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

/// The network alone (no tokenizer) from a `config.json` and its safetensors files.
pub fn qwen2_from_safetensors(
    config: &Path,
    weights: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<Qwen2, ModelError> {
    let config: qwen2::Config =
        serde_json::from_str(&std::fs::read_to_string(config).map_err(io_err(config))?)
            .map_err(|e| ModelError::Format(format!("config.json: {e}")))?;
    // SAFETY: the files are memory-mapped read-only; Sluice never writes them while the
    // worker runs, and an operator replacing model files under a live worker is outside
    // what any inference server supports.
    #[allow(unsafe_code)]
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device)? };
    Ok(Qwen2::from_safetensors(&config, vb)?)
}

impl LoadedModel {
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
        Self { model, codec, info }
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
    /// The network, shared by every sequence.
    pub fn model(&self) -> &Qwen2 {
        &self.model
    }
}
