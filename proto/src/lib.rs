//! The wire contract of Sluice.
//!
//! Everything that crosses a process boundary lives here, and nothing else:
//!
//! - [`job`]: the versioned job message the API publishes to RabbitMQ and the worker consumes
//!   (chat messages, generation parameters, deadline, attempt, trace context);
//! - [`status`]: the job lifecycle (`queued → running → succeeded | failed | cancelled |
//!   expired`) and the result a worker writes back (content, finish reason, usage, timings);
//! - [`error`]: the one stable error-code enum shared by api and worker, with its HTTP mapping in
//!   exactly one place.
//!
//! The crate has no I/O. Changing a type here changes the contract: bump [`JOB_MESSAGE_VERSION`]
//! for anything an older worker could not read. The types that appear in HTTP bodies derive
//! `utoipa::ToSchema`, so the API's OpenAPI document describes them from their definitions.

pub mod error;
pub mod job;
pub mod status;

pub use error::{ErrorBody, ErrorCode};
pub use job::{
    GenerationParams, JOB_MESSAGE_VERSION, JobMessage, JsonSchemaFormat, Message, Priority,
    ResponseFormat, Role, SessionTurn, TraceContext,
};
pub use status::{FinishReason, JobResult, JobStatus, JobView, Timings, Usage};

/// Milliseconds since the Unix epoch, the one time unit on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
