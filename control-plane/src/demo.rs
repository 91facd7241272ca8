//! `mandate demo`: a self-contained tour of managed mode. It starts a control plane (`mandate
//! serve` with embedded SQLite), registers an agent and a tool with the operator CLI, starts a
//! sample tool (an MCP server with a small REST API) behind one `mandate-proxy` sidecar and an
//! agent's sidecar in front of it — both enrolling by join token — pushes the reference policy,
//! makes the calls an agent would on its own, then has alice grant it less than its ceiling and
//! makes calls for her with the delegation token its sidecar fetches — one of them held until bob
//! approves it with `mandate approve` — shows what the sidecars decided and what the control
//! plane's audit log holds, revokes the agent, checks each outcome, and cleans everything up.

mod client;
mod delegation;
mod operator;
mod process;
mod sample_tool;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use client::{ClientError, Response};
use operator::{ControlPlane, OperatorError};
use process::{Process, ProcessError, STOP_TIMEOUT, SidecarSpec, Stopped};
use sample_tool::{MCP_PATH, SampleTool};

/// Host and port the agent uses to address the tool; only the agent's sidecar knows where it really is.
const TOOL_AUTHORITY: &str = "tool:8080";
/// The agent's name: its SPIFFE ID is `spiffe://mandate.local/agent/research`.
const AGENT: &str = "research";
/// The tool's name: its SPIFFE ID is `spiffe://mandate.local/service/tool`.
const TOOL: &str = "tool";
/// What the agent may ever do: the tool's `search`, and reads of its REST API.
const CEILING: &str =
    r#"[{"host": "tool", "tool": "search"}, {"host": "tool", "method": "GET", "path": "/v1/*"}]"#;
/// What the agent may do on its own, with no person's delegation: here, all of its ceiling.
const AUTONOMOUS: &str = CEILING;
/// How long each process gets to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long decision logs, the audit log and counters get to catch up with the responses received.
const SETTLE: Duration = Duration::from_secs(5);
/// How soon a revocation must reach the agent's sidecar.
const REVOCATION: Duration = Duration::from_secs(1);
/// Number of numbered steps in the transcript.
const STEPS: usize = 23;
/// How many of a process's last log lines are printed when something went wrong.
const LOG_TAIL: usize = 60;
/// The reference policy, as a directory under the repository's `policies/`.
const REFERENCE_POLICY: &str = "reference";

/// Arguments of `mandate demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The mandate-proxy binary [default: next to this `mandate` executable].
    #[arg(long, value_name = "PATH")]
    proxy_bin: Option<PathBuf>,
    /// The repository's policies/ directory; the demo pushes its reference/ policy
    /// [default: ../../policies from this executable, i.e. the checkout's when run from target/debug].
    #[arg(long, value_name = "DIR")]
    policies: Option<PathBuf>,
    /// Keep the demo directory (control plane data, decision logs, process logs) instead of removing it.
    #[arg(long)]
    keep: bool,
}

/// Why the demo could not run at all (as opposed to a check that did not pass).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The running executable's path is unknown, so mandate-proxy cannot be found next to it.
    #[error("cannot locate this executable to find {what} relative to it ({source}): pass {flag}")]
    CurrentExe {
        /// What was being looked for.
        what: &'static str,
        /// The flag that names it instead.
        flag: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The reference policy is not where it was looked for.
    #[error(
        "the reference policy is not at {}: {why}; pass --policies DIR naming the repository's policies/ directory",
        path.display()
    )]
    PolicyMissing {
        /// The directory that should hold it.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Creating the scratch directory failed.
    #[error("cannot create the demo directory: {0}")]
    TempDir(std::io::Error),
    /// Starting the tokio runtime failed.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Reserving local ports failed.
    #[error("cannot reserve local ports: {0}")]
    Ports(std::io::Error),
    /// Starting the sample tool failed.
    #[error("cannot start the sample tool: {0}")]
    Tool(std::io::Error),
    /// Starting or stopping a process failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// An operator command failed (its output is in the message).
    #[error(transparent)]
    Operator(#[from] OperatorError),
    /// A process did not become ready (its log is printed separately).
    #[error("the {name} {what} (its log is above)")]
    NotReady {
        /// Which process.
        name: &'static str,
        /// What happened instead.
        what: String,
    },
    /// The user pressed Ctrl-C.
    #[error("interrupted")]
    Interrupted,
}

/// Runs the demo; `Ok(FAILURE)` means it ran but some step did not behave as expected.
pub fn run(args: DemoArgs) -> Result<ExitCode, DemoError> {
    let current_exe = |what| {
        std::env::current_exe().map_err(|source| DemoError::CurrentExe {
            what,
            flag: "--proxy-bin",
            source,
        })
    };
    let mandate_bin = current_exe("mandate")?;
    let proxy_bin = match args.proxy_bin {
        Some(path) => path,
        None => {
            mandate_bin.with_file_name(format!("mandate-proxy{}", std::env::consts::EXE_SUFFIX))
        }
    };
    if !proxy_bin.is_file() {
        return Err(ProcessError::BinaryMissing(proxy_bin).into());
    }
    let policy = reference_policy(args.policies.as_deref())?;
    let dir = tempfile::Builder::new()
        .prefix("mandate-demo-")
        .tempdir()
        .map_err(DemoError::TempDir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DemoError::Runtime)?;

    println!(
        "Mandate demo: an agent calls a tool; each sits behind its own mandate-proxy sidecar,"
    );
    println!("and a control plane gives both their identities and the policy they enforce.");
    println!("The agent acts on its own first, then for alice, within what she grants it.");

    let mut transcript = Transcript::default();
    let mut processes = Vec::new();
    let bins = Bins {
        mandate: &mandate_bin,
        proxy: &proxy_bin,
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = steps(bins, &policy, dir.path(), &mut transcript, &mut processes) => outcome,
            _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
        }
    });
    // The sample tool and client tasks end with the runtime; the processes are stopped explicitly,
    // sidecars first so their last decisions can still reach the control plane.
    drop(runtime);

    transcript.last_step("Stopping the sidecars and the control plane (SIGTERM) and cleaning up");
    // Ctrl-C reaches the children too (same process group), so their having exited is expected then.
    let interrupted = matches!(outcome, Err(DemoError::Interrupted));
    for process in processes.iter_mut().rev() {
        let name = process.name();
        match process.stop() {
            Ok(Stopped::Terminated(status)) => transcript.check(
                status.success(),
                format!("{name} exited on SIGTERM ({status})"),
            ),
            Ok(Stopped::Killed(status)) => transcript.check(
                false,
                format!("{name} ignored SIGTERM for {STOP_TIMEOUT:?} and was killed ({status})"),
            ),
            // A process that dies on its own mid-demo is a failure even if later steps went well.
            Ok(Stopped::AlreadyExited(status)) if interrupted => {
                transcript.info(format!("{name} stopped on Ctrl-C ({status})"));
            }
            Ok(Stopped::AlreadyExited(status)) => transcript.check(
                false,
                format!("{name} had already exited by itself ({status})"),
            ),
            Err(e) => transcript.check(false, e.to_string()),
        };
    }
    if (outcome.is_err() && !interrupted) || !transcript.failures.is_empty() {
        for process in &processes {
            print_log(process);
        }
    }
    drop(processes);
    if args.keep {
        let kept = dir.keep();
        transcript.info(format!("kept {} (--keep)", kept.display()));
    } else {
        let path = dir.path().to_owned();
        match dir.close() {
            Ok(()) => transcript.info(format!("removed {}", path.display())),
            Err(e) => transcript.check(false, format!("cannot remove {}: {e}", path.display())),
        }
    }

    outcome?;
    println!();
    if transcript.failures.is_empty() {
        println!("Demo finished: all {} checks passed.", transcript.checks);
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "Demo finished: {} of {} checks FAILED:",
            transcript.failures.len(),
            transcript.checks
        );
        for failure in &transcript.failures {
            println!("  - {failure}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// The two binaries the demo runs.
#[derive(Clone, Copy)]
struct Bins<'a> {
    mandate: &'a Path,
    proxy: &'a Path,
}

/// The reference policy directory: `<policies>/reference`, where `policies` is `--policies` or the
/// checkout's `policies/` found from this executable (`<repo>/target/debug/mandate`).
fn reference_policy(policies: Option<&Path>) -> Result<PathBuf, DemoError> {
    let policies = match policies {
        Some(dir) => dir.to_owned(),
        None => {
            let exe = std::env::current_exe().map_err(|source| DemoError::CurrentExe {
                what: "the repository's policies/ directory",
                flag: "--policies",
                source,
            })?;
            policies_near(&exe)
        }
    };
    let path = policies.join(REFERENCE_POLICY);
    let missing = |why: String| DemoError::PolicyMissing {
        path: path.clone(),
        why,
    };
    let entries = std::fs::read_dir(&path).map_err(|e| missing(e.to_string()))?;
    let has_rego = entries
        .filter_map(Result::ok)
        .any(|e| e.path().extension().is_some_and(|x| x == "rego"));
    if !has_rego {
        return Err(missing("the directory holds no .rego file".to_owned()));
    }
    Ok(path)
}

/// `<repo>/policies` for an executable at `<repo>/target/<profile>/mandate`.
fn policies_near(exe: &Path) -> PathBuf {
    let repo = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    repo.join("policies")
}

/// A decision the demo saw the id of, to find again in the decision logs and the audit log.
struct Expected {
    /// The call, in words.
    what: &'static str,
    decision_id: String,
    allow: bool,
}

/// The identities and addresses every step needs, and the decisions seen so far.
struct World {
    agent_id: String,
    tool_id: String,
    agent_outbound: SocketAddr,
    agent_admin: SocketAddr,
    tool_admin: SocketAddr,
    agent_log: PathBuf,
    tool_log: PathBuf,
    expected: Vec<Expected>,
}

async fn steps(
    bins: Bins<'_>,
    policy: &Path,
    dir: &Path,
    t: &mut Transcript,
    processes: &mut Vec<Process>,
) -> Result<(), DemoError> {
    let logs = dir.join("logs");
    std::fs::create_dir(&logs).map_err(DemoError::TempDir)?;

    t.step("Starting the control plane: mandate serve (embedded SQLite, nothing to set up)");
    let [api, cp_metrics] = process::free_ports(2).map_err(DemoError::Ports)?[..] else {
        unreachable!("free_ports returns as many ports as asked for");
    };
    let cp = ControlPlane::new(bins.mandate, dir.join("control-plane"), api);
    let started = Instant::now();
    processes.push(cp.spawn(cp_metrics, &logs)?);
    wait_ready(processes.last_mut().expect("just pushed")).await?;
    t.info(format!(
        "mandate serve --data-dir {} --listen {api} --metrics {cp_metrics}",
        cp.data_dir().display()
    ));
    t.info(format!(
        "ready after {:.1}s: CA created, trust bundle at {}",
        started.elapsed().as_secs_f64(),
        file_name(&cp.ca_pem())
    ));

    t.step("Registering the agent and the tool (each gets a one-time join token)");
    let agent_token = register(
        t,
        &cp,
        &[
            "agent",
            "register",
            AGENT,
            "--owner",
            "alice@example.com",
            "--description",
            "Research assistant: searches and reads, never writes",
            "--ceiling",
            CEILING,
            "--autonomous",
            AUTONOMOUS,
        ],
    )
    .await?;
    let tool_token = register(
        t,
        &cp,
        &["service", "register", TOOL, "--owner", "tools@example.com"],
    )
    .await?;

    t.step("Starting the sample tool (an MCP server at /mcp; other paths echo what they received)");
    let tool = SampleTool::start().await.map_err(DemoError::Tool)?;
    t.info(format!(
        "sample tool on {} (plain HTTP, reachable only from its own host)",
        tool.addr()
    ));

    t.step("Starting two sidecars: each makes its own key and enrols with its join token");
    let [
        tool_in,
        tool_out,
        tool_admin,
        agent_in,
        agent_out,
        agent_admin,
    ] = process::free_ports(6).map_err(DemoError::Ports)?[..]
    else {
        unreachable!("free_ports returns as many ports as asked for");
    };
    let mut world = World {
        agent_id: format!("spiffe://mandate.local/agent/{AGENT}"),
        tool_id: format!("spiffe://mandate.local/service/{TOOL}"),
        agent_outbound: agent_out,
        agent_admin,
        tool_admin,
        agent_log: logs.join("decisions.agent.jsonl"),
        tool_log: logs.join("decisions.tool.jsonl"),
        expected: Vec::new(),
    };
    let tool_spec = SidecarSpec {
        control_plane: cp.url(),
        outbound: tool_out,
        inbound: tool_in,
        admin: tool_admin,
        app: Some(tool.addr()),
        routes: Vec::new(),
        decision_log: world.tool_log.clone(),
    };
    let route = format!("{TOOL_AUTHORITY}={tool_in},id={}", world.tool_id);
    let agent_spec = SidecarSpec {
        control_plane: cp.url(),
        outbound: agent_out,
        inbound: agent_in,
        admin: agent_admin,
        app: None,
        routes: vec![route.clone()],
        decision_log: world.agent_log.clone(),
    };
    t.info(format!(
        "tool sidecar:  mandate-proxy --control-plane {} --app {} --inbound {tool_in}",
        cp.url(),
        tool.addr()
    ));
    t.info(format!(
        "agent sidecar: mandate-proxy --control-plane {} --outbound {agent_out} --route {route}",
        cp.url()
    ));
    t.info(
        "both:          MANDATE_JOIN_TOKEN=<its token>, --decision-log logs/decisions.<name>.jsonl",
    );
    processes.push(Process::spawn(
        bins.proxy,
        "tool sidecar",
        tool_admin,
        tool_spec.args(),
        &[("MANDATE_JOIN_TOKEN", &tool_token)],
        &logs,
    )?);
    processes.push(Process::spawn(
        bins.proxy,
        "agent sidecar",
        agent_admin,
        agent_spec.args(),
        &[("MANDATE_JOIN_TOKEN", &agent_token)],
        &logs,
    )?);
    let enrolled = Instant::now();
    for sidecar in processes.iter_mut().skip(1) {
        wait_live(sidecar).await?;
    }
    let before_policy = client::get(agent_admin, "/readyz", &agent_admin.to_string(), &[]).await;
    t.check(
        matches!(&before_policy, Ok(r) if r.status == 503),
        "enrolled but not ready yet: no policy bundle has arrived, so every call would be denied",
    );

    t.step("Pushing the reference policy: compiled and tested by the control plane, then signed");
    let pushed = operator_ok(t, &cp, &["policy", "push", &policy.display().to_string()]).await?;
    for line in pushed.lines().filter(|l| !l.trim().is_empty()) {
        t.info(format!("   {line}"));
    }
    for sidecar in processes.iter_mut().skip(1) {
        wait_ready(sidecar).await?;
    }
    t.info(format!(
        "both sidecars enrolled, verified the bundle's signature and became ready after {:.1}s",
        enrolled.elapsed().as_secs_f64()
    ));

    mcp_search(t, &mut world, &tool).await;
    mcp_delete_repo(t, &mut world, &tool).await;
    rest_read(t, &mut world, &tool).await;
    rest_write(t, &mut world, &tool).await;
    unrouted_call(t, &world, &tool).await;

    let mut delegation = delegation::Delegation::default();
    delegation::grant(t, &cp, &mut delegation).await?;
    delegation::token(t, &world, &mut delegation).await;
    delegation::delegated_call(t, &mut world, &delegation, &tool).await;
    delegation::outside_grant(t, &mut world, &delegation, &tool).await;
    delegation::tampered(t, &mut world, &delegation, &tool).await;
    delegation::approval(t, &mut world, &delegation, &tool, &cp).await;
    delegation::audit_approver(t, &world, &delegation, &cp).await;

    decision_logs(t, &world).await;
    audit_log(t, &world, &cp).await;
    metrics(t, &world).await;
    revoke(t, &world, &cp).await;
    Ok(())
}

/// Runs a `register` command, prints what it said (the token shortened) and returns the token.
async fn register(
    t: &mut Transcript,
    cp: &ControlPlane,
    args: &[&str],
) -> Result<String, DemoError> {
    let out = operator_ok(t, cp, args).await?;
    let token = operator::join_token_in(&out)?;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        t.info(format!("   {}", line.replace(&token, &shorten(&token))));
    }
    Ok(token)
}

/// Prints and runs `mandate ARGS…` against the demo's control plane; a failure stops the demo.
async fn operator_ok(
    t: &mut Transcript,
    cp: &ControlPlane,
    args: &[&str],
) -> Result<String, DemoError> {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(' ') || a.contains('"') {
                format!("'{a}'")
            } else {
                (*a).to_owned()
            }
        })
        .collect();
    t.info(format!("$ mandate {}", shown.join(" ")));
    Ok(cp.run(args).await?)
}

/// The first and last characters of a secret, enough to recognise it.
fn shorten(secret: &str) -> String {
    let head: String = secret.chars().take(12).collect();
    format!("{head}…(one-time secret)")
}

/// Polls `/readyz` until 200, the process exits, or the timeout passes.
async fn wait_ready(process: &mut Process) -> Result<(), DemoError> {
    wait_for(process, "/readyz", "ready").await
}

/// Polls `/healthz` until 200 (listeners bound, enrolment done), the process exits, or the timeout passes.
async fn wait_live(process: &mut Process) -> Result<(), DemoError> {
    wait_for(process, "/healthz", "live").await
}

async fn wait_for(process: &mut Process, path: &str, state: &str) -> Result<(), DemoError> {
    let name = process.name();
    let admin = process.admin();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = process.exited() {
            return Err(DemoError::NotReady {
                name,
                what: format!("exited ({status}) before becoming {state}"),
            });
        }
        let last = match client::get(admin, path, &admin.to_string(), &[]).await {
            Ok(r) if r.status.is_success() => return Ok(()),
            Ok(r) => format!("{path} answered {}: {}", r.status, r.text().trim()),
            Err(e) => e.to_string(),
        };
        // A policy that failed to compile will not fix itself while the demo waits.
        let metrics = scrape(admin).await.unwrap_or_default();
        if metric_value(&metrics, "mandate_policy_load_errors_total", &[]).is_some_and(|n| n > 0.0)
        {
            return Err(DemoError::NotReady {
                name,
                what: format!("could not load the policy (last: {last})"),
            });
        }
        if Instant::now() >= deadline {
            return Err(DemoError::NotReady {
                name,
                what: format!("was not {state} within {READY_TIMEOUT:?} (last: {last})"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A JSON-RPC `tools/call` request.
fn tools_call(id: u64, tool: &str, arguments: Value) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    })
}

/// (a) An MCP tool call inside the agent's ceiling: both sidecars allow it and the tool answers.
async fn mcp_search(t: &mut Transcript, w: &mut World, tool: &SampleTool) {
    let target = format!("http://{TOOL_AUTHORITY}{MCP_PATH}");
    let request = tools_call(1, "search", json!({"query": "agent identity"}));
    t.step("The agent calls the MCP tool `search`: inside its ceiling, so allowed");
    t.info(format!("POST {target}  {request}"));
    let before = tool.requests();
    let sent = client::post_json(w.agent_outbound, &target, TOOL_AUTHORITY, &request);
    let Some(response) = call(t, &target, sent).await else {
        return;
    };
    t.info(format!("   {}", response.text().trim()));
    t.check(
        response.status == 200,
        format!("status {} (expected 200)", response.status),
    );
    let body = response.json().unwrap_or(Value::Null);
    let text = body["result"]["content"][0]["text"].as_str().unwrap_or("");
    t.check(
        body["id"] == 1 && text.starts_with("results for"),
        "a JSON-RPC result for id 1 from the tool's `search`",
    );
    expect_decision_header(t, w, &response, "tools/call search", true);
    let received = tool.received();
    let reached = received.get(before);
    if let Some(r) = reached {
        let (method, name) = r.rpc.clone().unwrap_or_default();
        t.info(format!(
            "the tool saw: {} {} {method} {}",
            r.method,
            r.path,
            name.unwrap_or_default()
        ));
        for (header, value) in &r.identity_headers {
            t.info(format!(
                "              {header}: {}",
                value.as_str().unwrap_or("?")
            ));
        }
    }
    t.check(
        reached.is_some_and(|r| {
            r.rpc == Some(("tools/call".to_owned(), Some("search".to_owned())))
                && r.identity_headers
                    .get("x-mandate-peer")
                    .and_then(Value::as_str)
                    == Some(w.agent_id.as_str())
        }),
        format!(
            "the tool received tools/call search, told by its sidecar that the caller is {}",
            w.agent_id
        ),
    );
}

/// (b) An MCP tool call outside the ceiling: the agent's own sidecar answers with a JSON-RPC error
/// the model can read, and nothing leaves the agent's host.
async fn mcp_delete_repo(t: &mut Transcript, w: &mut World, tool: &SampleTool) {
    let target = format!("http://{TOOL_AUTHORITY}{MCP_PATH}");
    let request = tools_call(2, "delete_repo", json!({"repo": "mandate"}));
    t.step("The agent calls the MCP tool `delete_repo`: outside its ceiling, so denied");
    t.info(format!("POST {target}  {request}"));
    let before = tool.requests();
    let sent = client::post_json(w.agent_outbound, &target, TOOL_AUTHORITY, &request);
    let Some(response) = call(t, &target, sent).await else {
        return;
    };
    t.info(format!("   {}", response.text().trim()));
    t.check(
        response.status == 200,
        format!(
            "status {} (expected 200: a JSON-RPC error travels as a normal response, so the MCP client hands it to the model)",
            response.status
        ),
    );
    let body = response.json().unwrap_or(Value::Null);
    let error = &body["error"];
    t.check(
        body["id"] == 2 && error["code"] == -32001,
        "a JSON-RPC error (code -32001) carrying the request's id 2",
    );
    let reason = error["data"]["reason"].as_str().unwrap_or("");
    t.check(
        reason.contains("\"delete_repo\"") && reason.contains("outside its ceiling"),
        format!("the policy's reason: {reason}"),
    );
    match error["data"]["decision_id"].as_str() {
        Some(id) => w.expected.push(Expected {
            what: "tools/call delete_repo",
            decision_id: id.to_owned(),
            allow: false,
        }),
        None => t.check(false, "the JSON-RPC error names its decision_id"),
    }
    t.check(
        tool.requests() == before,
        "the tool never saw it: the agent's sidecar refused it before it left the host",
    );
}

/// (c) A REST read inside the ceiling, sent with forged identity headers: the tool sees only the
/// identity the sidecars proved.
async fn rest_read(t: &mut Transcript, w: &mut World, tool: &SampleTool) {
    let target = format!("http://{TOOL_AUTHORITY}/v1/items?q=mandate");
    let spoof = "spiffe://mandate.local/agent/admin".to_owned();
    let spoof_xfcc = format!("By={};URI={spoof}", w.tool_id);
    t.step("The agent reads the tool's REST API (GET /v1/*: allowed), forging identity headers");
    t.info(format!("GET {target}"));
    t.info(format!("    x-mandate-peer: {spoof}"));
    t.info(format!("    x-forwarded-client-cert: {spoof_xfcc}"));
    let headers = [
        ("x-mandate-peer", spoof.as_str()),
        ("x-forwarded-client-cert", spoof_xfcc.as_str()),
    ];
    let before = tool.requests();
    let sent = client::get(w.agent_outbound, &target, TOOL_AUTHORITY, &headers);
    let Some(response) = call(t, &target, sent).await else {
        return;
    };
    t.check(
        response.status == 200,
        format!("status {} (expected 200)", response.status),
    );
    expect_decision_header(t, w, &response, "GET /v1/items", true);
    let Some(seen) = tool_saw(t, &response) else {
        return;
    };
    t.check(
        seen["method"] == "GET" && seen["path"] == "/v1/items?q=mandate",
        "the tool received the request with its path and query",
    );
    t.check(
        seen["headers"]["x-mandate-peer"] == w.agent_id.as_str(),
        format!(
            "the forged x-mandate-peer was dropped: the tool sees {} (from the certificate)",
            w.agent_id
        ),
    );
    let xfcc = seen["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or("");
    let hash = xfcc
        .strip_prefix(&format!("By={};Hash=", w.tool_id))
        .and_then(|rest| rest.strip_suffix(&format!(";URI={}", w.agent_id)));
    t.check(
        hash.is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())),
        "the forged x-forwarded-client-cert was replaced: By the tool, Hash of the agent's certificate, URI the agent",
    );
    t.check(
        tool.requests() == before + 1,
        "the tool received exactly one request",
    );
}

/// (d) A REST write outside the ceiling: a 403 with the reason and the decision id.
async fn rest_write(t: &mut Transcript, w: &mut World, tool: &SampleTool) {
    let target = format!("http://{TOOL_AUTHORITY}/v1/items");
    let item = json!({"name": "new item"});
    t.step("The agent writes to the REST API (POST /v1/items): outside its ceiling, so denied");
    t.info(format!("POST {target}  {item}"));
    let before = tool.requests();
    let sent = client::post_json(w.agent_outbound, &target, TOOL_AUTHORITY, &item);
    let Some(response) = call(t, &target, sent).await else {
        return;
    };
    t.info(format!("   {}", response.text().trim()));
    t.check(
        response.status == 403,
        format!("status {} (expected 403)", response.status),
    );
    check_json_content_type(t, &response);
    let body = response.json().unwrap_or(Value::Null);
    let reason = body["reason"].as_str().unwrap_or("");
    t.check(
        body["error"] == "denied" && reason.contains("outside its ceiling"),
        format!("the refusal says denied, because: {reason}"),
    );
    let header = response.header("x-mandate-decision-id");
    t.check(
        header.is_some() && header == body["decision_id"].as_str(),
        "the body's decision_id is the x-mandate-decision-id header",
    );
    if let Some(id) = header {
        w.expected.push(Expected {
            what: "POST /v1/items",
            decision_id: id.to_owned(),
            allow: false,
        });
    }
    t.check(tool.requests() == before, "the tool never saw it");
}

/// (e) A destination with no route is refused by the agent's own sidecar: nothing leaves the host.
async fn unrouted_call(t: &mut Transcript, w: &World, tool: &SampleTool) {
    let target = "http://example.com/";
    t.step(format!(
        "The agent calls a host it has no route to: GET {target}"
    ));
    let before = tool.requests();
    let sent = client::get(w.agent_outbound, target, "example.com", &[]);
    let Some(response) = call(t, target, sent).await else {
        return;
    };
    t.info(format!("   {}", response.text().trim()));
    t.check(
        response.status == 403,
        format!("status {} (expected 403)", response.status),
    );
    check_json_content_type(t, &response);
    let body = response.json().unwrap_or(Value::Null);
    t.check(
        body["error"] == "denied" && body["destination"] == "example.com:80",
        "the refusal says denied and names the destination example.com:80",
    );
    t.info(
        "routing refuses it before any policy runs; it is still recorded as a (denied) decision",
    );
    t.check(
        body["decision_id"]
            .as_str()
            .is_some_and(|id| response.header("x-mandate-decision-id") == Some(id)),
        "the refusal carries a decision id, in the body and the x-mandate-decision-id header",
    );
    t.check(
        tool.requests() == before,
        "no request reached the tool or left the agent's host",
    );
}

/// Prints both sidecars' decision logs and checks they hold exactly the decisions the calls got.
async fn decision_logs(t: &mut Transcript, w: &World) {
    t.step("What the sidecars decided (their --decision-log files, one JSON line per decision)");
    // Decisions are written by a background thread within milliseconds; wait for them to appear.
    // Four calls the agent made on its own decided by policy, the unrouted call refused by routing,
    // and six made for alice (one refused before policy, for its tampered token).
    let want_agent = 11;
    // The agent's sidecar let four through: search, the REST read, and two calls for alice.
    let want_tool = 4;
    let deadline = Instant::now() + SETTLE;
    let (agent, tool) = loop {
        let agent = read_decisions(&w.agent_log);
        let tool = read_decisions(&w.tool_log);
        let settled = matches!((&agent, &tool), (Ok(a), Ok(t)) if a.len() >= want_agent && t.len() >= want_tool);
        if settled || Instant::now() >= deadline {
            break (agent, tool);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let width = [&agent, &tool]
        .into_iter()
        .filter_map(|log| log.as_ref().ok())
        .flatten()
        .map(|d| d["reason"].as_str().unwrap_or("").chars().count())
        .max()
        .unwrap_or(0)
        .min(REASON_WIDTH);
    for (name, log, path) in [
        ("agent", &agent, &w.agent_log),
        ("tool", &tool, &w.tool_log),
    ] {
        match log {
            Ok(records) => {
                t.info(format!("{name} sidecar ({}):", file_name(path)));
                for d in records {
                    t.info(format!("  {}", decision_line(d, width)));
                }
            }
            Err(e) => t.check(
                false,
                format!("cannot read the {name} sidecar's decisions: {e}"),
            ),
        }
    }

    if let Ok(agent) = &agent {
        t.check(
            agent.len() == want_agent,
            format!(
                "the agent's sidecar recorded {want_agent} decisions (found {})",
                agent.len()
            ),
        );
        for e in &w.expected {
            let found = agent
                .iter()
                .find(|d| d["decision_id"] == e.decision_id.as_str());
            let verdict = if e.allow { "allow" } else { "deny" };
            t.check(
                found.is_some_and(|d| d["direction"] == "outbound" && d["allow"] == e.allow),
                format!(
                    "{}: outbound {verdict} recorded under the decision id the agent was given",
                    e.what
                ),
            );
        }
    }
    if let Ok(tool) = &tool {
        t.check(
            tool.len() == want_tool
                && tool
                    .iter()
                    .all(|d| d["direction"] == "inbound" && d["allow"] == true),
            format!(
                "the tool's sidecar recorded {want_tool} inbound allows (found {}): it was asked only what the agent's sidecar let through",
                tool.len()
            ),
        );
        t.check(
            tool.iter()
                .any(|d| d["mcp"]["name"] == "search" && d["source"] == w.agent_id.as_str()),
            format!(
                "the tool's sidecar decided tools/call search for {} itself",
                w.agent_id
            ),
        );
        let for_alice = tool
            .iter()
            .filter(|d| d["delegation"]["subject"] == delegation::ALICE)
            .count();
        t.check(
            for_alice == 2,
            format!(
                "it recorded alice's two calls as made on behalf of {} (found {for_alice})",
                delegation::ALICE
            ),
        );
    }
}

/// `mandate audit query <filter> --json`, asked again until `complete` holds of the records (or
/// [`SETTLE`] has passed: sidecars send their decisions in batches); then shows the table
/// `mandate audit query <filter>` prints, and returns the records, or `None` after a failed check
/// when they could not be read.
async fn audit_records(
    t: &mut Transcript,
    cp: &ControlPlane,
    filter: &[&str],
    complete: impl Fn(&[Value]) -> bool,
) -> Option<Vec<Value>> {
    let query: Vec<&str> = ["audit", "query"].iter().chain(filter).copied().collect();
    let as_json: Vec<&str> = query.iter().copied().chain(["--json"]).collect();
    let deadline = Instant::now() + SETTLE;
    let records = loop {
        let records = cp
            .run(&as_json)
            .await
            .map_err(|e| e.to_string())
            .and_then(|out| {
                out.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| serde_json::from_str::<Value>(l).map_err(|e| format!("{e}: {l}")))
                    .collect::<Result<Vec<_>, _>>()
            });
        if records.as_ref().is_ok_and(|r| complete(r)) || Instant::now() >= deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    match operator_ok(t, cp, &query).await {
        Ok(table) => {
            for line in table.lines().filter(|l| !l.trim().is_empty()) {
                t.info(format!("   {line}"));
            }
        }
        Err(e) => t.check(false, e.to_string()),
    }
    match records {
        Ok(records) => Some(records),
        Err(e) => {
            t.check(false, format!("mandate audit query --json: {e}"));
            None
        }
    }
}

/// Shows the control plane's audit log for the agent and checks it holds every decision the calls got.
async fn audit_log(t: &mut Transcript, w: &World, cp: &ControlPlane) {
    t.step("What the control plane recorded: the sidecars sent their decisions in batches");
    // Sidecars send every 200 ms or so; wait until all the expected decisions have arrived.
    let Some(records) = audit_records(t, cp, &["--agent", AGENT], |r| {
        w.expected
            .iter()
            .all(|e| r.iter().any(|d| d["decision_id"] == e.decision_id.as_str()))
    })
    .await
    else {
        return;
    };
    for e in &w.expected {
        let verdict = if e.allow { "allow" } else { "deny" };
        t.check(
            records
                .iter()
                .any(|d| d["decision_id"] == e.decision_id.as_str() && d["allow"] == e.allow),
            format!(
                "{}: {verdict} is in the audit log under its decision id",
                e.what
            ),
        );
    }
    t.check(
        records.iter().any(|d| d["direction"] == "inbound"),
        "the tool sidecar's inbound decisions about the agent are there too",
    );
}

/// Revokes the agent and checks its very next calls are refused, within a second.
async fn revoke(t: &mut Transcript, w: &World, cp: &ControlPlane) {
    t.step("Revoking the agent: every sidecar hears of it within a second");
    if let Err(e) = operator_ok(t, cp, &["agent", "revoke", AGENT]).await {
        t.check(false, e.to_string());
        return;
    }
    let revoked = Instant::now();
    let target = format!("http://{TOOL_AUTHORITY}/v1/items");
    let mut last = String::new();
    let refused = loop {
        match client::get(w.agent_outbound, &target, TOOL_AUTHORITY, &[]).await {
            Ok(r) if r.status == 403 => break Some((revoked.elapsed(), r)),
            Ok(r) => last = format!("{} {}", r.status, r.text().trim()),
            Err(e) => last = e.to_string(),
        }
        if revoked.elapsed() > SETTLE {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Some((took, response)) = refused else {
        t.check(
            false,
            format!(
                "GET {target} still not refused {SETTLE:?} after the revocation (last: {last})"
            ),
        );
        return;
    };
    t.info(format!("GET {target}  ->  {}", response.text().trim()));
    let reason = response
        .json()
        .and_then(|b| b["reason"].as_str().map(str::to_owned))
        .unwrap_or_default();
    t.check(
        reason.contains("revoked"),
        format!("refused because the agent is revoked: {reason}"),
    );
    t.check(
        took <= REVOCATION,
        format!("the agent's sidecar refused it {:.0} ms after `mandate agent revoke` returned (target ≤ 1 s)", took.as_secs_f64() * 1000.0),
    );
}

/// Reads a JSON-lines decision log; a missing file is an empty log.
fn read_decisions(path: &Path) -> Result<Vec<Value>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}: {l}", path.display())))
        .collect()
}

/// The widest reason a decision line shows in full; longer ones are cut short with "…".
const REASON_WIDTH: usize = 100;

/// One decision record on one line: direction, verdict, reason (at most [`REASON_WIDTH`]
/// characters), decision id.
fn decision_line(d: &Value, reason_width: usize) -> String {
    let verdict = match d["allow"].as_bool() {
        Some(true) => "allow",
        Some(false) => "deny",
        None => "?",
    };
    let dry_run = if d["enforced"] == false {
        " (dry run)"
    } else {
        ""
    };
    let reason = d["reason"].as_str().unwrap_or("?");
    let reason = if reason.chars().count() > REASON_WIDTH {
        let cut: String = reason.chars().take(REASON_WIDTH - 1).collect();
        format!("{cut}…")
    } else {
        reason.to_owned()
    };
    format!(
        "{:<8} {verdict:<5} {reason:<reason_width$}  {}{dry_run}",
        d["direction"].as_str().unwrap_or("?"),
        d["decision_id"].as_str().unwrap_or("?"),
    )
}

/// Shows the decision and request counters both sidecars exported, and checks they match the calls made.
async fn metrics(t: &mut Transcript, w: &World) {
    t.step("What the sidecars counted (GET /metrics on their admin ports)");
    type Counter = (
        &'static str,
        &'static str,
        [(&'static str, &'static str); 3],
        f64,
    );
    let expected: [Counter; 6] = [
        (
            "agent",
            "mandate_decisions_total",
            [
                ("direction", "outbound"),
                ("result", "allow"),
                ("enforced", "true"),
            ],
            4.0,
        ),
        (
            "agent",
            "mandate_decisions_total",
            [
                ("direction", "outbound"),
                ("result", "deny"),
                ("enforced", "true"),
            ],
            7.0,
        ),
        (
            "tool",
            "mandate_decisions_total",
            [
                ("direction", "inbound"),
                ("result", "allow"),
                ("enforced", "true"),
            ],
            4.0,
        ),
        // Allowed: search, the REST read, alice's report and her approved payroll call; denied:
        // delete_repo, the write, the unrouted call, outside alice's grant, the tampered token,
        // the payroll call held for approval and its approval used twice. The JSON-RPC error for
        // delete_repo is an HTTP 200; every other refusal is a 403.
        (
            "agent",
            "mandate_requests_total",
            [("direction", "outbound"), ("status", "200"), ("", "")],
            5.0,
        ),
        (
            "agent",
            "mandate_requests_total",
            [("direction", "outbound"), ("status", "403"), ("", "")],
            6.0,
        ),
        (
            "tool",
            "mandate_requests_total",
            [("direction", "inbound"), ("status", "200"), ("", "")],
            4.0,
        ),
    ];
    // Counters may be updated just after the response is sent; give them a moment to catch up.
    let deadline = Instant::now() + SETTLE;
    let (agent, tool) = loop {
        let agent = scrape(w.agent_admin).await;
        let tool = scrape(w.tool_admin).await;
        let settled = expected.iter().all(|(name, metric, labels, want)| {
            let text = if *name == "agent" { &agent } else { &tool };
            metric_value(text.as_deref().unwrap_or(""), metric, labels) == Some(*want)
        });
        if settled || Instant::now() >= deadline {
            break (agent, tool);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (name, text) in [("agent", &agent), ("tool", &tool)] {
        match text {
            Ok(text) => {
                for line in text.lines().filter(|l| {
                    l.starts_with("mandate_decisions_total{")
                        || l.starts_with("mandate_requests_total{")
                }) {
                    t.info(format!("{name:<5} {line}"));
                }
            }
            Err(e) => {
                t.check(
                    false,
                    format!("cannot read the {name} sidecar's metrics: {e}"),
                );
            }
        }
    }
    for (name, metric, labels, want) in expected {
        let text = if name == "agent" { &agent } else { &tool };
        if let Ok(text) = text {
            let got = metric_value(text, metric, &labels);
            let shown: Vec<_> = labels
                .iter()
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            t.check(
                got == Some(want),
                format!(
                    "{name} sidecar: {metric}{{{}}} is {want} (found {})",
                    shown.join(","),
                    got.map_or("none".to_owned(), |g| g.to_string())
                ),
            );
        }
    }
}

async fn scrape(admin: SocketAddr) -> Result<String, String> {
    match client::get(admin, "/metrics", &admin.to_string(), &[]).await {
        Ok(r) if r.status == 200 => Ok(r.text()),
        Ok(r) => Err(format!("/metrics answered {}", r.status)),
        Err(e) => Err(e.to_string()),
    }
}

/// The value of the series of `name` that carries every one of `labels` (in any order; empty keys
/// are ignored) in Prometheus text.
fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (series, value) = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once('}')?,
            // An unlabelled series: the name, a space, the value.
            None if rest.starts_with(' ') => ("", rest),
            None => return None,
        };
        let present: Vec<(&str, &str)> = series
            .split(',')
            .filter_map(|l| {
                let (k, v) = l.trim().split_once('=')?;
                Some((k.trim(), v.trim().trim_matches('"')))
            })
            .collect();
        labels
            .iter()
            .filter(|(k, _)| !k.is_empty())
            .all(|label| present.contains(label))
            .then(|| value.split_whitespace().next()?.parse().ok())
            .flatten()
    })
}

/// Awaits one call, printing the status and decision id; a transport failure is a failed check.
async fn call(
    t: &mut Transcript,
    target: &str,
    sent: impl Future<Output = Result<Response, ClientError>>,
) -> Option<Response> {
    match sent.await {
        Ok(response) => {
            let decision = response
                .header("x-mandate-decision-id")
                .map(|id| format!("   x-mandate-decision-id: {id}"))
                .unwrap_or_default();
            t.info(format!(
                "-> {} {}{decision}",
                response.status.as_str(),
                response.status.canonical_reason().unwrap_or("")
            ));
            Some(response)
        }
        Err(e) => {
            t.check(false, format!("{target}: {e}"));
            None
        }
    }
}

/// Checks an allowed response carries `x-mandate-decision-id`, and remembers it for the log check.
fn expect_decision_header(
    t: &mut Transcript,
    w: &mut World,
    response: &Response,
    what: &'static str,
    allow: bool,
) {
    let id = response.header("x-mandate-decision-id");
    t.check(
        id.is_some_and(|id| id.len() == 36),
        "the response carries the agent sidecar's x-mandate-decision-id",
    );
    if let Some(id) = id {
        w.expected.push(Expected {
            what,
            decision_id: id.to_owned(),
            allow,
        });
    }
}

fn check_json_content_type(t: &mut Transcript, response: &Response) {
    let content_type = response.header("content-type");
    t.check(
        content_type.is_some_and(|c| c.starts_with("application/json")),
        format!(
            "content-type {:?} (expected application/json)",
            content_type.unwrap_or("none")
        ),
    );
}

/// Prints what the sample tool reported seeing; `None` (a failed check) if the body is not its JSON.
fn tool_saw(t: &mut Transcript, response: &Response) -> Option<Value> {
    let seen = response.json().filter(|v| v["tool"] == "sample-tool");
    let Some(seen) = seen else {
        t.check(
            false,
            format!(
                "the answer is not from the sample tool: {}",
                response.text().trim()
            ),
        );
        return None;
    };
    t.info(format!(
        "the tool saw: {} {}",
        seen["method"].as_str().unwrap_or("?"),
        seen["path"].as_str().unwrap_or("?")
    ));
    if let Some(headers) = seen["headers"].as_object() {
        for (name, value) in headers {
            t.info(format!(
                "              {name}: {}",
                value.as_str().unwrap_or("?")
            ));
        }
    }
    Some(seen)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Prints the end of a process's log.
fn print_log(process: &Process) {
    let name = process.name();
    let log = process.log();
    let lines: Vec<&str> = log.lines().collect();
    let shown = &lines[lines.len().saturating_sub(LOG_TAIL)..];
    println!("\n--- {name} log ---");
    if shown.len() < lines.len() {
        println!(
            "(the first {} lines are left out; run `mandate demo --keep` to keep the whole log)",
            lines.len() - shown.len()
        );
    }
    for line in shown {
        println!("{line}");
    }
    println!("--- end of {name} log ---");
}

/// The printed transcript, and the record of which checks failed.
#[derive(Default)]
struct Transcript {
    step: usize,
    checks: usize,
    failures: Vec<String>,
}

impl Transcript {
    fn step(&mut self, text: impl AsRef<str>) {
        self.step += 1;
        println!("\n[{}/{STEPS}] {}", self.step, text.as_ref());
    }

    /// The clean-up step keeps the last number even when the demo stopped early.
    fn last_step(&mut self, text: impl AsRef<str>) {
        self.step = STEPS - 1;
        self.step(text);
    }

    fn info(&self, text: impl AsRef<str>) {
        println!("      {}", text.as_ref());
    }

    fn check(&mut self, ok: bool, text: impl Into<String>) {
        let text = text.into();
        self.checks += 1;
        println!("      {} {text}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.failures.push(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_value_matches_labels_in_any_order() {
        let text = "# TYPE mandate_requests_total counter\n\
            mandate_requests_total{direction=\"outbound\",status=\"200\"} 2\n\
            mandate_requests_total{status=\"403\",direction=\"outbound\"} 1\n\
            mandate_requests_total{direction=\"inbound\",status=\"200\"} 5\n\
            mandate_decisions_total{direction=\"outbound\",enforced=\"true\",result=\"deny\"} 7\n";
        let requests = |d, s| {
            metric_value(
                text,
                "mandate_requests_total",
                &[("direction", d), ("status", s)],
            )
        };
        assert_eq!(requests("outbound", "200"), Some(2.0));
        assert_eq!(requests("outbound", "403"), Some(1.0));
        assert_eq!(requests("inbound", "200"), Some(5.0));
        assert_eq!(requests("inbound", "403"), None);
        assert_eq!(
            metric_value(
                text,
                "mandate_decisions_total",
                &[("result", "deny"), ("direction", "outbound"), ("", "")]
            ),
            Some(7.0)
        );
        assert_eq!(
            metric_value(text, "mandate_decisions_total", &[("result", "allow")]),
            None
        );
        let text = "mandate_policy_load_errors_total 3\nmandate_policy_load_errors_totals 9\n";
        assert_eq!(
            metric_value(text, "mandate_policy_load_errors_total", &[]),
            Some(3.0)
        );
        assert_eq!(
            metric_value("", "mandate_policy_load_errors_total", &[]),
            None
        );
    }

    #[tokio::test]
    async fn sample_tool_describes_identity_headers_and_counts_requests() {
        let tool = SampleTool::start().await.unwrap();
        let response = client::get(
            tool.addr(),
            "/x?y=1",
            "tool",
            &[
                ("x-mandate-peer", "spiffe://mandate.local/agent/a"),
                ("x-mandate-peer", "spiffe://mandate.local/agent/b"),
                ("authorization", "secret"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(response.status, 200);
        let seen = response.json().unwrap();
        assert_eq!(seen["path"], "/x?y=1");
        assert_eq!(
            seen["headers"]["x-mandate-peer"],
            "spiffe://mandate.local/agent/a, spiffe://mandate.local/agent/b"
        );
        assert!(seen["headers"].get("authorization").is_none());
        assert_eq!(tool.requests(), 1);
    }

    #[tokio::test]
    async fn sample_tool_answers_mcp_tool_calls_and_remembers_them() {
        let tool = SampleTool::start().await.unwrap();
        let call = tools_call(7, "search", json!({"query": "q"}));
        let response = client::post_json(tool.addr(), MCP_PATH, "tool", &call)
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("application/json"));
        let body = response.json().unwrap();
        assert_eq!(body["jsonrpc"], "2.0");
        assert_eq!(body["id"], 7);
        assert_eq!(body["result"]["content"][0]["type"], "text");
        assert!(
            body["result"]["content"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("results for \"q\"")
        );

        let unknown = tools_call(8, "delete_repo", json!({}));
        let body = client::post_json(tool.addr(), MCP_PATH, "tool", &unknown)
            .await
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(body["id"], 8);
        assert_eq!(body["error"]["code"], -32602);

        let notification = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let response = client::post_json(tool.addr(), MCP_PATH, "tool", &notification)
            .await
            .unwrap();
        assert_eq!(response.status, 202);

        let received = tool.received();
        assert_eq!(received.len(), 3);
        assert_eq!(
            received[0].rpc,
            Some(("tools/call".to_owned(), Some("search".to_owned())))
        );
        assert_eq!(received[0].method, "POST");
        assert_eq!(received[0].path, MCP_PATH);
        assert_eq!(
            received[2].rpc,
            Some(("notifications/initialized".to_owned(), None))
        );
    }

    #[test]
    fn research_is_registered_with_the_documented_ceiling() {
        let ceiling: Value = serde_json::from_str(CEILING).unwrap();
        assert_eq!(
            ceiling,
            json!([
                {"host": "tool", "tool": "search"},
                {"host": "tool", "method": "GET", "path": "/v1/*"},
            ])
        );
    }

    #[test]
    fn join_tokens_are_found_in_what_register_printed_and_shown_shortened() {
        let printed = "registered agent research\n  Join token (secret):\n    mjt1.aaa.bbb.ccc\n";
        let token = operator::join_token_in(printed).unwrap();
        assert_eq!(token, "mjt1.aaa.bbb.ccc");
        assert!(operator::join_token_in("no token here").is_err());
        let shown = shorten("mjt1.c3BpZmZlOi8vbWFuZGF0ZS5sb2NhbC9hZ2VudC9yZXNlYXJjaA.secret");
        assert!(
            shown.starts_with("mjt1.c3BpZmZ") && !shown.contains("secret."),
            "{shown}"
        );
    }

    #[test]
    fn policies_are_found_two_levels_above_the_executable() {
        assert_eq!(
            policies_near(Path::new("/repo/target/debug/mandate")),
            Path::new("/repo/policies")
        );
        // From the test executable (target/debug/deps/…) the checkout's policies are one level up.
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let policy = reference_policy(Some(&repo.join("policies"))).unwrap();
        assert_eq!(policy, repo.join("policies/reference"));
    }

    #[test]
    fn a_missing_policy_directory_says_how_to_point_at_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = reference_policy(Some(dir.path())).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--policies DIR"), "{text}");
        assert!(text.contains("reference"), "{text}");

        std::fs::create_dir(dir.path().join("reference")).unwrap();
        let err = reference_policy(Some(dir.path())).unwrap_err();
        assert!(err.to_string().contains("no .rego file"), "{err}");
    }

    #[test]
    fn decision_lines_show_direction_verdict_reason_and_id() {
        let d = json!({"direction": "outbound", "allow": false, "enforced": true,
            "reason": "no", "decision_id": "0190"});
        assert_eq!(decision_line(&d, 4), "outbound deny  no    0190");
        let d = json!({"direction": "inbound", "allow": true, "enforced": false,
            "reason": "yes", "decision_id": "0191"});
        assert_eq!(decision_line(&d, 3), "inbound  allow yes  0191 (dry run)");
        let long = "x".repeat(REASON_WIDTH + 20);
        let d = json!({"direction": "outbound", "allow": false, "enforced": true,
            "reason": long, "decision_id": "0192"});
        let line = decision_line(&d, REASON_WIDTH);
        assert!(line.ends_with("x…  0192"), "{line}");
        assert_eq!(
            line.chars().count(),
            "outbound deny  ".len() + REASON_WIDTH + "  0192".len()
        );
    }

    #[test]
    fn missing_proxy_binary_says_how_to_build_it() {
        let err = run(DemoArgs {
            proxy_bin: Some(PathBuf::from("/nonexistent/mandate-proxy")),
            policies: None,
            keep: false,
        })
        .unwrap_err();
        assert!(err.to_string().contains("cargo build"), "{err}");
    }
}
