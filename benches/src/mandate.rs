//! Topology (b): client → sidecar A (outbound, explicit proxy) → mTLS → sidecar B (inbound) → app.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use http::{HeaderValue, Uri};

use crate::certs::{AGENT, Pair, TRUST_DOMAIN};
use crate::loadgen::{self, Target};
use crate::policy;
use crate::procs::{self, Child, Spawn};
use crate::topology::{BODY_BYTES, Env, Running, SetupError, TOOL_AUTHORITY, os_args};

/// How long a sidecar may take to answer /readyz.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Listener addresses of one sidecar.
struct Ports {
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
}

impl Ports {
    /// Distinct ports for both sidecars.
    fn pick_pair() -> anyhow::Result<(Self, Self)> {
        let p = procs::free_ports(6)?;
        let ports = |i: usize| Self {
            outbound: p[i],
            inbound: p[i + 1],
            admin: p[i + 2],
        };
        Ok((ports(0), ports(3)))
    }
}

/// Ceiling of the benchmark's agent in the policy pair's registry: exactly the load's request.
pub fn bench_ceiling() -> serde_json::Value {
    serde_json::json!([{"host": "tool", "method": "GET", "path": "/"}])
}

/// Starts the sidecar pair and waits until a request passes through it; with `with_policy`, both
/// sidecars decide every call with the reference policy and log each decision.
pub async fn start(env: &Env<'_>, with_policy: bool) -> Result<Running, SetupError> {
    let bin = env.args.bin_dir.join("mandate-proxy");
    check_binary(&bin, with_policy)?;
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "mandate-proxy (no --version)".to_owned());

    let (a, b) = Ports::pick_pair()?;
    let suffix = if with_policy { "-policy" } else { "" };
    let (name_a, name_b) = (
        format!("sidecar-A-outbound{suffix}"),
        format!("sidecar-B-inbound{suffix}"),
    );
    let mut decision_logs = Vec::new();
    let mut policy_args = |name: &str| -> anyhow::Result<Vec<String>> {
        if !with_policy {
            return Ok(vec![]);
        }
        let dir = std::fs::canonicalize(&env.args.policy_dir)
            .with_context(|| format!("--policy-dir {}", env.args.policy_dir.display()))?;
        // In a directory of its own: the sidecar watches the data file's directory, and decision-log
        // writes next to it would wake its watcher on every record.
        let data_dir = env.tmp.join("policy-data");
        std::fs::create_dir_all(&data_dir)?;
        let data = data_dir.join("data.json");
        if !data.exists() {
            policy::write_pair_data(&data, AGENT, bench_ceiling())?;
        }
        let log = env.tmp.join(format!("decisions-{name}.jsonl"));
        decision_logs.push((name.to_owned(), log.clone()));
        Ok(vec![
            "--policy".into(),
            dir.display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "--decision-log".into(),
            log.display().to_string(),
        ])
    };
    let mut extra_b = vec!["--app".into(), env.app.to_string()];
    extra_b.extend(policy_args(&name_b)?);
    let mut extra_a = vec!["--route".into()];
    let route = format!("{TOOL_AUTHORITY}={},id={}", b.inbound, env.certs.tool_id);
    let spawn = |name: &str, ports: &Ports, pair: &Pair, extra: Vec<String>| {
        let mut args = common_args(env, ports, pair);
        args.extend(extra);
        Child::spawn(
            env.pinner,
            Spawn {
                name,
                program: &bin,
                args: os_args(args),
                cpus: env.cpus_proxy,
                // Per-request logging would cost the sidecar time nginx (access_log off) does not spend.
                env: vec![("MANDATE_LOG", "warn")],
                log_dir: env.tmp,
            },
        )
    };
    // B first, so A's first connection finds it listening.
    extra_a.push(route);
    extra_a.extend(policy_args(&name_a)?);
    let mut sidecar_b = spawn(&name_b, &b, &env.certs.tool, extra_b)?;
    let mut sidecar_a = spawn(&name_a, &a, &env.certs.agent, extra_a)?;
    for (child, ports) in [(&mut sidecar_b, &b), (&mut sidecar_a, &a)] {
        wait_ready(child, ports.admin).await?;
    }

    // Explicit-proxy form, as an agent with HTTP_PROXY set would send it.
    let target = Target {
        connect: a.outbound,
        uri: Uri::from_static("http://tool:8080/"),
        host: HeaderValue::from_static(TOOL_AUTHORITY),
        expect_body: Some(BODY_BYTES),
        headers: vec![],
    };
    if let Err(e) = loadgen::probe(&target, Instant::now() + Duration::from_secs(5)).await {
        return Err(anyhow!(
            "a request through the pair failed: {e}\n--- sidecar A log:\n{}\n--- sidecar B log:\n{}",
            sidecar_a.log_tail(1500),
            sidecar_b.log_tail(1500)
        )
        .into());
    }
    Ok(Running {
        target,
        procs: vec![sidecar_a, sidecar_b],
        facts: if with_policy { vec![] } else { vec![version] },
        configs: vec![],
        decision_logs,
    })
}

fn common_args(env: &Env<'_>, ports: &Ports, pair: &Pair) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        "--trust-domain".into(),
        TRUST_DOMAIN.into(),
        "--cert".into(),
        path(&pair.cert),
        "--key".into(),
        path(&pair.key),
        "--bundle".into(),
        path(&env.certs.bundle),
        "--outbound".into(),
        ports.outbound.to_string(),
        "--inbound".into(),
        ports.inbound.to_string(),
        "--admin".into(),
        ports.admin.to_string(),
        "--workers".into(),
        env.args.workers.to_string(),
    ]
}

/// The binary must exist and answer `--help` with the contract's flags; otherwise it is not ready yet.
fn check_binary(bin: &Path, with_policy: bool) -> Result<(), SetupError> {
    if !bin.is_file() {
        return Err(SetupError::Unavailable(format!(
            "{} not found (build it: cargo build --release -p mandate-proxy)",
            bin.display()
        )));
    }
    let out = Command::new(bin)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --help", bin.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    let policy_flags: &[&str] = if with_policy {
        &["--policy", "--data", "--decision-log"]
    } else {
        &[]
    };
    let missing: Vec<_> = ["--route", "--inbound", "--outbound", "--app", "--workers"]
        .into_iter()
        .chain(policy_flags.iter().copied())
        .filter(|f| !help.contains(f))
        .collect();
    if !out.status.success() || !missing.is_empty() {
        return Err(SetupError::Unavailable(format!(
            "{} is not usable yet: `--help` exited {} and lacks {:?}",
            bin.display(),
            out.status,
            missing
        )));
    }
    Ok(())
}

/// Waits for `GET /readyz` = 200 on the admin listener, failing early if the sidecar exits.
pub(crate) async fn wait_ready(child: &mut Child, admin: SocketAddr) -> anyhow::Result<()> {
    let target = Target {
        connect: admin,
        uri: Uri::from_static("/readyz"),
        host: HeaderValue::from_str(&admin.to_string())?,
        expect_body: None,
        headers: vec![],
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        child.check_alive()?;
        match loadgen::probe(&target, Instant::now()).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow!(
                    "{} not ready within {READY_TIMEOUT:?} (last /readyz: {e}); end of its log:\n{}",
                    child.name(),
                    child.log_tail(2000)
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
