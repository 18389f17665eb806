//! Sluice's worker: pulls jobs from RabbitMQ, runs Qwen2.5 with candle, writes results to Redis.
//!
//! By layer, each a module with its own docs:
//!
//! - [`intake`]: how jobs arrive and leave: the AMQP session and the interactive/batch intake
//!   policy, the consumer (decode → start (Redis) → engine → finish (Redis) → ack) and the
//!   redacted output stream into Redis;
//! - [`engine`]: the dedicated thread that owns the model and runs every job in one continuous
//!   batch (admission against the KV budget, sequences, the leak check, the judge), so model
//!   compute never runs on the async runtime;
//! - [`model`]: loading a model (GGUF, safetensors directory, hub id) apart from its forward
//!   pass (`model::qwen`), and the tiny random test model;
//! - [`kernels`]: CPU SIMD and CUDA kernels (`.cu` beside their wrappers);
//! - [`device`]: `--device cpu | cuda:N` and opening it;
//! - [`settings`]: the one typed settings struct of `sluice-worker` (flags + env) and its CLI;
//! - [`startup`]: wiring, reconnection with backoff, heartbeats and graceful shutdown;
//! - [`bench`]: `sluice-worker bench`, the forward pass measured without broker or Redis;
//! - [`serve_bench`]: `sluice-worker serve-bench`, streaming clients through the real engine
//!   loop (the engine-level serving benchmark, for machines with nothing but the binary);
//! - [`metrics`]: the worker's Prometheus metrics.
//!
//! A delivery is acked only after its terminal state is in Redis, so a worker that dies
//! mid-job leaves the job to be redelivered to another worker.

pub mod bench;
pub mod device;
pub mod engine;
pub mod intake;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod serve_bench;
pub mod settings;
pub mod startup;

pub use settings::WorkerSettings;
pub use startup::Worker;
