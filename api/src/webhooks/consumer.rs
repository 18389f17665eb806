//! The delivery consumer every API process runs (unless `--webhook-deliveries false`): reads
//! `{ns}.webhooks` with a prefetch of [`PREFETCH`], handles each delivery in a task of its own
//! (so a slow endpoint holds one task, never the others), reconnects after an outage, and on
//! shutdown stops taking deliveries and lets those in flight finish within the grace period
//! (the broker redelivers any still unacked when the connection closes).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::delivery::{Deliverer, Disposition};
use super::queue::declare_topology;

/// Deliveries in flight per process at most.
pub const PREFETCH: u16 = 32;
/// The longest wait between reconnection tries.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The longest connecting, declaring and starting the consumer may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Consumes until `stop` is set, then drains the deliveries in flight for at most `grace`.
pub async fn run(deliverer: Arc<Deliverer>, mut stop: watch::Receiver<bool>, grace: Duration) {
    let mut in_flight = JoinSet::new();
    let mut backoff = Duration::from_millis(200);
    let mut connection = None;
    while !*stop.borrow() {
        let opened = tokio::time::timeout(OPEN_TIMEOUT, open(&deliverer)).await;
        match opened {
            Ok(Ok((conn, channel, consumer))) => {
                backoff = Duration::from_millis(200);
                consume(&deliverer, &channel, consumer, &mut in_flight, &mut stop).await;
                connection = Some(conn);
                if *stop.borrow() {
                    break;
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "cannot consume webhook deliveries");
            }
            Err(_) => {
                tracing::warn!(
                    retry_in_ms = backoff.as_millis() as u64,
                    "the broker did not answer; cannot consume webhook deliveries"
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut stop) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    let drain = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            left = in_flight.len(),
            "webhook deliveries still in flight at the drain deadline"
        );
        in_flight.abort_all();
    }
    if let Some(conn) = connection {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), conn.close(200, "shutdown".into())).await;
    }
}

/// A connection and a channel consuming the delivery queue.
async fn open(
    deliverer: &Deliverer,
) -> Result<(lapin::Connection, lapin::Channel, lapin::Consumer), anyhow::Error> {
    let queue = &deliverer.queue;
    let ks = queue.keyspace();
    let name = format!("sluice-api-webhooks@{}", hostname());
    let connection = sluice_jobs::amqp::connect(queue.url(), &name).await?;
    let channel = connection.create_channel().await?;
    declare_topology(&channel, ks, queue.delays()).await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            ks.webhooks_queue().as_str().into(),
            name.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %ks.webhooks_queue(), "consuming webhook deliveries");
    Ok((connection, channel, consumer))
}

/// Spawns a task per delivery until the consumer ends (the caller reconnects) or `stop` is
/// set (the consumer is cancelled).
async fn consume(
    deliverer: &Arc<Deliverer>,
    channel: &lapin::Channel,
    mut consumer: lapin::Consumer,
    in_flight: &mut JoinSet<()>,
    stop: &mut watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let deliverer = Arc::clone(deliverer);
                    in_flight.spawn(async move {
                        let disposition = deliverer.handle(&delivery.data).await;
                        settle(&delivery, disposition).await;
                    });
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "webhook consumer failed; reconnecting");
                    return;
                }
                None => {
                    tracing::warn!("webhook consumer closed; reconnecting");
                    return;
                }
            },
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            () = stopped(stop) => {
                let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
                let _ = tokio::time::timeout(Duration::from_secs(2), cancel).await;
                return;
            }
        }
    }
}

async fn settle(delivery: &Delivery, disposition: Disposition) {
    let result = match disposition {
        Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
        Disposition::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
        }
        Disposition::Reject => delivery.reject(BasicRejectOptions { requeue: false }).await,
    };
    if let Err(error) = result {
        // The channel is gone: the broker delivers the message again.
        tracing::warn!(%error, ?disposition, "cannot settle a webhook delivery");
    }
}

/// Completes once the stop flag is set.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_string())
}
