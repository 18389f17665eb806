//! The worker registry: each worker writes a heartbeat into Redis (what it serves, where, how
//! busy it is); the API lists the live ones (`GET /admin/workers`) and reports "no live
//! workers" on `/readyz`.
//!
//! A heartbeat is a JSON string at [`Keyspace::worker`] that expires after its TTL, plus the
//! worker's id in the [`Keyspace::workers`] set, to find the keys without scanning. A worker that dies stops
//! heartbeating and drops out of the list when its key expires; one that stops cleanly removes
//! itself at once.

use crate::redis_pool::Pool;
use serde::{Deserialize, Serialize};

use crate::keyspace::Keyspace;
use crate::store::StoreError;

/// One worker's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    /// The served model's name.
    pub model: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Jobs it runs at once.
    pub capacity: u32,
    /// Jobs it holds now (running or waiting for KV budget).
    pub in_flight: u32,
    /// Fraction of the KV cache budget in use (0..1).
    pub kv_usage: f64,
    /// Device memory in use and in total (CUDA workers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_total_bytes: Option<u64>,
    /// GPU utilisation (0..1) from NVML (CUDA workers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_utilization: Option<f64>,
    /// Build version of the worker binary.
    pub version: String,
    pub started_at: u64,
    pub last_seen: u64,
}

/// Reads and writes heartbeats.
#[derive(Clone)]
pub struct WorkerRegistry {
    pool: Pool,
    ks: Keyspace,
}

impl WorkerRegistry {
    pub fn new(pool: Pool, ks: Keyspace) -> Self {
        Self { pool, ks }
    }

    /// Writes a heartbeat that lives `ttl_secs`.
    pub async fn heartbeat(&self, info: &WorkerInfo, ttl_secs: u64) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let json = serde_json::to_string(info).map_err(|e| StoreError::Corrupt {
            id: uuid::Uuid::nil(),
            detail: e.to_string(),
        })?;
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.ks.worker(&info.id))
            .arg(json)
            .arg("EX")
            .arg(ttl_secs.max(1))
            .ignore()
            .sadd(self.ks.workers(), &info.id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Removes a worker at once (it is stopping).
    pub async fn remove(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        redis::pipe()
            .atomic()
            .del(self.ks.worker(id))
            .ignore()
            .srem(self.ks.workers(), id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// The live workers (heartbeat not expired), ordered by id. Ids whose heartbeat expired
    /// are pruned from the set on the way.
    pub async fn live(&self) -> Result<Vec<WorkerInfo>, StoreError> {
        let mut conn = self.pool.get().await?;
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.ks.workers())
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.ks.worker(id)).collect();
        let values: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut live = Vec::new();
        let mut gone = Vec::new();
        for (id, value) in ids.iter().zip(values) {
            match value.and_then(|v| serde_json::from_str::<WorkerInfo>(&v).ok()) {
                Some(info) => live.push(info),
                None => gone.push(id.clone()),
            }
        }
        if !gone.is_empty() {
            let _: Result<(), _> = redis::cmd("SREM")
                .arg(self.ks.workers())
                .arg(&gone)
                .query_async(&mut conn)
                .await;
        }
        live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }
}
