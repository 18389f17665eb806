//! The HTTP routes: one file per resource.

pub mod health;
pub mod jobs;

use axum::Router;
use axum::routing::get;
use sluice_proto::ErrorCode;

use crate::error::ApiError;
use crate::state::AppState;

/// The whole router. Every route but `/healthz` and `/readyz` requires a key (the
/// [`crate::auth::Principal`] extractor in each handler).
pub fn router(state: AppState, body_limit_bytes: usize) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/v1/jobs", axum::routing::post(jobs::submit))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit_bytes))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::client(ErrorCode::NotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::client(
        ErrorCode::MethodNotAllowed,
        "this route does not take that method",
    )
}
