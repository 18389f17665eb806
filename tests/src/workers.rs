//! Workers: in this process, or as `sluice-worker` processes.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use tokio::sync::oneshot;

#[cfg(doc)]
use crate::jobs_started;
use crate::{AMQP_URL, workspace_bin};

/// A worker running in this process.
pub struct InProcessWorker {
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessWorker {
    pub async fn spawn(ns: &str, model: &Path) -> Self {
        Self::spawn_with(ns, model, &[]).await
    }

    pub async fn spawn_with(ns: &str, model: &Path, extra: &[&str]) -> Self {
        let model = model.to_str().expect("utf-8 path").to_string();
        let redis_url = crate::redis_url();
        let mut args = vec![
            "sluice-worker",
            "--namespace",
            ns,
            "--model",
            &model,
            "--redis-url",
            &redis_url,
            "--amqp-url",
            AMQP_URL,
        ];
        args.extend_from_slice(extra);
        if crate::on_cluster() {
            args.push("--redis-cluster");
        }
        let settings = sluice_worker::WorkerSettings::parse_from(args).expect("settings");
        let worker = sluice_worker::Worker::build(settings)
            .await
            .expect("build worker");
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(worker.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            done: Some(done),
        }
    }

    /// Stops consuming and waits for the worker to drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            done.await.expect("join").expect("worker result");
        }
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A `sluice-worker` process (for kill -9).
pub struct WorkerProcess {
    pub child: Child,
    pub id: String,
}

impl WorkerProcess {
    pub fn spawn(ns: &str, model: &Path, id: &str) -> Self {
        Self::spawn_on(ns, model, id, &crate::redis_url(), AMQP_URL, &[])
    }

    /// A worker process against the given Redis and broker, with extra flags.
    pub fn spawn_on(
        ns: &str,
        model: &Path,
        id: &str,
        redis_url: &str,
        amqp_url: &str,
        extra: &[&str],
    ) -> Self {
        let mut cmd = Command::new(workspace_bin("sluice-worker"));
        cmd.args(["--namespace", ns, "--worker-id", id, "--model"])
            .arg(model)
            .args(extra)
            .env("SLUICE_REDIS_URL", redis_url)
            .env(
                "SLUICE_REDIS_CLUSTER",
                (crate::is_cluster_url(redis_url) && !extra.contains(&"--redis-cluster"))
                    .to_string(),
            )
            .env("SLUICE_AMQP_URL", amqp_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        Self {
            child: cmd.spawn().expect("spawn sluice-worker"),
            id: id.to_string(),
        }
    }

    /// Like [`WorkerProcess::spawn_on`], logging JSON lines to `<log_dir>/<id>.log`, with the
    /// consumer at `info`: one `job started` line per `START` that let a job run, which
    /// [`jobs_started`] counts.
    pub fn spawn_logged(
        ns: &str,
        model: &Path,
        id: &str,
        redis_url: &str,
        amqp_url: &str,
        log_dir: &Path,
    ) -> Self {
        let log = std::fs::File::create(log_dir.join(format!("{id}.log"))).expect("log file");
        let child = Command::new(workspace_bin("sluice-worker"))
            .args([
                "--namespace",
                ns,
                "--worker-id",
                id,
                "--log-format",
                "json",
                "--model",
            ])
            .arg(model)
            .env("SLUICE_REDIS_URL", redis_url)
            .env(
                "SLUICE_REDIS_CLUSTER",
                crate::is_cluster_url(redis_url).to_string(),
            )
            .env("SLUICE_AMQP_URL", amqp_url)
            .env("RUST_LOG", "warn,sluice_worker::intake::consumer=info")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn sluice-worker");
        Self {
            child,
            id: id.to_string(),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
