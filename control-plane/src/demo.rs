//! `mandate demo`: a self-contained tour. It creates a CA and two identities, writes a registry for
//! the reference policy, starts a sample tool (an MCP server with a small REST API) behind one
//! `mandate-proxy` sidecar and an agent's sidecar in front of it, both enforcing the policy, makes
//! the calls an agent would, prints what happened and what the sidecars decided, checks each
//! outcome, and cleans everything up.

mod client;
mod sample_tool;
mod sidecar;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mandate_identity::{SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

use crate::ca_cli::{self, CaCliError};
use client::{ClientError, Response};
use sample_tool::{MCP_PATH, SampleTool};
use sidecar::{STOP_TIMEOUT, Sidecar, SidecarError, SidecarSpec, Stopped};

/// Host and port the agent uses to address the tool; only the agent's sidecar knows where it really is.
const TOOL_AUTHORITY: &str = "tool:8080";
/// The agent's name: its SPIFFE ID is `spiffe://mandate.local/agent/research`.
const AGENT: &str = "research";
/// How long each sidecar gets to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the decision logs and counters get to catch up with the responses already received.
const SETTLE: Duration = Duration::from_secs(3);
/// Number of numbered steps in the transcript.
const STEPS: usize = 12;
/// How many of a sidecar's last log lines are printed when something went wrong.
const LOG_TAIL: usize = 60;
/// The reference policy, as a directory under the repository's `policies/`.
const REFERENCE_POLICY: &str = "reference";

/// Arguments of `mandate demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The mandate-proxy binary [default: next to this `mandate` executable].
    #[arg(long, value_name = "PATH")]
    proxy_bin: Option<PathBuf>,
    /// The repository's policies/ directory; the demo runs its reference/ policy
    /// [default: ../../policies from this executable, i.e. the checkout's when run from target/debug].
    #[arg(long, value_name = "DIR")]
    policies: Option<PathBuf>,
    /// Keep the demo directory (CA, SVIDs, registry, decision logs, sidecar logs) instead of removing it.
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
    /// Creating the CA or SVIDs failed.
    #[error(transparent)]
    Ca(#[from] CaCliError),
    /// Reading back an issued certificate failed.
    #[error("cannot read the certificate {}: {reason}", path.display())]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Writing the policy's data document failed.
    #[error("cannot write the policy data {}: {source}", path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Starting the tokio runtime failed.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Reserving local ports failed.
    #[error("cannot reserve local ports: {0}")]
    Ports(std::io::Error),
    /// Starting the sample tool failed.
    #[error("cannot start the sample tool: {0}")]
    Tool(std::io::Error),
    /// Starting or stopping a sidecar failed.
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    /// A sidecar did not become ready (its log is printed separately).
    #[error("the {name} sidecar {what} (its log is above)")]
    NotReady {
        /// Which sidecar.
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
    let proxy_bin = match args.proxy_bin {
        Some(path) => path,
        None => default_proxy_bin()?,
    };
    if !proxy_bin.is_file() {
        return Err(SidecarError::BinaryMissing(proxy_bin).into());
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
        "Mandate demo: an agent calls a tool; each sits behind its own mandate-proxy sidecar."
    );
    println!("The sidecars talk mutual TLS with identities from a CA created just now, and both");
    println!("check every call against the reference policy before it goes anywhere.");

    let mut transcript = Transcript::default();
    let mut sidecars = Vec::new();
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = steps(&proxy_bin, &policy, dir.path(), &mut transcript, &mut sidecars) => outcome,
            _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
        }
    });
    // The sample tool and client tasks end with the runtime; the sidecars are stopped explicitly.
    drop(runtime);

    transcript.last_step("Stopping the sidecars (SIGTERM) and cleaning up");
    // Ctrl-C reaches the sidecars too (same process group), so their having exited is expected then.
    let interrupted = matches!(outcome, Err(DemoError::Interrupted));
    for sidecar in &mut sidecars {
        let name = sidecar.spec().name;
        match sidecar.stop() {
            Ok(Stopped::Terminated(status)) => transcript.check(
                status.success(),
                format!("{name} sidecar exited on SIGTERM ({status})"),
            ),
            Ok(Stopped::Killed(status)) => transcript.check(
                false,
                format!(
                    "{name} sidecar ignored SIGTERM for {STOP_TIMEOUT:?} and was killed ({status})"
                ),
            ),
            // A sidecar that dies on its own mid-demo is a failure even if later steps went well.
            Ok(Stopped::AlreadyExited(status)) if interrupted => {
                transcript.info(format!("{name} sidecar stopped on Ctrl-C ({status})"));
            }
            Ok(Stopped::AlreadyExited(status)) => transcript.check(
                false,
                format!("{name} sidecar had already exited by itself ({status})"),
            ),
            Err(e) => transcript.check(false, e.to_string()),
        };
    }
    if (outcome.is_err() && !interrupted) || !transcript.failures.is_empty() {
        for sidecar in &sidecars {
            print_log(sidecar);
        }
    }
    drop(sidecars);
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

/// `mandate-proxy` in the same directory as the running `mandate`, which is where cargo puts both.
fn default_proxy_bin() -> Result<PathBuf, DemoError> {
    let exe = std::env::current_exe().map_err(|source| DemoError::CurrentExe {
        what: "mandate-proxy",
        flag: "--proxy-bin",
        source,
    })?;
    Ok(exe.with_file_name(format!("mandate-proxy{}", std::env::consts::EXE_SUFFIX)))
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

/// The registry the reference policy reads (`data.registry`): one agent, `research`, that may use
/// the tool's `search` and read its REST API, and nothing else.
fn demo_data() -> Value {
    json!({
        "registry": {
            "agents": {
                AGENT: {
                    "status": "active",
                    "owner": "alice@example.com",
                    "description": "Research assistant: searches and reads, never writes",
                    "ceiling": [
                        {"host": "tool", "tool": "search"},
                        {"host": "tool", "method": "GET", "path": "/v1/*"},
                    ],
                },
            },
            "services": {},
        },
    })
}

/// A decision the demo saw the id of, to find again in the agent's decision log.
struct Expected {
    /// The call, in words.
    what: &'static str,
    decision_id: String,
    allow: bool,
}

/// The identities and addresses every step needs, and the decisions seen so far.
struct World {
    agent_id: SpiffeId,
    tool_id: SpiffeId,
    /// The `x-forwarded-client-cert` the tool's sidecar must stamp for the agent's certificate.
    expected_xfcc: String,
    agent_outbound: SocketAddr,
    agent_admin: SocketAddr,
    tool_admin: SocketAddr,
    agent_log: PathBuf,
    tool_log: PathBuf,
    expected: Vec<Expected>,
}

async fn steps(
    proxy_bin: &Path,
    policy: &Path,
    dir: &Path,
    t: &mut Transcript,
    sidecars: &mut Vec<Sidecar>,
) -> Result<(), DemoError> {
    let td: TrustDomain = "mandate.local".parse().expect("a valid trust domain");
    // Each kind of file gets its own directory: a sidecar watches the directories of its identity
    // and policy files and reloads on any change in them, so logs written next to those files
    // would make it reload after every line.
    let pki = dir.join("pki");
    let registry = dir.join("registry");
    let logs = dir.join("logs");
    for sub in [&registry, &logs] {
        std::fs::create_dir(sub).map_err(DemoError::TempDir)?;
    }

    t.step(format!(
        "Creating a CA and two identities in {}",
        pki.display()
    ));
    let ca = ca_cli::init(&pki, td.clone(), Duration::from_secs(24 * 3600), false)?;
    t.info(format!(
        "{:<32} root CA of trust domain {td}  (as `mandate ca init --dir DIR`)",
        format!("{}, {}", file_name(&ca.cert), file_name(&ca.key)),
    ));
    let ttl = Duration::from_secs(3600);
    let agent_svid = ca_cli::issue(&pki, &format!("agent/{AGENT}"), None, ttl)?;
    let tool_svid = ca_cli::issue(&pki, "service/tool", None, ttl)?;
    for (short, issued) in [
        (format!("agent/{AGENT}"), &agent_svid),
        ("service/tool".to_owned(), &tool_svid),
    ] {
        t.info(format!(
            "{:<32} {}  (as `mandate ca issue {short} --dir DIR`)",
            format!("{}, {}", file_name(&issued.cert), file_name(&issued.key)),
            issued.svid.id,
        ));
    }

    t.step("Registering the agent: the registry the policy reads (data.json)");
    let data = registry.join("data.json");
    let document = demo_data();
    let pretty = serde_json::to_string_pretty(&document).expect("JSON values serialise");
    std::fs::write(&data, format!("{pretty}\n")).map_err(|source| DemoError::Data {
        path: data.clone(),
        source,
    })?;
    let entry = &document["registry"]["agents"][AGENT];
    t.info(format!(
        "agent {AGENT}: status {}, owner {}",
        entry["status"].as_str().unwrap_or("?"),
        entry["owner"].as_str().unwrap_or("?")
    ));
    t.info("ceiling (the most it may ever do):");
    for scope in entry["ceiling"].as_array().into_iter().flatten() {
        t.info(format!("  {scope}"));
    }
    t.info(format!(
        "policy: {} (deny by default; allow what the ceiling covers)",
        policy.display()
    ));

    t.step("Starting the sample tool (an MCP server at /mcp; other paths echo what they received)");
    let tool = SampleTool::start().await.map_err(DemoError::Tool)?;
    t.info(format!(
        "sample tool on {} (plain HTTP, reachable only from its own host)",
        tool.addr()
    ));

    t.step("Starting two mandate-proxy sidecars, both enforcing the reference policy");
    let [
        tool_in,
        tool_out,
        tool_admin,
        agent_in,
        agent_out,
        agent_admin,
    ] = sidecar::free_ports(6).map_err(DemoError::Ports)?[..]
    else {
        unreachable!("free_ports returns as many ports as asked for");
    };
    let mut world = World {
        agent_id: agent_svid.svid.id.clone(),
        tool_id: tool_svid.svid.id.clone(),
        expected_xfcc: format!(
            "By={};Hash={};URI={}",
            tool_svid.svid.id,
            sha256_hex_of_cert(&agent_svid.cert)?,
            agent_svid.svid.id
        ),
        agent_outbound: agent_out,
        agent_admin,
        tool_admin,
        agent_log: logs.join("decisions.agent.jsonl"),
        tool_log: logs.join("decisions.tool.jsonl"),
        expected: Vec::new(),
    };
    let bundle = ca.cert.clone();
    let tool_spec = SidecarSpec {
        name: "tool",
        cert: tool_svid.cert.clone(),
        key: tool_svid.key.clone(),
        bundle: bundle.clone(),
        outbound: tool_out,
        inbound: tool_in,
        admin: tool_admin,
        app: Some(tool.addr()),
        routes: Vec::new(),
        policy: policy.to_owned(),
        data: data.clone(),
        decision_log: world.tool_log.clone(),
    };
    let route = format!("{TOOL_AUTHORITY}={tool_in},id={}", world.tool_id);
    let agent_spec = SidecarSpec {
        name: "agent",
        cert: agent_svid.cert.clone(),
        key: agent_svid.key.clone(),
        bundle,
        outbound: agent_out,
        inbound: agent_in,
        admin: agent_admin,
        app: None,
        routes: vec![route.clone()],
        policy: policy.to_owned(),
        data: data.clone(),
        decision_log: world.agent_log.clone(),
    };
    t.info(format!(
        "tool sidecar   as {}: mTLS inbound {tool_in} -> app {}, admin {tool_admin}",
        world.tool_id,
        tool.addr()
    ));
    t.info(format!(
        "agent sidecar  as {}: outbound proxy {agent_out}, admin {agent_admin}",
        world.agent_id
    ));
    t.info(format!("               --route {route}"));
    t.info(format!(
        "both:          --policy {} --data registry/{} --decision-log logs/decisions.<name>.jsonl",
        policy.display(),
        file_name(&data),
    ));
    sidecars.push(Sidecar::spawn(proxy_bin, tool_spec, &logs)?);
    sidecars.push(Sidecar::spawn(proxy_bin, agent_spec, &logs)?);
    let started = Instant::now();
    for sidecar in sidecars.iter_mut() {
        wait_ready(sidecar).await?;
    }
    t.info(format!(
        "both sidecars ready (/readyz 200: identity and policy loaded) after {:.1}s",
        started.elapsed().as_secs_f64()
    ));

    mcp_search(t, &mut world, &tool).await;
    mcp_delete_repo(t, &mut world, &tool).await;
    rest_read(t, &mut world, &tool).await;
    rest_write(t, &mut world, &tool).await;
    unrouted_call(t, &world, &tool).await;
    decision_logs(t, &world).await;
    metrics(t, &world).await;
    Ok(())
}

/// Polls `/readyz` until 200, the process exits, or the timeout passes.
async fn wait_ready(sidecar: &mut Sidecar) -> Result<(), DemoError> {
    let name = sidecar.spec().name;
    let admin = sidecar.spec().admin;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = sidecar.exited() {
            return Err(DemoError::NotReady {
                name,
                what: format!("exited ({status}) before becoming ready"),
            });
        }
        let last = match client::get(admin, "/readyz", &admin.to_string(), &[]).await {
            Ok(r) if r.status.is_success() => return Ok(()),
            Ok(r) => format!("/readyz answered {}: {}", r.status, r.text().trim()),
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
                what: format!("was not ready within {READY_TIMEOUT:?} (last: {last})"),
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
    let spoof = format!("spiffe://{}/agent/admin", w.agent_id.trust_domain_str());
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
    t.check(
        seen["headers"]["x-forwarded-client-cert"] == w.expected_xfcc.as_str(),
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
    // Four calls decided by policy, and the unrouted call refused by routing.
    let want_agent = 5;
    let want_tool = 2;
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
        .unwrap_or(0);
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
    }
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

/// One decision record on one line: direction, verdict, reason, decision id.
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
    format!(
        "{:<8} {verdict:<5} {:<reason_width$}  {}{dry_run}",
        d["direction"].as_str().unwrap_or("?"),
        d["reason"].as_str().unwrap_or("?"),
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
            2.0,
        ),
        (
            "agent",
            "mandate_decisions_total",
            [
                ("direction", "outbound"),
                ("result", "deny"),
                ("enforced", "true"),
            ],
            3.0,
        ),
        (
            "tool",
            "mandate_decisions_total",
            [
                ("direction", "inbound"),
                ("result", "allow"),
                ("enforced", "true"),
            ],
            2.0,
        ),
        // The JSON-RPC error of (b) is an HTTP 200; (d) and (e) are 403s.
        (
            "agent",
            "mandate_requests_total",
            [("direction", "outbound"), ("status", "200"), ("", "")],
            3.0,
        ),
        (
            "agent",
            "mandate_requests_total",
            [("direction", "outbound"), ("status", "403"), ("", "")],
            2.0,
        ),
        (
            "tool",
            "mandate_requests_total",
            [("direction", "inbound"), ("status", "200"), ("", "")],
            2.0,
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

fn sha256_hex_of_cert(path: &Path) -> Result<String, DemoError> {
    let der = CertificateDer::from_pem_file(path).map_err(|e| DemoError::Certificate {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Prints the end of a sidecar's log.
fn print_log(sidecar: &Sidecar) {
    let name = sidecar.spec().name;
    let log = sidecar.log();
    let lines: Vec<&str> = log.lines().collect();
    let shown = &lines[lines.len().saturating_sub(LOG_TAIL)..];
    println!("\n--- {name} sidecar log ---");
    if shown.len() < lines.len() {
        println!(
            "(the first {} lines are left out; run `mandate demo --keep` to keep the whole log)",
            lines.len() - shown.len()
        );
    }
    for line in shown {
        println!("{line}");
    }
    println!("--- end of {name} sidecar log ---");
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
    fn demo_registry_gives_research_the_documented_ceiling() {
        let data = demo_data();
        let research = &data["registry"]["agents"]["research"];
        assert_eq!(research["status"], "active");
        assert_eq!(research["owner"], "alice@example.com");
        assert_eq!(
            research["ceiling"],
            json!([
                {"host": "tool", "tool": "search"},
                {"host": "tool", "method": "GET", "path": "/v1/*"},
            ])
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
