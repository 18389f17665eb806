//! `sluice-api`'s settings and command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::tenant::TenantPolicy;
use clap::builder::TypedValueParser;
use clap::{ArgAction, Parser, Subcommand};
use sluice_guard::pipeline::{InjectionAction, PiiAction};
use sluice_shared::{CommonSettings, Secret};

use crate::client_ip::Cidr;
use crate::validate::Limits;

/// What `sluice-api` was asked to do: `serve` (the default, also with no subcommand),
/// `keys ...` or `guard ...`.
#[derive(Debug)]
pub enum Invocation {
    Serve(Box<ApiSettings>),
    Keys(Box<KeysCommand>),
    Guard(GuardCommand),
}

#[derive(Debug, Parser)]
#[command(
    name = "sluice-api",
    version,
    about = "Sluice's HTTP API tier (subcommands: serve, keys, guard)"
)]
struct ServeCli {
    #[command(flatten)]
    settings: ApiSettings,
}

#[derive(Debug, Parser)]
#[command(name = "sluice-api")]
struct ToolCli {
    #[command(subcommand)]
    command: Tool,
}

#[derive(Debug, Subcommand)]
enum Tool {
    /// Manage API keys.
    #[command(subcommand)]
    Keys(Box<KeysCommand>),
    /// Guard tools for operators.
    #[command(subcommand)]
    Guard(GuardCommand),
}

impl Invocation {
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        match args.get(1).and_then(|a| a.to_str()) {
            Some("keys" | "guard") => ToolCli::try_parse_from(args).map(|c| match c.command {
                Tool::Keys(k) => Invocation::Keys(k),
                Tool::Guard(g) => Invocation::Guard(g),
            }),
            Some("serve") => {
                args.remove(1);
                ServeCli::try_parse_from(args).map(|c| Invocation::Serve(Box::new(c.settings)))
            }
            _ => ServeCli::try_parse_from(args).map(|c| Invocation::Serve(Box::new(c.settings))),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum GuardCommand {
    /// Reads `{"text": "..."}` lines on stdin and writes one verdict line per input on stdout:
    /// `action`, `categories`, `pii` (`{kind, start, end}` in characters), `redacted`.
    Check {
        /// Extra injection rules (TOML, same format as the built-in file).
        #[arg(long, env = "SLUICE_INJECTION_RULES")]
        rules: Option<PathBuf>,
        /// Score at which a category fires.
        #[arg(long, default_value_t = sluice_guard::injection::DEFAULT_THRESHOLD)]
        threshold: f32,
        /// Classifier score at which `classifier` fires.
        #[arg(long, default_value_t = sluice_guard::pipeline::DEFAULT_CLASSIFIER_THRESHOLD)]
        classifier_threshold: f32,
        #[command(flatten)]
        classifier: ClassifierSettings,
    },
}

/// The learned injection classifier (`sluice_guard::classifier`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClassifierSettings {
    /// Directory holding the injection classifier's encoder (config.json, tokenizer.json,
    /// model.safetensors; `scripts/fetch-guard-model` installs it). The API refuses to start
    /// when it is missing or corrupt, unless the classifier is turned off.
    #[arg(long, env = "SLUICE_GUARD_MODEL")]
    pub guard_model: Option<PathBuf>,
    /// `on` or `off`: `off` runs the guard on its rules alone (an explicit choice; the
    /// classifier never turns itself off).
    #[arg(long, env = "SLUICE_GUARD_CLASSIFIER", default_value = "on", value_parser = parse_on_off, action = ArgAction::Set)]
    pub guard_classifier: bool,
    /// The served model's GGUF (`scripts/fetch-test-model` installs it), to add the probe over
    /// its hidden states to the classifier (`sluice_guard::classifier::probe`): it catches
    /// more attacks, most of all in languages other than English, at several times the
    /// classifier's cost. The file must be the one the probe was trained on; a missing or
    /// other file stops the API at start. Unset or empty, the classifier runs without it.
    // Any path, the empty one included (clap's own path parser refuses it): empty is no probe.
    #[arg(
        long,
        env = "SLUICE_GUARD_PROBE_MODEL",
        value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from)
    )]
    pub guard_probe_model: Option<PathBuf>,
}

pub(crate) fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?} is not one of on, off")),
    }
}

impl ClassifierSettings {
    /// Loads the classifier, or `None` when it is off. On, without a directory or with a
    /// missing or corrupt file, it is an error naming what is wrong.
    pub fn load(&self) -> Result<Option<sluice_guard::classifier::Classifier>, anyhow::Error> {
        if !self.guard_classifier {
            return Ok(None);
        }
        let Some(dir) = &self.guard_model else {
            anyhow::bail!(
                "guard classifier: no encoder directory given (--guard-model or \
                 SLUICE_GUARD_MODEL; scripts/fetch-guard-model installs one); set \
                 --guard-classifier off to run the guard on its rules alone"
            );
        };
        let classifier = sluice_guard::classifier::Classifier::load(dir)?;
        Ok(Some(match self.probe_model() {
            Some(gguf) => classifier.with_probe(gguf)?,
            None => classifier,
        }))
    }

    /// The probe's GGUF; an empty value (`SLUICE_GUARD_PROBE_MODEL=`, how a compose file that
    /// sets a default turns it off) is none.
    pub fn probe_model(&self) -> Option<&std::path::Path> {
        self.guard_probe_model
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
    }
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints the secret (it starts with `sk-`) once, on its own line on stdout.
    Create {
        /// The tenant the key belongs to.
        #[arg(long, value_parser = sluice_shared::settings::parse_namespace)]
        tenant: String,
        /// A label for the key.
        #[arg(long, default_value = "default")]
        name: String,
        /// `user` or `admin`.
        #[arg(long, default_value = "user")]
        role: crate::principal::Role,
        /// Expire the key after this many seconds.
        #[arg(long)]
        expires_in_secs: Option<u64>,
        #[command(flatten)]
        common: CommonSettings,
    },
    /// Revoke a key by its id (the part between `sk-` and `_`); every replica refuses it from
    /// the next request on.
    Revoke {
        key_id: String,
        #[command(flatten)]
        common: CommonSettings,
    },
}

/// JWT bearer tokens, accepted next to API keys when a key source is configured.
#[derive(Debug, Clone, clap::Args)]
pub struct JwtSettings {
    /// HS256 shared secret.
    #[arg(long, env = "SLUICE_JWT_HS256_SECRET")]
    pub jwt_hs256_secret: Option<Secret>,
    /// PEM public key (RSA for RS256, EC P-256 for ES256).
    #[arg(long, env = "SLUICE_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWKS file (RS256/ES256 keys selected by `kid`).
    #[arg(long, env = "SLUICE_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// Required `iss`.
    #[arg(long, env = "SLUICE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud`.
    #[arg(long, env = "SLUICE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Claim holding the tenant.
    #[arg(long, env = "SLUICE_JWT_TENANT_CLAIM", default_value = "tenant")]
    pub jwt_tenant_claim: String,
}

/// The policy of tenants that have no override (admins override per tenant).
#[derive(Debug, Clone, clap::Args)]
pub struct DefaultPolicySettings {
    /// Requests per second per key or JWT subject (0 = unlimited).
    #[arg(long, env = "SLUICE_DEFAULT_REQUESTS_PER_SECOND", default_value_t = 50)]
    pub default_requests_per_second: u32,
    /// Requests per minute per key or JWT subject (0 = unlimited).
    #[arg(
        long,
        env = "SLUICE_DEFAULT_REQUESTS_PER_MINUTE",
        default_value_t = 1200
    )]
    pub default_requests_per_minute: u32,
    /// Tokens per tenant per UTC day (0 = unlimited).
    #[arg(
        long,
        env = "SLUICE_DEFAULT_TOKENS_PER_DAY",
        default_value_t = 2_000_000
    )]
    pub default_tokens_per_day: u64,
    /// Tokens per tenant per UTC month (0 = unlimited).
    #[arg(
        long,
        env = "SLUICE_DEFAULT_TOKENS_PER_MONTH",
        default_value_t = 40_000_000
    )]
    pub default_tokens_per_month: u64,
    /// Jobs queued plus running per tenant (0 = unlimited).
    #[arg(long, env = "SLUICE_DEFAULT_MAX_ACTIVE_JOBS", default_value_t = 64)]
    pub default_max_active_jobs: u32,
    /// Jobs waiting in the queue per tenant (0 = unlimited).
    #[arg(long, env = "SLUICE_DEFAULT_MAX_QUEUED_JOBS", default_value_t = 1000)]
    pub default_max_queued_jobs: u32,
    /// Whether clients may send `system` messages.
    #[arg(long, env = "SLUICE_DEFAULT_ALLOW_SYSTEM_MESSAGES", default_value_t = true, action = ArgAction::Set)]
    pub default_allow_system_messages: bool,
    /// `block`, `flag` or `off`.
    #[arg(long, env = "SLUICE_DEFAULT_INJECTION_ACTION", default_value = "block", value_parser = parse_injection_action)]
    pub default_injection_action: InjectionAction,
    /// Score at which an injection category fires.
    #[arg(long, env = "SLUICE_DEFAULT_INJECTION_THRESHOLD", default_value_t = sluice_guard::injection::DEFAULT_THRESHOLD)]
    pub default_injection_threshold: f32,
    /// Learned-classifier score at which an input counts as an injection (0.5: at most 1 %
    /// false positives on the classifier's validation split).
    #[arg(long, env = "SLUICE_DEFAULT_CLASSIFIER_THRESHOLD", default_value_t = sluice_guard::pipeline::DEFAULT_CLASSIFIER_THRESHOLD)]
    pub default_classifier_threshold: f32,
    /// Lower edge of the classifier's grey band (unset: no band): a job scored from here up to
    /// the classifier threshold is judged by the served model before it generates.
    #[arg(long, env = "SLUICE_DEFAULT_INJECTION_JUDGE_FROM", value_parser = parse_unit_score)]
    pub default_injection_judge_from: Option<f32>,
    /// `redact`, `reject` or `off`.
    #[arg(long, env = "SLUICE_DEFAULT_PII_ACTION", default_value = "redact", value_parser = parse_pii_action)]
    pub default_pii_action: PiiAction,
}

fn parse_injection_action(s: &str) -> Result<InjectionAction, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?} is not one of block, flag, off"))
}

fn parse_unit_score(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a score between 0 and 1")),
    }
}

fn parse_pii_action(s: &str) -> Result<PiiAction, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?} is not one of redact, reject, off"))
}

impl DefaultPolicySettings {
    pub fn policy(&self) -> TenantPolicy {
        let limit32 = |v: u32| (v > 0).then_some(v);
        let limit64 = |v: u64| (v > 0).then_some(v);
        TenantPolicy {
            requests_per_second: limit32(self.default_requests_per_second),
            requests_per_minute: limit32(self.default_requests_per_minute),
            tokens_per_day: limit64(self.default_tokens_per_day),
            tokens_per_month: limit64(self.default_tokens_per_month),
            max_active_jobs: limit32(self.default_max_active_jobs),
            max_queued_jobs: limit32(self.default_max_queued_jobs),
            allow_system_messages: self.default_allow_system_messages,
            injection_action: self.default_injection_action,
            injection_threshold: self.default_injection_threshold,
            classifier_threshold: self.default_classifier_threshold,
            injection_judge_from: self.default_injection_judge_from,
            pii_action: self.default_pii_action,
            // Per tenant only (an admin registers it); no deployment-wide default.
            required_output_schema: None,
            default_priority: sluice_proto::Priority::Interactive,
            batch_weight: 1,
            prefix_cache: true,
            classify_system_messages: true,
        }
    }
}

/// Everything `sluice-api serve` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiSettings {
    #[command(flatten)]
    pub common: CommonSettings,

    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "SLUICE_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// The served model's `.gguf` file or directory: its tokenizer and chat template count
    /// prompt tokens here exactly as the worker will (context limit, quota reservation).
    #[arg(long, env = "SLUICE_TOKENIZER")]
    pub tokenizer: PathBuf,

    /// Largest request body, in bytes.
    #[arg(long, env = "SLUICE_BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,

    /// Most messages in one job.
    #[arg(long, env = "SLUICE_MAX_MESSAGES", default_value_t = 256)]
    pub max_messages: usize,

    /// Longest message, in characters.
    #[arg(long, env = "SLUICE_MAX_MESSAGE_CHARS", default_value_t = 32 * 1024)]
    pub max_message_chars: usize,

    /// A job's deadline (queue plus run) when the client gives none, in seconds.
    #[arg(long, env = "SLUICE_JOB_TIMEOUT_SECS", default_value_t = 600)]
    pub job_timeout_secs: u64,

    /// The longest deadline a client may ask for, in seconds.
    #[arg(long, env = "SLUICE_MAX_JOB_TIMEOUT_SECS", default_value_t = 3600)]
    pub max_job_timeout_secs: u64,

    /// How long `POST /v1/chat/completions` (not streaming) waits for its job before it
    /// answers 202 with the job's id to poll, in seconds.
    #[arg(long, env = "SLUICE_COMPLETION_WAIT_SECS", default_value_t = 120)]
    pub completion_wait_secs: u64,

    /// Jobs waiting in the queue across all tenants; past it submits get 429 `queue_full`
    /// with a `Retry-After` from the measured drain rate (0 = unlimited).
    #[arg(long, env = "SLUICE_MAX_QUEUED_JOBS", default_value_t = 10_000)]
    pub max_queued_jobs: u32,

    /// How long a session's history lives after its last turn, in seconds.
    #[arg(long, env = "SLUICE_SESSION_TTL_SECS", default_value_t = 24 * 3600)]
    pub session_ttl_secs: u64,

    /// Messages a session keeps (oldest dropped first; the system prompt is kept apart).
    #[arg(long, env = "SLUICE_SESSION_MAX_MESSAGES", default_value_t = 40)]
    pub session_max_messages: u32,

    /// Tokens of history put before a new turn at most (oldest messages dropped first).
    #[arg(long, env = "SLUICE_SESSION_MAX_TOKENS", default_value_t = 4096)]
    pub session_max_tokens: usize,

    /// Grace period for in-flight requests on SIGTERM, in seconds.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Seconds a connection may take to send a request's headers, and may sit idle between
    /// requests; then it is closed (slow or silent clients hold nothing for long).
    #[arg(long, env = "SLUICE_HEADER_READ_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_read_timeout_secs: u64,

    /// Seconds a request may take to send its whole body; then it is refused (400) and the
    /// connection closed.
    #[arg(long, env = "SLUICE_BODY_READ_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_read_timeout_secs: u64,

    /// Open client connections at most; past it, new connections wait in the listen backlog.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// Open connections at most from one client address (the TCP peer: behind a load balancer,
    /// set 0 and cap per client there); past it, a new connection gets a 429 and is closed
    /// (0 = no per-address cap).
    #[arg(
        long,
        env = "SLUICE_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = 1024
    )]
    pub max_connections_per_client: u64,

    /// Requests per second per client IP (0 = unlimited).
    #[arg(long, env = "SLUICE_IP_REQUESTS_PER_SECOND", default_value_t = 100)]
    pub ip_requests_per_second: u32,

    /// Requests per minute per client IP (0 = unlimited).
    #[arg(long, env = "SLUICE_IP_REQUESTS_PER_MINUTE", default_value_t = 3000)]
    pub ip_requests_per_minute: u32,

    /// Proxies whose `X-Forwarded-For` is believed (comma-separated CIDRs).
    #[arg(long, env = "SLUICE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<Cidr>,

    /// Write client addresses to the audit log as their /24 (IPv4) or /48 (IPv6).
    #[arg(long, env = "SLUICE_ANONYMIZE_IPS", default_value_t = true, action = ArgAction::Set)]
    pub anonymize_ips: bool,

    /// Extra injection rules (TOML, same format as the built-in file).
    #[arg(long, env = "SLUICE_INJECTION_RULES")]
    pub injection_rules: Option<PathBuf>,

    #[command(flatten)]
    pub classifier: ClassifierSettings,

    #[command(flatten)]
    pub policy: DefaultPolicySettings,

    #[command(flatten)]
    pub jwt: JwtSettings,

    #[command(flatten)]
    pub webhooks: crate::webhooks::WebhookSettings,

    #[command(flatten)]
    pub files: crate::files::FileSettings,

    #[command(flatten)]
    pub batches: crate::batches::BatchSettings,
}

impl ApiSettings {
    /// Parses settings from an explicit argument list (tests hand in their own; the process
    /// environment still supplies unset values).
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            settings: ApiSettings,
        }
        Only::try_parse_from(args).map(|o| o.settings)
    }
}

impl ApiSettings {
    /// The limits a submit is checked against.
    pub fn limits(&self) -> Limits {
        use std::time::Duration;
        let s = self;
        Limits {
            max_tokens_limit: s.common.max_tokens_limit,
            max_messages: s.max_messages,
            max_message_chars: s.max_message_chars,
            default_timeout: Duration::from_secs(s.job_timeout_secs),
            max_timeout: Duration::from_secs(s.max_job_timeout_secs),
            completion_wait: Duration::from_secs(s.completion_wait_secs),
            max_queued_jobs: (s.max_queued_jobs > 0).then_some(s.max_queued_jobs),
            session_ttl: Duration::from_secs(s.session_ttl_secs),
            session_max_messages: s.session_max_messages,
            session_max_tokens: s.session_max_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_is_the_default_and_keys_parse() {
        for args in [
            vec!["sluice-api", "--addr", "127.0.0.1:0", "--tokenizer", "m"],
            vec![
                "sluice-api",
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--tokenizer",
                "m",
            ],
        ] {
            let inv = Invocation::parse_from(args).expect("parse");
            assert!(matches!(inv, Invocation::Serve(s) if s.addr.port() == 0));
        }
        let inv = Invocation::parse_from(["sluice-api", "keys", "create", "--tenant", "acme"])
            .expect("parse");
        assert!(matches!(inv, Invocation::Keys(k) if matches!(*k, KeysCommand::Create { .. })));
        let inv = Invocation::parse_from(["sluice-api", "guard", "check"]).expect("parse");
        assert!(matches!(inv, Invocation::Guard(GuardCommand::Check { .. })));
        assert!(
            Invocation::parse_from(["sluice-api", "keys", "create", "--tenant", "a b"]).is_err()
        );
    }

    #[test]
    fn defaults() {
        let s = ApiSettings::parse_from(["x", "--tokenizer", "m"]).expect("parse");
        assert_eq!(s.common.max_tokens_limit, 8192);
        assert_eq!(s.body_limit_bytes, 65536);
        assert!(s.anonymize_ips);
        assert_eq!(s.policy.policy().tokens_per_day, Some(2_000_000));
        let s = ApiSettings::parse_from([
            "x",
            "--tokenizer",
            "m",
            "--trusted-proxies",
            "10.0.0.0/8,::1",
            "--default-tokens-per-day",
            "0",
            "--default-pii-action",
            "reject",
            "--anonymize-ips",
            "false",
        ])
        .expect("parse");
        assert_eq!(s.trusted_proxies.len(), 2);
        assert_eq!(s.policy.policy().tokens_per_day, None);
        assert_eq!(s.policy.policy().pii_action, PiiAction::Reject);
        assert!(!s.anonymize_ips);
        assert!(
            ApiSettings::parse_from(["x"]).is_err(),
            "tokenizer is required"
        );
    }

    #[test]
    fn the_classifier_is_off_only_when_asked() {
        let parse = |value: &str| {
            ApiSettings::parse_from(["x", "--tokenizer", "m", "--guard-classifier", value])
                .map(|s| s.classifier.guard_classifier)
        };
        assert!(parse("on").expect("on"));
        assert!(!parse("off").expect("off"));
        assert!(parse("false").is_err());
        let on = ClassifierSettings {
            guard_model: None,
            guard_classifier: true,
            guard_probe_model: None,
        };
        let error = on.load().expect_err("on without a directory");
        assert!(error.to_string().contains("--guard-model"), "{error}");
        let off = ClassifierSettings {
            guard_model: None,
            guard_classifier: false,
            guard_probe_model: None,
        };
        assert!(off.load().expect("off").is_none());
    }

    #[test]
    fn an_empty_probe_path_is_no_probe() {
        let parsed = |extra: &[&str]| {
            let args = ["x", "--tokenizer", "m"].iter().chain(extra);
            ApiSettings::parse_from(args)
                .map(|s| s.classifier.probe_model().map(std::path::Path::to_path_buf))
        };
        assert_eq!(parsed(&[]).expect("unset"), None);
        assert_eq!(parsed(&["--guard-probe-model", ""]).expect("empty"), None);
        assert_eq!(
            parsed(&["--guard-probe-model", "/m/p.gguf"]).expect("a path"),
            Some(PathBuf::from("/m/p.gguf"))
        );
    }

    /// `docs/configuration.md` lists every variable `sluice-api serve` reads (its `--help`), and
    /// its api part (the sections "Both binaries" and "sluice-api") names no `SLUICE_*`
    /// variable the binary does not read, so the reference cannot drift from the code.
    #[test]
    fn configuration_doc_matches_the_serve_settings() {
        use clap::CommandFactory;

        let drift = sluice_shared::settings::configuration_doc_drift(
            &ServeCli::command(),
            include_str!("../../docs/configuration.md"),
            "sluice-api",
        )
        .expect("docs/configuration.md has its sections");
        let read = &drift.read;
        assert!(read.contains("SLUICE_TOKENIZER") && read.contains("SLUICE_REDIS_URL"));
        assert!(
            drift.undocumented.is_empty(),
            "docs/configuration.md does not describe {:?}",
            drift.undocumented
        );
        assert!(
            drift.unknown.is_empty(),
            "docs/configuration.md lists {:?} under sluice-api, which it does not read",
            drift.unknown
        );
    }
}
