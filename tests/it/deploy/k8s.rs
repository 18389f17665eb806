//! `deploy/k8s/`: every Deployment's security context and limits, the kustomization listing
//! every manifest, the KEDA trigger on the queue the code declares.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use sluice_jobs::Keyspace;
use sluice_proto::Priority;

use super::{k8s_dir, k8s_manifests, objects_of_kind, strings, yaml_file};

/// A container's setting, from its own securityContext or else the pod's.
fn effective<'a>(container: &'a Value, pod: &'a Value, key: &str) -> &'a Value {
    let own = &container["securityContext"][key];
    if own.is_null() {
        &pod["securityContext"][key]
    } else {
        own
    }
}

fn deployment_findings(deployment: &Value) -> Vec<String> {
    let name = deployment["metadata"]["name"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    let pod = &deployment["spec"]["template"]["spec"];
    let mut findings = Vec::new();
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .collect();
    if containers.is_empty() {
        findings.push(format!("{name}: no containers"));
    }
    for c in containers {
        let cname = format!("{name}/{}", c["name"].as_str().unwrap_or("?"));
        let mut bad = |what: &str| findings.push(format!("{cname}: {what}"));
        if effective(c, pod, "runAsNonRoot") != &json!(true) {
            bad("runAsNonRoot is not true");
        }
        if effective(c, pod, "runAsUser") == &json!(0) {
            bad("runs as uid 0");
        }
        if c["securityContext"]["readOnlyRootFilesystem"] != json!(true) {
            bad("readOnlyRootFilesystem is not true");
        }
        if c["securityContext"]["allowPrivilegeEscalation"] != json!(false) {
            bad("allowPrivilegeEscalation is not false");
        }
        if c["securityContext"]["privileged"] == json!(true) {
            bad("privileged");
        }
        if !strings(&c["securityContext"]["capabilities"]["drop"]).contains(&"ALL") {
            bad("capabilities.drop does not hold ALL");
        }
        if !strings(&c["securityContext"]["capabilities"]["add"]).is_empty() {
            bad("adds capabilities");
        }
        if effective(c, pod, "seccompProfile")["type"] != json!("RuntimeDefault") {
            bad("seccompProfile is not RuntimeDefault");
        }
        for resource in ["cpu", "memory"] {
            if c["resources"]["limits"][resource].is_null() {
                bad(&format!("no {resource} limit"));
            }
            if c["resources"]["requests"][resource].is_null() {
                bad(&format!("no {resource} request"));
            }
        }
    }
    if pod["hostNetwork"] == json!(true) || pod["hostPID"] == json!(true) {
        findings.push(format!("{name}: shares a host namespace"));
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        if !volume["hostPath"].is_null() {
            findings.push(format!("{name}: hostPath volume {}", volume["name"]));
        }
    }
    findings
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn kubernetes_manifests_are_restricted_limited_and_all_listed() {
    let manifests = k8s_manifests();

    // The kustomization lists exactly the manifests of the folder.
    let kustomization = yaml_file(&k8s_dir().join("kustomization.yaml"));
    let listed: BTreeSet<&str> = strings(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<&str> = manifests.keys().map(String::as_str).collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources vs the files in deploy/k8s"
    );
    assert_eq!(kustomization["namespace"], "sluice");

    let namespace = objects_of_kind(&manifests, "Namespace");
    assert_eq!(namespace.len(), 1);
    let labels = &namespace[0]["metadata"]["labels"];
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted");

    let deployments = objects_of_kind(&manifests, "Deployment");
    assert_eq!(deployments.len(), 2, "the api and the worker Deployments");
    let findings: Vec<String> = deployments
        .iter()
        .flat_map(|d| deployment_findings(d))
        .collect();
    assert!(findings.is_empty(), "deploy/k8s: {findings:#?}");

    let by_name = |name: &str| {
        *deployments
            .iter()
            .find(|d| d["metadata"]["name"] == json!(name))
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    };
    let api = &by_name("sluice-api")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(api["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(api["livenessProbe"]["httpGet"]["path"], "/healthz");
    let worker = &by_name("sluice-worker")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(worker["resources"]["limits"]["nvidia.com/gpu"], json!(1));

    let hpa = objects_of_kind(&manifests, "HorizontalPodAutoscaler");
    assert_eq!(hpa.len(), 1);
    assert_eq!(hpa[0]["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa[0]["spec"]["scaleTargetRef"]["name"], "sluice-api");
    assert_eq!(hpa[0]["spec"]["metrics"][0]["resource"]["name"], "cpu");

    // KEDA scales the workers on the interactive queue, named as the code names it, in the
    // namespace the ConfigMap sets.
    let config = objects_of_kind(&manifests, "ConfigMap");
    let namespace = config[0]["data"]["SLUICE_NAMESPACE"]
        .as_str()
        .expect("SLUICE_NAMESPACE");
    let interactive = Keyspace::new(namespace).jobs_queue_for(Priority::Interactive);
    let scaled = objects_of_kind(&manifests, "ScaledObject");
    assert_eq!(scaled.len(), 1);
    assert_eq!(scaled[0]["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(scaled[0]["spec"]["scaleTargetRef"]["name"], "sluice-worker");
    let queues: Vec<&str> = scaled[0]["spec"]["triggers"]
        .as_array()
        .expect("triggers")
        .iter()
        .filter(|t| t["type"] == json!("rabbitmq"))
        .filter_map(|t| t["metadata"]["queueName"].as_str())
        .collect();
    assert!(
        queues.contains(&interactive.as_str()),
        "{queues:?} lacks {interactive}"
    );
    for queue in &queues {
        assert!(
            Priority::ALL
                .iter()
                .any(|p| Keyspace::new(namespace).jobs_queue_for(*p) == *queue),
            "KEDA watches {queue}, which Sluice does not declare"
        );
    }

    // Default deny, and no secret values in the folder.
    let policies = objects_of_kind(&manifests, "NetworkPolicy");
    assert!(
        policies
            .iter()
            .any(|p| p["spec"]["podSelector"] == json!({})
                && strings(&p["spec"]["policyTypes"]) == ["Ingress", "Egress"]
                && p["spec"]["ingress"].is_null()
                && p["spec"]["egress"].is_null()),
        "no default-deny NetworkPolicy"
    );
    assert!(
        objects_of_kind(&manifests, "Secret").is_empty(),
        "a Secret with values in deploy/k8s"
    );

    // The checker catches what it is for.
    let mut broken = by_name("sluice-worker").clone();
    let c = &mut broken["spec"]["template"]["spec"]["containers"][0];
    c["securityContext"]["readOnlyRootFilesystem"] = json!(false);
    c["securityContext"]["capabilities"]["drop"] = json!([]);
    c["resources"]["limits"] = json!({"nvidia.com/gpu": 1});
    broken["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = json!(false);
    let found = deployment_findings(&broken).join("\n");
    for expected in [
        "sluice-worker/worker: readOnlyRootFilesystem is not true",
        "sluice-worker/worker: capabilities.drop does not hold ALL",
        "sluice-worker/worker: no memory limit",
        "sluice-worker/worker: no cpu limit",
    ] {
        assert!(found.contains(expected), "missed {expected:?} in:\n{found}");
    }
    // runAsNonRoot is also on the container itself: the pod's false does not undo it; without
    // the container's, the pod's counts.
    assert!(!found.contains("runAsNonRoot"), "{found}");
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        .as_object_mut()
        .expect("securityContext")
        .remove("runAsNonRoot");
    let found = deployment_findings(&broken).join("\n");
    assert!(
        found.contains("sluice-worker/worker: runAsNonRoot is not true"),
        "{found}"
    );
}
