//! The `mandate-proxy` binary: without a subcommand, parse and validate the sidecar's
//! configuration, set up logging and run; `init-iptables` / `clean-iptables` set up or remove a
//! pod's traffic redirection (init container) and exit.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mandate_proxy::config::{Args, Config, LogFormat};
use mandate_proxy::iptables::{self, CleanArgs, InitArgs, IptablesError};
use tracing_subscriber::EnvFilter;

/// The command line: the sidecar's flags, or one subcommand (never both).
#[derive(Debug, Parser)]
#[command(
    name = "mandate-proxy",
    version,
    about = "Mandate sidecar: mTLS with SPIFFE identities for AI agents and their tools",
    propagate_version = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    sidecar: Args,
}

/// Pod set-up verbs; without one, `mandate-proxy` runs the sidecar.
#[derive(Debug, Subcommand)]
enum Command {
    /// Install the nat rules that redirect the pod's TCP through the sidecar (init container;
    /// needs root or NET_ADMIN in the pod's network namespace). Safe to run again.
    InitIptables(InitArgs),
    /// Remove exactly what init-iptables installed (nothing installed is fine).
    CleanIptables(CleanArgs),
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let done = match cli.command {
        None => return run_sidecar(cli.sidecar).map(|()| ExitCode::SUCCESS),
        Some(Command::InitIptables(args)) => iptables::init(&args),
        Some(Command::CleanIptables(args)) => iptables::clean(&args),
    };
    Ok(report(done))
}

/// Prints a subcommand's output on stdout, or its error on stderr; the exit code follows.
fn report(done: Result<String, IptablesError>) -> ExitCode {
    match done {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mandate-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_sidecar(args: Args) -> anyhow::Result<()> {
    let config = args
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_subcommand_the_flags_are_the_sidecars() {
        let cli = Cli::try_parse_from([
            "mandate-proxy",
            "--trust-domain",
            "example.org",
            "--dry-run",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.sidecar.trust_domain.as_deref(), Some("example.org"));
        assert!(cli.sidecar.dry_run);
    }

    #[test]
    fn init_iptables_takes_its_own_flags() {
        let cli = Cli::try_parse_from([
            "mandate-proxy",
            "init-iptables",
            "--proxy-uid",
            "2000",
            "--exclude-inbound-ports",
            "15000,15020",
            "--dry-run",
        ])
        .unwrap();
        let Some(Command::InitIptables(args)) = cli.command else {
            panic!("init-iptables parsed as {:?}", cli.command);
        };
        assert_eq!(args.proxy_uid, 2000);
        assert_eq!(args.exclude_inbound_ports, [15000, 15020]);
        assert!(args.dry_run);
        assert!(
            !cli.sidecar.dry_run,
            "--dry-run after the verb is the verb's"
        );
    }

    #[test]
    fn clean_iptables_parses() {
        let cli = Cli::try_parse_from(["mandate-proxy", "clean-iptables", "--ipv6"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::CleanIptables(CleanArgs {
                ipv6: true,
                dry_run: false
            }))
        ));
    }

    #[test]
    fn sidecar_flags_and_a_subcommand_do_not_mix() {
        let err = Cli::try_parse_from([
            "mandate-proxy",
            "--trust-domain",
            "example.org",
            "init-iptables",
        ])
        .unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{err}"
        );
    }
}
