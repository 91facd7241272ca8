//! Harness for Mandate's end-to-end tests: the real `mandate-proxy` binaries, real sockets, real certificates.
//!
//! A test builds a [`TestEnv`] (a scratch directory, a fresh CA, a registry of the sidecars' logs), starts
//! sample upstream apps ([`apps`]) and sidecars ([`Sidecar::builder`]) inside [`TestEnv::run`], and talks to
//! them with the clients in [`client`]. `run` bounds the test in time and, when the test fails (error, panic
//! or timeout), prints every sidecar's log so the failure can be read without re-running.

pub mod apps;
pub mod client;
pub mod control_plane;
pub mod metrics;
pub mod netns;
pub mod pki;
pub mod pod;
pub mod policy;
pub mod ports;
pub mod postgres;
pub mod prometheus;
pub mod python;
pub mod sidecar;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use control_plane::{ControlPlane, ControlPlaneBuilder};
pub use metrics::Metrics;
pub use pki::{Broken, Pki, Svid};
pub use sidecar::{Sidecar, SidecarBuilder};

/// Where the workspace's binaries are: `$MANDATE_BIN_DIR`, else two levels up from the test executable
/// (`target/debug/deps/<test>` → `target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MANDATE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// The path of workspace binary `name`, or an error that says how to build it.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found; run `cargo build --workspace --bins` first (or set MANDATE_BIN_DIR)",
        path.display()
    );
    Ok(path)
}

/// Logs of processes started by one test, printed when the test fails.
#[derive(Clone, Default)]
pub(crate) struct LogRegistry(Arc<Mutex<Vec<(String, PathBuf)>>>);

impl LogRegistry {
    pub(crate) fn register(&self, name: &str, path: PathBuf) {
        self.0
            .lock()
            .expect("log registry lock")
            .push((name.to_owned(), path));
    }

    fn dump(&self) {
        for (name, path) in self.0.lock().expect("log registry lock").iter() {
            let text =
                std::fs::read_to_string(path).unwrap_or_else(|e| format!("<unreadable: {e}>"));
            eprintln!(
                "----- {name} log ({}) -----\n{text}----- end of {name} log -----",
                path.display()
            );
        }
    }
}

/// One test's world: scratch directory, CA, and the logs of everything it started.
pub struct TestEnv {
    name: String,
    dir: tempfile::TempDir,
    pki: Pki,
    logs: LogRegistry,
}

impl TestEnv {
    /// A fresh environment with its own CA for trust domain `mandate.local`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mandate-e2e-{name}-"))
            .tempdir()
            .expect("create the test's scratch directory");
        let pki = Pki::new(dir.path()).expect("create the test CA");
        Self {
            name: name.to_owned(),
            dir,
            pki,
            logs: LogRegistry::default(),
        }
    }

    /// The scratch directory (removed when the environment is dropped).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The test's CA and trust bundle.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// Starts describing a sidecar named `name` (used for its files and in printed logs).
    pub fn sidecar(&self, name: &str) -> SidecarBuilder<'_> {
        SidecarBuilder::new(self, name)
    }

    /// Starts describing a control plane (`mandate serve`) named `name`.
    pub fn control_plane(&self, name: &str) -> ControlPlaneBuilder<'_> {
        ControlPlaneBuilder::new(self, name)
    }

    /// The usual pair: a tool sidecar (`service/tool`, forwarding to `app`) and an agent sidecar
    /// (`agent/alice`) with an HTTP route `host_port` to it. Returns `(agent, tool)`.
    pub async fn pair(
        &self,
        app: std::net::SocketAddr,
        host_port: &str,
    ) -> anyhow::Result<(Sidecar, Sidecar)> {
        let tool = self
            .sidecar("tool")
            .identity("service/tool")
            .app(app)
            .spawn()
            .await?;
        let agent = self
            .sidecar("agent")
            .identity("agent/alice")
            .route_to(host_port, &tool)
            .spawn()
            .await?;
        Ok((agent, tool))
    }

    pub(crate) fn logs(&self) -> &LogRegistry {
        &self.logs
    }

    /// Runs the test body within `limit`. An error or a timeout fails the test; in every failure (also a
    /// panic inside `body`) the logs of all sidecars started through this environment are printed.
    pub async fn run<F>(&self, limit: Duration, body: F)
    where
        F: Future<Output = anyhow::Result<()>>,
    {
        match tokio::time::timeout(limit, body).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{}: {e:#}", self.name),
            Err(_) => panic!("{}: timed out after {limit:?}", self.name),
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== {} failed; logs of the processes it started:",
                self.name
            );
            self.logs.dump();
        }
    }
}

/// Only what the harness says configures a child, never the test runner's `MANDATE_*` environment.
pub(crate) fn clean_env(cmd: &mut tokio::process::Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MANDATE_") {
            cmd.env_remove(&k);
        }
    }
}

/// Waits for `cond` to hold, re-checking every 25 ms, for at most `limit`; the error names `what`.
///
/// For conditions only observable by looking (a metric, a log line, a served file), not a substitute for
/// a signal where one exists.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_err = None;
    loop {
        match cond().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("{what}: not reached within {limit:?}")),
                None => anyhow::anyhow!("{what}: not reached within {limit:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits up to `limit` for `fut`, naming `what` in the error.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: nothing within {limit:?}"))
}

/// Returns an error from the enclosing function unless `left == right`; the error shows the message
/// and both values. For test bodies run by [`TestEnv::run`], where `?` is the way out.
#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($arg:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if !(*left == *right) {
            return ::core::result::Result::Err(::anyhow::anyhow!(
                "{}\n  left: {:?}\n right: {:?}",
                format!($($arg)+),
                left,
                right
            ));
        }
    }};
}
