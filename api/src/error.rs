//! [`ApiError`]: every way a request can fail, turned into an HTTP response in one place.

use crate::ratelimit::Decision;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_jobs::amqp::AmqpError;
use sluice_jobs::store::StoreError;
use sluice_proto::{ErrorBody, ErrorCode};

/// The body of every error response of Sluice's own routes: `{"error": {"code", "message"}}`
/// (the OpenAI-compatible routes use OpenAI's envelope instead).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A client error with a stable code and a message for the client.
    #[error("{}: {}", .0.code, .0.message)]
    Client(ErrorBody),
    /// Credentials missing or not accepted; the response never says which part was wrong.
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    #[error("forbidden")]
    Forbidden,
    #[error("not found")]
    NotFound,
    #[error("rate limited")]
    RateLimited(Decision),
    #[error("token quota exceeded ({period} {used}/{limit})")]
    QuotaExceeded {
        period: &'static str,
        used: u64,
        limit: u64,
        reserve: u64,
        /// Seconds until the period rolls over.
        reset_secs: u64,
    },
    #[error("concurrency limited ({active}/{limit})")]
    ConcurrencyLimited { active: u64, limit: u64 },
    #[error("queue full ({queued}/{limit})")]
    QueueFull {
        tenant: bool,
        queued: u64,
        limit: u64,
        retry_after_secs: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] AmqpError),
    #[error(transparent)]
    Guard(#[from] sluice_guard::classifier::ClassifierError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn client(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError::Client(ErrorBody::new(code, message))
    }

    /// The code and client-facing message. Internal details stay in the log.
    pub fn body(&self) -> ErrorBody {
        match self {
            ApiError::Client(body) => body.clone(),
            ApiError::Unauthorized(_) => ErrorBody::new(
                ErrorCode::Unauthorized,
                "missing or invalid credentials: send `Authorization: Bearer <key>`",
            ),
            ApiError::Forbidden => ErrorBody::new(
                ErrorCode::Forbidden,
                "these credentials may not use this route",
            ),
            ApiError::NotFound => ErrorBody::new(ErrorCode::NotFound, "no such job"),
            ApiError::RateLimited(d) => ErrorBody::new(
                ErrorCode::RateLimited,
                format!(
                    "rate limit exceeded; retry in {} ms",
                    d.retry_after.as_millis()
                ),
            ),
            ApiError::QuotaExceeded {
                period,
                used,
                limit,
                reserve,
                ..
            } => ErrorBody::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "this job needs {reserve} tokens (prompt plus max_tokens) but the {period}ly \
                     token quota has {} of {limit} left",
                    limit.saturating_sub(*used)
                ),
            ),
            ApiError::ConcurrencyLimited { active, limit } => ErrorBody::new(
                ErrorCode::ConcurrencyLimited,
                format!(
                    "{active} of {limit} allowed jobs are queued or running; retry when one ends"
                ),
            ),
            ApiError::QueueFull {
                tenant,
                queued,
                limit,
                retry_after_secs,
            } => ErrorBody::new(
                ErrorCode::QueueFull,
                format!(
                    "{queued} of {limit} allowed jobs are waiting in {} queue; retry in about \
                     {retry_after_secs} s",
                    if *tenant { "this tenant's" } else { "the" }
                ),
            ),
            ApiError::Store(_) => ErrorBody::new(
                ErrorCode::StoreUnavailable,
                "the job store is unavailable; retry later",
            ),
            ApiError::Queue(_) => ErrorBody::new(
                ErrorCode::QueueUnavailable,
                "the job queue is unavailable; nothing was enqueued, retry later",
            ),
            ApiError::Guard(_) => ErrorBody::new(
                ErrorCode::GuardUnavailable,
                "the input guard could not check this request; nothing was enqueued, retry later",
            ),
            ApiError::Internal(_) => ErrorBody::new(ErrorCode::Internal, "internal error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let status = StatusCode::from_u16(body.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // The detail (never request content) goes to the log; the client gets the stable code.
        match &self {
            ApiError::Client(_)
            | ApiError::NotFound
            | ApiError::Forbidden
            | ApiError::RateLimited(_)
            | ApiError::QuotaExceeded { .. }
            | ApiError::ConcurrencyLimited { .. }
            | ApiError::QueueFull { .. } => {
                tracing::debug!(code = %body.code, "request rejected");
            }
            ApiError::Unauthorized(reason) => {
                tracing::info!(code = %body.code, reason, "authentication failed");
            }
            ApiError::Store(e) => tracing::warn!(error = %e, "job store error"),
            ApiError::Queue(e) => tracing::warn!(error = %e, "job queue error"),
            ApiError::Guard(e) => tracing::error!(error = %e, "guard classifier error"),
            ApiError::Internal(e) => tracing::error!(error = %e, "internal error"),
        }
        let code = body.code;
        let mut response = (status, Json(ErrorResponse { error: body })).into_response();
        // For the metrics middleware: rejections are counted by code.
        response.extensions_mut().insert(code);
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        let headers = response.headers_mut();
        let mut set = |name: &'static str, value: u64| {
            if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
                headers.insert(name, v);
            }
        };
        match &self {
            ApiError::RateLimited(d) => {
                set(
                    "retry-after",
                    d.retry_after.as_millis().div_ceil(1000).max(1) as u64,
                );
                set("ratelimit-limit", u64::from(d.limit));
                set("ratelimit-remaining", u64::from(d.remaining));
                set("ratelimit-reset", d.reset.as_millis().div_ceil(1000) as u64);
            }
            ApiError::QuotaExceeded {
                used,
                limit,
                reset_secs,
                ..
            } => {
                set("retry-after", (*reset_secs).max(1));
                set("ratelimit-limit", *limit);
                set("ratelimit-remaining", limit.saturating_sub(*used));
                set("ratelimit-reset", *reset_secs);
            }
            ApiError::QueueFull {
                retry_after_secs, ..
            } => set("retry-after", (*retry_after_secs).max(1)),
            ApiError::ConcurrencyLimited { active, limit } => {
                set("retry-after", 1);
                set("ratelimit-limit", *limit);
                set("ratelimit-remaining", limit.saturating_sub(*active));
                set("ratelimit-reset", 1);
            }
            _ => {}
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_stable_codes_and_statuses() {
        let cases = [
            (ApiError::Unauthorized("no header"), 401, "unauthorized"),
            (ApiError::NotFound, 404, "not_found"),
            (ApiError::Queue(AmqpError::Nacked), 503, "queue_unavailable"),
            (
                ApiError::Guard(sluice_guard::classifier::ClassifierError::Overloaded),
                503,
                "guard_unavailable",
            ),
            (
                ApiError::client(ErrorCode::InvalidParameter, "x"),
                400,
                "invalid_parameter",
            ),
        ];
        for (err, status, code) in cases {
            let body = err.body();
            assert_eq!(body.code.as_str(), code);
            assert_eq!(err.into_response().status().as_u16(), status);
        }
    }
}
