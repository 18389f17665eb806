//! The guard pipeline: ordered stages over one text, configured per tenant.
//!
//! Order: Unicode hygiene (the model receives the cleaned original) → prompt-injection scan on
//! the skeleton of the cleaned text and of its decoded layers, plus the learned classifier's
//! score of the same texts ([`Guard::classifier_inputs`], scored by the caller) → PII detection
//! on the cleaned text, then redaction or rejection. Size limits are checked by the caller
//! before any stage runs, so every stage sees bounded input.

use serde::{Deserialize, Serialize};

use crate::decode::{DecodeLimits, decoded_layers};
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
    /// What a rule or classifier hit does.
    pub injection_action: InjectionAction,
    /// The rules' per-category threshold.
    pub injection_threshold: f32,
    /// The classifier's threshold: its default, 0.5, is the operating point chosen in training
    /// (at most 1 % false positives on the validation split).
    pub classifier_threshold: f32,
    pub pii_action: PiiAction,
}

impl GuardConfig {
    /// What the learned classifier's score alone decides under this policy: at or over the
    /// threshold, [`Action::Block`] or [`Action::Flag`] as `injection_action` says; below it,
    /// or with injection checks off, [`Action::Allow`].
    pub fn classifier_action(&self, score: f32) -> Action {
        match self.injection_action {
            _ if score < self.classifier_threshold => Action::Allow,
            InjectionAction::Off => Action::Allow,
            InjectionAction::Flag => Action::Flag,
            InjectionAction::Block => Action::Block,
        }
    }
}

/// The classifier's default threshold (see [`crate::classifier::head`]).
pub const DEFAULT_CLASSIFIER_THRESHOLD: f32 = 0.5;

/// Decoded layers handed to the classifier per text, at most (the rules see all of them).
const MAX_CLASSIFIER_LAYERS: usize = 4;

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            injection_action: InjectionAction::Block,
            injection_threshold: DEFAULT_THRESHOLD,
            classifier_threshold: DEFAULT_CLASSIFIER_THRESHOLD,
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

    /// What the classifier scores for one text: the text after Unicode hygiene, then the
    /// layers decoded from it (base64, hex, rot13, URL), so a hidden instruction is scored in
    /// the clear. The text's classifier score is the maximum over them.
    pub fn classifier_inputs(&self, text: &str) -> Vec<String> {
        let cleaned = unicode::clean(text).text;
        let mut inputs: Vec<String> = decoded_layers(&cleaned, DecodeLimits::default())
            .into_iter()
            .filter(|layer| layer.chars().filter(|c| c.is_alphabetic()).count() >= 4)
            .take(MAX_CLASSIFIER_LAYERS)
            .collect();
        inputs.insert(0, cleaned);
        inputs
    }

    /// Runs every stage over one text, without the classifier (rules only).
    pub fn check(&self, text: &str, config: &GuardConfig) -> Verdict {
        self.check_scored(text, config, None)
    }

    /// Runs every stage over one text; `classifier` is the classifier's score of
    /// [`Guard::classifier_inputs`] (`None` where the operator turned the classifier off). At
    /// or over the tenant's classifier threshold it adds the `classifier` category.
    pub fn check_scored(
        &self,
        text: &str,
        config: &GuardConfig,
        classifier: Option<f32>,
    ) -> Verdict {
        let cleaned = unicode::clean(text);
        let categories = match config.injection_action {
            InjectionAction::Off => Vec::new(),
            _ => {
                let mut categories = self
                    .rules
                    .scan(&cleaned.text)
                    .categories_over(config.injection_threshold);
                if classifier.is_some_and(|score| config.classifier_action(score) != Action::Allow)
                {
                    categories.push(Category::Classifier);
                }
                categories
            }
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
