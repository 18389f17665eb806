//! Validation at the edge: a submitted body becomes a [`ValidatedJob`] or a 4xx with a code.

use std::time::Duration;

use serde::Deserialize;
use sluice_proto::{ErrorCode, GenerationParams, Message, Priority, ResponseFormat};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
use utoipa::openapi::{RefOr, Schema};

use crate::error::ApiError;

/// The limits a submit is checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_tokens_limit: u32,
    pub max_messages: usize,
    pub max_message_chars: usize,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// How long a non-streaming chat completion waits for its job.
    pub completion_wait: Duration,
    /// Queued jobs allowed across all tenants (`None` = unlimited).
    pub max_queued_jobs: Option<u32>,
    pub session_ttl: Duration,
    pub session_max_messages: u32,
    pub session_max_tokens: usize,
}

/// `stop` may be one string or a list, as in the OpenAI API.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum StopField {
    One(String),
    Many(Vec<String>),
}

impl utoipa::PartialSchema for StopField {
    fn schema() -> RefOr<Schema> {
        // A stop sequence is 1 to 64 bytes: at most 64 characters, the bound a schema can say.
        let sequence = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(sluice_proto::job::MAX_STOP_SEQUENCE_BYTES))
        };
        OneOfBuilder::new()
            .item(sequence())
            .item(
                ArrayBuilder::new()
                    .items(sequence())
                    .max_items(Some(sluice_proto::job::MAX_STOP_SEQUENCES)),
            )
            .description(Some(
                "Generation stops before any of these strings (one, or a list of up to 8, each \
                 1 to 64 bytes of UTF-8); the stop sequence is not part of the output.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for StopField {}

/// The body of `POST /v1/jobs`, exactly as the client sent it. Unknown fields are rejected
/// (`invalid_request`); values out of range are `invalid_parameter`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The conversation: at most `--max-messages` messages, each at most
    /// `--max-message-chars` characters (413 `payload_too_large` past it), not all empty.
    #[schema(min_items = 1)]
    pub(crate) messages: Vec<Message>,
    /// Upper bound on generated tokens: 1 to `--max-tokens-limit`; default 256.
    #[schema(minimum = 1, maximum = 4294967295_u64)]
    pub(crate) max_tokens: Option<u32>,
    /// 0 to 2; 0 is greedy decoding. Default 0.7.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub(crate) temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1].
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub(crate) top_p: Option<f32>,
    /// Keep only the `top_k` most likely tokens: at least 1.
    #[schema(minimum = 1, maximum = 4294967295_u64)]
    pub(crate) top_k: Option<u32>,
    /// Seed of the sampler: the same seed, prompt and parameters give the same text.
    #[schema(maximum = 18446744073709551615_u64)]
    pub(crate) seed: Option<u64>,
    /// Cannot be combined with a JSON `response_format`.
    pub(crate) stop: Option<StopField>,
    /// Penalty over the last 64 tokens: 0.5 to 2; 1 (the default) disables it.
    #[schema(minimum = 0.5, maximum = 2.0)]
    pub(crate) repetition_penalty: Option<f32>,
    /// Keep generating past the model's end-of-turn tokens.
    pub(crate) ignore_eos: Option<bool>,
    /// Makes the job a turn of this stored conversation of the caller's tenant.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$")]
    pub(crate) session_id: Option<String>,
    /// Structured output, as OpenAI's `response_format`.
    pub(crate) response_format: Option<ResponseFormat>,
    /// `interactive` or `batch`; the tenant's default when left out.
    pub(crate) priority: Option<Priority>,
    /// Deadline for queue plus run, in seconds: at least 1, at most `--max-job-timeout-secs`;
    /// default `--job-timeout-secs`.
    #[schema(minimum = 1, maximum = 18446744073709551615_u64)]
    pub(crate) timeout_secs: Option<u64>,
    /// Send the tenant's webhook endpoints a `job.succeeded` or `job.failed` event when the
    /// job ends (endpoints subscribed to that type; a cancelled job sends none).
    pub(crate) webhook: Option<bool>,
}

/// A job as a client described it, in either wire format, before any check: what
/// [`SubmitRequest`] and the OpenAI route's request each convert into once, and the one input
/// of [`validate`].
#[derive(Debug)]
pub struct JobRequest {
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub session_id: Option<String>,
    pub response_format: Option<ResponseFormat>,
    pub priority: Option<Priority>,
    pub timeout_secs: Option<u64>,
    /// Whether the job's end is a webhook event.
    pub webhook: bool,
}

impl StopField {
    /// The stop sequences as a list, however they were written (`None` is no list).
    pub(crate) fn list(stop: Option<StopField>) -> Vec<String> {
        match stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
        }
    }
}

impl From<SubmitRequest> for JobRequest {
    fn from(r: SubmitRequest) -> Self {
        Self {
            messages: r.messages,
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            seed: r.seed,
            stop: StopField::list(r.stop),
            repetition_penalty: r.repetition_penalty,
            ignore_eos: r.ignore_eos,
            session_id: r.session_id,
            response_format: r.response_format,
            priority: r.priority,
            timeout_secs: r.timeout_secs,
            webhook: r.webhook.unwrap_or(false),
        }
    }
}

/// A job that passed every check; the only way to get one is [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJob {
    pub messages: Vec<Message>,
    pub params: GenerationParams,
    pub session_id: Option<String>,
    pub timeout: Duration,
    pub priority: Option<Priority>,
    /// Send a `job.succeeded` / `job.failed` webhook event when it ends.
    pub webhook: bool,
}

/// The request body, or the 4xx for a body axum could not read (too large, or not readable).
pub fn body_bytes(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::client(
                ErrorCode::PayloadTooLarge,
                "the request body is larger than the limit",
            )
        } else {
            ApiError::client(ErrorCode::InvalidRequest, rejection.body_text())
        }
    })
}

/// Parses a JSON body, telling malformed JSON (`invalid_json`) from JSON of the wrong shape
/// (`invalid_request`).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => ErrorCode::InvalidRequest,
            _ => ErrorCode::InvalidJson,
        };
        ApiError::client(code, e.to_string())
    })
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::client(ErrorCode::InvalidParameter, message)
}

/// A session id: 1-128 characters of `[A-Za-z0-9._-]`.
pub fn session_id(session: &str) -> Result<(), ApiError> {
    let ok = !session.is_empty()
        && session.len() <= 128
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "session_id must be 1-128 characters of [A-Za-z0-9._-]",
        ))
    }
}

pub fn validate(req: JobRequest, limits: &Limits) -> Result<ValidatedJob, ApiError> {
    if req.messages.is_empty() {
        return Err(invalid("messages must not be empty"));
    }
    if req.messages.len() > limits.max_messages {
        return Err(invalid(format!(
            "at most {} messages are allowed, got {}",
            limits.max_messages,
            req.messages.len()
        )));
    }
    // Empty as the model would see it: after the guard strips invisible characters, so a
    // request of zero-width spaces is refused here rather than charged and queued.
    if req.messages.iter().all(|m| {
        sluice_guard::unicode::clean(&m.content)
            .text
            .trim()
            .is_empty()
    }) {
        return Err(invalid("messages must not all be empty"));
    }
    let defaults = GenerationParams::default();
    let params = GenerationParams {
        max_tokens: req.max_tokens.unwrap_or(defaults.max_tokens),
        temperature: req.temperature.unwrap_or(defaults.temperature),
        top_p: req.top_p,
        top_k: req.top_k,
        seed: req.seed,
        stop: req.stop,
        repetition_penalty: req
            .repetition_penalty
            .unwrap_or(defaults.repetition_penalty),
        ignore_eos: req.ignore_eos.unwrap_or(false),
        response_format: req.response_format.unwrap_or_default(),
    };
    params
        .validate(limits.max_tokens_limit)
        .map_err(ApiError::Client)?;
    sluice_prompt::structured::check_format(&params.response_format)
        .map_err(|e| ApiError::client(ErrorCode::InvalidResponseFormat, e.to_string()))?;
    if !params.response_format.is_text() && !params.stop.is_empty() {
        // A stop sequence would cut the JSON short of its schema.
        return Err(invalid(
            "stop sequences cannot be combined with a JSON response_format",
        ));
    }
    if let Some(session) = &req.session_id {
        session_id(session)?;
    }
    let timeout = match req.timeout_secs {
        None => limits.default_timeout,
        Some(0) => return Err(invalid("timeout_secs must be at least 1")),
        Some(secs) if Duration::from_secs(secs) > limits.max_timeout => {
            return Err(invalid(format!(
                "timeout_secs must be at most {}",
                limits.max_timeout.as_secs()
            )));
        }
        Some(secs) => Duration::from_secs(secs),
    };
    Ok(ValidatedJob {
        messages: req.messages,
        params,
        session_id: req.session_id,
        timeout,
        priority: req.priority,
        webhook: req.webhook,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `POST /v1/jobs` body as `ValidJob` parses it.
    fn parse_body(bytes: &[u8]) -> Result<SubmitRequest, ApiError> {
        parse_json(bytes)
    }

    fn limits() -> Limits {
        Limits {
            max_tokens_limit: 8192,
            max_messages: 4,
            max_message_chars: 1000,
            default_timeout: Duration::from_secs(600),
            max_timeout: Duration::from_secs(3600),
            completion_wait: Duration::from_secs(60),
            max_queued_jobs: None,
            session_ttl: Duration::from_secs(60),
            session_max_messages: 10,
            session_max_tokens: 1000,
        }
    }

    fn check(body: &str) -> Result<ValidatedJob, ErrorCode> {
        parse_body(body.as_bytes())
            .and_then(|r| validate(r.into(), &limits()))
            .map_err(|e| e.body().code)
    }

    #[test]
    fn accepts_a_minimal_job_with_defaults() {
        let job = check(r#"{"messages":[{"role":"user","content":"hi"}]}"#).expect("valid");
        assert_eq!(job.params, GenerationParams::default());
        assert_eq!(job.timeout, Duration::from_secs(600));
        let job =
            check(r#"{"messages":[{"role":"user","content":"hi"}],"stop":"x"}"#).expect("valid");
        assert_eq!(job.params.stop, vec!["x".to_string()]);
    }

    #[test]
    fn rejects_with_stable_codes() {
        use ErrorCode::*;
        let cases = [
            ("{", InvalidJson),
            ("", InvalidJson),
            ("[1,2]", InvalidRequest),
            (r#"{"messages":[]}"#, InvalidParameter),
            (r#"{"messages":"hi"}"#, InvalidRequest),
            (
                r#"{"messages":[{"role":"bot","content":"x"}]}"#,
                InvalidRequest,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"foo":1}"#,
                InvalidRequest,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x","name":"a"}]}"#,
                InvalidRequest,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                InvalidParameter,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":9000}"#,
                InvalidParameter,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                InvalidRequest,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                InvalidParameter,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                InvalidParameter,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"timeout_secs":0}"#,
                InvalidParameter,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"session_id":"a b"}"#,
                InvalidParameter,
            ),
            (
                r#"{"messages":[{"role":"user","content":"  "}]}"#,
                InvalidParameter,
            ),
            (
                // Zero-width spaces and a BOM only: empty once cleaned.
                "{\"messages\":[{\"role\":\"user\",\"content\":\"\u{200b}\u{200b} \u{feff}\"}]}",
                InvalidParameter,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":"}",
                    "response_format":{"type":"json_object"}}"#,
                InvalidParameter,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],
                    "response_format":{"type":"json_schema","json_schema":{"name":"n",
                    "schema":{"type":"nope"}}}}"#,
                InvalidResponseFormat,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"priority":"urgent"}"#,
                InvalidRequest,
            ),
        ];
        for (body, code) in cases {
            assert_eq!(check(body).expect_err(body), code, "{body}");
        }
        let many = format!(
            r#"{{"messages":[{}]}}"#,
            [r#"{"role":"user","content":"x"}"#; 5].join(",")
        );
        assert_eq!(check(&many).expect_err("too many"), InvalidParameter);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let code = check(&deep).expect_err("deep");
        assert!(matches!(code, InvalidJson | InvalidRequest), "{code}");
        assert_eq!(
            parse_body(b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}")
                .map(|_| ())
                .map_err(|e| e.body().code)
                .expect_err("bad utf-8"),
            InvalidJson
        );
    }

    mod props {
        //! The request parser and validator on arbitrary input: never a panic, and every
        //! refusal is a client error with a stable 4xx code.
        use super::*;
        use proptest::prelude::*;
        use serde_json::{Value, json};

        /// JSON values of any shape, small enough to stay fast.
        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                any::<f64>().prop_map(|f| json!(f)),
                "\\PC{0,20}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Submit bodies near the real shape: real field names with values of any type.
        fn submit_like() -> impl Strategy<Value = Value> {
            let field = prop_oneof![
                Just("messages"),
                Just("max_tokens"),
                Just("temperature"),
                Just("top_p"),
                Just("top_k"),
                Just("seed"),
                Just("stop"),
                Just("repetition_penalty"),
                Just("ignore_eos"),
                Just("session_id"),
                Just("response_format"),
                Just("priority"),
                Just("timeout_secs"),
                Just("role"),
                Just("content"),
            ];
            let message = (
                prop_oneof![
                    Just("user"),
                    Just("system"),
                    Just("assistant"),
                    Just("tool")
                ],
                "\\PC{0,40}",
            )
                .prop_map(|(role, content)| json!({"role": role, "content": content}));
            (
                prop::collection::vec(message, 0..6),
                prop::collection::btree_map(field, any_json(), 0..6),
            )
                .prop_map(|(messages, extra)| {
                    let mut body = serde_json::Map::new();
                    body.insert("messages".into(), Value::Array(messages));
                    for (k, v) in extra {
                        body.insert(k.to_string(), v);
                    }
                    Value::Object(body)
                })
        }

        fn client_error(result: Result<ValidatedJob, ApiError>) -> Result<(), TestCaseError> {
            if let Err(e) = result {
                let ApiError::Client(body) = &e else {
                    return Err(TestCaseError::fail(format!("not a client error: {e:?}")));
                };
                let status = body.code.http_status();
                prop_assert!(
                    (400..500).contains(&status),
                    "{:?} -> {}",
                    body.code,
                    status
                );
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn arbitrary_bytes_are_refused_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                client_error(parse_body(&bytes).and_then(|r| validate(r.into(), &limits())))?;
            }

            #[test]
            fn arbitrary_json_is_refused_cleanly(body in any_json()) {
                let bytes = serde_json::to_vec(&body).expect("serialize");
                client_error(parse_body(&bytes).and_then(|r| validate(r.into(), &limits())))?;
            }

            #[test]
            fn submit_shaped_bodies_validate_or_are_refused_cleanly(body in submit_like()) {
                let bytes = serde_json::to_vec(&body).expect("serialize");
                client_error(parse_body(&bytes).and_then(|r| validate(r.into(), &limits())))?;
            }
        }
    }
}
