//! Streaming generated text into the job's Redis stream, redacted on the way.
//!
//! Text arrives from the engine as it becomes final (never half a character, never part of a
//! stop sequence). Before it is appended to `{ns}:job:{id}:events`, a [`StreamRedactor`] holds
//! back the last [`HOLD_CHARS`] characters, long enough to contain any e-mail, phone, card or
//! ID number being written, and releases the rest through the PII redactor, never cutting a
//! detected span in two. The stored final result is redacted as a whole, as before.

use sluice_guard::pii;
use sluice_shared::store::JobStore;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Characters held back until they can no longer be the start of personal data.
pub const HOLD_CHARS: usize = 96;

/// Incremental redaction of a growing text.
pub struct StreamRedactor {
    raw: String,
    released: usize,
    enabled: bool,
}

fn byte_at_char(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(i, _)| i)
}

impl StreamRedactor {
    pub fn new(enabled: bool) -> Self {
        Self {
            raw: String::new(),
            released: 0,
            enabled,
        }
    }

    /// Adds text; returns what can be released now.
    pub fn push(&mut self, delta: &str) -> Option<String> {
        self.raw.push_str(delta);
        if !self.enabled {
            return self.take_until(self.raw.len(), &[]);
        }
        let window = &self.raw[self.released..];
        let chars = window.chars().count();
        if chars <= HOLD_CHARS {
            return None;
        }
        let spans = pii::detect(window);
        let mut cut = chars - HOLD_CHARS;
        for s in &spans {
            if s.start < cut && s.end > cut {
                cut = s.start;
            }
        }
        let cut_bytes = self.released + byte_at_char(window, cut);
        let spans: Vec<pii::PiiSpan> = spans.into_iter().filter(|s| s.end <= cut).collect();
        self.take_until(cut_bytes, &spans)
    }

    /// Releases everything left (the generation ended).
    pub fn finish(&mut self) -> Option<String> {
        let window = &self.raw[self.released..];
        let spans = if self.enabled {
            pii::detect(window)
        } else {
            Vec::new()
        };
        self.take_until(self.raw.len(), &spans)
    }

    fn take_until(&mut self, end: usize, spans: &[pii::PiiSpan]) -> Option<String> {
        if end <= self.released {
            return None;
        }
        let piece = &self.raw[self.released..end];
        let out = if spans.is_empty() {
            piece.to_string()
        } else {
            pii::redact_spans(piece, spans)
        };
        self.released = end;
        Some(out)
    }
}

/// Drains a job's text channel into its event stream until the sender is dropped.
pub async fn pump(
    store: JobStore,
    id: Uuid,
    ttl_secs: u64,
    redact: bool,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    let mut redactor = StreamRedactor::new(redact);
    while let Some(first) = rx.recv().await {
        let mut delta = first;
        // Coalesce whatever else is already waiting: one XADD per burst, not per token.
        while let Ok(more) = rx.try_recv() {
            delta.push_str(&more);
        }
        if let Some(text) = redactor.push(&delta)
            && let Err(e) = store.append_text(&id, &text, ttl_secs).await
        {
            tracing::warn!(error = %e, "cannot append to the job's event stream");
        }
    }
    if let Some(text) = redactor.finish()
        && let Err(e) = store.append_text(&id, &text, ttl_secs).await
    {
        tracing::warn!(error = %e, "cannot append to the job's event stream");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(text: &str, piece: usize, redact: bool) -> String {
        let mut r = StreamRedactor::new(redact);
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::new();
        for chunk in chars.chunks(piece) {
            out.extend(r.push(&chunk.iter().collect::<String>()));
        }
        out.extend(r.finish());
        out
    }

    #[test]
    fn redacts_personal_data_split_across_tokens() {
        let filler = "The weather is nice today and we talk about nothing at all. ".repeat(4);
        let text =
            format!("{filler}Write to zhangsan@example.com or call 13812345678 please. {filler}");
        for piece in [1, 3, 7] {
            let out = stream(&text, piece, true);
            assert!(
                !out.contains("zhangsan@example.com") && !out.contains("13812345678"),
                "{out}"
            );
            assert!(out.contains("[EMAIL]") && out.contains("[PHONE]"), "{out}");
        }
        assert_eq!(stream(&text, 5, false), text);
    }

    #[test]
    fn keeps_multibyte_text_whole() {
        let text = "你好，世界。".repeat(40);
        assert_eq!(stream(&text, 1, true), text);
    }
}
