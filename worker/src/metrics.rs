//! The worker's Prometheus metrics: job lifecycle, latency per token and per job, tokens,
//! batch size, KV cache use and, on CUDA workers, device memory.
//!
//! The engine thread updates the engine gauges after every step; the job handler counts
//! lifecycle events and observes per-job latencies. Names follow vLLM's and TGI's (`sluice_`
//! prefix): `sluice_time_to_first_token_seconds`, `sluice_num_requests_running`, ...

use std::sync::Arc;

use prometheus::{Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use sluice_shared::metrics::{Families, LATENCY_BUCKETS, TOKEN_BUCKETS, TenantLabels};

use crate::engine::generate::Generation;

/// How many tenants get a series of their own in `sluice_tenant_tokens_total`.
pub const MAX_TENANT_LABELS: usize = 100;

pub struct WorkerMetrics {
    pub registry: Arc<Registry>,
    pub jobs_started: IntCounter,
    pub jobs_finished: IntCounterVec,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub queue_wait: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub tenant_tokens: IntCounterVec,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub batch_size: Histogram,
    pub kv_usage: Gauge,
    pub info: IntGaugeVec,
    /// Device memory, only on CUDA workers (absent series rather than zeros on CPU).
    pub gpu_memory: Option<(IntGauge, IntGauge)>,
    /// Busy fraction of the GPU over NVML's last sample period, only on CUDA workers.
    pub gpu_utilization: Option<Gauge>,
    pub tenants: TenantLabels,
    /// The injection judge's verdicts (`injection`, `clean`, `error`).
    pub judge_verdicts: IntCounterVec,
    /// How long the injection judge took per judged job.
    pub judge_duration: Histogram,
    /// Admitted jobs that looked their prompt up in the prefix cache, by `hit` or `miss`.
    pub prefix_lookups: IntCounterVec,
    /// Prompt tokens taken from the prefix cache instead of prefilled.
    pub prefix_reused_tokens: IntCounter,
    /// Pages in the prefix cache now (in use or idle).
    pub prefix_cached_pages: IntGauge,
    /// Cached pages no sequence holds now (evictable).
    pub prefix_idle_pages: IntGauge,
    /// Cached pages evicted to make room.
    pub prefix_evicted_pages: IntCounter,
}

impl WorkerMetrics {
    pub fn new(gpu: bool) -> Self {
        let registry = Registry::new();
        let f = Families::new(&registry);
        let gpu_memory = gpu.then(|| {
            (
                f.int_gauge(
                    "sluice_gpu_memory_used_bytes",
                    "Device memory in use (all processes), from the CUDA driver.",
                ),
                f.int_gauge(
                    "sluice_gpu_memory_total_bytes",
                    "Device memory in total, from the CUDA driver.",
                ),
            )
        });
        let gpu_utilization = gpu.then(|| {
            f.gauge(
                "sluice_gpu_utilization_ratio",
                "Fraction of NVML's last sample period in which a kernel ran on the GPU.",
            )
        });
        Self {
            gpu_utilization,
            jobs_started: f.counter(
                "sluice_jobs_started_total",
                "Job attempts started (a redelivered job counts again).",
            ),
            jobs_finished: f.counter_vec(
                "sluice_jobs_finished_total",
                "Jobs this worker moved to a terminal state, or dead-lettered, by status.",
                &["status"],
            ),
            time_to_first_token: f.histogram(
                "sluice_time_to_first_token_seconds",
                "From the job's start on this worker to its first generated token.",
                LATENCY_BUCKETS,
            ),
            inter_token_latency: f.histogram(
                "sluice_inter_token_latency_seconds",
                "Time between consecutive tokens of a sequence (one decode step).",
                TOKEN_BUCKETS,
            ),
            e2e_latency: f.histogram(
                "sluice_e2e_request_latency_seconds",
                "From acceptance by the API to the terminal state.",
                LATENCY_BUCKETS,
            ),
            queue_wait: f.histogram(
                "sluice_queue_wait_seconds",
                "From acceptance by the API to the start on a worker.",
                LATENCY_BUCKETS,
            ),
            prompt_tokens: f.counter("sluice_prompt_tokens_total", "Prompt tokens prefilled."),
            generation_tokens: f.counter("sluice_generation_tokens_total", "Tokens generated."),
            tenant_tokens: f.counter_vec(
                "sluice_tenant_tokens_total",
                "Tokens per tenant (the first tenants seen; later ones as `other`) and kind.",
                &["tenant", "kind"],
            ),
            running: f.int_gauge(
                "sluice_num_requests_running",
                "Sequences in the running batch.",
            ),
            waiting: f.int_gauge(
                "sluice_num_requests_waiting",
                "Jobs handed to the engine and waiting for a batch slot or KV budget.",
            ),
            batch_size: f.histogram(
                "sluice_batch_size",
                "Sequences decoded together per step.",
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            kv_usage: f.gauge(
                "sluice_kv_cache_usage_ratio",
                "Fraction of the KV cache pool's pages in use.",
            ),
            info: f.int_gauge_vec(
                "sluice_worker_info",
                "Always 1; labels say what this worker serves.",
                &["model", "device"],
            ),
            judge_verdicts: f.counter_vec(
                "sluice_injection_judge_verdicts_total",
                "Jobs in a tenant's classifier grey band judged by the served model, by verdict.",
                &["verdict"],
            ),
            judge_duration: f.histogram(
                "sluice_injection_judge_seconds",
                "Time the served model took to judge one job before generating it.",
                LATENCY_BUCKETS,
            ),
            prefix_lookups: f.counter_vec(
                "sluice_prefix_cache_lookups_total",
                "Admitted jobs that looked their prompt up in the prefix cache (their tenant's \
                 cached pages), by result: `hit` (at least one prompt token reused) or `miss`.",
                &["result"],
            ),
            prefix_reused_tokens: f.counter(
                "sluice_prefix_cache_reused_tokens_total",
                "Prompt tokens taken from the prefix cache instead of prefilled.",
            ),
            prefix_cached_pages: f.int_gauge(
                "sluice_prefix_cache_pages",
                "KV pages in the prefix cache (held by a sequence or idle).",
            ),
            prefix_idle_pages: f.int_gauge(
                "sluice_prefix_cache_idle_pages",
                "Cached KV pages no sequence holds (evicted least recently used on demand).",
            ),
            prefix_evicted_pages: f.counter(
                "sluice_prefix_cache_evicted_pages_total",
                "Cached KV pages evicted to make room for a sequence.",
            ),
            gpu_memory,
            tenants: TenantLabels::new(MAX_TENANT_LABELS),
            registry: Arc::new(registry),
        }
    }

    /// Counts one admitted job's prefix-cache lookup that reused `tokens` prompt tokens.
    pub fn observe_prefix_lookup(&self, tokens: usize) {
        let result = if tokens > 0 { "hit" } else { "miss" };
        self.prefix_lookups.with_label_values(&[result]).inc();
        self.prefix_reused_tokens.inc_by(tokens as u64);
    }

    /// The prefix cache's size, and the evictions since the last call.
    pub fn observe_prefix_cache(&self, stats: crate::engine::kv::PrefixStats) {
        self.prefix_cached_pages.set(stats.cached_pages as i64);
        self.prefix_idle_pages.set(stats.idle_pages as i64);
        let seen = self.prefix_evicted_pages.get();
        if stats.evicted_pages > seen {
            self.prefix_evicted_pages.inc_by(stats.evicted_pages - seen);
        }
    }

    /// Counts a finished generation's tokens and per-token latencies.
    pub fn observe_generation(&self, tenant: &str, g: &Generation) {
        if g.completion_tokens > 0 {
            self.time_to_first_token
                .observe(g.time_to_first_token.as_secs_f64());
        }
        self.prompt_tokens.inc_by(g.prompt_tokens as u64);
        self.generation_tokens.inc_by(g.completion_tokens as u64);
        let tenant = self.tenants.label(tenant);
        self.tenant_tokens
            .with_label_values(&[tenant, "prompt"])
            .inc_by(g.prompt_tokens as u64);
        self.tenant_tokens
            .with_label_values(&[tenant, "generated"])
            .inc_by(g.completion_tokens as u64);
    }

    /// Counts a job that ended by `status` (or `dead_lettered`) without a latency: it never
    /// ran here.
    pub fn ended(&self, status: &str) {
        self.jobs_finished.with_label_values(&[status]).inc();
    }

    /// A job reached a terminal state through this worker (or was dead-lettered).
    pub fn finished(&self, status: &str, created_at_ms: u64) {
        self.ended(status);
        let now = sluice_proto::now_ms();
        self.e2e_latency
            .observe(now.saturating_sub(created_at_ms) as f64 / 1000.0);
    }
}

/// Reads the current device's memory from the CUDA driver: `(used, total)` bytes.
#[cfg(feature = "cuda")]
pub fn gpu_memory(device: &candle_core::Device) -> Option<(u64, u64)> {
    use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
    let candle_core::Device::Cuda(cuda) = device else {
        return None;
    };
    cuda.cuda_stream().context().bind_to_thread().ok()?;
    let (free, total) = mem_get_info().ok()?;
    Some(((total - free) as u64, total as u64))
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_memory(_device: &candle_core::Device) -> Option<(u64, u64)> {
    None
}

/// The GPU's utilisation (0..1) from NVML, which the driver provides; the CUDA ordinal is taken
/// as the NVML index (they agree unless `CUDA_VISIBLE_DEVICES` reorders devices).
#[cfg(feature = "cuda")]
pub fn gpu_utilization(device: &candle_core::Device) -> Option<f64> {
    use std::sync::OnceLock;
    static NVML: OnceLock<Option<nvml_wrapper::Nvml>> = OnceLock::new();
    let candle_core::DeviceLocation::Cuda { gpu_id: ordinal } = device.location() else {
        return None;
    };
    let nvml = NVML
        .get_or_init(|| match nvml_wrapper::Nvml::init() {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "NVML unavailable: no GPU utilisation metric");
                None
            }
        })
        .as_ref()?;
    let rates = nvml
        .device_by_index(u32::try_from(ordinal).ok()?)
        .ok()?
        .utilization_rates()
        .ok()?;
    Some(f64::from(rates.gpu) / 100.0)
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_utilization(_device: &candle_core::Device) -> Option<f64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_register_and_gpu_series_only_on_gpu() {
        let cpu = WorkerMetrics::new(false);
        cpu.info.with_label_values(&["m", "cpu"]).set(1);
        let text = sluice_shared::metrics::render(&cpu.registry);
        assert!(
            text.contains("sluice_worker_info{device=\"cpu\",model=\"m\"} 1"),
            "{text}"
        );
        assert!(!text.contains("sluice_gpu_memory"));
        let gpu = WorkerMetrics::new(true);
        let text = sluice_shared::metrics::render(&gpu.registry);
        assert!(text.contains("sluice_gpu_memory_total_bytes"));
    }
}
