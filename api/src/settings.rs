//! `sluice-api`'s settings and command line.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use sluice_shared::CommonSettings;

/// The command line: `serve` (the default) or key management.
#[derive(Debug, Parser)]
#[command(name = "sluice-api", version, about = "Sluice's HTTP API tier")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ApiSettings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve(ApiSettings),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
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
        role: crate::auth::Role,
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

/// Everything `sluice-api serve` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiSettings {
    #[command(flatten)]
    pub common: CommonSettings,

    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "SLUICE_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Largest `max_tokens` a job may ask for.
    #[arg(long, env = "SLUICE_MAX_TOKENS_LIMIT", default_value_t = 8192)]
    pub max_tokens_limit: u32,

    /// Largest request body, in bytes.
    #[arg(long, env = "SLUICE_BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,

    /// Most messages in one job.
    #[arg(long, env = "SLUICE_MAX_MESSAGES", default_value_t = 256)]
    pub max_messages: usize,

    /// A job's deadline (queue plus run) when the client gives none, in seconds.
    #[arg(long, env = "SLUICE_JOB_TIMEOUT_SECS", default_value_t = 600)]
    pub job_timeout_secs: u64,

    /// The longest deadline a client may ask for, in seconds.
    #[arg(long, env = "SLUICE_MAX_JOB_TIMEOUT_SECS", default_value_t = 3600)]
    pub max_job_timeout_secs: u64,

    /// How long finished jobs stay readable, in seconds.
    #[arg(long, env = "SLUICE_RESULT_TTL_SECS", default_value_t = 24 * 3600)]
    pub result_ttl_secs: u64,

    /// Grace period for in-flight requests on SIGTERM, in seconds.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_is_the_default_and_keys_parse() {
        let cli = Cli::try_parse_from(["sluice-api", "--addr", "127.0.0.1:0"]).expect("parse");
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.addr.port(), 0);
        let cli = Cli::try_parse_from(["sluice-api", "keys", "create", "--tenant", "acme"])
            .expect("parse");
        assert!(matches!(
            cli.command,
            Some(Command::Keys(KeysCommand::Create { .. }))
        ));
        assert!(Cli::try_parse_from(["sluice-api", "keys", "create", "--tenant", "a b"]).is_err());
    }

    #[test]
    fn defaults() {
        let s = ApiSettings::parse_from(["x"]).expect("parse");
        assert_eq!(s.max_tokens_limit, 8192);
        assert_eq!(s.body_limit_bytes, 65536);
    }
}
