//! The Dockerfiles the compose file builds: portable code (no `native`, no RUSTFLAGS over
//! `.cargo/config.toml`), a non-root user in every image, the CUDA worker on NVIDIA's images.

use std::collections::BTreeSet;

use super::{compose, compose_env, is_root_user, read, repo};

/// A Dockerfile's stages: name (or index) → (base, the USER in force at its end).
fn dockerfile_stages(text: &str) -> Vec<(String, String, Option<String>)> {
    let mut stages: Vec<(String, String, Option<String>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("FROM") => {
                let base = words.next().expect("FROM base").to_string();
                let name = match (words.next(), words.next()) {
                    (Some(as_), Some(name)) if as_.eq_ignore_ascii_case("as") => name.to_string(),
                    _ => stages.len().to_string(),
                };
                // A stage built on another stage starts with that stage's user.
                let user = stages
                    .iter()
                    .find(|(n, _, _)| *n == base)
                    .and_then(|(_, _, u)| u.clone());
                stages.push((name, base, user));
            }
            Some("USER") => {
                let stage = stages.last_mut().expect("USER before FROM");
                stage.2 = words.next().map(str::to_string);
            }
            _ => {}
        }
    }
    stages
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn images_build_portable_code_and_run_as_non_root() {
    let cargo_config = read(&repo().join(".cargo/config.toml"));
    assert!(
        cargo_config.contains("target-cpu=x86-64-v3"),
        ".cargo/config.toml lost x86-64-v3"
    );
    let compose = compose();
    let mut built = BTreeSet::new();
    for (name, service) in compose["services"].as_object().expect("services") {
        let Some(dockerfile) = service["build"]["dockerfile"].as_str() else {
            continue;
        };
        assert_eq!(
            service["build"]["context"], "..",
            "{name} builds from the repository root"
        );
        let text = read(&repo().join(dockerfile));
        let code: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        for line in &code {
            assert!(
                !line.contains("target-cpu=native") && !line.contains("-march=native"),
                "{dockerfile}: {line}"
            );
            // RUSTFLAGS would replace .cargo/config.toml's target-cpu instead of adding to it.
            assert!(!line.contains("RUSTFLAGS"), "{dockerfile}: {line}");
        }
        // The Rust images build from the lock file; the services' image installs packages only.
        let builds_rust = code.iter().any(|l| l.contains("cargo build"));
        assert!(
            !builds_rust || code.iter().any(|l| l.contains("--locked")),
            "{dockerfile} builds without --locked"
        );
        let stages = dockerfile_stages(&text);
        if dockerfile == "compose/Dockerfile.services" {
            assert!(!builds_rust, "{dockerfile} builds Rust");
            // Only Debian's packages: every stage starts from the Debian base or another stage.
            for (stage, base, _) in &stages {
                assert!(
                    base.starts_with("debian:") || stages.iter().any(|(n, _, _)| n == base),
                    "{dockerfile}: stage {stage} builds on {base}"
                );
            }
        }
        let image = match service["build"]["target"].as_str() {
            Some(target) => stages.iter().find(|(n, _, _)| n == target),
            None => stages.last(),
        }
        .unwrap_or_else(|| {
            panic!(
                "{name}: {dockerfile} has no stage {}",
                service["build"]["target"]
            )
        });
        match image.2.as_deref() {
            Some(user) if !is_root_user(user) => {}
            other => panic!("{name}: the image of {dockerfile} runs as {other:?}"),
        }
        built.insert(dockerfile.to_string());
        if compose_env(service)
            .get("SLUICE_DEVICE")
            .map(String::as_str)
            == Some("cuda")
        {
            assert!(
                text.contains("--features cuda"),
                "{dockerfile} builds no CUDA worker"
            );
            assert!(
                text.contains("ARG CUDA_COMPUTE_CAP=90"),
                "{dockerfile}: CUDA_COMPUTE_CAP"
            );
            let bases: Vec<&str> = stages.iter().map(|(_, base, _)| base.as_str()).collect();
            assert_eq!(
                bases,
                [
                    "nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU}",
                    "nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}"
                ],
                "{dockerfile}: build on the devel image, run on the matching runtime image"
            );
        }
    }
    assert_eq!(
        built,
        BTreeSet::from([
            "compose/Dockerfile".to_string(),
            "compose/Dockerfile.cuda".to_string(),
            "compose/Dockerfile.services".to_string(),
        ])
    );
    // The stage parser follows users through stages.
    let stages =
        dockerfile_stages("FROM a AS build\nFROM b AS runtime\nUSER 10001\nFROM runtime AS api\n");
    assert_eq!(
        stages[2],
        ("api".into(), "runtime".into(), Some("10001".into()))
    );
    assert_eq!(stages[0].2, None);
}
