//! Hashed character n-grams: the lexical half of the classifier, beside the sentence encoder.
//!
//! The encoder (English MiniLM) reads Chinese and other scripts poorly; character n-grams see
//! phrasing in any script ("忽略之前", "ignora las", "system prompt"). A text becomes the set of
//! its 2-, 3- and 4-character n-grams after lowercasing and collapsing whitespace (with one
//! space at each end), each hashed with 32-bit FNV-1a over its UTF-8 bytes into one of
//! [`BUCKETS`] buckets; the feature vector is that set's indicator, L2-normalised. The trainer
//! (`guard/train/train.py`) computes exactly the same features.

/// Hash buckets (the lexical weight vector's length).
pub const BUCKETS: usize = 1 << 16;
/// The n-gram lengths used, in characters.
const ORDERS: [usize; 3] = [2, 3, 4];

/// 32-bit FNV-1a.
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The normalised characters of `text`: lowercase, whitespace runs as one space, one space at
/// each end.
fn normalise(text: &str) -> Vec<char> {
    let mut out = vec![' '];
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_whitespace() {
            if out.last() != Some(&' ') {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
    }
    if out.last() != Some(&' ') {
        out.push(' ');
    }
    out
}

/// The sorted, distinct buckets of `text`'s n-grams.
pub fn buckets(text: &str) -> Vec<u32> {
    let chars = normalise(text);
    let mut out = Vec::new();
    let mut buf = [0u8; 4];
    for n in ORDERS {
        for gram in chars.windows(n) {
            let h = fnv1a(
                gram.iter()
                    .flat_map(|c| c.encode_utf8(&mut buf).as_bytes().to_vec()),
            );
            out.push(h % BUCKETS as u32);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The lexical logit: the weights of `text`'s buckets, summed and divided by the square root
/// of their number (the dot product with the L2-normalised indicator vector).
pub fn logit(weights: &[f32], text: &str) -> f32 {
    let b = buckets(text);
    if b.is_empty() {
        return 0.0;
    }
    let sum: f32 = b.iter().map(|&i| weights[i as usize]).sum();
    sum / (b.len() as f32).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a("".bytes()), 0x811c_9dc5);
        assert_eq!(fnv1a("a".bytes()), 0xe40c_292c);
        assert_eq!(fnv1a("foobar".bytes()), 0xbf9c_f968);
    }

    #[test]
    fn text_is_lowercased_and_spaced_before_hashing() {
        assert_eq!(buckets("Ignore  previous"), buckets("ignore previous"));
        assert_eq!(buckets("忽略\n之前"), buckets("忽略 之前"));
        assert_ne!(buckets("忽略之前"), buckets("忽略 之前"));
        // " a " has the n-grams " a", "a " and " a ".
        assert_eq!(buckets("a").len(), 3);
        assert!(buckets("").len() <= 1);
    }
}
