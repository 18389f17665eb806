//! The served model's view of a text: a probe over Qwen2.5-Coder-0.5B-Instruct's hidden
//! states, added to the classifier's logit (`--guard-probe-model`; on in the compose stack).
//!
//! The model (the test GGUF of `scripts/fetch-test-model`, the one the workers serve) is cut
//! after its first [`ProbeSpec::layer`] decoder layers. Each of the spec's
//! [`features`](ProbeSpec::features) is one layer's output under the model's final RMSNorm,
//! pooled over the window's tokens (`mean3`: layer 3's average, `max8`: layer 8's maximum);
//! the features side by side are standardised and read by the head, a small MLP (one hidden
//! ReLU layer, [`ProbeSpec::hidden`]; an average of several MLPs is stored as one, their
//! hidden units side by side) or a logistic regression. Its output is the window's
//! probe logit, and a text's is the maximum over its windows. A spec may carry low-rank
//! adapters of the cut layers' projections ([`ProbeSpec::adapter`], trained with a head by
//! `guard/train/probe_tune.py`): they are added to the dequantised weights at load, so a tuned
//! probe costs what a frozen one does.
//! Trained by `guard/train/probe.py` on the classifier's training split; the spec
//! (`guard/model/probe.json`) names the SHA-256 of the GGUF it was trained on, and loading
//! refuses any other file. The combined logit, `classifier / classifier_scale + probe_weight ·
//! probe / probe_scale − threshold`, is 0 at the operating point chosen on the validation split
//! (at most 1 % false positives), so the score's 0.5 keeps its meaning.
//!
//! The model is multilingual where MiniLM is English: `docs/results/guard.md` has what the
//! probe adds and what it costs.

use std::io::{Read as _, Seek};
use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf as _;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use sha2::Digest as _;
use tokenizers::Tokenizer;

use super::ClassifierError;

/// The probe built into the binary.
pub const BUILTIN_PROBE: &str = include_str!("../../model/probe.json");

/// How the probe reads and scores (`guard/model/probe.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct ProbeSpec {
    /// SHA-256 of the GGUF file the probe was trained on.
    pub gguf_sha256: String,
    /// Decoder layers run.
    pub layer: usize,
    /// What the head reads, in order, each the model's width: `mean{l}` or `max{l}` for
    /// a layer `l` in `1..=layer`. Absent: the last layer's mean alone.
    #[serde(default)]
    pub features: Vec<Feature>,
    /// Tokens per window, and how many consecutive windows share.
    pub window_tokens: usize,
    pub window_overlap: usize,
    /// Standardisation of the pooled features.
    pub mean: Vec<f32>,
    pub scale: Vec<f32>,
    /// The head's hidden ReLU layer, when it is an MLP; absent, a logistic regression.
    #[serde(default)]
    pub hidden: Option<HiddenSpec>,
    /// Low-rank adapters of the cut layers' projections, trained with the head
    /// (`guard/train/probe_tune.py`), by the GGUF name of the weight they adapt:
    /// `blk.{i}.{attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down}.lora_a`, `(rank,
    /// in)`, and `.lora_b`, `(out, rank)` with the scale folded in; the layer runs
    /// `W + lora_b · lora_a`. Absent: the layers as the GGUF has them.
    #[serde(default)]
    pub adapter: std::collections::BTreeMap<String, AdapterTensor>,
    /// The output unit over the hidden layer (or over the standardised features).
    pub weight: Vec<f32>,
    pub bias: f32,
    /// How the probe's logit joins the classifier's.
    pub classifier_scale: f32,
    pub probe_scale: f32,
    pub probe_weight: f32,
    pub threshold: f32,
}

/// An MLP head's hidden layer: `relu(x · W + b)` over the standardised features.
#[derive(Debug, Clone, Deserialize)]
pub struct HiddenSpec {
    pub units: usize,
    /// `W`, `(features, units)` row-major, little-endian f32, base64.
    weight_f32le_base64: String,
    pub bias: Vec<f32>,
    /// `W`, decoded by [`ProbeSpec::parse`].
    #[serde(skip)]
    pub weight: Vec<f32>,
}

/// One adapter matrix: its shape and its values, row-major little-endian f32, base64.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterTensor {
    pub shape: [usize; 2],
    f32le_base64: String,
}

impl AdapterTensor {
    fn tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        let values = super::f32le_base64(&self.f32le_base64).map_err(candle_core::Error::msg)?;
        Tensor::from_vec(values, (self.shape[0], self.shape[1]), device)
    }
}

impl ProbeSpec {
    pub fn builtin() -> Result<Self, ClassifierError> {
        let corrupt = |detail: String| ClassifierError::Corrupt {
            path: "guard/model/probe.json (built in)".into(),
            detail,
        };
        Self::parse(BUILTIN_PROBE).map_err(corrupt)
    }

    /// A spec from its JSON, checked for consistency (the widths against the model's are
    /// checked when it loads).
    pub fn parse(json: &str) -> Result<Self, String> {
        let mut spec: Self = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if spec.features.is_empty() {
            spec.features = vec![Feature {
                pool: Pool::Mean,
                layer: spec.layer,
            }];
        }
        let n = spec.mean.len();
        if n == 0 || spec.scale.len() != n {
            return Err("mean and scale differ in length".into());
        }
        if !n.is_multiple_of(spec.features.len()) {
            return Err(format!(
                "{n} inputs do not split into {} features",
                spec.features.len()
            ));
        }
        let inputs = match &mut spec.hidden {
            Some(h) => {
                h.weight = super::f32le_base64(&h.weight_f32le_base64)
                    .map_err(|e| format!("hidden weights: {e}"))?;
                if h.units == 0 || h.weight.len() != n * h.units || h.bias.len() != h.units {
                    return Err(format!(
                        "hidden layer: {} weights and {} biases for {n} inputs and {} units",
                        h.weight.len(),
                        h.bias.len(),
                        h.units
                    ));
                }
                h.units
            }
            None => n,
        };
        if spec.weight.len() != inputs {
            return Err(format!(
                "{} output weights for {inputs} inputs",
                spec.weight.len()
            ));
        }
        if spec.window_tokens <= spec.window_overlap || spec.layer == 0 {
            return Err("window or layer out of range".into());
        }
        const ADAPTED: [&str; 7] = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        for key in spec.adapter.keys() {
            let parts: Vec<&str> = key.split('.').collect();
            let known = matches!(
                parts.as_slice(),
                ["blk", i, name, "lora_a" | "lora_b"]
                    if i.parse::<usize>().is_ok_and(|i| i < spec.layer) && ADAPTED.contains(name)
            );
            if !known {
                return Err(format!("adapter {key}: not a cut layer's projection"));
            }
        }
        if let Some(f) = spec
            .features
            .iter()
            .find(|f| f.layer == 0 || f.layer > spec.layer)
        {
            return Err(format!("feature {f} reads past layer {}", spec.layer));
        }
        Ok(spec)
    }

    /// The combined logit of a text (0 at the operating point).
    pub fn combine(&self, classifier: f32, probe: f32) -> f32 {
        classifier / self.classifier_scale + self.probe_weight * probe / self.probe_scale
            - self.threshold
    }
}

/// How a feature pools a layer's states over the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Mean,
    Max,
}

/// One pooled layer (`mean3`, `max8`): the layer's output under the final RMSNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub pool: Pool,
    pub layer: usize,
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pool = match self.pool {
            Pool::Mean => "mean",
            Pool::Max => "max",
        };
        write!(f, "{pool}{}", self.layer)
    }
}

impl std::str::FromStr for Feature {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (pool, layer) = if let Some(l) = s.strip_prefix("mean") {
            (Pool::Mean, l)
        } else if let Some(l) = s.strip_prefix("max") {
            (Pool::Max, l)
        } else {
            return Err(format!(
                "feature {s:?} is neither mean<layer> nor max<layer>"
            ));
        };
        let layer = layer
            .parse()
            .map_err(|_| format!("feature {s:?}: {layer:?} is not a layer number"))?;
        Ok(Self { pool, layer })
    }
}

impl<'de> Deserialize<'de> for Feature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A projection, dequantised to f32 and stored transposed (`(in, out)`, row-major), so that
/// `x · wᵀ` is a plain row-major product: candle's quantised CPU product took about 1 s for
/// the 15 tokens of a short message, and gemm repacks a right-hand side that is not row-major
/// on every call ([`super::encoder`] does the same for MiniLM).
struct Linear(Tensor);

impl Linear {
    /// `w`, plus `lora_b · lora_a` when the spec adapts it.
    fn new(
        w: QTensor,
        adapter: Option<(Tensor, Tensor)>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let mut w = w.dequantize(device)?;
        if let Some((a, b)) = adapter {
            let delta = b.matmul(&a)?;
            if delta.dims() != w.dims() {
                candle_core::bail!(
                    "an adapter of shape {:?} for a weight of shape {:?}",
                    delta.dims(),
                    w.dims()
                );
            }
            w = (w + delta)?;
        }
        Ok(Self(w.t()?.contiguous()?))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.0)
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_bias: Tensor,
    k_bias: Tensor,
    v_bias: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    attn_norm: Tensor,
    ffn_norm: Tensor,
}

/// The cut model, its tokenizer and the probe.
pub struct Probe {
    spec: ProbeSpec,
    tokenizer: Tokenizer,
    /// `(vocab, hidden)`, f16 (half the memory of f32; rows become f32 when looked up).
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    eps: f64,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    theta: f64,
    head: Head,
    device: Device,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("layer", &self.spec.layer)
            .finish_non_exhaustive()
    }
}

impl Probe {
    /// Loads the first `spec.layer` layers of the GGUF at `path`, refusing a file whose
    /// SHA-256 is not the one the probe was trained on.
    pub fn load(path: &Path, spec: ProbeSpec) -> Result<Self, ClassifierError> {
        let corrupt = |detail: String| ClassifierError::Corrupt {
            path: path.to_path_buf(),
            detail,
        };
        let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ClassifierError::Missing {
                path: path.to_path_buf(),
            },
            _ => corrupt(e.to_string()),
        })?;
        let sha = sha256_of(&mut file).map_err(|e| corrupt(e.to_string()))?;
        if sha != spec.gguf_sha256 {
            return Err(corrupt(format!(
                "SHA-256 {sha} is not the {} the probe was trained on",
                spec.gguf_sha256
            )));
        }
        file.rewind().map_err(|e| corrupt(e.to_string()))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| corrupt(e.to_string()))?;
        Self::from_gguf(&content, &mut file, spec, path)
            .map_err(|e| corrupt(format!("loading the probe's layers: {e}")))
    }

    fn from_gguf(
        content: &gguf_file::Content,
        file: &mut std::fs::File,
        spec: ProbeSpec,
        path: &Path,
    ) -> candle_core::Result<Self> {
        let device = Device::Cpu;
        let md = |k: &str| {
            content
                .metadata
                .get(k)
                .ok_or_else(|| candle_core::Error::msg(format!("{}: missing {k}", path.display())))
        };
        let heads = md("qwen2.attention.head_count")?.to_u32()? as usize;
        let kv_heads = md("qwen2.attention.head_count_kv")?.to_u32()? as usize;
        let hidden = md("qwen2.embedding_length")?.to_u32()? as usize;
        let blocks = md("qwen2.block_count")?.to_u32()? as usize;
        let eps = f64::from(md("qwen2.attention.layer_norm_rms_epsilon")?.to_f32()?);
        let theta = f64::from(md("qwen2.rope.freq_base")?.to_f32()?);
        let width = spec.mean.len() / spec.features.len();
        if spec.layer > blocks || width != hidden {
            candle_core::bail!(
                "the probe reads layer {} of width {width}; the model has {blocks} of width {hidden}",
                spec.layer,
            );
        }
        let tokenizer = Tokenizer::from_gguf(content)?;
        let mut t =
            |name: &str| -> candle_core::Result<QTensor> { content.tensor(file, name, &device) };
        let embed = t("token_embd.weight")?
            .dequantize(&device)?
            .to_dtype(DType::F16)?;
        let norm = t("output_norm.weight")?.dequantize(&device)?;
        let mut layers = Vec::with_capacity(spec.layer);
        for i in 0..spec.layer {
            let adapter = &spec.adapter;
            let mut mm = |n: &str| {
                let lora = |ab: &str| adapter.get(&format!("blk.{i}.{n}.lora_{ab}"));
                let pair = match (lora("a"), lora("b")) {
                    (Some(a), Some(b)) => Some((a.tensor(&device)?, b.tensor(&device)?)),
                    (None, None) => None,
                    _ => candle_core::bail!("blk.{i}.{n}: an adapter needs lora_a and lora_b"),
                };
                Linear::new(t(&format!("blk.{i}.{n}.weight"))?, pair, &device)
            };
            let (q, k, v, o) = (
                mm("attn_q")?,
                mm("attn_k")?,
                mm("attn_v")?,
                mm("attn_output")?,
            );
            let (gate, up, down) = (mm("ffn_gate")?, mm("ffn_up")?, mm("ffn_down")?);
            let mut dense = |n: &str| t(&format!("blk.{i}.{n}"))?.dequantize(&device);
            layers.push(Layer {
                q,
                k,
                v,
                o,
                q_bias: dense("attn_q.bias")?,
                k_bias: dense("attn_k.bias")?,
                v_bias: dense("attn_v.bias")?,
                gate,
                up,
                down,
                attn_norm: dense("attn_norm.weight")?,
                ffn_norm: dense("ffn_norm.weight")?,
            });
        }
        Ok(Self {
            head: folded_head(&spec, &device)?,
            spec,
            tokenizer,
            embed,
            layers,
            norm,
            eps,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            theta,
            device,
        })
    }

    pub fn spec(&self) -> &ProbeSpec {
        &self.spec
    }

    /// The probe's logit of each text (already through [`super::mask_encoded`]): the maximum
    /// over its windows.
    pub fn logits(&self, texts: &[&str]) -> Result<Vec<f32>, ClassifierError> {
        texts.iter().map(|t| self.logit(t)).collect()
    }

    fn logit(&self, text: &str) -> Result<f32, ClassifierError> {
        let ids = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ClassifierError::Inference(format!("probe tokenizer: {e}")))?
            .get_ids()
            .to_vec();
        let mut best = f32::NEG_INFINITY;
        for window in super::windows(&ids, self.spec.window_tokens, self.spec.window_overlap) {
            let logit = if window.is_empty() {
                // An empty text reads as nothing: the probe's bias alone would score what
                // it never saw in training. It adds nothing.
                0.0
            } else {
                self.window_logit(window)
                    .map_err(|e| ClassifierError::Inference(format!("probe: {e}")))?
            };
            best = best.max(logit);
        }
        Ok(best)
    }

    fn window_logit(&self, ids: &[u32]) -> candle_core::Result<f32> {
        let pooled = self.pooled(ids)?;
        let z = pooled
            .unsqueeze(0)?
            .matmul(&self.head.first)?
            .broadcast_add(&self.head.first_bias)?;
        let z = match &self.head.output {
            Some((w, b)) => (z.relu()?.matmul(w)? + f64::from(*b))?,
            None => z,
        };
        Ok(z.flatten_all()?.to_vec1::<f32>()?[0])
    }

    /// The spec's features of one window, concatenated: `(features · hidden,)`.
    fn pooled(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let t = ids.len();
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let input = Tensor::new(ids, &self.device)?;
        let mut x = self.embed.index_select(&input, 0)?.to_dtype(DType::F32)?;
        let (cos, sin) = self.rope(t)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &self.device)?;
        let mut pooled: Vec<Option<Tensor>> = vec![None; self.spec.features.len()];
        for (i, layer) in self.layers.iter().enumerate() {
            let a = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.eps as f32)?;
            let heads_of = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
                y.reshape((1, t, n, d))?.transpose(1, 2)?.contiguous()
            };
            let q = heads_of(layer.q.forward(&a)?.broadcast_add(&layer.q_bias)?, h)?;
            let k = heads_of(layer.k.forward(&a)?.broadcast_add(&layer.k_bias)?, kvh)?;
            let v = heads_of(layer.v.forward(&a)?.broadcast_add(&layer.v_bias)?, kvh)?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            // Each key and value head serves `h / kvh` query heads.
            let rep = h / kvh;
            let k = k
                .unsqueeze(2)?
                .expand((1, kvh, rep, t, d))?
                .reshape((1, h, t, d))?;
            let v = v
                .unsqueeze(2)?
                .expand((1, kvh, rep, t, d))?
                .reshape((1, h, t, d))?;
            let att = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((t, h * d))?;
            x = (x + layer.o.forward(&y)?)?;
            let m = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.eps as f32)?;
            let g = candle_nn::ops::silu(&layer.gate.forward(&m)?)?;
            let ff = layer.down.forward(&(g * layer.up.forward(&m)?)?)?;
            x = (x + ff)?;
            let wanted = |f: &Feature| f.layer == i + 1;
            if self.spec.features.iter().any(wanted) {
                let normed = candle_nn::ops::rms_norm(&x, &self.norm, self.eps as f32)?;
                for (slot, f) in pooled.iter_mut().zip(&self.spec.features) {
                    if wanted(f) {
                        *slot = Some(match f.pool {
                            Pool::Mean => normed.mean(0)?,
                            Pool::Max => normed.max(0)?,
                        });
                    }
                }
            }
        }
        let pooled: Vec<Tensor> = pooled
            .into_iter()
            .map(|p| p.ok_or_else(|| candle_core::Error::msg("a feature's layer was not run")))
            .collect::<candle_core::Result<_>>()?;
        Tensor::cat(&pooled, 0)
    }

    /// Rotary tables for positions `0..t`: `(t, head_dim / 2)`.
    fn rope(&self, t: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / self.head_dim as f64) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), &self.device)?;
        let pos = Tensor::arange(0u32, t as u32, &self.device)?
            .to_dtype(DType::F32)?
            .reshape((t, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }
}

/// The spec's head, ready to run.
struct Head {
    /// The first layer folded with the standardisation: `W / scale` and
    /// `b − (mean / scale) · W`, `(features, units)` and `(1, units)`; a logistic regression
    /// is one unit with no output layer.
    first: Tensor,
    first_bias: Tensor,
    /// An MLP's output unit over the ReLU of the first layer: `(units, 1)` and its bias.
    output: Option<(Tensor, f32)>,
}

fn folded_head(spec: &ProbeSpec, device: &Device) -> candle_core::Result<Head> {
    let n = spec.mean.len();
    let (weight, bias, units) = match &spec.hidden {
        Some(h) => (&h.weight[..], &h.bias[..], h.units),
        None => (&spec.weight[..], std::slice::from_ref(&spec.bias), 1),
    };
    let mut first = weight.to_vec();
    // Summed in f64: thousands of terms.
    let mut shift = vec![0f64; units];
    for i in 0..n {
        for j in 0..units {
            first[i * units + j] /= spec.scale[i];
            shift[j] += f64::from(spec.mean[i]) * f64::from(first[i * units + j]);
        }
    }
    let first_bias: Vec<f32> = bias
        .iter()
        .zip(&shift)
        .map(|(b, s)| (f64::from(*b) - s) as f32)
        .collect();
    let output = match &spec.hidden {
        Some(h) => Some((
            Tensor::from_vec(spec.weight.clone(), (h.units, 1), device)?,
            spec.bias,
        )),
        None => None,
    };
    Ok(Head {
        first: Tensor::from_vec(first, (n, units), device)?,
        first_bias: Tensor::from_vec(first_bias, (1, units), device)?,
        output,
    })
}

fn sha256_of(file: &mut std::fs::File) -> std::io::Result<String> {
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json(features: &str, width: usize) -> String {
        let v = vec![0.5f32; width];
        format!(
            r#"{{"gguf_sha256": "x", "layer": 8, {features} "window_tokens": 128, "window_overlap": 32,
                "mean": {v:?}, "scale": {v:?}, "weight": {v:?}, "bias": 0.0, "classifier_scale": 1.0,
                "probe_scale": 1.0, "probe_weight": 1.0, "threshold": 0.0}}"#
        )
    }

    #[test]
    fn features_name_a_pool_and_a_layer_and_default_to_the_last_layers_mean() {
        let spec =
            ProbeSpec::parse(&spec_json(r#""features": ["mean1", "max8"],"#, 4)).expect("spec");
        assert_eq!(
            spec.features,
            [
                Feature {
                    pool: Pool::Mean,
                    layer: 1
                },
                Feature {
                    pool: Pool::Max,
                    layer: 8
                }
            ]
        );
        assert_eq!(spec.features[1].to_string(), "max8");
        let plain = ProbeSpec::parse(&spec_json("", 4)).expect("spec");
        assert_eq!(
            plain.features,
            [Feature {
                pool: Pool::Mean,
                layer: 8
            }]
        );
    }

    #[test]
    fn an_adapter_is_added_to_the_weight_it_adapts() -> candle_core::Result<()> {
        use candle_core::quantized::GgmlDType;
        let device = Device::Cpu;
        let w = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (2, 3), &device)?;
        let q = || QTensor::quantize(&w, GgmlDType::F32);
        // Rank 1: b · a = [[10, 0, 10], [20, 0, 20]].
        let a = Tensor::from_vec(vec![1f32, 0., 1.], (1, 3), &device)?;
        let b = Tensor::from_vec(vec![10f32, 20.], (2, 1), &device)?;
        let x = Tensor::from_vec(vec![1f32, 1., 1.], (1, 3), &device)?;
        let plain = Linear::new(q()?, None, &device)?;
        assert_eq!(plain.forward(&x)?.to_vec2::<f32>()?, [[6., 15.]]);
        let adapted = Linear::new(q()?, Some((a.clone(), b.clone())), &device)?;
        assert_eq!(adapted.forward(&x)?.to_vec2::<f32>()?, [[26., 55.]]);
        // An adapter of another shape is refused, not broadcast.
        assert!(Linear::new(q()?, Some((b, a)), &device).is_err());
        Ok(())
    }

    #[test]
    fn a_spec_that_cannot_be_read_as_written_is_refused() {
        for (features, width, why) in [
            (r#""features": ["mean9"],"#, 4, "reads past layer 8"),
            (r#""features": ["mean0"],"#, 4, "reads past layer 8"),
            (
                r#""features": ["sum3"],"#,
                4,
                "neither mean<layer> nor max<layer>",
            ),
            (r#""features": ["meanx"],"#, 4, "not a layer number"),
            (
                r#""features": ["mean1", "mean2", "max8"],"#,
                4,
                "do not split into 3",
            ),
            (
                r#""features": ["mean1"], "hidden": {"units": 2, "weight_f32le_base64": "AAAAAA==", "bias": [0, 0]},"#,
                4,
                "hidden layer: 1 weights and 2 biases for 4 inputs and 2 units",
            ),
            (
                r#""adapter": {"blk.8.attn_q.lora_a": {"shape": [1, 1], "f32le_base64": "AAAAAA=="}},"#,
                4,
                "adapter blk.8.attn_q.lora_a: not a cut layer's projection",
            ),
            (
                r#""adapter": {"blk.0.token_embd.lora_a": {"shape": [1, 1], "f32le_base64": "AAAAAA=="}},"#,
                4,
                "not a cut layer's projection",
            ),
        ] {
            let err = ProbeSpec::parse(&spec_json(features, width)).expect_err("refused");
            assert!(err.contains(why), "{features}: {err}");
        }
    }

    #[test]
    fn the_built_in_spec_parses() {
        let spec = ProbeSpec::builtin().expect("built-in spec");
        assert_eq!(spec.mean.len() % spec.features.len(), 0);
    }
}
