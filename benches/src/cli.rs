//! Command line of `mandate-bench`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::topology::Kind;

/// Measures the mandate-proxy sidecar pair against a direct call and an nginx mTLS pair.
#[derive(Debug, Parser)]
#[command(
    name = "mandate-bench",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Helper processes the harness starts; without one, run the benchmark.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Benchmark options.
    #[command(flatten)]
    pub bench: BenchArgs,
}

/// Subcommands (used by the harness itself to start its helper processes).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the upstream app: HTTP/1.1, answers every request with a fixed body.
    App(AppArgs),
}

/// Options of the upstream app.
#[derive(Debug, Args)]
pub struct AppArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Size of the response body in bytes.
    #[arg(long, default_value_t = 1024)]
    pub body_bytes: usize,
}

/// Options of a benchmark run.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Directory holding the release binaries (mandate-proxy).
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    /// Markdown report to write (e.g. docs/benchmarks.md); the table is always printed.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Open-loop request rate, requests per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Length of the measured open-loop phase (e.g. 20s, 500ms, 1m).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Open-loop warm-up at the same rate before measuring, discarded.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Keep-alive connections the open-loop phase spreads its requests over.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Concurrent connections of the closed-loop saturation phase.
    #[arg(long, default_value_t = 64)]
    pub sat_connections: usize,
    /// Length of the saturation phase.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub sat_duration: Duration,
    /// Rounds each phase is cut into; the rounds rotate through the topologies so that load
    /// elsewhere on the machine hits them alike.
    #[arg(long, default_value_t = 4)]
    pub rounds: u32,
    /// Worker threads of each mandate-proxy and worker processes of each nginx (the same for fairness).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Do not measure the nginx pair.
    #[arg(long)]
    pub skip_nginx: bool,
    /// Do not try `apt-get install nginx` when nginx is missing.
    #[arg(long)]
    pub no_install: bool,
    /// nginx binary to use instead of looking in PATH and /usr/sbin.
    #[arg(long)]
    pub nginx: Option<PathBuf>,
    /// CPUs (taskset list) for both proxies of a pair.
    #[arg(long, default_value = "1")]
    pub cpus_proxy: String,
    /// CPUs (taskset list) for the load generator and the upstream app.
    #[arg(long, default_value = "0")]
    pub cpus_load: String,
    /// Measure only these (comma-separated); direct is always measured as the baseline of the
    /// data-path topologies. `control-plane` and `delegation` alone run only those benchmarks.
    /// With `--report`, the sections of the benchmarks left out keep their figures from the file.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<Kind>,
    /// Control-plane benchmark: simulated sidecars holding a push stream open.
    #[arg(long, default_value_t = 500)]
    pub cp_streams: usize,
    /// Control-plane benchmark: agents revoked one at a time while the streams are open.
    #[arg(long, default_value_t = 20)]
    pub cp_revocations: usize,
    /// Control-plane benchmark: simulated sidecars posting decision batches concurrently.
    #[arg(long, default_value_t = 8)]
    pub cp_ingest_sidecars: usize,
    /// Control-plane benchmark: measured ingest time per backend.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub cp_ingest_time: Duration,
    /// CPUs (taskset list) for `mandate serve` and PostgreSQL [default: --cpus-proxy].
    #[arg(long)]
    pub cpus_control_plane: Option<String>,
    /// Before each measured phase, wait up to this long for other programs to leave the benchmark's
    /// CPUs (under 5% of a core busy) so a passing build job does not land in the figures; 0s
    /// measures at once.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub quiet_wait: Duration,
    /// Policy directory for the in-process evaluation benchmark and the "pair + policy" topology
    /// (its `*_test.rego` files are left out).
    #[arg(long, default_value = "policies/reference")]
    pub policy_dir: PathBuf,
    /// Measured time of each in-process policy evaluation run (per engine and thread count).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub policy_eval_time: Duration,
    /// Do not run the in-process policy evaluation benchmark.
    #[arg(long)]
    pub skip_policy_eval: bool,
    /// Delegation benchmark: measured time of each in-process token-verification row.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub delegation_verify_time: Duration,
    /// Delegation benchmark: measured fixed-rate load per variant of the pair (with delegation,
    /// without), cut into `--rounds` rounds.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub delegation_duration: Duration,
    /// Ingest benchmark: measured closed-loop window of the end-to-end run per store.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ingest_time: Duration,
    /// Ingest benchmark: measured fixed-rate load per variant (direct, spool, memory queue), cut
    /// into `--rounds` rounds.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub ingest_pair_duration: Duration,
    /// Keep the temporary directory (certificates, configs, logs) for inspection.
    #[arg(long)]
    pub keep_tmp: bool,
}

impl BenchArgs {
    /// Whether topology `t` is part of this run.
    pub fn wants(&self, t: Kind) -> bool {
        if t == Kind::Nginx && self.skip_nginx {
            return false;
        }
        if !self.data_path_wanted() {
            return false;
        }
        t == Kind::Direct || self.only.is_empty() || self.only.contains(&t)
    }

    /// Whether any data-path topology (and the in-process policy evaluation) runs: not when
    /// `--only` names only the control plane and delegation benchmarks.
    pub fn data_path_wanted(&self) -> bool {
        self.only.is_empty()
            || self
                .only
                .iter()
                .any(|k| !matches!(k, Kind::ControlPlane | Kind::Delegation | Kind::Ingest))
    }
}

/// Parses `20s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use e.g. 20s, 500ms or 2m"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!(
            "{s:?} is not a duration: it must be a positive number"
        ));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("20s").unwrap(), Duration::from_secs(20));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
