//! The guard pipeline: ordered stages over one text, configured per tenant.
//!
//! Order: Unicode hygiene (the model receives the cleaned original) → prompt-injection scan on
//! the skeleton of the cleaned text and of its decoded layers → PII detection on the cleaned
//! text, then redaction or rejection. Size limits are checked by the caller before any stage
//! runs, so every stage sees bounded input.

use serde::{Deserialize, Serialize};

use crate::injection::{Category, DEFAULT_THRESHOLD, Rules};
use crate::pii::{self, PiiSpan};
use crate::unicode;

/// What to do when a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectionAction {
    /// Reject the request with 400 `prompt_injection_detected`.
    Block,
    /// Let it through, but record the categories (job record and audit log).
    Flag,
    /// Do not scan.
    Off,
}

/// What to do with personal data in input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiAction {
    /// Replace it with placeholders before the model sees it.
    Redact,
    /// Reject the request with 400 `pii_detected`.
    Reject,
    /// Leave it.
    Off,
}

/// Per-tenant guard settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GuardConfig {
    pub injection_action: InjectionAction,
    pub injection_threshold: f32,
    pub pii_action: PiiAction,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            injection_action: InjectionAction::Block,
            injection_threshold: DEFAULT_THRESHOLD,
            pii_action: PiiAction::Redact,
        }
    }
}

/// The overall decision for a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Flag,
    Block,
}

/// Why a text was blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockReason {
    PromptInjection,
    Pii,
}

/// The result of guarding one text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<BlockReason>,
    /// Injection categories at or over the threshold.
    pub categories: Vec<Category>,
    /// PII spans, in characters of the cleaned text.
    pub pii: Vec<PiiSpan>,
    /// The text to use downstream: cleaned, and redacted when the tenant redacts PII.
    pub text: String,
    /// Characters removed by Unicode hygiene.
    pub removed_chars: usize,
}

/// A configured guard: the rules are compiled once and shared.
#[derive(Debug, Clone)]
pub struct Guard {
    rules: Rules,
}

impl Guard {
    pub fn new(rules: Rules) -> Self {
        Self { rules }
    }

    /// The built-in rules, plus an operator's rule file if given.
    pub fn with_builtin(extra: Option<Rules>) -> Self {
        let mut rules = Rules::builtin();
        if let Some(extra) = extra {
            rules.extend(extra);
        }
        Self { rules }
    }

    /// Injection scores per category of a text (after Unicode cleaning), for operators.
    pub fn scores(&self, text: &str) -> std::collections::BTreeMap<Category, f32> {
        self.rules.scan(&unicode::clean(text).text).scores
    }

    /// Runs every stage over one text.
    pub fn check(&self, text: &str, config: &GuardConfig) -> Verdict {
        let cleaned = unicode::clean(text);
        let categories = match config.injection_action {
            InjectionAction::Off => Vec::new(),
            _ => self
                .rules
                .scan(&cleaned.text)
                .categories_over(config.injection_threshold),
        };
        let spans = match config.pii_action {
            PiiAction::Off => Vec::new(),
            _ => pii::detect(&cleaned.text),
        };
        let (action, reason) =
            if !categories.is_empty() && config.injection_action == InjectionAction::Block {
                (Action::Block, Some(BlockReason::PromptInjection))
            } else if !spans.is_empty() && config.pii_action == PiiAction::Reject {
                (Action::Block, Some(BlockReason::Pii))
            } else if !categories.is_empty() {
                (Action::Flag, None)
            } else {
                (Action::Allow, None)
            };
        let text = if config.pii_action == PiiAction::Redact && !spans.is_empty() {
            pii::redact(&cleaned.text)
        } else {
            cleaned.text
        };
        Verdict {
            action,
            reason,
            categories,
            pii: spans,
            text,
            removed_chars: cleaned.removed,
        }
    }
}
