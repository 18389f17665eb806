//! The submit path after validation, as stages, each in its own file:
//!
//! 1. [`policy`]: the tenant's required output schema and what its policy allows of each
//!    message;
//! 2. [`guard`]: the rule-based guard and the exact token count (with a session's history
//!    put in front), the context check, then the learned injection classifier and what the
//!    tenant's policy makes of its score (block, flag, or the model's second opinion);
//! 3. [`admission`]: quota, concurrency, backpressure and the `Idempotency-Key`, atomically
//!    in Redis, and one table from its outcome to the client's answer and the audit reason;
//! 4. publish, and [`publish`]'s rollback when it fails.
//!
//! Every rejection happens before anything is written (a refused admission writes nothing)
//! and is recorded once in the audit log with its reason; a failed publish rolls the admission
//! back.

mod admission;
mod guard;
mod policy;
mod publish;
mod trace;

use std::net::SocketAddr;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use sluice_guard::Category;
use sluice_guard::pipeline::{Action, InjectionAction};
use sluice_jobs::store::Admission;
use sluice_proto::{ErrorCode, JOB_MESSAGE_VERSION, JobMessage, Role, SessionTurn};
use uuid::Uuid;

pub use admission::IDEMPOTENCY_KEY;

use crate::audit::{self, AuditContext};
use crate::error::ApiError;
use crate::principal::Principal;
use crate::state::AppState;
use crate::validate::ValidatedJob;

/// A stage's refusal: the client's answer and the audit log's reason.
type Rejection = (ApiError, &'static str);

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

/// How long after its admission a queued job's first publish has surely succeeded or been
/// rolled back by a live process (a publish waits at most `CONFIRM_TIMEOUT`, 5 s, for its
/// confirm, after a reconnect of its own): a retry after this republishes a job still queued.
const REPUBLISH_AFTER_MS: u64 = 30_000;

/// An idempotent retry of a job still queued [`REPUBLISH_AFTER_MS`] after its admission
/// publishes it again: the process that admitted it may have died between the admission and
/// the publish, and then no message of it exists and nothing would run it before its deadline
/// (a publish that failed in a live process rolls the admission back, so the record would not
/// be queued). The retry asks for the same thing (the fingerprint matched), so this copy is the
/// earlier job's message under its id, acceptance time and deadline. If the first message is
/// in the queue too, the worker that gets the second copy after the first started it drops it
/// (`StartOutcome::Duplicate`); whichever arrives first runs the job, once. A failed publish
/// fails the retry (the client retries). A job with a webhook is watched again first, in case
/// the first process died before that.
async fn republish_if_queued(
    state: &AppState,
    mut message: JobMessage,
    existing: Uuid,
    webhook: bool,
) -> Result<(), ApiError> {
    let Some((created_at, deadline)) = state
        .store
        .queued_schedule(&message.tenant, &existing)
        .await?
    else {
        return Ok(());
    };
    if sluice_proto::now_ms() < created_at + REPUBLISH_AFTER_MS {
        // Its admitting process may still be publishing it (or rolling it back).
        return Ok(());
    }
    message.id = existing;
    message.created_at = created_at;
    message.deadline = deadline;
    if webhook {
        crate::webhooks::job_events::watch(&state.store, &message.tenant, &existing).await?;
    }
    state.publisher.publish_job(&message).await?;
    tracing::info!(job_id = %existing, "idempotent retry of a queued job: published again");
    Ok(())
}

/// Runs a validated job through the stages, then publishes it. Returns the new job's id (or,
/// for a retried `Idempotency-Key`, the earlier one's). `peer` and `headers` give the client
/// address for the audit log and the caller's trace context.
pub async fn submit(
    state: &AppState,
    mut principal: Principal,
    peer: SocketAddr,
    job: ValidatedJob,
    headers: &HeaderMap,
) -> Result<Submitted, ApiError> {
    let idempotency = admission::idempotency_key(headers)?.map(|key| {
        (
            state.store.keyspace().idempotency(
                &principal.tenant,
                &hex::encode(Sha256::digest(key.as_bytes())),
            ),
            admission::fingerprint(&job),
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
    // Every refusal below is audited once, here.
    let refuse = |(error, reason): Rejection| {
        audit::record("rejected", reason, &ctx, state.anonymize_ips);
        error
    };
    let policy = match principal.policy.take() {
        Some(policy) => policy,
        None => state.tenants.policy(&principal.tenant).await?,
    };

    // 1. Policy.
    let webhook = job.webhook;
    let mut params = job.params;
    policy::apply_required_format(&policy, &mut params).map_err(refuse)?;
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
    policy::check_messages(
        &job.messages,
        policy.allow_system_messages,
        state.limits.max_message_chars,
    )
    .map_err(refuse)?;

    // 2. Guard, count, context, classifier.
    let messages = job.messages;
    // What the classifier reads: the request's own messages as sent (it cleans and decodes
    // them itself, as `guard check` does), not the session history, which was checked when it
    // was sent; without the system messages where the tenant's policy exempts them.
    let raw_messages = (state.classifier.is_some()
        && config.injection_action != InjectionAction::Off)
        .then(|| {
            messages
                .iter()
                .filter(|m| policy.classify_system_messages || m.role != Role::System)
                .cloned()
                .collect::<Vec<_>>()
        });
    let guard = std::sync::Arc::clone(&state.guard);
    let codec = std::sync::Arc::clone(&state.codec);
    let run = move || guard::guard_and_count(&guard, &codec, &config, messages, history);
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
    let mut guarded = guarded.map_err(refuse)?;

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
        let score = guard::classify(service, &state.guard, &principal.tenant, raw, inline)
            .await
            .map_err(|e| refuse((e, "guard_unavailable")))?;
        match config.classifier_action(score) {
            Action::Block => {
                return Err(refuse((
                    ApiError::client(
                        ErrorCode::PromptInjectionDetected,
                        "the input looks like a prompt injection (classifier)",
                    ),
                    "prompt_injection_detected",
                )));
            }
            Action::Flag => {
                let name = Category::Classifier.as_str().to_string();
                if !guarded.flags.contains(&name) {
                    guarded.flags.push(name);
                }
            }
            Action::Allow => {}
        }
        // In the tenant's grey band the served model gives a second opinion before it
        // generates (the worker's judge); above it the tenant's action applies.
        judge = policy.judge_band_holds(score);
        if judge {
            tracing::info!(
                score,
                "classifier grey band: the model judges the job first"
            );
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

    // 3. Admission.
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
        trace: trace::trace_context(headers),
        judge,
        prefix_cache: policy.prefix_cache,
    };
    let reserve = (guarded.prompt_tokens + max_tokens) as u64;
    let request = Admission {
        reserve,
        max_active: policy.max_active_jobs,
        tokens_per_day: policy.tokens_per_day,
        tokens_per_month: policy.tokens_per_month,
        flags: guarded.flags,
        idempotency,
        max_queued: state.limits.max_queued_jobs,
        max_queued_tenant: policy.max_queued_jobs,
    };
    let idem_key = request.idempotency.as_ref().map(|(k, _)| k.clone());
    let outcome = match state.store.admit(&message, &request).await {
        Ok(outcome) => outcome,
        Err(e) => {
            // The answer was lost, maybe not the write: Redis may have committed the admission
            // before going away. Undo it (a no-op if it never landed) once Redis answers.
            publish::rollback_eventually(state.store.clone(), message.clone(), idem_key.clone())
                .await;
            return Err(e.into());
        }
    };
    if let Some(existing) = admission::admitted(outcome, reserve, created_at).map_err(refuse)? {
        tracing::info!(job_id = %existing, "idempotent retry: the earlier job is returned");
        republish_if_queued(state, message, existing, webhook).await?;
        return Ok(Submitted {
            id: existing,
            replayed: true,
        });
    }

    // 4. Publish, the job's end event watched first, so it cannot end unwatched.
    if webhook
        && let Err(e) = crate::webhooks::job_events::watch(&state.store, &message.tenant, &id).await
    {
        publish::rollback_eventually(state.store.clone(), message.clone(), idem_key.clone()).await;
        return Err(e.into());
    }
    if let Err(publish_error) = state.publisher.publish_job(&message).await {
        // Not enqueued: refund, free the slot and delete the record.
        publish::rollback_eventually(state.store.clone(), message.clone(), idem_key.clone()).await;
        if webhook {
            // Best effort: a watched job whose record is gone leaves the set by itself.
            let _ = crate::webhooks::job_events::unwatch(&state.store, &message.tenant, &id).await;
        }
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
