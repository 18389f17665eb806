//! Sluice's worker: pulls jobs from RabbitMQ, runs Qwen2.5 with candle, writes results to Redis.
//!
//! - [`settings`]: the one typed settings struct of `sluice-worker` (flags + env) and its CLI;
//! - [`model`]: loading a Qwen2 model (GGUF, safetensors directory, hub id), its chat template
//!   and special-token-safe prompt encoding, and the tiny random test model;
//! - [`generate`]: one job's generation loop (sampling, stop sequences, incremental UTF-8-safe
//!   detokenization, cancellation, deadline);
//! - [`graphs`] (CUDA): decode steps recorded once and replayed as CUDA graphs;
//! - [`qmm`]: the batched 8-bit CPU matmul that makes batched decode cheaper than serial;
//! - `cpu_attention`: single-token attention on the CPU straight out of the paged KV pool;
//! - [`engine`]: the dedicated thread that owns the model, fed by a channel, so model compute
//!   never runs on the async runtime;
//! - [`judge`]: the served model's second opinion on a request in its tenant's classifier grey
//!   band, run before the job generates;
//! - [`consumer`]: the AMQP consumer: decode → start (Redis) → engine → finish (Redis) → ack;
//! - [`stream`]: generated text into the job's Redis stream as it is produced, redacted;
//! - [`bench`]: `sluice-worker bench`, the forward pass measured without broker or Redis;
//! - [`startup`]: wiring, reconnection and graceful shutdown.
//!
//! A delivery is acked only after its terminal state is in Redis, so a worker that dies
//! mid-job leaves the job to be redelivered to another worker.

pub mod bench;
pub mod consumer;
pub(crate) mod cpu_attention;
pub mod engine;
pub mod fused;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod graphs;
pub mod judge;
pub mod kv;
pub mod leak;
pub mod metrics;
pub mod model;
#[cfg(feature = "cuda")]
pub mod paged_attention;
pub mod qmm;
pub mod qwen;
pub mod settings;
pub mod startup;
pub mod stream;

pub use settings::WorkerSettings;
pub use startup::Worker;
