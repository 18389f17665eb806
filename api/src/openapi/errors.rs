//! An operation's error responses, from the [`ErrorCode`]s it can answer with.
//!
//! A handler names its codes once (`error_responses!`); the responses follow from the code:
//! the status from [`ErrorCode::http_status`], the envelope narrowed to the codes of that
//! status, and the headers [`crate::error::ApiError`] sets for it (`WWW-Authenticate` on 401,
//! `Retry-After` and `RateLimit-*` on 429, `Retry-After` on 503). Authentication's codes come
//! with the [`Caller`], and the framing middleware's (413, 415, in Sluice's envelope on every
//! route) with every operation.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use sluice_proto::ErrorCode;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ObjectBuilder, Type};
use utoipa::openapi::{Content, Ref, RefOr, Schema};

/// The envelope an operation's own errors come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// `{"error": {"code", "message"}}` ([`crate::error::ErrorResponse`]).
    Sluice,
    /// OpenAI's `{"error": {"message", "type", "param", "code"}}`
    /// ([`super::openai::OpenAiErrorResponse`]).
    OpenAi,
}

/// Who may call an operation, which decides what authentication adds to its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// No credentials are read.
    Anyone,
    /// Any valid credential ([`crate::principal::Principal`]).
    User,
    /// A credential with the admin role ([`crate::principal::Admin`]).
    Admin,
}

impl Caller {
    /// What the extractor can refuse with: bad credentials, the rate limits, Redis down, a
    /// corrupt key record.
    fn codes(self) -> &'static [ErrorCode] {
        use ErrorCode::*;
        match self {
            Caller::Anyone => &[],
            Caller::User => &[Unauthorized, RateLimited, StoreUnavailable, Internal],
            Caller::Admin => &[
                Unauthorized,
                Forbidden,
                RateLimited,
                StoreUnavailable,
                Internal,
            ],
        }
    }
}

/// What is refused on every route before any handler, always in Sluice's envelope: by
/// [`crate::routes`]' framing middleware (an over-limit `Content-Length`, a body that is not
/// JSON), and by the connection loop ([`crate::serve`]: a request framed by both
/// `Transfer-Encoding` and `Content-Length`, a client address over its connection cap).
const FRAMING: [ErrorCode; 4] = [
    ErrorCode::InvalidRequest,
    ErrorCode::PayloadTooLarge,
    ErrorCode::UnsupportedMediaType,
    ErrorCode::RateLimited,
];

/// Declares a unit type whose `utoipa::IntoResponses` are an operation's error responses, for
/// its `#[utoipa::path(responses(...))]`:
/// `error_responses!(Name: Envelope, Caller, [Code, ...])`, or
/// `error_responses!(Name: Envelope, Caller, BASE, [Code, ...])` to add codes to a shared
/// `&[ErrorCode]` list.
macro_rules! error_responses {
    ($name:ident: $envelope:ident, $caller:ident, [$($code:ident),* $(,)?]) => {
        $crate::openapi::errors::error_responses!($name: $envelope, $caller, &[], [$($code),*]);
    };
    ($name:ident: $envelope:ident, $caller:ident, $base:expr, [$($code:ident),* $(,)?]) => {
        #[doc = concat!("The error responses of the operation that names `", stringify!($name), "`.")]
        pub struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<
                String,
                utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
            > {
                let base: &[sluice_proto::ErrorCode] = $base;
                let own: &[sluice_proto::ErrorCode] = &[$(sluice_proto::ErrorCode::$code),*];
                $crate::openapi::errors::responses(
                    $crate::openapi::Envelope::$envelope,
                    $crate::openapi::Caller::$caller,
                    &[base, own].concat(),
                )
            }
        }
    };
}

pub(crate) use error_responses;

/// The responses for `codes` (plus the caller's and the framing middleware's), one per status.
pub fn responses(
    envelope: Envelope,
    caller: Caller,
    codes: &[ErrorCode],
) -> BTreeMap<String, RefOr<Response>> {
    let own: Vec<ErrorCode> = ErrorCode::ALL
        .iter()
        .copied()
        .filter(|c| codes.contains(c) || caller.codes().contains(c))
        .collect();
    let mut statuses: Vec<u16> = own
        .iter()
        .chain(&FRAMING)
        .map(|c| c.http_status())
        .collect();
    statuses.sort_unstable();
    statuses.dedup();
    statuses
        .into_iter()
        .map(|status| {
            let at = |list: &[ErrorCode]| -> Vec<ErrorCode> {
                list.iter()
                    .copied()
                    .filter(|c| c.http_status() == status)
                    .collect()
            };
            let mut own_at = at(&own);
            let mut framing_at = at(&FRAMING);
            if envelope == Envelope::Sluice {
                // One envelope: one list.
                for code in framing_at.drain(..) {
                    if !own_at.contains(&code) {
                        own_at.push(code);
                    }
                }
                own_at.sort_by_key(|c| ErrorCode::ALL.iter().position(|a| a == c));
            }
            let response = response(status, envelope, &own_at, &framing_at);
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

fn response(status: u16, envelope: Envelope, own: &[ErrorCode], framing: &[ErrorCode]) -> Response {
    let mut schemas = Vec::new();
    if !own.is_empty() {
        schemas.push(envelope_schema(envelope, status, own));
    }
    if !framing.is_empty() {
        schemas.push(envelope_schema(Envelope::Sluice, status, framing));
    }
    let schema = if schemas.len() == 1 {
        schemas.remove(0)
    } else {
        let any = schemas
            .into_iter()
            .fold(AnyOfBuilder::new(), |any, schema| any.item(schema));
        RefOr::T(Schema::AnyOf(any.build()))
    };
    let all: Vec<ErrorCode> = own.iter().chain(framing).copied().collect();
    let list = |codes: &[ErrorCode]| {
        codes
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let description = match (own.is_empty(), framing.is_empty()) {
        (false, false) => format!(
            "{reason}: {}; {} from the framing check before the route runs, in Sluice's \
             envelope.",
            list(own),
            list(framing)
        ),
        _ => format!("{reason}: {}.", list(&all)),
    };
    let mut builder =
        ResponseBuilder::new().content("application/json", Content::new(Some(schema)));
    for (name, header) in headers(status, &all) {
        builder = builder.header(name, header);
    }
    builder.description(description).build()
}

/// `{"error": ...}` of `envelope`, its `code` narrowed to `codes` (and OpenAI's `type` to the
/// status's).
fn envelope_schema(envelope: Envelope, status: u16, codes: &[ErrorCode]) -> RefOr<Schema> {
    let code = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(codes.iter().map(|c| c.as_str())));
    let (name, error) = match envelope {
        Envelope::Sluice => ("ErrorResponse", ObjectBuilder::new().property("code", code)),
        Envelope::OpenAi => {
            let kind = StatusCode::from_u16(status)
                .map(crate::routes::openai::error_type)
                .unwrap_or("server_error");
            let kind = ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([kind]));
            (
                "OpenAiErrorResponse",
                ObjectBuilder::new()
                    .property("code", code)
                    .property("type", kind),
            )
        }
    };
    let all = AllOfBuilder::new()
        .item(Ref::from_schema_name(name))
        .item(ObjectBuilder::new().property("error", error));
    RefOr::T(Schema::AllOf(all.build()))
}

/// The headers [`crate::error::ApiError`] adds at `status` for `codes`.
fn headers(status: u16, codes: &[ErrorCode]) -> Vec<(&'static str, utoipa::openapi::Header)> {
    let integer = |description: &str, minimum: u64| {
        HeaderBuilder::new()
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(minimum))
                    .build(),
            ))
            .description(Some(description))
            .build()
    };
    let mut out = Vec::new();
    match status {
        401 => out.push((
            "WWW-Authenticate",
            HeaderBuilder::new()
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(["Bearer"]))
                        .build(),
                ))
                .description(Some("Always `Bearer`."))
                .build(),
        )),
        429 => {
            out.push((
                "Retry-After",
                integer("Seconds until a retry may succeed.", 1),
            ));
            use ErrorCode::*;
            if codes
                .iter()
                .any(|c| matches!(c, RateLimited | QuotaExceeded | ConcurrencyLimited))
            {
                let only = if codes.contains(&QueueFull) {
                    " (not with `queue_full`)"
                } else {
                    ""
                };
                out.push((
                    "RateLimit-Limit",
                    integer(&format!("The limit that was reached{only}."), 0),
                ));
                out.push((
                    "RateLimit-Remaining",
                    integer(&format!("What is left of it{only}."), 0),
                ));
                out.push((
                    "RateLimit-Reset",
                    integer(&format!("Seconds until it resets{only}."), 0),
                ));
            }
        }
        503 => out.push(("Retry-After", integer("Always 1.", 1))),
        _ => {}
    }
    out
}
