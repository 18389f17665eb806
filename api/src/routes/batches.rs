//! `/v1/batches`: create, read, list and cancel a tenant's batches (OpenAI's Batch API). The
//! batch runs in the background ([`crate::batches::runner`]); errors come in OpenAI's envelope.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use sluice_proto::ErrorCode;
use utoipa::{IntoParams, ToSchema};

use crate::batches::store::{CancelOutcome, NewBatch};
use crate::batches::{Batch, new_batch_id, parse_window};
use crate::error::ApiError;
use crate::extract::{PathParam, QueryParams};
use crate::files::Purpose;
use crate::files::lines::CHAT_COMPLETIONS;
use crate::openapi::error_responses;
use crate::principal::Principal;
use crate::routes::openai::OpenAiError;
use crate::state::AppState;
use crate::validate::{body_bytes, parse_json};

/// The body of `POST /v1/batches`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBatchRequest {
    /// A file of this tenant uploaded with `purpose` `batch`.
    input_file_id: String,
    /// `/v1/chat/completions`, the one endpoint batches run.
    #[schema(pattern = "^/v1/chat/completions$")]
    endpoint: String,
    /// `24h`, or a shorter window such as `1h` or `30m` (at least `1m`; at most
    /// `--batch-max-window-hours`). Lines not done by then end as `batch_expired`.
    #[schema(pattern = "^[0-9]{1,4}[hm]$")]
    completion_window: String,
    /// Up to 16 pairs; keys up to 64 characters, values up to 512.
    #[schema(value_type = Option<std::collections::HashMap<String, String>>)]
    metadata: Option<BTreeMap<String, String>>,
}

/// A page of batches.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchList {
    /// Always `list`.
    #[schema(pattern = "^list$")]
    object: &'static str,
    data: Vec<Batch>,
    #[schema(value_type = Option<String>)]
    first_id: Option<String>,
    #[schema(value_type = Option<String>)]
    last_id: Option<String>,
    has_more: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BatchQuery {
    /// At most this many (1 to 100; default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<usize>,
    /// The page after this batch id (the previous page's `last_id`).
    after: Option<String>,
}

fn no_such_batch() -> ApiError {
    ApiError::client(ErrorCode::NotFound, "no such batch")
}

/// The tenant's batch, or the 404 (also for another tenant's).
async fn find(state: &AppState, tenant: &str, id: &str) -> Result<Batch, ApiError> {
    state
        .batches
        .get(tenant, id)
        .await?
        .ok_or_else(no_such_batch)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::client(ErrorCode::InvalidParameter, message)
}

fn check_metadata(metadata: &Option<BTreeMap<String, String>>) -> Result<(), ApiError> {
    let Some(metadata) = metadata else {
        return Ok(());
    };
    if metadata.len() > 16 {
        return Err(invalid("metadata holds at most 16 pairs"));
    }
    if metadata
        .iter()
        .any(|(k, v)| k.chars().count() > 64 || v.chars().count() > 512)
    {
        return Err(invalid(
            "metadata keys are at most 64 characters, values at most 512",
        ));
    }
    Ok(())
}

error_responses!(CreateErrors: OpenAi, User, [InvalidJson, InvalidRequest, InvalidParameter, NotFound]);

/// `POST /v1/batches`.
#[utoipa::path(
    post,
    path = "/v1/batches",
    operation_id = "create_batch",
    tag = "batches",
    summary = "Create a batch (OpenAI-compatible)",
    description = "Runs every line of an uploaded `batch` file as a chat completion job: the \
                   same guard, token counting and quota as `POST /v1/chat/completions`, in \
                   the `batch` class, a bounded number at a time per tenant so that tenants \
                   share the batch lane fairly. A line refused at submit (guard, quota, \
                   context) goes to the error file; the batch goes on. Poll it, or register a \
                   webhook for `batch.completed`.",
    security(("bearer" = [])),
    request_body(content = CreateBatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The batch, `validating`.", body = Batch),
        CreateErrors,
    ),
)]
pub async fn create(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Batch>, OpenAiError> {
    let principal = principal?;
    let request: CreateBatchRequest = parse_json(&body_bytes(body)?)?;
    if request.endpoint != CHAT_COMPLETIONS {
        return Err(invalid(format!(
            "endpoint must be {CHAT_COMPLETIONS:?}, the one endpoint batches run"
        ))
        .into());
    }
    let window =
        parse_window(&request.completion_window, state.batches.max_window_secs).map_err(invalid)?;
    check_metadata(&request.metadata)?;
    let file = state
        .files
        .get(&principal.tenant, &request.input_file_id)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::client(ErrorCode::NotFound, "no such file"))?;
    if file.purpose != Purpose::Batch {
        return Err(invalid(format!(
            "file {} has purpose {}; a batch reads a file uploaded with purpose batch",
            file.id,
            file.purpose.as_str()
        ))
        .into());
    }
    let created_at = sluice_proto::now_ms() / 1000;
    let ip = crate::client_ip::client_ip(peer, &headers, &state.trusted_proxies);
    let new = NewBatch {
        id: new_batch_id(),
        tenant: principal.tenant.clone(),
        key_id: principal.key_id.clone(),
        peer: SocketAddr::new(ip, 0).to_string(),
        input_file_id: file.id.clone(),
        endpoint: request.endpoint,
        completion_window: request.completion_window,
        metadata: request.metadata,
        created_at,
        expires_at: created_at + window,
    };
    state.batches.create(&new).await.map_err(ApiError::from)?;
    tracing::info!(batch = %new.id, tenant = %new.tenant, lines = file.lines, "batch created");
    Ok(Json(find(&state, &principal.tenant, &new.id).await?))
}

error_responses!(GetErrors: OpenAi, User, [InvalidParameter, NotFound]);

/// `GET /v1/batches/{id}`.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}",
    operation_id = "get_batch",
    tag = "batches",
    summary = "A batch (OpenAI-compatible)",
    description = "Its status, `request_counts` and, once it ended, its output and error \
                   files. Another tenant's batch is 404, like a missing one.",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The batch's id.")),
    responses(
        (status = 200, description = "The batch.", body = Batch),
        GetErrors,
    ),
)]
pub async fn get(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    id: Result<PathParam, ApiError>,
) -> Result<Json<Batch>, OpenAiError> {
    let principal = principal?;
    let PathParam(id) = id?;
    Ok(Json(find(&state, &principal.tenant, &id).await?))
}

error_responses!(ListErrors: OpenAi, User, [InvalidParameter]);

/// `GET /v1/batches`.
#[utoipa::path(
    get,
    path = "/v1/batches",
    operation_id = "list_batches",
    tag = "batches",
    summary = "The tenant's batches (OpenAI-compatible)",
    description = "Newest first, a page at a time (`after` the previous page's `last_id`).",
    security(("bearer" = [])),
    params(BatchQuery),
    responses(
        (status = 200, description = "A page of batches.", body = BatchList),
        ListErrors,
    ),
)]
pub async fn list(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    query: Result<QueryParams<BatchQuery>, ApiError>,
) -> Result<Json<BatchList>, OpenAiError> {
    let principal = principal?;
    let QueryParams(q) = query?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(invalid("limit must be 1 to 100").into());
    }
    let (data, has_more) = state
        .batches
        .list(&principal.tenant, q.after.as_deref(), limit)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(BatchList {
        object: "list",
        first_id: data.first().map(|b| b.id.clone()),
        last_id: data.last().map(|b| b.id.clone()),
        data,
        has_more,
    }))
}

error_responses!(CancelErrors: OpenAi, User, [InvalidParameter, NotFound, BatchAlreadyFinished]);

/// `POST /v1/batches/{id}/cancel`.
#[utoipa::path(
    post,
    path = "/v1/batches/{id}/cancel",
    operation_id = "cancel_batch",
    tag = "batches",
    summary = "Cancel a batch (OpenAI-compatible)",
    description = "The batch turns `cancelling`: no more lines start, the jobs in flight \
                   stop, and then it is `cancelled` with every line that finished in its \
                   output file and the others in its error file (`batch_cancelled`). Their \
                   unused reservations are refunded. Cancelling a cancelling or cancelled \
                   batch answers the same; one that ended otherwise is 409 \
                   `batch_already_finished`.",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The batch's id.")),
    responses(
        (status = 200, description = "The batch, `cancelling` or `cancelled`.", body = Batch),
        CancelErrors,
    ),
)]
pub async fn cancel(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    id: Result<PathParam, ApiError>,
) -> Result<Json<Batch>, OpenAiError> {
    let principal = principal?;
    let PathParam(id) = id?;
    match state
        .batches
        .cancel(&principal.tenant, &id)
        .await
        .map_err(ApiError::from)?
    {
        CancelOutcome::NotFound => Err(no_such_batch().into()),
        CancelOutcome::AlreadyFinished(status) => Err(ApiError::client(
            ErrorCode::BatchAlreadyFinished,
            format!("the batch is already {}", status.as_str()),
        )
        .into()),
        CancelOutcome::Cancelling => Ok(Json(find(&state, &principal.tenant, &id).await?)),
    }
}
