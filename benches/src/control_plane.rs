//! The control plane (`mandate serve`): how fast a revocation reaches 500 connected sidecars, how
//! much memory holding their streams costs, and how many decisions per second it stores in SQLite
//! and in PostgreSQL. The sidecars are simulated (`sidecar_sim`), all on the harness's runtime.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures_util::{StreamExt as _, TryStreamExt as _};
use hdrhistogram::Histogram;
use http::Method;
use mandate_identity::TrustDomain;
use mandate_wire::StreamMessage;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::cli::BenchArgs;
use crate::postgres::Postgres;
use crate::procs::{self, Child, Pinner, Spawn, TempDir};
use crate::rss::{self, Mem};
use crate::sidecar_sim::{self, Conn, Endpoint, Identity, LineReader};
use crate::topology::{SetupError, os_args};

/// Target: p99 over revocations of the time until the last of the streams has the update, ms.
pub const TARGET_PUSH_P99_MS: f64 = 1000.0;
/// Target: the control plane's RSS with the streams open, MiB.
pub const TARGET_RSS_MIB: f64 = 100.0;
/// Target: decisions stored per second, on each backend.
pub const TARGET_INGEST_PER_S: f64 = 20_000.0;
/// Records per decision batch.
pub const BATCH: usize = 500;

/// The trust domain of the benchmark's control planes.
pub(crate) const TRUST_DOMAIN: &str = "mandate.local";
/// The admin token of the benchmark's control planes (a throwaway: real ones are random).
const ADMIN_TOKEN: &str = "mandate-bench-admin-token-0123456789";
/// Store key, base64 of 32 bytes (a throwaway, as the data directory is).
const STORE_KEY: &str = "bWFuZGF0ZS1iZW5jaC1zdG9yZS1rZXktMzItYnl0ZXM=";
/// How long `mandate serve` may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one revocation may take to reach every stream before it is counted as missed.
const REVOCATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Quiet time between revocations.
const REVOCATION_GAP: Duration = Duration::from_millis(300);
/// Admin and enrolment requests in flight at once on the admin connection.
const ADMIN_CONCURRENCY: usize = 16;
/// Unmeasured ingest before the measured window.
const INGEST_WARMUP: Duration = Duration::from_secs(1);
/// The destination the simulated decisions record.
const TOOL_ID: &str = "spiffe://mandate.local/service/tool";

/// How one part of the control-plane benchmark ended.
#[derive(Debug, Clone)]
pub enum Part<T> {
    /// Measured.
    Done(T),
    /// Not measured: a prerequisite is missing.
    Skipped(String),
    /// Started but broke.
    Failed(String),
}

impl<T> Part<T> {
    pub(crate) fn from_result(r: Result<T, SetupError>) -> Self {
        match r {
            Ok(v) => Part::Done(v),
            Err(SetupError::Unavailable(why)) => Part::Skipped(why),
            Err(SetupError::Failed(e)) => Part::Failed(format!("{e:#}")),
        }
    }
}

/// One revocation, as the streams saw it.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The agent revoked.
    pub agent: String,
    /// From t0 to the first stream having the update, ms.
    pub first_ms: f64,
    /// To the median stream, ms.
    pub median_ms: f64,
    /// To the last stream, ms; the timeout when some stream never had it.
    pub last_ms: f64,
    /// How many streams had it within the timeout.
    pub reached: usize,
    /// From t0 until the revoke command (or API call) returned, ms.
    pub command_ms: f64,
}

/// The push-latency and memory measurement.
#[derive(Debug, Clone)]
pub struct Push {
    /// Streams held open.
    pub streams: usize,
    /// Per revocation.
    pub revocations: Vec<Revocation>,
    /// Latency to the last stream over revocations, µs.
    pub last: Histogram<u64>,
    /// How revocations were issued.
    pub method: String,
    /// The control plane's memory once every stream was open (after a settle pause).
    pub mem_open: Mem,
    /// Its memory after the revocations (streams still open).
    pub mem_after: Mem,
    /// Its memory before any sidecar connected.
    pub mem_idle: Mem,
    /// Size of a stream's first line (the whole registry plus the trust bundle), bytes.
    pub first_line_bytes: usize,
    /// Seconds spent registering, enrolling and opening the streams.
    pub setup_s: [f64; 3],
    /// Streams that ended or failed during the measurement.
    pub closed: Vec<String>,
    /// CPU the control plane used during the revocation phase, seconds, and the phase's length.
    pub cpu_revocations_s: (f64, f64),
    /// CPU the harness (all the simulated sidecars) used in that phase, seconds.
    pub client_cpu_revocations_s: f64,
    /// CPU other programs used in that phase, percent of one core.
    pub other_cpu_pct: f64,
    /// How the control plane was started.
    pub command_line: String,
}

/// The ingest measurement on one backend.
#[derive(Debug, Clone)]
pub struct Ingest {
    /// Simulated sidecars posting concurrently.
    pub sidecars: usize,
    /// Measured seconds (until the last batch in flight finished).
    pub secs: f64,
    /// Batches answered with success.
    pub batches: u64,
    /// Sum of `IngestResult.accepted`.
    pub accepted: u64,
    /// Sum of `IngestResult.duplicates` (must be 0: every id is new).
    pub duplicates: u64,
    /// Failed batches.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Time per batch request, µs.
    pub batch_latency: Histogram<u64>,
    /// CPU of `mandate serve` in the measured window, percent of one core.
    pub serve_cpu_pct: f64,
    /// CPU of PostgreSQL (postmaster and backends), percent of one core.
    pub db_cpu_pct: Option<f64>,
    /// CPU of the harness (simulated sidecars), percent of one core.
    pub client_cpu_pct: f64,
    /// Control plane memory after the run.
    pub serve_mem: Mem,
    /// Size of one record's JSON, bytes.
    pub record_bytes: usize,
    /// CPU other programs used in the measured window, percent of one core.
    pub other_cpu_pct: f64,
    /// Backend details (PostgreSQL version, database URL shape).
    pub facts: Vec<String>,
    /// How the control plane was started.
    pub command_line: String,
}

impl Ingest {
    /// Accepted decisions per second.
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.secs.max(1e-9)
    }
}

/// Everything the control-plane benchmark measured.
#[derive(Debug, Clone)]
pub struct ControlPlaneReport {
    /// Push latency and memory with the streams open.
    pub push: Part<Push>,
    /// Ingest into SQLite.
    pub sqlite: Part<Ingest>,
    /// Ingest into PostgreSQL.
    pub postgres: Part<Ingest>,
    /// CPUs of the control plane (and PostgreSQL).
    pub cpus_cp: Vec<usize>,
    /// CPUs of the simulated sidecars.
    pub cpus_load: Vec<usize>,
    /// What was done about the open-file limit.
    pub fd_note: String,
    /// 1-minute load average before and after.
    pub loadavg: (f64, f64),
    /// Wall time, seconds.
    pub wall_s: f64,
    /// `mandate --version`.
    pub version: String,
    /// The scratch directory, shown as `<tmp>` in the report.
    pub tmp: String,
}

impl ControlPlaneReport {
    /// Names of the parts that failed.
    pub fn failures(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if matches!(self.push, Part::Failed(_)) {
            f.push("control plane push");
        }
        if matches!(self.sqlite, Part::Failed(_)) {
            f.push("control plane ingest (SQLite)");
        }
        if matches!(self.postgres, Part::Failed(_)) {
            f.push("control plane ingest (PostgreSQL)");
        }
        f
    }
}

/// Raises the soft open-file limit to the hard one when `need` descriptors would not fit.
fn raise_fd_limit(need: u64) -> anyhow::Result<String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= need {
        return Ok(format!(
            "open-file limit {} suffices (needed about {need})",
            lim.rlim_cur
        ));
    }
    if lim.rlim_max < need {
        bail!(
            "the open-file limit is {} (hard {}), below the ~{need} the streams need; \
             raise it (ulimit -n) or pass a smaller --cp-streams",
            lim.rlim_cur,
            lim.rlim_max
        );
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the struct we own; raising soft up to hard needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!("setrlimit: {}", std::io::Error::last_os_error());
    }
    Ok(format!(
        "raised the soft open-file limit from {old} to the hard limit {} (needed about {need}); \
         `mandate serve` inherits it",
        lim.rlim_max
    ))
}

/// Runs every part of the control-plane benchmark.
pub async fn run(
    args: &BenchArgs,
    cpus_cp: &[usize],
    cpus_load: &[usize],
) -> anyhow::Result<ControlPlaneReport> {
    let started = Instant::now();
    let load0 = rss::loadavg();
    let fd_note = raise_fd_limit(args.cp_streams as u64 * 2 + 512)?;
    eprintln!("== control plane: {fd_note}");
    let tmp = TempDir::new(args.keep_tmp)?;
    let pinner = Pinner::new();
    let bin = args.bin_dir.join("mandate");
    let version = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let ctx = Ctx {
        args,
        bin: &bin,
        tmp: tmp.path(),
        cpus: cpus_cp,
        pinner: &pinner,
    };

    eprintln!(
        "== control plane: push latency, {} streams, {} revocations",
        args.cp_streams, args.cp_revocations
    );
    let push = Part::from_result(push(&ctx).await);
    report_part("push", &push);
    eprintln!(
        "== control plane: decision ingest into SQLite, {} sidecars, {:?}",
        args.cp_ingest_sidecars, args.cp_ingest_time
    );
    let sqlite = Part::from_result(ingest(&ctx, false).await);
    report_part("ingest SQLite", &sqlite);
    eprintln!("== control plane: decision ingest into PostgreSQL");
    let postgres = Part::from_result(ingest(&ctx, true).await);
    report_part("ingest PostgreSQL", &postgres);
    Ok(ControlPlaneReport {
        push,
        sqlite,
        postgres,
        cpus_cp: cpus_cp.to_vec(),
        cpus_load: cpus_load.to_vec(),
        fd_note,
        loadavg: (load0, rss::loadavg()),
        wall_s: started.elapsed().as_secs_f64(),
        version,
        tmp: tmp.path().display().to_string(),
    })
}

fn report_part<T>(what: &str, p: &Part<T>) {
    match p {
        Part::Done(_) => {}
        Part::Skipped(why) => eprintln!("== control plane {what}: skipped: {why}"),
        Part::Failed(why) => eprintln!("== control plane {what}: FAILED: {why}"),
    }
}

/// What starting a control plane needs.
pub(crate) struct Ctx<'a> {
    pub(crate) args: &'a BenchArgs,
    /// The `mandate` binary.
    pub(crate) bin: &'a Path,
    pub(crate) tmp: &'a Path,
    /// CPUs of `mandate serve`.
    pub(crate) cpus: &'a [usize],
    pub(crate) pinner: &'a Pinner,
}

/// A running `mandate serve` and an admin connection to it; stopped when dropped.
pub(crate) struct Serve {
    pub(crate) child: Child,
    pub(crate) listen: SocketAddr,
    pub(crate) ca_pem: PathBuf,
    /// Its plain-HTTP metrics listener (`/metrics`, `/readyz`).
    pub(crate) metrics: SocketAddr,
    endpoint: Endpoint,
    admin: Conn,
}

impl Serve {
    /// Starts `mandate serve` (SQLite in its data directory, or `database_url`) with `extra`
    /// flags, and waits until it is ready.
    pub(crate) async fn start(
        ctx: &Ctx<'_>,
        name: &str,
        database_url: Option<&str>,
        extra: &[&str],
    ) -> Result<Self, SetupError> {
        if !ctx.bin.is_file() {
            return Err(SetupError::Unavailable(format!(
                "{} not built (cargo build --release -p mandate-control-plane)",
                ctx.bin.display()
            )));
        }
        let has_serve = std::process::Command::new(ctx.bin)
            .args(["serve", "--help"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_serve {
            return Err(SetupError::Unavailable(format!(
                "{} has no `serve` subcommand",
                ctx.bin.display()
            )));
        }
        let dir = ctx.tmp.join(name);
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&dir).map_err(anyhow::Error::from)?;
        let ports = procs::free_ports(2)?;
        let (listen, metrics) = (ports[0], ports[1]);
        let mut args = os_args([
            "serve".to_owned(),
            "--data-dir".to_owned(),
            data_dir.display().to_string(),
            "--trust-domain".to_owned(),
            TRUST_DOMAIN.to_owned(),
            "--listen".to_owned(),
            listen.to_string(),
            "--metrics".to_owned(),
            metrics.to_string(),
        ]);
        if let Some(url) = database_url {
            args.extend(os_args(["--database-url", url]));
        }
        args.extend(os_args(extra.iter().copied()));
        let mut child = Child::spawn(
            ctx.pinner,
            Spawn {
                name,
                program: ctx.bin,
                args,
                cpus: ctx.cpus,
                env: vec![
                    ("MANDATE_ADMIN_TOKEN", ADMIN_TOKEN),
                    ("MANDATE_STORE_KEY", STORE_KEY),
                    ("MANDATE_LOG", "warn"),
                ],
                log_dir: &dir,
            },
        )?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            child.check_alive()?;
            if http_status(metrics, "/readyz").await == Some(200) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "{name}: /readyz did not answer 200 within {READY_TIMEOUT:?}; end of its log:\n{}",
                    child.log_tail(2000)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ca_pem = data_dir.join("ca.pem");
        let pem =
            std::fs::read(&ca_pem).with_context(|| format!("reading {}", ca_pem.display()))?;
        let td: TrustDomain = TRUST_DOMAIN.parse().map_err(|e| anyhow!("{e}"))?;
        let endpoint = Endpoint::new(listen, &pem, td)?;
        let admin = endpoint.connect(None).await?;
        Ok(Self {
            child,
            listen,
            ca_pem,
            metrics,
            endpoint,
            admin,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Runs the operator CLI against this control plane (`mandate ARGS…`, a new process with a
    /// clean `MANDATE_*` environment) and returns its standard output; failing, both streams.
    pub(crate) async fn cli(&self, bin: &Path, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("MANDATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("MANDATE_SERVER", format!("https://{}", self.listen))
            .env("MANDATE_CACERT", &self.ca_pem)
            .env("MANDATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdin(std::process::Stdio::null());
        let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
        if !out.status.success() {
            bail!(
                "mandate {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Registers `names` as agents, a few at a time; returns their join tokens in order.
    async fn register(&self, names: &[String]) -> anyhow::Result<Vec<String>> {
        futures_util::stream::iter(names.iter().map(|name| async move {
            let body = serde_json::json!({
                "name": name,
                "owner": "bench@example.com",
                "description": "simulated sidecar of mandate-bench",
                "ceiling": [{"host": "tool", "tool": "search"}],
            });
            let answer = self
                .admin
                .call(
                    Method::POST,
                    "/v1/agents",
                    Some(ADMIN_TOKEN),
                    Some(serde_json::to_vec(&body)?.into()),
                )
                .await?;
            let v: serde_json::Value = answer
                .json()
                .with_context(|| format!("POST /v1/agents {name}"))?;
            v["join_token"]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("POST /v1/agents {name}: no join_token in {v}"))
        }))
        .buffered(ADMIN_CONCURRENCY)
        .try_collect()
        .await
    }

    /// Enrols one simulated sidecar per join token, a few at a time.
    async fn enroll(&self, tokens: &[String]) -> anyhow::Result<Vec<Identity>> {
        futures_util::stream::iter(
            tokens
                .iter()
                .map(|t| async move { sidecar_sim::enroll(&self.admin, t).await }),
        )
        .buffered(ADMIN_CONCURRENCY)
        .try_collect()
        .await
    }

    /// Connects each identity over mTLS HTTP/2, a few at a time.
    async fn connect_all(&self, ids: &[Identity]) -> anyhow::Result<Vec<Conn>> {
        futures_util::stream::iter(
            ids.iter()
                .map(|id| async move { self.endpoint.connect(Some(id)).await }),
        )
        .buffered(ADMIN_CONCURRENCY * 2)
        .try_collect()
        .await
    }
}

/// The status code of a plain-HTTP GET (the metrics listener), or `None` when it does not answer.
pub(crate) async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        let head = std::str::from_utf8(&buf[..n]).ok()?;
        head.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// What a stream reader reports.
enum Event {
    /// Stream `stream` had the update revoking agent `revocation` at this instant.
    Seen {
        revocation: usize,
        stream: usize,
        at: Instant,
    },
    /// A stream ended or failed.
    Closed(String),
}

/// Reads one stream until it ends, reporting when each revocation's update arrives on it.
async fn read_stream(
    mut lines: LineReader,
    stream: usize,
    names: Arc<Vec<String>>,
    started: Arc<AtomicUsize>,
    tx: mpsc::UnboundedSender<Event>,
) {
    let mut seen = vec![false; names.len()];
    let mut next_unseen = 0;
    loop {
        let (line, at) = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => {
                let _ = tx.send(Event::Closed(format!("stream {stream} ended")));
                return;
            }
            Err(e) => {
                let _ = tx.send(Event::Closed(format!("stream {stream}: {e:#}")));
                return;
            }
        };
        // Heartbeats are tiny; updates carry the whole registry.
        if line.len() < 64 {
            continue;
        }
        let upto = started.load(Ordering::Acquire).min(names.len());
        for (revocation, name) in names.iter().enumerate().take(upto).skip(next_unseen) {
            if !seen[revocation] && sidecar_sim::shows_revoked(&line, name) {
                seen[revocation] = true;
                let _ = tx.send(Event::Seen {
                    revocation,
                    stream,
                    at,
                });
            }
        }
        while next_unseen < upto && seen[next_unseen] {
            next_unseen += 1;
        }
    }
}

/// Issues one revocation: the `mandate agent revoke` CLI when this build has it, else the API.
async fn revoke(serve: &Serve, cli: bool, bin: &Path, name: &str) -> anyhow::Result<()> {
    if cli {
        serve.cli(bin, &["agent", "revoke", name]).await.map(|_| ())
    } else {
        serve
            .admin
            .call(
                Method::POST,
                &format!("/v1/agents/{name}/revoke"),
                Some(ADMIN_TOKEN),
                None,
            )
            .await?
            .json::<serde_json::Value>()
            .map(|_| ())
            .with_context(|| format!("POST /v1/agents/{name}/revoke"))
    }
}

/// Busy time of the whole machine and of the given processes, to tell how much other programs ran.
pub(crate) struct Busy {
    machine: rss::CpuTimes,
    ours: f64,
    at: Instant,
}

impl Busy {
    pub(crate) fn start(pids: &[u32]) -> Self {
        Self {
            machine: rss::cpu_times(&(0..procs::online_cpus()).collect::<Vec<_>>()),
            ours: pids.iter().map(|&p| rss::cpu_seconds(p)).sum(),
            at: Instant::now(),
        }
    }

    /// CPU used since `start` by programs other than `pids`, percent of one core.
    pub(crate) fn other_pct(&self, pids: &[u32]) -> f64 {
        let machine = rss::cpu_times(&(0..procs::online_cpus()).collect::<Vec<_>>()) - self.machine;
        let ours: f64 = pids.iter().map(|&p| rss::cpu_seconds(p)).sum::<f64>() - self.ours;
        ((machine.busy_s - ours) / self.at.elapsed().as_secs_f64().max(1e-9) * 100.0).max(0.0)
    }
}

/// Share of a core other programs may use before a part's figures are called distorted.
const NOISY_PCT: f64 = 5.0;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Push latency of revocations to every open stream, and the memory those streams cost.
async fn push(ctx: &Ctx<'_>) -> Result<Push, SetupError> {
    let args = ctx.args;
    let (n, k) = (args.cp_streams, args.cp_revocations.max(1));
    let serve = Serve::start(ctx, "serve-push", None, &[]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mem_idle = rss::sample(serve.pid());

    let sidecars: Vec<String> = (0..n).map(|i| format!("bench-{i:04}")).collect();
    let targets: Vec<String> = (0..k).map(|i| format!("revoke-{i:03}")).collect();
    let t = Instant::now();
    let mut all = sidecars.clone();
    all.extend(targets.iter().cloned());
    let tokens = serve.register(&all).await?;
    let register_s = t.elapsed().as_secs_f64();
    eprintln!("   registered {} agents in {register_s:.1} s", all.len());

    let t = Instant::now();
    let ids = serve.enroll(&tokens[..n]).await?;
    let enroll_s = t.elapsed().as_secs_f64();
    eprintln!("   enrolled {n} simulated sidecars in {enroll_s:.1} s");

    let t = Instant::now();
    let conns = serve.connect_all(&ids).await?;
    let names = Arc::new(targets.clone());
    let started = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let first_lines: Vec<(LineReader, usize)> = futures_util::stream::iter(conns.iter().map(|c| async move {
        let body = c.open_stream().await?;
        let mut lines = LineReader::new(body);
        let (line, _) = lines
            .next_line()
            .await?
            .context("the stream ended before its first line")?;
        // The first line is checked in full against the contract: an update with the registry.
        let msg: StreamMessage =
            serde_json::from_slice(&line).context("the stream's first line is not a StreamMessage")?;
        match msg {
            StreamMessage::Update {
                registry: Some(reg),
                trust_bundle: Some(_),
                ..
            } if reg.agents.len() >= n + k => Ok((lines, line.len())),
            other => Err(anyhow!(
                "the stream's first line should be an update with the whole registry ({} agents) \
                 and the trust bundle; got {}",
                n + k,
                match other {
                    StreamMessage::Heartbeat => "a heartbeat".to_owned(),
                    StreamMessage::Update { registry, trust_bundle, .. } => format!(
                        "an update with {} agents, trust bundle {}",
                        registry.map_or(0, |r| r.agents.len()),
                        if trust_bundle.is_some() { "present" } else { "absent" }
                    ),
                }
            )),
        }
    }))
    .buffered(ADMIN_CONCURRENCY * 2)
    .try_collect()
    .await?;
    let first_line_bytes = first_lines.iter().map(|(_, b)| *b).max().unwrap_or(0);
    let mut readers = Vec::with_capacity(n);
    for (i, (lines, _)) in first_lines.into_iter().enumerate() {
        readers.push(tokio::spawn(read_stream(
            lines,
            i,
            names.clone(),
            started.clone(),
            tx.clone(),
        )));
    }
    drop(tx);
    let open_s = t.elapsed().as_secs_f64();
    eprintln!("   {n} streams open in {open_s:.1} s (first line {first_line_bytes} bytes)");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mem_open = rss::sample(serve.pid());
    eprintln!(
        "   mandate serve RSS with {n} streams open: {:.1} MiB",
        mem_open.rss_mib()
    );

    let use_cli = std::process::Command::new(ctx.bin)
        .args(["agent", "revoke", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    let method = if use_cli {
        "`mandate agent revoke NAME` (the operator CLI, a new process each time; t0 just before it is spawned)".to_owned()
    } else {
        "`POST /v1/agents/NAME/revoke` on an open admin connection (this build's CLI has no `agent revoke`); \
         t0 just before the request"
            .to_owned()
    };
    let mut arrivals: Vec<Vec<Option<Instant>>> = vec![vec![None; n]; k];
    let mut closed = Vec::new();
    let mut revocations = Vec::with_capacity(k);
    let mut last =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(anyhow::Error::from)?;
    let ours = [serve.pid(), std::process::id()];
    let busy = Busy::start(&ours);
    let cpu0 = (
        rss::cpu_seconds(serve.pid()),
        Instant::now(),
        rss::cpu_seconds_of(&[std::process::id()]),
    );
    let record =
        |ev: Event, arrivals: &mut Vec<Vec<Option<Instant>>>, closed: &mut Vec<String>| match ev {
            Event::Seen {
                revocation,
                stream,
                at,
            } => arrivals[revocation][stream] = Some(at),
            Event::Closed(why) => closed.push(why),
        };
    for (r, name) in targets.iter().enumerate() {
        started.store(r + 1, Ordering::Release);
        let t0 = Instant::now();
        let deadline = t0 + REVOCATION_TIMEOUT;
        let revoking = revoke(&serve, use_cli, ctx.bin, name);
        tokio::pin!(revoking);
        let mut command_ms = None;
        loop {
            let complete = arrivals[r].iter().all(Option::is_some);
            if complete && command_ms.is_some() {
                break;
            }
            tokio::select! {
                res = &mut revoking, if command_ms.is_none() => {
                    res?;
                    command_ms = Some(ms(t0.elapsed()));
                }
                ev = rx.recv() => match ev {
                    Some(ev) => record(ev, &mut arrivals, &mut closed),
                    None => return Err(anyhow!("every stream has ended: {}", closed.join("; ")).into()),
                },
                _ = tokio::time::sleep_until(deadline.into()) => break,
            }
        }
        let mut lat: Vec<f64> = arrivals[r]
            .iter()
            .flatten()
            .map(|&at| ms(at.saturating_duration_since(t0)))
            .collect();
        lat.sort_by(f64::total_cmp);
        let reached = lat.len();
        let last_ms = if reached == n {
            lat.last().copied().unwrap_or(0.0)
        } else {
            ms(REVOCATION_TIMEOUT)
        };
        last.record(((last_ms * 1000.0) as u64).max(1))
            .map_err(anyhow::Error::from)?;
        let rev = Revocation {
            agent: name.clone(),
            first_ms: lat.first().copied().unwrap_or(f64::NAN),
            median_ms: lat.get(reached / 2).copied().unwrap_or(f64::NAN),
            last_ms,
            reached,
            command_ms: command_ms.unwrap_or(f64::NAN),
        };
        eprintln!(
            "   revoked {}: first stream {:.1} ms, median {:.1} ms, last {:.1} ms ({reached}/{n}); command {:.1} ms",
            rev.agent, rev.first_ms, rev.median_ms, rev.last_ms, rev.command_ms
        );
        revocations.push(rev);
        tokio::time::sleep(REVOCATION_GAP).await;
    }
    // Whatever is still queued (late arrivals, closures).
    while let Ok(ev) = rx.try_recv() {
        record(ev, &mut arrivals, &mut closed);
    }
    let cpu_revocations_s = (
        rss::cpu_seconds(serve.pid()) - cpu0.0,
        cpu0.1.elapsed().as_secs_f64(),
    );
    let client_cpu_revocations_s = rss::cpu_seconds_of(&[std::process::id()]) - cpu0.2;
    let other_cpu_pct = busy.other_pct(&ours);
    let mem_after = rss::sample(serve.pid());
    for r in &readers {
        r.abort();
    }
    let mut serve = serve;
    serve.child.check_alive()?;
    let command_line = serve.child.command_line.clone();
    serve.child.stop(Duration::from_secs(3));
    Ok(Push {
        streams: n,
        revocations,
        last,
        method,
        mem_open,
        mem_after,
        mem_idle,
        first_line_bytes,
        setup_s: [register_s, enroll_s, open_s],
        closed,
        cpu_revocations_s,
        client_cpu_revocations_s,
        other_cpu_pct,
        command_line,
    })
}

/// Decisions per second stored by a fresh control plane on SQLite or PostgreSQL.
async fn ingest(ctx: &Ctx<'_>, pg: bool) -> Result<Ingest, SetupError> {
    let args = ctx.args;
    let (db, facts) = Postgres::store(&ctx.tmp.join("postgres"), ctx.cpus, pg)?;
    let url = db.as_ref().map(Postgres::url);
    let name = if pg {
        "serve-ingest-postgres"
    } else {
        "serve-ingest-sqlite"
    };
    let serve = Serve::start(ctx, name, url.as_deref(), &[])
        .await
        .map_err(|e| match (e, &db) {
            (SetupError::Failed(e), Some(db)) => SetupError::Failed(
                e.context(format!("end of the PostgreSQL log:\n{}", db.log_tail())),
            ),
            (e, _) => e,
        })?;
    let s = args.cp_ingest_sidecars.max(1);
    let names: Vec<String> = (0..s).map(|i| format!("ingest-{i:03}")).collect();
    let tokens = serve.register(&names).await?;
    let ids = serve.enroll(&tokens).await?;
    let conns = serve.connect_all(&ids).await?;

    // Warm-up, unmeasured: the first batches pay for connection pools and statement caches.
    let warm_end = Instant::now() + INGEST_WARMUP;
    let mut traces: Vec<u64> = (0..s as u64).map(|i| i << 40).collect();
    futures_util::future::try_join_all(conns.iter().zip(&ids).zip(traces.iter_mut()).map(
        |((c, id), trace)| async move {
            while Instant::now() < warm_end {
                sidecar_sim::post_batch(c, &id.spiffe_id, TOOL_ID, BATCH, trace).await?;
            }
            anyhow::Ok(())
        },
    ))
    .await
    .context("warm-up batches")?;

    let db_pid = db.as_ref().map(Postgres::pid);
    let cpu0 = (
        rss::cpu_seconds(serve.pid()),
        db_pid.map(rss::cpu_seconds),
        rss::cpu_seconds_of(&[std::process::id()]),
    );
    let ours: Vec<u32> = [serve.pid(), std::process::id()]
        .into_iter()
        .chain(db_pid)
        .collect();
    let busy = Busy::start(&ours);
    let start = Instant::now();
    let end = start + args.cp_ingest_time;
    let per: Vec<PerSidecar> =
        futures_util::future::join_all(conns.iter().zip(&ids).zip(traces.iter_mut()).map(
            |((c, id), trace)| async move {
                let mut p = PerSidecar::default();
                let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
                    .expect("valid histogram bounds");
                while Instant::now() < end {
                    let t = Instant::now();
                    match sidecar_sim::post_batch(c, &id.spiffe_id, TOOL_ID, BATCH, trace).await {
                        Ok(r) => {
                            let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
                            p.batches += 1;
                            p.accepted += r.accepted;
                            p.duplicates += r.duplicates;
                        }
                        Err(e) => {
                            p.errors += 1;
                            p.first_error.get_or_insert_with(|| format!("{e:#}"));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                p.hist = Some(hist);
                p
            },
        ))
        .await;
    let secs = start.elapsed().as_secs_f64();
    let other_cpu_pct = busy.other_pct(&ours);
    let cpu_pct = |a: f64, b: f64| (b - a) / secs * 100.0;
    let serve_cpu_pct = cpu_pct(cpu0.0, rss::cpu_seconds(serve.pid()));
    let db_cpu_pct = db_pid
        .zip(cpu0.1)
        .map(|(p, c)| cpu_pct(c, rss::cpu_seconds(p)));
    let client_cpu_pct = cpu_pct(cpu0.2, rss::cpu_seconds_of(&[std::process::id()]));
    let mut batch_latency =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(anyhow::Error::from)?;
    let mut out = Ingest {
        sidecars: s,
        secs,
        batches: 0,
        accepted: 0,
        duplicates: 0,
        errors: 0,
        first_error: None,
        batch_latency: batch_latency.clone(),
        serve_cpu_pct,
        db_cpu_pct,
        client_cpu_pct,
        serve_mem: rss::sample(serve.pid()),
        other_cpu_pct,
        record_bytes: serde_json::to_vec(&sidecar_sim::decision(&ids[0].spiffe_id, TOOL_ID, 1))
            .map_or(0, |v| v.len()),
        facts,
        command_line: serve.child.command_line.clone(),
    };
    for p in per {
        out.batches += p.batches;
        out.accepted += p.accepted;
        out.duplicates += p.duplicates;
        out.errors += p.errors;
        if out.first_error.is_none() {
            out.first_error = p.first_error;
        }
        if let Some(h) = p.hist {
            batch_latency.add(&h).map_err(anyhow::Error::from)?;
        }
    }
    out.batch_latency = batch_latency;
    eprintln!(
        "   {} decisions accepted in {secs:.1} s: {:.0}/s ({} batches, {} duplicates, {} errors)",
        out.accepted,
        out.rate(),
        out.batches,
        out.duplicates,
        out.errors
    );
    let mut serve = serve;
    serve.child.check_alive()?;
    serve.child.stop(Duration::from_secs(3));
    drop(db);
    Ok(out)
}

/// One simulated sidecar's share of the ingest run.
#[derive(Default)]
struct PerSidecar {
    batches: u64,
    accepted: u64,
    duplicates: u64,
    errors: u64,
    first_error: Option<String>,
    hist: Option<Histogram<u64>>,
}

fn pass(ok: bool) -> &'static str {
    if ok { "pass" } else { "FAIL" }
}

/// The verdict, marked when other programs used enough CPU to distort the figure.
fn noted(verdict: &str, other_pct: f64) -> String {
    if other_pct > NOISY_PCT {
        format!("{verdict} (other programs used {other_pct:.0}% of a core: rerun to confirm)")
    } else {
        verdict.to_owned()
    }
}

/// The targets: (what, limit, measured, verdict).
pub fn targets(r: &ControlPlaneReport) -> Vec<[String; 4]> {
    let mut t = Vec::new();
    match &r.push {
        Part::Done(p) => {
            let p99 = p.last.value_at_quantile(0.99) as f64 / 1000.0;
            let missed = p
                .revocations
                .iter()
                .filter(|x| x.reached < p.streams)
                .count();
            let v = if missed > 0 {
                "FAIL (updates missed)"
            } else {
                pass(p99 <= TARGET_PUSH_P99_MS)
            };
            t.push([
                format!(
                    "push latency of a revocation to the last of {} streams, p99 over {} revocations",
                    p.streams,
                    p.revocations.len()
                ),
                format!("≤ {TARGET_PUSH_P99_MS:.0} ms"),
                format!(
                    "{p99:.1} ms (p50 {:.1} ms, max {:.1} ms)",
                    p.last.value_at_quantile(0.5) as f64 / 1000.0,
                    p.last.max() as f64 / 1000.0
                ),
                noted(v, p.other_cpu_pct),
            ]);
            let worst = p.mem_open.rss_mib().max(p.mem_after.rss_mib());
            t.push([
                format!("control plane RSS with {} streams open", p.streams),
                format!("≤ {TARGET_RSS_MIB:.0} MiB"),
                format!(
                    "{:.1} MiB once open, {:.1} MiB after the revocations (VmHWM {:.1} MiB)",
                    p.mem_open.rss_mib(),
                    p.mem_after.rss_mib(),
                    p.mem_after.hwm_mib()
                ),
                pass(worst <= TARGET_RSS_MIB).to_owned(),
            ]);
        }
        other => {
            let (m, v) = match other {
                Part::Skipped(why) => (format!("skipped: {why}"), "n/a".to_owned()),
                _ => ("failed (see below)".to_owned(), "FAIL".to_owned()),
            };
            t.push([
                "push latency of a revocation to the last stream, p99".to_owned(),
                format!("≤ {TARGET_PUSH_P99_MS:.0} ms"),
                m.clone(),
                v.clone(),
            ]);
            t.push([
                "control plane RSS with the streams open".to_owned(),
                format!("≤ {TARGET_RSS_MIB:.0} MiB"),
                m,
                v,
            ]);
        }
    }
    for (label, part) in [("SQLite", &r.sqlite), ("PostgreSQL", &r.postgres)] {
        let (m, v) = match part {
            Part::Done(i) => (
                format!(
                    "{} decisions/s ({} sidecars × batches of {BATCH}, {:.0} s)",
                    crate::report::thousands(i.rate() as usize),
                    i.sidecars,
                    i.secs
                ),
                if i.errors > 0 || i.duplicates > 0 {
                    "FAIL (errors or duplicates)".to_owned()
                } else {
                    noted(pass(i.rate() >= TARGET_INGEST_PER_S), i.other_cpu_pct)
                },
            ),
            Part::Skipped(w) => (format!("skipped: {w}"), "n/a".to_owned()),
            Part::Failed(_) => ("failed (see below)".to_owned(), "FAIL".to_owned()),
        };
        t.push([
            format!("decision ingest into {label}"),
            format!(
                "≥ {} decisions/s",
                crate::report::thousands(TARGET_INGEST_PER_S as usize)
            ),
            m,
            v,
        ]);
    }
    t
}

/// Lines for the terminal summary.
pub fn terminal(r: &ControlPlaneReport) -> String {
    let mut s = String::new();
    for [what, limit, measured, verdict] in targets(r) {
        let _ = writeln!(s, "target: {what} ({limit}): {measured} → {verdict}");
    }
    s
}

/// The "Control plane" section of `docs/benchmarks.md`.
pub fn markdown(r: &ControlPlaneReport, args: &BenchArgs, command: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n## Control plane\n");
    let _ = writeln!(s, "### Run\n");
    crate::report::command_lines(
        &mut s,
        command,
        &crate::report::alone_hint(args, "control-plane"),
    );
    if !r.version.is_empty() {
        let _ = writeln!(s, "- Control plane: {}", r.version);
    }
    let _ = writeln!(
        s,
        "- CPUs: `mandate serve` (and PostgreSQL) on CPU {} (`--cpus-control-plane`); the simulated \
         sidecars (one tokio runtime on one thread, one HTTP/2 connection over mTLS each) on CPU {}. \
         Wall time {:.0} s; 1-minute load average {:.2} at the start, {:.2} at the end (it counts \
         the benchmark itself; the CPU columns below say what other programs used).",
        crate::report::cpu_list(&r.cpus_cp),
        crate::report::cpu_list(&r.cpus_load),
        r.wall_s,
        r.loadavg.0,
        r.loadavg.1,
    );
    let _ = writeln!(s, "- File descriptors: {}.", r.fd_note);
    let _ = writeln!(
        s,
        "- Each part starts a fresh `mandate serve` (data directory in `<tmp>`, `--trust-domain {TRUST_DOMAIN}`, \
         admin token from `MANDATE_ADMIN_TOKEN`, store key from `MANDATE_STORE_KEY`, `MANDATE_LOG=warn`, \
         API and metrics on free loopback ports). The simulated sidecars verify it as real ones do: \
         its certificate must chain to `<data-dir>/ca.pem` and be the SVID \
         `spiffe://{TRUST_DOMAIN}/control-plane`."
    );

    let _ = writeln!(s, "\n### Targets\n");
    let _ = writeln!(
        s,
        "| target | limit | measured | result |\n|---|---|---|---|"
    );
    for [what, limit, measured, verdict] in targets(r) {
        let _ = writeln!(s, "| {what} | {limit} | {measured} | **{verdict}** |");
    }

    let _ = writeln!(s, "\n### Push latency and memory\n");
    match &r.push {
        Part::Done(p) => {
            let _ = writeln!(
                s,
                "{} agents are registered (`POST /v1/agents`) and {} of them enrolled as simulated \
                 sidecars: a fresh P-256 key and CSR each (`mandate_identity::csr::request`), the join \
                 token and CSR to `POST /v1/sidecar/enroll`, the SVID back. Each sidecar then opens \
                 `GET /v1/sidecar/stream` over its own mTLS HTTP/2 connection and keeps reading NDJSON; \
                 the first line of every stream is checked in full against `mandate_wire::StreamMessage` \
                 (an update with the whole registry and the trust bundle, {} bytes). The other {} \
                 agents are then revoked one at a time with {}. For each revocation and each stream the \
                 harness notes when the first update line whose registry shows that agent `revoked` has \
                 fully arrived (its newline read); the latency of a revocation is the time to the \
                 **last** of the {} streams. The next revocation starts when every stream has it (or \
                 after {} s) plus {} ms. Setup took {:.2} s to register, {:.2} s to enrol, {:.2} s to \
                 open the streams.\n",
                p.streams + p.revocations.len(),
                p.streams,
                p.first_line_bytes,
                p.revocations.len(),
                p.method,
                p.streams,
                REVOCATION_TIMEOUT.as_secs(),
                REVOCATION_GAP.as_millis(),
                p.setup_s[0],
                p.setup_s[1],
                p.setup_s[2]
            );
            let _ = writeln!(
                s,
                "| revocations | p50 ms | p90 ms | p99 ms | max ms | CPU during them: control plane / simulated sidecars / other programs |\n|---|---|---|---|---|---|"
            );
            let q = |x: f64| p.last.value_at_quantile(x) as f64 / 1000.0;
            let _ = writeln!(
                s,
                "| {} (to the last of {} streams) | {:.1} | {:.1} | {:.1} | {:.1} | {:.0}% / {:.0}% / {:.0}% of a core over {:.1} s |",
                p.revocations.len(),
                p.streams,
                q(0.5),
                q(0.9),
                q(0.99),
                p.last.max() as f64 / 1000.0,
                p.cpu_revocations_s.0 / p.cpu_revocations_s.1.max(1e-9) * 100.0,
                p.client_cpu_revocations_s / p.cpu_revocations_s.1.max(1e-9) * 100.0,
                p.other_cpu_pct,
                p.cpu_revocations_s.1
            );
            let _ = writeln!(
                s,
                "\n<details><summary>Each revocation</summary>\n\n| agent | command returned ms | first stream ms | median stream ms | last stream ms | streams reached |\n|---|---|---|---|---|---|"
            );
            for x in &p.revocations {
                let _ = writeln!(
                    s,
                    "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{} |",
                    x.agent, x.command_ms, x.first_ms, x.median_ms, x.last_ms, x.reached, p.streams
                );
            }
            let _ = writeln!(s, "\n</details>\n");
            let _ = writeln!(
                s,
                "| `mandate serve` memory | RSS | PSS | VmHWM |\n|---|---|---|---|\n\
                 | before any sidecar | {:.1} MiB | {:.1} MiB | {:.1} MiB |\n\
                 | {} streams open (2 s after the last opened) | {:.1} MiB | {:.1} MiB | {:.1} MiB |\n\
                 | after the revocations, streams still open | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
                p.mem_idle.rss_mib(),
                p.mem_idle.pss_mib(),
                p.mem_idle.hwm_mib(),
                p.streams,
                p.mem_open.rss_mib(),
                p.mem_open.pss_mib(),
                p.mem_open.hwm_mib(),
                p.mem_after.rss_mib(),
                p.mem_after.pss_mib(),
                p.mem_after.hwm_mib()
            );
            if p.closed.is_empty() {
                let _ = writeln!(s, "\nNo stream ended during the measurement.");
            } else {
                let _ = writeln!(
                    s,
                    "\n**{} streams ended during the measurement:** {}",
                    p.closed.len(),
                    p.closed
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            let _ = writeln!(s, "\nStarted as `{}`.", p.command_line);
        }
        Part::Skipped(why) => {
            let _ = writeln!(s, "_Skipped: {why}_");
        }
        Part::Failed(why) => {
            let _ = writeln!(s, "**Failed:**\n\n```\n{why}\n```");
        }
    }

    let _ = writeln!(s, "\n### Decision ingest\n");
    let _ = writeln!(
        s,
        "A fresh control plane per backend; {} simulated sidecars are registered, enrolled and \
         connected (mTLS, HTTP/2), then each posts `DecisionBatch`es of {BATCH} records to \
         `POST /v1/sidecar/decisions` back to back (one batch in flight per sidecar, as a sidecar \
         sends them) for {:.0} s after {:.0} s of unmeasured warm-up. Every record is new: a UUIDv7 \
         `decision_id`, the current time, the sidecar's own SPIFFE ID as source and sidecar, an MCP \
         `tools/call` of `search` on `spiffe://{TRUST_DOMAIN}/service/tool` with a trace id \
         ({} bytes of JSON each). Decisions/s is the sum of `IngestResult.accepted` over the \
         measured window, which ends when the last batch in flight has been answered.\n",
        args.cp_ingest_sidecars,
        args.cp_ingest_time.as_secs_f64(),
        INGEST_WARMUP.as_secs_f64(),
        [&r.sqlite, &r.postgres]
            .into_iter()
            .find_map(|p| match p {
                Part::Done(i) => Some(i.record_bytes.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| "about 480".to_owned())
    );
    let _ = writeln!(
        s,
        "| backend | decisions/s | accepted | batches | duplicates | errors | batch p50 / p99 / max ms | `mandate serve` CPU | PostgreSQL CPU | sidecars' CPU | other programs' CPU | serve RSS after |\n{}",
        "|---|".to_owned() + &"---|".repeat(11)
    );
    for (label, part) in [("SQLite", &r.sqlite), ("PostgreSQL", &r.postgres)] {
        match part {
            Part::Done(i) => {
                let h = &i.batch_latency;
                let _ = writeln!(
                    s,
                    "| {label} | **{}** | {} | {} | {} | {} | {:.1} / {:.1} / {:.1} | {:.0}% | {} | {:.0}% | {:.0}% | {:.1} MiB |",
                    crate::report::thousands(i.rate() as usize),
                    i.accepted,
                    i.batches,
                    i.duplicates,
                    i.errors,
                    h.value_at_quantile(0.5) as f64 / 1000.0,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                    h.max() as f64 / 1000.0,
                    i.serve_cpu_pct,
                    i.db_cpu_pct.map_or("–".to_owned(), |c| format!("{c:.0}%")),
                    i.client_cpu_pct,
                    i.other_cpu_pct,
                    i.serve_mem.rss_mib()
                );
            }
            Part::Skipped(why) => {
                let _ = writeln!(s, "| {label} | skipped: {why} ||||||||||| ");
            }
            Part::Failed(_) => {
                let _ = writeln!(s, "| {label} | failed (see below) ||||||||||| ");
            }
        }
    }
    let _ = writeln!(
        s,
        "\nCPU in percent of one core over the measured window.\n"
    );
    for (label, part) in [("SQLite", &r.sqlite), ("PostgreSQL", &r.postgres)] {
        match part {
            Part::Done(i) => {
                for f in &i.facts {
                    let _ = writeln!(s, "- {label}: {f}");
                }
                let _ = writeln!(s, "- {label}: started as `{}`", i.command_line);
                if let Some(e) = &i.first_error {
                    let _ = writeln!(s, "- {label}: first error: `{}`", e.replace('\n', " "));
                }
            }
            Part::Failed(why) => {
                let _ = writeln!(s, "\n**{label} failed:**\n\n```\n{why}\n```\n");
            }
            Part::Skipped(_) => {}
        }
    }
    s.replace(&r.tmp, "<tmp>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_key_is_base64_of_32_bytes() {
        use std::collections::HashMap;
        let alphabet: HashMap<char, u32> = ('A'..='Z')
            .chain('a'..='z')
            .chain('0'..='9')
            .chain(['+', '/'])
            .enumerate()
            .map(|(i, c)| (c, i as u32))
            .collect();
        let digits = STORE_KEY.trim_end_matches('=');
        assert!(digits.chars().all(|c| alphabet.contains_key(&c)));
        assert_eq!(digits.len() * 6 / 8, 32);
    }

    #[test]
    fn the_fd_limit_is_left_alone_when_it_suffices() {
        let note = raise_fd_limit(16).unwrap();
        assert!(note.contains("suffices"), "{note}");
    }
}
