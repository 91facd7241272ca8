//! `mandate agent …` and `mandate service …`: the registry, through `/v1/agents` and `/v1/services`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use mandate_wire::{Reach, RouteProtocol};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::{ApiRequest, Client, ServerArgs, segment};
use super::table::{Table, clean};

/// Which half of the registry a command works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/agents`.
    Agent,
    /// `/v1/services`.
    Service,
}

impl Kind {
    /// The word used in messages.
    pub fn word(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Service => "service",
        }
    }

    fn collection(self) -> &'static str {
        match self {
            Self::Agent => "/v1/agents",
            Self::Service => "/v1/services",
        }
    }

    fn item(self, name: &str) -> String {
        format!("{}/{}", self.collection(), segment(name))
    }
}

/// Arguments of `mandate agent` and `mandate service`: the server options and a verb.
#[derive(Debug, Args)]
pub struct WorkloadArgs {
    /// Where the control plane is.
    #[command(flatten)]
    pub server: ServerArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: WorkloadCommand,
}

/// The registry verbs.
#[derive(Debug, Subcommand)]
pub enum WorkloadCommand {
    /// Register NAME and print its one-time join token.
    Register(RegisterArgs),
    /// List every registered one: name, status, owner, SPIFFE ID.
    List,
    /// Show one registration.
    Show {
        /// Its name.
        name: String,
        /// Print the registration as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Suspend NAME: its calls are denied and its connections cut until `activate`.
    Suspend {
        /// Its name.
        name: String,
    },
    /// Revoke NAME for good (cannot be undone).
    Revoke {
        /// Its name.
        name: String,
    },
    /// Reactivate a suspended NAME.
    Activate {
        /// Its name.
        name: String,
    },
    /// Issue a fresh one-time join token for NAME.
    Token {
        /// Its name.
        name: String,
    },
}

/// Arguments of `register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Name (becomes spiffe://<td>/agent/NAME or …/service/NAME).
    pub name: String,
    /// Who answers for it (a person or a team).
    #[arg(long, value_name = "WHO")]
    pub owner: String,
    /// What it is for.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// The most it may ever do: a JSON scope object, e.g. '{"host":"tool","tool":"search"}', or an
    /// array of them (repeatable: the scopes add up).
    #[arg(long, value_name = "JSON", value_parser = parse_scopes, conflicts_with = "ceiling_file")]
    pub ceiling: Vec<Scopes>,
    /// Read the ceiling (a JSON array of scopes, or one scope object) from FILE.
    #[arg(long, value_name = "FILE")]
    pub ceiling_file: Option<PathBuf>,
    /// What it may do on its own, with no delegation from a person: a JSON scope object or array
    /// of scopes (repeatable; policy intersects them with the ceiling). Without any, it acts only
    /// when delegated.
    #[arg(long, value_name = "JSON", value_parser = parse_scopes)]
    pub autonomous: Vec<Scopes>,
    /// A label (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<Label>,
    /// An address callers reach it by, HOST:PORT (a DNS name or an IP), e.g. tool:8080
    /// (repeatable). Every managed sidecar routes calls to these addresses to it over mTLS.
    #[arg(long = "address", value_name = "HOST:PORT")]
    pub addresses: Vec<String>,
    /// Where its sidecar accepts mTLS, HOST:PORT, e.g. tool:15006 (docker-compose). Default: the
    /// called address itself, for workloads whose inbound TCP init-iptables redirects (Kubernetes).
    #[arg(long, value_name = "HOST:PORT", requires = "addresses")]
    pub inbound: Option<String>,
    /// How calls to its addresses are carried: http, or tcp for opaque streams (databases).
    #[arg(long, value_name = "PROTOCOL", value_parser = parse_protocol, requires = "addresses")]
    pub protocol: Option<RouteProtocol>,
}

/// The scope objects one `--ceiling` or `--autonomous` gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Scopes(pub Vec<Value>);

/// One `--label KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// The key (non-empty).
    pub key: String,
    /// The value (may be empty).
    pub value: String,
}

/// Parses one `--ceiling` or `--autonomous`: a JSON scope object, or an array of them (the server
/// checks each scope).
pub fn parse_scopes(s: &str) -> Result<Scopes, String> {
    let value: Value = serde_json::from_str(s).map_err(|e| {
        format!(
            "not JSON ({e}); expected a scope such as '{{\"host\":\"tool\",\"tool\":\"search\"}}'"
        )
    })?;
    match value {
        Value::Array(scopes) => Ok(Scopes(scopes)),
        scope @ Value::Object(_) => Ok(Scopes(vec![scope])),
        _ => Err(
            "must be a JSON scope object such as '{\"host\":\"tool\"}', or an array of them"
                .to_owned(),
        ),
    }
}

/// Parses `--protocol http|tcp`.
fn parse_protocol(s: &str) -> Result<RouteProtocol, String> {
    match s {
        "http" => Ok(RouteProtocol::Http),
        "tcp" => Ok(RouteProtocol::Tcp),
        _ => Err("must be http or tcp".to_owned()),
    }
}

/// Parses `--label KEY=VALUE`.
pub fn parse_label(s: &str) -> Result<Label, String> {
    let Some((key, value)) = s.split_once('=') else {
        return Err("expected KEY=VALUE, e.g. team=research".to_owned());
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(
            "the key before '=' is empty (expected KEY=VALUE, e.g. team=research)".to_owned(),
        );
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("label key {key:?} must not contain spaces"));
    }
    Ok(Label {
        key: key.to_owned(),
        value: value.to_owned(),
    })
}

/// Body of `POST /v1/agents` and `POST /v1/services`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegisterRequest {
    /// Name.
    pub name: String,
    /// Owner.
    pub owner: String,
    /// Description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Ceiling scopes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<Vec<Value>>,
    /// Autonomous scopes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub autonomous: Vec<Value>,
    /// Labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How callers reach it through the mesh.
    #[serde(skip_serializing_if = "Reach::is_empty")]
    pub reach: Reach,
}

impl RegisterRequest {
    /// Builds the body from the arguments, reading `--ceiling-file` and refusing repeated label keys.
    pub fn from_args(args: &RegisterArgs) -> anyhow::Result<Self> {
        let ceiling = match (args.ceiling.is_empty(), &args.ceiling_file) {
            (false, _) => Some(concat(&args.ceiling)),
            (true, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --ceiling-file {}", path.display()))?;
                let c = parse_scopes(&text)
                    .map_err(|e| anyhow::anyhow!("--ceiling-file {}: {e}", path.display()))?;
                Some(c.0)
            }
            (true, None) => None,
        };
        let mut labels = BTreeMap::new();
        for l in &args.labels {
            if labels.insert(l.key.clone(), l.value.clone()).is_some() {
                bail!("--label {} is given twice", l.key);
            }
        }
        Ok(Self {
            name: args.name.clone(),
            owner: args.owner.clone(),
            description: args.description.clone(),
            ceiling,
            autonomous: concat(&args.autonomous),
            labels,
            reach: Reach {
                addresses: args.addresses.clone(),
                inbound: args.inbound.clone(),
                protocol: args.protocol.unwrap_or_default(),
            },
        })
    }
}

/// The scopes of every occurrence of a repeated option, in order.
fn concat(given: &[Scopes]) -> Vec<Value> {
    given.iter().flat_map(|s| s.0.iter().cloned()).collect()
}

/// A registered agent or service, as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Name.
    pub name: String,
    /// `agent` or `service`.
    #[serde(default)]
    pub kind: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Owner.
    #[serde(default)]
    pub owner: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Ceiling scopes.
    #[serde(default)]
    pub ceiling: Vec<Value>,
    /// Autonomous scopes.
    #[serde(default)]
    pub autonomous: Vec<Value>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How callers reach it through the mesh.
    #[serde(default)]
    pub reach: Reach,
    /// `active`, `suspended` or `revoked`.
    pub status: String,
    /// When registered (RFC 3339).
    #[serde(default)]
    pub created_at: String,
    /// When last changed (RFC 3339).
    #[serde(default)]
    pub updated_at: String,
}

/// `{workloads: [..]}`.
#[derive(Debug, Deserialize)]
struct WorkloadList {
    workloads: Vec<Workload>,
}

/// `201 {workload, join_token, join_token_expires_at}`.
#[derive(Debug, Deserialize)]
struct Registered {
    workload: Workload,
    join_token: String,
    join_token_expires_at: Value,
}

/// `201 {join_token, join_token_expires_at}`.
#[derive(Debug, Deserialize)]
struct IssuedToken {
    join_token: String,
    join_token_expires_at: Value,
}

/// Runs `mandate agent …` or `mandate service …`.
pub fn main(kind: Kind, args: WorkloadArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_args(&args.server)?;
    super::block_on(run(
        kind,
        &args.command,
        &client,
        &mut std::io::stdout().lock(),
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs one registry verb, printing to `out`.
pub async fn run(
    kind: Kind,
    command: &WorkloadCommand,
    client: &Client,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    match command {
        WorkloadCommand::Register(args) => {
            let body = RegisterRequest::from_args(args)?;
            let reg: Registered = client
                .call(&ApiRequest::post(kind.collection(), Some(&body)))
                .await?;
            writeln!(
                out,
                "registered {} {}",
                kind.word(),
                clean(&reg.workload.name)
            )?;
            write!(out, "{}", key_values(&reg.workload))?;
            write_token(out, &reg.join_token, &reg.join_token_expires_at)?;
        }
        WorkloadCommand::List => {
            let list: WorkloadList = client.call(&ApiRequest::get(kind.collection())).await?;
            write!(out, "{}", list_table(&list.workloads))?;
        }
        WorkloadCommand::Show { name, json } => {
            let w: Value = client.call(&ApiRequest::get(kind.item(name))).await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&w)?)?;
            } else {
                let w: Workload =
                    serde_json::from_value(w).context("the server's answer is not a workload")?;
                write!(out, "{}", key_values(&w))?;
            }
        }
        WorkloadCommand::Suspend { name }
        | WorkloadCommand::Revoke { name }
        | WorkloadCommand::Activate { name } => {
            let verb = match command {
                WorkloadCommand::Suspend { .. } => "suspend",
                WorkloadCommand::Revoke { .. } => "revoke",
                _ => "activate",
            };
            let w: Workload = client
                .call(&ApiRequest::post(
                    format!("{}/{verb}", kind.item(name)),
                    None::<&()>,
                ))
                .await?;
            writeln!(
                out,
                "{} {} is now {}",
                kind.word(),
                clean(&w.name),
                clean(&w.status)
            )?;
        }
        WorkloadCommand::Token { name } => {
            let t: IssuedToken = client
                .call(&ApiRequest::post(
                    format!("{}/join-tokens", kind.item(name)),
                    None::<&()>,
                ))
                .await?;
            writeln!(out, "new join token for {} {}", kind.word(), clean(name))?;
            write_token(out, &t.join_token, &t.join_token_expires_at)?;
        }
    }
    Ok(())
}

/// The join token, labelled, on a line of its own so it can be copied whole.
fn write_token(out: &mut impl Write, token: &str, expires: &Value) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "Join token (secret, single use, expires {}; shown only now):",
        expiry(expires)
    )?;
    writeln!(out, "  {}", clean(token))?;
    writeln!(
        out,
        "Start the sidecar with: mandate-proxy --control-plane <url> --join-token <token> …"
    )
}

/// An expiry the API gave either as RFC 3339 text or as Unix seconds.
pub fn expiry(v: &Value) -> String {
    match v {
        Value::String(s) => clean(s),
        Value::Number(n) => match n.as_i64().and_then(|s| {
            time::OffsetDateTime::from_unix_timestamp(s)
                .ok()?
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        }) {
            Some(t) => t,
            None => n.to_string(),
        },
        other => clean(&other.to_string()),
    }
}

/// `NAME  STATUS  OWNER  SPIFFE ID`.
pub fn list_table(workloads: &[Workload]) -> String {
    let mut t = Table::new(&["NAME", "STATUS", "OWNER", "SPIFFE ID"]);
    for w in workloads {
        t.row([
            w.name.clone(),
            w.status.clone(),
            w.owner.clone(),
            w.spiffe_id.clone(),
        ]);
    }
    t.render()
}

/// `tool:8080, 10.0.0.3:8080 (inbound tool:15006, http)`, or empty when not reachable by address.
fn reach_summary(reach: &Reach) -> String {
    if reach.addresses.is_empty() {
        return String::new();
    }
    let inbound = reach.inbound.as_deref().unwrap_or("the called address");
    format!(
        "{} (inbound {inbound}, {})",
        reach.addresses.join(", "),
        reach.protocol.as_str()
    )
}

/// A registration as `key: value` lines.
pub fn key_values(w: &Workload) -> String {
    let labels = w
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let ceiling = serde_json::to_string(&w.ceiling).unwrap_or_default();
    let autonomous = serde_json::to_string(&w.autonomous).unwrap_or_default();
    let reach = reach_summary(&w.reach);
    let rows = [
        ("name", w.name.as_str()),
        ("kind", w.kind.as_str()),
        ("spiffe id", w.spiffe_id.as_str()),
        ("status", w.status.as_str()),
        ("owner", w.owner.as_str()),
        ("description", w.description.as_str()),
        ("ceiling", ceiling.as_str()),
        ("autonomous", autonomous.as_str()),
        ("labels", labels.as_str()),
        ("reach", reach.as_str()),
        ("created", w.created_at.as_str()),
        ("updated", w.updated_at.as_str()),
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

    fn workload() -> Workload {
        serde_json::from_value(serde_json::json!({
            "name": "research", "kind": "agent", "spiffe_id": "spiffe://mandate.local/agent/research",
            "owner": "alice@example.com", "description": "", "ceiling": [{"host": "tool"}],
            "autonomous": [{"host": "tool", "tool": "search"}], "labels": {"team": "r"}, "status": "active",
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
            "something_new": 1
        }))
        .unwrap()
    }

    #[test]
    fn labels_parse_and_say_what_is_wrong() {
        assert_eq!(
            parse_label("team=research").unwrap(),
            Label {
                key: "team".into(),
                value: "research".into()
            }
        );
        assert_eq!(parse_label("k=").unwrap().value, "");
        assert_eq!(parse_label("url=a=b").unwrap().value, "a=b");
        assert!(parse_label("team").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_label("=x").unwrap_err().contains("key"));
        assert!(parse_label("a b=x").unwrap_err().contains("spaces"));
    }

    #[test]
    fn scopes_are_a_json_object_or_an_array_of_them() {
        assert_eq!(
            parse_scopes(r#"{"host":"tool"}"#).unwrap().0,
            vec![serde_json::json!({"host": "tool"})]
        );
        assert_eq!(parse_scopes("[]").unwrap().0, Vec::<Value>::new());
        assert!(
            parse_scopes(r#""tool""#)
                .unwrap_err()
                .contains("scope object")
        );
        assert!(parse_scopes("{oops").unwrap_err().contains("not JSON"));
    }

    fn args(extra: &[&str]) -> RegisterArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            a: RegisterArgs,
        }
        let mut argv = vec!["x", "research", "--owner", "alice"];
        argv.extend_from_slice(extra);
        P::try_parse_from(argv).unwrap().a
    }

    #[test]
    fn the_register_body_has_only_what_was_given() {
        let body = RegisterRequest::from_args(&args(&[])).unwrap();
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"name": "research", "owner": "alice"})
        );
        let body = RegisterRequest::from_args(&args(&[
            "--description",
            "d",
            "--ceiling",
            r#"[{"tool":"search"}]"#,
            "--ceiling",
            r#"{"tool":"read_*"}"#,
            "--autonomous",
            r#"{"tool":"search"}"#,
            "--autonomous",
            r#"[{"tool":"read_*"},{"host":"api"}]"#,
            "--label",
            "team=r",
            "--label",
            "env=prod",
        ]))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"name": "research", "owner": "alice", "description": "d",
                "ceiling": [{"tool": "search"}, {"tool": "read_*"}],
                "autonomous": [{"tool": "search"}, {"tool": "read_*"}, {"host": "api"}],
                "labels": {"env": "prod", "team": "r"}})
        );
        let err =
            RegisterRequest::from_args(&args(&["--label", "a=1", "--label", "a=2"])).unwrap_err();
        assert_eq!(err.to_string(), "--label a is given twice");
    }

    #[test]
    fn the_ceiling_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.json");
        std::fs::write(&file, r#"[{"host": "api", "method": "GET"}]"#).unwrap();
        let body =
            RegisterRequest::from_args(&args(&["--ceiling-file", file.to_str().unwrap()])).unwrap();
        assert_eq!(
            body.ceiling,
            Some(vec![serde_json::json!({"host": "api", "method": "GET"})])
        );
        std::fs::write(&file, "5").unwrap();
        let err = RegisterRequest::from_args(&args(&["--ceiling-file", file.to_str().unwrap()]))
            .unwrap_err();
        assert!(
            err.to_string().contains("must be a JSON scope object"),
            "{err}"
        );
    }

    #[test]
    fn workloads_render_as_a_table_and_as_key_values() {
        let w = workload();
        assert_eq!(
            list_table(std::slice::from_ref(&w)),
            "NAME      STATUS  OWNER              SPIFFE ID\n\
             research  active  alice@example.com  spiffe://mandate.local/agent/research\n"
        );
        let kv = key_values(&w);
        assert!(
            kv.starts_with("name:        research\nkind:        agent\n"),
            "{kv}"
        );
        assert!(
            kv.contains("\nceiling:     [{\"host\":\"tool\"}]\n"),
            "{kv}"
        );
        assert!(
            kv.contains("\nautonomous:  [{\"host\":\"tool\",\"tool\":\"search\"}]\n"),
            "{kv}"
        );
        assert!(kv.contains("\nlabels:      team=r\n"), "{kv}");
        assert!(kv.contains("\ndescription:\n"), "{kv}");
    }

    #[test]
    fn expiry_reads_text_or_unix_seconds() {
        assert_eq!(
            expiry(&serde_json::json!("2026-01-01T01:00:00Z")),
            "2026-01-01T01:00:00Z"
        );
        assert_eq!(expiry(&serde_json::json!(0)), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn the_token_is_on_its_own_labelled_line() {
        let mut out = Vec::new();
        write_token(
            &mut out,
            "mjt1.a.b.c",
            &serde_json::json!("2026-01-01T01:00:00Z"),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Join token (secret, single use, expires 2026-01-01T01:00:00Z"));
        assert!(text.lines().any(|l| l.trim() == "mjt1.a.b.c"), "{text}");
    }

    #[test]
    fn names_are_escaped_into_paths() {
        assert_eq!(Kind::Agent.item("research"), "/v1/agents/research");
        assert_eq!(Kind::Service.item("a/b"), "/v1/services/a%2Fb");
    }
}
