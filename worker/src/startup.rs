//! Wiring the worker: load the model, consume the queue with reconnection, drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use candle_core::Device;
use sha2::{Digest, Sha256};
use sluice_jobs::Keyspace;
use sluice_jobs::redis_pool::create_pool_for;
use sluice_jobs::store::JobStore;
use sluice_jobs::workers::{WorkerInfo, WorkerRegistry};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::device::device;
use crate::engine::{EngineConfig, EngineHandle};
use crate::intake::consumer::JobRunner;
use crate::intake::{BROKER_CALL_TIMEOUT, Ended, Session, stopped};
use crate::metrics::WorkerMetrics;
use crate::model::{LoadedModel, ModelSource};
use crate::settings::WorkerSettings;

/// A worker with its model loaded, ready to consume.
pub struct Worker {
    settings: WorkerSettings,
    runner: JobRunner,
    preempt_tx: watch::Sender<bool>,
    ks: Keyspace,
    registry: WorkerRegistry,
    device: Device,
    metrics_listener: Option<tokio::net::TcpListener>,
}

impl Worker {
    /// Resolves and loads the model (on a blocking thread) and starts the engine.
    pub async fn build(settings: WorkerSettings) -> anyhow::Result<Self> {
        let source = ModelSource::parse(&settings.model).map_err(anyhow::Error::msg)?;
        let local = source.resolve().await?;
        let device = device(settings.device)?;
        // Bound before the model loads, so a taken port fails the start at once.
        let metrics_listener = match settings.common.metrics_addr {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
            None => None,
        };
        let started = std::time::Instant::now();
        let load_device = device.clone();
        let model =
            tokio::task::spawn_blocking(move || LoadedModel::load(&local, &load_device)).await??;
        tracing::info!(
            model = %model.info().name,
            context_length = model.info().context_length,
            load_ms = started.elapsed().as_millis() as u64,
            cpu_kernel = if device.is_cpu() { crate::kernels::qmm::kernel_name() } else { "-" },
            "model loaded"
        );
        let metrics = Arc::new(WorkerMetrics::new(device.is_cuda()));
        metrics
            .info
            .with_label_values(&[model.info().name.as_str(), settings.device.label().as_str()])
            .set(1);
        let engine = EngineHandle::start(
            model,
            EngineConfig {
                max_batch: settings.max_batch_size as usize,
                kv_token_budget: settings.max_batch_total_tokens,
                prefill_chunk: settings.prefill_chunk.max(1),
                canary_key: match &settings.canary_key {
                    Some(k) => Sha256::digest(k.expose().as_bytes()).into(),
                    None => rand::random(),
                },
                prefix_cache: settings.prefix_cache,
                canary_rotation: (settings.canary_rotation_secs > 0)
                    .then(|| std::time::Duration::from_secs(settings.canary_rotation_secs)),
            },
            metrics.clone(),
        )?;
        let ks = Keyspace::new(settings.common.namespace.clone())
            .with_queue_shards(settings.common.queue_shards);
        let pool = create_pool_for(
            &settings.common.redis_url,
            settings.common.redis_cluster,
            16,
        )?;
        let (preempt_tx, preempt_rx) = watch::channel(false);
        let worker_id = settings.worker_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}-{:04x}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()),
                std::process::id(),
                rand::random::<u16>()
            )
        });
        let runner = JobRunner {
            store: JobStore::new(pool, ks.clone(), settings.common.result_ttl_secs),
            engine,
            worker_id,
            max_attempts: settings.common.max_attempts,
            max_tokens_limit: settings.common.max_tokens_limit,
            cancel_poll: Duration::from_millis(settings.cancel_poll_ms.max(10)),
            redact_output: settings.redact_output,
            stream_flush: Duration::from_millis(settings.stream_flush_ms),
            result_ttl_secs: settings.common.result_ttl_secs,
            preempt: preempt_rx,
            metrics,
            in_flight: Arc::new(AtomicUsize::new(0)),
        };
        runner
            .store
            .check_queue_shards()
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            registry: WorkerRegistry::new(runner.store.pool().clone(), ks.clone()),
            settings,
            runner,
            preempt_tx,
            ks,
            device,
            metrics_listener,
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.runner.worker_id
    }

    /// Consumes until `shutdown` completes, reconnecting to RabbitMQ with backoff whenever
    /// the connection drops. On shutdown: stop consuming, let in-flight jobs finish within the
    /// grace period, then give the rest back to the queue.
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        if let Some(listener) = self.metrics_listener.take() {
            let registry = self.runner.metrics.registry.clone();
            sluice_shared::metrics::spawn(listener, registry, || async {}, stop_rx.clone());
        }
        let heartbeat = tokio::spawn(self.heartbeat());
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let mut backoff = Duration::from_millis(200);
        let mut connection = None;
        let capacity = self.runner.engine.capacity();
        loop {
            if *stop_rx.borrow() {
                break;
            }
            let opened = tokio::select! {
                s = Session::open(
                    &self.settings.common.amqp_url,
                    &self.ks,
                    &self.runner.worker_id,
                    self.settings.common.max_attempts,
                    capacity,
                ) => s,
                () = stopped(&mut stop_rx) => break,
            };
            let mut session = match opened {
                Ok(s) => {
                    backoff = Duration::from_millis(200);
                    s
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot consume; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {},
                        () = stopped(&mut stop_rx) => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            let ended = session
                .consume(&self.runner, capacity, &mut in_flight, &mut stop_rx)
                .await;
            connection = Some(session.connection);
            if ended == Ended::Stopped {
                break;
            }
        }
        self.drain(&mut in_flight).await;
        heartbeat.abort();
        match tokio::time::timeout(
            BROKER_CALL_TIMEOUT,
            self.registry.remove(&self.runner.worker_id),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not leave the worker registry"),
            // The entry expires with its heartbeat's TTL.
            Err(_) => tracing::warn!("Redis did not answer; leaving the worker registry by TTL"),
        }
        if let Some(conn) = connection {
            let close = conn.close(200, "shutdown".into());
            if tokio::time::timeout(BROKER_CALL_TIMEOUT, close)
                .await
                .is_err()
            {
                tracing::warn!("the broker did not answer the connection close");
            }
        }
        tracing::info!("worker stopped");
        Ok(())
    }

    /// Writes this worker's heartbeat every `--heartbeat-secs` (TTL: three beats) until
    /// aborted, and samples device memory for the metrics on the way. Redis outages are logged
    /// and retried on the next beat.
    fn heartbeat(&self) -> impl Future<Output = ()> + Send + 'static {
        let registry = self.registry.clone();
        let metrics = self.runner.metrics.clone();
        let in_flight = self.runner.in_flight.clone();
        let device = self.device.clone();
        let every = Duration::from_secs(self.settings.heartbeat_secs);
        let mut info = WorkerInfo {
            id: self.runner.worker_id.clone(),
            model: self.runner.engine.info().name.clone(),
            device: self.settings.device.label(),
            capacity: u32::try_from(self.runner.engine.capacity()).unwrap_or(u32::MAX),
            in_flight: 0,
            kv_usage: 0.0,
            gpu_memory_used_bytes: None,
            gpu_memory_total_bytes: None,
            gpu_utilization: None,
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: sluice_proto::now_ms(),
            last_seen: 0,
        };
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let memory = crate::metrics::gpu_memory(&device);
                if let (Some((used, total)), Some((g_used, g_total))) =
                    (memory, &metrics.gpu_memory)
                {
                    g_used.set(i64::try_from(used).unwrap_or(i64::MAX));
                    g_total.set(i64::try_from(total).unwrap_or(i64::MAX));
                }
                let utilization = crate::metrics::gpu_utilization(&device);
                if let (Some(u), Some(gauge)) = (utilization, &metrics.gpu_utilization) {
                    gauge.set(u);
                }
                info.gpu_utilization = utilization;
                info.in_flight =
                    u32::try_from(in_flight.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
                info.kv_usage = metrics.kv_usage.get();
                info.gpu_memory_used_bytes = memory.map(|m| m.0);
                info.gpu_memory_total_bytes = memory.map(|m| m.1);
                info.last_seen = sluice_proto::now_ms();
                if let Err(e) = registry.heartbeat(&info, every.as_secs() * 3).await {
                    tracing::warn!(error = %e, "cannot write the heartbeat");
                }
            }
        }
    }

    async fn drain(&self, in_flight: &mut JoinSet<()>) {
        if in_flight.is_empty() {
            return;
        }
        let grace = Duration::from_secs(self.settings.shutdown_grace_secs);
        tracing::info!(
            jobs = in_flight.len(),
            grace_s = grace.as_secs(),
            "draining in-flight jobs"
        );
        let all_done = async { while in_flight.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            tracing::warn!("grace period over; giving unfinished jobs back to the queue");
            let _ = self.preempt_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                while in_flight.join_next().await.is_some() {}
            })
            .await;
        }
    }
}
