//! Doc-only schemas of what the OpenAI-compatible routes write ([`crate::routes::openai`]
//! builds it as JSON, in OpenAI's shapes): the chat completion, its stream chunks, the 202 of
//! a completion that outlived the wait, and OpenAI's error envelope. The tests in
//! `routes/openai.rs` check the real output against them.

#![allow(dead_code)]

use sluice_proto::{ErrorCode, JobStatus};
use utoipa::ToSchema;
use uuid::Uuid;

use super::consts;

/// An error in OpenAI's envelope, with Sluice's stable code in `code`.
#[derive(ToSchema)]
pub struct OpenAiErrorResponse {
    error: OpenAiErrorBody,
}

/// OpenAI's error object.
#[derive(ToSchema)]
pub struct OpenAiErrorBody {
    message: String,
    #[serde(rename = "type")]
    #[schema(inline)]
    kind: OpenAiErrorType,
    /// Always `null`.
    #[schema(schema_with = consts::null, required = true)]
    param: Option<String>,
    code: ErrorCode,
}

/// Follows the HTTP status: `authentication_error` (401), `permission_error` (403),
/// `not_found_error` (404), `rate_limit_error` (429), `invalid_request_error` (other 4xx),
/// `server_error` (5xx).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(clippy::enum_variant_names)] // OpenAI's names.
enum OpenAiErrorType {
    AuthenticationError,
    PermissionError,
    NotFoundError,
    RateLimitError,
    InvalidRequestError,
    ServerError,
}

/// A finished completion (`object: "chat.completion"`).
#[derive(ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-<job id>`.
    #[schema(pattern = "^chatcmpl-")]
    id: String,
    #[schema(schema_with = consts::chat_completion)]
    object: String,
    /// When the job was accepted (seconds since the epoch).
    created: u64,
    model: String,
    #[schema(schema_with = consts::null, required = true)]
    system_fingerprint: Option<String>,
    /// Always one choice.
    #[schema(min_items = 1, max_items = 1)]
    choices: Vec<ChatCompletionChoice>,
    usage: CompletionUsage,
}

#[derive(ToSchema)]
pub struct ChatCompletionChoice {
    /// Always 0.
    index: u32,
    message: AssistantMessage,
    #[schema(schema_with = consts::null, required = true)]
    logprobs: Option<String>,
    #[schema(inline)]
    finish_reason: OpenAiFinishReason,
}

/// The generated text.
#[derive(ToSchema)]
pub struct AssistantMessage {
    #[schema(schema_with = consts::assistant)]
    role: String,
    content: String,
}

/// `stop` (end of turn, a stop sequence, a cancellation or the deadline), `length`
/// (`max_tokens` or the context is full) or `content_filter` (the output guard withheld it).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum OpenAiFinishReason {
    Stop,
    Length,
    ContentFilter,
}

#[derive(ToSchema)]
pub struct CompletionUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: PromptTokensDetails,
}

/// What the prompt's tokens were.
#[derive(ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens the worker took from its prefix cache (earlier jobs of the same tenant
    /// computed them) instead of computing them.
    cached_tokens: u32,
}

/// One `data:` event of a streamed completion (`object: "chat.completion.chunk"`): first the
/// role, then pieces of text, then the finish reason; with `stream_options.include_usage`, a
/// last chunk with no choices and the usage.
#[derive(ToSchema)]
pub struct ChatCompletionChunk {
    #[schema(pattern = "^chatcmpl-")]
    id: String,
    #[schema(schema_with = consts::chat_completion_chunk)]
    object: String,
    created: u64,
    model: String,
    #[schema(schema_with = consts::null, required = true)]
    system_fingerprint: Option<String>,
    /// One choice, or none on the usage chunk.
    #[schema(max_items = 1)]
    choices: Vec<ChatCompletionChunkChoice>,
    /// Only on the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    usage: Option<CompletionUsage>,
}

#[derive(ToSchema)]
pub struct ChatCompletionChunkChoice {
    index: u32,
    delta: ChatCompletionDelta,
    #[schema(schema_with = consts::null, required = true)]
    logprobs: Option<String>,
    /// Set on the last chunk with a choice.
    #[schema(required = true)]
    finish_reason: Option<OpenAiFinishReason>,
}

/// What a chunk adds: the role (first chunk), text, or nothing (the finishing chunk).
#[derive(ToSchema)]
pub struct ChatCompletionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = consts::assistant)]
    role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    content: Option<String>,
}

/// The job outlived `--completion-wait-secs`: poll it on `GET /v1/jobs/{id}`.
#[derive(ToSchema)]
pub struct ChatCompletionPending {
    id: Uuid,
    #[schema(schema_with = consts::sluice_job)]
    object: String,
    /// `queued` or `running`.
    status: JobStatus,
    /// `/v1/jobs/{id}`.
    poll: String,
}
