//! The security audit log: auth failures, guard blocks, limit rejections, admin actions.
//!
//! Events go to the `audit` tracing target with the tenant, a hash of the key id, the client
//! address (anonymised to its /24 or /48 by default) and a reason code. Never request content.

use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::client_ip::for_logs;

/// Who and where, for one audit event.
#[derive(Debug, Clone, Default)]
pub struct AuditContext {
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    pub ip: Option<IpAddr>,
}

/// A short, stable, non-reversible id for a key id (so logs can correlate without naming keys).
pub fn key_hash(key_id: &str) -> String {
    hex::encode(&Sha256::digest(key_id.as_bytes())[..8])
}

/// Records one audit event.
pub fn record(event: &str, reason: &str, ctx: &AuditContext, anonymize_ip: bool) {
    tracing::warn!(
        target: "audit",
        event,
        reason,
        tenant = ctx.tenant.as_deref().unwrap_or("-"),
        key = ctx.key_id.as_deref().map(key_hash).unwrap_or_else(|| "-".into()),
        client_ip = ctx.ip.map(|ip| for_logs(ip, anonymize_ip)).unwrap_or_else(|| "-".into()),
        "audit"
    );
}
