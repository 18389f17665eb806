//! `GET /v1/jobs/{id}/events`: a job's generated text as Server-Sent Events, as it is produced,
//! ending with a `done` event that carries the terminal job (status, result or error).
//!
//! Events come from the job's Redis stream; each SSE `id` is the stream entry id, so a client
//! that reconnects with `Last-Event-ID` resumes right after what it saw. A job that ended
//! without generating (cancelled while queued, expired, failed) has no stream: its `done`
//! event is built from the record. Each open stream holds its own Redis connection, because
//! `XREAD BLOCK` would stall a shared one; connections are reused across streams
//! ([`crate::stream_conns`]).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use futures_util::stream::{self, StreamExt};
use serde_json::json;
use sluice_proto::JobView;
use uuid::Uuid;

use crate::error::ApiError;
use crate::extract::PathParam;
use crate::openapi::error_responses;
use crate::principal::Principal;
use crate::state::AppState;
use crate::stream_conns::StreamConnection;

type Entries = Option<Vec<(String, Vec<(String, Vec<String>)>)>>;

struct Cursor {
    conn: StreamConnection,
    state: AppState,
    tenant: String,
    id: Uuid,
    key: String,
    last: String,
    finished: bool,
    /// Reads that failed in a row; the stream ends after [`MAX_READ_ERRORS`] (the client
    /// resumes with `Last-Event-ID`).
    errors: u32,
}

/// Failed stream reads in a row before an event stream gives up.
const MAX_READ_ERRORS: u32 = 5;

/// A Redis stream entry id: two decimal numbers that fit in 64 bits, joined by `-`.
fn valid_stream_id(s: &str) -> bool {
    let mut parts = s.split('-');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u64>().is_ok()
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// What happens to a job, in order: pieces of text, then its end.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// Generated text (already redacted by the worker), with its stream entry id.
    Text { entry: String, text: String },
    /// The job ended; `job` is its terminal record (`None` if it has expired from the store).
    Done {
        entry: Option<String>,
        job: Option<Box<JobView>>,
    },
}

async fn done_event(c: &Cursor, entry: Option<&str>) -> JobEvent {
    let view = c.state.store.get(&c.tenant, &c.id).await.ok().flatten();
    JobEvent::Done {
        entry: entry.map(str::to_string),
        job: view.map(Box::new),
    }
}

/// One round: read what is new (waiting up to a second), or check whether the job ended
/// without a stream.
async fn next_events(mut c: Cursor) -> Option<(Vec<JobEvent>, Cursor)> {
    if c.finished {
        return None;
    }
    let read: Result<Entries, _> = c
        .conn
        .query(
            redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(1000)
                .arg("COUNT")
                .arg(256)
                .arg("STREAMS")
                .arg(&c.key)
                .arg(&c.last),
        )
        .await;
    let mut events = Vec::new();
    match read {
        Ok(Some(streams)) => {
            c.errors = 0;
            for (_, entries) in streams {
                for (entry_id, fields) in entries {
                    let get = |name: &str| {
                        fields
                            .chunks(2)
                            .find(|kv| kv[0] == name)
                            .and_then(|kv| kv.get(1))
                            .cloned()
                    };
                    c.last = entry_id.clone();
                    if get("type").as_deref() == Some("done") {
                        events.push(done_event(&c, Some(&entry_id)).await);
                        c.finished = true;
                        break;
                    }
                    let text = get("text").unwrap_or_default();
                    events.push(JobEvent::Text {
                        entry: entry_id,
                        text,
                    });
                }
            }
        }
        Ok(None) => {
            c.errors = 0;
            // Nothing new. A terminal job has nothing more to stream: its `done` entry, if it
            // has one, is at or before the cursor (a client resuming after it), or there is
            // no stream at all (it ended without generating). One last look without waiting
            // catches an entry written since the blocking read returned.
            let view = c.state.store.get(&c.tenant, &c.id).await.ok().flatten();
            let terminal = view.as_ref().is_none_or(|v| v.status.is_terminal());
            if terminal {
                let late: Result<Entries, _> = c
                    .conn
                    .query(
                        redis::cmd("XREAD")
                            .arg("COUNT")
                            .arg(1)
                            .arg("STREAMS")
                            .arg(&c.key)
                            .arg(&c.last),
                    )
                    .await;
                if matches!(late, Ok(None)) {
                    events.push(done_event(&c, None).await);
                    c.finished = true;
                }
            }
        }
        Err(e) => {
            c.errors += 1;
            tracing::warn!(error = %e, errors = c.errors, "event stream read failed");
            if c.errors >= MAX_READ_ERRORS {
                c.finished = true;
            } else {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Some((events, c))
}

/// A job's events from stream entry `last` on (`"0-0"`: from the start), after checking that
/// the job belongs to `tenant`. Shared by this route and the OpenAI-compatible stream.
pub async fn job_events(
    state: AppState,
    tenant: String,
    id: Uuid,
    last: String,
) -> Result<impl Stream<Item = JobEvent>, ApiError> {
    state
        .store
        .get(&tenant, &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let conn = state
        .stream_conns
        .get()
        .await
        .map_err(|e| ApiError::Store(e.into()))?;
    let cursor = Cursor {
        conn,
        key: state.store.keyspace().job_events(&id),
        state,
        tenant,
        id,
        last,
        finished: false,
        errors: 0,
    };
    Ok(stream::unfold(cursor, next_events).flat_map(stream::iter))
}

/// The `data` of a `text` event.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct TextEvent {
    /// Generated text (PII-redacted on the way).
    text: String,
}

/// The `data` of the `done` event.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct DoneEvent {
    /// The terminal job (`null` if it has expired from the store).
    #[schema(required = true)]
    job: Option<JobView>,
}

error_responses!(EventsErrors: Sluice, User, [InvalidParameter, NotFound]);

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    operation_id = "stream_job_events",
    tag = "jobs",
    summary = "A job's text as Server-Sent Events",
    description = "`text` events as the model writes (`data`: a `TextEvent`, `{\"text\": ...}`), \
                   then one `done` event with the terminal job (`data`: a `DoneEvent`, \
                   `{\"job\": ...}`), then the stream ends; a comment every 15 s keeps it \
                   open. Each event's `id` is its stream entry id: reconnect with \
                   `Last-Event-ID` to resume after it. Text is PII-redacted on the way: what \
                   could still become personal data, or the start of a leaked system prompt, \
                   is held back until it is decided; the stream's text always equals the \
                   redacted result.",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The job's id."),
        (
            "Last-Event-ID" = Option<String>,
            Header,
            description = "Resume after this event: the `id` of an event of this stream, two \
                           decimal numbers joined by `-` (such as `1700000000000-0`). The \
                           pattern allows 19 digits each, more than real ids have; the server \
                           takes any number up to 2^64 - 1.",
            pattern = "^[0-9]{1,19}-[0-9]{1,19}$",
            nullable = false,
        ),
    ),
    responses(
        (
            status = 200,
            description = "The event stream.",
            content_type = "text/event-stream",
            body = crate::openapi::schemas::SseEvent,
        ),
        EventsErrors,
    ),
)]
pub async fn events(
    principal: Principal,
    State(state): State<AppState>,
    PathParam(id): PathParam,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let last = match headers.get("last-event-id") {
        None => "0-0".to_string(),
        Some(v) => v
            .to_str()
            .ok()
            .filter(|v| valid_stream_id(v))
            .ok_or_else(|| {
                ApiError::client(
                    sluice_proto::ErrorCode::InvalidParameter,
                    "Last-Event-ID must be the id of an event of this stream (such as \
                     1700000000000-0)",
                )
            })?
            .to_string(),
    };
    let events = job_events(state, principal.tenant, id, last).await?;
    let stream = events.map(|event| {
        Ok(match event {
            JobEvent::Text { entry, text } => Event::default()
                .event("text")
                .id(entry)
                .data(json!({ "text": text }).to_string()),
            JobEvent::Done { entry, job } => {
                let event = Event::default()
                    .event("done")
                    .data(json!({ "job": job }).to_string());
                match entry {
                    Some(id) => event.id(id),
                    None => event,
                }
            }
        })
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stream_ids_are_resumed_from() {
        assert!(valid_stream_id("1700000000000-0"));
        assert!(!valid_stream_id("1700000000000"));
        assert!(!valid_stream_id("a-b"));
        assert!(!valid_stream_id("1-2-3"));
        assert!(!valid_stream_id("$"));
        assert!(!valid_stream_id("99999999999999999999-0"), "over 64 bits");
    }
}
