//! `/admin`: key management, tenant policies and usage. Admin role only (403 otherwise).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_proto::ErrorCode;

use crate::audit::{self, AuditContext};
use crate::auth::{Admin, Role};
use crate::error::ApiError;
use crate::extract::{PathParam, QueryParams};
use crate::state::AppState;
use crate::validate::parse_json;

fn tenant_name(tenant: &str) -> Result<(), ApiError> {
    sluice_shared::settings::parse_namespace(tenant)
        .map(|_| ())
        .map_err(|e| ApiError::client(ErrorCode::InvalidParameter, format!("tenant: {e}")))
}

fn admin_audit(state: &AppState, admin: &Admin, action: &str) {
    let ctx = AuditContext {
        tenant: Some(admin.0.tenant.clone()),
        key_id: Some(admin.0.key_id.clone()),
        ip: None,
    };
    audit::record("admin_action", action, &ctx, state.anonymize_ips);
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    tenant: String,
    #[serde(default = "default_name")]
    name: String,
    #[serde(default = "default_role")]
    role: Role,
    expires_in_secs: Option<u64>,
}

fn default_name() -> String {
    "default".into()
}

fn default_role() -> Role {
    Role::User
}

/// `POST /admin/keys` → 201 with the secret, shown this once.
pub async fn create_key(
    admin: Admin,
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: CreateKey = parse_json(&body)?;
    tenant_name(&req.tenant)?;
    if req.name.is_empty() || req.name.len() > 64 {
        return Err(ApiError::client(
            ErrorCode::InvalidParameter,
            "name must be 1-64 characters",
        ));
    }
    crate::auth::check_key_lifetime(req.expires_in_secs)
        .map_err(|message| ApiError::client(ErrorCode::InvalidParameter, message))?;
    let created = state
        .keys
        .create(&req.tenant, &req.name, req.role, req.expires_in_secs)
        .await?;
    admin_audit(&state, &admin, "key_created");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "key_id": created.key_id,
            "tenant": req.tenant,
            "role": req.role,
            "secret": created.secret,
        })),
    ))
}

#[derive(Debug, Deserialize)]
pub struct TenantQuery {
    tenant: String,
}

/// `GET /admin/keys?tenant=t`.
pub async fn list_keys(
    _admin: Admin,
    State(state): State<AppState>,
    QueryParams(q): QueryParams<TenantQuery>,
) -> Result<Json<Value>, ApiError> {
    tenant_name(&q.tenant)?;
    Ok(Json(json!({ "keys": state.keys.list(&q.tenant).await? })))
}

/// `DELETE /admin/keys/{key_id}`.
pub async fn revoke_key(
    admin: Admin,
    State(state): State<AppState>,
    PathParam(key_id): PathParam,
) -> Result<Json<Value>, ApiError> {
    if !state.keys.revoke(&key_id).await? {
        return Err(ApiError::client(ErrorCode::NotFound, "no such key"));
    }
    admin_audit(&state, &admin, "key_revoked");
    Ok(Json(json!({ "key_id": key_id, "revoked": true })))
}

/// `GET /admin/tenants/{tenant}`: effective policy and usage.
pub async fn tenant(
    _admin: Admin,
    State(state): State<AppState>,
    PathParam(tenant): PathParam,
) -> Result<Json<Value>, ApiError> {
    tenant_name(&tenant)?;
    let (usage, policy) =
        tokio::try_join!(state.tenants.usage(&tenant), state.tenants.policy(&tenant))?;
    Ok(Json(
        json!({ "tenant": tenant, "limits": policy, "usage": usage }),
    ))
}

/// `GET /admin/workers`: the live workers (heartbeat not expired): model, device, capacity,
/// jobs in flight, KV cache use, device memory.
pub async fn workers(
    _admin: Admin,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let workers = state.workers.live().await?;
    Ok(Json(json!({ "workers": workers })))
}

/// `PATCH /admin/tenants/{tenant}/limits`: merges the given fields into the tenant's policy
/// (`null` means unlimited).
pub async fn set_limits(
    admin: Admin,
    State(state): State<AppState>,
    PathParam(tenant): PathParam,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    tenant_name(&tenant)?;
    let changes: Value = parse_json(&body)?;
    let policy = state
        .tenants
        .update(&tenant, &changes)
        .await?
        .map_err(|e| ApiError::client(ErrorCode::InvalidParameter, e))?;
    admin_audit(&state, &admin, "limits_changed");
    Ok(Json(json!({ "tenant": tenant, "limits": policy })))
}
