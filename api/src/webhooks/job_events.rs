//! `job.succeeded` and `job.failed` events for jobs submitted with `"webhook": true`.
//!
//! The worker ends jobs; the API sends webhooks. A job that asks for an event is put in the
//! sorted set `{ns}:webhook-jobs` (as `{tenant}/{id}`) when it is admitted, before it is
//! published, so it cannot end unwatched. A watcher in every API process (the one that
//! delivers webhooks) reads the set every `poll`: for a job that ended, the process that
//! claims it (an expiring key) queues the event through [`super::Webhooks::emit`] and only
//! then removes it from the set, so a process that dies in between leaves it for another
//! (at least once). A cancelled job sends no event; a job whose record is gone (a rolled-back
//! submit, or one older than the result TTL) leaves the set silently.

use std::time::Duration;

use serde_json::json;
use sluice_jobs::store::{JobStore, StoreError};
use sluice_proto::JobStatus;
use tokio::sync::watch;
use uuid::Uuid;

use super::Webhooks;

/// Jobs read per pass.
const PAGE: isize = 500;
/// How long a claim on a job's event lasts: another process retries after it.
const CLAIM_SECS: u64 = 60;

fn member(tenant: &str, id: &Uuid) -> String {
    format!("{tenant}/{id}")
}

/// Watches `id`'s end (called by the submit path before publishing).
pub async fn watch(store: &JobStore, tenant: &str, id: &Uuid) -> Result<(), StoreError> {
    let mut conn = store.pool().get().await?;
    let _: () = redis::cmd("ZADD")
        .arg(store.keyspace().webhook_jobs())
        .arg(sluice_proto::now_ms())
        .arg(member(tenant, id))
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// Stops watching `id` (its submit was rolled back).
pub async fn unwatch(store: &JobStore, tenant: &str, id: &Uuid) -> Result<(), StoreError> {
    let mut conn = store.pool().get().await?;
    let _: () = redis::cmd("ZREM")
        .arg(store.keyspace().webhook_jobs())
        .arg(member(tenant, id))
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// The event a job's end sends, if any.
fn event_type(status: JobStatus) -> Option<&'static str> {
    match status {
        JobStatus::Succeeded => Some("job.succeeded"),
        JobStatus::Cancelled | JobStatus::Queued | JobStatus::Running => None,
        _ => Some("job.failed"),
    }
}

/// One pass over the watched jobs; returns how many events it queued.
pub async fn pass(store: &JobStore, webhooks: &Webhooks) -> Result<usize, StoreError> {
    let ks = store.keyspace();
    let members: Vec<String> = {
        let mut conn = store.pool().get().await?;
        redis::cmd("ZRANGE")
            .arg(ks.webhook_jobs())
            .arg(0)
            .arg(PAGE - 1)
            .query_async(&mut conn)
            .await?
    };
    let mut sent = 0;
    for entry in members {
        let Some((tenant, id)) = entry
            .split_once('/')
            .and_then(|(t, id)| id.parse::<Uuid>().ok().map(|id| (t.to_string(), id)))
        else {
            forget(store, &entry).await?;
            continue;
        };
        let view = match store.get(&tenant, &id).await? {
            Some(view) if !view.status.is_terminal() => continue,
            Some(view) => view,
            None => {
                forget(store, &entry).await?;
                continue;
            }
        };
        let Some(event) = event_type(view.status) else {
            forget(store, &entry).await?;
            continue;
        };
        let claimed: Option<String> = {
            let mut conn = store.pool().get().await?;
            redis::cmd("SET")
                .arg(ks.webhook_job_claim(&id))
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(CLAIM_SECS)
                .query_async(&mut conn)
                .await?
        };
        if claimed.is_none() {
            continue;
        }
        let data = json!({
            "id": id,
            "status": view.status,
            "error": view.error.as_ref().map(|e| e.code),
        });
        match webhooks.emit(&tenant, event, data).await {
            Ok(()) => {
                forget(store, &entry).await?;
                sent += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, job_id = %id, "job webhook not queued; retrying");
                let mut conn = store.pool().get().await?;
                let _: () = redis::cmd("DEL")
                    .arg(ks.webhook_job_claim(&id))
                    .query_async(&mut conn)
                    .await?;
            }
        }
    }
    Ok(sent)
}

async fn forget(store: &JobStore, entry: &str) -> Result<(), StoreError> {
    let mut conn = store.pool().get().await?;
    let _: () = redis::cmd("ZREM")
        .arg(store.keyspace().webhook_jobs())
        .arg(entry)
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// Runs [`pass`] every `poll` until `stopping` turns true.
pub fn spawn_watcher(
    store: JobStore,
    webhooks: Webhooks,
    poll: Duration,
    mut stopping: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if *stopping.borrow() {
                return;
            }
            if let Err(e) = pass(&store, &webhooks).await {
                tracing::warn!(error = %e, "job webhook watcher pass failed");
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                _ = stopping.changed() => {}
            }
        }
    })
}
