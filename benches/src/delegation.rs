//! Delegation: what checking an `x-mandate-delegation` token costs per request — cold
//! (`mandate_wire::delegation::verify`, the signature every time) and through the sidecar's own
//! verifier with its cache of verified tokens — and what delegation adds to a call through a real
//! pair of managed sidecars (`mandate serve`, a tool's sidecar, an agent's sidecar), against the
//! same pair carrying calls the agent may make on its own.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use mandate_identity::ca::CertificateAuthority;
use mandate_identity::{SpiffeId, TrustDomain};
use mandate_proxy::delegation::{Presenter, Verifier};
use mandate_proxy::metrics::Metrics;
use mandate_wire::delegation::{
    self, Actor, Confirmation, DELEGATION_HEADER, DelegationClaims, Expectations, KeySet,
    SigningKey,
};
use mandate_wire::{DelegationState, Direction};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::json;

use crate::cli::BenchArgs;
use crate::control_plane::{self, Busy, Part, Serve, TRUST_DOMAIN};
use crate::loadgen::{self, Outcome, Target};
use crate::procs::{self, Child, Pinner, Spawn, TempDir};
use crate::rss;
use crate::topology::{BODY_BYTES, SetupError, TOOL_AUTHORITY, os_args};

/// Target: a token check on the sidecar's cached path, p50, µs.
pub const TARGET_CACHED_P50_US: f64 = 30.0;
/// Clock skew the checks tolerate, as the sidecar's verifier does.
const LEEWAY_SECS: u64 = 30;
/// Unmeasured checks before each in-process row.
const VERIFY_WARMUP: Duration = Duration::from_millis(300);
/// Distinct tokens signed for the cache-miss row (each is checked once).
const MISS_POOL: usize = 20_000;
/// The person on whose behalf the agents act.
const ALICE: &str = "alice@example.com";
/// The pair's agent that needs a delegation for every call.
const DELEGATED: &str = "bench-delegated";
/// The pair's agent whose autonomous scopes cover the load.
const AUTONOMOUS: &str = "bench-autonomous";
/// Ceiling of both of the pair's agents.
const CEILING: &str = r#"[{"host":"tool"}]"#;
/// Unmeasured load per variant before the rounds.
const PAIR_WARMUP: Duration = Duration::from_secs(1);
/// Unmeasured load at the fixed rate before every round.
const ROUND_WARMUP: Duration = Duration::from_millis(500);
/// How long a setup check may take to see the answer it expects.
const CHECK_TIME: Duration = Duration::from_secs(10);

/// The scopes of the pair's grant, and the autonomous agent's own: the load (`GET /` on the
/// tool) and two more, as a grant for a task would hold.
pub(crate) fn pair_scopes() -> Vec<serde_json::Value> {
    vec![
        json!({"host": "tool", "method": "GET", "path": "/"}),
        json!({"host": "tool", "path": "/docs/*"}),
        json!({"host": "tool", "tool": "search"}),
    ]
}

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

// ---------------------------------------------------------------------------------------------
// In process: one token check.

/// One way of checking a token, measured.
#[derive(Debug, Clone)]
pub struct VerifyRow {
    /// What was called.
    pub what: &'static str,
    /// How, in words.
    pub how: String,
    /// Per check, nanoseconds.
    pub latency: Histogram<u64>,
    /// Checks measured.
    pub n: u64,
    /// Measured time.
    pub elapsed: Duration,
}

impl VerifyRow {
    /// Latency at quantile `q`, µs.
    pub fn us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Checks per second.
    pub fn rate(&self) -> f64 {
        self.n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The in-process measurement.
#[derive(Debug, Clone)]
pub struct Verify {
    /// Cold, sidecar miss, sidecar hit.
    pub rows: Vec<VerifyRow>,
    /// Size of the token, bytes.
    pub token_bytes: usize,
    /// Its claims, as JSON.
    pub claims: String,
    /// CPU the thread was pinned to.
    pub cpu: usize,
    /// Measured time per row (the miss row ends sooner when its tokens run out).
    pub duration: Duration,
    /// Time spent signing the miss row's tokens, s.
    pub sign_s: f64,
}

impl Verify {
    /// The row of the sidecar's cached path.
    pub fn cached(&self) -> Option<&VerifyRow> {
        self.rows.iter().find(|r| r.what.contains("hit"))
    }
}

/// What the checks are given: the token's claims and the presenter.
struct Fixture {
    key: SigningKey,
    keys: KeySet,
    presenter_id: String,
    thumbprint: String,
    domain: String,
    issuer: String,
}

impl Fixture {
    fn new() -> anyhow::Result<Self> {
        let td: TrustDomain = TRUST_DOMAIN.parse()?;
        let ca = CertificateAuthority::generate(td.clone(), Duration::from_secs(86_400))?;
        let research = SpiffeId::agent(&td, "research")?;
        let svid = ca.issue(&research, Duration::from_secs(3600))?;
        let der = CertificateDer::from_pem_slice(svid.cert_pem.as_bytes())
            .context("the presenter's certificate is not PEM")?;
        let (key, _pkcs8) = SigningKey::generate("bench0123456789ab".to_owned());
        let keys = KeySet::from_jwks(&[key.public_jwk()])?;
        let domain = format!("spiffe://{TRUST_DOMAIN}");
        Ok(Self {
            key,
            keys,
            presenter_id: research.to_string(),
            thumbprint: delegation::thumbprint(der.as_ref()),
            issuer: format!("{domain}/control-plane"),
            domain,
        })
    }

    /// A token as the control plane issues it after an exchange: alice delegated to the planner,
    /// which handed the work to research (two actors), four scopes and a constraint.
    fn claims(&self) -> DelegationClaims {
        let now = unix_now();
        DelegationClaims {
            iss: self.issuer.clone(),
            sub: ALICE.to_owned(),
            act: Actor::from_chain(&[
                format!("spiffe://{TRUST_DOMAIN}/agent/planner"),
                self.presenter_id.clone(),
            ]),
            scope: vec![
                json!({"host": "tool", "tool": "search"}),
                json!({"host": "tool", "tool": "read_*"}),
                json!({"host": "docs", "method": "GET", "path": "/reports/2026/**"}),
                json!({"host": "api", "method": "{GET,POST}", "path": "/v1/tickets/*"}),
            ],
            constraints: json!({"arguments": {"repo": "acme/*"}})
                .as_object()
                .cloned(),
            grant_id: uuid::Uuid::now_v7().to_string(),
            aud: vec![self.domain.clone()],
            iat: now,
            nbf: now,
            exp: now + 3600,
            jti: uuid::Uuid::now_v7().to_string(),
            cnf: Confirmation {
                x5t_s256: self.thumbprint.clone(),
            },
            approved_by: ALICE.to_owned(),
            purpose: "prepare the quarterly report".to_owned(),
        }
    }

    fn presenter(&self) -> Presenter<'_> {
        Presenter {
            id: &self.presenter_id,
            thumbprint: &self.thumbprint,
        }
    }
}

/// Calls `check(i)` for `warmup`, then times each call for `duration` or until `limit` calls in
/// all; every call must succeed.
fn timed(
    what: &'static str,
    how: String,
    duration: Duration,
    limit: usize,
    mut check: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<VerifyRow> {
    let mut i = 0;
    let warm_end = Instant::now() + VERIFY_WARMUP;
    while Instant::now() < warm_end && i < limit / 10 {
        check(i).with_context(|| format!("{what}: warm-up check {i}"))?;
        i += 1;
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let start = Instant::now();
    let end = start + duration;
    let mut n = 0;
    while i < limit {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let result = check(i);
        let ns = t0.elapsed().as_nanos() as u64;
        result.with_context(|| format!("{what}: check {i}"))?;
        latency.saturating_record(ns.max(1));
        i += 1;
        n += 1;
    }
    Ok(VerifyRow {
        what,
        how,
        latency,
        n,
        elapsed: start.elapsed(),
    })
}

/// The in-process measurement, on a thread pinned to `cpu`.
pub fn verify(cpu: usize, duration: Duration) -> anyhow::Result<Verify> {
    std::thread::spawn(move || -> anyhow::Result<Verify> {
        procs::pin_current_thread(&[cpu])?;
        verify_pinned(cpu, duration)
    })
    .join()
    .map_err(|_| anyhow!("the verification thread panicked"))?
}

fn verify_pinned(cpu: usize, duration: Duration) -> anyhow::Result<Verify> {
    let fx = Fixture::new()?;
    let claims = fx.claims();
    let token = fx.key.sign(&claims);
    let audiences = [fx.domain.as_str()];
    let mut rows = Vec::new();

    eprintln!("   token verification: cold (signature every time), {duration:?}");
    rows.push(timed(
        "`mandate_wire::delegation::verify` (cold)",
        "the whole check every time: parse, ES256 signature, claims".to_owned(),
        duration,
        usize::MAX,
        |_| {
            delegation::verify(
                &token,
                &fx.keys,
                &Expectations {
                    issuer: &fx.issuer,
                    audiences: &audiences,
                    presenter_id: &fx.presenter_id,
                    presenter_thumbprint: &fx.thumbprint,
                    now: unix_now(),
                    leeway_secs: LEEWAY_SECS,
                },
            )
            .map(|_| ())
            .map_err(anyhow::Error::from)
        },
    )?);

    // The sidecar's verifier, fed the keys the way the push stream does.
    let verifier = || -> anyhow::Result<Verifier> {
        let td: TrustDomain = TRUST_DOMAIN.parse()?;
        let v = Verifier::new(&td, true, Arc::new(Metrics::new()));
        v.apply(&DelegationState {
            revision: 1,
            keys: vec![fx.key.public_jwk()],
            revoked_grants: vec![],
        })
        .map_err(|e| anyhow!("{e}"))?;
        Ok(v)
    };
    let check = |v: &Verifier, token: &HeaderValue| {
        v.verify(Direction::Outbound, token, fx.presenter(), &audiences)
            .map_err(|r| anyhow!("{}", r.reason))
    };

    eprintln!("   token verification: signing {MISS_POOL} distinct tokens for the cache-miss row");
    let t = Instant::now();
    let pool: Vec<HeaderValue> = (0..MISS_POOL)
        .map(|_| HeaderValue::from_str(&fx.key.sign(&fx.claims())))
        .collect::<Result<_, _>>()?;
    let sign_s = t.elapsed().as_secs_f64();
    eprintln!("   token verification: sidecar verifier, cache miss");
    let miss = verifier()?;
    rows.push(timed(
        "`mandate_proxy::delegation::Verifier::verify`, cache miss",
        format!(
            "a token it has not seen (a fresh `jti` each, {MISS_POOL} signed beforehand): the \
             cold check plus the sidecar's work around it (SHA-256 cache key, the policy's \
             `input.delegation`, header values, cache insert, revocation check)"
        ),
        duration,
        MISS_POOL,
        |i| check(&miss, &pool[i]).map(|_| ()),
    )?);
    drop(pool);

    eprintln!("   token verification: sidecar verifier, cache hit, {duration:?}");
    let hit = verifier()?;
    let value = HeaderValue::from_str(&token)?;
    let first = check(&hit, &value)?;
    rows.push(timed(
        "`mandate_proxy::delegation::Verifier::verify`, cache hit",
        "the same token from the same presenter again, as on every call after the first: SHA-256 \
         of the token and the presenter's thumbprint, cache lookup, then expiry, audience, actor \
         and revocation checked again"
            .to_owned(),
        duration,
        usize::MAX,
        |_| check(&hit, &value).map(|_| ()),
    )?);
    // The cached path must be the cache: the same verification handed out again.
    let again = check(&hit, &value)?;
    if !Arc::ptr_eq(&first, &again) {
        bail!("the verifier did not answer a repeated token from its cache");
    }
    Ok(Verify {
        rows,
        token_bytes: token.len(),
        claims: serde_json::to_string(&claims)?,
        cpu,
        duration,
        sign_s,
    })
}

// ---------------------------------------------------------------------------------------------
// The pair: real binaries, managed mode.

/// One variant of the pair, measured.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Label for the tables.
    pub label: &'static str,
    /// The fixed-rate phase, all rounds together.
    pub open: Outcome,
    /// Failed requests during the warm-ups.
    pub warmup_errors: u64,
    /// CPU seconds during the measured rounds: the agent's sidecar, the tool's sidecar, the
    /// control plane.
    pub cpu_s: [f64; 3],
    /// CPU other programs used during the measured rounds, percent of one core.
    pub other_pct: f64,
    /// p50 and p99 of each round, ms, in the order they ran.
    pub rounds: Vec<(f64, f64)>,
}

impl Variant {
    /// CPU per successful request, µs.
    pub fn cpu_us_per_req(&self, i: usize) -> f64 {
        self.cpu_s[i] * 1e6 / (self.open.ok.max(1) as f64)
    }
}

/// A counter of `mandate_delegation_verifications_total` scraped from a sidecar.
#[derive(Debug, Clone)]
pub struct Counter {
    /// Which sidecar.
    pub sidecar: &'static str,
    /// Its labels as exposed.
    pub labels: String,
    /// The value.
    pub value: u64,
}

/// Decisions of one kind in a sidecar's decision log.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecisionKind {
    /// Records.
    pub n: u64,
    /// Of them allowed.
    pub allowed: u64,
    /// Sum of the sidecar's own policy-evaluation times, µs.
    pub eval_us: u64,
}

impl DecisionKind {
    /// Mean policy evaluation, µs.
    pub fn mean_eval_us(&self) -> f64 {
        self.eval_us as f64 / self.n.max(1) as f64
    }
}

/// A sidecar's decision log, split into delegated calls and the agents' own.
#[derive(Debug, Clone)]
pub struct DecisionSplit {
    /// Which sidecar.
    pub sidecar: &'static str,
    /// Records with a delegation.
    pub delegated: DecisionKind,
    /// Records without one.
    pub own: DecisionKind,
    /// Lines that were not decision records.
    pub unreadable: u64,
}

/// Reads a decision log (JSON lines) into delegated and own calls.
fn split_decisions(sidecar: &'static str, path: &Path) -> DecisionSplit {
    use std::io::BufRead as _;
    let mut split = DecisionSplit {
        sidecar,
        delegated: DecisionKind::default(),
        own: DecisionKind::default(),
        unreadable: 0,
    };
    let Ok(file) = std::fs::File::open(path) else {
        split.unreadable = 1;
        return split;
    };
    for line in std::io::BufReader::new(file).lines() {
        let rec: serde_json::Value = match line.map(|l| serde_json::from_str(&l)) {
            Ok(Ok(v)) => v,
            _ => {
                split.unreadable += 1;
                continue;
            }
        };
        let (Some(allow), Some(eval_us)) = (rec["allow"].as_bool(), rec["eval_us"].as_u64()) else {
            split.unreadable += 1;
            continue;
        };
        let kind = if rec["delegation"].is_object() {
            &mut split.delegated
        } else {
            &mut split.own
        };
        kind.n += 1;
        kind.allowed += u64::from(allow);
        kind.eval_us += eval_us;
    }
    split
}

/// The pair measurement.
#[derive(Debug, Clone)]
pub struct Pair {
    /// With a delegation token on every call.
    pub delegated: Variant,
    /// Without: the agent's autonomous scopes cover the call.
    pub autonomous: Variant,
    /// What the setup checked before measuring, in words.
    pub checks: Vec<String>,
    /// The verification counters after the run.
    pub counters: Vec<Counter>,
    /// The sidecars' decision logs.
    pub decisions: Vec<DecisionSplit>,
    /// Size of the token, bytes; seconds it had left when fetched.
    pub token: (usize, i64),
    /// The operator commands run, as typed (join tokens elided).
    pub commands: Vec<String>,
    /// How each process was started.
    pub started: Vec<(String, String)>,
    /// `mandate-proxy --version`.
    pub version: String,
    /// Rounds per variant and measured time per variant.
    pub rounds: u32,
    /// Measured time per variant.
    pub duration: Duration,
    /// CPUs of the sidecars, of the load generator and app, of the control plane.
    pub cpus: [Vec<usize>; 3],
}

/// Everything the delegation benchmark measured.
#[derive(Debug, Clone)]
pub struct DelegationReport {
    /// Token checks in process.
    pub verify: Part<Verify>,
    /// The pair with and without delegation.
    pub pair: Part<Pair>,
    /// Wall time, s.
    pub wall_s: f64,
    /// The scratch directory, shown as `<tmp>`.
    pub tmp: String,
}

impl DelegationReport {
    /// Names of the parts that failed.
    pub fn failures(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if matches!(self.verify, Part::Failed(_)) {
            f.push("delegation token verification");
        }
        if matches!(self.pair, Part::Failed(_)) {
            f.push("delegation pair");
        }
        if let Part::Done(p) = &self.pair
            && p.delegated.open.errors.total() + p.autonomous.open.errors.total() > 0
        {
            f.push("delegation pair (requests failed)");
        }
        f
    }
}

/// Runs both parts.
pub async fn run(
    args: &BenchArgs,
    cpus_proxy: &[usize],
    cpus_load: &[usize],
) -> anyhow::Result<DelegationReport> {
    let started = Instant::now();
    let tmp = TempDir::new(args.keep_tmp)?;
    let cpu = cpus_proxy[0];
    eprintln!(
        "== delegation: token verification in process (CPU {cpu}, {:?} per row)",
        args.delegation_verify_time
    );
    let verify = match verify(cpu, args.delegation_verify_time) {
        Ok(v) => Part::Done(v),
        Err(e) => {
            eprintln!("== delegation verification FAILED: {e:#}");
            Part::Failed(format!("{e:#}"))
        }
    };
    eprintln!(
        "== delegation: the pair with and without delegation, {} req/s, {:?} per variant",
        args.rate, args.delegation_duration
    );
    let pair = Part::from_result(pair(args, tmp.path(), cpus_proxy, cpus_load).await);
    match &pair {
        Part::Done(_) => {}
        Part::Skipped(why) => eprintln!("== delegation pair: skipped: {why}"),
        Part::Failed(why) => eprintln!("== delegation pair: FAILED: {why}"),
    }
    Ok(DelegationReport {
        verify,
        pair,
        wall_s: started.elapsed().as_secs_f64(),
        tmp: tmp.path().display().to_string(),
    })
}

/// One HTTP/1.1 exchange on a fresh connection: status and body.
pub(crate) async fn http(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, String)> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| anyhow!("no answer from {addr} within 30 s"))?
}

/// `GET http://tool:8080/` through the outbound listener at `outbound`, with `headers`.
async fn call(
    outbound: SocketAddr,
    headers: &[(HeaderName, HeaderValue)],
) -> anyhow::Result<(StatusCode, String)> {
    let mut req = Request::get("http://tool:8080/")
        .header(http::header::HOST, TOOL_AUTHORITY)
        .body(Full::new(Bytes::new()))?;
    for (k, v) in headers {
        req.headers_mut().append(k.clone(), v.clone());
    }
    http(outbound, req).await
}

/// Repeats `call` until it answers `want` (a managed sidecar learns of new agents and keys by
/// push, a moment after it is ready), returning the last answer's body.
pub(crate) async fn expect_status(
    outbound: SocketAddr,
    headers: &[(HeaderName, HeaderValue)],
    want: StatusCode,
    what: &str,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + CHECK_TIME;
    loop {
        let last = call(outbound, headers).await;
        match &last {
            Ok((status, body)) if *status == want => return Ok(body.clone()),
            _ if Instant::now() >= deadline => {
                return Err(match last {
                    Ok((status, body)) => anyhow!("{what}: expected {want}, got {status}: {body}"),
                    Err(e) => e.context(format!("{what}: expected {want}")),
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The first join token (`mjt1.…`) in the CLI's output.
pub(crate) fn join_token_in(out: &str) -> anyhow::Result<String> {
    out.split_whitespace()
        .find(|w| w.starts_with("mjt1."))
        .map(str::to_owned)
        .with_context(|| format!("no join token (mjt1.…) in:\n{out}"))
}

/// The first UUID in the CLI's output.
fn uuid_in(out: &str) -> anyhow::Result<String> {
    out.split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .find(|w| w.len() == 36 && w.matches('-').count() == 4)
        .map(str::to_owned)
        .with_context(|| format!("no id in:\n{out}"))
}

/// Listener addresses of one sidecar.
pub(crate) struct Ports {
    pub(crate) outbound: SocketAddr,
    pub(crate) inbound: SocketAddr,
    pub(crate) admin: SocketAddr,
}

/// A managed sidecar: started with its join token, ready.
pub(crate) struct Sidecar {
    pub(crate) child: Child,
    pub(crate) ports: Ports,
    decision_log: std::path::PathBuf,
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn sidecar(
    args: &BenchArgs,
    pinner: &Pinner,
    tmp: &Path,
    bin: &Path,
    serve: &Serve,
    name: &str,
    join_token: &str,
    extra: Vec<String>,
    cpus: &[usize],
) -> anyhow::Result<Sidecar> {
    let p = procs::free_ports(3)?;
    let ports = Ports {
        outbound: p[0],
        inbound: p[1],
        admin: p[2],
    };
    let mut argv = vec![
        "--trust-domain".to_owned(),
        TRUST_DOMAIN.to_owned(),
        "--control-plane".to_owned(),
        format!("https://{}", serve.listen),
        "--outbound".to_owned(),
        ports.outbound.to_string(),
        "--inbound".to_owned(),
        ports.inbound.to_string(),
        "--admin".to_owned(),
        ports.admin.to_string(),
        "--workers".to_owned(),
        args.workers.to_string(),
    ];
    let decision_log = tmp.join(format!("decisions-{name}.jsonl"));
    argv.extend([
        "--decision-log".to_owned(),
        decision_log.display().to_string(),
    ]);
    argv.extend(extra);
    let mut child = Child::spawn(
        pinner,
        Spawn {
            name,
            program: bin,
            args: os_args(argv),
            cpus,
            // The join token in the environment, not argv, as the docs advise.
            env: vec![("MANDATE_JOIN_TOKEN", join_token), ("MANDATE_LOG", "warn")],
            log_dir: tmp,
        },
    )?;
    crate::mandate::wait_ready(&mut child, ports.admin).await?;
    Ok(Sidecar {
        child,
        ports,
        decision_log,
    })
}

/// The values of `mandate_delegation_verifications_total` on the admin listener at `admin`.
async fn verification_counters(
    sidecar: &'static str,
    admin: SocketAddr,
) -> anyhow::Result<Vec<Counter>> {
    let req = Request::get("/metrics")
        .header(http::header::HOST, admin.to_string())
        .body(Full::new(Bytes::new()))?;
    let (status, text) = http(admin, req).await?;
    if status != StatusCode::OK {
        bail!("{sidecar}: GET /metrics answered {status}");
    }
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("mandate_delegation_verifications_total"))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once(' ')?;
            Some(Counter {
                sidecar,
                labels: labels.to_owned(),
                value: value.trim().parse::<f64>().ok()? as u64,
            })
        })
        .collect())
}

/// The pair with delegation vs without, interleaved rounds at the fixed rate.
async fn pair(
    args: &BenchArgs,
    tmp: &Path,
    cpus_proxy: &[usize],
    cpus_load: &[usize],
) -> Result<Pair, SetupError> {
    let [mandate, proxy] = crate::topology::release_bins(args)?;
    let has = |argv: &[&str]| {
        std::process::Command::new(&mandate)
            .args(argv)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has(&["grant", "create", "--help"]) {
        return Err(SetupError::Unavailable(format!(
            "{} has no `grant create` subcommand yet",
            mandate.display()
        )));
    }
    let version = std::process::Command::new(&proxy)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let pinner = Pinner::new();
    let dir = tmp.join("pair");
    std::fs::create_dir_all(&dir).map_err(anyhow::Error::from)?;
    // The control plane shares the load side's CPU: it only takes the sidecars' decision records
    // during the load, and the sidecars' CPU stays theirs alone, as in the data-path pairs.
    let ctx = control_plane::Ctx {
        args,
        bin: &mandate,
        tmp: &dir,
        cpus: cpus_load,
        pinner: &pinner,
    };
    // Tokens that outlive any run: an expiry mid-run would be a refusal, not a measurement.
    let serve = Serve::start(
        &ctx,
        "serve-delegation",
        None,
        &["--delegation-token-ttl", "1h"],
    )
    .await?;

    let (mut app, app_addr) = crate::app::start(&pinner, cpus_load, &dir)?;

    let policy_dir = std::fs::canonicalize(&args.policy_dir)
        .with_context(|| format!("--policy-dir {}", args.policy_dir.display()))?;
    let scopes: Vec<String> = pair_scopes().iter().map(|s| s.to_string()).collect();
    let autonomous = serde_json::Value::Array(pair_scopes()).to_string();
    let mut commands = Vec::new();
    let mut cli = async |argv: &[&str]| -> anyhow::Result<String> {
        commands.push(format!("mandate {}", argv.join(" ")));
        serve.cli(&mandate, argv).await
    };
    cli(&["policy", "push", &policy_dir.display().to_string()]).await?;
    let tool_token = join_token_in(
        &cli(&[
            "service",
            "register",
            "tool",
            "--owner",
            "tools@example.com",
        ])
        .await?,
    )?;
    let delegated_token = join_token_in(
        &cli(&[
            "agent",
            "register",
            DELEGATED,
            "--owner",
            ALICE,
            "--ceiling",
            CEILING,
        ])
        .await?,
    )?;
    let autonomous_token = join_token_in(
        &cli(&[
            "agent",
            "register",
            AUTONOMOUS,
            "--owner",
            ALICE,
            "--ceiling",
            CEILING,
            "--autonomous",
            &autonomous,
        ])
        .await?,
    )?;

    let tool = sidecar(
        args,
        &pinner,
        &dir,
        &proxy,
        &serve,
        "sidecar-tool",
        &tool_token,
        vec!["--app".to_owned(), app_addr.to_string()],
        cpus_proxy,
    )
    .await?;
    let tool_id = format!("spiffe://{TRUST_DOMAIN}/service/tool");
    let route = vec![
        "--route".to_owned(),
        format!("{TOOL_AUTHORITY}={},id={tool_id}", tool.ports.inbound),
    ];
    let delegated = sidecar(
        args,
        &pinner,
        &dir,
        &proxy,
        &serve,
        "sidecar-agent-delegated",
        &delegated_token,
        route.clone(),
        cpus_proxy,
    )
    .await?;
    let autonomous = sidecar(
        args,
        &pinner,
        &dir,
        &proxy,
        &serve,
        "sidecar-agent-autonomous",
        &autonomous_token,
        route,
        cpus_proxy,
    )
    .await?;

    let mut grant_argv = vec![
        "grant",
        "create",
        "--agent",
        DELEGATED,
        "--subject",
        ALICE,
        "--purpose",
        "prepare the quarterly report",
        "--approved-by",
        ALICE,
        "--ttl",
        "1h",
    ];
    for s in &scopes {
        grant_argv.extend(["--scope", s.as_str()]);
    }
    let grant = uuid_in(&cli(&grant_argv).await?)?;
    // The token as an agent gets it: from its own sidecar's admin listener.
    let req = Request::post("/delegation/token")
        .header(http::header::HOST, delegated.ports.admin.to_string())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            json!({"grant_id": grant}).to_string(),
        )))
        .map_err(anyhow::Error::from)?;
    let (status, body) = http(delegated.ports.admin, req).await?;
    if status != StatusCode::OK {
        return Err(anyhow!("POST /delegation/token answered {status}: {body}").into());
    }
    let issued: serde_json::Value =
        serde_json::from_str(&body).context("POST /delegation/token")?;
    let token = issued["token"]
        .as_str()
        .with_context(|| format!("no token in {body}"))?
        .to_owned();
    let left = issued["expires_at"].as_i64().unwrap_or(0) - unix_now();
    let header = vec![(
        HeaderName::from_static(DELEGATION_HEADER),
        HeaderValue::from_str(&token).map_err(anyhow::Error::from)?,
    )];

    // The comparison means something only if the delegated agent needs its token and has one
    // that works, and the other agent needs none.
    let mut checks = Vec::new();
    let refused = expect_status(
        delegated.ports.outbound,
        &[],
        StatusCode::FORBIDDEN,
        "the delegated agent without its token",
    )
    .await?;
    let reason = serde_json::from_str::<serde_json::Value>(&refused)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or(refused);
    checks.push(format!(
        "`{DELEGATED}` without the token: 403 (\"{reason}\")"
    ));
    expect_status(
        delegated.ports.outbound,
        &header,
        StatusCode::OK,
        "the delegated agent with its token",
    )
    .await?;
    checks.push(format!("`{DELEGATED}` with the token: 200"));
    expect_status(
        autonomous.ports.outbound,
        &[],
        StatusCode::OK,
        "the autonomous agent",
    )
    .await?;
    checks.push(format!("`{AUTONOMOUS}` without a token: 200"));

    let target = |outbound: SocketAddr, headers: Vec<(HeaderName, HeaderValue)>| Target {
        connect: outbound,
        uri: Uri::from_static("http://tool:8080/"),
        host: HeaderValue::from_static(TOOL_AUTHORITY),
        expect_body: Some(BODY_BYTES),
        headers,
    };
    let variants = [
        (
            "with delegation",
            target(delegated.ports.outbound, header),
            delegated.child.pid(),
        ),
        (
            "without (autonomous scopes)",
            target(autonomous.ports.outbound, vec![]),
            autonomous.child.pid(),
        ),
    ];
    let all_pids = [
        delegated.child.pid(),
        autonomous.child.pid(),
        tool.child.pid(),
        serve.pid(),
    ];
    let mut cpus: Vec<usize> = cpus_proxy.iter().chain(cpus_load).copied().collect();
    cpus.sort_unstable();
    cpus.dedup();

    let mut warmup_errors = [0u64; 2];
    for (i, (label, t, _)) in variants.iter().enumerate() {
        eprintln!(
            "   warm-up {label}: {} req/s for {PAIR_WARMUP:?}",
            args.rate
        );
        warmup_errors[i] += loadgen::open_loop(t, args.rate, PAIR_WARMUP, args.connections)
            .await
            .errors
            .total();
    }
    let rounds = args.rounds.max(1);
    let len = args.delegation_duration / rounds;
    eprintln!(
        "   fixed rate: {} req/s over {} connections, {rounds} rounds of {len:?} per variant",
        args.rate, args.connections
    );
    let mut outcomes: [Option<Outcome>; 2] = [None, None];
    let mut cpu_s = [[0.0f64; 3]; 2];
    let mut other = [(0.0f64, 0.0f64); 2];
    let mut per_round: [Vec<(f64, f64)>; 2] = [vec![], vec![]];
    for round in 0..rounds as usize {
        for j in 0..2 {
            let i = (round + j) % 2;
            let (_, t, agent_pid) = &variants[i];
            crate::topology::wait_quiet(&cpus, &all_pids, app.pid(), args.quiet_wait).await;
            warmup_errors[i] += loadgen::open_loop(t, args.rate, ROUND_WARMUP, args.connections)
                .await
                .errors
                .total();
            let measured = [*agent_pid, tool.child.pid(), serve.pid()];
            let ours = [
                *agent_pid,
                tool.child.pid(),
                serve.pid(),
                app.pid(),
                std::process::id(),
            ];
            let cpu0: Vec<f64> = measured.iter().map(|&p| rss::cpu_seconds(p)).collect();
            let busy = Busy::start(&ours);
            let t0 = Instant::now();
            let out = loadgen::open_loop(t, args.rate, len, args.connections).await;
            let secs = t0.elapsed().as_secs_f64();
            other[i].0 += busy.other_pct(&ours) * secs;
            other[i].1 += secs;
            for (k, &p) in measured.iter().enumerate() {
                cpu_s[i][k] += rss::cpu_seconds(p) - cpu0[k];
            }
            per_round[i].push((out.ms(0.5), out.ms(0.99)));
            match &mut outcomes[i] {
                Some(total) => total.absorb(out),
                None => outcomes[i] = Some(out),
            }
        }
    }
    let mut started = vec![("mandate serve".to_owned(), serve.child.command_line.clone())];
    let mut sidecars = [
        ("tool's sidecar", tool),
        ("delegated agent's sidecar", delegated),
        ("autonomous agent's sidecar", autonomous),
    ];
    for (name, s) in &mut sidecars {
        s.child
            .check_alive()
            .with_context(|| format!("the {name} died during the run"))?;
        started.push(((*name).to_owned(), s.child.command_line.clone()));
    }
    app.check_alive()
        .context("the upstream app died during the run")?;
    let mut counters = verification_counters("delegated agent", sidecars[1].1.ports.admin).await?;
    counters.extend(verification_counters("tool", sidecars[0].1.ports.admin).await?);
    let decisions = sidecars
        .iter()
        .map(|(name, s)| split_decisions(name, &s.decision_log))
        .collect();
    let [o_d, o_a] = outcomes;
    let [r_d, r_a] = per_round;
    let variant = |i: usize, o: Option<Outcome>, rounds| -> anyhow::Result<Variant> {
        Ok(Variant {
            label: variants[i].0,
            open: o.context("no measurement was taken")?,
            warmup_errors: warmup_errors[i],
            cpu_s: cpu_s[i],
            other_pct: other[i].0 / other[i].1.max(1e-9),
            rounds,
        })
    };
    Ok(Pair {
        delegated: variant(0, o_d, r_d)?,
        autonomous: variant(1, o_a, r_a)?,
        checks,
        counters,
        decisions,
        token: (token.len(), left),
        commands: commands
            .into_iter()
            .map(|c| {
                c.replace(
                    &policy_dir.display().to_string(),
                    &args.policy_dir.display().to_string(),
                )
            })
            .collect(),
        started,
        version,
        rounds,
        duration: args.delegation_duration,
        cpus: [cpus_proxy.to_vec(), cpus_load.to_vec(), cpus_load.to_vec()],
    })
}

// ---------------------------------------------------------------------------------------------
// Report.

/// The targets: (what, limit, measured, verdict).
pub fn targets(r: &DelegationReport) -> Vec<[String; 4]> {
    let what = "token verification per request on the sidecar's cached path, p50".to_owned();
    let limit = format!("≤ {TARGET_CACHED_P50_US:.0} µs");
    let row = match &r.verify {
        Part::Done(v) => match v.cached() {
            Some(c) => {
                let cold = v
                    .rows
                    .first()
                    .map(|r| format!("; cold {:.1} µs", r.us(0.5)))
                    .unwrap_or_default();
                [
                    what,
                    limit,
                    format!("{:.2} µs (p99 {:.2} µs{cold})", c.us(0.5), c.us(0.99)),
                    if c.us(0.5) <= TARGET_CACHED_P50_US {
                        "pass"
                    } else {
                        "FAIL"
                    }
                    .to_owned(),
                ]
            }
            None => [what, limit, "not measured".to_owned(), "FAIL".to_owned()],
        },
        Part::Skipped(why) => [what, limit, format!("skipped: {why}"), "n/a".to_owned()],
        Part::Failed(_) => [
            what,
            limit,
            "failed (see below)".to_owned(),
            "FAIL".to_owned(),
        ],
    };
    vec![row]
}

/// Lines for the terminal summary.
pub fn terminal(r: &DelegationReport) -> String {
    let mut s = String::new();
    if let Part::Done(v) = &r.verify {
        for row in &v.rows {
            let _ = writeln!(
                s,
                "delegation {}: p50 {:.2} µs, p99 {:.2} µs, {:.0}/s",
                row.what.replace('`', ""),
                row.us(0.5),
                row.us(0.99),
                row.rate()
            );
        }
    }
    if let Part::Done(p) = &r.pair {
        for v in [&p.delegated, &p.autonomous] {
            let _ = writeln!(
                s,
                "delegation pair {}: p50 {:.3} ms, p99 {:.3} ms, {} ok, {} errors",
                v.label,
                v.open.ms(0.5),
                v.open.ms(0.99),
                v.open.ok,
                v.open.errors.total()
            );
        }
        let _ = writeln!(
            s,
            "delegation adds: p50 {:+.3} ms, p99 {:+.3} ms",
            p.delegated.open.ms(0.5) - p.autonomous.open.ms(0.5),
            p.delegated.open.ms(0.99) - p.autonomous.open.ms(0.99)
        );
    }
    for [what, limit, measured, verdict] in targets(r) {
        let _ = writeln!(s, "target: {what} ({limit}): {measured} → {verdict}");
    }
    s
}

/// The "Delegation verification" section of `docs/benchmarks.md`.
pub fn markdown(r: &DelegationReport, args: &BenchArgs, command: &str, machine: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n## Delegation verification\n");
    let _ = writeln!(s, "### Run\n");
    crate::report::command_lines(
        &mut s,
        command,
        &crate::report::alone_hint(args, "delegation"),
    );
    let _ = writeln!(s, "- Machine: {machine}");
    let _ = writeln!(s, "- Wall time of this benchmark {:.0} s.", r.wall_s);

    let _ = writeln!(s, "\n### Targets\n");
    let _ = writeln!(
        s,
        "| target | limit | measured | result |\n|---|---|---|---|"
    );
    for [what, limit, measured, verdict] in targets(r) {
        let _ = writeln!(s, "| {what} | {limit} | {measured} | **{verdict}** |");
    }

    let _ = writeln!(s, "\n### Token verification, in process\n");
    match &r.verify {
        Part::Done(v) => {
            let _ = writeln!(
                s,
                "One thread pinned to CPU {} (the sidecars' CPU) checks a token the way a sidecar \
                 does for each call: a compact ES256 JWS of {} bytes, signed with a fresh P-256 key \
                 (`SigningKey::generate`), bound (`cnf`) to a real SVID of \
                 `spiffe://{TRUST_DOMAIN}/agent/research` minted by a throwaway CA, with two actors \
                 (planner → research), four scopes and an argument constraint:\n\n```json\n{}\n```\n\n\
                 Expectations as the sidecar sets them: issuer `spiffe://{TRUST_DOMAIN}/control-plane`, \
                 audience `spiffe://{TRUST_DOMAIN}`, presenter research and its certificate's \
                 thumbprint, {LEEWAY_SECS} s leeway. Each row: {:.1} s measured after {} ms \
                 unmeasured; every check must succeed; the timer covers the call alone \
                 (`Instant` around it, hdrhistogram in ns). The sidecar rows call \
                 `mandate_proxy::delegation::Verifier` itself (its keys applied as a pushed \
                 `DelegationState`), the code on the sidecar's call path; its cache of verified \
                 tokens is keyed by the SHA-256 of the token and the presenter's thumbprint. The \
                 {MISS_POOL} tokens of the miss row took {:.2} s to sign.\n",
                v.cpu,
                v.token_bytes,
                v.claims,
                v.duration.as_secs_f64(),
                VERIFY_WARMUP.as_millis(),
                v.sign_s
            );
            let _ = writeln!(
                s,
                "| check | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | checks | checks/s |\n|---|---|---|---|---|---|---|---|"
            );
            for row in &v.rows {
                let _ = writeln!(
                    s,
                    "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {:.0} |",
                    row.what,
                    row.us(0.5),
                    row.us(0.9),
                    row.us(0.99),
                    row.us(0.999),
                    row.latency.max() as f64 / 1000.0,
                    row.n,
                    row.rate()
                );
            }
            let _ = writeln!(s);
            for row in &v.rows {
                let _ = writeln!(s, "- {}: {}.", row.what, row.how);
            }
        }
        Part::Skipped(why) => {
            let _ = writeln!(s, "_Skipped: {why}_");
        }
        Part::Failed(why) => {
            let _ = writeln!(s, "**Failed:**\n\n```\n{why}\n```");
        }
    }

    let _ = writeln!(s, "\n### The pair with delegation vs without\n");
    match &r.pair {
        Part::Done(p) => pair_markdown(&mut s, p, args),
        Part::Skipped(why) => {
            let _ = writeln!(s, "_Skipped: {why}_");
        }
        Part::Failed(why) => {
            let _ = writeln!(s, "**Failed:**\n\n```\n{why}\n```");
        }
    }
    s.replace(&r.tmp, "<tmp>")
}

fn pair_markdown(s: &mut String, p: &Pair, args: &BenchArgs) {
    let _ = writeln!(
        s,
        "The real binaries in managed mode: `mandate serve` (SQLite in a fresh data directory in \
         `<tmp>`, `--delegation-token-ttl 1h` so no token expires mid-run) with the reference \
         policy pushed; the tool `tool` behind its sidecar (`--app` the benchmark's app, 1 KiB \
         bodies, as in *Data path*); two agents with the same ceiling `{CEILING}`, each behind its \
         own sidecar routing `{TOOL_AUTHORITY}` to the tool's: `{DELEGATED}` has no autonomous \
         scopes, so each of its calls needs a delegation, and `{AUTONOMOUS}` has the grant's scopes \
         as its autonomous ones (`--autonomous`), so the same calls need none. A grant for \
         `{DELEGATED}` on behalf of {ALICE} (`mandate grant create`, three scopes) gives the token, \
         fetched as an agent does with `POST /delegation/token` on its sidecar's admin listener \
         ({} bytes, {} s left). Then the load generator of *Data path* sends `GET \
         http://{TOOL_AUTHORITY}/` through each agent's outbound listener, the delegated one with \
         `{DELEGATION_HEADER}: <token>` on every request. With the token the agent's sidecar \
         checks it (outbound), the policy sees `input.delegation`, the token goes on to the tool's \
         sidecar, which checks it again (inbound) before its own policy decision; both record the \
         delegation in their decisions sent to `mandate serve`.\n",
        p.token.0, p.token.1
    );
    let _ = writeln!(
        s,
        "- {}, {} worker thread(s) per sidecar (`--workers {}`), `MANDATE_LOG=warn`; the three \
         sidecars on CPU {}; load generator, app and `mandate serve` on CPU {}.",
        p.version,
        args.workers,
        args.workers,
        crate::report::cpu_list(&p.cpus[0]),
        crate::report::cpu_list(&p.cpus[1]),
    );
    let _ = writeln!(
        s,
        "- Load: open loop at {} req/s over {} keep-alive connections (coordinated-omission \
         corrected, latency from each request's intended send time), {:.0} s per variant in {} \
         rounds that alternate between the variants (who goes first rotates); before each round \
         the harness waits up to {:.0} s for quiet CPUs and sends {} ms of unmeasured load; {} s of \
         unmeasured warm-up per variant first.",
        args.rate,
        args.connections,
        p.duration.as_secs_f64(),
        p.rounds,
        args.quiet_wait.as_secs_f64(),
        ROUND_WARMUP.as_millis(),
        PAIR_WARMUP.as_secs()
    );
    let _ = writeln!(s, "- Checked before measuring:");
    for c in &p.checks {
        let _ = writeln!(s, "  - {c}");
    }
    let _ = writeln!(
        s,
        "\n| variant | p50 ms | p90 ms | p99 ms | p99.9 ms | service p50 / p99 ms | requests | errors (warm-up / measured) | CPU µs/req: agent's sidecar / tool's sidecar / `mandate serve` | other programs' CPU |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for v in [&p.delegated, &p.autonomous] {
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} / {:.3} | {} | {} / {} | {:.1} / {:.1} / {:.1} | {:.0}% |",
            v.label,
            v.open.ms(0.5),
            v.open.ms(0.9),
            v.open.ms(0.99),
            v.open.ms(0.999),
            v.open.service_ms(0.5),
            v.open.service_ms(0.99),
            v.open.ok,
            v.warmup_errors,
            v.open.errors.total(),
            v.cpu_us_per_req(0),
            v.cpu_us_per_req(1),
            v.cpu_us_per_req(2),
            v.other_pct
        );
    }
    let (d, a) = (&p.delegated, &p.autonomous);
    let diff = |q: f64| (d.open.ms(q) - a.open.ms(q)) * 1000.0;
    let _ = writeln!(
        s,
        "\n**With delegation the pair's latency differs by {:+.0} µs at p50 and {:+.0} µs at p99** \
         (p90 {:+.0} µs, p99.9 {:+.0} µs) at {} req/s; CPU per request {:+.1} µs on the agent's \
         sidecar and {:+.1} µs on the tool's. Each variant's p99 rests on its {} slowest requests \
         and moves between rounds of the same variant as much as the table below shows; the p50 \
         is the steadier comparison.\n",
        diff(0.5),
        diff(0.99),
        diff(0.9),
        diff(0.999),
        args.rate,
        d.cpu_us_per_req(0) - a.cpu_us_per_req(0),
        d.cpu_us_per_req(1) - a.cpu_us_per_req(1),
        d.open.ok.min(a.open.ok) / 100,
    );
    for v in [d, a] {
        for e in &v.open.errors.samples {
            let _ = writeln!(s, "- {}: first error: `{}`", v.label, e.replace('\n', " "));
        }
    }
    let _ = writeln!(
        s,
        "| round (order run) | {} p50 / p99 ms | {} p50 / p99 ms |\n|---|---|---|",
        d.label, a.label
    );
    for (k, (rd, ra)) in d.rounds.iter().zip(&a.rounds).enumerate() {
        // Round k ran the delegated variant first when k is even.
        let first = if k % 2 == 0 {
            "with first"
        } else {
            "without first"
        };
        let _ = writeln!(
            s,
            "| {} ({first}) | {:.3} / {:.3} | {:.3} / {:.3} |",
            k + 1,
            rd.0,
            rd.1,
            ra.0,
            ra.1
        );
    }
    if !p.decisions.is_empty() {
        let _ = writeln!(
            s,
            "\nWhere the CPU goes: each sidecar sees one token from one presenter, so after its \
             first call every check is a cache hit (about 1 µs in process, above); the rest is \
             the work around it — the policy's \
             delegation rules, the token's bytes carried from the agent's sidecar to the tool's \
             over mTLS, the delegation in each decision record. The sidecars' decision logs \
             (`--decision-log`, as written when read after the run, warm-ups and checks \
             included) give each policy evaluation's own time (`eval_us`, whole µs):\n"
        );
        let _ = writeln!(
            s,
            "| sidecar | delegated calls (allowed) | mean eval_us | own calls (allowed) | mean eval_us | unreadable lines |\n|---|---|---|---|---|---|"
        );
        for x in &p.decisions {
            let _ = writeln!(
                s,
                "| {} | {} ({}) | {:.1} | {} ({}) | {:.1} | {} |",
                x.sidecar,
                x.delegated.n,
                x.delegated.allowed,
                x.delegated.mean_eval_us(),
                x.own.n,
                x.own.allowed,
                x.own.mean_eval_us(),
                x.unreadable
            );
        }
        let _ = writeln!(s);
    }
    if !p.counters.is_empty() {
        let _ = writeln!(
            s,
            "`mandate_delegation_verifications_total` after the run (warm-ups and checks \
             included): each delegated call was checked twice, by the agent's sidecar outbound and \
             by the tool's inbound, and every check passed:\n"
        );
        let _ = writeln!(s, "| sidecar | labels | count |\n|---|---|---|");
        for c in &p.counters {
            let _ = writeln!(s, "| {} | `{}` | {} |", c.sidecar, c.labels, c.value);
        }
    }
    let _ = writeln!(s, "\n<details><summary>Commands and processes</summary>\n");
    for c in &p.commands {
        let _ = writeln!(s, "- `{c}`");
    }
    for (name, cmd) in &p.started {
        // The join tokens travel in the environment; nothing secret is on these lines.
        let _ = writeln!(s, "- {name}: `{cmd}`");
    }
    let _ = writeln!(s, "\n</details>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_process_token_verifies_on_every_path() {
        let fx = Fixture::new().unwrap();
        let token = fx.key.sign(&fx.claims());
        let audiences = [fx.domain.as_str()];
        let claims = delegation::verify(
            &token,
            &fx.keys,
            &Expectations {
                issuer: &fx.issuer,
                audiences: &audiences,
                presenter_id: &fx.presenter_id,
                presenter_thumbprint: &fx.thumbprint,
                now: unix_now(),
                leeway_secs: LEEWAY_SECS,
            },
        )
        .unwrap();
        assert_eq!(claims.act.chain().len(), 2);
        let td: TrustDomain = TRUST_DOMAIN.parse().unwrap();
        let v = Verifier::new(&td, true, Arc::new(Metrics::new()));
        v.apply(&DelegationState {
            revision: 1,
            keys: vec![fx.key.public_jwk()],
            revoked_grants: vec![],
        })
        .unwrap();
        let value = HeaderValue::from_str(&token).unwrap();
        let first = v
            .verify(Direction::Outbound, &value, fx.presenter(), &audiences)
            .unwrap();
        let again = v
            .verify(Direction::Outbound, &value, fx.presenter(), &audiences)
            .unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second check is a cache hit"
        );
    }

    #[test]
    fn ids_and_join_tokens_are_found_in_cli_output() {
        assert_eq!(
            uuid_in("grant 0190f3a2-1b2c-7d3e-8f40-0123456789ab created").unwrap(),
            "0190f3a2-1b2c-7d3e-8f40-0123456789ab"
        );
        assert!(uuid_in("nothing here").is_err());
        assert_eq!(
            join_token_in("join token:\n  mjt1.abc.def\n").unwrap(),
            "mjt1.abc.def"
        );
    }
}
