//! The HTTP routes: one file per resource. Every route but `/healthz` and `/readyz` requires
//! credentials; `/admin` requires the admin role.

pub mod admin;
pub mod events;
pub mod health;
pub mod jobs;
pub mod openai;
pub mod sessions;
pub mod usage;

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
        .route("/v1/jobs/{id}/events", get(events::events))
        .route("/v1/usage", get(usage::usage))
        .route(
            "/v1/chat/completions",
            axum::routing::post(openai::chat_completions),
        )
        .route("/v1/models", get(openai::models))
        .route("/v1/sessions/{id}", axum::routing::delete(sessions::delete))
        .route("/admin/keys", get(admin::list_keys).post(admin::create_key))
        .route(
            "/admin/keys/{key_id}",
            axum::routing::delete(admin::revoke_key),
        )
        .route("/admin/tenants/{tenant}", get(admin::tenant))
        .route("/admin/workers", get(admin::workers))
        .route(
            "/admin/tenants/{tenant}/limits",
            axum::routing::patch(admin::set_limits),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
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
