//! Credentials: provider API keys, JWTs, PEM private keys, and `password=...`-style
//! assignments.
//!
//! Provider keys have fixed prefixes, so one regex (compiled once) finds them all with its
//! literal prefilter, and each hit is then checked by hand: not glued to a preceding ASCII
//! letter or digit, fixed-length keys not followed by more key characters, generic `sk-` keys
//! with a long random-looking body. Recognised:
//! - AWS access key ids `AKIA`/`ASIA` + 16 upper-case alphanumerics (the secret access key is
//!   caught by the assignment rule, or by the entropy detector next to `aws` + `secret`);
//! - GitHub `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_` + 36, `github_pat_` + 22 or more;
//! - OpenAI-style `sk-...` (including `sk-proj-`), Anthropic `sk-ant-...`, and Sluice's own
//!   `sk-<16 hex>_<64 hex>`;
//! - Slack `xox[baprs]-...`, Google `AIza` + 35, Stripe `sk_live_`/`rk_live_`/`pk_live_`;
//! - PEM `-----BEGIN ... PRIVATE KEY-----` blocks up to their `-----END ...` line (or, when
//!   the footer is missing, over the base64 body that follows);
//! - JWTs: three (or five, for JWE) base64url segments whose first decodes to a JSON object
//!   with an `alg` member.
//!
//! Assignments: at `=`, `:` or `：`, the identifier before it (optionally quoted) must end
//! with a credential word (`password`, `passwd`, `pwd`, `passphrase`, `secret`, `token`,
//! `apikey`/`api_key`, `secret_key`, `private_key`, `access_key`, `auth_key`) or be one of
//! `密码`, `口令`, `密钥`, `秘钥`, `令牌`; the value (quoted, or up to whitespace and
//! delimiters) is reported as [`PiiKind::ApiKey`]. Plural and compound names (`max_tokens`,
//! `token_count`, `tokenizer`) do not end with the word and are left alone, as are the special
//! tokens of model configs (`eos_token: </s>`), template references (`$PASSWORD`, `{{token}}`,
//! `<secret>`), placeholders and null-like values. When whitespace separates the separator
//! from an unquoted value that is a word or dotted path without digits and more text follows
//! on its line (`The secret: kindness.`, `let token = bearer;`, `"secret": created.secret,`),
//! or the value is followed by `(` (a call), it is prose or code, not a secret. Still
//! reported: `password=hunter` (no space), any quoted value, and a lone word ending its line
//! (`password: correcthorsebatterystaple`) unless it is a type name (`token: str`). So
//! `The secret: kindness` as the last words of a text is (wrongly) redacted.

use std::sync::LazyLock;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use regex::bytes::Regex;

use super::{Cand, PiiKind, alnum_before, before};

/// Provider key prefixes, JWT and PEM headers. The JWT header alternatives are the base64url
/// encodings of `{"`, `{ "` and `{` followed by a newline.
static KEYS: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(concat!(
        r"-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----",
        r"|e(?:yJ|yA|w[o0])[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*){2,4}",
        r"|A(?:KIA|SIA)[A-Z0-9]{16}",
        r"|gh[pousr]_[A-Za-z0-9]{36}",
        r"|github_pat_[A-Za-z0-9_]{22,}",
        r"|sk-[A-Za-z0-9_-]{20,}",
        r"|[rsp]k_live_[A-Za-z0-9]{10,}",
        r"|xox[baprs]-[A-Za-z0-9-]{10,}",
        r"|AIza[A-Za-z0-9_-]{35}",
    ))
    .ok()
});

/// A rejected match longer than this is skipped whole instead of being searched again from
/// its second byte: a valid key cannot start inside it (it would be glued to the key
/// characters before it), and re-searching long matches would make runs such as
/// `sk-sk-sk-...` quadratic.
const RESCAN_LIMIT: usize = 128;

/// Finds provider keys, JWTs and PEM private keys.
pub(super) fn scan_keys(b: &[u8], out: &mut Vec<Cand>) {
    let Some(re) = KEYS.as_ref() else {
        return;
    };
    let mut pos = 0;
    while let Some(m) = re.find_at(b, pos) {
        let (s, e) = (m.start(), m.end());
        let accepted = if m.as_bytes().starts_with(b"-----") {
            Some(Cand::new(s, pem_block_end(b, e), PiiKind::ApiKey))
        } else if m.as_bytes().starts_with(b"e") {
            jwt(b, s, e).map(|end| Cand::new(s, end, PiiKind::Jwt))
        } else {
            provider_key(b, s, e).map(|end| Cand::new(s, end, PiiKind::ApiKey))
        };
        pos = match accepted {
            Some(c) => {
                out.push(c);
                c.end.max(s + 1)
            }
            None if e - s > RESCAN_LIMIT => e,
            // The match started with an ASCII byte, so `s + 1` is a character boundary.
            None => s + 1,
        };
    }
}

/// Longest PEM body walked when looking for the footer (an RSA-8192 key is about 6.5 KB).
const MAX_PEM_BODY: usize = 16 * 1024;

/// Where the PEM block whose header ends at `header_end` ends.
///
/// The body is walked over base64, whitespace and the `Proc-Type: 4,ENCRYPTED` /
/// `DEK-Info: ...` header characters up to the next `-----`; if that is an
/// `-----END ... PRIVATE KEY-----` footer, the block ends after it. Otherwise (a truncated
/// key) the block covers the header and the base64 lines right after it, without spaces so
/// that prose following a lone header is left alone.
fn pem_block_end(b: &[u8], header_end: usize) -> usize {
    let mut i = header_end;
    while i - header_end < MAX_PEM_BODY {
        match b.get(i) {
            Some(b'-') if b.get(i..i + 5) == Some(b"-----") => {
                if let Some(end) = pem_footer_end(b, i) {
                    return end;
                }
                break;
            }
            Some(&c)
                if c.is_ascii_alphanumeric()
                    || matches!(
                        c,
                        b'+' | b'/' | b'=' | b'\r' | b'\n' | b'\t' | b' ' | b':' | b',' | b'-'
                    ) =>
            {
                i += 1;
            }
            _ => break,
        }
    }
    let mut e = header_end;
    while b.get(e).is_some_and(|&c| {
        c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'\r' | b'\n')
    }) {
        e += 1;
    }
    while e > header_end && b.get(e - 1).is_some_and(u8::is_ascii_whitespace) {
        e -= 1;
    }
    e
}

/// If `-----END <label>PRIVATE KEY-----` (or `... PRIVATE KEY BLOCK-----`) starts at `at`, its
/// end.
fn pem_footer_end(b: &[u8], at: usize) -> Option<usize> {
    let rest = b.get(at..)?.strip_prefix(b"-----END")?;
    let label = rest
        .iter()
        .take(48)
        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || **c == b' ')
        .count();
    let line = rest.get(..label)?;
    let after = rest.get(label..)?;
    let tail_ok = line.ends_with(b"PRIVATE KEY") || line.ends_with(b"PRIVATE KEY BLOCK");
    (tail_ok && after.starts_with(b"-----")).then_some(at + 8 + label + 5)
}

/// A JWT in the regex match `s..e`: the end of the token, or `None`.
fn jwt(b: &[u8], s: usize, e: usize) -> Option<usize> {
    if before(b, s).is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')) {
        return None;
    }
    let token = b.get(s..e)?;
    let mut parts: Vec<&[u8]> = token.split(|&c| c == b'.').collect();
    let mut end = e;
    if parts.len() == 4 && parts.last().is_some_and(|p| p.is_empty()) {
        parts.pop();
        end -= 1;
    }
    if !(parts.len() == 3 || parts.len() == 5) || parts.get(1).is_none_or(|p| p.is_empty()) {
        return None;
    }
    // A JWS/JWE is followed by a space or punctuation, not by another dot and segment.
    if b.get(end) == Some(&b'.') && b.get(end + 1).is_some_and(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let header = parts.first()?;
    if header.len() > 4096 {
        return None;
    }
    jwt_header_ok(header).then_some(end)
}

/// Lenient base64url: JWT segments carry no padding, but accept it and non-canonical
/// trailing bits rather than miss a token.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

fn jwt_header_ok(header: &[u8]) -> bool {
    let Ok(json) = B64URL.decode(header) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&json).is_ok_and(|v| v.get("alg").is_some())
}

fn is_key_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-')
}

/// A provider key in the regex match `s..e`: the end of the key, or `None`.
fn provider_key(b: &[u8], s: usize, e: usize) -> Option<usize> {
    if alnum_before(b, s) {
        return None;
    }
    let key = b.get(s..e)?;
    let fixed = key.starts_with(b"AKIA")
        || key.starts_with(b"ASIA")
        || key.starts_with(b"gh")
        || key.starts_with(b"AIza");
    if fixed {
        return (!b.get(e).is_some_and(|&c| is_key_char(c))).then_some(e);
    }
    if let Some(body) = key.strip_prefix(b"sk-") {
        return openai_style(body).then_some(e);
    }
    if key.starts_with(b"xox") {
        return key.iter().any(u8::is_ascii_digit).then_some(e);
    }
    Some(e)
}

/// The body of an `sk-` key: Sluice's `<16 hex>_<64 hex>`, an `ant-`/`proj-` labelled key,
/// or a body with a run of at least 20 alphanumerics mixing digits with letters (so that
/// hyphenated words such as `sk-learn-...` are not keys).
fn openai_style(body: &[u8]) -> bool {
    let hex = |s: &[u8], n: usize| s.len() == n && s.iter().all(u8::is_ascii_hexdigit);
    if let [id @ .., b'_'] = body.get(..17).unwrap_or_default()
        && hex(id, 16)
        && body.get(17..).is_some_and(|s| hex(s, 64))
    {
        return true;
    }
    for label in [&b"ant-"[..], b"proj-"] {
        if let Some(rest) = body.strip_prefix(label) {
            return rest.len() >= 20;
        }
    }
    body.split(|&c| c == b'-' || c == b'_').any(|run| {
        run.len() >= 20
            && run.iter().any(u8::is_ascii_digit)
            && run.iter().any(u8::is_ascii_alphabetic)
    })
}

/// Identifier suffixes that name a credential (compared lower-case, `-` and `.` read as `_`).
const KEY_WORDS: &[&[u8]] = &[
    b"password",
    b"passwd",
    b"pwd",
    b"passphrase",
    b"secret",
    b"token",
    b"apikey",
    b"api_key",
    b"secret_key",
    b"secretkey",
    b"private_key",
    b"privatekey",
    b"access_key",
    b"accesskey",
    b"auth_key",
];

/// Model-config special tokens, which end with `token` but hold no secret.
const SPECIAL_TOKENS: &[&[u8]] = &[
    b"eos_token",
    b"bos_token",
    b"pad_token",
    b"unk_token",
    b"sep_token",
    b"cls_token",
    b"mask_token",
];

const CJK_KEY_WORDS: &[&str] = &["密码", "口令", "密钥", "秘钥", "令牌"];

/// Values that are not secrets.
const NULL_VALUES: &[&[u8]] = &[
    b"null",
    b"none",
    b"nil",
    b"true",
    b"false",
    b"undefined",
    b"empty",
    b"redacted",
];

const MAX_IDENT: usize = 64;
const MAX_VALUE: usize = 256;

/// A `key=value` / `key: value` credential assignment whose separator (`sep_len` bytes) is at
/// `sep`.
pub(super) fn assignment_at(b: &[u8], sep: usize, sep_len: usize, out: &mut Vec<Cand>) {
    if sep_len == 1 {
        let colon = b.get(sep) == Some(&b':');
        let (prev, next) = (before(b, sep), b.get(sep + 1).copied());
        if colon {
            if prev == Some(b':')
                || next == Some(b':')
                || (next == Some(b'/') && b.get(sep + 2) == Some(&b'/'))
            {
                return;
            }
        } else if matches!(next, Some(b'=' | b'>' | b'~'))
            || matches!(
                prev,
                Some(b'=' | b'!' | b'<' | b'>' | b'+' | b'-' | b'*' | b'/')
            )
        {
            return;
        }
    }
    if !names_credential(b, sep) {
        return;
    }
    let mut v = sep + sep_len;
    let mut spaced = false;
    while v - (sep + sep_len) < 8 && matches!(b.get(v), Some(b' ' | b'\t')) {
        v += 1;
        spaced = true;
    }
    let (vs, ve, quoted) = match b.get(v) {
        Some(&q @ (b'"' | b'\'' | b'`')) => {
            let vs = v + 1;
            let mut ve = vs;
            while ve - vs < MAX_VALUE && b.get(ve).is_some_and(|&c| c != q && c != b'\n') {
                ve += 1;
            }
            if b.get(ve) != Some(&q) {
                return;
            }
            (vs, ve, true)
        }
        Some(_) => {
            let mut ve = v;
            while ve - v < MAX_VALUE && b.get(ve).is_some_and(|&c| is_value_byte(c)) {
                ve += 1;
                if matches!(b.get(ve), Some(b'&' | b';' | b',')) && !ends_value(b, ve + 1) {
                    ve += 1;
                }
            }
            while ve > v && b.get(ve - 1) == Some(&b'.') {
                ve -= 1;
            }
            (v, ve, false)
        }
        None => return,
    };
    let Some(value) = b.get(vs..ve) else {
        return;
    };
    if value.is_empty() || value.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    if matches!(value.first(), Some(b'$' | b'{' | b'%' | b'<' | b'[')) {
        return;
    }
    if NULL_VALUES.iter().any(|n| value.eq_ignore_ascii_case(n)) || value.iter().all(|&c| c == b'*')
    {
        return;
    }
    if !quoted && b.get(ve) == Some(&b'(') {
        return;
    }
    if !quoted && spaced && is_identifier_path(value) {
        // A lone word ending its line (`password: correcthorsebatterystaple`) is a config
        // value unless it is a type name (`token: str`); followed by more text it is prose or
        // code (`The secret: kindness.`, `let token = bearer;`).
        let line_final = matches!(b.get(ve), None | Some(b'\n' | b'\r'));
        if !line_final || TYPE_WORDS.iter().any(|w| value.eq_ignore_ascii_case(w)) {
            return;
        }
    }
    out.push(Cand::assignment(vs, ve));
}

/// Type names that follow `token: ` in code rather than a secret.
const TYPE_WORDS: &[&[u8]] = &[
    b"str",
    b"string",
    b"bytes",
    b"int",
    b"integer",
    b"bool",
    b"boolean",
    b"number",
    b"any",
    b"object",
    b"text",
    b"optional",
    b"secretstr",
    b"required",
];

/// Whether `&`, `;` or `,` just before `next` ends an unquoted value: at the end of the text,
/// before whitespace, or before another `name=` (query strings, connection strings). Inside
/// a password (`Tr0ub4dor&3`) it does not.
fn ends_value(b: &[u8], next: usize) -> bool {
    match b.get(next) {
        None => true,
        Some(c) if c.is_ascii_whitespace() => true,
        Some(_) => {
            let rest = b.get(next..(next + 33).min(b.len())).unwrap_or_default();
            let name = rest
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
                .count();
            name > 0 && rest.get(name) == Some(&b'=')
        }
    }
}

/// A word or dotted path of words without digits (`kindness`, `created.secret`,
/// `os.environ`): after `key = ` or `key: ` that is code or prose, not a secret.
fn is_identifier_path(value: &[u8]) -> bool {
    value.split(|&c| c == b'.').all(|seg| {
        seg.first()
            .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
            && seg.iter().all(|c| c.is_ascii_alphabetic() || *c == b'_')
    })
}

/// Unquoted value characters: printable ASCII except quotes, brackets and the delimiters of
/// query strings, lists and statements.
fn is_value_byte(c: u8) -> bool {
    c.is_ascii_graphic()
        && !matches!(
            c,
            b'"' | b'\''
                | b'`'
                | b','
                | b';'
                | b'&'
                | b'<'
                | b'>'
                | b'('
                | b')'
                | b'['
                | b']'
                | b'{'
                | b'}'
        )
}

/// Whether what precedes the separator at `sep` names a credential.
fn names_credential(b: &[u8], sep: usize) -> bool {
    let mut k = sep;
    while k > 0 && sep - k < 4 && matches!(b.get(k - 1), Some(b' ' | b'\t')) {
        k -= 1;
    }
    if matches!(before(b, k), Some(b'"' | b'\'')) {
        k -= 1;
    }
    let head = b.get(..k).unwrap_or_default();
    if CJK_KEY_WORDS.iter().any(|w| head.ends_with(w.as_bytes())) {
        return true;
    }
    let id_end = k;
    while k > 0
        && id_end - k < MAX_IDENT
        && b.get(k - 1)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
    {
        k -= 1;
    }
    // Every credential word ends with one of these letters: a cheap first filter.
    let last = before(b, id_end).map(|c| c.to_ascii_lowercase());
    if alnum_before(b, k) || k == id_end || !matches!(last, Some(b'd' | b'e' | b't' | b'n' | b'y'))
    {
        return false;
    }
    let mut ident = [0u8; MAX_IDENT];
    let len = id_end - k;
    for (slot, &c) in ident.iter_mut().zip(b.get(k..id_end).unwrap_or_default()) {
        *slot = match c.to_ascii_lowercase() {
            b'-' | b'.' => b'_',
            c => c,
        };
    }
    let ident = ident.get(..len).unwrap_or_default();
    KEY_WORDS.iter().any(|w| ident.ends_with(w))
        && !SPECIAL_TOKENS.iter().any(|w| ident.ends_with(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(PiiKind, &str)> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        scan_keys(b, &mut out);
        for (i, &c) in b.iter().enumerate() {
            if c == b'=' || c == b':' {
                assignment_at(b, i, 1, &mut out);
            }
            if c == 0xEF && b.get(i + 1..i + 3) == Some(&[0xBC, 0x9A]) {
                assignment_at(b, i, 3, &mut out);
            }
        }
        out.iter()
            .map(|c| (c.kind, &text[c.start..c.end]))
            .collect()
    }

    #[test]
    fn regex_compiles() {
        assert!(KEYS.is_some());
    }

    #[test]
    fn provider_keys() {
        let cases = [
            "AKIAIOSFODNN7EXAMPLE",
            "ASIAY34FZKBOKMUTVV7A",
            "ghp_1234567890abcdefghijABCDEFGHIJ123456",
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTU",
            "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789ABCDEF",
            "sk-proj-abcdefghijklmnopqrstuvwxyzABCDEF",
            "sk-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKL",
            "xoxb-123456789012-1234567890123-abcdefghijklmnopqrstuvwx",
            "AIzaSyA1234567890abcdefghijklmnopqrstuv",
            "sk_live_abcdefghijklmnop12345678",
            "rk_live_abcdefghijklmnop12345678",
            "pk_live_abcdefghijklmnop12345678",
        ];
        for key in cases {
            let text = format!("key {key}, ok");
            assert_eq!(found(&text), vec![(PiiKind::ApiKey, key)], "{key}");
        }
        let sluice = format!("sk-{}_{}", "a".repeat(16), "b".repeat(64));
        assert_eq!(found(&sluice), vec![(PiiKind::ApiKey, sluice.as_str())]);
        assert!(found("task-abcdefghijklmnopqrstuvwxyz0123").is_empty());
        assert!(found("sk-learn-is-a-great-library-for-ml").is_empty());
        assert!(found("AKIAIOSFODNN7EXAMPLEXX").is_empty());
        assert!(found("xAKIAIOSFODNN7EXAMPLE").is_empty());
    }

    #[test]
    fn pem_blocks() {
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabcd\n-----END RSA PRIVATE KEY-----";
        let text = format!("key:\n{pem}\nbye");
        assert_eq!(found(&text), vec![(PiiKind::ApiKey, pem)]);
        let cut = "-----BEGIN PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabcd";
        assert_eq!(found(&format!("{cut}\n\n")), vec![(PiiKind::ApiKey, cut)]);
        let many = "-----BEGIN PRIVATE KEY-----".repeat(50);
        assert_eq!(found(&many).len(), 50);
        let lone = "-----BEGIN PRIVATE KEY----- is how a PEM key starts.";
        assert_eq!(
            found(lone),
            vec![(PiiKind::ApiKey, "-----BEGIN PRIVATE KEY-----")]
        );
        let pgp = "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF0\n=abcd\n-----END PGP PRIVATE KEY BLOCK-----";
        assert_eq!(found(pgp), vec![(PiiKind::ApiKey, pgp)]);
        let enc = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,ABCDEF\n\nMIIE\n-----END RSA PRIVATE KEY-----";
        assert_eq!(found(enc), vec![(PiiKind::ApiKey, enc)]);
        assert!(found("-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----").is_empty());
    }

    #[test]
    fn jwts() {
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        assert_eq!(found(&format!("Bearer {jwt}.")), vec![(PiiKind::Jwt, jwt)]);
        // {"typ":"JWT"} has no alg.
        assert!(found("eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiIxIn0.abc").is_empty());
        assert!(found("eyeglasses-storefront.example.com").is_empty());
    }

    #[test]
    fn assignments() {
        assert_eq!(
            found("password=hunter2"),
            vec![(PiiKind::ApiKey, "hunter2")]
        );
        assert_eq!(
            found("DB_PASSWORD = \"s3cr3t pass\""),
            vec![(PiiKind::ApiKey, "s3cr3t pass")]
        );
        assert_eq!(
            found(r#"{"client_secret": "abc123"}"#),
            vec![(PiiKind::ApiKey, "abc123")]
        );
        assert_eq!(
            found("url?access_token=abc123&x=1"),
            vec![(PiiKind::ApiKey, "abc123")]
        );
        assert_eq!(found("secret: 42."), vec![(PiiKind::ApiKey, "42")]);
        assert_eq!(found("密码：abc123谢谢"), vec![(PiiKind::ApiKey, "abc123")]);
        assert_eq!(found("密码=abc123"), vec![(PiiKind::ApiKey, "abc123")]);
        assert!(found("max_tokens: 256").is_empty());
        assert!(found("token_count=12").is_empty());
        assert!(found("eos_token: </s>").is_empty());
        assert!(found("password=$DB_PASSWORD").is_empty());
        assert!(found("token: {{ token }}").is_empty());
        assert!(found("The secret: kindness.").is_empty());
        assert!(found("A token: the unit of text").is_empty());
        assert!(found("password: null").is_empty());
        assert!(found("if password == other").is_empty());
        assert!(found("password=[API_KEY]").is_empty());
        assert!(found("let secret = format!(\"x{y}\");").is_empty());
        assert!(found("let token = bearer(&parts)?;").is_empty());
        assert!(found(r#""secret": created.secret,"#).is_empty());
        assert!(found("token = os.environ[\"TOKEN\"]").is_empty());
        assert_eq!(
            found("password = hunter2"),
            vec![(PiiKind::ApiKey, "hunter2")]
        );
        assert_eq!(found("password=hunter"), vec![(PiiKind::ApiKey, "hunter")]);
        assert_eq!(
            found("password: correcthorsebatterystaple\nuser: x"),
            vec![(PiiKind::ApiKey, "correcthorsebatterystaple")]
        );
        assert!(found("token: str\n").is_empty());
        assert_eq!(
            found("pwd=Tr0ub4dor&3 ok"),
            vec![(PiiKind::ApiKey, "Tr0ub4dor&3")]
        );
        assert_eq!(
            found("Server=db;Password=p@ss;w0rd;Database=x"),
            vec![(PiiKind::ApiKey, "p@ss;w0rd")]
        );
        assert_eq!(found("?token=abc&state=1"), vec![(PiiKind::ApiKey, "abc")]);
        assert_eq!(found("token=abc, next"), vec![(PiiKind::ApiKey, "abc")]);
        assert_eq!(found("token = \"abc\""), vec![(PiiKind::ApiKey, "abc")]);
        assert!(found("password=").is_empty());
    }
}
