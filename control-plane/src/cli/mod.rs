//! The operator's CLI against the control plane API: `mandate agent|service|policy|audit|approve|grant …`.
//!
//! Each command group flattens [`client::ServerArgs`] (`--server`, `--ca-cert`,
//! `--admin-token-file`), builds one [`client::Client`] and runs its verb on a single-threaded
//! runtime: a CLI call is a handful of sequential requests.

pub mod approve;
pub mod audit;
pub mod ca_import;
pub mod client;
pub mod grant;
pub mod policy;
pub mod table;
pub mod tls;
pub mod workload;

use std::future::Future;

/// Runs one CLI command's future to completion on a current-thread runtime.
pub fn block_on<T>(fut: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?
        .block_on(fut)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::audit::{AuditCommand, Verdict};
    use super::policy::PolicyCommand;
    use super::workload::{Label, WorkloadCommand};
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let mut argv = vec!["mandate"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| cli.command)
    }

    #[test]
    fn agent_register_parses_with_the_server_defaults() {
        let Command::Agent(args) = parse(&[
            "agent",
            "register",
            "research",
            "--owner",
            "alice@example.com",
            "--ceiling",
            r#"[{"host":"tool"}]"#,
            "--label",
            "team=r",
            "--label",
            "env=prod",
        ])
        .unwrap() else {
            panic!("not agent");
        };
        if std::env::var_os("MANDATE_SERVER").is_none() {
            assert_eq!(args.server.server, "https://127.0.0.1:15012");
        }
        let WorkloadCommand::Register(reg) = args.command else {
            panic!("not register");
        };
        assert_eq!(reg.name, "research");
        assert_eq!(reg.owner, "alice@example.com");
        assert_eq!(reg.ceiling.len(), 1);
        assert_eq!(reg.ceiling[0].0.len(), 1);
        assert_eq!(
            reg.labels[1],
            Label {
                key: "env".into(),
                value: "prod".into()
            }
        );
    }

    #[test]
    fn server_options_go_before_or_after_the_verb() {
        for argv in [
            &[
                "agent",
                "--server",
                "http://cp:1",
                "--ca-cert",
                "c.pem",
                "list",
            ][..],
            &[
                "agent",
                "list",
                "--server",
                "http://cp:1",
                "--ca-cert",
                "c.pem",
            ],
        ] {
            let Command::Agent(args) = parse(argv).unwrap() else {
                panic!("not agent");
            };
            assert_eq!(args.server.server, "http://cp:1");
            assert_eq!(args.server.ca_cert.unwrap().to_str(), Some("c.pem"));
            assert!(matches!(args.command, WorkloadCommand::List));
        }
        let Command::Service(args) = parse(&[
            "service",
            "show",
            "tool",
            "--json",
            "--admin-token-file",
            "t",
        ])
        .unwrap() else {
            panic!("not service");
        };
        assert!(matches!(
            args.command,
            WorkloadCommand::Show { json: true, .. }
        ));
        assert_eq!(args.server.admin_token_file.unwrap().to_str(), Some("t"));
    }

    #[test]
    fn register_refuses_bad_labels_two_ceilings_and_a_missing_owner() {
        let err = parse(&["agent", "register", "a", "--owner", "o", "--label", "team"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("KEY=VALUE"), "{err}");
        let err = parse(&[
            "agent",
            "register",
            "a",
            "--owner",
            "o",
            "--ceiling",
            "[]",
            "--ceiling-file",
            "f",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let err = parse(&["agent", "register", "a"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let err = parse(&[
            "agent",
            "register",
            "a",
            "--owner",
            "o",
            "--ceiling",
            "\"tool\"",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("JSON scope object"), "{err}");
    }

    #[test]
    fn every_registry_verb_exists_for_agents_and_services() {
        for kind in ["agent", "service"] {
            for verb in ["show", "suspend", "revoke", "activate", "token"] {
                parse(&[kind, verb, "x"]).unwrap_or_else(|e| panic!("{kind} {verb}: {e}"));
            }
            parse(&[kind, "list"]).unwrap();
            assert!(parse(&[kind, "delete", "x"]).is_err());
        }
    }

    #[test]
    fn policy_verbs_parse() {
        let Command::Policy(p) =
            parse(&["policy", "push", "policies/reference", "-m", "v2"]).unwrap()
        else {
            panic!("not policy");
        };
        let PolicyCommand::Push(push) = p.command else {
            panic!("not push");
        };
        assert_eq!(push.dir.to_str(), Some("policies/reference"));
        assert_eq!(push.message.as_deref(), Some("v2"));

        let Command::Policy(p) = parse(&["policy", "rollback", "3"]).unwrap() else {
            panic!("not policy");
        };
        assert!(matches!(p.command, PolicyCommand::Rollback { bundle: 3 }));
        assert!(parse(&["policy", "rollback", "latest"]).is_err());
        assert!(matches!(
            parse(&["policy", "list"]).unwrap(),
            Command::Policy(p) if matches!(p.command, PolicyCommand::List)
        ));
        let Command::Policy(p) = parse(&["policy", "test"]).unwrap() else {
            panic!("not policy");
        };
        assert!(matches!(p.command, PolicyCommand::Test(t) if t.dirs.is_empty()));
    }

    #[test]
    fn audit_query_parses_its_filters() {
        let Command::Audit(a) = parse(&[
            "audit", "query", "--agent", "research", "--result", "allow", "--since", "15m",
            "--limit", "5", "--json",
        ])
        .unwrap() else {
            panic!("not audit");
        };
        let AuditCommand::Query(q) = a.command else {
            panic!("not audit query");
        };
        assert_eq!(q.agent.as_deref(), Some("research"));
        assert_eq!(q.result, Some(Verdict::Allow));
        assert!(q.since.unwrap().ends_with('Z'));
        assert_eq!(q.limit, Some(5));
        assert!(q.json);
    }
}
