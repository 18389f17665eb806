//! `sluice-api`: serve the HTTP API, or manage API keys.

use clap::Parser;
use sluice_api::auth::ApiKeys;
use sluice_api::settings::{Cli, Command, KeysCommand};
use sluice_api::startup::{Application, shutdown_signal};
use sluice_shared::Keyspace;
use sluice_shared::redis_pool::create_pool;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(settings)) => serve(settings).await,
        Some(Command::Keys(command)) => keys(command).await,
    }
}

async fn serve(settings: sluice_api::ApiSettings) -> anyhow::Result<()> {
    sluice_shared::telemetry::init(settings.common.log_format);
    let app = Application::build(settings).await?;
    tracing::info!(addr = %app.local_addr()?, "sluice-api listening");
    app.run_until_stopped(shutdown_signal()).await
}

async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            tenant,
            name,
            role,
            expires_in_secs,
            common,
        } => {
            let keys = ApiKeys::new(
                create_pool(&common.redis_url, 1)?,
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
                create_pool(&common.redis_url, 1)?,
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
