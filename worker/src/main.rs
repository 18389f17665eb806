//! `sluice-worker`: consume jobs and run them on a Qwen2 model, write the tiny test model, or
//! benchmark the forward pass.

use sluice_worker::model::tiny::{TinyShape, write_tiny_model};
use sluice_worker::settings::Invocation;
use sluice_worker::{Worker, WorkerSettings};

fn main() -> anyhow::Result<()> {
    match Invocation::parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit()) {
        Invocation::TinyModel(args) => {
            write_tiny_model(&args.out, args.seed, TinyShape::default())?;
            println!("{}", args.out.display());
            Ok(())
        }
        Invocation::Bench(args) => sluice_worker::bench::run(&args).map(|_| ()),
        Invocation::Judge(args) => sluice_worker::engine::judge::run_cli(&args),
        Invocation::ServeBench(args) => sluice_worker::serve_bench::run(&args).map(|_| ()),
        Invocation::Run(mut settings) => {
            settings.resolve_secrets()?;
            run(*settings)
        }
    }
}

fn run(settings: WorkerSettings) -> anyhow::Result<()> {
    let _telemetry = sluice_shared::telemetry::init(
        settings.common.log_format,
        sluice_shared::telemetry::OtelConfig::from_common(&settings.common, "sluice-worker"),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let worker = Worker::build(settings).await?;
        worker.run_until_stopped(shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
