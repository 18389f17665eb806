//! The API's Prometheus metrics and the middleware that records every request.
//!
//! Names follow what operators know from vLLM and TGI, under the `sluice_` prefix. Labels stay
//! bounded: routes are the router's patterns (`/v1/jobs/{id}`, never the id), error codes are a
//! fixed enum, tenants pass through [`TenantLabels`].

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};
use sluice_proto::ErrorCode;
use sluice_shared::metrics::{Families, LATENCY_BUCKETS, TenantLabels};
use tracing::Instrument;

/// How many tenants get a series of their own in per-tenant metrics.
pub const MAX_TENANT_LABELS: usize = 100;

pub struct ApiMetrics {
    pub registry: Arc<Registry>,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub rejections: IntCounterVec,
    pub enqueued: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub queue_oldest_age: GaugeVec,
    pub tenant_requests: IntCounterVec,
    pub jobs_finished: IntCounterVec,
    pub live_workers: IntGauge,
    pub tenants: TenantLabels,
    pub classifier_batch_seconds: Histogram,
    pub classifier_texts: IntCounter,
    pub classifier_cached_texts: IntCounter,
    pub batch_lines: IntCounterVec,
    pub batches_finished: IntCounterVec,
    pub batches_active: IntGauge,
    pub webhook_attempts: IntCounterVec,
    pub reconciled: IntCounterVec,
}

/// Feeds the classifier's scoring thread's batches into the metrics.
pub struct ClassifierMetrics {
    seconds: Histogram,
    texts: IntCounter,
    cached: IntCounter,
}

impl sluice_guard::classifier::ClassifierObserver for ClassifierMetrics {
    fn batch(&self, texts: usize, seconds: f64) {
        self.seconds.observe(seconds);
        self.texts.inc_by(texts as u64);
    }

    fn cached(&self, texts: usize) {
        self.cached.inc_by(texts as u64);
    }
}

impl ApiMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let f = Families::new(&registry);
        Self {
            http_requests: f.counter_vec(
                "sluice_http_requests_total",
                "HTTP requests by route pattern, method and status.",
                &["route", "method", "status"],
            ),
            http_duration: f.histogram_vec(
                "sluice_http_request_duration_seconds",
                "HTTP request latency (until the response head) by route pattern and method.",
                &["route", "method"],
                LATENCY_BUCKETS,
            ),
            rejections: f.counter_vec(
                "sluice_rejections_total",
                "Requests answered with an error, by stable error code.",
                &["code"],
            ),
            enqueued: f.counter_vec(
                "sluice_jobs_enqueued_total",
                "Jobs accepted and published to the broker, by priority class.",
                &["priority"],
            ),
            queue_depth: f.int_gauge_vec(
                "sluice_queue_depth",
                "Jobs accepted and not yet started, by priority class (read at scrape).",
                &["priority"],
            ),
            queue_oldest_age: f.gauge_vec(
                "sluice_queue_oldest_job_age_seconds",
                "Age of the oldest job not yet started, by priority class (0 when none).",
                &["priority"],
            ),
            tenant_requests: f.counter_vec(
                "sluice_tenant_requests_total",
                "Authenticated requests per tenant, rate-limited ones included (the first \
                 tenants seen get their own series; later ones share `other`).",
                &["tenant"],
            ),
            jobs_finished: f.counter_vec(
                "sluice_jobs_finished_total",
                "Jobs this API replica moved to a terminal state (a queued job cancelled), by \
                 status; workers count the rest under the same name.",
                &["status"],
            ),
            live_workers: f.int_gauge(
                "sluice_live_workers",
                "Workers whose heartbeat has not expired (read at scrape).",
            ),
            tenants: TenantLabels::new(MAX_TENANT_LABELS),
            classifier_batch_seconds: f.histogram(
                "sluice_guard_classifier_batch_seconds",
                "Time the injection classifier took per batch of texts (one forward pass \
                 shared by concurrent requests).",
                LATENCY_BUCKETS,
            ),
            classifier_texts: f.counter(
                "sluice_guard_classifier_texts_total",
                "Texts (messages and their decoded layers) scored by the injection classifier.",
            ),
            classifier_cached_texts: f.counter(
                "sluice_guard_classifier_cached_texts_total",
                "Texts answered from the classifier's score cache (the same tenant sent the same \
                 text recently: its system prompt, its history) instead of scored again.",
            ),
            batch_lines: f.counter_vec(
                "sluice_batch_lines_total",
                "Batch lines this replica's batch drivers finished, by outcome: `completed` (in \
                 the output file) or `failed` (in the error file: refused, failed, cancelled or \
                 expired).",
                &["outcome"],
            ),
            batches_finished: f.counter_vec(
                "sluice_batches_finished_total",
                "Batches this replica's drivers ended, by status.",
                &["status"],
            ),
            batches_active: f.int_gauge(
                "sluice_batches_active",
                "Batches not yet ended, in all replicas (read at scrape).",
            ),
            reconciled: f.counter_vec(
                "sluice_reconciled_jobs_total",
                "Jobs the reconciler completed after a crash between a job's steps: `settled` \
                 (ended, refunded now), `fenced` (admission never written), `expired` (in \
                 flight long past its deadline).",
                &["outcome"],
            ),
            webhook_attempts: f.counter_vec(
                "sluice_webhook_attempts_total",
                "Webhook delivery attempts this replica made, by outcome: `delivered`, `failed` \
                 or `refused` (a retry is scheduled), `dead` (the last one failed).",
                &["outcome"],
            ),
            registry: Arc::new(registry),
        }
    }

    /// The observer the classifier's scoring thread reports to.
    pub fn classifier_observer(&self) -> ClassifierMetrics {
        ClassifierMetrics {
            seconds: self.classifier_batch_seconds.clone(),
            texts: self.classifier_texts.clone(),
            cached: self.classifier_cached_texts.clone(),
        }
    }

    /// Reads the gauges that live in Redis: queue depth and age per class, live workers,
    /// active batches.
    /// A Redis outage leaves the previous values (and `/readyz` reports it).
    pub async fn refresh(
        &self,
        store: &sluice_jobs::store::JobStore,
        workers: &sluice_jobs::workers::WorkerRegistry,
        batches: &crate::batches::store::BatchStore,
    ) {
        match batches.active_count().await {
            Ok(n) => self
                .batches_active
                .set(i64::try_from(n).unwrap_or(i64::MAX)),
            Err(e) => tracing::debug!(error = %e, "cannot count active batches"),
        }
        let now = sluice_proto::now_ms();
        match store.queue_stats(now).await {
            Ok(stats) => {
                for s in stats {
                    let class = s.priority.as_str();
                    self.queue_depth
                        .with_label_values(&[class])
                        .set(i64::try_from(s.depth).unwrap_or(i64::MAX));
                    let age = s
                        .oldest_created_ms
                        .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
                    self.queue_oldest_age.with_label_values(&[class]).set(age);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read queue stats"),
        }
        match workers.live().await {
            Ok(live) => self
                .live_workers
                .set(i64::try_from(live.len()).unwrap_or(i64::MAX)),
            Err(e) => tracing::debug!(error = %e, "cannot read the worker registry"),
        }
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Records every request (count, latency, rejection code) and runs it in a server span that
/// continues the caller's W3C trace when OpenTelemetry export is on.
pub async fn track(
    State(metrics): State<Arc<ApiMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let span = tracing::info_span!(
        "http",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.route = %route,
        http.method = %method,
        http.status_code = tracing::field::Empty,
    );
    if let Some(tp) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        let state_header = request
            .headers()
            .get("tracestate")
            .and_then(|v| v.to_str().ok());
        sluice_shared::telemetry::set_remote_parent(&span, tp, state_header);
    }
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.status_code", status.as_u16());
    let m = &metrics;
    m.http_requests
        .with_label_values(&[route.as_str(), method.as_str(), status.as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[route.as_str(), method.as_str()])
        .observe(started.elapsed().as_secs_f64());
    if let Some(code) = response.extensions().get::<ErrorCode>() {
        m.rejections.with_label_values(&[code.as_str()]).inc();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_registers_once_and_renders() {
        let m = ApiMetrics::new();
        m.rejections.with_label_values(&["rate_limited"]).inc();
        m.enqueued.with_label_values(&["batch"]).inc();
        let text = sluice_shared::metrics::render(&m.registry);
        assert!(text.contains("sluice_rejections_total{code=\"rate_limited\"} 1"));
        assert!(text.contains("sluice_jobs_enqueued_total{priority=\"batch\"} 1"));
        assert!(text.contains("# TYPE sluice_live_workers gauge"));
    }
}
