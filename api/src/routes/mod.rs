//! The HTTP routes: one file per resource. Every route but `/healthz`, `/readyz` and
//! `/openapi.json` requires credentials; `/admin` requires the admin role.
//!
//! Each handler carries its OpenAPI description (`#[utoipa::path]`) and is registered with
//! `routes!`, which adds it to the router and to the document ([`crate::openapi`]) at once:
//! [`api`] is the one list of routes.

pub mod admin;
pub mod batches;
pub mod events;
pub mod files;
pub mod health;
pub mod jobs;
pub mod openai;
pub mod sessions;
pub mod usage;
pub mod webhooks;

use axum::Router;
use sluice_proto::ErrorCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;

/// Every route with its description. Register routes here, with `routes!`, and nowhere else:
/// a route registered with plain axum would be served but missing from the document (the
/// tests look for one).
pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(crate::openapi::base())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(crate::openapi::document))
        .routes(routes!(jobs::submit))
        .routes(routes!(jobs::get, jobs::cancel))
        .routes(routes!(events::events))
        .routes(routes!(usage::usage))
        .routes(routes!(openai::chat_completions))
        .routes(routes!(openai::models))
        .routes(routes!(sessions::delete))
        .routes(routes!(files::upload, files::list))
        .routes(routes!(files::get, files::delete))
        .routes(routes!(files::content))
        .routes(routes!(batches::create, batches::list))
        .routes(routes!(batches::get))
        .routes(routes!(batches::cancel))
        .routes(routes!(admin::list_keys, admin::create_key))
        .routes(routes!(admin::revoke_key))
        .routes(routes!(admin::tenant))
        .routes(routes!(admin::workers))
        .routes(routes!(admin::set_limits))
        .routes(routes!(webhooks::list, webhooks::create))
        .routes(routes!(webhooks::delete))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(webhooks::test_event))
}

/// The whole router. Every route but `/healthz`, `/readyz` and `/openapi.json` requires a key
/// (the [`crate::principal::Principal`] extractor in each handler).
pub fn router(state: AppState, body_limit_bytes: usize) -> Router {
    let (routes, _) = api().split_for_parts();
    routes
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

/// The upload route, whose body is multipart and larger than the body limit.
pub const FILES_PATH: &str = "/v1/files";

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
    // An upload is multipart and as large as `--files-max-bytes`: its route reads and bounds
    // it itself (other methods on the path never read a body).
    if request.uri().path() == FILES_PATH {
        return next.run(request).await;
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > body_limit_bytes as u64) {
        return closing(
            ApiError::client(
                ErrorCode::PayloadTooLarge,
                format!("the request body is larger than the limit ({body_limit_bytes} bytes)"),
            )
            .into_response(),
        );
    }
    let has_body = declared.is_some_and(|n| n > 0) || headers.contains_key("transfer-encoding");
    if has_body
        && let Some(kind) = headers.get(CONTENT_TYPE)
        && !is_json(kind.to_str().unwrap_or(""))
    {
        return closing(
            ApiError::client(
                ErrorCode::UnsupportedMediaType,
                "the body must be JSON: send Content-Type: application/json",
            )
            .into_response(),
        );
    }
    let response = next.run(request).await;
    if response.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        // The body was cut off at the limit, so the rest of it is still unread.
        return closing(response);
    }
    response
}

/// Marks an answer given without reading the whole request body `Connection: close`: the
/// server closes the connection after it (the unread rest cannot be told from a next request),
/// and a client that pooled the connection would otherwise send its next request into the
/// closing socket and see it fail.
fn closing(mut response: axum::response::Response) -> axum::response::Response {
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
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
