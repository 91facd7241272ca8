//! Policy evaluation alone, in process: the reference policy over a 10,000-agent registry, on the
//! register VM (what the sidecar uses by default) and on the interpreter, 1 and 2 threads.
//!
//! Also builds the data document the "pair + policy" topology's sidecars load.

use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use mandate_rego::{EngineChoice, EngineKind, Module, Policy, Value};
use serde_json::json;

use crate::certs::TRUST_DOMAIN;

/// Filler agents in the registry of both the in-process benchmark and the policy pair.
pub const REGISTRY_AGENTS: usize = 10_000;
/// Distinct agents whose calls the in-process benchmark rotates through.
pub const ROTATING_AGENTS: usize = 1_000;
/// Evaluation time limit, as the sidecar's default `--policy-timeout`.
pub const TIME_LIMIT: Duration = Duration::from_millis(50);
/// Issue target: p50 of one evaluation on the register VM, µs.
pub const TARGET_P50_US: f64 = 10.0;
/// Untimed evaluations per thread before measuring (builds the thread's engines, warms caches, and
/// gets the policy past the VM guard's first 1,000 shadow-checked decisions).
const WARMUP: Duration = Duration::from_millis(500);

/// Name of filler agent `i`.
fn agent_name(i: usize) -> String {
    format!("agent-{i:05}")
}

/// The scopes every filler agent has, as its ceiling and as its autonomous scopes (so its calls
/// need no delegation).
fn filler_entry() -> serde_json::Value {
    let scopes = json!([
        {"host": "tool", "tool": "search"},
        {"host": "tool", "tool": "read_*"},
        {"host": "api", "method": "GET", "path": "/v1/*"}
    ]);
    json!({"status": "active", "ceiling": scopes, "autonomous": scopes})
}

/// `{"registry": {"agents": {...10,000 fillers, plus `extra`}, "services": {}}}`.
pub fn registry_data(extra: Option<(&str, serde_json::Value)>) -> serde_json::Value {
    let mut agents = serde_json::Map::with_capacity(REGISTRY_AGENTS + 1);
    for i in 0..REGISTRY_AGENTS {
        agents.insert(agent_name(i), filler_entry());
    }
    if let Some((name, entry)) = extra {
        agents.insert(name.to_owned(), entry);
    }
    json!({"registry": {"agents": agents, "services": {}}})
}

/// The reference policy's modules, tests left out (as the sidecar would be deployed).
pub fn reference_modules(dir: &Path) -> anyhow::Result<Vec<Module>> {
    let modules: Vec<Module> = mandate_rego::read_modules(dir)
        .with_context(|| format!("reading the policy in {}", dir.display()))?
        .into_iter()
        .filter(|m| !m.path.ends_with("_test.rego"))
        .collect();
    if modules.is_empty() {
        bail!("{}: no policy modules besides tests", dir.display());
    }
    Ok(modules)
}

/// An input document as the agent's sidecar builds it for an MCP `tools/call` (see proxy/src/input.rs).
fn mcp_input(agent: usize, id: u64, tool: &str) -> anyhow::Result<Value> {
    let name = agent_name(agent);
    let arguments = json!({"query": "rust async runtimes", "limit": 10});
    let body = json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": arguments}
    });
    let size = body.to_string().len();
    let doc = json!({
        "direction": "outbound",
        "source": {
            "spiffe_id": format!("spiffe://{TRUST_DOMAIN}/agent/{name}"),
            "trust_domain": TRUST_DOMAIN,
            "kind": "agent",
            "name": name,
        },
        "destination": {
            "host": "tool", "port": 8080,
            "spiffe_id": format!("spiffe://{TRUST_DOMAIN}/service/tool"),
            "name": "tool", "external": false,
        },
        "request": {
            "method": "POST", "path": "/mcp", "parsed_path": ["mcp"], "query": {},
            "headers": {
                "host": "tool:8080",
                "content-type": "application/json",
                "accept": "application/json, text/event-stream",
                "content-length": size.to_string(),
                "mcp-session-id": format!("session-{agent:05}"),
                "mcp-protocol-version": "2025-06-18",
                "user-agent": "mcp-client/1.0",
            },
            "scheme": "http", "protocol": "HTTP/1.1", "size": size, "body": body,
        },
        "mcp": {"method": "tools/call", "id": id, "tool": tool, "arguments": arguments},
        "registry": filler_entry(),
        "time": "2026-11-21T22:42:39.178000Z",
    });
    serde_json::from_value(doc).context("converting an input document")
}

/// One engine × thread-count measurement.
#[derive(Debug, Clone)]
pub struct EvalRow {
    /// `rvm` or `interpreter`.
    pub engine: &'static str,
    /// Threads evaluating concurrently.
    pub threads: usize,
    /// Per-evaluation latency (clone of the input + `Policy::evaluate`), nanoseconds.
    pub latency: Histogram<u64>,
    /// Evaluations over all threads.
    pub evals: u64,
    /// Measured time (the same for every thread).
    pub elapsed: Duration,
}

impl EvalRow {
    /// Latency at quantile `q`, µs.
    pub fn us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Evaluations per second, all threads together.
    pub fn rate(&self) -> f64 {
        self.evals as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Everything the in-process benchmark measured.
#[derive(Debug, Clone)]
pub struct PolicyEval {
    /// Rows: rvm 1 thread, rvm 2 threads, interpreter 1 thread, interpreter 2 threads.
    pub rows: Vec<EvalRow>,
    /// Modules evaluated (paths).
    pub modules: Vec<String>,
    /// Compile time per engine, (engine, time).
    pub compile: Vec<(&'static str, Duration)>,
    /// Verdict checks that passed, in words.
    pub checks: Vec<String>,
    /// CPUs the threads were pinned to.
    pub cpus: Vec<usize>,
    /// Measured time per row.
    pub duration: Duration,
}

/// Runs the in-process benchmark; threads are pinned to `cpus` (thread i on `cpus[i % len]`).
pub fn run(dir: &Path, cpus: &[usize], duration: Duration) -> anyhow::Result<PolicyEval> {
    let modules = reference_modules(dir)?;
    let data: Value = serde_json::from_value(registry_data(None))?;
    let inputs: Vec<Value> = (0..ROTATING_AGENTS)
        .map(|i| {
            mcp_input(
                i * (REGISTRY_AGENTS / ROTATING_AGENTS),
                i as u64 + 1,
                "search",
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let denied = mcp_input(7, 1, "delete_repo")?;
    let globbed = mcp_input(7, 1, "read_file")?;

    let mut rows = Vec::new();
    let mut compile = Vec::new();
    let mut checks = Vec::new();
    for (label, choice, kind) in [
        ("rvm", EngineChoice::Vm, EngineKind::Vm),
        (
            "interpreter",
            EngineChoice::Interpreter,
            EngineKind::Interpreter,
        ),
    ] {
        let t0 = Instant::now();
        let policy = Policy::compile_with(&modules, data.clone(), TIME_LIMIT, choice, None)
            .with_context(|| format!("compiling the reference policy for {label}"))?;
        compile.push((label, t0.elapsed()));
        if policy.engine() != kind {
            bail!(
                "asked for {label}, the policy runs on {}",
                policy.engine().as_str()
            );
        }
        // The verdicts must be right before their speed means anything.
        let mut expect = |input: &Value, allow: bool, what: &str| -> anyhow::Result<()> {
            let v = policy
                .evaluate(input.clone())
                .map_err(|e| anyhow::anyhow!("{label}: {what}: {e}"))?;
            if v.allow != allow {
                bail!(
                    "{label}: {what}: expected allow={allow}, got allow={} ({:?})",
                    v.allow,
                    v.reason
                );
            }
            checks.push(format!(
                "{label}: {what} → allow={} ({})",
                v.allow,
                v.reason.unwrap_or_default()
            ));
            Ok(())
        };
        expect(&inputs[0], true, "tools/call search")?;
        expect(&globbed, true, "tools/call read_file (glob scope)")?;
        expect(&denied, false, "tools/call delete_repo")?;
        for v in &inputs {
            let verdict = policy
                .evaluate(v.clone())
                .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
            if !verdict.allow {
                bail!("{label}: a rotating input was denied: {:?}", verdict.reason);
            }
        }
        for threads in [1, 2] {
            eprintln!("   policy evaluation: {label}, {threads} thread(s), {duration:?}");
            rows.push(measure(&policy, label, threads, &inputs, cpus, duration)?);
        }
    }
    Ok(PolicyEval {
        rows,
        modules: modules.iter().map(|m| m.path.clone()).collect(),
        compile,
        checks,
        cpus: cpus.to_vec(),
        duration,
    })
}

fn measure(
    policy: &Policy,
    engine: &'static str,
    threads: usize,
    inputs: &[Value],
    cpus: &[usize],
    duration: Duration,
) -> anyhow::Result<EvalRow> {
    let barrier = Barrier::new(threads);
    let results: Vec<anyhow::Result<(Histogram<u64>, u64, Duration)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                let cpu = cpus[t % cpus.len()];
                s.spawn(move || -> anyhow::Result<(Histogram<u64>, u64, Duration)> {
                    crate::procs::pin_current_thread(&[cpu])?;
                    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
                    // Each thread walks its own stream of the rotating agents.
                    let mut i = t * inputs.len() / threads.max(1);
                    let warm_end = Instant::now() + WARMUP;
                    while Instant::now() < warm_end {
                        let _ = policy.evaluate(inputs[i % inputs.len()].clone());
                        i += 1;
                    }
                    barrier.wait();
                    let start = Instant::now();
                    let end = start + duration;
                    let mut n = 0u64;
                    let mut denied = 0u64;
                    loop {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        let verdict = policy.evaluate(inputs[i % inputs.len()].clone());
                        let ns = t0.elapsed().as_nanos() as u64;
                        hist.saturating_record(ns.max(1));
                        if !matches!(verdict, Ok(ref v) if v.allow) {
                            denied += 1;
                        }
                        i += 1;
                        n += 1;
                    }
                    if denied > 0 {
                        bail!("{denied} of {n} timed evaluations were not allowed");
                    }
                    Ok((hist, n, start.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a benchmark thread panicked"))
            })
            .collect()
    });
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut evals = 0;
    let mut elapsed = Duration::ZERO;
    for r in results {
        let (h, n, e) = r?;
        latency.add(&h)?;
        evals += n;
        elapsed = elapsed.max(e);
    }
    Ok(EvalRow {
        engine,
        threads,
        latency,
        evals,
        elapsed,
    })
}

/// Writes the policy pair's data document: the fillers plus `agent` with `ceiling`, all of it
/// autonomous (the load carries no delegation).
pub fn write_pair_data(path: &Path, agent: &str, ceiling: serde_json::Value) -> anyhow::Result<()> {
    let data = registry_data(Some((
        agent,
        json!({"status": "active", "owner": "bench@example.com", "ceiling": ceiling,
               "autonomous": ceiling}),
    )));
    std::fs::write(path, serde_json::to_vec(&data)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// What a sidecar's decision log says about a run.
#[derive(Debug, Clone, Default)]
pub struct DecisionTally {
    /// Which sidecar.
    pub name: String,
    /// Records with `"allow": true`.
    pub allowed: u64,
    /// Records with `"allow": false`.
    pub denied: u64,
    /// Lines that were not decision records.
    pub unreadable: u64,
    /// Mean `eval_us` of the records.
    pub mean_eval_us: f64,
    /// Largest `eval_us`.
    pub max_eval_us: u64,
    /// The first deny's reason, if any.
    pub first_deny: Option<String>,
    /// The log's size, bytes.
    pub bytes: u64,
}

/// Reads a JSON-lines decision log.
pub fn tally(name: &str, path: &PathBuf) -> DecisionTally {
    use std::io::BufRead as _;
    let mut t = DecisionTally {
        name: name.to_owned(),
        ..DecisionTally::default()
    };
    let Ok(file) = std::fs::File::open(path) else {
        t.unreadable = 1;
        return t;
    };
    t.bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut eval_sum = 0u64;
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else {
            t.unreadable += 1;
            continue;
        };
        let rec: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                t.unreadable += 1;
                continue;
            }
        };
        let eval_us = rec["eval_us"].as_u64().unwrap_or(0);
        eval_sum += eval_us;
        t.max_eval_us = t.max_eval_us.max(eval_us);
        match rec["allow"].as_bool() {
            Some(true) => t.allowed += 1,
            Some(false) => {
                t.denied += 1;
                if t.first_deny.is_none() {
                    t.first_deny = rec["reason"].as_str().map(str::to_owned);
                }
            }
            None => t.unreadable += 1,
        }
    }
    t.mean_eval_us = eval_sum as f64 / (t.allowed + t.denied).max(1) as f64;
    t
}
