//! `mandate grant …`: grants through `/v1/grants` and `/v1/tasks/{task}/close` (admin token), and
//! `mandate grant token`, which asks for a delegation token with an agent's own SVID files
//! (`/v1/sidecar/delegation/token`, mutual TLS).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use mandate_wire::{DELEGATION_TOKEN_PATH, IssuedToken, TokenRequest};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::client::{ApiRequest, Client, ServerArgs, segment};
use super::table::{Table, clean};
use super::workload::expiry;

/// Longest grant `--ttl` (the server refuses more).
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Arguments of `mandate grant`: the server options and a verb.
#[derive(Debug, Args)]
pub struct GrantArgs {
    /// Where the control plane is.
    #[command(flatten)]
    pub server: ServerArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: GrantCommand,
}

/// The grant verbs.
#[derive(Debug, Subcommand)]
pub enum GrantCommand {
    /// Record a person's consent for an agent to act on their behalf, within its ceiling.
    Create(CreateArgs),
    /// List grants, newest first: id, agent, subject, status, expiry, task.
    List(ListArgs),
    /// Show one grant.
    Show {
        /// The grant id.
        id: String,
        /// Print the grant as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a grant: no more tokens from it, and sidecars refuse those already issued.
    Revoke {
        /// The grant id.
        id: String,
        /// Who revokes it (recorded; default `admin`).
        #[arg(long, value_name = "WHO")]
        by: Option<String>,
    },
    /// Close a task: every active grant of it ends.
    CloseTask {
        /// The task.
        task: String,
        /// Who closes it (recorded; default `admin`).
        #[arg(long, value_name = "WHO")]
        by: Option<String>,
    },
    /// Get a delegation token from a grant, as its agent: with the agent's SVID files, over
    /// mutual TLS (no admin token). Prints the token.
    Token(TokenArgs),
}

/// Arguments of `grant create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The agent's name.
    #[arg(long, value_name = "NAME")]
    pub agent: String,
    /// The person on whose behalf it may act.
    #[arg(long, value_name = "WHO")]
    pub subject: String,
    /// What it may do for them: a JSON scope object or array of them, e.g.
    /// '{"host":"tool","tool":"read_*"}' (repeatable; each within the agent's ceiling).
    #[arg(long = "scope", value_name = "JSON", required = true, value_parser = parse_scopes)]
    pub scopes: Vec<Scopes>,
    /// Conditions the policy applies on top: a JSON object, e.g.
    /// '{"arguments":{"path":"/reports/*"},"require_approval":[{"tool":"delete_*"}]}'.
    #[arg(long, value_name = "JSON", value_parser = parse_constraints)]
    pub constraints: Option<Constraints>,
    /// Why.
    #[arg(long, value_name = "TEXT")]
    pub purpose: String,
    /// How long it lasts, e.g. 15m or 2h (at most 24h) [default: the server's --grant-ttl].
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Option<Duration>,
    /// The task it belongs to: `mandate grant close-task TASK` ends it.
    #[arg(long, value_name = "TASK")]
    pub task: Option<String>,
    /// Who approved it.
    #[arg(long, value_name = "WHO")]
    pub approved_by: String,
    /// Print the grant as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `grant list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this agent's.
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// Only those given by this person.
    #[arg(long, value_name = "WHO")]
    pub subject: Option<String>,
    /// Only those with this status.
    #[arg(long, value_name = "STATUS", value_parser = ["active", "revoked", "closed", "expired"])]
    pub status: Option<String>,
    /// Only this task's.
    #[arg(long, value_name = "TASK")]
    pub task: Option<String>,
    /// At most this many [default: 100].
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Print the grants as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `grant token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The grant id.
    pub id: String,
    /// The agent's certificate (PEM; its SVID, leaf first).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// The agent's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Where the token may be presented: a SPIFFE ID of the trust domain (repeatable)
    /// [default: anywhere in the trust domain].
    #[arg(long, value_name = "SPIFFE_ID")]
    pub audience: Vec<String>,
    /// Print the token and its expiry as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One `--scope`: the scope objects it gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Scopes(pub Vec<Value>);

/// Parses one `--scope`: a JSON scope object, or an array of them (the server checks each).
pub fn parse_scopes(s: &str) -> Result<Scopes, String> {
    match serde_json::from_str(s) {
        Ok(Value::Array(scopes)) => Ok(Scopes(scopes)),
        Ok(scope @ Value::Object(_)) => Ok(Scopes(vec![scope])),
        Ok(_) => Err(
            "must be a JSON scope object such as '{\"host\":\"tool\",\"tool\":\"read_*\"}', or an \
             array of them"
                .to_owned(),
        ),
        Err(e) => Err(format!(
            "not JSON ({e}); expected a scope such as '{{\"host\":\"tool\",\"tool\":\"read_*\"}}'"
        )),
    }
}

/// `--constraints`: a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Constraints(pub Map<String, Value>);

/// Parses `--constraints`: a JSON object (the server checks what is in it).
pub fn parse_constraints(s: &str) -> Result<Constraints, String> {
    match serde_json::from_str(s) {
        Ok(Value::Object(map)) => Ok(Constraints(map)),
        Ok(_) => {
            Err("must be a JSON object, such as '{\"arguments\":{\"path\":\"/tmp/*\"}}'".into())
        }
        Err(e) => Err(format!(
            "not JSON ({e}); expected an object such as '{{\"arguments\":{{\"path\":\"/tmp/*\"}}}}'"
        )),
    }
}

/// Parses `--ttl`: a duration of whole seconds, 1s to 24h.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (use a duration such as 15m or 2h)"))?;
    if d < Duration::from_secs(1) || d > MAX_TTL {
        return Err("must be between 1s and 24h".to_owned());
    }
    Ok(d)
}

/// Body of `POST /v1/grants`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreateBody {
    agent: String,
    subject: String,
    scopes: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    constraints: Option<Map<String, Value>>,
    purpose: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<String>,
    approved_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_seconds: Option<u64>,
}

impl CreateBody {
    /// The body for `args`.
    pub fn from_args(args: &CreateArgs) -> Self {
        Self {
            agent: args.agent.clone(),
            subject: args.subject.clone(),
            scopes: args
                .scopes
                .iter()
                .flat_map(|s| s.0.iter().cloned())
                .collect(),
            constraints: args.constraints.as_ref().map(|c| c.0.clone()),
            purpose: args.purpose.clone(),
            task: args.task.clone(),
            approved_by: args.approved_by.clone(),
            ttl_seconds: args.ttl.map(|d| d.as_secs()),
        }
    }
}

/// A grant, as the API returns it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Grant {
    /// Its id.
    pub id: String,
    /// The agent's name.
    pub agent: String,
    /// The person.
    pub subject: String,
    /// Scope objects.
    #[serde(default)]
    pub scopes: Vec<Value>,
    /// Constraints.
    #[serde(default)]
    pub constraints: Option<Value>,
    /// Why.
    #[serde(default)]
    pub purpose: String,
    /// The task.
    #[serde(default)]
    pub task: Option<String>,
    /// Who approved.
    #[serde(default)]
    pub approved_by: String,
    /// When approved (RFC 3339).
    #[serde(default)]
    pub approved_at: String,
    /// When recorded (RFC 3339).
    #[serde(default)]
    pub created_at: String,
    /// When it ends (RFC 3339).
    #[serde(default)]
    pub expires_at: String,
    /// active, revoked, closed or expired.
    pub status: String,
    /// When revoked or closed.
    #[serde(default)]
    pub revoked_at: Option<String>,
    /// Who revoked or closed it.
    #[serde(default)]
    pub revoked_by: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GrantList {
    grants: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct ClosedTask {
    task: String,
    closed: Vec<Grant>,
}

#[derive(Debug, Serialize)]
struct RevokeBody<'a> {
    revoked_by: &'a str,
}

#[derive(Debug, Serialize)]
struct CloseBody<'a> {
    closed_by: &'a str,
}

/// Runs `mandate grant …`.
pub fn main(args: GrantArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    if let GrantCommand::Token(token) = &args.command {
        let client = Client::with_identity(
            &args.server.server,
            args.server.ca_cert.as_deref(),
            &token.cert,
            &token.key,
        )?;
        super::block_on(get_token(token, &client, &mut out))?;
        return Ok(ExitCode::SUCCESS);
    }
    let client = Client::from_args(&args.server)?;
    super::block_on(run(&args.command, &client, &mut out))?;
    Ok(ExitCode::SUCCESS)
}

fn item(id: &str) -> String {
    format!("/v1/grants/{}", segment(id))
}

/// Runs one admin grant verb, printing to `out`.
pub async fn run(
    command: &GrantCommand,
    client: &Client,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    match command {
        GrantCommand::Create(args) => {
            let body = CreateBody::from_args(args);
            let grant: Value = client
                .call(&ApiRequest::post("/v1/grants", Some(&body)))
                .await?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&grant)?)?;
            } else {
                let grant: Grant =
                    serde_json::from_value(grant).context("the server's answer is not a grant")?;
                writeln!(out, "created grant {}", clean(&grant.id))?;
                write!(out, "{}", key_values(&grant))?;
            }
        }
        GrantCommand::List(args) => {
            let mut req = ApiRequest::get("/v1/grants");
            for (key, value) in [
                ("agent", &args.agent),
                ("subject", &args.subject),
                ("status", &args.status),
                ("task", &args.task),
            ] {
                if let Some(value) = value {
                    req = req.query(key, value.clone());
                }
            }
            if let Some(limit) = args.limit {
                req = req.query("limit", limit.to_string());
            }
            let list: GrantList = client.call(&req).await?;
            if args.json {
                for grant in &list.grants {
                    writeln!(out, "{}", serde_json::to_string(grant)?)?;
                }
            } else {
                let grants = list
                    .grants
                    .into_iter()
                    .map(serde_json::from_value)
                    .collect::<Result<Vec<Grant>, _>>()
                    .context("the server's answer is not a list of grants")?;
                write!(out, "{}", list_table(&grants))?;
            }
        }
        GrantCommand::Show { id, json } => {
            let grant: Value = client.call(&ApiRequest::get(item(id))).await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&grant)?)?;
            } else {
                let grant: Grant =
                    serde_json::from_value(grant).context("the server's answer is not a grant")?;
                write!(out, "{}", key_values(&grant))?;
            }
        }
        GrantCommand::Revoke { id, by } => {
            let req = match by {
                Some(by) => ApiRequest::post(
                    format!("{}/revoke", item(id)),
                    Some(&RevokeBody { revoked_by: by }),
                ),
                None => ApiRequest::post(format!("{}/revoke", item(id)), None::<&()>),
            };
            let grant: Grant = client.call(&req).await?;
            writeln!(
                out,
                "grant {} is {}{}",
                clean(&grant.id),
                clean(&grant.status),
                grant
                    .revoked_by
                    .as_deref()
                    .map(|by| format!(" (by {})", clean(by)))
                    .unwrap_or_default()
            )?;
        }
        GrantCommand::CloseTask { task, by } => {
            let path = format!("/v1/tasks/{}/close", segment(task));
            let req = match by {
                Some(by) => ApiRequest::post(path, Some(&CloseBody { closed_by: by })),
                None => ApiRequest::post(path, None::<&()>),
            };
            let closed: ClosedTask = client.call(&req).await?;
            if closed.closed.is_empty() {
                writeln!(
                    out,
                    "task {} had no active grants left",
                    clean(&closed.task)
                )?;
            } else {
                writeln!(
                    out,
                    "closed task {}: {} grant{} ended",
                    clean(&closed.task),
                    closed.closed.len(),
                    if closed.closed.len() == 1 { "" } else { "s" }
                )?;
                for grant in &closed.closed {
                    writeln!(
                        out,
                        "  {}  {}  {}",
                        clean(&grant.id),
                        clean(&grant.agent),
                        clean(&grant.subject)
                    )?;
                }
            }
        }
        GrantCommand::Token(_) => bail!("`grant token` authenticates with the agent's certificate"),
    }
    Ok(())
}

/// `mandate grant token`: the token on a line of its own (or JSON with its expiry).
pub async fn get_token(
    args: &TokenArgs,
    client: &Client,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let body = TokenRequest {
        grant_id: args.id.clone(),
        audience: args.audience.clone(),
    };
    let issued: IssuedToken = client
        .call(&ApiRequest::post(DELEGATION_TOKEN_PATH, Some(&body)))
        .await?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&issued)?)?;
    } else {
        writeln!(out, "{}", clean(&issued.token))?;
    }
    Ok(())
}

/// `ID  AGENT  SUBJECT  STATUS  EXPIRES  TASK`.
pub fn list_table(grants: &[Grant]) -> String {
    let mut t = Table::new(&["ID", "AGENT", "SUBJECT", "STATUS", "EXPIRES", "TASK"]);
    for g in grants {
        t.row([
            g.id.clone(),
            g.agent.clone(),
            g.subject.clone(),
            g.status.clone(),
            expiry(&Value::String(g.expires_at.clone())),
            g.task.clone().unwrap_or_default(),
        ]);
    }
    t.render()
}

/// A grant as `key: value` lines.
pub fn key_values(g: &Grant) -> String {
    let scopes = serde_json::to_string(&g.scopes).unwrap_or_default();
    let constraints = g
        .constraints
        .as_ref()
        .map(|c| serde_json::to_string(c).unwrap_or_default())
        .unwrap_or_default();
    let revoked = match (&g.revoked_at, &g.revoked_by) {
        (Some(at), Some(by)) => format!("{at} by {by}"),
        (Some(at), None) => at.clone(),
        _ => String::new(),
    };
    let rows = [
        ("id", g.id.as_str()),
        ("agent", g.agent.as_str()),
        ("subject", g.subject.as_str()),
        ("status", g.status.as_str()),
        ("scopes", scopes.as_str()),
        ("constraints", constraints.as_str()),
        ("purpose", g.purpose.as_str()),
        ("task", g.task.as_deref().unwrap_or_default()),
        ("approved by", g.approved_by.as_str()),
        ("approved", g.approved_at.as_str()),
        ("created", g.created_at.as_str()),
        ("expires", g.expires_at.as_str()),
        ("ended", revoked.as_str()),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        let line = format!("{:<12} {}", format!("{k}:"), clean(v));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(args: &[&str]) -> Result<GrantArgs, clap::Error> {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            a: GrantArgs,
        }
        let mut argv = vec!["grant"];
        argv.extend_from_slice(args);
        P::try_parse_from(argv).map(|p| p.a)
    }

    fn grant() -> Grant {
        serde_json::from_value(json!({
            "id": "0198a1b2-0000-7000-8000-000000000001", "agent": "research",
            "agent_id": "spiffe://mandate.local/agent/research", "subject": "alice@example.com",
            "scopes": [{"host": "tool", "tool": "read_*"}], "purpose": "the Q3 report",
            "task": "Q3", "approved_by": "bob", "approved_at": "2026-01-01T00:00:00Z",
            "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T00:15:00Z",
            "status": "revoked", "revoked_at": "2026-01-01T00:05:00Z", "revoked_by": "carol",
            "something_new": 1
        }))
        .unwrap()
    }

    #[test]
    fn create_builds_the_body_from_repeated_scopes() {
        let args = parse(&[
            "create",
            "--agent",
            "research",
            "--subject",
            "alice",
            "--scope",
            r#"{"host":"tool","tool":"read_*"}"#,
            "--scope",
            r#"[{"host":"db"},{"host":"api"}]"#,
            "--constraints",
            r#"{"arguments":{"path":"/r/*"}}"#,
            "--purpose",
            "report",
            "--ttl",
            "2h",
            "--task",
            "Q3",
            "--approved-by",
            "bob",
        ])
        .unwrap();
        let GrantCommand::Create(create) = args.command else {
            panic!("not create");
        };
        assert_eq!(
            serde_json::to_value(CreateBody::from_args(&create)).unwrap(),
            json!({
                "agent": "research", "subject": "alice",
                "scopes": [{"host": "tool", "tool": "read_*"}, {"host": "db"}, {"host": "api"}],
                "constraints": {"arguments": {"path": "/r/*"}}, "purpose": "report",
                "task": "Q3", "approved_by": "bob", "ttl_seconds": 7200
            })
        );
    }

    #[test]
    fn create_needs_a_scope_a_purpose_and_an_approver() {
        let base = ["create", "--agent", "a", "--subject", "s"];
        let err = parse(&base).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let mut argv = base.to_vec();
        argv.extend([
            "--scope",
            "{}",
            "--purpose",
            "p",
            "--approved-by",
            "b",
            "--ttl",
            "25h",
        ]);
        assert!(parse(&argv).unwrap_err().to_string().contains("24h"));
        let mut argv = base.to_vec();
        argv.extend([
            "--scope",
            "{}",
            "--purpose",
            "p",
            "--approved-by",
            "b",
            "--constraints",
            "[]",
        ]);
        assert!(
            parse(&argv)
                .unwrap_err()
                .to_string()
                .contains("JSON object")
        );
    }

    #[test]
    fn every_verb_parses() {
        assert!(matches!(
            parse(&["list", "--status", "active", "--json"])
                .unwrap()
                .command,
            GrantCommand::List(ListArgs { json: true, .. })
        ));
        assert!(parse(&["list", "--status", "gone"]).is_err());
        assert!(matches!(
            parse(&["show", "g", "--json"]).unwrap().command,
            GrantCommand::Show { json: true, .. }
        ));
        assert!(matches!(
            parse(&["revoke", "g", "--by", "carol"]).unwrap().command,
            GrantCommand::Revoke { by: Some(_), .. }
        ));
        assert!(matches!(
            parse(&["close-task", "Q3"]).unwrap().command,
            GrantCommand::CloseTask { by: None, .. }
        ));
        let GrantCommand::Token(t) = parse(&[
            "token",
            "g",
            "--cert",
            "a.pem",
            "--key",
            "a-key.pem",
            "--audience",
            "spiffe://mandate.local/service/tool",
        ])
        .unwrap()
        .command
        else {
            panic!("not token");
        };
        assert_eq!(t.audience.len(), 1);
        assert!(
            parse(&["token", "g", "--cert", "a.pem"]).is_err(),
            "--key is required"
        );
    }

    #[test]
    fn grants_render_as_a_table_and_as_key_values() {
        let g = grant();
        assert_eq!(
            list_table(std::slice::from_ref(&g)),
            "ID                                    AGENT     SUBJECT            STATUS   EXPIRES               TASK\n\
             0198a1b2-0000-7000-8000-000000000001  research  alice@example.com  revoked  2026-01-01T00:15:00Z  Q3\n"
        );
        let kv = key_values(&g);
        assert!(
            kv.starts_with("id:          0198a1b2-0000-7000-8000-000000000001\n"),
            "{kv}"
        );
        assert!(
            kv.contains("\nscopes:      [{\"host\":\"tool\",\"tool\":\"read_*\"}]\n"),
            "{kv}"
        );
        assert!(
            kv.contains("\nended:       2026-01-01T00:05:00Z by carol\n"),
            "{kv}"
        );
        assert!(kv.contains("\nconstraints:\n"), "{kv}");
    }

    #[test]
    fn ids_and_tasks_are_escaped_into_paths() {
        assert_eq!(item("a/b"), "/v1/grants/a%2Fb");
        assert_eq!(
            format!("/v1/tasks/{}/close", segment("ticket #5")),
            "/v1/tasks/ticket%20%235/close"
        );
    }
}
