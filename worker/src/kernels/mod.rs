//! The compute kernels under the forward pass, each module with its own docs:
//!
//! - [`qmm`]: the batched 8-bit CPU matmul that makes batched decode cheaper than serial;
//! - `cpu_attention`: single-token attention on the CPU straight out of the paged KV pool;
//! - [`fused`]: the small per-layer steps, one CUDA kernel each (`fused.cu`), candle elsewhere;
//! - `paged_attention` (CUDA): decode attention as one kernel per layer (`paged_attention.cu`).
//!
//! The `.cu` sources sit beside their wrappers; `build.rs` compiles them to PTX with the
//! `cuda` feature.

pub(crate) mod cpu_attention;
pub mod fused;
#[cfg(feature = "cuda")]
pub mod paged_attention;
pub mod qmm;
