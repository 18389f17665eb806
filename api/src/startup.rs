//! Building and running the API: the binary is a thin shell over this.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::tenant::TenantStore;
use sluice_guard::classifier::ClassifierService;
use sluice_guard::{Guard, Rules};
use sluice_jobs::Keyspace;
use sluice_jobs::amqp::{Publisher, QueueSettings};
use sluice_jobs::redis_pool::create_pool_for;
use sluice_jobs::session::SessionStore;
use sluice_jobs::store::JobStore;
use sluice_jobs::workers::WorkerRegistry;
use sluice_prompt::chat::ChatCodec;
use tokio::net::TcpListener;

use crate::jwt::JwtVerifier;
use crate::keys::ApiKeys;
use crate::metrics::ApiMetrics;
use crate::routes::router;
use crate::settings::ApiSettings;
use crate::state::AppState;

/// A built API: listener bound, state ready, not yet serving.
pub struct Application {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: AppState,
    settings: ApiSettings,
}

impl Application {
    /// Binds the listener and builds the state. Neither Redis nor RabbitMQ has to be up yet:
    /// connections are made on demand and `/readyz` reports them.
    pub async fn build(settings: ApiSettings) -> anyhow::Result<Self> {
        let state = build_state(&settings)?;
        state
            .store
            .check_queue_shards()
            .await
            .map_err(anyhow::Error::msg)?;
        let listener = TcpListener::bind(settings.addr).await?;
        let metrics_listener = match settings.common.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Self {
            listener,
            metrics_listener,
            state,
            settings,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish within the
    /// grace period.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let grace = Duration::from_secs(self.settings.shutdown_grace_secs);
        let app = router(self.state.clone(), self.settings.body_limit_bytes);
        let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down, draining in-flight requests");
            let _ = stopping_tx.send(true);
        };
        if let Some(listener) = self.metrics_listener {
            let state = self.state.clone();
            let registry = state.metrics.registry.clone();
            let refresh = move || {
                let state = state.clone();
                async move {
                    state
                        .metrics
                        .refresh(&state.store, &state.workers, &state.batches)
                        .await
                }
            };
            sluice_shared::metrics::spawn(listener, registry, refresh, stopping_rx.clone());
        }
        let limits = crate::serve::ConnectionLimits {
            header_read: Duration::from_secs(self.settings.header_read_timeout_secs),
            body_read: Duration::from_secs(self.settings.body_read_timeout_secs),
            upload_read: Duration::from_secs(self.settings.files.files_upload_timeout_secs),
            max_connections: usize::try_from(self.settings.max_connections).unwrap_or(usize::MAX),
            max_connections_per_client: usize::try_from(self.settings.max_connections_per_client)
                .unwrap_or(usize::MAX),
        };
        let batches = self.settings.batches.batch_runner.then(|| {
            crate::batches::runner::spawn(
                self.state.clone(),
                self.settings.batches.clone(),
                stopping_rx.clone(),
            )
        });
        let webhook_consumer = self.state.webhooks.spawn_consumer(
            stopping_rx.clone(),
            grace,
            self.state.metrics.webhook_attempts.clone(),
        );
        // Jobs' end events go with the deliveries: a process that delivers also watches.
        let job_events = self.settings.webhooks.webhook_deliveries.then(|| {
            crate::webhooks::job_events::spawn_watcher(
                self.state.store.clone(),
                self.state.webhooks.clone(),
                self.settings.batches.poll(),
                stopping_rx.clone(),
            )
        });
        let reconciler = crate::reconciler::spawn(
            self.state.store.clone(),
            self.state.metrics.clone(),
            stopping_rx.clone(),
        );
        let server = crate::serve::serve(self.listener, app, limits, stopping_rx.clone());
        let signal = tokio::spawn(signal);
        let deadline = async move {
            let mut rx = stopping_rx;
            let _ = rx.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            () = server => {}
            () = deadline => tracing::warn!("drain deadline passed; dropping open connections"),
        }
        signal.abort();
        if let Some(batches) = batches {
            // Its drivers give their leases back within a poll; another replica resumes.
            let _ = tokio::time::timeout(Duration::from_secs(2), batches).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), reconciler).await;
        if let Some(watcher) = job_events {
            let _ = tokio::time::timeout(Duration::from_secs(2), watcher).await;
        }
        if let Some(consumer) = webhook_consumer {
            // It drains its deliveries within the same grace period; any still unacked go
            // back to the queue when its connection closes.
            let _ = tokio::time::timeout(grace, consumer).await;
        }
        self.state.webhooks.close().await;
        self.state.publisher.close().await;
        Ok(())
    }
}

/// The state of one API process.
pub fn build_state(settings: &ApiSettings) -> anyhow::Result<AppState> {
    let ks = Keyspace::new(settings.common.namespace.clone())
        .with_queue_shards(settings.common.queue_shards);
    let pool = create_pool_for(
        &settings.common.redis_url,
        settings.common.redis_cluster,
        64,
    )?;
    let codec = ChatCodec::load(&settings.tokenizer)
        .map_err(|e| anyhow::anyhow!("tokenizer {}: {e}", settings.tokenizer.display()))?;
    let extra_rules = match &settings.injection_rules {
        Some(path) => Some(Rules::from_toml(&std::fs::read_to_string(path)?)?),
        None => None,
    };
    let jwt = JwtVerifier::from_settings(&settings.jwt)?.map(Arc::new);
    let metrics = Arc::new(ApiMetrics::new());
    // Fail closed: a classifier that is on but cannot load stops the API here.
    let classifier = match settings.classifier.load()? {
        Some(classifier) => {
            // `probe`: whether the probe over the served model's hidden states joins it.
            tracing::info!(probe = classifier.has_probe(), "guard classifier loaded");
            Some(ClassifierService::spawn(
                classifier,
                metrics.classifier_observer(),
            )?)
        }
        None => {
            tracing::warn!("guard classifier off: prompt injection is checked by the rules alone");
            None
        }
    };
    let (objects, prefix) = settings.files.open()?;
    let files = crate::files::FileStore::new(
        objects,
        prefix,
        pool.clone(),
        ks.clone(),
        settings.files.limits(settings.body_limit_bytes),
    );
    let batches = crate::batches::store::BatchStore::new(
        pool.clone(),
        ks.clone(),
        settings.batches.max_window_secs(),
    );
    let publisher = Publisher::new(
        settings.common.amqp_url.clone(),
        ks.clone(),
        QueueSettings::for_max_attempts(settings.common.max_attempts),
        format!("sluice-api@{}", hostname()),
    );
    Ok(AppState {
        store: JobStore::new(pool.clone(), ks.clone(), settings.common.result_ttl_secs),
        publisher: Arc::new(publisher),
        keys: ApiKeys::new(pool.clone(), ks.clone()),
        files,
        batches,
        sessions: SessionStore::new(pool.clone(), ks.clone()),
        workers: WorkerRegistry::new(pool.clone(), ks.clone()),
        metrics,
        webhooks: crate::webhooks::Webhooks::new(
            pool.clone(),
            ks.clone(),
            settings.common.amqp_url.clone(),
            &settings.webhooks,
            format!("sluice-api-webhooks@{}", hostname()),
        ),
        tenants: TenantStore::new(pool, ks, settings.policy.policy()),
        jwt,
        guard: Arc::new(Guard::with_builtin(extra_rules)),
        classifier,
        codec: Arc::new(codec),
        limits: Arc::new(settings.limits()),
        ip_limits: (
            (settings.ip_requests_per_second > 0).then_some(settings.ip_requests_per_second),
            (settings.ip_requests_per_minute > 0).then_some(settings.ip_requests_per_minute),
        ),
        trusted_proxies: Arc::new(settings.trusted_proxies.clone()),
        anonymize_ips: settings.anonymize_ips,
        stream_conns: crate::stream_conns::StreamConnections::to(
            crate::stream_conns::StreamTarget::from_url(
                settings.common.redis_url.expose(),
                settings.common.redis_cluster,
            )?,
        ),
    })
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_string())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
