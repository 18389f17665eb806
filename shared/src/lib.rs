//! What the Sluice API and worker share.
//!
//! - [`settings`]: the connection settings both binaries take (Redis, RabbitMQ, namespace), and
//!   [`settings::Secret`] so URLs with passwords never print;
//! - [`keyspace`]: every Redis key and AMQP name, derived from one namespace so tests and tenants
//!   of a shared broker never collide;
//! - [`chat`]: tokenizer + chat template ([`chat::ChatCodec`]), shared so the API counts tokens
//!   exactly as the worker will;
//! - [`amqp`]: connecting, the job topology (quorum queue, dead-letter exchange and queue) and a
//!   confirming publisher that reconnects on its own;
//! - [`store`]: the job record in Redis and its atomic state transitions (Lua scripts), the one
//!   piece of code that moves a job through `queued → running → terminal`;
//! - [`structured`]: structured output (JSON Schema → token grammar, and the final check);
//! - [`session`]: conversation history per tenant and session;
//! - [`telemetry`]: tracing set-up, text or JSON logs and OpenTelemetry export;
//! - [`metrics`]: Prometheus registries and the `/metrics` listener;
//! - [`workers`]: the worker registry (heartbeats in Redis).
//!
//! Data flow: the API writes a record with [`store::JobStore::create`], publishes with
//! [`amqp::Publisher`], and reads it back with [`store::JobStore::get`]; the worker consumes the
//! queue declared by [`amqp::declare_topology`], moves the record with
//! [`store::JobStore::start`] and [`store::JobStore::finish`], and only then acks.

pub mod amqp;
pub mod chat;
pub mod keyspace;
pub mod metrics;
pub mod ratelimit;
pub mod redis_pool;
pub mod session;
pub mod settings;
pub mod store;
pub mod structured;
pub mod telemetry;
pub mod tenant;
pub mod workers;

pub use keyspace::Keyspace;
pub use settings::{CommonSettings, Secret};
