//! `sluice-load`: drives a running Sluice API over HTTP and reports throughput and latency.
//!
//! * `submit`: `--connections` clients submit jobs back to back for `--duration` seconds
//!   (closed loop, keep-alive); prints requests/s, the status mix and p50/p90/p99/max latency.
//!   Everything on the submit path runs: auth, rate limits, guard, token count, quota and the
//!   publish with confirms.
//! * `e2e`: 1-token jobs one at a time; reports end-to-end latency (submit to terminal, seen on
//!   the job's event stream, or with `--e2e-watch poll` by polling every millisecond) minus the
//!   generation time the worker recorded: the queue overhead.
//!
//! `benches/load/run.sh` starts an API with limits lifted and runs both.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Submit,
    E2e,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "submit")]
    mode: Mode,
    /// The API's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base: String,
    /// An API key (`sluice-api keys create`).
    #[arg(long, env = "SLUICE_LOAD_KEY")]
    key: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of load (submit) or number of jobs (e2e).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, default_value_t = 200)]
    e2e_jobs: usize,
    /// How the e2e client learns that a job ended: its event stream (Server-Sent Events,
    /// opened right after the submit) or polling `GET /v1/jobs/{id}` every millisecond.
    #[arg(long, value_enum, default_value = "events")]
    e2e_watch: Watch,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Watch {
    Events,
    Poll,
}

/// Reads a job's event stream until its `done` event; returns the terminal job.
async fn watch_events(client: &reqwest::Client, args: &Args, id: &str) -> anyhow::Result<Value> {
    let mut r = client
        .get(format!("{}/v1/jobs/{id}/events", args.base))
        .bearer_auth(&args.key)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "events answered {}", r.status());
    let mut text = String::new();
    while let Some(chunk) = r.chunk().await? {
        text.push_str(&String::from_utf8_lossy(&chunk));
        // An SSE event ends with a blank line; the `done` event carries the job.
        if let Some(at) = text.find("event: done\n") {
            let rest = &text[at..];
            if let Some(end) = rest.find("\n\n") {
                let data = rest[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap_or("{}");
                let v: Value = serde_json::from_str(data)?;
                return Ok(v["job"].clone());
            }
        }
    }
    anyhow::bail!("event stream ended without a done event")
}

/// Polls a job every millisecond until it is terminal.
async fn watch_poll(client: &reqwest::Client, args: &Args, id: &str) -> anyhow::Result<Value> {
    loop {
        let v: Value = client
            .get(format!("{}/v1/jobs/{id}", args.base))
            .bearer_auth(&args.key)
            .send()
            .await?
            .json()
            .await?;
        let status = v["status"].as_str().unwrap_or("");
        if !matches!(status, "queued" | "running") {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn body(n: u64) -> Value {
    json!({
        "messages": [{"role": "user", "content": format!("Summarise the plot of a novel, take {n}.")}],
        "max_tokens": 1,
        "temperature": 0,
    })
}

async fn submit(args: &Args) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let until = Instant::now() + Duration::from_secs(args.duration);
    let url = format!("{}/v1/jobs", args.base);
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (client, url, key) = (client.clone(), url.clone(), args.key.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
            let mut n = c as u64 * 1_000_000;
            while Instant::now() < until {
                n += 1;
                let t = Instant::now();
                let status = match client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&body(n))
                    .send()
                    .await
                {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let _ = r.bytes().await;
                        s
                    }
                    Err(_) => 0,
                };
                latencies.push(t.elapsed());
                *statuses.entry(status).or_default() += 1;
            }
            (latencies, statuses)
        }));
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for t in tasks {
        let (l, s) = t.await?;
        latencies.extend(l);
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "submit: {} requests in {secs:.1} s over {} connections: {:.0} req/s; status {statuses:?}",
        latencies.len(),
        args.connections,
        latencies.len() as f64 / secs
    );
    println!(
        "latency: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.90)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0))
    );
    Ok(())
}

async fn e2e(args: &Args) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut overheads = Vec::new();
    // The same, less the whole-millisecond `generation_ms` (how it was measured before
    // workers reported microseconds), for comparison with older figures.
    let mut overheads_whole_ms = Vec::new();
    let (mut submits, mut queued) = (Vec::new(), Vec::new());
    for n in 0..args.e2e_jobs {
        let t = Instant::now();
        let r = client
            .post(format!("{}/v1/jobs", args.base))
            .bearer_auth(&args.key)
            .json(&body(n as u64))
            .send()
            .await?;
        anyhow::ensure!(r.status().as_u16() == 202, "submit answered {}", r.status());
        let id = r.json::<Value>().await?["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        submits.push(t.elapsed());
        let job = match args.e2e_watch {
            Watch::Events => watch_events(&client, args, &id).await?,
            Watch::Poll => watch_poll(&client, args, &id).await?,
        };
        let total = t.elapsed();
        anyhow::ensure!(job["status"] == "succeeded", "job ended {job}");
        let timings = &job["result"]["timings"];
        let generation_whole_ms =
            Duration::from_millis(timings["generation_ms"].as_u64().unwrap_or(0));
        // Microseconds where the worker reports them: whole milliseconds (truncated) would
        // count up to a millisecond of generation as overhead.
        let generation = match timings["generation_us"].as_u64() {
            Some(us) if us > 0 => Duration::from_micros(us),
            _ => generation_whole_ms,
        };
        overheads.push(total.saturating_sub(generation));
        overheads_whole_ms.push(total.saturating_sub(generation_whole_ms));
        queued.push(Duration::from_millis(
            timings["queued_ms"].as_u64().unwrap_or(0),
        ));
    }
    overheads.sort();
    overheads_whole_ms.sort();
    submits.sort();
    queued.sort();
    println!(
        "queue overhead ({} one-token jobs, end to end minus generation, watched by {:?}): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
        overheads.len(),
        args.e2e_watch,
        ms(percentile(&overheads, 0.50)),
        ms(percentile(&overheads, 0.90)),
        ms(percentile(&overheads, 0.99))
    );
    println!(
        "  (less whole-millisecond generation_ms instead, as measured before: p50 {:.2} ms)",
        ms(percentile(&overheads_whole_ms, 0.50))
    );
    println!(
        "  of which: submit answered (202) p50 {:.2} ms; accepted to started on the worker \
         (publish, delivery, START; whole ms) p50 {:.0} ms",
        ms(percentile(&submits, 0.50)),
        ms(percentile(&queued, 0.50)),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.mode {
        Mode::Submit => submit(&args).await,
        Mode::E2e => e2e(&args).await,
    }
}
