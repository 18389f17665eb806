//! The job message: what the API publishes and the worker consumes.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{ErrorBody, ErrorCode};

/// The version of [`JobMessage`] this build writes and reads. A worker dead-letters messages of
/// any other version instead of guessing at them.
pub const JOB_MESSAGE_VERSION: u32 = 1;

/// The longest stop sequence accepted, in bytes.
pub const MAX_STOP_SEQUENCE_BYTES: usize = 64;
/// How many stop sequences a job may carry.
pub const MAX_STOP_SEQUENCES: usize = 8;

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// How to generate. Defaults are what a client gets by leaving a field out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationParams {
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; `None` disables it.
    pub top_p: Option<f32>,
    /// Keep only the `k` most likely tokens; `None` disables it.
    pub top_k: Option<u32>,
    /// Seed of the sampler; the same seed, prompt and parameters give the same text.
    pub seed: Option<u64>,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// Penalty > 1 discourages repeating tokens already in the context; 1 disables it.
    pub repetition_penalty: f32,
    /// Keep generating past the model's end-of-turn tokens (benchmarks and tests that need a
    /// fixed output length, as vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// Structured output: the text must be JSON (of a schema). Part of the parameters, whose
    /// unknown fields a worker refuses, so a worker too old to constrain its output
    /// dead-letters the job instead of ignoring the format.
    #[serde(default, skip_serializing_if = "ResponseFormat::is_text")]
    pub response_format: ResponseFormat,
}

/// The shape the output must take, as in OpenAI's `response_format`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON that validates against a schema.
    JsonSchema { json_schema: JsonSchemaFormat },
}

impl ResponseFormat {
    pub fn is_text(&self) -> bool {
        matches!(self, ResponseFormat::Text)
    }

    /// The JSON Schema the output must match (`{"type": "object"}` for `json_object`).
    pub fn schema(&self) -> Option<serde_json::Value> {
        match self {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(serde_json::json!({"type": "object"})),
            ResponseFormat::JsonSchema { json_schema } => Some(json_schema.schema.clone()),
        }
    }
}

/// OpenAI's `json_schema` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema (an object).
    #[schema(value_type = Object)]
    pub schema: serde_json::Value,
    /// Accepted for compatibility; output is always constrained to the schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.7,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            repetition_penalty: 1.0,
            ignore_eos: false,
            response_format: ResponseFormat::Text,
        }
    }
}

impl GenerationParams {
    /// Checks every range. The API calls it at the edge and the worker again on decode, so a
    /// message that did not come through the API is held to the same rules.
    pub fn validate(&self, max_tokens_limit: u32) -> Result<(), ErrorBody> {
        let bad = |message: String| Err(ErrorBody::new(ErrorCode::InvalidParameter, message));
        if self.max_tokens == 0 || self.max_tokens > max_tokens_limit {
            return bad(format!(
                "max_tokens must be between 1 and {max_tokens_limit}, got {}",
                self.max_tokens
            ));
        }
        if !self.temperature.is_finite() || !(0.0..=2.0).contains(&self.temperature) {
            return bad(format!(
                "temperature must be between 0 and 2, got {}",
                self.temperature
            ));
        }
        if let Some(top_p) = self.top_p
            && (!top_p.is_finite() || top_p <= 0.0 || top_p > 1.0)
        {
            return bad(format!("top_p must be in (0, 1], got {top_p}"));
        }
        if let Some(top_k) = self.top_k
            && top_k == 0
        {
            return bad("top_k must be at least 1".to_string());
        }
        if !self.repetition_penalty.is_finite() || !(0.5..=2.0).contains(&self.repetition_penalty) {
            return bad(format!(
                "repetition_penalty must be between 0.5 and 2, got {}",
                self.repetition_penalty
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return bad(format!(
                "at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {}",
                self.stop.len()
            ));
        }
        if let Some(s) = self
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_SEQUENCE_BYTES)
        {
            return bad(format!(
                "stop sequences must be 1 to {MAX_STOP_SEQUENCE_BYTES} bytes, got {} bytes",
                s.len()
            ));
        }
        Ok(())
    }
}

/// Scheduling class. Interactive jobs are served first: a worker takes a batch job only when
/// it has room and no interactive job is waiting.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    pub const ALL: [Priority; 2] = [Priority::Interactive, Priority::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }

    /// The class [`Priority::as_str`] names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// How a job's turn joins its session's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTurn {
    /// Index in `messages` of the first message this turn adds (earlier ones came from the
    /// history, or are the system prompt).
    pub turn_start: u32,
    /// The request carried a system prompt, which replaces the stored one.
    pub system: bool,
    /// The history's lifetime, renewed by each turn.
    pub ttl_secs: u64,
    /// Messages kept (oldest dropped first; the system prompt is kept apart).
    pub max_messages: u32,
}

/// W3C trace context, carried so one trace follows a job across the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// The message on the job queue. Unknown fields are ignored (a newer API may add optional
/// ones); an unknown `v` is not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    pub v: u32,
    pub id: Uuid,
    pub tenant: String,
    #[serde(default)]
    pub session_id: Option<String>,
    /// Set when the job is a turn of a stored conversation: what the worker appends to the
    /// session's history when the job succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionTurn>,
    /// The queue the job went to.
    #[serde(default)]
    pub priority: Priority,
    pub messages: Vec<Message>,
    pub params: GenerationParams,
    /// When the API accepted the job (ms since the epoch).
    pub created_at: u64,
    /// After this instant (ms since the epoch) the job is not started, and a running one stops.
    pub deadline: u64,
    /// 1 for the first publish. Redeliveries are counted in the job record, not here.
    pub attempt: u32,
    #[serde(default)]
    pub trace: TraceContext,
    /// Set when the API's injection classifier scored the request inside its tenant's grey
    /// band (`injection_judge_from` up to `classifier_threshold`): before generating, the
    /// worker asks the served model whether the request is a prompt injection, and a "yes"
    /// ends the job as `prompt_injection_detected`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub judge: bool,
    /// Whether the worker may reuse prompt pages its tenant's earlier jobs computed (the
    /// prefix cache, keyed by tenant); a tenant's policy can turn it off.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub prefix_cache: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl JobMessage {
    /// A job that does not come through the queue (the worker's benchmarks and command-line
    /// tools, tests): interactive, attempt 1, no deadline, no session, trace or judge.
    pub fn local(tenant: &str, messages: Vec<Message>, params: GenerationParams) -> Self {
        Self {
            v: JOB_MESSAGE_VERSION,
            id: Uuid::now_v7(),
            tenant: tenant.to_string(),
            session_id: None,
            session: None,
            priority: Priority::Interactive,
            messages,
            params,
            created_at: crate::now_ms(),
            deadline: u64::MAX,
            attempt: 1,
            trace: TraceContext::default(),
            judge: false,
            prefix_cache: true,
        }
    }

    /// Decodes a queue payload, refusing other versions.
    pub fn decode(payload: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        let version: Version =
            serde_json::from_slice(payload).map_err(|e| format!("not a job message: {e}"))?;
        if version.v != JOB_MESSAGE_VERSION {
            return Err(format!(
                "job message version {} is not supported (this build reads {JOB_MESSAGE_VERSION})",
                version.v
            ));
        }
        serde_json::from_slice(payload).map_err(|e| format!("malformed job message: {e}"))
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JobMessage {
        JobMessage {
            v: JOB_MESSAGE_VERSION,
            id: Uuid::now_v7(),
            tenant: "acme".into(),
            session_id: None,
            session: None,
            priority: Priority::Interactive,
            messages: vec![Message {
                role: Role::User,
                content: "hi".into(),
            }],
            params: GenerationParams::default(),
            created_at: 1,
            deadline: 2,
            attempt: 1,
            trace: TraceContext::default(),
            judge: false,
            prefix_cache: true,
        }
    }

    #[test]
    fn round_trips() {
        let job = sample();
        assert_eq!(JobMessage::decode(&job.encode()).expect("decode"), job);
        let judged = JobMessage {
            judge: true,
            ..sample()
        };
        assert_eq!(
            JobMessage::decode(&judged.encode()).expect("decode"),
            judged
        );
    }

    #[test]
    fn the_judge_flag_is_left_out_unless_set() {
        // A message without it (from an API that predates it) reads as `false`.
        let encoded = String::from_utf8(sample().encode()).expect("utf-8");
        assert!(!encoded.contains("judge"), "{encoded}");
        let judged = JobMessage {
            judge: true,
            ..sample()
        };
        assert!(
            String::from_utf8(judged.encode())
                .expect("utf-8")
                .contains("\"judge\":true")
        );
    }

    #[test]
    fn the_prefix_cache_flag_is_on_unless_turned_off() {
        // A message without it (from an API that predates it) may use the cache.
        let encoded = String::from_utf8(sample().encode()).expect("utf-8");
        assert!(!encoded.contains("prefix_cache"), "{encoded}");
        assert!(
            JobMessage::decode(encoded.as_bytes())
                .expect("decode")
                .prefix_cache
        );
        let off = JobMessage {
            prefix_cache: false,
            ..sample()
        };
        let decoded = JobMessage::decode(&off.encode()).expect("decode");
        assert!(!decoded.prefix_cache);
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let mut job = sample();
        job.v = 2;
        assert!(JobMessage::decode(&job.encode()).is_err());
        assert!(JobMessage::decode(b"\xff\xfe").is_err());
        assert!(JobMessage::decode(b"{}").is_err());
    }

    #[test]
    fn validation_rejects_out_of_range() {
        let ok = GenerationParams::default();
        assert!(ok.validate(8192).is_ok());
        let cases = [
            GenerationParams {
                max_tokens: 0,
                ..ok.clone()
            },
            GenerationParams {
                max_tokens: 8193,
                ..ok.clone()
            },
            GenerationParams {
                temperature: f32::NAN,
                ..ok.clone()
            },
            GenerationParams {
                temperature: 2.5,
                ..ok.clone()
            },
            GenerationParams {
                top_p: Some(0.0),
                ..ok.clone()
            },
            GenerationParams {
                top_k: Some(0),
                ..ok.clone()
            },
            GenerationParams {
                repetition_penalty: 0.0,
                ..ok.clone()
            },
            GenerationParams {
                stop: vec![String::new()],
                ..ok.clone()
            },
        ];
        for case in cases {
            let err = case.validate(8192).expect_err("must be rejected");
            assert_eq!(err.code, ErrorCode::InvalidParameter);
        }
    }
}
