//! Sluice's stateless HTTP tier.
//!
//! - [`settings`]: the one typed settings struct of `sluice-api` (flags + env) and its CLI;
//! - [`startup`]: builds the state, binds the listener, serves until a shutdown signal;
//! - [`auth`]: API keys (created by `sluice-api keys create`, stored hashed in Redis, compared in
//!   constant time) and the [`auth::Principal`] extractor every `/v1` route requires;
//! - [`validate`]: turns a submitted body into a [`validate::ValidatedJob`] that cannot exist
//!   unless every limit holds;
//! - [`routes`]: `/v1/jobs` (submit, poll, cancel), `/healthz`, `/readyz`;
//! - [`error`]: [`error::ApiError`], the one place errors become HTTP responses.
//!
//! A submit flows: auth → validate → write the record (`queued`) to Redis → publish to RabbitMQ
//! and wait for the confirm → 202. If the publish fails the record is deleted and the client
//! gets 503, so nothing is left half-written.

pub mod auth;
pub mod error;
pub mod routes;
pub mod settings;
pub mod startup;
pub mod state;
pub mod validate;

pub use settings::ApiSettings;
pub use startup::Application;
