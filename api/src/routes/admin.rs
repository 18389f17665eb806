//! `/admin`: key management, tenant policies and usage. Admin role only (403 otherwise).

use crate::tenant::{TenantPolicy, TenantUsage};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_jobs::workers::WorkerInfo;
use sluice_proto::ErrorCode;
use utoipa::ToSchema;

use crate::audit::{self, AuditContext};
use crate::error::ApiError;
use crate::extract::{PathParam, QueryParams};
use crate::keys::KeyInfo;
use crate::openapi::{consts, error_responses, schemas};
use crate::principal::{Admin, Role};
use crate::state::AppState;
use crate::validate::{body_bytes, parse_json};

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

/// The body of `POST /admin/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    /// The tenant the key acts for: 1 to 64 characters of `[A-Za-z0-9_-]`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    tenant: String,
    /// A label: 1 to 64 bytes; default `default`.
    #[serde(default = "default_name")]
    #[schema(min_length = 1, max_length = 64)]
    name: String,
    /// Default `user`.
    #[serde(default = "default_role")]
    role: Role,
    /// The key's lifetime: 1 to 315360000 seconds (ten years); none by default.
    #[schema(minimum = 1, maximum = 315_360_000)]
    expires_in_secs: Option<u64>,
}

/// A created key, with its secret (shown this once).
#[derive(Debug, Serialize, ToSchema)]
pub struct NewKey {
    key_id: String,
    tenant: String,
    role: Role,
    /// The bearer token: `sk-<key id>_<secret>`. It is never shown again.
    secret: String,
}

/// A tenant's keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    keys: Vec<KeyInfo>,
}

/// A revoked key.
#[derive(Debug, Serialize, ToSchema)]
pub struct RevokedKey {
    key_id: String,
    /// Always `true`.
    #[schema(schema_with = consts::true_value)]
    revoked: bool,
}

/// A tenant's effective policy and usage.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantReport {
    tenant: String,
    #[schema(value_type = schemas::TenantPolicy)]
    limits: TenantPolicy,
    #[schema(value_type = schemas::TenantUsage)]
    usage: TenantUsage,
}

/// A tenant's policy after a change.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantLimits {
    tenant: String,
    #[schema(value_type = schemas::TenantPolicy)]
    limits: TenantPolicy,
}

/// The live workers.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerList {
    #[schema(value_type = Vec<schemas::WorkerInfo>)]
    workers: Vec<WorkerInfo>,
}

fn default_name() -> String {
    "default".into()
}

fn default_role() -> Role {
    Role::User
}

error_responses!(
    CreateKeyErrors: Sluice,
    Admin,
    [InvalidJson, InvalidRequest, InvalidParameter]
);

/// `POST /admin/keys` → 201 with the secret, shown this once.
#[utoipa::path(
    post,
    path = "/admin/keys",
    operation_id = "create_key",
    tag = "admin",
    summary = "Create an API key",
    description = "Creates a key for a tenant; the answer holds its secret, shown this once.",
    security(("bearer" = ["admin"])),
    request_body(content = CreateKey, content_type = "application/json"),
    responses(
        (status = 201, description = "Created.", body = NewKey),
        CreateKeyErrors,
    ),
)]
pub async fn create_key(
    admin: Admin,
    State(state): State<AppState>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    let req: CreateKey = parse_json(&body_bytes(body)?)?;
    tenant_name(&req.tenant)?;
    if req.name.is_empty() || req.name.len() > 64 {
        return Err(ApiError::client(
            ErrorCode::InvalidParameter,
            "name must be 1-64 characters",
        ));
    }
    crate::keys::check_key_lifetime(req.expires_in_secs)
        .map_err(|message| ApiError::client(ErrorCode::InvalidParameter, message))?;
    let created = state
        .keys
        .create(&req.tenant, &req.name, req.role, req.expires_in_secs)
        .await?;
    admin_audit(&state, &admin, "key_created");
    Ok((
        StatusCode::CREATED,
        Json(NewKey {
            key_id: created.key_id,
            tenant: req.tenant,
            role: req.role,
            secret: created.secret,
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TenantQuery {
    /// The tenant: 1 to 64 characters of `[A-Za-z0-9_-]`.
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    tenant: String,
}

error_responses!(ListKeysErrors: Sluice, Admin, [InvalidParameter]);

/// `GET /admin/keys?tenant=t`.
#[utoipa::path(
    get,
    path = "/admin/keys",
    operation_id = "list_keys",
    tag = "admin",
    summary = "A tenant's API keys",
    description = "A tenant's keys, oldest first, never their secrets.",
    security(("bearer" = ["admin"])),
    params(TenantQuery),
    responses(
        (status = 200, description = "The keys.", body = KeyList),
        ListKeysErrors,
    ),
)]
pub async fn list_keys(
    _admin: Admin,
    State(state): State<AppState>,
    QueryParams(q): QueryParams<TenantQuery>,
) -> Result<Json<KeyList>, ApiError> {
    tenant_name(&q.tenant)?;
    Ok(Json(KeyList {
        keys: state.keys.list(&q.tenant).await?,
    }))
}

error_responses!(RevokeKeyErrors: Sluice, Admin, [InvalidParameter, NotFound]);

/// `DELETE /admin/keys/{key_id}`.
#[utoipa::path(
    delete,
    path = "/admin/keys/{key_id}",
    operation_id = "revoke_key",
    tag = "admin",
    summary = "Revoke an API key",
    description = "Revokes a key on every replica at once.",
    security(("bearer" = ["admin"])),
    params(("key_id" = String, Path, description = "The key's id (the part between `sk-` and `_`).")),
    responses(
        (status = 200, description = "Revoked.", body = RevokedKey),
        RevokeKeyErrors,
    ),
)]
pub async fn revoke_key(
    admin: Admin,
    State(state): State<AppState>,
    PathParam(key_id): PathParam,
) -> Result<Json<RevokedKey>, ApiError> {
    if !state.keys.revoke(&key_id).await? {
        return Err(ApiError::client(ErrorCode::NotFound, "no such key"));
    }
    admin_audit(&state, &admin, "key_revoked");
    Ok(Json(RevokedKey {
        key_id,
        revoked: true,
    }))
}

error_responses!(TenantErrors: Sluice, Admin, [InvalidParameter, NotFound]);

/// `GET /admin/tenants/{tenant}`: effective policy and usage.
#[utoipa::path(
    get,
    path = "/admin/tenants/{tenant}",
    operation_id = "get_tenant",
    tag = "admin",
    summary = "A tenant's limits and usage",
    description = "The tenant's effective limits (defaults with its overrides) and usage.",
    security(("bearer" = ["admin"])),
    params(("tenant" = String, Path, description = "The tenant.", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "Limits and usage.", body = TenantReport),
        TenantErrors,
    ),
)]
pub async fn tenant(
    _admin: Admin,
    State(state): State<AppState>,
    PathParam(tenant): PathParam,
) -> Result<Json<TenantReport>, ApiError> {
    tenant_name(&tenant)?;
    let (usage, policy) =
        tokio::try_join!(state.tenants.usage(&tenant), state.tenants.policy(&tenant))?;
    Ok(Json(TenantReport {
        tenant,
        limits: policy,
        usage,
    }))
}

error_responses!(WorkersErrors: Sluice, Admin, []);

/// `GET /admin/workers`: the live workers (heartbeat not expired): model, device, capacity,
/// jobs in flight, KV cache use, device memory.
#[utoipa::path(
    get,
    path = "/admin/workers",
    operation_id = "list_workers",
    tag = "admin",
    summary = "The live workers",
    description = "The workers whose heartbeat has not expired: model, device, capacity, jobs \
                   in flight, KV cache use, GPU memory on CUDA workers.",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The workers.", body = WorkerList),
        WorkersErrors,
    ),
)]
pub async fn workers(
    _admin: Admin,
    State(state): State<AppState>,
) -> Result<Json<WorkerList>, ApiError> {
    let workers = state.workers.live().await?;
    Ok(Json(WorkerList { workers }))
}

error_responses!(
    SetLimitsErrors: Sluice,
    Admin,
    [InvalidJson, InvalidRequest, InvalidParameter, NotFound]
);

/// `PATCH /admin/tenants/{tenant}/limits`: merges the given fields into the tenant's policy
/// (`null` means unlimited).
#[utoipa::path(
    patch,
    path = "/admin/tenants/{tenant}/limits",
    operation_id = "update_tenant_limits",
    tag = "admin",
    summary = "Change a tenant's limits",
    description = "Merges the given fields into the tenant's stored overrides and answers \
                   with the new effective policy.",
    security(("bearer" = ["admin"])),
    params(("tenant" = String, Path, description = "The tenant.", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body(content = schemas::TenantPolicyPatch, content_type = "application/json"),
    responses(
        (status = 200, description = "The new policy.", body = TenantLimits),
        SetLimitsErrors,
    ),
)]
pub async fn set_limits(
    admin: Admin,
    State(state): State<AppState>,
    PathParam(tenant): PathParam,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<TenantLimits>, ApiError> {
    tenant_name(&tenant)?;
    let changes: Value = parse_json(&body_bytes(body)?)?;
    let policy = state
        .tenants
        .update(&tenant, &changes)
        .await?
        .map_err(|e| ApiError::client(ErrorCode::InvalidParameter, e))?;
    admin_audit(&state, &admin, "limits_changed");
    Ok(Json(TenantLimits {
        tenant,
        limits: policy,
    }))
}
