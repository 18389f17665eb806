//! `sluice-worker`'s settings and command line.

use crate::device::{DeviceSpec, parse_device};
use std::path::PathBuf;

use clap::Parser;
use sluice_shared::CommonSettings;

/// What `sluice-worker` was asked to do.
#[derive(Debug)]
pub enum Invocation {
    /// `sluice-worker [run] --model ...`: consume jobs and run them (the default).
    Run(Box<WorkerSettings>),
    /// `sluice-worker tiny-model --out DIR`: write the tiny random-weight test model.
    TinyModel(TinyModelArgs),
    /// `sluice-worker bench --model ...`: measure the forward pass (no broker, no Redis).
    Bench(crate::bench::BenchArgs),
    /// `sluice-worker judge --model ... --input FILE`: the injection judge over a file of
    /// texts (no broker, no Redis).
    Judge(crate::engine::judge::JudgeArgs),
    /// `sluice-worker serve-bench --model ...`: streaming clients through the real engine
    /// loop (no broker, no Redis).
    ServeBench(crate::serve_bench::ServeBenchArgs),
}

#[derive(Debug, Parser)]
#[command(
    name = "sluice-worker",
    version,
    about = "Sluice's Qwen2.5 worker. `sluice-worker tiny-model --help` for the test model, \
             `sluice-worker bench --help` for the benchmark, `sluice-worker serve-bench --help` for \
             the engine-level serving benchmark, `sluice-worker judge --help` for the \
             injection judge over a file."
)]
struct RunCli {
    #[command(flatten)]
    settings: WorkerSettings,
}

/// Writes the tiny random-weight test model (NOT a real model: its output is noise).
#[derive(Debug, Parser)]
#[command(name = "sluice-worker tiny-model")]
pub struct TinyModelArgs {
    /// Directory to write config.json, model.safetensors and the tokenizer into.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl Invocation {
    /// Parses a command line: `tiny-model ...`, `run ...`, or the run flags directly.
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        match args.get(1).and_then(|a| a.to_str()) {
            Some("tiny-model") => {
                args.remove(0);
                TinyModelArgs::try_parse_from(args).map(Invocation::TinyModel)
            }
            Some("bench") => {
                args.remove(0);
                crate::bench::BenchArgs::try_parse_from(args).map(Invocation::Bench)
            }
            Some("judge") => {
                args.remove(0);
                crate::engine::judge::JudgeArgs::try_parse_from(args).map(Invocation::Judge)
            }
            Some("serve-bench") => {
                args.remove(0);
                crate::serve_bench::ServeBenchArgs::try_parse_from(args).map(Invocation::ServeBench)
            }
            Some("run") => {
                args.remove(1);
                RunCli::try_parse_from(args).map(|c| Invocation::Run(Box::new(c.settings)))
            }
            _ => RunCli::try_parse_from(args).map(|c| Invocation::Run(Box::new(c.settings))),
        }
    }
}

impl WorkerSettings {
    /// Reads every `*_FILE` secret (connection URLs, canary key); binaries call it once after
    /// parsing.
    pub fn resolve_secrets(&mut self) -> Result<(), sluice_shared::settings::SecretFileError> {
        self.common.resolve_secrets()?;
        if let Some(path) = &self.canary_key_file {
            self.canary_key = Some(sluice_shared::settings::read_secret_file(
                "--canary-key-file (SLUICE_CANARY_KEY_FILE)",
                path,
            )?);
        }
        Ok(())
    }
}

/// Everything `sluice-worker run` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerSettings {
    #[command(flatten)]
    pub common: CommonSettings,

    /// A .gguf file, a directory with config.json + *.safetensors + tokenizer.json, or a hub id
    /// such as Qwen/Qwen2.5-7B-Instruct (optionally @revision).
    #[arg(long, env = "SLUICE_MODEL")]
    pub model: String,

    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a binary built with `--features cuda`).
    #[arg(long, env = "SLUICE_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,

    /// How often running jobs are checked for cancellation, in milliseconds.
    #[arg(long, env = "SLUICE_CANCEL_POLL_MS", default_value_t = 100)]
    pub cancel_poll_ms: u64,

    /// On SIGTERM, how long in-flight jobs may run on before they are given back to the queue,
    /// in seconds.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Sequences decoded together in one batch (also the worker's prefetch).
    #[arg(long, env = "SLUICE_MAX_BATCH_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_batch_size: u32,

    /// KV cache tokens all running sequences may hold together (prompt + max_tokens each,
    /// worst case); jobs wait for room, and a job that can never fit fails with `job_too_large`.
    #[arg(long, env = "SLUICE_MAX_BATCH_TOTAL_TOKENS", default_value_t = 65_536)]
    pub max_batch_total_tokens: usize,

    /// Prompt tokens prefilled per scheduling step (bounds how long running sequences wait).
    #[arg(long, env = "SLUICE_PREFILL_CHUNK", default_value_t = 256)]
    pub prefill_chunk: usize,

    /// Reuse the KV cache of prompt prefixes a tenant's earlier jobs computed (full pages of
    /// 16 tokens, keyed by the tenant and every token before them; never across tenants).
    /// Idle cached pages are evicted least recently used when a job needs room.
    #[arg(long, env = "SLUICE_PREFIX_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,

    /// Seconds a tenant's leak canary for one system prompt stays the same in jobs without a
    /// seed (a seeded job's never changes), so that prompt's pages are reused from the prefix
    /// cache; 0 draws a random canary per unseeded job (no reuse of their system prompts).
    #[arg(long, env = "SLUICE_CANARY_ROTATION_SECS", default_value_t = 3600)]
    pub canary_rotation_secs: u64,

    /// Redact personal data and secrets from generated text before it is stored.
    #[arg(long, env = "SLUICE_REDACT_OUTPUT", default_value_t = true, action = clap::ArgAction::Set)]
    pub redact_output: bool,

    /// The least time between two appends to a job's event stream, in milliseconds: text
    /// decoded sooner waits for the next append (one `XADD` per interval instead of one per
    /// token). A job's first text and its last are never held; 0 appends every token burst.
    #[arg(long, env = "SLUICE_STREAM_FLUSH_MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub stream_flush_ms: u64,

    /// Key of the leak canary (any string; every worker of a deployment should share it).
    /// A job's canary is derived from it, the tenant and the system prompt (and, for a job
    /// without a seed, the rotation period), so a seeded request gives the same prompt (and
    /// the same text) on any worker, while nobody without the key can predict it. Unset: a
    /// random key per process.
    #[arg(long, env = "SLUICE_CANARY_KEY", hide_env_values = true)]
    pub canary_key: Option<sluice_shared::Secret>,

    /// File holding the canary key (a mounted secret), read at start instead of
    /// `--canary-key`.
    #[arg(long, env = "SLUICE_CANARY_KEY_FILE", conflicts_with = "canary_key")]
    pub canary_key_file: Option<std::path::PathBuf>,

    /// This worker's id in job records and logs (default: host, pid and a random suffix).
    #[arg(long, env = "SLUICE_WORKER_ID")]
    pub worker_id: Option<String>,

    /// How often this worker writes its heartbeat to the registry, in seconds; it drops out of
    /// `GET /admin/workers` after three missed beats.
    #[arg(long, env = "SLUICE_HEARTBEAT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub heartbeat_secs: u64,
}

impl WorkerSettings {
    /// Parses settings from an explicit argument list (tests hand in their own).
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            settings: WorkerSettings,
        }
        Only::try_parse_from(args).map(|o| o.settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_subcommands() {
        assert_eq!(parse_device("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(parse_device("cuda:1"), Ok(DeviceSpec::Cuda(1)));
        assert!(parse_device("tpu").is_err());
        let s = WorkerSettings::parse_from(["w", "--model", "m.gguf"]).expect("parse");
        assert_eq!(s.model, "m.gguf");
        assert_eq!(s.device, DeviceSpec::Cpu);
        let inv = Invocation::parse_from(["w", "tiny-model", "--out", "/tmp/x"]).expect("parse");
        assert!(matches!(
            inv,
            Invocation::TinyModel(TinyModelArgs { seed: 42, .. })
        ));
        for args in [
            vec!["w", "--model", "m.gguf"],
            vec!["w", "run", "--model", "m.gguf"],
        ] {
            let inv = Invocation::parse_from(args).expect("parse");
            assert!(matches!(inv, Invocation::Run(s) if s.model == "m.gguf"));
        }
        assert!(Invocation::parse_from(["w"]).is_err());
        let inv = Invocation::parse_from(["w", "bench", "--model", "m.gguf", "--batches", "1,32"])
            .expect("parse");
        assert!(matches!(inv, Invocation::Bench(b) if b.batches == [1, 32] && b.steps == 64));
    }

    /// `docs/configuration.md` lists every variable `sluice-worker run` reads (its `--help`),
    /// and its worker part (the sections "Both binaries" and "sluice-worker") names no
    /// `SLUICE_*` variable the binary does not read, so the reference cannot drift from the code.
    #[test]
    fn configuration_doc_matches_the_run_settings() {
        use clap::CommandFactory;

        let drift = sluice_shared::settings::configuration_doc_drift(
            &RunCli::command(),
            include_str!("../../docs/configuration.md"),
            "sluice-worker",
        )
        .expect("docs/configuration.md has its sections");
        let read = &drift.read;
        assert!(read.contains("SLUICE_MODEL") && read.contains("SLUICE_REDIS_URL"));
        assert!(
            drift.undocumented.is_empty(),
            "docs/configuration.md does not describe {:?}",
            drift.undocumented
        );
        assert!(
            drift.unknown.is_empty(),
            "docs/configuration.md lists {:?} under sluice-worker, which it does not read",
            drift.unknown
        );
    }
}
