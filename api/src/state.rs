//! The state every handler shares.

use std::sync::Arc;

use crate::tenant::TenantStore;
use sluice_guard::Guard;
use sluice_guard::classifier::ClassifierService;
use sluice_jobs::amqp::Publisher;
use sluice_jobs::session::SessionStore;
use sluice_jobs::store::JobStore;
use sluice_jobs::workers::WorkerRegistry;
use sluice_prompt::chat::ChatCodec;

use crate::client_ip::Cidr;
use crate::jwt::JwtVerifier;
use crate::keys::ApiKeys;
use crate::metrics::ApiMetrics;
use crate::validate::Limits;

#[derive(Clone)]
pub struct AppState {
    pub store: JobStore,
    pub publisher: Arc<Publisher>,
    pub keys: ApiKeys,
    /// Uploaded and batch output files.
    pub files: crate::files::FileStore,
    /// Batches' state in Redis.
    pub batches: crate::batches::store::BatchStore,
    pub tenants: TenantStore,
    pub sessions: SessionStore,
    pub jwt: Option<Arc<JwtVerifier>>,
    pub guard: Arc<Guard>,
    /// The learned injection classifier on its scoring thread; `None` only when the operator
    /// turned it off.
    pub classifier: Option<ClassifierService>,
    /// The served model's tokenizer and chat template.
    pub codec: Arc<ChatCodec>,
    pub limits: Arc<Limits>,
    /// Per-IP requests per second and per minute (`None` = unlimited).
    pub ip_limits: (Option<u32>, Option<u32>),
    pub trusted_proxies: Arc<Vec<Cidr>>,
    pub anonymize_ips: bool,
    /// Dedicated connections for event streams (`XREAD BLOCK` would stall a shared one).
    pub stream_conns: Arc<crate::stream_conns::StreamConnections>,
    pub workers: WorkerRegistry,
    pub metrics: Arc<ApiMetrics>,
    /// Webhook endpoints, events and their delivery.
    pub webhooks: crate::webhooks::Webhooks,
}

/// What the request-metrics middleware ([`crate::metrics::track`]) takes from the state.
impl axum::extract::FromRef<AppState> for Arc<ApiMetrics> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.metrics)
    }
}
