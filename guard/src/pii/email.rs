//! E-mail addresses, anchored on `@`.
//!
//! Why not a regex: the local part is found by walking left from the `@` over ASCII local
//! characters (`[A-Za-z0-9._%+-]`), so `邮箱zhangsan@example.com` yields `zhangsan@...`
//! (the CJK character simply ends the walk) and the address is never preceded by a local
//! character. The domain is walked right over `[A-Za-z0-9.-]`, trimmed of a trailing dot or
//! dash (end of sentence), and must have at least two labels of 1 to 63 characters not
//! starting or ending with `-`, the last all letters and at least two long.
//!
//! Trade-offs: quoted local parts, the rarer RFC 5322 local characters (`!#$&'*/=?^`{|}~`)
//! and internationalised (non-ASCII) addresses are not recognised; `a@b.co` in code such as a
//! decorator call will be.

use super::{Cand, PiiKind};

const MAX_LOCAL: usize = 64;
const MAX_DOMAIN: usize = 253;

fn is_local(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-')
}

/// An e-mail address around the `@` at `at`.
pub(super) fn at(b: &[u8], at: usize, out: &mut Vec<Cand>) {
    let mut s = at;
    while s > 0 && at - s <= MAX_LOCAL && b.get(s - 1).is_some_and(|&c| is_local(c)) {
        s -= 1;
    }
    if at - s > MAX_LOCAL {
        return;
    }
    while s < at && b.get(s) == Some(&b'.') {
        s += 1;
    }
    let Some(local) = b.get(s..at) else {
        return;
    };
    if local.is_empty() || local.ends_with(b".") || local.windows(2).any(|w| w == b"..") {
        return;
    }
    let mut e = at + 1;
    while e - at <= MAX_DOMAIN + 1 && b.get(e).is_some_and(|&c| is_domain(c)) {
        e += 1;
    }
    if e - at > MAX_DOMAIN + 1 {
        return;
    }
    while e > at + 1 && matches!(b.get(e - 1), Some(b'.' | b'-')) {
        e -= 1;
    }
    let Some(domain) = b.get(at + 1..e) else {
        return;
    };
    if domain_valid(domain) {
        out.push(Cand::new(s, e, PiiKind::Email));
    }
}

fn domain_valid(domain: &[u8]) -> bool {
    let mut labels = 0;
    let mut last: &[u8] = &[];
    for label in domain.split(|&c| c == b'.') {
        if label.is_empty()
            || label.len() > 63
            || label.first() == Some(&b'-')
            || label.last() == Some(&b'-')
        {
            return false;
        }
        labels += 1;
        last = label;
    }
    labels >= 2 && last.len() >= 2 && last.iter().all(u8::is_ascii_alphabetic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emails(text: &str) -> Vec<&str> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        for (i, &c) in b.iter().enumerate() {
            if c == b'@' {
                at(b, i, &mut out);
            }
        }
        out.iter().map(|c| &text[c.start..c.end]).collect()
    }

    #[test]
    fn email_rules() {
        assert_eq!(
            emails("邮箱zhangsan@example.com谢谢"),
            vec!["zhangsan@example.com"]
        );
        assert_eq!(
            emails("Mail john.doe+x@mail.example.co.uk."),
            vec!["john.doe+x@mail.example.co.uk"]
        );
        assert_eq!(emails("(a_b@c-d.io)"), vec!["a_b@c-d.io"]);
        assert_eq!(emails("...x@y.com"), vec!["x@y.com"]);
        assert!(emails("user@localhost").is_empty());
        assert!(emails("a@b.c").is_empty());
        assert!(emails("a@b.c1").is_empty());
        assert!(emails("@example.com").is_empty());
        assert!(emails("a..b@example.com").is_empty());
        assert!(emails("a@-b.com").is_empty());
        assert!(emails("@@").is_empty());
        let long = format!("{}@example.com", "a".repeat(65));
        assert!(emails(&long).is_empty());
    }
}
