//! The models the workers run (the tiny one, the real GGUF) and the workspace's binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The tiny random-weight model, written once per test process. Under cargo-nextest every test
/// is a process of its own: the folders of processes that have exited are removed first.
pub fn tiny_model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        remove_exited_tiny_models();
        let dir = std::env::temp_dir().join(format!("sluice-tiny-model-{}", std::process::id()));
        sluice_worker::model::tiny::write_tiny_model(
            &dir,
            42,
            sluice_worker::model::tiny::TinyShape::default(),
        )
        .expect("write tiny model");
        dir
    })
}

/// Removes `sluice-tiny-model-<pid>` folders whose process is gone (Linux: no `/proc/<pid>`).
fn remove_exited_tiny_models() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("sluice-tiny-model-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The real Qwen2.5 GGUF: `SLUICE_TEST_MODEL`, else what `scripts/fetch-test-model` caches.
/// Resolved once per test process: the model tests of the one test binary run in parallel, and
/// each running the script on an empty cache would download the model once each.
pub fn real_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("SLUICE_TEST_MODEL") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(root.join("scripts/fetch-test-model"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/fetch-test-model");
        assert!(out.status.success(), "scripts/fetch-test-model failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// A binary of the workspace, built next to the test executables.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target dir");
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}
