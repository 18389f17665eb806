//! The OpenAPI 3.1 document of the HTTP API, generated from the code and served at
//! `GET /openapi.json`.
//!
//! Each handler carries its own `#[utoipa::path]` description and is registered with
//! `utoipa_axum::routes!` in [`crate::routes::api`], so the router and the document come from
//! one list: a route cannot be served without being described. This module adds what no
//! handler owns:
//!
//! - `base`: the info block, the bearer security scheme, the tags and the shared components;
//! - [`errors`]: each operation's error responses, built from the [`ErrorCode`]s it can answer
//!   with (grouped by [`ErrorCode::http_status`], with the headers [`crate::error::ApiError`]
//!   sets);
//! - [`schemas`] and [`openai`]: doc-only schemas for JSON whose Rust type lives where this
//!   crate cannot derive a schema for it (`sluice-shared`) or that is built as untyped JSON
//!   (the OpenAI shapes), each checked against real values in the tests.

pub mod errors;
pub mod openai;
pub mod schemas;

use std::sync::OnceLock;

use axum::Json;
use axum::extract::State;
use sluice_proto::ErrorCode;
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr, Schema};

use crate::state::AppState;
use crate::validate::Limits;

pub(crate) use errors::error_responses;
pub use errors::{Caller, Envelope};

/// The security scheme every authenticated operation names.
pub const BEARER: &str = "bearer";

/// The document of the router [`crate::routes::router`] builds, as the code defines it
/// (what `GET /openapi.json` serves adds this deployment's limits, see [`for_deployment`]).
pub fn openapi() -> OpenApi {
    let mut doc = crate::routes::api().into_openapi();
    describe_error_codes(&mut doc);
    doc
}

/// What this process serves, built on the first request (the settings it reads do not change
/// while the process runs).
static SERVED: OnceLock<OpenApi> = OnceLock::new();

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "get_openapi",
    tag = "meta",
    summary = "This OpenAPI 3.1 document",
    description = "The OpenAPI 3.1 description of every route of this API, generated from the \
                   code, with this deployment's limits (`--max-tokens-limit`, \
                   `--max-messages`, `--max-job-timeout-secs`) and served model. No \
                   credentials.",
    responses(
        (status = 200, description = "The document.", body = Object, content_type = "application/json"),
        DocumentErrors,
    ),
)]
pub async fn document(State(state): State<AppState>) -> Json<&'static OpenApi> {
    Json(SERVED.get_or_init(|| for_deployment(openapi(), &state.limits, &state.codec.name)))
}

/// `doc` with what this deployment's settings decide of a request: the largest `max_tokens`,
/// number of messages and `timeout_secs` it accepts, and the one `model` a chat completion may
/// name. A request the served document calls valid is then one these checks accept.
pub fn for_deployment(mut doc: OpenApi, limits: &Limits, model: &str) -> OpenApi {
    let Some(components) = doc.components.as_mut() else {
        return doc;
    };
    for name in ["SubmitRequest", "ChatCompletionRequest"] {
        let Some(RefOr::T(Schema::Object(request))) = components.schemas.get_mut(name) else {
            continue;
        };
        let properties = &mut request.properties;
        for field in ["max_tokens", "max_completion_tokens"] {
            if let Some(RefOr::T(Schema::Object(schema))) = properties.get_mut(field) {
                schema.maximum = Some(limits.max_tokens_limit.into());
            }
        }
        if let Some(RefOr::T(Schema::Object(schema))) = properties.get_mut("timeout_secs") {
            schema.maximum = Some(limits.max_timeout.as_secs().into());
        }
        if let Some(RefOr::T(Schema::Array(schema))) = properties.get_mut("messages") {
            schema.max_items = Some(limits.max_messages);
        }
        if let Some(RefOr::T(Schema::Object(schema))) = properties.get_mut("model") {
            schema.enum_values = Some(vec![model.into()]);
        }
    }
    doc
}

error_responses!(DocumentErrors: Sluice, Anyone, []);

/// Info, security scheme, tags and the components no handler references directly: the error
/// envelopes (which [`errors`] refers to by name) and the `data` of Server-Sent Events.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Sluice",
        description = "Sluice's HTTP API: submit chat jobs to a queue of LLM workers, follow \
                       them (poll or Server-Sent Events), cancel them; an OpenAI-compatible \
                       chat completion endpoint over the same queue; tenant usage; and admin \
                       routes for keys, tenant limits and workers.\n\n\
                       Every route but `/healthz`, `/readyz` and `/openapi.json` needs \
                       `Authorization: Bearer <API key or JWT>`; `/admin` routes need the \
                       `admin` role. Bodies are JSON (a body with another `Content-Type` is \
                       415 `unsupported_media_type`; one over the body limit is 413 \
                       `payload_too_large`). Errors are `{\"error\": {\"code\", \"message\"}}` \
                       with a stable `code` (OpenAI's envelope on the OpenAI routes). An \
                       unknown path is 404 `not_found`; a known path with another method is \
                       405 `method_not_allowed`. Every request may carry a W3C `traceparent` \
                       (and `tracestate`), which its server span continues."
    ),
    components(schemas(
        crate::error::ErrorResponse,
        sluice_proto::ErrorBody,
        ErrorCode,
        openai::OpenAiErrorResponse,
        openai::OpenAiErrorBody,
        // The `data` of Server-Sent Events, which a `text/event-stream` body cannot reference.
        openai::ChatCompletionChunk,
        crate::routes::events::TextEvent,
        crate::routes::events::DoneEvent,
    )),
    modifiers(&Security),
    tags(
        (name = "jobs", description = "Chat jobs: submit, poll, stream, cancel."),
        (name = "openai", description = "The OpenAI-compatible surface (chat completions, \
                                         models), with OpenAI's error envelope."),
        (name = "sessions", description = "Stored conversations."),
        (name = "usage", description = "The caller's tenant: consumption and limits."),
        (name = "admin", description = "Keys, tenant limits, webhooks and workers (admin role)."),
        (name = "health", description = "Liveness and readiness, without credentials."),
        (name = "meta", description = "This document."),
    ),
)]
struct Base;

/// The document before any route is added.
pub(crate) fn base() -> OpenApi {
    <Base as utoipa::OpenApi>::openapi()
}

/// Adds the bearer scheme.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut OpenApi) {
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("API key (sk-...) or JWT".to_string());
        http.description = Some(
            "An API key (`sk-<key id>_<secret>`, from `sluice-api keys create` or \
             `POST /admin/keys`) or, where the deployment accepts them, a JWT. Operations that \
             list the `admin` role need a credential with that role (403 `forbidden` \
             otherwise)."
                .to_string(),
        );
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(BEARER, SecurityScheme::Http(http));
    }
}

/// Gives the `ErrorCode` schema a line per code with its HTTP status, from
/// [`ErrorCode::http_status`].
fn describe_error_codes(doc: &mut OpenApi) {
    let Some(RefOr::T(Schema::Object(schema))) = doc
        .components
        .as_mut()
        .and_then(|c| c.schemas.get_mut("ErrorCode"))
    else {
        return;
    };
    let mut text = schema.description.take().unwrap_or_default();
    text.push_str("\n\nEach code and the HTTP status it is answered with:\n");
    for code in ErrorCode::ALL {
        text.push_str(&format!("\n- `{code}`: {}", code.http_status()));
    }
    schema.description = Some(text);
}

/// A schema that allows one value.
pub(crate) fn constant(value: impl Into<serde_json::Value>) -> Object {
    let value = value.into();
    let kind = match value {
        serde_json::Value::Bool(_) => Type::Boolean,
        serde_json::Value::Number(_) => Type::Number,
        _ => Type::String,
    };
    ObjectBuilder::new()
        .schema_type(kind)
        .enum_values(Some([value]))
        .build()
}

/// Schemas for fields that always hold the same value, for `#[schema(schema_with = ...)]`.
pub(crate) mod consts {
    use utoipa::openapi::schema::{Object, ObjectBuilder, Type};

    macro_rules! constants {
        ($($name:ident = $value:expr;)*) => {
            $(
                pub(crate) fn $name() -> Object {
                    super::constant($value)
                }
            )*
        };
    }

    constants! {
        ok = "ok";
        queued = "queued";
        true_value = true;
        list = "list";
        model = "model";
        sluice = "sluice";
        assistant = "assistant";
        text = "text";
        chat_completion = "chat.completion";
        chat_completion_chunk = "chat.completion.chunk";
        sluice_job = "sluice.job";
    }

    /// Always `null`.
    pub(crate) fn null() -> Object {
        ObjectBuilder::new().schema_type(Type::Null).build()
    }
}

#[cfg(test)]
pub(crate) mod tests;
