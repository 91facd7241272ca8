//! Running `mandate serve` as a child process, and the operator CLI (`mandate …`) against it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::client::get;
use crate::metrics::Metrics;
use crate::{Sidecar, TestEnv, ports};

/// How long `mandate serve` may take to answer `/readyz` with 200 (first start generates the CA).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a pushed policy may take to make a sidecar ready (the push target is 1 s).
const PUSHED: Duration = Duration::from_secs(10);

/// The admin token every test control plane and CLI call share (tests only: a real one is random).
const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789abcdef";

/// A fixed store key (base64 of 32 bytes), so replicas sharing a PostgreSQL database can unseal the CA.
const STORE_KEY: &str = "bWFuZGF0ZS1lMmUtc3RvcmUta2V5LTMyLWJ5dGVzISE=";

/// Describes a control plane to start; see [`TestEnv::control_plane`].
pub struct ControlPlaneBuilder<'a> {
    env: &'a TestEnv,
    name: String,
    database_url: Option<String>,
    args: Vec<String>,
    listen: SocketAddr,
}

impl<'a> ControlPlaneBuilder<'a> {
    pub(crate) fn new(env: &'a TestEnv, name: &str) -> Self {
        Self {
            env,
            name: name.to_owned(),
            database_url: None,
            args: Vec::new(),
            listen: ports::free_addr(),
        }
    }

    /// Serves the API on `ip` (a free port) instead of loopback: for pods in other namespaces.
    pub fn listen_ip(mut self, ip: std::net::IpAddr) -> Self {
        self.listen.set_ip(ip);
        self
    }

    /// `--database-url URL`: PostgreSQL instead of the embedded SQLite.
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// An extra `mandate serve` argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Starts `mandate serve` and waits until `/readyz` answers 200.
    pub async fn spawn(self) -> anyhow::Result<ControlPlane> {
        let dir = self.env.dir().join(&self.name);
        std::fs::create_dir_all(&dir)?;
        let mut cp = ControlPlane {
            name: self.name,
            env_logs: self.env.logs().clone(),
            child: None,
            listen: self.listen,
            metrics: ports::free_addr(),
            data_dir: dir.join("data"),
            database_url: self.database_url,
            args: self.args,
            log: dir.join("serve.log"),
            starts: 0,
        };
        cp.start().await?;
        Ok(cp)
    }
}

/// A running `mandate serve`; killed when dropped.
pub struct ControlPlane {
    name: String,
    env_logs: crate::LogRegistry,
    child: Option<Child>,
    listen: SocketAddr,
    metrics: SocketAddr,
    data_dir: PathBuf,
    database_url: Option<String>,
    args: Vec<String>,
    log: PathBuf,
    starts: u32,
}

/// What a `mandate` CLI run printed.
#[derive(Debug)]
pub struct CliOutput {
    /// Whether it exited 0.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl ControlPlane {
    async fn start(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = self
            .log
            .with_file_name(format!("serve-{}.log", self.starts));
        self.env_logs.register(
            &format!("{} (start {})", self.name, self.starts),
            log.clone(),
        );
        self.log = log;
        let log_file = std::fs::File::create(&self.log)?;
        let mut cmd = Command::new(crate::bin("mandate")?);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--trust-domain")
            .arg(crate::pki::TRUST_DOMAIN)
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--metrics")
            .arg(self.metrics.to_string());
        if let Some(url) = &self.database_url {
            cmd.arg("--database-url").arg(url);
        }
        cmd.args(&self.args);
        crate::clean_env(&mut cmd);
        cmd.env("MANDATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("MANDATE_STORE_KEY", STORE_KEY)
            .env(
                "MANDATE_LOG",
                std::env::var("MANDATE_E2E_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().context("start mandate serve")?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().context("not running")?;
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(2), get(self.metrics, "/readyz")).await
                && resp.status == 200
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{}: /readyz did not answer 200 within {READY_TIMEOUT:?}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `https://<listen address>`: what sidecars and the CLI are given.
    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    /// The API listener.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The `--metrics` listener (`/metrics`, `/readyz`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// The trust bundle `mandate serve` writes into its data directory.
    pub fn ca_pem(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }

    /// The admin token the CLI presents.
    pub fn admin_token(&self) -> &str {
        ADMIN_TOKEN
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Everything the current process wrote so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A scrape of its `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let resp = get(self.metrics, "/metrics").await?;
        anyhow::ensure!(resp.status == 200, "/metrics answered {}", resp.status);
        Ok(Metrics(resp.text()))
    }

    /// Kills it with SIGKILL (no clean shutdown) and reaps it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts it again with the same data, database, ports and arguments.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.start().await
    }

    /// Runs `mandate ARGS…` against this control plane (server URL, CA and admin token set).
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<CliOutput> {
        let mut cmd = Command::new(crate::bin("mandate")?);
        cmd.args(args);
        crate::clean_env(&mut cmd);
        cmd.env("MANDATE_SERVER", self.url())
            .env("MANDATE_CACERT", self.ca_pem())
            .env("MANDATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .with_context(|| format!("mandate {} took over 60s", args.join(" ")))??;
        Ok(CliOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `mandate ARGS…` and returns its standard output; a failure is an error showing both streams.
    pub async fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args).await?;
        anyhow::ensure!(
            out.success,
            "mandate {} failed:\n{}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        Ok(out.stdout)
    }

    /// `mandate agent register NAME --owner … --ceiling JSON --autonomous JSON`: the whole ceiling
    /// autonomous, so the agent acts without a delegation; returns the one-time join token.
    pub async fn register_agent(&self, name: &str, ceiling: &str) -> anyhow::Result<String> {
        let out = self
            .cli_ok(&[
                "agent",
                "register",
                name,
                "--owner",
                "alice@example.com",
                "--ceiling",
                ceiling,
                "--autonomous",
                ceiling,
            ])
            .await?;
        join_token_in(&out)
    }

    /// A managed pair under `module` (a Rego body, see [`crate::policy::rego`]): the service
    /// `tool` in front of `app` and the agent `research` (ceiling and autonomous scopes
    /// `{"host": "tool"}`, started with `agent_args`) routing `tool:8080` to it, both enrolled by
    /// join token; the module is pushed as the policy and `(agent, tool)` returned once both are
    /// ready.
    pub async fn managed_pair(
        &self,
        env: &TestEnv,
        app: SocketAddr,
        module: &str,
        agent_args: &[&str],
    ) -> anyhow::Result<(Sidecar, Sidecar)> {
        let tool_token = self.register_service("tool").await?;
        let agent_token = self
            .register_agent("research", r#"[{"host": "tool"}]"#)
            .await?;
        let tool = env
            .sidecar("tool")
            .managed(self, &tool_token)
            .app(app)
            .spawn_live()
            .await?;
        let agent = agent_args
            .iter()
            .fold(
                env.sidecar("agent")
                    .managed(self, &agent_token)
                    .route_to("tool:8080", &tool),
                |agent, arg| agent.arg(*arg),
            )
            .spawn_live()
            .await?;
        let dir = env.dir().join("bundles").join("pair");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("authz.rego"), crate::policy::rego(module))?;
        self.cli_ok(&["policy", "push", &dir.display().to_string()])
            .await?;
        for sidecar in [&agent, &tool] {
            crate::eventually(PUSHED, &format!("{} ready", sidecar.name()), || async {
                Ok(sidecar.is_ready().await)
            })
            .await?;
        }
        Ok((agent, tool))
    }

    /// `mandate service register NAME --owner …`; returns the one-time join token.
    pub async fn register_service(&self, name: &str) -> anyhow::Result<String> {
        let out = self
            .cli_ok(&["service", "register", name, "--owner", "tools@example.com"])
            .await?;
        join_token_in(&out)
    }

    /// `mandate audit query ARGS… --json`, parsed (one record per line).
    pub async fn audit(&self, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut all = vec!["audit", "query", "--json"];
        all.extend_from_slice(args);
        let out = self.cli_ok(&all).await?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("audit line {l:?}")))
            .collect()
    }
}

/// The join token (`mjt1.…`) in what `register` printed.
pub fn join_token_in(out: &str) -> anyhow::Result<String> {
    out.split_whitespace()
        .find(|w| w.starts_with("mjt1."))
        .map(str::to_owned)
        .with_context(|| format!("no join token (mjt1.…) in:\n{out}"))
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}
