//! The Redis side of a submit, against the real Redis on 127.0.0.1:6379: API-key verification,
//! tenant policy, the rate-limit script, the admission script (quota reservation, active slot,
//! record) and its rollback. One iteration is one request's worth of round trips (four: the key
//! record and the tenant policy share one pipeline once the key has been seen).

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_api::keys::ApiKeys;
use sluice_api::principal::Role;
use sluice_api::ratelimit::{self, Limit};
use sluice_api::tenant::{TenantPolicy, TenantStore};
use sluice_jobs::Keyspace;
use sluice_jobs::redis_pool::create_pool;
use sluice_jobs::store::{Admission, JobStore};
use sluice_proto::{GenerationParams, JOB_MESSAGE_VERSION, JobMessage, Message, TraceContext};
use sluice_shared::Secret;

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ns = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let ks = Keyspace::new(ns);
    let pool = create_pool(&Secret::new("redis://127.0.0.1:6379"), 4).expect("pool");
    let keys = ApiKeys::new(pool.clone(), ks.clone());
    let tenants = TenantStore::new(pool.clone(), ks.clone(), TenantPolicy::default());
    let store = JobStore::new(pool.clone(), ks.clone(), 60);
    let secret = runtime
        .block_on(keys.create("bench", "bench", Role::User, None))
        .expect("key")
        .secret;

    c.bench_function("auth_ratelimit_quota_round_trip", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let principal = keys.verify(&secret, &tenants).await.expect("verify");
                let policy = principal.policy.clone().expect("policy");
                let limits = [Limit {
                    key: ks.rate_limit("bench", "s"),
                    limit: 1_000_000_000,
                    period: Duration::from_secs(1),
                }];
                let decision = ratelimit::check(&pool, &limits).await.expect("ratelimit");
                assert!(decision.allowed);
                let now = sluice_proto::now_ms();
                let job = JobMessage {
                    session: None,
                    priority: sluice_proto::Priority::Interactive,
                    v: JOB_MESSAGE_VERSION,
                    id: uuid::Uuid::now_v7(),
                    tenant: principal.tenant.clone(),
                    session_id: None,
                    messages: vec![Message {
                        role: sluice_proto::Role::User,
                        content: "x".into(),
                    }],
                    params: GenerationParams::default(),
                    created_at: now,
                    deadline: now + 60_000,
                    attempt: 1,
                    trace: TraceContext::default(),
                    judge: false,
                    prefix_cache: true,
                };
                let admission = Admission {
                    reserve: 300,
                    max_active: None,
                    tokens_per_day: policy.tokens_per_day.map(|_| u64::MAX / 4),
                    tokens_per_month: None,
                    flags: Vec::new(),
                    idempotency: None,
                    max_queued: None,
                    max_queued_tenant: None,
                };
                store.admit(&job, &admission).await.expect("admit");
                store.rollback(&job.id).await.expect("rollback");
            })
        });
    });

    // Leave nothing behind in Redis.
    runtime.block_on(async {
        let mut conn = pool.get().await.expect("conn");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", ks.namespace()))
            .query_async(&mut conn)
            .await
            .expect("keys");
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .expect("del");
        }
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
