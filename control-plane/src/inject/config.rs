//! The injector's configuration: what every injected sidecar gets (image, control plane URL,
//! cluster-wide redirect exclusions, resources), read from the YAML file
//! `mandate serve --inject-config` names and validated once at start-up. Errors name the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::values::{Cidr, Port, Quantity};

/// The sidecar's uid unless the file says otherwise: its own traffic is never redirected.
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// Why the injector configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum InjectConfigError {
    /// The file cannot be read.
    #[error("--inject-config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not YAML of the expected shape (unknown keys included).
    #[error("--inject-config {path}: {why}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The YAML error, naming the key and line.
        why: String,
    },
    /// A key has an unusable value.
    #[error("--inject-config {path}: {key}: {why}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The key at fault.
        key: String,
        /// What is wrong and what to do.
        why: String,
    },
}

/// When the kubelet pulls the sidecar image (a container's `imagePullPolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum PullPolicy {
    /// Pull on every container start.
    Always,
    /// Pull only when the node does not have the image.
    #[default]
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

/// Resource requests and limits of the sidecar container (`cpu`, `memory`, `ephemeral-storage`);
/// serialised as a container's `resources`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// What the scheduler reserves.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
    /// What the container may use at most.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Quantity>,
}

impl Default for Resources {
    fn default() -> Self {
        let q = |s: &str| s.parse::<Quantity>().expect("a valid default quantity");
        Self {
            requests: BTreeMap::from([
                ("cpu".to_owned(), q("100m")),
                ("memory".to_owned(), q("128Mi")),
            ]),
            limits: BTreeMap::from([("memory".to_owned(), q("512Mi"))]),
        }
    }
}

/// The file as written; every key optional except `image` and `control-plane`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct File {
    image: Option<String>,
    #[serde(default)]
    image_pull_policy: PullPolicy,
    control_plane: Option<String>,
    proxy_uid: Option<u32>,
    ipv6: Option<bool>,
    #[serde(default)]
    exclude_inbound_ports: Vec<Port>,
    #[serde(default)]
    exclude_outbound_ports: Vec<Port>,
    #[serde(default)]
    exclude_outbound_cidrs: Vec<Cidr>,
    #[serde(default)]
    resources: Resources,
}

/// The validated injector configuration.
#[derive(Debug, Clone)]
pub struct InjectorConfig {
    /// Image holding `mandate-proxy` on its PATH; runs both the init container and the sidecar.
    pub image: String,
    /// The containers' `imagePullPolicy` (default `IfNotPresent`).
    pub image_pull_policy: PullPolicy,
    /// `https://HOST[:PORT]` of the control plane's API as seen from pods, e.g.
    /// `https://mandate.mandate-system.svc:15012`.
    pub control_plane: String,
    /// The sidecar's uid (default 1337): excluded from the redirect; no app container may use it.
    pub proxy_uid: u32,
    /// Also redirect IPv6 (`init-iptables --ipv6`; default true, so no IPv6 path skips the sidecar).
    pub ipv6: bool,
    /// Inbound ports every injected pod leaves alone, besides 15000 and the pod's own annotation.
    pub exclude_inbound_ports: Vec<Port>,
    /// Outbound destination ports every injected pod leaves alone.
    pub exclude_outbound_ports: Vec<Port>,
    /// Outbound destination networks every injected pod leaves alone.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// The sidecar container's resources.
    pub resources: Resources,
}

/// Resource names a container may request.
const RESOURCE_NAMES: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];

impl InjectorConfig {
    /// Reads and validates the YAML file at `path`.
    pub fn load(path: &Path) -> Result<Self, InjectConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| InjectConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates the YAML `text` (from `path`, named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, InjectConfigError> {
        let file: File = serde_yaml_ng::from_str(text).map_err(|e| InjectConfigError::Parse {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        let field = |key: &str, why: String| InjectConfigError::Field {
            path: path.to_owned(),
            key: key.to_owned(),
            why,
        };
        let image = file.image.filter(|i| !i.trim().is_empty()).ok_or_else(|| {
            field(
                "image",
                "required: the image with mandate-proxy on its PATH (e.g. \
                     registry.example.com/mandate:0.1.0)"
                    .into(),
            )
        })?;
        if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(field(
                "image",
                format!("{image:?} is not an image reference"),
            ));
        }
        let control_plane = file.control_plane.ok_or_else(|| {
            field(
                "control-plane",
                "required: the control plane's API URL as pods reach it (e.g. \
                 https://mandate.mandate-system.svc:15012)"
                    .into(),
            )
        })?;
        check_control_plane_url(&control_plane).map_err(|why| field("control-plane", why))?;
        let proxy_uid = file.proxy_uid.unwrap_or(DEFAULT_PROXY_UID);
        if proxy_uid == 0 {
            return Err(field(
                "proxy-uid",
                "must not be 0: root's traffic would skip the redirect".into(),
            ));
        }
        let ipv6 = file.ipv6.unwrap_or(true);
        if !ipv6 && let Some(v6) = file.exclude_outbound_cidrs.iter().find(|c| c.is_ipv6()) {
            return Err(field(
                "exclude-outbound-cidrs",
                format!("{v6} is an IPv6 network, but ipv6 is false: no IPv6 rules are installed"),
            ));
        }
        for (kind, resources) in [
            ("requests", &file.resources.requests),
            ("limits", &file.resources.limits),
        ] {
            if let Some(name) = resources
                .keys()
                .find(|n| !RESOURCE_NAMES.contains(&n.as_str()))
            {
                return Err(field(
                    &format!("resources.{kind}.{name}"),
                    format!("unknown resource; use {}", RESOURCE_NAMES.join(", ")),
                ));
            }
        }
        for (name, limit) in &file.resources.limits {
            if let Some(request) = file.resources.requests.get(name)
                && request.value() > limit.value()
            {
                return Err(field(
                    &format!("resources.requests.{name}"),
                    format!(
                        "{} is more than the limit {}",
                        request.as_str(),
                        limit.as_str()
                    ),
                ));
            }
        }
        Ok(Self {
            image,
            image_pull_policy: file.image_pull_policy,
            control_plane,
            proxy_uid,
            ipv6,
            exclude_inbound_ports: file.exclude_inbound_ports,
            exclude_outbound_ports: file.exclude_outbound_ports,
            exclude_outbound_cidrs: file.exclude_outbound_cidrs,
            resources: file.resources,
        })
    }
}

/// `https://HOST[:PORT]`, no path, query or user information (what `mandate-proxy
/// --control-plane` accepts).
fn check_control_plane_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "{url:?} must be an https:// URL (the control plane speaks TLS only)"
        ));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!(
            "{url:?} must name only the server, no path or query"
        ));
    }
    match uri.authority() {
        Some(a) if a.as_str().contains('@') => {
            Err(format!("{url:?} must not carry user information"))
        }
        Some(a) if !a.host().is_empty() => Ok(()),
        _ => Err(format!("{url:?} names no host")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<InjectorConfig, InjectConfigError> {
        InjectorConfig::parse(text, Path::new("inject.yaml"))
    }

    const MINIMAL: &str =
        "image: mandate:0.1.0\ncontrol-plane: https://mandate.mandate-system.svc:15012\n";

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.image, "mandate:0.1.0");
        assert_eq!(c.image_pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(c.proxy_uid, 1337);
        assert!(c.ipv6, "IPv6 is redirected unless switched off");
        assert!(c.exclude_inbound_ports.is_empty());
        assert_eq!(c.resources.requests["cpu"].as_str(), "100m");
        assert_eq!(c.resources.requests["memory"].as_str(), "128Mi");
        assert_eq!(c.resources.limits["memory"].as_str(), "512Mi");
    }

    #[test]
    fn every_key_can_be_set() {
        let c = parse(
            "image: r.example/mandate:1\nimage-pull-policy: Always\n\
             control-plane: https://cp:15012\nproxy-uid: 2000\nipv6: false\n\
             exclude-inbound-ports: [9100]\nexclude-outbound-ports: [5432, 6379]\n\
             exclude-outbound-cidrs: [169.254.169.254/32]\n\
             resources:\n  requests: {cpu: 50m, memory: 64Mi}\n  limits: {cpu: 1, memory: 256Mi}\n",
        )
        .unwrap();
        assert_eq!(c.image_pull_policy, PullPolicy::Always);
        assert_eq!(c.proxy_uid, 2000);
        assert!(!c.ipv6);
        assert_eq!(c.exclude_inbound_ports, vec![Port::from_i64(9100).unwrap()]);
        assert_eq!(c.exclude_outbound_ports.len(), 2);
        assert_eq!(
            c.exclude_outbound_cidrs[0].to_string(),
            "169.254.169.254/32"
        );
        assert_eq!(c.resources.limits["cpu"].as_str(), "1");
    }

    #[test]
    fn errors_name_the_key() {
        let err = |text: &str| parse(text).unwrap_err().to_string();
        assert!(err("control-plane: https://cp\n").contains("image: required"));
        assert!(err("image: m\n").contains("control-plane: required"));
        assert!(err("image: m\ncontrol-plane: http://cp\n").contains("control-plane:"));
        assert!(err("image: m\ncontrol-plane: https://cp/v1\n").contains("no path"));
        assert!(err(&format!("{MINIMAL}proxy-uid: 0\n")).contains("proxy-uid"));
        assert!(err(&format!("{MINIMAL}image-pull-policy: Sometimes\n")).contains("Sometimes"));
        assert!(err(&format!("{MINIMAL}exclude-inbound-ports: [0]\n")).contains("not a port"));
        assert!(err(&format!("{MINIMAL}exclude-outbound-cidrs: [10.0.0.0]\n")).contains("CIDR"));
        assert!(err(&format!("{MINIMAL}imagePullPolicy: Always\n")).contains("unknown field"));
        assert!(
            err(&format!(
                "{MINIMAL}ipv6: false\nexclude-outbound-cidrs: [fd00::/8]\n"
            ))
            .contains("exclude-outbound-cidrs: fd00::/8 is an IPv6 network")
        );
        assert!(
            err(&format!("{MINIMAL}resources:\n  requests: {{gpu: 1}}\n"))
                .contains("resources.requests.gpu")
        );
        assert!(
            err(&format!(
                "{MINIMAL}resources:\n  requests: {{memory: 1Gi}}\n  limits: {{memory: 512Mi}}\n"
            ))
            .contains("resources.requests.memory: 1Gi is more than the limit 512Mi")
        );
        assert!(err(&format!("{MINIMAL}resources:\n  requests: {{cpu: lots}}\n")).contains("lots"));
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = InjectorConfig::load(Path::new("/nonexistent/inject.yaml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--inject-config /nonexistent/inject.yaml")
        );
    }
}
