//! The submit path after validation: rule-based guard, count tokens, context check, the
//! learned injection classifier, admit (quota and concurrency, in Redis), publish. Every rejection happens before anything is written; a failed publish
//! rolls the admission back.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use sluice_guard::classifier::ClassifierService;
use sluice_guard::pipeline::{Action, BlockReason, InjectionAction};
use sluice_guard::{Category, Guard, GuardConfig};
use sluice_proto::{ErrorCode, JOB_MESSAGE_VERSION, JobMessage, Message, Role, SessionTurn};
use sluice_shared::chat::ChatCodec;
use sluice_shared::session::History;
use sluice_shared::store::{Admission, AdmitOutcome};
use uuid::Uuid;

use crate::audit::{self, AuditContext};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;
use crate::validate::ValidatedJob;

/// Messages after the guard, with their token count.
struct Guarded {
    messages: Vec<Message>,
    prompt_tokens: usize,
    flags: Vec<String>,
    /// Where the new turn starts in `messages` (after the system prompt and the history).
    turn_start: usize,
    /// The request carried its own system prompt.
    has_system: bool,
}

/// The conversation before a new turn: the system prompt (the request's own, else the
/// session's), then as much of the session's history as fits `max_tokens` (oldest messages
/// dropped first, and never starting on an assistant reply), then the new messages.
fn with_history(
    codec: &ChatCodec,
    new: Vec<Message>,
    history: History,
    max_tokens: usize,
) -> (Vec<Message>, usize, bool) {
    let (system, rest): (Vec<Message>, Vec<Message>) =
        new.into_iter().partition(|m| m.role == Role::System);
    let has_system = !system.is_empty();
    let mut out = system;
    if !has_system && let Some(content) = history.system {
        out.push(Message {
            role: Role::System,
            content,
        });
    }
    // The template adds a few tokens of role markers per message.
    let cost = |m: &Message| codec.count_tokens(&m.content) + 4;
    let mut kept = Vec::new();
    let mut used = 0;
    for m in history.messages.into_iter().rev() {
        used += cost(&m);
        if used > max_tokens {
            break;
        }
        kept.push(m);
    }
    kept.reverse();
    let first_user = kept
        .iter()
        .position(|m| m.role == Role::User)
        .unwrap_or(kept.len());
    out.extend(kept.into_iter().skip(first_user));
    let turn_start = out.len();
    out.extend(rest);
    (out, turn_start, has_system)
}

/// What a tenant's policy and the limits allow of each message, checked before any guard
/// stage spends time on it.
fn check_messages(
    messages: &[Message],
    allow_system: bool,
    max_message_chars: usize,
) -> Result<(), (ApiError, &'static str)> {
    for message in messages {
        if message.role == Role::System && !allow_system {
            return Err((
                ApiError::client(
                    ErrorCode::SystemMessageNotAllowed,
                    "this tenant may not send system messages",
                ),
                "system_message_not_allowed",
            ));
        }
        if message.content.chars().count() > max_message_chars {
            return Err((
                ApiError::client(
                    ErrorCode::PayloadTooLarge,
                    format!("a message is longer than {max_message_chars} characters"),
                ),
                "message_too_long",
            ));
        }
    }
    Ok(())
}

/// The classifier's score of the request: the maximum over its messages and their decoded
/// layers ([`Guard::classifier_inputs`]). The texts are prepared
/// inline or on the blocking pool like the rest of the guard, then scored on the classifier's
/// own thread, batched with concurrent requests.
async fn classify(
    service: &ClassifierService,
    guard: &Arc<Guard>,
    messages: Vec<Message>,
    inline: bool,
) -> Result<f32, ApiError> {
    let prepare = {
        let guard = Arc::clone(guard);
        move || -> Vec<String> {
            messages
                .iter()
                .flat_map(|m| guard.classifier_inputs(&m.content))
                .collect()
        }
    };
    let inputs = if inline {
        prepare()
    } else {
        tokio::task::spawn_blocking(prepare)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
    };
    let scores = service.score(inputs).await?;
    Ok(scores.into_iter().fold(0.0, f32::max))
}

/// Rule-based guard stages over every message, then the exact prompt token count. CPU work:
/// runs on the blocking pool for long inputs.
fn guard_and_count(
    guard: &Guard,
    codec: &ChatCodec,
    config: &GuardConfig,
    messages: Vec<Message>,
    history: Option<(History, usize)>,
) -> Result<Guarded, (ApiError, &'static str)> {
    let mut out = Vec::with_capacity(messages.len());
    let mut flags: Vec<String> = Vec::new();
    for message in messages {
        let verdict = guard.check(&message.content, config);
        match (verdict.action, verdict.reason) {
            (Action::Block, Some(BlockReason::Pii)) => {
                let kinds: Vec<String> = verdict
                    .pii
                    .iter()
                    .map(|s| format!("{:?}", s.kind).to_lowercase())
                    .collect();
                return Err((
                    ApiError::client(
                        ErrorCode::PiiDetected,
                        format!("the input contains personal data ({})", kinds.join(", ")),
                    ),
                    "pii_detected",
                ));
            }
            (Action::Block, _) => {
                let categories: Vec<String> = verdict
                    .categories
                    .iter()
                    .map(|c| c.as_str().to_string())
                    .collect();
                return Err((
                    ApiError::client(
                        ErrorCode::PromptInjectionDetected,
                        format!(
                            "the input looks like a prompt injection ({})",
                            categories.join(", ")
                        ),
                    ),
                    "prompt_injection_detected",
                ));
            }
            (Action::Flag, _) => {
                for c in &verdict.categories {
                    let name = c.as_str().to_string();
                    if !flags.contains(&name) {
                        flags.push(name);
                    }
                }
            }
            (Action::Allow, _) => {}
        }
        out.push(Message {
            role: message.role,
            content: verdict.text,
        });
    }
    let (out, turn_start, has_system) = match history {
        Some((history, max_tokens)) => with_history(codec, out, history, max_tokens),
        None => {
            let has_system = out.iter().any(|m| m.role == Role::System);
            (out, 0, has_system)
        }
    };
    let mut prompt_tokens = codec
        .encode_chat(&out)
        .map_err(|e| (ApiError::Internal(e.to_string()), "tokenizer_error"))?
        .len();
    if out.iter().any(|m| m.role == Role::System) {
        // The worker appends its leak canary to the system prompt: count it here, so the
        // context check and the quota reservation hold for what the model will see.
        prompt_tokens += codec.canary_tokens();
    }
    Ok(Guarded {
        messages: out,
        prompt_tokens,
        flags,
        turn_start,
        has_system,
    })
}

/// Inputs up to this many bytes (with no session history) are guarded and counted on the
/// async worker itself: about 15 µs per KB (the guard benchmark), less than a round trip
/// through the blocking pool.
const INLINE_GUARD_BYTES: usize = 2048;

/// What a submit produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    pub id: Uuid,
    /// An `Idempotency-Key` seen before with the same request: `id` is the job that request
    /// created, and nothing new was queued or reserved.
    pub replayed: bool,
}

/// The header a client retries a submit with.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The `Idempotency-Key` of a request, if any: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
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
fn fingerprint(job: &ValidatedJob) -> String {
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

/// Runs a validated job through the guard, the context check and admission, then publishes
/// it. Returns the new job's id (or, for a retried `Idempotency-Key`, the earlier one's). `peer` and `headers` give the client address for the audit
/// log and the caller's trace context.
pub async fn submit(
    state: &AppState,
    mut principal: Principal,
    peer: SocketAddr,
    job: ValidatedJob,
    headers: &HeaderMap,
) -> Result<Submitted, ApiError> {
    let idempotency = idempotency_key(headers)?.map(|key| {
        (
            state.store.keyspace().idempotency(
                &principal.tenant,
                &hex::encode(Sha256::digest(key.as_bytes())),
            ),
            fingerprint(&job),
        )
    });
    let ctx = AuditContext {
        tenant: Some(principal.tenant.clone()),
        key_id: Some(principal.key_id.clone()),
        ip: Some(crate::client_ip::client_ip(
            peer,
            headers,
            &state.trusted_proxies,
        )),
    };
    let policy = match principal.policy.take() {
        Some(policy) => policy,
        None => state.tenants.policy(&principal.tenant).await?,
    };
    let mut params = job.params;
    if let Some(required) = policy.required_format() {
        if params.response_format.is_text() {
            params.response_format = required;
        } else if params.response_format.schema() != required.schema() {
            audit::record(
                "rejected",
                "response_format_conflict",
                &ctx,
                state.anonymize_ips,
            );
            return Err(ApiError::client(
                ErrorCode::InvalidResponseFormat,
                "this tenant's responses must match its registered output schema: leave \
                 response_format out, or send that schema",
            ));
        }
    }
    let history = match &job.session_id {
        Some(session) => Some((
            state.sessions.load(&principal.tenant, session).await?,
            state.limits.session_max_tokens,
        )),
        None => None,
    };
    let inline = history.is_none()
        && job.messages.iter().map(|m| m.content.len()).sum::<usize>() <= INLINE_GUARD_BYTES;
    let config = policy.guard_config();
    if let Err((error, reason)) = check_messages(
        &job.messages,
        policy.allow_system_messages,
        state.limits.max_message_chars,
    ) {
        audit::record("rejected", reason, &ctx, state.anonymize_ips);
        return Err(error);
    }
    let messages = job.messages;
    // What the classifier reads: the request's own messages as sent (it cleans and decodes
    // them itself, as `guard check` does), not the session history, which was checked when it
    // was sent.
    let raw_messages = (state.classifier.is_some()
        && config.injection_action != InjectionAction::Off)
        .then(|| messages.clone());
    let guard = Arc::clone(&state.guard);
    let codec = Arc::clone(&state.codec);
    let run = move || guard_and_count(&guard, &codec, &config, messages, history);
    // A short request's guard and token count take microseconds: handing them to the
    // blocking pool would cost more (two thread switches) than running them here. Long inputs
    // and session histories go to the blocking pool, off the async workers.
    let guarded = if inline {
        run()
    } else {
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
    };
    let mut guarded = match guarded {
        Ok(g) => g,
        Err((error, reason)) => {
            audit::record("rejected", reason, &ctx, state.anonymize_ips);
            return Err(error);
        }
    };

    let context = state.codec.context_length;
    let max_tokens = params.max_tokens as usize;
    if guarded.prompt_tokens + max_tokens > context {
        return Err(ApiError::client(
            ErrorCode::ContextLengthExceeded,
            format!(
                "the prompt has {} tokens and max_tokens is {max_tokens}; the model's context holds {context}",
                guarded.prompt_tokens
            ),
        ));
    }

    // The learned classifier last: every cheaper check above has rejected what it can, so only
    // a request that would otherwise be accepted pays for a forward pass.
    let mut judge = false;
    if let (Some(service), Some(raw)) = (&state.classifier, raw_messages) {
        let score = classify(service, &state.guard, raw, inline)
            .await
            .inspect_err(|_| {
                audit::record("rejected", "guard_unavailable", &ctx, state.anonymize_ips);
            })?;
        // In the tenant's grey band the served model gives a second opinion before it
        // generates (the worker's judge); above it the tenant's action applies.
        judge = policy.judge_band_holds(score);
        if judge {
            tracing::info!(
                score,
                "classifier grey band: the model judges the job first"
            );
        }
        if score >= config.classifier_threshold {
            if config.injection_action == InjectionAction::Block {
                audit::record(
                    "rejected",
                    "prompt_injection_detected",
                    &ctx,
                    state.anonymize_ips,
                );
                return Err(ApiError::client(
                    ErrorCode::PromptInjectionDetected,
                    "the input looks like a prompt injection (classifier)",
                ));
            }
            let name = Category::Classifier.as_str().to_string();
            if !guarded.flags.contains(&name) {
                guarded.flags.push(name);
            }
        }
    }
    if !guarded.flags.is_empty() {
        audit::record(
            "flagged",
            &guarded.flags.join(","),
            &ctx,
            state.anonymize_ips,
        );
    }

    let id = Uuid::now_v7();
    tracing::Span::current().record("job_id", tracing::field::display(id));
    let created_at = sluice_proto::now_ms();
    let message = JobMessage {
        v: JOB_MESSAGE_VERSION,
        id,
        tenant: principal.tenant.clone(),
        session: job.session_id.as_ref().map(|_| SessionTurn {
            turn_start: guarded.turn_start as u32,
            system: guarded.has_system,
            ttl_secs: state.limits.session_ttl.as_secs(),
            max_messages: state.limits.session_max_messages,
        }),
        session_id: job.session_id,
        priority: job.priority.unwrap_or(policy.default_priority),
        messages: guarded.messages,
        params,
        created_at,
        deadline: created_at + job.timeout.as_millis() as u64,
        attempt: 1,
        trace: crate::routes::jobs::trace_context(headers),
        judge,
    };
    let reserve = (guarded.prompt_tokens + max_tokens) as u64;
    let admission = Admission {
        reserve,
        max_active: policy.max_active_jobs,
        tokens_per_day: policy.tokens_per_day,
        tokens_per_month: policy.tokens_per_month,
        flags: guarded.flags,
        idempotency,
        max_queued: state.limits.max_queued_jobs,
        max_queued_tenant: policy.max_queued_jobs,
    };
    let outcome = match state.store.admit(&message, &admission).await {
        Ok(outcome) => outcome,
        Err(e) => {
            // The answer was lost, maybe not the write: Redis may have committed the admission
            // before going away. Undo it (a no-op if it never landed) once Redis answers.
            rollback_eventually(state.store.clone(), id).await;
            return Err(e.into());
        }
    };
    match outcome {
        AdmitOutcome::Admitted => {}
        AdmitOutcome::Duplicate(existing) => {
            tracing::info!(job_id = %existing, "idempotent retry: the earlier job is returned");
            return Ok(Submitted {
                id: existing,
                replayed: true,
            });
        }
        AdmitOutcome::QueueFull {
            tenant,
            queued,
            limit,
            retry_after_secs,
        } => {
            audit::record("rejected", "queue_full", &ctx, state.anonymize_ips);
            return Err(ApiError::QueueFull {
                tenant,
                queued,
                limit,
                retry_after_secs,
            });
        }
        AdmitOutcome::IdempotencyMismatch => {
            audit::record(
                "rejected",
                "idempotency_key_reused",
                &ctx,
                state.anonymize_ips,
            );
            return Err(ApiError::client(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used in the last 24 hours for a different request",
            ));
        }
        AdmitOutcome::ConcurrencyLimited { active, limit } => {
            audit::record("rejected", "concurrency_limited", &ctx, state.anonymize_ips);
            return Err(ApiError::ConcurrencyLimited { active, limit });
        }
        AdmitOutcome::QuotaExceeded {
            period,
            used,
            limit,
        } => {
            audit::record("rejected", "quota_exceeded", &ctx, state.anonymize_ips);
            let monthly = period == sluice_shared::store::QuotaPeriod::Month;
            return Err(ApiError::QuotaExceeded {
                period: period.as_str(),
                used,
                limit,
                reserve,
                reset_secs: sluice_shared::tenant::seconds_until_reset(created_at, monthly),
            });
        }
    }
    if let Err(publish_error) = state.publisher.publish_job(&message).await {
        // Not enqueued: refund, free the slot and delete the record.
        rollback_eventually(state.store.clone(), id).await;
        return Err(publish_error.into());
    }
    state
        .metrics
        .enqueued
        .with_label_values(&[message.priority.as_str()])
        .inc();
    tracing::info!(prompt_tokens = guarded.prompt_tokens, "job accepted");
    Ok(Submitted {
        id,
        replayed: false,
    })
}

/// Undoes an admission that may have been written for a job that was never published: now, or,
/// while Redis is unreachable, in the background with backoff for up to an hour. Until then
/// the record holds a reservation and a queue slot; it never runs (nothing was published).
/// `ROLLBACK` acts only on a `queued` record, so a retry after success changes nothing.
async fn rollback_eventually(store: sluice_shared::store::JobStore, id: Uuid) {
    if store.rollback(&id).await.is_ok() {
        return;
    }
    tracing::warn!(job_id = %id, "cannot roll back an unpublished admission yet; retrying");
    tokio::spawn(async move {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        let mut delay = std::time::Duration::from_millis(200);
        while std::time::Instant::now() < give_up {
            tokio::time::sleep(delay).await;
            if store.rollback(&id).await.is_ok() {
                tracing::info!(job_id = %id, "unpublished admission rolled back");
                return;
            }
            delay = (delay * 2).min(std::time::Duration::from_secs(10));
        }
        tracing::error!(job_id = %id, "gave up rolling back an unpublished admission");
    });
}
