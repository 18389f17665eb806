//! Streaming generated text into the job's Redis stream, redacted on the way.
//!
//! Text arrives from the engine as it becomes final (never half a character, never part of a
//! stop sequence). Before it is appended to `{ns}:job:{id}:events`, a [`StreamRedactor`] holds
//! back only what personal data could still be growing into, and releases the rest through the
//! PII redactor, never cutting a detected span in two. The stored final result is redacted as a
//! whole, as before.
//!
//! What is held ([`StreamRedactor::hold_start`]): the last whitespace-separated group (it may
//! still become an e-mail address, a key or a number), and the groups before it for as long as
//! a detector could join them across the whitespace: a group with a digit (cards, phones,
//! IBANs, SSNs and identity numbers are written in digit groups), a short upper-case group (an
//! IBAN's letters), one that opens a phone number (`+`, `(`) or ends in an assignment
//! (`password:`); an assignment's quoted value until its quote closes (it may contain
//! spaces); and everything from an unterminated PEM header on. A letter outside ASCII (CJK,
//! Cyrillic, ...) ends a group for good: no detector matches across one. Ordinary prose is
//! therefore released as soon as a word is complete (the word being written stays back: it
//! may still become an address or a key), where a fixed hold of 96 characters used to lag a
//! whole sentence. Nothing is held for longer than [`HOLD_CHARS`] characters,
//! except inside a span the detector already sees, which is never cut. Detection reads
//! [`CONTEXT_CHARS`] characters of released text before what it releases, so what is streamed
//! is redacted as the whole text is.

use sluice_guard::pii;
use sluice_jobs::store::JobStore;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

/// The most characters held back when no detected span crosses the cut: far longer than any
/// e-mail, phone, card or identity number, or any key or token the detectors know; only a run
/// of text without a break longer than this (base64 data, say) is released in parts.
pub const HOLD_CHARS: usize = 1024;

/// Characters before the released point that detection still reads, so that a detector's
/// left-context rules (`version 1.2.3.4` is not an address, a key glued to a word is not a key)
/// decide as they would on the whole text.
const CONTEXT_CHARS: usize = 32;

/// The most characters of released text detection reads (a long token before the released
/// point is read whole up to this length).
const MAX_CONTEXT_CHARS: usize = 512;

/// Incremental redaction of a growing text.
pub struct StreamRedactor {
    raw: String,
    released: usize,
    enabled: bool,
}

fn byte_at_char(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(i, _)| i)
}

/// Whether a detector could match across whitespace between `left` and a group starting with
/// `right` (`None`: the text ends in that whitespace, so anything may follow): an assignment
/// (`password:`) and its value, or groups of a number, a phone or an IBAN (digits, `+`, `(`,
/// short upper-case letter groups) continued by another such group.
fn joins(left: &str, right: Option<char>) -> bool {
    if left.ends_with([':', '=', '：']) {
        return true;
    }
    let numberish = left.chars().any(char::is_numeric)
        || left.contains(['(', '+'])
        || (left.chars().count() <= 4 && left.chars().all(is_upper));
    numberish && right.is_none_or(|c| c.is_numeric() || matches!(c, '(' | '+' | '-') || is_upper(c))
}

fn is_upper(c: char) -> bool {
    c.is_ascii_uppercase() || ('Ａ'..='Ｚ').contains(&c)
}

/// A character no detected span can contain: a letter outside ASCII (CJK, kana, Hangul,
/// Cyrillic, accented Latin, ...) other than the full-width ASCII letters detection folds.
/// Such a character ends any personal data before it, as whitespace may not.
fn is_inert(c: char) -> bool {
    !c.is_ascii() && c.is_alphabetic() && !matches!(c as u32, 0xFF21..=0xFF3A | 0xFF41..=0xFF5A)
}

fn is_break(c: char) -> bool {
    c.is_whitespace() || is_inert(c)
}

/// Where an assignment's quoted value opened on the last line of `text` and has not closed yet
/// (`password: "correct horse`): the detector reports a quoted value whole, spaces and all.
/// Reads at most the last [`MAX_LINE_BYTES`] bytes of the line.
fn open_quoted_value(text: &str) -> Option<usize> {
    let mut line = text.rfind('\n').map_or(0, |i| i + 1);
    if text.len() - line > MAX_LINE_BYTES {
        line = text.ceil_char_boundary(text.len() - MAX_LINE_BYTES);
    }
    let bytes = text.as_bytes();
    let mut open: Option<(u8, usize)> = None;
    for (i, &b) in bytes.iter().enumerate().skip(line) {
        match open {
            Some((q, _)) if b == q => open = None,
            Some(_) => {}
            None if matches!(b, b'"' | b'\'' | b'`') => {
                // A value's quote: after `:`, `=` or `：` and at most 8 spaces or tabs.
                let before = text[line..i].trim_end_matches([' ', '\t']);
                if before.ends_with([':', '=', '：']) && i - (line + before.len()) <= 8 {
                    open = Some((b, i));
                }
            }
            None => {}
        }
    }
    open.map(|(_, at)| at)
}

/// How far back on a line [`open_quoted_value`] looks (the detector's quoted values are far
/// shorter).
const MAX_LINE_BYTES: usize = 4096;

/// Where an unterminated PEM block starts (a header with no complete footer yet).
fn open_pem_block(window: &str) -> Option<usize> {
    let begin = window.rfind("-----BEGIN")?;
    let rest = &window[begin..];
    let closed = rest
        .find("-----END")
        .is_some_and(|end| rest[end + "-----END".len()..].contains("-----"));
    (!closed).then_some(begin)
}

impl StreamRedactor {
    pub fn new(enabled: bool) -> Self {
        Self {
            raw: String::new(),
            released: 0,
            enabled,
        }
    }

    /// Byte offset in `window` from which text must stay back: what personal data may still
    /// be growing into.
    fn hold_start(window: &str) -> usize {
        let chars: Vec<(usize, char)> = window.char_indices().collect();
        let byte = |k: usize| chars.get(k).map_or(window.len(), |&(i, _)| i);
        // The start of the group (run of non-break characters) that ends at `end`.
        let group_start = |end: usize| {
            let mut k = end;
            while k > 0 && !is_break(chars[k - 1].1) {
                k -= 1;
            }
            k
        };
        let mut hold = window.len();
        let mut at = chars.len();
        // The last group, unless the text ends in a break.
        if at > 0 && !is_break(chars[at - 1].1) {
            at = group_start(at);
            hold = byte(at);
        }
        // Groups before it, while whitespace (never an inert letter) separates them and the
        // group before the whitespace can be joined over it.
        loop {
            let mut k = at;
            while k > 0 && chars[k - 1].1.is_whitespace() {
                k -= 1;
            }
            if k == at || k == 0 || is_inert(chars[k - 1].1) {
                break;
            }
            let start = group_start(k);
            let right = chars.get(at).map(|&(_, c)| c);
            if !joins(&window[byte(start)..byte(k)], right) {
                break;
            }
            at = start;
            hold = byte(at);
        }
        if let Some(begin) = open_pem_block(window) {
            hold = hold.min(begin);
        }
        hold
    }

    /// Adds text; returns what can be released now.
    pub fn push(&mut self, delta: &str) -> Option<String> {
        self.raw.push_str(delta);
        if !self.enabled {
            return self.take_until(self.raw.len(), &[]);
        }
        let window = &self.raw[self.released..];
        let chars = window.chars().count();
        let mut held = self.released + Self::hold_start(window);
        // A quoted value's separator may already be out: read the whole line.
        if let Some(quote) = open_quoted_value(&self.raw) {
            held = held.min(quote.max(self.released));
        }
        let cap = self.released + byte_at_char(window, chars.saturating_sub(HOLD_CHARS));
        let cut = held.max(cap);
        self.release(cut)
    }

    /// Releases everything left (the generation ended).
    pub fn finish(&mut self) -> Option<String> {
        if !self.enabled {
            return self.take_until(self.raw.len(), &[]);
        }
        self.release(self.raw.len())
    }

    /// Releases text up to byte `cut` (or the start of a detected span crossing it), redacted.
    /// Detection reads [`CONTEXT_CHARS`] characters before the released point as context.
    fn release(&mut self, mut cut: usize) -> Option<String> {
        if cut <= self.released {
            return None;
        }
        let context = self.context_start();
        let scanned = &self.raw[context..];
        let mut spans = Vec::new();
        for span in pii::detect(scanned) {
            let start = context + byte_at_char(scanned, span.start);
            let end = context + byte_at_char(scanned, span.end);
            if end > self.released {
                spans.push((span.kind, start.max(self.released), end));
            }
        }
        for &(_, start, end) in &spans {
            if start < cut && end > cut {
                cut = start;
            }
        }
        if cut <= self.released {
            return None;
        }
        let piece = &self.raw[self.released..cut];
        let chars_to = |byte: usize| piece[..byte - self.released].chars().count();
        let local: Vec<pii::PiiSpan> = spans
            .iter()
            .filter(|&&(_, _, end)| end <= cut)
            .map(|&(kind, start, end)| pii::PiiSpan {
                kind,
                start: chars_to(start),
                end: chars_to(end),
            })
            .collect();
        self.take_until(cut, &local)
    }

    /// Where detection starts reading: [`CONTEXT_CHARS`] characters before the released point,
    /// moved back to the start of the group there (a detector reading half a token would see a
    /// different token), by at most [`MAX_CONTEXT_CHARS`] characters in all.
    fn context_start(&self) -> usize {
        let before = &self.raw[..self.released];
        let mut seen = 0;
        let mut start = 0;
        for (i, c) in before.char_indices().rev() {
            seen += 1;
            start = i;
            if seen >= MAX_CONTEXT_CHARS || (seen > CONTEXT_CHARS && c.is_whitespace()) {
                break;
            }
        }
        start
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

/// How a pump writes a job's text into its event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PumpConfig {
    /// The stream's time to live, set with the first append (`FINISH` sets the final one).
    pub ttl_secs: u64,
    /// Run the redactor over the text before it is appended.
    pub redact: bool,
    /// Appends are at least this far apart: text that arrives sooner is held and sent with the
    /// next append, so a fast decode writes one `XADD` per interval instead of one per token.
    /// The first append of a job goes out at once, so the time to first token is unchanged,
    /// and no text waits longer than this. Zero appends every burst as it arrives.
    pub flush_interval: Duration,
}

/// Drains a job's text channel into its event stream until the sender is dropped.
pub async fn pump(
    store: JobStore,
    id: Uuid,
    config: PumpConfig,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    let mut redactor = StreamRedactor::new(config.redact);
    // The stream's TTL is set until an append carrying it succeeds, then left to `FINISH`:
    // one command per append instead of two.
    let mut ttl_set = false;
    let mut append = async |text: String| {
        let expire = (!ttl_set).then_some(config.ttl_secs);
        match store.append_text(&id, &text, expire).await {
            Ok(()) => ttl_set = true,
            Err(e) => tracing::warn!(error = %e, "cannot append to the job's event stream"),
        }
    };
    let mut last_append: Option<Instant> = None;
    let mut open = true;
    while open {
        let Some(mut delta) = rx.recv().await else {
            break;
        };
        // Within the interval since the last append, gather what arrives until it ends (or
        // the job does: the last text is never held back).
        if let Some(last) = last_append {
            let due = last + config.flush_interval;
            while open && Instant::now() < due {
                tokio::select! {
                    more = rx.recv() => match more {
                        Some(more) => delta.push_str(&more),
                        None => open = false,
                    },
                    () = tokio::time::sleep_until(due) => break,
                }
            }
        }
        // Whatever else is already waiting goes in the same append.
        while let Ok(more) = rx.try_recv() {
            delta.push_str(&more);
        }
        if let Some(text) = redactor.push(&delta) {
            append(text).await;
            last_append = Some(Instant::now());
        }
    }
    if let Some(text) = redactor.finish() {
        append(text).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    /// Streams `pieces` one push each; what had been released after each push.
    fn released_after_each(pieces: &[&str]) -> Vec<String> {
        let mut r = StreamRedactor::new(true);
        let mut out = String::new();
        pieces
            .iter()
            .map(|p| {
                out.extend(r.push(p));
                out.clone()
            })
            .collect()
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

    #[test]
    fn prose_is_released_as_each_word_completes() {
        let out = released_after_each(&["The", " weather", " is", " nice", " today", "."]);
        assert_eq!(out[0], "");
        assert_eq!(out[1], "The ");
        assert_eq!(out[4], "The weather is nice ");
        // CJK text has no word to wait for.
        let out = released_after_each(&["今天", "天气", "很好"]);
        assert_eq!(out, ["今天", "今天天气", "今天天气很好"]);
    }

    #[test]
    fn numbers_keys_and_quoted_values_stay_back_until_complete() {
        // Digit groups may still be one card number.
        let out = released_after_each(&["Card", " 4111", " 1111", " 1111", " 1111", " thanks"]);
        assert_eq!(out[4], "Card ");
        assert_eq!(out[5], "Card [CREDIT_CARD] ");
        // A quoted value may hold spaces.
        let out = released_after_each(&["password: \"correct", " horse", " battery\"", " ok"]);
        assert_eq!(out[1], "password: ");
        // Closed, it is detected and released whole.
        assert_eq!(out[3], "password: \"[API_KEY]\" ");
        // An IBAN's letter group joins the digit groups around it.
        let out = released_after_each(&[
            "Pay", " GB82", " WEST", " 1234", " 5698", " 7654", " 32", " now",
        ]);
        assert_eq!(out[6], "Pay ");
        assert!(out[7].starts_with("Pay [IBAN]"), "{}", out[7]);
    }

    /// Words, separators and personal data of every kind the redactor knows, to be joined in
    /// any order.
    fn piece() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "the", "weather", "is", "nice", "call", "me", "at", "Pay", "WEST", "ID", "version",
            "password:", "token=", "密码：", "电话", "邮箱", "你好", "Привет", "café",
            "zhangsan@example.com", "13812345678", "+1 (415) 555-2671", "4111 1111 1111 1111",
            "4111-1111-1111-1111", "GB82 WEST 1234 5698 7654 32", "11010519491231002X",
            "123-45-6789", "192.168.10.20", "2001:db8::8a2e:370:7334",
            "sk-proj-abcdefghijklmnopqrstuvwxyz012345", "AKIAIOSFODNN7EXAMPLE",
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789", "\"correct horse battery\"",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n-----END RSA PRIVATE KEY-----",
            "１３８１２３４５６７８", "3.14", "2026", "12", "v1.2.3",
            " ", " ", " ", "\n", ", ", ". ", "，", "。", ":", "(", ")",
        ])
        .prop_map(str::to_string)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// However generation splits the text, the stream is exactly the redacted whole text
        /// when generation ends, so nothing the final result redacts ever reaches it.
        #[test]
        fn the_stream_is_the_redacted_text_under_any_split(
            pieces in prop::collection::vec(piece(), 1..20),
            cuts in prop::collection::vec(1usize..12, 1..64),
        ) {
            let text: String = pieces.concat();
            let chars: Vec<char> = text.chars().collect();
            let mut r = StreamRedactor::new(true);
            let mut out = String::new();
            let (mut at, mut k) = (0, 0);
            while at < chars.len() {
                let n = cuts[k % cuts.len()].min(chars.len() - at);
                out.extend(r.push(&chars[at..at + n].iter().collect::<String>()));
                at += n;
                k += 1;
            }
            out.extend(r.finish());
            let whole = pii::redact_spans(&text, &pii::detect(&text));
            prop_assert_eq!(out, whole);
        }
    }
}
