//! PII and secret detection and redaction, safe for text without word separators (CJK).
//!
//! Why it exists: model inputs, outputs and logs carry personal data (e-mail addresses, phone,
//! card and identity numbers, IBANs, IP addresses) and credentials (API keys, JWTs, private
//! keys, passwords). [`detect`] finds them; [`redact`] replaces each with a placeholder such as
//! `[EMAIL]` so that what leaves the guard keeps its shape but not the data.
//!
//! Why not a list of regexes with `\b`: in Rust's regex `\b` is Unicode-aware, so in
//! `身份证号11010519491231002X` there is no boundary between `号` and `1` and a `\b`-anchored
//! pattern never matches, while in `abc4111111111111111` an ASCII-only boundary would match
//! in the middle of an identifier. Instead the scanners here find candidates and check the
//! neighbouring characters themselves:
//! - a digit-based match (cards, phones, identity numbers, SSNs, IPv4) must not touch an ASCII
//!   letter or digit on either side, nor continue a decimal number (`3.` before, `.5` after);
//! - an alphanumeric match (IBAN, API keys) must not touch an ASCII letter or digit;
//! - any non-ASCII character (CJK, full-width punctuation) is a valid neighbour.
//!
//! Then checksums and plausibility rules (Luhn, MOD 11-2, mod 97, calendar dates, issuer
//! prefixes, country lengths) throw away candidates that merely look right, so order numbers,
//! timestamps and version strings survive.
//!
//! Detectors, one private module per family (each documents its rules and trade-offs):
//! - `numeric`: credit cards (13-19 digits, compact or grouped, known IIN and length, Luhn),
//!   Chinese resident identity numbers (GB 11643-1999: MOD 11-2, birth date between 1900 and
//!   the current year, region not starting with 0), US SSNs (`AAA-GG-SSSS`), Chinese mobiles
//!   (`1[3-9]` + 9 digits, optional `86`), E.164 numbers (`+`, 8-15 digits, per-country
//!   lengths for `+1`, `+7`, `+44`, `+86`);
//! - `net`: IPv4 and IPv6 (validated by `std::net`), except loopback and unspecified;
//! - `email`: addresses anchored on `@`;
//! - `iban`: IBANs, compact or in groups of four, mod 97 and registered country length;
//! - `secrets`: provider API keys, JWTs, PEM private keys, `password=...` assignments;
//! - `entropy`: the high-entropy fallback for secrets of unknown format;
//! - `checks`: the validators.
//!
//! How it runs: one pass over the bytes dispatches on the few bytes that can start or anchor a
//! candidate (a digit, `+`, `@`, `:`, `=`, an upper-case letter), skipping the rest with a
//! table lookup; a skip search finds runs of base64-like characters long enough for the
//! entropy detector without reading most bytes; one combined regex, compiled once, finds
//! provider key prefixes, JWTs and PEM headers with its literal prefilter. Every candidate is
//! collected, then overlaps are resolved: specific detectors beat the high-entropy fallback,
//! then the longer span wins (an identity number over the phone number inside it, a card over
//! a phone, an e-mail over the digits in its local part), then the more specific kind.
//!
//! Offsets: internally everything is in bytes of the UTF-8 text; [`PiiSpan`] offsets are in
//! characters, converted once at the end.
//!
//! Placeholders are upper-case ASCII in square brackets, which no detector matches (brackets
//! are neither token nor digit neighbours that would join a match, and no placeholder has
//! the shape of a detected kind). [`redact`] still re-runs detection on its own output
//! until nothing is found, because replacing a span changes the neighbours of the text around
//! it.

mod checks;
mod email;
mod entropy;
mod iban;
mod net;
mod numeric;
mod secrets;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    Email,
    Phone,
    CreditCard,
    CnResidentId,
    Iban,
    Ipv4,
    Ipv6,
    UsSsn,
    Jwt,
    ApiKey,
    HighEntropy,
}

impl PiiKind {
    /// What [`redact_spans`] writes in place of a span of this kind.
    pub fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Email => "[EMAIL]",
            PiiKind::Phone => "[PHONE]",
            PiiKind::CreditCard => "[CREDIT_CARD]",
            PiiKind::CnResidentId => "[CN_RESIDENT_ID]",
            PiiKind::Iban => "[IBAN]",
            PiiKind::Ipv4 => "[IPV4]",
            PiiKind::Ipv6 => "[IPV6]",
            PiiKind::UsSsn => "[US_SSN]",
            PiiKind::Jwt => "[JWT]",
            PiiKind::ApiKey => "[API_KEY]",
            PiiKind::HighEntropy => "[SECRET]",
        }
    }
}

/// A detected span, in characters (not bytes) of the text it was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PiiSpan {
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
}

/// Every PII span in `text`, sorted by start, non-overlapping (the longer match wins).
///
/// Detection reads a folded view of the text ([`fold`]): every decimal digit of any script
/// (full-width `１３８…`, Arabic-Indic, Devanagari, mathematical bold, ...) as its ASCII digit,
/// and full-width letters and address punctuation as ASCII. The fold maps each
/// character to exactly one character, so the spans, which count characters, are the
/// original text's: redaction replaces the characters the client sent.
pub fn detect(text: &str) -> Vec<PiiSpan> {
    let folded = fold(text);
    let text = folded.as_deref().unwrap_or(text);
    let mut found = Vec::new();
    scan(text, &mut found);
    secrets::scan_keys(text.as_bytes(), &mut found);
    let chosen = resolve(found);
    to_char_spans(text.as_bytes(), &chosen)
}

/// The first code point (the zero) of every run of ten decimal digits outside ASCII (Unicode
/// general category Nd, 14.0).
const DIGIT_ZEROS: [u32; 65] = [
    0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6, 0x0D66,
    0x0DE6, 0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
    0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10,
    0x104A0, 0x10D30, 0x11066, 0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0, 0x11650,
    0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x16A60, 0x16AC0, 0x16B50,
    0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E950, 0x1FBF0,
];

/// One character of the folded view: a decimal digit of any script as its ASCII digit; a
/// full-width letter, or the full-width `@ . - + _` that addresses are made of, as its ASCII
/// form; anything else unchanged. Other full-width punctuation (`，：（`) stays: like any
/// non-ASCII character it separates a match from its neighbours.
fn fold_char(c: char) -> char {
    let cp = c as u32;
    let full_width = matches!(cp, 0xFF21..=0xFF3A | 0xFF41..=0xFF5A)
        || matches!(c, '＠' | '．' | '－' | '＋' | '＿');
    if full_width {
        return char::from_u32(cp - 0xFEE0).unwrap_or(c);
    }
    // The last run that starts at or below `cp`; `cp` is a digit if it lies within its ten.
    let i = DIGIT_ZEROS.partition_point(|&zero| zero <= cp);
    if i > 0 && cp - DIGIT_ZEROS[i - 1] < 10 {
        return char::from(b'0' + (cp - DIGIT_ZEROS[i - 1]) as u8);
    }
    c
}

/// The folded view of `text`, or `None` when folding changes nothing (all ASCII, the common
/// case, costs one pass over the bytes).
fn fold(text: &str) -> Option<String> {
    if text.is_ascii() || !text.chars().any(|c| fold_char(c) != c) {
        return None;
    }
    Some(text.chars().map(fold_char).collect())
}

/// `text` with each span replaced by its placeholder (`[EMAIL]`, `[PHONE]`, ...).
///
/// Spans are taken in order of start; a span that is empty, overlaps an earlier one or starts
/// past the end of `text` is ignored, and an end past the end of `text` is clamped, so any
/// slice of spans is accepted without panicking.
pub fn redact_spans(text: &str, spans: &[PiiSpan]) -> String {
    let mut sorted: Vec<PiiSpan> = spans.iter().copied().filter(|s| s.start < s.end).collect();
    sorted.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
    let mut out = String::with_capacity(text.len());
    let mut cursor = CharCursor::new(text);
    let mut copied = 0; // bytes of `text` already handled
    let mut last_end = 0; // chars
    for span in sorted {
        if span.start < last_end {
            continue;
        }
        let start = cursor.byte_at(span.start);
        if start >= text.len() {
            break;
        }
        let end = cursor.byte_at(span.end);
        out.push_str(text.get(copied..start).unwrap_or_default());
        out.push_str(span.kind.placeholder());
        copied = end;
        last_end = span.end;
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    out
}

/// How many detect/redact rounds [`redact`] runs at most. One round almost always suffices;
/// a second is needed only when a placeholder changes a neighbour so that text rejected in
/// round one (say, digits glued to a letter that was part of a detected key) now qualifies.
const MAX_REDACT_ROUNDS: usize = 8;

/// `detect` then `redact_spans`.
///
/// Repeated until detection finds nothing in the output (at most [`MAX_REDACT_ROUNDS`]
/// rounds), so that `detect(&redact(x))` is empty and `redact` is idempotent.
pub fn redact(text: &str) -> String {
    let spans = detect(text);
    if spans.is_empty() {
        return text.to_owned();
    }
    let mut current = redact_spans(text, &spans);
    for _ in 1..MAX_REDACT_ROUNDS {
        let spans = detect(&current);
        if spans.is_empty() {
            break;
        }
        current = redact_spans(&current, &spans);
    }
    current
}

/// A candidate span in bytes, before overlaps are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cand {
    start: usize,
    end: usize,
    kind: PiiKind,
    /// Tie-breaker among equally long overlapping candidates: lower is more specific.
    rank: u8,
}

/// Rank of a generic `password=...` value: below every shape-checked kind.
const RANK_ASSIGNMENT: u8 = 20;

impl Cand {
    fn new(start: usize, end: usize, kind: PiiKind) -> Self {
        let rank = match kind {
            PiiKind::CnResidentId => 0,
            PiiKind::CreditCard => 1,
            PiiKind::Iban => 2,
            PiiKind::UsSsn => 3,
            PiiKind::Jwt => 4,
            PiiKind::ApiKey => 5,
            PiiKind::Email => 6,
            PiiKind::Ipv6 => 7,
            PiiKind::Ipv4 => 8,
            PiiKind::Phone => 9,
            PiiKind::HighEntropy => 30,
        };
        Self {
            start,
            end,
            kind,
            rank,
        }
    }

    fn assignment(start: usize, end: usize) -> Self {
        Self {
            start,
            end,
            kind: PiiKind::ApiKey,
            rank: RANK_ASSIGNMENT,
        }
    }

    /// The high-entropy fallback loses to every specific detector, whatever the lengths.
    fn tier(&self) -> u8 {
        u8::from(self.kind == PiiKind::HighEntropy)
    }
}

/// Shortest run of token characters the entropy detector looks at.
const MIN_TOKEN_LEN: usize = 24;

/// Finds every candidate: anchored detectors, then runs of token characters.
fn scan(text: &str, out: &mut Vec<Cand>) {
    let b = text.as_bytes();
    scan_anchors(b, out);
    scan_tokens(b, out);
}

/// The pass over the bytes that dispatches to the detectors anchored on a byte. Most bytes
/// of prose anchor nothing and are skipped with one table lookup.
fn scan_anchors(b: &[u8], out: &mut Vec<Cand>) {
    let mut groups = numeric::Groups::default();
    let mut numeric_until = 0;
    let mut ipv6_until = 0;
    let mut i = 0;
    while let Some(off) = b
        .get(i..)
        .and_then(|rest| rest.iter().position(|&c| is_anchor_byte(c)))
    {
        i += off;
        let Some(&c) = b.get(i) else {
            break;
        };
        match c {
            b'0'..=b'9' => {
                let prev_digit = before(b, i).is_some_and(|p| p.is_ascii_digit());
                if !prev_digit {
                    if i >= numeric_until {
                        numeric_until = numeric::scan_run(b, i, &mut groups, out);
                    }
                    net::ipv4_at(b, i, out);
                }
            }
            b'+' => numeric::e164_at(b, i, out),
            b'@' => email::at(b, i, out),
            b':' => {
                if i >= ipv6_until {
                    ipv6_until = net::ipv6_around(b, i, out);
                }
                secrets::assignment_at(b, i, 1, out);
            }
            b'=' => secrets::assignment_at(b, i, 1, out),
            // U+FF1A FULLWIDTH COLON, as in `密码：...`.
            0xEF if b.get(i + 1..i + 3) == Some(&[0xBC, 0x9A]) => {
                secrets::assignment_at(b, i, 3, out);
            }
            b'A'..=b'Z' => iban::at(b, i, out),
            _ => {}
        }
        i += 1;
    }
}

/// Feeds every maximal run of at least [`MIN_TOKEN_LEN`] token characters to the entropy
/// detector, without looking at most bytes: if the byte `MIN_TOKEN_LEN - 1` ahead is not a
/// token character, no long run can start before it (the Boyer-Moore idea), and otherwise
/// the run through it is walked once and skipped.
fn scan_tokens(b: &[u8], out: &mut Vec<Cand>) {
    // Invariant: no run under consideration starts before `i` (b[i - 1] is not a token byte).
    let mut i = 0;
    while i + MIN_TOKEN_LEN <= b.len() {
        let probe = i + MIN_TOKEN_LEN - 1;
        if !b.get(probe).is_some_and(|&c| is_token_byte(c)) {
            i = probe + 1;
            continue;
        }
        let mut s = probe;
        while s > i && b.get(s - 1).is_some_and(|&c| is_token_byte(c)) {
            s -= 1;
        }
        let mut e = probe + 1;
        while b.get(e).is_some_and(|&c| is_token_byte(c)) {
            e += 1;
        }
        if e - s >= MIN_TOKEN_LEN {
            entropy::token(b, s, e, out);
        }
        i = e + 1;
    }
}

/// Keeps a non-overlapping subset: specific kinds before the entropy fallback, then longer
/// before shorter, then more specific before less, then leftmost.
///
/// Whether a candidate is kept depends only on the candidates it overlaps, so the sorted
/// candidates are cut into clusters of transitively overlapping ones and each cluster is
/// resolved on its own; most clusters are a single candidate, kept as is.
fn resolve(mut found: Vec<Cand>) -> Vec<Cand> {
    found.retain(|c| c.start < c.end);
    found.sort_unstable_by_key(|c| (c.start, c.end));
    let mut chosen = Vec::with_capacity(found.len());
    let mut i = 0;
    while let Some(first) = found.get(i) {
        let mut reach = first.end;
        let mut j = i + 1;
        while let Some(next) = found.get(j).filter(|c| c.start < reach) {
            reach = reach.max(next.end);
            j += 1;
        }
        match found.get_mut(i..j) {
            Some([only]) => chosen.push(*only),
            Some(cluster) => resolve_cluster(cluster, &mut chosen),
            None => {}
        }
        i = j;
    }
    chosen
}

/// Greedy choice within one cluster of overlapping candidates, appended to `chosen` in order
/// of start.
fn resolve_cluster(cluster: &mut [Cand], chosen: &mut Vec<Cand>) {
    cluster.sort_by(|a, b| {
        a.tier()
            .cmp(&b.tier())
            .then((b.end - b.start).cmp(&(a.end - a.start)))
            .then(a.rank.cmp(&b.rank))
            .then(a.start.cmp(&b.start))
    });
    // Kept candidates by start; a map keeps huge adversarial clusters O(n log n).
    let mut kept: BTreeMap<usize, Cand> = BTreeMap::new();
    for &cand in cluster.iter() {
        let before = kept.range(..=cand.start).next_back();
        let after = kept.range(cand.start..).next();
        let overlaps = before.is_some_and(|(_, c)| c.end > cand.start)
            || after.is_some_and(|(_, c)| c.start < cand.end);
        if !overlaps {
            kept.insert(cand.start, cand);
        }
    }
    chosen.extend(kept.into_values());
}

/// Converts sorted, non-overlapping byte spans into character spans in one pass.
fn to_char_spans(b: &[u8], chosen: &[Cand]) -> Vec<PiiSpan> {
    let mut spans = Vec::with_capacity(chosen.len());
    let (mut byte, mut chars) = (0usize, 0usize);
    for c in chosen {
        chars += count_chars(b.get(byte..c.start).unwrap_or_default());
        let start = chars;
        chars += count_chars(b.get(c.start..c.end).unwrap_or_default());
        byte = c.end;
        spans.push(PiiSpan {
            kind: c.kind,
            start,
            end: chars,
        });
    }
    spans
}

/// Characters in a UTF-8 byte slice: bytes that are not continuation bytes.
fn count_chars(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&x| (x & 0xC0) != 0x80).count()
}

/// Maps increasing character offsets to byte offsets, walking the text once.
struct CharCursor<'a> {
    text: &'a str,
    chars: usize,
    byte: usize,
}

impl<'a> CharCursor<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            chars: 0,
            byte: 0,
        }
    }

    /// Byte offset of character `idx` (`text.len()` past the end). Calls must not decrease
    /// `idx`; a smaller one returns the current position.
    fn byte_at(&mut self, idx: usize) -> usize {
        if idx > self.chars {
            let rest = self.text.get(self.byte..).unwrap_or_default();
            match rest.char_indices().nth(idx - self.chars) {
                Some((off, _)) => {
                    self.byte += off;
                    self.chars = idx;
                }
                None => {
                    self.chars += rest.chars().count();
                    self.byte = self.text.len();
                }
            }
        }
        self.byte
    }
}

/// Characters of base64 / base64url / hex tokens: `[A-Za-z0-9+/=_-]`.
const TOKEN_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'_' | b'-');
        i += 1;
    }
    t
};

fn is_token_byte(c: u8) -> bool {
    TOKEN_BYTES[usize::from(c)]
}

/// Bytes that anchor a detector in [`scan_anchors`]: digits, `+`, `@`, `:`, `=`, upper-case
/// letters, and the lead byte of U+FF1A.
const ANCHOR_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = c.is_ascii_digit()
            || c.is_ascii_uppercase()
            || matches!(c, b'+' | b'@' | b':' | b'=' | 0xEF);
        i += 1;
    }
    t
};

fn is_anchor_byte(c: u8) -> bool {
    ANCHOR_BYTES[usize::from(c)]
}

/// The byte before `i`, if any.
fn before(b: &[u8], i: usize) -> Option<u8> {
    i.checked_sub(1).and_then(|p| b.get(p)).copied()
}

/// Whether the byte before `i` is an ASCII letter or digit (what a match must not touch).
fn alnum_before(b: &[u8], i: usize) -> bool {
    before(b, i).is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Whether the byte at `i` is an ASCII letter or digit.
fn alnum_at(b: &[u8], i: usize) -> bool {
    b.get(i).is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_of_every_script_and_full_width_forms_are_found_and_redacted_in_place() {
        // Full-width mobile number, Chinese context.
        let text = "我的手机号是１３８１２３４５６７８，请回电";
        let spans = detect(text);
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert_eq!(spans[0].kind, PiiKind::Phone);
        assert_eq!(redact(text), "我的手机号是[PHONE]，请回电");
        // Arabic-Indic digits, a Luhn-valid card number.
        let card: String = "4111111111111111"
            .chars()
            .map(|d| char::from_u32(0x0660 + d.to_digit(10).unwrap_or(0)).unwrap_or(d))
            .collect();
        assert_eq!(redact(&format!("card {card} ok")), "card [CREDIT_CARD] ok");
        // A full-width e-mail address.
        assert_eq!(
            redact("mail ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ now"),
            "mail [EMAIL] now"
        );
        // Nothing to fold, nothing found.
        assert!(detect("version ３.１２ of the app").is_empty());
        assert_eq!(fold_char('٣'), '3');
        assert_eq!(fold_char('𝟗'), '9');
        assert_eq!(fold_char('好'), '好');
        assert_eq!(fold_char('：'), '：');
        assert_eq!(fold("plain ascii"), None);
    }

    #[test]
    fn cursor_maps_chars_to_bytes() {
        let text = "a身b份c";
        let mut cur = CharCursor::new(text);
        assert_eq!(cur.byte_at(0), 0);
        assert_eq!(cur.byte_at(1), 1);
        assert_eq!(cur.byte_at(2), 4);
        assert_eq!(cur.byte_at(4), 8);
        assert_eq!(cur.byte_at(5), text.len());
        assert_eq!(cur.byte_at(99), text.len());
    }

    #[test]
    fn redact_spans_tolerates_bad_spans() {
        let span = |start, end| PiiSpan {
            kind: PiiKind::Email,
            start,
            end,
        };
        let text = "你好abc";
        assert_eq!(redact_spans(text, &[span(1, 3)]), "你[EMAIL]bc");
        assert_eq!(redact_spans(text, &[span(3, 99)]), "你好a[EMAIL]");
        assert_eq!(redact_spans(text, &[span(5, 9)]), text);
        assert_eq!(redact_spans(text, &[span(2, 1)]), text);
        assert_eq!(redact_spans(text, &[span(0, 2), span(1, 4)]), "[EMAIL]abc");
        assert_eq!(
            redact_spans(text, &[span(3, 4), span(0, 1)]),
            "[EMAIL]好a[EMAIL]c"
        );
    }

    #[test]
    fn placeholders_are_not_detected() {
        let kinds = [
            PiiKind::Email,
            PiiKind::Phone,
            PiiKind::CreditCard,
            PiiKind::CnResidentId,
            PiiKind::Iban,
            PiiKind::Ipv4,
            PiiKind::Ipv6,
            PiiKind::UsSsn,
            PiiKind::Jwt,
            PiiKind::ApiKey,
            PiiKind::HighEntropy,
        ];
        let all: String = kinds.iter().map(|k| k.placeholder()).collect();
        assert!(detect(&all).is_empty());
        let spaced: Vec<&str> = kinds.iter().map(|k| k.placeholder()).collect();
        assert!(detect(&spaced.join(" ")).is_empty());
        assert!(detect(&format!("password={all}")).is_empty());
    }

    #[test]
    fn overlap_resolution() {
        let c = |s, e, k| Cand::new(s, e, k);
        let got = resolve(vec![
            c(0, 11, PiiKind::Phone),
            c(0, 18, PiiKind::CnResidentId),
            c(20, 60, PiiKind::HighEntropy),
            c(25, 40, PiiKind::ApiKey),
            c(40, 50, PiiKind::Phone),
            Cand::assignment(40, 50),
        ]);
        let kinds: Vec<_> = got.iter().map(|c| (c.start, c.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, PiiKind::CnResidentId),
                (25, PiiKind::ApiKey),
                (40, PiiKind::Phone)
            ]
        );
    }
}
