//! Sluice's spine: how a job moves from the API through the queue to a worker and back.
//!
//! - [`keyspace`]: every Redis key and AMQP name, derived from one namespace so tests and
//!   tenants of a shared broker never collide;
//! - [`redis_pool`]: the Redis pool both binaries use, over one server or a Redis Cluster;
//! - [`store`]: the job record in Redis and its atomic transitions, one Lua script per
//!   transition and hash slot (`store/lua/`), the one piece of code that moves a job through
//!   `queued → running → terminal`, and the reconciler that finishes what a crash between
//!   two slots' steps left half done;
//! - [`cluster_admin`]: which Redis Cluster node serves a key, and a manual failover;
//! - [`amqp`]: connecting, the job topology (quorum queue, dead-letter exchange and queue) and a
//!   confirming publisher that reconnects on its own;
//! - [`workers`]: the worker registry (heartbeats in Redis);
//! - [`session`]: conversation history per tenant and session;
//! - [`calendar`]: the UTC day and month a quota counter belongs to.
//!
//! Data flow: the API admits a record with [`store::JobStore::admit`], publishes with
//! [`amqp::Publisher`] (rolling the admission back if that fails), and reads it back with
//! [`store::JobStore::get`]; the worker consumes the queue declared by
//! [`amqp::declare_topology`], moves the record with [`store::JobStore::start`] and
//! [`store::JobStore::finish`], and only then acks.

pub mod amqp;
pub mod calendar;
pub mod cluster_admin;
pub mod keyspace;
pub mod redis_pool;
pub mod session;
pub mod store;
pub mod workers;

pub use keyspace::Keyspace;
