//! The OpenAI-compatible surface: `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! A chat completion is a job like any other: the same authentication, guard, rate limits,
//! quotas and queue as `POST /v1/jobs` (the request is translated into a submit body and goes
//! through [`crate::validate`] and [`crate::submit`]). Without `stream`, the handler waits for
//! the job (up to `--completion-wait-secs`, then it answers 202 with the job's id to poll on
//! `/v1/jobs/{id}`); with `stream`, the job's token stream is relayed as OpenAI
//! `chat.completion.chunk` events ending with `data: [DONE]`. Errors use OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`) with Sluice's stable codes in `code`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_proto::{
    ErrorBody, ErrorCode, FinishReason, JobStatus, JobView, Message, Priority, ResponseFormat,
    Role, Usage,
};
use uuid::Uuid;

use super::events::{JobEvent, job_events};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;
use crate::validate::{StopField, SubmitRequest, body_bytes, parse_json, validate};

/// An [`ApiError`] rendered in OpenAI's error shape (same status and headers).
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

/// OpenAI's error `type` for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// An error body in OpenAI's shape (its `type` follows the code's HTTP status).
fn error_json(body: &ErrorBody) -> Value {
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
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// One message. Unknown fields are refused like the request's own; `name` is ignored, and the
/// fields an assistant message from an OpenAI response carries back (`refusal`, `tool_calls`)
/// are accepted when null or empty, refused otherwise.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: Role,
    content: Content,
    /// Accepted and ignored (a speaker's name), as in OpenAI's API.
    #[allow(dead_code)]
    name: Option<String>,
    refusal: Option<Value>,
    tool_calls: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The body of `POST /v1/chat/completions`. Fields Sluice does not implement are rejected by
/// name (400 `unsupported_parameter`) rather than silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatCompletionRequest {
    model: String,
    messages: Vec<ChatMessage>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<StopField>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    response_format: Option<Value>,
    /// An end-user id; recorded nowhere (Sluice's audit log keys on the credential).
    #[allow(dead_code)]
    user: Option<String>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    logit_bias: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    /// Sluice extensions, as on `/v1/jobs`.
    session_id: Option<String>,
    priority: Option<Priority>,
    timeout_secs: Option<u64>,
}

fn unsupported(name: &str, why: &str) -> ApiError {
    ApiError::client(
        ErrorCode::UnsupportedParameter,
        format!("{name} is not supported: {why}"),
    )
}

impl ChatCompletionRequest {
    /// The equivalent `/v1/jobs` body, or a 400 naming what cannot be honoured.
    fn into_submit(self, served_model: &str) -> Result<(SubmitRequest, bool, bool), ApiError> {
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
        let submit = SubmitRequest {
            messages,
            max_tokens: self.max_tokens.or(self.max_completion_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: None,
            seed: self.seed,
            stop: self.stop,
            repetition_penalty: None,
            ignore_eos: None,
            session_id: self.session_id,
            response_format,
            priority: self.priority,
            timeout_secs: self.timeout_secs,
        };
        Ok((submit, self.stream, include_usage))
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
fn completion(view: &JobView, model: &str) -> Result<Value, ApiError> {
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

/// `POST /v1/chat/completions`.
#[tracing::instrument(skip_all, fields(tenant, job_id))]
pub async fn chat_completions(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let principal = principal?;
    tracing::Span::current().record("tenant", principal.tenant.as_str());
    let body = body_bytes(body)?;
    let request: ChatCompletionRequest = parse_json(&body)?;
    let model = state.codec.name.clone();
    let (submit, stream, include_usage) = request.into_submit(&model)?;
    let job = validate(submit, &state.limits)?;
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
                Json(json!({
                    "id": id,
                    "object": "sluice.job",
                    "status": view.status,
                    "poll": format!("/v1/jobs/{id}"),
                })),
            )
                .into_response());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
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
                        let mut last = chunk(id, created, &model, json!({}), None);
                        last["choices"] = json!([]);
                        last["usage"] = usage_json(result.usage);
                        out.push(last);
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

/// `GET /v1/models`: the one model this deployment serves.
pub async fn models(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
) -> Result<Response, OpenAiError> {
    principal?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": state.codec.name,
            "object": "model",
            "created": 0,
            "owned_by": "sluice",
        }],
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<(SubmitRequest, bool, bool), ErrorCode> {
        parse_json::<ChatCompletionRequest>(body.as_bytes())
            .and_then(|r| r.into_submit("qwen"))
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
