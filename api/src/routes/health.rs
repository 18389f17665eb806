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

/// Redis and RabbitMQ are both reachable (checked now, in parallel, within a second each).
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let limit = Duration::from_secs(1);
    let (redis, rabbitmq) = tokio::join!(
        tokio::time::timeout(limit, state.store.ping()),
        tokio::time::timeout(limit, state.publisher.ready()),
    );
    let redis = redis.unwrap_or(false);
    let rabbitmq = rabbitmq.unwrap_or(false);
    let ready = redis && rabbitmq;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "unavailable" },
            "redis": redis,
            "rabbitmq": rabbitmq,
        })),
    )
}
