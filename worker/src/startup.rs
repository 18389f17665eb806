//! Wiring the worker: load the model, consume the queue with reconnection, drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use candle_core::Device;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use sha2::{Digest, Sha256};
use sluice_jobs::Keyspace;
use sluice_jobs::amqp::{QueueSettings, connect, declare_topology};
use sluice_jobs::redis_pool::create_pool;
use sluice_jobs::store::JobStore;
use sluice_jobs::workers::{WorkerInfo, WorkerRegistry};
use sluice_proto::Priority;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::consumer::JobRunner;
use crate::engine::{EngineConfig, EngineHandle};
use crate::metrics::WorkerMetrics;
use crate::model::{LoadedModel, ModelSource};
use crate::settings::{DeviceSpec, WorkerSettings};

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

pub(crate) fn device(spec: DeviceSpec) -> anyhow::Result<Device> {
    Ok(match spec {
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(n) => {
            let device = Device::new_cuda(n)?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(cuda) = &device
                && std::env::var("SLUICE_CUDA_EVENT_TRACKING").map_or(true, |v| v != "on")
            {
                // cudarc creates two CUDA events for every allocation (and destroys them
                // with it) to order uses across streams, but uses them only once a context
                // has a second stream, which candle's device never creates: two driver calls
                // saved per tensor of every step. `SLUICE_CUDA_EVENT_TRACKING=on` keeps them.
                #[allow(unsafe_code)]
                // SAFETY: every tensor of this device is used on the stream of the thread
                // that runs the model; nothing needs cross-stream ordering.
                unsafe {
                    cuda.disable_event_tracking()
                };
            }
            device
        }
    })
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
            cpu_kernel = if device.is_cpu() { crate::qmm::kernel_name() } else { "-" },
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
            },
            metrics.clone(),
        )?;
        let ks = Keyspace::new(settings.common.namespace.clone());
        let pool = create_pool(&settings.common.redis_url, 16)?;
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
            result_ttl_secs: settings.common.result_ttl_secs,
            preempt: preempt_rx,
            metrics,
            in_flight: Arc::new(AtomicUsize::new(0)),
        };
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
        loop {
            if *stop_rx.borrow() {
                break;
            }
            let session = tokio::select! {
                s = self.open_consumer() => s,
                () = stopped(&mut stop_rx) => break,
            };
            let (conn, channel, mut consumer, mut dead) = match session {
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
            tracing::info!(
                worker = %self.runner.worker_id,
                interactive = %self.ks.jobs_queue(),
                batch = %self.ks.jobs_queue_for(Priority::Batch),
                "consuming"
            );
            let capacity = self.runner.engine.capacity();
            let mut batch_poll = tokio::time::interval(BATCH_POLL);
            batch_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    // Batch jobs are pulled, not pushed: only while this worker has room and
                    // no interactive job is waiting in the broker.
                    _ = batch_poll.tick(), if in_flight.len() < capacity => {
                        // The other branches (stop included) wait while this runs: a broker
                        // that stops answering must not hold the worker here forever.
                        let taken = tokio::time::timeout(
                            BROKER_CALL_TIMEOUT,
                            self.take_batch_job(&channel, &mut consumer),
                        )
                        .await;
                        match taken {
                            Ok(Ok(Taken::Job(delivery))) => self.spawn_job(&mut in_flight, *delivery),
                            Ok(Ok(Taken::Nothing)) => {}
                            Ok(Ok(Taken::ConsumerEnded)) => break,
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "cannot poll the batch queue; reconnecting");
                                break;
                            }
                            Err(_) => {
                                tracing::warn!(
                                    timeout_s = BROKER_CALL_TIMEOUT.as_secs(),
                                    "the broker did not answer a batch poll; reconnecting"
                                );
                                break;
                            }
                        }
                    }
                    next = consumer.next() => {
                        let Some(delivery) = delivered(next, "jobs") else { break };
                        self.spawn_job(&mut in_flight, delivery);
                    }
                    next = dead.next() => {
                        let Some(delivery) = delivered(next, "dead letters") else { break };
                        let runner = self.runner.clone();
                        in_flight.spawn(async move { runner.handle_dead_letter(delivery).await });
                    }
                    Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {},
                    () = stopped(&mut stop_rx) => {
                        for tag in [consumer.tag(), dead.tag()] {
                            let cancel = channel.basic_cancel(tag, BasicCancelOptions::default());
                            let _ = tokio::time::timeout(BROKER_CALL_TIMEOUT, cancel).await;
                        }
                        break;
                    }
                }
            }
            connection = Some(conn);
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

    /// Runs a job delivery (interactive or batch) on its own task.
    fn spawn_job(&self, in_flight: &mut JoinSet<()>, delivery: lapin::message::Delivery) {
        let runner = self.runner.clone();
        in_flight.spawn(async move { runner.handle(delivery).await });
    }

    /// One batch job, unless an interactive one is waiting (the interactive consumer will get
    /// it) or the batch queue is empty. An interactive job the broker has already pushed to
    /// this worker counts as waiting: right after a job's ack the broker delivers the next
    /// interactive message, which then no longer shows in the queue's count but may still sit
    /// in the consumer's buffer; it is taken first.
    async fn take_batch_job(
        &self,
        channel: &lapin::Channel,
        consumer: &mut lapin::Consumer,
    ) -> Result<Taken, lapin::Error> {
        let interactive = channel
            .queue_declare(
                self.ks.jobs_queue().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        if interactive.message_count() > 0 {
            return Ok(Taken::Nothing);
        }
        // Frames arrive in order on the connection: a delivery the broker sent before it
        // answered the count above is in the consumer's buffer by now.
        if let Some(next) = consumer.next().now_or_never() {
            return Ok(
                delivered(next, "jobs").map_or(Taken::ConsumerEnded, |d| Taken::Job(Box::new(d)))
            );
        }
        let message = channel
            .basic_get(
                self.ks.jobs_queue_for(Priority::Batch).into(),
                BasicGetOptions { no_ack: false },
            )
            .await?;
        Ok(message.map_or(Taken::Nothing, |m| Taken::Job(Box::new(m.delivery))))
    }

    async fn open_consumer(
        &self,
    ) -> anyhow::Result<(
        lapin::Connection,
        lapin::Channel,
        lapin::Consumer,
        lapin::Consumer,
    )> {
        let conn = connect(
            &self.settings.common.amqp_url,
            &format!("sluice-worker@{}", self.runner.worker_id),
        )
        .await?;
        let channel = conn.create_channel().await?;
        declare_topology(
            &channel,
            &self.ks,
            QueueSettings::for_max_attempts(self.settings.common.max_attempts),
        )
        .await?;
        let prefetch = u16::try_from(self.runner.engine.capacity()).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.ks.jobs_queue().into(),
                self.runner.worker_id.clone().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let dead = channel
            .basic_consume(
                self.ks.dead_letter_queue().into(),
                format!("{}.dead", self.runner.worker_id).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((conn, channel, consumer, dead))
    }
}

/// What a batch poll took.
enum Taken {
    /// A batch job, or an interactive one found waiting in the consumer's buffer.
    Job(Box<lapin::message::Delivery>),
    Nothing,
    /// The interactive consumer failed or closed (logged): the caller reconnects.
    ConsumerEnded,
}

/// A consumer's next delivery, or `None` (logged) when the consumer failed or closed: the
/// caller reconnects.
fn delivered(
    next: Option<Result<lapin::message::Delivery, lapin::Error>>,
    consumer: &str,
) -> Option<lapin::message::Delivery> {
    match next {
        Some(Ok(delivery)) => Some(delivery),
        Some(Err(e)) => {
            tracing::warn!(error = %e, consumer, "consumer failed; reconnecting");
            None
        }
        None => {
            tracing::warn!(consumer, "consumer closed; reconnecting");
            None
        }
    }
}

/// How often a worker with room looks for batch jobs.
const BATCH_POLL: Duration = Duration::from_millis(50);
/// The longest the consume loop and shutdown wait on one broker (or registry) call before they
/// give up on it: reconnect in the loop, carry on with shutdown.
const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Completes once the stop flag is set (the guard `wait_for` returns is dropped inside, so the
/// future stays `Send`).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
