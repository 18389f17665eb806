//! The reconciler loop: every API process runs [`JobStore::reconcile`] every few seconds, so
//! that a job whose process died between a job-slot step and its tenant's or the namespace's
//! bookkeeping is settled, fenced or expired (see `sluice_jobs::store`). Concurrent loops in
//! other replicas share the work; each pass claims what it looks at.

use std::time::Duration;

use sluice_jobs::store::JobStore;
use tokio::sync::watch;

use crate::metrics::ApiMetrics;

/// How often a pass runs, and how many in-flight entries it looks at most per queue shard.
const EVERY: Duration = Duration::from_secs(5);
const PER_PASS: usize = 500;

pub fn spawn(
    store: JobStore,
    metrics: std::sync::Arc<ApiMetrics>,
    mut stopping: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match store.reconcile(sluice_proto::now_ms(), PER_PASS).await {
                Ok(done) => {
                    for (outcome, n) in [
                        ("settled", done.settled),
                        ("fenced", done.fenced),
                        ("expired", done.expired),
                    ] {
                        if n > 0 {
                            metrics.reconciled.with_label_values(&[outcome]).inc_by(n);
                            tracing::warn!(outcome, jobs = n, "reconciler completed jobs");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reconciler pass failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(EVERY) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    })
}
