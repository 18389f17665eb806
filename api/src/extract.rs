//! Extractors whose rejections are Sluice errors (JSON body, stable code) instead of axum's
//! plain-text ones: a path parameter that is not UTF-8, a missing or malformed query, and a
//! submit body ([`ValidJob`]) that is unreadable, malformed or out of limits.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use sluice_proto::ErrorCode;

use crate::error::ApiError;
use crate::state::AppState;
use crate::validate::{JobRequest, SubmitRequest, ValidatedJob, body_bytes, parse_json, validate};

/// The one path parameter of a route, as text.
#[derive(Debug)]
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| PathParam(p))
            .map_err(|e| ApiError::client(ErrorCode::InvalidParameter, e.body_text()))
    }
}

/// A route's query parameters.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryParams(q))
            .map_err(|e| ApiError::client(ErrorCode::InvalidParameter, e.body_text()))
    }
}

/// A submit body in one wire format (`POST /v1/jobs`' [`SubmitRequest`] or the OpenAI
/// route's chat completion request), parsed and then converted, once, into the [`JobRequest`]
/// every submit path validates.
pub trait SubmitWire: DeserializeOwned {
    /// What the format carries beside the job (the OpenAI route's stream options).
    type Extra;
    /// The job, or the 4xx naming what this server cannot honour. `served_model` is the model
    /// this deployment serves.
    fn into_request(self, served_model: &str) -> Result<(JobRequest, Self::Extra), ApiError>;
}

impl SubmitWire for SubmitRequest {
    type Extra = ();
    fn into_request(self, _served_model: &str) -> Result<(JobRequest, ()), ApiError> {
        Ok((self.into(), ()))
    }
}

/// The common opening of the submit handlers: the body read within its limit, parsed in its
/// wire format, converted and validated against this deployment's limits. Every refusal is a
/// 4xx with a code; nothing has been written or counted yet.
#[derive(Debug)]
pub struct ValidJob<W: SubmitWire> {
    pub job: ValidatedJob,
    pub extra: W::Extra,
}

impl<W: SubmitWire> FromRequest<AppState> for ValidJob<W> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let body = body_bytes(Bytes::from_request(req, state).await)?;
        let (request, extra) = parse_json::<W>(&body)?.into_request(&state.codec.name)?;
        Ok(Self {
            job: validate(request, &state.limits)?,
            extra,
        })
    }
}
