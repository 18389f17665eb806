//! The [`Principal`] and [`Admin`] extractors every authenticated route requires: an API key
//! ([`crate::keys`]) or a JWT ([`crate::jwt`]), then the central rate limits per key or
//! subject and per client IP.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::audit::{self, AuditContext};
use crate::error::ApiError;
use crate::state::AppState;

use crate::principal::{Admin, Principal, Role};

/// The client address of a request (see [`crate::client_ip`]).
pub fn request_ip(parts: &Parts, state: &AppState) -> IpAddr {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    crate::client_ip::client_ip(peer, &parts.headers, &state.trusted_proxies)
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or(ApiError::Unauthorized("no authorization header"))?;
    let value = header
        .to_str()
        .map_err(|_| ApiError::Unauthorized("authorization header is not ascii"))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized("not a bearer token"))
}

async fn authenticate(parts: &Parts, state: &AppState) -> Result<Principal, ApiError> {
    let token = bearer(parts)?;
    if token.starts_with("sk-") {
        return state.keys.verify(token, &state.tenants).await;
    }
    match &state.jwt {
        Some(jwt) if token.matches('.').count() == 2 => {
            jwt.verify(token).map_err(ApiError::Unauthorized)
        }
        _ => Err(ApiError::Unauthorized("not an api key")),
    }
}

/// The rate limits of one request: per subject (from the tenant's policy) and per client IP.
fn rate_limits(
    state: &AppState,
    principal: &Principal,
    policy: &crate::tenant::TenantPolicy,
    ip: IpAddr,
) -> Vec<crate::ratelimit::Limit> {
    let subject = format!("{}:{}", principal.tenant, principal.key_id);
    let mut limits = limits_of(
        state,
        [
            (
                format!("sub:{subject}"),
                "s",
                policy.requests_per_second,
                SECOND,
            ),
            (
                format!("sub:{subject}"),
                "m",
                policy.requests_per_minute,
                MINUTE,
            ),
        ],
    );
    limits.extend(ip_limits(state, ip));
    limits
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);

/// The client address's limits: every request from it counts, authenticated or not.
fn ip_limits(state: &AppState, ip: IpAddr) -> Vec<crate::ratelimit::Limit> {
    limits_of(
        state,
        [
            (format!("ip:{ip}"), "s", state.ip_limits.0, SECOND),
            (format!("ip:{ip}"), "m", state.ip_limits.1, MINUTE),
        ],
    )
}

fn limits_of<const N: usize>(
    state: &AppState,
    scopes: [(String, &str, Option<u32>, Duration); N],
) -> Vec<crate::ratelimit::Limit> {
    let ks = state.store.keyspace();
    scopes
        .into_iter()
        .filter_map(|(scope, window, limit, period)| {
            limit.map(|limit| crate::ratelimit::Limit {
                key: ks.rate_limit(&scope, window),
                limit,
                period,
            })
        })
        .collect()
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    /// Authenticates (API key or JWT), then applies the per-subject and per-IP rate limits in
    /// one atomic check. A failed authentication is counted against the per-IP limits, and
    /// written to the audit log while they hold.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ip = request_ip(parts, state);
        let principal = match authenticate(parts, state).await {
            Ok(p) => p,
            Err(e) => {
                if let ApiError::Unauthorized(reason) = &e {
                    // A failed attempt counts against the client address's limits like any
                    // request: past them, guessing (and filling the audit log) gets a 429.
                    let limits = ip_limits(state, ip);
                    if !limits.is_empty()
                        && let Ok(decision) =
                            crate::ratelimit::check(state.store.pool(), &limits).await
                        && !decision.allowed
                    {
                        return Err(ApiError::RateLimited(decision));
                    }
                    let ctx = AuditContext {
                        ip: Some(ip),
                        ..AuditContext::default()
                    };
                    audit::record("auth_failed", reason, &ctx, state.anonymize_ips);
                }
                return Err(e);
            }
        };
        let mut principal = principal;
        state
            .metrics
            .tenant_requests
            .with_label_values(&[state.metrics.tenants.label(&principal.tenant)])
            .inc();
        let policy = match principal.policy.take() {
            Some(policy) => policy,
            None => state.tenants.policy(&principal.tenant).await?,
        };
        let limits = rate_limits(state, &principal, &policy, ip);
        let decision = crate::ratelimit::check(state.store.pool(), &limits).await?;
        if !decision.allowed {
            let ctx = AuditContext {
                tenant: Some(principal.tenant.clone()),
                key_id: Some(principal.key_id.clone()),
                ip: Some(ip),
            };
            audit::record("rejected", "rate_limited", &ctx, state.anonymize_ips);
            return Err(ApiError::RateLimited(decision));
        }
        principal.policy = Some(policy);
        Ok(principal)
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        if principal.role != Role::Admin {
            let ctx = AuditContext {
                tenant: Some(principal.tenant.clone()),
                key_id: Some(principal.key_id.clone()),
                ip: Some(request_ip(parts, state)),
            };
            audit::record(
                "forbidden",
                "admin_role_required",
                &ctx,
                state.anonymize_ips,
            );
            return Err(ApiError::Forbidden);
        }
        Ok(Admin(principal))
    }
}
