//! Liveness and readiness.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::openapi::{consts, error_responses};
use crate::state::AppState;

/// The body of `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    #[schema(schema_with = consts::ok)]
    status: &'static str,
}

/// The body of `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    status: ReadyState,
    /// Redis answered.
    redis: bool,
    /// RabbitMQ answered.
    rabbitmq: bool,
    /// Workers with a live heartbeat (`null`: the registry could not be read).
    #[schema(required = true)]
    live_workers: Option<usize>,
}

/// `ready`; `degraded`: Redis and RabbitMQ answer but no worker is live (jobs are accepted and
/// wait); `unavailable`: Redis or RabbitMQ does not answer.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadyState {
    Ready,
    Degraded,
    Unavailable,
}

error_responses!(HealthErrors: Sluice, Anyone, []);

/// The process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "health",
    summary = "Liveness",
    description = "The process is up. No credentials.",
    responses(
        (status = 200, description = "Up.", body = Liveness),
        HealthErrors,
    ),
)]
pub async fn healthz() -> Json<Liveness> {
    Json(Liveness { status: "ok" })
}

/// Redis and RabbitMQ are both reachable (checked now, in parallel, within a second each):
/// 200, else 503 `unavailable`. With both up but no live worker, still 200 (this API can accept
/// jobs; they wait in the queue) with `status: "degraded"`.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "health",
    summary = "Readiness",
    description = "Whether Redis and RabbitMQ answer (checked now, within a second each). \
                   200 `ready`, or `degraded` when both answer but no worker is live (jobs are \
                   accepted and wait in the queue); 503 `unavailable` when either does not \
                   answer. No credentials.",
    responses(
        (status = 200, description = "Ready (`ready` or `degraded`).", body = Readiness),
        (status = 503, description = "Redis or RabbitMQ does not answer (`unavailable`).", body = Readiness),
        HealthErrors,
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
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
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, ReadyState::Unavailable),
        (true, Some(0)) => (StatusCode::OK, ReadyState::Degraded),
        (true, _) => (StatusCode::OK, ReadyState::Ready),
    };
    (
        status,
        Json(Readiness {
            status: word,
            redis,
            rabbitmq,
            live_workers: workers,
        }),
    )
}
