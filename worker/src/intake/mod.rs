//! Intake: how jobs reach this worker and how their output leaves it.
//!
//! - [`consumer`]: one delivery end to end: decode → start (Redis) → engine → finish (Redis) →
//!   ack;
//! - [`stream`]: generated text into the job's Redis stream as it is produced, redacted;
//! - this module: the broker session (the interactive consumer, the batch queue and the dead
//!   letters) and the intake policy between them: interactive jobs are pushed by the broker up
//!   to the engine's capacity; batch jobs are pulled, as many as there is room for, only while
//!   no interactive job is waiting.

pub mod consumer;
pub mod stream;

use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use sluice_jobs::Keyspace;
use sluice_jobs::amqp::{QueueSettings, connect, declare_topology};
use sluice_proto::Priority;
use tokio::sync::watch;
use tokio::task::JoinSet;

use consumer::JobRunner;

/// How often a worker with room looks for batch jobs.
const BATCH_POLL: Duration = Duration::from_millis(50);
/// The longest the consume loop and shutdown wait on one broker (or registry) call before they
/// give up on it: reconnect in the loop, carry on with shutdown.
pub(crate) const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection to the broker with this worker's consumers on it.
pub(crate) struct Session {
    pub connection: lapin::Connection,
    channel: lapin::Channel,
    jobs: lapin::Consumer,
    dead: lapin::Consumer,
    ks: Keyspace,
}

/// How a session's consume loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The stop signal came: the consumers are cancelled.
    Stopped,
    /// A consumer or the connection failed (logged): the caller reconnects.
    Reconnect,
}

/// What a batch poll took.
enum Taken {
    /// A batch job, or an interactive one found waiting in the consumer's buffer.
    Job(Box<lapin::message::Delivery>),
    Nothing,
    /// The interactive consumer failed or closed (logged): the caller reconnects.
    ConsumerEnded,
}

impl Session {
    /// Connects, declares the topology and starts the interactive and dead-letter consumers
    /// with a prefetch of the engine's `capacity`.
    pub async fn open(
        amqp_url: &sluice_shared::Secret,
        ks: &Keyspace,
        worker_id: &str,
        max_attempts: u32,
        capacity: usize,
    ) -> anyhow::Result<Self> {
        let connection = connect(amqp_url, &format!("sluice-worker@{worker_id}")).await?;
        let channel = connection.create_channel().await?;
        declare_topology(&channel, ks, QueueSettings::for_max_attempts(max_attempts)).await?;
        let prefetch = u16::try_from(capacity).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let jobs = channel
            .basic_consume(
                ks.jobs_queue().into(),
                worker_id.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let dead = channel
            .basic_consume(
                ks.dead_letter_queue().into(),
                format!("{worker_id}.dead").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            connection,
            channel,
            jobs,
            dead,
            ks: ks.clone(),
        })
    }

    /// Runs deliveries on `in_flight` until `stop` is set or the session fails. Interactive
    /// jobs come as the broker pushes them; batch jobs are polled every [`BATCH_POLL`] while
    /// fewer than `capacity` jobs are in flight; dead letters fail the job they carry.
    pub async fn consume(
        &mut self,
        runner: &JobRunner,
        capacity: usize,
        in_flight: &mut JoinSet<()>,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        tracing::info!(
            worker = %runner.worker_id,
            interactive = %self.ks.jobs_queue(),
            batch = %self.ks.jobs_queue_for(Priority::Batch),
            "consuming"
        );
        let spawn = |in_flight: &mut JoinSet<()>, delivery: lapin::message::Delivery| {
            let runner = runner.clone();
            in_flight.spawn(async move { runner.handle(delivery).await });
        };
        let mut batch_poll = tokio::time::interval(BATCH_POLL);
        batch_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = batch_poll.tick(), if in_flight.len() < capacity => {
                    // Batch jobs are taken while there is room and the queue has them (each
                    // take checks for waiting interactive jobs first): one per tick would cap
                    // a worker at 20 batch jobs a second, whatever its capacity. The other
                    // branches (stop included) wait while this runs: a broker that stops
                    // answering must not hold the worker here forever.
                    while in_flight.len() < capacity {
                        let taken =
                            tokio::time::timeout(BROKER_CALL_TIMEOUT, self.take_batch_job()).await;
                        match taken {
                            Ok(Ok(Taken::Job(delivery))) => spawn(in_flight, *delivery),
                            Ok(Ok(Taken::Nothing)) => break,
                            Ok(Ok(Taken::ConsumerEnded)) => return Ended::Reconnect,
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "cannot poll the batch queue; reconnecting");
                                return Ended::Reconnect;
                            }
                            Err(_) => {
                                tracing::warn!(
                                    timeout_s = BROKER_CALL_TIMEOUT.as_secs(),
                                    "the broker did not answer a batch poll; reconnecting"
                                );
                                return Ended::Reconnect;
                            }
                        }
                    }
                }
                next = self.jobs.next() => {
                    let Some(delivery) = delivered(next, "jobs") else { return Ended::Reconnect };
                    spawn(in_flight, delivery);
                }
                next = self.dead.next() => {
                    let Some(delivery) = delivered(next, "dead letters") else {
                        return Ended::Reconnect;
                    };
                    let runner = runner.clone();
                    in_flight.spawn(async move { runner.handle_dead_letter(delivery).await });
                }
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {},
                () = stopped(stop) => {
                    for tag in [self.jobs.tag(), self.dead.tag()] {
                        let cancel = self.channel.basic_cancel(tag, BasicCancelOptions::default());
                        let _ = tokio::time::timeout(BROKER_CALL_TIMEOUT, cancel).await;
                    }
                    return Ended::Stopped;
                }
            }
        }
    }

    /// One batch job, unless an interactive one is waiting (the interactive consumer will get
    /// it) or the batch queue is empty. An interactive job the broker has already pushed to
    /// this worker counts as waiting: right after a job's ack the broker delivers the next
    /// interactive message, which then no longer shows in the queue's count but may still sit
    /// in the consumer's buffer; it is taken first.
    async fn take_batch_job(&mut self) -> Result<Taken, lapin::Error> {
        let interactive = self
            .channel
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
        if let Some(next) = self.jobs.next().now_or_never() {
            return Ok(
                delivered(next, "jobs").map_or(Taken::ConsumerEnded, |d| Taken::Job(Box::new(d)))
            );
        }
        let message = self
            .channel
            .basic_get(
                self.ks.jobs_queue_for(Priority::Batch).into(),
                BasicGetOptions { no_ack: false },
            )
            .await?;
        Ok(message.map_or(Taken::Nothing, |m| Taken::Job(Box::new(m.delivery))))
    }
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

/// Completes once the stop flag is set (the guard `wait_for` returns is dropped inside, so the
/// future stays `Send`).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
