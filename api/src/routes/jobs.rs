//! `/v1/jobs`: submit, poll, cancel.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sluice_proto::{ErrorCode, TraceContext};
use sluice_shared::store::CancelOutcome;
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::PathParam;
use crate::state::AppState;
use crate::validate::{body_bytes, parse_body, validate};

/// `POST /v1/jobs` → 202 `{"id", "status": "queued"}`. With an `Idempotency-Key` seen in the
/// last 24 hours for the same request, the same answer for the same job, marked
/// `Idempotent-Replayed: true`; for a different request, 422 `idempotency_key_reused`.
#[tracing::instrument(skip_all, fields(tenant = %principal.tenant, job_id))]
pub async fn submit(
    principal: Principal,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let job = validate(parse_body(&body)?, &state.limits)?;
    let submitted = crate::submit::submit(&state, principal, peer, job, &headers).await?;
    let id = submitted.id;
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{id}"))],
        Json(json!({ "id": id, "status": "queued" })),
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

/// `GET /v1/jobs/{id}` → the job as its tenant sees it.
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

/// `DELETE /v1/jobs/{id}` cancels: a queued job is never generated; a running one stops at its
/// next token with `finish_reason: "cancelled"`.
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

/// The job's trace context. With OpenTelemetry export on, the current span's (which continues
/// the caller's trace, see [`crate::metrics::track`]); otherwise it continues the caller's W3C
/// trace id when it sent a valid `traceparent`, else starts one.
pub fn trace_context(headers: &HeaderMap) -> TraceContext {
    // The caller's vendor trace state, passed on as it came (bounded).
    let tracestate = || {
        headers
            .get("tracestate")
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 512)
            .map(str::to_string)
    };
    if let Some(traceparent) = sluice_shared::telemetry::traceparent_of(&tracing::Span::current()) {
        return TraceContext {
            traceparent: Some(traceparent),
            tracestate: tracestate(),
        };
    }
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_traceparent(v));
    let trace_id = match incoming {
        Some(tp) => tp[3..35].to_string(),
        None => hex::encode(rand::random::<[u8; 16]>()),
    };
    let span_id = hex::encode(rand::random::<[u8; 8]>());
    TraceContext {
        traceparent: Some(format!("00-{trace_id}-{span_id}-01")),
        tracestate: incoming.and_then(|_| tracestate()),
    }
}

fn valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1] != "0".repeat(32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_trace_and_replaces_an_invalid_one() {
        let mut headers = HeaderMap::new();
        let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
        headers.insert(
            "traceparent",
            format!("00-{tid}-00f067aa0ba902b7-01")
                .parse()
                .expect("header"),
        );
        let tp = trace_context(&headers).traceparent.expect("set");
        assert!(tp.starts_with(&format!("00-{tid}-")));
        assert!(valid_traceparent(&tp));

        headers.insert("traceparent", "garbage".parse().expect("header"));
        let tp = trace_context(&headers).traceparent.expect("set");
        assert!(valid_traceparent(&tp));
        assert!(!tp.contains(tid));
    }
}
