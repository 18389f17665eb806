//! The Redis connection pool, with timeouts so an outage answers fast instead of hanging.

use std::time::Duration;

use deadpool_redis::{Config, Pool, PoolConfig, Runtime, Timeouts};

use crate::settings::Secret;

/// Builds a pool. No connection is made until the first `get`, so a process starts (and reports
/// not-ready) while Redis is down.
pub fn create_pool(url: &Secret, max_size: usize) -> Result<Pool, deadpool_redis::CreatePoolError> {
    let mut config = Config::from_url(url.expose());
    config.pool = Some(PoolConfig {
        max_size,
        timeouts: Timeouts {
            wait: Some(Duration::from_secs(2)),
            create: Some(Duration::from_secs(2)),
            recycle: Some(Duration::from_secs(2)),
        },
        ..PoolConfig::default()
    });
    config.create_pool(Some(Runtime::Tokio1))
}
