//! Orchestration: start each topology, drive its load phases, collect the figures, write the report.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use http::{HeaderValue, Uri};

use crate::certs::{self, Certs};
use crate::cli::BenchArgs;
use crate::loadgen::{self, Outcome, Target};
use crate::procs::{self, Child, Pinner, TempDir};
use crate::report::{self, Machine, Report};
use crate::rss::{self, Mem, Sampler};
use crate::{control_plane, delegation, ingest, jitter, mandate, nginx, policy};

/// Response body size of the upstream app.
pub const BODY_BYTES: usize = 1024;
/// The destination the client addresses in the proxied topologies.
pub const TOOL_AUTHORITY: &str = "tool:8080";
/// Pause after start (and after warm-up) before reading "idle" memory, so start-up work has finished.
const SETTLE: Duration = Duration::from_secs(1);
/// How long the machine's wake-up jitter is measured before and after the topologies run.
const JITTER_TIME: Duration = Duration::from_secs(2);
/// How long a started topology may take to answer its first request.
const PROBE_TIME: Duration = Duration::from_secs(10);
/// Unmeasured load at the fixed rate before every round.
const ROUND_WARMUP: Duration = Duration::from_millis(500);
/// How often memory is sampled during the fixed-rate phase.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// The topologies, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Kind {
    /// client → app.
    Direct,
    /// client → sidecar A → mTLS → sidecar B → app.
    Mandate,
    /// The same pair, both sidecars deciding every call with the reference policy.
    MandatePolicy,
    /// client → nginx A → mTLS → nginx B → app.
    Nginx,
    /// Not a data-path topology: the control plane (`mandate serve`) with simulated sidecars.
    ControlPlane,
    /// Not a data-path topology: delegation tokens, checked in process and through a managed pair.
    Delegation,
    /// Not a data-path topology: decisions end to end through a spooling managed pair.
    Ingest,
}

impl Kind {
    /// Short name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Mandate => "mandate-proxy pair",
            Kind::MandatePolicy => "mandate-proxy pair + policy",
            Kind::Nginx => "nginx pair",
            Kind::ControlPlane => "control plane",
            Kind::Delegation => "delegation",
            Kind::Ingest => "ingest",
        }
    }
}

/// Why a topology could not be measured; the caller reports "skipped" and "failed" differently.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A prerequisite is missing (binary not built, nginx not installable): reported as skipped.
    #[error("{0}")]
    Unavailable(String),
    /// It started but does not work: reported as failed.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// The release binaries `mandate` and `mandate-proxy` in `--bin-dir`; unavailable when either is
/// not built.
pub fn release_bins(args: &BenchArgs) -> Result<[std::path::PathBuf; 2], SetupError> {
    let bins = ["mandate", "mandate-proxy"].map(|name| args.bin_dir.join(name));
    if let Some(missing) = bins.iter().find(|bin| !bin.is_file()) {
        return Err(SetupError::Unavailable(format!(
            "{} not built (cargo build --release --workspace --bins)",
            missing.display()
        )));
    }
    Ok(bins)
}

/// What every topology's start-up needs.
pub struct Env<'a> {
    /// Benchmark options.
    pub args: &'a BenchArgs,
    /// Scratch directory for configs and logs.
    pub tmp: &'a Path,
    /// Certificates for both pairs.
    pub certs: &'a Certs,
    /// The upstream app's address.
    pub app: SocketAddr,
    /// CPUs of the proxies.
    pub cpus_proxy: &'a [usize],
    /// CPUs of the load generator and app.
    pub cpus_load: &'a [usize],
    /// How to pin.
    pub pinner: &'a Pinner,
}

/// A started topology, ready for load; its processes stop when it is dropped.
pub struct Running {
    /// Where the load goes.
    pub target: Target,
    /// The proxy processes to measure, caller side first.
    pub procs: Vec<Child>,
    /// Versions and other facts for the report.
    pub facts: Vec<String>,
    /// Configuration files written for the proxies, (name, text), shown in the report.
    pub configs: Vec<(String, String)>,
    /// Decision logs the proxies write, (proxy name, path), checked after the run.
    pub decision_logs: Vec<(String, std::path::PathBuf)>,
}

/// Memory and CPU of one proxy process (tree) over the phases.
#[derive(Debug, Clone)]
pub struct ProcResult {
    /// Role, e.g. "sidecar A (outbound)".
    pub name: String,
    /// How it was started.
    pub command_line: String,
    /// Cpus_allowed_list as the kernel reports it.
    pub cpus_allowed: String,
    /// After start, the readiness probe and a settle pause.
    pub idle: Mem,
    /// After the warm-up and a settle pause.
    pub idle_after_warmup: Mem,
    /// Last sample taken while the fixed-rate phase ran.
    pub rate_end: Mem,
    /// Sample with the largest RSS during the fixed-rate phase.
    pub rate_max: Mem,
    /// Right after the fixed-rate phase (its VmHWM is the peak so far).
    pub after_rate: Mem,
    /// Right after saturation.
    pub after_sat: Mem,
    /// CPU seconds used during the fixed-rate phase.
    pub cpu_rate_s: f64,
    /// CPU seconds used during saturation.
    pub cpu_sat_s: f64,
}

/// Everything measured for one topology.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Failed requests during the warm-up.
    pub warmup_errors: u64,
    /// The fixed-rate phase.
    pub open: Outcome,
    /// The saturation phase.
    pub sat: Outcome,
    /// Per proxy process.
    pub procs: Vec<ProcResult>,
    /// CPU seconds of the load generator plus app during the fixed-rate phase.
    pub load_cpu_rate_s: f64,
    /// CPU seconds of the load generator plus app during saturation.
    pub load_cpu_sat_s: f64,
    /// Activity of other programs during the fixed-rate phase.
    pub noise_rate: Noise,
    /// Activity of other programs during saturation.
    pub noise_sat: Noise,
    /// Proxies that died during the run.
    pub crashed: Vec<String>,
    /// Versions and other facts.
    pub facts: Vec<String>,
    /// Configuration files written for the proxies, (name, text).
    pub configs: Vec<(String, String)>,
    /// What the proxies' decision logs recorded (policy topologies only).
    pub decisions: Vec<policy::DecisionTally>,
}

/// CPU the benchmark did not use itself on the CPUs it runs on: a busy machine distorts the figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noise {
    /// CPU used by other programs on the benchmark's CPUs, percent of one core.
    pub other_pct: f64,
    /// Time stolen by the hypervisor on those CPUs, percent of one core.
    pub steal_pct: f64,
    /// 1-minute load average at the end of the phase.
    pub loadavg: f64,
}

/// How a topology's run ended.
#[derive(Debug, Clone)]
pub enum Status {
    /// Measured.
    Done(Box<Measured>),
    /// Not measured because a prerequisite is missing or it was not selected.
    Skipped(String),
    /// Started but broke.
    Failed(String),
}

/// One topology's result.
#[derive(Debug, Clone)]
pub struct TopologyResult {
    /// Which topology.
    pub kind: Kind,
    /// What happened.
    pub status: Status,
}

/// Runs the whole benchmark and writes the report.
pub fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    // Collected before pinning: the machine facts must describe the machine, not our CPU mask.
    let machine = Machine::collect();
    let cpus_proxy = procs::parse_cpu_list(&args.cpus_proxy).context("--cpus-proxy")?;
    let cpus_load = procs::parse_cpu_list(&args.cpus_load).context("--cpus-load")?;
    let cpus_cp = procs::parse_cpu_list(
        args.cpus_control_plane
            .as_deref()
            .unwrap_or(&args.cpus_proxy),
    )
    .context("--cpus-control-plane")?;
    for &c in cpus_proxy.iter().chain(&cpus_load).chain(&cpus_cp) {
        if c >= machine.nproc {
            bail!(
                "CPU {c} does not exist: this machine has {} CPUs (0-{})",
                machine.nproc,
                machine.nproc - 1
            );
        }
    }
    if args.rate == 0 || args.connections == 0 || args.sat_connections == 0 || args.workers == 0 {
        bail!("--rate, --connections, --sat-connections and --workers must be at least 1");
    }
    // Threads started from here on (the runtime, the memory sampler) inherit the load CPUs.
    procs::pin_current_thread(&cpus_load)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut all_cpus: Vec<usize> = cpus_load.iter().chain(&cpus_proxy).copied().collect();
    all_cpus.sort_unstable();
    all_cpus.dedup();
    eprintln!("== machine jitter: 1 ms sleeps on CPUs {all_cpus:?} for {JITTER_TIME:?}");
    let jitter = jitter::measure(&all_cpus, JITTER_TIME);
    // Policy evaluation alone first, while no topology runs: one thread on the proxies' CPU, two on
    // the proxies' and the load's.
    let policy_eval = (!args.skip_policy_eval && args.data_path_wanted()).then(|| {
        eprintln!(
            "== policy evaluation in process ({})",
            args.policy_dir.display()
        );
        let mut cpus: Vec<usize> = cpus_proxy.iter().chain(&cpus_load).copied().collect();
        let mut seen = std::collections::HashSet::new();
        cpus.retain(|c| seen.insert(*c));
        policy::run(&args.policy_dir, &cpus, args.policy_eval_time).map_err(|e| {
            eprintln!("== policy evaluation FAILED: {e:#}");
            format!("{e:#}")
        })
    });
    let results = if args.data_path_wanted() {
        rt.block_on(run_all(args, &cpus_proxy, &cpus_load))?
    } else {
        RunAll {
            topologies: [
                Kind::Direct,
                Kind::Mandate,
                Kind::MandatePolicy,
                Kind::Nginx,
            ]
            .into_iter()
            .map(|kind| TopologyResult {
                kind,
                status: Status::Skipped("not selected (--only)".to_owned()),
            })
            .collect(),
            app_command: String::new(),
            tmp: std::path::PathBuf::new(),
        }
    };
    // Again afterwards: the machine's mood changes over minutes, and one figure would mislead.
    eprintln!("== machine jitter again, after the run");
    let jitter_after = jitter::measure(&all_cpus, JITTER_TIME);
    let control_plane = section(
        &rt,
        args,
        Kind::ControlPlane,
        control_plane::run(args, &cpus_cp, &cpus_load),
    );
    let delegation = section(
        &rt,
        args,
        Kind::Delegation,
        delegation::run(args, &cpus_proxy, &cpus_load),
    );
    let ingest = section(
        &rt,
        args,
        Kind::Ingest,
        ingest::run(args, &cpus_proxy, &cpus_load),
    );
    let tmp = results.tmp.display().to_string();
    let report = Report {
        machine,
        args: args.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        cpus_proxy,
        cpus_load,
        pinning: Pinner::new().describe().to_owned(),
        results: results.topologies,
        app_command: results.app_command,
        tmp,
        wall: started.elapsed(),
        jitter,
        jitter_after,
        policy_eval,
        control_plane,
        delegation,
        ingest,
    };
    println!("{}", report::terminal_table(&report));
    if let Some(path) = &args.report {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut text = report::markdown(&report);
        // A partial run keeps what the file says of the benchmarks it left out.
        let kept = report::sections_not_run(&report);
        if !kept.is_empty()
            && let Ok(old) = std::fs::read_to_string(path)
        {
            text = report::merge(&old, &text, &kept);
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let failed: Vec<_> = report
        .results
        .iter()
        .filter(|r| matches!(r.status, Status::Failed(_)))
        .map(|r| r.kind.label())
        .collect();
    if !failed.is_empty() {
        bail!("topologies failed: {}", failed.join(", "));
    }
    if let Some(Err(e)) = &report.policy_eval {
        bail!("policy evaluation benchmark failed: {e}");
    }
    check_section(Kind::ControlPlane, &report.control_plane, |r| r.failures())?;
    check_section(Kind::Delegation, &report.delegation, |r| r.failures())?;
    check_section(Kind::Ingest, &report.ingest, |r| r.failures())?;
    Ok(())
}

/// Runs one benchmark section on `rt` when `--only` names `kind` or nothing; a failure is printed
/// and kept for the report.
fn section<R>(
    rt: &tokio::runtime::Runtime,
    args: &BenchArgs,
    kind: Kind,
    run: impl std::future::Future<Output = anyhow::Result<R>>,
) -> Option<Result<R, String>> {
    if !(args.only.is_empty() || args.only.contains(&kind)) {
        return None;
    }
    Some(rt.block_on(run).map_err(|e| {
        eprintln!("== {} FAILED: {e:#}", kind.label());
        format!("{e:#}")
    }))
}

/// Fails when a section that ran failed, or left out parts it should have run.
fn check_section<R>(
    kind: Kind,
    result: &Option<Result<R, String>>,
    failures: impl Fn(&R) -> Vec<&'static str>,
) -> anyhow::Result<()> {
    let name = kind.label();
    match result {
        Some(Err(e)) => bail!("{name} benchmark failed: {e}"),
        Some(Ok(r)) => {
            let f = failures(r);
            if !f.is_empty() {
                bail!("{name} benchmark: failed: {}", f.join(", "));
            }
            Ok(())
        }
        None => Ok(()),
    }
}

struct RunAll {
    topologies: Vec<TopologyResult>,
    app_command: String,
    tmp: std::path::PathBuf,
}

async fn run_all(
    args: &BenchArgs,
    cpus_proxy: &[usize],
    cpus_load: &[usize],
) -> anyhow::Result<RunAll> {
    let tmp = TempDir::new(args.keep_tmp)?;
    let certs = certs::mint(&tmp.path().join("certs"))?;
    let pinner = Pinner::new();
    let (mut app, app_addr) = crate::app::start(&pinner, cpus_load, tmp.path())?;
    let env = Env {
        args,
        tmp: tmp.path(),
        certs: &certs,
        app: app_addr,
        cpus_proxy,
        cpus_load,
        pinner: &pinner,
    };

    let mut topologies = Vec::new();
    let mut live = Vec::new();
    for kind in [
        Kind::Direct,
        Kind::Mandate,
        Kind::MandatePolicy,
        Kind::Nginx,
    ] {
        if !env.args.wants(kind) {
            let why = if kind == Kind::Nginx && args.skip_nginx {
                "--skip-nginx"
            } else {
                "not selected (--only)"
            };
            topologies.push(TopologyResult {
                kind,
                status: Status::Skipped(why.to_owned()),
            });
            continue;
        }
        eprintln!("== {}: starting", kind.label());
        let started = match kind {
            Kind::Direct => Ok(direct(&env)),
            Kind::Mandate => mandate::start(&env, false).await,
            Kind::MandatePolicy => mandate::start(&env, true).await,
            Kind::Nginx => nginx::start(&env).await,
            Kind::ControlPlane | Kind::Delegation | Kind::Ingest => {
                unreachable!("{} is not a data-path topology", kind.label())
            }
        };
        let status = match started {
            Ok(running) => match loadgen::probe(&running.target, Instant::now() + PROBE_TIME).await
            {
                Ok(()) => {
                    live.push(Live::new(kind, running));
                    continue;
                }
                Err(e) => Status::Failed(format!("{} does not serve requests: {e}", kind.label())),
            },
            Err(SetupError::Unavailable(reason)) => Status::Skipped(reason),
            Err(SetupError::Failed(e)) => Status::Failed(format!("{e:#}")),
        };
        match &status {
            Status::Skipped(r) => eprintln!("== {}: skipped: {r}", kind.label()),
            Status::Failed(r) => eprintln!("== {}: FAILED: {r}", kind.label()),
            Status::Done(_) => {}
        }
        topologies.push(TopologyResult { kind, status });
    }
    measure(&mut live, &env, app.pid()).await;
    topologies.extend(live.into_iter().map(Live::finish));
    topologies.sort_by_key(|t| t.kind);
    app.check_alive()
        .context("the upstream app died during the run")?;
    Ok(RunAll {
        topologies,
        app_command: app.command_line.clone(),
        tmp: tmp.path().to_owned(),
    })
}

/// The baseline: the client talks to the app itself.
fn direct(env: &Env<'_>) -> Running {
    Running {
        target: Target {
            connect: env.app,
            uri: Uri::from_static("/"),
            host: HeaderValue::from_static(TOOL_AUTHORITY),
            expect_body: Some(BODY_BYTES),
            headers: vec![],
        },
        procs: vec![],
        facts: vec![],
        configs: vec![],
        decision_logs: vec![],
    }
}

/// Builds an argument vector from displayable parts.
pub fn os_args<I, S>(parts: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    parts.into_iter().map(Into::into).collect()
}

/// The two measured phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Open loop at the fixed rate.
    Rate,
    /// Closed loop, saturation.
    Saturation,
}

/// CPU and noise accounting of one phase, summed over its rounds.
#[derive(Debug, Default)]
struct PhaseAcc {
    outcome: Option<Outcome>,
    proc_cpu_s: Vec<f64>,
    load_cpu_s: f64,
    machine: rss::CpuTimes,
    ours_s: f64,
}

impl PhaseAcc {
    fn noise(&self) -> Noise {
        let secs = self
            .outcome
            .as_ref()
            .map_or(0.0, |o| o.elapsed.as_secs_f64())
            .max(1e-9);
        Noise {
            other_pct: ((self.machine.busy_s - self.ours_s) / secs * 100.0).max(0.0),
            steal_pct: self.machine.steal_s / secs * 100.0,
            loadavg: rss::loadavg(),
        }
    }
}

/// A started topology and what has been measured of it so far.
struct Live {
    kind: Kind,
    running: Running,
    pids: Vec<u32>,
    idle: Vec<Mem>,
    idle_after_warmup: Vec<Mem>,
    warmup_errors: u64,
    rate: PhaseAcc,
    sat: PhaseAcc,
    rate_end: Vec<Mem>,
    rate_max: Vec<Mem>,
    after_rate: Vec<Mem>,
    after_sat: Vec<Mem>,
}

impl Live {
    fn new(kind: Kind, running: Running) -> Self {
        let pids: Vec<u32> = running.procs.iter().map(Child::pid).collect();
        let n = pids.len();
        Self {
            kind,
            running,
            pids,
            idle: vec![],
            idle_after_warmup: vec![],
            warmup_errors: 0,
            rate: PhaseAcc {
                proc_cpu_s: vec![0.0; n],
                ..PhaseAcc::default()
            },
            sat: PhaseAcc {
                proc_cpu_s: vec![0.0; n],
                ..PhaseAcc::default()
            },
            rate_end: vec![Mem::default(); n],
            rate_max: vec![Mem::default(); n],
            after_rate: vec![],
            after_sat: vec![],
        }
    }

    fn memory(&self) -> Vec<Mem> {
        self.pids.iter().map(|&p| rss::sample(p)).collect()
    }

    fn proc_cpu(&self) -> Vec<f64> {
        self.pids.iter().map(|&p| rss::cpu_seconds(p)).collect()
    }

    /// Runs one round of `phase` for `len` against this topology and adds it to the totals.
    async fn round(&mut self, phase: Phase, len: Duration, ctx: &Ctx<'_>) {
        let args = ctx.env.args;
        wait_quiet(ctx.cpus, &self.pids, ctx.app_pid, args.quiet_wait).await;
        // A short unmeasured burst first: after sitting idle through the other topologies' rounds
        // the proxies' CPU, caches and connections are cold, and the first tens of milliseconds
        // are that, not the steady state this phase measures.
        let warm = loadgen::open_loop(
            &self.running.target,
            args.rate,
            ROUND_WARMUP,
            args.connections,
        )
        .await;
        self.warmup_errors += warm.errors.total();
        let (cpu0, load0, machine0) = (self.proc_cpu(), ctx.load_cpu(), rss::cpu_times(ctx.cpus));
        let sampler =
            (phase == Phase::Rate).then(|| Sampler::start(self.pids.clone(), SAMPLE_EVERY));
        let out = match phase {
            Phase::Rate => {
                loadgen::open_loop(&self.running.target, args.rate, len, args.connections).await
            }
            Phase::Saturation => {
                loadgen::closed_loop(&self.running.target, args.sat_connections, len).await
            }
        };
        if let Some(sampler) = sampler {
            for (i, (last, max)) in sampler.finish().into_iter().enumerate() {
                self.rate_end[i] = last;
                if max.rss_kib > self.rate_max[i].rss_kib {
                    self.rate_max[i] = max;
                }
            }
        }
        let (cpu1, load1, machine1) = (self.proc_cpu(), ctx.load_cpu(), rss::cpu_times(ctx.cpus));
        let acc = match phase {
            Phase::Rate => &mut self.rate,
            Phase::Saturation => &mut self.sat,
        };
        for (i, total) in acc.proc_cpu_s.iter_mut().enumerate() {
            *total += cpu1[i] - cpu0[i];
        }
        let procs_s: f64 = cpu1.iter().sum::<f64>() - cpu0.iter().sum::<f64>();
        acc.load_cpu_s += load1 - load0;
        acc.ours_s += procs_s + (load1 - load0);
        let d = machine1 - machine0;
        acc.machine.busy_s += d.busy_s;
        acc.machine.steal_s += d.steal_s;
        match &mut acc.outcome {
            Some(total) => total.absorb(out),
            None => acc.outcome = Some(out),
        }
    }

    fn finish(mut self) -> TopologyResult {
        let mut crashed = Vec::new();
        for c in &mut self.running.procs {
            if let Err(e) = c.check_alive() {
                crashed.push(format!("{e:#}"));
            }
        }
        let procs = self
            .running
            .procs
            .iter()
            .enumerate()
            .map(|(i, c)| ProcResult {
                name: c.name().to_owned(),
                command_line: c.command_line.clone(),
                cpus_allowed: rss::cpus_allowed(c.pid()),
                idle: self.idle.get(i).copied().unwrap_or_default(),
                idle_after_warmup: self.idle_after_warmup.get(i).copied().unwrap_or_default(),
                rate_end: self.rate_end[i],
                rate_max: self.rate_max[i],
                after_rate: self.after_rate.get(i).copied().unwrap_or_default(),
                after_sat: self.after_sat.get(i).copied().unwrap_or_default(),
                cpu_rate_s: self.rate.proc_cpu_s[i],
                cpu_sat_s: self.sat.proc_cpu_s[i],
            })
            .collect();
        let (noise_rate, noise_sat) = (self.rate.noise(), self.sat.noise());
        let decisions = self
            .running
            .decision_logs
            .iter()
            .map(|(name, path)| policy::tally(name, path))
            .collect();
        let status = match (self.rate.outcome.take(), self.sat.outcome.take()) {
            (Some(open), Some(sat)) => Status::Done(Box::new(Measured {
                warmup_errors: self.warmup_errors,
                open,
                sat,
                procs,
                load_cpu_rate_s: self.rate.load_cpu_s,
                load_cpu_sat_s: self.sat.load_cpu_s,
                noise_rate,
                noise_sat,
                crashed,
                facts: self.running.facts.clone(),
                configs: self.running.configs.clone(),
                decisions,
            })),
            _ => Status::Failed("no measurement was taken".to_owned()),
        };
        TopologyResult {
            kind: self.kind,
            status,
        }
    }
}

/// What every round needs besides the topology itself.
struct Ctx<'a> {
    env: &'a Env<'a>,
    app_pid: u32,
    /// Every CPU the benchmark uses, for the noise accounting.
    cpus: &'a [usize],
}

impl Ctx<'_> {
    /// CPU seconds of the load side: this process (load generator) and the app.
    fn load_cpu(&self) -> f64 {
        rss::cpu_seconds_of(&[std::process::id(), self.app_pid])
    }
}

/// Idle memory, warm-up, then the fixed-rate and saturation phases in interleaved rounds.
///
/// Every topology is up for the whole run and the phases are cut into rounds that rotate through
/// them, so a burst of activity elsewhere on the machine lands on all of them alike instead of
/// deciding the comparison.
async fn measure(live: &mut [Live], env: &Env<'_>, app_pid: u32) {
    if live.is_empty() {
        return;
    }
    let args = env.args;
    let mut cpus: Vec<usize> = env
        .cpus_proxy
        .iter()
        .chain(env.cpus_load)
        .copied()
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    let ctx = Ctx {
        env,
        app_pid,
        cpus: &cpus,
    };
    tokio::time::sleep(SETTLE).await;
    for l in live.iter_mut() {
        l.idle = l.memory();
    }
    for l in live.iter_mut() {
        eprintln!(
            "   warm-up {}: {} req/s for {:?}",
            l.kind.label(),
            args.rate,
            args.warmup
        );
        let warm =
            loadgen::open_loop(&l.running.target, args.rate, args.warmup, args.connections).await;
        l.warmup_errors = warm.errors.total();
    }
    tokio::time::sleep(SETTLE).await;
    for l in live.iter_mut() {
        l.idle_after_warmup = l.memory();
    }

    let rounds = args.rounds.max(1);
    let n = live.len();
    for (phase, total) in [
        (Phase::Rate, args.duration),
        (Phase::Saturation, args.sat_duration),
    ] {
        let len = total / rounds;
        match phase {
            Phase::Rate => eprintln!(
                "   fixed rate: {} req/s over {} connections, {rounds} rounds of {len:?} per topology",
                args.rate, args.connections
            ),
            Phase::Saturation => eprintln!(
                "   saturation: {} connections, {rounds} rounds of {len:?} per topology",
                args.sat_connections
            ),
        }
        for round in 0..rounds as usize {
            // Rotate who goes first so no topology always follows the same neighbour.
            for j in 0..n {
                live[(round + j) % n].round(phase, len, &ctx).await;
            }
        }
        for l in live.iter_mut() {
            match phase {
                Phase::Rate => l.after_rate = l.memory(),
                Phase::Saturation => l.after_sat = l.memory(),
            }
        }
    }
}

/// Waits (at most `max`) until programs other than ours use under 5% of a core on `cpus`.
pub(crate) async fn wait_quiet(cpus: &[usize], pids: &[u32], app_pid: u32, max: Duration) {
    if max.is_zero() {
        return;
    }
    let ours = || {
        pids.iter().map(|&p| rss::cpu_seconds(p)).sum::<f64>()
            + rss::cpu_seconds_of(&[std::process::id(), app_pid])
    };
    let window = Duration::from_millis(500);
    let deadline = Instant::now() + max;
    let mut told = false;
    loop {
        let (cpu0, ours0) = (rss::cpu_times(cpus), ours());
        tokio::time::sleep(window).await;
        let other =
            ((rss::cpu_times(cpus) - cpu0).busy_s - (ours() - ours0)) / window.as_secs_f64();
        if other < 0.05 {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "   machine still busy ({:.0}% of a core) after {max:?}; measuring anyway",
                other * 100.0
            );
            return;
        }
        if !told {
            eprintln!(
                "   waiting for other programs to leave CPUs {cpus:?} ({:.0}% of a core busy)",
                other * 100.0
            );
            told = true;
        }
    }
}
