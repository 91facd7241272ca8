//! A private network namespace for root-only tests: iptables rules made in it live and die with
//! it and never touch the host's. A test runs commands inside it ([`Netns::command`]) or re-runs
//! itself inside it ([`Netns::rerun_inside`], [`inside`]). Needs root and `ip` (iproute2);
//! [`crate::pod::missing_prerequisites`] says when the machine cannot, so the test can print
//! `SKIP:` instead of passing silently.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::Command;

/// Set in a test's re-run inside a namespace.
const INSIDE_NETNS: &str = "MANDATE_E2E_INSIDE_NETNS";

/// Whether this process is a test's re-run inside a namespace ([`Netns::rerun_inside`]).
pub fn inside() -> bool {
    std::env::var_os(INSIDE_NETNS).is_some()
}

/// A network namespace with loopback up, deleted on drop.
pub struct Netns(String);

impl Netns {
    /// Creates `mandate-e2e-<tag>-<pid>`: give each test of an executable its own `tag`.
    pub async fn create(tag: &str) -> anyhow::Result<Self> {
        let name = format!("mandate-e2e-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]).await?;
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]).await?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// A command run inside the namespace (`ip netns exec`), killed if dropped while running.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        exec(&self.0, program)
    }

    /// Re-runs the test `test` of this executable inside the namespace (where [`inside`] is
    /// true) and checks that it passed and printed `done`, so a run that skipped or stopped
    /// early is not taken for a pass.
    pub async fn rerun_inside(
        &self,
        test: &str,
        done: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        self.rerun_inside_with(test, done, limit, &[]).await
    }

    /// [`rerun_inside`](Self::rerun_inside), with `envs` set for the re-run.
    pub async fn rerun_inside_with(
        &self,
        test: &str,
        done: &str,
        limit: Duration,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let out = tokio::time::timeout(
            limit,
            self.command(std::env::current_exe()?)
                .args(["--exact", test, "--nocapture", "--test-threads=1"])
                .env(INSIDE_NETNS, "1")
                .envs(envs.iter().copied())
                .output(),
        )
        .await
        .with_context(|| format!("the test inside the network namespace ran over {limit:?}"))??;
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

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// A command run inside the namespace called `netns` (`ip netns exec`), killed if dropped while
/// running.
pub fn exec(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(program)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `ip ARGS`, failing with its stderr.
pub(crate) async fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .context("run ip (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
