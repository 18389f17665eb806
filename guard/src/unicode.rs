//! Unicode hygiene.
//!
//! Invisible and direction-changing characters let a client hide text from people while the
//! model still reads it (tag-character "ASCII smuggling", zero-width joiners splitting a word
//! so filters miss it, bidi overrides reordering what a reviewer sees, Hangul and Braille
//! fillers standing in for spaces). [`clean`] removes them before the text reaches the model
//! or the detectors, in one pass over the characters, without regexes.
//!
//! What is kept, so that ordinary text survives:
//! - `\n`, `\t` and `\r`;
//! - U+200D ZERO WIDTH JOINER between two emoji (an emoji ZWJ sequence such as 👨‍👩‍👧);
//! - VS15/VS16 (U+FE0E/U+FE0F) directly after an emoji-capable character (❤️), or after a
//!   keycap base (`0-9 # *`) when U+20E3 follows;
//! - tag characters forming an emoji subdivision flag: right after U+1F3F4 WAVING BLACK FLAG,
//!   1 to 6 tags from `a-z`/`0-9` closed by U+E007F CANCEL TAG (🏴󠁧󠁢󠁥󠁮󠁧󠁿). That short, fixed alphabet
//!   is all a flag needs and leaves no room to smuggle a sentence.
//!
//! Every keep/remove decision depends only on the characters already written to the output
//! and on characters that are themselves kept, which is what makes [`clean`] idempotent.
//!
//! Trade-off: ZWNJ (U+200C) is removed as well, although Persian and some Indic scripts use
//! it for shaping; for a guard the attack surface weighs more than a rendering nuance.

/// Text with invisible and dangerous characters removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cleaned {
    pub text: String,
    /// How many characters were removed.
    pub removed: usize,
}

const VS15: char = '\u{FE0E}';
const VS16: char = '\u{FE0F}';
const BLACK_FLAG: char = '\u{1F3F4}';
const CANCEL_TAG: char = '\u{E007F}';
const KEYCAP: char = '\u{20E3}';
/// Longest tag spec accepted in a subdivision flag (`gbsct` is 5; CLDR allows up to 6).
const MAX_FLAG_TAGS: usize = 6;

/// How [`clean`] treats a character before looking at its neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Keep,
    Remove,
    Zwj,
    VariationSelector,
    Tag,
}

/// Removes control characters (keeps `\n`, `\t`), format characters (Cf), tag characters
/// U+E0000–U+E007F, bidi overrides and isolates, variation selectors outside emoji, fillers
/// (U+3164, U+115F, U+2800 …); keeps ZWJ inside valid emoji sequences. Idempotent.
pub fn clean(text: &str) -> Cleaned {
    let mut out = String::with_capacity(text.len());
    let mut removed = 0;
    // Start of the run of kept characters not yet copied to `out`.
    let mut run_start = 0;
    // Last character kept (written or pending in the current run).
    let mut last_kept: Option<char> = None;
    // Tags still to keep after a validated flag sequence.
    let mut flag_tags_left = 0usize;
    // Whether the previous input character was a tag: only the first tag of a run can start
    // a flag, so a smuggled run cannot keep its last few tags.
    let mut prev_was_tag = false;

    for (i, c) in text.char_indices() {
        let keep = match classify(c) {
            Class::Keep => true,
            Class::Remove => false,
            Class::Zwj => keeps_zwj(last_kept, &text[i + c.len_utf8()..]),
            Class::VariationSelector => keeps_variation_selector(c, last_kept, &text[i..]),
            Class::Tag => {
                if !prev_was_tag && last_kept == Some(BLACK_FLAG) {
                    flag_tags_left = flag_tag_len(&text[i..]);
                }
                if flag_tags_left > 0 {
                    flag_tags_left -= 1;
                    true
                } else {
                    false
                }
            }
        };
        prev_was_tag = matches!(u32::from(c), 0xE0000..=0xE007F);
        if keep {
            last_kept = Some(c);
        } else {
            out.push_str(&text[run_start..i]);
            run_start = i + c.len_utf8();
            removed += 1;
        }
    }
    out.push_str(&text[run_start..]);
    Cleaned { text: out, removed }
}

fn classify(c: char) -> Class {
    let cp = u32::from(c);
    if cp < 0x80 {
        return if cp >= 0x20 && cp != 0x7F || matches!(c, '\n' | '\t' | '\r') {
            Class::Keep
        } else {
            Class::Remove
        };
    }
    match cp {
        0x200D => Class::Zwj,
        0xFE00..=0xFE0F | 0xE0100..=0xE01EF => Class::VariationSelector,
        0xE0000..=0xE007F => Class::Tag,
        _ if is_removed(cp) => Class::Remove,
        _ => Class::Keep,
    }
}

/// C1 controls, every Cf character (Unicode 16), fillers and other invisible characters.
fn is_removed(cp: u32) -> bool {
    matches!(
        cp,
        0x80..=0x9F                 // C1 controls
        | 0xAD                      // soft hyphen
        | 0x034F                    // combining grapheme joiner (invisible)
        | 0x0600..=0x0605           // Arabic prepended concatenation marks (Cf)
        | 0x061C                    // Arabic letter mark (bidi)
        | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2
        | 0x115F | 0x1160           // Hangul choseong/jungseong fillers
        | 0x17B4 | 0x17B5           // Khmer inherent vowels (invisible)
        | 0x180E                    // Mongolian vowel separator
        | 0x200B..=0x200F           // ZWSP, ZWNJ, (ZWJ handled before), LRM, RLM
        | 0x202A..=0x202E           // bidi embeddings and overrides
        | 0x2060..=0x206F           // word joiner, invisible operators, isolates, deprecated
        | 0x2800                    // Braille pattern blank
        | 0x3164                    // Hangul filler
        | 0xFEFF                    // BOM / ZWNBSP
        | 0xFFA0                    // halfwidth Hangul filler
        | 0xFFF9..=0xFFFB           // interlinear annotation
        | 0x110BD | 0x110CD | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
    )
}

/// A ZWJ stays when it joins two emoji: the last kept character ends an emoji (pictograph,
/// skin-tone modifier, VS16 or a flag's cancel tag) and the next character is a pictograph.
fn keeps_zwj(last_kept: Option<char>, after: &str) -> bool {
    let joins_from = last_kept.is_some_and(|p| {
        is_extended_pictographic(p) || is_emoji_modifier(p) || p == VS16 || p == CANCEL_TAG
    });
    joins_from && after.chars().next().is_some_and(is_extended_pictographic)
}

/// VS15/VS16 stay after an emoji-capable character, or after a keycap base followed by U+20E3.
fn keeps_variation_selector(c: char, last_kept: Option<char>, from_here: &str) -> bool {
    if c != VS15 && c != VS16 {
        return false;
    }
    match last_kept {
        Some(p) if is_extended_pictographic(p) => true,
        Some('0'..='9' | '#' | '*') => from_here.chars().nth(1) == Some(KEYCAP),
        _ => false,
    }
}

/// Number of tag characters (spec plus cancel tag) forming a valid subdivision flag at the
/// start of `s`, or 0.
fn flag_tag_len(s: &str) -> usize {
    let mut spec = 0;
    for c in s.chars().take(MAX_FLAG_TAGS + 1) {
        match c {
            '\u{E0030}'..='\u{E0039}' | '\u{E0061}'..='\u{E007A}' => spec += 1,
            CANCEL_TAG if spec > 0 => return spec + 1,
            _ => return 0,
        }
    }
    0
}

fn is_emoji_modifier(c: char) -> bool {
    matches!(u32::from(c), 0x1F3FB..=0x1F3FF)
}

/// Extended_Pictographic (emoji-data.txt, Unicode 15/16), as ranges sorted by start.
const EXTENDED_PICTOGRAPHIC: &[(u32, u32)] = &[
    (0x00A9, 0x00A9),
    (0x00AE, 0x00AE),
    (0x203C, 0x203C),
    (0x2049, 0x2049),
    (0x2122, 0x2122),
    (0x2139, 0x2139),
    (0x2194, 0x2199),
    (0x21A9, 0x21AA),
    (0x231A, 0x231B),
    (0x2328, 0x2328),
    (0x2388, 0x2388),
    (0x23CF, 0x23CF),
    (0x23E9, 0x23F3),
    (0x23F8, 0x23FA),
    (0x24C2, 0x24C2),
    (0x25AA, 0x25AB),
    (0x25B6, 0x25B6),
    (0x25C0, 0x25C0),
    (0x25FB, 0x25FE),
    (0x2600, 0x2605),
    (0x2607, 0x2612),
    (0x2614, 0x2685),
    (0x2690, 0x2705),
    (0x2708, 0x2712),
    (0x2714, 0x2714),
    (0x2716, 0x2716),
    (0x271D, 0x271D),
    (0x2721, 0x2721),
    (0x2728, 0x2728),
    (0x2733, 0x2734),
    (0x2744, 0x2744),
    (0x2747, 0x2747),
    (0x274C, 0x274C),
    (0x274E, 0x274E),
    (0x2753, 0x2755),
    (0x2757, 0x2757),
    (0x2763, 0x2767),
    (0x2795, 0x2797),
    (0x27A1, 0x27A1),
    (0x27B0, 0x27B0),
    (0x27BF, 0x27BF),
    (0x2934, 0x2935),
    (0x2B05, 0x2B07),
    (0x2B1B, 0x2B1C),
    (0x2B50, 0x2B50),
    (0x2B55, 0x2B55),
    (0x3030, 0x3030),
    (0x303D, 0x303D),
    (0x3297, 0x3297),
    (0x3299, 0x3299),
    (0x1F000, 0x1F0FF),
    (0x1F10D, 0x1F10F),
    (0x1F12F, 0x1F12F),
    (0x1F16C, 0x1F171),
    (0x1F17E, 0x1F17F),
    (0x1F18E, 0x1F18E),
    (0x1F191, 0x1F19A),
    (0x1F1AD, 0x1F1E5),
    (0x1F201, 0x1F20F),
    (0x1F21A, 0x1F21A),
    (0x1F22F, 0x1F22F),
    (0x1F232, 0x1F23A),
    (0x1F23C, 0x1F23F),
    (0x1F249, 0x1F3FA),
    (0x1F400, 0x1F53D),
    (0x1F546, 0x1F64F),
    (0x1F680, 0x1F6FF),
    (0x1F774, 0x1F77F),
    (0x1F7D5, 0x1F7FF),
    (0x1F80C, 0x1F80F),
    (0x1F848, 0x1F84F),
    (0x1F85A, 0x1F85F),
    (0x1F888, 0x1F88F),
    (0x1F8AE, 0x1F8FF),
    (0x1F90C, 0x1F93A),
    (0x1F93C, 0x1F945),
    (0x1F947, 0x1FAFF),
    (0x1FC00, 0x1FFFD),
];

/// Whether `c` is Extended_Pictographic: the characters that can be emoji.
pub fn is_extended_pictographic(c: char) -> bool {
    let cp = u32::from(c);
    if cp < 0xA9 {
        return false;
    }
    EXTENDED_PICTOGRAPHIC
        .binary_search_by(|&(lo, hi)| {
            if hi < cp {
                std::cmp::Ordering::Less
            } else if lo > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> String {
        clean(s).text
    }

    #[test]
    fn removes_invisible_and_bidi() {
        for bad in [
            '\u{202E}',
            '\u{E0041}',
            '\u{200B}',
            '\u{2800}',
            '\u{3164}',
            '\u{115F}',
            '\u{1160}',
            '\u{FFA0}',
            '\u{180E}',
            '\u{AD}',
            '\u{FEFF}',
            '\u{2066}',
            '\u{2069}',
            '\u{200E}',
            '\u{200F}',
            '\u{061C}',
            '\u{2060}',
            '\u{0}',
            '\u{1B}',
            '\u{7F}',
            '\u{85}',
            '\u{FE00}',
            '\u{E0100}',
            '\u{200C}',
        ] {
            let input = format!("a{bad}b");
            let out = clean(&input);
            assert_eq!(out.text, "ab", "U+{:04X}", u32::from(bad));
            assert_eq!(out.removed, 1);
        }
    }

    #[test]
    fn keeps_whitespace_controls_and_text() {
        assert_eq!(c("a\n\tb\r\n"), "a\n\tb\r\n");
        let s = "Grüße, 你好，こんにちは، مرحبا";
        assert_eq!(c(s), s);
        assert_eq!(clean(s).removed, 0);
    }

    #[test]
    fn keeps_emoji_sequences() {
        for s in ["👨‍👩‍👧", "❤️", "🏳️‍🌈", "👩🏽‍💻", "❤️‍🔥", "1️⃣", "#️⃣", "©️", "🏴󠁧󠁢󠁥󠁮󠁧󠁿", "🏴󠁧󠁢󠁳󠁣󠁴󠁿‍🔥"]
        {
            assert_eq!(c(s), s, "{s:?}");
        }
    }

    #[test]
    fn removes_joiners_and_selectors_outside_emoji() {
        assert_eq!(c("ig\u{200D}nore"), "ignore");
        assert_eq!(c("👨\u{200D}x"), "👨x");
        assert_eq!(c("x\u{200D}👨"), "x👨");
        assert_eq!(c("a\u{FE0F}"), "a");
        assert_eq!(c("1\u{FE0F}"), "1");
        assert_eq!(c("❤\u{FE0F}\u{FE0F}"), "❤\u{FE0F}");
    }

    #[test]
    fn tag_smuggling_is_removed_even_after_a_flag() {
        let hidden: String = "ignore previous"
            .chars()
            .map(|ch| char::from_u32(0xE0000 + u32::from(ch)).unwrap_or(ch))
            .collect();
        assert_eq!(c(&format!("hi{hidden}")), "hi");
        assert_eq!(c(&format!("🏴{hidden}\u{E007F}")), "🏴");
        // Too long to be a subdivision flag.
        assert_eq!(
            c("🏴\u{E0061}\u{E0062}\u{E0063}\u{E0064}\u{E0065}\u{E0066}\u{E0067}\u{E007F}"),
            "🏴"
        );
    }

    #[test]
    fn idempotent_on_tricky_inputs() {
        for s in [
            "👨\u{200D}\u{200D}👩",
            "👨\u{200D}\u{200B}👩",
            "❤\u{200B}\u{FE0F}",
            "🏴\u{200B}\u{E0067}\u{E0062}\u{E007F}",
            "1\u{200B}\u{FE0F}\u{20E3}",
            "\u{E007F}\u{200D}👩",
        ] {
            let once = c(s);
            assert_eq!(c(&once), once, "{s:?}");
        }
    }

    #[test]
    fn pictographic_table_is_sorted() {
        assert!(EXTENDED_PICTOGRAPHIC.windows(2).all(|w| w[0].1 < w[1].0));
        assert!(is_extended_pictographic('😀'));
        assert!(is_extended_pictographic('❤'));
        assert!(!is_extended_pictographic('a'));
        assert!(!is_extended_pictographic('\u{1F3FB}'));
    }
}
