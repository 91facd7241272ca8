//! The comparison table (terminal) and `docs/benchmarks.md`.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use crate::cli::BenchArgs;
use crate::jitter::Jitter;
use crate::policy::{self, PolicyEval};
use crate::topology::{Kind, Measured, ProcResult, Status, TopologyResult};

/// Issue target: p99 the pair may add over a direct call at 1000 req/s, in ms.
pub const TARGET_ADDED_P99_MS: f64 = 0.3;
/// Issue target: a sidecar's RSS when idle, in MiB.
pub const TARGET_RSS_IDLE_MIB: f64 = 20.0;
/// Issue target: a sidecar's RSS at 1000 req/s, in MiB.
pub const TARGET_RSS_RATE_MIB: f64 = 40.0;
/// Issue target: p99 the pair with policy on both sides may add over direct at 1000 req/s, in ms.
pub const TARGET_POLICY_ADDED_P99_MS: f64 = 0.35;
/// Issue target: saturation throughput of the pair with policy, as a share of the pair without.
pub const TARGET_POLICY_SAT_RATIO: f64 = 0.85;
/// The request rate the issue's latency and memory targets are stated at.
pub const TARGET_RATE: u64 = 1000;

/// Share of a core used by other programs above which a run's figures are called distorted.
const NOISY_PCT: f64 = 5.0;

/// Facts about the machine the run happened on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// CPU model from /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// Total memory, GiB.
    pub mem_gib: f64,
    /// Start of the run, RFC 3339 UTC.
    pub date: String,
    /// `git describe` of the working tree, when available.
    pub git: Option<String>,
}

impl Machine {
    /// Reads the facts from /proc and the environment.
    pub fn collect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let git = Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        Self {
            nproc: crate::procs::online_cpus(),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
            mem_gib: mem_kib as f64 / 1024.0 / 1024.0,
            date: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            git,
        }
    }
}

/// Everything the report shows.
pub struct Report {
    /// Machine facts.
    pub machine: Machine,
    /// Options of the run.
    pub args: BenchArgs,
    /// The command line as invoked.
    pub command: String,
    /// CPUs of the proxies.
    pub cpus_proxy: Vec<usize>,
    /// CPUs of the load generator and app.
    pub cpus_load: Vec<usize>,
    /// How pinning was applied.
    pub pinning: String,
    /// Per topology.
    pub results: Vec<TopologyResult>,
    /// How the app was started.
    pub app_command: String,
    /// Wall time of the whole run.
    pub wall: Duration,
    /// The run's scratch directory, shown as `<tmp>` in the report.
    pub tmp: String,
    /// Wake-up jitter of each benchmark CPU, measured before the topologies.
    pub jitter: Vec<Jitter>,
    /// The same, measured after them.
    pub jitter_after: Vec<Jitter>,
    /// In-process policy evaluation (None when skipped).
    pub policy_eval: Option<Result<PolicyEval, String>>,
    /// The control-plane benchmark (None when not selected).
    pub control_plane: Option<Result<crate::control_plane::ControlPlaneReport, String>>,
    /// The delegation benchmark (None when not selected).
    pub delegation: Option<Result<crate::delegation::DelegationReport, String>>,
    /// The end-to-end ingest benchmark (None when not selected).
    pub ingest: Option<Result<crate::ingest::IngestReport, String>>,
}

impl Report {
    fn measured(&self, kind: Kind) -> Option<&Measured> {
        self.results.iter().find_map(|r| match &r.status {
            Status::Done(m) if r.kind == kind => Some(&**m),
            _ => None,
        })
    }

    /// p99 of `kind` minus direct p99 (fixed-rate phase, from intended send times), ms.
    fn added_p99(&self, kind: Kind) -> Option<f64> {
        let base = self.measured(Kind::Direct)?;
        let m = self.measured(kind)?;
        Some(m.open.ms(0.99) - base.open.ms(0.99))
    }

    /// The same difference for service time (from actual send), ms.
    fn added_service_p99(&self, kind: Kind) -> Option<f64> {
        let base = self.measured(Kind::Direct)?;
        let m = self.measured(kind)?;
        Some(m.open.service_ms(0.99) - base.open.service_ms(0.99))
    }

    /// The benchmark CPUs' wake-up jitter at p99, in ms (the worst CPU, before or after).
    fn jitter_p99_ms(&self) -> Option<f64> {
        self.jitter
            .iter()
            .chain(&self.jitter_after)
            .map(|j| j.p99_us as f64 / 1000.0)
            .reduce(f64::max)
    }
}

fn cpus(c: &[usize]) -> String {
    c.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// Whether other programs used the benchmark's CPUs enough to distort this topology's figures.
fn busy(m: &Measured) -> bool {
    m.noise_rate.other_pct.max(m.noise_sat.other_pct) > NOISY_PCT
}

/// Failed requests, plus calls a policy pair's sidecars denied (the load must be allowed).
fn errors_of(m: &Measured) -> u64 {
    m.warmup_errors + m.open.errors.total() + m.sat.errors.total() + denied_of(m)
}

fn denied_of(m: &Measured) -> u64 {
    m.decisions.iter().map(|d| d.denied + d.unreadable).sum()
}

/// Per-proxy figures joined as "A x / B y".
fn per_proc(m: &Measured, f: impl Fn(&ProcResult) -> f64) -> String {
    if m.procs.is_empty() {
        return "–".to_owned();
    }
    m.procs
        .iter()
        .map(|p| format!("{} {:.1}", role(&p.name), f(p)))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// "A" or "B" from a process name like `sidecar-A-outbound`.
fn role(name: &str) -> &'static str {
    if name.contains("-A-") { "A" } else { "B" }
}

fn cpu_us_per_req(cpu_s: f64, m: &Measured, sat: bool) -> f64 {
    let reqs = if sat {
        m.sat.ok + m.sat.errors.total()
    } else {
        m.open.ok + m.open.errors.total()
    };
    cpu_s * 1e6 / reqs.max(1) as f64
}

/// One row of the main table, as cells.
fn row(r: &Report, t: &TopologyResult) -> Vec<String> {
    let label = t.kind.label().to_owned();
    match &t.status {
        Status::Done(m) => {
            let errs = errors_of(m);
            let mut flag = String::new();
            if errs > 0 || !m.crashed.is_empty() {
                flag.push_str(" ⚠");
            }
            if busy(m) {
                flag.push_str(" (busy machine)");
            }
            vec![
                format!("{label}{flag}"),
                format!("{:.3}", m.open.ms(0.5)),
                format!("{:.3}", m.open.ms(0.99)),
                format!("{:.3}", m.open.ms(0.999)),
                match (t.kind, r.added_p99(t.kind)) {
                    (Kind::Direct, _) | (_, None) => "–".to_owned(),
                    (_, Some(v)) => format!("{v:+.3}"),
                },
                format!("{:.0}", m.open.throughput()),
                errs.to_string(),
                format!("{:.0}", m.sat.throughput()),
                format!("{:.2} / {:.2}", m.sat.ms(0.5), m.sat.ms(0.99)),
                per_proc(m, |p| p.idle.rss_mib()),
                per_proc(m, |p| p.rate_max.rss_mib()),
                per_proc(m, |p| p.after_sat.hwm_mib()),
                per_proc(m, |p| cpu_us_per_req(p.cpu_rate_s, m, false)),
            ]
        }
        Status::Skipped(why) => vec![label, format!("skipped: {why}")],
        Status::Failed(why) => vec![
            label,
            format!("FAILED: {}", why.lines().next().unwrap_or("")),
        ],
    }
}

fn headers(r: &Report) -> Vec<String> {
    [
        "topology",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "added p99 ms",
        "achieved req/s",
        "errors",
        "saturation req/s",
        "sat p50/p99 ms",
        "RSS idle MiB",
        &format!("RSS @{} req/s MiB", r.args.rate),
        "peak RSS MiB",
        "CPU µs/req",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// The comparison table for the terminal.
pub fn terminal_table(r: &Report) -> String {
    let head = headers(r);
    let rows: Vec<Vec<String>> = r.results.iter().map(|t| row(r, t)).collect();
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        // Skipped/failed rows have one long cell; do not let it widen the second column.
        if row.len() == head.len() {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nmandate-bench: {} req/s open loop for {:?} ({} conns), saturation {} conns for {:?}; \
         proxies on CPU {}, load+app on CPU {}, {} worker(s) per proxy",
        r.args.rate,
        r.args.duration,
        r.args.connections,
        r.args.sat_connections,
        r.args.sat_duration,
        cpus(&r.cpus_proxy),
        cpus(&r.cpus_load),
        r.args.workers
    );
    let _ = writeln!(out, "{}", line(&head));
    let _ = writeln!(
        out,
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for row in &rows {
        if row.len() == head.len() {
            let _ = writeln!(out, "{}", line(row));
        } else {
            let _ = writeln!(out, "{}", row.join(" | "));
        }
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "machine wake-up jitter before: {}\nmachine wake-up jitter after:  {}",
        jitter_text(&r.jitter),
        jitter_text(&r.jitter_after)
    );
    for t in &r.results {
        if let Status::Done(m) = &t.status {
            let worst = m.noise_rate.other_pct.max(m.noise_sat.other_pct);
            if busy(m) {
                let _ = writeln!(
                    out,
                    "warning: {}: other programs used up to {worst:.0}% of a core on the benchmark's CPUs; \
                     its figures are distorted",
                    t.kind.label()
                );
            }
        }
    }
    match &r.policy_eval {
        Some(Ok(pe)) => {
            for row in &pe.rows {
                let _ = writeln!(
                    out,
                    "policy evaluation {} × {} thread(s): p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, {:.0} evaluations/s",
                    row.engine,
                    row.threads,
                    row.us(0.5),
                    row.us(0.99),
                    row.us(0.999),
                    row.rate()
                );
            }
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "policy evaluation FAILED: {e}");
        }
        None => {}
    }
    if let Some(m) = r.measured(Kind::MandatePolicy) {
        for d in &m.decisions {
            let _ = writeln!(
                out,
                "decision log {}: {} allowed, {} denied, {} unreadable, mean eval {:.1} µs",
                d.name, d.allowed, d.denied, d.unreadable, d.mean_eval_us
            );
        }
    }
    for (name, measured, target, verdict) in targets(r) {
        let _ = writeln!(out, "target: {name} ({target}): {measured} → {verdict}");
    }
    match &r.control_plane {
        Some(Ok(cp)) => out.push_str(&crate::control_plane::terminal(cp)),
        Some(Err(e)) => {
            let _ = writeln!(out, "control plane benchmark FAILED: {e}");
        }
        None => {}
    }
    match &r.delegation {
        Some(Ok(d)) => out.push_str(&crate::delegation::terminal(d)),
        Some(Err(e)) => {
            let _ = writeln!(out, "delegation benchmark FAILED: {e}");
        }
        None => {}
    }
    match &r.ingest {
        Some(Ok(i)) => out.push_str(&crate::ingest::terminal(i)),
        Some(Err(e)) => {
            let _ = writeln!(out, "ingest benchmark FAILED: {e}");
        }
        None => {}
    }
    out
}

fn jitter_text(j: &[Jitter]) -> String {
    j.iter()
        .map(|j| {
            format!(
                "CPU {}: p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
                j.cpu, j.p50_us, j.p99_us, j.p999_us, j.max_us
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The issue's targets: (name, measured, target, verdict).
fn targets(r: &Report) -> Vec<(String, String, String, String)> {
    let mut t = Vec::new();
    let at_rate = if r.args.rate == TARGET_RATE {
        format!("at {TARGET_RATE} req/s")
    } else {
        format!(
            "at {} req/s (target is stated at {TARGET_RATE})",
            r.args.rate
        )
    };
    let mandate = r.measured(Kind::Mandate);
    let nginx = r.measured(Kind::Nginx);
    let any_busy = r.results.iter().any(|t| match &t.status {
        Status::Done(m) => busy(m),
        _ => false,
    });
    let verdict = |ok: bool, m: &Measured| {
        let v = if errors_of(m) > 0 {
            "FAIL (run had errors)"
        } else if ok {
            "pass"
        } else {
            "FAIL"
        };
        if any_busy {
            format!("{v} (machine was busy: rerun to confirm)")
        } else {
            v.to_owned()
        }
    };
    let na = |why: &str| ("n/a".to_owned(), format!("not measured ({why})"));

    let (measured, v) = match (mandate, r.added_p99(Kind::Mandate)) {
        (Some(m), Some(added)) => {
            let nginx_note = r
                .added_p99(Kind::Nginx)
                .map(|n| format!("; nginx pair {n:+.3} ms"))
                .unwrap_or_default();
            let service = r
                .added_service_p99(Kind::Mandate)
                .map(|v| format!("; service time {v:+.3} ms"))
                .unwrap_or_default();
            let jitter = r
                .jitter_p99_ms()
                .map(|j| format!("; machine wake-up jitter p99 {j:.3} ms"))
                .unwrap_or_default();
            (
                format!(
                    "{added:+.3} ms ({}{service}{nginx_note}{jitter})",
                    "from intended send time"
                ),
                verdict(added <= TARGET_ADDED_P99_MS, m),
            )
        }
        _ => na("mandate pair or direct missing"),
    };
    t.push((
        format!("added p99 over direct, mandate pair, {at_rate}"),
        measured,
        format!("≤ {TARGET_ADDED_P99_MS} ms"),
        v,
    ));

    let (measured, v) = match (mandate, nginx) {
        (Some(m), Some(n)) => (
            format!(
                "{:.0} vs {:.0} req/s ({:.2}×)",
                m.sat.throughput(),
                n.sat.throughput(),
                m.sat.throughput() / n.sat.throughput().max(1e-9)
            ),
            verdict(m.sat.throughput() >= n.sat.throughput(), m),
        ),
        (Some(_), None) => na("nginx pair missing"),
        _ => na("mandate pair missing"),
    };
    t.push((
        "saturation throughput, mandate pair vs nginx pair".to_owned(),
        measured,
        "≥ nginx".to_owned(),
        v,
    ));

    let with_policy = r.measured(Kind::MandatePolicy);
    let (measured, v) = match (with_policy, r.added_p99(Kind::MandatePolicy)) {
        (Some(m), Some(added)) => {
            let service = r
                .added_service_p99(Kind::MandatePolicy)
                .map(|v| format!("; service time {v:+.3} ms"))
                .unwrap_or_default();
            let without = r
                .added_p99(Kind::Mandate)
                .map(|v| format!("; pair without policy {v:+.3} ms"))
                .unwrap_or_default();
            (
                format!("{added:+.3} ms (from intended send time{service}{without})"),
                verdict(added <= TARGET_POLICY_ADDED_P99_MS, m),
            )
        }
        _ => na("policy pair or direct missing"),
    };
    t.push((
        format!("added p99 over direct, mandate pair + policy (both sides), {at_rate}"),
        measured,
        format!("≤ {TARGET_POLICY_ADDED_P99_MS} ms"),
        v,
    ));
    let (measured, v) = match (with_policy, mandate) {
        (Some(p), Some(m)) => {
            let ratio = p.sat.throughput() / m.sat.throughput().max(1e-9);
            (
                format!(
                    "{:.0} vs {:.0} req/s ({:.1}%)",
                    p.sat.throughput(),
                    m.sat.throughput(),
                    ratio * 100.0
                ),
                verdict(ratio >= TARGET_POLICY_SAT_RATIO, p),
            )
        }
        _ => na("policy pair or mandate pair missing"),
    };
    t.push((
        "saturation throughput, mandate pair + policy vs mandate pair".to_owned(),
        measured,
        format!("≥ {:.0}%", TARGET_POLICY_SAT_RATIO * 100.0),
        v,
    ));
    let (measured, v) = match &r.policy_eval {
        Some(Ok(pe)) => match pe.rows.iter().find(|x| x.engine == "rvm" && x.threads == 1) {
            Some(row) => (
                format!(
                    "{:.2} µs (p99 {:.2} µs, 1 thread)",
                    row.us(0.5),
                    row.us(0.99)
                ),
                if row.us(0.5) <= policy::TARGET_P50_US {
                    "pass".to_owned()
                } else {
                    "FAIL".to_owned()
                },
            ),
            None => na("no rvm row"),
        },
        Some(Err(_)) => ("n/a".to_owned(), "FAIL (benchmark failed)".to_owned()),
        None => na("--skip-policy-eval"),
    };
    t.push((
        "policy evaluation p50, reference policy, 10,000 agents, rvm".to_owned(),
        measured,
        format!("≤ {} µs", policy::TARGET_P50_US),
        v,
    ));

    for (what, limit, pick) in [
        (
            "sidecar RSS idle (each)".to_owned(),
            TARGET_RSS_IDLE_MIB,
            (|p: &ProcResult| p.idle.rss_mib()) as fn(&ProcResult) -> f64,
        ),
        (
            format!("sidecar RSS {at_rate} (each; largest sample during the phase)"),
            TARGET_RSS_RATE_MIB,
            |p: &ProcResult| p.rate_max.rss_mib(),
        ),
    ] {
        let (measured, v) = match mandate {
            Some(m) => {
                let worst = m.procs.iter().map(pick).fold(0.0, f64::max);
                (
                    format!("{} MiB", per_proc(m, pick)),
                    if worst <= limit {
                        "pass".to_owned()
                    } else {
                        "FAIL".to_owned()
                    },
                )
            }
            None => na("mandate pair missing"),
        };
        t.push((what, measured, format!("≤ {limit} MiB"), v));
    }
    t
}

fn md_row(cells: &[String]) -> String {
    format!("| {} |", cells.join(" | "))
}

fn md_sep(n: usize) -> String {
    format!("|{}", "---|".repeat(n))
}

/// The whole of `docs/benchmarks.md`.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let a = &r.args;
    let m = &r.machine;
    let _ = writeln!(
        s,
        "# Benchmarks\n\n\
         This file is generated by `make bench` (`mandate-bench`); edit the harness in `benches/`, not \
         this file. A full run rewrites it whole; a run with `--only` rewrites the sections of the \
         benchmarks it ran and keeps the others as they were (each section names its own command). \
         Sections: data path, policy evaluation, control plane, delegation verification, decision \
         ingest end to end.\n"
    );
    let _ = writeln!(s, "{DATA_PATH_HEADING}\n");
    let _ = writeln!(s, "### Run\n");
    let _ = writeln!(
        s,
        "- Date: {} (wall time of the run {:.0} s)",
        m.date,
        r.wall.as_secs_f64()
    );
    command_lines(&mut s, &r.command, "");
    if let Some(g) = &m.git {
        let _ = writeln!(s, "- Source: `{g}`");
    }
    let _ = writeln!(
        s,
        "- Machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}",
        m.nproc, m.cpu_model, m.mem_gib, m.kernel
    );
    let _ = writeln!(
        s,
        "- CPU pinning ({}): both proxies of a pair on CPU {}; load generator and upstream app on CPU {} \
         (`--cpus-proxy {}` `--cpus-load {}`). Each proxy runs {} worker thread(s) / worker process(es) \
         (`--workers {}`), so each pair gets the same cores and the same parallelism.",
        r.pinning,
        cpus(&r.cpus_proxy),
        cpus(&r.cpus_load),
        a.cpus_proxy,
        a.cpus_load,
        a.workers,
        a.workers
    );
    let _ = writeln!(
        s,
        "- Load: per topology, open loop at {} req/s for {:.0} s over {} keep-alive connections after \
         a {:.0} s warm-up at the same rate; then closed-loop saturation with {} connections for \
         {:.0} s. HTTP/1.1 `GET`, 1 KiB response body. All topologies are up for the whole run and \
         each phase is cut into {} rounds that rotate through them (`--rounds`), so load from \
         elsewhere on the machine falls on all of them alike; before each round the harness waits up \
         to {:.0} s for the CPUs to be quiet (`--quiet-wait`), then sends 0.5 s of unmeasured load \
         at the fixed rate, because a pair that sat idle through the others' rounds starts cold.",
        a.rate,
        a.duration.as_secs_f64(),
        a.connections,
        a.warmup.as_secs_f64(),
        a.sat_connections,
        a.sat_duration.as_secs_f64(),
        a.rounds,
        a.quiet_wait.as_secs_f64()
    );
    let _ = writeln!(s, "- Upstream app: `{}`", r.app_command);
    let _ = writeln!(
        s,
        "- Machine wake-up jitter (how late a thread sleeping 1 ms wakes up, 2 s per CPU): before the \
         run {}; after it {}",
        jitter_text(&r.jitter),
        jitter_text(&r.jitter_after)
    );
    for t in &r.results {
        if let Status::Done(meas) = &t.status {
            for f in meas.facts.iter().filter(|f| !f.is_empty()) {
                let _ = writeln!(s, "- {}: {f}", t.kind.label());
            }
        }
    }

    let _ = writeln!(s, "\n### Topologies\n");
    let _ = writeln!(
        s,
        "- **direct**: load generator → app.\n\
         - **mandate-proxy pair**: load generator → sidecar A outbound listener (explicit proxy, \
         `GET http://tool:8080/`) → mTLS (SVIDs from `mandate_identity::ca`, A verifies B presents \
         `spiffe://mandate.local/service/tool`) → sidecar B inbound → app. Route \
         `--route tool:8080=<B inbound>,id=spiffe://mandate.local/service/tool`, `MANDATE_LOG=warn`.\n\
         - **mandate-proxy pair + policy**: the same pair, but both sidecars decide every call with \
         the reference policy (`--policy policies/reference --data <tmp>/policy-data/data.json`, whose \
         registry holds the agent `bench` with ceiling and autonomous scopes `[{{\"host\": \"tool\", \
         \"method\": \"GET\", \"path\": \"/\"}}]` plus 10,000 filler agents) and log every decision \
         (`--decision-log <tmp>/decisions-<sidecar>.jsonl`); engine `auto` (the register VM). A decides \
         outbound, B inbound; every decision must be an allow (checked in the logs, see *Policy \
         evaluation*).\n\
         - **nginx pair**: load generator → nginx A (plain HTTP, `Host: tool:8080`) → `proxy_pass https` \
         with a client certificate, `proxy_ssl_verify on` against the same CA (by a DNS SAN: nginx cannot \
         check SPIFFE URI SANs) → nginx B (`ssl_verify_client on`) → app. Keep-alive upstream pools on \
         both hops (`keepalive 64`, HTTP/1.1, `Connection \"\"`), `access_log off`, keep-alive request \
         limits raised so no connection is recycled mid-run; B stamps an `x-forwarded-client-cert`-like \
         header as sidecar B does."
    );

    let _ = writeln!(s, "\n### Results\n");
    let head = headers(r);
    let _ = writeln!(s, "{}", md_row(&head));
    let _ = writeln!(s, "{}", md_sep(head.len()));
    for t in &r.results {
        let mut cells = row(r, t);
        cells.resize(head.len(), String::new());
        let _ = writeln!(s, "{}", md_row(&cells));
    }
    let _ = writeln!(
        s,
        "\nLatencies of the fixed-rate phase are measured from each request's *intended* send time \
         (coordinated-omission corrected); \"added p99\" is the topology's p99 minus direct's p99. \
         RSS and CPU columns are per proxy (A = caller side, B = app side); nginx figures sum the \
         master and its workers. \"peak RSS\" is VmHWM after saturation. ⚠ marks a run with errors \
         (non-200 responses, transport errors or timeouts) or a proxy that died; \"busy machine\" marks \
         one during which other programs used more than {NOISY_PCT}% of a core on the benchmark's CPUs \
         (see *Load generator health*).\n"
    );

    let _ = writeln!(s, "### Latency detail (fixed-rate phase)\n");
    let _ = writeln!(
        s,
        "| topology | p50 | p90 | p99 | p99.9 | max | service p50 | service p99 | service p99.9 | added p99 | added service p99 |\n{}",
        md_sep(11)
    );
    for t in &r.results {
        let Status::Done(meas) = &t.status else {
            continue;
        };
        let o = &meas.open;
        let added = |v: Option<f64>| match (t.kind, v) {
            (Kind::Direct, _) | (_, None) => "–".to_owned(),
            (_, Some(v)) => format!("{v:+.3}"),
        };
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} |",
            t.kind.label(),
            o.ms(0.5),
            o.ms(0.9),
            o.ms(0.99),
            o.ms(0.999),
            o.latency.max() as f64 / 1000.0,
            o.service_ms(0.5),
            o.service_ms(0.99),
            o.service_ms(0.999),
            added(r.added_p99(t.kind)),
            added(r.added_service_p99(t.kind)),
        );
    }
    let _ = writeln!(
        s,
        "\nAll in ms. The first columns are measured from each request's intended send time (what a \
         caller on a fixed schedule experiences); *service* columns from when the generator actually \
         sent it, which leaves out the generator's own dispatch delay (see *Load generator health*). \
         Both include this machine's wake-up jitter on every hop (see *Run*), which on a virtual \
         machine is often larger than the 0.3 ms budget itself. The pairs pay it more than direct: \
         their requests cross to the proxies' CPU and back twice, and that CPU sits idle between \
         rounds, while the load generator keeps direct's only CPU awake.\n"
    );

    let _ = writeln!(s, "### Targets\n");
    let _ = writeln!(
        s,
        "| target | limit | measured | result |\n|---|---|---|---|"
    );
    for (name, measured, target, verdict) in targets(r) {
        let _ = writeln!(s, "| {name} | {target} | {measured} | **{verdict}** |");
    }

    let _ = writeln!(s, "\n### Per process\n");
    let _ = writeln!(
        s,
        "| process | CPUs allowed | RSS idle | RSS idle after warm-up | RSS end of rate phase | \
         RSS max in rate phase | VmHWM after rate phase | VmHWM after saturation | PSS end of rate phase | \
         CPU in rate phase | CPU in saturation |\n{}",
        md_sep(11)
    );
    for t in &r.results {
        let Status::Done(meas) = &t.status else {
            continue;
        };
        for p in &meas.procs {
            let rate_secs = meas.open.elapsed.as_secs_f64().max(1e-9);
            let sat_secs = meas.sat.elapsed.as_secs_f64().max(1e-9);
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | \
                 {:.0}% of a core, {:.0} µs/req | {:.0}% of a core, {:.1} µs/req |",
                p.name,
                p.cpus_allowed,
                p.idle.rss_mib(),
                p.idle_after_warmup.rss_mib(),
                p.rate_end.rss_mib(),
                p.rate_max.rss_mib(),
                p.after_rate.hwm_mib(),
                p.after_sat.hwm_mib(),
                p.rate_end.pss_mib(),
                p.cpu_rate_s / rate_secs * 100.0,
                cpu_us_per_req(p.cpu_rate_s, meas, false),
                p.cpu_sat_s / sat_secs * 100.0,
                cpu_us_per_req(p.cpu_sat_s, meas, true),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nCPU is user+system time from `/proc/PID/stat` (10 ms ticks) over the phase. \
         Commands as started:\n"
    );
    for t in &r.results {
        if let Status::Done(meas) = &t.status {
            for p in &meas.procs {
                let _ = writeln!(s, "- `{}`", p.command_line);
            }
        }
    }

    let _ = writeln!(s, "\n### Load generator health\n");
    let _ = writeln!(
        s,
        "How late the generator itself sent requests after their intended time (fixed-rate phase), and \
         the CPU the load side (generator + app, CPU {}) used. A large send lag or a load side near 100% \
         of its core means the figures are bounded by the client, not the proxies. \"Other programs' CPU\" \
         is busy time on the benchmark's CPUs (/proc/stat) not used by the benchmark's own processes, in \
         percent of one core: anything above a few percent means the machine was shared and the \
         latency tails are not to be trusted.\n",
        cpus(&r.cpus_load)
    );
    let _ = writeln!(
        s,
        "| topology | send lag p50 / p99 / max µs | load-side CPU, rate phase | load-side CPU, saturation | \
         other programs' CPU, rate / saturation | steal, rate / saturation | load avg | \
         errors (warm-up / rate / saturation) | first errors |\n{}",
        md_sep(9)
    );
    for t in &r.results {
        let Status::Done(meas) = &t.status else {
            continue;
        };
        let lag = &meas.open.send_lag;
        let samples: Vec<String> = meas
            .open
            .errors
            .samples
            .iter()
            .chain(&meas.sat.errors.samples)
            .map(|e| e.replace('|', "\\|").replace('\n', " "))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} / {} / {} | {:.0}% | {:.0}% | {:.0}% / {:.0}% | {:.1}% / {:.1}% | {:.2} | {} / {} / {} | {} |",
            t.kind.label(),
            lag.value_at_quantile(0.5),
            lag.value_at_quantile(0.99),
            lag.max(),
            meas.load_cpu_rate_s / meas.open.elapsed.as_secs_f64().max(1e-9) * 100.0,
            meas.load_cpu_sat_s / meas.sat.elapsed.as_secs_f64().max(1e-9) * 100.0,
            meas.noise_rate.other_pct,
            meas.noise_sat.other_pct,
            meas.noise_rate.steal_pct,
            meas.noise_sat.steal_pct,
            meas.noise_sat.loadavg,
            meas.warmup_errors,
            meas.open.errors.total(),
            meas.sat.errors.total(),
            if samples.is_empty() {
                "–".to_owned()
            } else {
                samples.join("; ")
            }
        );
        for c in &meas.crashed {
            let _ = writeln!(
                s,
                "\n**{} died during the run:** `{}`",
                t.kind.label(),
                c.replace('\n', " ")
            );
        }
    }
    for t in &r.results {
        match &t.status {
            Status::Skipped(why) => {
                let _ = writeln!(s, "\n**{} skipped:** {why}", t.kind.label());
            }
            Status::Failed(why) => {
                let _ = writeln!(s, "\n**{} failed:**\n\n```\n{why}\n```", t.kind.label());
            }
            Status::Done(_) => {}
        }
    }

    let configs: Vec<_> = r
        .results
        .iter()
        .filter_map(|t| match &t.status {
            Status::Done(m) => Some(&m.configs),
            _ => None,
        })
        .flatten()
        .collect();
    if !configs.is_empty() {
        let _ = writeln!(s, "\n### Proxy configuration\n");
        for (name, text) in configs {
            let _ = writeln!(
                s,
                "<details><summary><code>&lt;tmp&gt;/{name}</code></summary>\n\n```nginx\n{}```\n\n</details>\n",
                text
            );
        }
    }

    s.push_str(&policy_section(r));
    match &r.control_plane {
        Some(Ok(cp)) => s.push_str(&crate::control_plane::markdown(cp, a, &r.command)),
        Some(Err(e)) => {
            let _ = writeln!(
                s,
                "\n{CONTROL_PLANE_HEADING}\n\n**Failed:**\n\n```\n{e}\n```"
            );
        }
        None => {
            let _ = writeln!(
                s,
                "\n{CONTROL_PLANE_HEADING}\n\n_Not run: `--only` did not name `control-plane`._"
            );
        }
    }
    match &r.delegation {
        Some(Ok(d)) => {
            let machine = format!(
                "{} CPUs ({}), {:.1} GiB RAM, Linux {}; source `{}`, run started {}. Wake-up \
                 jitter at the start of the run (how late a thread sleeping 1 ms wakes up, 2 s per \
                 CPU): {}",
                m.nproc,
                m.cpu_model,
                m.mem_gib,
                m.kernel,
                m.git.as_deref().unwrap_or("unknown"),
                m.date,
                jitter_text(&r.jitter)
            );
            s.push_str(&crate::delegation::markdown(d, a, &r.command, &machine));
        }
        Some(Err(e)) => {
            let _ = writeln!(s, "\n{DELEGATION_HEADING}\n\n**Failed:**\n\n```\n{e}\n```");
        }
        None => {
            let _ = writeln!(
                s,
                "\n{DELEGATION_HEADING}\n\n_Not run: `--only` did not name `delegation`._"
            );
        }
    }
    match &r.ingest {
        Some(Ok(i)) => s.push_str(&crate::ingest::markdown(i, a, &r.command, INGEST_HEADING)),
        Some(Err(e)) => {
            let _ = writeln!(s, "\n{INGEST_HEADING}\n\n**Failed:**\n\n```\n{e}\n```");
        }
        None => {
            let _ = writeln!(
                s,
                "\n{INGEST_HEADING}\n\n_Not run: `--only` did not name `ingest`._"
            );
        }
    }
    // Scratch paths differ on every run and only clutter the report.
    if r.tmp.is_empty() {
        s
    } else {
        s.replace(&r.tmp, "<tmp>")
    }
}

/// Top-level headings of `docs/benchmarks.md`, one per benchmark's section.
const DATA_PATH_HEADING: &str = "## Data path: mandate-proxy pair vs direct vs nginx pair";
const POLICY_HEADING: &str = "## Policy evaluation";
const CONTROL_PLANE_HEADING: &str = "## Control plane";
const DELEGATION_HEADING: &str = "## Delegation verification";
const INGEST_HEADING: &str = "## Decision ingest end to end (disk spool)";

/// Headings of the sections this run did not measure (their benchmarks were left out by `--only`):
/// an existing report keeps its own text for them.
pub fn sections_not_run(r: &Report) -> Vec<&'static str> {
    let mut kept = Vec::new();
    if !r.args.data_path_wanted() {
        kept.extend([DATA_PATH_HEADING, POLICY_HEADING]);
    }
    if r.control_plane.is_none() {
        kept.push(CONTROL_PLANE_HEADING);
    }
    if r.delegation.is_none() {
        kept.push(DELEGATION_HEADING);
    }
    if r.ingest.is_none() {
        kept.push(INGEST_HEADING);
    }
    kept
}

/// Splits a report into its preamble and its `## ` sections (heading line, whole text with the
/// heading); headings inside code blocks do not count.
fn sections(text: &str) -> (String, Vec<(String, String)>) {
    let mut preamble = String::new();
    let mut out: Vec<(String, String)> = Vec::new();
    let mut fenced = false;
    for line in text.split_inclusive('\n') {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && line.starts_with("## ") {
            out.push((line.trim_end().to_owned(), String::new()));
        }
        match out.last_mut() {
            Some((_, body)) => body.push_str(line),
            None => preamble.push_str(line),
        }
    }
    (preamble, out)
}

/// The new report `new` with the sections headed `kept` taken from the old report `old` where it
/// has them (a section the old report lacks stays as the new one says).
pub fn merge(old: &str, new: &str, kept: &[&str]) -> String {
    let (_, old_sections) = sections(old);
    let (preamble, new_sections) = sections(new);
    let mut out = preamble;
    for (heading, body) in new_sections {
        let previous = kept
            .contains(&heading.as_str())
            .then(|| old_sections.iter().find(|(h, _)| *h == heading))
            .flatten();
        out.push_str(previous.map_or(&body, |(_, b)| b));
    }
    out
}

/// `10000` → `10,000`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The "Policy evaluation" section: in process, then in the sidecars.
fn policy_section(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n{POLICY_HEADING}\n");
    let _ = writeln!(s, "### In process (no sidecar)\n");
    match &r.policy_eval {
        None => {
            let _ = writeln!(
                s,
                "_Not run (`--skip-policy-eval`, or `--only` named no data-path topology)._"
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(s, "**Failed:**\n\n```\n{e}\n```");
        }
        Some(Ok(pe)) => {
            let _ = writeln!(
                s,
                "- Policy: {} (the reference policy, `*_test.rego` left out), entry point \
                 `data.mandate.authz.decision`, compiled with `mandate_rego::Policy::compile_with` \
                 (time limit {} ms, as the sidecar's default `--policy-timeout`); compile time {}.",
                pe.modules
                    .iter()
                    .map(|m| format!("`{m}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                policy::TIME_LIMIT.as_millis(),
                pe.compile
                    .iter()
                    .map(|(e, d)| format!("{e} {:.0} ms", d.as_secs_f64() * 1000.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let _ = writeln!(
                s,
                "- Data: `data.registry.agents` holds {} agents, each `{{\"status\": \"active\", \
                 \"ceiling\": S, \"autonomous\": S}}` with S = `[{{\"host\": \"tool\", \"tool\": \"search\"}}, \
                 {{\"host\": \"tool\", \"tool\": \"read_*\"}}, {{\"host\": \"api\", \"method\": \"GET\", \
                 \"path\": \"/v1/*\"}}]` (no delegation: the calls are the agent's own).",
                thousands(policy::REGISTRY_AGENTS)
            );
            let _ = writeln!(
                s,
                "- Inputs: {} pre-built documents shaped as the agent's sidecar builds them (direction, \
                 source, destination, request with headers and the JSON-RPC body, mcp, the agent's registry \
                 entry, time) for an MCP `tools/call` of `search` by {} different agents, evaluated in \
                 rotation; each evaluation clones its input (a reference count) and calls \
                 `Policy::evaluate`, and the timer covers both.",
                thousands(policy::ROTATING_AGENTS),
                thousands(policy::ROTATING_AGENTS)
            );
            let _ = writeln!(
                s,
                "- Each row: {:.1} s measured after 0.5 s of unmeasured evaluations per thread; threads pinned \
                 one per CPU ({} for one thread, {} for two), each walking its own stream concurrently; \
                 evaluations/s is all threads together. With rvm the policy keeps the sidecar's guard: \
                 the first 1,000 decisions and then 1 in 128 are re-checked on the interpreter on a \
                 separate thread (pinned to CPU {}), whose CPU is part of the cost but not of the \
                 per-evaluation latency.",
                pe.duration.as_secs_f64(),
                pe.cpus.first().map_or("–".to_owned(), usize::to_string),
                cpus(&pe.cpus[..pe.cpus.len().min(2)]),
                cpus(&r.cpus_load)
            );
            let _ = writeln!(
                s,
                "\n| engine | threads | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | evaluations | evaluations/s |\n{}",
                md_sep(9)
            );
            for row in &pe.rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {:.0} |",
                    row.engine,
                    row.threads,
                    row.us(0.5),
                    row.us(0.9),
                    row.us(0.99),
                    row.us(0.999),
                    row.latency.max() as f64 / 1000.0,
                    row.evals,
                    row.rate()
                );
            }
            let _ = writeln!(
                s,
                "\nVerdicts checked before timing (and every timed verdict had to be an allow):\n"
            );
            for c in &pe.checks {
                let _ = writeln!(s, "- {}", c.replace('|', "\\|"));
            }
        }
    }

    let _ = writeln!(s, "\n### In the sidecar pair (with vs without policy)\n");
    let (Some(with), Some(without)) = (r.measured(Kind::MandatePolicy), r.measured(Kind::Mandate))
    else {
        let _ = writeln!(
            s,
            "_Not measured: both the mandate-proxy pair and the pair + policy must run._"
        );
        return s;
    };
    let _ = writeln!(
        s,
        "The same load as the other topologies (see *Data path*), through the pair with and without \
         the reference policy on both sides.\n"
    );
    let _ = writeln!(
        s,
        "| | p50 ms | p99 ms | p99.9 ms | added p99 over direct ms | saturation req/s | CPU µs/req at {} req/s | CPU µs/req at saturation |\n{}",
        r.args.rate,
        md_sep(8)
    );
    for (label, kind, m) in [
        ("without policy", Kind::Mandate, without),
        ("with policy", Kind::MandatePolicy, with),
    ] {
        let _ = writeln!(
            s,
            "| {label} | {:.3} | {:.3} | {:.3} | {} | {:.0} | {} | {} |",
            m.open.ms(0.5),
            m.open.ms(0.99),
            m.open.ms(0.999),
            r.added_p99(kind)
                .map_or("–".to_owned(), |v| format!("{v:+.3}")),
            m.sat.throughput(),
            per_proc(m, |p| cpu_us_per_req(p.cpu_rate_s, m, false)),
            per_proc(m, |p| cpu_us_per_req(p.cpu_sat_s, m, true)),
        );
    }
    let _ = writeln!(
        s,
        "\nSaturation throughput with policy is **{:.1}%** of the pair without it.\n",
        with.sat.throughput() / without.sat.throughput().max(1e-9) * 100.0
    );
    let extra: Vec<String> = with
        .procs
        .iter()
        .zip(&without.procs)
        .filter_map(|(p, q)| {
            let d = with.decisions.iter().find(|d| d.name == p.name)?;
            Some(format!(
                "{} {:+.1} µs (mean policy evaluation in its decision log {:.1} µs)",
                role(&p.name),
                cpu_us_per_req(p.cpu_sat_s, with, true)
                    - cpu_us_per_req(q.cpu_sat_s, without, true),
                d.mean_eval_us
            ))
        })
        .collect();
    if !extra.is_empty() {
        let _ = writeln!(
            s,
            "CPU per request at saturation, with policy minus without: {}; the rest of the difference \
             is spent around the evaluation (input document, decision record and log, the VM guard's \
             re-checks).\n",
            extra.join("; ")
        );
    }
    let _ = writeln!(
        s,
        "Decision logs (every record must be an allow; a denied call would be a 403 and an error):\n"
    );
    let _ = writeln!(
        s,
        "| sidecar | allowed | denied | unreadable lines | mean eval_us | max eval_us | log size MiB | first deny |\n{}",
        md_sep(8)
    );
    for d in &with.decisions {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} | {} | {:.1} | {} |",
            d.name,
            d.allowed,
            d.denied,
            d.unreadable,
            d.mean_eval_us,
            d.max_eval_us,
            d.bytes as f64 / 1024.0 / 1024.0,
            d.first_deny.as_deref().unwrap_or("–").replace('|', "\\|")
        );
    }
    let measured_reqs = with.open.ok + with.sat.ok;
    let _ = writeln!(
        s,
        "\nThe measured phases completed {measured_reqs} requests with {} errors; the logs also \
         hold the warm-ups' and readiness probes' decisions. `eval_us` is the sidecar's own \
         measurement of one policy evaluation (whole microseconds).",
        with.open.errors.total() + with.sat.errors.total()
    );
    s
}

/// CPU numbers as the report lists them: `0,1`.
pub fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The `- Command: …` line (with `alone` after it, e.g. how to run one section by itself) and
/// what `make bench` runs.
pub fn command_lines(s: &mut String, command: &str, alone: &str) {
    let _ = writeln!(s, "- Command: `{command}`{alone}");
    let _ = writeln!(
        s,
        "- `make bench` runs `cargo build --release --workspace --bins` then \
         `target/release/mandate-bench --bin-dir target/release --report docs/benchmarks.md`"
    );
}

/// What to add to a section's command to run it alone, when the run was not already narrowed
/// with `--only`.
pub fn alone_hint(args: &crate::cli::BenchArgs, only: &str) -> String {
    if args.only.is_empty() {
        format!(" (this section alone: add `--only {only}`)")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_run_keeps_the_sections_it_did_not_measure() {
        let old = "# Benchmarks\n\nold intro\n\n## Data path: mandate-proxy pair vs direct vs nginx pair\n\nold figures\n\n```nginx\n## not a heading\n```\n\n## Control plane\n\nold control plane\n\n## Delegation verification\n\n_Not measured yet_\n";
        let new = "# Benchmarks\n\nnew intro\n\n## Data path: mandate-proxy pair vs direct vs nginx pair\n\n_Not run_\n\n## Policy evaluation\n\n_Not run_\n\n## Control plane\n\n_Not run_\n\n## Delegation verification\n\nnew delegation\n";
        let merged = merge(
            old,
            new,
            &[DATA_PATH_HEADING, POLICY_HEADING, CONTROL_PLANE_HEADING],
        );
        assert_eq!(
            merged,
            "# Benchmarks\n\nnew intro\n\n## Data path: mandate-proxy pair vs direct vs nginx pair\n\nold figures\n\n```nginx\n## not a heading\n```\n\n## Policy evaluation\n\n_Not run_\n\n## Control plane\n\nold control plane\n\n## Delegation verification\n\nnew delegation\n"
        );
    }
}
