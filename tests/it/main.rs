//! Sluice's integration tests, one module per concern, in one test binary (`--test it`), so
//! that candle, axum, lapin, ... are linked once rather than once per file. Run one module with
//! a filter: `cargo test -p sluice-tests --test it spine::` (or `scripts/test --test it spine::`).
//!
//! Every test uses a namespace of its own (`unique_namespace`), so the tests run in parallel
//! against the shared RabbitMQ and Redis; the helpers are in `tests/src/lib.rs`.

mod backpressure;
mod batches;
mod cluster;
mod contract;
mod deploy;
mod faults;
mod idempotency;
mod leak;
mod observability;
mod openai;
mod prefix_cache;
mod priorities;
mod restarts;
mod scaling;
mod security;
mod sessions;
mod soak;
mod spine;
mod streaming;
mod structured;
mod webhooks;

/// The load tests (`faults`, `restarts`, `scaling`, `soak`) used to be binaries of their own,
/// which cargo runs one after another, so no two of them ever competed for the cores (the two
/// tests of `restarts` ran beside each other). In one binary they would all start at once: each
/// holds this lock for its whole run, so they still run one at a time. A `tokio` mutex, so a
/// test that panics while holding it does not poison it for the others. Under cargo-nextest
/// (one process per test) the lock does nothing and the `load` test group of
/// `.config/nextest.toml` runs them one at a time instead.
pub(crate) async fn load_test_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOAD.lock().await
}
