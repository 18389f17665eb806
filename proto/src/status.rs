//! The job lifecycle and what a finished job reports.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ErrorBody;

/// `queued → running → succeeded | failed | cancelled | expired`. A queued job can also go
/// straight to `cancelled` or `expired`. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Expired,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            "expired" => JobStatus::Expired,
            _ => return None,
        })
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn or produced a stop sequence.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The model's context window was full.
    ContextLength,
    /// The client cancelled the job.
    Cancelled,
    /// The job's deadline passed.
    Deadline,
    /// The output guard withheld the output (it leaked the system prompt).
    ContentFilter,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens the worker took from its prefix cache instead of computing them (part of
    /// `prompt_tokens`; billed the same).
    #[serde(default)]
    pub cached_tokens: u32,
}

/// Milliseconds spent in each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timings {
    /// From acceptance by the API to the start of generation.
    pub queued_ms: u64,
    /// From the start of generation to the first generated token (prefill included).
    pub time_to_first_token_ms: u64,
    /// From the start of generation to its end.
    pub generation_ms: u64,
    /// `generation_ms` in microseconds (whole milliseconds hide most of a short job's
    /// generation; 0 from workers older than this field).
    #[serde(default)]
    pub generation_us: u64,
}

/// What a worker writes back for a job that generated (also a cancelled one, with the text it
/// had so far).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobResult {
    pub content: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

/// A job as a client sees it on `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub status: JobStatus,
    pub created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// How many times a worker started this job (more than 1 after a worker died mid-job).
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_round_trip() {
        for s in [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
            JobStatus::Expired,
        ] {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).expect("serialize"),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!(!JobStatus::Running.is_terminal());
        assert!(JobStatus::Expired.is_terminal());
    }
}
