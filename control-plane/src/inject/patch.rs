//! The RFC 6902 JSON Patch that injects a pod: the init container and the native sidecar first
//! among the init containers, the state volume, and the annotations. It only adds: nothing the
//! pod's author wrote is changed or removed.

use mandate_identity::TrustDomain;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::annotations::{self, JOIN_TOKEN_KEY};
use super::config::InjectorConfig;
use super::plan::{INIT_CONTAINER, PROXY_CONTAINER, Plan, STATE_VOLUME};
use super::pod::Pod;
use super::values::Port;

/// Where the state volume is mounted in the sidecar (`MANDATE_STATE_DIR`).
pub const STATE_DIR: &str = "/var/run/mandate";

/// How long, at most, the sidecar may take to become ready (enrol and load a policy bundle)
/// before the kubelet restarts it: `STARTUP_FAILURES` probes one second apart.
const STARTUP_FAILURES: u32 = 120;

/// Annotations added unless the pod already has them (Prometheus' conventional pod discovery).
const SCRAPE_ANNOTATIONS: [(&str, &str); 3] = [
    ("prometheus.io/scrape", "true"),
    ("prometheus.io/port", "15000"),
    ("prometheus.io/path", "/metrics"),
];

/// One JSON Patch operation; the injector only ever adds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Operation {
    /// Always `add`.
    pub op: &'static str,
    /// A JSON Pointer (RFC 6901).
    pub path: String,
    /// The value added.
    pub value: Value,
}

fn add(path: impl Into<String>, value: Value) -> Operation {
    Operation {
        op: "add",
        path: path.into(),
        value,
    }
}

/// Escapes a map key for a JSON Pointer: `~` as `~0`, `/` as `~1`.
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The operations that inject `pod` according to `plan`.
pub fn build(
    pod: &Pod,
    plan: &Plan,
    config: &InjectorConfig,
    trust_domain: &TrustDomain,
) -> Vec<Operation> {
    let init = init_container(plan, config);
    let proxy = proxy_container(plan, config, trust_domain);
    let mut ops = Vec::new();
    // Both go first, in this order: the redirect is installed before anything else runs, and the
    // sidecar is started (and ready) before the pod's own init containers, whose traffic it must
    // already carry. Adding at index 0 inserts; the second insert lands before the first.
    if pod.spec.init_containers.is_some() {
        ops.push(add("/spec/initContainers/0", proxy));
        ops.push(add("/spec/initContainers/0", init));
    } else {
        ops.push(add("/spec/initContainers", json!([init, proxy])));
    }
    let volume = json!({"name": STATE_VOLUME, "emptyDir": {}});
    if pod.spec.volumes.is_some() {
        ops.push(add("/spec/volumes/-", volume));
    } else {
        ops.push(add("/spec/volumes", json!([volume])));
    }
    let mut wanted: Vec<(&str, &str)> = SCRAPE_ANNOTATIONS.to_vec();
    wanted.push((annotations::STATUS, annotations::INJECTED));
    match &pod.metadata.annotations {
        Some(existing) => ops.extend(
            wanted
                .into_iter()
                .filter(|(k, _)| !existing.contains_key(*k))
                .map(|(k, v)| {
                    add(
                        format!("/metadata/annotations/{}", pointer_token(k)),
                        json!(v),
                    )
                }),
        ),
        None => {
            let map: Map<String, Value> = wanted
                .into_iter()
                .map(|(k, v)| (k.to_owned(), json!(v)))
                .collect();
            ops.push(add("/metadata/annotations", Value::Object(map)));
        }
    }
    ops
}

/// `mandate-init`: installs the redirect as root with NET_ADMIN and NET_RAW, then exits.
fn init_container(plan: &Plan, config: &InjectorConfig) -> Value {
    json!({
        "name": INIT_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["mandate-proxy"],
        "args": plan.init_args(config),
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"}
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        }
    })
}

/// `mandate-proxy`: the sidecar, as a native sidecar (an init container with
/// `restartPolicy: Always`, so it starts before the application and stops after it).
fn proxy_container(plan: &Plan, config: &InjectorConfig, trust_domain: &TrustDomain) -> Value {
    let mut env = vec![
        json!({"name": "MANDATE_CONTROL_PLANE", "value": config.control_plane}),
        json!({"name": "MANDATE_TRUST_DOMAIN", "value": trust_domain.as_str()}),
        json!({"name": "MANDATE_JOIN_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": plan.join_token_secret, "key": JOIN_TOKEN_KEY
        }}}),
        json!({"name": "MANDATE_STATE_DIR", "value": STATE_DIR}),
        json!({"name": "MANDATE_OUTBOUND", "value": format!("127.0.0.1:{}", Port::OUTBOUND)}),
        json!({"name": "MANDATE_INBOUND", "value": format!("0.0.0.0:{}", Port::INBOUND)}),
        json!({"name": "MANDATE_ADMIN", "value": format!("0.0.0.0:{}", Port::ADMIN)}),
    ];
    if let Some(port) = plan.app_port {
        env.push(json!({"name": "MANDATE_APP", "value": format!("127.0.0.1:{port}")}));
    }
    env.push(json!({"name": "MANDATE_LOG_FORMAT", "value": "json"}));
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": Port::ADMIN.get()},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 1
        })
    };
    json!({
        "name": PROXY_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["mandate-proxy"],
        "restartPolicy": "Always",
        "env": env,
        "ports": [
            {"name": "mandate-admin", "containerPort": Port::ADMIN.get(), "protocol": "TCP"},
            {"name": "mandate-inbound", "containerPort": Port::INBOUND.get(), "protocol": "TCP"}
        ],
        "startupProbe": probe("/readyz", 1, STARTUP_FAILURES),
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": config.resources,
        "volumeMounts": [{"name": STATE_VOLUME, "mountPath": STATE_DIR}],
        "securityContext": {
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::inject::plan::{Verdict, decide};

    fn config() -> InjectorConfig {
        InjectorConfig::parse(
            "image: mandate:test\ncontrol-plane: https://cp:15012\n",
            Path::new("inject.yaml"),
        )
        .unwrap()
    }

    fn ops_for(pod: serde_json::Value) -> Vec<Operation> {
        let pod: Pod = serde_json::from_value(pod).unwrap();
        let Verdict::Inject(plan) = decide(&pod, &config()) else {
            panic!("expected an injection");
        };
        build(&pod, &plan, &config(), &"example.org".parse().unwrap())
    }

    fn paths(ops: &[Operation]) -> Vec<&str> {
        ops.iter().map(|o| o.path.as_str()).collect()
    }

    #[test]
    fn a_pod_without_init_containers_or_volumes_gets_whole_arrays() {
        let ops = ops_for(json!({
            "metadata": {"annotations": {"mandate.dev/inject": "true"}},
            "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]}
        }));
        assert_eq!(
            paths(&ops),
            [
                "/spec/initContainers",
                "/spec/volumes",
                "/metadata/annotations/prometheus.io~1scrape",
                "/metadata/annotations/prometheus.io~1port",
                "/metadata/annotations/prometheus.io~1path",
                "/metadata/annotations/mandate.dev~1status",
            ]
        );
        let names: Vec<&str> = ops[0]
            .value
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["mandate-init", "mandate-proxy"]);
        let proxy = &ops[0].value[1];
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/readyz");
        let env = |name: &str| {
            proxy["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .cloned()
        };
        assert_eq!(env("MANDATE_APP").unwrap()["value"], "127.0.0.1:8080");
        assert_eq!(env("MANDATE_TRUST_DOMAIN").unwrap()["value"], "example.org");
        assert_eq!(
            env("MANDATE_JOIN_TOKEN").unwrap()["valueFrom"]["secretKeyRef"],
            json!({"name": "mandate-join-default", "key": "join-token"})
        );
    }

    #[test]
    fn existing_init_containers_come_after_ours_and_volumes_and_annotations_are_appended() {
        let ops = ops_for(json!({
            "metadata": {"annotations": {"mandate.dev/inject": "true", "prometheus.io/port": "9090"}},
            "spec": {
                "containers": [{"name": "app"}],
                "initContainers": [{"name": "migrate"}],
                "volumes": [{"name": "data", "emptyDir": {}}]
            }
        }));
        assert_eq!(
            paths(&ops),
            [
                "/spec/initContainers/0",
                "/spec/initContainers/0",
                "/spec/volumes/-",
                "/metadata/annotations/prometheus.io~1scrape",
                "/metadata/annotations/prometheus.io~1path",
                "/metadata/annotations/mandate.dev~1status",
            ],
            "the user's prometheus.io/port is kept"
        );
        assert_eq!(ops[0].value["name"], "mandate-proxy");
        assert_eq!(ops[1].value["name"], "mandate-init");
    }

    #[test]
    fn a_pod_without_annotations_gets_the_whole_object() {
        let pod: Pod =
            serde_json::from_value(json!({"spec": {"containers": [{"name": "a"}]}})).unwrap();
        let plan = Plan {
            app_port: None,
            join_token_secret: "s".into(),
            exclude_inbound_ports: vec![Port::ADMIN],
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            warnings: Vec::new(),
        };
        let ops = build(&pod, &plan, &config(), &"example.org".parse().unwrap());
        let last = ops.last().unwrap();
        assert_eq!(last.path, "/metadata/annotations");
        assert_eq!(last.value["mandate.dev/status"], "injected");
        assert_eq!(last.value["prometheus.io/scrape"], "true");
        let env = ops[0].value[1]["env"].as_array().unwrap();
        assert!(
            !env.iter().any(|e| e["name"] == "MANDATE_APP"),
            "no app port, no MANDATE_APP"
        );
    }

    #[test]
    fn pointer_tokens_escape_tilde_before_slash() {
        assert_eq!(pointer_token("a/b~c"), "a~1b~0c");
    }
}
