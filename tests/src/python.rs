//! The official MCP Python SDK (`mcp` from PyPI) as client and server: `tests/python/server.py` and
//! `tests/python/client.py`, run with the interpreter named by `MANDATE_E2E_PYTHON`, else the
//! workspace's `.venv/bin/python` (`.ci/run` creates it and installs `mcp`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::TestEnv;
use crate::policy::workspace_root;

/// How long the MCP server may take to print its port (importing the SDK takes a moment).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A script under `tests/python/`.
pub fn script(name: &str) -> PathBuf {
    workspace_root().join("tests").join("python").join(name)
}

/// A Python interpreter that can import the MCP SDK, or why there is none (the caller prints
/// `SKIP: <why>` and returns).
pub async fn interpreter() -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("MANDATE_E2E_PYTHON") {
        candidates.push(("MANDATE_E2E_PYTHON", PathBuf::from(p)));
    }
    candidates.push((
        "the workspace venv",
        workspace_root().join(".venv").join("bin").join("python"),
    ));
    let mut why = Vec::new();
    for (source, python) in candidates {
        match has_mcp(&python).await {
            Ok(()) => return Ok(python),
            Err(e) => why.push(format!("{source} ({}): {e}", python.display())),
        }
    }
    Err(format!(
        "no Python with the MCP SDK: {}; create it with `python3 -m venv .venv && .venv/bin/pip install mcp` \
         in the workspace root, or set MANDATE_E2E_PYTHON",
        why.join("; ")
    ))
}

async fn has_mcp(python: &Path) -> Result<(), String> {
    if !python.exists() {
        return Err("not found".to_owned());
    }
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(python)
            .args([
                "-c",
                "import mcp, mcp.client.streamable_http, mcp.server.transport_security, uvicorn",
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "`import mcp` took over 60s".to_owned())?
    .map_err(|e| format!("cannot run it: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "`import mcp` failed: {}",
            stderr.lines().last().unwrap_or("").trim()
        ))
    }
}

/// `tests/python/server.py`: an MCP server (tools `search`, `delete_repo`) on a free loopback port,
/// path `/mcp`, recording every request it receives. Killed when dropped.
pub struct McpServer {
    child: Child,
    addr: SocketAddr,
    record: PathBuf,
}

impl McpServer {
    /// Starts the server and waits until it names its port. Its output is printed if the test fails.
    pub async fn start(env: &TestEnv, python: &Path) -> anyhow::Result<Self> {
        let dir = env.dir().join("mcp-server");
        std::fs::create_dir_all(&dir)?;
        let record = dir.join("requests.jsonl");
        let log = dir.join("output.log");
        env.logs().register("mcp-server (python)", log.clone());
        let log_file = std::fs::File::create(&log)?;
        let mut child = Command::new(python)
            .arg("-u")
            .arg(script("server.py"))
            .arg(&record)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", python.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(port) = line.strip_prefix("LISTENING ") {
                    return Ok::<_, anyhow::Error>(Some(port.trim().parse::<u16>()?));
                }
            }
            Ok(None)
        })
        .await;
        let port = match port {
            Ok(Ok(Some(port))) => port,
            Ok(Ok(None)) => bail!(
                "the MCP server exited before listening: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
            Ok(Err(e)) => return Err(e.context("read the MCP server's stdout")),
            Err(_) => bail!("the MCP server did not listen within {START_TIMEOUT:?}"),
        };
        // Keep draining stdout into the log, so the server never writes into a closed pipe.
        tokio::spawn(async move {
            let Ok(mut out) = tokio::fs::OpenOptions::new().append(true).open(&log).await else {
                return;
            };
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = out.write_all(format!("{line}\n").as_bytes()).await;
            }
        });
        Ok(Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            record,
        })
    }

    /// Where it listens (give this to the tool sidecar's `--app`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request it received so far: `{method, path, host, peer, messages: [{method, id, name}]}`.
    pub fn requests(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = match std::fs::read_to_string(&self.record) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("record {l:?}")))
            .collect()
    }

    /// The `(method, name)` of every JSON-RPC message it received, in order.
    pub fn messages(&self) -> anyhow::Result<Vec<(String, Option<String>)>> {
        Ok(self
            .requests()?
            .iter()
            .flat_map(|r| r["messages"].as_array().cloned().unwrap_or_default())
            .map(|m| {
                (
                    m["method"].as_str().unwrap_or("").to_owned(),
                    m["name"].as_str().map(str::to_owned),
                )
            })
            .collect())
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// What a client script run printed.
#[derive(Debug)]
pub struct ScriptRun {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl ScriptRun {
    /// The JSON report the script printed last on stdout; the error shows both streams.
    pub fn report(&self) -> anyhow::Result<serde_json::Value> {
        let last = self.stdout.lines().rev().find(|l| !l.trim().is_empty());
        match last.map(serde_json::from_str::<serde_json::Value>) {
            Some(Ok(report)) if self.status.success() => Ok(report),
            _ => bail!("the client script failed or printed no report\n{self}"),
        }
    }
}

impl std::fmt::Display for ScriptRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client.py exited with {}\n----- client.py stdout -----\n{}\n----- client.py stderr -----\n{}\n----- end of client.py output -----",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `tests/python/client.py URL` with `proxy` as its HTTP proxy (`HTTP_PROXY` / `http_proxy`,
/// `NO_PROXY` empty), within `limit`. Its output is printed if the test fails (also after a timeout).
pub async fn run_client(
    env: &TestEnv,
    python: &Path,
    proxy: SocketAddr,
    url: &str,
    limit: Duration,
) -> anyhow::Result<ScriptRun> {
    let dir = env.dir().join("mcp-client");
    std::fs::create_dir_all(&dir)?;
    let (stdout_path, stderr_path) = (dir.join("stdout.log"), dir.join("stderr.log"));
    env.logs().register("client.py stdout", stdout_path.clone());
    env.logs().register("client.py stderr", stderr_path.clone());
    let proxy_url = format!("http://{proxy}");
    let mut cmd = Command::new(python);
    cmd.arg("-u").arg(script("client.py")).arg(url);
    for var in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .env("HTTP_PROXY", &proxy_url)
        .env("http_proxy", &proxy_url)
        .env("NO_PROXY", "")
        .env("no_proxy", "")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path)?)
        .stderr(std::fs::File::create(&stderr_path)?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("run {}", python.display()))?;
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => status?,
        Err(_) => {
            let _ = child.kill().await;
            bail!(
                "client.py did not finish within {limit:?}; stdout so far: {:?}; stderr so far: {:?}",
                std::fs::read_to_string(&stdout_path).unwrap_or_default(),
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
    };
    Ok(ScriptRun {
        status,
        stdout: std::fs::read_to_string(&stdout_path)?,
        stderr: std::fs::read_to_string(&stderr_path)?,
    })
}
