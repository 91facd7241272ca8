//! Deciding what to do with a pod: leave it alone, refuse it (fail closed, naming what to fix),
//! or inject it with settings resolved from the pod, its annotations and the injector's
//! configuration.

use std::collections::BTreeMap;

use super::annotations::{self, PodOptions};
use super::config::InjectorConfig;
use super::pod::{IntOrString, Pod};
use super::values::{Cidr, Port, join_list};

/// The init container that installs the iptables redirect.
pub const INIT_CONTAINER: &str = "mandate-init";
/// The sidecar container.
pub const PROXY_CONTAINER: &str = "mandate-proxy";
/// The volume holding the sidecar's key, SVID, bundle and decision spool.
pub const STATE_VOLUME: &str = "mandate-state";

/// What the injector does with a pod.
#[derive(Debug)]
pub enum Verdict {
    /// Admit it unchanged, for the reason given (logged).
    Skip(&'static str),
    /// Refuse admission with this message (shown by kubectl and in the controller's events).
    Refuse(String),
    /// Admit it with the sidecar added.
    Inject(Plan),
}

/// The settings of one injection.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Where inbound calls go (`MANDATE_APP=127.0.0.1:<port>`); none for a pod that serves none.
    pub app_port: Option<Port>,
    /// The Secret with the join token.
    pub join_token_secret: String,
    /// Inbound ports left alone: always 15000, then the configuration's, then the pod's.
    pub exclude_inbound_ports: Vec<Port>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<Port>,
    /// Outbound destination networks left alone.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// What the pod's author should know (returned as admission warnings).
    pub warnings: Vec<String>,
}

/// Decides what to do with `pod`.
pub fn decide(pod: &Pod, config: &InjectorConfig) -> Verdict {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    match annotations::wants_injection(annotations) {
        Err(e) => return Verdict::Refuse(e.to_string()),
        Ok(false) => return Verdict::Skip("not annotated mandate.dev/inject: \"true\""),
        Ok(true) => {}
    }
    let ours = |name: &str| {
        pod.spec
            .containers
            .iter()
            .chain(pod.spec.init_containers.iter().flatten())
            .any(|c| c.name == name)
    };
    if ours(PROXY_CONTAINER) {
        return Verdict::Skip("already injected");
    }
    if annotations.contains_key(annotations::STATUS) {
        return Verdict::Refuse(format!(
            "annotation {}: set, but the pod has no {PROXY_CONTAINER} container; remove it (it is \
             the injector's own marker)",
            annotations::STATUS
        ));
    }
    if ours(INIT_CONTAINER) {
        return Verdict::Refuse(format!(
            "{}: the pod already has a container named {INIT_CONTAINER}, the injector's; rename it",
            annotations::INJECT
        ));
    }
    match plan(pod, annotations, config) {
        Ok(plan) => Verdict::Inject(plan),
        Err(message) => Verdict::Refuse(message),
    }
}

fn plan(
    pod: &Pod,
    annotations: &BTreeMap<String, String>,
    config: &InjectorConfig,
) -> Result<Plan, String> {
    let options = PodOptions::parse(annotations).map_err(|e| e.to_string())?;
    if pod.spec.host_network {
        return Err(format!(
            "{}: a pod with hostNetwork: true cannot be injected (the iptables redirect would \
             capture the node's traffic); remove the annotation or hostNetwork",
            annotations::INJECT
        ));
    }
    check_uids(pod, config.proxy_uid)?;
    let containers = || {
        pod.spec
            .containers
            .iter()
            .chain(pod.spec.init_containers.iter().flatten())
    };
    for container in containers() {
        if let Some(port) = container
            .ports
            .iter()
            .find_map(|p| Port::from_i64(p.container_port).filter(|p| Port::SIDECAR.contains(p)))
        {
            return Err(format!(
                "{}: container {:?} declares port {port}, which the sidecar uses (15000 admin, \
                 15001 outbound, 15006 inbound); move the application to another port",
                annotations::INJECT,
                container.name
            ));
        }
    }
    if let Some(port) = options.app_port.filter(|p| Port::SIDECAR.contains(p)) {
        return Err(format!(
            "annotation {}: port {port} is the sidecar's own (15000 admin, 15001 outbound, \
             15006 inbound); name the port the application listens on",
            annotations::APP_PORT
        ));
    }
    if pod
        .spec
        .volumes
        .iter()
        .flatten()
        .any(|v| v.name == STATE_VOLUME)
    {
        return Err(format!(
            "{}: the pod already has a volume named {STATE_VOLUME}, which the sidecar needs; \
             rename that volume",
            annotations::INJECT
        ));
    }
    let join_token_secret = match options.join_token_secret {
        Some(name) => name,
        None => {
            let account = pod
                .spec
                .service_account_name
                .as_deref()
                .unwrap_or("default");
            let name = format!("mandate-join-{account}");
            annotations::check_secret_name(&name).map_err(|why| {
                format!(
                    "annotation {}: the default Secret name is unusable ({why}); set the annotation",
                    annotations::JOIN_TOKEN_SECRET
                )
            })?;
            name
        }
    };
    let app_port = options.app_port.or_else(|| {
        pod.spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter(|p| p.is_tcp())
            .find_map(|p| Port::from_i64(p.container_port))
    });
    let exclude_inbound_ports = merged(
        [Port::ADMIN],
        &config.exclude_inbound_ports,
        &options.exclude_inbound_ports,
    );
    let exclude_outbound_ports = merged(
        [],
        &config.exclude_outbound_ports,
        &options.exclude_outbound_ports,
    );
    let exclude_outbound_cidrs = merged(
        [],
        &config.exclude_outbound_cidrs,
        &options.exclude_outbound_cidrs,
    );
    if !config.ipv6
        && let Some(v6) = options.exclude_outbound_cidrs.iter().find(|c| c.is_ipv6())
    {
        return Err(format!(
            "annotation {}: {v6} is an IPv6 network, but the injector does not redirect IPv6 \
             (ipv6: false in its configuration)",
            annotations::EXCLUDE_OUTBOUND_CIDRS
        ));
    }
    let warnings = warnings(
        pod,
        app_port,
        &exclude_inbound_ports,
        &exclude_outbound_cidrs,
    );
    Ok(Plan {
        app_port,
        join_token_secret,
        exclude_inbound_ports,
        exclude_outbound_ports,
        exclude_outbound_cidrs,
        warnings,
    })
}

/// A container running as the sidecar's uid would have its traffic skip the redirect: a
/// plaintext path around policy. Refused.
fn check_uids(pod: &Pod, proxy_uid: u32) -> Result<(), String> {
    let proxy_uid = i64::from(proxy_uid);
    let why = |what: String| {
        Err(format!(
            "{}: {what} runs as uid {proxy_uid}, the sidecar's uid, whose traffic is never \
             redirected; run it as another user",
            annotations::INJECT
        ))
    };
    if pod
        .spec
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        == Some(proxy_uid)
    {
        return why("the pod (spec.securityContext.runAsUser)".to_owned());
    }
    for c in pod
        .spec
        .containers
        .iter()
        .chain(pod.spec.init_containers.iter().flatten())
    {
        if c.security_context.as_ref().and_then(|s| s.run_as_user) == Some(proxy_uid) {
            return why(format!("container {:?}", c.name));
        }
    }
    Ok(())
}

/// `first`, then `config`'s, then `pod`'s, each once, in that order.
fn merged<T: PartialEq + Copy, const N: usize>(first: [T; N], config: &[T], pod: &[T]) -> Vec<T> {
    let mut out = Vec::new();
    for item in first.iter().chain(config).chain(pod) {
        if !out.contains(item) {
            out.push(*item);
        }
    }
    out
}

/// Things that will not work, or that open a path around the sidecar the author chose. Each
/// stays within the 256 characters the API server passes on untruncated.
fn warnings(
    pod: &Pod,
    app_port: Option<Port>,
    exclude_inbound: &[Port],
    exclude_cidrs: &[Cidr],
) -> Vec<String> {
    let mut out = Vec::new();
    for c in pod
        .spec
        .containers
        .iter()
        .chain(pod.spec.init_containers.iter().flatten())
    {
        for (field, probe) in c.probes() {
            let Some(target) = probe.port() else { continue };
            let port = match target {
                IntOrString::Int(n) => Port::from_i64(*n),
                IntOrString::String(s) => s
                    .parse::<Port>()
                    .ok()
                    .or_else(|| c.named_port(s).and_then(Port::from_i64)),
            };
            if port.is_some_and(|p| exclude_inbound.contains(&p)) {
                continue;
            }
            let shown = match target {
                IntOrString::Int(n) => n.to_string(),
                IntOrString::String(s) => s.clone(),
            };
            out.push(format!(
                "container {:?}: {field} on port {shown} goes to the sidecar's mTLS listener and \
                 will fail; use a port in {} or an exec probe",
                c.name,
                annotations::EXCLUDE_INBOUND_PORTS
            ));
        }
    }
    if let Some(port) = app_port.filter(|p| exclude_inbound.contains(p)) {
        out.push(format!(
            "{} includes the application port {port}: calls to it bypass the sidecar (no \
             mTLS, no policy, no audit)",
            annotations::EXCLUDE_INBOUND_PORTS
        ));
    }
    if let Some(cidr) = exclude_cidrs.iter().find(|c| c.is_everything()) {
        out.push(format!(
            "{} includes {cidr}: outbound calls to every address of that family bypass the \
             sidecar",
            annotations::EXCLUDE_OUTBOUND_CIDRS
        ));
    }
    out
}

impl Plan {
    /// The arguments of `mandate-proxy` in the init container (contract: `init-iptables`).
    pub fn init_args(&self, config: &InjectorConfig) -> Vec<String> {
        let mut args = vec![
            "init-iptables".to_owned(),
            "--proxy-uid".to_owned(),
            config.proxy_uid.to_string(),
            "--outbound-port".to_owned(),
            Port::OUTBOUND.to_string(),
            "--inbound-port".to_owned(),
            Port::INBOUND.to_string(),
            "--exclude-inbound-ports".to_owned(),
            join_list(&self.exclude_inbound_ports),
        ];
        if !self.exclude_outbound_ports.is_empty() {
            args.push("--exclude-outbound-ports".to_owned());
            args.push(join_list(&self.exclude_outbound_ports));
        }
        if !self.exclude_outbound_cidrs.is_empty() {
            args.push("--exclude-outbound-cidrs".to_owned());
            args.push(join_list(&self.exclude_outbound_cidrs));
        }
        if config.ipv6 {
            args.push("--ipv6".to_owned());
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config() -> InjectorConfig {
        InjectorConfig::parse(
            "image: mandate:test\ncontrol-plane: https://cp:15012\nexclude-inbound-ports: [9100]\n",
            Path::new("inject.yaml"),
        )
        .unwrap()
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn annotated(spec: serde_json::Value) -> Pod {
        pod(serde_json::json!({
            "metadata": {"annotations": {"mandate.dev/inject": "true"}},
            "spec": spec
        }))
    }

    fn refusal(p: &Pod) -> String {
        match decide(p, &config()) {
            Verdict::Refuse(m) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn plan_of(p: &Pod) -> Plan {
        match decide(p, &config()) {
            Verdict::Inject(plan) => plan,
            other => panic!("expected an injection, got {other:?}"),
        }
    }

    #[test]
    fn pods_without_the_annotation_or_already_injected_are_left_alone() {
        let plain = pod(serde_json::json!({"spec": {"containers": [{"name": "app"}]}}));
        assert!(matches!(decide(&plain, &config()), Verdict::Skip(_)));
        let off = pod(serde_json::json!({
            "metadata": {"annotations": {"mandate.dev/inject": "false"}},
            "spec": {"containers": [{"name": "app"}]}
        }));
        assert!(matches!(decide(&off, &config()), Verdict::Skip(_)));
        let injected = pod(serde_json::json!({
            "metadata": {"annotations": {"mandate.dev/inject": "true", "mandate.dev/status": "injected"}},
            "spec": {
                "containers": [{"name": "app"}],
                "initContainers": [{"name": "mandate-init"}, {"name": "mandate-proxy"}]
            }
        }));
        assert!(matches!(
            decide(&injected, &config()),
            Verdict::Skip("already injected")
        ));
        let by_hand = annotated(serde_json::json!({
            "containers": [{"name": "app"}],
            "initContainers": [{"name": "mandate-proxy"}]
        }));
        assert!(matches!(
            decide(&by_hand, &config()),
            Verdict::Skip("already injected")
        ));
    }

    #[test]
    fn the_app_port_is_the_annotation_else_the_first_declared_tcp_port() {
        let p = annotated(serde_json::json!({"containers": [
            {"name": "app", "ports": [{"containerPort": 53, "protocol": "UDP"}, {"containerPort": 8080}]},
            {"name": "other", "ports": [{"containerPort": 9000}]}
        ]}));
        assert_eq!(plan_of(&p).app_port, "8080".parse().ok());
        let mut p = p;
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(annotations::APP_PORT.into(), "9000".into());
        assert_eq!(plan_of(&p).app_port, "9000".parse().ok());
        let no_ports = annotated(serde_json::json!({"containers": [{"name": "agent"}]}));
        assert_eq!(plan_of(&no_ports).app_port, None);
    }

    #[test]
    fn the_join_token_secret_defaults_to_the_service_account() {
        let p = annotated(
            serde_json::json!({"serviceAccountName": "research", "containers": [{"name": "a"}]}),
        );
        assert_eq!(plan_of(&p).join_token_secret, "mandate-join-research");
        let p = annotated(serde_json::json!({"containers": [{"name": "a"}]}));
        assert_eq!(plan_of(&p).join_token_secret, "mandate-join-default");
    }

    #[test]
    fn exclusions_merge_admin_port_configuration_and_annotation_once_each() {
        let mut p = annotated(serde_json::json!({"containers": [{"name": "a"}]}));
        let a = p.metadata.annotations.as_mut().unwrap();
        a.insert(
            annotations::EXCLUDE_INBOUND_PORTS.into(),
            "9100,15000,9200".into(),
        );
        a.insert(
            annotations::EXCLUDE_OUTBOUND_CIDRS.into(),
            "169.254.169.254/32".into(),
        );
        let plan = plan_of(&p);
        assert_eq!(join_list(&plan.exclude_inbound_ports), "15000,9100,9200");
        assert_eq!(
            plan.init_args(&config()),
            [
                "init-iptables",
                "--proxy-uid",
                "1337",
                "--outbound-port",
                "15001",
                "--inbound-port",
                "15006",
                "--exclude-inbound-ports",
                "15000,9100,9200",
                "--exclude-outbound-cidrs",
                "169.254.169.254/32",
                "--ipv6"
            ]
        );
    }

    #[test]
    fn pods_that_would_bypass_or_break_the_sidecar_are_refused_naming_the_cause() {
        let host =
            annotated(serde_json::json!({"hostNetwork": true, "containers": [{"name": "a"}]}));
        assert!(refusal(&host).contains("hostNetwork"));
        let uid = annotated(serde_json::json!({"containers": [
            {"name": "a", "securityContext": {"runAsUser": 1337}}
        ]}));
        assert!(refusal(&uid).contains("container \"a\" runs as uid 1337"));
        let pod_uid = annotated(serde_json::json!({
            "securityContext": {"runAsUser": 1337}, "containers": [{"name": "a"}]
        }));
        assert!(refusal(&pod_uid).contains("spec.securityContext.runAsUser"));
        let port = annotated(serde_json::json!({"containers": [
            {"name": "a", "ports": [{"containerPort": 15006}]}
        ]}));
        assert!(refusal(&port).contains("declares port 15006"));
        let volume = annotated(serde_json::json!({
            "containers": [{"name": "a"}], "volumes": [{"name": "mandate-state", "emptyDir": {}}]
        }));
        assert!(refusal(&volume).contains("mandate-state"));
        let mut bad = annotated(serde_json::json!({"containers": [{"name": "a"}]}));
        bad.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(annotations::APP_PORT.into(), "15000".into());
        assert!(refusal(&bad).starts_with("annotation mandate.dev/app-port: port 15000"));
        let marker_only = pod(serde_json::json!({
            "metadata": {"annotations": {"mandate.dev/inject": "true", "mandate.dev/status": "injected"}},
            "spec": {"containers": [{"name": "app"}]}
        }));
        assert!(refusal(&marker_only).starts_with("annotation mandate.dev/status: set, but"));
        let init_name = annotated(serde_json::json!({
            "containers": [{"name": "app"}], "initContainers": [{"name": "mandate-init"}]
        }));
        assert!(refusal(&init_name).contains("named mandate-init"));
        let v6_off = InjectorConfig::parse(
            "image: m\ncontrol-plane: https://cp\nipv6: false\n",
            Path::new("inject.yaml"),
        )
        .unwrap();
        let mut v6 = annotated(serde_json::json!({"containers": [{"name": "a"}]}));
        v6.metadata.annotations.as_mut().unwrap().insert(
            annotations::EXCLUDE_OUTBOUND_CIDRS.into(),
            "fd00::/8".into(),
        );
        assert!(matches!(
            decide(&v6, &v6_off),
            Verdict::Refuse(m) if m.starts_with("annotation mandate.dev/exclude-outbound-cidrs: fd00::/8")
        ));
        assert!(matches!(decide(&v6, &config()), Verdict::Inject(_)));
        let typo = pod(serde_json::json!({
            "metadata": {"annotations": {"mandate.dev/inject": "enabled"}},
            "spec": {"containers": [{"name": "a"}]}
        }));
        assert!(refusal(&typo).starts_with("annotation mandate.dev/inject"));
    }

    #[test]
    fn probes_on_redirected_ports_and_chosen_bypasses_are_warned_about() {
        let mut p = annotated(serde_json::json!({"containers": [{
            "name": "app",
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "health", "containerPort": 9100}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
            "livenessProbe": {"tcpSocket": {"port": 9100}},
            "startupProbe": {"exec": {"command": ["true"]}}
        }]}));
        let warnings = plan_of(&p).warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("readinessProbe on port http"));
        let a = p.metadata.annotations.as_mut().unwrap();
        a.insert(annotations::EXCLUDE_INBOUND_PORTS.into(), "8080".into());
        a.insert(
            annotations::EXCLUDE_OUTBOUND_CIDRS.into(),
            "0.0.0.0/0".into(),
        );
        let warnings = plan_of(&p).warnings;
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("application port 8080"));
        assert!(warnings[1].contains("0.0.0.0/0"));
        let long_name = "c".repeat(63);
        let p = annotated(serde_json::json!({"containers": [{
            "name": long_name, "livenessProbe": {"grpc": {"port": 65535}}
        }]}));
        for w in plan_of(&p).warnings {
            assert!(w.len() <= 256, "{} characters: {w}", w.len());
        }
    }
}
