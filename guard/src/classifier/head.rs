//! The classifier head, trained by `guard/train/train.py` and checked in as
//! `guard/model/head.json`: a small MLP (ReLU between layers, one logit out) over the
//! encoder's embedding of each window, plus, when present, a linear model over the whole
//! text's hashed character n-grams ([`super::ngrams`]). A text's logit is the MLP's maximum
//! over its windows plus the lexical logit.
//!
//! The trainer shifts the last bias so that a score of 0.5 is the operating point it chose on
//! the validation split (at most 1 % false positives), so the tenant policy's classifier
//! threshold defaults to 0.5 whatever the head.

use serde::Deserialize;
use sha2::Digest as _;

use super::ClassifierError;

/// The head built into the binary.
pub const BUILTIN_HEAD: &str = include_str!("../../model/head.json");
/// The encoder's fine-tuned low-rank adapters, built into the binary (see
/// [`super::encoder::Encoder::load_adapted`]).
pub const BUILTIN_ADAPTER: &[u8] = include_bytes!("../../model/adapter.safetensors");
/// The tokens of the adapter's extended vocabulary, one per line, in id order.
pub const BUILTIN_VOCABULARY: &str = include_str!("../../model/vocab-extra.txt");

#[derive(Debug, Clone, Deserialize)]
struct Layer {
    /// `[out][in]`.
    weight: Vec<Vec<f32>>,
    bias: Vec<f32>,
}

#[derive(Debug, Clone, Deserialize)]
struct LexicalFile {
    buckets: usize,
    /// `buckets` little-endian f32 weights, base64.
    weights_f32le_base64: String,
}

#[derive(Debug, Clone, Deserialize)]
struct HeadFile {
    /// SHA-256 of the encoder weights the head was trained on.
    encoder_sha256: String,
    /// SHA-256 of the adapter trained with it, when there is one.
    #[serde(default)]
    adapter_sha256: Option<String>,
    layers: Vec<Layer>,
    #[serde(default)]
    lexical: Option<LexicalFile>,
}

/// A loaded head.
#[derive(Debug, Clone)]
pub struct Head {
    layers: Vec<Layer>,
    /// Weights of the n-gram buckets, when the head has a lexical part.
    lexical: Option<Vec<f32>>,
    /// SHA-256 of the encoder weights the head expects.
    pub encoder_sha256: String,
    /// SHA-256 of the adapter the head was trained with, when there is one.
    pub adapter_sha256: Option<String>,
}

impl Head {
    /// Parses a head file and checks its shapes: each layer's input is the previous one's
    /// output, the first takes `input` values, the last gives one logit.
    pub fn parse(source: &str, input: usize) -> Result<Self, String> {
        let file: HeadFile = serde_json::from_str(source).map_err(|e| e.to_string())?;
        let mut width = input;
        if file.layers.is_empty() {
            return Err("no layers".into());
        }
        for (n, layer) in file.layers.iter().enumerate() {
            if layer.weight.len() != layer.bias.len() || layer.weight.is_empty() {
                return Err(format!("layer {n}: weight rows and bias differ in length"));
            }
            if let Some(row) = layer.weight.iter().find(|r| r.len() != width) {
                return Err(format!(
                    "layer {n}: a row has {} inputs, expected {width}",
                    row.len()
                ));
            }
            width = layer.bias.len();
        }
        if width != 1 {
            return Err(format!("the last layer has {width} outputs, expected 1"));
        }
        let lexical = match file.lexical {
            None => None,
            Some(l) => {
                if l.buckets != super::ngrams::BUCKETS {
                    return Err(format!(
                        "lexical: {} buckets, this build hashes into {}",
                        l.buckets,
                        super::ngrams::BUCKETS
                    ));
                }
                let weights = super::f32le_base64(&l.weights_f32le_base64)
                    .map_err(|e| format!("lexical: {e}"))?;
                if weights.len() != l.buckets {
                    return Err(format!(
                        "lexical: {} bytes of weights, expected {}",
                        weights.len() * 4,
                        l.buckets * 4
                    ));
                }
                Some(weights)
            }
        };
        Ok(Self {
            layers: file.layers,
            lexical,
            encoder_sha256: file.encoder_sha256,
            adapter_sha256: file.adapter_sha256,
        })
    }

    /// The built-in head for an encoder of `input` dimensions, checked against the built-in
    /// adapter it was trained with.
    pub fn builtin(input: usize) -> Result<Self, ClassifierError> {
        let corrupt = |detail| ClassifierError::Corrupt {
            path: "guard/model/head.json (built in)".into(),
            detail,
        };
        let head = Self::parse(BUILTIN_HEAD, input).map_err(corrupt)?;
        let adapter = hex::encode(sha2::Sha256::digest(BUILTIN_ADAPTER));
        if head.adapter_sha256.as_deref() != Some(adapter.as_str()) {
            return Err(corrupt(format!(
                "trained with adapter {:?}, but the built-in adapter is {adapter}",
                head.adapter_sha256
            )));
        }
        Ok(head)
    }

    /// The probability (0..=1) that a text is an injection, from its windows' logits
    /// ([`Head::logit`]) and its text.
    pub fn score(&self, window_logits: &[f32], text: &str) -> f32 {
        sigmoid(self.text_logit(window_logits, text))
    }

    /// A text's logit: the maximum of its windows' logits plus the lexical logit.
    pub fn text_logit(&self, window_logits: &[f32], text: &str) -> f32 {
        let encoder = window_logits
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let lexical = self
            .lexical
            .as_ref()
            .map_or(0.0, |w| super::ngrams::logit(w, text));
        encoder + lexical
    }

    /// The MLP's logit for one window's embedding.
    pub fn logit(&self, embedding: &[f32]) -> f32 {
        let mut x: Vec<f32> = embedding.to_vec();
        let last = self.layers.len() - 1;
        for (n, layer) in self.layers.iter().enumerate() {
            x = layer
                .weight
                .iter()
                .zip(&layer.bias)
                .map(|(row, b)| {
                    let v = row.iter().zip(&x).map(|(w, v)| w * v).sum::<f32>() + b;
                    if n == last { v } else { v.max(0.0) }
                })
                .collect();
        }
        x[0]
    }
}

/// A logit's probability.
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn a_two_layer_head_computes_relu_then_sigmoid() {
        let source = r#"{"encoder_sha256": "x", "layers": [
            {"weight": [[1.0, 0.0], [0.0, -1.0]], "bias": [0.0, 0.0]},
            {"weight": [[2.0, 3.0]], "bias": [-1.0]}
        ]}"#;
        let head = Head::parse(source, 2).expect("parse");
        // relu([0.5, -0.25]) = [0.5, 0]; 2*0.5 + 0 - 1 = 0
        assert!(head.logit(&[0.5, 0.25]).abs() < 1e-6);
        // relu([1, 1]) = [1, 1]; 2 + 3 - 1 = 4
        assert!((head.logit(&[1.0, -1.0]) - 4.0).abs() < 1e-6);
        // The maximum over windows; no lexical part.
        let expected = 1.0 / (1.0 + (-4.0f32).exp());
        assert!((head.score(&[0.0, 4.0, -2.0], "any text") - expected).abs() < 1e-6);
    }

    #[test]
    fn shapes_are_checked() {
        let wrong_input =
            r#"{"encoder_sha256": "x", "layers": [{"weight": [[1.0]], "bias": [0.0]}]}"#;
        assert!(Head::parse(wrong_input, 2).is_err());
        let two_outputs = r#"{"encoder_sha256": "x", "layers": [{"weight": [[1.0], [1.0]], "bias": [0.0, 0.0]}]}"#;
        assert!(Head::parse(two_outputs, 1).is_err());
        assert!(Head::parse("not json", 1).is_err());
    }

    #[test]
    fn a_lexical_part_adds_the_text_bucket_weights() {
        let buckets = crate::classifier::ngrams::BUCKETS;
        let mut weights = vec![0.0f32; buckets];
        for b in crate::classifier::ngrams::buckets("ab") {
            weights[b as usize] = 1.0;
        }
        let raw: Vec<u8> = weights.iter().flat_map(|w| w.to_le_bytes()).collect();
        let source = serde_json::json!({
            "encoder_sha256": "x",
            "layers": [{"weight": [[0.0]], "bias": [0.0]}],
            "lexical": {
                "buckets": buckets,
                "weights_f32le_base64": base64::engine::general_purpose::STANDARD.encode(raw),
            }
        });
        let head = Head::parse(&source.to_string(), 1).expect("parse");
        // " ab " has 3 + 2 + 1 = 6 n-grams, all weighted 1: 6 / sqrt(6).
        let z = 6.0f32.sqrt();
        let expected = 1.0 / (1.0 + (-z).exp());
        assert!((head.score(&[0.0], "ab") - expected).abs() < 1e-5);
        assert!((head.score(&[0.0], "") - 0.5).abs() < 1e-6);
        let short = serde_json::json!({
            "encoder_sha256": "x",
            "layers": [{"weight": [[0.0]], "bias": [0.0]}],
            "lexical": {"buckets": buckets, "weights_f32le_base64": "AAAA"}
        });
        assert!(Head::parse(&short.to_string(), 1).is_err());
    }

    #[test]
    fn the_builtin_head_fits_a_384_wide_encoder() {
        Head::builtin(384).expect("guard/model/head.json");
    }
}
