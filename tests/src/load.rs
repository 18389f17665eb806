//! An open-loop load generator, and checks of what the jobs did (Redis records, worker logs,
//! memory).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_jobs::keyspace::Keyspace;

use crate::TestRedisExt;
#[cfg(doc)]
use crate::WorkerProcess;

/// What one submit of a load generator got back.
#[derive(Debug, Clone)]
pub struct Submission {
    /// When it was sent, from the start of the load.
    pub at: Duration,
    /// How long the answer took.
    pub latency: Duration,
    /// The HTTP status; 0 when no answer came (connection refused or reset).
    pub status: u16,
    /// The error code of a refusal (`queue_unavailable`, ...).
    pub code: Option<String>,
    /// The job id of a 202.
    pub id: Option<String>,
    /// The request did not get an answer within the client timeout (a hang).
    pub timed_out: bool,
}

/// What a load generator saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub submissions: Vec<Submission>,
}

impl LoadReport {
    /// Ids of accepted jobs, in the order they were submitted.
    pub fn accepted(&self) -> Vec<String> {
        self.submissions
            .iter()
            .filter_map(|s| s.id.clone())
            .collect()
    }

    /// Count per HTTP status (0: no answer).
    pub fn statuses(&self) -> std::collections::BTreeMap<u16, usize> {
        let mut m = std::collections::BTreeMap::new();
        for s in &self.submissions {
            *m.entry(s.status).or_default() += 1;
        }
        m
    }

    /// Count per error code of the refusals.
    pub fn codes(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for s in &self.submissions {
            if let Some(c) = &s.code {
                *m.entry(c.clone()).or_default() += 1;
            }
        }
        m
    }

    pub fn timeouts(&self) -> usize {
        self.submissions.iter().filter(|s| s.timed_out).count()
    }

    /// The `q` quantile (0..=1) of the submit latency, in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        let mut l: Vec<Duration> = self
            .submissions
            .iter()
            .filter(|s| s.status != 0)
            .map(|s| s.latency)
            .collect();
        sluice_shared::metrics::nearest_rank(&mut l, q).as_secs_f64() * 1000.0
    }
}

/// An open-loop load generator: submits one job every `every` (each in its own task, so a
/// slow answer never lowers the rate) to whichever API `base` names at that moment, until
/// [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<LoadReport>,
    live: Arc<Mutex<Vec<String>>>,
}

/// Client timeout of one submit: an answer later than this counts as a hang.
pub const SUBMIT_TIMEOUT: Duration = Duration::from_secs(15);

impl Load {
    /// `body(n)` is the n-th request body (n from 1).
    pub fn start(
        http: reqwest::Client,
        base: Arc<Mutex<String>>,
        key: String,
        every: Duration,
        body: impl Fn(u64) -> Value + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let live = Arc::new(Mutex::new(Vec::new()));
        let live_ids = Arc::clone(&live);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(every);
            let mut tasks = tokio::task::JoinSet::new();
            let mut report = LoadReport::default();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                tick.tick().await;
                while let Some(done) = tasks.try_join_next() {
                    report.submissions.push(done.expect("submit task"));
                }
                n += 1;
                let url = format!("{}/v1/jobs", base.lock().expect("lock"));
                let request = http
                    .post(url)
                    .bearer_auth(&key)
                    .json(&body(n))
                    .timeout(SUBMIT_TIMEOUT);
                let at = started.elapsed();
                let live = Arc::clone(&live_ids);
                tasks.spawn(async move {
                    let sent = Instant::now();
                    let mut s = Submission {
                        at,
                        latency: Duration::ZERO,
                        status: 0,
                        code: None,
                        id: None,
                        timed_out: false,
                    };
                    match request.send().await {
                        Ok(r) => {
                            s.status = r.status().as_u16();
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            s.latency = sent.elapsed();
                            if s.status == 202 {
                                let id = v["id"].as_str().expect("id of a 202").to_string();
                                live.lock().expect("lock").push(id.clone());
                                s.id = Some(id);
                            } else {
                                s.code = v["error"]["code"].as_str().map(str::to_string);
                            }
                        }
                        Err(e) => {
                            s.latency = sent.elapsed();
                            s.timed_out = e.is_timeout();
                        }
                    }
                    s
                });
            }
            while let Some(done) = tasks.join_next().await {
                report.submissions.push(done.expect("submit task"));
            }
            report.submissions.sort_by_key(|s| s.at);
            report
        });
        Self { stop, task, live }
    }

    /// The ids accepted so far, growing while the load runs (for a poller beside it).
    pub fn live_accepted(&self) -> Arc<Mutex<Vec<String>>> {
        Arc::clone(&self.live)
    }

    /// Stops submitting and waits for the answers still outstanding.
    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load generator")
    }
}

/// Waits (reading Redis directly, in pipelines on one server) until every job in `ids` is terminal, then
/// checks each was completed exactly once: one `done` event in its stream. Returns the
/// records (`status`, `attempts`, `worker`, `result`) by id.
pub async fn await_terminal_once(
    redis: &mut crate::TestRedis,
    ns: &str,
    ids: &[String],
    timeout: Duration,
) -> HashMap<String, HashMap<String, String>> {
    let start = Instant::now();
    let mut pending: Vec<String> = ids.to_vec();
    let mut records = HashMap::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for chunk in pending.chunks(500) {
            let cmds = chunk
                .iter()
                .map(|id| {
                    redis::cmd("HGETALL")
                        .arg(Keyspace::new(ns).job(&id.parse().expect("a job id")))
                        .to_owned()
                })
                .collect();
            let rows: Vec<HashMap<String, String>> =
                redis.each(cmds).await.expect("read job records");
            for (id, row) in chunk.iter().zip(rows) {
                let status = row.get("status").map(String::as_str).unwrap_or("");
                if matches!(status, "queued" | "running" | "") {
                    assert!(!row.is_empty(), "accepted job {id} has no record");
                    still.push(id.clone());
                } else {
                    records.insert(id.clone(), row);
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < timeout,
            "{} of {} accepted jobs not terminal after {timeout:?}, e.g. {}",
            pending.len(),
            ids.len(),
            pending[0]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for chunk in ids.chunks(500) {
        let cmds = chunk
            .iter()
            .map(|id| {
                redis::cmd("XRANGE")
                    .arg(Keyspace::new(ns).job_events(&id.parse().expect("a job id")))
                    .arg("-")
                    .arg("+")
                    .to_owned()
            })
            .collect();
        let streams: Vec<Vec<(String, HashMap<String, String>)>> =
            redis.each(cmds).await.expect("read event streams");
        for (id, entries) in chunk.iter().zip(streams) {
            let done = entries
                .iter()
                .filter(|(_, f)| f.get("type").map(String::as_str) == Some("done"))
                .count();
            assert_eq!(done, 1, "job {id} finished {done} times");
        }
    }
    records
}

/// The log lines with `message`, over the JSON logs of [`WorkerProcess::spawn_logged`]
/// workers in `log_dir`.
pub fn log_lines(log_dir: &Path, message: &str) -> Vec<Value> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(log_dir).expect("log dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("log") {
            continue;
        }
        for line in std::fs::read_to_string(&path).expect("read log").lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            // Flattened (`--log-format json`) or not.
            if v["message"] == message || v["fields"]["message"] == message {
                lines.push(v);
            }
        }
    }
    lines
}

/// How many times each job was started to run (its `job started` log lines), over the JSON
/// logs of [`WorkerProcess::spawn_logged`] workers in `log_dir`.
pub fn jobs_started(log_dir: &Path) -> HashMap<String, usize> {
    let mut started = HashMap::new();
    for v in log_lines(log_dir, "job started") {
        {
            let id = v["span"]["job_id"]
                .as_str()
                .or_else(|| {
                    v["spans"]
                        .as_array()?
                        .iter()
                        .find_map(|s| s["job_id"].as_str())
                })
                .unwrap_or_else(|| panic!("a job id in {v}"));
            *started.entry(id.to_string()).or_default() += 1;
        }
    }
    started
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
