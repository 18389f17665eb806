//! One job's generation loop: prefill, then sample token by token until a stop condition.
//!
//! Runs on the engine thread, never on the async runtime. Between tokens it checks the job's
//! cancel flag, its deadline and the worker's preemption flag, so a cancelled job stops at its
//! next token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_transformers::generation::{LogitsProcessor, Sampling};
use sluice_proto::{FinishReason, GenerationParams};
use tokenizers::Tokenizer;

use crate::model::{LoadedModel, ModelError};

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
}

/// What a finished generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub content: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
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

/// Runs one job from an empty KV cache to a stop condition. `on_text` receives text as it
/// becomes final (never part of a stop sequence, never half a character).
pub fn generate(
    model: &mut LoadedModel,
    prompt: &[u32],
    params: &GenerationParams,
    control: &JobControl,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation, GenerateError> {
    let started = Instant::now();
    let context = model.info().context_length;
    if prompt.is_empty() || prompt.len() >= context {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            context,
        });
    }
    model.reset();
    let result = run(model, prompt, params, control, on_text, started);
    // Free this job's cache now rather than at the next job's start.
    model.reset();
    result
}

fn run(
    model: &mut LoadedModel,
    prompt: &[u32],
    params: &GenerationParams,
    control: &JobControl,
    on_text: &mut dyn FnMut(&str),
    started: Instant,
) -> Result<Generation, GenerateError> {
    let context = model.info().context_length;
    let eos = model.info().eos_token_ids.clone();
    let tokenizer = model.tokenizer().clone();
    let mut decoder = TextDecoder::new(&tokenizer);
    let stops = StopMatcher::new(&params.stop);
    let mut logits_processor = sampler(params);

    let mut tokens: Vec<u32> = prompt.to_vec();
    let mut text = String::new();
    let mut released = 0usize;
    let mut completion = 0usize;
    let mut first_token_at = None;

    let finish = |reason: FinishReason,
                  text: String,
                  completion: usize,
                  first: Option<Duration>| Generation {
        content: text,
        finish_reason: reason,
        prompt_tokens: prompt.len(),
        completion_tokens: completion,
        time_to_first_token: first.unwrap_or_else(|| started.elapsed()),
        total: started.elapsed(),
    };

    let mut logits = model.forward(prompt, 0)?;
    let reason = loop {
        if control.preempt.load(Ordering::Relaxed) {
            return Err(GenerateError::Preempted);
        }
        if control.cancel.load(Ordering::Relaxed) {
            break FinishReason::Cancelled;
        }
        if Instant::now() >= control.deadline {
            break FinishReason::Deadline;
        }
        if params.repetition_penalty != 1.0 {
            let start = tokens.len().saturating_sub(REPEAT_LAST_N);
            logits = candle_transformers::utils::apply_repeat_penalty(
                &logits,
                params.repetition_penalty,
                &tokens[start..],
            )
            .map_err(ModelError::from)?;
        }
        let next = logits_processor.sample(&logits).map_err(ModelError::from)?;
        first_token_at.get_or_insert_with(|| started.elapsed());
        if eos.contains(&next) && !params.ignore_eos {
            break FinishReason::Stop;
        }
        tokens.push(next);
        completion += 1;

        let delta = decoder.push(next)?;
        text.push_str(&delta);
        if let Some(at) = stops.find(&text, delta.len()) {
            text.truncate(at);
            break FinishReason::Stop;
        }
        let safe = stops.safe_len(&text);
        if safe > released {
            on_text(&text[released..safe]);
            released = safe;
        }
        if completion >= params.max_tokens as usize {
            break FinishReason::Length;
        }
        if tokens.len() >= context {
            break FinishReason::ContextLength;
        }
        logits = model.forward(&[next], tokens.len() - 1)?;
    };
    if text.len() > released {
        on_text(&text[released..]);
    }
    Ok(finish(reason, text, completion, first_token_at))
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

    #[test]
    fn stop_matcher_respects_char_boundaries() {
        let stops = vec!["。".to_string()];
        let m = StopMatcher::new(&stops);
        let text = "你好。";
        assert_eq!(m.find(text, 3), Some(6));
        assert_eq!(m.safe_len("你好"), 6);
    }
}
