//! Sluice's guard: what stands between client text and the model, and between the model's text
//! and the client (and the logs).
//!
//! Stages, each its own module, run in this order by [`pipeline::Guard`]:
//! - [`unicode`]: Unicode hygiene — strips control, format, tag, bidi, variation-selector (outside
//!   emoji) and filler characters; keeps ZWJ inside emoji sequences. The model gets this text.
//! - [`skeleton`]: NFKC + confusables skeleton + case folding, the form detection runs on.
//! - [`decode`]: recursive, bounded decoding of payloads hidden in base64, hex, rot13 or URL
//!   encoding, so detection also sees what they hide.
//! - [`injection`]: multilingual prompt-injection rules (built-in TOML, extensible by operators)
//!   scored per category.
//! - [`classifier`]: a learned injection classifier (sentence encoder + trained head) scoring
//!   the cleaned text and its decoded layers; its score joins the rules' as the `classifier`
//!   category. It needs model files, so the caller scores texts (off the async runtime, through
//!   [`classifier::ClassifierService`]) and hands the score to [`Guard::check_scored`].
//! - [`pii`]: detection and redaction of personal data and secrets, CJK-safe (no `\b`).
//!
//! Offsets reported to users (PII spans) are in characters of the text they were found in.

pub mod classifier;
pub mod decode;
pub mod injection;
pub mod pii;
pub mod pipeline;
pub mod skeleton;
pub mod unicode;

pub use injection::{Category, InjectionReport, Rules};
pub use pii::{PiiKind, PiiSpan};
pub use pipeline::{Action, Guard, GuardConfig, Verdict};
