//! The engine: one dedicated OS thread owns the model and runs jobs sent over a channel.
//!
//! Async code talks to it through a cloneable [`EngineHandle`] and awaits a oneshot reply, so
//! model compute never blocks the runtime. This engine runs one sequence at a time (capacity 1);
//! the handle's interface is what a batching engine keeps.

use sluice_proto::JobMessage;
use tokio::sync::{mpsc, oneshot};

use crate::generate::{GenerateError, Generation, JobControl, generate};
use crate::model::{LoadedModel, ModelError, ModelInfo};

struct EngineJob {
    job: JobMessage,
    control: JobControl,
    reply: oneshot::Sender<Result<Generation, GenerateError>>,
    span: tracing::Span,
}

/// A handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<EngineJob>,
    info: ModelInfo,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("the engine thread has stopped")]
    Stopped,
}

impl EngineHandle {
    /// Moves the model onto its own thread. The thread ends when every handle is dropped.
    pub fn start(model: LoadedModel) -> std::io::Result<Self> {
        let info = model.info().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("sluice-engine".into())
            .spawn(move || engine_loop(model, rx))?;
        Ok(Self { tx, info })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// How many jobs the engine runs at once (the worker's prefetch).
    pub fn capacity(&self) -> usize {
        1
    }

    /// Runs a job to completion on the engine thread.
    pub async fn run(
        &self,
        job: JobMessage,
        control: JobControl,
    ) -> Result<Generation, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(EngineJob {
                job,
                control,
                reply,
                span: tracing::Span::current(),
            })
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx.await.map_err(|_| EngineError::Stopped)??)
    }
}

fn engine_loop(mut model: LoadedModel, mut rx: mpsc::UnboundedReceiver<EngineJob>) {
    while let Some(work) = rx.blocking_recv() {
        let _entered = work.span.enter();
        if work.reply.is_closed() {
            continue;
        }
        let result = run_one(&mut model, &work.job, &work.control);
        if let Ok(g) = &result {
            tracing::info!(
                prompt_tokens = g.prompt_tokens,
                completion_tokens = g.completion_tokens,
                finish_reason = ?g.finish_reason,
                ttft_ms = g.time_to_first_token.as_millis() as u64,
                generation_ms = g.total.as_millis() as u64,
                decode_tokens_per_s = decode_rate(g),
                "generation finished"
            );
        }
        let _ = work.reply.send(result);
    }
}

fn run_one(
    model: &mut LoadedModel,
    job: &JobMessage,
    control: &JobControl,
) -> Result<Generation, GenerateError> {
    if control.preempt.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(GenerateError::Preempted);
    }
    let prompt = model
        .encode_chat(&job.messages)
        .map_err(|e: ModelError| GenerateError::Model(e))?;
    generate(model, &prompt, &job.params, control, &mut |_text| {})
}

/// Decode tokens per second after the first token (prefill excluded).
pub fn decode_rate(g: &Generation) -> f64 {
    let decode = g.total.saturating_sub(g.time_to_first_token).as_secs_f64();
    if g.completion_tokens > 1 && decode > 0.0 {
        (g.completion_tokens - 1) as f64 / decode
    } else {
        0.0
    }
}
