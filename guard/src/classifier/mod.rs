//! The learned prompt-injection classifier: a sentence encoder ([`encoder`]) and a small head
//! trained by the project ([`head`]), beside the rules.
//!
//! A text's score is the head's probability from its windows' embeddings (the maximum over
//! them) and its hashed character n-grams ([`ngrams`]); where the operator turned it on, the
//! served model's [`probe`] adds its logit first.
//! [`Classifier`] is the synchronous model (for the CLI and the trainer's embedding export);
//! [`ClassifierService`] runs it on a dedicated thread for the API, batching the texts of
//! concurrent requests into shared forward passes, and remembers recent scores per tenant
//! ([`ScoreCache`]): a tenant's system prompt or conversation history, sent again with every
//! request, is scored once.
//!
//! Loading fails closed: a missing or corrupt file, or a head trained on other encoder weights,
//! is an error naming the file; there is no silent fallback to the rules alone.

pub mod encoder;
pub mod head;
pub mod ngrams;
pub mod probe;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, mpsc};
use std::time::Instant;

use regex::Regex;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

pub use encoder::Encoder;
pub use head::Head;
pub use probe::Probe;

/// What can go wrong loading or running the classifier.
#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    #[error(
        "guard classifier: {path} is missing (install the encoder with scripts/fetch-guard-model, or turn the classifier off explicitly)"
    )]
    Missing { path: PathBuf },
    #[error("guard classifier: {path} is unusable: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("guard classifier: inference failed: {0}")]
    Inference(String),
    #[error("guard classifier: too many texts waiting to be scored")]
    Overloaded,
    #[error("guard classifier: the scoring thread has stopped")]
    Stopped,
}

/// Encoder and head, loaded and checked against each other.
#[derive(Debug)]
pub struct Classifier {
    encoder: Encoder,
    head: Head,
    /// The served model's probe, when the operator turned it on ([`probe`]).
    probe: Option<Probe>,
}

impl Classifier {
    /// Loads the encoder from `dir`, with the built-in adapter merged in and the built-in
    /// head.
    pub fn load(dir: &Path) -> Result<Self, ClassifierError> {
        let adapter = encoder::Adapter {
            weights: head::BUILTIN_ADAPTER,
            vocabulary: head::BUILTIN_VOCABULARY,
        };
        let encoder = Encoder::load_adapted(dir, Some(adapter))?;
        let head = Head::builtin(encoder.hidden_size())?;
        Self::new(encoder, head, dir)
    }

    /// Pairs an encoder with a head, refusing a head trained on other encoder weights.
    pub fn new(encoder: Encoder, head: Head, dir: &Path) -> Result<Self, ClassifierError> {
        if head.encoder_sha256 != encoder.weights_sha256 {
            return Err(ClassifierError::Corrupt {
                path: dir.join(encoder::WEIGHTS_FILE),
                detail: format!(
                    "SHA-256 {} is not the {} the classifier head was trained on",
                    encoder.weights_sha256, head.encoder_sha256
                ),
            });
        }
        Ok(Self {
            encoder,
            head,
            probe: None,
        })
    }

    /// Adds the built-in probe over the served model at `gguf` (its first layers are loaded;
    /// the file must be the one the probe was trained on).
    pub fn with_probe(mut self, gguf: &Path) -> Result<Self, ClassifierError> {
        self.probe = Some(Probe::load(gguf, probe::ProbeSpec::builtin()?)?);
        Ok(self)
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// Whether the served model's probe adds its logit ([`Classifier::with_probe`]).
    pub fn has_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// Scores (0..=1; 0.5 is the default threshold) of `texts`, in order.
    pub fn score(&self, texts: &[String]) -> Result<Vec<f32>, ClassifierError> {
        let texts: Vec<Cow<'_, str>> = texts.iter().map(|t| mask_encoded(t)).collect();
        let mut windows = Vec::new();
        let mut owner = Vec::new();
        for (n, text) in texts.iter().enumerate() {
            for w in self.encoder.windows(text)? {
                windows.push(w);
                owner.push(n);
            }
        }
        let embeddings = self.encoder.embed(&windows)?;
        let mut logits: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for (embedding, n) in embeddings.iter().zip(owner) {
            logits[n].push(self.head.logit(embedding));
        }
        let probe = self
            .probe
            .as_ref()
            .map(|p| {
                let texts: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
                p.logits(&texts).map(|z| (p, z))
            })
            .transpose()?;
        Ok(texts
            .iter()
            .zip(&logits)
            .enumerate()
            .map(|(n, (text, l))| {
                let z = self.head.text_logit(l, text);
                head::sigmoid(match &probe {
                    Some((p, zp)) => p.spec().combine(z, zp[n]),
                    None => z,
                })
            })
            .collect())
    }
}

/// The windows of `ids`: `span` tokens each, consecutive ones sharing `overlap`; the last ends
/// at the end, and an empty text is one empty window. The encoder and the probe both cut
/// texts this way (with their own lengths).
pub fn windows(ids: &[u32], span: usize, overlap: usize) -> Vec<&[u32]> {
    let stride = span - overlap;
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + span).min(ids.len());
        out.push(&ids[start..end]);
        if end >= ids.len() {
            return out;
        }
        start += stride;
    }
}

/// Runs of base64/hex-like characters long enough to be an encoded blob.
static ENCODED_RUN: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)] // a constant pattern, covered by the tests
    Regex::new(r"[A-Za-z0-9+/=_-]{20,}").expect("valid pattern")
});

/// What the classifier reads of a text: runs of 20 or more base64/hex-like characters that
/// hold both a letter and a digit become ` [encoded] `. The blob itself says nothing about
/// intent (and, as noise, made ordinary "decode this" requests look like attacks); what it
/// hides is decoded and scored as its own input ([`crate::Guard::classifier_inputs`]).
/// `guard/train/embed.py` applies the same rule to the training texts.
pub fn mask_encoded(text: &str) -> Cow<'_, str> {
    ENCODED_RUN.replace_all(text, |caps: &regex::Captures<'_>| {
        let run = &caps[0];
        if run.bytes().any(|b| b.is_ascii_digit()) && run.bytes().any(|b| b.is_ascii_alphabetic()) {
            " [encoded] ".to_string()
        } else {
            run.to_string()
        }
    })
}

/// Texts from one caller and where to send their scores.
struct Request {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<f32>, ClassifierError>>,
}

/// Requests waiting for the scoring thread, at most. Past it a submit gets a 503 rather than
/// queueing without bound.
const QUEUE_DEPTH: usize = 256;
/// Texts scored together in one call, at most (requests are never split).
const MAX_BATCH_TEXTS: usize = 64;

/// Scores remembered per process, at most.
pub const SCORE_CACHE_ENTRIES: usize = 16_384;

/// Recent scores by a 128-bit SHA-256 of the scope (the tenant) and the text, least recently
/// used out first. The classifier is a pure function of the text, so a remembered score is the
/// score; the scope keeps one tenant from learning, through its own latency, whether another
/// tenant sent a text.
#[derive(Debug)]
pub struct ScoreCache {
    capacity: usize,
    scores: HashMap<u128, (f32, u64)>,
    by_use: BTreeMap<u64, u128>,
    tick: u64,
}

impl ScoreCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            scores: HashMap::new(),
            by_use: BTreeMap::new(),
            tick: 0,
        }
    }

    /// The key of `text` in `scope`.
    pub fn key(scope: &str, text: &str) -> u128 {
        let mut h = Sha256::new();
        h.update((scope.len() as u64).to_le_bytes());
        h.update(scope.as_bytes());
        h.update(text.as_bytes());
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        u128::from_le_bytes(b)
    }

    pub fn get(&mut self, key: u128) -> Option<f32> {
        self.tick += 1;
        let (score, used) = self.scores.get_mut(&key)?;
        self.by_use.remove(used);
        *used = self.tick;
        self.by_use.insert(self.tick, key);
        Some(*score)
    }

    /// Remembers `score`, forgetting the least recently used scores past the capacity (with
    /// a capacity of 0, at once).
    pub fn insert(&mut self, key: u128, score: f32) {
        self.tick += 1;
        if let Some((_, used)) = self.scores.insert(key, (score, self.tick)) {
            self.by_use.remove(&used);
        }
        self.by_use.insert(self.tick, key);
        while self.scores.len() > self.capacity {
            let Some((_, old)) = self.by_use.pop_first() else {
                break;
            };
            self.scores.remove(&old);
        }
    }

    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }
}

/// The classifier on its own thread: callers await scores; the thread takes every request
/// waiting when it becomes free and scores their texts in one batch. Scores already in the
/// [`ScoreCache`] are answered without the thread.
#[derive(Clone)]
pub struct ClassifierService {
    tx: mpsc::SyncSender<Request>,
    cache: Arc<Mutex<ScoreCache>>,
    observer: Arc<dyn ClassifierObserver>,
}

impl std::fmt::Debug for ClassifierService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifierService").finish_non_exhaustive()
    }
}

/// Counts from the classifier, for metrics.
pub trait ClassifierObserver: Send + Sync + 'static {
    /// One batch on the scoring thread: how many texts, and how long scoring took.
    fn batch(&self, texts: usize, seconds: f64);
    /// Texts of one call answered from the score cache.
    fn cached(&self, _texts: usize) {}
}

impl ClassifierObserver for () {
    fn batch(&self, _: usize, _: f64) {}
}

impl ClassifierService {
    /// Starts the scoring thread, with a score cache of [`SCORE_CACHE_ENTRIES`].
    pub fn spawn(
        classifier: Classifier,
        observer: impl ClassifierObserver,
    ) -> std::io::Result<Self> {
        let observer: Arc<dyn ClassifierObserver> = Arc::new(observer);
        let (tx, rx) = mpsc::sync_channel::<Request>(QUEUE_DEPTH);
        let on_thread = Arc::clone(&observer);
        std::thread::Builder::new()
            .name("guard-classifier".into())
            .spawn(move || serve(classifier, rx, &*on_thread))?;
        Ok(Self {
            tx,
            cache: Arc::new(Mutex::new(ScoreCache::new(SCORE_CACHE_ENTRIES))),
            observer,
        })
    }

    /// Scores of `texts` sent by `scope` (the tenant), in order: remembered ones from the
    /// cache, the others from the scoring thread. Fails (never returns a default score) when
    /// the thread is overloaded or gone, or inference fails.
    pub async fn score(
        &self,
        scope: &str,
        texts: Vec<String>,
    ) -> Result<Vec<f32>, ClassifierError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<u128> = texts.iter().map(|t| ScoreCache::key(scope, t)).collect();
        let mut scores: Vec<Option<f32>> = {
            let mut cache = self.cache.lock().map_err(|_| ClassifierError::Stopped)?;
            keys.iter().map(|k| cache.get(*k)).collect()
        };
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| scores[i].is_none()).collect();
        let hits = texts.len() - missing.len();
        if hits > 0 {
            self.observer.cached(hits);
        }
        if !missing.is_empty() {
            let mut texts = texts;
            let wanted: Vec<String> = missing
                .iter()
                .map(|&i| std::mem::take(&mut texts[i]))
                .collect();
            let (reply, rx) = oneshot::channel();
            self.tx
                .try_send(Request {
                    texts: wanted,
                    reply,
                })
                .map_err(|e| match e {
                    mpsc::TrySendError::Full(_) => ClassifierError::Overloaded,
                    mpsc::TrySendError::Disconnected(_) => ClassifierError::Stopped,
                })?;
            let fresh = rx.await.map_err(|_| ClassifierError::Stopped)??;
            let mut cache = self.cache.lock().map_err(|_| ClassifierError::Stopped)?;
            for (&i, score) in missing.iter().zip(fresh) {
                cache.insert(keys[i], score);
                scores[i] = Some(score);
            }
        }
        scores
            .into_iter()
            .map(|s| s.ok_or(ClassifierError::Stopped))
            .collect()
    }
}

fn serve(classifier: Classifier, rx: mpsc::Receiver<Request>, observer: &dyn ClassifierObserver) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let mut texts = batch[0].texts.len();
        while texts < MAX_BATCH_TEXTS {
            match rx.try_recv() {
                Ok(next) => {
                    texts += next.texts.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let all: Vec<String> = batch.iter().flat_map(|r| r.texts.iter().cloned()).collect();
        let started = Instant::now();
        let result = classifier.score(&all);
        observer.batch(all.len(), started.elapsed().as_secs_f64());
        match result {
            Ok(scores) => {
                let mut rest = scores.as_slice();
                for request in batch {
                    let (mine, tail) = rest.split_at(request.texts.len());
                    rest = tail;
                    let _ = request.reply.send(Ok(mine.to_vec()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "guard classifier batch failed");
                let message = e.to_string();
                for request in batch {
                    let _ = request
                        .reply
                        .send(Err(ClassifierError::Inference(message.clone())));
                }
            }
        }
    }
}

/// Little-endian f32 values stored as base64 (the heads' large weight arrays); a byte count
/// that is not a whole number of values is refused.
pub(crate) fn f32le_base64(text: &str) -> Result<Vec<f32>, String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map_err(|e| e.to_string())?;
    if !bytes.len().is_multiple_of(4) {
        return Err(format!(
            "{} bytes is not a whole number of f32 values",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_cache_forgets_the_least_recently_used_and_keeps_scopes_apart() {
        let mut cache = ScoreCache::new(2);
        let (a, b, c) = (
            ScoreCache::key("acme", "one"),
            ScoreCache::key("acme", "two"),
            ScoreCache::key("acme", "three"),
        );
        assert_ne!(a, ScoreCache::key("globex", "one"), "scoped by tenant");
        assert_ne!(
            ScoreCache::key("ab", "c"),
            ScoreCache::key("a", "bc"),
            "the scope's length is hashed"
        );
        cache.insert(a, 0.1);
        cache.insert(b, 0.2);
        assert_eq!(cache.get(a), Some(0.1), "a is now the most recently used");
        cache.insert(c, 0.3);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(b), None, "b went");
        assert_eq!((cache.get(a), cache.get(c)), (Some(0.1), Some(0.3)));
        cache.insert(a, 0.4);
        assert_eq!((cache.len(), cache.get(a)), (2, Some(0.4)));
        let mut none = ScoreCache::new(0);
        none.insert(a, 0.1);
        assert!(none.is_empty());
    }

    #[test]
    fn encoded_blobs_are_masked_and_words_are_not() {
        assert_eq!(
            mask_encoded("Decode this: VGhlIG1lZXRpbmcgaXMgYXQgMyBwbQ== ok"),
            "Decode this:  [encoded]  ok"
        );
        assert_eq!(
            mask_encoded("hash 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12."),
            "hash  [encoded] ."
        );
        // Long words without digits, and short tokens, stay.
        let text = "supercalifragilisticexpialidocious and abc123";
        assert_eq!(mask_encoded(text), text);
    }
}
