//! Prometheus metrics both binaries share: building metric families on one registry, a
//! bounded tenant label, and the `/metrics` listener.
//!
//! Each process owns one [`prometheus::Registry`] (no global state, so a test may build many).
//! `/metrics` is served on a listener of its own (`--metrics-addr`), apart from the API port,
//! so scraping needs no API key and can stay on an internal network.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use prometheus;

/// The nearest-rank `q` quantile (0..=1) of `values` (sorted here), or zero when there are
/// none: what the benchmarks and load tests report as p50 and p99.
pub fn nearest_rank(values: &mut [std::time::Duration], q: f64) -> std::time::Duration {
    if values.is_empty() {
        return std::time::Duration::ZERO;
    }
    values.sort();
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    values[i.min(values.len() - 1)]
}

/// Latency buckets in seconds, from 1 ms to 2 minutes (HTTP, queueing, end to end).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Per-token latency buckets in seconds (inter-token latency, time per output token).
pub const TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
];

/// Registers metric families on one registry. Metric names are fixed at compile time, so a
/// registration failure (a duplicate name) is a programming error caught by the unit tests of
/// each binary's metrics; it panics at start, never later.
pub struct Families<'r> {
    registry: &'r Registry,
}

impl<'r> Families<'r> {
    pub fn new(registry: &'r Registry) -> Self {
        Self { registry }
    }

    /// Registers a metric just built; both steps fail only on a malformed or duplicate name.
    fn register<C: prometheus::core::Collector + Clone + 'static>(
        &self,
        built: prometheus::Result<C>,
    ) -> C {
        let metric = built.expect("a valid metric name and labels");
        self.registry
            .register(Box::new(metric.clone()))
            .expect("metric names are unique");
        metric
    }

    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help))
    }

    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels))
    }

    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.register(Gauge::new(name, help))
    }

    pub fn int_gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help))
    }

    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.register(GaugeVec::new(Opts::new(name, help), labels))
    }

    pub fn int_gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        self.register(Histogram::with_opts(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        ))
    }

    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> HistogramVec {
        self.register(HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        ))
    }
}

/// The label value for a tenant, from a bounded set: the first `max` tenants seen get their
/// own series, every later one is counted as `other`. Keeps per-tenant metrics from growing
/// without bound (Prometheus cardinality) while still showing the biggest users, who are
/// usually the earliest.
pub struct TenantLabels {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

/// The label value of tenants past the bound.
pub const OTHER_TENANT: &str = "other";

impl TenantLabels {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    pub fn label<'a>(&self, tenant: &'a str) -> &'a str {
        let Ok(mut seen) = self.seen.lock() else {
            return OTHER_TENANT;
        };
        if seen.contains(tenant) {
            return tenant;
        }
        // A tenant literally named `other` would be ambiguous; it shares the overflow series.
        if seen.len() < self.max && tenant != OTHER_TENANT {
            seen.insert(tenant.to_string());
            return tenant;
        }
        OTHER_TENANT
    }
}

/// The registry's metrics in Prometheus' text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Serves `GET /metrics` on `listener` in a task of its own until `stop` turns true.
/// `refresh` runs before each scrape (for gauges read from Redis at scrape time); then the
/// registry is rendered.
pub fn spawn<F, Fut>(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    refresh: F,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    use axum::http::header;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            let refresh = refresh.clone();
            async move {
                refresh().await;
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    render(&registry),
                )
            }
        }),
    );
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "metrics listener failed");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        use std::time::Duration;
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(nearest_rank(&mut v, 0.5), Duration::from_millis(51));
        assert_eq!(nearest_rank(&mut v, 0.99), Duration::from_millis(99));
        assert_eq!(nearest_rank(&mut v, 1.0), Duration::from_millis(100));
        assert_eq!(nearest_rank(&mut [], 0.5), Duration::ZERO);
    }

    #[test]
    fn tenant_labels_are_bounded() {
        let labels = TenantLabels::new(2);
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("c"), OTHER_TENANT);
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("other"), OTHER_TENANT);
    }

    #[test]
    fn renders_text_format() {
        let registry = Registry::new();
        let f = Families::new(&registry);
        let c = f.counter_vec("sluice_test_total", "A test counter.", &["code"]);
        c.with_label_values(&["x"]).inc_by(3);
        let h = f.histogram("sluice_test_seconds", "A test histogram.", LATENCY_BUCKETS);
        h.observe(0.003);
        let text = render(&registry);
        assert!(text.contains("sluice_test_total{code=\"x\"} 3"), "{text}");
        assert!(
            text.contains("sluice_test_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("sluice_test_seconds_count 1"), "{text}");
    }
}
