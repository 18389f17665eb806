//! The OpenAI-compatible surface: `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! A chat completion is a job like any other: the same authentication, guard, rate limits,
//! quotas and queue as `POST /v1/jobs` (the request converts once into the
//! [`crate::validate::JobRequest`] both routes validate, through [`crate::extract::ValidJob`],
//! then goes through [`crate::submit`]). Without `stream`, the handler waits for
//! the job (up to `--completion-wait-secs`, then it answers 202 with the job's id to poll on
//! `/v1/jobs/{id}`); with `stream`, the job's token stream is relayed as OpenAI
//! `chat.completion.chunk` events ending with `data: [DONE]`. Errors use OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`) with Sluice's stable codes in `code`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_proto::{
    ErrorBody, ErrorCode, FinishReason, JobStatus, JobView, Message, Priority, ResponseFormat,
    Role, Usage,
};
use utoipa::ToSchema;
use uuid::Uuid;

use super::events::{JobEvent, job_events};
use super::jobs::TraceHeaders;
use crate::error::ApiError;
use crate::extract::{SubmitWire, ValidJob};
use crate::openapi::openai::{ChatCompletion, ChatCompletionPending};
use crate::openapi::{consts, error_responses};
use crate::principal::Principal;
use crate::state::AppState;
use crate::validate::{JobRequest, StopField};

/// An [`ApiError`] rendered in OpenAI's error shape (same status and headers).
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

/// OpenAI's error `type` for a status.
pub(crate) fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// An error body in OpenAI's shape (its `type` follows the code's HTTP status); described by
/// [`crate::openapi::openai::OpenAiErrorResponse`].
pub(crate) fn error_json(body: &ErrorBody) -> Value {
    let status =
        StatusCode::from_u16(body.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json!({
        "error": {
            "message": body.message,
            "type": error_type(status),
            "param": Value::Null,
            "code": body.code,
        }
    })
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let shaped = error_json(&self.0.body());
        // Status and headers (Retry-After, RateLimit-*) stay those of Sluice's own response.
        let mut response = self.0.into_response();
        *response.body_mut() = axum::body::Body::from(shaped.to_string());
        response
            .headers_mut()
            .remove(axum::http::header::CONTENT_LENGTH);
        response
    }
}

/// Message content: a string, or a list of parts of which only text is supported.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(as = ChatContent)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A part of a message's content; only `text` parts are accepted (400
/// `unsupported_parameter` otherwise). Their texts are joined.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = ChatContentPart)]
struct ContentPart {
    #[serde(rename = "type")]
    #[schema(schema_with = consts::text)]
    kind: String,
    #[schema(required = true, nullable = false)]
    text: Option<String>,
}

/// One message. Unknown fields are refused like the request's own; `name` is ignored, and the
/// fields an assistant message from an OpenAI response carries back (`refusal`, `tool_calls`)
/// are accepted when null or empty, refused otherwise.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: Role,
    content: Content,
    /// Accepted and ignored (a speaker's name), as in OpenAI's API.
    #[allow(dead_code)]
    name: Option<String>,
    /// Accepted when `null` (as an assistant message from an earlier response carries it).
    #[schema(schema_with = schema::null)]
    refusal: Option<Value>,
    /// Accepted when `null` or empty (as an assistant message from an earlier response
    /// carries it).
    #[schema(schema_with = schema::no_tool_calls)]
    tool_calls: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
struct StreamOptions {
    /// End the stream with a chunk that carries the usage.
    include_usage: Option<bool>,
}

/// The body of `POST /v1/chat/completions`. Fields Sluice does not implement are rejected by
/// name (400 `unsupported_parameter`) rather than silently ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    /// The id `GET /v1/models` lists; another is 404 `model_not_found`.
    model: String,
    /// At most `--max-messages`, each at most `--max-message-chars` characters, not all empty.
    #[schema(min_items = 1)]
    messages: Vec<ChatMessage>,
    /// Upper bound on generated tokens: 1 to `--max-tokens-limit`; default 256. Not with
    /// `max_completion_tokens`.
    #[schema(minimum = 1, maximum = 4294967295_u64)]
    max_tokens: Option<u32>,
    /// The same as `max_tokens`; give one of them.
    #[schema(minimum = 1, maximum = 4294967295_u64)]
    max_completion_tokens: Option<u32>,
    #[schema(minimum = 0.0, maximum = 2.0)]
    temperature: Option<f32>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    top_p: Option<f32>,
    #[schema(maximum = 18446744073709551615_u64)]
    seed: Option<u64>,
    stop: Option<StopField>,
    /// Only one choice per request: `1` or `null`.
    #[schema(schema_with = schema::one)]
    n: Option<u32>,
    /// Stream `chat.completion.chunk` events instead of waiting for the completion.
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// OpenAI's `response_format`; 400 `invalid_response_format` when malformed.
    #[schema(value_type = Option<ResponseFormat>)]
    response_format: Option<Value>,
    /// An end-user id; recorded nowhere (Sluice's audit log keys on the credential).
    #[allow(dead_code)]
    user: Option<String>,
    /// Only `0` (or `null`) is accepted.
    #[schema(schema_with = schema::zero)]
    presence_penalty: Option<f32>,
    /// Only `0` (or `null`) is accepted.
    #[schema(schema_with = schema::zero)]
    frequency_penalty: Option<f32>,
    /// Not returned by this server: only `false` (or `null`) is accepted.
    #[schema(schema_with = schema::not_true)]
    logprobs: Option<bool>,
    /// Not returned by this server: only `null` is accepted.
    #[schema(schema_with = schema::null)]
    top_logprobs: Option<u32>,
    /// Not applied by this server: only `null` is accepted.
    #[schema(schema_with = schema::null)]
    logit_bias: Option<Value>,
    /// Tool calls are not implemented: only `null` is accepted.
    #[schema(schema_with = schema::null)]
    tools: Option<Value>,
    /// Tool calls are not implemented: only `null` is accepted.
    #[schema(schema_with = schema::null)]
    tool_choice: Option<Value>,
    /// Sluice extensions, as on `/v1/jobs`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$")]
    session_id: Option<String>,
    priority: Option<Priority>,
    #[schema(minimum = 1, maximum = 18446744073709551615_u64)]
    timeout_secs: Option<u64>,
}

/// Schemas of the request fields that accept only what this server can honour.
mod schema {
    use serde_json::json;
    use utoipa::openapi::schema::{Array, ArrayBuilder, Object, ObjectBuilder, SchemaType, Type};

    fn only(values: serde_json::Value, description: &str) -> Object {
        ObjectBuilder::new()
            .schema_type(SchemaType::AnyValue)
            .enum_values(values.as_array().cloned())
            .description(Some(description))
            .build()
    }

    pub(super) fn null() -> Object {
        let mut schema = crate::openapi::consts::null();
        schema.description = Some("Not implemented here: only `null` is accepted.".into());
        schema
    }

    pub(super) fn one() -> Object {
        only(
            json!([1, null]),
            "One choice per request: only `1` (or `null`).",
        )
    }

    pub(super) fn zero() -> Object {
        only(json!([0, null]), "Not applied here: only `0` (or `null`).")
    }

    pub(super) fn not_true() -> Object {
        only(
            json!([false, null]),
            "Log probabilities are not returned: only `false` (or `null`).",
        )
    }

    pub(super) fn no_tool_calls() -> Array {
        ArrayBuilder::new()
            .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
            .items(ObjectBuilder::new().schema_type(SchemaType::AnyValue))
            .max_items(Some(0))
            .description(Some(
                "Accepted when `null` or empty, as an assistant message from an earlier \
                 response carries it.",
            ))
            .build()
    }
}

fn unsupported(name: &str, why: &str) -> ApiError {
    ApiError::client(
        ErrorCode::UnsupportedParameter,
        format!("{name} is not supported: {why}"),
    )
}

/// How a chat completion is answered: streamed (`stream`), with a last usage chunk
/// (`stream_options.include_usage`), or as one body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub stream: bool,
    pub include_usage: bool,
}

impl SubmitWire for ChatCompletionRequest {
    type Extra = Delivery;

    /// The job this request describes, or a 400 naming what cannot be honoured.
    fn into_request(self, served_model: &str) -> Result<(JobRequest, Delivery), ApiError> {
        if self.model != served_model {
            return Err(ApiError::client(
                ErrorCode::ModelNotFound,
                format!(
                    "model {:?} is not served here; GET /v1/models lists {served_model:?}",
                    self.model
                ),
            ));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(unsupported("n", "one choice per request"));
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0)
            || self.frequency_penalty.is_some_and(|p| p != 0.0)
        {
            return Err(unsupported(
                "presence_penalty/frequency_penalty",
                "use repetition_penalty on /v1/jobs",
            ));
        }
        if self.logprobs == Some(true) || self.top_logprobs.is_some() {
            return Err(unsupported("logprobs", "not returned by this server"));
        }
        if self.logit_bias.is_some() {
            return Err(unsupported("logit_bias", "not applied by this server"));
        }
        if self.tools.is_some() || self.tool_choice.is_some() {
            return Err(unsupported("tools", "tool calls are not implemented"));
        }
        let response_format = match self.response_format {
            None => None,
            Some(format) => Some(serde_json::from_value::<ResponseFormat>(format).map_err(
                |e| {
                    ApiError::client(
                        ErrorCode::InvalidResponseFormat,
                        format!("response_format: {e}"),
                    )
                },
            )?),
        };
        if self.max_tokens.is_some() && self.max_completion_tokens.is_some() {
            return Err(ApiError::client(
                ErrorCode::InvalidParameter,
                "give max_tokens or max_completion_tokens, not both",
            ));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for m in self.messages {
            if m.refusal.as_ref().is_some_and(|r| !r.is_null()) {
                return Err(unsupported(
                    "a message's refusal",
                    "send the text as content",
                ));
            }
            if m.tool_calls
                .as_ref()
                .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
            {
                return Err(unsupported("tool_calls", "tools are not supported"));
            }
            let content = match m.content {
                Content::Text(t) => t,
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(unsupported(
                                    &format!("content part {kind:?}"),
                                    "only text parts are accepted",
                                ));
                            }
                        }
                    }
                    text
                }
            };
            messages.push(Message {
                role: m.role,
                content,
            });
        }
        let include_usage = self
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let request = JobRequest {
            messages,
            max_tokens: self.max_tokens.or(self.max_completion_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: None,
            seed: self.seed,
            stop: StopField::list(self.stop),
            repetition_penalty: None,
            ignore_eos: None,
            session_id: self.session_id,
            response_format,
            priority: self.priority,
            timeout_secs: self.timeout_secs,
            webhook: false,
        };
        Ok((
            request,
            Delivery {
                stream: self.stream,
                include_usage,
            },
        ))
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length | FinishReason::ContextLength => "length",
        FinishReason::Stop | FinishReason::Cancelled | FinishReason::Deadline => "stop",
        FinishReason::ContentFilter => "content_filter",
    }
}

fn created(view: &JobView) -> u64 {
    view.created_at / 1000
}

fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": usage.cached_tokens },
    })
}

/// Why a terminal job has no completion to show: its error, or its status.
fn job_error(view: &JobView) -> ErrorBody {
    view.error.clone().unwrap_or_else(|| {
        ErrorBody::new(
            ErrorCode::JobAlreadyFinished,
            format!("the job ended with status {}", view.status.as_str()),
        )
    })
}

/// A terminal job as a `chat.completion`, or the job's error in OpenAI's shape.
pub(crate) fn completion(view: &JobView, model: &str) -> Result<Value, ApiError> {
    match (&view.status, &view.result) {
        (JobStatus::Succeeded | JobStatus::Cancelled, Some(result)) => Ok(json!({
            "id": format!("chatcmpl-{}", view.id),
            "object": "chat.completion",
            "created": created(view),
            "model": model,
            "system_fingerprint": Value::Null,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": result.content },
                "logprobs": Value::Null,
                "finish_reason": finish_reason(result.finish_reason),
            }],
            "usage": usage_json(result.usage),
        })),
        _ => Err(ApiError::Client(job_error(view))),
    }
}

error_responses!(ChatCompletionErrors: OpenAi, User, super::jobs::SUBMIT_CODES, [
    // Only here (the request's own are the submit path's, as on `POST /v1/jobs`).
    UnsupportedParameter,
    ModelNotFound,
    NotFound,
    // The job's own error, when it failed while the request waited for it.
    JobAlreadyFinished,
    JobTooLarge,
    ModelError,
    AttemptsExhausted,
    DeadLettered,
    DeadlineExceeded,
    OutputValidationFailed,
]);

/// `POST /v1/chat/completions`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    operation_id = "create_chat_completion",
    tag = "openai",
    summary = "Create a chat completion (OpenAI-compatible)",
    description = "A job like any other (the same authentication, guard, limits, quotas and \
                   queue as `POST /v1/jobs`), in OpenAI's shapes. Without `stream`, waits for \
                   the job up to `--completion-wait-secs`: 200 with the completion, the job's \
                   own error if it failed, or 202 with the job to poll on `/v1/jobs/{id}` if \
                   it is still queued or running. With `stream`, `chat.completion.chunk` \
                   events (each `data:` a `ChatCompletionChunk`, or an `OpenAiErrorResponse` \
                   if the job fails mid-stream) ending with `data: [DONE]`. Errors come in \
                   OpenAI's envelope with Sluice's stable code in `code`.",
    security(("bearer" = [])),
    params(
        (
            "Idempotency-Key" = Option<String>,
            Header,
            description = "As on `POST /v1/jobs`: a retry within 24 hours gets the same job.",
            min_length = 1,
            max_length = 255,
            pattern = "^[!-~]+$",
            nullable = false,
        ),
        TraceHeaders,
    ),
    request_body(content = ChatCompletionRequest, content_type = "application/json"),
    responses(
        (
            status = 200,
            description = "The completion (`application/json`), or with `stream` its chunks \
                           (`text/event-stream`).",
            content(
                (ChatCompletion = "application/json"),
                (crate::openapi::schemas::SseEvent = "text/event-stream"),
            ),
        ),
        (
            status = 202,
            description = "The job outlived the wait: poll it.",
            body = ChatCompletionPending,
            headers(("Location" = String, description = "`/v1/jobs/{id}`: where to poll the job.")),
        ),
        ChatCompletionErrors,
    ),
)]
#[tracing::instrument(skip_all, fields(tenant, job_id))]
pub async fn chat_completions(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    valid: Result<ValidJob<ChatCompletionRequest>, ApiError>,
) -> Result<Response, OpenAiError> {
    let principal = principal?;
    tracing::Span::current().record("tenant", principal.tenant.as_str());
    let ValidJob {
        job,
        extra: Delivery {
            stream,
            include_usage,
        },
    } = valid?;
    let model = state.codec.name.clone();
    let tenant = principal.tenant.clone();
    let id = crate::submit::submit(&state, principal, peer, job, &headers)
        .await?
        .id;
    if stream {
        return Ok(relay(state, tenant, id, model, include_usage)
            .await?
            .into_response());
    }
    let deadline = tokio::time::Instant::now() + state.limits.completion_wait;
    let mut pause = Duration::from_millis(10);
    loop {
        let view = state
            .store
            .get(&tenant, &id)
            .await
            .map_err(ApiError::from)?
            .ok_or(ApiError::NotFound)?;
        if view.status.is_terminal() {
            return Ok(Json(completion(&view, &model)?).into_response());
        }
        if tokio::time::Instant::now() >= deadline {
            // Still queued or running: the client polls the job instead.
            return Ok((
                StatusCode::ACCEPTED,
                [(axum::http::header::LOCATION, format!("/v1/jobs/{id}"))],
                Json(pending(id, view.status)),
            )
                .into_response());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The 202 body of a completion whose job outlived the wait.
fn pending(id: Uuid, status: JobStatus) -> Value {
    json!({
        "id": id,
        "object": "sluice.job",
        "status": status,
        "poll": format!("/v1/jobs/{id}"),
    })
}

/// The last chunk of a stream that asked for usage: no choices, the usage.
fn usage_chunk(id: Uuid, created: u64, model: &str, usage: Usage) -> Value {
    let mut last = chunk(id, created, model, json!({}), None);
    last["choices"] = json!([]);
    last["usage"] = usage_json(usage);
    last
}

fn chunk(id: Uuid, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [{ "index": 0, "delta": delta, "logprobs": Value::Null, "finish_reason": finish }],
    })
}

/// The job's events as OpenAI chunks: the role first, then text, then the finish reason
/// (and usage when asked), then `[DONE]`. A job that fails mid-stream ends with an error
/// object in OpenAI's shape before `[DONE]`.
async fn relay(
    state: AppState,
    tenant: String,
    id: Uuid,
    model: String,
    include_usage: bool,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let created = sluice_proto::now_ms() / 1000;
    let events = job_events(state, tenant, id, "0-0".to_string()).await?;
    let first = futures_util::stream::once({
        let model = model.clone();
        async move {
            chunk(
                id,
                created,
                &model,
                json!({ "role": "assistant", "content": "" }),
                None,
            )
        }
    });
    let body = events.flat_map(move |event| {
        let out: Vec<Value> = match event {
            JobEvent::Text { text, .. } => {
                vec![chunk(id, created, &model, json!({ "content": text }), None)]
            }
            JobEvent::Done { job: None, .. } => Vec::new(),
            JobEvent::Done {
                job: Some(view), ..
            } => match &view.result {
                Some(result) => {
                    let reason = finish_reason(result.finish_reason);
                    let mut out = vec![chunk(id, created, &model, json!({}), Some(reason))];
                    if include_usage {
                        out.push(usage_chunk(id, created, &model, result.usage));
                    }
                    out
                }
                None => vec![error_json(&job_error(&view))],
            },
        };
        futures_util::stream::iter(out)
    });
    let done = futures_util::stream::once(async { Event::default().data("[DONE]") });
    let stream = first
        .chain(body)
        .map(|v| Event::default().data(v.to_string()))
        .chain(done)
        .map(Ok);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// `GET /v1/models` in OpenAI's list shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    #[schema(schema_with = consts::list)]
    object: &'static str,
    /// The one model this deployment serves.
    #[schema(min_items = 1, max_items = 1)]
    data: Vec<Model>,
}

/// A served model.
#[derive(Debug, Serialize, ToSchema)]
pub struct Model {
    /// What `model` must name in a chat completion.
    id: String,
    #[schema(schema_with = consts::model)]
    object: &'static str,
    /// Always 0.
    created: u64,
    #[schema(schema_with = consts::sluice)]
    owned_by: &'static str,
}

error_responses!(ModelsErrors: OpenAi, User, []);

/// `GET /v1/models`: the one model this deployment serves.
#[utoipa::path(
    get,
    path = "/v1/models",
    operation_id = "list_models",
    tag = "openai",
    summary = "The served model (OpenAI-compatible)",
    description = "The one model this deployment serves, in OpenAI's list shape.",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The served model.", body = ModelList),
        ModelsErrors,
    ),
)]
pub async fn models(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
) -> Result<Response, OpenAiError> {
    principal?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![Model {
            id: state.codec.name.clone(),
            object: "model",
            created: 0,
            owned_by: "sluice",
        }],
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<(JobRequest, bool, bool), ErrorCode> {
        crate::validate::parse_json::<ChatCompletionRequest>(body.as_bytes())
            .and_then(|r| r.into_request("qwen"))
            .map(|(r, d)| (r, d.stream, d.include_usage))
            .map_err(|e| e.body().code)
    }

    #[test]
    fn translates_openai_requests() {
        let (s, stream, usage) = parse(
            r#"{"model":"qwen","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]}],
                "max_completion_tokens":5,"stream":true,"stream_options":{"include_usage":true},
                "stop":["\n"],"seed":3,"user":"u1","n":1,"response_format":{"type":"text"}}"#,
        )
        .expect("valid");
        assert!(stream && usage);
        assert_eq!(s.max_tokens, Some(5));
        assert_eq!(s.messages[1].content, "hi there");
        assert_eq!(s.seed, Some(3));
    }

    /// What this module writes matches the document's schemas of it
    /// ([`crate::openapi::openai`]).
    #[test]
    fn its_json_matches_the_documented_shapes() {
        use crate::openapi::tests::assert_matches_schema;
        use sluice_proto::{JobResult, Timings};

        let id = Uuid::now_v7();
        let view = |status, result, error| JobView {
            id,
            status,
            created_at: 1_700_000_000_000,
            started_at: Some(1_700_000_000_001),
            finished_at: Some(1_700_000_000_002),
            attempts: 1,
            result,
            error,
        };
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            cached_tokens: 0,
        };
        for reason in [
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::ContextLength,
            FinishReason::Cancelled,
            FinishReason::Deadline,
            FinishReason::ContentFilter,
        ] {
            let result = JobResult {
                content: "hi".into(),
                finish_reason: reason,
                usage,
                timings: Timings::default(),
            };
            let done = view(JobStatus::Succeeded, Some(result), None);
            let completion = completion(&done, "qwen").expect("a completion");
            assert_matches_schema("ChatCompletion", &completion);
            let last = chunk(id, 1, "qwen", json!({}), Some(finish_reason(reason)));
            assert_matches_schema("ChatCompletionChunk", &last);
        }
        for delta in [
            json!({ "role": "assistant", "content": "" }),
            json!({ "content": "x" }),
        ] {
            assert_matches_schema("ChatCompletionChunk", &chunk(id, 1, "qwen", delta, None));
        }
        assert_matches_schema("ChatCompletionChunk", &usage_chunk(id, 1, "qwen", usage));
        for status in [JobStatus::Queued, JobStatus::Running] {
            assert_matches_schema("ChatCompletionPending", &pending(id, status));
        }
        for code in ErrorCode::ALL {
            let error = error_json(&ErrorBody::new(*code, "m"));
            assert_matches_schema("OpenAiErrorResponse", &error);
        }
        let expired = view(JobStatus::Expired, None, None);
        assert_eq!(
            completion(&expired, "qwen")
                .map_err(|e| e.body().code)
                .err(),
            Some(ErrorCode::JobAlreadyFinished)
        );
    }

    #[test]
    fn rejects_what_it_cannot_honour_by_name() {
        use ErrorCode::*;
        let m = r#""messages":[{"role":"user","content":"x"}]"#;
        let cases = [
            (format!(r#"{{"model":"gpt-4",{m}}}"#), ModelNotFound),
            (
                format!(r#"{{"model":"qwen",{m},"n":2}}"#),
                UnsupportedParameter,
            ),
            (
                format!(r#"{{"model":"qwen",{m},"logprobs":true}}"#),
                UnsupportedParameter,
            ),
            (
                format!(r#"{{"model":"qwen",{m},"tools":[]}}"#),
                UnsupportedParameter,
            ),
            (
                format!(r#"{{"model":"qwen",{m},"max_tokens":1,"max_completion_tokens":1}}"#),
                InvalidParameter,
            ),
            (
                format!(r#"{{"model":"qwen",{m},"frobnicate":1}}"#),
                InvalidRequest,
            ),
            (
                r#"{"model":"qwen","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#
                    .to_string(),
                UnsupportedParameter,
            ),
        ];
        for (body, code) in cases {
            assert_eq!(parse(&body).err(), Some(code), "{body}");
        }
    }
}
