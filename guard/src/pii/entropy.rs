//! High-entropy tokens: secrets of unknown format (random API keys, session ids, base64
//! blobs) that no provider rule knows.
//!
//! A token is a maximal run of `[A-Za-z0-9+/=_-]`, split after `=` padding that is followed by
//! more characters (so `key=value` is two pieces). A piece is flagged as
//! [`PiiKind::HighEntropy`] when it
//! - is at least 24 characters long;
//! - mixes at least three of: lower-case, upper-case, digit, symbol;
//! - has a Shannon entropy of at least 4.0 bits per character;
//! - is not hex (digits and `a-f`/`A-F`, with `-`/`_` separators): hex strings are digests,
//!   commit ids and UUIDs far more often than secrets, and UUIDs are not personal data, so
//!   they are never flagged here (a hex secret is still caught by the assignment rule, e.g.
//!   `secret=9f86d0...`);
//! - does not read as words: when most of its letters belong to word-like segments (split at
//!   symbols, digits and camel-case humps; three or more letters with a vowel), it is a path,
//!   an identifier or a slug (`/Users/JohnSmith/Documents/Projects2024`,
//!   `get_AbstractSingletonProxy`), not a secret.
//!
//! Specific detectors win over this one in overlap resolution, so a JWT or provider key is
//! reported as such. A 40-character base64 piece preceded (within 80 bytes) by both `aws` and
//! `secret` in any case is reported as an [`PiiKind::ApiKey`] (an AWS secret access key)
//! without the class and entropy thresholds.
//!
//! Trade-offs: random tokens of 24 to about 30 characters sometimes fall under 4.0 bits per
//! character (the maximum for n distinct characters is log2(n)) and are missed; long base64
//! of harmless data (inline images) is flagged.

use super::{Cand, MIN_TOKEN_LEN, PiiKind};

/// Minimum Shannon entropy, bits per character.
const MIN_ENTROPY: f64 = 4.0;
/// A piece whose alphanumerics are at least this fraction in word-like segments reads as words.
const MAX_WORDINESS: f64 = 0.6;
/// How far back `aws` and `secret` are looked for.
const AWS_CONTEXT: usize = 80;

/// Evaluates the token `s..e` (a maximal run of token characters).
pub(super) fn token(b: &[u8], s: usize, e: usize, out: &mut Vec<Cand>) {
    let mut piece = s;
    let mut i = s;
    while i < e {
        if b.get(i) == Some(&b'=') {
            let mut j = i;
            while j < e && b.get(j) == Some(&b'=') {
                j += 1;
            }
            if j < e {
                piece_at(b, piece, j, out);
                piece = j;
            }
            i = j;
        } else {
            i += 1;
        }
    }
    piece_at(b, piece, e, out);
}

fn piece_at(b: &[u8], s: usize, e: usize, out: &mut Vec<Cand>) {
    let Some(t) = b.get(s..e) else {
        return;
    };
    if t.len() < MIN_TOKEN_LEN {
        return;
    }
    if t.len() == 40
        && aws_secret_context(b, s)
        && t.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/'))
        && entropy(t) >= 3.5
    {
        out.push(Cand::new(s, e, PiiKind::ApiKey));
        return;
    }
    if looks_secret(t) {
        out.push(Cand::new(s, e, PiiKind::HighEntropy));
    }
}

/// The class, hex, entropy and wordiness rules on one piece.
pub(super) fn looks_secret(t: &[u8]) -> bool {
    let (mut lower, mut upper, mut digit, mut symbol, mut nonhex) =
        (false, false, false, false, false);
    for &c in t {
        match c {
            b'a'..=b'z' => lower = true,
            b'A'..=b'Z' => upper = true,
            b'0'..=b'9' => digit = true,
            _ => symbol = true,
        }
        if c.is_ascii_alphabetic() && !c.is_ascii_hexdigit() {
            nonhex = true;
        }
    }
    let classes = [lower, upper, digit, symbol].iter().filter(|&&x| x).count();
    if classes < 3 {
        return false;
    }
    let hex_only = !nonhex
        && t.iter()
            .all(|&c| c.is_ascii_hexdigit() || c == b'-' || c == b'_');
    if hex_only {
        return false;
    }
    entropy(t) >= MIN_ENTROPY && wordiness(t) < MAX_WORDINESS
}

/// Shannon entropy of the byte distribution, in bits per byte.
pub(super) fn entropy(t: &[u8]) -> f64 {
    if t.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &c in t {
        if let Some(n) = counts.get_mut(usize::from(c)) {
            *n += 1;
        }
    }
    let len = t.len() as f64;
    counts
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| {
            let p = f64::from(n) / len;
            -p * p.log2()
        })
        .sum()
}

/// Fraction of the alphanumerics of `t` that lie in word-like segments: letter runs split at
/// camel-case humps (`aB`, and `ABc` before the `B`), at least three letters, containing a
/// vowel (`y` counts).
pub(super) fn wordiness(t: &[u8]) -> f64 {
    let alnum = t.iter().filter(|c| c.is_ascii_alphanumeric()).count();
    if alnum == 0 {
        return 0.0;
    }
    let mut wordy = 0;
    let mut seg_start: Option<usize> = None;
    let mut flush = |s: usize, e: usize| {
        let seg = t.get(s..e).unwrap_or_default();
        let vowels = seg
            .iter()
            .filter(|c| {
                matches!(
                    c.to_ascii_lowercase(),
                    b'a' | b'e' | b'i' | b'o' | b'u' | b'y'
                )
            })
            .count();
        if seg.len() >= 3 && vowels > 0 && vowels < seg.len() {
            wordy += seg.len();
        }
    };
    for i in 0..=t.len() {
        let c = t.get(i).copied();
        let is_letter = c.is_some_and(|c| c.is_ascii_alphabetic());
        match (seg_start, is_letter) {
            (None, true) => seg_start = Some(i),
            (Some(s), false) => {
                flush(s, i);
                seg_start = None;
            }
            (Some(s), true) => {
                let prev = t.get(i - 1).copied().unwrap_or(b' ');
                let next = t.get(i + 1).copied().unwrap_or(b' ');
                let cur = c.unwrap_or(b' ');
                let hump = (prev.is_ascii_lowercase() && cur.is_ascii_uppercase())
                    || (prev.is_ascii_uppercase()
                        && cur.is_ascii_uppercase()
                        && next.is_ascii_lowercase());
                if hump {
                    flush(s, i);
                    seg_start = Some(i);
                }
            }
            (None, false) => {}
        }
    }
    wordy as f64 / alnum as f64
}

/// Whether `aws` and `secret` (any case) both occur in the 80 bytes before `s`.
fn aws_secret_context(b: &[u8], s: usize) -> bool {
    let window = b.get(s.saturating_sub(AWS_CONTEXT)..s).unwrap_or_default();
    let has = |word: &[u8]| {
        window
            .windows(word.len())
            .any(|w| w.eq_ignore_ascii_case(word))
    };
    has(b"aws") && has(b"secret")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*, so the test needs no RNG dependency and is reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn token(&mut self, alphabet: &[u8], len: usize) -> Vec<u8> {
            (0..len)
                .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
                .collect()
        }
    }

    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

    fn rate(alphabet: &[u8], len: usize) -> f64 {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ len as u64);
        let n = 2000;
        let hits = (0..n)
            .filter(|_| looks_secret(&rng.token(alphabet, len)))
            .count();
        hits as f64 / n as f64
    }

    #[test]
    fn random_tokens_are_flagged() {
        for (alphabet, len, min) in [
            (B64, 32, 0.95),
            (ALNUM, 32, 0.93),
            (B64, 40, 0.98),
            (ALNUM, 64, 0.99),
            (B64, 24, 0.5),
        ] {
            let r = rate(alphabet, len);
            assert!(r >= min, "len {len}: {r}");
        }
    }

    #[test]
    fn words_are_not() {
        for t in [
            "/Users/JohnSmith/Documents/Projects2024",
            "get_AbstractSingletonProxyFactoryBean2",
            "models--meta-llama--Llama-3-8B-Instruct",
            "/api/v2/users/12345/profile/settings",
            "Mother-In-Law/Father-In-Law-2024-Edition",
            "state-of-the-art-machine-learning-systems",
            "550e8400-e29b-41d4-a716-446655440000",
            "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaA1",
            "HTTPServerRequestHandlerFactory_v2",
            "ThisIsAVeryLongCamelCaseIdentifierName_123",
            "src/components/UserProfileCard2/index",
            "X-Forwarded-For/Content-Security-Policy-2",
        ] {
            assert!(
                !looks_secret(t.as_bytes()),
                "{t}: entropy {} wordiness {}",
                entropy(t.as_bytes()),
                wordiness(t.as_bytes())
            );
        }
    }

    #[test]
    fn known_secrets_are() {
        for t in [
            "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA==",
            "dGhpcyBpcyBhIHNlY3JldCB0b2tlbiAxMjM0",
            "q8Xv2LmN4pR7sT1wYz9Ab3Cd5Ef6Gh0J",
        ] {
            assert!(
                looks_secret(t.as_bytes()),
                "{t}: entropy {} wordiness {}",
                entropy(t.as_bytes()),
                wordiness(t.as_bytes())
            );
        }
    }

    #[test]
    fn aws_secret_needs_context() {
        // AWS's documentation example spells words (`EXAMPLEKEY`), so alone it reads as words;
        // next to `aws` and `secret` it is an AWS secret access key.
        let key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let run = |text: &str| {
            let b = text.as_bytes();
            let s = text.find(key).unwrap_or(0);
            let mut out = Vec::new();
            token(b, s, s + key.len(), &mut out);
            out.iter().map(|c| c.kind).collect::<Vec<_>>()
        };
        assert_eq!(
            run(&format!("AWS Secret Access Key: {key}")),
            vec![PiiKind::ApiKey]
        );
        assert_eq!(
            run(&format!("aws_secret_access_key {key}")),
            vec![PiiKind::ApiKey]
        );
        assert!(run(&format!("here: {key}")).is_empty());
    }

    #[test]
    fn entropy_values() {
        assert_eq!(entropy(b""), 0.0);
        assert_eq!(entropy(b"aaaa"), 0.0);
        assert!((entropy(b"abcd") - 2.0).abs() < 1e-9);
        assert!((entropy(b"0123456789abcdef") - 4.0).abs() < 1e-9);
    }
}
