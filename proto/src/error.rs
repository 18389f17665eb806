//! One stable error-code enum for the whole system, mapped to HTTP here and nowhere else.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code. Clients match on the string form, so a variant's
/// `snake_case` name never changes once released; add variants instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // Client errors at submit.
    /// The body is not valid JSON, or not valid UTF-8.
    InvalidJson,
    /// The JSON is well formed but does not match the request schema (wrong type, unknown field).
    InvalidRequest,
    /// A field has a value outside its allowed range.
    InvalidParameter,
    /// The request body is larger than the configured limit.
    PayloadTooLarge,
    /// The prompt plus `max_tokens` does not fit the model's context.
    ContextLengthExceeded,
    /// The content type is not `application/json`.
    UnsupportedMediaType,
    /// The input guard found a prompt-injection attempt and the tenant blocks them.
    PromptInjectionDetected,
    /// The input holds personal data and the tenant rejects it.
    PiiDetected,
    /// A `system` message from a client whose tenant does not allow them.
    SystemMessageNotAllowed,
    /// A request parameter this server does not implement (named in the message).
    UnsupportedParameter,
    /// The request names a model this deployment does not serve.
    ModelNotFound,
    /// `response_format` is malformed, its schema is not valid JSON Schema, or it uses what
    /// the grammar engine cannot enforce (or conflicts with the tenant's required schema).
    InvalidResponseFormat,
    // Auth.
    /// Missing, malformed, unknown, expired or revoked credentials.
    Unauthorized,
    /// Valid credentials without the role the route needs.
    Forbidden,
    // Lookup.
    /// No such job for this tenant (also the answer for another tenant's job).
    NotFound,
    /// The route exists but not with this method.
    MethodNotAllowed,
    // Limits.
    RateLimited,
    QuotaExceeded,
    ConcurrencyLimited,
    /// Too many jobs are queued (in the deployment, or for the tenant); `Retry-After` says
    /// when the measured drain rate should have made room.
    QueueFull,
    // Job state conflicts.
    /// The job is already terminal, so it cannot be cancelled.
    JobAlreadyFinished,
    /// The `Idempotency-Key` was used within 24 hours for a different request.
    IdempotencyKeyReused,
    /// The batch already ended (completed, failed or expired), so it cannot be cancelled.
    BatchAlreadyFinished,
    // Infrastructure.
    /// RabbitMQ refused the job or could not be reached; nothing was enqueued.
    QueueUnavailable,
    /// Redis could not be reached.
    StoreUnavailable,
    /// The file store (object store or local directory) could not be read or written;
    /// nothing was stored.
    StorageUnavailable,
    /// The input guard's classifier could not score the request (overloaded or failed);
    /// nothing was enqueued. Never answered as an "allow".
    GuardUnavailable,
    /// An unexpected failure inside Sluice.
    Internal,
    // Terminal job errors written by the worker.
    /// The model failed while generating.
    ModelError,
    /// The job can never fit this worker's context or memory budget.
    JobTooLarge,
    /// The job ran out of delivery attempts (workers kept dying while running it).
    AttemptsExhausted,
    /// The job's deadline passed before it finished.
    DeadlineExceeded,
    /// The broker dead-lettered the job's message (delivery limit reached, or rejected as
    /// undecodable) before any worker could finish it.
    DeadLettered,
    /// Structured output did not pass its final check against the schema.
    OutputValidationFailed,
}

impl ErrorCode {
    /// Every code, in declaration order (what the OpenAPI document's `ErrorCode` schema is
    /// checked against).
    pub const ALL: &'static [ErrorCode] = &[
        Self::InvalidJson,
        Self::InvalidRequest,
        Self::InvalidParameter,
        Self::PayloadTooLarge,
        Self::ContextLengthExceeded,
        Self::UnsupportedMediaType,
        Self::PromptInjectionDetected,
        Self::PiiDetected,
        Self::SystemMessageNotAllowed,
        Self::UnsupportedParameter,
        Self::ModelNotFound,
        Self::InvalidResponseFormat,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::RateLimited,
        Self::QuotaExceeded,
        Self::ConcurrencyLimited,
        Self::QueueFull,
        Self::JobAlreadyFinished,
        Self::IdempotencyKeyReused,
        Self::BatchAlreadyFinished,
        Self::QueueUnavailable,
        Self::StoreUnavailable,
        Self::StorageUnavailable,
        Self::GuardUnavailable,
        Self::Internal,
        Self::ModelError,
        Self::JobTooLarge,
        Self::AttemptsExhausted,
        Self::DeadlineExceeded,
        Self::DeadLettered,
        Self::OutputValidationFailed,
    ];

    /// The HTTP status for this code: the one place the mapping lives.
    pub fn http_status(self) -> u16 {
        use ErrorCode::*;
        match self {
            InvalidJson
            | InvalidRequest
            | InvalidParameter
            | PromptInjectionDetected
            | PiiDetected
            | SystemMessageNotAllowed
            | UnsupportedParameter
            | InvalidResponseFormat => 400,
            Unauthorized => 401,
            Forbidden => 403,
            NotFound | ModelNotFound => 404,
            MethodNotAllowed => 405,
            JobAlreadyFinished | BatchAlreadyFinished => 409,
            IdempotencyKeyReused => 422,
            PayloadTooLarge | ContextLengthExceeded => 413,
            UnsupportedMediaType => 415,
            RateLimited | QuotaExceeded | ConcurrencyLimited | QueueFull => 429,
            Internal | ModelError | AttemptsExhausted | DeadLettered | OutputValidationFailed => {
                500
            }
            QueueUnavailable | StoreUnavailable | StorageUnavailable | GuardUnavailable => 503,
            JobTooLarge => 413,
            DeadlineExceeded => 504,
        }
    }

    /// The stable string form, identical to the serde form.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            InvalidJson => "invalid_json",
            InvalidRequest => "invalid_request",
            InvalidParameter => "invalid_parameter",
            PayloadTooLarge => "payload_too_large",
            ContextLengthExceeded => "context_length_exceeded",
            UnsupportedMediaType => "unsupported_media_type",
            PromptInjectionDetected => "prompt_injection_detected",
            PiiDetected => "pii_detected",
            SystemMessageNotAllowed => "system_message_not_allowed",
            UnsupportedParameter => "unsupported_parameter",
            ModelNotFound => "model_not_found",
            InvalidResponseFormat => "invalid_response_format",
            Unauthorized => "unauthorized",
            Forbidden => "forbidden",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            RateLimited => "rate_limited",
            QuotaExceeded => "quota_exceeded",
            ConcurrencyLimited => "concurrency_limited",
            QueueFull => "queue_full",
            JobAlreadyFinished => "job_already_finished",
            IdempotencyKeyReused => "idempotency_key_reused",
            BatchAlreadyFinished => "batch_already_finished",
            QueueUnavailable => "queue_unavailable",
            StoreUnavailable => "store_unavailable",
            StorageUnavailable => "storage_unavailable",
            GuardUnavailable => "guard_unavailable",
            Internal => "internal",
            ModelError => "model_error",
            JobTooLarge => "job_too_large",
            AttemptsExhausted => "attempts_exhausted",
            DeadlineExceeded => "deadline_exceeded",
            DeadLettered => "dead_lettered",
            OutputValidationFailed => "output_validation_failed",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{code, message}`: the error of a failed job, and the body of every HTTP error
/// (wrapped as `{"error": {...}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_code() {
        // The derived schema's enum comes from the enum definition itself, so it names every
        // variant: `ALL` must name the same ones.
        let schema = serde_json::to_value(<ErrorCode as utoipa::PartialSchema>::schema())
            .expect("serialize");
        let derived: Vec<&str> = schema["enum"]
            .as_array()
            .expect("an enum schema")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let listed: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(derived, listed);
    }

    #[test]
    fn string_form_round_trips_through_serde() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(code).expect("serialize");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, *code);
        }
    }

    #[test]
    fn client_errors_are_4xx_and_outages_are_503() {
        for code in [
            ErrorCode::InvalidJson,
            ErrorCode::InvalidRequest,
            ErrorCode::InvalidParameter,
            ErrorCode::PayloadTooLarge,
            ErrorCode::ContextLengthExceeded,
            ErrorCode::Unauthorized,
            ErrorCode::NotFound,
            ErrorCode::RateLimited,
        ] {
            assert!((400..500).contains(&code.http_status()), "{code}");
        }
        assert_eq!(ErrorCode::QueueUnavailable.http_status(), 503);
        assert_eq!(ErrorCode::StoreUnavailable.http_status(), 503);
    }
}
