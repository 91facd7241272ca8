//! `mandate`: the Mandate control plane and the operator's command line.

mod ca_cli;
mod cli;
mod demo;
mod policy_cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mandate_identity::TrustDomain;

/// Gives every AI agent its own identity and checks each call it makes.
#[derive(Debug, Parser)]
#[command(name = "mandate", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Top-level verbs; each owns its own argument struct so new verbs do not disturb old ones.
#[derive(Debug, Subcommand)]
enum Command {
    /// Register and manage agents in the control plane's registry.
    Agent(cli::workload::WorkloadArgs),
    /// Approve or reject a call a policy held for a person's approval; --pending lists them.
    Approve(cli::approve::ApproveArgs),
    /// The audit log: search, verify (hash chain and signed checkpoints), export and follow the decisions sidecars reported.
    Audit(cli::audit::AuditArgs),
    /// Certificate authorities: a file-based one for standalone sidecars, or import one into the control plane.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Grants: a person's consent for an agent to act on their behalf (create, list, show,
    /// revoke, close-task), and `grant token` for an agent holding its own SVID files.
    Grant(cli::grant::GrantArgs),
    /// Run a self-contained demo: a tool and an agent, each behind a sidecar, talking over mTLS.
    Demo(demo::DemoArgs),
    /// Work with Rego policies: push bundles to the control plane, list, roll back, test locally.
    Policy(cli::policy::PolicyArgs),
    /// Run the control plane: registry, CA, policy bundles, push to sidecars, decision ingest, API.
    Serve(mandate_control_plane::config::ServeArgs),
    /// Register and manage services (tools, APIs) in the control plane's registry.
    Service(cli::workload::WorkloadArgs),
}

/// `mandate ca …`
#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a root CA: DIR/ca.pem (the trust bundle) and DIR/ca-key.pem (mode 0600).
    Init(CaInitArgs),
    /// Issue an X.509-SVID: OUTDIR/NAME.pem and OUTDIR/NAME-key.pem (mode 0600).
    Issue(CaIssueArgs),
    /// Import an existing CA into the control plane's store (key sealed with the store key); no server needed.
    Import(cli::ca_import::ImportArgs),
}

/// Arguments of `mandate ca init`.
#[derive(Debug, Args)]
struct CaInitArgs {
    /// Directory for the CA files (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Trust domain the CA issues identities for.
    #[arg(long, value_name = "TD", default_value = "mandate.local")]
    trust_domain: TrustDomain,
    /// How long the CA certificate is valid (e.g. 8760h, 90d).
    #[arg(long, value_name = "DURATION", default_value = "8760h", value_parser = parse_duration)]
    ttl: Duration,
    /// Replace an existing CA in DIR (certificates it issued stop being trusted).
    #[arg(long)]
    force: bool,
}

/// Arguments of `mandate ca issue`.
#[derive(Debug, Args)]
struct CaIssueArgs {
    /// Identity to issue: agent/NAME, service/NAME or spiffe://TRUST_DOMAIN/PATH.
    #[arg(value_name = "ID")]
    id: String,
    /// Directory holding the CA (from `mandate ca init`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Directory to write the certificate and key into [default: DIR].
    #[arg(long, value_name = "OUTDIR")]
    out: Option<PathBuf>,
    /// How long the certificate is valid (e.g. 90s, 15m, 24h).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    ttl: Duration,
}

/// Parses `90s`, `15m`, `24h`, `8760h`, … refusing zero, which would make an already-expired certificate.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (use a duration such as 90s, 15m, 24h or 8760h)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(d)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ca(CaCommand::Init(args)) => {
            let files = ca_cli::init(&args.dir, args.trust_domain, args.ttl, args.force)?;
            println!("created CA for trust domain {}", files.trust_domain);
            println!("  certificate (trust bundle): {}", files.cert.display());
            println!("  private key (mode 0600):    {}", files.key.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Import(args)) => cli::ca_import::main(args),
        Command::Ca(CaCommand::Issue(args)) => {
            let files = ca_cli::issue(&args.dir, &args.id, args.out.as_deref(), args.ttl)?;
            let not_after = SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(files.svid.not_after).unwrap_or_default());
            println!(
                "issued {} (valid until {})",
                files.svid.id,
                humantime::format_rfc3339_seconds(not_after)
            );
            println!("  certificate:             {}", files.cert.display());
            println!("  private key (mode 0600): {}", files.key.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(args).context("demo failed"),
        Command::Serve(args) => {
            mandate_control_plane::serve::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(args) => cli::policy::main(args),
        Command::Agent(args) => cli::workload::main(cli::workload::Kind::Agent, args),
        Command::Service(args) => cli::workload::main(cli::workload::Kind::Service, args),
        Command::Audit(args) => cli::audit::main(args),
        Command::Approve(args) => cli::approve::main(args),
        Command::Grant(args) => cli::grant::main(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ca_commands_parse_with_their_defaults() {
        let cli = Cli::try_parse_from(["mandate", "ca", "init", "--dir", "d"]).unwrap();
        let Command::Ca(CaCommand::Init(init)) = cli.command else {
            panic!("not ca init");
        };
        assert_eq!(init.trust_domain.as_str(), "mandate.local");
        assert_eq!(init.ttl, Duration::from_secs(8760 * 3600));
        assert!(!init.force);

        let cli = Cli::try_parse_from(["mandate", "ca", "issue", "agent/a", "--dir", "d"]).unwrap();
        let Command::Ca(CaCommand::Issue(issue)) = cli.command else {
            panic!("not ca issue");
        };
        assert_eq!(issue.ttl, Duration::from_secs(24 * 3600));
        assert_eq!(issue.out, None);
    }

    #[test]
    fn durations_accept_the_usual_forms_and_refuse_nonsense() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(
            parse_duration("8760h"),
            Ok(Duration::from_secs(8760 * 3600))
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").unwrap_err().contains("24h"));
        assert!(
            Cli::try_parse_from([
                "mandate",
                "ca",
                "init",
                "--dir",
                "d",
                "--trust-domain",
                "Bad TD"
            ])
            .is_err()
        );
    }
}
