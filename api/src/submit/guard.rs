//! The guard stage: the rule-based guard and the exact token count over the request (with a
//! session's history put in front), then the learned classifier's score of the request
//! (what the tenant's policy makes of it is [`GuardConfig::classifier_action`]).

use std::sync::Arc;

use sluice_guard::classifier::ClassifierService;
use sluice_guard::pipeline::{Action, BlockReason};
use sluice_guard::{Guard, GuardConfig};
use sluice_jobs::session::History;
use sluice_prompt::chat::ChatCodec;
use sluice_proto::{ErrorCode, Message, Role};

use super::Rejection;
use crate::error::ApiError;

/// Messages after the guard, with their token count.
pub(super) struct Guarded {
    pub messages: Vec<Message>,
    pub prompt_tokens: usize,
    pub flags: Vec<String>,
    /// Where the new turn starts in `messages` (after the system prompt and the history).
    pub turn_start: usize,
    /// The request carried its own system prompt.
    pub has_system: bool,
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

/// The classifier's score of the request: the maximum over its messages and their decoded
/// layers ([`Guard::classifier_inputs`]). The texts are prepared
/// inline or on the blocking pool like the rest of the guard, then scored on the classifier's
/// own thread, batched with concurrent requests, except those the tenant sent recently (its
/// system prompt, its history), whose scores are remembered.
pub(super) async fn classify(
    service: &ClassifierService,
    guard: &Arc<Guard>,
    tenant: &str,
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
    let scores = service.score(tenant, inputs).await?;
    Ok(scores.into_iter().fold(0.0, f32::max))
}

/// Rule-based guard stages over every message, then the exact prompt token count. CPU work:
/// runs on the blocking pool for long inputs.
pub(super) fn guard_and_count(
    guard: &Guard,
    codec: &ChatCodec,
    config: &GuardConfig,
    messages: Vec<Message>,
    history: Option<(History, usize)>,
) -> Result<Guarded, Rejection> {
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
