//! Each transition against the real Redis (`SLUICE_REDIS_URL`, default `127.0.0.1:6379`),
//! each test in a namespace of its own that is removed when the test ends, passed or not.

use std::collections::HashMap;

use sluice_proto::{
    ErrorBody, ErrorCode, FinishReason, GenerationParams, JOB_MESSAGE_VERSION, JobMessage,
    JobResult, JobStatus, Message, Priority, Role, Timings, TraceContext, Usage,
};
use uuid::Uuid;

use super::*;
use crate::calendar::utc_day_and_month;
use crate::redis_pool::{Pool, create_pool};

const TENANT: &str = "acme";

/// A store over a fresh namespace; its keys are deleted on drop.
struct Fixture {
    store: JobStore,
    pool: Pool,
}

impl Fixture {
    fn new() -> Self {
        let url = std::env::var("SLUICE_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
        let pool = create_pool(&sluice_shared::Secret::new(url), 2).expect("pool");
        let ks = Keyspace::new(format!("jobs-unit-{}", Uuid::now_v7().simple()));
        Self {
            store: JobStore::new(pool.clone(), ks, 600),
            pool,
        }
    }

    fn ks(&self) -> &Keyspace {
        self.store.keyspace()
    }

    async fn hash(&self, key: &str) -> HashMap<String, String> {
        let mut conn = self.pool.get().await.expect("conn");
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("HGETALL")
    }

    async fn int(&self, key: &str) -> i64 {
        let mut conn = self.pool.get().await.expect("conn");
        let v: Option<i64> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("GET");
        v.unwrap_or(0)
    }

    async fn members(&self, key: &str) -> Vec<String> {
        let mut conn = self.pool.get().await.expect("conn");
        redis::cmd("ZRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .expect("ZRANGE")
    }

    async fn ttl(&self, key: &str) -> i64 {
        let mut conn = self.pool.get().await.expect("conn");
        redis::cmd("TTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("TTL")
    }

    async fn day_used(&self, job: &JobMessage) -> i64 {
        let (day, _) = utc_day_and_month(job.created_at);
        self.int(&self.ks().tenant_tokens_day(TENANT, &day)).await
    }

    async fn month_used(&self, job: &JobMessage) -> i64 {
        let (_, month) = utc_day_and_month(job.created_at);
        self.int(&self.ks().tenant_tokens_month(TENANT, &month))
            .await
    }

    /// Admits `job` with `reserve` tokens and no limits; asserts it was admitted.
    async fn admitted(&self, job: &JobMessage, reserve: u64) {
        let outcome = self
            .store
            .admit(
                job,
                &Admission {
                    reserve,
                    ..Admission::default()
                },
            )
            .await
            .expect("admit");
        assert_eq!(outcome, AdmitOutcome::Admitted);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Best effort, on a plain connection: the test's runtime may be gone.
        let url = std::env::var("SLUICE_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
        let Ok(client) = redis::Client::open(url) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let pattern = format!("{}:*", self.ks().namespace());
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

fn job_with(deadline_in_ms: u64, priority: Priority) -> JobMessage {
    let now = sluice_proto::now_ms();
    JobMessage {
        v: JOB_MESSAGE_VERSION,
        id: Uuid::now_v7(),
        tenant: TENANT.to_string(),
        session_id: None,
        session: None,
        priority,
        messages: vec![Message {
            role: Role::User,
            content: "hello".into(),
        }],
        params: GenerationParams::default(),
        created_at: now,
        deadline: now + deadline_in_ms,
        attempt: 1,
        trace: TraceContext::default(),
        judge: false,
        prefix_cache: true,
    }
}

fn job() -> JobMessage {
    job_with(60_000, Priority::Interactive)
}

fn succeeded(prompt: u32, completion: u32) -> Terminal {
    Terminal {
        status: JobStatus::Succeeded,
        result: Some(JobResult {
            content: "hi".into(),
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                cached_tokens: 0,
            },
            timings: Timings::default(),
        }),
        error: None,
    }
}

#[tokio::test]
async fn admit_writes_a_queued_record_and_reserves_its_tokens() {
    let f = Fixture::new();
    let job = job();
    f.admitted(&job, 300).await;

    let record = f.hash(&f.ks().job(&job.id)).await;
    assert_eq!(record["status"], "queued");
    assert_eq!(record["tenant"], TENANT);
    assert_eq!(record["attempts"], "0");
    assert_eq!(record["reserved"], "300");
    assert_eq!(record["settled"], "0");
    assert!(
        f.ttl(&f.ks().job(&job.id)).await > 600,
        "deadline + result TTL"
    );
    assert_eq!(f.day_used(&job).await, 300);
    assert_eq!(f.month_used(&job).await, 300);
    let id = job.id.to_string();
    assert_eq!(
        f.members(&f.ks().tenant_active(TENANT)).await,
        std::slice::from_ref(&id)
    );
    assert_eq!(f.members(&f.ks().queued()).await, std::slice::from_ref(&id));
    assert_eq!(f.members(&f.ks().tenant_queued(TENANT)).await, [id]);

    let view = f
        .store
        .get(TENANT, &job.id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(view.status, JobStatus::Queued);
    assert_eq!(
        f.store.get("other-tenant", &job.id).await.expect("get"),
        None,
        "another tenant's job reads as missing"
    );
}

#[tokio::test]
async fn a_refused_admission_writes_nothing() {
    let f = Fixture::new();
    let first = job();
    f.admitted(&first, 100).await;

    let refusals = [
        (
            Admission {
                reserve: 10,
                max_active: Some(1),
                ..Admission::default()
            },
            AdmitOutcome::ConcurrencyLimited {
                active: 1,
                limit: 1,
            },
        ),
        (
            Admission {
                reserve: 10,
                tokens_per_day: Some(105),
                ..Admission::default()
            },
            AdmitOutcome::QuotaExceeded {
                period: QuotaPeriod::Day,
                used: 100,
                limit: 105,
            },
        ),
        (
            Admission {
                reserve: 10,
                tokens_per_month: Some(50),
                ..Admission::default()
            },
            AdmitOutcome::QuotaExceeded {
                period: QuotaPeriod::Month,
                used: 100,
                limit: 50,
            },
        ),
    ];
    for (admission, expected) in refusals {
        let second = job();
        let outcome = f.store.admit(&second, &admission).await.expect("admit");
        assert_eq!(outcome, expected);
        assert!(f.hash(&f.ks().job(&second.id)).await.is_empty());
    }
    // The queue caps, namespace-wide and per tenant: no drain yet, so 30 s.
    for (admission, tenant) in [
        (
            Admission {
                max_queued: Some(1),
                ..Admission::default()
            },
            false,
        ),
        (
            Admission {
                max_queued_tenant: Some(1),
                ..Admission::default()
            },
            true,
        ),
    ] {
        let second = job();
        let outcome = f.store.admit(&second, &admission).await.expect("admit");
        assert_eq!(
            outcome,
            AdmitOutcome::QueueFull {
                tenant,
                queued: 1,
                limit: 1,
                retry_after_secs: 30,
            }
        );
        assert!(f.hash(&f.ks().job(&second.id)).await.is_empty());
    }
    assert_eq!(f.day_used(&first).await, 100, "nothing more reserved");
    assert_eq!(f.members(&f.ks().tenant_active(TENANT)).await.len(), 1);
    assert_eq!(f.members(&f.ks().queued()).await.len(), 1);
}

#[tokio::test]
async fn an_idempotency_key_replays_its_job_and_refuses_another_request() {
    let f = Fixture::new();
    let key = f.ks().idempotency(TENANT, "hash-of-key");
    let admission = |fingerprint: &str| Admission {
        reserve: 40,
        idempotency: Some((key.clone(), fingerprint.to_string())),
        ..Admission::default()
    };
    let first = job();
    assert_eq!(
        f.store
            .admit(&first, &admission("fp-1"))
            .await
            .expect("admit"),
        AdmitOutcome::Admitted
    );
    let retry = job();
    assert_eq!(
        f.store
            .admit(&retry, &admission("fp-1"))
            .await
            .expect("admit"),
        AdmitOutcome::Duplicate(first.id)
    );
    assert_eq!(
        f.store
            .admit(&retry, &admission("fp-2"))
            .await
            .expect("admit"),
        AdmitOutcome::IdempotencyMismatch
    );
    assert!(f.hash(&f.ks().job(&retry.id)).await.is_empty());
    assert_eq!(f.day_used(&first).await, 40, "reserved once");
    assert!(f.ttl(&key).await > 0);
}

#[tokio::test]
async fn rollback_removes_the_record_refunds_and_frees_the_idempotency_key() {
    let f = Fixture::new();
    let key = f.ks().idempotency(TENANT, "k");
    let admission = Admission {
        reserve: 70,
        idempotency: Some((key.clone(), "fp".into())),
        ..Admission::default()
    };
    let job = job();
    assert_eq!(
        f.store.admit(&job, &admission).await.expect("admit"),
        AdmitOutcome::Admitted
    );
    f.store.rollback(&job.id).await.expect("rollback");
    assert!(f.hash(&f.ks().job(&job.id)).await.is_empty());
    assert_eq!(f.day_used(&job).await, 0);
    assert_eq!(f.month_used(&job).await, 0);
    assert!(f.members(&f.ks().tenant_active(TENANT)).await.is_empty());
    assert!(f.members(&f.ks().queued()).await.is_empty());
    assert!(f.members(&f.ks().tenant_queued(TENANT)).await.is_empty());
    assert_eq!(f.ttl(&key).await, -2, "the key may be used again");

    // A job that already started is not rolled back.
    let running = self::job();
    f.admitted(&running, 5).await;
    f.store.start(&running.id, 3, "w").await.expect("start");
    f.store.rollback(&running.id).await.expect("rollback");
    assert_eq!(f.hash(&f.ks().job(&running.id)).await["status"], "running");
}

#[tokio::test]
async fn start_runs_a_queued_job_once_per_delivery() {
    let f = Fixture::new();
    let job = job();
    f.admitted(&job, 10).await;
    assert_eq!(
        f.store.start(&job.id, 3, "worker-a").await.expect("start"),
        StartOutcome::Run { attempt: 1 }
    );
    let record = f.hash(&f.ks().job(&job.id)).await;
    assert_eq!(record["status"], "running");
    assert_eq!(record["worker"], "worker-a");
    assert!(record.contains_key("started_at"));
    assert!(
        f.members(&f.ks().queued()).await.is_empty(),
        "left the queue"
    );
    assert!(f.members(&f.ks().tenant_queued(TENANT)).await.is_empty());
    assert_eq!(
        f.members(&f.ks().tenant_active(TENANT)).await,
        [job.id.to_string()],
        "still active"
    );
    // A redelivery (the first worker died) is the next attempt ...
    assert_eq!(
        f.store.start(&job.id, 3, "worker-b").await.expect("start"),
        StartOutcome::Run { attempt: 2 }
    );
    assert_eq!(
        f.store.start(&job.id, 3, "worker-c").await.expect("start"),
        StartOutcome::Run { attempt: 3 }
    );
    // ... until the attempts run out: then it fails, and its reservation is refunded.
    assert_eq!(
        f.store.start(&job.id, 3, "worker-d").await.expect("start"),
        StartOutcome::Ended(JobStatus::Failed)
    );
    let view = f
        .store
        .get(TENANT, &job.id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(view.attempts, 3);
    assert_eq!(
        view.error.map(|e| e.code),
        Some(ErrorCode::AttemptsExhausted)
    );
    assert_eq!(f.day_used(&job).await, 0);
    assert!(f.members(&f.ks().tenant_active(TENANT)).await.is_empty());
    // A terminal job is skipped, a missing one is dropped.
    assert_eq!(
        f.store.start(&job.id, 3, "worker-e").await.expect("start"),
        StartOutcome::Skip(JobStatus::Failed)
    );
    assert_eq!(
        f.store.start(&Uuid::now_v7(), 3, "w").await.expect("start"),
        StartOutcome::Missing
    );
}

#[tokio::test]
async fn start_ends_a_cancelled_or_expired_job_instead_of_running_it() {
    let f = Fixture::new();
    let expired = job_with(0, Priority::Interactive);
    f.admitted(&expired, 10).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(
        f.store.start(&expired.id, 3, "w").await.expect("start"),
        StartOutcome::Ended(JobStatus::Expired)
    );
    let view = f
        .store
        .get(TENANT, &expired.id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(
        view.error.map(|e| e.code),
        Some(ErrorCode::DeadlineExceeded)
    );
    assert_eq!(f.day_used(&expired).await, 0, "refunded");

    // Cancel requested while running, then redelivered: it ends cancelled, not run again.
    let cancelled = job();
    f.admitted(&cancelled, 10).await;
    f.store.start(&cancelled.id, 3, "w").await.expect("start");
    assert_eq!(
        f.store.cancel(TENANT, &cancelled.id).await.expect("cancel"),
        CancelOutcome::Cancelling
    );
    assert_eq!(
        f.store
            .cancel_requested(&[cancelled.id, expired.id])
            .await
            .expect("flags"),
        [true, false]
    );
    assert_eq!(
        f.store.start(&cancelled.id, 3, "w").await.expect("start"),
        StartOutcome::Ended(JobStatus::Cancelled)
    );
}

#[tokio::test]
async fn finish_writes_the_terminal_state_once_and_refunds_what_was_not_used() {
    let f = Fixture::new();
    let job = job();
    f.admitted(&job, 300).await;
    f.store.start(&job.id, 3, "w").await.expect("start");
    f.store
        .append_text(&job.id, "hi", Some(60))
        .await
        .expect("append");
    assert!(
        f.store
            .finish(&job.id, &succeeded(20, 30))
            .await
            .expect("finish")
    );
    assert_eq!(
        f.day_used(&job).await,
        50,
        "pays for prompt and output only"
    );
    assert_eq!(f.month_used(&job).await, 50);
    assert!(f.members(&f.ks().tenant_active(TENANT)).await.is_empty());
    let view = f
        .store
        .get(TENANT, &job.id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(view.status, JobStatus::Succeeded);
    assert_eq!(view.result.map(|r| r.usage.completion_tokens), Some(30));
    assert!(view.finished_at.is_some());
    let ttl = f.ttl(&f.ks().job(&job.id)).await;
    assert!((1..=600).contains(&ttl), "the result TTL, got {ttl}");
    assert!((1..=600).contains(&f.ttl(&f.ks().job_events(&job.id)).await));

    // A second finish (a redelivered job's late worker) changes nothing.
    let failed = Terminal {
        status: JobStatus::Failed,
        result: None,
        error: Some(ErrorBody::new(ErrorCode::Internal, "late")),
    };
    assert!(!f.store.finish(&job.id, &failed).await.expect("finish"));
    let view = f
        .store
        .get(TENANT, &job.id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(view.status, JobStatus::Succeeded);
    assert_eq!(view.error, None);
    assert_eq!(f.day_used(&job).await, 50, "settled once");

    // The event stream ends with the terminal event, after the text.
    let mut conn = f.pool.get().await.expect("conn");
    let events: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(f.ks().job_events(&job.id))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    let fields: Vec<&[String]> = events.iter().map(|(_, f)| f.as_slice()).collect();
    assert_eq!(
        fields,
        [
            &["type", "text", "text", "hi"][..],
            &["type", "done", "status", "succeeded"][..]
        ]
    );
}

#[tokio::test]
async fn a_failed_job_pays_nothing() {
    let f = Fixture::new();
    let job = job();
    f.admitted(&job, 300).await;
    f.store.start(&job.id, 3, "w").await.expect("start");
    let failed = Terminal {
        status: JobStatus::Failed,
        result: None,
        error: Some(ErrorBody::new(ErrorCode::Internal, "the model failed")),
    };
    assert!(f.store.finish(&job.id, &failed).await.expect("finish"));
    assert_eq!(f.day_used(&job).await, 0);
    assert_eq!(f.month_used(&job).await, 0);
}

#[tokio::test]
async fn cancel_by_state_and_tenant() {
    let f = Fixture::new();
    let queued = job();
    f.admitted(&queued, 80).await;
    assert_eq!(
        f.store
            .cancel("intruder", &queued.id)
            .await
            .expect("cancel"),
        CancelOutcome::NotFound,
        "another tenant cannot cancel it"
    );
    assert_eq!(
        f.store.cancel(TENANT, &queued.id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert_eq!(f.day_used(&queued).await, 0, "refunded");
    assert!(f.members(&f.ks().queued()).await.is_empty());
    assert_eq!(
        f.store.cancel(TENANT, &queued.id).await.expect("cancel"),
        CancelOutcome::AlreadyCancelled
    );
    // The queue message is still delivered: the worker skips it.
    assert_eq!(
        f.store.start(&queued.id, 3, "w").await.expect("start"),
        StartOutcome::Skip(JobStatus::Cancelled)
    );

    let done = job();
    f.admitted(&done, 10).await;
    f.store.start(&done.id, 3, "w").await.expect("start");
    f.store
        .finish(&done.id, &succeeded(1, 1))
        .await
        .expect("finish");
    assert_eq!(
        f.store.cancel(TENANT, &done.id).await.expect("cancel"),
        CancelOutcome::AlreadyFinished(JobStatus::Succeeded)
    );
    assert_eq!(
        f.store
            .cancel(TENANT, &Uuid::now_v7())
            .await
            .expect("cancel"),
        CancelOutcome::NotFound
    );
}

#[tokio::test]
async fn release_queues_a_running_job_again_without_counting_the_attempt() {
    let f = Fixture::new();
    let job = job();
    f.admitted(&job, 10).await;
    assert!(
        !f.store.release(&job.id).await.expect("release"),
        "not running"
    );
    f.store.start(&job.id, 3, "w").await.expect("start");
    assert!(f.store.release(&job.id).await.expect("release"));
    let record = f.hash(&f.ks().job(&job.id)).await;
    assert_eq!(record["status"], "queued");
    assert_eq!(record["attempts"], "0");
    assert!(!record.contains_key("worker"));
    assert_eq!(f.members(&f.ks().queued()).await, [job.id.to_string()]);
    assert_eq!(
        f.members(&f.ks().tenant_queued(TENANT)).await,
        [job.id.to_string()]
    );
    assert_eq!(
        f.store.start(&job.id, 3, "w2").await.expect("start"),
        StartOutcome::Run { attempt: 1 }
    );
}

#[tokio::test]
async fn queue_stats_count_queued_jobs_by_priority() {
    let f = Fixture::new();
    let a = job_with(60_000, Priority::Interactive);
    let b = job_with(60_000, Priority::Batch);
    let c = job_with(60_000, Priority::Batch);
    for j in [&a, &b, &c] {
        f.admitted(j, 1).await;
    }
    f.store.start(&a.id, 3, "w").await.expect("start");
    let stats = f
        .store
        .queue_stats(sluice_proto::now_ms())
        .await
        .expect("stats");
    let by = |p: Priority| stats.iter().find(|s| s.priority == p).copied();
    assert_eq!(by(Priority::Interactive).map(|s| s.depth), Some(0));
    assert_eq!(
        by(Priority::Interactive).and_then(|s| s.oldest_created_ms),
        None
    );
    assert_eq!(by(Priority::Batch).map(|s| s.depth), Some(2));
    assert_eq!(
        by(Priority::Batch).and_then(|s| s.oldest_created_ms),
        Some(b.created_at.min(c.created_at))
    );
}
