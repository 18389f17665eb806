//! Connection settings both binaries take, from flags or the environment.

use std::fmt;
use std::path::{Path, PathBuf};
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
    /// Redis URL (may carry a password); with `--redis-cluster`, the URLs of some of the
    /// cluster's nodes, separated by commas (any one that answers finds the rest).
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: Secret,

    /// Redis is a Redis Cluster: every key lives in the hash slot of its tag (a job's id, a
    /// tenant, the namespace) and commands follow the cluster's redirections and failovers.
    #[arg(long, env = "SLUICE_REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,

    /// RabbitMQ URL (may carry a password).
    #[arg(
        long,
        env = "SLUICE_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: Secret,

    /// File holding the Redis URL (a mounted secret such as `/run/secrets/redis_url`), read at
    /// start instead of `--redis-url` so the password never sits in the environment.
    #[arg(long, env = "SLUICE_REDIS_URL_FILE", conflicts_with = "redis_url")]
    pub redis_url_file: Option<PathBuf>,

    /// File holding the RabbitMQ URL, read at start instead of `--amqp-url`.
    #[arg(long, env = "SLUICE_AMQP_URL_FILE", conflicts_with = "amqp_url")]
    pub amqp_url_file: Option<PathBuf>,

    /// Prefix of every queue, exchange and Redis key.
    #[arg(long, env = "SLUICE_NAMESPACE", default_value = "sluice", value_parser = parse_namespace)]
    pub namespace: String,

    /// How many shards the namespace's per-job indexes (queued, drained, in flight) are split
    /// into. One keeps the namespace's queue cap exact; more spread those writes over as many
    /// Redis Cluster slots, each shard holding its share of the cap (rounded up). Every
    /// process of a namespace must use the same count; a process with another refuses to start.
    #[arg(long, env = "SLUICE_QUEUE_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub queue_shards: u16,

    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Largest `max_tokens` a job may ask for: the API refuses more, and a worker checks the
    /// jobs it takes again (a message that skipped the API is held to the same limit).
    #[arg(long, env = "SLUICE_MAX_TOKENS_LIMIT", default_value_t = 8192)]
    pub max_tokens_limit: u32,

    /// How long finished jobs stay readable, in seconds.
    #[arg(long, env = "SLUICE_RESULT_TTL_SECS", default_value_t = 24 * 3600)]
    pub result_ttl_secs: u64,

    /// How many times a job may be started before it fails with `attempts_exhausted` (workers
    /// that die mid-job cause redeliveries).
    #[arg(long, env = "SLUICE_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,

    /// Where to serve Prometheus `/metrics` (a listener of its own, apart from the API port, so
    /// it can stay on an internal network). Off when unset.
    #[arg(long, env = "SLUICE_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// OTLP/HTTP endpoint for traces (for example `http://otel-collector:4318`). Export is off when
    /// unset; the W3C `traceparent` still travels with every job.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The service name traces carry.
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
}

/// A `*_FILE` secret that could not be used. The message names the setting and the file, never
/// what the file holds.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: cannot use {}: {reason}", path.display())]
pub struct SecretFileError {
    setting: &'static str,
    path: PathBuf,
    reason: String,
}

impl CommonSettings {
    /// Replaces `redis_url` and `amqp_url` with the contents of `--redis-url-file` and
    /// `--amqp-url-file` where those are set. Binaries call it once, right after parsing, so
    /// the rest of the code only ever sees `redis_url` and `amqp_url`.
    pub fn resolve_secrets(&mut self) -> Result<(), SecretFileError> {
        if let Some(path) = &self.redis_url_file {
            self.redis_url = read_secret_file("--redis-url-file (SLUICE_REDIS_URL_FILE)", path)?;
        }
        if let Some(path) = &self.amqp_url_file {
            self.amqp_url = read_secret_file("--amqp-url-file (SLUICE_AMQP_URL_FILE)", path)?;
        }
        Ok(())
    }
}

/// Reads a secret from a file, without the trailing newline (or other trailing whitespace) that
/// `echo` and editors leave. An empty file is an error: an empty URL is never what was meant.
pub fn read_secret_file(setting: &'static str, path: &Path) -> Result<Secret, SecretFileError> {
    let error = |reason: String| SecretFileError {
        setting,
        path: path.to_path_buf(),
        reason,
    };
    let contents = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let value = contents.trim_end();
    if value.is_empty() {
        return Err(error("the file is empty".to_string()));
    }
    Ok(Secret::new(value))
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

/// Where `docs/configuration.md` and a binary's settings disagree (see
/// [`configuration_doc_drift`]).
#[derive(Debug)]
pub struct ConfigDocDrift {
    /// Every environment variable the command (and its subcommands) reads.
    pub read: std::collections::BTreeSet<String>,
    /// Variables the command reads that the doc's sections do not name.
    pub undocumented: Vec<String>,
    /// `SLUICE_*` names the doc's sections list that the command does not read.
    pub unknown: Vec<String>,
}

/// Compares a binary's clap command with the sections "Both binaries" and `## {binary}` of
/// the configuration reference `doc`, so that each binary's test keeps the reference in step
/// with `--help`. A missing section is an error.
pub fn configuration_doc_drift(
    command: &clap::Command,
    doc: &str,
    binary: &str,
) -> Result<ConfigDocDrift, String> {
    use std::collections::BTreeSet;

    fn env_names(command: &clap::Command, names: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                names.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            env_names(sub, names);
        }
    }
    /// The text under `## {heading}`, up to the next `## ` heading.
    fn section<'a>(doc: &'a str, heading: &str) -> Result<&'a str, String> {
        let start = doc
            .find(&format!("\n## {heading}\n"))
            .ok_or_else(|| format!("docs/configuration.md has no section {heading:?}"))?
            + 1;
        let rest = &doc[start..];
        let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
        Ok(&rest[..end])
    }

    let mut read = BTreeSet::new();
    env_names(command, &mut read);
    let part = format!(
        "{}{}",
        section(doc, "Both binaries")?,
        section(doc, binary)?
    );
    // Every word of capitals, digits and underscores (variable names, whole).
    let documented: BTreeSet<&str> = part
        .split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    let undocumented = read
        .iter()
        .filter(|name| !documented.contains(name.as_str()))
        .cloned()
        .collect();
    let unknown = documented
        .iter()
        .filter(|w| w.starts_with("SLUICE_") && !read.contains(**w))
        .map(|w| w.to_string())
        .collect();
    Ok(ConfigDocDrift {
        read,
        undocumented,
        unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::ffi::OsStr;

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

    /// A file of its own per test (no tempfile crate here); removed by the caller.
    fn secret_file(name: &str, contents: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("sluice-settings-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write secret file");
        path
    }

    #[test]
    fn url_files_replace_the_urls() {
        let redis = secret_file("redis", "redis://sluice:pw1@redis:6379\n");
        let amqp = secret_file("amqp", "amqp://sluice:pw2@rabbitmq:5672/sluice\r\n");
        let mut p = Probe::try_parse_from([
            OsStr::new("x"),
            OsStr::new("--redis-url-file"),
            redis.as_os_str(),
            OsStr::new("--amqp-url-file"),
            amqp.as_os_str(),
        ])
        .expect("parse");
        // Until resolved, the defaults stand.
        assert_eq!(p.common.redis_url.expose(), "redis://127.0.0.1:6379");
        p.common.resolve_secrets().expect("resolve");
        assert_eq!(p.common.redis_url.expose(), "redis://sluice:pw1@redis:6379");
        assert_eq!(
            p.common.amqp_url.expose(),
            "amqp://sluice:pw2@rabbitmq:5672/sluice"
        );
        std::fs::remove_file(redis).expect("remove");
        std::fs::remove_file(amqp).expect("remove");
    }

    #[test]
    fn unreadable_or_empty_url_files_are_errors_naming_setting_and_file() {
        let missing = std::env::temp_dir().join("sluice-settings-no-such-file");
        let mut p = Probe::try_parse_from([
            OsStr::new("x"),
            OsStr::new("--amqp-url-file"),
            missing.as_os_str(),
        ])
        .expect("parse");
        let message = p
            .common
            .resolve_secrets()
            .expect_err("missing file")
            .to_string();
        assert!(message.contains("SLUICE_AMQP_URL_FILE"), "{message}");
        assert!(
            message.contains("sluice-settings-no-such-file"),
            "{message}"
        );

        let empty = secret_file("empty", "\n");
        let mut p = Probe::try_parse_from([
            OsStr::new("x"),
            OsStr::new("--redis-url-file"),
            empty.as_os_str(),
        ])
        .expect("parse");
        let message = p
            .common
            .resolve_secrets()
            .expect_err("empty file")
            .to_string();
        assert!(
            message.contains("SLUICE_REDIS_URL_FILE") && message.contains("empty"),
            "{message}"
        );
        std::fs::remove_file(empty).expect("remove");
    }

    #[test]
    fn a_url_and_its_file_together_are_refused() {
        let both = Probe::try_parse_from([
            "x",
            "--redis-url",
            "redis://a",
            "--redis-url-file",
            "/run/secrets/redis_url",
        ]);
        assert!(both.is_err());
        // The default value of --redis-url does not count as given.
        assert!(Probe::try_parse_from(["x", "--redis-url-file", "/run/secrets/redis_url"]).is_ok());
    }
}
