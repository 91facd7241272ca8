//! `mandate-bench`: measures what the mandate-proxy sidecar pair adds to a call, next to a direct call
//! and an nginx mTLS pair doing the same job, and writes the comparison to `docs/benchmarks.md`.

mod app;
mod certs;
mod cli;
mod jitter;
mod loadgen;
mod mandate;
mod nginx;
mod policy;
mod procs;
mod report;
mod rss;
mod topology;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    match cli.command {
        Some(cli::Command::App(args)) => app::run(&args),
        None => topology::run_bench(&cli.bench),
    }
}
