//! `GET /v1/usage`: a tenant's consumption and limits.

use crate::tenant::{TenantPolicy, TenantUsage};
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::openapi::{error_responses, schemas};
use crate::principal::Principal;
use crate::state::AppState;

/// The body of `GET /v1/usage`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    tenant: String,
    #[schema(value_type = schemas::TenantUsage)]
    usage: TenantUsage,
    #[schema(value_type = schemas::TenantPolicy)]
    limits: TenantPolicy,
}

error_responses!(UsageErrors: Sluice, User, []);

#[utoipa::path(
    get,
    path = "/v1/usage",
    operation_id = "get_usage",
    tag = "usage",
    summary = "The caller's tenant's usage and limits",
    description = "Tokens used today and this month, active jobs, and the tenant's effective \
                   limits.",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Usage and limits.", body = UsageReport),
        UsageErrors,
    ),
)]
pub async fn usage(
    principal: Principal,
    State(state): State<AppState>,
) -> Result<Json<UsageReport>, ApiError> {
    let (usage, policy) = tokio::try_join!(
        state.tenants.usage(&principal.tenant),
        state.tenants.policy(&principal.tenant),
    )?;
    Ok(Json(UsageReport {
        tenant: principal.tenant,
        usage,
        limits: policy,
    }))
}
