//! `sluice-api`: serve the HTTP API, manage API keys, or run the guard over JSON lines.

use sluice_api::keys::ApiKeys;
use sluice_api::settings::{GuardCommand, Invocation, KeysCommand};
use sluice_api::startup::{Application, shutdown_signal};
use sluice_jobs::Keyspace;
use sluice_jobs::redis_pool::create_pool_for;

/// mimalloc: under load glibc's allocator spent about 14 % of the API's CPU (and contended on
/// its arena locks) in the submit profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Invocation::parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit()) {
        Invocation::Serve(mut settings) => {
            settings.common.resolve_secrets()?;
            serve(*settings).await
        }
        Invocation::Keys(command) => keys(*command).await,
        Invocation::Guard(GuardCommand::Check {
            rules,
            threshold,
            classifier_threshold,
            classifier,
        }) => {
            let extra = match rules {
                Some(path) => Some(sluice_guard::Rules::from_toml(&std::fs::read_to_string(
                    path,
                )?)?),
                None => None,
            };
            let classifier = classifier.load()?;
            let thresholds = sluice_api::guard_cli::Thresholds {
                rules: threshold,
                classifier: classifier_threshold,
            };
            let stdin = std::io::stdin().lock();
            let stdout = std::io::stdout().lock();
            sluice_api::guard_cli::run(extra, thresholds, classifier.as_ref(), stdin, stdout)?;
            Ok(())
        }
    }
}

async fn serve(settings: sluice_api::ApiSettings) -> anyhow::Result<()> {
    let _telemetry = sluice_shared::telemetry::init(
        settings.common.log_format,
        sluice_shared::telemetry::OtelConfig::from_common(&settings.common, "sluice-api"),
    );
    let app = Application::build(settings).await?;
    tracing::info!(addr = %app.local_addr()?, "sluice-api listening");
    app.run_until_stopped(shutdown_signal()).await
}

async fn keys(mut command: KeysCommand) -> anyhow::Result<()> {
    let (KeysCommand::Create { common, .. } | KeysCommand::Revoke { common, .. }) = &mut command;
    common.resolve_secrets()?;
    match command {
        KeysCommand::Create {
            tenant,
            name,
            role,
            expires_in_secs,
            common,
        } => {
            sluice_api::keys::check_key_lifetime(expires_in_secs).map_err(anyhow::Error::msg)?;
            let keys = ApiKeys::new(
                create_pool_for(&common.redis_url, common.redis_cluster, 1)?,
                Keyspace::new(common.namespace),
            );
            let created = keys.create(&tenant, &name, role, expires_in_secs).await?;
            eprintln!(
                "created key {} for tenant {tenant} (role {}); the secret below is shown only once",
                created.key_id,
                role.as_str()
            );
            println!("{}", created.secret);
        }
        KeysCommand::Revoke { key_id, common } => {
            let keys = ApiKeys::new(
                create_pool_for(&common.redis_url, common.redis_cluster, 1)?,
                Keyspace::new(common.namespace),
            );
            if !keys.revoke(&key_id).await? {
                anyhow::bail!("no key with id {key_id}");
            }
            eprintln!("revoked key {key_id}");
        }
    }
    Ok(())
}
