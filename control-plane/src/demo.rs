//! `mandate demo`: a self-contained tour. It creates a CA and two identities, starts a sample tool
//! behind one `mandate-proxy` sidecar and an agent's sidecar in front of it, makes the calls an agent
//! would, prints what happened, checks each outcome, and cleans everything up.

mod client;
mod sample_tool;
mod sidecar;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mandate_identity::{SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

use crate::ca_cli::{self, CaCliError};
use client::Response;
use sample_tool::SampleTool;
use sidecar::{STOP_TIMEOUT, Sidecar, SidecarError, SidecarSpec, Stopped};

/// Host and port the agent uses to address the tool; only the agent's sidecar knows where it really is.
const TOOL_AUTHORITY: &str = "tool:8080";
/// How long each sidecar gets to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the sidecars' counters get to catch up with the responses already received.
const METRICS_SETTLE: Duration = Duration::from_secs(3);
/// Number of numbered steps in the transcript.
const STEPS: usize = 8;

/// Arguments of `mandate demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The mandate-proxy binary [default: next to this `mandate` executable].
    #[arg(long, value_name = "PATH")]
    proxy_bin: Option<PathBuf>,
    /// Keep the demo directory (CA, SVIDs, sidecar logs) instead of removing it.
    #[arg(long)]
    keep: bool,
}

/// Why the demo could not run at all (as opposed to a check that did not pass).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The running executable's path is unknown, so mandate-proxy cannot be found next to it.
    #[error(
        "cannot locate this executable to find mandate-proxy next to it ({0}): pass --proxy-bin"
    )]
    CurrentExe(std::io::Error),
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
    println!("and the two sidecars talk mutual TLS with identities from a CA created just now.");

    let mut transcript = Transcript::default();
    let mut sidecars = Vec::new();
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = steps(&proxy_bin, dir.path(), &mut transcript, &mut sidecars) => outcome,
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
    let exe = std::env::current_exe().map_err(DemoError::CurrentExe)?;
    Ok(exe.with_file_name(format!("mandate-proxy{}", std::env::consts::EXE_SUFFIX)))
}

/// The identities and addresses every step needs.
struct World {
    agent_id: SpiffeId,
    tool_id: SpiffeId,
    /// The `x-forwarded-client-cert` the tool's sidecar must stamp for the agent's certificate.
    expected_xfcc: String,
    agent_outbound: SocketAddr,
    agent_admin: SocketAddr,
    tool_admin: SocketAddr,
}

async fn steps(
    proxy_bin: &Path,
    dir: &Path,
    t: &mut Transcript,
    sidecars: &mut Vec<Sidecar>,
) -> Result<(), DemoError> {
    let td: TrustDomain = "mandate.local".parse().expect("a valid trust domain");

    t.step(format!(
        "Creating a CA and two identities in {}",
        dir.display()
    ));
    let ca = ca_cli::init(dir, td.clone(), Duration::from_secs(24 * 3600), false)?;
    t.info(format!(
        "{:<32} root CA of trust domain {td}  (as `mandate ca init --dir DIR`)",
        format!("{}, {}", file_name(&ca.cert), file_name(&ca.key)),
    ));
    let ttl = Duration::from_secs(3600);
    let agent = ca_cli::issue(dir, "agent/research", None, ttl)?;
    let tool_svid = ca_cli::issue(dir, "service/tool", None, ttl)?;
    for (short, issued) in [("agent/research", &agent), ("service/tool", &tool_svid)] {
        t.info(format!(
            "{:<32} {}  (as `mandate ca issue {short} --dir DIR`)",
            format!("{}, {}", file_name(&issued.cert), file_name(&issued.key)),
            issued.svid.id,
        ));
    }

    t.step("Starting the sample tool (it answers with JSON describing each request it receives)");
    let tool = SampleTool::start().await.map_err(DemoError::Tool)?;
    t.info(format!(
        "sample tool on {} (plain HTTP, reachable only from its own host)",
        tool.addr()
    ));

    t.step("Starting two mandate-proxy sidecars");
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
    let world = World {
        agent_id: agent.svid.id.clone(),
        tool_id: tool_svid.svid.id.clone(),
        expected_xfcc: format!(
            "By={};Hash={};URI={}",
            tool_svid.svid.id,
            sha256_hex_of_cert(&agent.cert)?,
            agent.svid.id
        ),
        agent_outbound: agent_out,
        agent_admin,
        tool_admin,
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
    };
    let route = format!("{TOOL_AUTHORITY}={tool_in},id={}", world.tool_id);
    let agent_spec = SidecarSpec {
        name: "agent",
        cert: agent.cert.clone(),
        key: agent.key.clone(),
        bundle,
        outbound: agent_out,
        inbound: agent_in,
        admin: agent_admin,
        app: None,
        routes: vec![route.clone()],
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
    sidecars.push(Sidecar::spawn(proxy_bin, tool_spec, dir)?);
    sidecars.push(Sidecar::spawn(proxy_bin, agent_spec, dir)?);
    let started = Instant::now();
    for sidecar in sidecars.iter_mut() {
        wait_ready(sidecar).await?;
    }
    t.info(format!(
        "both sidecars ready (/readyz 200) after {:.1}s",
        started.elapsed().as_secs_f64()
    ));

    allowed_call(t, &world).await;
    spoofed_call(t, &world).await;
    unrouted_call(t, &world, &tool).await;
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
        if Instant::now() >= deadline {
            return Err(DemoError::NotReady {
                name,
                what: format!("was not ready within {READY_TIMEOUT:?} (last: {last})"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (a) The ordinary case: the tool learns the caller's identity from the mTLS handshake.
async fn allowed_call(t: &mut Transcript, w: &World) {
    let target = format!("http://{TOOL_AUTHORITY}/weather?city=Paris");
    t.step(format!(
        "The agent calls the tool: GET {target} through its sidecar"
    ));
    let Some(response) = call(t, w.agent_outbound, &target, TOOL_AUTHORITY, &[]).await else {
        return;
    };
    t.check(
        response.status == 200,
        format!("status {} (expected 200)", response.status),
    );
    let Some(seen) = tool_saw(t, &response) else {
        return;
    };
    t.check(
        seen["method"] == "GET" && seen["path"] == "/weather?city=Paris",
        "the tool received the request with its path and query",
    );
    t.check(
        seen["headers"]["x-mandate-peer"] == w.agent_id.as_str(),
        format!(
            "the tool was told the caller is {} (from its certificate, not from the agent)",
            w.agent_id
        ),
    );
    t.check(
        seen["headers"]["x-forwarded-client-cert"] == w.expected_xfcc.as_str(),
        "x-forwarded-client-cert names the tool (By), the agent's certificate hash (Hash) and the agent (URI)",
    );
}

/// (b) The agent lies about who it is in headers; the sidecars replace the lie with the proven identity.
async fn spoofed_call(t: &mut Transcript, w: &World) {
    let target = format!("http://{TOOL_AUTHORITY}/admin/reports");
    let spoof = format!("spiffe://{}/agent/admin", w.agent_id.trust_domain_str());
    let spoof_xfcc = format!("By={};URI={spoof}", w.tool_id);
    t.step("The agent tries to impersonate another agent with forged identity headers");
    t.info(format!("GET {target} with x-mandate-peer: {spoof}"));
    t.info(format!(
        "                and x-forwarded-client-cert: {spoof_xfcc}"
    ));
    let headers = [
        ("x-mandate-peer", spoof.as_str()),
        ("x-forwarded-client-cert", spoof_xfcc.as_str()),
    ];
    let Some(response) = call(t, w.agent_outbound, &target, TOOL_AUTHORITY, &headers).await else {
        return;
    };
    t.check(
        response.status == 200,
        format!("status {} (expected 200)", response.status),
    );
    let Some(seen) = tool_saw(t, &response) else {
        return;
    };
    t.check(
        seen["headers"]["x-mandate-peer"] == w.agent_id.as_str(),
        format!(
            "the forged header was dropped: the tool still sees {}",
            w.agent_id
        ),
    );
    t.check(
        seen["headers"]["x-forwarded-client-cert"] == w.expected_xfcc.as_str(),
        "the forged x-forwarded-client-cert was replaced by the real one",
    );
}

/// (c) A destination with no route is refused by the agent's own sidecar: nothing leaves the host.
async fn unrouted_call(t: &mut Transcript, w: &World, tool: &SampleTool) {
    let target = "http://example.com/";
    t.step(format!(
        "The agent calls a host it has no route to: GET {target}"
    ));
    let before = tool.requests();
    let Some(response) = call(t, w.agent_outbound, target, "example.com", &[]).await else {
        return;
    };
    t.info(format!("   {}", response.text().trim()));
    t.check(
        response.status == 403,
        format!("status {} (expected 403)", response.status),
    );
    t.check(
        response
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        format!(
            "content-type {:?} (expected application/json)",
            response.header("content-type").unwrap_or("none")
        ),
    );
    let body = response.json().unwrap_or(Value::Null);
    t.check(
        body["error"] == "denied" && body["destination"] == "example.com:80",
        "the refusal says denied and names the destination example.com:80",
    );
    t.check(
        tool.requests() == before,
        "no request reached the tool or left the agent's host",
    );
}

/// Shows the request counters both sidecars exported, and checks they match the calls made.
async fn metrics(t: &mut Transcript, w: &World) {
    t.step("What the sidecars counted (GET /metrics on their admin ports)");
    let expected = [
        ("agent", w.agent_admin, "outbound", "200", 2.0),
        ("agent", w.agent_admin, "outbound", "403", 1.0),
        ("tool", w.tool_admin, "inbound", "200", 2.0),
    ];
    // Counters may be updated just after the response is sent; give them a moment to catch up.
    let deadline = Instant::now() + METRICS_SETTLE;
    let (mut agent, mut tool) = loop {
        let agent = scrape(w.agent_admin).await;
        let tool = scrape(w.tool_admin).await;
        let settled = expected.iter().all(|(name, _, direction, status, want)| {
            let text = if *name == "agent" { &agent } else { &tool };
            requests_total(text.as_deref().unwrap_or(""), direction, status) == Some(*want)
        });
        if settled || Instant::now() >= deadline {
            break (agent, tool);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (name, text) in [("agent", &mut agent), ("tool", &mut tool)] {
        match text {
            Ok(text) => {
                for line in text
                    .lines()
                    .filter(|l| l.starts_with("mandate_requests_total"))
                {
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
    for (name, _, direction, status, want) in expected {
        let text = if name == "agent" { &agent } else { &tool };
        if let Ok(text) = text {
            let got = requests_total(text, direction, status);
            t.check(
                got == Some(want),
                format!(
                    "{name} sidecar counted {want} {direction} request(s) with status {status} (found {})",
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

/// The value of `mandate_requests_total{direction=…,status=…}` in Prometheus text, in any label order.
fn requests_total(text: &str, direction: &str, status: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("mandate_requests_total{")?;
        let (labels, value) = rest.split_once('}')?;
        let mut has_direction = false;
        let mut has_status = false;
        for label in labels.split(',') {
            match label.trim().split_once('=') {
                Some(("direction", v)) => has_direction = v.trim_matches('"') == direction,
                Some(("status", v)) => has_status = v.trim_matches('"') == status,
                _ => {}
            }
        }
        (has_direction && has_status)
            .then(|| value.split_whitespace().next()?.parse().ok())
            .flatten()
    })
}

/// Makes one call, printing the status; a transport failure is a failed check.
async fn call(
    t: &mut Transcript,
    proxy: SocketAddr,
    target: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Option<Response> {
    match client::get(proxy, target, host, headers).await {
        Ok(response) => {
            t.info(format!(
                "-> {} {}",
                response.status.as_str(),
                response.status.canonical_reason().unwrap_or("")
            ));
            Some(response)
        }
        Err(e) => {
            t.check(false, format!("GET {target}: {e}"));
            None
        }
    }
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

fn print_log(sidecar: &Sidecar) {
    let name = sidecar.spec().name;
    println!("\n--- {name} sidecar log ---");
    print!("{}", sidecar.log());
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
    fn requests_total_reads_labels_in_any_order() {
        let text = "# TYPE mandate_requests_total counter\n\
            mandate_requests_total{direction=\"outbound\",status=\"200\"} 2\n\
            mandate_requests_total{status=\"403\",direction=\"outbound\"} 1\n\
            mandate_requests_total{direction=\"inbound\",status=\"200\"} 5\n";
        assert_eq!(requests_total(text, "outbound", "200"), Some(2.0));
        assert_eq!(requests_total(text, "outbound", "403"), Some(1.0));
        assert_eq!(requests_total(text, "inbound", "200"), Some(5.0));
        assert_eq!(requests_total(text, "inbound", "403"), None);
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

    #[test]
    fn missing_proxy_binary_says_how_to_build_it() {
        let err = run(DemoArgs {
            proxy_bin: Some(PathBuf::from("/nonexistent/mandate-proxy")),
            keep: false,
        })
        .unwrap_err();
        assert!(err.to_string().contains("cargo build"), "{err}");
    }
}
