//! Central rate limiting: GCRA (generic cell rate algorithm) in one Redis script.
//!
//! Each limit is "`limit` requests per `period`, bursts up to `limit`". All limits of a request
//! (per key per second and per minute, per client IP per second and per minute) are checked in
//! one atomic script and consumed only if every one allows it, so any number of API replicas
//! share exact counts and a rejected request consumes nothing.
//!
//! On a Redis Cluster one script can only touch one hash slot: the limits of one subject (or
//! one client address) share a slot ([`sluice_jobs::keyspace::Keyspace::rate_limit`]), and each
//! such group is checked and consumed atomically in turn. If a later group refuses, the
//! earlier groups' consumption is given back (`GCRA_REFUND`), so a rejected request still
//! consumes nothing; between the two, a concurrent request may see those limits one request
//! fuller than they end up.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use sluice_jobs::redis_pool::Pool;

use sluice_jobs::store::StoreError;

/// One limit on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Redis key of the limit's state (from [`crate::Keyspace::rate_limit`]).
    pub key: String,
    pub limit: u32,
    pub period: Duration,
}

/// The outcome of a check: whether it passed, and what the most constrained limit looks like
/// (for `RateLimit-*` headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The limit closest to exhaustion.
    pub limit: u32,
    pub remaining: u32,
    /// Until that limit is fully replenished.
    pub reset: Duration,
    /// When denied: how long until the request would pass.
    pub retry_after: Duration,
}

// KEYS: one per limit. ARGV[1] = now (ms); then per limit: emission interval (ms, float),
// capacity (burst * interval, ms).
// Returns {allowed (0/1), index of the tightest limit (1-based), remaining, reset_ms, retry_ms}.
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = tonumber(ARGV[1])
local new_tats = {}
local allowed = 1
local tight, tight_remaining, tight_reset, retry = 1, math.huge, 0, 0
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local capacity = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local used = new_tat - now
  if used > capacity then
    allowed = 0
    local wait = used - capacity
    if wait > retry then retry = wait end
    local remaining = 0
    if remaining < tight_remaining or (remaining == tight_remaining and tat - now > tight_reset) then
      tight, tight_remaining, tight_reset = i, remaining, tat - now
    end
  else
    new_tats[i] = new_tat
    local remaining = math.floor((capacity - used) / interval)
    if remaining < tight_remaining then
      tight, tight_remaining, tight_reset = i, remaining, used
    end
  end
end
if allowed == 1 then
  for i, key in ipairs(KEYS) do
    redis.call('SET', key, tostring(new_tats[i]), 'PX', math.ceil(new_tats[i] - now) + 1)
  end
end
return {allowed, tight, tight_remaining, math.ceil(tight_reset), math.ceil(retry)}
"#,
    )
});

/// Gives back one request to each limit (KEYS), for a request a later group of its limits
/// refused. ARGV[1] = now (ms); then per limit its emission interval (ms).
static GCRA_REFUND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or '0') - tonumber(ARGV[1 + i])
  if tat > now then
    redis.call('SET', key, tostring(tat), 'PX', math.ceil(tat - now) + 1)
  else
    redis.call('DEL', key)
  end
end
return 1
"#,
    )
});

/// The hash tag of a key (what Redis Cluster hashes), or the whole key.
fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.find('}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key)
}

fn interval_ms(l: &Limit) -> f64 {
    l.period.as_secs_f64() * 1000.0 / f64::from(l.limit.max(1))
}

/// Checks and, if all pass, consumes one request from every limit.
pub async fn check(pool: &Pool, limits: &[Limit]) -> Result<Decision, StoreError> {
    if !pool.is_cluster() {
        return check_group(pool, limits).await;
    }
    // Group by hash slot, keeping the order of first appearance.
    let mut groups: Vec<(&str, Vec<Limit>)> = Vec::new();
    for l in limits {
        let tag = hash_tag(&l.key);
        match groups.iter_mut().find(|(t, _)| *t == tag) {
            Some((_, g)) => g.push(l.clone()),
            None => groups.push((tag, vec![l.clone()])),
        }
    }
    let mut combined: Option<Decision> = None;
    let mut consumed: Vec<&[Limit]> = Vec::new();
    for (_, group) in &groups {
        let d = check_group(pool, group).await?;
        if !d.allowed {
            for g in consumed {
                let mut refund = GCRA_REFUND.prepare_invoke();
                refund.arg(sluice_proto::now_ms());
                for l in g {
                    refund.key(&l.key).arg(interval_ms(l));
                }
                let mut conn = pool.get().await?;
                if let Err(e) = refund.invoke_async::<i64>(&mut conn).await {
                    tracing::warn!(error = %e, "cannot give back a refused request's rate limits");
                }
            }
            return Ok(d);
        }
        consumed.push(group);
        combined = Some(match combined {
            Some(c) if c.remaining <= d.remaining => c,
            _ => d,
        });
    }
    Ok(combined.unwrap_or(Decision {
        allowed: true,
        limit: 0,
        remaining: 0,
        reset: Duration::ZERO,
        retry_after: Duration::ZERO,
    }))
}

/// Checks and, if all pass, consumes one request from every limit, in one script (the limits'
/// keys in one hash slot on a cluster).
async fn check_group(pool: &Pool, limits: &[Limit]) -> Result<Decision, StoreError> {
    if limits.is_empty() {
        return Ok(Decision {
            allowed: true,
            limit: 0,
            remaining: 0,
            reset: Duration::ZERO,
            retry_after: Duration::ZERO,
        });
    }
    let mut invocation = GCRA.prepare_invoke();
    invocation.arg(sluice_proto::now_ms());
    for l in limits {
        let interval = interval_ms(l);
        invocation
            .key(&l.key)
            .arg(interval)
            .arg(interval * f64::from(l.limit.max(1)));
    }
    let mut conn = pool.get().await?;
    let (allowed, tight, remaining, reset_ms, retry_ms): (i64, usize, i64, i64, i64) =
        invocation.invoke_async(&mut conn).await?;
    let tight = limits
        .get(tight.saturating_sub(1))
        .map(|l| l.limit)
        .unwrap_or(0);
    Ok(Decision {
        allowed: allowed == 1,
        limit: tight,
        remaining: remaining.max(0) as u32,
        reset: Duration::from_millis(reset_ms.max(0) as u64),
        retry_after: Duration::from_millis(retry_ms.max(0) as u64),
    })
}
