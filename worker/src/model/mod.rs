//! Loading a Qwen2 model and running its forward pass.
//!
//! - [`source`]: where a model comes from (a `.gguf` file, a safetensors directory, or a hub id
//!   downloaded with `hf-hub`);
//! - [`template`]: the chat template, rendered with minijinja;
//! - [`requant`]: Q5 GGUF tensors re-quantised to Q8_0 at load for candle's SIMD CPU kernels;
//! - [`prompt`]: special-token-safe tokenization of a conversation;
//! - [`tiny`]: a deterministic random-weight Qwen2 for fast tests (not a real model).
//!
//! [`LoadedModel`] owns the weights, the KV cache (inside candle's models), the tokenizer and
//! the template. It is used from one engine thread only; [`LoadedModel::reset`] empties the KV
//! cache so no job sees another's context.

pub mod prompt;
pub mod requant;
pub mod source;
pub mod template;
pub mod tiny;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{quantized_qwen2, qwen2};
use sluice_proto::Message;
use tokenizers::Tokenizer;

pub use source::{LocalModel, ModelSource};
use template::ChatTemplate;

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
    Template(#[from] template::TemplateError),
    #[error(transparent)]
    Prompt(#[from] prompt::PromptError),
    #[error("model download: {0}")]
    Download(String),
}

enum Backend {
    Gguf(quantized_qwen2::ModelWeights),
    Safetensors(qwen2::ModelForCausalLM),
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
    backend: Backend,
    tokenizer: Tokenizer,
    plain: Tokenizer,
    template: ChatTemplate,
    info: ModelInfo,
    device: Device,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The end-of-turn tokens Qwen models use, where the vocabulary has them.
fn qwen_eos_ids(tokenizer: &Tokenizer, extra: Option<u32>) -> Vec<u32> {
    let mut ids: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .collect();
    if let Some(id) = extra
        && !ids.contains(&id)
    {
        ids.push(id);
    }
    ids
}

impl LoadedModel {
    /// Loads a model resolved to local files.
    pub fn load(local: &LocalModel, device: &Device) -> Result<Self, ModelError> {
        match local {
            LocalModel::Gguf(path) => Self::load_gguf(path, device),
            LocalModel::Files(files) => Self::load_safetensors(files, device),
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
        let meta_str = |key: &str| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_string().ok())
                .cloned()
        };
        let meta_u32 = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let name = meta_str("general.name").unwrap_or_else(|| path.display().to_string());
        let context_length = meta_u32("qwen2.context_length").unwrap_or(32768) as usize;
        let eos_from_meta = meta_u32("tokenizer.ggml.eos_token_id");
        let template_source =
            meta_str("tokenizer.chat_template").unwrap_or_else(|| template::CHATML.to_string());
        let tokenizer = Tokenizer::from_gguf(&content)?;
        let eos_token_ids = qwen_eos_ids(&tokenizer, eos_from_meta);
        let eos_token = eos_from_meta
            .and_then(|id| tokenizer.id_to_token(id))
            .unwrap_or_default();
        let template = ChatTemplate::new(template_source, String::new(), eos_token)?;
        let requantized = if device.is_cpu() {
            requant::q5_to_q8(&content, &mut file)?
        } else {
            None
        };
        let weights = match requantized {
            Some(bytes) => {
                let mut reader = std::io::Cursor::new(bytes);
                let content = gguf_file::Content::read(&mut reader)?;
                quantized_qwen2::ModelWeights::from_gguf(content, &mut reader, device)?
            }
            None => quantized_qwen2::ModelWeights::from_gguf(content, &mut file, device)?,
        };
        Ok(Self {
            backend: Backend::Gguf(weights),
            plain: prompt::plain_twin(&tokenizer),
            tokenizer,
            template,
            info: ModelInfo {
                name,
                context_length,
                eos_token_ids,
            },
            device: device.clone(),
        })
    }

    fn load_safetensors(files: &source::ModelFiles, device: &Device) -> Result<Self, ModelError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(io_err(p));
        let config: qwen2::Config = serde_json::from_str(&read(&files.config)?)
            .map_err(|e| ModelError::Format(format!("config.json: {e}")))?;
        let tokenizer = Tokenizer::from_file(&files.tokenizer)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let tokenizer_config: serde_json::Value = match &files.tokenizer_config {
            Some(p) => serde_json::from_str(&read(p)?)
                .map_err(|e| ModelError::Format(format!("tokenizer_config.json: {e}")))?,
            None => serde_json::Value::Null,
        };
        let template_source = source::chat_template_of(&tokenizer_config)
            .unwrap_or_else(|| template::CHATML.to_string());
        let token_str = |key: &str| source::token_string_of(&tokenizer_config, key);
        let eos_token = token_str("eos_token").unwrap_or_default();
        let eos_extra = tokenizer.token_to_id(&eos_token);
        let template = ChatTemplate::new(
            template_source,
            token_str("bos_token").unwrap_or_default(),
            eos_token,
        )?;
        // GPUs run bf16; CPUs have no fast bf16 matmul in candle, so they compute in f32.
        let dtype = if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        // SAFETY: the files are memory-mapped read-only; Sluice never writes them while the
        // worker runs, and an operator replacing model files under a live worker is outside
        // what any inference server supports.
        #[allow(unsafe_code)]
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype, device)? };
        let model = qwen2::ModelForCausalLM::new(&config, vb)?;
        Ok(Self {
            backend: Backend::Safetensors(model),
            plain: prompt::plain_twin(&tokenizer),
            info: ModelInfo {
                name: files.name.clone(),
                context_length: config.max_position_embeddings,
                eos_token_ids: qwen_eos_ids(&tokenizer, eos_extra),
            },
            tokenizer,
            template,
            device: device.clone(),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of a conversation, ending with the assistant's turn opened.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, ModelError> {
        Ok(prompt::encode_chat(
            &self.template,
            &self.tokenizer,
            &self.plain,
            messages,
        )?)
    }

    /// Empties the KV cache. Called before and after every job.
    pub fn reset(&mut self) {
        match &mut self.backend {
            Backend::Gguf(m) => m.clear_kv_cache(),
            Backend::Safetensors(m) => m.clear_kv_cache(),
        }
    }

    /// Runs `tokens` at positions `position..`, extending the KV cache, and returns the logits
    /// (f32, one per vocabulary entry) for the token after the last one.
    pub fn forward(&mut self, tokens: &[u32], position: usize) -> Result<Tensor, ModelError> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = match &mut self.backend {
            Backend::Gguf(m) => m.forward(&input, position)?,
            Backend::Safetensors(m) => m.forward(&input, position)?,
        };
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }
}
