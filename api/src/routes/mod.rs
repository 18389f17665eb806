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
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                framing(request, next, body_limit_bytes)
            },
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .with_state(state)
}

/// Refuses, before any handler reads a byte of the body: a declared `Content-Length` over the
/// body limit (413 at once, rather than after reading up to the limit) and a body that says it
/// is not JSON (415; every body Sluice takes is JSON, and a missing `Content-Type` is read as
/// JSON).
async fn framing(
    request: axum::extract::Request,
    next: axum::middleware::Next,
    body_limit_bytes: usize,
) -> axum::response::Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    use axum::response::IntoResponse;
    let headers = request.headers();
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > body_limit_bytes as u64) {
        return ApiError::client(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than the limit ({body_limit_bytes} bytes)"),
        )
        .into_response();
    }
    let has_body = declared.is_some_and(|n| n > 0) || headers.contains_key("transfer-encoding");
    if has_body
        && let Some(kind) = headers.get(CONTENT_TYPE)
        && !is_json(kind.to_str().unwrap_or(""))
    {
        return ApiError::client(
            ErrorCode::UnsupportedMediaType,
            "the body must be JSON: send Content-Type: application/json",
        )
        .into_response();
    }
    next.run(request).await
}

/// `application/json`, or any `+json` type, with or without parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
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

#[cfg(test)]
mod tests {
    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(super::is_json(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
            "application/jsonx",
            "multipart/form-data",
        ] {
            assert!(!super::is_json(bad), "{bad}");
        }
    }
}
