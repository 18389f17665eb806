//! Process plumbing both Sluice binaries share.
//!
//! - [`settings`]: the connection settings both binaries take (Redis, RabbitMQ, namespace,
//!   the `max_tokens` limit and result TTL), and [`settings::Secret`] so URLs with passwords
//!   never print;
//! - [`telemetry`]: tracing set-up, text or JSON logs (PII redacted by `sluice-guard`) and
//!   OpenTelemetry export, and the trace
//!   context that crosses the queue;
//! - [`metrics`]: Prometheus registries and the `/metrics` listener.
//!
//! The job itself (record, transitions, topology) is in `sluice-jobs`; what is put in front of
//! the model (chat template, canary, structured output) is in `sluice-prompt`.

pub mod metrics;
pub mod settings;
pub mod telemetry;

pub use settings::{CommonSettings, Secret};
