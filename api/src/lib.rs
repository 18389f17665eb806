//! Sluice's stateless HTTP tier.
//!
//! - [`settings`]: the one typed settings struct of `sluice-api` (flags + env) and its CLI;
//! - [`startup`]: builds the state, binds the listener, serves until a shutdown signal;
//! - [`serve`]: the connection loop: header and body read timeouts, a connection cap, drain;
//! - [`auth`]: the [`principal::Principal`] extractor every authenticated route requires, from
//!   an API key ([`keys`]: created by `sluice-api keys create` or `/admin/keys`, stored hashed
//!   in Redis, compared in constant time) or a JWT ([`jwt`]); it also applies the central rate
//!   limits (per key or JWT subject, per client IP from [`client_ip`]);
//! - [`submit`]: the submit path after validation: the input guard (`sluice-guard`), the exact
//!   prompt token count (the served model's tokenizer), the context limit, admission (token
//!   quotas and the active-job cap, one atomic Redis script) and the publish;
//! - [`tenant`]: each tenant's policy (limits, quotas, guard actions), loaded once per request,
//!   and its usage; [`ratelimit`]: the GCRA limits kept in Redis;
//! - [`audit`]: the security audit log (never content);
//! - [`guard_cli`]: `sluice-api guard check`, the guard over JSON lines for operators;
//! - [`validate`]: turns a submitted body into a [`validate::ValidatedJob`] that cannot exist
//!   unless every limit holds;
//! - [`routes`]: `/v1/jobs` (submit, poll, cancel), `/v1/usage`, `/admin/*`, `/healthz`,
//!   `/readyz`, each registered together with its OpenAPI description;
//! - [`openapi`]: the OpenAPI 3.1 document generated from those descriptions, served at
//!   `/openapi.json`;
//! - [`webhooks`]: signed, durable webhooks (Standard Webhooks): endpoints per tenant,
//!   events queued on RabbitMQ, delivered with retries by a consumer in every API process;
//! - [`error`]: [`error::ApiError`], the one place errors become HTTP responses;
//! - [`extract`]: extractors whose rejections are such errors: path and query parameters, and
//!   [`extract::ValidJob`], the opening both submit handlers share (body → wire format →
//!   [`validate::JobRequest`] → [`validate::ValidatedJob`]).
//!
//! A submit flows: auth → rate limits → validate → guard → count tokens → admit (reserve
//! quota, take an active slot, write the record as `queued`) → publish to RabbitMQ and wait
//! for the confirm → 202. Every rejection comes before admission; if the publish fails the
//! admission is rolled back and the client gets 503, so nothing is left half-written.

pub mod audit;
pub mod auth;
pub mod batches;
pub mod client_ip;
pub mod error;
pub mod extract;
pub mod files;
pub mod guard_cli;
pub mod jwt;
pub mod keys;
pub mod metrics;
pub mod openapi;
pub mod principal;
pub mod ratelimit;
pub mod reconciler;
pub mod routes;
pub mod serve;
pub mod settings;
pub mod startup;
pub mod state;
pub mod stream_conns;
pub mod submit;
pub mod tenant;
pub mod validate;
pub mod webhooks;
pub mod wire;

pub use settings::ApiSettings;
pub use startup::Application;
