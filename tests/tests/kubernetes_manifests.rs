//! Every manifest under `deploy/kubernetes/`, and every pod the sidecar injector's golden patches
//! produce (`control-plane/tests/golden/inject/*.pod.json`), is valid for Kubernetes: checked by
//! `kubernetes-validate --strict` (from PyPI: unknown fields are errors) against the oldest
//! Kubernetes the manifests support and a current one. Only cert-manager's and kustomize's kinds,
//! which have no schema there, are let through unchecked.
//!
//! The tool is `$MANDATE_E2E_KUBERNETES_VALIDATE`, else the workspace's
//! `.venv/bin/kubernetes-validate` (`.ci/run` installs it). Without it the test prints SKIP, except
//! in CI (`CI` set), where it fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use mandate_e2e::policy::workspace_root;
use tokio::process::Command;

/// The oldest supported release (matchConditions on admission webhooks are GA from 1.30; native
/// sidecars are on by default from 1.29) and a current one.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30", "1.37"];

/// Kinds without a schema in kubernetes-validate, allowed in `deploy/kubernetes/`.
const UNCHECKED_KINDS: [(&str, &str); 3] = [
    ("Kustomization", "kustomize.config.k8s.io/v1beta1"),
    ("Certificate", "cert-manager.io/v1"),
    ("Issuer", "cert-manager.io/v1"),
];

fn kubernetes_validate() -> Result<PathBuf, String> {
    let path = std::env::var_os("MANDATE_E2E_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/kubernetes-validate"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found; `.venv/bin/pip install kubernetes-validate` (as .ci/run does) or set \
             MANDATE_E2E_KUBERNETES_VALIDATE",
            path.display()
        ))
    }
}

/// Every `.yaml` file under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The injected golden pods, named as the API server would name them (kubernetes-validate needs
/// `metadata.name`; a controller's pod has only `generateName` at admission), written to `dir`.
fn named_golden_pods(dir: &Path) -> Vec<PathBuf> {
    let golden = workspace_root().join("control-plane/tests/golden/inject");
    let mut pods: Vec<PathBuf> = std::fs::read_dir(&golden)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().is_some_and(|s| s.ends_with(".pod.json")))
        .collect();
    pods.sort();
    pods.iter()
        .map(|path| {
            let mut pod: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let meta = &mut pod["metadata"];
            if meta.get("name").is_none() {
                let prefix = meta["generateName"].as_str().expect("name or generateName");
                meta["name"] = format!("{prefix}x7k2q").into();
            }
            let out = dir.join(path.file_name().unwrap());
            std::fs::write(&out, serde_json::to_vec_pretty(&pod).unwrap()).unwrap();
            out
        })
        .collect()
}

#[tokio::test]
async fn deploy_manifests_and_injected_pods_are_valid_kubernetes() {
    let tool = match kubernetes_validate() {
        Ok(tool) => tool,
        Err(why) if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) => {
            panic!("CI must run this test: {why}")
        }
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    let scratch = tempfile::tempdir().unwrap();
    let manifests = yaml_files(&workspace_root().join("deploy/kubernetes"));
    assert!(manifests.len() >= 8, "manifests: {manifests:?}");
    let pods = named_golden_pods(scratch.path());
    assert!(pods.len() >= 3, "injected golden pods: {pods:?}");
    let files: Vec<&PathBuf> = manifests.iter().chain(&pods).collect();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&tool)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .unwrap_or_else(|e| panic!("run {}: {e}", tool.display()));
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate --strict against {version} failed ({}):\n{report}",
            out.status
        );
        let mut problems = Vec::new();
        for line in report.lines().filter(|l| !l.starts_with("INFO ")) {
            let unchecked = UNCHECKED_KINDS.iter().any(|(kind, api)| {
                line.contains(&format!(
                    "Couldn't find schema for kind {kind} with api version {api} "
                ))
            });
            if !unchecked {
                problems.push(line);
            }
        }
        assert!(
            problems.is_empty(),
            "kubernetes-validate against {version} reported:\n{}\n\nfull report:\n{report}",
            problems.join("\n")
        );
        for pod in &pods {
            let shown = pod.display().to_string();
            assert!(
                report
                    .lines()
                    .any(|l| l.starts_with(&format!("INFO {shown} passed for resource pod/"))),
                "{shown} was not validated as a Pod against {version}:\n{report}"
            );
        }
    }
}
