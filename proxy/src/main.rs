//! The `mandate-proxy` binary: parse and validate configuration, set up logging, run.

use std::io::IsTerminal;

use clap::Parser;
use mandate_proxy::config::{Args, Config, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = Args::parse()
        .with_config_file()
        .and_then(Config::from_args)
        .unwrap_or_else(|e| {
            eprintln!("mandate-proxy: {e}");
            std::process::exit(2);
        });
    let filter = EnvFilter::try_from_env("MANDATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .enable_all()
        .build()?
        .block_on(mandate_proxy::run(config))
}
