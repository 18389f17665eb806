//! What Sluice puts in front of the model, shared by the API and the worker so both count and
//! check a prompt the same way.
//!
//! - [`chat`]: tokenizer + chat template ([`chat::ChatCodec`]), so the API counts tokens
//!   exactly as the worker will, and the leak canary ([`chat::canary`]) the worker installs in
//!   a system prompt;
//! - [`structured`]: structured output (JSON Schema → token grammar, and the final check of the
//!   generated text).

pub mod chat;
pub mod structured;
