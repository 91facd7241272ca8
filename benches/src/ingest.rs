//! Decision ingest end to end: real `mandate serve` (SQLite, and PostgreSQL when installed) ← a
//! managed tool sidecar and a managed agent sidecar, both with `--state-dir` so their decisions go
//! through the on-disk spool ← closed-loop load through the agent's outbound listener. Measures
//! the rate at which decisions land in the control plane's hash-chained audit table
//! (`mandate_cp_decisions_ingested_total`), that the spools drain
//! (`mandate_decision_spool_bytes` back to 0), and the pair's added latency over a direct call at
//! the fixed rate with the spool on and off.

use std::cell::Cell;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::Full;

use crate::cli::BenchArgs;
use crate::control_plane::{self, Part, Serve, TARGET_INGEST_PER_S, TRUST_DOMAIN};
use crate::delegation::{self, Sidecar};
use crate::loadgen::{self, Outcome, Target};
use crate::postgres::Postgres;
use crate::procs::{Child, Pinner, TempDir};
use crate::rss;
use crate::topology::{BODY_BYTES, SetupError, TOOL_AUTHORITY};

/// Target: the pair's added latency over direct with the spool on, p99, ms.
pub const TARGET_ADDED_P99_MS: f64 = 0.35;
/// Unmeasured load before the measured window.
const WARMUP: Duration = Duration::from_secs(2);
/// Unmeasured load at the fixed rate before every latency round.
const ROUND_WARMUP: Duration = Duration::from_millis(500);
/// How long the spools may take to drain after the load.
const DRAIN_TIME: Duration = Duration::from_secs(60);
/// How often the metrics are polled.
const POLL: Duration = Duration::from_millis(100);
/// Ceiling of the agents.
const CEILING: &str = r#"[{"host":"tool"}]"#;

/// The end-to-end run on one backend.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Store facts.
    pub facts: Vec<String>,
    /// The load during the measured window.
    pub load: Outcome,
    /// Decisions newly stored during the window (the control plane's counter).
    pub landed: u64,
    /// Length of the window, s.
    pub secs: f64,
    /// Largest spool seen on the agent's and the tool's sidecar during the window, bytes.
    pub spool_peak: [u64; 2],
    /// Time from the end of the load until both spools were empty and the counter still, s.
    pub drain_s: Option<f64>,
    /// Decisions stored from the window's start until drained.
    pub landed_total: u64,
    /// CPU during the window, percent of one core: `mandate serve`, PostgreSQL, agent's sidecar,
    /// tool's sidecar.
    pub cpu_pct: [f64; 4],
    /// `mandate audit verify` after the run (first line), or why it failed.
    pub audit: String,
    /// How `mandate serve` and the sidecars were started.
    pub started: Vec<(String, String)>,
}

impl Backend {
    /// Decisions landed per second during the window.
    pub fn rate(&self) -> f64 {
        self.landed as f64 / self.secs.max(1e-9)
    }
    /// Decisions made per second during the window (two per call: the agent's sidecar outbound
    /// and the tool's inbound).
    pub fn made_rate(&self) -> f64 {
        2.0 * self.load.ok as f64 / self.secs.max(1e-9)
    }
}

/// The pair's latency with the spool on and off, next to direct.
#[derive(Debug, Clone)]
pub struct Latency {
    /// direct, spool, memory.
    pub variants: Vec<(&'static str, Outcome)>,
    /// p50/p99 per round, ms, per variant.
    pub rounds: Vec<Vec<(f64, f64)>>,
    /// Measured time per variant.
    pub duration: Duration,
    /// CPU other programs used on the benchmark's CPUs during each variant's rounds, percent of
    /// one core.
    pub other_pct: Vec<f64>,
}

impl Latency {
    /// (p50, p99) added over direct by variant `i`, ms.
    pub fn added(&self, i: usize) -> (f64, f64) {
        let d = &self.variants[0].1;
        let v = &self.variants[i].1;
        (v.ms(0.5) - d.ms(0.5), v.ms(0.99) - d.ms(0.99))
    }
}

/// Everything this benchmark measured.
#[derive(Debug, Clone)]
pub struct IngestReport {
    /// End to end into SQLite.
    pub sqlite: Part<Backend>,
    /// End to end into PostgreSQL.
    pub postgres: Part<Backend>,
    /// Pair latency, spool on and off.
    pub latency: Part<Latency>,
    /// Wall time, s.
    pub wall_s: f64,
    /// Scratch directory, shown as `<tmp>`.
    pub tmp: String,
    /// CPUs of the sidecars; of load, app and control plane.
    pub cpus: [Vec<usize>; 2],
}

impl IngestReport {
    /// Names of the parts that failed.
    pub fn failures(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        for (name, p) in [
            ("ingest end to end (SQLite)", &self.sqlite),
            ("ingest end to end (PostgreSQL)", &self.postgres),
        ] {
            match p {
                Part::Failed(_) => f.push(name),
                Part::Done(b) if b.drain_s.is_none() => f.push(name),
                _ => {}
            }
        }
        if matches!(self.latency, Part::Failed(_)) {
            f.push("pair latency with the spool");
        }
        f
    }
}

/// Runs every part.
pub async fn run(
    args: &BenchArgs,
    cpus_proxy: &[usize],
    cpus_load: &[usize],
) -> anyhow::Result<IngestReport> {
    let started = Instant::now();
    let tmp = TempDir::new(args.keep_tmp)?;
    let mut parts = Vec::new();
    for pg in [false, true] {
        let name = if pg { "PostgreSQL" } else { "SQLite" };
        eprintln!(
            "== ingest end to end into {name}: {} connections through a spooling pair for {:?}",
            args.sat_connections, args.ingest_time
        );
        let p = Part::from_result(end_to_end(args, tmp.path(), cpus_proxy, cpus_load, pg).await);
        match &p {
            Part::Done(b) => eprintln!(
                "   {name}: {:.0} decisions/s landed ({:.0}/s made), drained in {:?} s",
                b.rate(),
                b.made_rate(),
                b.drain_s
            ),
            Part::Skipped(why) => eprintln!("   {name}: skipped: {why}"),
            Part::Failed(why) => eprintln!("   {name}: FAILED: {why}"),
        }
        parts.push(p);
    }
    eprintln!(
        "== pair latency with the spool on and off, {} req/s, {:?} per variant",
        args.rate, args.ingest_pair_duration
    );
    let latency = Part::from_result(latency(args, tmp.path(), cpus_proxy, cpus_load).await);
    if let Part::Failed(why) = &latency {
        eprintln!("   FAILED: {why}");
    }
    let postgres = parts.pop().expect("two parts");
    let sqlite = parts.pop().expect("two parts");
    Ok(IngestReport {
        sqlite,
        postgres,
        latency,
        wall_s: started.elapsed().as_secs_f64(),
        tmp: tmp.path().display().to_string(),
        cpus: [cpus_proxy.to_vec(), cpus_load.to_vec()],
    })
}

/// The sum of the samples of metric `name` in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let v: f64 = rest.rsplit_once(' ')?.1.trim().parse().ok()?;
        *found.get_or_insert(0.0) += v;
    }
    found
}

/// `GET /metrics` at `addr`, metric `name`.
async fn scrape(addr: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let req = Request::get("/metrics")
        .header(http::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let (status, text) = delegation::http(addr, req).await?;
    if status != StatusCode::OK {
        bail!("GET {addr}/metrics answered {status}");
    }
    metric(&text, name).with_context(|| format!("no {name} at {addr}/metrics"))
}

/// What every setup here needs: the control plane, the app, the binaries.
struct Base {
    serve: Serve,
    app: Child,
    app_addr: SocketAddr,
    proxy: std::path::PathBuf,
    mandate: std::path::PathBuf,
    pinner: Pinner,
    dir: std::path::PathBuf,
}

async fn base(
    args: &BenchArgs,
    dir: &Path,
    cpus_load: &[usize],
    url: Option<&str>,
) -> Result<Base, SetupError> {
    let [mandate, proxy] = crate::topology::release_bins(args)?;
    let has_spool = std::process::Command::new(&proxy)
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--spool-dir"));
    if !has_spool {
        return Err(SetupError::Unavailable(format!(
            "{} has no --spool-dir (built before the disk spool)",
            proxy.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(anyhow::Error::from)?;
    let pinner = Pinner::new();
    let ctx = control_plane::Ctx {
        args,
        bin: &mandate,
        tmp: dir,
        cpus: cpus_load,
        pinner: &pinner,
    };
    let serve = Serve::start(&ctx, "serve", url, &[]).await?;
    let (app, app_addr) = crate::app::start(&pinner, cpus_load, dir)?;
    let policy_dir = std::fs::canonicalize(&args.policy_dir)
        .with_context(|| format!("--policy-dir {}", args.policy_dir.display()))?;
    serve
        .cli(
            &mandate,
            &["policy", "push", &policy_dir.display().to_string()],
        )
        .await?;
    Ok(Base {
        serve,
        app,
        app_addr,
        proxy,
        mandate,
        pinner,
        dir: dir.to_owned(),
    })
}

impl Base {
    /// Registers service `tool` and agent `agent`, starts both sidecars (with `--state-dir` when
    /// `spool`), and checks a call goes through.
    async fn pair(
        &self,
        args: &BenchArgs,
        cpus: &[usize],
        tool: &str,
        agent: &str,
        spool: bool,
    ) -> anyhow::Result<(Sidecar, Sidecar)> {
        let cli = |argv: Vec<String>| async move {
            let a: Vec<&str> = argv.iter().map(String::as_str).collect();
            self.serve.cli(&self.mandate, &a).await
        };
        let tool_token = delegation::join_token_in(
            &cli(vec![
                "service".into(),
                "register".into(),
                tool.into(),
                "--owner".into(),
                "tools@example.com".into(),
            ])
            .await?,
        )?;
        let scopes = serde_json::Value::Array(delegation::pair_scopes()).to_string();
        let agent_token = delegation::join_token_in(
            &cli(vec![
                "agent".into(),
                "register".into(),
                agent.into(),
                "--owner".into(),
                "alice@example.com".into(),
                "--ceiling".into(),
                CEILING.into(),
                "--autonomous".into(),
                scopes,
            ])
            .await?,
        )?;
        let state = |name: &str| -> Vec<String> {
            if spool {
                vec![
                    "--state-dir".to_owned(),
                    self.dir.join(format!("state-{name}")).display().to_string(),
                ]
            } else {
                vec![]
            }
        };
        let mut extra = vec!["--app".to_owned(), self.app_addr.to_string()];
        extra.extend(state(tool));
        let tool_name = format!("sidecar-{tool}");
        let t = delegation::sidecar(
            args,
            &self.pinner,
            &self.dir,
            &self.proxy,
            &self.serve,
            &tool_name,
            &tool_token,
            extra,
            cpus,
        )
        .await?;
        let mut extra = vec![
            "--route".to_owned(),
            format!(
                "{TOOL_AUTHORITY}={},id=spiffe://{TRUST_DOMAIN}/service/{tool}",
                t.ports.inbound
            ),
        ];
        extra.extend(state(agent));
        let agent_name = format!("sidecar-{agent}");
        let a = delegation::sidecar(
            args,
            &self.pinner,
            &self.dir,
            &self.proxy,
            &self.serve,
            &agent_name,
            &agent_token,
            extra,
            cpus,
        )
        .await?;
        delegation::expect_status(a.ports.outbound, &[], StatusCode::OK, agent).await?;
        Ok((t, a))
    }
}

fn target(connect: SocketAddr, uri: &'static str) -> Target {
    Target {
        connect,
        uri: Uri::from_static(uri),
        host: HeaderValue::from_static(TOOL_AUTHORITY),
        expect_body: Some(BODY_BYTES),
        headers: vec![],
    }
}

async fn end_to_end(
    args: &BenchArgs,
    tmp: &Path,
    cpus_proxy: &[usize],
    cpus_load: &[usize],
    pg: bool,
) -> Result<Backend, SetupError> {
    let dir = tmp.join(if pg { "e2e-postgres" } else { "e2e-sqlite" });
    let (db, facts) = Postgres::store(&dir.join("postgres"), cpus_load, pg)?;
    let url = db.as_ref().map(Postgres::url);
    let mut b = base(args, &dir, cpus_load, url.as_deref()).await?;
    let (tool, agent) = b
        .pair(args, cpus_proxy, "tool", "bench-agent", true)
        .await?;
    let t = target(agent.ports.outbound, "http://tool:8080/");
    let _ = loadgen::closed_loop(&t, args.sat_connections, WARMUP).await;
    let cp = b.serve.metrics;
    let ingested = || scrape(cp, "mandate_cp_decisions_ingested_total");
    let spool = |s: &Sidecar| scrape(s.ports.admin, "mandate_decision_spool_bytes");
    let db_pid = db.as_ref().map(Postgres::pid);
    let pids = [
        Some(b.serve.pid()),
        db_pid,
        Some(agent.child.pid()),
        Some(tool.child.pid()),
    ];
    let cpu = || pids.map(|p| p.map_or(0.0, rss::cpu_seconds));
    let c0 = cpu();
    let n0 = ingested().await?;
    let start = Instant::now();
    let done = Cell::new(false);
    let peak = Cell::new([0u64; 2]);
    let load = async {
        let o = loadgen::closed_loop(&t, args.sat_connections, args.ingest_time).await;
        done.set(true);
        o
    };
    let sample = async {
        while !done.get() {
            if let (Ok(a), Ok(t)) = (spool(&agent).await, spool(&tool).await) {
                let p = peak.get();
                peak.set([p[0].max(a as u64), p[1].max(t as u64)]);
            }
            tokio::time::sleep(POLL * 2).await;
        }
    };
    let (load, ()) = tokio::join!(load, sample);
    let n1 = ingested().await?;
    let secs = start.elapsed().as_secs_f64();
    let c1 = cpu();
    let cpu_pct = std::array::from_fn(|i| (c1[i] - c0[i]) / secs * 100.0);
    // Drained: both spools empty and the counter unchanged over a poll.
    let stop = Instant::now();
    let mut last = n1;
    let mut drain_s = None;
    while stop.elapsed() < DRAIN_TIME {
        tokio::time::sleep(POLL).await;
        let n = ingested().await?;
        if spool(&agent).await? == 0.0 && spool(&tool).await? == 0.0 && n == last {
            drain_s = Some(stop.elapsed().as_secs_f64());
            break;
        }
        last = n;
    }
    let audit = match b
        .serve
        .cli(&b.mandate, &["audit", "verify"])
        .await
        .map(|o| o.lines().next().unwrap_or("").to_owned())
    {
        Ok(o) => format!("`{o}`"),
        Err(e) => format!("failed: {}", format!("{e:#}").replace('\n', " ")),
    };
    let mut started = vec![(
        "mandate serve".to_owned(),
        b.serve.child.command_line.clone(),
    )];
    for (name, mut s) in [("tool's sidecar", tool), ("agent's sidecar", agent)] {
        s.child
            .check_alive()
            .with_context(|| format!("the {name} died during the run"))?;
        started.push((name.to_owned(), s.child.command_line.clone()));
    }
    b.app.check_alive().context("the app died during the run")?;
    b.serve.child.check_alive()?;
    b.serve.child.stop(Duration::from_secs(3));
    drop(db);
    Ok(Backend {
        facts,
        load,
        landed: (n1 - n0) as u64,
        secs,
        spool_peak: peak.get(),
        drain_s,
        landed_total: (last - n0) as u64,
        cpu_pct,
        audit,
        started,
    })
}

async fn latency(
    args: &BenchArgs,
    tmp: &Path,
    cpus_proxy: &[usize],
    cpus_load: &[usize],
) -> Result<Latency, SetupError> {
    let b = base(args, &tmp.join("latency"), cpus_load, None).await?;
    let (t1, a1) = b
        .pair(args, cpus_proxy, "tool", "bench-spool", true)
        .await?;
    let (t2, a2) = b
        .pair(args, cpus_proxy, "tool-mem", "bench-memory", false)
        .await?;
    let pids = [
        b.serve.pid(),
        t1.child.pid(),
        a1.child.pid(),
        t2.child.pid(),
        a2.child.pid(),
        b.app.pid(),
        std::process::id(),
    ];
    let mut cpus: Vec<usize> = cpus_proxy.iter().chain(cpus_load).copied().collect();
    cpus.sort_unstable();
    cpus.dedup();
    let mut other = [(0.0f64, 0.0f64); 3];
    let targets = [
        ("direct", target(b.app_addr, "/")),
        (
            "managed pair, spool on (--state-dir)",
            target(a1.ports.outbound, "http://tool:8080/"),
        ),
        (
            "managed pair, memory queue (no --state-dir)",
            target(a2.ports.outbound, "http://tool:8080/"),
        ),
    ];
    for (_, t) in &targets {
        let _ = loadgen::open_loop(t, args.rate, WARMUP / 2, args.connections).await;
    }
    let rounds = args.rounds.max(1) as usize;
    let len = args.ingest_pair_duration / rounds as u32;
    let mut outcomes: Vec<Option<Outcome>> = vec![None, None, None];
    let mut per_round = vec![Vec::new(); 3];
    for round in 0..rounds {
        for j in 0..3 {
            let i = (round + j) % 3;
            let t = &targets[i].1;
            crate::topology::wait_quiet(&cpus, &pids[..5], b.app.pid(), args.quiet_wait).await;
            let _ = loadgen::open_loop(t, args.rate, ROUND_WARMUP, args.connections).await;
            let busy = control_plane::Busy::start(&pids);
            let t0 = Instant::now();
            let out = loadgen::open_loop(t, args.rate, len, args.connections).await;
            let secs = t0.elapsed().as_secs_f64();
            other[i].0 += busy.other_pct(&pids) * secs;
            other[i].1 += secs;
            per_round[i].push((out.ms(0.5), out.ms(0.99)));
            match &mut outcomes[i] {
                Some(total) => total.absorb(out),
                None => outcomes[i] = Some(out),
            }
        }
    }
    let variants = targets
        .iter()
        .zip(outcomes)
        .map(|((label, _), o)| Ok((*label, o.ok_or_else(|| anyhow!("no measurement"))?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Latency {
        variants,
        rounds: per_round,
        duration: args.ingest_pair_duration,
        other_pct: other.iter().map(|(p, s)| p / s.max(1e-9)).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Report.

/// The targets: (what, limit, measured, verdict).
pub fn targets(r: &IngestReport) -> Vec<[String; 4]> {
    let mut out = Vec::new();
    for (name, p) in [("SQLite", &r.sqlite), ("PostgreSQL", &r.postgres)] {
        let what = format!(
            "decisions/s end to end, sidecar → disk spool → control plane → audit table, {name}"
        );
        let limit = format!("≥ {TARGET_INGEST_PER_S:.0}/s");
        out.push(match p {
            Part::Done(b) => [
                what,
                limit,
                format!(
                    "{:.0}/s landed ({:.0}/s made by the pair; spools drained: {})",
                    b.rate(),
                    b.made_rate(),
                    b.drain_s
                        .map_or("NO".to_owned(), |s| format!("yes, {s:.1} s after the load"))
                ),
                if b.rate() >= TARGET_INGEST_PER_S && b.drain_s.is_some() {
                    "pass"
                } else {
                    "FAIL"
                }
                .to_owned(),
            ],
            Part::Skipped(why) => [what, limit, format!("skipped: {why}"), "n/a".to_owned()],
            Part::Failed(_) => [what, limit, "failed (see below)".into(), "FAIL".into()],
        });
    }
    let what = format!(
        "managed pair with the disk spool, added over direct at {} req/s, p99",
        1000
    );
    let limit = format!("≤ {TARGET_ADDED_P99_MS} ms");
    out.push(match &r.latency {
        Part::Done(l) => {
            let (p50, p99) = l.added(1);
            [
                what,
                limit,
                format!("{p99:.3} ms (p50 {p50:.3} ms)"),
                if p99 <= TARGET_ADDED_P99_MS {
                    "pass"
                } else {
                    "FAIL"
                }
                .to_owned(),
            ]
        }
        Part::Skipped(why) => [what, limit, format!("skipped: {why}"), "n/a".to_owned()],
        Part::Failed(_) => [what, limit, "failed (see below)".into(), "FAIL".into()],
    });
    out
}

/// Lines for the terminal summary.
pub fn terminal(r: &IngestReport) -> String {
    let mut s = String::new();
    for [what, limit, measured, verdict] in targets(r) {
        let _ = writeln!(s, "target: {what} ({limit}): {measured} → {verdict}");
    }
    s
}

/// The "Decision ingest end to end" section of `docs/benchmarks.md`.
pub fn markdown(r: &IngestReport, args: &BenchArgs, command: &str, heading: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n{heading}\n");
    crate::report::command_lines(&mut s, command, &crate::report::alone_hint(args, "ingest"));
    let _ = writeln!(
        s,
        "- Sidecars on CPU {}; load generator, app, `mandate serve` (and PostgreSQL) on CPU {}. \
         Wall time {:.0} s.",
        crate::report::cpu_list(&r.cpus[0]),
        crate::report::cpu_list(&r.cpus[1]),
        r.wall_s
    );
    let _ = writeln!(s, "\n### Targets\n");
    let _ = writeln!(
        s,
        "| target | limit | measured | result |\n|---|---|---|---|"
    );
    for [what, limit, measured, verdict] in targets(r) {
        let _ = writeln!(s, "| {what} | {limit} | {measured} | **{verdict}** |");
    }
    let _ = writeln!(
        s,
        "\n**Which figure is which.** *Landed* is the rate at which `mandate serve`'s \
         `mandate_cp_decisions_ingested_total` (decisions newly stored, each appended to the \
         hash-chained audit log) grew during the measured window, scraped from its metrics \
         listener before and after. *Made* is twice the calls the load generator completed (the \
         agent's sidecar decides each call outbound, the tool's inbound). Both are bounded by what \
         one load generator can push through one pair of sidecars on this machine, not by the \
         ingest path: the ingest path alone (simulated sidecars posting {} -record batches as a \
         sidecar does, no data path) is measured in *Control plane* → decision ingest \
         (`--only control-plane`).\n",
        control_plane::BATCH
    );
    let _ = writeln!(
        s,
        "### End to end: sidecar → spool → control plane → audit table\n"
    );
    let _ = writeln!(
        s,
        "The real binaries in managed mode: `mandate serve` with the reference policy pushed; \
         service `tool` behind its sidecar (`--app` the benchmark's 1 KiB app) and agent \
         `bench-agent` (ceiling `{CEILING}`, the calls within its autonomous scopes) behind its own, \
         both with `--state-dir` (so `--spool-dir` defaults to `STATE_DIR/spool`: every decision \
         goes through the on-disk spool) and `--decision-log`. Load: closed loop, {} keep-alive \
         connections, `GET http://{TOOL_AUTHORITY}/` through the agent's outbound listener for \
         {:.0} s after {} s unmeasured. `mandate_decision_spool_bytes` is scraped from both \
         sidecars' admin listeners every {} ms during the window (peak) and every {} ms after it \
         until both are 0 and the control plane's counter stands still (drained; at most {} s).\n",
        args.sat_connections,
        args.ingest_time.as_secs_f64(),
        WARMUP.as_secs(),
        POLL.as_millis() * 2,
        POLL.as_millis(),
        DRAIN_TIME.as_secs()
    );
    let _ = writeln!(
        s,
        "| store | calls ok / errors | calls/s | decisions made/s | decisions landed/s | spool peak agent / tool KiB | drained after | landed until drained | CPU %: serve / PostgreSQL / agent's sidecar / tool's sidecar | `mandate audit verify` |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for (name, p) in [("SQLite", &r.sqlite), ("PostgreSQL", &r.postgres)] {
        match p {
            Part::Done(b) => {
                let _ = writeln!(
                    s,
                    "| {name} | {} / {} | {:.0} | {:.0} | **{:.0}** | {:.0} / {:.0} | {} | {} | {:.0} / {:.0} / {:.0} / {:.0} | {} |",
                    b.load.ok,
                    b.load.errors.total(),
                    b.load.ok as f64 / b.secs.max(1e-9),
                    b.made_rate(),
                    b.rate(),
                    b.spool_peak[0] as f64 / 1024.0,
                    b.spool_peak[1] as f64 / 1024.0,
                    b.drain_s
                        .map_or("not within the limit".to_owned(), |d| format!("{d:.1} s")),
                    b.landed_total,
                    b.cpu_pct[0],
                    b.cpu_pct[1],
                    b.cpu_pct[2],
                    b.cpu_pct[3],
                    b.audit
                );
            }
            Part::Skipped(why) => {
                let _ = writeln!(s, "| {name} | _skipped: {why}_ | | | | | | | | |");
            }
            Part::Failed(why) => {
                let _ = writeln!(
                    s,
                    "| {name} | **failed:** {} | | | | | | | | |",
                    why.replace('\n', " ").replace('|', "\\|")
                );
            }
        }
    }
    for (name, p) in [("SQLite", &r.sqlite), ("PostgreSQL", &r.postgres)] {
        if let Part::Done(b) = p {
            let _ = writeln!(s, "\n<details><summary>{name}: processes</summary>\n");
            for f in &b.facts {
                let _ = writeln!(s, "- {f}");
            }
            for (n, c) in &b.started {
                let _ = writeln!(s, "- {n}: `{c}`");
            }
            for e in &b.load.errors.samples {
                let _ = writeln!(s, "- first error: `{}`", e.replace('\n', " "));
            }
            let _ = writeln!(s, "\n</details>");
        }
    }
    let _ = writeln!(s, "\n### Pair latency with the spool on\n");
    match &r.latency {
        Part::Done(l) => {
            let _ = writeln!(
                s,
                "One `mandate serve` (SQLite) and two managed pairs of the same kind as above: \
                 `tool` + `bench-spool` with `--state-dir` (disk spool), `tool-mem` + \
                 `bench-memory` without (decisions queued in memory only). Open loop at {} req/s \
                 over {} keep-alive connections (latency from each request's intended send time), \
                 {:.0} s per variant in {} rounds rotating between direct (load generator → app) \
                 and the two pairs; before each round the harness waits up to {:.0} s for quiet \
                 CPUs and sends {} ms of unmeasured load. All four sidecars share CPU {}, one \
                 worker thread each. A p99 of direct far above its p50 is the machine's own \
                 wake-up jitter (see *Data path*), and lands on every variant alike.\n",
                args.rate,
                args.connections,
                l.duration.as_secs_f64(),
                args.rounds.max(1),
                args.quiet_wait.as_secs_f64(),
                ROUND_WARMUP.as_millis(),
                crate::report::cpu_list(&r.cpus[0])
            );
            let _ = writeln!(
                s,
                "| variant | p50 ms | p90 ms | p99 ms | p99.9 ms | requests | errors | added over direct p50 / p99 ms | other programs' CPU | per round p50 / p99 ms |\n|---|---|---|---|---|---|---|---|---|---|"
            );
            for (i, (label, o)) in l.variants.iter().enumerate() {
                let (a50, a99) = l.added(i);
                let rounds = l.rounds[i]
                    .iter()
                    .map(|(a, b)| format!("{a:.3} / {b:.3}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let _ = writeln!(
                    s,
                    "| {label} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {:.0}% | {rounds} |",
                    o.ms(0.5),
                    o.ms(0.9),
                    o.ms(0.99),
                    o.ms(0.999),
                    o.ok,
                    o.errors.total(),
                    if i == 0 {
                        "—".to_owned()
                    } else {
                        format!("{a50:+.3} / {a99:+.3}")
                    },
                    l.other_pct[i]
                );
            }
        }
        Part::Skipped(why) => {
            let _ = writeln!(s, "_Skipped: {why}_");
        }
        Part::Failed(why) => {
            let _ = writeln!(s, "**Failed:**\n\n```\n{why}\n```");
        }
    }
    s.replace(&r.tmp, "<tmp>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_their_labels() {
        let text = "# HELP x\nmandate_decision_spool_bytes 4096\nmandate_decision_spool_bytes_limit 9\n\
                    mandate_cp_decisions_ingested_total{a=\"1\"} 3\nmandate_cp_decisions_ingested_total{a=\"2\"} 4\n";
        assert_eq!(metric(text, "mandate_decision_spool_bytes"), Some(4096.0));
        assert_eq!(
            metric(text, "mandate_cp_decisions_ingested_total"),
            Some(7.0)
        );
        assert_eq!(metric(text, "absent"), None);
    }
}
