//! Pods on one machine: network namespaces joined by veth pairs to a bridge in a "node" namespace,
//! each with its own address, as a Kubernetes node wires its pods. The test re-runs itself inside
//! the node namespace ([`Node::run_inside`]); a pod's processes start inside the pod's namespace.
//! Needs root and `ip` (iproute2); [`missing_prerequisites`] says when the machine cannot.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::Command;

use crate::netns::{self, Netns, ip};

/// Passes the pods' namespace names to the re-run: `name=netns,...`.
const PODS_ENV: &str = "MANDATE_E2E_PODS";
/// The node's address on the pod bridge.
pub const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1));

/// A pod: a network namespace with one address on the node's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Its network namespace.
    pub netns: String,
    /// Its address.
    pub ip: IpAddr,
}

impl Pod {
    /// A command run inside the pod's network namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns::exec(&self.netns, program)
    }

    /// Runs `program args` in the pod and fails with its output unless it succeeds.
    pub async fn run(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> anyhow::Result<String> {
        let program = program.as_ref().to_owned();
        let out = self
            .command(&program)
            .args(args)
            .output()
            .await
            .with_context(|| format!("run {program:?} in {}", self.netns))?;
        if !out.status.success() {
            bail!(
                "{program:?} {args:?} in pod {} failed ({}): {}{}",
                self.netns,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The node namespace and its pods; every namespace is deleted on drop.
pub struct Node {
    node: Netns,
    pods: Vec<(String, Netns)>,
}

impl Node {
    /// The pods, by name, of the re-run inside the node namespace, if this is that re-run.
    pub fn pods_inside() -> Option<Vec<(String, Pod)>> {
        if !netns::inside() {
            return None;
        }
        let spec = std::env::var(PODS_ENV).ok()?;
        Some(
            spec.split(',')
                .enumerate()
                .filter_map(|(i, entry)| {
                    let (name, netns) = entry.split_once('=')?;
                    let pod = Pod {
                        netns: netns.to_owned(),
                        ip: pod_ip(i),
                    };
                    Some((name.to_owned(), pod))
                })
                .collect(),
        )
    }

    /// Creates the node namespace with a bridge at [`NODE_IP`] and one pod per name, at
    /// 10.77.0.2, 10.77.0.3, … in order, each with a default route through the node.
    pub async fn create(names: &[&str]) -> anyhow::Result<Node> {
        let node = Netns::create("node").await?;
        let n = node.name().to_owned();
        ip(&["-n", &n, "link", "add", "br0", "type", "bridge"]).await?;
        ip(&[
            "-n",
            &n,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "br0",
        ])
        .await?;
        ip(&["-n", &n, "link", "set", "br0", "up"]).await?;
        let mut pods = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let pod = Netns::create(name).await?;
            let p = pod.name().to_owned();
            pods.push((name.to_string(), pod));
            let veth = format!("veth{i}");
            ip(&[
                "-n", &n, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &p,
            ])
            .await?;
            ip(&["-n", &n, "link", "set", &veth, "master", "br0", "up"]).await?;
            ip(&[
                "-n",
                &p,
                "addr",
                "add",
                &format!("{}/24", pod_ip(i)),
                "dev",
                "eth0",
            ])
            .await?;
            ip(&["-n", &p, "link", "set", "eth0", "up"]).await?;
            ip(&[
                "-n",
                &p,
                "route",
                "add",
                "default",
                "via",
                &NODE_IP.to_string(),
            ])
            .await?;
        }
        Ok(Node { node, pods })
    }

    /// Re-runs the test `test` of this executable inside the node namespace, telling it its
    /// pods, and checks that it passed and printed `done`.
    pub async fn run_inside(&self, test: &str, done: &str, limit: Duration) -> anyhow::Result<()> {
        let pods = self
            .pods
            .iter()
            .map(|(name, ns)| format!("{name}={}", ns.name()))
            .collect::<Vec<_>>()
            .join(",");
        self.node
            .rerun_inside_with(test, done, limit, &[(PODS_ENV, &pods)])
            .await
    }
}

fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2 + i as u8))
}

/// Why this machine cannot run namespace tests, if it cannot: not root, or one of `tools`
/// (`(command, version flag, Debian package)`) is missing.
pub async fn missing_prerequisites(tools: &[(&str, &str, &str)]) -> Option<String> {
    let uid = Command::new("id").arg("-u").output().await;
    if !uid.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0") {
        return Some("needs root for network namespaces and iptables (CI runs as root)".into());
    }
    for (tool, version_flag, package) in tools {
        let found = Command::new(tool)
            .arg(version_flag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} not found (apt-get install {package})"));
        }
    }
    None
}
