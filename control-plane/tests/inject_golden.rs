//! Golden files of the sidecar injector: AdmissionReview v1 requests as the kube-apiserver sends
//! them (`tests/golden/inject/<case>.request.json`), answered with the injector configuration
//! shipped in `deploy/kubernetes/injector-config.yaml`. Each answer must equal
//! `<case>.response.json`; for an injection, the decoded patch must equal `<case>.patch.json`, and
//! the patch applied to the request's pod must give `<case>.pod.json` (which
//! `tests/tests/kubernetes_manifests.rs` validates as a Pod with kubernetes-validate). A pod once
//! injected, reviewed again, is admitted unchanged.
//!
//! `MANDATE_UPDATE_GOLDEN=1 cargo test -p mandate-control-plane --test inject_golden` rewrites
//! the expected files; review the diff before committing it.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use mandate_control_plane::inject::Injector;
use mandate_control_plane::inject::config::InjectorConfig;
use serde_json::Value;

/// The trust domain of the shipped control plane Deployment (`--trust-domain`).
const TRUST_DOMAIN: &str = "mandate.local";

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject")
}

fn updating() -> bool {
    std::env::var_os("MANDATE_UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

/// The `inject.yaml` of the shipped ConfigMap, as `mandate serve --inject-config` reads it.
fn shipped_config() -> InjectorConfig {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/injector-config.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/kubernetes/injector-config.yaml");
    let config_map: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    let inject = config_map["data"]["inject.yaml"]
        .as_str()
        .expect("the ConfigMap has data.inject.yaml");
    InjectorConfig::parse(inject, &path).expect("the shipped injector configuration is valid")
}

fn injector() -> Injector {
    Injector::new(shipped_config(), TRUST_DOMAIN.parse().unwrap())
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (MANDATE_UPDATE_GOLDEN=1 writes it)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compares `actual` with the golden file, or rewrites it when updating.
fn check_golden(path: &Path, actual: &Value) {
    if updating() {
        let mut text = serde_json::to_string_pretty(actual).unwrap();
        text.push('\n');
        std::fs::write(path, text).unwrap();
        return;
    }
    assert!(
        path.exists(),
        "{} is missing; MANDATE_UPDATE_GOLDEN=1 writes it (review it before committing)",
        path.display()
    );
    let expected = read_json(path);
    assert!(
        &expected == actual,
        "{} differs from the injector's answer:\n{}\n(MANDATE_UPDATE_GOLDEN=1 rewrites it; review the diff)",
        path.display(),
        serde_json::to_string_pretty(actual).unwrap()
    );
}

fn golden_path(case: &str, suffix: &str) -> PathBuf {
    golden_dir().join(format!("{case}.{suffix}.json"))
}

/// Reviews `request` and returns the answer as JSON.
fn answer(request: &Value) -> Value {
    let (response, _) = injector()
        .review(&serde_json::to_vec(request).unwrap())
        .unwrap_or_else(|e| panic!("a well-formed review was refused as malformed: {e:?}"));
    serde_json::to_value(response).unwrap()
}

/// Runs one case; returns the patched pod when the injector patched it.
fn run_case(case: &str) -> Option<Value> {
    let request = read_json(&golden_path(case, "request"));
    let response = answer(&request);
    check_golden(&golden_path(case, "response"), &response);
    assert_eq!(
        response["response"]["uid"], request["request"]["uid"],
        "{case}: the uid is echoed"
    );
    let patch = response["response"]["patch"].as_str()?;
    assert_eq!(response["response"]["patchType"], "JSONPatch", "{case}");
    let patch: Value = serde_json::from_slice(&STANDARD.decode(patch).expect("base64")).unwrap();
    check_golden(&golden_path(case, "patch"), &patch);
    let mut pod = request["request"]["object"].clone();
    let ops: json_patch::Patch = serde_json::from_value(patch).unwrap();
    json_patch::patch(&mut pod, &ops)
        .unwrap_or_else(|e| panic!("{case}: the patch does not apply to the pod: {e}"));
    check_golden(&golden_path(case, "pod"), &pod);
    Some(pod)
}

/// Every case with a request file, by name.
fn cases() -> Vec<String> {
    let mut cases: Vec<String> = std::fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_suffix(".request.json")
                .map(str::to_owned)
        })
        .collect();
    cases.sort();
    cases
}

#[test]
fn every_golden_review_gets_its_golden_answer() {
    let cases = cases();
    assert!(cases.len() >= 6, "golden cases: {cases:?}");
    for case in cases {
        let request = read_json(&golden_path(&case, "request"));
        if let Some(pod) = run_case(&case) {
            // Reviewed again (a re-invocation, or the pod re-created from its own spec): untouched.
            let mut again = request.clone();
            again["request"]["object"] = pod;
            let response = answer(&again);
            assert_eq!(
                response["response"],
                serde_json::json!({"uid": request["request"]["uid"], "allowed": true}),
                "{case}: an injected pod is left alone"
            );
        }
    }
}

/// The ops of a case's patch that add at `path`.
fn values_at<'a>(patch: &'a Value, path: &str) -> Vec<&'a Value> {
    patch
        .as_array()
        .unwrap()
        .iter()
        .filter(|op| op["op"] == "add" && op["path"] == path)
        .map(|op| &op["value"])
        .collect()
}

#[test]
fn the_injected_tool_pod_runs_the_redirect_then_the_ready_sidecar_then_the_app() {
    let pod = run_case("tool-deployment").expect("injected");
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 2);
    assert_eq!(init[0]["name"], "mandate-init");
    assert_eq!(
        init[0]["args"],
        serde_json::json!([
            "init-iptables",
            "--proxy-uid",
            "1337",
            "--outbound-port",
            "15001",
            "--inbound-port",
            "15006",
            "--exclude-inbound-ports",
            "15000",
            "--ipv6"
        ])
    );
    assert_eq!(
        init[0]["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(init[0]["securityContext"]["runAsUser"], 0);
    assert_eq!(init[0]["securityContext"]["runAsNonRoot"], false);
    let proxy = &init[1];
    assert_eq!(proxy["name"], "mandate-proxy");
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(
        proxy["startupProbe"]["httpGet"],
        serde_json::json!({"path": "/readyz", "port": 15000})
    );
    let env: Vec<(&str, &Value)> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e.get("value").unwrap_or(&e["valueFrom"]),
            )
        })
        .collect();
    let get = |name: &str| env.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    assert_eq!(
        get("MANDATE_APP").unwrap(),
        "127.0.0.1:8080",
        "the first container port"
    );
    assert_eq!(get("MANDATE_ADMIN").unwrap(), "0.0.0.0:15000");
    assert_eq!(get("MANDATE_INBOUND").unwrap(), "0.0.0.0:15006");
    assert_eq!(
        get("MANDATE_CONTROL_PLANE").unwrap(),
        "https://mandate.mandate-system.svc:15012"
    );
    assert_eq!(get("MANDATE_TRUST_DOMAIN").unwrap(), TRUST_DOMAIN);
    assert_eq!(get("MANDATE_LOG_FORMAT").unwrap(), "json");
    assert_eq!(
        get("MANDATE_JOIN_TOKEN").unwrap()["secretKeyRef"],
        serde_json::json!({"name": "mandate-join-tool", "key": "join-token"}),
        "the Secret named after the service account"
    );
    assert_eq!(
        pod["spec"]["containers"][0]["name"], "tool",
        "the app is untouched"
    );
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    assert_eq!(
        volumes.last().unwrap(),
        &serde_json::json!({"name": "mandate-state", "emptyDir": {}})
    );
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["mandate.dev/status"], "injected");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15000");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
}

#[test]
fn existing_init_containers_volumes_and_annotations_are_kept_and_the_settings_applied() {
    let case = "agent-with-init-containers";
    let pod = run_case(case).expect("injected");
    let names: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mandate-init", "mandate-proxy", "fetch-prompts"]);
    let request = read_json(&golden_path(case, "request"));
    let before = request["request"]["object"]["metadata"]["annotations"]
        .as_object()
        .unwrap();
    let after = pod["metadata"]["annotations"].as_object().unwrap();
    for (key, value) in before {
        assert_eq!(&after[key], value, "{key} kept as the author set it");
    }
    assert_eq!(after["prometheus.io/port"], "9090", "not overridden");
    let patch = read_json(&golden_path(case, "patch"));
    assert_eq!(values_at(&patch, "/spec/volumes/-").len(), 1, "appended");
    assert_eq!(
        values_at(&patch, "/metadata/annotations/mandate.dev~1status").len(),
        1
    );
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(
        init["args"],
        serde_json::json!([
            "init-iptables",
            "--proxy-uid",
            "1337",
            "--outbound-port",
            "15001",
            "--inbound-port",
            "15006",
            "--exclude-inbound-ports",
            "15000,9090",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32",
            "--ipv6"
        ])
    );
    let proxy_env = pod["spec"]["initContainers"][1]["env"].as_array().unwrap();
    assert!(
        proxy_env.contains(&serde_json::json!({"name": "MANDATE_APP", "value": "127.0.0.1:8000"}))
    );
    assert!(proxy_env.contains(
        &serde_json::json!({"name": "MANDATE_JOIN_TOKEN", "valueFrom": {
            "secretKeyRef": {"name": "research-join-token", "key": "join-token"}
        }})
    ));
    let response = read_json(&golden_path(case, "response"));
    let warnings = response["response"]["warnings"].as_array().unwrap();
    assert_eq!(
        warnings.len(),
        1,
        "the readiness probe on the redirected port 8000: {warnings:?}"
    );
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("readinessProbe on port http")
    );
}

#[test]
fn a_pod_without_volumes_gets_the_whole_array() {
    let patch = {
        run_case("bare-pod-without-volumes").expect("injected");
        read_json(&golden_path("bare-pod-without-volumes", "patch"))
    };
    assert_eq!(values_at(&patch, "/spec/volumes").len(), 1);
    assert_eq!(values_at(&patch, "/spec/initContainers").len(), 1);
    let response = read_json(&golden_path("bare-pod-without-volumes", "response"));
    assert!(response["response"].get("warnings").is_none());
}

#[test]
fn pods_not_asking_or_already_injected_are_admitted_unchanged() {
    for case in ["not-annotated", "already-injected"] {
        assert!(run_case(case).is_none(), "{case}: no patch");
        let response = read_json(&golden_path(case, "response"));
        assert_eq!(response["response"]["allowed"], true, "{case}");
        assert!(response["response"].get("patchType").is_none(), "{case}");
    }
}

#[test]
fn pods_the_injector_cannot_handle_are_refused_with_a_message_naming_the_cause() {
    for (case, cause) in [
        (
            "bad-app-port",
            "annotation mandate.dev/app-port: \"http\" is not a port",
        ),
        ("host-network", "hostNetwork: true cannot be injected"),
    ] {
        assert!(run_case(case).is_none(), "{case}: no patch");
        let response = read_json(&golden_path(case, "response"));
        assert_eq!(response["response"]["allowed"], false, "{case}");
        assert_eq!(response["response"]["status"]["code"], 403, "{case}");
        let message = response["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains(cause), "{case}: {message}");
    }
}
