//! `/v1/sessions`: erasing a conversation's stored history.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::extract::PathParam;
use crate::openapi::error_responses;
use crate::principal::Principal;
use crate::state::AppState;

error_responses!(DeleteErrors: Sluice, User, [InvalidParameter, NotFound]);

/// `DELETE /v1/sessions/{id}` → 204 once the caller's tenant's session is erased (its history
/// and system prompt), 404 if it has none by that id. Another tenant's session of the same id
/// is a different one and is never touched.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}",
    operation_id = "delete_session",
    tag = "sessions",
    summary = "Erase a stored conversation",
    description = "Erases the caller's tenant's session (its history and system prompt). \
                   Another tenant's session of the same id is a different one and is never \
                   touched.",
    security(("bearer" = [])),
    params((
        "id" = String,
        Path,
        description = "The session id: 1 to 128 characters of `[A-Za-z0-9._-]`.",
        pattern = "^[A-Za-z0-9._-]{1,128}$",
    )),
    responses(
        (status = 204, description = "Erased."),
        DeleteErrors,
    ),
)]
pub async fn delete(
    principal: Principal,
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    crate::validate::session_id(&id)?;
    if state.sessions.delete(&principal.tenant, &id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::client(
            sluice_proto::ErrorCode::NotFound,
            "no such session",
        ))
    }
}
