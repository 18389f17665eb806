//! One line of a batch input file: `{"custom_id", "method": "POST", "url":
//! "/v1/chat/completions", "body": {...}}` (OpenAI's format), checked the way
//! `POST /v1/chat/completions` checks its body, and [`LineChecker`], which splits an upload into
//! lines as it streams in and checks each.

use std::collections::HashSet;

use serde::Deserialize;
use sluice_proto::ErrorCode;

use crate::error::ApiError;
use crate::extract::SubmitWire;
use crate::routes::openai::ChatCompletionRequest;
use crate::validate::{Limits, ValidatedJob, parse_json, validate};

/// The one endpoint a batch line may name.
pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";

/// The longest `custom_id`.
const MAX_CUSTOM_ID: usize = 512;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireLine {
    custom_id: String,
    method: String,
    url: String,
    body: Box<serde_json::value::RawValue>,
}

/// A line that passed: its `custom_id` and the job it describes.
#[derive(Debug)]
pub struct BatchLine {
    pub custom_id: String,
    pub job: ValidatedJob,
}

/// Parses and checks one line (without its newline). The error names what is wrong; the
/// caller adds the line number.
pub fn parse_line(line: &[u8], served_model: &str, limits: &Limits) -> Result<BatchLine, ApiError> {
    let wire: WireLine = parse_json(line)?;
    if wire.custom_id.is_empty() || wire.custom_id.len() > MAX_CUSTOM_ID {
        return Err(ApiError::client(
            ErrorCode::InvalidParameter,
            format!("custom_id must be 1 to {MAX_CUSTOM_ID} bytes"),
        ));
    }
    if wire.method != "POST" {
        return Err(ApiError::client(
            ErrorCode::InvalidParameter,
            format!("method must be POST, not {:?}", wire.method),
        ));
    }
    if wire.url != CHAT_COMPLETIONS {
        return Err(ApiError::client(
            ErrorCode::InvalidParameter,
            format!(
                "url must be {CHAT_COMPLETIONS:?} (the one endpoint batches run), not {:?}",
                wire.url
            ),
        ));
    }
    let body: ChatCompletionRequest = parse_json(wire.body.get().as_bytes())?;
    let (request, delivery) = body.into_request(served_model)?;
    if delivery.stream {
        return Err(ApiError::client(
            ErrorCode::UnsupportedParameter,
            "stream is not supported in a batch: results go to the output file",
        ));
    }
    if request.session_id.is_some() {
        return Err(ApiError::client(
            ErrorCode::UnsupportedParameter,
            "session_id is not supported in a batch: its lines run in any order",
        ));
    }
    Ok(BatchLine {
        custom_id: wire.custom_id,
        job: validate(request, limits)?,
    })
}

/// Prefixes a refusal's message with `line {n}: `, keeping its code.
pub fn at_line(number: u64, error: ApiError) -> ApiError {
    let mut body = error.body();
    body.message = format!("line {number}: {}", body.message);
    ApiError::Client(body)
}

/// Splits a stream of bytes into lines and checks each: valid, within the byte limit of one
/// request body, its `custom_id` unique in the file, and at most `max_lines` of them. Blank
/// lines are skipped.
pub struct LineChecker<'a> {
    served_model: &'a str,
    limits: &'a Limits,
    max_line_bytes: usize,
    max_lines: u64,
    partial: Vec<u8>,
    /// Lines seen (blank ones included: the numbers are the file's own).
    number: u64,
    lines: u64,
    seen: HashSet<String>,
}

impl<'a> LineChecker<'a> {
    pub fn new(
        served_model: &'a str,
        limits: &'a Limits,
        max_line_bytes: usize,
        max_lines: u64,
    ) -> Self {
        Self {
            served_model,
            limits,
            max_line_bytes,
            max_lines,
            partial: Vec::new(),
            number: 0,
            lines: 0,
            seen: HashSet::new(),
        }
    }

    /// Checks every line `chunk` completes; keeps the rest for the next chunk.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                self.check(&rest[..end])?;
            } else {
                self.partial.extend_from_slice(&rest[..end]);
                let line = std::mem::take(&mut self.partial);
                self.check(&line)?;
            }
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > self.max_line_bytes {
            return Err(self.too_long(self.number + 1));
        }
        Ok(())
    }

    /// Checks the last line (one without a newline) and returns the number of lines.
    pub fn finish(&mut self) -> Result<u64, ApiError> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.check(&line)?;
        }
        if self.lines == 0 {
            return Err(ApiError::client(
                ErrorCode::InvalidRequest,
                "the file has no lines: a batch input file holds one request per line",
            ));
        }
        Ok(self.lines)
    }

    fn too_long(&self, number: u64) -> ApiError {
        ApiError::client(
            ErrorCode::PayloadTooLarge,
            format!(
                "line {number}: longer than {} bytes, the limit of one request",
                self.max_line_bytes
            ),
        )
    }

    fn check(&mut self, line: &[u8]) -> Result<(), ApiError> {
        self.number += 1;
        let number = self.number;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        if line.len() > self.max_line_bytes {
            return Err(self.too_long(number));
        }
        self.lines += 1;
        if self.lines > self.max_lines {
            return Err(ApiError::client(
                ErrorCode::PayloadTooLarge,
                format!("the file has more than {} lines", self.max_lines),
            ));
        }
        let parsed =
            parse_line(line, self.served_model, self.limits).map_err(|e| at_line(number, e))?;
        if !self.seen.insert(parsed.custom_id) {
            return Err(ApiError::client(
                ErrorCode::InvalidParameter,
                format!("line {number}: custom_id is not unique in the file"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> Limits {
        Limits {
            max_tokens_limit: 4096,
            max_messages: 8,
            max_message_chars: 1000,
            default_timeout: Duration::from_secs(60),
            max_timeout: Duration::from_secs(600),
            completion_wait: Duration::from_secs(1),
            max_queued_jobs: None,
            session_ttl: Duration::from_secs(60),
            session_max_messages: 10,
            session_max_tokens: 1000,
        }
    }

    fn line(id: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"max_tokens":4}}}}"#
        )
    }

    fn check_all(content: &str, chunk: usize) -> Result<u64, ApiError> {
        let limits = limits();
        let mut checker = LineChecker::new("m", &limits, 4096, 3);
        for piece in content.as_bytes().chunks(chunk) {
            checker.feed(piece)?;
        }
        checker.finish()
    }

    fn refusal(content: &str) -> (ErrorCode, String) {
        let body = check_all(content, 7).expect_err("refused").body();
        (body.code, body.message)
    }

    #[test]
    fn lines_split_across_chunks_are_checked_whole() {
        let file = format!("{}\n\n{}\r\n{}", line("a"), line("b"), line("c"));
        for chunk in [1, 5, 64, 10_000] {
            assert_eq!(check_all(&file, chunk).expect("valid"), 3, "chunk {chunk}");
        }
    }

    #[test]
    fn a_bad_line_is_named() {
        let (code, message) = refusal(&format!("{}\n{}\n", line("a"), line("a")));
        assert_eq!(code, ErrorCode::InvalidParameter);
        assert!(message.starts_with("line 2: custom_id"), "{message}");

        let (code, message) = refusal(&format!("{}\nnot json\n", line("a")));
        assert_eq!(code, ErrorCode::InvalidJson);
        assert!(message.starts_with("line 2: "), "{message}");

        let wrong_url = line("b").replace("/v1/chat/completions", "/v1/embeddings");
        let (code, message) = refusal(&format!("{}\n{wrong_url}\n", line("a")));
        assert_eq!(code, ErrorCode::InvalidParameter);
        assert!(message.contains("line 2: url"), "{message}");

        let streamed = line("b").replace(r#""max_tokens":4"#, r#""max_tokens":4,"stream":true"#);
        assert_eq!(refusal(&streamed).0, ErrorCode::UnsupportedParameter);

        let other_model = line("b").replace(r#""model":"m""#, r#""model":"gpt-4o""#);
        assert_eq!(refusal(&other_model).0, ErrorCode::ModelNotFound);

        let too_many = format!(
            "{}\n{}\n{}\n{}\n",
            line("a"),
            line("b"),
            line("c"),
            line("d")
        );
        assert_eq!(refusal(&too_many).0, ErrorCode::PayloadTooLarge);

        assert_eq!(refusal("\n\n").0, ErrorCode::InvalidRequest);
        let long = format!(r#"{{"custom_id":"{}"}}"#, "x".repeat(5000));
        let (code, message) = refusal(&long);
        assert_eq!(code, ErrorCode::PayloadTooLarge);
        assert!(message.starts_with("line 1: "), "{message}");
    }
}
