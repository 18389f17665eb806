//! Properties of PII detection and redaction over arbitrary and adversarially assembled text:
//! no panics, well-formed spans, redaction reaches a fixpoint and is idempotent, and a valid
//! sample between CJK characters is found exactly where it is.

use proptest::prelude::*;
use sluice_guard::pii::{PiiKind, PiiSpan, detect, redact, redact_spans};

const SAMPLES: &[(PiiKind, &str)] = &[
    (PiiKind::Email, "zhangsan@example.com"),
    (PiiKind::Phone, "+14155552671"),
    (PiiKind::Phone, "+44 20 7946 0958"),
    (PiiKind::Phone, "+86 138 1234 5678"),
    (PiiKind::Phone, "13812345678"),
    (PiiKind::CreditCard, "4111111111111111"),
    (PiiKind::CreditCard, "4111 1111 1111 1111"),
    (PiiKind::CreditCard, "378282246310005"),
    (PiiKind::CnResidentId, "11010519491231002X"),
    (PiiKind::CnResidentId, "440300199001010016"),
    (PiiKind::Iban, "DE89370400440532013000"),
    (PiiKind::Iban, "GB82 WEST 1234 5698 7654 32"),
    (PiiKind::Ipv4, "192.168.1.1"),
    (PiiKind::Ipv6, "2001:db8::1"),
    (PiiKind::Ipv6, "::ffff:192.168.1.1"),
    (PiiKind::UsSsn, "123-45-6789"),
    (
        PiiKind::Jwt,
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ),
    (PiiKind::ApiKey, "AKIAIOSFODNN7EXAMPLE"),
    (PiiKind::ApiKey, "ghp_1234567890abcdefghijABCDEFGHIJ123456"),
    (
        PiiKind::ApiKey,
        "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789ABCDEF",
    ),
    (
        PiiKind::ApiKey,
        "xoxb-123456789012-1234567890123-abcdefghijklmnopqrstuvwx",
    ),
    (PiiKind::ApiKey, "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
    (PiiKind::ApiKey, "sk_live_abcdefghijklmnop12345678"),
    (
        PiiKind::ApiKey,
        "sk-0123456789abcdef_abababababababababababababababababababababababababababababababab",
    ),
    (PiiKind::HighEntropy, "q8Xv2LmN4pR7sT1wYz9Ab3Cd5Ef6Gh0J"),
];

/// Fragments that are not PII on their own but can glue onto samples: CJK, words, digits,
/// separators, key names, placeholder look-alikes.
const FRAGMENTS: &[&str] = &[
    "你好",
    "身份证号",
    "电话",
    "谢谢",
    "，",
    "：",
    "。",
    " ",
    "  ",
    "\n",
    "-",
    ".",
    ":",
    "::",
    "+",
    "=",
    "@",
    "_",
    "/",
    "a",
    "Z",
    "x",
    "X",
    "0",
    "1",
    "42",
    "2024",
    "86",
    "1.2",
    "abc",
    "hello world",
    "password=",
    "token: ",
    "secret=",
    "密码：",
    "aws secret ",
    "[",
    "]",
    "[EMAIL]",
    "[API_KEY]",
    "(",
    ")",
    "\"",
    "'",
    "é",
    "🙂",
    "ID",
    "DE",
    "sk-",
    "AKIA",
    "eyJ",
    "-----BEGIN PRIVATE KEY-----",
];

fn check_spans(text: &str, spans: &[PiiSpan]) -> Result<(), TestCaseError> {
    let len = text.chars().count();
    let mut prev_end = 0;
    for s in spans {
        prop_assert!(s.start < s.end, "empty span {s:?} in {text:?}");
        prop_assert!(s.end <= len, "span {s:?} past {len} in {text:?}");
        prop_assert!(
            s.start >= prev_end,
            "unsorted or overlapping {spans:?} in {text:?}"
        );
        prev_end = s.end;
    }
    Ok(())
}

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(FRAGMENTS).prop_map(str::to_owned),
        2 => prop::sample::select(SAMPLES).prop_map(|(_, s)| s.to_owned()),
        1 => "[0-9a-zA-Z+/=_.:@ -]{0,12}",
        1 => "\\PC{0,6}",
    ]
}

fn assembled() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..12).prop_map(|v| v.concat())
}

fn properties(text: &str) -> Result<(), TestCaseError> {
    let spans = detect(text);
    check_spans(text, &spans)?;
    let once = redact(text);
    let left = detect(&once);
    prop_assert!(left.is_empty(), "{text:?} -> {once:?} still has {left:?}");
    prop_assert_eq!(redact(&once), once.clone(), "not idempotent on {:?}", text);
    if spans.is_empty() {
        prop_assert_eq!(&once, text);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_strings(text in any::<String>()) {
        properties(&text)?;
    }

    #[test]
    fn ascii_soup(text in "[0-9a-fA-F:.+@ -]{0,60}") {
        properties(&text)?;
    }

    #[test]
    fn assembled_text(text in assembled()) {
        properties(&text)?;
    }

    #[test]
    fn sample_between_cjk(
        (kind, sample) in prop::sample::select(SAMPLES),
        left in "[\\p{Han}，。：]{0,5}",
        right in "[\\p{Han}，。]{0,5}",
    ) {
        let text = format!("{left}{sample}{right}");
        let start = left.chars().count();
        let expected = PiiSpan { kind, start, end: start + sample.chars().count() };
        prop_assert_eq!(detect(&text), vec![expected]);
        let redacted = redact(&text);
        prop_assert_eq!(redacted, format!("{left}{}{right}", kind.placeholder()));
    }

    #[test]
    fn redact_spans_never_panics(
        text in "\\PC{0,20}",
        raw in prop::collection::vec((0usize..30, 0usize..30), 0..6),
    ) {
        let spans: Vec<PiiSpan> =
            raw.into_iter().map(|(start, end)| PiiSpan { kind: PiiKind::Email, start, end }).collect();
        let _ = redact_spans(&text, &spans);
    }
}

/// Adversarial inputs built to make a careless scanner quadratic (repeated prefixes, dense
/// anchors, long runs). The test only has to finish; timings are printed for the curious.
#[test]
fn pathological_inputs_finish() {
    let n = 200_000;
    let inputs: Vec<(&str, String)> = vec![
        ("digits", "1".repeat(n)),
        ("spaced digits", "1 ".repeat(n / 2)),
        ("dashed digits", "12-".repeat(n / 3)),
        ("dots", "1.".repeat(n / 2)),
        ("ats", "a@".repeat(n / 2)),
        ("domain", format!("a@{}", "b.".repeat(n / 2))),
        ("colons", "a:".repeat(n / 2)),
        ("hex colons", "ab:".repeat(n / 3)),
        ("equals", "password=".repeat(n / 9)),
        ("plus", "+1".repeat(n / 2)),
        ("sk", "sk-".repeat(n / 3)),
        ("xsk", format!("x{}", "sk-a".repeat(n / 4))),
        ("jwt-ish", "eyJhbGciOi.".repeat(n / 11)),
        ("pem headers", "-----BEGIN PRIVATE KEY-----".repeat(n / 27)),
        (
            "pem body",
            format!("-----BEGIN PRIVATE KEY-----{}", "A".repeat(n)),
        ),
        ("iban-ish", "AB12 ".repeat(n / 5)),
        ("token", "aB3+".repeat(n / 4)),
        ("cjk", "身份证号".repeat(n / 4)),
        (
            "mixed",
            "邮箱a@b.cn电话13812345678卡4111111111111111 ".repeat(n / 40),
        ),
    ];
    for (name, text) in inputs {
        let start = std::time::Instant::now();
        let spans = detect(&text);
        let redacted = redact(&text);
        assert!(detect(&redacted).is_empty(), "{name}");
        println!(
            "{name}: {} bytes, {} spans, {:?}",
            text.len(),
            spans.len(),
            start.elapsed()
        );
    }
}
