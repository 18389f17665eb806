//! `GET /v1/jobs/{id}/events`: a job's generated text as Server-Sent Events, as it is produced,
//! ending with a `done` event that carries the terminal job (status, result or error).
//!
//! Events come from the job's Redis stream; each SSE `id` is the stream entry id, so a client
//! that reconnects with `Last-Event-ID` resumes right after what it saw. A job that ended
//! without generating (cancelled while queued, expired, failed) has no stream: its `done`
//! event is built from the record. Each open stream holds its own Redis connection, because
//! `XREAD BLOCK` would stall a shared one.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use futures_util::stream::{self, StreamExt};
use serde_json::json;
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

type Entries = Option<Vec<(String, Vec<(String, Vec<String>)>)>>;

struct Cursor {
    conn: redis::aio::MultiplexedConnection,
    state: AppState,
    tenant: String,
    id: Uuid,
    key: String,
    last: String,
    finished: bool,
}

fn valid_stream_id(s: &str) -> bool {
    let mut parts = s.split('-');
    let ok =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

async fn done_event(c: &Cursor, id: Option<&str>) -> Event {
    let view = c.state.store.get(&c.tenant, &c.id).await.ok().flatten();
    let event = Event::default()
        .event("done")
        .data(json!({ "job": view }).to_string());
    match id {
        Some(id) => event.id(id),
        None => event,
    }
}

/// One round: read what is new (waiting up to a second), or check whether the job ended
/// without a stream.
async fn next_events(mut c: Cursor) -> Option<(Vec<Event>, Cursor)> {
    if c.finished {
        return None;
    }
    let read: Result<Entries, _> = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(1000)
        .arg("COUNT")
        .arg(256)
        .arg("STREAMS")
        .arg(&c.key)
        .arg(&c.last)
        .query_async(&mut c.conn)
        .await;
    let mut events = Vec::new();
    match read {
        Ok(Some(streams)) => {
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
                    events.push(
                        Event::default()
                            .event("text")
                            .id(entry_id)
                            .data(json!({ "text": text }).to_string()),
                    );
                }
            }
        }
        Ok(None) => {
            // Nothing new: a job that is terminal but never streamed ends here.
            let view = c.state.store.get(&c.tenant, &c.id).await.ok().flatten();
            let terminal = view.as_ref().is_none_or(|v| v.status.is_terminal());
            let exists: bool = redis::cmd("EXISTS")
                .arg(&c.key)
                .query_async(&mut c.conn)
                .await
                .unwrap_or(true);
            if terminal && !exists {
                events.push(done_event(&c, None).await);
                c.finished = true;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "event stream read failed");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Some((events, c))
}

pub async fn events(
    principal: Principal,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    state
        .store
        .get(&principal.tenant, &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_stream_id(v))
        .unwrap_or("0-0")
        .to_string();
    let mut conn = state
        .stream_client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| ApiError::Store(e.into()))?;
    // The default response timeout (500 ms) is shorter than the blocking read.
    conn.set_response_timeout(Duration::from_secs(5));
    let cursor = Cursor {
        conn,
        key: state.store.keyspace().job_events(&id),
        state,
        tenant: principal.tenant,
        id,
        last,
        finished: false,
    };
    let stream = stream::unfold(cursor, next_events)
        .flat_map(|events| stream::iter(events.into_iter().map(Ok)));
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
    }
}
