//! `mandate-bench`: measures what the mandate-proxy sidecar pair adds to a call, next to a direct call
//! and an nginx mTLS pair doing the same job, measures the control plane (`mandate serve`: push
//! latency to 500 sidecars, memory, decision ingest), measures delegation tokens (their check in
//! process, and a managed pair with and without delegation), and writes it all to
//! `docs/benchmarks.md`.

mod app;
mod certs;
mod cli;
mod control_plane;
mod delegation;
mod ingest;
mod jitter;
mod loadgen;
mod mandate;
mod nginx;
mod policy;
mod postgres;
mod procs;
mod report;
mod rss;
mod sidecar_sim;
mod topology;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    match cli.command {
        Some(cli::Command::App(args)) => app::run(&args),
        None => topology::run_bench(&cli.bench),
    }
}
