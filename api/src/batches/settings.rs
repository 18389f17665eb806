//! How batches run.

use std::time::Duration;

/// The batch runner (`/v1/batches`).
#[derive(Debug, Clone, clap::Args)]
pub struct BatchSettings {
    /// `on` or `off`: whether this API process drives batches (any replica may; each batch is
    /// driven by one at a time, under a lease in Redis). At least one replica must.
    #[arg(long, env = "SLUICE_BATCH_RUNNER", default_value = "on", value_parser = crate::settings::parse_on_off, action = clap::ArgAction::Set)]
    pub batch_runner: bool,
    /// A tenant's share of the batch lane: at most this many of its batch lines (times the
    /// tenant's `batch_weight`) are queued or running at once, across all its batches, so one
    /// tenant's large batch cannot starve another tenant's small one.
    #[arg(long, env = "SLUICE_BATCH_LANE_WINDOW", default_value_t = 32)]
    pub batch_lane_window: u32,
    /// How often a batch's driver looks at its jobs, in milliseconds.
    #[arg(long, env = "SLUICE_BATCH_POLL_MS", default_value_t = 100)]
    pub batch_poll_ms: u64,
    /// The longest completion window a batch may ask for, in hours.
    #[arg(long, env = "SLUICE_BATCH_MAX_WINDOW_HOURS", default_value_t = 24)]
    pub batch_max_window_hours: u64,
}

impl BatchSettings {
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.batch_poll_ms.max(10))
    }

    pub fn max_window_secs(&self) -> u64 {
        self.batch_max_window_hours.max(1) * 3600
    }
}
