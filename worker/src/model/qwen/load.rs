//! Loading Qwen2 weights: a GGUF file (candle's quantized matmuls, Q5 re-quantised to Q8_0 on
//! CPU), a safetensors directory (dense), and the conversion to Sluice's 8-bit CPU kernel.
//! Projections of the same input are stacked into one matmul here where the weights allow.

use super::*;

impl Proj {
    /// From a GGUF tensor, for candle's quantized matmul. On CPU, Q5_0/Q5_1 tensors are
    /// re-quantised to Q8_0 once at load: candle 0.11 has no SIMD CPU kernel for Q5 (most of
    /// a Qwen2.5 Q4_K_M file), and Q8_0 holds every Q5 value exactly. GPUs keep Q5.
    pub(super) fn from_qtensor(w: QTensor, device: &Device) -> Result<Self> {
        let w = if device.is_cpu() {
            crate::model::requant::q5_tensor_to_q8(w)?
        } else {
            w
        };
        Ok(Proj::Quant(QMatMul::from_qtensor(w)?))
    }

    /// The same projection on Sluice's 8-bit CPU kernel (Q8_0 weights taken as they are,
    /// others dequantised and quantised).
    pub(super) fn to_q8(&self) -> Result<Self> {
        match self {
            Proj::Quant(QMatMul::QTensor(w)) => {
                let (n, k) = w.shape().dims2()?;
                let q = if w.dtype() == GgmlDType::Q8_0 {
                    Q8Matrix::from_q8_0_bytes(&w.data()?, n, k)
                } else {
                    let dense = w
                        .dequantize(&Device::Cpu)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    Q8Matrix::quantize(&dense, n, k)
                }
                .map_err(candle_core::Error::wrap)?;
                Ok(Proj::Q8(Arc::new(q)))
            }
            Proj::Dense(l) if l.bias().is_none() => {
                let w = l.weight().to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let (n, k) = w.dims2()?;
                let q = Q8Matrix::quantize(&w.flatten_all()?.to_vec1::<f32>()?, n, k)
                    .map_err(candle_core::Error::wrap)?;
                Ok(Proj::Q8(Arc::new(q)))
            }
            other => Ok(other.clone()),
        }
    }

    /// One projection computing all of `parts`' outputs side by side, where their weights
    /// can be stacked (dense, or Sluice's 8-bit kernel); `None` for candle's quantized tensors
    /// (a GGUF file's q, k and v often differ in type).
    pub(super) fn stack(parts: &[&Proj]) -> Result<Option<Self>> {
        if let Some(dense) = parts
            .iter()
            .map(|p| match p {
                Proj::Dense(l) if l.bias().is_none() => Some(l.weight()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            let w = Tensor::cat(&dense, 0)?;
            return Ok(Some(Proj::Dense(candle_nn::Linear::new(w, None))));
        }
        if let Some(q8) = parts
            .iter()
            .map(|p| match p {
                Proj::Q8(q) => Some(&**q),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            let q = Q8Matrix::stack(&q8).map_err(candle_core::Error::wrap)?;
            return Ok(Some(Proj::Q8(Arc::new(q))));
        }
        Ok(None)
    }
}

impl Stacked {
    pub(super) fn new(parts: Vec<Proj>) -> Result<Self> {
        Ok(match Proj::stack(&parts.iter().collect::<Vec<_>>())? {
            Some(one) => Stacked::One(one),
            None => Stacked::Each(parts),
        })
    }

    /// On Sluice's 8-bit kernel, stacked (candle's quantized tensors become stackable).
    pub(super) fn to_q8(&self) -> Result<Self> {
        match self {
            Stacked::One(p) => Ok(Stacked::One(p.to_q8()?)),
            Stacked::Each(parts) => {
                Stacked::new(parts.iter().map(Proj::to_q8).collect::<Result<Vec<_>>>()?)
            }
        }
    }
}

pub(super) fn rope_tables(
    head_dim: usize,
    theta: f64,
    context: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / theta.powf(i as f64 / head_dim as f64) as f32)
        .collect();
    let n = inv.len();
    let inv = Tensor::from_vec(inv, (1, n), device)?;
    let t = Tensor::arange(0u32, context as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((context, 1))?;
    let freqs = t.matmul(&inv)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

impl Qwen2 {
    /// From a GGUF file's content (Qwen2 architecture).
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let md_u32 = |k: &str| -> Result<usize> {
            content
                .metadata
                .get(k)
                .ok_or_else(|| candle_core::Error::msg(format!("missing {k}")))?
                .to_u32()
                .map(|v| v as usize)
        };
        let md_f32 = |k: &str| content.metadata.get(k).and_then(|v| v.to_f32().ok());
        let heads = md_u32("qwen2.attention.head_count")?;
        let kv_heads = md_u32("qwen2.attention.head_count_kv")?;
        let hidden = md_u32("qwen2.embedding_length")?;
        let context = md_u32("qwen2.context_length")?;
        let layers_n = md_u32("qwen2.block_count")?;
        let eps = f64::from(md_f32("qwen2.attention.layer_norm_rms_epsilon").unwrap_or(1e-6));
        let theta = f64::from(md_f32("qwen2.rope.freq_base").unwrap_or(10_000.0));
        let head_dim = hidden / heads;
        let mut t = |name: &str| content.tensor(reader, name, device);
        let embed = t("token_embd.weight")?.dequantize(device)?;
        let norm = Norm::new(t("output_norm.weight")?.dequantize(device)?, eps);
        let lm_head = match t("output.weight") {
            Ok(w) => Proj::from_qtensor(w, device)?,
            Err(_) => Proj::from_qtensor(t("token_embd.weight")?, device)?,
        };
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let p = format!("blk.{i}");
            let mut q = |n: &str| -> Result<Proj> {
                Proj::from_qtensor(t(&format!("{p}.{n}.weight"))?, device)
            };
            let (wq, wk, wv, wo) = (q("attn_q")?, q("attn_k")?, q("attn_v")?, q("attn_output")?);
            let (gate, up, down) = (q("ffn_gate")?, q("ffn_up")?, q("ffn_down")?);
            let mut dense = |n: &str| t(&format!("{p}.{n}"))?.dequantize(device);
            let qkv_bias = Tensor::cat(
                &[
                    dense("attn_q.bias")?,
                    dense("attn_k.bias")?,
                    dense("attn_v.bias")?,
                ],
                0,
            )?;
            layers.push(Layer {
                qkv: Stacked::new(vec![wq, wk, wv])?,
                qkv_bias,
                o: wo,
                gate_up: Stacked::new(vec![gate, up])?,
                down,
                attn_norm: Norm::new(dense("attn_norm.weight")?, eps),
                ffn_norm: Norm::new(dense("ffn_norm.weight")?, eps),
            });
        }
        let (cos, sin) = rope_tables(head_dim, theta, context, DType::F32, device)?;
        Ok(Self {
            embed: Embedding::new(embed, hidden),
            layers,
            norm,
            lm_head,
            cos,
            sin,
            dims: Dims {
                layers: layers_n,
                heads,
                kv_heads,
                head_dim,
                hidden,
                context,
            },
            dtype: DType::F32,
            device: device.clone(),
            attention: Attention::default_for(device),
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    /// From safetensors weights in the Hugging Face layout.
    pub fn from_safetensors(
        cfg: &candle_transformers::models::qwen2::Config,
        vb: VarBuilder,
    ) -> Result<Self> {
        let hidden = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_key_value_heads;
        let head_dim = hidden / heads;
        let vm = vb.pp("model");
        let embed = candle_nn::embedding(cfg.vocab_size, hidden, vm.pp("embed_tokens"))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = vm.pp("layers").pp(i);
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            let lin = |vb: VarBuilder, i: usize, o: usize| -> Result<Proj> {
                Ok(Proj::Dense(candle_nn::linear_no_bias(i, o, vb)?))
            };
            let (qo, kvo) = (heads * head_dim, kv_heads * head_dim);
            let norm = |vb: VarBuilder| -> Result<Norm> {
                Ok(Norm::new(vb.get(hidden, "weight")?, cfg.rms_norm_eps))
            };
            let qkv_bias = Tensor::cat(
                &[
                    a.pp("q_proj").get(qo, "bias")?,
                    a.pp("k_proj").get(kvo, "bias")?,
                    a.pp("v_proj").get(kvo, "bias")?,
                ],
                0,
            )?;
            layers.push(Layer {
                qkv: Stacked::new(vec![
                    lin(a.pp("q_proj"), hidden, qo)?,
                    lin(a.pp("k_proj"), hidden, kvo)?,
                    lin(a.pp("v_proj"), hidden, kvo)?,
                ])?,
                qkv_bias,
                o: lin(a.pp("o_proj"), qo, hidden)?,
                gate_up: Stacked::new(vec![
                    lin(m.pp("gate_proj"), hidden, cfg.intermediate_size)?,
                    lin(m.pp("up_proj"), hidden, cfg.intermediate_size)?,
                ])?,
                down: lin(m.pp("down_proj"), cfg.intermediate_size, hidden)?,
                attn_norm: norm(l.pp("input_layernorm"))?,
                ffn_norm: norm(l.pp("post_attention_layernorm"))?,
            });
        }
        let norm = Norm::new(vm.pp("norm").get(hidden, "weight")?, cfg.rms_norm_eps);
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            Proj::Dense(candle_nn::linear_no_bias(
                hidden,
                cfg.vocab_size,
                vb.pp("lm_head"),
            )?)
        } else {
            Proj::Dense(candle_nn::Linear::new(embed.embeddings().clone(), None))
        };
        let (cos, sin) = rope_tables(
            head_dim,
            cfg.rope_theta,
            cfg.max_position_embeddings,
            vb.dtype(),
            vb.device(),
        )?;
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            dims: Dims {
                layers: cfg.num_hidden_layers,
                heads,
                kv_heads,
                head_dim,
                hidden,
                context: cfg.max_position_embeddings,
            },
            dtype: vb.dtype(),
            device: vb.device().clone(),
            attention: Attention::default_for(vb.device()),
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    /// A CPU copy whose projections run on Sluice's batched 8-bit kernel ([`crate::kernels::qmm`])
    /// instead of candle's: what CPU workers run (see `LoadedModel::load`).
    pub fn to_q8(&self) -> Result<Self> {
        if !self.device.is_cpu() {
            return Err(candle_core::Error::msg("the 8-bit kernel runs on CPU only"));
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    qkv: l.qkv.to_q8()?,
                    o: l.o.to_q8()?,
                    gate_up: l.gate_up.to_q8()?,
                    down: l.down.to_q8()?,
                    ..l.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed: self.embed.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.to_q8()?,
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            dims: self.dims,
            dtype: self.dtype,
            device: self.device.clone(),
            attention: self.attention,
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }
}
