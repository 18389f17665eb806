//! The state every handler shares.

use std::sync::Arc;

use sluice_shared::amqp::Publisher;
use sluice_shared::store::JobStore;

use crate::auth::ApiKeys;
use crate::validate::Limits;

#[derive(Clone)]
pub struct AppState {
    pub store: JobStore,
    pub publisher: Arc<Publisher>,
    pub keys: ApiKeys,
    pub limits: Arc<Limits>,
}
