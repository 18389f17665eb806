//! Structured output: JSON Schema to a token grammar (llguidance), and the final check of the
//! output (the `jsonschema` crate).
//!
//! The API calls [`check_format`] at submit, so a schema that is not valid JSON Schema, or that
//! uses what the grammar engine cannot enforce, is a 400 before anything is queued. The worker
//! builds a [`GrammarEnv`] once per model (the tokenizer's tokens as byte strings in a trie)
//! and a [`Constraint`] per job: before each token it masks every token the grammar forbids,
//! after it advances the grammar. [`validate_output`] re-checks the finished text with an
//! independent validator as a second line of defence.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;
use sluice_proto::ResponseFormat;
use tokenizers::Tokenizer;

/// The largest schema accepted, in bytes of JSON.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// Why a format cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the schema is not valid JSON Schema: {0}")]
    InvalidSchema(String),
    #[error("the schema cannot be enforced: {0}")]
    Unsupported(String),
    #[error("the schema is {0} bytes; at most {MAX_SCHEMA_BYTES} are accepted")]
    TooLarge(usize),
}

/// The schema with the grammar options Sluice always uses: no free whitespace between tokens
/// (a small model otherwise can pad with whitespace until its token budget runs out), the
/// usual separators. A client's own `x-guidance` options are replaced.
fn grammar_schema(format: &ResponseFormat) -> Option<Value> {
    let mut schema = format.schema()?;
    if let Some(obj) = schema.as_object_mut() {
        obj.remove("x-guidance");
    }
    if schema.is_object() {
        JsonCompileOptions {
            whitespace_flexible: false,
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            ..JsonCompileOptions::default()
        }
        .apply_to(&mut schema);
    }
    Some(schema)
}

/// A compiled output validator.
fn validator(schema: &Value) -> Result<jsonschema::Validator, FormatError> {
    jsonschema::validator_for(schema).map_err(|e| FormatError::InvalidSchema(e.to_string()))
}

/// A token environment of the 256 single bytes: enough to compile a grammar and learn whether
/// the engine supports it, with no model's tokenizer at hand (the API).
struct ByteEnv {
    trie: TokTrie,
}

impl ByteEnv {
    fn new() -> Self {
        let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        words.push(vec![TokTrie::SPECIAL_TOKEN_MARKER, b'e', b'o', b's']);
        let info = TokRxInfo::new(words.len() as u32, 256);
        Self {
            trie: TokTrie::from(&info, &words),
        }
    }
}

impl TokenizerEnv for ByteEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        s.iter().map(|b| u32::from(*b)).collect()
    }
}

fn byte_factory() -> &'static Result<ParserFactory, String> {
    static FACTORY: std::sync::OnceLock<Result<ParserFactory, String>> = std::sync::OnceLock::new();
    FACTORY.get_or_init(|| {
        let env: TokEnv = Arc::new(ByteEnv::new());
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.set_stderr_log_level(0);
        Ok(factory)
    })
}

fn compile(factory: &ParserFactory, schema: Value) -> Result<Matcher, FormatError> {
    let parser = factory
        .create_parser(TopLevelGrammar::from_json_schema(schema))
        .map_err(|e| FormatError::Unsupported(e.to_string()))?;
    let matcher = Matcher::new(Ok(parser));
    match matcher.get_error() {
        Some(e) => Err(FormatError::Unsupported(e)),
        None => Ok(matcher),
    }
}

/// Whether a format can be served: a valid schema, within size, that the grammar engine can
/// enforce. `text` always can.
pub fn check_format(format: &ResponseFormat) -> Result<(), FormatError> {
    let Some(schema) = format.schema() else {
        return Ok(());
    };
    let size = serde_json::to_vec(&schema).map(|v| v.len()).unwrap_or(0);
    if size > MAX_SCHEMA_BYTES {
        return Err(FormatError::TooLarge(size));
    }
    if !schema.is_object() {
        return Err(FormatError::InvalidSchema(
            "a schema must be a JSON object".into(),
        ));
    }
    if let Some(reference) = recursive_ref(&schema) {
        return Err(FormatError::Unsupported(format!(
            "recursive schemas are not supported (\"$ref\": {reference:?} refers back to a \
             schema that contains it)"
        )));
    }
    validator(&schema)?;
    let factory = byte_factory()
        .as_ref()
        .map_err(|e| FormatError::Unsupported(e.clone()))?;
    compile(factory, grammar_schema(format).unwrap_or(schema)).map(|_| ())
}

/// A local `$ref` (`#`, `#/$defs/a`, ...) that leads back into a schema it is part of, if
/// the schema has one: `{"$ref": "#"}`, or `a` referring to `b` referring to `a`. Output for
/// such a schema has no bound on its nesting, which the grammar engine cannot enforce; a
/// schema whose references expand into more than [`MAX_REF_EXPANSIONS`] schemas is refused
/// the same way. Non-local references are left to the validator, which resolves none.
fn recursive_ref(schema: &Value) -> Option<String> {
    /// Every local `$ref` inside `node` (at JSON Pointer `at`): where it is, and its target,
    /// both as JSON Pointers (the target without its leading `#`).
    fn refs(node: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match node {
            Value::Object(map) => {
                for (key, value) in map {
                    let here = format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"));
                    match (key.as_str(), value) {
                        ("$ref", Value::String(r)) if r.starts_with('#') => {
                            out.push((here, r[1..].to_string()));
                        }
                        _ => refs(value, &here, out),
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    refs(v, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    /// Whether the schema at `outer` contains the location `inner` (or is it).
    fn contains(outer: &str, inner: &str) -> bool {
        inner == outer || inner.starts_with(&format!("{outer}/")) || outer.is_empty()
    }
    /// Expands the schema at `target`: a reference inside it whose target contains a
    /// reference already followed on the way here (or itself) loops.
    fn visit(
        schema: &Value,
        target: &str,
        followed: &mut Vec<String>,
        budget: &mut usize,
    ) -> Option<String> {
        let Some(node) = schema.pointer(target) else {
            return None; // a dangling reference: the validator reports it
        };
        let mut found = Vec::new();
        refs(node, target, &mut found);
        for (location, next) in found {
            if contains(&next, &location) || followed.iter().any(|l| contains(&next, l)) {
                return Some(format!("#{next}"));
            }
            if *budget == 0 {
                return Some(format!("#{next}"));
            }
            *budget -= 1;
            followed.push(location);
            let looped = visit(schema, &next, followed, budget);
            followed.pop();
            if looped.is_some() {
                return looped;
            }
        }
        None
    }
    let mut budget = MAX_REF_EXPANSIONS;
    visit(schema, "", &mut Vec::new(), &mut budget)
}

/// How many `$ref` expansions [`recursive_ref`] follows before it refuses a schema.
const MAX_REF_EXPANSIONS: usize = 10_000;

/// Checks finished output against the format: it parses as JSON and validates.
pub fn validate_output(format: &ResponseFormat, text: &str) -> Result<(), String> {
    let Some(schema) = format.schema() else {
        return Ok(());
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("the output is not JSON: {e}"))?;
    let validator = validator(&schema).map_err(|e| e.to_string())?;
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .take(3)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the output does not match the schema: {}",
            errors.join("; ")
        ))
    }
}

/// A model's tokenizer as llguidance sees it: every token id as the bytes it stands for.
struct TokenizerEnvAdapter {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for TokenizerEnvAdapter {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode(text, false) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// One model's grammar machinery, built once at load (the token trie and the mask slicer take
/// a few hundred milliseconds for a 150k vocabulary).
pub struct GrammarEnv {
    factory: ParserFactory,
    eos: Vec<u32>,
}

impl std::fmt::Debug for GrammarEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarEnv")
            .field("eos", &self.eos)
            .finish()
    }
}

impl GrammarEnv {
    /// For a byte-level BPE tokenizer (Qwen's). `vocab` is the model's output width, which
    /// may exceed the tokenizer's (the extra ids are never allowed); `eos[0]` is the token
    /// that ends a constrained output.
    pub fn new(tokenizer: &Tokenizer, vocab: usize, eos: &[u32]) -> Result<Self, String> {
        let json: Value = serde_json::from_str(
            &tokenizer
                .to_string(false)
                .map_err(|e| format!("tokenizer: {e}"))?,
        )
        .map_err(|e| format!("tokenizer json: {e}"))?;
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())?;
        if words.len() > vocab {
            return Err(format!(
                "the tokenizer has {} tokens, the model's output {vocab}",
                words.len()
            ));
        }
        words.resize(vocab, Vec::new());
        let &first_eos = eos
            .first()
            .ok_or("the model has no end-of-sequence token")?;
        let info = TokRxInfo::new(vocab as u32, first_eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(TokenizerEnvAdapter {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.set_stderr_log_level(0);
        Ok(Self {
            factory,
            eos: eos.to_vec(),
        })
    }

    /// The constraint for one job, or `None` for free text.
    pub fn constraint(&self, format: &ResponseFormat) -> Result<Option<Constraint>, FormatError> {
        let Some(schema) = grammar_schema(format) else {
            return Ok(None);
        };
        Ok(Some(Constraint {
            matcher: compile(&self.factory, schema)?,
            eos: self.eos.clone(),
        }))
    }
}

/// One job's grammar state.
pub struct Constraint {
    matcher: Matcher,
    eos: Vec<u32>,
}

impl Constraint {
    /// Sets the logit of every token the grammar forbids now to -inf. When the output is
    /// complete, only end-of-sequence tokens remain allowed.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let eos_allowed = self.eos.first().is_some_and(|t| mask.is_allowed(*t));
        let mut allowed = 0usize;
        for (id, logit) in logits.iter_mut().enumerate() {
            let id = id as toktrie::TokenId;
            if mask.is_allowed(id) || (eos_allowed && self.eos.contains(&id)) {
                allowed += 1;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        if allowed == 0 {
            return Err("the grammar allows no token".into());
        }
        Ok(())
    }

    /// Advances the grammar past a sampled (allowed) token.
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        if self.eos.contains(&token) {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The output is complete: nothing may follow but the end of the sequence.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_proto::JsonSchemaFormat;

    fn schema(schema: Value) -> ResponseFormat {
        ResponseFormat::JsonSchema {
            json_schema: JsonSchemaFormat {
                name: "t".into(),
                description: None,
                schema,
                strict: Some(true),
            },
        }
    }

    #[test]
    fn accepts_usual_schemas_and_text() {
        assert!(check_format(&ResponseFormat::Text).is_ok());
        assert!(check_format(&ResponseFormat::JsonObject).is_ok());
        let s = json!({"type": "object", "properties": {"name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0}}, "required": ["name"],
            "additionalProperties": false});
        assert_eq!(check_format(&schema(s)), Ok(()));
    }

    #[test]
    fn rejects_invalid_and_unenforceable_schemas() {
        assert!(matches!(
            check_format(&schema(json!({"type": "no-such-type"}))),
            Err(FormatError::InvalidSchema(_))
        ));
        assert!(matches!(
            check_format(&schema(json!([1, 2]))),
            Err(FormatError::InvalidSchema(_))
        ));
        // A remote reference: the engine fetches nothing.
        assert!(check_format(&schema(json!({"$ref": "https://example.com/s.json"}))).is_err());
        let big = json!({"type": "string", "description": "x".repeat(MAX_SCHEMA_BYTES)});
        assert!(matches!(
            check_format(&schema(big)),
            Err(FormatError::TooLarge(_))
        ));
    }

    #[test]
    fn recursive_references_are_refused_before_anything_runs() {
        for looped in [
            json!({"$ref": "#"}),
            json!({"type": "object", "properties": {"child": {"$ref": "#"}}}),
            json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                   "$ref": "#/$defs/a"}),
            json!({"$defs": {"node": {"type": "object",
                   "properties": {"next": {"$ref": "#/$defs/node"}}}},
                   "$ref": "#/$defs/node"}),
        ] {
            let err = check_format(&schema(looped.clone())).expect_err("refused");
            assert!(
                matches!(&err, FormatError::Unsupported(m) if m.contains("recursive")),
                "{looped}: {err}"
            );
        }
        // Shared, non-recursive definitions are fine.
        let shared = json!({"$defs": {"name": {"type": "string"}}, "type": "object",
            "properties": {"first": {"$ref": "#/$defs/name"}, "last": {"$ref": "#/$defs/name"}},
            "required": ["first", "last"]});
        assert!(check_format(&schema(shared)).is_ok());
    }

    #[test]
    fn validates_output() {
        let f = schema(
            json!({"type": "object", "properties": {"n": {"type": "integer"}},
            "required": ["n"]}),
        );
        assert!(validate_output(&f, r#"{"n": 3}"#).is_ok());
        assert!(validate_output(&f, r#"{"n": "3"}"#).is_err());
        assert!(validate_output(&f, r#"{"n": 3"#).is_err());
        assert!(validate_output(&ResponseFormat::JsonObject, "[1]").is_err());
        assert!(validate_output(&ResponseFormat::Text, "anything").is_ok());
    }

    mod props {
        //! The schema check on arbitrary schemas: it answers (accept or a reason) without
        //! panicking or looping, and what it accepts can check any output.
        use super::*;
        use proptest::prelude::*;
        use sluice_proto::JsonSchemaFormat;

        /// Schemas built from JSON Schema's own keywords (with `$ref`s that may loop), and
        /// values of the wrong type in their place.
        fn schema() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                prop::sample::select(vec![
                    "string", "integer", "number", "boolean", "null", "object", "array", "nope"
                ])
                .prop_map(|t| json!({"type": t})),
                prop::sample::select(vec![
                    "#",
                    "#/$defs/a",
                    "#/$defs/b",
                    "#/properties/x",
                    "#/nowhere",
                    "http://example.com/s"
                ])
                .prop_map(|r| json!({"$ref": r})),
                Just(json!({"enum": [1, "a", null]})),
                Just(json!({"const": "x"})),
                Just(json!({"pattern": "^(a+)+$", "type": "string"})),
                Just(json!({"pattern": "(", "type": "string"})),
                Just(json!({"minimum": 5, "maximum": 1, "type": "integer"})),
                Just(json!(true)),
                Just(json!(1)),
                Just(json!(null)),
                Just(json!("string")),
            ];
            leaf.prop_recursive(4, 32, 4, |inner| {
                prop_oneof![
                    prop::collection::btree_map("[a-z]{1,3}", inner.clone(), 0..4).prop_map(
                        |props| {
                            let required: Vec<_> = props.keys().take(2).cloned().collect();
                            json!({"type": "object", "properties": props, "required": required})
                        }
                    ),
                    inner
                        .clone()
                        .prop_map(|items| json!({"type": "array", "items": items, "minItems": 1})),
                    prop::collection::vec(inner.clone(), 1..3).prop_map(|v| json!({"anyOf": v})),
                    prop::collection::vec(inner.clone(), 1..3).prop_map(|v| json!({"oneOf": v})),
                    (inner.clone(), inner.clone())
                        .prop_map(|(a, b)| json!({"$defs": {"a": a, "b": b}, "$ref": "#/$defs/a"})),
                    (inner.clone(), inner).prop_map(|(a, b)| json!({"allOf": [a], "not": b})),
                ]
            })
        }

        fn format(schema: Value) -> ResponseFormat {
            ResponseFormat::JsonSchema {
                json_schema: JsonSchemaFormat {
                    name: "p".into(),
                    description: None,
                    schema,
                    strict: None,
                },
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(192))]

            #[test]
            fn the_schema_check_answers_every_schema(schema in schema(), output in "\\PC{0,40}") {
                let format = format(schema);
                if check_format(&format).is_ok() {
                    let _ = validate_output(&format, &output);
                    let _ = validate_output(&format, "{}");
                }
            }
        }
    }
}
