//! IP addresses.
//!
//! IPv4: exactly four dot-separated decimal octets (`0..=255`, no leading zeros), not part of
//! a longer dotted number (`1.2.3.4.5`), not glued to a letter (`v1.2.3.4`) and not right
//! after the word `version`/`ver`, which is how version strings usually appear.
//!
//! Addresses that identify no host or person are left alone: IPv4 `0.0.0.0`, `127.0.0.0/8`
//! and `255.0.0.0/8` (broadcast and netmasks such as `255.255.255.0`), IPv6 `::` and `::1`
//! (also IPv4-mapped). They fill technical answers (`bind to 0.0.0.0`, `open http://127.0.0.1:8080`) and redacting them only hurts.
//! Private and documentation ranges are still reported: they describe someone's network.
//!
//! IPv6: a maximal run of hex digits, colons and dots around a colon, trimmed of sentence
//! punctuation, is handed to [`std::net::Ipv6Addr`]'s parser, which knows every legal form
//! (full, `::`-compressed, embedded IPv4). At least two colons and one hex digit are required
//! and the run must not touch other letters, so `12:30:45`, `std::io` and MAC addresses are
//! not addresses.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::{Cand, PiiKind, alnum_at, before};

/// An IPv4 address starting at `start` (a digit not preceded by a digit).
pub(super) fn ipv4_at(b: &[u8], start: usize, out: &mut Vec<Cand>) {
    if before(b, start).is_some_and(|c| c.is_ascii_alphanumeric() || c == b'.') {
        return;
    }
    let mut i = start;
    let mut octets = [0u8; 4];
    for (octet, slot) in octets.iter_mut().enumerate() {
        if octet > 0 {
            if b.get(i) != Some(&b'.') {
                return;
            }
            i += 1;
        }
        let s = i;
        let mut value = 0u32;
        while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            if i - s == 3 {
                return;
            }
            value = value * 10 + u32::from(c - b'0');
            i += 1;
        }
        let len = i - s;
        if len == 0 || (len > 1 && b.get(s) == Some(&b'0')) {
            return;
        }
        let Ok(v) = u8::try_from(value) else {
            return;
        };
        *slot = v;
    }
    let addr = Ipv4Addr::from(octets);
    // 255.x.x.x: the broadcast address and netmasks (`255.255.255.0`), never a host.
    if addr.is_loopback() || addr.is_unspecified() || octets[0] == 255 {
        return;
    }
    if alnum_at(b, i) || (b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
        return;
    }
    if after_version_word(b, start) {
        return;
    }
    out.push(Cand::new(start, i, PiiKind::Ipv4));
}

/// Whether `start` follows `version`, `ver` (any case) and at most two spaces or a colon.
fn after_version_word(b: &[u8], start: usize) -> bool {
    let mut i = start;
    while i > 0 && start - i < 3 && matches!(b.get(i - 1), Some(b' ' | b':')) {
        i -= 1;
    }
    if i == start {
        return false;
    }
    let word_end = i;
    while i > 0 && word_end - i < 8 && b.get(i - 1).is_some_and(u8::is_ascii_alphabetic) {
        i -= 1;
    }
    let word = b.get(i..word_end).unwrap_or_default();
    word.eq_ignore_ascii_case(b"version") || word.eq_ignore_ascii_case(b"ver")
}

/// Longest run looked at on each side of a colon (a full IPv6 address with embedded IPv4 is 45
/// characters).
const MAX_IPV6_SIDE: usize = 48;

fn is_ipv6_byte(c: u8) -> bool {
    c.is_ascii_hexdigit() || c == b':' || c == b'.'
}

/// An IPv6 address in the run of hex digits, colons and dots around the colon at `colon`.
/// Returns the end of the run, so the caller skips the other colons in it.
pub(super) fn ipv6_around(b: &[u8], colon: usize, out: &mut Vec<Cand>) -> usize {
    let mut s = colon;
    while s > 0 && colon - s < MAX_IPV6_SIDE && b.get(s - 1).is_some_and(|&c| is_ipv6_byte(c)) {
        s -= 1;
    }
    let mut e = colon;
    while e - colon < MAX_IPV6_SIDE && b.get(e).is_some_and(|&c| is_ipv6_byte(c)) {
        e += 1;
    }
    let run_end = e;
    // The run must be delimited by something other than a letter, digit or underscore
    // (including a run cut short by the length limit).
    let touches = |c: Option<u8>| {
        c.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || is_ipv6_byte(c))
    };
    if touches(before(b, s)) || touches(b.get(e).copied()) {
        return run_end;
    }
    // Trim sentence punctuation: dots at either end, a single colon at either end.
    while s < e && b.get(s) == Some(&b'.') {
        s += 1;
    }
    while e > s && b.get(e - 1) == Some(&b'.') {
        e -= 1;
    }
    if b.get(s) == Some(&b':') && b.get(s + 1) != Some(&b':') {
        s += 1;
    }
    if e > s && b.get(e - 1) == Some(&b':') && (e < s + 2 || b.get(e - 2) != Some(&b':')) {
        e -= 1;
    }
    let Some(cand) = b.get(s..e) else {
        return run_end;
    };
    let colons = cand.iter().filter(|&&c| c == b':').count();
    if colons < 2 || !cand.iter().any(u8::is_ascii_hexdigit) {
        return run_end;
    }
    let parsed = std::str::from_utf8(cand)
        .ok()
        .and_then(|t| Ipv6Addr::from_str(t).ok());
    let Some(addr) = parsed else {
        return run_end;
    };
    let mapped_local = addr
        .to_ipv4_mapped()
        .is_some_and(|v4| v4.is_loopback() || v4.is_unspecified());
    if !(addr.is_loopback() || addr.is_unspecified() || mapped_local) {
        out.push(Cand::new(s, e, PiiKind::Ipv6));
    }
    run_end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> Vec<&str> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        for i in 0..b.len() {
            if b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()) {
                ipv4_at(b, i, &mut out);
            }
        }
        out.iter().map(|c| &text[c.start..c.end]).collect()
    }

    fn v6(text: &str) -> Vec<&str> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        let mut until = 0;
        for i in 0..b.len() {
            if b[i] == b':' && i >= until {
                until = ipv6_around(b, i, &mut out);
            }
        }
        out.iter().map(|c| &text[c.start..c.end]).collect()
    }

    #[test]
    fn ipv4_rules() {
        assert_eq!(v4("host 192.168.1.1."), vec!["192.168.1.1"]);
        let v4_ok = v4("10.0.0.0 and 254.255.255.255");
        assert_eq!(v4_ok, vec!["10.0.0.0", "254.255.255.255"]);
        assert!(v4("0.0.0.0 127.0.0.1 127.1.2.3 255.255.255.255 255.255.255.0").is_empty());
        assert!(v4("256.1.1.1").is_empty());
        assert!(v4("1.2.3.4.5").is_empty());
        assert!(v4("v1.2.3.4").is_empty());
        assert!(v4("version 1.2.3.4").is_empty());
        assert!(v4("01.2.3.4").is_empty());
        assert!(v4("1.2.3").is_empty());
        assert!(v4("1.2.3.4a").is_empty());
        assert_eq!(v4("连接10.0.0.1成功"), vec!["10.0.0.1"]);
    }

    #[test]
    fn ipv6_rules() {
        assert_eq!(v6("addr 2001:db8::1."), vec!["2001:db8::1"]);
        assert_eq!(v6("[2001:db8::1]:8080"), vec!["2001:db8::1"]);
        assert_eq!(v6("::ffff:192.168.1.1"), vec!["::ffff:192.168.1.1"]);
        assert_eq!(
            v6("2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
            vec!["2001:0db8:85a3:0000:0000:8a2e:0370:7334"]
        );
        assert_eq!(v6("地址fe80::1连接"), vec!["fe80::1"]);
        assert!(v6("12:30:45").is_empty());
        assert!(v6("[::1]:80 and :: and ::ffff:127.0.0.1").is_empty());
        assert!(v6("std::io::Result").is_empty());
        assert!(v6("00:1A:2B:3C:4D:5E").is_empty());
        assert!(v6("a::b::c").is_empty());
        assert!(v6("Note: see").is_empty());
    }
}
