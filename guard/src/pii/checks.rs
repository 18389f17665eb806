//! Checksums and plausibility checks that turn "a run of digits" into "a card number", "an
//! identity number" or "an IBAN".
//!
//! Why they matter: without them every long number in a log line, an order id or a timestamp
//! would be redacted. Each check is cheap (a few arithmetic operations per digit) and only
//! runs on candidates whose shape already fits, so the detectors can afford to be lenient
//! about shape and strict about content.

use std::time::{SystemTime, UNIX_EPOCH};

/// Luhn (mod 10) check over decimal digit values (`0..=9`, not ASCII).
pub(super) fn luhn_valid(digits: &[u8]) -> bool {
    if digits.is_empty() {
        return false;
    }
    let mut sum = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// The number formed by the first `n` digit values (`0` if there are fewer).
fn prefix(digits: &[u8], n: usize) -> u32 {
    match digits.get(..n) {
        Some(p) => p.iter().fold(0, |acc, &d| acc * 10 + u32::from(d)),
        None => 0,
    }
}

/// Whether the issuer identification number (the leading digits) and the length fit a card
/// scheme that is in wide use: Visa, Mastercard, American Express, Discover, UnionPay, JCB,
/// Diners Club. Other schemes (Maestro, Mir, RuPay, ...) are deliberately left out: each
/// extra prefix lets more random Luhn-valid numbers through.
pub(super) fn card_iin_ok(digits: &[u8]) -> bool {
    let len = digits.len();
    let (p1, p2, p3, p4) = (
        prefix(digits, 1),
        prefix(digits, 2),
        prefix(digits, 3),
        prefix(digits, 4),
    );
    let visa = p1 == 4 && matches!(len, 13 | 16 | 19);
    let mastercard = ((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && len == 16;
    let amex = matches!(p2, 34 | 37) && len == 15;
    let discover =
        (p4 == 6011 || p2 == 65 || (644..=649).contains(&p3)) && (16..=19).contains(&len);
    let unionpay = p2 == 62 && (16..=19).contains(&len);
    let jcb = (3528..=3589).contains(&p4) && (16..=19).contains(&len);
    let diners = (matches!(p2, 36 | 38) || (300..=305).contains(&p3)) && (14..=19).contains(&len);
    visa || mastercard || amex || discover || unionpay || jcb || diners
}

/// A card number: 13 to 19 digit values with a plausible IIN and a valid Luhn check digit.
pub(super) fn card_valid(digits: &[u8]) -> bool {
    (13..=19).contains(&digits.len()) && card_iin_ok(digits) && luhn_valid(digits)
}

/// ISO 7064 MOD 11-2 check character of a GB 11643-1999 identity number, from its first 17
/// ASCII digits. `None` if `first17` is not 17 ASCII digits.
pub(super) fn cn_id_check_char(first17: &[u8]) -> Option<u8> {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: [u8; 11] = *b"10X98765432";
    if first17.len() != 17 || !first17.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let sum: u32 = first17
        .iter()
        .zip(WEIGHTS)
        .map(|(&c, w)| u32::from(c - b'0') * w)
        .sum();
    CHECK.get((sum % 11) as usize).copied()
}

/// A Chinese resident identity number (18 ASCII bytes): region code not starting with 0,
/// a real birth date between 1900-01-01 and the end of the current year, and the MOD 11-2
/// check character (`X` accepted in either case).
pub(super) fn cn_id_valid(id: &[u8]) -> bool {
    let (Some(first17), Some(&last)) = (id.get(..17), id.get(17)) else {
        return false;
    };
    if id.len() != 18 || first17.first().is_none_or(|&c| !(b'1'..=b'9').contains(&c)) {
        return false;
    }
    let Some(expected) = cn_id_check_char(first17) else {
        return false;
    };
    if last.to_ascii_uppercase() != expected {
        return false;
    }
    let num = |r: std::ops::Range<usize>| {
        first17.get(r).map(|s| {
            s.iter()
                .fold(0u32, |acc, &c| acc * 10 + u32::from(c - b'0'))
        })
    };
    match (num(6..10), num(10..12), num(12..14)) {
        (Some(y), Some(m), Some(d)) => (1900..=current_year()).contains(&y) && date_valid(y, m, d),
        _ => false,
    }
}

/// Gregorian leap year.
pub(super) fn is_leap(year: u32) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

/// Whether `year-month-day` is a real calendar date.
pub(super) fn date_valid(year: u32, month: u32, day: u32) -> bool {
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

/// Upper bound used when the system clock is unreadable (before 1970).
const FALLBACK_YEAR: u32 = 2100;

/// The current UTC year, read from the system clock (a vDSO call, only made once a candidate
/// identity number has already passed its checksum). Falls back to [`FALLBACK_YEAR`] when the
/// clock reads before the Unix epoch.
pub(super) fn current_year() -> u32 {
    let Ok(since) = SystemTime::now().duration_since(UNIX_EPOCH) else {
        return FALLBACK_YEAR;
    };
    let days = since.as_secs() / 86_400;
    year_from_days(days)
}

/// Civil (proleptic Gregorian) year of the day `days` after 1970-01-01 (H. Hinnant's
/// `civil_from_days`, unsigned because the clock is never before the epoch here).
fn year_from_days(days: u64) -> u32 {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let year = yoe + era * 400 + u64::from(mp >= 10);
    u32::try_from(year).unwrap_or(u32::MAX)
}

/// IBAN length per country, from the SWIFT IBAN registry. Countries not listed are accepted
/// with any length from 15 to 34.
pub(super) fn iban_country_len(cc: [u8; 2]) -> Option<usize> {
    Some(match &cc {
        b"NO" => 15,
        b"BE" | b"BI" => 16,
        b"DK" | b"FI" | b"FO" | b"GL" | b"NL" | b"SD" | b"FK" => 18,
        b"MK" | b"SI" => 19,
        b"AT" | b"BA" | b"EE" | b"KZ" | b"LT" | b"LU" | b"XK" | b"MN" => 20,
        b"CH" | b"HR" | b"LI" | b"LV" => 21,
        b"BG" | b"BH" | b"CR" | b"DE" | b"GB" | b"GE" | b"IE" | b"ME" | b"RS" | b"VA" => 22,
        b"AE" | b"GI" | b"IL" | b"IQ" | b"TL" | b"SO" | b"OM" => 23,
        b"AD" | b"CZ" | b"ES" | b"MD" | b"PK" | b"RO" | b"SA" | b"SE" | b"SK" | b"TN" | b"VG" => 24,
        b"PT" | b"ST" | b"LY" => 25,
        b"IS" | b"TR" => 26,
        b"FR" | b"GR" | b"IT" | b"MC" | b"MR" | b"SM" | b"DJ" => 27,
        b"AL" | b"AZ" | b"BY" | b"CY" | b"DO" | b"GT" | b"HU" | b"LB" | b"PL" | b"SV" | b"HN"
        | b"NI" => 28,
        b"BR" | b"EG" | b"PS" | b"QA" | b"UA" => 29,
        b"JO" | b"KW" | b"MU" | b"YE" => 30,
        b"MT" | b"SC" => 31,
        b"LC" => 32,
        b"RU" => 33,
        _ => return None,
    })
}

/// ISO 13616 check: move the first four characters to the end, map letters to 10..=35 and
/// require the resulting number mod 97 to be 1. `iban` is upper-case ASCII alphanumerics
/// without spaces.
pub(super) fn iban_mod97_valid(iban: &[u8]) -> bool {
    if iban.len() < 5 {
        return false;
    }
    let (head, tail) = iban.split_at(4);
    let mut rem = 0u32;
    for &c in tail.iter().chain(head) {
        rem = match c {
            b'0'..=b'9' => (rem * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => (rem * 100 + u32::from(c - b'A') + 10) % 97,
            _ => return false,
        };
    }
    rem == 1
}

/// An IBAN (compact, upper case): two letters, two check digits in `02..=98`, an
/// alphanumeric BBAN, the country's registered length where known (15 to 34 otherwise), and
/// a valid mod-97 checksum.
pub(super) fn iban_valid(iban: &[u8]) -> bool {
    let [c0, c1, k0, k1, ..] = *iban else {
        return false;
    };
    if !(c0.is_ascii_uppercase() && c1.is_ascii_uppercase()) {
        return false;
    }
    if !(k0.is_ascii_digit() && k1.is_ascii_digit()) {
        return false;
    }
    let check = (k0 - b'0') * 10 + (k1 - b'0');
    if !(2..=98).contains(&check) {
        return false;
    }
    let len_ok = match iban_country_len([c0, c1]) {
        Some(n) => iban.len() == n,
        None => (15..=34).contains(&iban.len()),
    };
    len_ok && iban_mod97_valid(iban)
}

/// A US social security number `AAA-GG-SSSS` given as its nine ASCII digits: area not 000,
/// 666 or 900-999; group not 00; serial not 0000.
pub(super) fn ssn_valid(digits: &[u8]) -> bool {
    if digits.len() != 9 || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let n = |r: std::ops::Range<usize>| {
        digits.get(r).map_or(0, |s| {
            s.iter().fold(0u32, |a, &c| a * 10 + u32::from(c - b'0'))
        })
    };
    let (area, group, serial) = (n(0..3), n(3..5), n(5..9));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// A mainland China mobile number: 11 ASCII digits, `1` then `3`-`9`.
pub(super) fn cn_mobile(digits: &[u8]) -> bool {
    digits.len() == 11
        && digits.iter().all(u8::is_ascii_digit)
        && digits.first() == Some(&b'1')
        && digits.get(1).is_some_and(|c| (b'3'..=b'9').contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(s: &str) -> Vec<u8> {
        s.bytes().map(|b| b - b'0').collect()
    }

    #[test]
    fn luhn_known_numbers() {
        for ok in [
            "4111111111111111",
            "5500000000000004",
            "340000000000009",
            "6011000000000004",
            "4222222222222",
            "79927398713",
            "0",
        ] {
            assert!(luhn_valid(&vals(ok)), "{ok}");
        }
        for bad in ["4111111111111112", "79927398710", "1234567812345678"] {
            assert!(!luhn_valid(&vals(bad)), "{bad}");
        }
        assert!(!luhn_valid(&[]));
    }

    #[test]
    fn card_schemes() {
        for ok in [
            "4111111111111111",    // Visa 16
            "4222222222222",       // Visa 13
            "5555555555554444",    // Mastercard 5x
            "2223003122003222",    // Mastercard 2-series
            "378282246310005",     // Amex
            "6011111111111117",    // Discover
            "6200000000000005",    // UnionPay
            "3530111333300000",    // JCB
            "30569309025904",      // Diners 14
            "36227206271667",      // Diners 36
            "4111111111111111110", // Visa 19 (Luhn-valid)
        ] {
            assert!(card_valid(&vals(ok)), "{ok}");
        }
        for bad in [
            "4111111111111112",   // Luhn
            "1111111111111117",   // IIN 1
            "378282246310005000", // Amex wrong length
            "9111111111111111",   // IIN 9
            "20231101123456",     // order number
        ] {
            assert!(!card_valid(&vals(bad)), "{bad}");
        }
    }

    #[test]
    fn cn_id_check_digits() {
        // Worked by hand: weights 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2 over 11010519491231002
        // give 167; 167 mod 11 = 2, which maps to 'X'.
        assert_eq!(cn_id_check_char(b"11010519491231002"), Some(b'X'));
        assert!(cn_id_valid(b"11010519491231002X"));
        assert!(cn_id_valid(b"11010519491231002x"));
        // 44030019900101001: 4*7+4*9+0+3*5+0+0+1*2+9*1+9*6+0+0+1*9+0+1*5+0+0+1*2 = 160; 160
        // mod 11 = 6, which maps to '6'.
        assert_eq!(cn_id_check_char(b"44030019900101001"), Some(b'6'));
        assert!(cn_id_valid(b"440300199001010016"));
        assert!(!cn_id_valid(b"440300199001010014"), "wrong check digit");
        assert!(!cn_id_valid(b"11010519491231002Y"));
        assert!(
            !cn_id_valid(b"01010519491231002X"),
            "region starting with 0"
        );
        assert_eq!(cn_id_check_char(b"1101051949123100"), None);
        assert_eq!(cn_id_check_char(b"1101051949123100A"), None);
    }

    /// Builds a valid identity number around a birth date, to test the date rule alone.
    fn id_with_date(date: &str) -> Vec<u8> {
        let mut id = format!("110105{date}001").into_bytes();
        let check = cn_id_check_char(&id).unwrap_or(b'?');
        id.push(check);
        id
    }

    #[test]
    fn cn_id_dates() {
        assert!(
            cn_id_valid(&id_with_date("20000229")),
            "2000 is a leap year"
        );
        assert!(!cn_id_valid(&id_with_date("19000229")), "1900 is not");
        assert!(cn_id_valid(&id_with_date("19960229")));
        assert!(!cn_id_valid(&id_with_date("19970229")));
        assert!(!cn_id_valid(&id_with_date("19900230")), "Feb 30");
        assert!(!cn_id_valid(&id_with_date("19901301")), "month 13");
        assert!(!cn_id_valid(&id_with_date("19900100")), "day 0");
        assert!(!cn_id_valid(&id_with_date("18991231")), "before 1900");
        assert!(!cn_id_valid(&id_with_date("29991231")), "future");
        assert!(cn_id_valid(&id_with_date("19900131")));
        assert!(!cn_id_valid(&id_with_date("19900431")));
    }

    #[test]
    fn leap_years() {
        assert!(is_leap(2000));
        assert!(is_leap(2024));
        assert!(is_leap(1996));
        assert!(!is_leap(1900));
        assert!(!is_leap(2100));
        assert!(!is_leap(2023));
        assert!(date_valid(2024, 2, 29));
        assert!(!date_valid(2023, 2, 29));
        assert!(!date_valid(2023, 0, 1));
        assert!(!date_valid(2023, 12, 32));
    }

    #[test]
    fn clock_year() {
        assert_eq!(year_from_days(0), 1970);
        assert_eq!(year_from_days(364), 1970);
        assert_eq!(year_from_days(365), 1971);
        // 2024-02-29 is day 19782; 2024-12-31 is 20088; 2025-01-01 is 20089.
        assert_eq!(year_from_days(19_782), 2024);
        assert_eq!(year_from_days(20_088), 2024);
        assert_eq!(year_from_days(20_089), 2025);
        let now = current_year();
        assert!((2024..FALLBACK_YEAR).contains(&now), "{now}");
    }

    #[test]
    fn iban_examples() {
        for ok in [
            "DE89370400440532013000",
            "GB82WEST12345698765432",
            "FR1420041010050500013M02606",
            "ES9121000418450200051332",
            "IT60X0542811101000000123456",
            "NL91ABNA0417164300",
            "CH9300762011623852957",
            "BE68539007547034",
            "AT611904300234573201",
            "PL61109010140000071219812874",
            "NO9386011117947",
        ] {
            assert!(iban_valid(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "DE89370400440532013001", // checksum
            "DE8937040044053201300",  // length for DE
            "GB82WEST1234569876543X", // checksum
            "DE00370400440532013000", // check digits 00
            "de89370400440532013000", // lower case
            "DE89",
        ] {
            assert!(!iban_valid(bad.as_bytes()), "{bad}");
        }
        assert!(iban_mod97_valid(b"GB82WEST12345698765432"));
        assert!(!iban_mod97_valid(b"GB82WEST12345698765433"));
    }

    #[test]
    fn ssn_rules() {
        assert!(ssn_valid(b"123456789"));
        assert!(!ssn_valid(b"000123456"));
        assert!(!ssn_valid(b"666123456"));
        assert!(!ssn_valid(b"900123456"));
        assert!(!ssn_valid(b"123003456"));
        assert!(!ssn_valid(b"123450000"));
        assert!(!ssn_valid(b"12345678"));
    }

    #[test]
    fn mobile_rules() {
        assert!(cn_mobile(b"13812345678"));
        assert!(cn_mobile(b"19912345678"));
        assert!(!cn_mobile(b"12812345678"));
        assert!(!cn_mobile(b"1381234567"));
    }
}
