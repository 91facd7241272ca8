//! Running `mandate-proxy` as a child process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::client::{Collected, get};
use crate::metrics::Metrics;
use crate::pki::Svid;
use crate::{TestEnv, ports};

/// How long a sidecar may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a decision may take to appear in the decision log.
const DECISION_TIMEOUT: Duration = Duration::from_secs(10);

/// Describes a sidecar to start; see [`TestEnv::sidecar`].
pub struct SidecarBuilder<'a> {
    env: &'a TestEnv,
    name: String,
    svid: Option<Svid>,
    bundle: Option<PathBuf>,
    app: Option<SocketAddr>,
    routes: Vec<String>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    tcp_listens: usize,
    decision_log: bool,
    managed: Option<Managed>,
    pod: Option<crate::pod::Pod>,
}

/// Managed mode: where the control plane is and the join token to enrol with (none when the
/// identity comes from a state directory).
#[derive(Clone)]
struct Managed {
    url: String,
    join_token: Option<String>,
    spiffe_id: String,
}

/// What [`SidecarBuilder::spawn`] waits for before handing the sidecar over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WaitFor {
    /// `/readyz` answers 200.
    Ready,
    /// `/healthz` answers 200 (listeners bound), whatever `/readyz` says.
    Live,
    /// Nothing: the process has been started.
    Nothing,
}

impl<'a> SidecarBuilder<'a> {
    pub(crate) fn new(env: &'a TestEnv, name: &str) -> Self {
        Self {
            env,
            name: name.to_owned(),
            svid: None,
            bundle: None,
            app: None,
            routes: Vec::new(),
            args: Vec::new(),
            envs: Vec::new(),
            tcp_listens: 0,
            decision_log: false,
            managed: None,
            pod: None,
        }
    }

    /// Runs inside `pod`'s network namespace on the ports a pod's sidecar uses: outbound
    /// 127.0.0.1:15001, inbound 0.0.0.0:15006, admin 0.0.0.0:15000 (reached at the pod's address).
    pub fn in_pod(mut self, pod: &crate::pod::Pod) -> Self {
        self.pod = Some(pod.clone());
        self
    }

    /// Runs with a good SVID for `shorthand` (`agent/NAME`, `service/NAME`) issued by the test CA.
    pub fn identity(mut self, shorthand: &str) -> Self {
        self.svid = Some(self.env.pki().issue(shorthand));
        self
    }

    /// Managed mode: `--control-plane <cp> --join-token TOKEN`; identity, policy and registry come
    /// from the control plane (and its SPIFFE ID from the token).
    pub fn managed(mut self, cp: &crate::ControlPlane, join_token: &str) -> Self {
        let spiffe_id = mandate_wire::JoinToken::parse(join_token)
            .map(|t| t.spiffe_id().to_owned())
            .unwrap_or_default();
        self.managed = Some(Managed {
            url: cp.url(),
            join_token: Some(join_token.to_owned()),
            spiffe_id,
        });
        self
    }

    /// Managed mode without a join token: `--control-plane <cp> --state-dir <state_dir>`, the
    /// identity (and the last applied state) restored from a state directory an earlier sidecar for
    /// `spiffe_id` left.
    pub fn managed_from_state(
        mut self,
        cp: &crate::ControlPlane,
        spiffe_id: &str,
        state_dir: &Path,
    ) -> Self {
        self.managed = Some(Managed {
            url: cp.url(),
            join_token: None,
            spiffe_id: spiffe_id.to_owned(),
        });
        self.arg("--state-dir").arg(state_dir.display().to_string())
    }

    /// Runs with this certificate and key.
    pub fn svid(mut self, svid: Svid) -> Self {
        self.svid = Some(svid);
        self
    }

    /// Trusts this bundle file instead of the test CA's.
    pub fn bundle(mut self, path: &Path) -> Self {
        self.bundle = Some(path.to_owned());
        self
    }

    /// `--app ADDR`: where inbound traffic goes.
    pub fn app(mut self, addr: SocketAddr) -> Self {
        self.app = Some(addr);
        self
    }

    /// `--route HOST:PORT=<peer's inbound>,id=<peer's id>`: an HTTP route to a running peer sidecar.
    pub fn route_to(mut self, host_port: &str, peer: &Sidecar) -> Self {
        self.routes
            .push(format!("{host_port}={},id={}", peer.inbound(), peer.id()));
        self
    }

    /// `--route SPEC` verbatim.
    pub fn route(mut self, spec: impl Into<String>) -> Self {
        self.routes.push(spec.into());
        self
    }

    /// `--route HOST:PORT=<peer's inbound>,id=<peer's id>,protocol=tcp,listen=127.0.0.1:<free port>`;
    /// the chosen listen address is [`Sidecar::tcp_listen`]`(i)` for the i-th such route.
    pub fn tcp_route_to(self, host_port: &str, peer: &Sidecar) -> Self {
        let (inbound, id) = (peer.inbound(), peer.id().to_owned());
        self.tcp_route(host_port, inbound, &id)
    }

    /// `--route HOST:PORT=ADDR,id=ID,protocol=tcp,listen=127.0.0.1:<free port>`; the listen address is
    /// [`Sidecar::tcp_listen`]`(i)` for the i-th such route.
    pub fn tcp_route(mut self, host_port: &str, addr: SocketAddr, id: &str) -> Self {
        self.routes.push(format!(
            "{host_port}={addr},id={id},protocol=tcp,listen={{LISTEN{}}}",
            self.tcp_listens
        ));
        self.tcp_listens += 1;
        self
    }

    /// An extra command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// An extra environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// `--policy PATH`: a `.rego` file or a directory of them.
    pub fn policy(self, path: &Path) -> Self {
        self.arg("--policy").arg(path.display().to_string())
    }

    /// `--data FILE`: the JSON data document (the registry lives in it).
    pub fn data(self, path: &Path) -> Self {
        self.arg("--data").arg(path.display().to_string())
    }

    /// `--decision-log <sidecar dir>/decisions.jsonl`, read back with [`Sidecar::decisions`].
    pub fn decision_log(mut self) -> Self {
        self.decision_log = true;
        self
    }

    /// `--dry-run`.
    pub fn dry_run(self) -> Self {
        self.arg("--dry-run")
    }

    /// `--fail-open`.
    pub fn fail_open(self) -> Self {
        self.arg("--fail-open")
    }

    /// `--body-limit SIZE`, e.g. `1KiB`.
    pub fn body_limit(self, size: &str) -> Self {
        self.arg("--body-limit").arg(size)
    }

    /// `--policy-timeout DURATION`, e.g. `20ms`.
    pub fn policy_timeout(self, limit: &str) -> Self {
        self.arg("--policy-timeout").arg(limit)
    }

    /// Writes the identity files, starts the process and waits until `/readyz` answers 200.
    ///
    /// When the process exits before it is ready because a port was taken in the meantime, it is started
    /// again on fresh ports (up to three times).
    pub async fn spawn(self) -> anyhow::Result<Sidecar> {
        self.start(WaitFor::Ready).await
    }

    /// Like [`spawn`](Self::spawn), but waits only until `/healthz` answers 200 (the listeners are
    /// bound then): for sidecars that are expected never to become ready.
    pub async fn spawn_live(self) -> anyhow::Result<Sidecar> {
        self.start(WaitFor::Live).await
    }

    /// Starts the process without waiting for it to become live or ready: for sidecars expected
    /// to fail at start-up.
    pub async fn spawn_unwaited(self) -> anyhow::Result<Sidecar> {
        self.start(WaitFor::Nothing).await
    }

    async fn start(self, wait_for: WaitFor) -> anyhow::Result<Sidecar> {
        let bin = crate::bin("mandate-proxy")?;
        if self.managed.is_none() && self.svid.is_none() {
            bail!("sidecar {}: no identity given", self.name);
        }
        let dir = self.env.dir().join(&self.name);
        std::fs::create_dir_all(&dir)?;
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        if let Some(svid) = &self.svid {
            std::fs::write(&cert, &svid.cert_pem)?;
            std::fs::write(&key, &svid.key_pem)?;
        }
        let id = match (&self.managed, &self.svid) {
            (Some(managed), _) => managed.spiffe_id.clone(),
            (None, Some(svid)) => svid.id.clone(),
            (None, None) => unreachable!("checked above"),
        };
        let bundle = self
            .bundle
            .clone()
            .unwrap_or_else(|| self.env.pki().bundle_path().to_owned());
        let decision_log = self.decision_log.then(|| dir.join("decisions.jsonl"));

        let mut attempt = 0;
        loop {
            attempt += 1;
            // (where it is reached, where it binds)
            let ((outbound, inbound, admin), binds) = match &self.pod {
                Some(pod) => (
                    (
                        SocketAddr::from(([127, 0, 0, 1], 15001)),
                        SocketAddr::new(pod.ip, 15006),
                        SocketAddr::new(pod.ip, 15000),
                    ),
                    Some(["127.0.0.1:15001", "0.0.0.0:15006", "0.0.0.0:15000"]),
                ),
                None => (
                    (ports::free_addr(), ports::free_addr(), ports::free_addr()),
                    None,
                ),
            };
            let tcp_listens: Vec<SocketAddr> =
                (0..self.tcp_listens).map(|_| ports::free_addr()).collect();
            let log = dir.join(format!("stderr-{attempt}.log"));
            let log_file = std::fs::File::create(&log)?;
            let log_name = if attempt == 1 {
                self.name.clone()
            } else {
                format!("{} (attempt {attempt})", self.name)
            };
            self.env.logs().register(&log_name, log.clone());

            let mut cmd = match &self.pod {
                Some(pod) => pod.command(&bin),
                None => Command::new(&bin),
            };
            cmd.arg("--trust-domain").arg(crate::pki::TRUST_DOMAIN);
            match &self.managed {
                // The token travels in the environment, not argv, where `ps` would show it.
                Some(managed) => cmd.arg("--control-plane").arg(&managed.url),
                None => cmd
                    .arg("--cert")
                    .arg(&cert)
                    .arg("--key")
                    .arg(&key)
                    .arg("--bundle")
                    .arg(&bundle),
            };
            let [bind_outbound, bind_inbound, bind_admin] = binds.map_or_else(
                || [outbound, inbound, admin].map(|a| a.to_string()),
                |b| b.map(str::to_owned),
            );
            cmd.arg("--outbound")
                .arg(bind_outbound)
                .arg("--inbound")
                .arg(bind_inbound)
                .arg("--admin")
                .arg(bind_admin)
                .arg("--workers")
                .arg("2");
            if let Some(app) = self.app {
                cmd.arg("--app").arg(app.to_string());
            }
            for route in &self.routes {
                let mut route = route.clone();
                for (i, addr) in tcp_listens.iter().enumerate() {
                    route = route.replace(&format!("{{LISTEN{i}}}"), &addr.to_string());
                }
                cmd.arg("--route").arg(route);
            }
            cmd.args(&self.args);
            if let Some(path) = &decision_log {
                cmd.arg("--decision-log").arg(path);
            }
            crate::clean_env(&mut cmd);
            cmd.env(
                "MANDATE_LOG",
                std::env::var("MANDATE_E2E_LOG").unwrap_or_else(|_| "info".to_owned()),
            );
            if let Some(token) = self.managed.as_ref().and_then(|m| m.join_token.as_ref()) {
                cmd.env("MANDATE_JOIN_TOKEN", token);
            }
            for (k, v) in &self.envs {
                cmd.env(k, v);
            }
            cmd.stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .kill_on_drop(true);
            let child = cmd
                .spawn()
                .with_context(|| format!("start {}", bin.display()))?;
            let mut sidecar = Sidecar {
                name: self.name.clone(),
                child,
                id: id.clone(),
                svid: self.svid.clone(),
                outbound,
                inbound,
                admin,
                tcp_listens,
                cert: cert.clone(),
                key: key.clone(),
                log,
                decision_log: decision_log.clone(),
            };
            let waited = match wait_for {
                WaitFor::Ready => sidecar.wait_ready().await,
                WaitFor::Live => sidecar.wait_live().await,
                WaitFor::Nothing => Ok(()),
            };
            match waited {
                Ok(()) => return Ok(sidecar),
                Err(e) => {
                    let logs = sidecar.logs().to_ascii_lowercase();
                    let exited = sidecar.child.try_wait()?.is_some();
                    if exited && logs.contains("in use") && attempt < 3 {
                        continue;
                    }
                    return Err(e.context(format!("sidecar {} did not become ready", self.name)));
                }
            }
        }
    }
}

/// A running `mandate-proxy`; killed when dropped.
pub struct Sidecar {
    name: String,
    child: Child,
    id: String,
    svid: Option<Svid>,
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
    tcp_listens: Vec<SocketAddr>,
    cert: PathBuf,
    key: PathBuf,
    log: PathBuf,
    decision_log: Option<PathBuf>,
}

impl Sidecar {
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("exited with {status} before it was ready");
            }
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(2), get(self.admin, "/readyz")).await
                && resp.status == 200
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("/readyz did not answer 200 within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_live(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("exited with {status} before /healthz answered");
            }
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(2), get(self.admin, "/healthz")).await
                && resp.status == 200
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("/healthz did not answer 200 within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The name given to the builder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its SPIFFE ID (from its SVID, or in managed mode from its join token).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The SVID it was started with (standalone mode only).
    pub fn svid(&self) -> &Svid {
        self.svid
            .as_ref()
            .expect("a managed sidecar has no SVID file; its identity came from the control plane")
    }

    /// Whether `/readyz` answers 200 now.
    pub async fn is_ready(&self) -> bool {
        matches!(self.admin_get("/readyz").await, Ok(r) if r.status == 200)
    }

    /// The outbound listener (the agent's explicit proxy).
    pub fn outbound(&self) -> SocketAddr {
        self.outbound
    }

    /// The inbound (mTLS) listener.
    pub fn inbound(&self) -> SocketAddr {
        self.inbound
    }

    /// The admin listener.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The `listen=` address of the i-th route added with [`SidecarBuilder::tcp_route_to`].
    pub fn tcp_listen(&self, i: usize) -> SocketAddr {
        self.tcp_listens[i]
    }

    /// The watched certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// The watched key file.
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Everything it wrote to stdout/stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every decision record in its `--decision-log` so far (complete lines only), parsed.
    pub fn decisions(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let path = self.decision_log.as_ref().with_context(|| {
            format!("sidecar {} was started without .decision_log()", self.name)
        })?;
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        // A line is complete once its newline is written; the writer may be mid-line.
        let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .with_context(|| format!("decision log line is not JSON: {l:?}"))
            })
            .collect()
    }

    /// Waits (up to 10 s; the log is written off the request path) for a decision record matching
    /// `pred`. The error names `what` and lists the records seen.
    pub async fn decision_where(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + DECISION_TIMEOUT;
        loop {
            let records = self.decisions()?;
            if let Some(found) = records.iter().find(|r| pred(r)) {
                return Ok(found.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                let seen: Vec<String> = records.iter().map(|r| r.to_string()).collect();
                bail!(
                    "{}'s decision log has no record of {what} within {DECISION_TIMEOUT:?}; it has:\n{}",
                    self.name,
                    seen.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for the decision record with this `decision_id`.
    pub async fn decision(&self, decision_id: &str) -> anyhow::Result<serde_json::Value> {
        self.decision_where(&format!("decision {decision_id}"), |r| {
            r["decision_id"] == decision_id
        })
        .await
    }

    /// `GET` an admin path.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<Collected> {
        get(self.admin, path)
            .await
            .with_context(|| format!("GET {path} on {}'s admin listener", self.name))
    }

    /// A scrape of `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let resp = self.admin_get("/metrics").await?;
        anyhow::ensure!(resp.status == 200, "/metrics answered {}", resp.status);
        Ok(Metrics(resp.text()))
    }

    /// `/config`, parsed.
    pub async fn config(&self) -> anyhow::Result<serde_json::Value> {
        let resp = self.admin_get("/config").await?;
        anyhow::ensure!(resp.status == 200, "/config answered {}", resp.status);
        resp.json()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the sidecar already exited")?;
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        anyhow::ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// Kills it with SIGKILL (no clean shutdown, nothing flushed) and reaps it.
    pub async fn sigkill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Whether the process has exited, without waiting.
    pub fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self) -> anyhow::Result<ExitStatus> {
        Ok(self.child.wait().await?)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
