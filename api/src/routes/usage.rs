//! `GET /v1/usage`: a tenant's consumption and limits.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

pub async fn usage(
    principal: Principal,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let (usage, policy) = tokio::try_join!(
        state.tenants.usage(&principal.tenant),
        state.tenants.policy(&principal.tenant),
    )?;
    Ok(Json(json!({
        "tenant": principal.tenant,
        "usage": usage,
        "limits": policy,
    })))
}
