//! `/v1/jobs`: submit, poll, cancel.

use axum::Json;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sluice_jobs::store::CancelOutcome;
use sluice_proto::{ErrorCode, JobStatus, JobView};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;
use crate::extract::PathParam;
use crate::extract::ValidJob;
use crate::openapi::{consts, error_responses};
use crate::principal::Principal;
use crate::state::AppState;
use crate::validate::SubmitRequest;

/// The 202 of `POST /v1/jobs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    id: Uuid,
    /// Always `queued`.
    #[schema(schema_with = consts::queued)]
    status: JobStatus,
}

/// W3C trace context a job carries across the queue (invalid values start a new trace).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct TraceHeaders {
    /// W3C `traceparent`: the job's trace continues the caller's.
    #[param(nullable = false)]
    traceparent: Option<String>,
    /// W3C `tracestate`, passed on with a valid `traceparent` (at most 512 bytes).
    #[param(nullable = false)]
    tracestate: Option<String>,
}

/// What the submit path (validation, guard, admission, publish) refuses with: shared by
/// `POST /v1/jobs` and `POST /v1/chat/completions`.
pub(crate) const SUBMIT_CODES: &[ErrorCode] = &[
    ErrorCode::InvalidJson,
    ErrorCode::InvalidRequest,
    ErrorCode::InvalidParameter,
    ErrorCode::InvalidResponseFormat,
    ErrorCode::SystemMessageNotAllowed,
    ErrorCode::PromptInjectionDetected,
    ErrorCode::PiiDetected,
    ErrorCode::PayloadTooLarge,
    ErrorCode::ContextLengthExceeded,
    ErrorCode::IdempotencyKeyReused,
    ErrorCode::QuotaExceeded,
    ErrorCode::ConcurrencyLimited,
    ErrorCode::QueueFull,
    ErrorCode::QueueUnavailable,
    ErrorCode::GuardUnavailable,
];

error_responses!(SubmitErrors: Sluice, User, SUBMIT_CODES, []);

/// `POST /v1/jobs` → 202 `{"id", "status": "queued"}`. With an `Idempotency-Key` seen in the
/// last 24 hours for the same request, the same answer for the same job, marked
/// `Idempotent-Replayed: true`; for a different request, 422 `idempotency_key_reused`.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    operation_id = "submit_job",
    tag = "jobs",
    summary = "Submit a chat job",
    description = "Validates the request, runs the input guard, counts the prompt's tokens, \
                   reserves quota and enqueues the job: 202 with its id. Prompt tokens plus \
                   `max_tokens` beyond the model's context are 413 `context_length_exceeded`; \
                   input is never truncated. With an `Idempotency-Key` seen in the last 24 \
                   hours for the same request, the same 202 for the same job, marked \
                   `Idempotent-Replayed: true`; for a different request, 422 \
                   `idempotency_key_reused`. A refused request consumes nothing.",
    security(("bearer" = [])),
    params(
        (
            "Idempotency-Key" = Option<String>,
            Header,
            description = "Makes retries safe: a retry of the same request by the same tenant \
                           within 24 hours gets the same job. 1 to 255 visible ASCII \
                           characters.",
            min_length = 1,
            max_length = 255,
            pattern = "^[!-~]+$",
            nullable = false,
        ),
        TraceHeaders,
    ),
    request_body(content = SubmitRequest, content_type = "application/json"),
    responses(
        (
            status = 202,
            description = "Queued (or, for a replayed `Idempotency-Key`, the earlier job).",
            body = JobAccepted,
            headers(
                ("Location" = String, description = "`/v1/jobs/{id}`: where to poll the job."),
                ("Idempotent-Replayed" = String, description = "`true` when the answer is the \
                                                                earlier job of this \
                                                                `Idempotency-Key`; absent \
                                                                otherwise."),
            ),
        ),
        SubmitErrors,
    ),
)]
#[tracing::instrument(skip_all, fields(tenant = %principal.tenant, job_id))]
pub async fn submit(
    principal: Principal,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ValidJob { job, .. }: ValidJob<SubmitRequest>,
) -> Result<Response, ApiError> {
    let submitted = crate::submit::submit(&state, principal, peer, job, &headers).await?;
    let id = submitted.id;
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{id}"))],
        Json(JobAccepted {
            id,
            status: JobStatus::Queued,
        }),
    )
        .into_response();
    if submitted.replayed {
        response.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

error_responses!(GetErrors: Sluice, User, [InvalidParameter, NotFound]);

/// `GET /v1/jobs/{id}` → the job as its tenant sees it.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    operation_id = "get_job",
    tag = "jobs",
    summary = "A job",
    description = "The job as its tenant sees it; once terminal, with its `result` or \
                   `error`. Another tenant's job is 404, like a missing one (so is an id that \
                   is not a UUID).",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The job.", body = JobView),
        GetErrors,
    ),
)]
pub async fn get(
    principal: Principal,
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let view = state
        .store
        .get(&principal.tenant, &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(view).into_response())
}

error_responses!(CancelErrors: Sluice, User, [InvalidParameter, NotFound, JobAlreadyFinished]);

/// `DELETE /v1/jobs/{id}` cancels: a queued job is never generated; a running one stops at its
/// next token with `finish_reason: "cancelled"`.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    operation_id = "cancel_job",
    tag = "jobs",
    summary = "Cancel a job",
    description = "A queued job is never generated; a running one stops at its next token \
                   with `finish_reason: \"cancelled\"` and keeps its text so far. Cancelling \
                   a cancelled job answers the same. 409 `job_already_finished` for a job that \
                   ended otherwise.",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The job after the cancellation (`cancelled`, or still \
                                      `running` until its worker stops it).", body = JobView),
        CancelErrors,
    ),
)]
pub async fn cancel(
    principal: Principal,
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    match state.store.cancel(&principal.tenant, &id).await? {
        CancelOutcome::NotFound => Err(ApiError::NotFound),
        CancelOutcome::AlreadyFinished(status) => Err(ApiError::client(
            ErrorCode::JobAlreadyFinished,
            format!("the job already ended with status {}", status.as_str()),
        )),
        outcome @ (CancelOutcome::Cancelled
        | CancelOutcome::AlreadyCancelled
        | CancelOutcome::Cancelling) => {
            if outcome == CancelOutcome::Cancelled {
                state
                    .metrics
                    .jobs_finished
                    .with_label_values(&["cancelled"])
                    .inc();
            }
            let view = state
                .store
                .get(&principal.tenant, &id)
                .await?
                .ok_or(ApiError::NotFound)?;
            Ok(Json(view).into_response())
        }
    }
}
