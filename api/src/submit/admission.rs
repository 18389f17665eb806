//! The admission stage: the `Idempotency-Key`, the request's fingerprint, and one table from
//! the outcome of the `ADMIT` script to the client's answer and the audit log's reason.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use sluice_jobs::store::{AdmitOutcome, QuotaPeriod};
use sluice_proto::ErrorCode;
use uuid::Uuid;

use super::Rejection;
use crate::error::ApiError;
use crate::validate::ValidatedJob;

/// The header a client retries a submit with.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The `Idempotency-Key` of a request, if any: 1 to 255 visible ASCII characters.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(k) if (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(k))
        }
        _ => Err(ApiError::client(
            ErrorCode::InvalidParameter,
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )),
    }
}

/// The SHA-256 (hex) of what a request asks for, to tell a retry from a different request
/// under the same key.
pub(super) fn fingerprint(job: &ValidatedJob) -> String {
    let canonical = serde_json::to_vec(&(
        &job.messages,
        &job.params,
        &job.session_id,
        job.timeout.as_secs(),
        job.priority,
    ))
    .unwrap_or_default();
    hex::encode(Sha256::digest(&canonical))
}

/// What an admission outcome means for the request: `Ok(None)` admitted (go on and
/// publish), `Ok(Some(id))` an idempotent retry of the job `id` (answer with it, nothing new
/// was written), or the rejection and its audit reason. `reserve` and `created_at` go into
/// the quota error (what was asked for, and when the period resets).
pub(super) fn admitted(
    outcome: AdmitOutcome,
    reserve: u64,
    created_at: u64,
) -> Result<Option<Uuid>, Rejection> {
    match outcome {
        AdmitOutcome::Admitted => Ok(None),
        AdmitOutcome::Duplicate(existing) => Ok(Some(existing)),
        AdmitOutcome::QueueFull {
            tenant,
            queued,
            limit,
            retry_after_secs,
        } => Err((
            ApiError::QueueFull {
                tenant,
                queued,
                limit,
                retry_after_secs,
            },
            "queue_full",
        )),
        AdmitOutcome::IdempotencyMismatch => Err((
            ApiError::client(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used in the last 24 hours for a different request",
            ),
            "idempotency_key_reused",
        )),
        AdmitOutcome::ConcurrencyLimited { active, limit } => Err((
            ApiError::ConcurrencyLimited { active, limit },
            "concurrency_limited",
        )),
        AdmitOutcome::QuotaExceeded {
            period,
            used,
            limit,
        } => Err((
            ApiError::QuotaExceeded {
                period: period.as_str(),
                used,
                limit,
                reserve,
                reset_secs: sluice_jobs::calendar::seconds_until_reset(
                    created_at,
                    period == QuotaPeriod::Month,
                ),
            },
            "quota_exceeded",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_error_code_and_audit_reason() {
        let cases = [
            (
                AdmitOutcome::QueueFull {
                    tenant: true,
                    queued: 5,
                    limit: 5,
                    retry_after_secs: 2,
                },
                ErrorCode::QueueFull,
                "queue_full",
            ),
            (
                AdmitOutcome::IdempotencyMismatch,
                ErrorCode::IdempotencyKeyReused,
                "idempotency_key_reused",
            ),
            (
                AdmitOutcome::ConcurrencyLimited {
                    active: 3,
                    limit: 3,
                },
                ErrorCode::ConcurrencyLimited,
                "concurrency_limited",
            ),
            (
                AdmitOutcome::QuotaExceeded {
                    period: QuotaPeriod::Day,
                    used: 90,
                    limit: 100,
                },
                ErrorCode::QuotaExceeded,
                "quota_exceeded",
            ),
        ];
        for (outcome, code, reason) in cases {
            let (error, why) = admitted(outcome, 20, 0).expect_err("refused");
            assert_eq!((error.body().code, why), (code, reason));
        }
        assert_eq!(
            admitted(AdmitOutcome::Admitted, 20, 0).expect("admitted"),
            None
        );
        let id = Uuid::now_v7();
        assert_eq!(
            admitted(AdmitOutcome::Duplicate(id), 20, 0).expect("replayed"),
            Some(id)
        );
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_of_bounded_length() {
        let mut h = HeaderMap::new();
        assert_eq!(idempotency_key(&h).expect("absent"), None);
        h.insert(IDEMPOTENCY_KEY, "order-42".parse().expect("header"));
        assert_eq!(idempotency_key(&h).expect("valid"), Some("order-42"));
        for bad in ["", "a b", &"x".repeat(256)] {
            h.insert(IDEMPOTENCY_KEY, bad.parse().expect("header"));
            assert!(idempotency_key(&h).is_err(), "{bad:?}");
        }
    }
}
