//! Each transition against the real Redis (`SLUICE_REDIS_URL`, default `127.0.0.1:6379`) and
//! against a real Redis Cluster (`SLUICE_TEST_REDIS_CLUSTER`: the URLs of its nodes, separated
//! by commas; `scripts/redis-cluster start` makes one and prints them, and `scripts/test` does
//! so for every run), each test in a namespace of its own that is removed when the test ends,
//! passed or not. Every case runs twice, once on each (the `cases!` list at the end).

use std::collections::HashMap;

use sluice_proto::{
    ErrorBody, ErrorCode, FinishReason, GenerationParams, JOB_MESSAGE_VERSION, JobMessage,
    JobResult, JobStatus, Message, Priority, Role, Timings, TraceContext, Usage,
};
use uuid::Uuid;

use super::*;
use crate::calendar::utc_day_and_month;
use crate::redis_pool::Pool;

const TENANT: &str = "acme";

/// A store over a fresh namespace; its keys are deleted on drop.
struct Fixture {
    store: JobStore,
    pool: Pool,
    /// The URLs of the cluster's nodes, or the one server's URL.
    nodes: Vec<String>,
}

fn single_url() -> String {
    std::env::var("SLUICE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// The test cluster's node URLs; a cluster case fails without them.
pub(crate) fn cluster_nodes() -> Vec<String> {
    let urls = std::env::var("SLUICE_TEST_REDIS_CLUSTER").expect(
        "SLUICE_TEST_REDIS_CLUSTER names no Redis Cluster: start one with \
         `scripts/redis-cluster start` and export what it prints (scripts/test does both)",
    );
    urls.split(',').map(str::to_string).collect()
}

impl Fixture {
    fn on(cluster: bool) -> Self {
        Self::sharded(cluster, 1)
    }

    /// A store whose namespace keeps its per-job indexes in `shards` shards.
    fn sharded(cluster: bool, shards: u16) -> Self {
        let nodes = if cluster {
            cluster_nodes()
        } else {
            vec![single_url()]
        };
        Self::on_nodes(nodes, cluster, shards)
    }

    /// A store over the given server or cluster nodes.
    fn on_nodes(nodes: Vec<String>, cluster: bool, shards: u16) -> Self {
        let pool = crate::redis_pool::create_pool_for(
            &sluice_shared::Secret::new(nodes.join(",")),
            cluster,
            2,
        )
        .expect("pool");
        assert_eq!(pool.is_cluster(), cluster);
        let ks = Keyspace::new(format!("jobs-unit-{}", Uuid::now_v7().simple()))
            .with_queue_shards(shards);
        Self {
            store: JobStore::new(pool.clone(), ks, 600),
            pool,
            nodes,
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

    /// The ids in the namespace's queued set (members `{priority}|{created_at}|{id}`).
    async fn queued_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for shard in 0..self.ks().queue_shards() {
            let members = self.members(&self.ks().queued(shard)).await;
            ids.extend(
                members
                    .iter()
                    .map(|m| m.rsplit('|').next().unwrap_or_default().to_string()),
            );
        }
        ids
    }

    /// The tenant's unsettled reservations: job id → `{tokens}|{day}|{month}`.
    async fn reservations(&self) -> HashMap<String, String> {
        self.hash(&self.ks().tenant_reservations(TENANT)).await
    }

    /// Deletes a job's record, as if its admission never wrote it.
    async fn forget_record(&self, job: &JobMessage) {
        let mut conn = self.pool.get().await.expect("conn");
        let _: () = redis::cmd("DEL")
            .arg(self.ks().job(&job.id))
            .query_async(&mut conn)
            .await
            .expect("DEL");
    }

    /// A job admitted with the idempotency key `name` whose record was then deleted, as if its
    /// admission stopped between the tenant's step and the job's; with its key and admission.
    async fn admitted_without_record(
        &self,
        name: &str,
        reserve: u64,
    ) -> (JobMessage, String, Admission) {
        let key = self.ks().idempotency(TENANT, name);
        let admission = Admission {
            reserve,
            idempotency: Some((key.clone(), "fp".into())),
            ..Admission::default()
        };
        let job = job();
        assert_eq!(
            self.store.admit(&job, &admission).await.expect("admit"),
            AdmitOutcome::Admitted
        );
        self.forget_record(&job).await;
        (job, key, admission)
    }

    /// Asserts that nothing is left reserved, active or queued for the tenant, queued in the
    /// namespace, or in flight.
    async fn assert_nothing_held(&self) {
        assert!(self.reservations().await.is_empty(), "reservations");
        let active = self.members(&self.ks().tenant_active(TENANT)).await;
        assert!(active.is_empty(), "active: {active:?}");
        let queued = self.members(&self.ks().tenant_queued(TENANT)).await;
        assert!(queued.is_empty(), "tenant queued: {queued:?}");
        let queued = self.queued_ids().await;
        assert!(queued.is_empty(), "queued: {queued:?}");
        for shard in 0..self.ks().queue_shards() {
            let inflight = self.members(&self.ks().inflight(shard)).await;
            assert!(
                inflight.is_empty(),
                "in flight (shard {shard}): {inflight:?}"
            );
        }
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

    /// `START` of a delivery of `id` to `worker` (its token: one delivery per worker name),
    /// with at most 3 attempts.
    async fn start(&self, id: &Uuid, worker: &str, redelivered: bool) -> StartOutcome {
        self.store
            .start(id, 3, worker, redelivered, worker)
            .await
            .expect("start")
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
        // Best effort, on plain connections to every node (a cluster's keys lie on its
        // primaries; a replica refuses the DEL), one key at a time (keys of different slots
        // cannot go in one DEL): the test's runtime may be gone.
        let pattern = format!("{}:*", self.ks().namespace());
        for url in &self.nodes {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                continue;
            };
            let Ok(mut conn) = client.get_connection() else {
                continue;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query(&mut conn)
                .unwrap_or_default();
            for key in keys {
                let _: Result<(), _> = redis::cmd("DEL").arg(key).query(&mut conn);
            }
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

async fn admit_writes_a_queued_record_and_reserves_its_tokens(f: Fixture) {
    let job = job();
    f.admitted(&job, 300).await;

    let record = f.hash(&f.ks().job(&job.id)).await;
    assert_eq!(record["status"], "queued");
    assert_eq!(record["tenant"], TENANT);
    assert_eq!(record["attempts"], "0");
    assert_eq!(record["reserved"], "300");
    assert_eq!(
        f.reservations().await[&job.id.to_string()],
        format!(
            "300|{}|{}",
            utc_day_and_month(job.created_at).0,
            utc_day_and_month(job.created_at).1
        )
    );
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
    assert_eq!(f.queued_ids().await, std::slice::from_ref(&id));
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

async fn a_refused_admission_writes_nothing(f: Fixture) {
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
    assert_eq!(f.queued_ids().await.len(), 1);
}

async fn an_idempotency_key_replays_its_job_and_refuses_another_request(f: Fixture) {
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

    // A retry racing the admission, which writes the key a moment before the record: the
    // retry waits for the record and then names the job.
    let record = f.hash(&f.ks().job(&first.id)).await;
    f.forget_record(&first).await;
    let writer = {
        let pool = f.pool.clone();
        let job_key = f.ks().job(&first.id);
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let mut conn = pool.get().await.expect("conn");
            let mut hset = redis::cmd("HSET");
            hset.arg(job_key);
            for (k, v) in record {
                hset.arg(k).arg(v);
            }
            let _: () = hset.query_async(&mut conn).await.expect("HSET");
        })
    };
    assert_eq!(
        f.store
            .admit(&job(), &admission("fp-1"))
            .await
            .expect("admit"),
        AdmitOutcome::Duplicate(first.id)
    );
    writer.await.expect("writer");
}

async fn rollback_removes_the_record_refunds_and_frees_the_idempotency_key(f: Fixture) {
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
    assert!(f.queued_ids().await.is_empty());
    assert!(f.members(&f.ks().tenant_queued(TENANT)).await.is_empty());
    assert_eq!(f.ttl(&key).await, -2, "the key may be used again");

    // A job that already started is not rolled back.
    let running = self::job();
    f.admitted(&running, 5).await;
    f.start(&running.id, "w", true).await;
    f.store.rollback(&running.id).await.expect("rollback");
    assert_eq!(f.hash(&f.ks().job(&running.id)).await["status"], "running");
}

async fn start_runs_a_queued_job_once_per_delivery(f: Fixture) {
    let job = job();
    f.admitted(&job, 10).await;
    assert_eq!(
        f.start(&job.id, "worker-a", true).await,
        StartOutcome::Run { attempt: 1 }
    );
    let record = f.hash(&f.ks().job(&job.id)).await;
    assert_eq!(record["status"], "running");
    assert_eq!(record["worker"], "worker-a");
    assert!(record.contains_key("started_at"));
    assert!(f.queued_ids().await.is_empty(), "left the queue");
    assert!(f.members(&f.ks().tenant_queued(TENANT)).await.is_empty());
    assert_eq!(
        f.members(&f.ks().tenant_active(TENANT)).await,
        [job.id.to_string()],
        "still active"
    );
    // A redelivery (the first worker died) is the next attempt ...
    assert_eq!(
        f.start(&job.id, "worker-b", true).await,
        StartOutcome::Run { attempt: 2 }
    );
    assert_eq!(
        f.start(&job.id, "worker-c", true).await,
        StartOutcome::Run { attempt: 3 }
    );
    // ... until the attempts run out: then it fails, and its reservation is refunded.
    assert_eq!(
        f.start(&job.id, "worker-d", true).await,
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
        f.start(&job.id, "worker-e", true).await,
        StartOutcome::Skip(JobStatus::Failed)
    );
    assert_eq!(
        f.start(&Uuid::now_v7(), "w", true).await,
        StartOutcome::Missing
    );
}

async fn a_second_copy_of_a_running_jobs_message_is_dropped(f: Fixture) {
    let job = job();
    f.admitted(&job, 10).await;
    // An idempotent retry published the job again: whichever copy comes first runs it ...
    assert_eq!(
        f.start(&job.id, "worker-a", false).await,
        StartOutcome::Run { attempt: 1 }
    );
    // ... and the other's first delivery does not run it a second time, nor count an attempt.
    assert_eq!(
        f.start(&job.id, "worker-b", false).await,
        StartOutcome::Duplicate
    );
    let record = f.hash(&f.ks().job(&job.id)).await;
    assert_eq!(
        (record["worker"].as_str(), record["attempts"].as_str()),
        ("worker-a", "1")
    );
    // A redelivery (worker-a died) runs it again ...
    assert_eq!(
        f.start(&job.id, "worker-b", true).await,
        StartOutcome::Run { attempt: 2 }
    );
    // ... and so does that delivery's own retry of `START` whose first reply was lost.
    assert_eq!(
        f.start(&job.id, "worker-b", false).await,
        StartOutcome::Run { attempt: 3 }
    );
    // Once it ended, either copy is skipped.
    assert!(
        f.store
            .finish(&job.id, &succeeded(4, 8))
            .await
            .expect("finish")
    );
    assert_eq!(
        f.start(&job.id, "worker-c", false).await,
        StartOutcome::Skip(JobStatus::Succeeded)
    );
}

async fn start_ends_a_cancelled_or_expired_job_instead_of_running_it(f: Fixture) {
    let expired = job_with(0, Priority::Interactive);
    f.admitted(&expired, 10).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(
        f.start(&expired.id, "w", true).await,
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
    f.start(&cancelled.id, "w", true).await;
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
        f.start(&cancelled.id, "w", true).await,
        StartOutcome::Ended(JobStatus::Cancelled)
    );
}

async fn finish_writes_the_terminal_state_once_and_refunds_what_was_not_used(f: Fixture) {
    let job = job();
    f.admitted(&job, 300).await;
    f.start(&job.id, "w", true).await;
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

async fn a_failed_job_pays_nothing(f: Fixture) {
    let job = job();
    f.admitted(&job, 300).await;
    f.start(&job.id, "w", true).await;
    let failed = Terminal {
        status: JobStatus::Failed,
        result: None,
        error: Some(ErrorBody::new(ErrorCode::Internal, "the model failed")),
    };
    assert!(f.store.finish(&job.id, &failed).await.expect("finish"));
    assert_eq!(f.day_used(&job).await, 0);
    assert_eq!(f.month_used(&job).await, 0);
}

async fn cancel_by_state_and_tenant(f: Fixture) {
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
    assert!(f.queued_ids().await.is_empty());
    assert_eq!(
        f.store.cancel(TENANT, &queued.id).await.expect("cancel"),
        CancelOutcome::AlreadyCancelled
    );
    // The queue message is still delivered: the worker skips it.
    assert_eq!(
        f.start(&queued.id, "w", true).await,
        StartOutcome::Skip(JobStatus::Cancelled)
    );

    let done = job();
    f.admitted(&done, 10).await;
    f.start(&done.id, "w", true).await;
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

async fn release_queues_a_running_job_again_without_counting_the_attempt(f: Fixture) {
    let job = job();
    f.admitted(&job, 10).await;
    assert!(
        !f.store.release(&job.id).await.expect("release"),
        "not running"
    );
    f.start(&job.id, "w", true).await;
    assert!(f.store.release(&job.id).await.expect("release"));
    let record = f.hash(&f.ks().job(&job.id)).await;
    assert_eq!(record["status"], "queued");
    assert_eq!(record["attempts"], "0");
    assert!(!record.contains_key("worker"));
    assert_eq!(f.queued_ids().await, [job.id.to_string()]);
    assert_eq!(
        f.members(&f.ks().tenant_queued(TENANT)).await,
        [job.id.to_string()]
    );
    assert_eq!(
        f.start(&job.id, "w2", true).await,
        StartOutcome::Run { attempt: 1 }
    );
}

async fn queue_stats_count_queued_jobs_by_priority(f: Fixture) {
    let a = job_with(60_000, Priority::Interactive);
    let b = job_with(60_000, Priority::Batch);
    let c = job_with(60_000, Priority::Batch);
    for j in [&a, &b, &c] {
        f.admitted(j, 1).await;
    }
    f.start(&a.id, "w", true).await;
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

async fn reconcile_finishes_what_a_crash_left_half_done(f: Fixture) {
    let later = |ms: u64| sluice_proto::now_ms() + ms;

    // 1. The admission reserved, then its process died before writing the record.
    let orphan = job();
    f.admitted(&orphan, 300).await;
    f.forget_record(&orphan).await;
    // 2. A job ended on its record, then its worker died before the tenant's settlement.
    let unsettled = job();
    f.admitted(&unsettled, 300).await;
    f.start(&unsettled.id, "w", true).await;
    {
        let mut conn = f.pool.get().await.expect("conn");
        let written: Vec<Option<String>> = JOB_FINISH
            .key(f.ks().job(&unsettled.id))
            .key(f.ks().job_events(&unsettled.id))
            .arg("succeeded")
            .arg("")
            .arg("")
            .arg(sluice_proto::now_ms())
            .arg(600)
            .arg(50)
            .invoke_async(&mut conn)
            .await
            .expect("finish script");
        assert_eq!(written[0].as_deref(), Some("1"));
    }
    // 3. A job running normally, whose queue entry a crash left behind.
    let running = job();
    f.admitted(&running, 300).await;
    f.start(&running.id, "w", true).await;
    {
        let mut conn = f.pool.get().await.expect("conn");
        let _: () = redis::cmd("ZADD")
            .arg(f.ks().queued(f.ks().queue_shard_of(&running.id)))
            .arg(running.deadline)
            .arg(JobRef::of(&running).queued_member())
            .query_async(&mut conn)
            .await
            .expect("ZADD");
    }
    assert_eq!(f.day_used(&orphan).await, 900);

    // Nothing is due before the admission grace.
    let early = f
        .store
        .reconcile(later(1_000), 100)
        .await
        .expect("reconcile");
    assert_eq!(early.examined, 0);

    let pass = f
        .store
        .reconcile(later(ADMISSION_GRACE_MS + 1_000), 100)
        .await
        .expect("reconcile");
    assert_eq!(
        pass,
        Reconciled {
            examined: 3,
            settled: 1,
            fenced: 1,
            expired: 0
        }
    );
    // The orphan is fenced (a late admission cannot write it) and refunded; the ended job
    // pays what it used; the running one still holds its reservation, and is queued no more.
    let fenced = f.hash(&f.ks().job(&orphan.id)).await;
    assert_eq!(fenced["status"], "failed");
    assert_eq!(fenced["tenant"], TENANT);
    let mut conn = f.pool.get().await.expect("conn");
    let late: i64 = JOB_CREATE
        .key(f.ks().job(&orphan.id))
        .arg(600)
        .arg("status")
        .arg("queued")
        .invoke_async(&mut conn)
        .await
        .expect("create script");
    assert_eq!(late, 0, "a fenced admission cannot write its record");
    assert_eq!(f.day_used(&orphan).await, 50 + 300);
    assert_eq!(
        f.reservations().await.keys().collect::<Vec<_>>(),
        [&running.id.to_string()]
    );
    assert!(f.queued_ids().await.is_empty());
    assert_eq!(
        f.members(&f.ks().tenant_active(TENANT)).await,
        [running.id.to_string()]
    );

    // Another pass refunds nothing twice.
    let again = f
        .store
        .reconcile(later(ADMISSION_GRACE_MS + RECHECK_MS + 2_000), 100)
        .await
        .expect("reconcile");
    assert_eq!(again.examined, 1, "only the running job is still in flight");
    assert_eq!(f.day_used(&orphan).await, 350);

    // 4. Long past its deadline, the running job (its worker gone, its message lost) expires
    // and pays its whole reservation: it may have generated.
    let pass = f
        .store
        .reconcile(running.deadline + EXPIRY_GRACE_MS + RECHECK_MS * 4, 100)
        .await
        .expect("reconcile");
    assert_eq!(pass.expired, 1);
    let view = f
        .store
        .get(TENANT, &running.id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(view.status, JobStatus::Expired);
    assert_eq!(f.day_used(&orphan).await, 350, "nothing refunded");
    f.assert_nothing_held().await;
}

async fn an_admission_whose_answer_was_lost_is_abandoned_at_once(f: Fixture) {
    // The tenant's step ran, the record was never written (Redis went away in between).
    let (job, key, _) = f.admitted_without_record("lost", 90).await;
    assert_eq!(f.day_used(&job).await, 90);
    f.store.abandon(&job, Some(&key)).await.expect("abandon");
    assert_eq!(
        f.day_used(&job).await,
        0,
        "refunded now, not at the reconciler's look"
    );
    assert_eq!(
        f.ttl(&key).await,
        -2,
        "the idempotency key may be used again"
    );
    f.assert_nothing_held().await;
    // Again (a retry): nothing more.
    f.store.abandon(&job, Some(&key)).await.expect("abandon");
    assert_eq!(f.day_used(&job).await, 0);

    // A published job that started is left alone.
    let running = self::job();
    f.admitted(&running, 5).await;
    f.start(&running.id, "w", true).await;
    f.store.abandon(&running, None).await.expect("abandon");
    assert_eq!(f.hash(&f.ks().job(&running.id)).await["status"], "running");
    assert_eq!(f.day_used(&running).await, 5);
}

async fn a_fenced_admission_frees_its_idempotency_key(f: Fixture) {
    // The tenant's step ran and wrote the idempotency record; the process died before the
    // job's record.
    let (orphan, key, admission) = f.admitted_without_record("fenced", 40).await;
    // Meanwhile a retry is told to come back, not given an id that reads as missing.
    let waited = std::time::Instant::now();
    assert!(matches!(
        f.store.admit(&job(), &admission).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(waited.elapsed() >= DUPLICATE_WAIT);
    // The reconciler's fence lands, and its pass dies before the settlement that frees the
    // key: a retry now is still told to come back, not handed the fence's failure.
    {
        let mut conn = f.pool.get().await.expect("conn");
        let fenced: i64 = JOB_FENCE
            .key(f.ks().job(&orphan.id))
            .arg(TENANT)
            .arg(sluice_proto::now_ms())
            .arg(600)
            .arg("{}")
            .invoke_async(&mut conn)
            .await
            .expect("fence script");
        assert_eq!(fenced, 1);
    }
    let waited = std::time::Instant::now();
    assert!(matches!(
        f.store.admit(&job(), &admission).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(
        waited.elapsed() < DUPLICATE_WAIT,
        "no wait for a fenced job"
    );
    // The next pass settles the fenced job and frees the key all the same.
    let pass = f
        .store
        .reconcile(sluice_proto::now_ms() + ADMISSION_GRACE_MS + 1, 100)
        .await
        .expect("reconcile");
    assert_eq!((pass.fenced, pass.settled), (0, 1));
    assert_eq!(f.day_used(&orphan).await, 0, "refunded");
    assert_eq!(
        f.ttl(&key).await,
        -2,
        "the key no longer names the fenced job"
    );

    // The client's retry with the same key is a new job, not the failed one.
    let retry = job();
    assert_eq!(
        f.store.admit(&retry, &admission).await.expect("admit"),
        AdmitOutcome::Admitted
    );
    assert_eq!(f.day_used(&retry).await, 40);
    // A finished job keeps its key: a retry replays it.
    f.start(&retry.id, "w", true).await;
    assert!(
        f.store
            .finish(&retry.id, &succeeded(4, 8))
            .await
            .expect("finish")
    );
    assert_eq!(
        f.store.admit(&job(), &admission).await.expect("admit"),
        AdmitOutcome::Duplicate(retry.id)
    );
}

async fn a_queued_job_whose_message_was_lost_expires_and_is_refunded(f: Fixture) {
    let lost = job();
    f.admitted(&lost, 120).await;
    let pass = f
        .store
        .reconcile(lost.deadline + EXPIRY_GRACE_MS + 1, 100)
        .await
        .expect("reconcile");
    assert_eq!(pass.expired, 1);
    let record = f.hash(&f.ks().job(&lost.id)).await;
    assert_eq!(record["status"], "expired");
    assert_eq!(f.day_used(&lost).await, 0);
    f.assert_nothing_held().await;
}

/// Retries a store call that failed (Redis unreachable for a moment, a failover), as a
/// worker's redelivery or a client's retry would.
async fn retried<T, Fut: std::future::Future<Output = Result<T, StoreError>>>(
    mut call: impl FnMut() -> Fut,
) -> Result<T, StoreError> {
    let mut last = None;
    // Up to 10 s: a killed primary's replica takes over in about 4 (`scripts/redis-cluster`'s
    // node timeout is 2 s).
    for _ in 0..100 {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(last.expect("an error"))
}

/// Jobs admitted, started, cancelled and finished at once under a daily quota, with a
/// reconciler running beside them (told it is later than it is, so it races the admissions it
/// fences and the jobs it mirrors). Returns the ids tried.
async fn busy_tenant(f: &Fixture, jobs: usize) -> Vec<Uuid> {
    let admission = Admission {
        reserve: 100,
        tokens_per_day: Some(2_000),
        ..Admission::default()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reconciler = {
        let store = f.store.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = store
                    .reconcile(sluice_proto::now_ms() + ADMISSION_GRACE_MS + 1, 50)
                    .await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..jobs {
        let store = f.store.clone();
        let admission = admission.clone();
        tasks.push(tokio::spawn(async move {
            let job = job();
            tokio::time::sleep(std::time::Duration::from_millis(i as u64 * 7)).await;
            if store.admit(&job, &admission).await.ok() != Some(AdmitOutcome::Admitted) {
                return job.id;
            }
            if i % 5 == 0 {
                let _ = retried(|| store.cancel(TENANT, &job.id)).await;
                return job.id;
            }
            if let Ok(StartOutcome::Run { .. }) =
                retried(|| store.start(&job.id, 3, "w", false, "w")).await
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                let done = succeeded(10, 1 + i as u32 % 60);
                let _ = retried(|| store.finish(&job.id, &done)).await;
            }
            job.id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reconciler.await.expect("reconciler");
    ids
}

/// After a final reconciliation: every job that was written is terminal, the tenant's
/// counters hold exactly what the jobs used, and nothing is left reserved, active, queued or
/// in flight.
async fn assert_books_balance(f: &Fixture, ids: &[Uuid]) {
    let far = sluice_proto::now_ms() + 7 * 86_400_000;
    retried(|| f.store.reconcile(far, 10_000))
        .await
        .expect("reconcile");
    let mut used_by_day: HashMap<String, i64> = HashMap::new();
    let mut written = 0;
    for id in ids {
        let record = f.hash(&f.ks().job(id)).await;
        if record.is_empty() {
            continue;
        }
        written += 1;
        let status = JobStatus::parse(&record["status"]).expect("status");
        assert!(status.is_terminal(), "job {id} ended {status:?}");
        let created: u64 = record["created_at"].parse().expect("created_at");
        let used: i64 = record.get("used").map_or(0, |u| u.parse().expect("used"));
        *used_by_day.entry(utc_day_and_month(created).0).or_default() += used;
    }
    assert!(written > 0);
    for (day, used) in used_by_day {
        let counter = f.int(&f.ks().tenant_tokens_day(TENANT, &day)).await;
        assert_eq!(counter, used, "the day's counter is what the jobs used");
    }
    f.assert_nothing_held().await;
}

async fn concurrent_jobs_and_a_reconciler_keep_the_quota_exact(f: Fixture) {
    let ids = busy_tenant(&f, 60).await;
    assert_books_balance(&f, &ids).await;
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        /// Every case on one Redis server.
        mod single {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::on(false)).await
                }
            )*
        }
        /// Every case on a Redis Cluster (3 primaries, 3 replicas under `scripts/test`).
        mod cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::on(true)).await
                }
            )*
        }
    };
}

cases!(
    admit_writes_a_queued_record_and_reserves_its_tokens,
    a_refused_admission_writes_nothing,
    an_idempotency_key_replays_its_job_and_refuses_another_request,
    rollback_removes_the_record_refunds_and_frees_the_idempotency_key,
    start_runs_a_queued_job_once_per_delivery,
    a_second_copy_of_a_running_jobs_message_is_dropped,
    start_ends_a_cancelled_or_expired_job_instead_of_running_it,
    finish_writes_the_terminal_state_once_and_refunds_what_was_not_used,
    a_failed_job_pays_nothing,
    cancel_by_state_and_tenant,
    release_queues_a_running_job_again_without_counting_the_attempt,
    queue_stats_count_queued_jobs_by_priority,
    reconcile_finishes_what_a_crash_left_half_done,
    a_queued_job_whose_message_was_lost_expires_and_is_refunded,
    an_admission_whose_answer_was_lost_is_abandoned_at_once,
    a_fenced_admission_frees_its_idempotency_key,
    concurrent_jobs_and_a_reconciler_keep_the_quota_exact,
);

/// The cases that do not depend on the namespace's queue cap being exact, on the cluster with
/// the per-job indexes in 4 shards (`--queue-shards 4`).
mod sharded {
    macro_rules! sharded {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::sharded(true, 4)).await
                }
            )*
        };
    }
    sharded!(
        admit_writes_a_queued_record_and_reserves_its_tokens,
        rollback_removes_the_record_refunds_and_frees_the_idempotency_key,
        release_queues_a_running_job_again_without_counting_the_attempt,
        queue_stats_count_queued_jobs_by_priority,
        reconcile_finishes_what_a_crash_left_half_done,
        a_queued_job_whose_message_was_lost_expires_and_is_refunded,
        a_fenced_admission_frees_its_idempotency_key,
        concurrent_jobs_and_a_reconciler_keep_the_quota_exact,
        each_shard_holds_its_share_of_the_namespace_cap,
    );
}

/// With the indexes in shards, the namespace's cap holds per shard (its share, rounded up):
/// the namespace never queues more than the shares add up to, and processes configured with
/// another shard count refuse to start.
async fn each_shard_holds_its_share_of_the_namespace_cap(f: Fixture) {
    let shards = u64::from(f.ks().queue_shards());
    let admission = Admission {
        max_queued: Some(6),
        ..Admission::default()
    };
    let share = 6u64.div_ceil(shards);
    let mut admitted = 0u64;
    let mut refused = 0;
    for _ in 0..60 {
        match f.store.admit(&job(), &admission).await.expect("admit") {
            AdmitOutcome::Admitted => admitted += 1,
            AdmitOutcome::QueueFull {
                tenant: false,
                limit: 6,
                ..
            } => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        admitted,
        share * shards,
        "every shard full, none over its share"
    );
    assert_eq!(refused, 60 - admitted);
    let depth: u64 = f
        .store
        .queue_stats(sluice_proto::now_ms())
        .await
        .expect("stats")
        .iter()
        .map(|s| s.depth)
        .sum();
    assert_eq!(depth, admitted, "the metrics add the shards up");

    assert_eq!(
        f.store.check_queue_shards().await,
        Ok(()),
        "records the count"
    );
    assert_eq!(
        f.store.check_queue_shards().await,
        Ok(()),
        "and agrees with it"
    );
    let other = JobStore::new(
        f.pool.clone(),
        Keyspace::new(f.ks().namespace()).with_queue_shards(f.ks().queue_shards() + 1),
        600,
    );
    let refused = other.check_queue_shards().await.expect_err("another count");
    assert!(refused.contains("--queue-shards"), "{refused}");
}

/// The busy tenant of 80 jobs, with `fault` done to the primary that holds the tenant's slot
/// 150 ms in (given the nodes' URLs and a key of the slot); its ids and what `fault` returned.
async fn busy_tenant_through<T, Fut: std::future::Future<Output = T>>(
    f: &Fixture,
    fault: impl FnOnce(Vec<String>, String) -> Fut,
) -> (Vec<Uuid>, T) {
    let fault = fault(f.nodes.clone(), f.ks().tenant_reservations(TENANT));
    tokio::join!(busy_tenant(f, 80), async move {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        fault.await
    })
}

/// The busy tenant again on the cluster, while the primary that holds the tenant's slot hands
/// over to its replica (`CLUSTER FAILOVER`): no job is lost, no token overspent or refunded
/// twice, every job ends.
#[tokio::test]
async fn a_primary_failover_mid_run_loses_no_job_and_no_token() {
    let f = Fixture::on(true);
    let (ids, promoted) = busy_tenant_through(&f, |nodes, key| async move {
        crate::cluster_admin::fail_over_primary_of(&nodes, &key).await
    })
    .await;
    let promoted = promoted.expect("failover");
    assert_books_balance(&f, &ids).await;
    // The reservations now live on the promoted node.
    let mut conn = redis::Client::open(format!("redis://{promoted}"))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let role: Vec<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut conn)
        .await
        .expect("ROLE");
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"master".to_vec()))
    );
}

/// A Redis Cluster of this test's own (`scripts/redis-cluster`), for a fault that would
/// disturb the tests sharing the run's cluster; stopped and removed on drop.
struct OwnCluster {
    dir: std::path::PathBuf,
    urls: Vec<String>,
}

impl OwnCluster {
    fn start() -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/redis-cluster");
        let dir = std::env::temp_dir().join(format!("sluice-own-cluster-{}", Uuid::now_v7()));
        let out = std::process::Command::new(script)
            .arg("start")
            .arg(&dir)
            // Clear of the run's cluster (from 7101) and the benchmarks' (7301).
            .env("SLUICE_CLUSTER_BASE_PORT", "7601")
            .output()
            .expect("scripts/redis-cluster");
        assert!(
            out.status.success(),
            "cannot start a cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let urls = String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(',')
            .map(str::to_string)
            .collect();
        Self { dir, urls }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/redis-cluster");
        let _ = std::process::Command::new(script)
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

/// The busy tenant on a cluster of its own, while the primary that holds the tenant's slot
/// is killed outright (`SIGKILL`): commands on its slots fail until its replica takes over,
/// about 4 s later, and are retried as a worker's redelivery or a client would; admissions
/// refused meanwhile are left to the reconciler. No job is lost, no token overspent or
/// refunded twice, every job ends; the killed node, started again, rejoins as a replica
/// without bringing back what it held.
///
/// Redis replicates asynchronously: a write that the killed primary acknowledged in the
/// moment before it died and had not yet sent to its replica is lost. On one machine that
/// window is microseconds wide; across machines it is wider (docs/deployment.md).
#[tokio::test]
async fn a_primary_killed_mid_run_loses_no_job_and_no_token() {
    let cluster = OwnCluster::start();
    let f = Fixture::on_nodes(cluster.urls.clone(), true, 1);
    let (ids, killed) = busy_tenant_through(&f, |nodes, key| async move {
        crate::cluster_admin::kill_primary_of(&nodes, &key).await
    })
    .await;
    let killed = killed.expect("kill");
    assert_books_balance(&f, &ids).await;
    killed.restart().await.expect("restart");
    assert_books_balance(&f, &ids).await;
}
