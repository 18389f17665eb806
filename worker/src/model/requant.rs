//! Re-quantising Q5_0/Q5_1 GGUF tensors to Q8_0 on CPU: one tensor at a time as the worker
//! loads ([`q5_tensor_to_q8`]), or a whole rewritten file for the benchmarks' reference,
//! candle-transformers' `quantized_qwen2` ([`q5_to_q8`]), so that it is measured with SIMD
//! kernels rather than the scalar Q5 fallback.
//!
//! candle 0.11 has no SIMD CPU kernel for Q5_0/Q5_1, which is most of the Qwen2.5 Q4_K_M files
//! (llama.cpp's Q4_K_M mixes in Q5_0), and its scalar fallback is several times slower than
//! the AVX2 Q8_0 kernel. Q8_0 holds every Q5 value with more precision than Q5 itself had, so
//! the conversion loses nothing but memory (8.5 instead of 5.5 bits per weight for those
//! tensors). GPUs have Q5 kernels and skip this.

use std::io::{Read, Seek};

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

use super::ModelError;

fn is_q5(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// A Q5 tensor (whose rows hold whole Q8_0 blocks) as Q8_0; any other tensor unchanged.
pub fn q5_tensor_to_q8(tensor: QTensor) -> candle_core::Result<QTensor> {
    let fits_q8 = tensor
        .shape()
        .dims()
        .last()
        .is_some_and(|d| d % GgmlDType::Q8_0.block_size() == 0);
    if is_q5(tensor.dtype()) && fits_q8 {
        QTensor::quantize(&tensor.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)
    } else {
        Ok(tensor)
    }
}

/// A rewritten GGUF file (in memory) with every Q5 tensor as Q8_0, or `None` if the file has
/// no Q5 tensor.
pub fn q5_to_q8<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
) -> Result<Option<Vec<u8>>, ModelError> {
    if !content.tensor_infos.values().any(|t| is_q5(t.ggml_dtype)) {
        return Ok(None);
    }
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let tensor = q5_tensor_to_q8(content.tensor(reader, name, &Device::Cpu)?)?;
        tensors.push((name.as_str(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &refs)?;
    Ok(Some(out.into_inner()))
}
