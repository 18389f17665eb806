//! Property tests: the guard's text stages never panic on arbitrary input, `clean` is
//! idempotent, and decoding stays within its byte budget.

use std::sync::LazyLock;

use proptest::prelude::*;
use sluice_guard::decode::{DecodeLimits, decoded_layers};
use sluice_guard::injection::Rules;
use sluice_guard::skeleton::skeleton;
use sluice_guard::unicode::clean;

static RULES: LazyLock<Rules> = LazyLock::new(Rules::builtin);

/// Strings mixing ASCII, the characters `clean` treats specially and anything else.
fn tricky_string() -> impl Strategy<Value = String> {
    let special = prop::sample::select(vec![
        '\u{200D}',
        '\u{200B}',
        '\u{FE0F}',
        '\u{FE0E}',
        '\u{E0067}',
        '\u{E007F}',
        '\u{1F3F4}',
        '\u{1F468}',
        '\u{2764}',
        '\u{20E3}',
        '\u{202E}',
        '\u{2066}',
        '\u{3164}',
        '\u{AD}',
        '\u{1F3FD}',
        '\n',
        '\r',
        '\t',
        '1',
        '#',
        '%',
        'm',
        'I',
        '|',
    ]);
    let any_char = prop_oneof![
        4 => any::<char>(),
        4 => special,
        2 => prop::char::range('a', 'z'),
    ];
    prop::collection::vec(any_char, 0..64).prop_map(|cs| cs.into_iter().collect())
}

/// Text shaped like encodings: base64, hex and percent-escape alphabets with spaces.
fn encoded_looking() -> impl Strategy<Value = String> {
    "[A-Za-z0-9+/=%_ \\-]{0,300}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn clean_is_idempotent(s in tricky_string()) {
        let once = clean(&s);
        let twice = clean(&once.text);
        prop_assert_eq!(&twice.text, &once.text);
        prop_assert_eq!(twice.removed, 0);
        prop_assert_eq!(once.text.chars().count() + once.removed, s.chars().count());
    }

    #[test]
    fn clean_is_idempotent_on_any_string(s in any::<String>()) {
        let once = clean(&s).text;
        prop_assert_eq!(clean(&once).text, once);
    }

    #[test]
    fn skeleton_never_panics(s in any::<String>(), t in tricky_string()) {
        let _ = skeleton(&s);
        let _ = skeleton(&t);
    }

    #[test]
    fn decoded_layers_respect_max_bytes(s in encoded_looking(), max_bytes in 0usize..512, depth in 0usize..4) {
        let limits = DecodeLimits { max_depth: depth, max_bytes };
        let layers = decoded_layers(&s, limits);
        prop_assert!(layers.iter().map(String::len).sum::<usize>() <= max_bytes);
        if depth == 0 {
            prop_assert!(layers.is_empty());
        }
    }

    #[test]
    fn decoded_layers_never_panic(s in any::<String>()) {
        let layers = decoded_layers(&s, DecodeLimits::default());
        prop_assert!(layers.iter().map(String::len).sum::<usize>() <= DecodeLimits::default().max_bytes);
    }

    #[test]
    fn scan_never_panics(s in any::<String>(), t in tricky_string(), e in encoded_looking()) {
        for text in [&s, &t, &e] {
            let report = RULES.scan(&clean(text).text);
            prop_assert!(report.scores.values().all(|v| (0.0..=1.0).contains(v)));
        }
    }
}
