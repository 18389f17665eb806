//! Batches: OpenAI's Batch API on Sluice's queue. A batch names an uploaded input file; the
//! [`runner`] of some API process (whichever holds the batch's lease) turns its lines into jobs
//! through the same submit path as `POST /v1/chat/completions`, in the `batch` class and a
//! bounded number at a time per tenant (the batch lane's fair share), collects each job's
//! result as a line of the output or error file, and writes both files when the batch ends:
//! completed, cancelled or expired. Its state lives in Redis ([`store`]), so another replica
//! resumes a batch whose driver died.

pub mod runner;
mod settings;
pub mod store;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub use settings::BatchSettings;

/// OpenAI's batch status machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::Failed,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BatchStatus::Failed
                | BatchStatus::Completed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }

    /// The webhook event a batch ending in this status sends.
    pub fn event_type(self) -> Option<&'static str> {
        match self {
            BatchStatus::Completed => Some("batch.completed"),
            BatchStatus::Failed => Some("batch.failed"),
            BatchStatus::Expired => Some("batch.expired"),
            BatchStatus::Cancelled => Some("batch.cancelled"),
            _ => None,
        }
    }
}

/// How many of a batch's requests ended, and how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RequestCounts {
    /// Lines in the input file.
    pub total: u64,
    /// Lines with a completion in the output file.
    pub completed: u64,
    /// Lines in the error file (refused, failed, cancelled or expired).
    pub failed: u64,
}

/// Why a batch failed before it ran, in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchErrors {
    /// Always `list`.
    #[schema(pattern = "^list$")]
    pub object: String,
    pub data: Vec<BatchError>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchError {
    pub code: String,
    pub message: String,
    #[schema(value_type = Option<String>)]
    pub param: Option<String>,
    #[schema(value_type = Option<u64>)]
    pub line: Option<u64>,
}

/// A batch, in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Batch {
    /// `batch_` and 32 hexadecimal digits.
    pub id: String,
    /// Always `batch`.
    #[schema(pattern = "^batch$")]
    pub object: String,
    /// Always `/v1/chat/completions`.
    pub endpoint: String,
    #[schema(value_type = Option<BatchErrors>)]
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    /// As given: `24h`, or a shorter window such as `1h` or `30m`.
    pub completion_window: String,
    pub status: BatchStatus,
    /// The completions, once the batch ended with at least one.
    #[schema(value_type = Option<String>)]
    pub output_file_id: Option<String>,
    /// The lines that did not complete, once the batch ended with at least one.
    #[schema(value_type = Option<String>)]
    pub error_file_id: Option<String>,
    /// Unix seconds, as every time below.
    pub created_at: u64,
    #[schema(value_type = Option<u64>)]
    pub in_progress_at: Option<u64>,
    pub expires_at: u64,
    #[schema(value_type = Option<u64>)]
    pub finalizing_at: Option<u64>,
    #[schema(value_type = Option<u64>)]
    pub completed_at: Option<u64>,
    #[schema(value_type = Option<u64>)]
    pub failed_at: Option<u64>,
    #[schema(value_type = Option<u64>)]
    pub expired_at: Option<u64>,
    #[schema(value_type = Option<u64>)]
    pub cancelling_at: Option<u64>,
    #[schema(value_type = Option<u64>)]
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    /// Up to 16 string pairs, as given.
    #[schema(value_type = Option<std::collections::HashMap<String, String>>)]
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
}

/// A new batch id: `batch_` and a UUID v7's 32 hexadecimal digits.
pub fn new_batch_id() -> String {
    format!("batch_{}", Uuid::now_v7().simple())
}

/// Whether `id` looks like a batch id (anything else is a 404 without a lookup).
pub fn plausible_batch_id(id: &str) -> bool {
    id.strip_prefix("batch_")
        .is_some_and(|rest| rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A completion window: `<n>h` or `<n>m`, from one minute up to `max_secs`; its length in
/// seconds.
pub fn parse_window(window: &str, max_secs: u64) -> Result<u64, String> {
    let (number, scale) = if let Some(hours) = window.strip_suffix('h') {
        (hours, 3600)
    } else if let Some(minutes) = window.strip_suffix('m') {
        (minutes, 60)
    } else {
        return Err(format!(
            "completion_window {window:?} is not like 24h or 30m"
        ));
    };
    if number.is_empty() || number.len() > 4 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "completion_window {window:?} is not like 24h or 30m"
        ));
    }
    let n: u64 = number
        .parse()
        .map_err(|_| format!("completion_window {window:?} is not like 24h or 30m"))?;
    let secs = n.saturating_mul(scale);
    if secs < 60 || secs > max_secs {
        return Err(format!(
            "completion_window must be from 1m to {}h, not {window:?}",
            max_secs / 3600
        ));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_ids() {
        assert_eq!(parse_window("24h", 86_400), Ok(86_400));
        assert_eq!(parse_window("30m", 86_400), Ok(1_800));
        for bad in [
            "25h",
            "0h",
            "",
            "h",
            "1d",
            "-1h",
            "+1h",
            "1.5h",
            "99999999999999999999h",
            "\u{80}",
            "é",
            "1é",
        ] {
            assert!(parse_window(bad, 86_400).is_err(), "{bad}");
        }
        assert!(plausible_batch_id(&new_batch_id()));
        assert!(!plausible_batch_id("batch_../x"));
        for status in BatchStatus::ALL {
            assert_eq!(BatchStatus::parse(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).expect("serializes"),
                serde_json::json!(status.as_str())
            );
        }
    }
}
