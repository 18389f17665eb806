//! Digit-based detectors: credit cards, Chinese resident identity numbers, US SSNs, Chinese
//! mobile numbers, and E.164 phone numbers.
//!
//! Why runs of groups: these numbers are written compact (`4111111111111111`) or in groups
//! separated by single spaces or dashes (`4111 1111 1111 1111`, `123-45-6789`,
//! `138 1234 5678`). A greedy regex would swallow a following number (`... 1111 2025`) and
//! then fail; instead the run of digit groups is collected once and the candidate shapes are
//! tried on whole groups. A dash binds groups together (a candidate never starts or ends at a
//! dash, so `123-45-6789-1234` is not an SSN and UUID fragments stay whole) while a space
//! may separate two numbers written next to each other.
//!
//! Neighbours: the run must not touch an ASCII letter or digit, nor be the fraction of a
//! decimal number (`3.`) or continue into one (`.5`). CJK characters and punctuation are fine.

use super::checks::{card_valid, cn_id_valid, cn_mobile, ssn_valid};
use super::{Cand, PiiKind, alnum_before, before};

/// At most this many groups are collected per run; a longer run is continued as a new run.
const MAX_GROUPS: usize = 32;

/// Scratch space for one run, reused across runs to avoid allocating per number.
#[derive(Default)]
pub(super) struct Groups {
    /// Byte ranges of the digit groups.
    spans: Vec<(usize, usize)>,
    /// `seps[k]` separates group `k` from group `k + 1`: `b' '` or `b'-'`.
    seps: Vec<u8>,
}

impl Groups {
    fn len_of(&self, k: usize) -> usize {
        self.spans.get(k).map_or(0, |&(s, e)| e - s)
    }
}

/// Whether a digit-based match may start at `start`.
fn left_ok(b: &[u8], start: usize) -> bool {
    match before(b, start) {
        None => true,
        Some(c) if c.is_ascii_alphanumeric() => false,
        Some(b'.') => !before(b, start - 1).is_some_and(|c| c.is_ascii_digit()),
        Some(_) => true,
    }
}

/// Whether a digit-based match may end at `end` (exclusive).
pub(super) fn right_ok(b: &[u8], end: usize) -> bool {
    match b.get(end) {
        None => true,
        Some(c) if c.is_ascii_alphanumeric() => false,
        Some(b'.') => !b.get(end + 1).is_some_and(u8::is_ascii_digit),
        Some(_) => true,
    }
}

/// Collects the run of digit groups starting at `start` (a digit not preceded by a digit),
/// emits every valid candidate in it, and returns the end of the run.
pub(super) fn scan_run(b: &[u8], start: usize, g: &mut Groups, out: &mut Vec<Cand>) -> usize {
    g.spans.clear();
    g.seps.clear();
    let mut i = start;
    loop {
        let group_start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        g.spans.push((group_start, i));
        match (b.get(i), b.get(i + 1)) {
            (Some(&sep @ (b' ' | b'-')), Some(d))
                if d.is_ascii_digit() && g.spans.len() < MAX_GROUPS =>
            {
                g.seps.push(sep);
                i += 1;
            }
            _ => break,
        }
    }
    let run = Run {
        b,
        g,
        left: left_ok(b, start),
        right: right_ok(b, i),
    };
    for first in 0..g.spans.len() {
        let start_ok = match first.checked_sub(1) {
            None => run.left,
            Some(k) => g.seps.get(k) == Some(&b' '),
        };
        if start_ok {
            run.single(first, out);
            run.grouped(first, out);
        }
    }
    i
}

struct Run<'a> {
    b: &'a [u8],
    g: &'a Groups,
    /// Whether the run may start where it does.
    left: bool,
    /// Whether the run may end where it does.
    right: bool,
}

impl Run<'_> {
    fn last(&self) -> usize {
        self.g.spans.len().saturating_sub(1)
    }

    /// Whether a candidate may end after group `k`: at the end of the run if the run may end
    /// there, or before a space.
    fn end_ok(&self, k: usize) -> bool {
        if k >= self.last() {
            self.right
        } else {
            self.g.seps.get(k) == Some(&b' ')
        }
    }

    fn bytes(&self, k: usize) -> &[u8] {
        self.g
            .spans
            .get(k)
            .and_then(|&(s, e)| self.b.get(s..e))
            .unwrap_or_default()
    }

    /// Digit values of groups `first..=last`, if there are at most 19.
    fn digits(&self, first: usize, last: usize, buf: &mut [u8; 19]) -> Option<usize> {
        let mut n = 0;
        for k in first..=last {
            for &c in self.bytes(k) {
                *buf.get_mut(n)? = c - b'0';
                n += 1;
            }
        }
        Some(n)
    }

    /// Candidates made of the single group `k`.
    fn single(&self, k: usize, out: &mut Vec<Cand>) {
        let Some(&(s, e)) = self.g.spans.get(k) else {
            return;
        };
        let d = self.bytes(k);
        if self.end_ok(k) {
            if cn_mobile(d) || (d.len() == 13 && d.starts_with(b"86") && cn_mobile(&d[2..])) {
                out.push(Cand::new(s, e, PiiKind::Phone));
            }
            if (13..=19).contains(&d.len()) {
                let mut vals = [0u8; 19];
                for (v, c) in vals.iter_mut().zip(d) {
                    *v = c - b'0';
                }
                if vals.get(..d.len()).is_some_and(card_valid) {
                    out.push(Cand::new(s, e, PiiKind::CreditCard));
                }
            }
            if d.len() == 18 && cn_id_valid(d) {
                out.push(Cand::new(s, e, PiiKind::CnResidentId));
            }
        }
        // An identity number whose check character is `X`: the run stopped at the `X`.
        if k == self.last()
            && d.len() == 17
            && matches!(self.b.get(e), Some(b'X' | b'x'))
            && right_ok(self.b, e + 1)
            && self.b.get(s..e + 1).is_some_and(cn_id_valid)
        {
            out.push(Cand::new(s, e + 1, PiiKind::CnResidentId));
        }
    }

    /// Candidates of two or more groups starting at `first`, all joined by the same
    /// separator.
    fn grouped(&self, first: usize, out: &mut Vec<Cand>) {
        let Some(&sep) = self.g.seps.get(first) else {
            return;
        };
        let mut lens = [0usize; 5];
        let mut count = 0;
        let mut k = first;
        while let Some(slot) = lens.get_mut(count) {
            *slot = self.g.len_of(k);
            count += 1;
            if self.g.seps.get(k) != Some(&sep) {
                break;
            }
            k += 1;
        }
        let mut buf = [0u8; 19];
        for m in 2..=count {
            let last = first + m - 1;
            if !self.end_ok(last) {
                continue;
            }
            let (Some(&(s, _)), Some(&(_, e))) = (self.g.spans.get(first), self.g.spans.get(last))
            else {
                continue;
            };
            let shape = &lens[..m];
            let Some(n) = self.digits(first, last, &mut buf) else {
                continue;
            };
            let digits = &buf[..n];
            let mut ascii_buf = [0u8; 19];
            for (a, d) in ascii_buf.iter_mut().zip(digits) {
                *a = d + b'0';
            }
            let ascii = &ascii_buf[..n];
            let phone = match shape {
                [3, 4, 4] => cn_mobile(ascii),
                [2, 3, 4, 4] | [2, 11] => ascii.starts_with(b"86") && cn_mobile(&ascii[2..]),
                _ => false,
            };
            if phone {
                out.push(Cand::new(s, e, PiiKind::Phone));
            }
            if shape == [3, 2, 4] && sep == b'-' && ssn_valid(ascii) {
                out.push(Cand::new(s, e, PiiKind::UsSsn));
            }
            let (body, tail) = shape.split_at(m - 1);
            let card_shape = (body.iter().all(|&l| l == 4)
                && tail.iter().all(|l| (1..=4).contains(l)))
                || shape == [4, 6, 5]
                || shape == [4, 6, 4];
            if card_shape && card_valid(digits) {
                out.push(Cand::new(s, e, PiiKind::CreditCard));
            }
        }
    }
}

/// Longest E.164 number: `+`, country code and subscriber number, at most 15 digits.
const E164_MAX_DIGITS: usize = 15;

/// An E.164 number starting at the `+` at `plus`: digits in groups separated by at most two
/// of ` -.()` (`+1 (415) 555-2671`, `+44 20 7946 0958`, `+86 138 1234 5678`).
///
/// The number of digits must fit the country where it is well known (`+1`: 11, `+86`: 13 for
/// mobiles and 12 or 13 otherwise, `+44`: 11 or 12, `+7`: 11) and be 8 to 15 elsewhere; the
/// longest prefix of groups that fits wins, so a number followed by another one after a
/// space is not swallowed whole.
pub(super) fn e164_at(b: &[u8], plus: usize, out: &mut Vec<Cand>) {
    if alnum_before(b, plus) || before(b, plus) == Some(b'+') {
        return;
    }
    if !b.get(plus + 1).is_some_and(|c| (b'1'..=b'9').contains(c)) {
        return;
    }
    let mut digits = [0u8; E164_MAX_DIGITS];
    let mut n = 0;
    let mut best: Option<usize> = None;
    let mut i = plus + 1;
    loop {
        let mut overflow = false;
        while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            match digits.get_mut(n) {
                Some(slot) => *slot = c - b'0',
                None => {
                    overflow = true;
                    break;
                }
            }
            n += 1;
            i += 1;
        }
        if overflow {
            break;
        }
        if right_ok(b, i) && e164_length_ok(&digits[..n]) {
            best = Some(i);
        }
        let mut j = i;
        while j - i < 2 && matches!(b.get(j), Some(b' ' | b'-' | b'.' | b'(' | b')')) {
            j += 1;
        }
        if j > i && b.get(j).is_some_and(u8::is_ascii_digit) {
            i = j;
        } else {
            break;
        }
    }
    if let Some(end) = best {
        out.push(Cand::new(plus, end, PiiKind::Phone));
    }
}

/// Digit count rules by country code (see [`e164_at`]).
fn e164_length_ok(d: &[u8]) -> bool {
    let n = d.len();
    match d {
        [1, area, ..] => n == 11 && *area >= 2,
        [8, 6, 1, next, ..] if *next >= 3 => n == 13,
        [8, 6, ..] => n == 12 || n == 13,
        [4, 4, ..] => n == 11 || n == 12,
        [7, ..] => n == 11,
        _ => (8..=E164_MAX_DIGITS).contains(&n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<(PiiKind, String)> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        let mut g = Groups::default();
        let mut until = 0;
        for i in 0..b.len() {
            if b[i] == b'+' {
                e164_at(b, i, &mut out);
            }
            if b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()) && i >= until {
                until = scan_run(b, i, &mut g, &mut out);
            }
        }
        out.iter()
            .map(|c| (c.kind, text[c.start..c.end].to_owned()))
            .collect()
    }

    #[test]
    fn groups_and_boundaries() {
        assert_eq!(
            kinds("4111 1111 1111 1111 2025"),
            vec![(PiiKind::CreditCard, "4111 1111 1111 1111".to_owned())]
        );
        assert_eq!(
            kinds("4111-1111-1111-1111"),
            vec![(PiiKind::CreditCard, "4111-1111-1111-1111".to_owned())]
        );
        assert!(kinds("4111-1111-1111-1111-2025").is_empty());
        assert!(kinds("a4111111111111111").is_empty());
        assert!(kinds("4111111111111111b").is_empty());
        assert!(kinds("0.4111111111111111").is_empty());
        assert!(kinds("4111111111111111.5").is_empty());
        assert_eq!(
            kinds("123-45-6789"),
            vec![(PiiKind::UsSsn, "123-45-6789".to_owned())]
        );
        assert!(kinds("123-45-6789-1234").is_empty());
        assert_eq!(
            kinds("138 1234 5678"),
            vec![(PiiKind::Phone, "138 1234 5678".to_owned())]
        );
        assert_eq!(kinds("86-138-1234-5678")[0].1, "86-138-1234-5678");
    }

    #[test]
    fn e164_lengths() {
        let phone = |t: &str| {
            kinds(t)
                .into_iter()
                .filter(|(k, s)| *k == PiiKind::Phone && s.starts_with('+'))
                .map(|(_, s)| s)
                .collect::<Vec<_>>()
        };
        assert_eq!(phone("+14155552671"), vec!["+14155552671"]);
        assert_eq!(phone("+1 415 555 2671 2 times"), vec!["+1 415 555 2671"]);
        assert_eq!(phone("+1 (415) 555-2671"), vec!["+1 (415) 555-2671"]);
        assert_eq!(phone("+44 20 7946 0958"), vec!["+44 20 7946 0958"]);
        assert_eq!(phone("+86 138 1234 5678"), vec!["+86 138 1234 5678"]);
        assert!(phone("+141555526712").is_empty());
        assert!(phone("+1234").is_empty());
        assert!(phone("a+14155552671").is_empty());
    }
}
