//! One job's generation state ([`Sequence`]): sampling, stop sequences, incremental UTF-8-safe
//! detokenization, cancellation and the deadline, token by token.
//!
//! Runs on the engine thread, never on the async runtime. Between tokens it checks the job's
//! cancel flag, its deadline and the worker's preemption flag, so a cancelled job stops at its
//! next token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use sluice_proto::{FinishReason, GenerationParams};
use tokenizers::Tokenizer;

use crate::engine::leak::LeakGuard;
use crate::model::qwen::SeqCache;
use crate::model::{LoadedModel, ModelError};
use sluice_prompt::structured::Constraint;

/// How many recent tokens the repetition penalty looks at.
const REPEAT_LAST_N: usize = 64;

/// Signals from outside the engine thread.
#[derive(Debug, Clone)]
pub struct JobControl {
    /// Set when the client cancels the job.
    pub cancel: Arc<AtomicBool>,
    /// Set when the worker shuts down and gives the job back to the queue unfinished.
    pub preempt: Arc<AtomicBool>,
    pub deadline: Instant,
}

impl JobControl {
    pub fn new(deadline: Instant) -> Self {
        Self {
            cancel: Arc::new(AtomicBool::new(false)),
            preempt: Arc::new(AtomicBool::new(false)),
            deadline,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the prompt has {prompt} tokens; the model's context holds {context}")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the worker gave the job back before finishing it")]
    Preempted,
    #[error("the job needs up to {tokens} KV cache tokens; this worker's budget is {budget}")]
    TooLarge { tokens: usize, budget: usize },
    /// The response format cannot be served by this worker.
    #[error("{0}")]
    Format(String),
    /// The grammar and the model could not agree on a next token (should not happen).
    #[error("structured output failed: {0}")]
    Constraint(String),
}

/// What a job adds to plain generation: its output grammar and its leak guard.
#[derive(Default)]
pub struct Guards {
    pub constraint: Option<Constraint>,
    pub leak: Option<LeakGuard>,
}

/// What a finished generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub content: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prefix cache rather than prefilled.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub time_to_first_token: Duration,
    pub total: Duration,
}

fn sampler(params: &GenerationParams) -> LogitsProcessor {
    let seed = params.seed.unwrap_or_else(rand::random);
    let temperature = f64::from(params.temperature);
    let sampling = if params.temperature <= 0.0 {
        Sampling::ArgMax
    } else {
        match (params.top_k, params.top_p) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK {
                k: k as usize,
                temperature,
            },
            (None, Some(p)) => Sampling::TopP {
                p: f64::from(p),
                temperature,
            },
            (Some(k), Some(p)) => Sampling::TopKThenTopP {
                k: k as usize,
                p: f64::from(p),
                temperature,
            },
        }
    };
    LogitsProcessor::from_sampling(seed, sampling)
}

/// Turns generated ids into text incrementally without ever splitting a multi-byte character:
/// text is released only once it no longer ends in an incomplete UTF-8 sequence.
pub struct TextDecoder<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    prefix_start: usize,
    read_start: usize,
}

impl<'t> TextDecoder<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_start: 0,
            read_start: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let prefix = self.decode(&self.ids[self.prefix_start..self.read_start])?;
        let full = self.decode(&self.ids[self.prefix_start..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && let Some(new) = full.get(prefix.len()..)
        {
            let new = new.to_string();
            self.prefix_start = self.read_start;
            self.read_start = self.ids.len();
            return Ok(new);
        }
        Ok(String::new())
    }
}

/// Finds stop sequences in generated text and says how much text is safe to release (text
/// that could still be the start of a stop sequence is held back).
pub struct StopMatcher<'s> {
    stops: &'s [String],
}

impl<'s> StopMatcher<'s> {
    pub fn new(stops: &'s [String]) -> Self {
        Self { stops }
    }

    /// The byte index of the first stop sequence that ends within the last `new_len` bytes.
    pub fn find(&self, text: &str, new_len: usize) -> Option<usize> {
        let longest = self.stops.iter().map(String::len).max()?;
        let mut from = text.len().saturating_sub(new_len + longest);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        self.stops
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// Length of the prefix of `text` that can be released: everything but a tail that is a
    /// proper prefix of some stop sequence.
    pub fn safe_len(&self, text: &str) -> usize {
        let mut hold = 0;
        for stop in self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > hold && text.ends_with(&stop[..i]) {
                    hold = i;
                }
            }
        }
        text.len() - hold
    }
}

/// What a sequence needs next after a token was sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Feed this token in the next decode step.
    Continue(u32),
    Finished(FinishReason),
}

/// One job's generation state: its own KV cache, sampler, detokenizer and stop matcher. The
/// engine drives many of these through one model, one batched forward pass per step.
pub struct Sequence<'m> {
    pub params: GenerationParams,
    pub control: JobControl,
    pub cache: SeqCache,
    guards: Guards,
    prompt_len: usize,
    /// Prompt tokens already prefilled.
    prefilled: usize,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
    tokens: Vec<u32>,
    decoder: TextDecoder<'m>,
    sampler: LogitsProcessor,
    eos: &'m [u32],
    context: usize,
    text: String,
    released: usize,
    completion: usize,
    started: Instant,
    first_token_at: Option<Duration>,
}

impl<'m> Sequence<'m> {
    /// A new sequence for `prompt`; fails if the prompt cannot fit the context.
    pub fn new(
        model: &'m LoadedModel,
        prompt: Vec<u32>,
        params: GenerationParams,
        control: JobControl,
        cache: SeqCache,
        guards: Guards,
    ) -> Result<Self, GenerateError> {
        let context = model.info().context_length;
        if prompt.is_empty() || prompt.len() >= context {
            return Err(GenerateError::PromptTooLong {
                prompt: prompt.len(),
                context,
            });
        }
        Ok(Self {
            sampler: sampler(&params),
            params,
            control,
            cache,
            guards,
            prompt_len: prompt.len(),
            prefilled: 0,
            cached: 0,
            tokens: prompt,
            decoder: TextDecoder::new(model.tokenizer()),
            eos: &model.info().eos_token_ids,
            context,
            text: String::new(),
            released: 0,
            completion: 0,
            started: Instant::now(),
            first_token_at: None,
        })
    }

    /// The prompt and the tokens sampled so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Prompt tokens not yet prefilled.
    pub fn pending_prompt(&self) -> &[u32] {
        &self.tokens[self.prefilled..self.prompt_len]
    }

    pub fn mark_prefilled(&mut self, n: usize) {
        self.prefilled += n;
    }

    /// Records that the first `n` prompt tokens came from the prefix cache (already in this
    /// sequence's cache).
    pub fn mark_cached(&mut self, n: usize) {
        self.cached += n;
        self.prefilled += n;
    }

    pub fn is_prefilling(&self) -> bool {
        self.prefilled < self.prompt_len
    }

    /// Tokens this sequence may hold in its cache at most (for the KV budget).
    pub fn max_tokens_in_cache(&self) -> usize {
        (self.prompt_len + self.params.max_tokens as usize).min(self.context)
    }

    /// Signals from outside, checked before every token.
    pub fn interrupted(&self) -> Result<Option<FinishReason>, GenerateError> {
        if self.control.preempt.load(Ordering::Relaxed) {
            return Err(GenerateError::Preempted);
        }
        if self.control.cancel.load(Ordering::Relaxed) {
            return Ok(Some(FinishReason::Cancelled));
        }
        if Instant::now() >= self.control.deadline {
            return Ok(Some(FinishReason::Deadline));
        }
        Ok(None)
    }

    /// Samples the next token from `logits` and applies every stop rule. `on_text` receives
    /// text as it becomes final.
    pub fn step(
        &mut self,
        logits: &Tensor,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Step, GenerateError> {
        if let Some(reason) = self.interrupted()? {
            return Ok(Step::Finished(reason));
        }
        let logits = if self.params.repetition_penalty != 1.0 {
            let start = self.tokens.len().saturating_sub(REPEAT_LAST_N);
            candle_transformers::utils::apply_repeat_penalty(
                logits,
                self.params.repetition_penalty,
                &self.tokens[start..],
            )
            .map_err(ModelError::from)?
        } else {
            logits.clone()
        };
        let logits = match &mut self.guards.constraint {
            Some(constraint) => {
                let mut values = logits
                    .to_dtype(candle_core::DType::F32)
                    .and_then(|l| l.to_vec1::<f32>())
                    .map_err(ModelError::from)?;
                constraint
                    .mask(&mut values)
                    .map_err(GenerateError::Constraint)?;
                let n = values.len();
                Tensor::from_vec(values, n, &candle_core::Device::Cpu).map_err(ModelError::from)?
            }
            None => logits,
        };
        let next = self.sampler.sample(&logits).map_err(ModelError::from)?;
        let started = self.started;
        self.first_token_at.get_or_insert_with(|| started.elapsed());
        if self.eos.contains(&next) && !self.params.ignore_eos {
            return Ok(Step::Finished(FinishReason::Stop));
        }
        if let Some(constraint) = &mut self.guards.constraint {
            constraint
                .advance(next)
                .map_err(GenerateError::Constraint)?;
        }
        self.tokens.push(next);
        self.completion += 1;
        let delta = self.decoder.push(next)?;
        self.text.push_str(&delta);
        if let Some(leak) = &self.guards.leak
            && leak.leaked(&self.text, delta.chars().count())
        {
            return Ok(Step::Finished(FinishReason::ContentFilter));
        }
        let stops = StopMatcher::new(&self.params.stop);
        if let Some(at) = stops.find(&self.text, delta.len()) {
            self.text.truncate(at);
            return Ok(Step::Finished(FinishReason::Stop));
        }
        if self
            .guards
            .constraint
            .as_ref()
            .is_some_and(Constraint::is_finished)
        {
            return Ok(Step::Finished(FinishReason::Stop));
        }
        let mut safe = stops.safe_len(&self.text);
        if let Some(leak) = &self.guards.leak {
            // What may be the start of a leak stays back until checked.
            safe = safe.min(leak.hold_from(&self.text));
        }
        if safe > self.released {
            on_text(&self.text[self.released..safe]);
            self.released = safe;
        }
        if self.completion >= self.params.max_tokens as usize {
            return Ok(Step::Finished(FinishReason::Length));
        }
        if self.tokens.len() >= self.context {
            return Ok(Step::Finished(FinishReason::ContextLength));
        }
        Ok(Step::Continue(next))
    }

    /// The result, releasing any text still held back.
    pub fn finish(mut self, reason: FinishReason, on_text: &mut dyn FnMut(&str)) -> Generation {
        if reason == FinishReason::ContentFilter {
            // The leaked text is withheld, from the result as from the stream.
            self.text.clear();
        }
        if self.text.len() > self.released {
            on_text(&self.text[self.released..]);
        }
        Generation {
            content: std::mem::take(&mut self.text),
            finish_reason: reason,
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached,
            completion_tokens: self.completion,
            time_to_first_token: self
                .first_token_at
                .unwrap_or_else(|| self.started.elapsed()),
            total: self.started.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_finds_and_holds_back() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        let m = StopMatcher::new(&stops);
        assert_eq!(m.find("abcEN", 2), None);
        assert_eq!(m.find("abcEND", 1), Some(3));
        assert_eq!(m.find("a\n\nb", 1), Some(1));
        assert_eq!(m.safe_len("abcEN"), 3);
        assert_eq!(m.safe_len("abc\n"), 3);
        assert_eq!(m.safe_len("abc"), 3);
        let none: Vec<String> = Vec::new();
        assert_eq!(StopMatcher::new(&none).find("x", 1), None);
        assert_eq!(StopMatcher::new(&none).safe_len("x"), 1);
    }

    mod guards {
        use super::super::*;
        use crate::model::LoadedModel;

        use crate::engine::leak::fixtures::{SYSTEM, conversation};

        fn tiny() -> LoadedModel {
            crate::model::tiny::load_tiny_model(3)
        }

        /// Feeds `output` to a sequence token by token (one-hot logits, greedy), collecting
        /// what it streams. Returns the streamed text and the result.
        fn force(model: &LoadedModel, leak: LeakGuard, output: &str) -> (String, Generation) {
            let guards = Guards {
                constraint: None,
                leak: Some(leak),
            };
            let pool = model.model().new_pool(64).expect("pool");
            let params = GenerationParams {
                temperature: 0.0,
                max_tokens: 1000,
                ..GenerationParams::default()
            };
            let control = JobControl::new(Instant::now() + Duration::from_secs(600));
            let mut seq = Sequence::new(
                model,
                vec![1, 2, 3],
                params,
                control,
                pool.new_cache(),
                guards,
            )
            .expect("sequence");
            let ids = model
                .tokenizer()
                .encode(output, false)
                .expect("encode")
                .get_ids()
                .to_vec();
            let vocab = model.model().vocab();
            let mut streamed = String::new();
            let mut reason = FinishReason::Length;
            for id in ids {
                let mut logits = vec![0f32; vocab];
                logits[id as usize] = 100.0;
                let logits = Tensor::from_vec(logits, vocab, &candle_core::Device::Cpu).expect("t");
                match seq
                    .step(&logits, &mut |t| streamed.push_str(t))
                    .expect("step")
                {
                    Step::Continue(_) => {}
                    Step::Finished(r) => {
                        reason = r;
                        break;
                    }
                }
            }
            let g = seq.finish(reason, &mut |t| streamed.push_str(t));
            (streamed, g)
        }

        fn guarded() -> (LeakGuard, String) {
            let mut messages = conversation();
            let leak = LeakGuard::install(&mut messages, &[1; 32], "acme", None, None)
                .expect("system prompt");
            let canary = leak.canary().to_string();
            (leak, canary)
        }

        #[test]
        fn a_leaked_system_prompt_ends_the_job_and_never_reaches_the_stream() {
            let model = tiny();
            let (leak, _) = guarded();
            let output = format!("Sure, here they are: {} and so on.", &SYSTEM[..90]);
            let (streamed, g) = force(&model, leak, &output);
            assert_eq!(g.finish_reason, FinishReason::ContentFilter);
            assert_eq!(g.content, "", "the result carries nothing");
            assert!(
                !SYSTEM.contains(streamed.trim()) || streamed.trim().len() < 10,
                "the stream carried part of the system prompt: {streamed:?}"
            );
            assert!(
                streamed.len() <= "Sure, here they are: ".len(),
                "{streamed:?}"
            );
        }

        #[test]
        fn the_canary_in_the_output_ends_the_job() {
            let model = tiny();
            let (leak, canary) = guarded();
            let output =
                format!("My marker is {canary}, as you asked, and more text follows here.");
            let (streamed, g) = force(&model, leak, &output);
            assert_eq!(g.finish_reason, FinishReason::ContentFilter);
            assert!(!streamed.contains(&canary[..8]), "{streamed:?}");
        }

        #[test]
        fn ordinary_output_streams_whole_under_a_guard() {
            let model = tiny();
            let (leak, _) = guarded();
            let output = "Hello! How can I help you with your order today? Tell me more about it.";
            let (streamed, g) = force(&model, leak, output);
            assert_eq!(g.finish_reason, FinishReason::Length);
            assert_eq!(g.content, output);
            assert_eq!(
                streamed, output,
                "everything held back is released at the end"
            );
        }
    }

    #[test]
    fn stop_matcher_respects_char_boundaries() {
        let stops = vec!["。".to_string()];
        let m = StopMatcher::new(&stops);
        let text = "你好。";
        assert_eq!(m.find(text, 3), Some(6));
        assert_eq!(m.safe_len("你好"), 6);
    }
}
