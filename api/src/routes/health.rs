//! Liveness and readiness.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::state::AppState;

/// The process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Redis and RabbitMQ are both reachable (checked now, in parallel, within a second each):
/// 200, else 503 `unavailable`. With both up but no live worker, still 200 (this API can accept
/// jobs; they wait in the queue) with `status: "degraded"`.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let limit = Duration::from_secs(1);
    let (redis, rabbitmq, workers) = tokio::join!(
        tokio::time::timeout(limit, state.store.ping()),
        tokio::time::timeout(limit, state.publisher.ready()),
        tokio::time::timeout(limit, state.workers.live()),
    );
    let redis = redis.unwrap_or(false);
    let rabbitmq = rabbitmq.unwrap_or(false);
    let workers = workers.ok().and_then(Result::ok).map(|w| w.len());
    let ready = redis && rabbitmq;
    let (status, word) = match (ready, workers) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (true, Some(0)) => (StatusCode::OK, "degraded"),
        (true, _) => (StatusCode::OK, "ready"),
    };
    (
        status,
        Json(json!({
            "status": word,
            "redis": redis,
            "rabbitmq": rabbitmq,
            "live_workers": workers,
        })),
    )
}
