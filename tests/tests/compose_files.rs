//! The docker-compose deployment (`deploy/docker-compose.yml`), checked without a Docker engine:
//!
//! - `docker compose config` accepts it, and the normalised form it prints keeps the mesh's
//!   contracts: each agent's `HTTP_PROXY` is the outbound listener of its own sidecar, which shares
//!   the agent's network namespace; the tool's sidecar shares the tool's and forwards to where the
//!   tool listens; the tool is registered with the address the agents call and the inbound address
//!   its sidecar listens on; sidecars start after the bootstrap job, with the join token it writes
//!   for their name; images carry the workspace version; every file mounted or built from exists;
//! - the shell and Python it runs pass their syntax checks, and its Prometheus config passes promtool;
//! - its health checks, run against a real control plane and sidecar, pass only when they are ready;
//! - its bootstrap script, tool and agents, run against a real control plane and real sidecars with
//!   the reference policy (the agents' sidecars routing `tool:8080` by the registry, as in the
//!   compose network; only the tool's inbound address is a loopback one, since `tool` resolves only
//!   there): the researcher's `search` is allowed and its `delete_repo` denied, the intruder is
//!   denied everything, and running the bootstrap again issues fresh tokens.
//!
//! The validator is Compose v2: `$MANDATE_E2E_COMPOSE` (a command line), `docker compose`, or a v2
//! `docker-compose` (`.ci/run` installs the plugin). Without it — or without promtool, or a Python
//! with the MCP SDK — a test prints `SKIP: …` and passes, except under CI (`CI` set), where a missing
//! tool is a failure: these checks are the only ones the compose file gets.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use mandate_e2e::client::get;
use mandate_e2e::policy::{reference_policy, workspace_root};
use mandate_e2e::{ControlPlane, Sidecar, TestEnv, bin_dir, ensure_eq, eventually, ports, python};
use serde_json::Value;
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(180);
/// How long one run of the agent script may take (the SDK's import alone takes a second or two).
const AGENT_RUN: Duration = Duration::from_secs(60);
/// How long a pushed policy may take to make a sidecar ready.
const PUSHED: Duration = Duration::from_secs(10);
const COMPOSE_FILE: &str = "deploy/docker-compose.yml";
const BOOTSTRAP: &str = "deploy/compose/bootstrap.sh";
const TOOL_SCRIPT: &str = "deploy/compose/example/tool.py";
const AGENT_SCRIPT: &str = "deploy/compose/example/agent.py";
/// The uid and gid the proxy image runs as (`init-iptables` exempts the sidecar's traffic by uid).
const SIDECAR_GID: &str = "1337";

/// Whether this is a CI run (`CI` set to anything but empty, `0` or `false`).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// A tool the test needs is missing: `SKIP` outside CI; under CI, a failure.
fn missing(test: &str, why: &str) {
    assert!(
        !in_ci(),
        "{test}: {why}; under CI this check must run (.ci/run installs what it needs)"
    );
    println!("SKIP: {test}: {why}");
}

/// How to run Compose v2, or why there is none.
fn compose_command() -> Result<Vec<String>, String> {
    let mut candidates: Vec<Vec<String>> = Vec::new();
    if let Ok(cmd) = std::env::var("MANDATE_E2E_COMPOSE") {
        candidates.push(cmd.split_whitespace().map(str::to_owned).collect());
    }
    candidates.push(vec!["docker".into(), "compose".into()]);
    candidates.push(vec!["docker-compose".into()]);
    let mut why = Vec::new();
    for cmd in candidates.into_iter().filter(|c| !c.is_empty()) {
        let out = std::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(["version", "--short"])
            .stdin(Stdio::null())
            .output();
        let line = cmd.join(" ");
        match out {
            Ok(out) if out.status.success() => {
                let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                let major = version.trim_start_matches('v').split('.').next();
                if major
                    .and_then(|m| m.parse::<u32>().ok())
                    .is_some_and(|m| m >= 2)
                {
                    return Ok(cmd);
                }
                why.push(format!("`{line}` is version {version:?}, not 2.x"));
            }
            Ok(out) => why.push(format!(
                "`{line} version` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => why.push(format!("`{line}`: {e}")),
        }
    }
    Err(format!("no Compose v2 CLI ({})", why.join("; ")))
}

/// Runs the compose CLI on the compose file with every profile, with no `MANDATE_TAG` or `COMPOSE_*`
/// from the environment; returns stdout, or an error showing both streams.
async fn compose(cmd: &[String], args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new(&cmd[0]);
    command
        .args(&cmd[1..])
        .args([
            "-f",
            COMPOSE_FILE,
            "--profile",
            "monitoring",
            "--profile",
            "cli",
        ])
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k == "MANDATE_TAG" || k.starts_with("COMPOSE_") {
            command.env_remove(&*k);
        }
    }
    let out = command.output().await.context("run the compose CLI")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "`{} {}` failed ({}):\n{stdout}{}",
        cmd.join(" "),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// The compose file as `docker compose config --format json` normalises it.
async fn normalised(cmd: &[String]) -> anyhow::Result<Value> {
    let json = compose(cmd, &["config", "--format", "json"]).await?;
    serde_json::from_str(&json).context("docker compose config --format json printed no JSON")
}

/// One service of the normalised file.
fn service<'a>(config: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    config["services"]
        .get(name)
        .with_context(|| format!("the compose file has no service {name:?}"))
}

/// A service's environment variable.
fn env_var<'a>(svc: &'a Value, key: &str) -> Option<&'a str> {
    svc["environment"][key].as_str()
}

/// The value of `--flag=VALUE` or `--flag VALUE` in a service's command.
fn flag<'a>(svc: &'a Value, name: &str) -> Option<&'a str> {
    let args: Vec<&str> = svc["command"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    args.iter()
        .enumerate()
        .find_map(|(i, arg)| match arg.strip_prefix(name) {
            Some(rest) if rest.starts_with('=') => Some(&rest[1..]),
            Some("") => args.get(i + 1).copied(),
            _ => None,
        })
}

/// A list of strings (a command, an entrypoint, a health check's test) as plain strings.
fn strings(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The command of a service.
fn command(svc: &Value) -> Vec<&str> {
    strings(&svc["command"])
}

/// The volume mounted at `target` in a service: `(type, source, read_only)`.
fn mount_at<'a>(svc: &'a Value, target: &str) -> Option<(&'a str, &'a str, bool)> {
    svc["volumes"].as_array()?.iter().find_map(|v| {
        (v["target"] == target).then(|| {
            (
                v["type"].as_str().unwrap_or(""),
                v["source"].as_str().unwrap_or(""),
                v["read_only"] == true,
            )
        })
    })
}

/// The mount of a service that holds `path`: `(target, type, source, read_only)`.
fn mount_holding<'a>(svc: &'a Value, path: &str) -> Option<(&'a str, &'a str, &'a str, bool)> {
    svc["volumes"].as_array()?.iter().find_map(|v| {
        let target = v["target"].as_str()?;
        path.strip_prefix(target)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            .then(|| {
                (
                    target,
                    v["type"].as_str().unwrap_or(""),
                    v["source"].as_str().unwrap_or(""),
                    v["read_only"] == true,
                )
            })
    })
}

/// `HOST:PORT` of an `http://HOST:PORT/…` URL.
fn authority(url: &str) -> Option<&str> {
    url.strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .map(|rest| rest.split('/').next().unwrap_or(rest))
}

/// The port of a `HOST:PORT`.
fn port_of(addr: &str) -> Option<&str> {
    addr.rsplit_once(':').map(|(_, port)| port)
}

/// The names the bootstrap script enrols as `kind` (`enrol agent NAME …`).
fn enrolled(script: &str, kind: &str) -> BTreeSet<String> {
    let prefix = format!("enrol {kind} ");
    script
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix(&prefix))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Checks what every sidecar `name` next to `workload` must do: run the proxy image in the
/// workload's namespace, start after the bootstrap job and enrol with the join token file it wrote
/// for the workload, keep its state in a volume, and report ready on its health check.
fn check_sidecar(
    config: &Value,
    name: &str,
    workload: &str,
    bootstrap: &Value,
    join_volume: &str,
) -> anyhow::Result<()> {
    let sidecar = service(config, name)?;
    let version = env!("CARGO_PKG_VERSION");
    ensure_eq!(
        sidecar["image"],
        format!("ghcr.io/mandate-dev/mandate-proxy:{version}"),
        "{name}: the sidecar image"
    );
    ensure_eq!(
        sidecar["network_mode"],
        format!("service:{workload}"),
        "{name} must share {workload}'s network namespace"
    );
    ensure_eq!(
        sidecar["depends_on"]["bootstrap"]["condition"],
        "service_completed_successfully",
        "{name} must start after the bootstrap job wrote its join token"
    );
    ensure_eq!(
        flag(sidecar, "--control-plane"),
        env_var(bootstrap, "MANDATE_SERVER"),
        "{name} must enrol with the control plane the bootstrap job registered it with"
    );
    let config_file = flag(sidecar, "--config").with_context(|| format!("{name}: no --config"))?;
    let (target, kind, source, read_only) = mount_holding(sidecar, config_file)
        .with_context(|| format!("{name}: --config {config_file} is on no mount"))?;
    ensure!(
        kind == "volume" && source == join_volume && read_only,
        "{name}: --config {config_file} must be on the join-token volume {join_volume}, read-only \
         (it is on {kind} {source}, read_only {read_only})"
    );
    ensure_eq!(
        config_file,
        format!("{target}/{workload}.yaml"),
        "{name}: the join token file the bootstrap job writes for {workload}"
    );
    let state = flag(sidecar, "--state-dir").with_context(|| format!("{name}: no --state-dir"))?;
    ensure!(
        matches!(mount_at(sidecar, state), Some(("volume", _, false))),
        "{name}: --state-dir {state} must be a writable volume, so identity, policy and spool \
         survive restarts"
    );
    ensure!(
        strings(&sidecar["healthcheck"]["test"])
            .iter()
            .any(|a| a.contains("/readyz")),
        "{name}: the health check must ask /readyz"
    );
    Ok(())
}

/// The control plane and the bootstrap job: images, the job waiting for the control plane's
/// /readyz, reading the CA and the admin token from its data volume read-only, never seeing the
/// store key, pushing the reference policy, and handing the join tokens to the sidecars' group.
/// Returns the volume the join tokens are written to.
fn check_control_plane_and_bootstrap(config: &Value) -> anyhow::Result<&str> {
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let cp = service(config, "control-plane")?;
    ensure_eq!(
        cp["image"],
        format!("ghcr.io/mandate-dev/mandate:{version}"),
        "the control plane image"
    );
    let data_dir = flag(cp, "--data-dir").context("control-plane: no --data-dir")?;
    let Some(("volume", data_volume, false)) = mount_at(cp, data_dir) else {
        bail!("control-plane: --data-dir {data_dir} must be a writable named volume");
    };
    let bootstrap = service(config, "bootstrap")?;
    ensure_eq!(
        bootstrap["image"],
        cp["image"],
        "the bootstrap job runs the mandate CLI"
    );
    ensure_eq!(
        bootstrap["depends_on"]["control-plane"]["condition"],
        "service_healthy",
        "the bootstrap job waits for the control plane's /readyz"
    );
    let server = env_var(bootstrap, "MANDATE_SERVER").context("bootstrap: no MANDATE_SERVER")?;
    ensure_eq!(
        authority(server).and_then(port_of),
        flag(cp, "--listen").and_then(port_of),
        "bootstrap's MANDATE_SERVER {server} must be the control plane's --listen port"
    );
    ensure_eq!(
        authority(server)
            .and_then(|a| a.rsplit_once(':'))
            .map(|(h, _)| h),
        Some("control-plane"),
        "MANDATE_SERVER names the control plane's service"
    );
    for (var, file) in [
        ("MANDATE_CACERT", "ca.pem"),
        ("MANDATE_ADMIN_TOKEN_FILE", "admin-token"),
    ] {
        let path = env_var(bootstrap, var).with_context(|| format!("bootstrap: no {var}"))?;
        let (target, kind, source, read_only) = mount_holding(bootstrap, path)
            .with_context(|| format!("bootstrap: {var} {path} is on no mount"))?;
        ensure!(
            kind == "volume" && source == data_volume && read_only,
            "bootstrap: {var} must be on the control plane's data volume, read-only"
        );
        ensure_eq!(path, format!("{target}/{file}"), "bootstrap: {var}");
    }
    let store_key = flag(cp, "--store-key-file").context("control-plane: no --store-key-file")?;
    let (_, _, key_volume, _) =
        mount_holding(cp, store_key).context("control-plane: the store key is on no mount")?;
    ensure!(
        key_volume != data_volume
            && bootstrap["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|v| v["source"] != key_volume),
        "the store key must live apart from the data volume, out of the bootstrap job's reach"
    );
    let join_dir = env_var(bootstrap, "JOIN_DIR").context("bootstrap: no JOIN_DIR")?;
    let Some(("volume", join_volume, false)) = mount_at(bootstrap, join_dir) else {
        bail!("bootstrap: JOIN_DIR {join_dir} must be a writable named volume");
    };
    ensure_eq!(
        env_var(bootstrap, "JOIN_TOKEN_GROUP"),
        Some(SIDECAR_GID),
        "the join tokens are readable by the sidecars' group"
    );
    ensure!(
        bootstrap["group_add"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g == SIDECAR_GID)),
        "bootstrap: group_add {SIDECAR_GID}, so it may hand its files to that group"
    );
    let policy = env_var(bootstrap, "POLICY_DIR").context("bootstrap: no POLICY_DIR")?;
    let (target, kind, source, _) = mount_holding(bootstrap, policy)
        .with_context(|| format!("bootstrap: POLICY_DIR {policy} is on no mount"))?;
    ensure!(
        kind == "bind",
        "bootstrap: POLICY_DIR must come from the repository"
    );
    let policy_source = Path::new(source).join(policy[target.len()..].trim_start_matches('/'));
    ensure_eq!(
        policy_source.canonicalize()?,
        reference_policy().canonicalize()?,
        "bootstrap pushes the reference policy"
    );
    let entrypoint = strings(&bootstrap["entrypoint"])
        .last()
        .copied()
        .context("bootstrap: no entrypoint")?;
    let (_, kind, source, _) = mount_holding(bootstrap, entrypoint)
        .with_context(|| format!("bootstrap: {entrypoint} is on no mount"))?;
    ensure!(
        kind == "bind" && Path::new(source) == root.join(BOOTSTRAP).canonicalize()?,
        "bootstrap runs {BOOTSTRAP} (it runs {source})"
    );
    Ok(join_volume)
}

/// The tool: on loopback only, its sidecar in its namespace forwarding there, registered with
/// the address the agents call and the inbound address its sidecar listens on.
fn check_tool(config: &Value, script: &str, join_volume: &str) -> anyhow::Result<()> {
    let bootstrap = service(config, "bootstrap")?;
    let tool = service(config, "tool")?;
    ensure_eq!(
        command(tool),
        vec!["python", "tool.py"],
        "the tool runs tool.py"
    );
    let tool_listen = env_var(tool, "TOOL_LISTEN").context("tool: no TOOL_LISTEN")?;
    ensure!(
        tool_listen.starts_with("127.0.0.1:"),
        "the tool listens on loopback only, reachable through its sidecar alone ({tool_listen})"
    );
    check_sidecar(config, "tool-sidecar", "tool", bootstrap, join_volume)?;
    let tool_sidecar = service(config, "tool-sidecar")?;
    ensure_eq!(
        flag(tool_sidecar, "--app"),
        Some(tool_listen),
        "the tool's sidecar forwards to where the tool listens"
    );
    let inbound = flag(tool_sidecar, "--inbound").context("tool-sidecar: no --inbound")?;
    ensure!(
        inbound.starts_with("0.0.0.0:"),
        "the tool's sidecar accepts mTLS from other containers ({inbound})"
    );
    let tool_address = env_var(bootstrap, "TOOL_ADDRESS").context("bootstrap: no TOOL_ADDRESS")?;
    let tool_inbound = env_var(bootstrap, "TOOL_INBOUND").context("bootstrap: no TOOL_INBOUND")?;
    ensure_eq!(
        tool_inbound,
        format!("tool:{}", port_of(inbound).unwrap_or_default()),
        "the tool is registered with its sidecar's inbound listener, in the tool's namespace"
    );
    ensure_eq!(
        env_var(tool, "TOOL_HOST"),
        Some(tool_address),
        "the tool accepts the Host the agents call it by"
    );
    ensure!(
        enrolled(script, "service").contains("tool")
            && script.contains(r#"--address "$TOOL_ADDRESS" --inbound "$TOOL_INBOUND""#),
        "{BOOTSTRAP} registers the service tool with --address $TOOL_ADDRESS --inbound $TOOL_INBOUND"
    );
    Ok(())
}

/// The agents: the two the bootstrap job registers, each calling the tool's registered address
/// through the outbound listener of its own sidecar, which shares its namespace.
fn check_agents(config: &Value, script: &str, join_volume: &str) -> anyhow::Result<()> {
    let bootstrap = service(config, "bootstrap")?;
    let tool_address = env_var(bootstrap, "TOOL_ADDRESS").context("bootstrap: no TOOL_ADDRESS")?;
    let agents: BTreeSet<String> = config["services"]
        .as_object()
        .context("no services")?
        .iter()
        .filter(|(_, svc)| command(svc) == ["python", "agent.py"])
        .map(|(name, _)| name.clone())
        .collect();
    ensure_eq!(
        agents,
        enrolled(script, "agent"),
        "the agents in the compose file are the ones {BOOTSTRAP} registers"
    );
    ensure_eq!(agents.len(), 2, "two agents");
    for agent in &agents {
        let svc = service(config, agent)?;
        let sidecars: Vec<&String> = config["services"]
            .as_object()
            .context("no services")?
            .iter()
            .filter(|(_, s)| s["network_mode"] == format!("service:{agent}"))
            .map(|(name, _)| name)
            .collect();
        let [sidecar_name] = sidecars[..] else {
            bail!("{agent}: exactly one sidecar must share its namespace, found {sidecars:?}");
        };
        check_sidecar(config, sidecar_name, agent, bootstrap, join_volume)?;
        let sidecar = service(config, sidecar_name)?;
        let outbound = flag(sidecar, "--outbound").unwrap_or("127.0.0.1:15001");
        ensure!(
            outbound.starts_with("127.0.0.1:"),
            "{sidecar_name}: the outbound listener stays on loopback ({outbound})"
        );
        let proxy = format!("http://{outbound}");
        for var in ["HTTP_PROXY", "http_proxy"] {
            ensure_eq!(
                env_var(svc, var),
                Some(proxy.as_str()),
                "{agent}: {var} must be its sidecar's outbound listener"
            );
        }
        let url = env_var(svc, "TOOL_URL").with_context(|| format!("{agent}: no TOOL_URL"))?;
        ensure_eq!(
            authority(url),
            Some(tool_address),
            "{agent} calls the tool at the address it is registered with"
        );
        let tool_host = tool_address.split(':').next().unwrap_or_default();
        for var in ["NO_PROXY", "no_proxy"] {
            ensure!(
                !env_var(svc, var)
                    .unwrap_or("")
                    .split(',')
                    .any(|h| h.trim() == tool_host),
                "{agent}: {var} must not send calls to {tool_host} around the sidecar"
            );
        }
        let admin = flag(sidecar, "--admin").unwrap_or("127.0.0.1:15000");
        ensure_eq!(
            env_var(svc, "SIDECAR_ADMIN").and_then(port_of),
            port_of(admin),
            "{agent} waits for its sidecar's /readyz on the sidecar's admin port"
        );
        ensure_eq!(
            env_var(svc, "AGENT_NAME"),
            Some(agent.as_str()),
            "{agent}: AGENT_NAME"
        );
    }
    Ok(())
}

/// Every file mounted from the repository and every build context (with its stage) exists.
fn check_sources(config: &Value) -> anyhow::Result<()> {
    for (name, svc) in config["services"].as_object().context("no services")? {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            if v["type"] == "bind" {
                let source = v["source"].as_str().unwrap_or_default();
                ensure!(
                    Path::new(source).exists(),
                    "{name}: mounts {source}, which does not exist"
                );
            }
        }
        if let Some(context) = svc["build"]["context"].as_str() {
            let dockerfile = svc["build"]["dockerfile"].as_str().unwrap_or("Dockerfile");
            let path = Path::new(context).join(dockerfile);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{name}: builds from {}", path.display()))?;
            if let Some(target) = svc["build"]["target"].as_str() {
                ensure!(
                    text.lines().any(|l| l.starts_with("FROM ")
                        && l.trim_end().ends_with(&format!(" AS {target}"))),
                    "{name}: {} has no stage {target}",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn compose_file_validates_and_keeps_the_mesh_contracts() {
    const TEST: &str = "compose_file_validates_and_keeps_the_mesh_contracts";
    let cmd = match compose_command() {
        Ok(cmd) => cmd,
        Err(why) => return missing(TEST, &why),
    };
    let env = TestEnv::new("compose-file");
    env.run(LIMIT, async {
        compose(&cmd, &["config", "--quiet"]).await?;
        let config = normalised(&cmd).await?;
        ensure_eq!(
            config["name"],
            "mandate",
            "the project name (COMPOSE_PROJECT_NAME in deploy/.env) names containers and volumes"
        );
        let script = std::fs::read_to_string(workspace_root().join(BOOTSTRAP))?;
        let join_volume = check_control_plane_and_bootstrap(&config)?;
        check_tool(&config, &script, join_volume)?;
        check_agents(&config, &script, join_volume)?;
        check_sources(&config)
    })
    .await;
}

#[tokio::test]
async fn compose_scripts_pass_their_syntax_checks_and_prometheus_config_passes_promtool() {
    const TEST: &str =
        "compose_scripts_pass_their_syntax_checks_and_prometheus_config_passes_promtool";
    let env = TestEnv::new("compose-scripts");
    env.run(LIMIT, async {
        let root = workspace_root();
        run_ok(Command::new("sh").arg("-n").arg(root.join(BOOTSTRAP))).await?;
        let python = python_for_syntax().await?;
        for script in [TOOL_SCRIPT, AGENT_SCRIPT] {
            // ast.parse, not py_compile: nothing is written next to the script.
            run_ok(
                Command::new(&python)
                    .arg("-c")
                    .arg("import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])")
                    .arg(root.join(script)),
            )
            .await?;
        }
        if !promtool_available() {
            missing(TEST, "promtool not found (apt-get install prometheus)");
            return Ok(());
        }
        // In the container, alerts.yml is mounted beside the config: so it is here.
        let dir = env.dir().join("prometheus");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(
            root.join("deploy/compose/prometheus.yml"),
            dir.join("prometheus.yml"),
        )?;
        std::fs::copy(
            root.join("deploy/prometheus/alerts.yml"),
            dir.join("alerts.yml"),
        )?;
        run_ok(
            Command::new("promtool")
                .args(["check", "config"])
                .arg(dir.join("prometheus.yml")),
        )
        .await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn compose_health_checks_pass_only_once_the_listeners_are_ready() {
    const TEST: &str = "compose_health_checks_pass_only_once_the_listeners_are_ready";
    let cmd = match compose_command() {
        Ok(cmd) => cmd,
        Err(why) => return missing(TEST, &why),
    };
    let env = TestEnv::new("compose-health");
    env.run(LIMIT, async {
        let config = normalised(&cmd).await?;
        let cp = env.control_plane("cp").spawn().await?;
        let mut cp_check = health_check(&config, "control-plane", 15014, cp.metrics_addr().port())?;
        let (ok, output) = run(&mut cp_check).await?;
        ensure!(
            ok,
            "the control plane's health check fails on a ready control plane:\n{output}"
        );

        // A sidecar enrolled but without a policy bundle is live, not ready: the check fails.
        let token = cp.register_agent("probe", r#"{"host": "tool"}"#).await?;
        let sidecar = env
            .sidecar("probe")
            .managed(&cp, &token)
            .spawn_live()
            .await?;
        for name in ["researcher-sidecar", "intruder-sidecar", "tool-sidecar"] {
            let mut check = health_check(&config, name, 15000, sidecar.admin().port())?;
            ensure!(
                !run(&mut check).await?.0,
                "{name}'s health check passes on a sidecar that has no policy yet"
            );
        }
        cp.cli_ok(&["policy", "push", &reference_policy().display().to_string()])
            .await?;
        eventually(PUSHED, "the probe sidecar ready", || async {
            Ok(sidecar.is_ready().await)
        })
        .await?;
        for name in ["researcher-sidecar", "intruder-sidecar", "tool-sidecar"] {
            let mut check = health_check(&config, name, 15000, sidecar.admin().port())?;
            let (ok, output) = run(&mut check).await?;
            ensure!(
                ok,
                "{name}'s health check fails on a ready sidecar:\n{output}"
            );
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn compose_workloads_under_the_reference_policy_allow_search_and_deny_the_rest() {
    const TEST: &str =
        "compose_workloads_under_the_reference_policy_allow_search_and_deny_the_rest";
    let python = match python::interpreter().await {
        Ok(python) => python,
        Err(why) => return missing(TEST, &why),
    };
    let env = TestEnv::new("compose-workloads");
    env.run(LIMIT, async {
        let cp = env.control_plane("cp").spawn().await?;
        let join = env.dir().join("join-tokens");
        // The tool's sidecar accepts mTLS here: the compose file's tool:15006, with an address
        // this machine can reach (`tool` resolves only inside the compose network).
        let tool_inbound = ports::free_addr();

        // `docker compose up` runs the bootstrap job on every start: the second run finds the
        // workloads registered and issues fresh tokens.
        let first = bootstrap(&cp, &join, tool_inbound).await?;
        let tokens = join_tokens(&join)?;
        let second = bootstrap(&cp, &join, tool_inbound).await?;
        ensure!(
            first.contains("registered agent researcher")
                && second.contains("agent researcher is registered already"),
            "the bootstrap job registers once, then issues fresh tokens:\n{first}\n---\n{second}"
        );
        let fresh = join_tokens(&join)?;
        for name in ["researcher", "intruder", "tool"] {
            ensure!(
                tokens[name] != fresh[name],
                "the second bootstrap run left {name}'s used token in place"
            );
        }
        let shown = cp.cli_ok(&["service", "show", "tool"]).await?;
        ensure!(
            shown.contains("tool:8080") && shown.contains(&format!("inbound {tool_inbound}")),
            "the tool is registered with --address tool:8080 --inbound {tool_inbound}:\n{shown}"
        );

        // The tool and the three sidecars, each sidecar given its token by the bootstrap job's
        // --config file, as in the compose file. The agents' sidecars have no --route: they reach
        // the tool's sidecar by the registry's address for the tool.
        let tool_app = start_tool(&env, &python).await?;
        let tool_sidecar =
            start_tool_sidecar(&env, &cp, &join, tool_inbound, tool_app.addr).await?;
        let agent_sidecar = |name: &'static str| {
            env.sidecar(name)
                .managed_from_state(
                    &cp,
                    &format!("spiffe://mandate.local/agent/{name}"),
                    &env.dir().join(format!("{name}-state")),
                )
                .arg("--config")
                .arg(join.join(format!("{name}.yaml")).display().to_string())
                .spawn()
        };
        let researcher = agent_sidecar("researcher").await?;
        let intruder = agent_sidecar("intruder").await?;

        let said = run_agent(&python, "researcher", &researcher)
            .await
            .map_err(|e| e.context(format!("the tool sidecar's log:\n{}", tool_sidecar.logs())))?;
        let line = |step: &str| {
            said.lines()
                .find(|l| l.starts_with(&format!("researcher: {step} ")))
                .map(str::to_owned)
                .with_context(|| format!("no line for {step}:\n{said}"))
        };
        ensure!(
            line("initialize")?.contains(" allowed "),
            "researcher's initialize:\n{said}"
        );
        let search = line("tools/call search")?;
        ensure!(
            search.contains(" allowed ") && search.contains("3 results for 'mandate'"),
            "researcher's search is allowed and answered:\n{said}"
        );
        let delete = line("tools/call delete_repo")?;
        ensure!(
            delete.contains(" denied ")
                && delete.contains("outside its ceiling")
                && delete.contains("(decision "),
            "researcher's delete_repo is denied with the policy's reason and decision id:\n{said}"
        );

        let said = run_agent(&python, "intruder", &intruder)
            .await
            .map_err(|e| e.context(format!("the tool sidecar's log:\n{}", tool_sidecar.logs())))?;
        let initialize = said
            .lines()
            .find(|l| l.starts_with("intruder: initialize "))
            .with_context(|| format!("no line for the intruder's initialize:\n{said}"))?;
        ensure!(
            initialize.contains(" denied ") && initialize.contains("intruder may not"),
            "the intruder is denied from its first message on:\n{said}"
        );
        ensure!(
            !said.contains(" allowed "),
            "nothing the intruder tries is allowed:\n{said}"
        );
        Ok(())
    })
    .await;
}

/// `python3`, or the MCP interpreter when there is no `python3` (for `ast.parse` only).
async fn python_for_syntax() -> anyhow::Result<PathBuf> {
    if which("python3") {
        return Ok(PathBuf::from("python3"));
    }
    python::interpreter()
        .await
        .map_err(|why| anyhow::anyhow!("no python3 to check the scripts' syntax: {why}"))
}

fn which(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn promtool_available() -> bool {
    which("promtool")
}

/// Runs `cmd` (stdin closed); `(exited 0, stdout and stderr)`.
async fn run(cmd: &mut Command) -> anyhow::Result<(bool, String)> {
    let out = cmd
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("run {cmd:?}"))?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Runs `cmd`; an error with its output unless it exits 0.
async fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let (ok, output) = run(cmd).await?;
    ensure!(ok, "{cmd:?} failed:\n{output}");
    Ok(output)
}

/// The health check of `name` from the normalised compose file, as a command, aimed at `port`
/// instead of `compose_port` (the container's port, here taken by something else).
fn health_check(
    config: &Value,
    name: &str,
    compose_port: u16,
    port: u16,
) -> anyhow::Result<Command> {
    let test = strings(&service(config, name)?["healthcheck"]["test"]);
    let [kind, program, args @ ..] = &test[..] else {
        bail!("{name}: the health check {test:?} is not [CMD, program, args…]");
    };
    ensure_eq!(*kind, "CMD", "{name}: the health check runs a program");
    let from = format!("/dev/tcp/127.0.0.1/{compose_port}");
    ensure!(
        args.iter().any(|a| a.contains(&from)),
        "{name}: the health check does not ask 127.0.0.1:{compose_port}: {test:?}"
    );
    let mut cmd = Command::new(program);
    cmd.args(
        args.iter()
            .map(|a| a.replace(&from, &format!("/dev/tcp/127.0.0.1/{port}"))),
    );
    Ok(cmd)
}

/// Runs the bootstrap script against `cp` as the compose file does, but with the tool's sidecar
/// accepting mTLS at `tool_inbound`, writing the join tokens to `join`; returns what it printed.
async fn bootstrap(
    cp: &ControlPlane,
    join: &Path,
    tool_inbound: SocketAddr,
) -> anyhow::Result<String> {
    let mut cmd = Command::new("sh");
    cmd.arg(workspace_root().join(BOOTSTRAP));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("MANDATE_") || k == "JOIN_TOKEN_GROUP" || k.starts_with("TOOL_") {
            cmd.env_remove(&*k);
        }
    }
    let path = std::env::join_paths(std::iter::once(bin_dir()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    cmd.env("PATH", path)
        .env("MANDATE_SERVER", cp.url())
        .env("MANDATE_CACERT", cp.ca_pem())
        .env("MANDATE_ADMIN_TOKEN", cp.admin_token())
        .env("JOIN_DIR", join)
        .env("POLICY_DIR", reference_policy())
        .env("TOOL_ADDRESS", "tool:8080")
        .env("TOOL_INBOUND", tool_inbound.to_string())
        .env("READY_TIMEOUT", "10");
    run_ok(&mut cmd).await
}

/// The join token in each `NAME.yaml` the bootstrap job wrote, checking each file is private to
/// its owner (no JOIN_TOKEN_GROUP given).
fn join_tokens(join: &Path) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut tokens = std::collections::BTreeMap::new();
    for name in ["researcher", "intruder", "tool"] {
        let path = join.join(format!("{name}.yaml"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("the bootstrap job wrote no {}", path.display()))?;
        let token = text
            .strip_prefix("join-token: mjt1.")
            .map(str::trim)
            .with_context(|| format!("{} is not `join-token: mjt1.…`", path.display()))?;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        ensure_eq!(
            mode,
            0o600,
            "{} must be readable by its owner only",
            path.display()
        );
        tokens.insert(name.to_owned(), token.to_owned());
    }
    Ok(tokens)
}

/// A process the test started, its output in a file; killed when dropped.
struct Spawned {
    child: tokio::process::Child,
    addr: SocketAddr,
    name: &'static str,
    log: PathBuf,
}

impl Spawned {
    /// Starts `cmd` as `name`, its output going to `<test dir>/<name>.log`; `addr` is what it
    /// serves on.
    fn start(
        env: &TestEnv,
        name: &'static str,
        mut cmd: Command,
        addr: SocketAddr,
    ) -> anyhow::Result<Self> {
        let log = env.dir().join(format!("{name}.log"));
        let output = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Self {
            child,
            addr,
            name,
            log,
        })
    }

    /// Waits until `ready` holds, re-checking every 50 ms; an error with the output if the process
    /// exits first or 30 s pass.
    async fn wait_until<F, Fut>(&mut self, what: &str, mut ready: F) -> anyhow::Result<()>
    where
        F: FnMut(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !ready(self.addr).await {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited with {status}:\n{}", self.name, self.logs());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{}: {what} not within 30s:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Everything it printed so far.
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `deploy/compose/example/tool.py` on a free loopback port, accepting connections.
async fn start_tool(env: &TestEnv, python: &Path) -> anyhow::Result<Spawned> {
    let addr = ports::free_addr();
    let mut cmd = Command::new(python);
    cmd.arg("-u")
        .arg(workspace_root().join(TOOL_SCRIPT))
        .env("TOOL_LISTEN", addr.to_string())
        .env_remove("TOOL_HOST");
    let mut tool = Spawned::start(env, "tool.py", cmd, addr)?;
    tool.wait_until("listening", |addr| async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await?;
    Ok(tool)
}

/// The tool's sidecar as the compose file runs it (its join token from the bootstrap job's
/// --config file, a state directory, forwarding to `app`), but with its inbound listener at
/// `inbound` and the others on free loopback ports; ready (identity and policy loaded).
async fn start_tool_sidecar(
    env: &TestEnv,
    cp: &ControlPlane,
    join: &Path,
    inbound: SocketAddr,
    app: SocketAddr,
) -> anyhow::Result<Spawned> {
    let admin = ports::free_addr();
    let mut cmd = Command::new(mandate_e2e::bin("mandate-proxy")?);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MANDATE_") {
            cmd.env_remove(&k);
        }
    }
    cmd.arg(format!("--config={}", join.join("tool.yaml").display()))
        .arg(format!("--control-plane={}", cp.url()))
        .arg(format!(
            "--state-dir={}",
            env.dir().join("tool-sidecar-state").display()
        ))
        .arg(format!("--inbound={inbound}"))
        .arg(format!("--app={app}"))
        .arg(format!("--admin={admin}"))
        .arg(format!("--outbound={}", ports::free_addr()))
        .env("MANDATE_LOG", "info");
    let mut sidecar = Spawned::start(env, "tool-sidecar", cmd, admin)?;
    sidecar
        .wait_until("/readyz 200", |admin| async move {
            get(admin, "/readyz").await.is_ok_and(|r| r.status == 200)
        })
        .await?;
    Ok(sidecar)
}

/// Runs `deploy/compose/example/agent.py` for one round as agent `name` behind `sidecar`, with the
/// compose file's settings (HTTP_PROXY on the sidecar's outbound listener, the tool at
/// http://tool:8080/mcp); returns what it printed on stdout, or an error with both streams.
async fn run_agent(python: &Path, name: &str, sidecar: &Sidecar) -> anyhow::Result<String> {
    let proxy = format!("http://{}", sidecar.outbound());
    let mut cmd = Command::new(python);
    cmd.arg("-u").arg(workspace_root().join(AGENT_SCRIPT));
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "TOOL_URL",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("AGENT_NAME", name)
        .env("HTTP_PROXY", &proxy)
        .env("http_proxy", &proxy)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("SIDECAR_ADMIN", sidecar.admin().to_string())
        .env("CALL_ROUNDS", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(AGENT_RUN, cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("agent.py as {name} did not finish within {AGENT_RUN:?}"))?
        .context("run agent.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "agent.py as {name} exited with {}:\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}
