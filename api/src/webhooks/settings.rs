//! `sluice-api`'s webhook settings, flattened into [`crate::settings::ApiSettings`]: who may be
//! called although internal, when a failed delivery is retried, how long one attempt may take,
//! and whether this process delivers at all.

use std::time::Duration;

use clap::ArgAction;

use super::target::AllowEntry;

/// The most retry delays `--webhook-retry-delays` may list (each is a queue on the broker).
pub const MAX_RETRIES: usize = 32;

/// Every setting of the webhooks.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookSettings {
    /// Hosts, IP addresses or CIDRs (comma-separated) that webhook URLs may name, or resolve to,
    /// although they are private, loopback, link-local or otherwise internal; a URL whose host
    /// is listed may also use `http`.
    #[arg(long, env = "SLUICE_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Vec<AllowEntry>,

    /// Delays before the retries of a failed delivery, comma-separated, each a number with a
    /// unit (`ms`, `s`, `m`, `h`); when the attempt after the last delay fails, the delivery
    /// goes to the dead queue. Every API process of a deployment must use the same list.
    #[arg(
        long,
        env = "SLUICE_WEBHOOK_RETRY_DELAYS",
        default_value = "5s,5m,30m,2h,5h,10h,10h",
        value_parser = parse_retry_delays
    )]
    pub webhook_retry_delays: RetryDelays,

    /// Seconds one delivery attempt may take: resolving, connecting, sending and the answer's
    /// status line.
    #[arg(long, env = "SLUICE_WEBHOOK_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub webhook_timeout_secs: u64,

    /// Whether this process delivers webhooks (consumes the delivery queue). With `false` it
    /// still registers endpoints and enqueues events; other processes deliver them.
    #[arg(long, env = "SLUICE_WEBHOOK_DELIVERIES", default_value_t = true, action = ArgAction::Set)]
    pub webhook_deliveries: bool,
}

impl WebhookSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.webhook_timeout_secs)
    }
}

/// The delays before each retry, in order: the `n`-th is the TTL of retry queue `n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryDelays(Vec<Duration>);

impl RetryDelays {
    pub fn new(delays: Vec<Duration>) -> Result<Self, String> {
        if delays.is_empty() || delays.len() > MAX_RETRIES {
            return Err(format!("give 1 to {MAX_RETRIES} retry delays"));
        }
        Ok(Self(delays))
    }

    pub fn as_slice(&self) -> &[Duration] {
        &self.0
    }

    /// The delay before retry `n` (1-based), if there is one.
    pub fn before_retry(&self, n: usize) -> Option<Duration> {
        n.checked_sub(1).and_then(|i| self.0.get(i)).copied()
    }
}

/// `5s,5m,30m,2h` → the delays.
pub fn parse_retry_delays(s: &str) -> Result<RetryDelays, String> {
    let delays = s
        .split(',')
        .map(|part| parse_duration(part.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    RetryDelays::new(delays)
}

/// A duration such as `300ms`, `5s`, `30m` or `2h`: a whole number and a unit, from 1 ms up to
/// the longest message TTL RabbitMQ takes (2^32 - 1 ms, about 49 days).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let invalid = || format!("{s:?} is not a duration such as 300ms, 5s, 30m or 2h");
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(invalid()),
    };
    let ms = number
        .checked_mul(unit_ms)
        .filter(|ms| (1..=u64::from(u32::MAX)).contains(ms))
        .ok_or_else(|| format!("{s:?} is not between 1ms and {}ms", u32::MAX))?;
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("10h"), Ok(Duration::from_secs(36_000)));
        for bad in [
            "", "5", "s", "5 s", "5sec", "-5s", "1.5s", "0s", "0ms", "5d", "5S", "2000h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_schedule_is_standard_webhooks() {
        let delays = parse_retry_delays("5s,5m,30m,2h,5h,10h,10h").expect("parse");
        let secs: Vec<u64> = delays.as_slice().iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [5, 300, 1800, 7200, 18_000, 36_000, 36_000]);
        assert_eq!(delays.before_retry(1), Some(Duration::from_secs(5)));
        assert_eq!(delays.before_retry(7), Some(Duration::from_secs(36_000)));
        assert_eq!(delays.before_retry(0), None);
        assert_eq!(delays.before_retry(8), None);
        assert_eq!(
            parse_retry_delays(" 300ms , 600ms").map(|d| d.as_slice().len()),
            Ok(2)
        );
        assert!(parse_retry_delays("").is_err());
        assert!(parse_retry_delays("5s,,5s").is_err());
        assert!(parse_retry_delays(&vec!["1s"; 33].join(",")).is_err());
    }

    #[test]
    fn flags_and_defaults() {
        let settings = crate::ApiSettings::parse_from(["x", "--tokenizer", "m"]).expect("parse");
        let webhooks = settings.webhooks;
        assert!(webhooks.webhook_deliveries);
        assert!(webhooks.webhook_allow.is_empty());
        assert_eq!(webhooks.timeout(), Duration::from_secs(10));
        assert_eq!(webhooks.webhook_retry_delays.as_slice().len(), 7);
        let settings = crate::ApiSettings::parse_from([
            "x",
            "--tokenizer",
            "m",
            "--webhook-allow",
            "127.0.0.1,hooks.internal,10.0.0.0/8",
            "--webhook-retry-delays",
            "300ms,600ms",
            "--webhook-timeout-secs",
            "2",
            "--webhook-deliveries",
            "false",
        ])
        .expect("parse");
        let webhooks = settings.webhooks;
        assert_eq!(webhooks.webhook_allow.len(), 3);
        assert_eq!(
            webhooks.webhook_retry_delays.as_slice(),
            [Duration::from_millis(300), Duration::from_millis(600)]
        );
        assert_eq!(webhooks.timeout(), Duration::from_secs(2));
        assert!(!webhooks.webhook_deliveries);
        for bad in [
            ["--webhook-retry-delays", "5"],
            ["--webhook-timeout-secs", "0"],
            ["--webhook-allow", "bad host"],
        ] {
            let args = ["x", "--tokenizer", "m", bad[0], bad[1]];
            assert!(crate::ApiSettings::parse_from(args).is_err(), "{bad:?}");
        }
    }
}
