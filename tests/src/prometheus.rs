//! A real Prometheus server (`prometheus`, Debian package `prometheus`) scraping a test's processes,
//! queried over its HTTP API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::client::get;
use crate::{TestEnv, ports};

/// How long Prometheus may take to answer `/-/ready` (it replays an empty TSDB first).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Fresh ports tried when Prometheus exits because its listen address was taken in between.
const BIND_ATTEMPTS: u32 = 5;

/// One sample of an instant-vector query result: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A running `prometheus`; killed when dropped.
pub struct Prometheus {
    _child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Whether the `prometheus` binary is on `PATH`.
    pub fn available() -> bool {
        std::process::Command::new("prometheus")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts `prometheus` with configuration `config` (YAML; relative paths in it are resolved
    /// against the test's directory for this server), its storage in the test's scratch directory
    /// and its web listener on a free loopback port, and waits until `/-/ready` answers 200.
    pub async fn start(env: &TestEnv, name: &str, config: &str) -> anyhow::Result<Self> {
        let dir = env.dir().join(name);
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        for attempt in 1..=BIND_ATTEMPTS {
            let addr = ports::free_addr();
            let log = dir.join(format!("prometheus-{attempt}.log"));
            env.logs()
                .register(&format!("{name} (start {attempt})"), log.clone());
            let log_file = std::fs::File::create(&log)?;
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=info")
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .kill_on_drop(true)
                .spawn()
                .context("start prometheus")?;
            let mut prom = Self {
                _child: child,
                addr,
                log,
            };
            if prom.wait_ready().await? {
                return Ok(prom);
            }
            if !prom.logs().contains("address already in use") {
                bail!("prometheus exited before it was ready:\n{}", prom.logs());
            }
        }
        bail!("prometheus found no free listen address in {BIND_ATTEMPTS} attempts")
    }

    /// `true` once `/-/ready` answers 200, `false` if the process exited first.
    async fn wait_ready(&mut self) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if self._child.try_wait()?.is_some() {
                return Ok(false);
            }
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(2), get(self.addr, "/-/ready")).await
                && resp.status == 200
            {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "prometheus: /-/ready did not answer 200 within {READY_TIMEOUT:?}:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its web (and API) listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything it logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/{endpoint}?{query}`: the `data` of a `"status": "success"` answer.
    pub async fn api(
        &self,
        endpoint: &str,
        query: &[(&str, &str)],
    ) -> anyhow::Result<serde_json::Value> {
        let mut path = format!("/api/v1/{endpoint}");
        for (i, (k, v)) in query.iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(&encode(k));
            path.push('=');
            path.push_str(&encode(v));
        }
        let resp = get(self.addr, &path).await?;
        let body = resp
            .json()
            .with_context(|| format!("{path} answered {}: {}", resp.status, resp.text()))?;
        anyhow::ensure!(
            resp.status == 200 && body["status"] == "success",
            "{path} answered {}: {body}",
            resp.status
        );
        Ok(body["data"].clone())
    }

    /// The instant vector `expr` evaluates to now.
    pub async fn query(&self, expr: &str) -> anyhow::Result<Vec<Sample>> {
        let data = self.api("query", &[("query", expr)]).await?;
        anyhow::ensure!(
            data["resultType"] == "vector",
            "{expr} is not an instant vector: {data}"
        );
        data["result"]
            .as_array()
            .context("no result array")?
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .context("sample without metric")?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let value = s["value"][1]
                    .as_str()
                    .context("sample without value")?
                    .parse()
                    .with_context(|| format!("sample value in {s}"))?;
                Ok(Sample { labels, value })
            })
            .collect()
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
