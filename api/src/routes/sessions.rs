//! `/v1/sessions`: erasing a conversation's stored history.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::PathParam;
use crate::state::AppState;

/// `DELETE /v1/sessions/{id}` → 204 once the caller's tenant's session is erased (its history
/// and system prompt), 404 if it has none by that id. Another tenant's session of the same id
/// is a different one and is never touched.
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
