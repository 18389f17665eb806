//! Connection settings both binaries take, from flags or the environment.

use std::fmt;
use std::str::FromStr;

/// A string that never prints: `Debug` and `Display` show `***`. Use [`Secret::expose`] where the
/// value is really needed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings every Sluice process needs to reach the broker and the store.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonSettings {
    /// Redis URL (may carry a password).
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: Secret,

    /// RabbitMQ URL (may carry a password).
    #[arg(
        long,
        env = "SLUICE_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: Secret,

    /// Prefix of every queue, exchange and Redis key.
    #[arg(long, env = "SLUICE_NAMESPACE", default_value = "sluice", value_parser = parse_namespace)]
    pub namespace: String,

    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// How many times a job may be started before it fails with `attempts_exhausted` (workers
    /// that die mid-job cause redeliveries).
    #[arg(long, env = "SLUICE_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
}

/// A namespace is used verbatim in Redis keys and AMQP names, so it is kept to a safe alphabet.
pub fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err("namespace must be 1-64 characters of [A-Za-z0-9_-]".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        common: CommonSettings,
    }

    #[test]
    fn defaults_and_flags() {
        let p = Probe::try_parse_from(["x", "--namespace", "t-1"]).expect("parse");
        assert_eq!(p.common.namespace, "t-1");
        assert_eq!(p.common.redis_url.expose(), "redis://127.0.0.1:6379");
        assert_eq!(format!("{:?}", p.common.amqp_url), "Secret(***)");
        assert!(Probe::try_parse_from(["x", "--namespace", "a:b"]).is_err());
        assert!(Probe::try_parse_from(["x", "--max-attempts", "0"]).is_err());
    }
}
