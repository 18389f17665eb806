//! Doc-only schemas of `sluice-shared` types that the API serializes (a tenant's policy and
//! usage, a worker's heartbeat) and of the body `PATCH /admin/tenants/{tenant}/limits` takes.
//!
//! They are never built: they describe JSON that [`sluice_shared`] writes, and the tests
//! serialize the real types and check each against its schema here (every field named, none
//! missing), so the two cannot drift apart unnoticed.

#![allow(dead_code)]

use sluice_proto::Priority;
use utoipa::ToSchema;

/// What to do when an injection rule or the classifier fires.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum InjectionAction {
    /// Reject the request with 400 `prompt_injection_detected`.
    Block,
    /// Let it through, but record the categories (job record and audit log).
    Flag,
    /// Do not scan.
    Off,
}

/// What to do with personal data in input.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum PiiAction {
    /// Replace it with placeholders before the model sees it.
    Redact,
    /// Reject the request with 400 `pii_detected`.
    Reject,
    /// Leave it.
    Off,
}

/// A tenant's effective limits and guard settings: the deployment's defaults with the
/// tenant's overrides applied. `null` means unlimited (or none).
#[derive(ToSchema)]
pub struct TenantPolicy {
    /// Requests per second per key (or JWT subject), with a burst of the same size.
    #[schema(required = true)]
    requests_per_second: Option<u32>,
    /// Requests per minute per key (or JWT subject), with a burst of the same size.
    #[schema(required = true)]
    requests_per_minute: Option<u32>,
    /// Tokens (prompt plus `max_tokens` reserved, the unused part refunded) per UTC day.
    #[schema(required = true)]
    tokens_per_day: Option<u64>,
    /// Tokens per UTC calendar month.
    #[schema(required = true)]
    tokens_per_month: Option<u64>,
    /// Jobs queued plus running at once.
    #[schema(required = true)]
    max_active_jobs: Option<u32>,
    /// Jobs waiting in the queue at once (429 `queue_full` past it).
    #[schema(required = true)]
    max_queued_jobs: Option<u32>,
    /// Whether clients of this tenant may send `system` messages.
    allow_system_messages: bool,
    injection_action: InjectionAction,
    /// Score at which an injection rule fires.
    injection_threshold: f32,
    /// The learned classifier's threshold; a hit is handled by `injection_action`.
    classifier_threshold: f32,
    /// The lower edge of the classifier's grey band (`null`: none): requests scored from it up
    /// to `classifier_threshold` are judged by the served model before it generates.
    #[schema(required = true)]
    injection_judge_from: Option<f32>,
    pii_action: PiiAction,
    /// The class of this tenant's jobs that do not name one.
    default_priority: Priority,
    /// A JSON Schema every response of this tenant must match (`null`: none).
    #[schema(required = true, value_type = Option<Object>)]
    required_output_schema: Option<serde_json::Value>,
    /// This tenant's weight in the batch lane: `--batch-lane-window` times this many of its
    /// batch lines may be queued or running at once.
    #[schema(minimum = 1, maximum = 100)]
    batch_weight: u32,
    /// Whether workers may reuse this tenant's cached prompt prefixes (never another
    /// tenant's); off, every job prefills its whole prompt.
    prefix_cache: bool,
    /// Whether the learned classifier scores `system` messages too (off: only the others;
    /// the rules check every message either way).
    classify_system_messages: bool,
}

/// Overrides merged into a tenant's policy: any of its fields. `null` means unlimited (or
/// none) where the field allows it; 0 is refused for a limit (revoke the tenant's keys to stop
/// it). `injection_judge_from` must not exceed `classifier_threshold`, and
/// `required_output_schema` must be a JSON Schema the grammar engine can enforce. Anything
/// else is 400 `invalid_parameter`.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicyPatch {
    #[schema(minimum = 1, maximum = 4294967295_u64)]
    requests_per_second: Option<u32>,
    #[schema(minimum = 1, maximum = 4294967295_u64)]
    requests_per_minute: Option<u32>,
    #[schema(minimum = 1, maximum = 18446744073709551615_u64)]
    tokens_per_day: Option<u64>,
    #[schema(minimum = 1, maximum = 18446744073709551615_u64)]
    tokens_per_month: Option<u64>,
    #[schema(minimum = 1, maximum = 4294967295_u64)]
    max_active_jobs: Option<u32>,
    #[schema(minimum = 1, maximum = 4294967295_u64)]
    max_queued_jobs: Option<u32>,
    #[serde(default)]
    allow_system_messages: bool,
    #[serde(default)]
    #[schema(inline)]
    injection_action: InjectionAction,
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    injection_threshold: f32,
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    classifier_threshold: f32,
    #[schema(minimum = 0.0, maximum = 1.0)]
    injection_judge_from: Option<f32>,
    #[serde(default)]
    #[schema(inline)]
    pii_action: PiiAction,
    #[serde(default)]
    #[schema(inline)]
    default_priority: Priority,
    #[schema(value_type = Option<Object>)]
    required_output_schema: Option<serde_json::Value>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    batch_weight: u32,
    #[serde(default)]
    prefix_cache: bool,
    #[serde(default)]
    classify_system_messages: bool,
}

/// A tenant's consumption now.
#[derive(ToSchema)]
pub struct TenantUsage {
    /// Tokens reserved or used today (UTC); reservations of running jobs count until settled.
    tokens_today: u64,
    tokens_this_month: u64,
    /// Jobs queued or running.
    active_jobs: u64,
}

/// A live worker, from its heartbeat.
#[derive(ToSchema)]
pub struct WorkerInfo {
    id: String,
    /// The served model's name.
    model: String,
    /// `cpu` or `cuda:N`.
    device: String,
    /// Jobs it runs at once.
    capacity: u32,
    /// Jobs it holds now (running or waiting for KV budget).
    in_flight: u32,
    /// Fraction of the KV cache budget in use (0..1).
    kv_usage: f64,
    /// Device memory in use (CUDA workers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    gpu_memory_used_bytes: Option<u64>,
    /// Device memory in total (CUDA workers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    gpu_memory_total_bytes: Option<u64>,
    /// GPU utilisation (0..1) from NVML (CUDA workers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    gpu_utilization: Option<f64>,
    /// Build version of the worker binary.
    version: String,
    /// When the worker started (ms since the epoch).
    started_at: u64,
    /// Its last heartbeat (ms since the epoch).
    last_seen: u64,
}

/// One Server-Sent Event of a `text/event-stream` response, as a client parses it (OpenAPI 3.1
/// describes a stream by its events). `data` holds JSON: on `GET /v1/jobs/{id}/events` a
/// `TextEvent` (event `text`) or a `DoneEvent` (event `done`); on a streamed chat completion a
/// `ChatCompletionChunk`, then the literal `[DONE]`.
#[derive(ToSchema)]
pub struct SseEvent {
    /// The event's type (`text`, `done`); absent on chat-completion chunks.
    #[schema(nullable = false)]
    pub event: Option<String>,
    pub data: String,
    /// The event's id, for `Last-Event-ID` (job event streams only).
    #[schema(nullable = false)]
    pub id: Option<String>,
    #[schema(nullable = false)]
    pub retry: Option<u64>,
}
