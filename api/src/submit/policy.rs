//! The tenant-policy stage: what the tenant's policy and the deployment's limits allow of a
//! request before any guard stage spends time on it.

use crate::tenant::TenantPolicy;
use sluice_proto::{ErrorCode, GenerationParams, Message, Role};

use super::Rejection;
use crate::error::ApiError;

/// Applies the tenant's registered output schema: a job without a `response_format` gets
/// it, a job with another one is refused.
pub(super) fn apply_required_format(
    policy: &TenantPolicy,
    params: &mut GenerationParams,
) -> Result<(), Rejection> {
    let Some(required) = policy.required_format() else {
        return Ok(());
    };
    if params.response_format.is_text() {
        params.response_format = required;
        Ok(())
    } else if params.response_format.schema() != required.schema() {
        Err((
            ApiError::client(
                ErrorCode::InvalidResponseFormat,
                "this tenant's responses must match its registered output schema: leave \
                 response_format out, or send that schema",
            ),
            "response_format_conflict",
        ))
    } else {
        Ok(())
    }
}

/// What a tenant's policy and the limits allow of each message, checked before any guard
/// stage spends time on it.
pub(super) fn check_messages(
    messages: &[Message],
    allow_system: bool,
    max_message_chars: usize,
) -> Result<(), Rejection> {
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
