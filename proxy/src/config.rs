//! The sidecar's configuration: flags, `MANDATE_*` environment variables and a YAML file, in that
//! order of precedence, validated once at start-up into [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mandate_identity::TrustDomain;
use serde::Deserialize;

pub use crate::sync::spool::SpoolFull;

use mandate_wire::JoinToken;

use crate::authz::Enforcement;
use crate::policy::{CompileSettings, PolicySource};
use crate::routes::{Route, RouteTable};
use mandate_rego::EngineChoice;

/// Environment variable holding routes, separated by `;` (a route itself contains commas).
const ROUTE_ENV: &str = "MANDATE_ROUTE";

/// A configuration value that cannot be used; names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field has an unusable value.
    #[error("{field}: {why}")]
    Field {
        /// The flag / key name.
        field: &'static str,
        /// What is wrong and what to do.
        why: String,
    },
    /// The `--config` file cannot be read or parsed.
    #[error("--config {path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// Read or YAML error (unknown keys included).
        why: String,
    },
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Command-line flags; the same keys are accepted in the YAML `--config` file.
#[derive(Debug, Default, Parser, Deserialize)]
#[command(
    name = "mandate-proxy",
    version,
    about = "Mandate sidecar: mTLS with SPIFFE identities for AI agents and their tools"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Args {
    /// YAML file with any of these keys (flags and MANDATE_* variables win over it).
    #[arg(long, env = "MANDATE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// SPIFFE trust domain of this mesh [default: mandate.local].
    #[arg(long, env = "MANDATE_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Our X.509-SVID (PEM; leaf first, then any intermediates). Reloaded on change.
    #[arg(long, env = "MANDATE_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key of the SVID (PEM, PKCS#8 or SEC1). Reloaded on change.
    #[arg(long, env = "MANDATE_KEY")]
    pub key: Option<PathBuf>,
    /// Trust bundle: CA certificates (PEM) peers' SVIDs must chain to. Reloaded on change.
    #[arg(long, env = "MANDATE_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// Managed mode: the control plane (`mandate serve`), https://HOST[:PORT]. Identity, policy and
    /// registry then come from it.
    #[arg(long, env = "MANDATE_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// Managed mode: the one-time join token printed by `mandate agent register` (prefer the
    /// MANDATE_JOIN_TOKEN variable: argv is visible to `ps`).
    #[arg(long, env = "MANDATE_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Managed mode: keeps the key, SVID and trust bundle here (key 0600), so a restart reuses
    /// them instead of the already used join token.
    #[arg(long, env = "MANDATE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Managed mode: decision records wait here (on disk) for the control plane
    /// [default: STATE_DIR/spool; without either, memory only, lost on restart].
    #[arg(long, env = "MANDATE_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Managed mode: most bytes of decision records the spool holds, e.g. 256MiB [default: 256MiB].
    #[arg(long, env = "MANDATE_SPOOL_MAX_BYTES")]
    pub spool_max_bytes: Option<String>,
    /// Managed mode: what a full spool does to calls: refuse them (503 spool_full) before they are
    /// forwarded, or forward them and drop their records (counted) [default: refuse].
    #[arg(long, env = "MANDATE_SPOOL_FULL", value_enum)]
    pub spool_full: Option<SpoolFull>,
    /// Listener for the agent's outbound calls [default: 127.0.0.1:15001].
    #[arg(long, env = "MANDATE_OUTBOUND")]
    pub outbound: Option<String>,
    /// Listener for mTLS from other sidecars [default: 0.0.0.0:15006].
    #[arg(long, env = "MANDATE_INBOUND")]
    pub inbound: Option<String>,
    /// Local application that inbound calls are forwarded to, e.g. 127.0.0.1:8080.
    #[arg(long, env = "MANDATE_APP")]
    pub app: Option<String>,
    /// Admin listener: /metrics, /healthz, /readyz, /config [default: 127.0.0.1:15000].
    #[arg(long, env = "MANDATE_ADMIN")]
    pub admin: Option<String>,
    /// A meshed destination: HOST[:PORT]=ADDR,id=SPIFFE_ID[,protocol=tcp][,listen=ADDR]. Repeatable;
    /// MANDATE_ROUTE takes several separated by ';'.
    #[arg(long = "route", value_name = "ROUTE")]
    #[serde(default)]
    pub route: Vec<String>,
    /// Worker threads for the data path [default: number of CPUs].
    #[arg(long, env = "MANDATE_WORKERS")]
    pub workers: Option<usize>,
    /// How long in-flight requests may take to finish after SIGTERM, e.g. 15s [default: 15s].
    #[arg(long, env = "MANDATE_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Log format [default: text]. The level comes from MANDATE_LOG (e.g. info, mandate_proxy=debug).
    #[arg(long, env = "MANDATE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Rego policy: a .rego file or a directory of them, evaluated on every call. Reloaded on change.
    #[arg(long, env = "MANDATE_POLICY")]
    pub policy: Option<PathBuf>,
    /// JSON data document for the policy (becomes `data`; `data.registry` feeds `input.registry`).
    #[arg(long, env = "MANDATE_DATA")]
    pub data: Option<PathBuf>,
    /// Evaluate and record decisions, but forward every call.
    #[arg(long, env = "MANDATE_DRY_RUN")]
    #[serde(default)]
    pub dry_run: bool,
    /// Allow calls when the policy gives no usable decision (undefined, error, timeout). Default: deny.
    #[arg(long, env = "MANDATE_FAIL_OPEN")]
    #[serde(default)]
    pub fail_open: bool,
    /// Standalone: write one JSON line per decision to this file.
    #[arg(long, env = "MANDATE_DECISION_LOG")]
    pub decision_log: Option<PathBuf>,
    /// Largest JSON request body read for policy, e.g. 1MiB; larger JSON bodies are refused [default: 1MiB].
    #[arg(long, env = "MANDATE_BODY_LIMIT")]
    pub body_limit: Option<String>,
    /// Policy evaluation time limit, e.g. 50ms; past it the call is denied [default: 50ms].
    #[arg(long, env = "MANDATE_POLICY_TIMEOUT")]
    pub policy_timeout: Option<String>,
    /// Policy evaluator: auto (register VM when it can run the policy, with sampled interpreter
    /// cross-checks), rvm, or interpreter [default: auto].
    #[arg(long, env = "MANDATE_POLICY_ENGINE")]
    pub policy_engine: Option<String>,
    /// Clock skew tolerated on a delegation token's exp and nbf, e.g. 30s [default: 30s].
    #[arg(long, env = "MANDATE_DELEGATION_LEEWAY")]
    pub delegation_leeway: Option<String>,
}

impl Args {
    /// Fills every field not given as a flag or variable from the `--config` file, if any.
    pub fn with_config_file(mut self) -> Result<Self, ConfigError> {
        if self.route.is_empty()
            && let Ok(env_routes) = std::env::var(ROUTE_ENV)
        {
            self.route = env_routes
                .split(';')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect();
        }
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file = read_file_args(&path)?;
        Ok(Args {
            config: Some(path),
            trust_domain: self.trust_domain.or(file.trust_domain),
            cert: self.cert.or(file.cert),
            key: self.key.or(file.key),
            bundle: self.bundle.or(file.bundle),
            control_plane: self.control_plane.or(file.control_plane),
            join_token: self.join_token.or(file.join_token),
            state_dir: self.state_dir.or(file.state_dir),
            spool_dir: self.spool_dir.or(file.spool_dir),
            spool_max_bytes: self.spool_max_bytes.or(file.spool_max_bytes),
            spool_full: self.spool_full.or(file.spool_full),
            outbound: self.outbound.or(file.outbound),
            inbound: self.inbound.or(file.inbound),
            app: self.app.or(file.app),
            admin: self.admin.or(file.admin),
            route: if self.route.is_empty() {
                file.route
            } else {
                self.route
            },
            workers: self.workers.or(file.workers),
            drain_timeout: self.drain_timeout.or(file.drain_timeout),
            log_format: self.log_format.or(file.log_format),
            policy: self.policy.or(file.policy),
            data: self.data.or(file.data),
            dry_run: self.dry_run || file.dry_run,
            fail_open: self.fail_open || file.fail_open,
            decision_log: self.decision_log.or(file.decision_log),
            body_limit: self.body_limit.or(file.body_limit),
            policy_timeout: self.policy_timeout.or(file.policy_timeout),
            policy_engine: self.policy_engine.or(file.policy_engine),
            delegation_leeway: self.delegation_leeway.or(file.delegation_leeway),
        })
    }
}

fn read_file_args(path: &Path) -> Result<Args, ConfigError> {
    let file_err = |why: String| ConfigError::File {
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    serde_yaml_ng::from_str(&text).map_err(|e| file_err(e.to_string()))
}

/// Paths of the identity files.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdentityFiles {
    /// SVID certificate chain.
    pub cert: PathBuf,
    /// SVID private key.
    pub key: PathBuf,
    /// Trust bundle.
    pub bundle: PathBuf,
}

/// Where identity and policy come from.
#[derive(Debug)]
pub enum Mode {
    /// Identity from files, policy from files (or none).
    Standalone(IdentityFiles),
    /// Identity, policy and registry from the control plane.
    Managed(ManagedConfig),
}

/// Managed mode settings.
#[derive(Debug, Clone)]
pub struct ManagedConfig {
    /// The control plane.
    pub control_plane: ControlPlaneUrl,
    /// The one-time join token (`Debug` redacts its secret); absent when a state directory may
    /// hold an identity from an earlier run.
    pub join_token: Option<JoinToken>,
    /// Where key, SVID and trust bundle are kept across restarts.
    pub state_dir: Option<PathBuf>,
    /// Where decision records wait for the control plane.
    pub spool: SpoolConfig,
}

/// The decision spool of managed mode.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpoolConfig {
    /// Its directory: `--spool-dir`, else `STATE_DIR/spool`; `None`: memory only.
    pub dir: Option<PathBuf>,
    /// Most bytes it holds.
    pub max_bytes: u64,
    /// What a full spool does to calls.
    pub full: SpoolFull,
}

/// An `https://HOST[:PORT]` control plane address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ControlPlaneUrl {
    /// Host name or IP address (SNI, and the `:authority` of requests).
    pub host: String,
    /// Port (443 when not given).
    pub port: u16,
}

impl ControlPlaneUrl {
    /// Parses `https://HOST[:PORT]` (a trailing `/` is allowed; no path, query or user info).
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "{s:?} must be an https:// URL (the control plane speaks TLS only)"
            ));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(format!("{s:?} must name only the server, no path or query"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{s:?} names no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{s:?} must not carry user information"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} names no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(443),
        })
    }

    /// `host:port` as an authority (IPv6 literals bracketed).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for ControlPlaneUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "https://{}", self.authority())
    }
}

/// The validated configuration the sidecar runs with.
#[derive(Debug)]
pub struct Config {
    /// Our trust domain; peers outside it are refused.
    pub trust_domain: TrustDomain,
    /// Standalone (files) or managed (control plane).
    pub mode: Mode,
    /// Outbound listener.
    pub outbound: SocketAddr,
    /// Inbound listener.
    pub inbound: SocketAddr,
    /// Local application behind the inbound listener, if any.
    pub app: Option<SocketAddr>,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Meshed destinations.
    pub routes: RouteTable,
    /// Data-path worker threads.
    pub workers: usize,
    /// Grace period for in-flight requests after SIGTERM.
    pub drain_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Policy evaluated on every call (`None`: routes alone decide; always present when managed).
    pub policy: Option<PolicyConfig>,
    /// Clock skew tolerated on delegation tokens' `exp` and `nbf`.
    pub delegation_leeway: Duration,
}

/// Policy settings, present when `--policy` is given or in managed mode.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Files, or bundles pushed by the control plane.
    pub source: PolicySource,
    /// Time limit and engine.
    pub settings: CompileSettings,
    /// Dry-run, fail-open and the body limit.
    pub enforcement: Enforcement,
    /// Standalone decision log.
    pub decision_log: Option<PathBuf>,
}

impl Config {
    /// Validates merged arguments; every error names the field to fix.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let managed = managed_config(&args)?;
        let policy = policy_config(&args, managed.is_some())?;
        let field = |field: &'static str, why: String| ConfigError::Field { field, why };
        let token_td = managed
            .as_ref()
            .and_then(|m| m.join_token.as_ref())
            .map(|t| t.spiffe_id().parse::<mandate_identity::SpiffeId>())
            .transpose()
            .map_err(|e| field("--join-token", format!("its identity is unusable: {e}")))?
            .map(|id| id.trust_domain_str().to_owned());
        let trust_domain: TrustDomain = args
            .trust_domain
            .as_deref()
            .or(token_td.as_deref())
            .unwrap_or("mandate.local")
            .parse()
            .map_err(|e: mandate_identity::SpiffeIdError| field("--trust-domain", e.to_string()))?;
        if let Some(td) = token_td
            && td != trust_domain.as_str()
        {
            return Err(field(
                "--trust-domain",
                format!("{trust_domain} differs from the join token's trust domain {td}"),
            ));
        }
        let mode = match managed {
            Some(managed) => Mode::Managed(managed),
            None => {
                let required = |name: &'static str, v: Option<PathBuf>| {
                    v.ok_or_else(|| {
                        field(
                            name,
                            "required in standalone mode (PEM file; `mandate ca issue` makes one), \
                             or use --control-plane and --join-token for managed mode"
                                .into(),
                        )
                    })
                };
                Mode::Standalone(IdentityFiles {
                    cert: required("--cert", args.cert)?,
                    key: required("--key", args.key)?,
                    bundle: required("--bundle", args.bundle)?,
                })
            }
        };
        let addr = |name: &'static str, v: Option<String>, default: &str| {
            let v = v.unwrap_or_else(|| default.to_owned());
            v.parse::<SocketAddr>()
                .map_err(|_| field(name, format!("{v:?} is not an IP:PORT address")))
        };
        let outbound = addr("--outbound", args.outbound, "127.0.0.1:15001")?;
        let inbound = addr("--inbound", args.inbound, "0.0.0.0:15006")?;
        let admin = addr("--admin", args.admin, "127.0.0.1:15000")?;
        let app = match args.app {
            Some(a) => Some(addr("--app", Some(a), "")?),
            None => None,
        };
        let routes = args
            .route
            .iter()
            .map(|r| r.parse::<Route>())
            .collect::<Result<Vec<_>, _>>()
            .and_then(RouteTable::new)
            .map_err(|e| field("--route", e.to_string()))?;
        let workers = match args.workers {
            Some(0) => return Err(field("--workers", "must be at least 1".into())),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let drain_timeout =
            humantime::parse_duration(args.drain_timeout.as_deref().unwrap_or("15s"))
                .map_err(|e| field("--drain-timeout", format!("{e} (use e.g. 15s or 500ms)")))?;
        let delegation_leeway =
            humantime::parse_duration(args.delegation_leeway.as_deref().unwrap_or("30s"))
                .map_err(|e| field("--delegation-leeway", format!("{e} (use e.g. 30s or 0s)")))?;
        let mut seen = vec![
            (outbound, "--outbound"),
            (inbound, "--inbound"),
            (admin, "--admin"),
        ];
        seen.extend(
            routes
                .iter()
                .filter_map(|r| r.listen.map(|l| (l, "--route listen="))),
        );
        for (i, (a, name)) in seen.iter().enumerate() {
            if let Some((_, other)) = seen[..i].iter().find(|(b, _)| b == a && a.port() != 0) {
                return Err(field(name, format!("{a} is also used by {other}")));
            }
        }
        Ok(Config {
            policy,
            trust_domain,
            mode,
            outbound,
            inbound,
            app,
            admin,
            routes,
            workers,
            drain_timeout,
            log_format: args.log_format.unwrap_or(LogFormat::Text),
            delegation_leeway,
        })
    }
}

/// Managed mode settings when `--control-plane` is given; the identity and policy flags of
/// standalone mode are refused next to it.
fn managed_config(args: &Args) -> Result<Option<ManagedConfig>, ConfigError> {
    let field = |field: &'static str, why: String| ConfigError::Field { field, why };
    let Some(url) = &args.control_plane else {
        for (given, name) in [
            (args.join_token.is_some(), "--join-token"),
            (args.state_dir.is_some(), "--state-dir"),
            (args.spool_dir.is_some(), "--spool-dir"),
            (args.spool_max_bytes.is_some(), "--spool-max-bytes"),
            (args.spool_full.is_some(), "--spool-full"),
        ] {
            if given {
                return Err(field(
                    name,
                    "only means something with --control-plane".into(),
                ));
            }
        }
        return Ok(None);
    };
    for (given, name) in [
        (args.cert.is_some(), "--cert"),
        (args.key.is_some(), "--key"),
        (args.bundle.is_some(), "--bundle"),
        (args.policy.is_some(), "--policy"),
        (args.data.is_some(), "--data"),
    ] {
        if given {
            return Err(field(
                name,
                "cannot be used with --control-plane: in managed mode identity and policy come \
                 from the control plane (give either --control-plane and --join-token, or \
                 --cert/--key/--bundle and --policy/--data)"
                    .into(),
            ));
        }
    }
    let control_plane = ControlPlaneUrl::parse(url).map_err(|why| field("--control-plane", why))?;
    // Never echo the token: it is a secret.
    let join_token = args
        .join_token
        .as_deref()
        .map(JoinToken::parse)
        .transpose()
        .map_err(|e| field("--join-token", e.to_string()))?;
    if join_token.is_none() && args.state_dir.is_none() {
        return Err(field(
            "--join-token",
            "required with --control-plane (or MANDATE_JOIN_TOKEN; `mandate agent register` or \
             `mandate agent token NAME` prints one), unless --state-dir holds an identity from \
             an earlier run"
                .into(),
        ));
    }
    if let Some(dir) = &args.state_dir
        && dir.exists()
        && !dir.is_dir()
    {
        return Err(field(
            "--state-dir",
            format!("{} exists and is not a directory", dir.display()),
        ));
    }
    let max_bytes = parse_size(args.spool_max_bytes.as_deref().unwrap_or("256MiB"))
        .map_err(|why| field("--spool-max-bytes", why))? as u64;
    let spool = SpoolConfig {
        dir: args
            .spool_dir
            .clone()
            .or_else(|| args.state_dir.as_ref().map(|d| d.join("spool"))),
        max_bytes,
        full: args.spool_full.unwrap_or(SpoolFull::Refuse),
    };
    Ok(Some(ManagedConfig {
        control_plane,
        join_token,
        state_dir: args.state_dir.clone(),
        spool,
    }))
}

fn policy_config(args: &Args, managed: bool) -> Result<Option<PolicyConfig>, ConfigError> {
    let field = |field: &'static str, why: String| ConfigError::Field { field, why };
    let source = match &args.policy {
        Some(path) => PolicySource::Files {
            path: path.clone(),
            data: args.data.clone(),
        },
        None if managed => PolicySource::ControlPlane,
        None => {
            for (given, name) in [
                (args.data.is_some(), "--data"),
                (args.dry_run, "--dry-run"),
                (args.fail_open, "--fail-open"),
                (args.decision_log.is_some(), "--decision-log"),
                (args.body_limit.is_some(), "--body-limit"),
                (args.policy_timeout.is_some(), "--policy-timeout"),
                (args.policy_engine.is_some(), "--policy-engine"),
            ] {
                if given {
                    return Err(field(
                        name,
                        "only means something with --policy (or in managed mode)".into(),
                    ));
                }
            }
            return Ok(None);
        }
    };
    let time_limit = humantime::parse_duration(args.policy_timeout.as_deref().unwrap_or("50ms"))
        .map_err(|e| field("--policy-timeout", format!("{e} (use e.g. 50ms)")))?;
    if time_limit.is_zero() {
        return Err(field("--policy-timeout", "must be more than zero".into()));
    }
    let body_limit = parse_size(args.body_limit.as_deref().unwrap_or("1MiB"))
        .map_err(|why| field("--body-limit", why))?;
    let engine: EngineChoice = args
        .policy_engine
        .as_deref()
        .unwrap_or("auto")
        .parse()
        .map_err(|why| field("--policy-engine", why))?;
    Ok(Some(PolicyConfig {
        source,
        settings: CompileSettings { time_limit, engine },
        enforcement: Enforcement {
            dry_run: args.dry_run,
            fail_open: args.fail_open,
            body_limit,
        },
        decision_log: args.decision_log.clone(),
    }))
}

/// Parses `1048576`, `512KiB`, `1MiB`, `1MB`, `64kb` into bytes.
fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (use e.g. 1MiB or 65536)"))?;
    let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, KB or MB)"
            ));
        }
    };
    n.checked_mul(multiplier)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} must be between 1 byte and the address space"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<&'static str> {
        vec![
            "mandate-proxy",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--bundle",
            "b.pem",
        ]
    }

    fn config(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = base();
        argv.extend_from_slice(extra);
        Config::from_args(Args::parse_from(argv).with_config_file()?)
    }

    #[test]
    fn defaults_follow_service_mesh_habit() {
        let c = config(&[]).unwrap();
        assert_eq!(c.trust_domain.as_str(), "mandate.local");
        assert_eq!(c.outbound.to_string(), "127.0.0.1:15001");
        assert_eq!(c.inbound.to_string(), "0.0.0.0:15006");
        assert_eq!(c.admin.to_string(), "127.0.0.1:15000");
        assert_eq!(c.drain_timeout, Duration::from_secs(15));
        assert_eq!(c.delegation_leeway, Duration::from_secs(30));
        assert!(c.app.is_none());
    }

    #[test]
    fn errors_name_the_field() {
        for (extra, want) in [
            (vec!["--outbound", "localhost"], "--outbound"),
            (vec!["--trust-domain", "Bad"], "--trust-domain"),
            (vec!["--route", "nope"], "--route"),
            (vec!["--workers", "0"], "--workers"),
            (vec!["--drain-timeout", "soon"], "--drain-timeout"),
            (
                vec!["--admin", "127.0.0.1:15001"],
                "--admin: 127.0.0.1:15001 is also used by --outbound",
            ),
            (
                vec!["--dry-run"],
                "--dry-run: only means something with --policy (or in managed mode)",
            ),
            (
                vec!["--policy", "p.rego", "--policy-engine", "vm"],
                "--policy-engine: unknown policy engine",
            ),
            (
                vec!["--policy", "p.rego", "--body-limit", "lots"],
                "--body-limit",
            ),
            (
                vec!["--policy", "p.rego", "--policy-timeout", "0s"],
                "--policy-timeout",
            ),
        ] {
            let err = config(&extra).unwrap_err().to_string();
            assert!(err.starts_with(want), "{extra:?}: {err}");
        }
        let err = Config::from_args(Args::parse_from(["mandate-proxy"])).unwrap_err();
        assert!(err.to_string().starts_with("--cert: required"));
    }

    #[test]
    fn file_fills_gaps_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        std::fs::write(
            &path,
            "trust-domain: example.org\napp: 127.0.0.1:8080\noutbound: 127.0.0.1:1\nroute:\n  - tool=127.0.0.1:2,id=spiffe://example.org/service/tool\n",
        )
        .unwrap();
        let c = config(&[
            "--config",
            path.to_str().unwrap(),
            "--outbound",
            "127.0.0.1:3",
        ])
        .unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.app, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.outbound.to_string(), "127.0.0.1:3");
        assert_eq!(c.routes.iter().count(), 1);
    }

    #[test]
    fn policy_settings_have_safe_defaults() {
        let c = config(&["--policy", "p.rego"]).unwrap();
        let p = c.policy.unwrap();
        assert_eq!(p.settings.time_limit, Duration::from_millis(50));
        assert_eq!(p.enforcement.body_limit, 1 << 20);
        assert!(!p.enforcement.dry_run && !p.enforcement.fail_open);
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert!(parse_size("0").is_err());
    }

    fn managed(extra: &[&str]) -> Result<Config, ConfigError> {
        let token = JoinToken::generate("spiffe://example.org/agent/a", b"ca").expose();
        let mut argv = vec![
            "mandate-proxy",
            "--control-plane",
            "https://cp.example.org:15012",
            "--join-token",
            &token,
        ];
        argv.extend_from_slice(extra);
        Config::from_args(Args::parse_from(argv))
    }

    #[test]
    fn managed_mode_takes_its_trust_domain_from_the_token_and_policy_from_the_control_plane() {
        let c = managed(&["--dry-run", "--decision-log", "d.jsonl"]).unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        let Mode::Managed(m) = &c.mode else {
            panic!("managed")
        };
        assert_eq!(m.control_plane.host, "cp.example.org");
        assert_eq!(m.control_plane.port, 15012);
        assert_eq!(
            m.join_token.as_ref().unwrap().spiffe_id(),
            "spiffe://example.org/agent/a"
        );
        let p = c.policy.unwrap();
        assert!(matches!(p.source, PolicySource::ControlPlane));
        assert!(p.enforcement.dry_run);
        assert_eq!(
            ControlPlaneUrl::parse("https://[::1]/")
                .unwrap()
                .authority(),
            "[::1]:443"
        );
    }

    #[test]
    fn managed_mode_errors_name_the_field_and_never_echo_the_token() {
        for (extra, want) in [
            (
                vec!["--cert", "c.pem"],
                "--cert: cannot be used with --control-plane",
            ),
            (
                vec!["--policy", "p.rego"],
                "--policy: cannot be used with --control-plane",
            ),
            (
                vec!["--data", "d.json"],
                "--data: cannot be used with --control-plane",
            ),
            (
                vec!["--trust-domain", "other.org"],
                "--trust-domain: other.org differs",
            ),
        ] {
            let err = managed(&extra).unwrap_err().to_string();
            assert!(err.starts_with(want), "{extra:?}: {err}");
        }
        let parse = |argv: &[&str]| {
            let mut full = vec!["mandate-proxy"];
            full.extend_from_slice(argv);
            Config::from_args(Args::parse_from(full))
                .unwrap_err()
                .to_string()
        };
        let err = parse(&["--control-plane", "http://cp:15012", "--join-token", "x"]);
        assert!(
            err.starts_with("--control-plane: ") && err.contains("https"),
            "{err}"
        );
        let err = parse(&[
            "--control-plane",
            "https://cp",
            "--join-token",
            "mjt1.secret-ish",
        ]);
        assert!(
            err.starts_with("--join-token: not a Mandate join token"),
            "{err}"
        );
        assert!(!err.contains("secret-ish"), "{err}");
        let err = parse(&["--control-plane", "https://cp"]);
        assert!(err.starts_with("--join-token: required"), "{err}");
        let err = parse(&["--join-token", "x"]);
        assert!(err.starts_with("--join-token: only means something with --control-plane"));
        // A state directory may stand in for a used token.
        assert!(
            Config::from_args(Args::parse_from([
                "mandate-proxy",
                "--control-plane",
                "https://cp",
                "--state-dir",
                "/nonexistent/state"
            ]))
            .is_ok()
        );
    }

    #[test]
    fn the_spool_lives_in_the_state_dir_unless_given_and_refuses_when_full_by_default() {
        let spool = |extra: &[&str]| {
            let Mode::Managed(m) = managed(extra).unwrap().mode else {
                panic!("managed")
            };
            m.spool
        };
        let s = spool(&[]);
        assert_eq!(s.dir, None, "memory only without a directory");
        assert_eq!(s.max_bytes, 256 << 20);
        assert_eq!(s.full, SpoolFull::Refuse);
        let s = spool(&["--state-dir", "/var/lib/mandate"]);
        assert_eq!(s.dir, Some(PathBuf::from("/var/lib/mandate/spool")));
        let s = spool(&[
            "--state-dir",
            "/var/lib/mandate",
            "--spool-dir",
            "/spool",
            "--spool-max-bytes",
            "4KiB",
            "--spool-full",
            "drop",
        ]);
        assert_eq!(s.dir, Some(PathBuf::from("/spool")));
        assert_eq!(s.max_bytes, 4096);
        assert_eq!(s.full, SpoolFull::Drop);
        let err = managed(&["--spool-max-bytes", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--spool-max-bytes: "), "{err}");
        let err = config(&["--spool-dir", "/spool"]).unwrap_err().to_string();
        assert!(
            err.starts_with("--spool-dir: only means something with --control-plane"),
            "{err}"
        );
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        std::fs::write(&path, "trust_domian: x\n").unwrap();
        let err = config(&["--config", path.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
