//! Sluice's own Qwen2 forward pass, written for continuous batching.
//!
//! candle-transformers' `qwen2` and `quantized_qwen2` keep one KV cache inside the model and
//! share one position offset across the batch, so they cannot run sequences of different
//! lengths in one pass. Here the weights are shared and immutable, and each sequence owns a
//! [`SeqCache`] (its own pages of the KV pool). A decode step runs the projections and MLPs of
//! every active sequence as one batched matmul (the weights are read once per step, which is
//! what makes batching pay), and attention of each sequence against its own keys, at its own
//! position.
//!
//! Weights come from a GGUF file (candle's quantized matmuls) or safetensors (dense), loaded in
//! `qwen/load.rs`; the arithmetic is the same as the reference implementations, which the tests
//! check. Projections of the same input are stacked into one matmul where the weights allow
//! (q/k/v, gate/up), and the small steps between matmuls run as one kernel each on CUDA
//! ([`crate::kernels::fused`]).
//!
//! Keys and values live in a paged pool ([`crate::engine::kv`]). On a GPU, attention for the
//! whole batch is one gather, one masked batched matmul pair and one softmax per layer (sequences
//! padded to the longest, padding masked out); on CPU it runs sequence by sequence over exactly
//! each sequence's keys, which keeps a sequence's arithmetic bit-identical alone and in a batch.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::kernels::fused::{self, Norm};

use crate::engine::kv::{KvPool, StepRows};
use crate::kernels::qmm::Q8Matrix;

pub use crate::engine::kv::SeqCache;

mod load;

/// A projection: candle's quantized matmul (GGUF), dense (safetensors), or Sluice's batched
/// 8-bit CPU kernel ([`Qwen2::to_q8`]).
#[derive(Debug, Clone)]
enum Proj {
    Q8(Arc<Q8Matrix>),
    Quant(QMatMul),
    Dense(candle_nn::Linear),
}

impl Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Q8(q) => {
                let mut dims = x.dims().to_vec();
                let k = dims.pop().unwrap_or(0);
                let m = dims.iter().product::<usize>();
                let input = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                if k != q.cols() {
                    return Err(candle_core::Error::msg(format!(
                        "matmul: {k} inputs for a {}-input weight",
                        q.cols()
                    )));
                }
                let out = q.matmul(&input, m).map_err(candle_core::Error::wrap)?;
                dims.push(q.rows());
                Tensor::from_vec(out, dims, x.device())
            }
            Proj::Quant(q) => q.forward(x),
            Proj::Dense(l) => fused::linear(x, l),
        }
    }
}

/// Projections of the same input whose outputs are used side by side (q, k, v; gate, up):
/// one matmul where the weights stack ([`Proj::stack`]), else one each and a concatenation.
#[derive(Debug, Clone)]
enum Stacked {
    One(Proj),
    Each(Vec<Proj>),
}

impl Stacked {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Stacked::One(p) => p.forward(x),
            Stacked::Each(parts) => {
                let outs = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&outs, candle_core::D::Minus1)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    /// q, k and v, in that order, and their biases concatenated.
    qkv: Stacked,
    qkv_bias: Tensor,
    o: Proj,
    /// gate, then up.
    gate_up: Stacked,
    down: Proj,
    attn_norm: Norm,
    ffn_norm: Norm,
}

/// The shapes of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub context: usize,
}

impl Dims {
    /// Bytes of KV cache one token takes in one sequence.
    pub fn kv_bytes_per_token(&self, dtype: DType) -> usize {
        self.layers * 2 * self.kv_heads * self.head_dim * dtype.size_in_bytes()
    }
}

/// Qwen2 weights, shared by every sequence.
pub struct Qwen2 {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Proj,
    cos: Tensor,
    sin: Tensor,
    dims: Dims,
    dtype: DType,
    device: Device,
    attention: Attention,
    /// Recorded decode steps (CUDA only; see [`crate::model::graphs`]).
    #[cfg(feature = "cuda")]
    graphs: crate::model::graphs::DecodeGraphs,
}

/// How attention runs over a batch (the results agree to rounding; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// Sequence by sequence, over exactly its own keys (the CPU default).
    PerSequence,
    /// The whole batch at once, padded and masked (the GPU default).
    Batched,
}

impl Qwen2 {
    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// Width of the output logits (the embedding rows; may exceed the tokenizer's vocabulary).
    pub fn vocab(&self) -> usize {
        self.embed.embeddings().dim(0).unwrap_or(0)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How decode steps ran as CUDA graphs (see [`crate::model::graphs`]), or `None` where they can't
    /// (a CPU model, or `SLUICE_CUDA_GRAPHS=off`).
    pub fn decode_graphs_summary(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() && crate::model::graphs::enabled() {
            return Some(self.graphs.summary());
        }
        None
    }

    pub fn set_attention(&mut self, attention: Attention) {
        self.attention = attention;
    }

    /// A KV pool for `tokens` tokens in all, in the model's dtype, on its device.
    pub fn new_pool(&self, tokens: usize) -> Result<Arc<KvPool>> {
        KvPool::new(
            self.dims.layers,
            self.dims.kv_heads * self.dims.head_dim,
            tokens,
            self.dtype,
            &self.device,
        )
    }

    /// Runs a whole prompt (or a chunk of it) for one sequence, extending its cache. Returns
    /// the logits (f32, vocabulary) of the token after the last one.
    pub fn prefill(&self, tokens: &[u32], cache: &mut SeqCache) -> Result<Tensor> {
        let t = tokens.len();
        let pos = cache.len();
        if t == 0 || pos + t > self.dims.context {
            return Err(candle_core::Error::msg(format!(
                "prefill of {t} tokens at position {pos} (context {})",
                self.dims.context
            )));
        }
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let logits = self.run(&input, &cos, &sin, &mut [cache], false)?;
        logits.i((0, 0))?.to_dtype(DType::F32)
    }

    /// One decode step for many sequences: `tokens[i]` is appended to `caches[i]` at that
    /// cache's own position. Returns logits `(batch, vocab)` in f32.
    pub fn decode(&self, tokens: &[u32], caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.is_empty() {
            return Err(candle_core::Error::msg(format!(
                "decode of {} tokens for {} sequences",
                tokens.len(),
                caches.len()
            )));
        }
        if let Some(c) = caches.iter().find(|c| c.len() >= self.dims.context) {
            return Err(candle_core::Error::msg(format!(
                "decode at position {} (context {})",
                c.len(),
                self.dims.context
            )));
        }
        #[cfg(feature = "cuda")]
        if let Some(logits) = self.decode_graphed(tokens, caches)? {
            return Ok(logits);
        }
        let positions: Vec<u32> = caches.iter().map(|c| c.len() as u32).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(1)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        let logits = self.run(&input, &cos, &sin, caches, true)?;
        logits.squeeze(1)?.to_dtype(DType::F32)
    }

    /// Attention of `q` `(b, t, heads, d)` over each sequence's cached keys and values (the
    /// new ones already written), as `(b, t, heads · d)`.
    fn attend(&self, pool: &KvPool, li: usize, q: &Tensor, rows: &StepRows) -> Result<Tensor> {
        let d = self.dims;
        let (b, t, _, _) = q.dims4()?;
        #[cfg(feature = "cuda")]
        if let Some(lens) = &rows.lens
            && t == 1
            && crate::kernels::paged_attention::supports(d.head_dim, rows.span, q.dtype())
        {
            return crate::kernels::paged_attention::decode(
                &q.reshape((b, d.heads, d.head_dim))?,
                &pool.k[li],
                &pool.v[li],
                &rows.read,
                lens,
                d.heads,
                d.kv_heads,
                rows.span,
            )?
            .reshape((b, t, d.heads * d.head_dim));
        }
        if let Some(host) = &rows.host
            && t == 1
            && q.dtype() == DType::F32
            && pool.k[li].dtype() == DType::F32
        {
            return crate::kernels::cpu_attention::decode(
                q,
                &pool.k[li],
                &pool.v[li],
                &crate::kernels::cpu_attention::HostRows {
                    read: &host.read,
                    lens: &host.lens,
                    span: rows.span,
                },
                crate::kernels::cpu_attention::Heads {
                    heads: d.heads,
                    kv_heads: d.kv_heads,
                    head_dim: d.head_dim,
                },
            );
        }
        // Scores and softmax in f32 whatever the storage type, as PyTorch's SDPA accumulates
        // (measured on the H200: the bf16 logits' cosine to transformers went from 0.99840 to
        // 0.99866, so bf16 rounding elsewhere dominates what remains).
        let dtype = q.dtype();
        let q = q.to_dtype(DType::F32)?;
        let n_rep = d.heads / d.kv_heads;
        // Query heads grouped by the KV head they share: (b, kv_heads, n_rep · t, d).
        let q = q
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, d.kv_heads, n_rep * t, d.head_dim))?;
        let gather = |pool: &Tensor| -> Result<Tensor> {
            pool.index_select(&rows.read, 0)?
                .reshape((b, rows.span, d.kv_heads, d.head_dim))?
                .transpose(1, 2)?
                .to_dtype(DType::F32)?
                .contiguous()
        };
        let (k, v) = (gather(&pool.k[li])?, gather(&pool.v[li])?);
        let att = (q.matmul(&k.t()?)? * (1.0 / (d.head_dim as f64).sqrt()))?;
        let att = match &rows.mask {
            Some(mask) => att
                .reshape((b, d.kv_heads, n_rep, t, rows.span))?
                .broadcast_add(mask)?
                .reshape((b, d.kv_heads, n_rep * t, rows.span))?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v)?
            .reshape((b, d.heads, t, d.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, d.heads * d.head_dim))?
            .to_dtype(dtype)
    }

    /// `input` is `(batch, t)`; `t > 1` only with a batch of one (prefill). `cos` and `sin`
    /// are the rotary tables of the `batch · t` rows.
    fn run(
        &self,
        input: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut SeqCache],
        decode: bool,
    ) -> Result<Tensor> {
        let t = input.dim(1)?;
        let width = self.dims.kv_heads * self.dims.head_dim;
        let pool = self.batch_pool(caches)?;
        for cache in caches.iter_mut() {
            cache.reserve(t)?;
        }
        let views: Vec<&SeqCache> = caches.iter().map(|c| &**c).collect();
        let rows = match self.attention {
            Attention::Batched => vec![StepRows::new(&views, t, width, &self.device, decode)?],
            Attention::PerSequence => views
                .iter()
                .map(|c| StepRows::new(&[*c], t, width, &self.device, decode))
                .collect::<Result<Vec<_>>>()?,
        };
        let logits = self.forward(input, cos, sin, &pool, &rows)?;
        for cache in caches.iter_mut() {
            cache.advance(t);
        }
        Ok(logits)
    }

    /// The pool every cache of a batch comes from.
    fn batch_pool(&self, caches: &[&mut SeqCache]) -> Result<Arc<KvPool>> {
        let pool = Arc::clone(caches[0].pool());
        if caches.iter().any(|c| !Arc::ptr_eq(c.pool(), &pool)) {
            return Err(candle_core::Error::msg(
                "a batch's caches come from different pools",
            ));
        }
        Ok(pool)
    }

    /// The layers and the head over `input` `(batch, t)`, with the step's cache rows (one
    /// [`StepRows`] for the whole batch, or one per sequence): writes the new keys and values
    /// into `pool` and returns the last position's logits `(batch, 1, vocab)`. Touches nothing
    /// on the host, so a CUDA graph can record it.
    fn forward(
        &self,
        input: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pool: &KvPool,
        rows: &[StepRows],
    ) -> Result<Tensor> {
        let (b, t) = input.dims2()?;
        let d = self.dims;
        let width = d.kv_heads * d.head_dim;
        let mut x = self.embed.forward(input)?;
        // `h` is always the normed `x`: each residual add is fused with the next norm.
        let mut h = match self.layers.first() {
            Some(first) => first.attn_norm.forward(&x)?,
            None => self.norm.forward(&x)?,
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = fused::qkv_rope(
                &layer.qkv.forward(&h)?,
                &layer.qkv_bias,
                cos,
                sin,
                d.heads,
                d.kv_heads,
                d.head_dim,
            )?;
            let y = if let [rows] = rows {
                pool.k[li].scatter_set(&rows.write, &k.reshape((b * t, width))?, 0)?;
                pool.v[li].scatter_set(&rows.write, &v.reshape((b * t, width))?, 0)?;
                self.attend(pool, li, &q, rows)?
            } else {
                let mut ys = Vec::with_capacity(b);
                for (i, rows) in rows.iter().enumerate() {
                    let one = |x: &Tensor| x.narrow(0, i, 1)?.reshape((t, width));
                    pool.k[li].scatter_set(&rows.write, &one(&k)?, 0)?;
                    pool.v[li].scatter_set(&rows.write, &one(&v)?, 0)?;
                    ys.push(self.attend(pool, li, &q.narrow(0, i, 1)?, rows)?);
                }
                Tensor::cat(&ys, 0)?
            };
            let (x1, h1) = fused::add_rms_norm(&x, &layer.o.forward(&y)?, &layer.ffn_norm)?;
            let mlp = layer
                .down
                .forward(&fused::silu_mul(&layer.gate_up.forward(&h1)?)?)?;
            let next = self.layers.get(li + 1).map_or(&self.norm, |l| &l.attn_norm);
            (x, h) = fused::add_rms_norm(&x1, &mlp, next)?;
        }
        // Only the last position's logits are needed.
        self.lm_head.forward(&h.narrow(1, t - 1, 1)?)
    }

    /// A decode step replayed as a CUDA graph (see [`crate::model::graphs`]), or `None` where graphs
    /// don't apply (not CUDA, turned off, per-sequence attention, a span past the decode
    /// kernel's) or this shape's recording failed: the caller then runs the step eagerly.
    #[cfg(feature = "cuda")]
    fn decode_graphed(
        &self,
        tokens: &[u32],
        caches: &mut [&mut SeqCache],
    ) -> Result<Option<Tensor>> {
        use crate::model::graphs::{StepShape, span_bucket};
        let d = self.dims;
        if !self.device.is_cuda()
            || !crate::model::graphs::enabled()
            || self.attention != Attention::Batched
        {
            return Ok(None);
        }
        let longest = caches.iter().map(|c| c.len() + 1).max().unwrap_or(1);
        let shape = StepShape {
            batch: tokens.len(),
            span: span_bucket(longest),
            width: d.kv_heads * d.head_dim,
        };
        if !crate::kernels::paged_attention::supports(d.head_dim, shape.span, self.dtype) {
            return Ok(None);
        }
        let pool = self.batch_pool(caches)?;
        for cache in caches.iter_mut() {
            cache.reserve(1)?;
        }
        let mut host = Vec::with_capacity(shape.len());
        host.extend_from_slice(tokens);
        host.extend(caches.iter().map(|c| c.len() as u32));
        host.extend(caches.iter().map(|c| c.len() as u32 + 1));
        for c in caches.iter() {
            host.extend(std::iter::repeat_n(c.row(c.len()), shape.width));
        }
        for c in caches.iter() {
            host.extend(c.read_rows(c.len() + 1, shape.span));
        }
        let step = |inputs: &Tensor| -> Result<Tensor> {
            let part = |(at, n): (usize, usize)| inputs.narrow(0, at, n);
            let b = shape.batch;
            let positions = part(shape.positions())?;
            let rows = StepRows {
                write: part(shape.write())?.reshape((b, shape.width))?,
                read: part(shape.read())?,
                mask: None,
                span: shape.span,
                lens: Some(part(shape.lens())?),
                host: None,
            };
            let input = part(shape.tokens())?.reshape((b, 1))?;
            let cos = self.cos.index_select(&positions, 0)?;
            let sin = self.sin.index_select(&positions, 0)?;
            self.forward(&input, &cos, &sin, &pool, std::slice::from_ref(&rows))?
                .squeeze(1)?
                .to_dtype(DType::F32)
        };
        let logits = self.graphs.run(&self.device, shape, &host, step)?;
        if logits.is_some() {
            for cache in caches.iter_mut() {
                cache.advance(1);
            }
        }
        Ok(logits)
    }
}

impl Attention {
    fn default_for(device: &Device) -> Self {
        if device.is_cpu() {
            Attention::PerSequence
        } else {
            Attention::Batched
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::{TinyShape, write_tiny_model};
    use candle_transformers::models::qwen2;

    fn tiny() -> (qwen2::Config, Vec<std::path::PathBuf>) {
        let dir = std::env::temp_dir().join(format!(
            "sluice-qwen-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        write_tiny_model(&dir, 7, TinyShape::default()).expect("tiny model");
        let cfg: qwen2::Config = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json")).expect("config"),
        )
        .expect("config json");
        (cfg, vec![dir.join("model.safetensors")])
    }

    fn load(cfg: &qwen2::Config, files: &[std::path::PathBuf]) -> (Qwen2, qwen2::ModelForCausalLM) {
        let vb = || {
            let tensors = candle_core::safetensors::load(&files[0], &Device::Cpu).expect("load");
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
        };
        (
            Qwen2::from_safetensors(cfg, vb()).expect("ours"),
            qwen2::ModelForCausalLM::new(cfg, vb()).expect("reference"),
        )
    }

    /// The largest absolute value of a vector.
    fn max_abs(v: &Tensor) -> f32 {
        v.abs()
            .expect("abs")
            .max(0)
            .expect("max")
            .to_scalar::<f32>()
            .expect("f32")
    }

    fn argmax(logits: &Tensor) -> u32 {
        logits
            .argmax(candle_core::D::Minus1)
            .expect("argmax")
            .to_scalar::<u32>()
            .expect("u32")
    }

    #[test]
    fn stacked_projections_compute_their_parts_side_by_side() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 64), &dev).expect("x");
        let weights: Vec<Tensor> = [32, 16, 16]
            .iter()
            .map(|&n| Tensor::randn(0f32, 1., (n, 64), &dev).expect("w"))
            .collect();
        let cat_of = |parts: &[Proj]| -> Tensor {
            let outs: Vec<Tensor> = parts.iter().map(|p| p.forward(&x).expect("part")).collect();
            Tensor::cat(&outs, 2).expect("cat")
        };
        // Dense weights stack into one matmul.
        let dense: Vec<Proj> = weights
            .iter()
            .map(|w| Proj::Dense(candle_nn::Linear::new(w.clone(), None)))
            .collect();
        let one = Stacked::new(dense.clone()).expect("stack");
        assert!(matches!(one, Stacked::One(_)));
        let diff = max_abs(
            &(one.forward(&x).expect("one") - cat_of(&dense))
                .expect("sub")
                .flatten_all()
                .expect("flat"),
        );
        assert!(diff < 1e-4, "stacked dense differs by {diff}");
        // candle's quantized tensors stay separate; the outputs are concatenated, and the 8-bit
        // copy stacks them.
        let quant: Vec<Proj> = weights
            .iter()
            .map(|w| {
                Proj::Quant(
                    QMatMul::from_qtensor(QTensor::quantize(w, GgmlDType::Q8_0).expect("quantize"))
                        .expect("qmatmul"),
                )
            })
            .collect();
        let each = Stacked::new(quant.clone()).expect("each");
        assert!(matches!(each, Stacked::Each(_)));
        let got = each.forward(&x).expect("each");
        assert_eq!(got.dims(), &[2, 3, 64]);
        assert_eq!(
            got.flatten_all().expect("f").to_vec1::<f32>().expect("v"),
            cat_of(&quant)
                .flatten_all()
                .expect("f")
                .to_vec1::<f32>()
                .expect("v")
        );
        let q8 = each.to_q8().expect("q8");
        assert!(matches!(q8, Stacked::One(Proj::Q8(_))));
        let q8_out = q8.forward(&x).expect("q8");
        let scale = max_abs(&got.flatten_all().expect("f"));
        let diff = max_abs(&(q8_out - &got).expect("sub").flatten_all().expect("flat"));
        assert!(
            diff < 0.05 * scale,
            "8-bit stack differs by {diff} (scale {scale})"
        );
    }

    #[test]
    fn matches_the_reference_logits_and_greedy_tokens() {
        let (cfg, files) = tiny();
        let (ours, mut reference) = load(&cfg, &files);
        let prompt: Vec<u32> = vec![257, 72, 101, 108, 108, 111, 258, 10, 257, 97];
        let mut cache = ours.new_pool(256).expect("pool").new_cache();
        let mut a = ours.prefill(&prompt, &mut cache).expect("prefill");
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .expect("t")
            .unsqueeze(0)
            .expect("u");
        let mut r = reference
            .forward(&input, 0)
            .expect("ref")
            .flatten_all()
            .expect("flat");
        for pos in prompt.len()..prompt.len() + 40 {
            let diff = max_abs(&(&a - &r).expect("sub"));
            assert!(diff < 1e-3, "logits differ by {diff}");
            let (ta, tr) = (argmax(&a), argmax(&r));
            assert_eq!(ta, tr, "greedy tokens differ at position {pos}");
            a = ours
                .decode(&[ta], &mut [&mut cache])
                .expect("decode")
                .squeeze(0)
                .expect("squeeze");
            let input = Tensor::new(&[tr], &Device::Cpu)
                .expect("t")
                .unsqueeze(0)
                .expect("u");
            r = reference
                .forward(&input, pos)
                .expect("ref")
                .flatten_all()
                .expect("flat");
        }
    }

    #[test]
    fn a_prompt_token_has_the_same_logits_however_the_prompt_is_chunked() {
        // The 8-bit model, as the worker runs a GGUF on the CPU.
        let (cfg, files) = tiny();
        let (dense, _) = load(&cfg, &files);
        let ours = dense.to_q8().expect("q8");
        let prompt: Vec<u32> = (0..40u32).map(|i| 20 + i * 5).collect();
        let pool = ours.new_pool(256).expect("pool");
        let bits = |t: &Tensor| t.to_vec1::<f32>().expect("logits");
        let mut whole = pool.new_cache();
        let expected = bits(&ours.prefill(&prompt, &mut whole).expect("prefill"));
        // Every cut, the last token alone among them (what a prefix-cache hit that copied all
        // of the prompt but its last token prefills): a one-token chunk is a prefill, not a
        // decode step, and attends the same way as the others.
        for split in 1..prompt.len() {
            let mut chunked = pool.new_cache();
            ours.prefill(&prompt[..split], &mut chunked)
                .expect("first chunk");
            let last = ours
                .prefill(&prompt[split..], &mut chunked)
                .expect("second chunk");
            assert_eq!(bits(&last), expected, "cut at {split}");
        }
    }

    #[test]
    fn the_8_bit_kernel_tracks_the_dense_model() {
        let (cfg, files) = tiny();
        let (dense, _) = load(&cfg, &files);
        let q8 = dense.to_q8().expect("q8");
        let prompt: Vec<u32> = vec![257, 72, 101, 108, 108, 111, 258, 10, 257, 97];
        let (mut cd, mut cq) = (
            dense.new_pool(256).expect("pool").new_cache(),
            q8.new_pool(256).expect("pool").new_cache(),
        );
        let mut a = dense.prefill(&prompt, &mut cd).expect("prefill");
        let mut b = q8.prefill(&prompt, &mut cq).expect("prefill");
        let mut same = 0;
        for _ in 0..20 {
            let scale = max_abs(&a);
            let diff = max_abs(&(&a - &b).expect("sub"));
            // 8-bit weights and activations: a few percent of the logits' range at most.
            assert!(
                diff <= 0.05 * scale.max(1.0),
                "logits differ by {diff} (scale {scale})"
            );
            let (ta, tb) = (argmax(&a), argmax(&b));
            if ta == tb {
                same += 1;
            }
            // Both continue from the dense model's token so one near-tie cannot derail the rest.
            a = dense
                .decode(&[ta], &mut [&mut cd])
                .expect("decode")
                .squeeze(0)
                .expect("sq");
            b = q8
                .decode(&[ta], &mut [&mut cq])
                .expect("decode")
                .squeeze(0)
                .expect("sq");
        }
        assert!(
            same >= 18,
            "greedy tokens agree at only {same} of 20 positions"
        );
    }

    #[test]
    fn a_sequence_decodes_the_same_alone_and_in_a_batch() {
        let (cfg, files) = tiny();
        let (mut model, _) = load(&cfg, &files);
        let greedy = |model: &Qwen2, prompts: &[Vec<u32>], steps: usize| -> Vec<Vec<u32>> {
            let pool = model.new_pool(1024).expect("pool");
            let mut caches: Vec<SeqCache> = prompts.iter().map(|_| pool.new_cache()).collect();
            let mut next: Vec<u32> = prompts
                .iter()
                .zip(caches.iter_mut())
                .map(|(p, c)| argmax(&model.prefill(p, c).expect("prefill")))
                .collect();
            let mut out: Vec<Vec<u32>> = next.iter().map(|t| vec![*t]).collect();
            for _ in 0..steps {
                let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
                let logits = model.decode(&next, &mut refs).expect("decode");
                next = (0..prompts.len())
                    .map(|i| argmax(&logits.get(i).expect("row")))
                    .collect();
                for (o, t) in out.iter_mut().zip(&next) {
                    o.push(*t);
                }
            }
            out
        };
        let a = vec![257u32, 10, 20, 30];
        let b = vec![257u32, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90];
        let c = vec![5u32; 30];
        let alone = greedy(&model, std::slice::from_ref(&a), 50);
        let batched = greedy(&model, &[b.clone(), a.clone(), c.clone()], 50);
        assert_eq!(
            alone[0], batched[1],
            "isolation: same tokens alone and in a batch"
        );
        // The GPU's batched, padded attention (run here on CPU) gives the same tokens.
        model.set_attention(Attention::Batched);
        let padded = greedy(&model, &[b.clone(), a.clone(), c.clone()], 50);
        assert_eq!(alone[0], padded[1], "isolation with batched attention");
        assert_eq!(
            batched, padded,
            "batched attention changes no sequence's tokens"
        );
        model.set_attention(Attention::PerSequence);
        // The 8-bit kernel computes each activation row on its own too: batching changes
        // nothing bit for bit.
        model = model.to_q8().expect("q8");
        let alone = greedy(&model, std::slice::from_ref(&a), 50);
        let batched = greedy(&model, &[b, a, c], 50);
        assert_eq!(alone[0], batched[1], "isolation on the 8-bit kernel");
    }

    #[test]
    fn batched_attention_matches_per_sequence_logits() {
        let (cfg, files) = tiny();
        let (mut model, _) = load(&cfg, &files);
        let prompts = [
            vec![257u32, 10, 20, 30],
            vec![5u32; 37],
            vec![257u32, 99, 98],
        ];
        let mut run = |attention: Attention| -> Vec<Tensor> {
            model.set_attention(attention);
            let pool = model.new_pool(512).expect("pool");
            let mut caches: Vec<SeqCache> = prompts.iter().map(|_| pool.new_cache()).collect();
            for (p, c) in prompts.iter().zip(caches.iter_mut()) {
                model.prefill(p, c).expect("prefill");
            }
            let mut out = Vec::new();
            for step in 0..20u32 {
                let tokens: Vec<u32> = (0..3).map(|i| 100 + step * 3 + i).collect();
                let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
                out.push(model.decode(&tokens, &mut refs).expect("decode"));
            }
            out
        };
        let per_seq = run(Attention::PerSequence);
        let batched = run(Attention::Batched);
        for (a, b) in per_seq.iter().zip(&batched) {
            let diff = max_abs(&(a - b).expect("sub").flatten_all().expect("flat"));
            assert!(diff < 1e-4, "batched attention differs by {diff}");
        }
    }
}
