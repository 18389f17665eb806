//! `/admin/tenants/{tenant}/webhooks`: a tenant's webhook endpoints (register, list, delete),
//! their delivery log, and a test event. Admin role only (403 otherwise).

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use sluice_proto::ErrorCode;
use utoipa::ToSchema;

use crate::audit::{self, AuditContext};
use crate::error::ApiError;
use crate::extract::PathParam;
use crate::openapi::error_responses;
use crate::principal::Admin;
use crate::state::AppState;
use crate::validate::{body_bytes, parse_json};
use crate::webhooks::events::EventType;
use crate::webhooks::registry::{DeliveryAttempt, Endpoint};
use crate::webhooks::target::MAX_URL_CHARS;

/// The body of `POST /admin/tenants/{tenant}/webhooks`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateWebhook {
    /// Where events are POSTed: `https`, no user name or password, and a host that is not (and
    /// does not resolve to) a private, loopback, link-local or otherwise internal address,
    /// unless the operator allows it (`--webhook-allow`, which also permits `http`).
    #[schema(min_length = 1, max_length = 2048, pattern = "^https?://")]
    url: String,
    /// The event types to receive (duplicates are ignored).
    #[schema(value_type = Vec<EventType>, min_items = 1)]
    event_types: Vec<String>,
}

/// A webhook endpoint (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpoint {
    /// `whk_` and 32 hex digits.
    id: String,
    tenant: String,
    url: String,
    event_types: Vec<EventType>,
    /// Milliseconds since the epoch.
    created_at: u64,
}

impl From<Endpoint> for WebhookEndpoint {
    fn from(e: Endpoint) -> Self {
        Self {
            id: e.id,
            tenant: e.tenant,
            url: e.url,
            event_types: e.event_types,
            created_at: e.created_at,
        }
    }
}

/// A registered endpoint, with its signing secret (shown this once).
#[derive(Debug, Serialize, ToSchema)]
pub struct NewWebhookEndpoint {
    id: String,
    tenant: String,
    url: String,
    event_types: Vec<EventType>,
    /// Milliseconds since the epoch.
    created_at: u64,
    /// `whsec_` and the base64 of 32 random bytes: the key of the `webhook-signature` header
    /// (Standard Webhooks). It is never shown again.
    secret: String,
}

/// A tenant's webhook endpoints, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    webhooks: Vec<WebhookEndpoint>,
}

/// An endpoint's latest delivery attempts (at most 100), newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookDeliveryList {
    deliveries: Vec<DeliveryAttempt>,
}

/// A queued test event.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookTestEvent {
    /// The event's id (`evt_...`), also its `webhook-id` header.
    event_id: String,
    /// Always `webhook.test`.
    #[schema(schema_with = test_event_type)]
    event_type: String,
    endpoint_id: String,
}

fn test_event_type() -> utoipa::openapi::schema::Object {
    crate::openapi::constant(crate::webhooks::events::TEST_EVENT)
}

/// The tenant and endpoint id of a route under `/admin/tenants/{tenant}/webhooks/{id}`.
#[derive(Debug)]
pub struct EndpointPath {
    tenant: String,
    id: String,
}

impl<S: Send + Sync> FromRequestParts<S> for EndpointPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((tenant, id)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::client(ErrorCode::InvalidParameter, e.body_text()))?;
        tenant_name(&tenant)?;
        if !is_endpoint_id(&id) {
            return Err(ApiError::client(
                ErrorCode::NotFound,
                "no such webhook endpoint",
            ));
        }
        Ok(Self { tenant, id })
    }
}

/// `whk_` and 32 lowercase hex digits (the documented pattern of `{id}`).
fn is_endpoint_id(id: &str) -> bool {
    id.strip_prefix("whk_").is_some_and(|hex| {
        hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

fn tenant_name(tenant: &str) -> Result<(), ApiError> {
    sluice_shared::settings::parse_namespace(tenant)
        .map(|_| ())
        .map_err(|e| ApiError::client(ErrorCode::InvalidParameter, format!("tenant: {e}")))
}

fn audit(admin: &Admin, state: &AppState, action: &str) {
    let ctx = AuditContext {
        tenant: Some(admin.0.tenant.clone()),
        key_id: Some(admin.0.key_id.clone()),
        ip: None,
    };
    audit::record("admin_action", action, &ctx, state.anonymize_ips);
}

error_responses!(
    CreateWebhookErrors: Sluice,
    Admin,
    [InvalidJson, InvalidRequest, InvalidParameter]
);

/// `POST /admin/tenants/{tenant}/webhooks` → 201 with the signing secret, shown this once.
#[utoipa::path(
    post,
    path = "/admin/tenants/{tenant}/webhooks",
    operation_id = "create_webhook",
    tag = "admin",
    summary = "Register a webhook endpoint",
    description = "Registers an endpoint that receives the tenant's events of the given types, \
                   signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`, \
                   `webhook-signature`). The answer holds the signing secret, shown this once. \
                   A tenant has at most 16 endpoints. A URL that is not `https`, carries a user \
                   name or password, or names an internal address is refused (400 \
                   `invalid_parameter`, saying why).",
    security(("bearer" = ["admin"])),
    params(("tenant" = String, Path, description = "The tenant.", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body(content = CreateWebhook, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered.", body = NewWebhookEndpoint),
        CreateWebhookErrors,
    ),
)]
pub async fn create(
    admin: Admin,
    State(state): State<AppState>,
    PathParam(tenant): PathParam,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<NewWebhookEndpoint>), ApiError> {
    tenant_name(&tenant)?;
    let req: CreateWebhook = parse_json(&body_bytes(body)?)?;
    if req.url.chars().count() > MAX_URL_CHARS {
        return Err(ApiError::client(
            ErrorCode::InvalidParameter,
            format!("url: longer than {MAX_URL_CHARS} characters"),
        ));
    }
    let endpoint = state
        .webhooks
        .register(&tenant, &req.url, &req.event_types)
        .await?;
    audit(&admin, &state, "webhook_created");
    Ok((
        StatusCode::CREATED,
        Json(NewWebhookEndpoint {
            secret: endpoint.secret.expose().to_string(),
            id: endpoint.id,
            tenant: endpoint.tenant,
            url: endpoint.url,
            event_types: endpoint.event_types,
            created_at: endpoint.created_at,
        }),
    ))
}

error_responses!(ListWebhooksErrors: Sluice, Admin, [InvalidParameter]);

/// `GET /admin/tenants/{tenant}/webhooks`.
#[utoipa::path(
    get,
    path = "/admin/tenants/{tenant}/webhooks",
    operation_id = "list_webhooks",
    tag = "admin",
    summary = "A tenant's webhook endpoints",
    description = "The tenant's webhook endpoints, oldest first, never their secrets.",
    security(("bearer" = ["admin"])),
    params(("tenant" = String, Path, description = "The tenant.", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The endpoints.", body = WebhookList),
        ListWebhooksErrors,
    ),
)]
pub async fn list(
    _admin: Admin,
    State(state): State<AppState>,
    PathParam(tenant): PathParam,
) -> Result<Json<WebhookList>, ApiError> {
    tenant_name(&tenant)?;
    let endpoints = state.webhooks.list(&tenant).await?;
    Ok(Json(WebhookList {
        webhooks: endpoints.into_iter().map(WebhookEndpoint::from).collect(),
    }))
}

error_responses!(WebhookErrors: Sluice, Admin, [InvalidParameter, NotFound]);

/// `DELETE /admin/tenants/{tenant}/webhooks/{id}` → 204.
#[utoipa::path(
    delete,
    path = "/admin/tenants/{tenant}/webhooks/{id}",
    operation_id = "delete_webhook",
    tag = "admin",
    summary = "Delete a webhook endpoint",
    description = "Deletes the endpoint and its delivery log; deliveries still queued for it \
                   are dropped.",
    security(("bearer" = ["admin"])),
    params(
        ("tenant" = String, Path, description = "The tenant.", pattern = "^[A-Za-z0-9_-]{1,64}$"),
        ("id" = String, Path, description = "The endpoint's id.", pattern = "^whk_[0-9a-f]{32}$"),
    ),
    responses(
        (status = 204, description = "Deleted."),
        WebhookErrors,
    ),
)]
pub async fn delete(
    admin: Admin,
    State(state): State<AppState>,
    path: EndpointPath,
) -> Result<StatusCode, ApiError> {
    state.webhooks.delete(&path.tenant, &path.id).await?;
    audit(&admin, &state, "webhook_deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /admin/tenants/{tenant}/webhooks/{id}/deliveries`.
#[utoipa::path(
    get,
    path = "/admin/tenants/{tenant}/webhooks/{id}/deliveries",
    operation_id = "list_webhook_deliveries",
    tag = "admin",
    summary = "A webhook endpoint's delivery attempts",
    description = "The endpoint's latest 100 delivery attempts, newest first: `delivered` \
                   (2xx), `failed` (unreachable, timed out or another status, redirects \
                   included; a retry is scheduled), `refused` (the URL or an address it \
                   resolved to is not allowed; a retry is scheduled) or `dead` (the last \
                   attempt failed: the delivery is in the dead queue).",
    security(("bearer" = ["admin"])),
    params(
        ("tenant" = String, Path, description = "The tenant.", pattern = "^[A-Za-z0-9_-]{1,64}$"),
        ("id" = String, Path, description = "The endpoint's id.", pattern = "^whk_[0-9a-f]{32}$"),
    ),
    responses(
        (status = 200, description = "The attempts.", body = WebhookDeliveryList),
        WebhookErrors,
    ),
)]
pub async fn deliveries(
    _admin: Admin,
    State(state): State<AppState>,
    path: EndpointPath,
) -> Result<Json<WebhookDeliveryList>, ApiError> {
    let deliveries = state.webhooks.deliveries(&path.tenant, &path.id).await?;
    Ok(Json(WebhookDeliveryList { deliveries }))
}

error_responses!(
    TestWebhookErrors: Sluice,
    Admin,
    [InvalidParameter, NotFound, QueueUnavailable]
);

/// `POST /admin/tenants/{tenant}/webhooks/{id}/test` → 202.
#[utoipa::path(
    post,
    path = "/admin/tenants/{tenant}/webhooks/{id}/test",
    operation_id = "send_webhook_test_event",
    tag = "admin",
    summary = "Send a test event",
    description = "Queues a `webhook.test` event (`data`: `{\"id\": <endpoint id>}`) for this \
                   endpoint alone, delivered, signed and retried like any other event.",
    security(("bearer" = ["admin"])),
    params(
        ("tenant" = String, Path, description = "The tenant.", pattern = "^[A-Za-z0-9_-]{1,64}$"),
        ("id" = String, Path, description = "The endpoint's id.", pattern = "^whk_[0-9a-f]{32}$"),
    ),
    responses(
        (status = 202, description = "Queued.", body = WebhookTestEvent),
        TestWebhookErrors,
    ),
)]
pub async fn test_event(
    _admin: Admin,
    State(state): State<AppState>,
    path: EndpointPath,
) -> Result<(StatusCode, Json<WebhookTestEvent>), ApiError> {
    let event_id = state.webhooks.send_test(&path.tenant, &path.id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(WebhookTestEvent {
            event_id,
            event_type: crate::webhooks::events::TEST_EVENT.to_string(),
            endpoint_id: path.id,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_ids_are_whk_and_32_hex_digits() {
        let id = format!("whk_{}", uuid::Uuid::now_v7().simple());
        assert!(is_endpoint_id(&id), "{id}");
        for bad in [
            "",
            "whk_",
            "whk_ABCDEF0123456789abcdef0123456789",
            "key_0",
            &id[1..],
        ] {
            assert!(!is_endpoint_id(bad), "{bad}");
        }
    }
}
