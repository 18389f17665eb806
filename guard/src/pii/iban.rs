//! International bank account numbers (ISO 13616), compact or printed in groups of four.
//!
//! A candidate starts at two upper-case letters and two digits not preceded by an ASCII letter
//! or digit; it continues over upper-case letters and digits, with single spaces allowed after
//! every fourth character. Every length the country allows (its registered length, or 15 to
//! 34 for countries not in the table) that ends before a non-alphanumeric is checked with
//! mod 97, longest first, so a following word (`BE68 5390 0754 7034 EUR`) is not swallowed.
//!
//! Trade-off: lower-case IBANs are not recognised (they are rare and lower-case
//! alphanumeric runs are common in identifiers).

use super::checks::{iban_country_len, iban_valid};
use super::{Cand, PiiKind, alnum_at, alnum_before};

const MAX_IBAN: usize = 34;
const MIN_IBAN: usize = 15;

/// An IBAN starting at the upper-case letter at `i`.
pub(super) fn at(b: &[u8], i: usize, out: &mut Vec<Cand>) {
    let (Some(&c1), Some(&d0), Some(&d1)) = (b.get(i + 1), b.get(i + 2), b.get(i + 3)) else {
        return;
    };
    if !(c1.is_ascii_uppercase() && d0.is_ascii_digit() && d1.is_ascii_digit())
        || alnum_before(b, i)
    {
        return;
    }
    let Some(&c0) = b.get(i) else {
        return;
    };
    let wanted = iban_country_len([c0, c1]);
    let mut chars = [0u8; MAX_IBAN];
    // ends[n] = byte end after n characters, when the candidate may end there.
    let mut ends = [0usize; MAX_IBAN + 1];
    let mut n = 0;
    let mut j = i;
    while n < MAX_IBAN {
        match b.get(j) {
            Some(&c) if c.is_ascii_uppercase() || c.is_ascii_digit() => {
                if let Some(slot) = chars.get_mut(n) {
                    *slot = c;
                }
                n += 1;
                j += 1;
                if !alnum_at(b, j)
                    && let Some(slot) = ends.get_mut(n)
                {
                    *slot = j;
                }
            }
            Some(b' ')
                if n % 4 == 0
                    && b.get(j + 1)
                        .is_some_and(|c| c.is_ascii_uppercase() || c.is_ascii_digit()) =>
            {
                j += 1;
            }
            _ => break,
        }
    }
    let lengths = match wanted {
        Some(w) => w..=w,
        None => MIN_IBAN..=MAX_IBAN,
    };
    for len in lengths.rev() {
        let end = ends.get(len).copied().unwrap_or(0);
        if end == 0 {
            continue;
        }
        if chars.get(..len).is_some_and(iban_valid) {
            out.push(Cand::new(i, end, PiiKind::Iban));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ibans(text: &str) -> Vec<&str> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        for (i, c) in b.iter().enumerate() {
            if c.is_ascii_uppercase() {
                at(b, i, &mut out);
            }
        }
        out.iter().map(|c| &text[c.start..c.end]).collect()
    }

    #[test]
    fn iban_shapes() {
        assert_eq!(
            ibans("DE89370400440532013000"),
            vec!["DE89370400440532013000"]
        );
        assert_eq!(
            ibans("IBAN: DE89 3704 0044 0532 0130 00."),
            vec!["DE89 3704 0044 0532 0130 00"]
        );
        assert_eq!(
            ibans("BE68 5390 0754 7034 EUR"),
            vec!["BE68 5390 0754 7034"]
        );
        assert_eq!(
            ibans("账户GB82WEST12345698765432转账"),
            vec!["GB82WEST12345698765432"]
        );
        assert!(ibans("DE89370400440532013001").is_empty());
        assert!(ibans("XDE89370400440532013000").is_empty());
        assert!(ibans("DE89370400440532013000X").is_empty());
        assert!(ibans("DE89 37040 04405 32013 000").is_empty());
    }
}
