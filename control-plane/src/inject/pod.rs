//! The part of a `v1` Pod the injector reads. Everything else is ignored here and left untouched
//! by the patch, which only adds.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A pod as it is about to be created.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    /// Name, namespace and annotations.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The containers and volumes.
    #[serde(default)]
    pub spec: PodSpec,
}

/// The metadata fields the injector reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// The name (often unset at admission: controllers give `generateName`).
    #[serde(default)]
    pub name: Option<String>,
    /// The name prefix the API server completes.
    #[serde(default)]
    pub generate_name: Option<String>,
    /// The annotations; `None` when the pod has none at all.
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The spec fields the injector reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// The application containers.
    #[serde(default)]
    pub containers: Vec<Container>,
    /// Init containers; `None` when the field is absent.
    #[serde(default)]
    pub init_containers: Option<Vec<Container>>,
    /// Volumes; `None` when the field is absent.
    #[serde(default)]
    pub volumes: Option<Vec<Volume>>,
    /// A pod in the node's network namespace cannot be redirected without redirecting the node.
    #[serde(default)]
    pub host_network: bool,
    /// Pod-wide security defaults.
    #[serde(default)]
    pub security_context: Option<SecurityContext>,
    /// The service account (the API server sets `default` before webhooks run).
    #[serde(default)]
    pub service_account_name: Option<String>,
}

/// A container (application or init).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Its name, unique in the pod.
    pub name: String,
    /// The ports it declares.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    /// Its own security settings.
    #[serde(default)]
    pub security_context: Option<SecurityContext>,
    /// The kubelet's liveness check.
    #[serde(default)]
    pub liveness_probe: Option<Probe>,
    /// The kubelet's readiness check.
    #[serde(default)]
    pub readiness_probe: Option<Probe>,
    /// The kubelet's startup check.
    #[serde(default)]
    pub startup_probe: Option<Probe>,
}

impl Container {
    /// The probes it has, with their field names.
    pub fn probes(&self) -> impl Iterator<Item = (&'static str, &Probe)> {
        [
            ("livenessProbe", &self.liveness_probe),
            ("readinessProbe", &self.readiness_probe),
            ("startupProbe", &self.startup_probe),
        ]
        .into_iter()
        .filter_map(|(name, probe)| probe.as_ref().map(|p| (name, p)))
    }

    /// The number of the port named `name`, among those it declares.
    pub fn named_port(&self, name: &str) -> Option<i64> {
        self.ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    }
}

/// A declared container port.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// The port number.
    pub container_port: i64,
    /// Its name, which probes may refer to.
    #[serde(default)]
    pub name: Option<String>,
    /// `TCP` (the default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}

impl ContainerPort {
    /// Whether it is TCP (the only protocol redirected to the sidecar).
    pub fn is_tcp(&self) -> bool {
        self.protocol.as_deref().is_none_or(|p| p == "TCP")
    }
}

/// The security setting the injector checks.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    /// The uid the container runs as.
    #[serde(default)]
    pub run_as_user: Option<i64>,
}

/// A kubelet probe; only the network ones matter here.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// An HTTP GET probe.
    #[serde(default)]
    pub http_get: Option<PortAction>,
    /// A TCP connect probe.
    #[serde(default)]
    pub tcp_socket: Option<PortAction>,
    /// A gRPC health probe.
    #[serde(default)]
    pub grpc: Option<GrpcAction>,
}

impl Probe {
    /// The port it connects to, if it is a network probe.
    pub fn port(&self) -> Option<&IntOrString> {
        self.http_get
            .as_ref()
            .or(self.tcp_socket.as_ref())
            .map(|a| &a.port)
            .or(self.grpc.as_ref().map(|g| &g.port))
    }
}

/// The target of an `httpGet` or `tcpSocket` probe.
#[derive(Debug, Deserialize)]
pub struct PortAction {
    /// A number or the name of a container port.
    pub port: IntOrString,
}

/// The target of a `grpc` probe.
#[derive(Debug, Deserialize)]
pub struct GrpcAction {
    /// Always a number.
    pub port: IntOrString,
}

/// Kubernetes' `IntOrString`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    /// A number.
    Int(i64),
    /// A name (or a number written as a string).
    String(String),
}

/// A volume; only its name matters here.
#[derive(Debug, Deserialize)]
pub struct Volume {
    /// Its name, unique in the pod.
    pub name: String,
}
