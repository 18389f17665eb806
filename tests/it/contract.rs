//! The API against its own OpenAPI document, by Schemathesis (PyPI `schemathesis`, pinned in
//! `scripts/python-env`): every operation, with valid and invalid data, example, coverage,
//! fuzzing and stateful phases, bounded in examples and time. It fails on a 5xx, a response
//! the document does not describe (status, headers, content type or body, each event of an
//! event stream), invalid data the API accepted, a deleted resource still served, or
//! authentication ignored.
//!
//! One check is left out: `positive_data_acceptance` (every schema-valid request must be
//! accepted). The API refuses, with a documented 4xx, requests that JSON Schema cannot tell
//! from valid ones: all messages empty, `max_tokens` and `max_completion_tokens` together, a
//! reused `Idempotency-Key` with another body, an integer written as `43.0` (serde reads
//! integers only), a guard verdict, a context overflow.

use std::time::Duration;

use serde_json::Value;
use sluice_tests::*;

/// Examples per operation and phase; the whole run is also bounded by `MAX_SECS`.
const MAX_EXAMPLES: &str = "25";
const MAX_SECS: &str = "240";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_5xx_and_no_response_outside_the_document() {
    let python = std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_it = std::process::Command::new(&python)
        .args(["-c", "import schemathesis"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_it,
        "{python} cannot import schemathesis: run the tests with scripts/test, which installs \
         it into a virtualenv, or set SLUICE_TEST_PYTHON"
    );
    let _load = crate::load_test_lock().await;
    let ns = unique_namespace("contract");
    let backends = Backends::connect(&ns).await;
    // The per-address and per-tenant request limits are for the internet, not for a fuzzer on
    // loopback: with them, most operations would only ever answer 429.
    let app = TestApp::spawn_full(
        &ns,
        tiny_model_dir(),
        AMQP_URL,
        &[
            "--ip-requests-per-second",
            "0",
            "--ip-requests-per-minute",
            "0",
            "--default-requests-per-second",
            "1000000",
            "--default-requests-per-minute",
            "60000000",
            "--default-max-active-jobs",
            "1000000",
            "--default-max-queued-jobs",
            "1000000",
        ],
    )
    .await;
    let worker = InProcessWorker::spawn(&ns, tiny_model_dir()).await;
    let admin = app.admin_key().await;

    let document: Value = app
        .http
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .expect("openapi.json")
        .json()
        .await
        .expect("openapi.json is JSON");
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        document["openapi"]
    );

    let report = TempDir::new("contract");
    let junit = report.path().join("junit.xml");
    // A schema-violating request may also be refused as 413 `payload_too_large` (a generated
    // body over the limit) before its content is read: a rejection as valid as a 400, but not
    // in Schemathesis' default list for this check (a fuzzing run once met it).
    let config = report.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[checks.negative_data_rejection]\nexpected-statuses = [\"400\", \"401\", \"403\", \
         \"404\", \"405\", \"406\", \"409\", \"413\", \"415\", \"422\", \"428\", \"429\", \"5xx\"]\n",
    )
    .expect("write schemathesis.toml");
    let run = tokio::process::Command::new(&python)
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(&config)
        .arg("run")
        // Its crash cache (`.schemathesis/`) goes in the run's own directory: no state
        // carries from one run to the next.
        .current_dir(report.path())
        .arg(format!("{}/openapi.json", app.base))
        .args(["--url", &app.base])
        .args(["--header", &format!("Authorization: Bearer {admin}")])
        .args(["--checks", "all"])
        .args(["--exclude-checks", "positive_data_acceptance"])
        .args(["--mode", "all"])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--max-time", MAX_SECS])
        .args(["--request-timeout", "20"])
        .args(["--seed", "20261205"])
        // One worker: with two, hypothesis parses source (`ast.parse`) from two threads at
        // once, which CPython 3.11 can fail with "AST constructor recursion depth mismatch".
        .args(["--workers", "1"])
        .args(["--generation-database", "none"])
        .args(["--no-color", "--output-truncate", "true"])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&junit)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("schemathesis ran past 10 minutes")
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}"
    );
    worker.stop().await;
    backends.cleanup().await;
}
