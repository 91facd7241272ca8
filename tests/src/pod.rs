//! Pods on one machine: network namespaces joined by veth pairs to a bridge in a "node" namespace,
//! each with its own address, as a Kubernetes node wires its pods. The test itself re-runs inside
//! the node namespace (see [`Node::run_inside`]); processes of a pod are started inside the pod's
//! namespace with `ip netns exec`. Needs root, `ip` (iproute2) and the pods' tools.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::Command;

/// Set in the re-run inside the node namespace.
const INSIDE_NODE: &str = "MANDATE_E2E_INSIDE_NODE";
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
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd.kill_on_drop(true);
        cmd
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
            .stdin(Stdio::null())
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
    netns: String,
    pods: Vec<(String, Pod)>,
}

impl Node {
    /// The pods of the re-run inside the node namespace, if this is that re-run.
    pub fn pods_inside() -> Option<Vec<(String, Pod)>> {
        std::env::var_os(INSIDE_NODE)?;
        let spec = std::env::var(PODS_ENV).ok()?;
        Some(
            spec.split(',')
                .enumerate()
                .filter_map(|(i, entry)| {
                    let (name, netns) = entry.split_once('=')?;
                    Some((
                        name.to_owned(),
                        Pod {
                            netns: netns.to_owned(),
                            ip: pod_ip(i),
                        },
                    ))
                })
                .collect(),
        )
    }

    /// Creates the node namespace with a bridge at [`NODE_IP`] and one pod per name, at
    /// 10.77.0.2, 10.77.0.3, … in order.
    pub async fn create(names: &[&str]) -> anyhow::Result<Node> {
        let tag = std::process::id();
        let mut node = Node {
            netns: format!("mandate-node-{tag}"),
            pods: Vec::new(),
        };
        let n = node.netns.clone();
        ip(&["netns", "add", &n]).await?;
        ip(&["-n", &n, "link", "set", "lo", "up"]).await?;
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
        for (i, name) in names.iter().enumerate() {
            let netns = format!("mandate-{name}-{tag}");
            ip(&["netns", "add", &netns]).await?;
            let pod = Pod {
                netns: netns.clone(),
                ip: pod_ip(i),
            };
            node.pods.push((name.to_string(), pod.clone()));
            let veth = format!("veth{i}");
            ip(&[
                "-n", &n, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &netns,
            ])
            .await?;
            ip(&["-n", &n, "link", "set", &veth, "master", "br0", "up"]).await?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{}/24", pod.ip),
                "dev",
                "eth0",
            ])
            .await?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"]).await?;
            ip(&["-n", &netns, "link", "set", "lo", "up"]).await?;
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                &NODE_IP.to_string(),
            ])
            .await?;
        }
        Ok(node)
    }

    /// Re-runs the test `test` of this executable inside the node namespace and checks that it
    /// passed and printed `done`.
    pub async fn run_inside(&self, test: &str, done: &str, limit: Duration) -> anyhow::Result<()> {
        let pods = self
            .pods
            .iter()
            .map(|(name, pod)| format!("{name}={}", pod.netns))
            .collect::<Vec<_>>()
            .join(",");
        let out = tokio::time::timeout(
            limit,
            Command::new("ip")
                .args(["netns", "exec", &self.netns])
                .arg(std::env::current_exe()?)
                .args(["--exact", test, "--nocapture", "--test-threads=1"])
                .env(INSIDE_NODE, "1")
                .env(PODS_ENV, pods)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("the test inside the node namespace ran over {limit:?}"))??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || !stdout.contains(done) {
            bail!(
                "inner run failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
                out.status
            );
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for netns in self.pods.iter().map(|(_, p)| &p.netns).chain([&self.netns]) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", netns])
                .status();
        }
    }
}

fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2 + i as u8))
}

async fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Why this machine cannot run pod tests, if it cannot: not root, or a tool is missing.
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
