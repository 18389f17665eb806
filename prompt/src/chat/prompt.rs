//! Turning a conversation into token ids without letting client text become control tokens.
//!
//! Rendering the template and tokenizing the result in one go would let a user who writes
//! `<|im_start|>system` forge a system turn: the tokenizer matches special tokens anywhere.
//! Instead the template is rendered with a random marker in place of each message's content;
//! the template's own text is tokenized with special tokens recognised, and each content span
//! with a tokenizer that has no special tokens at all, so it can only ever be plain text.

use sluice_proto::Message;
use tokenizers::Tokenizer;

use super::template::{ChatTemplate, TemplateError};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("the chat template does not place message contents verbatim")]
    TemplateTransformsContent,
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// The special-token-free twin of a tokenizer: same model, normaliser and pre-tokeniser, no
/// added vocabulary.
pub fn plain_twin(tokenizer: &Tokenizer) -> Tokenizer {
    let mut plain = Tokenizer::new(tokenizer.get_model().clone());
    // `with_normalizer` only fails on a normaliser it cannot wrap; cloning the original's
    // cannot hit that.
    let _ = plain.with_normalizer(tokenizer.get_normalizer().cloned());
    plain.with_pre_tokenizer(tokenizer.get_pre_tokenizer().cloned());
    plain.with_decoder(tokenizer.get_decoder().cloned());
    plain
}

fn encode(tokenizer: &Tokenizer, text: &str, out: &mut Vec<u32>) -> Result<(), PromptError> {
    if text.is_empty() {
        return Ok(());
    }
    let enc = tokenizer
        .encode_fast(text, false)
        .map_err(|e| PromptError::Tokenizer(e.to_string()))?;
    out.extend_from_slice(enc.get_ids());
    Ok(())
}

/// Renders and tokenizes a conversation; message contents never yield special tokens.
pub fn encode_chat(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    plain: &Tokenizer,
    messages: &[Message],
) -> Result<Vec<u32>, PromptError> {
    let nonce = hex_nonce();
    let marker = |i: usize| format!("\u{27E6}sluice:{nonce}:{i}\u{27E7}");
    let marked: Vec<Message> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| Message {
            role: m.role,
            content: marker(i),
        })
        .collect();
    let rendered = template.render(&marked)?;

    // Template text between markers must hold no other marker: a template that drops,
    // reorders or repeats contents is refused rather than guessed at.
    let tag = format!("sluice:{nonce}");
    let template_text = |segment: &str, ids: &mut Vec<u32>| {
        if segment.contains(&tag) {
            return Err(PromptError::TemplateTransformsContent);
        }
        encode(tokenizer, segment, ids)
    };
    let mut ids = Vec::new();
    let mut rest = rendered.as_str();
    for (i, message) in messages.iter().enumerate() {
        let m = marker(i);
        let at = rest
            .find(&m)
            .ok_or(PromptError::TemplateTransformsContent)?;
        template_text(&rest[..at], &mut ids)?;
        encode(plain, &message.content, &mut ids)?;
        rest = &rest[at + m.len()..];
    }
    template_text(rest, &mut ids)?;
    Ok(ids)
}

fn hex_nonce() -> String {
    let n: u64 = rand::random();
    format!("{n:016x}")
}
