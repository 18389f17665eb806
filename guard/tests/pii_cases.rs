//! Table-driven cases for PII detection: every kind found where it should be (also inside
//! Chinese text with no separators), and look-alikes that must not be flagged.

use sluice_guard::pii::{PiiKind, PiiSpan, detect, redact};

/// Character span of the first occurrence of `needle` in `text`.
fn char_span(text: &str, needle: &str) -> (usize, usize) {
    let byte = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in {text:?}"));
    let start = text[..byte].chars().count();
    (start, start + needle.chars().count())
}

fn span(kind: PiiKind, start: usize, end: usize) -> PiiSpan {
    PiiSpan { kind, start, end }
}

const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

#[test]
fn cjk_examples_verbatim() {
    let cases = [
        (
            "身份证号11010519491231002X",
            span(PiiKind::CnResidentId, 4, 22),
        ),
        ("邮箱zhangsan@example.com", span(PiiKind::Email, 2, 22)),
        ("电话13812345678", span(PiiKind::Phone, 2, 13)),
        (
            "我的卡号是4111111111111111谢谢",
            span(PiiKind::CreditCard, 5, 21),
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(detect(text), vec![expected], "{text}");
    }
    assert_eq!(
        redact("我的卡号是4111111111111111谢谢"),
        "我的卡号是[CREDIT_CARD]谢谢"
    );
    assert_eq!(
        redact("身份证号11010519491231002X"),
        "身份证号[CN_RESIDENT_ID]"
    );
}

/// One sample of every kind (and variants), as (kind, text of the PII itself).
fn samples() -> Vec<(PiiKind, String)> {
    let mut v: Vec<(PiiKind, String)> = [
        (PiiKind::Email, "zhangsan@example.com"),
        (PiiKind::Email, "john.doe+tag@mail.example.co.uk"),
        (PiiKind::Phone, "+14155552671"),
        (PiiKind::Phone, "+44 20 7946 0958"),
        (PiiKind::Phone, "+86 138 1234 5678"),
        (PiiKind::Phone, "+86-138-1234-5678"),
        (PiiKind::Phone, "+1 (415) 555-2671"),
        (PiiKind::Phone, "13812345678"),
        (PiiKind::Phone, "8613812345678"),
        (PiiKind::Phone, "138 1234 5678"),
        (PiiKind::CreditCard, "4111111111111111"),
        (PiiKind::CreditCard, "4111 1111 1111 1111"),
        (PiiKind::CreditCard, "5555-5555-5555-4444"),
        (PiiKind::CreditCard, "2223003122003222"),
        (PiiKind::CreditCard, "378282246310005"),
        (PiiKind::CreditCard, "3782 822463 10005"),
        (PiiKind::CreditCard, "6011111111111117"),
        (PiiKind::CreditCard, "6200000000000005"),
        (PiiKind::CreditCard, "3530111333300000"),
        (PiiKind::CreditCard, "30569309025904"),
        (PiiKind::CnResidentId, "11010519491231002X"),
        (PiiKind::CnResidentId, "11010519491231002x"),
        (PiiKind::CnResidentId, "440300199001010016"),
        (PiiKind::Iban, "DE89370400440532013000"),
        (PiiKind::Iban, "DE89 3704 0044 0532 0130 00"),
        (PiiKind::Iban, "GB82WEST12345698765432"),
        (PiiKind::Iban, "FR1420041010050500013M02606"),
        (PiiKind::Iban, "ES9121000418450200051332"),
        (PiiKind::Iban, "IT60X0542811101000000123456"),
        (PiiKind::Iban, "NL91ABNA0417164300"),
        (PiiKind::Iban, "CH9300762011623852957"),
        (PiiKind::Iban, "BE68539007547034"),
        (PiiKind::Iban, "AT611904300234573201"),
        (PiiKind::Iban, "PL61109010140000071219812874"),
        (PiiKind::Ipv4, "192.168.1.1"),
        (PiiKind::Ipv4, "8.8.8.8"),
        (PiiKind::Ipv6, "2001:db8::1"),
        (PiiKind::Ipv6, "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
        (PiiKind::Ipv6, "::ffff:192.168.1.1"),
        (PiiKind::Ipv6, "fe80::1ff:fe23:4567:890a"),
        (PiiKind::UsSsn, "123-45-6789"),
        (PiiKind::Jwt, JWT),
        (PiiKind::ApiKey, "AKIAIOSFODNN7EXAMPLE"),
        (PiiKind::ApiKey, "ghp_1234567890abcdefghijABCDEFGHIJ123456"),
        (PiiKind::ApiKey, "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTU"),
        (PiiKind::ApiKey, "sk-proj-abcdefghijklmnopqrstuvwxyzABCDEF012345"),
        (PiiKind::ApiKey, "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789ABCDEF"),
        (PiiKind::ApiKey, "sk-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKL"),
        (PiiKind::ApiKey, "xoxb-123456789012-1234567890123-abcdefghijklmnopqrstuvwx"),
        (PiiKind::ApiKey, "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
        (PiiKind::ApiKey, "sk_live_abcdefghijklmnop12345678"),
        (PiiKind::HighEntropy, "q8Xv2LmN4pR7sT1wYz9Ab3Cd5Ef6Gh0J"),
        (PiiKind::HighEntropy, "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA=="),
    ]
    .into_iter()
    .map(|(k, s)| (k, s.to_owned()))
    .collect();
    v.push((
        PiiKind::ApiKey,
        format!("sk-{}_{}", "0123456789abcdef", "ab".repeat(32)),
    ));
    v.push((
        PiiKind::ApiKey,
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo\n-----END RSA PRIVATE KEY-----"
            .to_owned(),
    ));
    v
}

#[test]
fn every_kind_alone_and_in_english() {
    for (kind, pii) in samples() {
        let n = pii.chars().count();
        assert_eq!(detect(&pii), vec![span(kind, 0, n)], "alone: {pii}");
        let text = format!("Please note: {pii} (thanks).");
        let (s, e) = char_span(&text, &pii);
        assert_eq!(detect(&text), vec![span(kind, s, e)], "in English: {text}");
    }
}

#[test]
fn every_kind_in_chinese_without_separators() {
    for (kind, pii) in samples() {
        let text = format!("请注意这是{pii}谢谢你");
        assert_eq!(
            detect(&text),
            vec![span(kind, 5, 5 + pii.chars().count())],
            "{text}"
        );
        let redacted = redact(&text);
        assert_eq!(redacted, format!("请注意这是{}谢谢你", kind.placeholder()));
    }
}

#[test]
fn several_in_one_text() {
    let text = "联系人：张三，邮箱zhangsan@example.com，电话+86 138 1234 5678，卡号4111 1111 1111 1111，\
                服务器10.0.0.1，token=eyJhbGciOiJIUzI1NiJ9.e30.abc";
    let kinds: Vec<PiiKind> = detect(text).iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![
            PiiKind::Email,
            PiiKind::Phone,
            PiiKind::CreditCard,
            PiiKind::Ipv4,
            PiiKind::Jwt
        ]
    );
    assert_eq!(
        redact(text),
        "联系人：张三，邮箱[EMAIL]，电话[PHONE]，卡号[CREDIT_CARD]，服务器[IPV4]，token=[JWT]"
    );
}

#[test]
fn assignments_and_contexts() {
    let cases = [
        ("password=hunter2", "hunter2"),
        ("export DB_PASSWORD='correct horse'", "correct horse"),
        (r#"{"client_secret": "s3cr3t-value"}"#, "s3cr3t-value"),
        ("auth: token: abc123", "abc123"),
        ("https://x.example/cb?access_token=abc123&state=1", "abc123"),
        ("密码：abc123谢谢", "abc123"),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        (
            "AWS secret access key is wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
    ];
    for (text, value) in cases {
        let (s, e) = char_span(text, value);
        assert_eq!(detect(text), vec![span(PiiKind::ApiKey, s, e)], "{text}");
    }
}

#[test]
fn overlaps_prefer_the_specific_match() {
    // The phone-shaped digits inside the identity number are not reported separately.
    assert_eq!(detect("11010519491231002X").len(), 1);
    // A key that is also a high-entropy token is reported as a key.
    let gh = "ghp_1234567890abcdefghijABCDEFGHIJ123456";
    assert_eq!(detect(gh), vec![span(PiiKind::ApiKey, 0, gh.len())]);
    // A card number given as a password is redacted as a card.
    assert_eq!(
        detect("password=4111111111111111"),
        vec![span(PiiKind::CreditCard, 9, 25)]
    );
    // Digits in an e-mail's local part belong to the e-mail.
    assert_eq!(
        detect("13812345678@qq.com"),
        vec![span(PiiKind::Email, 0, 18)]
    );
    // An embedded IPv4 belongs to the IPv6 address.
    assert_eq!(detect("::ffff:10.0.0.1"), vec![span(PiiKind::Ipv6, 0, 15)]);
}

#[test]
fn negatives() {
    let cases = [
        "4111111111111112",               // Luhn fails
        "我的卡号是4111111111111112谢谢", // Luhn fails, in Chinese
        "1234567812345678",               // no valid IIN
        "11010519491231002Y",             // bad check character
        "110105194912310021",             // wrong check digit
        "身份证号110105199002300012",     // Feb 30 (any check digit)
        "身份证号110105199002300016",
        "身份证号110105199002300019",
        "身份证号11010518991231002X", // before 1900
        "DE89370400440532013001",     // IBAN checksum
        "GB82WEST12345698765433",
        "256.1.1.1",
        "1.2.3.4.5",
        "v1.2.3.4",
        "version 1.2.3.4",
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "123-00-4567",
        "123-45-0000",
        "550e8400-e29b-41d4-a716-446655440000",
        "UUID 123e4567-e89b-12d3-a456-426614174000 ok",
        "The quick brown fox jumps over the lazy dog. It is 3.14159265358979 degrees.",
        "我们明天下午三点在会议室开会，请大家准时参加。",
        "订单号20231101123456",
        "订单号202311011234567890",
        "timestamp 1700000000 and 1700000000000",
        "commit e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709",
        "See https://github.com/rust-lang/regex/blob/master/src/lib.rs for details.",
        "/Users/JohnSmith/Documents/Projects2024/README",
        "ThisIsAVeryLongCamelCaseIdentifierName_123",
        "Meeting at 12:30:45 on 2024-01-15, room 101.",
        "Use std::collections::HashMap and serde::de::Error",
        "MAC 00:1A:2B:3C:4D:5E",
        "max_tokens: 256, temperature=0.7, eos_token: </s>",
        "The secret: kindness. A token: the unit of text.",
        "call 415-555-2671 tomorrow",
        "Price: 1,234,567.89 USD; qty 12",
        "ISBN 978-3-16-148410-0",
        "a@b",
        "[EMAIL] [PHONE] [CREDIT_CARD] [CN_RESIDENT_ID] [IBAN] [IPV4] [IPV6] [US_SSN] [JWT] [API_KEY] [SECRET]",
        "task-abcdefghijklmnopqrstuvwxyz0123",
        "sk-learn-is-a-great-library-for-ml",
        "abc4111111111111111",
        "4111111111111111xyz",
        "13812345678901",
    ];
    for text in cases {
        assert_eq!(detect(text), vec![], "{text}");
    }
}

/// Rough timing of `detect` on 4 KB of ordinary English (and, for comparison, Chinese and a
/// log excerpt full of numbers and PII). Not an assertion: run with
/// `cargo test -p sluice-guard --release --test pii_cases -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_4kb() {
    let corpora = [
        (
            "English",
            "The committee met on Tuesday to review the quarterly results. Revenue grew by \
             twelve percent compared with last year, driven mostly by new customers in the \
             northern region, while costs stayed flat. Several members asked whether the \
             growth would continue into the next quarter; the finance team answered that it \
             depends on hiring, on the price of raw materials, and on the weather. ",
        ),
        (
            "Chinese",
            "委员会周二开会审议季度业绩。收入比去年增长百分之十二，主要来自北方地区的新客户，\
             成本保持不变。几位成员询问增长能否持续到下个季度，财务团队回答说这取决于招聘、\
             原材料价格和天气。",
        ),
        (
            "log with PII",
            "2024-01-15T12:30:45Z INFO req=42 user=zhangsan@example.com ip=192.168.1.10 \
             took 35ms status=200 card=4111111111111111 phone=+86 138 1234 5678 v1.2.3 ",
        ),
    ];
    for (name, para) in corpora {
        let mut text = String::new();
        while text.len() < 4096 {
            text.push_str(para);
        }
        let cut = (0..=4096)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        let iterations = 20_000u32;
        let start = std::time::Instant::now();
        let mut found = 0;
        for _ in 0..iterations {
            found += std::hint::black_box(detect(std::hint::black_box(&text))).len();
        }
        let per = start.elapsed() / iterations;
        let spans = found / iterations as usize;
        println!(
            "detect on {} bytes of {name}: {per:?} per call ({spans} spans)",
            text.len()
        );
    }
}
