//! The publish stage's undo: an admission whose publish failed, or whose answer was lost, is
//! rolled back, now or in the background once Redis answers.

use sluice_proto::JobMessage;

/// Undoes an admission that may have been written, whole or in part, for a job that was never
/// published: now, or, while Redis is unreachable, in the background with backoff for up to an
/// hour (the reconciler settles it too, a minute after its admission). Until then the tenant
/// holds a reservation and a queue slot; the job never runs (nothing was published). The undo
/// acts only on a `queued` or missing record and refunds at most once, so a retry after
/// success changes nothing.
pub(super) async fn rollback_eventually(
    store: sluice_jobs::store::JobStore,
    job: JobMessage,
    idempotency: Option<String>,
) {
    let id = job.id;
    if store.abandon(&job, idempotency.as_deref()).await.is_ok() {
        return;
    }
    tracing::warn!(job_id = %id, "cannot roll back an unpublished admission yet; retrying");
    tokio::spawn(async move {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        let mut delay = std::time::Duration::from_millis(200);
        while std::time::Instant::now() < give_up {
            tokio::time::sleep(delay).await;
            if store.abandon(&job, idempotency.as_deref()).await.is_ok() {
                tracing::info!(job_id = %id, "unpublished admission rolled back");
                return;
            }
            delay = (delay * 2).min(std::time::Duration::from_secs(10));
        }
        tracing::error!(job_id = %id, "gave up rolling back an unpublished admission");
    });
}
